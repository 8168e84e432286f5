//! Deterministic simulation of many [`Replicator`]s (quinn-proto's `Pair`, raft-rs's
//! `harness::Network` in spirit): virtual time, one priority queue of events, named
//! controls for the network (drop, duplicate, cut, isolate, partition, recover), crashes,
//! restarts and joins; a failure prints its seed.
//!
//! Each node runs the real state machine and the real apply-side rules
//! (`sync::receive`), over a small model of a patina database with the properties sync
//! relies on: rows with a causal length (odd = alive, even = deleted) and a last-writer-
//! wins value per row by `(col_version, value, site)` — a monotone, idempotent,
//! order-independent merge — a gap-free local feed where every change that alters the
//! state takes the next local version, a gap-free numbering of the node's own writes, and
//! per-origin held versions recorded by every merge.
//!
//! The fleet runs (`fleet_*`, ignored by default; `scripts/sim-fleet` runs them in release)
//! add 40 regions with a round-trip matrix of 20–300 ms, link and apply capacity, and 1%
//! packet loss modelled as QUIC experiences it: the stream is reliable, a lost packet
//! costs a retransmission timeout. Connection-level loss (a message that never arrives)
//! is what `drop` does, in the many-seed convergence runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::held::Held;
use super::machine::{Applied, ApplyJob, Effect, Replicator, SyncConfig, Work};
use super::msg::{known_covers, Change, Chunk, Msg, OriginUnit, SiteId, Value};
use super::receive::{held_after_catch_up, held_after_unit, unit_complete};

/// One row: causal length, then the value's clock and value (`val` < 0 never written).
#[derive(Clone, Debug, PartialEq)]
struct Cell {
    cl: i64,
    col_version: i64,
    val: i64,
    site: SiteId,
    db_version: i64,
    /// The origin's own number for this state (travels with it, like `origin_version`).
    origin_version: i64,
}

impl Cell {
    fn key(&self) -> (i64, i64, i64, SiteId) {
        (self.cl, self.col_version, self.val, self.site)
    }
}

/// The durable part of a node: what a patina database holds.
#[derive(Clone, Default)]
struct Store {
    site: SiteId,
    cells: BTreeMap<u32, Cell>,
    version: i64,
    own: i64,
    held: Held,
    cursors: HashMap<SiteId, i64>,
    ranges: HashMap<SiteId, Vec<(i64, i64)>>,
    inbox: HashMap<(SiteId, i64, i64), Vec<Chunk>>,
}

impl Store {
    /// A local write (`Some(v)`) or delete (`None`) of row `key`.
    fn write(&mut self, key: u32, val: Option<i64>) {
        let cur = self.cells.get(&key).cloned();
        let alive = cur.as_ref().is_some_and(|c| c.cl % 2 == 1);
        let (cl, cv) = match (val, &cur) {
            (None, None) => return,
            (None, Some(_)) if !alive => return,
            (None, Some(c)) => (c.cl + 1, c.col_version),
            (Some(_), Some(c)) if alive => (c.cl, c.col_version + 1),
            (Some(_), Some(c)) => (c.cl + 1, c.col_version + 1),
            (Some(_), None) => (1, 1),
        };
        self.version += 1;
        self.own += 1;
        self.cells.insert(
            key,
            Cell {
                cl,
                col_version: cv,
                val: val.unwrap_or(-1),
                site: self.site,
                db_version: self.version,
                origin_version: self.own,
            },
        );
        self.held.insert(self.site, self.own, self.own);
    }

    /// Merges one change; records its origin version as held either way (as the
    /// extension does, superseded or not).
    fn merge(&mut self, c: &Change) {
        let (Value::Integer(val), Ok(site), Some(ov)) = (
            &c.val,
            SiteId::try_from(c.site_id.as_slice()),
            c.origin_version,
        ) else {
            return;
        };
        let key = u32::from_be_bytes([c.pk[0], c.pk[1], c.pk[2], c.pk[3]]);
        if site != self.site {
            self.held.insert(site, ov, ov);
        }
        let incoming = (c.cl, c.col_version, *val, site);
        let newer = match self.cells.get(&key) {
            None => true,
            Some(cur) => incoming > cur.key(),
        };
        if newer {
            self.version += 1;
            let v = self.version;
            self.cells.insert(
                key,
                Cell {
                    cl: c.cl,
                    col_version: c.col_version,
                    val: *val,
                    site,
                    db_version: v,
                    origin_version: ov,
                },
            );
        }
    }

    fn change(&self, key: u32, c: &Cell) -> Change {
        Change {
            table: "t".into(),
            pk: key.to_be_bytes().to_vec(),
            cid: "v".into(),
            val: Value::Integer(c.val),
            col_version: c.col_version,
            db_version: c.db_version,
            site_id: c.site.to_vec(),
            cl: c.cl,
            seq: 0,
            origin_version: Some(c.origin_version),
        }
    }

