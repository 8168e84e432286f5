//! The sync state machine: broadcast of local units and anti-entropy pulls, without I/O.
//!
//! The caller feeds it messages, local feed units, apply confirmations and the clock;
//! it answers with [`Effect`]s the caller performs (send a message, read the feed to serve
//! a pull, apply a chunk). Time is a `Duration` since an epoch of the caller's choosing
//! and randomness is an injected, seeded RNG, so `sim.rs` replays any run from its seed.
//!
//! What it knows: the alive peers and their site ids (from membership), the committed
//! cursor per peer site (reported back by the apply side after each commit — the database
//! is the source of truth, this is a cache), the pulls in flight, and which peer identity
//! each site id is bound to (`identity.rs`: refuses a second node carrying a copied
//! database, or a peer taking over the id of a node that is down). Every range a peer
//! sends is validated (`ranges.rs`) before anything is applied.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::identity::{check_claim, Claim};
use super::msg::{chunk_unit, Change, Chunk, Msg, SiteId, Skipped};
use super::ranges::{validate_chunk, validate_pull, RangeError};

/// Tunables; the defaults are the node's.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// Peers each new local unit is pushed to (all when fewer are alive).
    pub fanout: usize,
    /// Mean time between anti-entropy pulls.
    pub pull_interval: Duration,
    /// Pulls happen at `pull_interval ± pull_jitter`, so nodes do not pull in lockstep.
    pub pull_jitter: Duration,
    /// A pull without an answer (or without an apply confirmation) for this long is dropped.
    pub pull_timeout: Duration,
    /// Largest chunk, in changes.
    pub max_chunk_changes: usize,
    /// Largest chunk, in approximate bytes (kept under the transport's frame limit).
    pub max_chunk_bytes: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            fanout: 3,
            pull_interval: Duration::from_millis(1000),
            pull_jitter: Duration::from_millis(300),
            pull_timeout: Duration::from_secs(10),
            max_chunk_changes: 5_000,
            max_chunk_bytes: 4 * 1024 * 1024,
        }
    }
}

/// A chunk to apply, with where it came from. The apply side advances the cursor of
/// `peer_site` to `chunk.unit_to` when the whole unit is applied and `unit_from <= cursor`
/// (see [`advance_cursor`]), in the same transaction as the changes.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyJob {
    pub from: SocketAddr,
    pub peer_site: SiteId,
    pub chunk: Chunk,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Send `msg` to `to` on the sync channel (best effort).
    Send { to: SocketAddr, msg: Msg },
    /// Read this node's feed `(after, ..]` (or the fixed `unit` range of a continuation),
    /// without changes credited to `exclude`, and send it back as `Msg::Changes`.
    Serve {
        to: SocketAddr,
        after: i64,
        unit: Option<(i64, i64)>,
        exclude: SiteId,
        /// The requester's cursors per origin: see `Msg::Pull::known`.
        known: Vec<Skipped>,
    },
    /// Hand a chunk to the apply side (which buffers partial units durably).
    Apply(ApplyJob),
    /// Store, once and for good, that `site` is bound to the peer `identity`
    /// (`patina_site_bindings`; `INSERT OR IGNORE`). Already in force in memory.
    Bind { site: SiteId, identity: String },
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
}

/// Counters the caller may export.
#[derive(Clone, Debug, Default)]
pub struct SyncStats {
    pub pulls_sent: u64,
    pub pushes_sent: u64,
    pub changes_pushed: u64,
    pub refused: u64,
}

/// The state machine. One per node.
pub struct Sync {
    site: SiteId,
    config: SyncConfig,
    rng: StdRng,
    peers: BTreeMap<SocketAddr, SiteId>,
    cursors: HashMap<SiteId, i64>,
    pulls: HashMap<SocketAddr, PullState>,
    /// Site id → the peer identity it is bound to (loaded from the database at start).
    bindings: HashMap<SiteId, String>,
    /// Address → the identity last seen on a message from it.
    seen: HashMap<SocketAddr, String>,
    last_warned: HashMap<SocketAddr, Duration>,
    next_pull: Duration,
    effects: VecDeque<Effect>,
    stats: SyncStats,
}

