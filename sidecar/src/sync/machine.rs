//! The sync state machine: tree broadcast of origin units, summary-driven repair and
//! catch-up pulls, without I/O.
//!
//! The caller feeds it messages, local units, apply confirmations and the clock; it
//! answers with [`Effect`]s the caller performs (send a message, read the feed to serve a
//! pull, apply a unit or chunk). Time is a `Duration` since an epoch of the caller's
//! choosing and randomness is an injected, seeded RNG, so `sim.rs` replays any run from
//! its seed.
//!
//! # How a change travels
//! 1. **Broadcast tree.** An origin sends each new unit of its own writes to its children
//!    in a `fanout`-ary tree over the alive members (sorted by site id, rotated so the
//!    origin is the root; every node computes the same tree from its own view). Each
//!    receiver that did not hold the unit forwards it to its own children before applying
//!    it, so a unit reaches every node once, in `log_fanout(n)` hops. Nothing a node
//!    merged is re-broadcast: only origins and tree relays send units.
//! 2. **Repair.** Every `round_interval` a node sends a random peer a summary of what it
//!    holds (per origin: ranges; being-applied included). The peer offers the versions
//!    the summary lacks that it keeps in memory as whole units ([`RecentUnits`]; only
//!    units it has had for `repair_grace` — younger ones are probably still travelling)
//!    and names what it holds beyond that, and replies with its own summary so the
//!    exchange repairs both sides. The node asks (`Want`) for what it still lacks when
//!    the offer arrives and has not asked anyone for within `repair_timeout`, and gets
//!    those whole units (`Repair`). Deciding at the requester makes a late summary
//!    harmless: QUIC delivers what was queued during a partition when it heals. A
//!    broadcast unit that arrives past a gap asks its sender at once (`urgent`).
//! 3. **Catch-up.** A peer that holds versions it no longer keeps in memory says so (in
//!    its offer, or `Behind`); the node then pulls that peer's feed after its cursor, leaving out every
//!    change whose origin version it holds (`known`), at most `max_pulls` at a time. The
//!    first chunk carries what the server held when it fixed the unit; once the unit is
//!    applied the node holds all of that (superseded versions count: they are *cleared*).
//!    Units too large to broadcast are announced (`Notify`) down the same tree and
//!    fetched this way, hop by hop.
//!
//! What it knows: the alive peers and their site ids (membership), what this node holds
//! per origin (the database's `patina_origin_held`, refreshed by every apply
//! confirmation) and what is being applied, the committed catch-up cursor per peer, the
//! newest version known to exist per origin, the pulls in flight, and which peer identity
//! each site id is bound to (`identity.rs`). Every range a peer sends is validated
//! (`ranges.rs`) before anything is applied. It also records when it last heard from each
//! origin (`staleness.rs`) and which protocol version each peer speaks, and drops a
//! message a peer's version lacks when its effects are drained (`versions.rs`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::held::{Held, RangeSet};
use super::identity::{check_claim, Claim};
use super::msg::{Chunk, Msg, OriginRanges, OriginUnit, SeedAsk, SiteId};
use super::ranges::RangeError;
use super::ranges::{validate_chunk, validate_origin_ranges, validate_pull, validate_unit};
use super::recent::RecentUnits;
use super::seed::{SeedOutcome, SeedPart, SeedState, MAX_DEFERRED};
use super::stability::{lacks_collected, prefixes, Prefixes, Stability};
use super::staleness::{self, HeardLog, OriginStaleness};
use super::versions::PeerVersions;

/// Tunables; the defaults are the node's.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// Children per node in an origin's broadcast tree.
    pub fanout: usize,
    /// Mean time between summary exchanges (anti-entropy rounds).
    pub round_interval: Duration,
    /// Rounds happen at `round_interval ± round_jitter`, so nodes do not act in lockstep.
    pub round_jitter: Duration,
    /// A repair sends only units held at least this long (younger ones are probably still
    /// on their way down the tree).
    pub repair_grace: Duration,
    /// A catch-up pull without an answer (or without an apply confirmation) for this long
    /// is dropped; so is a unit handed to apply and never confirmed.
    pub pull_timeout: Duration,
    /// Catch-up pulls in flight at once.
    pub max_pulls: usize,
    /// Versions asked of one peer are not asked of another for this long.
    pub repair_timeout: Duration,
    /// Largest chunk, in changes; a local unit with more is announced, not broadcast.
    pub max_chunk_changes: usize,
    /// Largest chunk, in approximate bytes (kept under the transport's frame limit).
    pub max_chunk_bytes: usize,
    /// Most bytes of units sent in answer to one summary.
    pub max_repair_bytes: usize,
    /// Memory for recent units, and how long they are kept.
    pub recent_bytes: usize,
    pub recent_age: Duration,
    /// Ranges per origin in a summary (the newest kept; older ones are only claimed less).
    pub summary_ranges: usize,
    /// Deletes held this long are forgotten even when a member (down, partitioned)
    /// cannot confirm it holds them (`stability`).
    pub tombstone_retention: Duration,
    /// Whether what members hold is tracked for tombstone collection (`stability`): per
    /// member, the prefixes of its last absorbed summary — about 40 bytes per member and
    /// origin. The simulation, whose stores keep no tombstones, turns it off.
    pub track_stability: bool,
    /// The protocol version this node speaks: message kinds of later versions are never
    /// sent, and are sent to a peer only once it showed it speaks their version.
    pub protocol: u16,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            fanout: 6,
            round_interval: Duration::from_millis(1000),
            round_jitter: Duration::from_millis(300),
            repair_grace: Duration::from_millis(1000),
            pull_timeout: Duration::from_secs(10),
            max_pulls: 1,
            repair_timeout: Duration::from_secs(3),
            max_chunk_changes: 20_000,
            max_chunk_bytes: 4 * 1024 * 1024,
            max_repair_bytes: 8 * 1024 * 1024,
            recent_bytes: 64 * 1024 * 1024,
            recent_age: Duration::from_secs(120),
            summary_ranges: 64,
            tombstone_retention: Duration::from_secs(72 * 3600),
            track_stability: true,
            protocol: super::versions::BASE_VERSION,
        }
    }
}

/// What the apply side is handed.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    /// A broadcast or repaired unit of an origin: merge it and record `(from, to]` held.
    /// Shared with the relays and the repair cache.
    Unit(Arc<OriginUnit>),
    /// A chunk of a catch-up pull of `peer_site`'s feed (buffered until its unit is whole).
    Chunk(Chunk),
    /// A part of `peer_site`'s snapshot (`seed`): written down; the last one installs it.
    SeedPart(SeedPart),
}

/// Work for the apply side, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyJob {
    pub from: SocketAddr,
    pub peer_site: SiteId,
    pub work: Work,
}

/// The apply side's report after a commit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// Peers whose feed a catch-up unit of the batch came from, with the stored cursor.
    pub cursors: Vec<(SiteId, i64)>,
    /// What the database now holds of every origin the batch touched.
    pub held: Vec<(SiteId, RangeSet)>,
    /// Unit ranges of the batch, applied or refused: no longer being applied.
    pub released: Held,
    /// When the batch changed it: every version held only in the schema buffer
    /// (`sync::schema`), received but not applied yet.
    pub buffered: Option<Held>,
    /// What became of a snapshot whose last part was in the batch.
    pub seed: Option<SeedOutcome>,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Send `msg` to `to` on the sync channel (best effort).
    Send { to: SocketAddr, msg: Msg },
    /// Read this node's feed `(after, ..]` (or the fixed `unit` range of a continuation),
    /// without changes credited to `exclude` or held by the requester (`known`), and send
    /// it back as `Msg::Changes` (the first chunk of a unit with this node's held set).
    Serve {
        to: SocketAddr,
        after: i64,
        unit: Option<(i64, i64)>,
        exclude: SiteId,
        known: Held,
        /// The requester holds nothing and asks for a snapshot instead (`seed`); served
        /// as a plain pull when one cannot be made.
        seed: Option<SeedAsk>,
    },
    /// Hand work to the apply side.
    Apply(ApplyJob),
    /// A snapshot was abandoned before its last part: delete what was written of it.
    DropSeed,
    /// Store, once and for good, that `site` is bound to the peer `identity`
    /// (`patina_site_bindings`; `INSERT OR IGNORE`). Already in force in memory.
    Bind { site: SiteId, identity: String },
    /// Raise `patina_state.cl_floor` to at least this (a peer collected tombstones).
    RaiseClFloor(i64),
    /// Peer `peer` forgot deletes of `origin` up to `floor` that this node never received
    /// (it holds `1..=held` of it): this node may keep rows those deletes removed. It has
    /// stopped replicating and must be re-seeded (`stability`).
    Reseed {
        peer: SocketAddr,
        origin: SiteId,
        floor: i64,
        held: i64,
    },
    /// Both this node and `site` (at `peer`) forgot deletes the other never received: a
    /// partition outlasted the tombstone retention on both sides. Nothing more is
    /// exchanged with it; an operator re-seeds one side.
    Diverged { peer: SocketAddr, site: SiteId },
}

#[derive(Clone, Debug)]
enum Phase {
    /// Waiting for the next `Changes` chunk.
    Fetching,
    /// The last chunk arrived; waiting for the apply side to confirm the commit.
    Applying,
}

#[derive(Clone, Debug)]
struct PullState {
    site: SiteId,
    phase: Phase,
    deadline: Duration,
    started: Duration,
    bytes: usize,
}

/// Counters the caller may export.
#[derive(Clone, Debug, Default)]
pub struct SyncStats {
    pub pulls_sent: u64,
    pub units_sent: u64,
    pub changes_sent: u64,
    pub summaries_sent: u64,
    pub repairs_sent: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Messages not sent because the peer speaks a version without their kind.
    pub withheld: u64,
}