    /// The feed `(after, upto]` by local version, as `crsql_changes` returns it.
    fn feed(&self, after: i64, upto: i64, exclude: Option<&SiteId>, known: &Held) -> Vec<Change> {
        let mut rows: Vec<Change> = self
            .cells
            .iter()
            .filter(|(_, c)| c.db_version > after && c.db_version <= upto)
            .filter(|(_, c)| exclude != Some(&c.site))
            .map(|(k, c)| self.change(*k, c))
            .filter(|c| !known_covers(known, c))
            .collect();
        rows.sort_by_key(|c| c.db_version);
        rows
    }

    /// This node's own changes among versions `(own_from, own_to]` of its numbering.
    fn own_unit(&self, own_from: i64, own_to: i64, at_ms: u64) -> OriginUnit {
        let mut changes: Vec<Change> = self
            .cells
            .iter()
            .filter(|(_, c)| {
                c.site == self.site && c.origin_version > own_from && c.origin_version <= own_to
            })
            .map(|(k, c)| self.change(*k, c))
            .collect();
        changes.sort_by_key(|c| c.origin_version);
        OriginUnit {
            origin: self.site,
            from: own_from,
            to: own_to,
            committed_ms: at_ms,
            changes,
            schema: None,
        }
    }

    /// Content without local numbering: what must be identical after convergence.
    fn dump(&self) -> Vec<(u32, i64, i64, i64, SiteId)> {
        self.cells
            .iter()
            .map(|(k, c)| (*k, c.cl, c.col_version, c.val, c.site))
            .collect()
    }

    /// The apply side of `db::apply`, on the model: returns the report for the machine.
    fn apply(&mut self, job: &ApplyJob) -> Applied {
        let mut out = Applied::default();
        let local = self.site;
        match &job.work {
            Work::Unit(u) => {
                out.released.insert(u.origin, u.from + 1, u.to);
                for c in &u.changes {
                    self.merge(c);
                }
                self.held.union_with(&held_after_unit(u, &local));
                out.held.push((u.origin, self.held.of(&u.origin)));
            }
            Work::Chunk(c) => {
                let cursor = self.cursors.get(&job.peer_site).copied().unwrap_or(0);
                if c.unit_to <= cursor {
                    out.cursors.push((job.peer_site, cursor));
                    return out;
                }
                let chunks = if c.is_whole_unit() {
                    vec![c.clone()]
                } else {
                    let key = (job.peer_site, c.unit_from, c.unit_to);
                    let buf = self.inbox.entry(key).or_default();
                    if !buf.iter().any(|b| b.from == c.from) {
                        buf.push(c.clone());
                    }
                    let tiles: Vec<(i64, i64)> = buf.iter().map(|b| (b.from, b.to)).collect();
                    if !unit_complete(key.1, key.2, &tiles) {
                        return out;
                    }
                    let mut all = self.inbox.remove(&key).unwrap_or_default();
                    all.sort_by_key(|b| b.from);
                    all
                };
                let mut touched = HashSet::new();
                for ch in &chunks {
                    for change in &ch.changes {
                        self.merge(change);
                        if let Ok(s) = SiteId::try_from(change.site_id.as_slice()) {
                            touched.insert(s);
                        }
                    }
                }
                let first = chunks.iter().find(|b| b.from == b.unit_from);
                let held = first.and_then(|b| b.held.clone());
                let ranges = self.ranges.entry(job.peer_site).or_default();
                let (next, claim) = held_after_catch_up(
                    cursor,
                    ranges,
                    c.unit_from,
                    c.unit_to,
                    held.as_deref(),
                    &local,
                );
                self.held.union_with(&claim);
                touched.extend(claim.iter().map(|(s, _)| *s));
                self.cursors.insert(job.peer_site, next);
                self.inbox
                    .retain(|k, _| !(k.0 == job.peer_site && k.2 <= next));
                out.cursors.push((job.peer_site, next));
                for s in touched.into_iter().filter(|s| *s != local) {
                    out.held.push((s, self.held.of(&s)));
                }
            }
            // Simulated nodes never ask for snapshots (`set_seedable` is not called).
            Work::SeedPart(_) => {}
        }
        out
    }
}

/// A node: its durable store, its volatile machine and apply queue.
struct Node {
    addr: SocketAddr,
    /// What the simulated transport presents as this node's identity: its address.
    identity: Rc<str>,
    region: usize,
    store: Store,
    sync: Replicator,
    /// Own versions already handed to the machine.
    shipped: i64,
    up: bool,
    /// When the next timer event is scheduled (stale events are ignored).
    timer_at: Option<Duration>,
    tail_scheduled: bool,
    apply_queue: VecDeque<ApplyJob>,
    apply_busy: bool,
    /// The sender's link is busy until then (serialization of earlier messages).
    link_free: Duration,
}

enum Event {
    /// `bytes`: the message's encoded length, computed once when it is sent.
    Deliver {
        to: usize,
        from: usize,
        msg: Msg,
        bytes: usize,
    },
    Timer {
        node: usize,
    },
    Tail {
        node: usize,
    },
    Applied {
        node: usize,
    },
    RefreshPeers,
}