impl Sync {
    /// A machine for site `site`, with the cursors committed in the database.
    pub fn new(
        site: SiteId,
        config: SyncConfig,
        cursors: HashMap<SiteId, i64>,
        mut rng: StdRng,
        now: Duration,
    ) -> Sync {
        let first = jittered(&mut rng, &config);
        Sync {
            site,
            config,
            rng,
            peers: BTreeMap::new(),
            cursors,
            pulls: HashMap::new(),
            bindings: HashMap::new(),
            seen: HashMap::new(),
            last_warned: HashMap::new(),
            next_pull: now + first,
            effects: VecDeque::new(),
            stats: SyncStats::default(),
        }
    }

    /// Loads the durable site bindings (`patina_site_bindings`) at start.
    pub fn set_bindings(&mut self, bindings: HashMap<SiteId, String>) {
        self.bindings = bindings;
    }

    /// The identity `site` is bound to, if any.
    pub fn binding(&self, site: &SiteId) -> Option<&str> {
        self.bindings.get(site).map(String::as_str)
    }

    /// This node's site id.
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// The committed cursor for a peer site (0 when never synced).
    pub fn cursor(&self, site: &SiteId) -> i64 {
        self.cursors.get(site).copied().unwrap_or(0)
    }

    /// Counters so far.
    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// Next effect to perform, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When `handle_timer` next has something to do.
    pub fn next_timeout(&self) -> Duration {
        self.pulls
            .values()
            .map(|p| p.deadline)
            .chain(std::iter::once(self.next_pull))
            .min()
            .unwrap_or(self.next_pull)
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
        self.last_warned
            .retain(|_, t| now.saturating_sub(*t) < Duration::from_secs(10));
        self.peers = next;
    }

    /// Processes the clock: starts an anti-entropy pull when due, expires stale pulls.
    pub fn handle_timer(&mut self, now: Duration) {
        self.pulls.retain(|_, p| p.deadline > now);
        if now < self.next_pull {
            return;
        }
        self.next_pull = now + jittered(&mut self.rng, &self.config);
        let candidates: Vec<(SocketAddr, SiteId)> = self
            .peers
            .iter()
            .filter(|(addr, site)| !self.pulls.contains_key(*addr) && self.holds_claim(addr, site))
            .map(|(a, s)| (*a, *s))
            .collect();
        let Some(&(to, site)) = candidates.choose(&mut self.rng) else {
            return;
        };
        self.start_pull(to, site, now);
    }

    /// Sends a pull of `to`'s feed after our cursor for `site`.
    fn start_pull(&mut self, to: SocketAddr, site: SiteId, now: Duration) {
        let after = self.cursor(&site);
        self.pulls.insert(
            to,
            PullState {
                site,
                phase: Phase::Fetching,
                deadline: now + self.config.pull_timeout,
            },
        );
        self.stats.pulls_sent += 1;
        self.effects.push_back(Effect::Send {
            to,
            msg: Msg::Pull {
                site: self.site,
                after,
                unit: None,
                known: Some(self.known_except(&site)),
            },
        });
    }

    /// A unit of this node's feed too large for one chunk (`to - from` versions, one change
    /// each): tell every alive peer, who pull it chunk by chunk. Nothing large is held in
    /// memory or queued for a slow peer.
    pub fn handle_local_large_unit(&mut self, _from: i64, to: i64, _now: Duration) {
        let targets: Vec<SocketAddr> = self
            .peers
            .iter()
            .filter(|(addr, site)| self.holds_claim(addr, site))
            .map(|(a, _)| *a)
            .collect();
        for addr in targets {
            self.effects.push_back(Effect::Send {
                to: addr,
                msg: Msg::Notify {
                    site: self.site,
                    upto: to,
                },
            });
        }
    }

    /// Whether a local unit spanning `from..to` is pushed (small) or announced (large).
    pub fn is_large(&self, from: i64, to: i64) -> bool {
        to.saturating_sub(from) > self.config.max_chunk_changes as i64
    }