/// The state machine. One per node.
pub struct Replicator {
    site: SiteId,
    config: SyncConfig,
    rng: StdRng,
    peers: BTreeMap<SocketAddr, SiteId>,
    /// Alive sites (and this one), sorted: the order broadcast trees are built over.
    order: Vec<SiteId>,
    addr_of: HashMap<SiteId, SocketAddr>,
    cursors: HashMap<SiteId, i64>,
    held: Held,
    /// Units handed to apply and not yet confirmed, with when they were handed over.
    pending: Held,
    /// One entry per unit, `(handed over, origin, first, last)`: a `Held` per entry
    /// would cost a map node each, and a node has ~10k units in flight at 800 nodes.
    pending_since: VecDeque<(Duration, SiteId, i64, i64)>,
    /// Versions held only in the schema buffer: held (peers need not send them), but this
    /// node's feed lacks their changes, so an offer never names them beyond memory.
    buffered: Held,
    /// The newest version known to exist, per origin (from units, summaries, notices).
    heads: HashMap<SiteId, i64>,
    recent: RecentUnits,
    pulls: HashMap<SocketAddr, PullState>,
    /// Large units announced to us: forwarded down the tree once held.
    notified: HashMap<SiteId, i64>,
    /// Versions asked for (`Want`) and not yet arrived, with when: not asked again of
    /// another peer until `repair_timeout`.
    requested: Held,
    requested_since: VecDeque<(Duration, Held)>,
    /// Origins whose gap we asked a sender about lately (rate limit).
    asked: HashMap<SiteId, Duration>,
    /// Site id → the peer identity it is bound to (loaded from the database at start).
    bindings: HashMap<SiteId, String>,
    /// Address → the identity last seen on a message from it.
    seen: HashMap<SocketAddr, String>,
    last_warned: HashMap<SocketAddr, Duration>,
    next_round: Duration,
    effects: VecDeque<Effect>,
    stats: SyncStats,
    finished: Vec<(Duration, usize)>,
    /// What members hold, for tombstone collection.
    stability: Stability,
    /// Per origin, the highest version whose deletes this node may have forgotten.
    collected: Prefixes,
    /// `patina_state.cl_floor` as last known.
    cl_floor: i64,
    /// A node that held nothing of any other origin, until its first catch-up commits:
    /// it has no rows a forgotten delete could concern, so floors do not apply to it.
    joining: bool,
    /// Set once this node learned it must be re-seeded: it replicates nothing more.
    reseeding: bool,
    /// Set by the first peer summary whose collected floors this node passes. Until
    /// then it takes nothing from peers and its own new writes are kept, not broadcast:
    /// a node that was away too long must not push a change for a row whose delete its
    /// peers forgot before it learns so (they travel by repair once it passed).
    vetted: bool,
    /// Peers that forgot deletes this node lacks while it forgot some they lack.
    diverged: HashSet<SiteId>,
    /// When each origin was last heard from (`staleness.rs` defines it).
    heard: HeardLog,
    /// The protocol version each peer speaks (`versions.rs`).
    versions: PeerVersions,
    /// Seeding from a peer's snapshot (`seed.rs`).
    seed: SeedState,
    /// Apply jobs held back while a snapshot is fetched and installed.
    deferred: Vec<ApplyJob>,
}

impl Replicator {
    /// A machine for site `site`, with the catch-up cursors and held versions committed
    /// in the database.
    pub fn new(
        site: SiteId,
        config: SyncConfig,
        cursors: HashMap<SiteId, i64>,
        held: Held,
        mut rng: StdRng,
        now: Duration,
    ) -> Replicator {
        let first = jittered(&mut rng, &config);
        let versions = PeerVersions::new(config.protocol);
        let recent = RecentUnits::new(config.recent_bytes, config.recent_age);
        let stability = Stability::new(config.tombstone_retention);
        let joining = held.iter().all(|(o, r)| *o == site || r.is_empty());
        // What is held exists: a summary repeating it after a restart is no news.
        let heads = held.iter().map(|(s, r)| (*s, r.head())).collect();
        Replicator {
            site,
            config,
            rng,
            peers: BTreeMap::new(),
            order: vec![site],
            addr_of: HashMap::new(),
            cursors,
            held,
            pending: Held::default(),
            pending_since: VecDeque::new(),
            buffered: Held::default(),
            heads,
            recent,
            pulls: HashMap::new(),
            notified: HashMap::new(),
            requested: Held::default(),
            requested_since: VecDeque::new(),
            asked: HashMap::new(),
            bindings: HashMap::new(),
            seen: HashMap::new(),
            last_warned: HashMap::new(),
            next_round: now + first,
            effects: VecDeque::new(),
            stats: SyncStats::default(),
            finished: Vec::new(),
            stability,
            collected: Prefixes::new(),
            cl_floor: 0,
            joining,
            reseeding: false,
            vetted: false,
            diverged: HashSet::new(),
            heard: HeardLog::default(),
            versions,
            seed: SeedState::Off,
            deferred: Vec::new(),
        }
    }

    /// Called at start by a caller that found the database empty (no row in any
    /// replicated table, nothing written here): the first catch-up pull asks for a
    /// snapshot (`seed`). Ignored unless this node also holds nothing of any origin.
    pub fn set_seedable(&mut self, empty: bool) {
        let holds_nothing = self.held.iter().all(|(_, r)| r.is_empty());
        self.seed = if empty && holds_nothing {
            SeedState::Possible
        } else {
            SeedState::Off
        };
    }

    /// Where this node stands with seeding.
    pub fn seed_state(&self) -> &SeedState {
        &self.seed
    }

    /// Whether the next catch-up pull asks for a snapshot: seeding is possible and this
    /// node still holds nothing. Once it wrote or received anything, a snapshot would be
    /// refused (`db::seed`), so it no longer asks.
    fn wants_snapshot(&mut self) -> bool {
        if self.seed == SeedState::Possible
            && (!self.pending.is_empty() || self.held.iter().any(|(_, r)| !r.is_empty()))
        {
            self.seed = SeedState::Off;
        }
        self.seed == SeedState::Possible
    }

    /// What this node has collected (`patina_collected`) and its `cl_floor`: loaded at
    /// start and after every collection, and advertised in summaries.
    pub fn set_collected(&mut self, collected: Prefixes, cl_floor: i64) {
        self.collected = collected;
        self.cl_floor = self.cl_floor.max(cl_floor);
    }

    /// The per-origin limits up to which deletes may be forgotten now (`stability`);
    /// `members` are the sites that are not forgotten.
    pub fn collect_limits(&self, members: &[SiteId], now: Duration) -> Prefixes {
        if self.reseeding {
            return Prefixes::new();
        }
        self.stability.limits(&self.site, members, &self.held, now)
    }

    /// Of `sites`, those bound to the same peer identity as one of `alive` (and not alive
    /// themselves): an earlier site id of a node that now runs under a new one (re-seeded,
    /// restored). That id writes nothing more, so it confirms nothing: waiting for it
    /// would hold tombstones for the whole retention.
    pub fn superseded(&self, sites: &[SiteId], alive: &[SiteId]) -> Vec<SiteId> {
        let live: HashSet<&str> = alive
            .iter()
            .filter_map(|s| self.bindings.get(s).map(String::as_str))
            .collect();
        sites
            .iter()
            .filter(|s| !alive.contains(s))
            .filter(|s| {
                self.bindings
                    .get(*s)
                    .is_some_and(|id| live.contains(id.as_str()))
            })
            .copied()
            .collect()
    }

    /// Stops counting a forgotten member.
    pub fn forget_member(&mut self, site: &SiteId) {
        self.stability.forget(site);
        self.diverged.remove(site);
        // Its stored binding went with it (`retention::forget_departed`).
        self.bindings.remove(site);
    }

    /// Tests: behave as after a first checked summary.
    #[cfg(test)]
    pub fn assume_vetted(&mut self) {
        self.vetted = true;
    }

    /// Stops all replication (this node is about to be re-seeded).
    pub fn stop_replicating(&mut self) {
        self.reseeding = true;
        self.pulls.clear();
    }

    /// True once this node learned it must be re-seeded.
    pub fn is_reseeding(&self) -> bool {
        self.reseeding
    }

    /// Peers this node diverged from (see [`Effect::Diverged`]).
    pub fn diverged(&self) -> &HashSet<SiteId> {
        &self.diverged
    }

    /// Checks a peer's collected floors against what this node holds. Returns true when
    /// the exchange stops here: this node must be re-seeded, or it diverged from the peer.
    fn check_collected(
        &mut self,
        from: SocketAddr,
        site: SiteId,
        theirs: &Held,
        floors: &Prefixes,
    ) -> bool {
        tracing::trace!(
            peer = %from,
            joining = self.joining,
            floors = floors.len(),
            "sync: collected floors of a peer's summary"
        );
        if self.joining || floors.is_empty() {
            return false;
        }
        let ours = self.holding();
        let Some((origin, floor, held)) = lacks_collected(&self.site, &ours, floors) else {
            return false;
        };
        // Whether the peer lacks what we forgot is judged from its summary.
        let they_lack = lacks_collected(&site, theirs, &self.collected).is_some();
        if they_lack {
            if self.diverged.insert(site) {
                self.effects
                    .push_back(Effect::Diverged { peer: from, site });
            }
            return true;
        }
        self.reseeding = true;
        self.pulls.clear();
        self.effects.push_back(Effect::Reseed {
            peer: from,
            origin,
            floor,
            held,
        });
        true
    }

    /// Loads the durable site bindings (`patina_site_bindings`) at start.
    pub fn set_bindings(&mut self, bindings: HashMap<SiteId, String>) {
        self.bindings = bindings;
    }

    /// Loads the versions held only in the schema buffer at start (later batches report
    /// changes through [`Applied::buffered`]).
    pub fn set_buffered(&mut self, buffered: Held) {
        self.buffered = buffered;
    }

    /// The identity `site` is bound to, if any.
    pub fn binding(&self, site: &SiteId) -> Option<&str> {
        self.bindings.get(site).map(String::as_str)
    }

    /// This node's site id.
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// The committed catch-up cursor for a peer site (0 when never pulled).
    pub fn cursor(&self, site: &SiteId) -> i64 {
        self.cursors.get(site).copied().unwrap_or(0)
    }

    /// What this node holds (committed), per origin.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// The newest version known to exist of each origin.
    pub fn heads(&self) -> &HashMap<SiteId, i64> {
        &self.heads
    }

    /// How far behind this node is on each origin, and when it last heard from each
    /// (`staleness.rs`).
    pub fn staleness(&self, now: Duration) -> Vec<OriginStaleness> {
        let alive = self.peers.values().copied().collect();
        staleness::compute(
            &self.site,
            &self.held,
            &self.heads,
            &self.heard,
            &alive,
            now,
        )
    }

    /// Catch-up pulls in flight.
    pub fn pulls_in_flight(&self) -> usize {
        self.pulls.len()
    }