/// Network and machine model of a run.
#[derive(Clone, Debug)]
struct Model {
    regions: usize,
    /// Round trip between two nodes of one region, and the range between regions.
    local_rtt: (u64, u64),
    wide_rtt: (u64, u64),
    /// Bytes per second each node can send.
    link_bytes_per_s: f64,
    /// Changes per second each node can merge.
    apply_per_s: f64,
    /// Probability that a message needs a retransmission (QUIC: delayed, not lost).
    retransmit_p: f64,
    /// How long until membership notices a node came or went.
    detect: Duration,
}

impl Model {
    /// The small, fast network of the convergence runs.
    fn lan() -> Model {
        Model {
            regions: 1,
            local_rtt: (2, 120),
            wide_rtt: (2, 120),
            link_bytes_per_s: 1e9,
            apply_per_s: 1e7,
            retransmit_p: 0.0,
            detect: Duration::from_millis(1),
        }
    }

    /// 40 regions, 20–300 ms between them, 1 Gbit/s links, 50k changes/s of apply.
    fn fleet() -> Model {
        Model {
            regions: 40,
            local_rtt: (1, 4),
            wide_rtt: (20, 300),
            link_bytes_per_s: 125e6,
            apply_per_s: 50_000.0,
            retransmit_p: 0.01,
            detect: Duration::from_secs(3),
        }
    }
}

/// Figures of a run.
#[derive(Debug, Default)]
struct Report {
    writes: u64,
    changes_needed: u64,
    changes_received: u64,
    bytes_received: u64,
    latencies_ms: Vec<f64>,
    max_state_bytes: usize,
    max_pulls: usize,
    /// Changes received by kind: broadcast tree, repairs, catch-up pulls.
    by_tree: u64,
    by_repair: u64,
    by_pull: u64,
}

impl Report {
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return 0.0;
        }
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

struct Sim {
    rng: StdRng,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Event>,
    nodes: Vec<Node>,
    model: Model,
    config: SyncConfig,
    rtt: Vec<Vec<u64>>,
    drop_p: f64,
    dup_p: f64,
    /// Partition group per node; messages between different groups are lost.
    group: Vec<u32>,
    /// One-way cuts: messages from `.0` to `.1` are lost.
    cuts: HashSet<(usize, usize)>,
    report: Report,
    /// Sampled writes: (origin, version) → when it was written.
    sampled: HashMap<(usize, i64), Duration>,
    sample_every: u64,
    /// Nodes at the start, and nodes that crashed at some point (latency figures).
    initial: usize,
    crashed: HashSet<usize>,
    /// When the last membership refresh scheduled is due.
    refresh_at: Option<Duration>,
}

fn site_of(i: usize) -> SiteId {
    let mut s = [0u8; 16];
    s[..4].copy_from_slice(&(i as u32 + 1).to_be_bytes());
    s[15] = 0x5a;
    s
}

fn addr_of(i: usize) -> SocketAddr {
    let b = (i as u32 + 1).to_be_bytes();
    SocketAddr::from(([10, b[1], b[2], b[3]], 8787))
}

fn small_config() -> SyncConfig {
    SyncConfig {
        // Small chunks, trees and grace so continuations, relays and repairs happen all
        // the time.
        fanout: 2,
        max_chunk_changes: 3,
        pull_timeout: Duration::from_secs(2),
        repair_grace: Duration::from_millis(300),
        recent_age: Duration::from_secs(3),
        ..SyncConfig::default()
    }
}

