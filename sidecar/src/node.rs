//! The seam between the node core (db, net, sync, membership) and the HTTP API.
//!
//! The core builds one [`NodeShared`] at start and hands an `Arc` of it to the HTTP
//! layer. Everything the API needs from the running node goes through here, so `http/`
//! never reaches into `net/` or `sync/` directly.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::sync::{watch, Notify};

/// What a running node shares with its HTTP API.
pub struct NodeShared {
    /// The database file (WAL mode).
    pub db_path: PathBuf,
    /// `libpatina.so`, loaded into every connection with entry point `sqlite3_patina_init`.
    pub extension_path: PathBuf,
    /// This node's 16-byte site id (`crsql_site_id()`), hex for display.
    pub site_id_hex: String,
    /// Latest local `crsql_db_version()` the core has observed (local commits, merges and
    /// writes by other processes alike). Subscriptions wait on this to re-evaluate.
    pub db_version: watch::Receiver<i64>,
    /// The `(table, key)` pairs every read of the local feed touched (local commits by
    /// any process and merged remote changes alike): subscriptions match on these.
    pub touched: Arc<crate::db::touched::TouchedHub>,
    /// Poke after the API commits a write so the tailer ships it at once instead of
    /// waiting for the `data_version` poll.
    pub local_write: Arc<Notify>,
    /// This node's gossip (QUIC) address, for listing itself among the members; `None`
    /// where no transport runs (API-only test nodes).
    pub gossip_addr: Option<std::net::SocketAddr>,
    /// Current membership as seen by SWIM (this node not included).
    pub members: Arc<RwLock<Vec<MemberInfo>>>,
    /// Counters rendered by `GET /metrics`.
    pub metrics: Arc<Metrics>,
    /// `db.synchronous`: the API's writer commits with the durability the operator chose.
    pub synchronous: crate::config::Synchronous,
    /// Schema files re-applied by `POST /v1/reload` (`patina reload`).
    pub schema_paths: Vec<PathBuf>,
    /// Re-applies schema files on demand; returns the tables made replicated.
    pub reload: Arc<dyn Fn() -> Result<Vec<String>, String> + Send + Sync>,
}

/// One member of the cluster as the API reports it (`GET /v1/members`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberInfo {
    /// Hex site id of the member.
    pub site_id: String,
    /// Gossip (QUIC) address.
    pub addr: String,
    /// `alive`, `suspect` or `down`.
    pub state: String,
    /// Last measured round-trip time in milliseconds, if any.
    pub rtt_ms: Option<f64>,
}

