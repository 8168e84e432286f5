//! Bounded metadata, the driver's side: when members were last seen, collecting
//! tombstones with the limits the sync machine decides, forgetting departed members, and
//! acting on a re-seed or a divergence. The SQL is `db::retention`; the decisions are
//! `sync::stability`; this module only schedules them and moves their results.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use crate::config::SyncSection;
use crate::db::retention::{self, Collected};
use crate::node::Metrics;
use crate::sync::stability::Prefixes;
use crate::sync::{Replicator, SiteId};

/// How often collection and forgetting run.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Collection runs again with unchanged limits after this long.
const RECOLLECT_EVERY: Duration = Duration::from_secs(60);

/// How often last-seen times are written (a restart loses at most this much of them).
const PERSIST_SEEN_EVERY: Duration = Duration::from_secs(30);

/// What an upkeep task reports back to the driver.
pub enum Done {
    Collected(Collected),
    Forgotten(Vec<SiteId>),
}

/// The driver's upkeep state.
pub struct Upkeep {
    conn: Arc<Mutex<Connection>>,
    settings: SyncSection,
    /// Every member's last-seen time (unix ms), loaded at start.
    seen: HashMap<SiteId, i64>,
    last_persisted_ms: i64,
    last_limits: Prefixes,
    /// When collection last ran (unix ms).
    last_collect_ms: i64,
    busy: Arc<AtomicBool>,
    done_tx: mpsc::UnboundedSender<Done>,
    pub done_rx: mpsc::UnboundedReceiver<Done>,
    reseed: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    reported: bool,
    /// When this node last had a live peer (unix ms; 0: never), as stored at start and
    /// then as seen.
    last_contact_ms: i64,
    /// Whether the first contact after start was checked against `forget_after`.
    contact_checked: bool,
    /// Whether a contact was stored since start.
    contact_persisted: bool,
    /// Earlier site ids of nodes now running under a new one (`Replicator::superseded`):
    /// not waited for by tombstone collection.
    superseded: std::collections::HashSet<SiteId>,
}