impl Sim {
    fn new(seed: u64, n: usize, model: Model, config: SyncConfig) -> Sim {
        // The modelled stores keep no tombstones: nothing to collect, nothing to track.
        let config = SyncConfig {
            track_stability: false,
            ..config
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let regions = model.regions.max(1);
        let mut pairs: HashMap<(usize, usize), u64> = HashMap::new();
        for a in 0..regions {
            for b in a..regions {
                let r = if a == b {
                    rng.gen_range(model.local_rtt.0..=model.local_rtt.1)
                } else {
                    rng.gen_range(model.wide_rtt.0..=model.wide_rtt.1)
                };
                pairs.insert((a, b), r);
            }
        }
        let rtt: Vec<Vec<u64>> = (0..regions)
            .map(|a| {
                (0..regions)
                    .map(|b| pairs.get(&(a.min(b), a.max(b))).copied().unwrap_or(100))
                    .collect()
            })
            .collect();
        let mut sim = Sim {
            rng,
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes: Vec::new(),
            model,
            config,
            rtt,
            drop_p: 0.0,
            dup_p: 0.0,
            group: Vec::new(),
            cuts: HashSet::new(),
            report: Report::default(),
            sampled: HashMap::new(),
            sample_every: 1,
            initial: n,
            crashed: HashSet::new(),
            refresh_at: None,
        };
        for _ in 0..n {
            sim.join();
        }
        sim.refresh_peers();
        sim
    }

    /// A new node with an empty database joins (membership learns of it after `detect`).
    fn join(&mut self) -> usize {
        let i = self.nodes.len();
        let site = site_of(i);
        let seed = self.rng.gen();
        let store = Store {
            site,
            ..Store::default()
        };
        self.nodes.push(Node {
            addr: addr_of(i),
            identity: format!("address {}", addr_of(i)).into(),
            region: i % self.model.regions.max(1),
            sync: self.machine(&store, seed),
            store,
            shipped: 0,
            up: true,
            timer_at: None,
            tail_scheduled: false,
            apply_queue: VecDeque::new(),
            apply_busy: false,
            link_free: Duration::ZERO,
        });
        self.group.push(0);
        self.schedule_timer(i);
        self.schedule_refresh();
        i
    }

    fn machine(&self, store: &Store, seed: u64) -> Replicator {
        Replicator::new(
            store.site,
            self.config.clone(),
            store.cursors.clone(),
            store.held.clone(),
            StdRng::seed_from_u64(seed),
            self.now,
        )
    }

    // ---- named controls --------------------------------------------------------------

    /// Every message is lost with probability `p` (a connection that broke).
    fn drop(&mut self, p: f64) {
        self.drop_p = p;
    }

    /// Every message is delivered twice with probability `p`.
    fn duplicate(&mut self, p: f64) {
        self.dup_p = p;
    }

    /// Messages from `a` to `b` are lost (one way).
    fn cut(&mut self, a: usize, b: usize) {
        self.cuts.insert((a, b));
    }

    /// `node` can neither send nor receive.
    fn isolate(&mut self, node: usize) {
        self.group[node] = u32::MAX - node as u32;
        self.schedule_refresh();
    }

    /// Splits the nodes into groups that cannot reach each other.
    fn partition(&mut self, group_of: impl Fn(usize) -> u32) {
        for i in 0..self.group.len() {
            self.group[i] = group_of(i);
        }
        self.schedule_refresh();
    }

    /// Heals partitions, isolations and cuts; stops drops and duplicates.
    fn recover(&mut self) {
        self.group.iter_mut().for_each(|g| *g = 0);
        self.cuts.clear();
        self.drop_p = 0.0;
        self.dup_p = 0.0;
        self.schedule_refresh();
    }

    /// Stops `node`: its volatile state (machine, queues, messages to it) is lost.
    fn crash(&mut self, node: usize) {
        self.crashed.insert(node);
        let n = &mut self.nodes[node];
        n.up = false;
        n.apply_queue.clear();
        n.apply_busy = false;
        n.timer_at = None;
        n.tail_scheduled = false;
        self.schedule_refresh();
    }

    /// Starts `node` again from its durable store.
    fn restart(&mut self, node: usize) {
        let seed = self.rng.gen();
        let machine = self.machine(&self.nodes[node].store, seed);
        let n = &mut self.nodes[node];
        n.sync = machine;
        n.up = true;
        n.shipped = n.store.own;
        self.schedule_timer(node);
        self.schedule_refresh();
    }

    // ---- the engine ------------------------------------------------------------------

    fn schedule(&mut self, after: Duration, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Membership notices a change `detect` from now. Several changes at one instant
    /// (the joins of a whole fleet) need one refresh: it reads the state when it runs,
    /// and a second one at the same instant would find nothing to change.
    fn schedule_refresh(&mut self) {
        let at = self.now + self.model.detect;
        if self.refresh_at == Some(at) {
            return;
        }
        self.refresh_at = Some(at);
        self.schedule(self.model.detect, Event::RefreshPeers);
    }

    fn schedule_timer(&mut self, i: usize) {
        let n = &self.nodes[i];
        if !n.up {
            return;
        }
        let at = n.sync.next_timeout().max(self.now);
        if n.timer_at.is_some_and(|t| t <= at && t >= self.now) {
            return;
        }
        self.nodes[i].timer_at = Some(at);
        let after = at.saturating_sub(self.now);
        self.schedule(after, Event::Timer { node: i });
    }

    /// Membership's view (`detect` after a change): every node that is up and on the
    /// same side of a partition is alive to every other; the other side is down.
    fn refresh_peers(&mut self) {
        let all: Vec<(SocketAddr, SiteId, bool, u32)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.addr, n.store.site, n.up, self.group[i]))
            .collect();
        let now = self.now;
        for i in 0..self.nodes.len() {
            let me = self.nodes[i].addr;
            let side = self.group[i];
            if !self.nodes[i].up {
                continue;
            }
            self.nodes[i].sync.set_peers(
                all.iter()
                    .filter(|(a, _, up, g)| *up && *a != me && *g == side)
                    .map(|(a, s, _, _)| (*a, *s)),
                now,
            );
            self.drain(i);
        }
    }

    /// A local write (or delete) on `node`, picked at random over `keys` rows.
    fn write(&mut self, node: usize, keys: u32) {
        if !self.nodes[node].up {
            return;
        }
        let key = self.rng.gen_range(0..keys);
        let val = if self.rng.gen_bool(0.15) {
            None
        } else {
            Some(self.rng.gen_range(0..1_000_000))
        };
        let n = &mut self.nodes[node];
        let before = n.store.own;
        n.store.write(key, val);
        if n.store.own > before {
            self.report.writes += 1;
            if self.report.writes.is_multiple_of(self.sample_every) {
                self.sampled.insert((node, n.store.own), self.now);
            }
            if !n.tail_scheduled {
                n.tail_scheduled = true;
                self.schedule(Duration::from_millis(2), Event::Tail { node });
            }
        }
    }