    /// Approximate bytes of sync state (held sets, cache, maps): the simulation reports it.
    pub fn state_bytes(&self) -> usize {
        self.held.approx_bytes()
            + self.pending.approx_bytes()
            + self.recent.bytes()
            + self.heads.len() * 32
            + self.cursors.len() * 32
            + self.order.len() * 16
            + self.addr_of.len() * 48
    }

    /// Counters so far.
    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// Next effect to perform, if any. A message the peer's protocol version does not
    /// have is dropped here (and counted), whatever produced it.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        while let Some(e) = self.effects.pop_front() {
            if let Effect::Send { to, msg } = &e {
                if !self.versions.may_send(to, msg) {
                    self.stats.withheld += 1;
                    continue;
                }
            }
            return Some(e);
        }
        None
    }

    /// Peer `from` sent a frame of protocol `version` (its envelope's): from now on it is
    /// sent the message kinds of that version. Logged when first learned or changed.
    pub fn note_version(&mut self, from: SocketAddr, version: u16) {
        if let Some(before) = self.versions.note(from, version) {
            let ours = self.versions.ours();
            match before {
                None if version == ours => {}
                None => tracing::info!(
                    peer = %from,
                    "peer {from} speaks protocol version {version} (this node {ours}); \
                     it is sent only what both understand"
                ),
                Some(b) => tracing::info!(
                    peer = %from,
                    "peer {from} now speaks protocol version {version} (was {b}; this node {ours})"
                ),
            }
        }
    }

    /// How many peers speak each protocol version (as their frames told).
    pub fn peer_versions(&self) -> Vec<(u16, usize)> {
        self.versions.counts()
    }

    /// When `handle_timer` next has something to do.
    pub fn next_timeout(&self) -> Duration {
        self.pulls
            .values()
            .map(|p| p.deadline)
            .chain(std::iter::once(self.next_round))
            .min()
            .unwrap_or(self.next_round)
    }

    /// Replaces the set of alive peers (membership's view). Members carrying this node's
    /// own site id are refused loudly: that is a copied database file.
    pub fn set_peers(
        &mut self,
        peers: impl IntoIterator<Item = (SocketAddr, SiteId)>,
        now: Duration,
    ) {
        let mut next = BTreeMap::new();
        for (addr, site) in peers {
            if site == self.site {
                self.refuse_own_site(addr, now);
                continue;
            }
            next.insert(addr, site);
        }
        self.pulls.retain(|addr, _| next.contains_key(addr));
        // Per-address state is kept for members only, so addresses that came and went
        // (or a peer cycling source ports) do not accumulate.
        self.seen.retain(|addr, _| next.contains_key(addr));
        self.versions.retain(|addr| next.contains_key(addr));
        self.last_warned
            .retain(|_, t| now.saturating_sub(*t) < Duration::from_secs(10));
        // The first peers of a node that just started (or was alone): exchange summaries
        // now rather than a round later — a new node starts filling up at once.
        if self.peers.is_empty() && !next.is_empty() {
            self.next_round = self.next_round.min(now);
        }
        self.addr_of = next.iter().map(|(a, s)| (*s, *a)).collect();
        let mut order: Vec<SiteId> = self.addr_of.keys().copied().collect();
        order.push(self.site);
        order.sort_unstable();
        order.dedup();
        self.order = order;
        self.peers = next;
    }

    /// This node's children in `origin`'s broadcast tree, as addresses.
    fn children(&self, origin: &SiteId) -> Vec<SocketAddr> {
        tree_children(&self.order, origin, &self.site, self.config.fanout)
            .into_iter()
            .filter_map(|s| self.addr_of.get(&s).copied())
            .filter(|a| self.peers.get(a).is_some_and(|s| self.holds_claim(a, s)))
            .collect()
    }

    /// Processes the clock: a summary exchange when due, expiry of stale pulls, pending
    /// units and cached units.
    pub fn handle_timer(&mut self, now: Duration) {
        self.pulls.retain(|_, p| p.deadline > now);
        if let Some(peer) = self.seed.peer() {
            if !self.pulls.contains_key(&peer) {
                tracing::warn!(
                    peer = %peer,
                    "the snapshot from peer {peer} did not arrive in time; catching up from \
                                          peers' feeds instead"
                );
                self.end_seed();
                self.effects.push_back(Effect::DropSeed);
            }
        }
        while let Some((t, ..)) = self.pending_since.front() {
            if now.saturating_sub(*t) < self.config.pull_timeout {
                break;
            }
            if let Some((_, origin, a, b)) = self.pending_since.pop_front() {
                let mut h = Held::default();
                h.insert(origin, a, b);
                self.pending.remove(&h);
            }
        }
        self.recent.evict(now);
        self.heard.expire(now);
        self.expire_requested(now);
        if self.config.track_stability {
            self.stability.tick(&self.held, now);
        }
        if self.reseeding {
            return;
        }
        self.asked
            .retain(|_, t| now.saturating_sub(*t) < Duration::from_secs(1));
        if now < self.next_round {
            return;
        }
        self.next_round = now + jittered(&mut self.rng, &self.config);
        let candidates: Vec<SocketAddr> = self
            .peers
            .iter()
            .filter(|(addr, site)| self.holds_claim(addr, site))
            .map(|(a, _)| *a)
            .collect();
        // While a catch-up pull runs, a summary would only ask peers to send again what
        // the pull is bringing.
        if !self.pulls.is_empty() {
            return;
        }
        let Some(&to) = candidates.choose(&mut self.rng) else {
            return;
        };
        self.send_summary(to, true, false, None);
        // Protocol 4: when we heard from each origin, for the peer's staleness view
        // (withheld from peers of version 3 by `poll_effect`).
        if self.config.protocol > super::versions::BASE_VERSION {
            self.effects.push_back(Effect::Send {
                to,
                msg: Msg::Heard {
                    site: self.site,
                    ages: self.heard.to_wire(now),
                },
            });
        }
    }

    /// What this node holds or is applying: what a summary and `known` say.
    fn holding(&self) -> Held {
        let mut h = self.held.clone();
        h.union_with(&self.pending);
        h
    }

    /// What this node holds or is applying of one origin: `holding().of(origin)` without
    /// copying every origin's ranges (this runs for every unit received).
    fn holding_of(&self, origin: &SiteId) -> RangeSet {
        let mut r = self.held.of(origin);
        r.union_with(&self.pending.of(origin));
        r
    }

    fn send_summary(&mut self, to: SocketAddr, reply: bool, urgent: bool, only: Option<SiteId>) {
        let holding = self.holding();
        let mut held = holding.to_wire(self.config.summary_ranges);
        if let Some(o) = only {
            held.retain(|r| r.site == o);
        }
        self.stats.summaries_sent += 1;
        self.effects.push_back(Effect::Send {
            to,
            msg: Msg::Summary {
                site: self.site,
                held,
                reply,
                urgent,
                collected: Some(
                    self.collected
                        .iter()
                        .map(|(o, f)| OriginRanges {
                            site: *o,
                            ranges: vec![(1, *f)],
                        })
                        .collect(),
                ),
                cl_floor: Some(self.cl_floor),
            },
        });
    }

    /// Starts a catch-up pull of `to`'s feed after our cursor for `site`, unless one is
    /// in flight to it or `max_pulls` are.
    fn start_pull(&mut self, to: SocketAddr, site: SiteId, now: Duration) {
        if self.pulls.contains_key(&to) || self.pulls.len() >= self.config.max_pulls {
            return;
        }
        let after = self.cursor(&site);
        self.pulls.insert(
            to,
            PullState {
                site,
                phase: Phase::Fetching,
                deadline: now + self.config.pull_timeout,
                started: now,
                bytes: 0,
            },
        );
        self.stats.pulls_sent += 1;
        let known = self.holding().to_wire(usize::MAX);
        let seed = if self.wants_snapshot() {
            self.seed = SeedState::Fetching {
                from: to,
                id: 0,
                next: 0,
                total: None,
            };
            // The peer first copies its tables, which takes a while on a large database.
            if let Some(p) = self.pulls.get_mut(&to) {
                p.deadline = now + self.config.pull_timeout * 3;
            }
            Some(SeedAsk { id: 0, offset: 0 })
        } else {
            None
        };
        self.effects.push_back(Effect::Send {
            to,
            msg: Msg::Pull {
                site: self.site,
                after,
                unit: None,
                known,
                seed,
            },
        });
    }

    /// Whether a local unit with `changes` changes is broadcast (small) or announced.
    pub fn is_large(&self, changes: usize) -> bool {
        changes > self.config.max_chunk_changes
    }

    /// A new unit of this node's own writes, versions `(unit.from, unit.to]`: held from
    /// now on, kept for repairs, and sent to this node's children in its own tree.
    pub fn handle_local_unit(&mut self, unit: OriginUnit, now: Duration) {
        if unit.to <= unit.from {
            return;
        }
        self.held.insert(self.site, unit.from + 1, unit.to);
        self.note_head(self.site, unit.to, now);
        if self.reseeding {
            return; // set aside with the rest of this database at the re-seed
        }
        let unit = Arc::new(unit);
        self.recent.insert(&unit, now);
        if self.vetted {
            self.broadcast(&unit, true);
        }
    }

    /// A unit of this node's own writes too large to broadcast (versions up to `to`):
    /// held, and announced down the tree; children pull it.
    pub fn handle_local_large_unit(&mut self, from: i64, to: i64, now: Duration) {
        if to <= from {
            return;
        }
        self.held.insert(self.site, from + 1, to);
        self.note_head(self.site, to, now);
        if self.vetted && !self.reseeding {
            self.notify_children(self.site, to);
        }
        self.note_head(self.site, to, now);
        self.notify_children(self.site, to);
    }

    fn notify_children(&mut self, origin: SiteId, head: i64) {
        for to in self.children(&origin) {
            self.effects.push_back(Effect::Send {
                to,
                msg: Msg::Notify {
                    site: self.site,
                    origin,
                    head,
                },
            });
        }
    }

    /// Sends `unit` to this node's children in its origin's tree.
    fn broadcast(&mut self, unit: &Arc<OriginUnit>, relay: bool) {
        let children = self.children(&unit.origin);
        for to in children {
            self.stats.units_sent += 1;
            self.stats.changes_sent += unit.changes.len() as u64;
            self.effects.push_back(Effect::Send {
                to,
                msg: Msg::Unit {
                    site: self.site,
                    unit: unit.clone(),
                    relay,
                },
            });
        }
    }

    /// `v` of `origin` exists. A version newer than any known counts as hearing from
    /// the origin (`staleness.rs`).
    fn note_head(&mut self, origin: SiteId, v: i64, now: Duration) {
        let h = self.heads.entry(origin).or_insert(0);
        if v > *h {
            *h = v;
            self.heard.heard(origin, now);
        }
    }

    /// A message from peer `from`, which presented `identity` (its certificate's
    /// fingerprint, or its address when the transport is unauthenticated).
    pub fn handle_message(&mut self, from: SocketAddr, identity: &str, msg: Msg, now: Duration) {
        let site = *msg.site();
        if self.reseeding || self.diverged.contains(&site) {
            return;
        }
        if site == self.site {
            self.refuse_own_site(from, now);
            return;
        }
        match check_claim(&self.bindings, &site, identity) {
            Claim::Held => {}
            Claim::New => {
                tracing::info!(
                    peer = %from,
                    site_id = %hex::encode(site),
                    "site id {} is now bound to {identity} (peer {from})",
                    hex::encode(site)
                );
                self.bindings.insert(site, identity.to_string());
                self.effects.push_back(Effect::Bind {
                    site,
                    identity: identity.to_string(),
                });
            }
            Claim::TooMany => {
                self.stats.refused += 1;
                if self.should_warn(from, now) {
                    tracing::error!(
                        peer = %from,
                        site_id = %hex::encode(site),
                        "refusing peer {from} ({identity}): it claims a new site id {} but \
                         already holds {} site ids",
                        hex::encode(site),
                        super::identity::MAX_SITES_PER_IDENTITY
                    );
                }
                return;
            }
            Claim::Conflict { holder } => {
                self.stats.refused += 1;
                if self.should_warn(from, now) {
                    tracing::error!(
                        peer = %from,
                        site_id = %hex::encode(site),
                        holder = %holder,
                        "refusing peer {from} ({identity}): it claims site id {} which is bound \
                         to {holder}; two nodes share one database identity (a copied \
                         database file, or a peer taking over a node that is down? give one \
                         of them a fresh id with `patina restore`)",
                        hex::encode(site)
                    );
                }
                return;
            }
        }
        self.seen.insert(from, identity.to_string());
        // Any message of the origin itself, even one refused below: it is alive.
        self.heard.heard(site, now);
        if let Err(e) = validate_msg(&msg) {
            self.stats.refused += 1;
            tracing::warn!(
                peer = %from,
                site_id = %hex::encode(site),
                "refusing a sync message from peer {from} ({identity}): {e}; nothing of it \
                 is applied and no cursor moves"
            );
            return;
        }
        if !self.vetted && !matches!(msg, Msg::Summary { .. }) {
            // Nothing is taken from or served to peers before their collected floors were
            // checked against what this node held at its start (see `vetted`): a repair
            // arriving first would hide that it was away too long, while its own writes
            // from then still travel.
            return;
        }
        match msg {
            Msg::Unit { unit, relay, .. } => self.on_unit(from, site, unit, relay, now),
            Msg::Repair { units, .. } => {
                for unit in units {
                    self.on_unit(from, site, Arc::new(unit), false, now);
                }
            }
            Msg::Offer { have, more, .. } => self.on_offer(
                from,
                site,
                &Held::from_wire(&have),
                &Held::from_wire(&more),
                now,
            ),
            Msg::Want { ranges, .. } => self.on_want(from, &Held::from_wire(&ranges), now),
            Msg::Summary {
                held,
                reply,
                urgent,
                collected,
                cl_floor,
                ..
            } => {
                let theirs = Held::from_wire(&held);
                if let Some(f) = cl_floor.filter(|f| *f > self.cl_floor) {
                    self.cl_floor = f;
                    self.effects.push_back(Effect::RaiseClFloor(f));
                }
                let floors = prefixes(&Held::from_wire(collected.as_deref().unwrap_or_default()));
                if self.check_collected(from, site, &theirs, &floors) {
                    return;
                }
                self.vetted = true;
                if !urgent && self.config.track_stability {
                    self.stability.observe_summary(site, &theirs, &self.held);
                }
                if self.wants_snapshot()
                    && !theirs.minus(&self.holding()).is_empty()
                    && self.pulls.is_empty()
                {
                    // Holding nothing, and the peer holds something: its snapshot, now,
                    // rather than a round trip for its offer. Our summary goes first: a
                    // peer serves nothing before a summary vetted it (`vetted`), and no
                    // summary leaves here while the pull runs.
                    self.send_summary(from, false, false, None);
                    self.start_pull(from, site, now);
                }
                self.on_summary(from, &theirs, reply, urgent, now)
            }
            Msg::Behind { .. } => self.start_pull(from, site, now),
            Msg::Pull {
                after,
                unit,
                known,
                seed,
                ..
            } => {
                self.effects.push_back(Effect::Serve {
                    to: from,
                    after,
                    unit,
                    exclude: site,
                    known: Held::from_wire(&known),
                    // A node that holds nothing itself has no snapshot worth sending.
                    seed: seed.filter(|_| self.held.iter().any(|(_, r)| !r.is_empty())),
                });
            }
            Msg::Seed {
                id,
                offset,
                total,
                bytes,
                ..
            } => self.on_seed_part(
                from,
                site,
                SeedPart {
                    id,
                    offset,
                    total,
                    bytes,
                },
                now,
            ),
            Msg::Heard { ages, .. } => self.heard.merge_wire(&ages, &self.site, now),
            Msg::Notify { origin, head, .. } => {
                self.note_head(origin, head, now);
                if origin != self.site && !self.holding_of(&origin).covers(1, head) {
                    let n = self.notified.entry(origin).or_insert(0);
                    *n = (*n).max(head);
                    self.start_pull(from, site, now);
                }
            }
            Msg::Changes { chunk, .. } => {
                if matches!(self.seed, SeedState::Fetching { from: f, next: 0, .. } if f == from) {
                    // The peer answered with its feed: it made no snapshot (or does not
                    // know them). The pull goes on as a plain one.
                    tracing::info!(peer = %from, "peer {from} sent its feed instead of a snapshot");
                    self.end_seed();
                }
                let more = chunk.more();
                let bytes: usize = chunk.changes.iter().map(|c| c.approx_size()).sum();
                let next_after = chunk.to;
                let unit = (chunk.unit_from, chunk.unit_to);
                self.apply(ApplyJob {
                    from,
                    peer_site: site,
                    work: Work::Chunk(chunk),
                });
                let Some(pull) = self.pulls.get_mut(&from) else {
                    return; // a late answer: applied (harmless), not continued
                };
                pull.deadline = now + self.config.pull_timeout;
                pull.bytes += bytes;
                if more {
                    let known = self.holding().to_wire(usize::MAX);
                    self.effects.push_back(Effect::Send {
                        to: from,
                        msg: Msg::Pull {
                            site: self.site,
                            after: next_after,
                            unit: Some(unit),
                            known,
                            seed: None,
                        },
                    });
                } else {
                    pull.phase = Phase::Applying;
                }
            }
        }
    }

    /// A broadcast or repaired unit. New to us: forwarded down the tree (broadcast
    /// only), kept for repairs, handed to apply. A gap below it is asked about at once.
    fn on_unit(
        &mut self,
        from: SocketAddr,
        site: SiteId,
        unit: Arc<OriginUnit>,
        relay: bool,
        now: Duration,
    ) {
        if unit.origin == self.site {
            return; // our own writes, back from a repair: we hold them
        }
        self.note_head(unit.origin, unit.to, now);
        let holding = self.holding_of(&unit.origin);
        if holding.covers(unit.from + 1, unit.to) {
            tracing::trace!(peer = %from, relay, from = unit.from, to = unit.to, "sync: duplicate unit");
            self.stats.duplicates += 1;
            return;
        }
        // Only a broadcast reveals a gap: repairs arrive in any order (each on its own
        // stream), and asking about them would only have the same units sent again.
        let gap = relay
            && unit.from > 0
            && !holding.contains(unit.from)
            && !self.asked.contains_key(&unit.origin);
        if relay {
            self.broadcast(&unit, true);
        }
        self.recent.insert(&unit, now);
        self.pending.insert(unit.origin, unit.from + 1, unit.to);
        self.pending_since
            .push_back((now, unit.origin, unit.from + 1, unit.to));
        if gap {
            self.asked.insert(unit.origin, now);
            self.send_summary(from, false, true, Some(unit.origin));
        }
        self.apply(ApplyJob {
            from,
            peer_site: site,
            work: Work::Unit(unit),
        });
    }

    /// Hands `job` to the apply side, or holds it back while a snapshot is on its way
    /// (applied first, it would make this node non-empty and the snapshot refused).
    fn apply(&mut self, job: ApplyJob) {
        if !self.seed.in_progress() {
            self.effects.push_back(Effect::Apply(job));
            return;
        }
        if self.deferred.len() < MAX_DEFERRED {
            self.deferred.push(job);
            return;
        }
        // Too many: left to anti-entropy, no longer counted as on its way.
        if let Work::Unit(u) = &job.work {
            let mut h = Held::default();
            h.insert(u.origin, u.from + 1, u.to);
            self.pending.remove(&h);
        }
    }

    /// Ends a snapshot attempt (installed, refused or abandoned): what was held back
    /// goes to the apply side, after the snapshot.
    fn end_seed(&mut self) {
        self.seed = SeedState::Off;
        for job in std::mem::take(&mut self.deferred) {
            self.effects.push_back(Effect::Apply(job));
        }
    }

    /// A part of the snapshot asked for: handed to the apply side in order, the next one
    /// asked for, or — the last — installed.
    fn on_seed_part(&mut self, from: SocketAddr, site: SiteId, part: SeedPart, now: Duration) {
        let SeedState::Fetching {
            from: f,
            id,
            next,
            total,
        } = self.seed.clone()
        else {
            return;
        };
        let in_order = f == from
            && part.offset == next
            && (id == 0 || id == part.id)
            && total.is_none_or(|t| t == part.total);
        let Some(pull) = self.pulls.get_mut(&from).filter(|_| in_order) else {
            tracing::debug!(peer = %from, offset = part.offset, "ignoring a snapshot part not asked for");
            return;
        };
        pull.deadline = now + self.config.pull_timeout;
        pull.bytes += part.bytes.len();
        let last = part.is_last();
        let (id, next) = (part.id, part.offset + part.bytes.len() as u64);
        if last {
            // Installing a large snapshot may take longer than a pull answer.
            pull.deadline = now + self.config.pull_timeout * 10;
            pull.phase = Phase::Applying;
            self.seed = SeedState::Installing { from };
        } else {
            self.seed = SeedState::Fetching {
                from,
                id,
                next,
                total: Some(part.total),
            };
            self.effects.push_back(Effect::Send {
                to: from,
                msg: Msg::Pull {
                    site: self.site,
                    after: 0,
                    unit: None,
                    known: Vec::new(),
                    seed: Some(SeedAsk { id, offset: next }),
                },
            });
        }
        self.effects.push_back(Effect::Apply(ApplyJob {
            from,
            peer_site: site,
            work: Work::SeedPart(part),
        }));
    }

    /// A peer's summary: send it the whole units we keep that it lacks, `Behind` when we
    /// hold more than we keep, and our own summary when asked to.
    fn on_summary(
        &mut self,
        from: SocketAddr,
        theirs: &Held,
        reply: bool,
        urgent: bool,
        now: Duration,
    ) {
        for (origin, r) in theirs.iter() {
            self.note_head(*origin, r.head(), now);
        }
        let mut lacks = self.held.minus(theirs);
        if urgent {
            // An urgent summary names only the origin whose gap it asks about.
            lacks = Held::from_wire(
                &lacks
                    .to_wire(usize::MAX)
                    .into_iter()
                    .filter(|o| !theirs.of(&o.site).is_empty())
                    .collect::<Vec<_>>(),
            );
        }
        let newest = if urgent {
            now
        } else {
            now.saturating_sub(self.config.repair_grace)
        };
        // Offer what we keep in memory (whole units, at least `repair_grace` old unless
        // urgent), and name what we hold beyond that: the peer decides, with what it holds
        // when the offer arrives, what to ask for. A summary that arrives late (queued
        // behind a partition, say) costs an offer, not a repair of things it has since got.
        let mut have = Held::default();
        let mut more = Held::default();
        for (origin, missing) in lacks.iter() {
            if theirs.of(origin).is_empty() && *origin != self.site && !urgent {
                // They know nothing of this origin: a joiner, or an origin that only
                // reached us by a catch-up. Cheaper as one feed pull than unit by unit.
                more.set(*origin, missing.minus(&self.buffered.of(origin)));
                continue;
            }
            let (_, covered, young) = self.recent.covering(origin, missing, newest);
            let mut accounted = covered.clone();
            accounted.union_with(&young);
            // Buffered versions are in no feed here yet: a pull would not bring them.
            let beyond = missing.minus(&accounted).minus(&self.buffered.of(origin));
            if !covered.is_empty() {
                have.set(*origin, covered);
            }
            if !beyond.is_empty() {
                more.set(*origin, beyond);
            }
        }
        if !have.is_empty() || !more.is_empty() {
            self.effects.push_back(Effect::Send {
                to: from,
                msg: Msg::Offer {
                    site: self.site,
                    have: have.to_wire(self.config.summary_ranges),
                    more: more.to_wire(self.config.summary_ranges),
                },
            });
        }
        if reply && self.pulls.is_empty() {
            self.send_summary(from, false, false, None);
        }
    }

    /// An offer: ask for what we still lack and have not asked anyone for lately; pull
    /// the peer's feed if it holds more than it keeps in memory.
    fn on_offer(
        &mut self,
        from: SocketAddr,
        site: SiteId,
        have: &Held,
        more: &Held,
        now: Duration,
    ) {
        if self.seed.in_progress() {
            // The snapshot brings what the sender held; the summary after it asks for the rest.
            return;
        }
        self.expire_requested(now);
        let mut known = self.holding();
        known.union_with(&self.requested);
        if self.wants_snapshot() {
            // Holding nothing: the sender's snapshot brings its memory and its feed alike.
            if !have.minus(&known).is_empty() || !more.minus(&known).is_empty() {
                self.start_pull(from, site, now);
            }
            return;
        }
        let want = have.minus(&known);
        if !want.is_empty() {
            self.requested.union_with(&want);
            self.requested_since.push_back((now, want.clone()));
            self.effects.push_back(Effect::Send {
                to: from,
                msg: Msg::Want {
                    site: self.site,
                    ranges: want.to_wire(usize::MAX),
                },
            });
        }
        if !more.minus(&known).is_empty() {
            self.start_pull(from, site, now);
        }
    }

    /// A want: send the whole units kept in memory that hold the versions asked for.
    fn on_want(&mut self, from: SocketAddr, want: &Held, now: Duration) {
        let mut budget = self.config.max_repair_bytes;
        let mut units: Vec<OriginUnit> = Vec::new();
        let mut missing = false;
        for (origin, ranges) in want.iter() {
            let (found, covered, _) = self.recent.covering(origin, ranges, now);
            for u in found {
                let size = u.approx_size();
                if size > budget {
                    missing = true;
                    break;
                }
                budget -= size;
                units.push(OriginUnit::clone(u));
            }
            if !ranges.minus(&covered).is_empty() {
                missing = true;
            }
        }
        tracing::debug!(peer = %from, units = units.len(), "repair: sending the units asked for");
        // As few messages as fit the chunk size: one repair arrives at once.
        let mut batch: Vec<OriginUnit> = Vec::new();
        let mut bytes = 0usize;
        for unit in units {
            self.stats.repairs_sent += 1;
            self.stats.changes_sent += unit.changes.len() as u64;
            let size = unit.approx_size();
            if !batch.is_empty() && bytes + size > self.config.max_chunk_bytes {
                self.send_repair(from, std::mem::take(&mut batch));
                bytes = 0;
            }
            bytes += size;
            batch.push(unit);
        }
        if !batch.is_empty() {
            self.send_repair(from, batch);
        }
        if missing {
            // Evicted since the offer, or past the budget: the feed has it.
            self.effects.push_back(Effect::Send {
                to: from,
                msg: Msg::Behind { site: self.site },
            });
        }
    }

    /// Forgets requests older than `pull_timeout`: if their repair never came, the next
    /// offer asks again.
    fn expire_requested(&mut self, now: Duration) {
        let mut changed = false;
        while let Some((t, _)) = self.requested_since.front() {
            if now.saturating_sub(*t) < self.config.repair_timeout {
                break;
            }
            if let Some((_, h)) = self.requested_since.pop_front() {
                self.requested.remove(&h);
                changed = true;
            }
        }
        if changed {
            // Overlapping requests: what is still asked for stays asked for.
            let mut r = Held::default();
            for (_, h) in &self.requested_since {
                r.union_with(h);
            }
            self.requested = r;
        }
    }

    /// Catch-up pulls completed since the last call: how long each took (request to
    /// commit) and about how many bytes of changes it brought (`patina_sync_round_*`).
    pub fn take_finished_pulls(&mut self) -> Vec<(Duration, usize)> {
        std::mem::take(&mut self.finished)
    }

    fn send_repair(&mut self, to: SocketAddr, units: Vec<OriginUnit>) {
        self.effects.push_back(Effect::Send {
            to,
            msg: Msg::Repair {
                site: self.site,
                units,
            },
        });
    }

    /// The apply side committed a batch.
    pub fn handle_applied(&mut self, applied: Applied, now: Duration) {
        self.pending.remove(&applied.released);
        if let Some(outcome) = &applied.seed {
            if let SeedOutcome::Installed {
                collected,
                cl_floor,
                bindings,
                ..
            } = outcome
            {
                self.set_collected(collected.clone(), *cl_floor);
                // Stored for sites the database had bound to no one; a binding made in
                // memory meanwhile (its write waits behind the install) yields to the
                // stored one, so memory and the database agree, also after a restart.
                for (site, identity) in bindings {
                    if *site != self.site {
                        self.bindings.insert(*site, identity.clone());
                    }
                }
            }
            if let (SeedOutcome::Failed(why), Some(peer)) = (outcome, self.seed.peer()) {
                tracing::warn!(
                    peer = %peer,
                    "the snapshot from peer {peer} was not installed ({why}); catching up \
                     from peers' feeds instead"
                );
                self.pulls.remove(&peer);
            }
            self.end_seed();
        }
        if let Some(b) = applied.buffered {
            self.buffered = b;
        }
        for (origin, ranges) in applied.held {
            if origin != self.site {
                // Held exists: known from now on, without counting as news of the origin
                // (a later summary repeating it is not a sign of life).
                let h = self.heads.entry(origin).or_insert(0);
                *h = (*h).max(ranges.head());
                self.held.set(origin, ranges);
            }
        }
        if !applied.cursors.is_empty() {
            // A catch-up committed: this node now holds what its server held.
            self.joining = false;
        }
        for (peer_site, cursor) in applied.cursors {
            let c = self.cursors.entry(peer_site).or_insert(0);
            *c = (*c).max(cursor);
            let finished = &mut self.finished;
            self.pulls.retain(|_, p| {
                let done = p.site == peer_site && matches!(p.phase, Phase::Applying);
                if done {
                    finished.push((now.saturating_sub(p.started), p.bytes));
                }
                !done
            });
        }
        let ready: Vec<(SiteId, i64)> = self
            .notified
            .iter()
            .filter(|(o, head)| self.held.covers(o, 1, **head))
            .map(|(o, h)| (*o, *h))
            .collect();
        for (origin, head) in ready {
            self.notified.remove(&origin);
            self.notify_children(origin, head);
        }
    }

    /// Replaces what this node holds, read from the database (merges by other
    /// connections, e.g. an app's own sync code, show up here).
    pub fn reload_held(&mut self, held: Held) {
        self.held = held;
    }

    /// False when `addr` was last seen presenting an identity other than the one `site`
    /// is bound to: no pulls from or pushes to a member impersonating a site.
    fn holds_claim(&self, addr: &SocketAddr, site: &SiteId) -> bool {
        match (self.bindings.get(site), self.seen.get(addr)) {
            (Some(bound), Some(seen)) => bound == seen,
            _ => true,
        }
    }

    fn refuse_own_site(&mut self, from: SocketAddr, now: Duration) {
        self.stats.refused += 1;
        if self.should_warn(from, now) {
            tracing::error!(
                peer = %from,
                site_id = %hex::encode(self.site),
                "refusing peer {from}: it has this node's own site id {}; two nodes share one \
                 database identity (was the database file copied? give one a fresh id with \
                 `patina restore`)",
                hex::encode(self.site)
            );
        }
    }

    /// Rate-limits the loud logs to one per peer per 10 s.
    fn should_warn(&mut self, from: SocketAddr, now: Duration) -> bool {
        match self.last_warned.get(&from) {
            Some(t) if now.saturating_sub(*t) < Duration::from_secs(10) => false,
            _ => {
                self.last_warned.insert(from, now);
                true
            }
        }
    }
}