    /// A new unit of this node's own feed (one read transaction): push it to `fanout`
    /// random alive peers, each without the changes it originated itself.
    pub fn handle_local_unit(&mut self, from: i64, to: i64, changes: Vec<Change>, _now: Duration) {
        let targets: Vec<(SocketAddr, SiteId)> = self
            .peers
            .iter()
            .filter(|(addr, site)| self.holds_claim(addr, site))
            .map(|(a, s)| (*a, *s))
            .collect();
        let chosen: Vec<(SocketAddr, SiteId)> = targets
            .choose_multiple(&mut self.rng, self.config.fanout)
            .copied()
            .collect();
        // In a cluster no larger than the fanout every origin pushes to every peer itself,
        // so relaying an alive origin's changes only duplicates them (anti-entropy still
        // covers a lost push): they are left out and summarised in `skipped`, which keeps
        // the receiver's cursor honest. Larger clusters relay everything: that is gossip.
        let direct = targets.len() <= self.config.fanout;
        let alive_sites: Vec<SiteId> = targets.iter().map(|(_, s)| *s).collect();
        for (addr, site) in chosen {
            let mut own = Vec::new();
            let mut skipped: Vec<Skipped> = Vec::new();
            for c in &changes {
                if c.site_id.as_slice() == site.as_slice() {
                    continue; // the target originated it: it holds it or newer
                }
                let relay_only = direct
                    && c.site_id.as_slice() != self.site.as_slice()
                    && alive_sites
                        .iter()
                        .any(|s| s.as_slice() == c.site_id.as_slice());
                match (
                    relay_only,
                    c.origin_version,
                    SiteId::try_from(c.site_id.as_slice()),
                ) {
                    (true, Some(ov), Ok(origin)) => {
                        match skipped.iter_mut().find(|s| s.site == origin) {
                            Some(s) => s.upto = s.upto.max(ov),
                            None => skipped.push(Skipped {
                                site: origin,
                                upto: ov,
                            }),
                        }
                    }
                    _ => own.push(c.clone()),
                }
            }
            let skipped = (!skipped.is_empty()).then_some(skipped);
            self.stats.changes_pushed += own.len() as u64;
            for chunk in chunk_unit(
                from,
                to,
                own,
                skipped,
                self.config.max_chunk_changes,
                self.config.max_chunk_bytes,
            ) {
                self.stats.pushes_sent += 1;
                self.effects.push_back(Effect::Send {
                    to: addr,
                    msg: Msg::Push {
                        site: self.site,
                        chunk,
                    },
                });
            }
        }
    }

    /// A message from peer `from`, which presented `identity` (its certificate's
    /// fingerprint, or its address when the transport is unauthenticated).
    pub fn handle_message(&mut self, from: SocketAddr, identity: &str, msg: Msg, now: Duration) {
        let site = *msg.site();
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
        match msg {
            Msg::Push { chunk, .. } => {
                self.effects.push_back(Effect::Apply(ApplyJob {
                    from,
                    peer_site: site,
                    chunk,
                }));
            }
            Msg::Pull {
                after, unit, known, ..
            } => {
                self.effects.push_back(Effect::Serve {
                    to: from,
                    after,
                    unit,
                    exclude: site,
                    known: known.unwrap_or_default(),
                });
            }
            Msg::Notify { upto, .. } => {
                if upto > self.cursor(&site) && !self.pulls.contains_key(&from) {
                    self.start_pull(from, site, now);
                }
            }
            Msg::Changes { chunk, .. } => {
                let more = chunk.more();
                let next_after = chunk.to;
                let unit = (chunk.unit_from, chunk.unit_to);
                self.effects.push_back(Effect::Apply(ApplyJob {
                    from,
                    peer_site: site,
                    chunk,
                }));
                let Some(pull) = self.pulls.get_mut(&from) else {
                    return; // a late answer: applied (harmless), not continued
                };
                pull.deadline = now + self.config.pull_timeout;
                if more {
                    self.effects.push_back(Effect::Send {
                        to: from,
                        msg: Msg::Pull {
                            site: self.site,
                            after: next_after,
                            unit: Some(unit),
                            known: Some(self.known_except(&site)),
                        },
                    });
                } else {
                    pull.phase = Phase::Applying;
                }
            }
        }
    }

    /// The apply side committed: `cursor` is now the stored cursor for `peer_site`.
    pub fn handle_applied(&mut self, peer_site: SiteId, cursor: i64) {
        let c = self.cursors.entry(peer_site).or_insert(0);
        *c = (*c).max(cursor);
        self.pulls
            .retain(|_, p| !(p.site == peer_site && matches!(p.phase, Phase::Applying)));
    }

