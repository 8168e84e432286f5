//! The sync driver: the one task that owns the [`Replicator`] state machine and performs its
//! effects against the transport, the feed reader and the apply thread.
//!
//! Everything that reaches the state machine passes through this loop — peer messages,
//! local units from the tailer, commit confirmations from the apply thread, the clock,
//! membership changes — so the machine itself needs no locks and no I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use crate::db::bookkeeping;
use crate::db::feed::{self, ChunkLimits};
use crate::db::tail::Unit;
use crate::membership::Membership;
use crate::net::{Channel, Incoming, Transport};
use crate::node::NodeShared;
use crate::staleness::{epoch_unix_ms, OriginRow, Report};
use crate::sync::seed::SeedOutcome;
use crate::sync::versions::{self, Decoded};
use crate::sync::{Applied, ApplyJob, Effect, Msg, OriginUnit, Replicator};

/// Outgoing messages queued per peer; a slow peer loses pushes (anti-entropy recovers
/// them), never blocks the others.
const PEER_QUEUE: usize = 256;

/// How often the staleness report is published (and at most how often its table is
/// written).
const STALENESS_EVERY: Duration = Duration::from_secs(1);

/// How often what the database holds is re-read (see `Replicator::reload_held`).
const HELD_REFRESH: Duration = Duration::from_secs(10);

/// Everything the driver works with.
pub struct Driver {
    pub sync: Replicator,
    pub transport: Transport,
    pub membership: Membership,
    pub incoming: mpsc::Receiver<Incoming>,
    pub units: mpsc::Receiver<Unit>,
    pub applied: mpsc::UnboundedReceiver<Applied>,
    pub apply_tx: crossbeam_channel::Sender<ApplyJob>,
    /// The read connection that serves pulls.
    pub reader: Arc<Mutex<Connection>>,
    pub limits: ChunkLimits,
    pub shared: Arc<NodeShared>,
    pub epoch: Instant,
    /// Tombstone collection, last-seen times, forgetting, re-seeding.
    pub upkeep: super::upkeep::Upkeep,
    /// The staleness table's writer (`db::staleness`): sent a report when it changed.
    pub staleness: crossbeam_channel::Sender<Vec<OriginRow>>,
    /// Snapshots made for joiners (`snapshots.rs`).
    pub snapshots: Arc<Mutex<super::snapshots::Snapshots>>,
}