    fn run_until(&mut self, end: Duration, writes_per_s: f64, keys: u32) {
        let every = (writes_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / writes_per_s));
        let mut next_write = self.now;
        loop {
            let next_event = self.queue.peek().map(|Reverse((t, _))| *t);
            if let Some(e) = every {
                if next_write <= end && next_event.is_none_or(|t| next_write <= t) {
                    self.now = next_write;
                    let node = self.rng.gen_range(0..self.nodes.len());
                    self.write(node, keys);
                    next_write += e;
                    continue;
                }
            }
            let Some(Reverse((t, id))) = self.queue.peek().copied() else {
                break;
            };
            if t > end {
                break;
            }
            self.queue.pop();
            self.now = t;
            if let Some(ev) = self.events.remove(&id) {
                self.handle(ev);
            }
        }
        self.now = end;
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::RefreshPeers => {
                if self.refresh_at == Some(self.now) {
                    self.refresh_at = None;
                }
                self.refresh_peers()
            }
            Event::Timer { node } => {
                let n = &mut self.nodes[node];
                if !n.up || n.timer_at != Some(self.now) {
                    return;
                }
                n.timer_at = None;
                let now = self.now;
                n.sync.handle_timer(now);
                let pulls = n.sync.pulls_in_flight();
                self.report.max_pulls = self.report.max_pulls.max(pulls);
                self.drain(node);
            }
            Event::Tail { node } => {
                let now = self.now;
                let n = &mut self.nodes[node];
                n.tail_scheduled = false;
                if !n.up || n.store.own <= n.shipped {
                    return;
                }
                let (from, to) = (n.shipped, n.store.own);
                n.shipped = to;
                let unit = n.store.own_unit(from, to, now.as_millis() as u64);
                if n.sync.is_large(unit.changes.len()) {
                    n.sync.handle_local_large_unit(from, to, now);
                } else {
                    n.sync.handle_local_unit(unit, now);
                }
                self.drain(node);
            }
            Event::Deliver {
                to,
                from,
                msg,
                bytes,
            } => {
                if !self.nodes[to].up {
                    return;
                }
                self.report.changes_received += msg.change_count() as u64;
                match &msg {
                    Msg::Unit {
                        relay: true, unit, ..
                    } => self.report.by_tree += unit.changes.len() as u64,
                    Msg::Unit { unit, .. } => self.report.by_repair += unit.changes.len() as u64,
                    Msg::Repair { .. } => self.report.by_repair += msg.change_count() as u64,
                    Msg::Changes { chunk, .. } => self.report.by_pull += chunk.changes.len() as u64,
                    _ => {}
                }
                self.report.bytes_received += bytes as u64;
                let now = self.now;
                // The simulated transport is unauthenticated: identity is the address.
                let from_addr = self.nodes[from].addr;
                let identity = Rc::clone(&self.nodes[from].identity);
                self.nodes[to]
                    .sync
                    .handle_message(from_addr, &identity, msg, now);
                self.drain(to);
            }
            Event::Applied { node } => {
                let n = &mut self.nodes[node];
                n.apply_busy = false;
                if !n.up {
                    return;
                }
                let Some(job) = n.apply_queue.pop_front() else {
                    return;
                };
                let report = n.store.apply(&job);
                self.note_latencies(node, &job);
                let now = self.now;
                self.nodes[node].sync.handle_applied(report, now);
                self.drain(node);
                self.start_apply(node);
            }
        }
    }

    fn note_latencies(&mut self, node: usize, job: &ApplyJob) {
        let versions: Vec<(usize, i64)> = match &job.work {
            Work::Unit(u) => {
                let origin = site_index(&u.origin);
                ((u.from + 1)..=u.to).map(|v| (origin, v)).collect()
            }
            Work::Chunk(c) => c
                .changes
                .iter()
                .filter_map(|c| {
                    let s = SiteId::try_from(c.site_id.as_slice()).ok()?;
                    Some((site_index(&s), c.origin_version?))
                })
                .collect(),
            // Simulated nodes never ask for snapshots (`set_seedable` is not called).
            Work::SeedPart(_) => Vec::new(),
        };
        for key in versions {
            // Dissemination is measured to the nodes that were there when the write
            // happened and stayed up: not to joiners (they catch up) or the crashed one.
            if key.0 == node || node >= self.initial || self.crashed.contains(&node) {
                continue;
            }
            if let Some(t) = self.sampled.get(&key) {
                let ms = self.now.saturating_sub(*t).as_secs_f64() * 1000.0;
                self.report.latencies_ms.push(ms);
            }
        }
    }

    fn start_apply(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if n.apply_busy {
            return;
        }
        let Some(job) = n.apply_queue.front() else {
            return;
        };
        let changes = match &job.work {
            Work::Unit(u) => u.changes.len(),
            Work::Chunk(c) => c.changes.len(),
            Work::SeedPart(_) => 0,
        };
        n.apply_busy = true;
        let t = Duration::from_secs_f64((changes.max(1) as f64) / self.model.apply_per_s);
        self.schedule(t, Event::Applied { node: i });
    }

    fn drain(&mut self, i: usize) {
        while let Some(eff) = self.nodes[i].sync.poll_effect() {
            match eff {
                Effect::Send { to, msg } => self.send(i, to, msg),
                // The simulated stores keep no tombstones: nothing is ever collected, so
                // no floor is raised and no node is told to re-seed.
                Effect::RaiseClFloor(_) | Effect::Reseed { .. } | Effect::Diverged { .. } => {}
                // Simulated nodes never ask for snapshots.
                Effect::DropSeed => {}
                // Simulated nodes never ask for snapshots: `seed` is always `None`.
                Effect::Serve {
                    to,
                    after,
                    unit,
                    exclude,
                    known,
                    seed: _,
                } => {
                    let n = &self.nodes[i];
                    let held = unit.is_none().then(|| n.store.held.to_wire(usize::MAX));
                    let (unit_from, unit_to) = unit.unwrap_or((after, n.store.version));
                    let mut changes = n.store.feed(after, unit_to, Some(&exclude), &known);
                    let to_v = if changes.len() > self.config.max_chunk_changes {
                        changes.truncate(self.config.max_chunk_changes);
                        changes.last().map_or(unit_to, |c| c.db_version)
                    } else {
                        unit_to
                    };
                    let chunk = Chunk {
                        unit_from,
                        unit_to,
                        from: after,
                        to: to_v,
                        changes,
                        held,
                        schema: None,
                    };
                    let msg = Msg::Changes {
                        site: n.store.site,
                        chunk,
                    };
                    self.send(i, to, msg);
                }
                Effect::Apply(job) => {
                    self.nodes[i].apply_queue.push_back(job);
                    self.start_apply(i);
                }
                // The binding is already in force in the machine; nothing to store here.
                Effect::Bind { .. } => {}
            }
        }
        self.schedule_timer(i);
    }

    fn send(&mut self, from: usize, to: SocketAddr, msg: Msg) {
        let Some(to) = index_of(&to).filter(|t| *t < self.nodes.len()) else {
            return;
        };
        if self.group[from] != self.group[to]
            || self.cuts.contains(&(from, to))
            || self.rng.gen_bool(self.drop_p)
        {
            return;
        }
        // Exact (`Msg::encoded_len` is tested against `Msg::encode`), without encoding.
        let size = msg.encoded_len();
        let copies = if self.rng.gen_bool(self.dup_p) { 2 } else { 1 };
        let rtt = self.rtt[self.nodes[from].region][self.nodes[to].region];
        // Serialization on the sender's link, then half a round trip, some jitter, and
        // now and then a retransmission timeout.
        let n = &mut self.nodes[from];
        let start = n.link_free.max(self.now);
        let tx = Duration::from_secs_f64(size as f64 / self.model.link_bytes_per_s);
        n.link_free = start + tx;
        let mut msg = Some(msg);
        for copy in 0..copies {
            let msg = if copy + 1 == copies {
                msg.take()
            } else {
                msg.clone()
            };
            let Some(msg) = msg else { break };
            let mut delay = (start + tx - self.now) + Duration::from_micros(rtt * 500);
            delay += Duration::from_micros(self.rng.gen_range(0..=(rtt * 100).max(1)));
            if self.rng.gen_bool(self.model.retransmit_p) {
                delay += Duration::from_micros(rtt * 1500 + 25_000);
            }
            self.schedule(
                delay,
                Event::Deliver {
                    to,
                    from,
                    msg,
                    bytes: size,
                },
            );
        }
    }

    /// Every node that is up holds the same rows, and what each holds of every origin is
    /// the same (the per-origin knowledge must converge too).
    fn converged(&self) -> Result<(), String> {
        let mut up = self.nodes.iter().enumerate().filter(|(_, n)| n.up);
        let Some((first_i, first)) = up.next() else {
            return Ok(());
        };
        let rows = first.store.dump();
        let held = first.store.held.clone();
        for (i, n) in up {
            if n.store.dump() != rows {
                return Err(format!("rows of node {i} differ from node {first_i}'s"));
            }
            if n.store.held != held {
                return Err(format!(
                    "held versions of node {i} differ from node {first_i}'s: {:?} vs {:?}",
                    n.store.held.minus(&held),
                    held.minus(&n.store.held)
                ));
            }
        }
        Ok(())
    }

    fn state_bytes(&mut self) {
        let max = self
            .nodes
            .iter()
            .map(|n| n.sync.state_bytes())
            .max()
            .unwrap_or(0);
        self.report.max_state_bytes = self.report.max_state_bytes.max(max);
    }
}