/// The ranges a message carries, checked by the rules of `ranges.rs`.
fn validate_msg(msg: &Msg) -> Result<(), RangeError> {
    match msg {
        Msg::Unit { unit, .. } => validate_unit(unit),
        Msg::Repair { units, .. } => units.iter().try_for_each(validate_unit),
        Msg::Offer { have, more, .. } => {
            validate_origin_ranges(have)?;
            validate_origin_ranges(more)
        }
        Msg::Want { ranges, .. } => validate_origin_ranges(ranges),
        Msg::Changes { chunk, .. } => {
            validate_chunk(chunk)?;
            chunk.held.as_deref().map_or(Ok(()), validate_origin_ranges)
        }
        Msg::Summary {
            held, collected, ..
        } => {
            validate_origin_ranges(held)?;
            collected.as_deref().map_or(Ok(()), validate_origin_ranges)
        }
        Msg::Pull {
            after, unit, known, ..
        } => {
            validate_pull(*after, *unit)?;
            validate_origin_ranges(known)
        }
        Msg::Notify { head, .. } => {
            if (0..=super::ranges::MAX_VERSION).contains(head) {
                Ok(())
            } else {
                Err(RangeError::BadOriginUnit { from: 0, to: *head })
            }
        }
        Msg::Behind { .. } => Ok(()),
        Msg::Seed {
            offset,
            total,
            bytes,
            ..
        } => super::seed::validate_part(*offset, bytes.len(), *total),
        Msg::Heard { ages, .. } => {
            if ages.len() > super::ranges::MAX_ORIGINS {
                Err(RangeError::TooManyOrigins { count: ages.len() })
            } else {
                Ok(())
            }
        }
    }
}