/// The node's metrics: the core records, `GET /metrics` renders (Prometheus text, through
/// the `prometheus` crate's registry and encoder).
///
/// Counters and gauges keep the names `/metrics` has always had; the histograms are what
/// operators graph (`docs/grafana/patina.json`). Values that only exist at scrape time
/// (membership, loop health, db_version) are added by the HTTP layer when it renders.
pub struct Metrics {
    registry: Registry,
    /// `patina_changes_applied_total`: remote changes merged into this node.
    pub changes_applied: IntCounter,
    /// `patina_changes_broadcast_total`: local changes pushed to peers.
    pub changes_broadcast: IntCounter,
    /// `patina_units_received_total`: change units received from peers.
    pub units_received: IntCounter,
    /// `patina_sync_rounds_total`: anti-entropy rounds run.
    pub sync_rounds: IntCounter,
    /// `patina_apply_queue_depth`: units waiting to be applied.
    pub apply_queue_depth: IntGauge,
    /// `patina_broadcast_queue_depth`: units waiting to be broadcast.
    pub broadcast_queue_depth: IntGauge,
    /// `patina_frames_rejected_total`: frames refused (corrupt, oversized, wrong cluster).
    pub frames_rejected: IntCounter,
    /// `patina_sync_changes_received_total` / `patina_sync_bytes_received_total`: changes
    /// and bytes of sync messages received off the wire, before any duplicate is dropped
    /// (the redundancy figures of BENCHMARKS.md divide these by what was needed).
    pub sync_changes_received: IntCounter,
    pub sync_bytes_received: IntCounter,
    /// `patina_sync_changes_received_by_kind_total{kind}`: the same changes by the message
    /// that carried them: `tree` (broadcast), `repair` (answer to a summary), `pull`
    /// (catch-up): where redundancy comes from.
    pub sync_changes_by_kind: IntCounterVec,
    /// `patina_peer_connections`: QUIC connections to peers open now (idle ones close).
    pub peer_connections: IntGauge,
    /// `patina_sync_pulls_in_flight`: catch-up pulls this node has running now.
    pub sync_pulls_in_flight: IntGauge,
    /// `patina_apply_batch_seconds`: time to merge and commit one batch of remote units.
    /// Its sum and count are also rendered as the older `patina_apply_latency_seconds`.
    pub apply_batch: Histogram,
    /// `patina_commit_to_applied_seconds`: origin commit (wall clock of the origin) to the
    /// merge committing here (wall clock of this node). Clock skew between the two shifts
    /// every sample by the skew; negative differences are recorded as 0.
    pub commit_to_applied: Histogram,
    /// `patina_sync_round_seconds`: one anti-entropy round, request to last reply.
    pub sync_round: Histogram,
    /// `patina_sync_round_bytes`: bytes received in one anti-entropy round.
    pub sync_round_bytes: Histogram,
    /// `patina_subscription_evaluations_total`: subscription queries run (a whole query
    /// or a query restricted to changed keys), each counted once.
    pub subscription_evaluations: IntCounter,
    /// `patina_subscription_event_seconds`: a change noticed by the node (commit seen by the
    /// tailer, the API writer or the merge) to its subscription event sent.
    pub subscription_event: Histogram,
    /// `patina_tombstones_collected_total`: clock rows of deleted rows removed
    /// (`db::retention`).
    pub tombstones_collected: IntCounter,
    /// `patina_members_forgotten_total`: departed members whose metadata was dropped.
    pub members_forgotten: IntCounter,
    /// Background loops that keep failing make `/v1/health` answer 503.
    pub loops: Loops,
    /// Set when replication stopped for a reason only an operator or a re-seed clears
    /// (this node was away too long, or diverged from a peer): `/v1/health` answers 503
    /// with it.
    pub sync_problem: std::sync::RwLock<Option<String>>,
    /// The schema buffer and this node's schema fingerprint (`db::buffer`).
    pub schema: crate::db::buffer::SchemaMetrics,
    /// The last staleness report and its per-origin gauges (`patina_origin_*`).
    pub staleness: crate::staleness::Published,
    /// `patina_protocol_version`: the sync protocol version this node speaks.
    pub protocol_version: IntGauge,
    /// `patina_peers_by_protocol_version{version}`: peers by the version their frames
    /// carry (a rolling upgrade in progress shows two).
    pub peers_by_version: IntGaugeVec,
    /// `patina_sync_unknown_messages_total`: sync messages of a kind this node does not
    /// know (a later release's), ignored.
    pub sync_unknown_messages: IntCounter,
    /// `patina_sync_messages_withheld_total`: messages not sent to a peer because its
    /// protocol version lacks their kind.
    pub sync_withheld: IntCounter,
    /// `patina_sync_messages_received_total{kind}`: sync messages received and decoded,
    /// by kind (the message mix; a later release's kinds show up here once spoken).
    pub sync_messages_by_kind: IntCounterVec,
}