fn site_index(s: &SiteId) -> usize {
    u32::from_be_bytes([s[0], s[1], s[2], s[3]]).saturating_sub(1) as usize
}

fn index_of(a: &SocketAddr) -> Option<usize> {
    match a {
        SocketAddr::V4(v4) => {
            let o = v4.ip().octets();
            let i = u32::from_be_bytes([0, o[1], o[2], o[3]]);
            i.checked_sub(1).map(|i| i as usize)
        }
        SocketAddr::V6(_) => None,
    }
}

fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let n = rng.gen_range(2..=7);
    let mut sim = Sim::new(seed, n, Model::lan(), small_config());
    sim.drop(rng.gen_range(0.0..0.3));
    sim.duplicate(rng.gen_range(0.0..0.2));
    let s = Duration::from_secs;
    sim.run_until(s(3), 50.0, 40);
    // Partition into two groups, keep writing on both sides.
    let groups: Vec<u32> = (0..n).map(|_| rng.gen_range(0..2)).collect();
    sim.partition(|i| groups[i]);
    sim.run_until(s(6), 60.0, 40);
    // Or one node cut off from everyone.
    if rng.gen_bool(0.3) {
        sim.recover();
        sim.isolate(rng.gen_range(0..n));
    }
    sim.run_until(s(8), 60.0, 40);
    // Crash one node (volatile sync state lost; its database kept), then restart it.
    let victim = rng.gen_range(0..n);
    sim.crash(victim);
    sim.run_until(s(10), 60.0, 40);
    sim.restart(victim);
    // A node joins with an empty database.
    if rng.gen_bool(0.5) {
        sim.join();
    }
    sim.run_until(s(12), 80.0, 40);
    // Sometimes a node dies for good right away: what it relayed must still reach
    // everyone from the survivors.
    if n >= 3 && rng.gen_bool(0.5) {
        let dead = rng.gen_range(0..n);
        sim.crash(dead);
    }
    sim.recover();
    sim.run_until(s(60), 0.0, 40);
    if let Err(e) = sim.converged() {
        panic!(
            "simulation seed {seed} ({n} nodes) did not converge: {e}; rerun with SIM_SEED={seed}"
        );
    }
}