impl Driver {
    /// Runs until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut peers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut membership_tick = tokio::time::interval(Duration::from_millis(250));
        membership_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Merges by other connections (an app's own sync code) change what is held too.
        let mut held_refresh = tokio::time::interval(HELD_REFRESH);
        held_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut upkeep_tick = tokio::time::interval(super::upkeep::UPKEEP_EVERY);
        upkeep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Staleness is published once a second (the table at most that often).
        let mut staleness_tick = tokio::time::interval(STALENESS_EVERY);
        staleness_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started_ms = epoch_unix_ms(crate::db::tail::unix_ms() as i64, self.epoch.elapsed());
        let mut sent: Option<Vec<OriginRow>> = None;
        loop {
            let deadline = tokio::time::Instant::from_std(self.epoch + self.sync.next_timeout());
            tokio::select! {
                _ = stop.changed() => break,
                inc = self.incoming.recv() => match inc {
                    Some(inc) => self.on_incoming(inc),
                    None => break,
                },
                Some(unit) = self.units.recv() => self.on_local_unit(unit),
                Some(a) = self.applied.recv() => {
                    let now = self.now();
                    if let Some(SeedOutcome::Installed { versions, .. }) = &a.seed {
                        // It counts as the versions it brought (what a feed would have
                        // carried); its bytes were counted as they arrived.
                        self.shared.metrics.sync_changes_received.inc_by(*versions);
                    }
                    self.sync.handle_applied(a, now);
                    for (took, bytes) in self.sync.take_finished_pulls() {
                        self.shared.metrics.observe_sync_round(took.as_secs_f64(), bytes as u64);
                    }
                }
                _ = held_refresh.tick() => self.reload_held(),
                                _ = upkeep_tick.tick() => {
                    let now = self.now();
                    self.upkeep.tick(&self.sync, now);
                    if let Ok(mut s) = self.snapshots.try_lock() {
                        s.expire();
                    }
                }
                Some(done) = self.upkeep.done_rx.recv() => self.upkeep.on_done(done, &mut self.sync),
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.sync.handle_timer(now);
                }
                _ = membership_tick.tick() => self.refresh_members(),
                _ = staleness_tick.tick() => self.publish_staleness(started_ms, &mut sent),
            }
            self.perform(&mut peers, &stop).await;
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Publishes the staleness report (health, status, metrics) and hands it to the
    /// table writer when it differs from the last one handed over. A full channel means
    /// the writer still has the previous report: this one is offered again next second.
    fn publish_staleness(&mut self, started_ms: i64, sent: &mut Option<Vec<OriginRow>>) {
        let rows: Vec<OriginRow> = self
            .sync
            .staleness(self.now())
            .iter()
            .map(|o| OriginRow::from_machine(o, started_ms))
            .collect();
        let now_ms = crate::db::tail::unix_ms() as i64;
        if sent.as_ref() != Some(&rows) && self.staleness.try_send(rows.clone()).is_ok() {
            *sent = Some(rows.clone());
        }
        let metrics = &self.shared.metrics;
        metrics
            .staleness
            .publish(Report { rows, started_ms }, now_ms);
        metrics.set_peer_versions(
            crate::net::accepted(self.transport.version()),
            &self.sync.peer_versions(),
        );
        let withheld = &metrics.sync_withheld;
        let stats = self.sync.stats();
        if stats.withheld > withheld.get() {
            withheld.inc_by(stats.withheld - withheld.get());
        }
    }

    /// A unit read by the tailer: this node's own writes in it are broadcast (what it
    /// merged travels from its origins, not from here).
    fn on_local_unit(&mut self, unit: Unit) {
        let now = self.now();
        if unit.own_to <= unit.own_from {
            return;
        }
        let site = self.sync.site();
        if unit.large {
            self.sync
                .handle_local_large_unit(unit.own_from, unit.own_to, now);
            return;
        }
        let changes: Vec<_> = unit
            .changes
            .into_iter()
            .filter(|c| c.site_id.as_slice() == site.as_slice())
            .collect();
        // Counted as broadcast only when some peer is alive to send to.
        let members = self.shared.members.read();
        let me = &self.shared.site_id_hex;
        let peers = members.map(|m| m.iter().any(|x| x.state == "alive" && &x.site_id != me));
        if peers.unwrap_or(false) {
            self.shared
                .metrics
                .changes_broadcast
                .inc_by(changes.len() as u64);
        }
        if self.sync.is_large(changes.len()) {
            self.sync
                .handle_local_large_unit(unit.own_from, unit.own_to, now);
            return;
        }
        self.sync.handle_local_unit(
            OriginUnit {
                origin: site,
                from: unit.own_from,
                to: unit.own_to,
                committed_ms: unit.read_ms,
                changes,
                schema: unit.schema,
            },
            now,
        );
    }

    fn reload_held(&mut self) {
        // Never wait for the reader here (it may be serving a long pull): skip a round.
        let held = match self.reader.try_lock() {
            Ok(conn) => bookkeeping::load_held(&conn),
            Err(_) => return,
        };
        match held {
            Ok(h) => self.sync.reload_held(h),
            Err(e) => tracing::warn!("cannot read what this node holds per origin: {e}"),
        }
    }

    fn on_incoming(&mut self, inc: Incoming) {
        match inc {
            // SWIM reaches membership straight from the transport (`Transport::route_swim`).
            Incoming::Datagram { .. } => {}
            Incoming::Message {
                from,
                peer,
                channel: Channel::Sync,
                payload,
                permit,
                version,
            } => {
                self.sync.note_version(from, version);
                let decoded = versions::decode(&payload, self.transport.version());
                // The decoded message is what stays; the frame's receive budget goes.
                drop(permit);
                match decoded {
                    Ok(Decoded::Unknown { kind }) => {
                        // A later release's message: ignored, the connection kept.
                        self.shared.metrics.sync_unknown_messages.inc();
                        tracing::debug!(
                            peer = %from,
                            "ignoring sync message kind {kind} from peer {from} (protocol \
                             version {version}; this node speaks {})",
                            self.transport.version()
                        );
                    }
                    Ok(Decoded::Known(msg)) => {
                        // Counted off the wire, before any duplicate is dropped.
                        let metrics = &self.shared.metrics;
                        metrics
                            .sync_messages_by_kind
                            .with_label_values(&[versions::kind_name(&msg)])
                            .inc();
                        metrics
                            .sync_changes_received
                            .inc_by(msg.change_count() as u64);
                        metrics.sync_bytes_received.inc_by(payload.len() as u64);
                        let kind = match &msg {
                            Msg::Unit { relay: true, .. } => "tree",
                            Msg::Unit { .. } | Msg::Repair { .. } => "repair",
                            _ => "pull",
                        };
                        if msg.change_count() > 0 {
                            metrics
                                .sync_changes_by_kind
                                .with_label_values(&[kind])
                                .inc_by(msg.change_count() as u64);
                        }

                        tracing::trace!(peer = %from, bytes = payload.len(), "sync: message received");
                        let now = self.now();
                        self.sync.handle_message(from, &peer.to_string(), msg, now);
                    }
                    Err(e) => {
                        self.shared.metrics.frames_rejected.inc();
                        tracing::warn!(peer = %from, "undecodable sync message from {from}: {e}");
                    }
                }
            }
            Incoming::Message {
                channel: Channel::Swim,
                ..
            } => {}
            // Pulls travel as messages both ways; a request here is a peer of another
            // version: dropping `reply` resets its stream, which it reports.
            Incoming::Request { from, .. } => {
                tracing::debug!(peer = %from, "ignoring a sync request (unsupported)");
            }
        }
    }

    fn refresh_members(&mut self) {
        let alive = self.membership.alive_peers();
        let now = self.now();
        let db = self.shared.db_path.clone();
        self.upkeep.on_alive(alive.iter().map(|m| m.site_id), &db);
        let alive_sites: Vec<_> = alive.iter().map(|m| m.site_id).collect();
        let superseded = self
            .sync
            .superseded(&self.upkeep.members_seen(), &alive_sites);
        self.upkeep.set_superseded(superseded);
        if self.upkeep.stopped() {
            self.sync.stop_replicating();
        }
        self.sync
            .set_peers(alive.iter().map(|m| (m.addr, m.site_id)), now);
        let members = self.membership.members();
        if let Ok(mut m) = self.shared.members.write() {
            *m = members;
        }
    }

    /// Performs every pending effect. Applying waits for room in the apply queue: while it
    /// is full this loop stops reading the network, which pushes back on the peers.
    async fn perform(
        &mut self,
        peers: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
        stop: &watch::Receiver<bool>,
    ) {
        while let Some(effect) = self.sync.poll_effect() {
            match effect {
                Effect::Send { to, msg } => {
                    let tx = peer_sender(peers, &self.transport, to);
                    if tx.try_send(msg.encode()).is_err() {
                        tracing::debug!(peer = %to, "peer queue full; message dropped (anti-entropy recovers)");
                    }
                }
                Effect::Serve {
                    to,
                    after,
                    unit,
                    exclude,
                    known,
                    seed,
                } => {
                    let tx = peer_sender(peers, &self.transport, to);
                    let reader = self.reader.clone();
                    let limits = self.limits;
                    let site = self.sync.site();
                    let metrics = self.shared.metrics.clone();
                    let snapshots = self.snapshots.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Some(ask) = seed {
                            let part = super::snapshots::part(&snapshots, ask, to);
                            match part {
                                Ok(p) => {
                                    let msg = Msg::Seed {
                                        site,
                                        id: p.id,
                                        offset: p.offset,
                                        total: p.total,
                                        bytes: p.bytes,
                                    };
                                    let _ = tx.blocking_send(msg.encode());
                                    return;
                                }
                                Err(e) if ask.offset == 0 => tracing::warn!(
                                    peer = %to,
                                    "cannot send a snapshot to joining peer {to} ({e}); \
                                     sending it the feed instead"
                                ),
                                Err(e) => {
                                    // Its pull times out and it catches up from feeds.
                                    tracing::warn!(peer = %to, "cannot go on sending a snapshot to {to}: {e}");
                                    return;
                                }
                            }
                        }
                        let chunk = match reader.lock() {
                            Ok(mut conn) => {
                                feed::serve_pull(&mut conn, after, unit, &exclude, &known, limits)
                                    .map_err(|e| e.to_string())
                            }
                            // A thread panicked holding the reader: every pull fails from
                            // now on, which health must show.
                            Err(_) => Err("the feed reader is unusable (a thread panicked \
                                           while holding it)"
                                .to_string()),
                        };
                        match chunk {
                            Ok(chunk) => {
                                metrics.loops.pull_server.succeeded();
                                let _ = tx.blocking_send(Msg::Changes { site, chunk }.encode());
                            }
                            Err(e) => {
                                let msg =
                                    format!("cannot serve a pull of peer {to} after {after}: {e}");
                                tracing::warn!(peer = %to, "{msg}");
                                metrics.loops.pull_server.failed(msg);
                            }
                        }
                    });
                }
                Effect::Bind { site, identity } => {
                    // Rare (once per site id ever seen); the binding is in force in memory
                    // already, this makes it survive a restart.
                    let reader = self.reader.clone();
                    tokio::task::spawn_blocking(move || {
                        let stored = match reader.lock() {
                            Ok(conn) => bookkeeping::bind_site(&conn, &site, &identity),
                            Err(_) => return,
                        };
                        if let Err(e) = stored {
                            tracing::error!(
                                site_id = %hex::encode(site),
                                "cannot store that site id {} is bound to {identity}: {e}",
                                hex::encode(site)
                            );
                        }
                    });
                }
                Effect::RaiseClFloor(floor) => self.upkeep.raise_cl_floor(floor),
                Effect::DropSeed => {
                    // A part still queued for the apply thread cannot re-create the file:
                    // only a snapshot's first part creates it (`db::apply`).
                    let path = crate::db::seed::incoming_file(&self.shared.db_path);
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => tracing::warn!(
                            "cannot remove the abandoned snapshot {}: {e}",
                            path.display()
                        ),
                    }
                }
                Effect::Reseed {
                    peer,
                    origin,
                    floor,
                    held,
                } => {
                    let db = self.shared.db_path.clone();
                    self.upkeep.reseed(peer, origin, floor, held, &db);
                }
                Effect::Diverged { peer, site } => {
                    let db = self.shared.db_path.clone();
                    self.upkeep.diverged(peer, site, &db);
                }
                Effect::Apply(job) => {
                    let mut job = job;
                    loop {
                        match self.apply_tx.try_send(job) {
                            Ok(()) => break,
                            Err(TrySendError::Full(j)) => {
                                job = j;
                                if *stop.borrow() {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err(TrySendError::Disconnected(_)) => return,
                        }
                    }
                    self.shared
                        .metrics
                        .apply_queue_depth
                        .set(self.apply_tx.len() as i64);
                }
            }
        }
        // The sync core counts rounds (summaries sent and catch-up pulls started); the
        // counter follows it.
        let rounds = &self.shared.metrics.sync_rounds;
        let stats = self.sync.stats();
        let sent = stats.summaries_sent + stats.pulls_sent;
        if sent > rounds.get() {
            rounds.inc_by(sent - rounds.get());
        }
        self.shared
            .metrics
            .sync_pulls_in_flight
            .set(self.sync.pulls_in_flight() as i64);
    }
}

/// The sender task of one peer: sends in order, one at a time.
fn peer_sender(
    peers: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    transport: &Transport,
    to: SocketAddr,
) -> mpsc::Sender<Vec<u8>> {
    if let Some(tx) = peers.get(&to) {
        if !tx.is_closed() {
            return tx.clone();
        }
    }
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PEER_QUEUE);
    let transport = transport.clone();
    tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if let Err(e) = transport.send(to, Channel::Sync, bytes).await {
                tracing::debug!(peer = %to, "sync send failed: {e}");
            }
        }
    });
    peers.insert(to, tx.clone());
    tx
}
