//! The seam between the node core (db, net, sync, membership) and the HTTP API.
//!
//! The core builds one [`NodeShared`] at start and hands an `Arc` of it to the HTTP
//! layer. Everything the API needs from the running node goes through here, so `http/`
//! never reaches into `net/` or `sync/` directly.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

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
    /// Current membership as seen by SWIM.
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
    /// Failed attempts of the tailer to read the local feed (each retried).
    pub tailer_failures: AtomicU64,
    /// Failed apply transactions (each batch retried) and refused remote units.
    pub apply_failures: AtomicU64,
    /// Pulls this node could not answer (reading its feed failed).
    pub pull_serve_failures: AtomicU64,
    /// The tailer's last error; `None` once its latest attempt succeeded. With the counter
    /// this tells "failed once" from "keeps failing" (`/v1/health` answers 503 on the latter).
    pub tailer_error: Mutex<Option<String>>,
    /// The apply thread's last error; `None` once its latest batch committed with every
    /// job applied.
    pub apply_error: Mutex<Option<String>>,
    /// The pull server's last error; `None` once its latest answer was read.
    pub pull_serve_error: Mutex<Option<String>>,
}

impl Metrics {
    /// Records a failure of one loop: counts it and keeps its message as the latest error.
    pub fn record_failure(counter: &AtomicU64, slot: &Mutex<Option<String>>, error: String) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut e) = slot.lock() {
            *e = Some(error);
        }
    }

    /// Records that a loop's latest attempt succeeded: clears its latest error.
    pub fn record_success(slot: &Mutex<Option<String>>) {
        if let Ok(mut e) = slot.lock() {
            if e.is_some() {
                *e = None;
            }
        }
    }
}