/// How many seeds the convergence run covers: `SIM_SEEDS` (the full run is 1,000+).
fn seeds() -> u64 {
    std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
}

#[test]
fn converges_after_drops_duplicates_partitions_crashes_and_joins() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        run_seed(seed);
        return;
    }
    for seed in 0..seeds() {
        let outcome = std::panic::catch_unwind(|| run_seed(seed));
        if outcome.is_err() {
            panic!("simulation failed with seed {seed}; rerun with SIM_SEED={seed}");
        }
    }
}

/// A relays its writes to C only through the tree while A→C is cut, then A dies for
/// good: C must still get A's writes from the others.
#[test]
fn writes_survive_their_origin() {
    for seed in 0..20u64 {
        let mut sim = Sim::new(seed, 5, Model::lan(), small_config());
        sim.cut(0, 2);
        let s = Duration::from_secs;
        sim.run_until(s(1), 0.0, 40);
        for _ in 0..20 {
            sim.write(0, 40);
        }
        sim.run_until(s(3), 0.0, 40);
        sim.crash(0);
        sim.run_until(s(30), 0.0, 40);
        if let Err(e) = sim.converged() {
            panic!("seed {seed}: {e}");
        }
    }
}

/// Staleness through the real machines: an isolated node that keeps writing is silent
/// on every other node (its newer versions cannot be known), and once healed every node
/// holds every version known of every origin.
#[test]
fn staleness_shows_an_isolated_node_and_clears_after_recovery() {
    for seed in 0..10u64 {
        let mut sim = Sim::new(seed, 5, Model::lan(), small_config());
        let s = Duration::from_secs;
        sim.run_until(s(2), 40.0, 40);
        sim.isolate(4);
        sim.run_until(s(8), 40.0, 40);
        let cut = site_of(4);
        for i in 0..4 {
            let row = sim.nodes[i]
                .sync
                .staleness(sim.now)
                .into_iter()
                .find(|o| o.site == cut)
                .expect("the isolated node is still reported");
            assert!(
                row.silent_for >= s(4),
                "seed {seed}: node {i} heard from the isolated node {:?} ago",
                row.silent_for
            );
        }
        sim.recover();
        sim.run_until(s(40), 0.0, 40);
        assert_eq!(sim.converged(), Ok(()), "seed {seed}");
        for (i, n) in sim.nodes.iter().enumerate() {
            for o in n.sync.staleness(sim.now) {
                assert_eq!(
                    (o.missing, o.contiguous),
                    (0, o.known),
                    "seed {seed}: node {i} on origin {}",
                    site_index(&o.site)
                );
            }
        }
    }
}

/// Without loss, each node receives each change about once: the tree delivers it, and
/// repairs send only what is missing.
#[test]
fn bandwidth_without_loss_is_about_one_copy_per_change() {
    let mut sim = Sim::new(7, 12, Model::lan(), SyncConfig::default());
    sim.run_until(Duration::from_secs(10), 100.0, 1_000_000);
    sim.run_until(Duration::from_secs(20), 0.0, 1);
    assert_eq!(sim.converged(), Ok(()));
    let needed = sim.report.writes * 11;
    let ratio = sim.report.changes_received as f64 / needed as f64;
    eprintln!(
        "sim bandwidth, 12 nodes: {} changes received for {needed} needed (ratio {ratio:.3})",
        sim.report.changes_received
    );
    assert!(ratio < 1.2, "redundancy without loss: ratio {ratio}");
}

