//! The seam between the node core (db, net, sync, membership) and the HTTP API.
//!
//! The core builds one [`NodeShared`] at start and hands an `Arc` of it to the HTTP
//! layer. Everything the API needs from the running node goes through here, so `http/`
//! never reaches into `net/` or `sync/` directly.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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

/// Monotonic counters; the core increments, `GET /metrics` renders.
#[derive(Default, Debug)]
pub struct Metrics {
    pub changes_applied: AtomicU64,
    pub changes_broadcast: AtomicU64,
    pub units_received: AtomicU64,
    pub sync_rounds: AtomicU64,
    pub apply_queue_depth: AtomicU64,
    pub broadcast_queue_depth: AtomicU64,
    pub apply_latency_us_total: AtomicU64,
    pub apply_batches: AtomicU64,
    pub frames_rejected: AtomicU64,
    /// Changes and bytes of sync messages received off the wire, before any duplicate is
    /// dropped: the redundancy figures of BENCHMARKS.md divide these by what was needed.
    pub sync_changes_received: AtomicU64,
    pub sync_bytes_received: AtomicU64,
    /// QUIC connections to peers open right now (a gauge, sampled from the transport).
    pub peer_connections: AtomicU64,
    /// Background loops that keep failing make `/v1/health` answer 503.
    pub loops: Loops,
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