/// The children of `me` in `origin`'s broadcast tree over `order` (sorted site ids, all
/// alive members and this node): the list rotated so `origin` comes first, node `i` has
/// children `fanout·i + 1 ..= fanout·i + fanout`. An origin missing from `order` (not
/// alive in this node's view) is placed as if it were there.
pub fn tree_children(order: &[SiteId], origin: &SiteId, me: &SiteId, fanout: usize) -> Vec<SiteId> {
    let fanout = fanout.max(1);
    let owned;
    let order = if order.binary_search(origin).is_ok() {
        order
    } else {
        let mut o = order.to_vec();
        let at = o.partition_point(|s| s < origin);
        o.insert(at, *origin);
        owned = o;
        &owned
    };
    let n = order.len();
    let (Ok(root), Ok(mine)) = (order.binary_search(origin), order.binary_search(me)) else {
        return Vec::new();
    };
    let i = (mine + n - root) % n;
    let first = fanout.saturating_mul(i).saturating_add(1);
    (first..first.saturating_add(fanout).min(n))
        .map(|j| order[(root + j) % n])
        .collect()
}

fn jittered(rng: &mut StdRng, config: &SyncConfig) -> Duration {
    let base = config.round_interval.as_millis() as i64;
    let j = config.round_jitter.as_millis() as i64;
    let off = if j > 0 { rng.gen_range(-j..=j) } else { 0 };
    Duration::from_millis((base + off).max(1) as u64)
}