/// Latency buckets (seconds) shared by the latency histograms: 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Byte buckets of `patina_sync_round_bytes`: 256 B to 64 MiB, ×4 each.
const BYTE_BUCKETS: &[f64] = &[
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric names are constant and valid");
            register(&registry, Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric names are constant and valid");
            register(&registry, Box::new(g.clone()));
            g
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("metric names and buckets are constant and valid");
            register(&registry, Box::new(h.clone()));
            h
        };
        Metrics {
            changes_applied: counter(
                "patina_changes_applied_total",
                "Remote changes merged into this node.",
            ),
            changes_broadcast: counter(
                "patina_changes_broadcast_total",
                "Local changes pushed to peers.",
            ),
            units_received: counter(
                "patina_units_received_total",
                "Change units received from peers.",
            ),
            sync_rounds: counter("patina_sync_rounds_total", "Anti-entropy rounds run."),
            tombstones_collected: counter(
                "patina_tombstones_collected_total",
                "Clock rows of deleted rows removed once no replica can need them.",
            ),
            members_forgotten: counter(
                "patina_members_forgotten_total",
                "Departed members whose cursors, ranges and membership rows were dropped.",
            ),
            frames_rejected: counter(
                "patina_frames_rejected_total",
                "Frames refused (corrupt, oversized, wrong cluster).",
            ),
            sync_changes_received: counter(
                "patina_sync_changes_received_total",
                "Changes received in sync messages off the wire, duplicates included.",
            ),
            sync_bytes_received: counter(
                "patina_sync_bytes_received_total",
                "Bytes of sync messages received off the wire, duplicates included.",
            ),
            sync_changes_by_kind: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "patina_sync_changes_received_by_kind_total",
                        "Changes received off the wire by carrier: tree, repair or pull.",
                    ),
                    &["kind"],
                )
                .expect("metric names are constant and valid");
                register(&registry, Box::new(v.clone()));
                v
            },
            peer_connections: gauge(
                "patina_peer_connections",
                "QUIC connections to peers open now (idle ones are closed).",
            ),
            sync_pulls_in_flight: gauge(
                "patina_sync_pulls_in_flight",
                "Catch-up pulls of peers' feeds running now.",
            ),
            apply_queue_depth: gauge("patina_apply_queue_depth", "Units waiting to be applied."),
            broadcast_queue_depth: gauge(
                "patina_broadcast_queue_depth",
                "Units waiting to be broadcast.",
            ),
            apply_batch: histogram(
                "patina_apply_batch_seconds",
                "Time to merge and commit one batch of remote changes.",
                LATENCY_BUCKETS,
            ),
            commit_to_applied: histogram(
                "patina_commit_to_applied_seconds",
                "Origin commit to merged here, by the two nodes' wall clocks (skew shifts it).",
                LATENCY_BUCKETS,
            ),
            sync_round: histogram(
                "patina_sync_round_seconds",
                "Duration of one anti-entropy round.",
                LATENCY_BUCKETS,
            ),
            sync_round_bytes: histogram(
                "patina_sync_round_bytes",
                "Bytes received in one anti-entropy round.",
                BYTE_BUCKETS,
            ),
            subscription_evaluations: counter(
                "patina_subscription_evaluations_total",
                "Subscription queries run (whole, or restricted to changed keys).",
            ),
            subscription_event: histogram(
                "patina_subscription_event_seconds",
                "Change noticed by the node to its subscription event sent.",
                LATENCY_BUCKETS,
            ),
            loops: Loops::default(),
            sync_problem: std::sync::RwLock::new(None),
            schema: crate::db::buffer::SchemaMetrics::new(&registry),
            staleness: crate::staleness::Published::new(&registry),
            protocol_version: gauge(
                "patina_protocol_version",
                "The sync protocol version this node speaks.",
            ),
            peers_by_version: {
                let v = IntGaugeVec::new(
                    Opts::new(
                        "patina_peers_by_protocol_version",
                        "Peers by the protocol version of their frames.",
                    ),
                    &["version"],
                )
                .expect("metric names are constant and valid");
                register(&registry, Box::new(v.clone()));
                v
            },
            sync_unknown_messages: counter(
                "patina_sync_unknown_messages_total",
                "Sync messages of a kind this node does not know (a later release's), ignored.",
            ),
            sync_messages_by_kind: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "patina_sync_messages_received_total",
                        "Sync messages received and decoded, by kind.",
                    ),
                    &["kind"],
                )
                .expect("metric names are constant and valid");
                register(&registry, Box::new(v.clone()));
                v
            },
            sync_withheld: counter(
                "patina_sync_messages_withheld_total",
                "Messages not sent to a peer whose protocol version lacks their kind.",
            ),
            registry,
        }
    }
}