    /// Our cursors, as `known` for a pull from `peer` (its own feed position is `after`).
    fn known_except(&self, peer: &SiteId) -> Vec<Skipped> {
        self.cursors
            .iter()
            .filter(|(s, c)| *s != peer && **c > 0)
            .map(|(s, c)| Skipped { site: *s, upto: *c })
            .collect()
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

/// The ranges a message carries, checked by the rule of `ranges.rs`.
fn validate_msg(msg: &Msg) -> Result<(), RangeError> {
    match msg {
        Msg::Push { chunk, .. } | Msg::Changes { chunk, .. } => validate_chunk(chunk),
        Msg::Pull { after, unit, .. } => validate_pull(*after, *unit),
        Msg::Notify { .. } => Ok(()),
    }
}

fn jittered(rng: &mut StdRng, config: &SyncConfig) -> Duration {
    let base = config.pull_interval.as_millis() as i64;
    let j = config.pull_jitter.as_millis() as i64;
    let off = if j > 0 { rng.gen_range(-j..=j) } else { 0 };
    Duration::from_millis((base + off).max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::test_support::{addr, drain, ident, machine};

    #[test]
    fn a_notify_past_our_cursor_starts_a_pull() {
        let mut s = machine(1);
        s.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        let notify = |upto| Msg::Notify {
            site: [2; 16],
            upto,
        };
        s.handle_message(addr(2), &ident(2), notify(0), Duration::ZERO);
        assert!(drain(&mut s).is_empty(), "nothing new: no pull");
        s.handle_message(addr(2), &ident(2), notify(9000), Duration::ZERO);
        let eff = drain(&mut s);
        assert!(matches!(
            &eff[..],
            [Effect::Send {
                msg: Msg::Pull { after: 0, .. },
                ..
            }]
        ));
        s.handle_message(addr(2), &ident(2), notify(9500), Duration::ZERO);
        assert!(drain(&mut s).is_empty(), "one pull in flight per peer");
    }

    #[test]
    fn own_site_is_refused() {
        let mut s = machine(1);
        s.handle_message(
            addr(2),
            &ident(2),
            Msg::Pull {
                site: [1; 16],
                after: 0,
                unit: None,
                known: None,
            },
            Duration::ZERO,
        );
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.stats().refused, 1);
        s.set_peers([(addr(2), [1; 16])], Duration::ZERO);
        s.handle_timer(Duration::from_secs(5));
        assert!(
            drain(&mut s).is_empty(),
            "no pull to a peer with our own id"
        );
    }

    #[test]
    fn a_second_address_claiming_a_held_site_is_refused() {
        let mut s = machine(1);
        s.set_peers([(addr(2), [2; 16]), (addr(3), [2; 16])], Duration::ZERO);
        let pull = |site| Msg::Pull {
            site,
            after: 0,
            unit: None,
            known: None,
        };
        s.handle_message(addr(2), &ident(2), pull([2; 16]), Duration::from_secs(1));
        assert_eq!(drain(&mut s).len(), 1);
        s.handle_message(addr(3), &ident(3), pull([2; 16]), Duration::from_secs(1));
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.stats().refused, 1);
    }

    #[test]
    fn pull_continues_until_the_unit_is_whole_then_waits_for_the_commit() {
        let mut s = machine(1);
        s.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        s.handle_timer(Duration::from_secs(5));
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
            skipped: None,
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
        s.handle_timer(Duration::from_secs(7));
        assert!(drain(&mut s).is_empty());
        s.handle_applied([2; 16], 9);
        s.handle_timer(Duration::from_secs(9));
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
    fn push_skips_changes_the_target_originated() {
        let mut s = machine(1);
        s.set_peers([(addr(2), [2; 16])], Duration::ZERO);
        let mk = |site: u8, v| Change {
            table: "t".into(),
            pk: vec![],
            cid: "a".into(),
            val: super::super::msg::Value::Null,
            col_version: 1,
            db_version: v,
            site_id: vec![site; 16],
            cl: 1,
            seq: 0,
            origin_version: None,
        };
        s.handle_local_unit(0, 2, vec![mk(1, 1), mk(2, 2)], Duration::ZERO);
        let eff = drain(&mut s);
        match &eff[..] {
            [Effect::Send {
                msg: Msg::Push { chunk, .. },
                ..
            }] => {
                assert_eq!((chunk.from, chunk.to), (0, 2));
                assert_eq!(chunk.changes.len(), 1);
                assert_eq!(chunk.changes[0].site_id, vec![1; 16]);
            }
            other => panic!("unexpected effects {other:?}"),
        }
    }
}