/// Wall-clock milliseconds: last-seen times must survive restarts.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Upkeep {
    /// `conn` is a connection of its own (collection holds the write lock briefly);
    /// `seen` what `patina_site_seen` holds; `reseed` is signalled when the node must
    /// restart to re-seed.
    pub fn new(
        conn: Connection,
        settings: SyncSection,
        seen: HashMap<SiteId, i64>,
        last_contact_ms: i64,
        reseed: watch::Sender<bool>,
        metrics: Arc<Metrics>,
    ) -> Upkeep {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Upkeep {
            conn: Arc::new(Mutex::new(conn)),
            settings,
            seen,
            last_persisted_ms: 0,
            last_limits: Prefixes::new(),
            last_collect_ms: 0,
            busy: Arc::new(AtomicBool::new(false)),
            done_tx,
            done_rx,
            reseed,
            metrics,
            reported: false,
            last_contact_ms,
            contact_checked: false,
            contact_persisted: false,
            superseded: std::collections::HashSet::new(),
        }
    }

    /// Members alive now. The first contact after a silence longer than
    /// `sync.forget_after` means the peers forgot this node: it re-seeds.
    pub fn on_alive(&mut self, sites: impl IntoIterator<Item = SiteId>, db: &std::path::Path) {
        let now = unix_ms();
        let mut any = false;
        for s in sites {
            self.seen.insert(s, now);
            any = true;
        }
        if !any {
            return;
        }
        if !self.contact_checked {
            self.contact_checked = true;
            let silent = now.saturating_sub(self.last_contact_ms);
            if self.last_contact_ms > 0 && silent > Self::ms(self.settings.forget_after) {
                let reason = format!(
                    "this node had no live peer for {} s, longer than sync.forget_after \
                     ({:?}): its peers have forgotten it and may have forgotten deletes it \
                     never received",
                    silent / 1000,
                    self.settings.forget_after
                );
                self.stop_for_reseed(reason, db);
            } else {
                // Stored at once: a node stopped soon after it first met its peers must
                // still know, at its next start, that it had them.
                let conn = self.conn.clone();
                tokio::task::spawn_blocking(move || {
                    if let Ok(c) = conn.lock() {
                        if let Err(e) = retention::set_flag(&c, "last_contact", &now.to_string()) {
                            tracing::warn!("cannot record the last contact with a peer: {e}");
                        }
                    }
                });
            }
        }
        self.last_contact_ms = now;
    }

    /// Every site with a last-seen time.
    pub fn members_seen(&self) -> Vec<SiteId> {
        self.seen.keys().copied().collect()
    }

    /// Sites collection no longer waits for (see the field).
    pub fn set_superseded(&mut self, sites: Vec<SiteId>) {
        self.superseded = sites.into_iter().collect();
    }

    fn ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    /// Runs one round: persists last-seen times, forgets departed members, and collects
    /// what the machine allows. Database work runs off the async workers, one round at a
    /// time; a round still running when the next is due is skipped.
    pub fn tick(&mut self, sync: &Replicator, now: Duration) {
        if self.busy.load(Ordering::Acquire) {
            return;
        }
        let wall = unix_ms();
        let retention_ms = Self::ms(self.settings.tombstone_retention);
        let members: Vec<SiteId> = self
            .seen
            .iter()
            .filter(|(s, t)| {
                wall.saturating_sub(**t) <= retention_ms && !self.superseded.contains(*s)
            })
            .map(|(s, _)| *s)
            .collect();
        let forget_before = wall.saturating_sub(Self::ms(self.settings.forget_after));
        let departed = self.seen.values().any(|t| *t < forget_before);
        // Often enough that a restart loses little of them, and at once after the first
        // contact (a node that just joined must remember it had peers).
        let every = PERSIST_SEEN_EVERY.min(self.settings.forget_after / 4);
        let first_contact = self.contact_checked && !self.contact_persisted;
        let persist =
            first_contact || wall.saturating_sub(self.last_persisted_ms) >= Self::ms(every);
        let limits = sync.collect_limits(&members, now);
        // New limits, or a minute since the last run with the same ones: a tombstone
        // below them can still appear (an old delete arriving by a catch-up).
        let collect = !limits.is_empty()
            && (limits != self.last_limits
                || wall.saturating_sub(self.last_collect_ms) >= Self::ms(RECOLLECT_EVERY));
        if !(persist || departed || collect) {
            return;
        }
        if collect {
            self.last_limits = limits.clone();
            self.last_collect_ms = wall;
        }
        let seen: Vec<(SiteId, i64)> = if persist {
            self.last_persisted_ms = wall;
            self.seen.iter().map(|(s, t)| (*s, *t)).collect()
        } else {
            Vec::new()
        };
        let contact = (persist && self.contact_checked && !self.reported)
            .then_some(self.last_contact_ms)
            .filter(|t| *t > 0);
        if contact.is_some() {
            self.contact_persisted = true;
        }
        if departed {
            self.seen.retain(|_, t| *t >= forget_before);
        }
        self.busy.store(true, Ordering::Release);
        let (conn, busy, done) = (self.conn.clone(), self.busy.clone(), self.done_tx.clone());
        tokio::task::spawn_blocking(move || {
            let Ok(mut conn) = conn.lock() else {
                busy.store(false, Ordering::Release);
                return;
            };
            if !seen.is_empty() {
                if let Err(e) = retention::mark_seen(&mut conn, &seen) {
                    tracing::warn!("cannot record when members were last seen: {e}");
                }
            }
            if let Some(t) = contact {
                if let Err(e) = retention::set_flag(&conn, "last_contact", &t.to_string()) {
                    tracing::warn!("cannot record the last contact with a peer: {e}");
                }
            }
            if departed {
                match retention::forget_departed(&mut conn, forget_before) {
                    Ok(gone) if !gone.is_empty() => {
                        let _ = done.send(Done::Forgotten(gone));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("cannot forget departed members: {e}"),
                }
            }
            if collect {
                match retention::collect(&mut conn, &limits) {
                    Ok(c) => {
                        let _ = done.send(Done::Collected(c));
                    }
                    Err(e) => tracing::warn!("tombstone collection failed (retried): {e}"),
                }
            }
            busy.store(false, Ordering::Release);
        });
    }

    /// A report from a finished round.
    pub fn on_done(&mut self, done: Done, sync: &mut Replicator) {
        match done {
            Done::Collected(c) => {
                if c.removed > 0 {
                    tracing::debug!(
                        removed = c.removed,
                        "collected {} tombstones no replica can need",
                        c.removed
                    );
                    self.metrics
                        .tombstones_collected
                        .inc_by(u64::try_from(c.removed).unwrap_or(0));
                }
                sync.set_collected(c.floors, c.cl_floor);
            }
            Done::Forgotten(gone) => {
                for site in &gone {
                    tracing::info!(
                        site_id = %hex::encode(site),
                        "forgot member {}: not seen for longer than sync.forget_after ({:?})",
                        hex::encode(site),
                        self.settings.forget_after
                    );
                    sync.forget_member(site);
                    self.seen.remove(site);
                }
                self.metrics
                    .members_forgotten
                    .inc_by(u64::try_from(gone.len()).unwrap_or(0));
            }
        }
    }

    /// True once this node decided it must be re-seeded: it replicates nothing more.
    pub fn stopped(&self) -> bool {
        self.reported
    }

    /// A peer collected tombstones: new rows here must start above them too.
    pub fn raise_cl_floor(&self, floor: i64) {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            if let Ok(conn) = conn.lock() {
                if let Err(e) = retention::raise_cl_floor(&conn, floor) {
                    tracing::warn!("cannot raise cl_floor to {floor}: {e}");
                }
            }
        });
    }

    /// This node holds less than a peer collected: stop, and re-seed (or say how).
    pub fn reseed(
        &mut self,
        peer: std::net::SocketAddr,
        origin: SiteId,
        floor: i64,
        held: i64,
        db: &std::path::Path,
    ) {
        let reason = format!(
            "this node was away longer than sync.tombstone_retention ({:?}): peer {peer} \
             forgot deletes of origin {} up to version {floor}, and this node holds only \
             1..={held} of it, so it may keep rows those deletes removed",
            self.settings.tombstone_retention,
            hex::encode(origin)
        );
        self.stop_for_reseed(reason, db);
    }

    /// Logs why, shows it in health, and (with `sync.auto_reseed`) records the re-seed
    /// and has the node restart into it.
    fn stop_for_reseed(&mut self, reason: String, db: &std::path::Path) {
        if self.reported {
            return;
        }
        self.reported = true;
        let problem = if self.settings.auto_reseed {
            format!("{reason}; re-seeding from peers (the database is set aside first)")
        } else {
            format!(
                "{reason}; replication is stopped: stop the node, run `patina reseed --db-path {}` \
                 and start it again (or set sync.auto_reseed = true)",
                db.display()
            )
        };
        tracing::error!("{problem}");
        if let Ok(mut p) = self.metrics.sync_problem.write() {
            *p = Some(problem);
        }
        if !self.settings.auto_reseed {
            return;
        }
        let (conn, signal) = (self.conn.clone(), self.reseed.clone());
        tokio::task::spawn_blocking(move || {
            let stored = conn
                .lock()
                .map_err(|_| "the upkeep connection is unusable".to_string())
                .and_then(|c| retention::request_reseed(&c, &reason).map_err(|e| e.to_string()));
            match stored {
                Ok(()) => {
                    let _ = signal.send(true);
                }
                Err(e) => tracing::error!(
                    "cannot record that this node must be re-seeded ({e}); replication stays \
                     stopped: run `patina reseed` while the node is stopped"
                ),
            }
        });
    }

    /// This node and a peer each forgot deletes the other lacks.
    pub fn diverged(&mut self, peer: std::net::SocketAddr, site: SiteId, db: &std::path::Path) {
        let problem = format!(
            "diverged from peer {peer} (site {}): a partition outlasted \
             sync.tombstone_retention ({:?}) and each side forgot deletes the other never \
             received; nothing more is exchanged with it. Keep one side: on each node of the \
             other side, stop it, run `patina reseed --db-path {}` (or its own path) and \
             start it again",
            hex::encode(site),
            self.settings.tombstone_retention,
            db.display()
        );
        tracing::error!("{problem}");
        if let Ok(mut p) = self.metrics.sync_problem.write() {
            *p = Some(problem);
        }
    }
}