/// Every site reaches every other exactly once through the trees (unit-tested here, and
/// relied on by the bandwidth figures).
#[cfg(test)]
pub(crate) fn tree_reaches_all_once(order: &[SiteId], origin: &SiteId, fanout: usize) -> bool {
    let mut got: std::collections::HashSet<SiteId> = std::collections::HashSet::new();
    let mut frontier = vec![*origin];
    got.insert(*origin);
    while let Some(s) = frontier.pop() {
        for c in tree_children(order, origin, &s, fanout) {
            if !got.insert(c) {
                return false;
            }
            frontier.push(c);
        }
    }
    got.len() == order.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::msg::{Change, Value};
    use crate::sync::test_support::{addr, drain, fresh_machine, ident, machine};

    fn site(i: u16) -> SiteId {
        let mut s = [0u8; 16];
        s[..2].copy_from_slice(&i.to_be_bytes());
        s
    }

    fn change(origin: SiteId, v: i64) -> Change {
        Change {
            table: "t".into(),
            pk: vec![1, 9, v as u8],
            cid: "a".into(),
            val: Value::Integer(v),
            col_version: 1,
            db_version: v,
            site_id: origin.to_vec(),
            cl: 1,
            seq: 0,
            origin_version: Some(v),
        }
    }

    fn unit(origin: SiteId, from: i64, to: i64) -> OriginUnit {
        OriginUnit {
            origin,
            from,
            to,
            committed_ms: 0,
            changes: ((from + 1)..=to).map(|v| change(origin, v)).collect(),
            schema: None,
        }
    }

    #[test]
    fn every_tree_reaches_every_node_exactly_once() {
        for n in [1u16, 2, 3, 7, 8, 40, 100, 801] {
            let order: Vec<SiteId> = (0..n).map(site).collect();
            for fanout in [1, 3, 6] {
                for origin in [0, n / 2, n - 1] {
                    assert!(
                        tree_reaches_all_once(&order, &site(origin), fanout),
                        "n={n} fanout={fanout} origin={origin}"
                    );
                }
            }
        }
        // An origin this node thinks is down still roots a tree over the rest.
        let order: Vec<SiteId> = (1..10).map(site).collect();
        let kids = tree_children(&order, &site(0), &site(0), 3);
        assert_eq!(kids, vec![site(1), site(2), site(3)]);
    }

    #[test]
    fn a_local_unit_goes_to_the_tree_and_a_relay_forwards_what_is_new() {
        let mut s = crate::sync::test_support::fresh_machine(1);
        let peers: Vec<(SocketAddr, SiteId)> = (2..=9).map(|i| (addr(i as u16), [i; 16])).collect();
        s.set_peers(peers.clone(), Duration::ZERO);
        // Until a peer's summary vetted it (`vetted`), a node keeps its own new writes.
        s.handle_local_unit(unit([1; 16], 0, 1), Duration::ZERO);
        assert!(
            !drain(&mut s).iter().any(|e| matches!(
                e,
                Effect::Send {
                    msg: Msg::Unit { .. },
                    ..
                }
            )),
            "nothing broadcast before a summary"
        );
        s.handle_message(
            addr(2),
            &ident(2),
            Msg::Summary {
                site: [2; 16],
                held: Vec::new(),
                reply: false,
                urgent: false,
                collected: Some(Vec::new()),
                cl_floor: Some(0),
            },
            Duration::ZERO,
        );
        drain(&mut s);
        s.handle_local_unit(unit([1; 16], 1, 2), Duration::ZERO);
        let sent: Vec<SocketAddr> = drain(&mut s)
            .into_iter()
            .map(|e| match e {
                Effect::Send {
                    to,
                    msg: Msg::Unit { relay: true, .. },
                } => to,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(sent.len(), 6, "fanout 6 children of the root");
        // Node 1 relays a unit of origin 5: applied, and forwarded to its own children.
        let u = unit([5; 16], 0, 3);
        s.handle_message(
            addr(5),
            &ident(5),
            Msg::Unit {
                site: [5; 16],
                unit: Arc::new(u.clone()),
                relay: true,
            },
            Duration::ZERO,
        );
        let eff = drain(&mut s);
        let applies = eff.iter().filter(|e| matches!(e, Effect::Apply(_))).count();
        let order: Vec<SiteId> = (1..=9).map(|i| [i; 16]).collect();
        let kids = tree_children(&order, &[5; 16], &[1; 16], 6);
        let relays = eff.len() - applies;
        assert_eq!((applies, relays), (1, kids.len()));
        // The same unit again (another path, a repair): nothing.
        s.handle_message(
            addr(6),
            &ident(6),
            Msg::Unit {
                site: [6; 16],
                unit: Arc::new(u),
                relay: true,
            },
            Duration::ZERO,
        );
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.stats().duplicates, 1);
    }

    #[test]
    fn a_gap_is_asked_about_at_once_and_repaired_from_memory() {
        let mut a = machine(1);
        let mut b = machine(2);
        a.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        b.set_peers([(addr(1), [1; 16])], Duration::ZERO);
        let t = Duration::from_secs(5);
        // B holds origin 7's units (0,2] and (2,4] (applied), A receives only (2,4].
        for u in [unit([7; 16], 0, 2), unit([7; 16], 2, 4)] {
            b.handle_message(
                addr(7),
                &ident(7),
                Msg::Unit {
                    site: [7; 16],
                    unit: Arc::new(u),
                    relay: false,
                },
                t,
            );
        }
        drain(&mut b);
        b.handle_applied(
            Applied {
                cursors: vec![],
                held: vec![([7; 16], RangeSet::from_ranges([(1, 4)]))],
                released: Held::default(),
                buffered: None,
                seed: None,
            },
            Duration::ZERO,
        );
        a.handle_message(
            addr(2),
            &ident(2),
            Msg::Unit {
                site: [2; 16],
                unit: Arc::new(unit([7; 16], 2, 4)),
                relay: true,
            },
            t,
        );
        let ask = drain(&mut a)
            .into_iter()
            .find_map(|e| match e {
                Effect::Send {
                    msg: msg @ Msg::Summary { urgent: true, .. },
                    ..
                } => Some(msg),
                _ => None,
            })
            .expect("an urgent summary to the sender");
        // B offers what it keeps, A asks for exactly what it lacks, B sends it.
        b.handle_message(addr(1), &ident(1), ask, t);
        let offer = drain(&mut b)
            .into_iter()
            .find_map(|e| match e {
                Effect::Send {
                    msg: msg @ Msg::Offer { .. },
                    ..
                } => Some(msg),
                _ => None,
            })
            .expect("an offer");
        a.handle_message(addr(2), &ident(2), offer.clone(), t);
        let want = drain(&mut a)
            .into_iter()
            .find_map(|e| match e {
                Effect::Send {
                    msg: msg @ Msg::Want { .. },
                    ..
                } => Some(msg),
                _ => None,
            })
            .expect("a want");
        // The same offer again (a late duplicate): nothing asked twice.
        a.handle_message(addr(2), &ident(2), offer, t);
        assert!(drain(&mut a).is_empty(), "asked again");
        b.handle_message(addr(1), &ident(1), want, t);
        let eff = drain(&mut b);
        let repaired: Vec<(i64, i64)> = eff
            .iter()
            .filter_map(|e| match e {
                Effect::Send {
                    msg: Msg::Repair { units, .. },
                    ..
                } => Some(units.iter().map(|u| (u.from, u.to)).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(repaired, vec![(0, 2)], "exactly the missing unit");
        assert!(!eff.iter().any(|e| matches!(
            e,
            Effect::Send {
                msg: Msg::Behind { .. },
                ..
            }
        )));
    }

    #[test]
    fn a_summary_lacking_what_is_no_longer_in_memory_gets_an_offer_of_more_then_a_pull() {
        let mut b = machine(2);
        b.set_peers([(addr(1), [1; 16])], Duration::ZERO);
        b.handle_applied(
            Applied {
                cursors: vec![],
                held: vec![([7; 16], RangeSet::from_ranges([(1, 40)]))],
                released: Held::default(),
                buffered: None,
                seed: None,
            },
            Duration::ZERO,
        );
        let mut theirs = Held::default();
        theirs.insert([7; 16], 1, 10);
        b.handle_message(
            addr(1),
            &ident(1),
            Msg::Summary {
                site: [1; 16],
                held: theirs.to_wire(64),
                reply: true,
                urgent: false,
                collected: None,
                cl_floor: None,
            },
            Duration::from_secs(9),
        );
        let eff = drain(&mut b);
        let offer = match &eff[..] {
            [Effect::Send {
                msg: offer @ Msg::Offer { have, more, .. },
                ..
            }, Effect::Send {
                msg: Msg::Summary { reply: false, .. },
                ..
            }] if have.is_empty() && !more.is_empty() => offer.clone(),
            other => panic!("unexpected {other:?}"),
        };
        let mut a = machine(1);
        a.set_peers(
            [(addr(2), [2; 16]), (addr(3), [3; 16]), (addr(4), [4; 16])],
            Duration::ZERO,
        );
        a.handle_message(addr(2), &ident(2), offer, Duration::ZERO);
        for p in [3u8, 4] {
            a.handle_message(
                addr(p as u16),
                &ident(p as u16),
                Msg::Behind { site: [p; 16] },
                Duration::ZERO,
            );
        }
        let pulls = drain(&mut a)
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Send {
                        msg: Msg::Pull { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(pulls, 1, "at most max_pulls (1) catch-ups in flight");
    }

    /// A summary from `site` at port `site` holding `1..=head` of origin 7.
    fn summary_holding(site: u8, head: i64) -> Msg {
        let mut h = Held::default();
        h.insert([7; 16], 1, head);
        Msg::Summary {
            site: [site; 16],
            held: h.to_wire(64),
            reply: false,
            urgent: false,
            collected: None,
            cl_floor: None,
        }
    }

    fn seed_part(id: u64, offset: u64, total: u64, len: usize) -> Msg {
        Msg::Seed {
            site: [2; 16],
            id,
            offset,
            total,
            bytes: vec![0; len],
        }
    }

    /// A certificate identity (`sync::CERTIFICATE_PREFIX`), one per `n`.
    fn cert(n: u8) -> String {
        format!(
            "{}{}",
            crate::sync::CERTIFICATE_PREFIX,
            hex::encode([n; 32])
        )
    }

    fn sent_pulls(eff: &[Effect]) -> Vec<Msg> {
        eff.iter()
            .filter_map(|e| match e {
                Effect::Send {
                    msg: m @ Msg::Pull { .. },
                    ..
                } => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_empty_node_asks_for_a_snapshot_holds_units_back_and_applies_them_after_it() {
        let mut j = fresh_machine(1);
        j.set_seedable(true);
        j.set_peers([(addr(2), [2; 16]), (addr(3), [3; 16])], Duration::ZERO);
        // The first summary of a peer holding something: a pull asking for its snapshot.
        j.handle_message(addr(2), &ident(2), summary_holding(2, 50), Duration::ZERO);
        let eff = drain(&mut j);
        match &sent_pulls(&eff)[..] {
            [Msg::Pull {
                seed: Some(SeedAsk { id: 0, offset: 0 }),
                ..
            }] => {}
            other => panic!("expected one snapshot pull, got {other:?}"),
        }
        // A unit broadcast meanwhile is held back, not applied.
        let t = Duration::from_millis(10);
        j.handle_message(
            addr(3),
            &ident(3),
            Msg::Unit {
                site: [3; 16],
                unit: Arc::new(unit([3; 16], 0, 1)),
                relay: false,
            },
            t,
        );
        assert!(
            !drain(&mut j).iter().any(|e| matches!(e, Effect::Apply(_))),
            "nothing applied before the snapshot"
        );
        // Parts in order: each handed to apply, the next asked for.
        j.handle_message(addr(2), &ident(2), seed_part(9, 0, 10, 6), t);
        let eff = drain(&mut j);
        assert!(
            matches!(
                &eff[..],
                [
                    Effect::Send {
                        msg: Msg::Pull {
                            seed: Some(SeedAsk { id: 9, offset: 6 }),
                            ..
                        },
                        ..
                    },
                    Effect::Apply(ApplyJob {
                        work: Work::SeedPart(SeedPart { offset: 0, .. }),
                        ..
                    })
                ]
            ),
            "{eff:?}"
        );
        // A part out of order or of another snapshot is ignored.
        j.handle_message(addr(2), &ident(2), seed_part(9, 0, 10, 6), t);
        j.handle_message(addr(2), &ident(2), seed_part(8, 6, 10, 4), t);
        assert!(drain(&mut j).is_empty());
        j.handle_message(addr(2), &ident(2), seed_part(9, 6, 10, 4), t);
        let eff = drain(&mut j);
        assert!(
            matches!(&eff[..], [Effect::Apply(ApplyJob { work: Work::SeedPart(p), .. })] if p.is_last()),
            "{eff:?}"
        );
        assert!(matches!(j.seed_state(), SeedState::Installing { .. }));
        // Installed: the held-back unit goes to apply, the pull is done.
        let mut held = RangeSet::default();
        held.insert(1, 50);
        j.handle_applied(
            Applied {
                cursors: vec![([2; 16], 123)],
                held: vec![([7; 16], held)],
                seed: Some(SeedOutcome::Installed {
                    versions: 50,
                    collected: [([7; 16], 9)].into_iter().collect(),
                    cl_floor: 4,
                    bindings: vec![([7; 16], cert(7)), ([3; 16], cert(3)), ([1; 16], cert(9))],
                }),
                ..Applied::default()
            },
            t,
        );
        let eff = drain(&mut j);
        assert!(
            matches!(
                &eff[..],
                [Effect::Apply(ApplyJob {
                    work: Work::Unit(_),
                    ..
                })]
            ),
            "{eff:?}"
        );
        assert_eq!(j.seed_state(), &SeedState::Off);
        assert_eq!(j.pulls_in_flight(), 0);
        assert_eq!(j.cursor(&[2; 16]), 123);
        assert!(j.held().covers(&[7; 16], 1, 50));
        // The stored bindings are in force, over one made in memory while the install ran
        // ([3; 16] was bound to the address that sent the held-back unit), and never for
        // this node's own site id.
        assert_eq!(j.binding(&[7; 16]), Some(cert(7).as_str()));
        assert_eq!(j.binding(&[3; 16]), Some(cert(3).as_str()));
        assert_eq!(j.binding(&[1; 16]), None);
        j.handle_message(
            addr(3),
            &ident(3),
            Msg::Unit {
                site: [3; 16],
                unit: Arc::new(unit([3; 16], 1, 2)),
                relay: false,
            },
            t,
        );
        assert!(
            !drain(&mut j).iter().any(|e| matches!(e, Effect::Apply(_))),
            "a unit of [3; 16] from an identity the sender did not bind it to is refused"
        );
        // What the sender had collected is advertised from now on.
        j.handle_timer(Duration::from_secs(5));
        let advertised = drain(&mut j).into_iter().find_map(|e| match e {
            Effect::Send {
                msg:
                    Msg::Summary {
                        collected,
                        cl_floor,
                        ..
                    },
                ..
            } => Some((collected, cl_floor)),
            _ => None,
        });
        match advertised {
            Some((Some(c), Some(4))) => assert!(
                c.iter()
                    .any(|o| o.site == [7; 16] && o.ranges == vec![(1, 9)]),
                "{c:?}"
            ),
            other => panic!("expected a summary with the sender's floors, got {other:?}"),
        }
    }

    #[test]
    fn a_peer_answering_with_its_feed_or_a_failed_install_ends_the_attempt() {
        // The peer answers with its feed (an older release, or no snapshot possible).
        let mut j = fresh_machine(1);
        j.set_seedable(true);
        j.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        j.handle_message(addr(2), &ident(2), summary_holding(2, 5), Duration::ZERO);
        drain(&mut j);
        j.handle_message(
            addr(2),
            &ident(2),
            Msg::Changes {
                site: [2; 16],
                chunk: Chunk {
                    unit_from: 0,
                    unit_to: 5,
                    from: 0,
                    to: 5,
                    changes: vec![],
                    held: None,
                    schema: None,
                },
            },
            Duration::ZERO,
        );
        assert_eq!(j.seed_state(), &SeedState::Off);
        assert!(
            drain(&mut j).iter().any(|e| matches!(
                e,
                Effect::Apply(ApplyJob {
                    work: Work::Chunk(_),
                    ..
                })
            )),
            "the feed is applied as a plain pull"
        );

        // The install fails: the pull ends, and the next offer starts a plain pull.
        let mut j = fresh_machine(1);
        j.set_seedable(true);
        j.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        j.handle_message(addr(2), &ident(2), summary_holding(2, 5), Duration::ZERO);
        j.handle_message(addr(2), &ident(2), seed_part(4, 0, 3, 3), Duration::ZERO);
        drain(&mut j);
        j.handle_applied(
            Applied {
                seed: Some(SeedOutcome::Failed("not empty".into())),
                ..Applied::default()
            },
            Duration::ZERO,
        );
        assert_eq!(j.seed_state(), &SeedState::Off);
        assert_eq!(j.pulls_in_flight(), 0);
        let mut more = Held::default();
        more.insert([7; 16], 1, 5);
        j.handle_message(
            addr(2),
            &ident(2),
            Msg::Offer {
                site: [2; 16],
                have: vec![],
                more: more.to_wire(64),
            },
            Duration::from_secs(1),
        );
        match &sent_pulls(&drain(&mut j))[..] {
            [Msg::Pull { seed: None, .. }] => {}
            other => panic!("expected a plain pull, got {other:?}"),
        }

        // A node that wrote after it started (an app on its file) no longer asks.
        let mut w = fresh_machine(1);
        w.set_seedable(true);
        w.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        w.handle_local_unit(unit([1; 16], 0, 1), Duration::ZERO);
        drain(&mut w);
        w.handle_message(addr(2), &ident(2), summary_holding(2, 5), Duration::ZERO);
        w.handle_message(
            addr(2),
            &ident(2),
            Msg::Offer {
                site: [2; 16],
                have: vec![],
                more: more.to_wire(64),
            },
            Duration::ZERO,
        );
        match &sent_pulls(&drain(&mut w))[..] {
            [Msg::Pull { seed: None, .. }] => {}
            other => panic!("expected one plain pull, got {other:?}"),
        }
        assert_eq!(w.seed_state(), &SeedState::Off);

        // A node that holds something never asks.
        let mut n = machine(1);
        n.handle_applied(
            Applied {
                held: vec![([7; 16], RangeSet::from_ranges([(1, 2)]))],
                ..Applied::default()
            },
            Duration::ZERO,
        );
        n.set_seedable(true);
        assert_eq!(n.seed_state(), &SeedState::Off);
    }

    #[test]
    fn pull_continues_until_the_unit_is_whole_then_waits_for_the_commit() {
        let mut s = machine(1);
        s.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        let behind = Msg::Behind { site: [2; 16] };
        s.handle_message(addr(2), &ident(2), behind.clone(), Duration::from_secs(5));
        let eff = drain(&mut s);
        assert!(matches!(
            &eff[..],
            [Effect::Send {
                msg: Msg::Pull {
                    after: 0,
                    unit: None,
                    ..
                },
                ..
            }]
        ));
        let chunk = |from, to| Chunk {
            unit_from: 0,
            unit_to: 9,
            from,
            to,
            changes: vec![],
            held: None,
            schema: None,
        };
        s.handle_message(
            addr(2),
            &ident(2),
            Msg::Changes {
                site: [2; 16],
                chunk: chunk(0, 4),
            },
            Duration::from_secs(5),
        );
        let eff = drain(&mut s);
        assert!(matches!(
            &eff[1],
            Effect::Send {
                msg: Msg::Pull {
                    after: 4,
                    unit: Some((0, 9)),
                    ..
                },
                ..
            }
        ));
        s.handle_message(
            addr(2),
            &ident(2),
            Msg::Changes {
                site: [2; 16],
                chunk: chunk(4, 9),
            },
            Duration::from_secs(5),
        );
        assert_eq!(drain(&mut s).len(), 1);
        // Still applying: no new pull to the same peer.
        s.handle_message(addr(2), &ident(2), behind.clone(), Duration::from_secs(6));
        assert!(drain(&mut s).is_empty());
        s.handle_applied(
            Applied {
                cursors: vec![([2; 16], 9)],
                ..Applied::default()
            },
            Duration::ZERO,
        );
        s.handle_message(addr(2), &ident(2), behind, Duration::from_secs(7));
        let eff = drain(&mut s);
        assert!(matches!(
            &eff[..],
            [Effect::Send {
                msg: Msg::Pull { after: 9, .. },
                ..
            }]
        ));
    }

    #[test]
    fn a_large_unit_is_announced_pulled_and_announced_onwards() {
        let mut s = machine(1);
        s.set_peers([(addr(2), [2; 16]), (addr(3), [3; 16])], Duration::ZERO);
        let notify = Msg::Notify {
            site: [2; 16],
            origin: [2; 16],
            head: 9000,
        };
        s.handle_message(addr(2), &ident(2), notify, Duration::ZERO);
        assert!(matches!(
            &drain(&mut s)[..],
            [Effect::Send {
                msg: Msg::Pull { .. },
                ..
            }]
        ));
        s.handle_applied(
            Applied {
                cursors: vec![([2; 16], 9100)],
                held: vec![([2; 16], RangeSet::from_ranges([(1, 9000)]))],
                released: Held::default(),
                buffered: None,
                seed: None,
            },
            Duration::ZERO,
        );
        let order = vec![[1; 16], [2; 16], [3; 16]];
        let expect = tree_children(&order, &[2; 16], &[1; 16], 6).len();
        let onwards = drain(&mut s)
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Send {
                        msg: Msg::Notify { head: 9000, .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(onwards, expect);
    }

    #[test]
    fn own_site_is_refused() {
        let mut s = machine(1);
        s.handle_message(
            addr(2),
            &ident(2),
            Msg::Behind { site: [1; 16] },
            Duration::ZERO,
        );
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.stats().refused, 1);
        s.set_peers([(addr(2), [1; 16])], Duration::ZERO);
        s.handle_timer(Duration::from_secs(5));
        assert!(
            drain(&mut s).is_empty(),
            "no summary to a peer with our own id"
        );
    }

    #[test]
    fn a_second_address_claiming_a_held_site_is_refused() {
        let mut s = machine(1);
        s.set_peers([(addr(2), [2; 16]), (addr(3), [2; 16])], Duration::ZERO);
        let pull = |site| Msg::Pull {
            seed: None,
            site,
            after: 0,
            unit: None,
            known: vec![],
        };
        s.handle_message(addr(2), &ident(2), pull([2; 16]), Duration::from_secs(1));
        assert_eq!(drain(&mut s).len(), 1);
        s.handle_message(addr(3), &ident(3), pull([2; 16]), Duration::from_secs(1));
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.stats().refused, 1);
    }
}

#[cfg(test)]
mod collected_floor_tests {
    use super::*;
    use crate::sync::test_support::{addr, drain, ident};

    fn node(site: u8, held: &[(u8, i64)]) -> Replicator {
        let mut h = Held::default();
        for (o, v) in held {
            h.insert([*o; 16], 1, *v);
        }
        let mut r = Replicator::new(
            [site; 16],
            SyncConfig::default(),
            HashMap::new(),
            h,
            rand::SeedableRng::seed_from_u64(7),
            Duration::ZERO,
        );
        r.set_peers([(addr(1), [1; 16])], Duration::ZERO);
        r
    }

    fn summary(held: &[(u8, i64)], floors: &[(u8, i64)]) -> Msg {
        let wire = |l: &[(u8, i64)]| {
            l.iter()
                .map(|(o, v)| OriginRanges {
                    site: [*o; 16],
                    ranges: vec![(1, *v)],
                })
                .collect::<Vec<_>>()
        };
        Msg::Summary {
            site: [1; 16],
            held: wire(held),
            reply: true,
            urgent: false,
            collected: Some(wire(floors)),
            cl_floor: Some(6),
        }
    }

    #[test]
    fn a_node_lacking_a_peers_collected_deletes_stops_and_asks_for_a_reseed() {
        // Node 3 holds origin 1 up to 100; node 1 holds 150 and forgot deletes up to 140.
        let mut n = node(3, &[(1, 100), (3, 5)]);
        n.handle_message(
            addr(1),
            &ident(1),
            summary(&[(1, 150)], &[(1, 140)]),
            Duration::ZERO,
        );
        let eff = drain(&mut n);
        assert!(eff.contains(&Effect::RaiseClFloor(6)), "{eff:?}");
        assert!(
            eff.iter().any(|e| matches!(
                e,
                Effect::Reseed { origin, floor: 140, held: 100, .. } if *origin == [1; 16]
            )),
            "{eff:?}"
        );
        assert!(n.is_reseeding());
        // From then on it neither answers nor broadcasts.
        n.handle_message(
            addr(1),
            &ident(1),
            summary(&[(1, 150)], &[]),
            Duration::ZERO,
        );
        n.handle_local_unit(
            OriginUnit {
                origin: [3; 16],
                from: 5,
                to: 6,
                committed_ms: 0,
                changes: Vec::new(),
                schema: None,
            },
            Duration::ZERO,
        );
        n.handle_timer(Duration::from_secs(5));
        assert!(drain(&mut n).is_empty());
    }

    #[test]
    fn a_joiner_and_a_node_holding_the_floor_carry_on() {
        // A joiner holds nothing of any other origin: its catch-up brings the state.
        let mut j = node(3, &[(3, 2)]);
        j.handle_message(
            addr(1),
            &ident(1),
            summary(&[(1, 150)], &[(1, 140)]),
            Duration::ZERO,
        );
        assert!(!j.is_reseeding());
        // A node holding everything up to the floor passes.
        let mut n = node(3, &[(1, 140)]);
        n.handle_message(
            addr(1),
            &ident(1),
            summary(&[(1, 150)], &[(1, 140)]),
            Duration::ZERO,
        );
        assert!(!n.is_reseeding());
    }

    #[test]
    fn an_old_site_id_of_a_node_running_under_a_new_one_is_not_waited_for() {
        let mut n = node(3, &[]);
        n.set_bindings(
            [
                ([4; 16], "address 10.0.0.4:8787".to_string()),
                ([5; 16], "address 10.0.0.4:8787".to_string()),
                ([6; 16], "address 10.0.0.6:8787".to_string()),
            ]
            .into_iter()
            .collect(),
        );
        // 4 was re-seeded into 5 on the same address; 6 is merely down.
        assert_eq!(
            n.superseded(&[[4; 16], [6; 16], [5; 16]], &[[5; 16]]),
            vec![[4; 16]]
        );
        assert!(n.superseded(&[[4; 16], [6; 16]], &[]).is_empty());
    }

    #[test]
    fn both_sides_lacking_what_the_other_forgot_diverge_instead_of_wiping() {
        let mut n = node(3, &[(1, 100), (3, 50)]);
        n.set_collected([([3; 16], 40)].into_iter().collect(), 4);
        // Node 1 forgot deletes of origin 1 up to 140; it holds origin 3 only up to 10,
        // below what node 3 forgot.
        n.handle_message(
            addr(1),
            &ident(1),
            summary(&[(1, 150), (3, 10)], &[(1, 140)]),
            Duration::ZERO,
        );
        let eff = drain(&mut n);
        assert!(
            eff.iter()
                .any(|e| matches!(e, Effect::Diverged { site, .. } if *site == [1; 16])),
            "{eff:?}"
        );
        assert!(!n.is_reseeding(), "neither side wipes itself");
        assert!(n.diverged().contains(&[1; 16]));
    }
}