/// A fleet-size run: `n` nodes in 40 regions, `rate` writes/s cluster-wide for `secs`,
/// with a partition of half the cluster for a third of the run, a crash and restart, and
/// joins. Prints the figures BENCHMARKS.md reports.
fn fleet(n: usize, rate: f64, secs: u64, seed: u64, faults: &str) -> Report {
    let mut sim = Sim::new(seed, n, Model::fleet(), SyncConfig::default());
    let sample = ((rate * secs as f64) / 2_000.0).max(1.0) as u64;
    sim.sample_every = sample;
    let s = Duration::from_secs;
    // Warm up membership, then steady writes.
    sim.run_until(s(2), 0.0, 1);
    let t0 = 2;
    let third = secs / 3;
    sim.run_until(s(t0 + third), rate, 10_000_000);
    sim.state_bytes();
    // Faults: half the cluster cut off, a crash and restart, two joins. Latency is
    // sampled outside this phase only (inside it, it is the partition's length).
    sim.sample_every = u64::MAX;
    if faults.contains('p') {
        sim.partition(|i| (i % 2) as u32);
    }
    if faults.contains('c') {
        sim.crash(1);
    }
    sim.run_until(s(t0 + third + 2), rate, 10_000_000);
    if faults.contains('c') {
        sim.restart(1);
    }
    if faults.contains('j') {
        sim.join();
        sim.join();
    }
    sim.run_until(s(t0 + 2 * third), rate, 10_000_000);
    sim.state_bytes();
    sim.recover();
    sim.run_until(s(t0 + 2 * third + 5), rate, 10_000_000);
    sim.sample_every = sample;
    sim.run_until(s(t0 + secs), rate, 10_000_000);
    sim.run_until(s(t0 + secs + 30), 0.0, 1);
    sim.state_bytes();
    if let Err(e) = sim.converged() {
        panic!("fleet run n={n} seed={seed} did not converge: {e}");
    }
    let nodes = sim.nodes.len() as u64;
    let dups: u64 = sim.nodes.iter().map(|n| n.sync.stats().duplicates).sum();
    let repairs: u64 = sim.nodes.iter().map(|n| n.sync.stats().repairs_sent).sum();
    let summaries: u64 = sim
        .nodes
        .iter()
        .map(|n| n.sync.stats().summaries_sent)
        .sum();
    let max_ranges = sim
        .nodes
        .iter()
        .flat_map(|n| n.store.held.iter().map(|(_, r)| r.ranges().len()))
        .max()
        .unwrap_or(0);
    eprintln!("duplicate units {dups}, repairs sent {repairs}, summaries {summaries}, most ranges of one origin {max_ranges}");
    let mut r = std::mem::take(&mut sim.report);
    r.changes_needed = r.writes * (nodes - 1);
    eprintln!(
        "fleet n={n} faults={faults:?} rate={rate}/s secs={secs}: writes={} received/needed={:.3} \
         bytes/needed={:.1} p50={:.0}ms p99={:.0}ms max_state={}KiB max_pulls={} \
         (tree {} repair {} pull {})",
        r.writes,
        r.changes_received as f64 / r.changes_needed as f64,
        r.bytes_received as f64 / r.changes_needed as f64,
        r.percentile(0.5),
        r.percentile(0.99),
        r.max_state_bytes / 1024,
        r.max_pulls,
        r.by_tree,
        r.by_repair,
        r.by_pull,
    );
    r
}

/// Faults for a fleet run: `p` half the cluster partitioned, `c` a crash and restart,
/// `j` two joins (`SIM_FAULTS`, default all three).
fn faults() -> String {
    std::env::var("SIM_FAULTS").unwrap_or_else(|_| "pcj".into())
}

/// A fleet run small enough for every test run (debug build): 60 nodes in 40 regions.
#[test]
fn fleet_of_60_with_faults_converges_at_under_two_copies_per_change() {
    let n = std::env::var("SIM_FLEET_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let secs = std::env::var("SIM_FLEET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let r = fleet(n, 150.0, secs, 3, &faults());
    assert!(r.changes_received as f64 <= 2.0 * r.changes_needed as f64);
}

/// `scripts/sim-fleet`: 800 and 1,000 nodes at 1,000 writes/s (release build), steady
/// (the dissemination figures) and with faults (partition, crash, joins).
#[test]
#[ignore = "minutes in release mode: scripts/sim-fleet"]
fn fleet_of_800_and_1000() {
    let sizes: Vec<usize> = std::env::var("SIM_FLEET_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![800, 1000]);
    let secs = std::env::var("SIM_FLEET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for n in sizes {
        let steady = fleet(n, 1000.0, secs, 1, "");
        assert!(
            steady.percentile(0.99) <= 1000.0,
            "p99 above 1 s at {n} nodes"
        );
        assert!(steady.changes_received as f64 <= 2.0 * steady.changes_needed as f64);
        let faulty = fleet(n, 1000.0, secs, 2, &faults());
        assert!(faulty.changes_received as f64 <= 2.0 * faulty.changes_needed as f64);
    }
}