/// Registers one collector; the names are constant and distinct, so a refusal is a bug
/// worth a log line, not a reason to stop the node.
fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = registry.register(c) {
        tracing::error!("cannot register a metric: {e}");
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Records one origin-commit → merged-here latency. Clocks of two machines: a sample
    /// below zero (this node's clock behind the origin's) is recorded as 0.
    pub fn observe_commit_to_applied(&self, seconds: f64) {
        self.commit_to_applied.observe(seconds.max(0.0));
    }

    /// Records one anti-entropy round: its duration and the bytes it received.
    pub fn observe_sync_round(&self, seconds: f64, bytes: u64) {
        self.sync_round.observe(seconds.max(0.0));
        self.sync_round_bytes.observe(bytes as f64);
    }

    /// Records one applied batch of remote changes.
    pub fn observe_apply_batch(&self, elapsed: Duration) {
        self.apply_batch.observe(elapsed.as_secs_f64());
    }

    /// Everything registered, for the `/metrics` encoder.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Sets `patina_peers_by_protocol_version` from `counts` (version, peers), one series
    /// per version in `accepted` (0 when no peer speaks it): a bounded, stable set of
    /// series (frames of other versions are refused, so no peer is counted there).
    pub fn set_peer_versions(
        &self,
        accepted: std::ops::RangeInclusive<u16>,
        counts: &[(u16, usize)],
    ) {
        for v in accepted {
            let n = counts
                .iter()
                .find(|(cv, _)| *cv == v)
                .map_or(0, |(_, n)| *n);
            self.peers_by_version
                .with_label_values(&[v.to_string().as_str()])
                .set(n as i64);
        }
    }
}

/// How long a background loop must keep failing before `GET /v1/health` calls the node
/// unhealthy: long enough that one retried hiccup (a busy database, a peer that went away
/// mid-reply) does not flap a load balancer, short enough that a stuck loop is seen.
pub const FAILING_FOR: Duration = Duration::from_secs(5);

/// The state of one background loop (tailer, apply, pull server) as health reports it.
///
/// The loops retry forever, so a failure that keeps coming back is invisible in the log
/// rate alone; this records when the current run of failures began and its last error,
/// and is cleared by the next success.
#[derive(Debug, Default)]
pub struct LoopHealth {
    /// Failures ever, for `/metrics`.
    pub failures: AtomicU64,
    current: Mutex<Option<Failing>>,
}

#[derive(Debug, Clone)]
struct Failing {
    since: Instant,
    streak: u64,
    last_error: String,
}

/// A loop that has been failing for a while: what health says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    pub failing_for: Duration,
    pub streak: u64,
    pub last_error: String,
}

impl LoopHealth {
    /// Records a failed attempt.
    pub fn failed(&self, error: impl std::fmt::Display) {
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match cur.as_mut() {
            Some(f) => {
                f.streak += 1;
                f.last_error = error.to_string();
            }
            None => {
                *cur = Some(Failing {
                    since: Instant::now(),
                    streak: 1,
                    last_error: error.to_string(),
                })
            }
        }
    }

    /// Records a successful attempt: the loop is healthy again.
    pub fn succeeded(&self) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.is_some() {
            *cur = None;
        }
    }

    /// The current run of failures if it has lasted at least `threshold`.
    pub fn stuck(&self, now: Instant, threshold: Duration) -> Option<Stuck> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let f = cur.as_ref()?;
        let failing_for = now.saturating_duration_since(f.since);
        (failing_for >= threshold).then(|| Stuck {
            failing_for,
            streak: f.streak,
            last_error: f.last_error.clone(),
        })
    }
}

/// The background loops whose persistent failure makes the node unhealthy.
#[derive(Debug, Default)]
pub struct Loops {
    /// Reads the local change feed and hands units to broadcast.
    pub tailer: LoopHealth,
    /// Merges remote units into the database.
    pub apply: LoopHealth,
    /// Answers peers' pulls from the local feed.
    pub pull_server: LoopHealth,
}

impl Loops {
    /// `(name, state)` of each loop, in a fixed order for health and metrics.
    pub fn each(&self) -> [(&'static str, &LoopHealth); 3] {
        [
            ("tailer", &self.tailer),
            ("apply", &self.apply),
            ("pull_server", &self.pull_server),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_stuck_only_after_failing_for_the_threshold_and_clears_on_success() {
        let h = LoopHealth::default();
        let t0 = Instant::now();
        assert_eq!(h.stuck(t0, Duration::ZERO), None);
        h.failed("disk I/O error");
        h.failed("disk full");
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(h.stuck(Instant::now(), Duration::from_secs(5)), None);
        let s = h
            .stuck(later, Duration::from_secs(5))
            .expect("stuck after 10 s");
        assert_eq!(s.streak, 2);
        assert_eq!(s.last_error, "disk full");
        h.succeeded();
        assert_eq!(h.stuck(later, Duration::ZERO), None);
        assert_eq!(h.failures.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
