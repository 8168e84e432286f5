//! A running node: wires the database threads, the transport, membership, the sync driver
//! and the HTTP API together, and takes them down in order on shutdown.
//!
//! # Layout
//! - `mod.rs`    — [`run`]: validate, open, apply schema, start everything, shut down.
//! - `driver.rs` — the task that owns the sync state machine and performs its effects.
//! - `upkeep.rs` — bounded metadata: tombstone collection, forgetting, re-seeding.
//! - `snapshots.rs` — snapshots made for joiners, served part by part.

mod driver;
mod snapshots;
mod upkeep;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::{Config, ConfigError};
use crate::db::{self, apply, bookkeeping, feed, schema, tail, DbError};
use crate::membership::{MemberId, Membership};
use crate::net::{NetConfig, NetError, TlsFiles, Transport, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use crate::node::{Metrics, NodeShared};
use crate::sync::{Replicator, SyncConfig};

/// Remote chunks waiting for the apply thread. Full means the network side stops reading.
const APPLY_QUEUE: usize = 16;

/// Why a node could not start or stopped abnormally. Each names the thing that failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("schema ({paths}): {source}")]
    Schema {
        paths: String,
        source: schema::SchemaError,
    },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("re-seeding: {0}")]
    Reseed(#[from] db::retention::RetentionError),
    #[error(transparent)]
    Claim(#[from] crate::claim::ClaimError),
    #[error("cannot resolve gossip.bootstrap entry {entry:?}: {reason}")]
    Bootstrap { entry: String, reason: String },
    #[error("cannot bind the HTTP API on {addr}: {source}")]
    ApiBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP API: {0}")]
    Http(#[from] crate::http::HttpError),
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    /// `PATINA_TEST_RELEASE_AHEAD` is set to something that is not a small number.
    #[error(
        "{TEST_RELEASE_AHEAD}={value:?} is not a number of releases 0..=9 (a test-only \
         setting: unset it)"
    )]
    TestRelease { value: String },
}

/// Test-only: makes this node behave as a release that many protocol versions ahead of
/// this build (`net::envelope::PROTOCOL_VERSION` + N): its frames carry that version, it
/// accepts the versions around it, and it uses the message kinds of that version
/// (`Msg::Heard` from version 4 on). This is how the rolling-upgrade tests run a mixed
/// cluster of the current release and the next one (N = 1), and a peer two versions
/// apart (N = 2), from one build. Never set it in production.
pub const TEST_RELEASE_AHEAD: &str = "PATINA_TEST_RELEASE_AHEAD";

/// The protocol version this node speaks: [`PROTOCOL_VERSION`], unless
/// [`TEST_RELEASE_AHEAD`] is set.
fn protocol_version() -> Result<u16, AgentError> {
    let Ok(value) = std::env::var(TEST_RELEASE_AHEAD) else {
        return Ok(PROTOCOL_VERSION);
    };
    let ahead: u16 = value
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= 9)
        .ok_or_else(|| AgentError::TestRelease {
            value: value.clone(),
        })?;
    if ahead > 0 {
        tracing::warn!(
            "TEST ONLY ({TEST_RELEASE_AHEAD}={ahead}): this node simulates a release {ahead} \
             ahead and speaks protocol version {}",
            PROTOCOL_VERSION + ahead
        );
    }
    Ok(PROTOCOL_VERSION + ahead)
}

/// How often a node that found its disk full at start tries again.
const DISK_FULL_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `e` (or any error beneath it) is SQLite's "database or disk is full".
fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = err.downcast_ref::<rusqlite::Error>() {
            if f.code == rusqlite::ErrorCode::DiskFull {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// How a run of the node ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `shutdown` resolved (or the API stopped).
    Stopped,
    /// The node learned it must be re-seeded and recorded it: it stopped in order, and
    /// the caller starts it again (the CLI re-executes itself, so every socket and
    /// thread of this run is gone), re-seeding first.
    Reseed,
}

/// Runs a node until `shutdown` resolves, then stops accepting API requests, lets the
/// apply thread finish its current batch, leaves the cluster and closes the transport.
/// A node that learns it must be re-seeded (`db::retention`) stops the same way and
/// returns [`Outcome::Reseed`]; its next start re-seeds. `restart`: this start follows
/// such a stop (its ports may take a moment to free).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    restart: bool,
) -> Result<Outcome, AgentError> {
    let mut shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(shutdown);
    run_once(config, &mut shutdown, restart).await
}

async fn run_once(
    config: Config,
    shutdown: &mut Pin<Box<dyn Future<Output = ()> + Send>>,
    restart: bool,
) -> Result<Outcome, AgentError> {
    let insecure = config.validate()?;
    if insecure {
        tracing::warn!(
            gossip = %config.gossip.addr,
            "gossip is UNAUTHENTICATED: no gossip.tls files are set, so any process that can \
             reach {} can join and write; set gossip.tls.{{ca_file,cert_file,key_file}} \
             (see `patina tls`) outside a single machine",
            config.gossip.addr
        );
    }
    // The ports (and TLS files, and bootstrap names) first, then the claim, then the
    // database: a busy port, a bad TLS file or a database held by another process fails
    // the start before any file is created or opened.
    let mut attempts = 0;
    let listener = loop {
        match tokio::net::TcpListener::bind(config.api.addr).await {
            Ok(l) => break l,
            Err(e) if restart && attempts < 60 && addr_in_use(&e) => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(source) => {
                return Err(AgentError::ApiBind {
                    addr: config.api.addr,
                    source,
                })
            }
        }
    };
    let max_frame = DEFAULT_MAX_FRAME;
    let tls = &config.gossip.tls;
    let tls = match (&tls.ca_file, &tls.cert_file, &tls.key_file) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
            ca_file: ca.clone(),
            cert_file: cert.clone(),
            key_file: key.clone(),
        }),
        _ => None,
    };
    let speaks = protocol_version()?;
    // After a re-seed the process re-executes itself; the previous image's socket may
    // take a moment to be released, as for the API listener above.
    let mut attempts = 0;
    let (transport, incoming) = loop {
        let bound = Transport::bind_as(
            NetConfig {
                bind: config.gossip.addr,
                cluster_id: config.gossip.cluster_id,
                tls: tls.clone(),
                max_frame_bytes: max_frame,
            },
            speaks,
        )
        .await;
        match bound {
            Err(NetError::Bind { ref error, .. })
                if restart && attempts < 60 && addr_in_use(error) =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other?,
        }
    };
    let bootstrap = resolve_bootstrap(&config.gossip.bootstrap).await?;
    let path = config.db.path.clone();
    let _claim = crate::claim::Claim::acquire(&path, "patina agent")?;
    let sql_err = |source| AgentError::Sqlite {
        path: path.clone(),
        source,
    };
    let ext = db::extension_path(config.db.extension_path.as_deref())?;
    let level = config.db.synchronous;
    let schema_paths = crate::http::migrations::schema_paths(&config.db.schema_paths, &path);
    // A full disk at start is waited out rather than exiting: a supervisor would restart
    // the node into the same failure again and again, while a node that waits starts by
    // itself once space is freed (and still stops at once on SIGTERM).
    let (setup, tables) = loop {
        let attempt = (|| {
            let mut setup = db::open(&path, &ext, level)?;
            bookkeeping::ensure(&setup).map_err(sql_err)?;
            db::staleness::ensure(&setup).map_err(sql_err)?;
            let tables =
                schema::apply(&mut setup, &schema_paths).map_err(|source| AgentError::Schema {
                    paths: schema::describe(&schema_paths),
                    source,
                })?;
            Ok::<_, AgentError>((setup, tables))
        })();
        match attempt {
            Ok(ready) => break ready,
            Err(e) if is_disk_full(&e) => {
                tracing::error!(
                    db = %path.display(),
                    "cannot start: the disk holding {} is full ({e}); retrying every {} s \
                     until space is freed",
                    path.display(),
                    DISK_FULL_RETRY.as_secs()
                );
                tokio::select! {
                    _ = shutdown.as_mut() => return Ok(Outcome::Stopped),
                    _ = tokio::time::sleep(DISK_FULL_RETRY) => {}
                }
            }
            Err(e) => return Err(e),
        }
    };
    let mut setup = setup;
    if let Some(reason) = db::retention::pending_reseed(&setup).map_err(sql_err)? {
        tracing::warn!("re-seeding this node: {reason}");
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let copy = db::retention::reseed(&mut setup, &path, now_s)?;
        tracing::warn!(
            copy = %copy.display(),
            "re-seeded: the replicated tables are empty and this node has a fresh site id; it \
             fills up from its peers. The database as it was is kept in {}",
            copy.display()
        );
    }
    let site = feed::site_id(&setup).map_err(sql_err)?;
    let cursors = bookkeeping::load_cursors(&setup).map_err(sql_err)?;
    let held = bookkeeping::load_held(&setup).map_err(sql_err)?;
    let bindings = bookkeeping::load_bindings(&setup).map_err(sql_err)?;
    let collected = db::retention::load_collected(&setup).map_err(sql_err)?;
    let cl_floor = db::retention::cl_floor(&setup).map_err(sql_err)?;
    let seen = db::retention::load_seen(&setup).map_err(sql_err)?;
    let last_contact = db::retention::flag(&setup, "last_contact")
        .map_err(sql_err)?
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    // The apply thread reports the buffer again after its first look at it.
    let buffered = db::buffer::held(&setup).unwrap_or_else(|e| {
        tracing::warn!("cannot read the schema buffer: {e}");
        Default::default()
    });
    let version = feed::db_version(&setup).map_err(sql_err)?;
    let holds_nothing = db::seed::holds_nothing(&setup).map_err(sql_err)?;
    let removed = db::seed::remove_leftovers(&path);
    if removed > 0 {
        tracing::info!("removed {removed} snapshot file(s) left by an earlier run");
    }
    drop(setup);
    tracing::info!(
        db = %path.display(),
        site_id = %hex::encode(site),
        db_version = version,
        tables = ?tables,
        extension = %ext.display(),
        "database ready"
    );

    let stop_threads = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::default());
    metrics.protocol_version.set(i64::from(speaks));
    let (version_tx, version_rx) = watch::channel(version);
    let touched = Arc::new(crate::db::touched::TouchedHub::default());
    let (wake_tx, wake_rx) = crossbeam_channel::bounded::<()>(1);
    let (unit_tx, unit_rx) = mpsc::channel(16);
    let tail_thread = tail::spawn(
        db::open(&path, &ext, level)?,
        wake_rx,
        unit_tx,
        version_tx,
        stop_threads.clone(),
        SyncConfig::default().max_chunk_changes as i64,
        metrics.clone(),
        touched.clone(),
    )
    .map_err(|source| AgentError::Thread {
        what: "tail",
        source,
    })?;
    let (apply_tx, apply_rx) = crossbeam_channel::bounded(APPLY_QUEUE);
    let (applied_tx, applied_rx) = mpsc::unbounded_channel();
    let apply_thread = apply::spawn(
        db::open(&path, &ext, level)?,
        site,
        apply_rx,
        applied_tx,
        metrics.clone(),
        stop_threads.clone(),
    )
    .map_err(|source| AgentError::Thread {
        what: "apply",
        source,
    })?;
    let reader = Arc::new(Mutex::new(db::open(&path, &ext, level)?));
    // The latest staleness report, if the writer has not taken the previous one yet.
    let (staleness_tx, staleness_rx) = crossbeam_channel::bounded(1);
    let staleness_thread = db::staleness::spawn(
        // A lost staleness write costs nothing (the next second rewrites it): no fsync
        // per write even with db.synchronous = full.
        db::open(&path, &ext, crate::config::Synchronous::Normal)?,
        staleness_rx,
        stop_threads.clone(),
    )
    .map_err(|source| AgentError::Thread {
        what: "staleness",
        source,
    })?;

    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let me = MemberId {
        addr: transport.local_addr(),
        site_id: site,
        incarnation,
    };
    let membership = Membership::start(transport.clone(), me, bootstrap).map_err(|source| {
        AgentError::Thread {
            what: "membership",
            source,
        }
    })?;

    let local_write = Arc::new(Notify::new());
    {
        // Bridge the API's async poke to the tailer's blocking wait.
        let local_write = local_write.clone();
        tokio::spawn(async move {
            loop {
                local_write.notified().await;
                let _ = wake_tx.try_send(());
            }
        });
    }
    let reload_paths = config.db.schema_paths.clone();
    let (reload_db, reload_ext) = (path.clone(), ext.clone());
    let reload: Arc<dyn Fn() -> Result<Vec<String>, String> + Send + Sync> = Arc::new(move || {
        let mut conn = db::open(&reload_db, &reload_ext, level).map_err(|e| e.to_string())?;
        let paths = crate::http::migrations::schema_paths(&reload_paths, &reload_db);
        schema::apply(&mut conn, &paths).map_err(|e| e.to_string())
    });
    let shared = Arc::new(NodeShared {
        db_path: path.clone(),
        extension_path: ext.clone(),
        site_id_hex: hex::encode(site),
        db_version: version_rx,
        touched,
        local_write,
        members: Arc::new(RwLock::new(Vec::new())),
        metrics: metrics.clone(),
        synchronous: level,
        schema_paths: config.db.schema_paths.clone(),
        gossip_addr: Some(transport.local_addr()),
        reload,
    });

    let api_addr = listener.local_addr().unwrap_or(config.api.addr);
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        // Samples the transport's connection count for `patina_peer_connections`, and
        // adds the frames it refused (bad version, wrong cluster, corrupt, oversized) to
        // `patina_frames_rejected_total`.
        let (transport, metrics, mut stop) = (transport.clone(), metrics.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut rejected = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        metrics
                            .peer_connections
                            .set(i64::try_from(transport.peer_connections()).unwrap_or(i64::MAX));
                        let now = transport.frames_rejected();
                        metrics.frames_rejected.inc_by(now.saturating_sub(rejected));
                        rejected = rejected.max(now);
                    }
                    _ = stop.changed() => return,
                }
            }
        });
    }
    let api_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let api = tokio::spawn(crate::http::serve(
        listener,
        shared.clone(),
        config.api.clone(),
        api_stop,
    ));

    let epoch = Instant::now();
    let sync_config = SyncConfig {
        max_chunk_bytes: (max_frame / 4).min(4 * 1024 * 1024),
        tombstone_retention: config.sync.tombstone_retention,
        protocol: speaks,
        ..SyncConfig::default()
    };
    let limits = feed::ChunkLimits {
        max_changes: sync_config.max_chunk_changes,
        max_bytes: sync_config.max_chunk_bytes,
    };
    let mut sync = Replicator::new(
        site,
        sync_config,
        cursors,
        held,
        StdRng::from_entropy(),
        Duration::ZERO,
    );
    sync.set_bindings(bindings);
    sync.set_seedable(config.sync.seed_from_snapshot && holds_nothing);
    sync.set_collected(collected, cl_floor);
    let (reseed_tx, mut reseed_rx) = watch::channel(false);
    let upkeep = upkeep::Upkeep::new(
        db::open(&path, &ext, level)?,
        config.sync.clone(),
        seen,
        last_contact,
        reseed_tx,
        metrics.clone(),
    );
    sync.set_buffered(buffered);
    let driver = driver::Driver {
        sync,
        transport: transport.clone(),
        membership: membership.clone(),
        incoming,
        units: unit_rx,
        applied: applied_rx,
        apply_tx,
        reader,
        limits,
        shared: shared.clone(),
        epoch,
        upkeep,
        staleness: staleness_tx,
        snapshots: Arc::new(std::sync::Mutex::new(snapshots::Snapshots::new(
            path.clone(),
            limits.max_bytes,
        ))),
    };
    let driver = tokio::spawn(driver.run(stop_rx));
    let mut outcome = Outcome::Stopped;
    tracing::info!(
        api = %api_addr,
        gossip = %transport.local_addr(),
        site_id = %hex::encode(site),
        protocol_version = speaks,
        "patina node running"
    );

    tokio::select! {
        _ = shutdown.as_mut() => tracing::info!("shutting down"),
        _ = reseed_rx.wait_for(|r| *r) => {
            outcome = Outcome::Reseed;
            tracing::warn!("stopping to re-seed");
        }
        r = &mut Box::pin(wait_api(api)) => {
            // The API stopped on its own: an error; take the node down with it.
            stop_threads.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
            return r.map(|()| Outcome::Stopped);
        }
    }
    let _ = stop_tx.send(true);
    let _ = driver.await;
    stop_threads.store(true, Ordering::SeqCst);
    // The apply thread finishes its current batch (one transaction) before it exits.
    let _ = tokio::task::spawn_blocking(move || {
        let _ = apply_thread.join();
        let _ = tail_thread.join();
        let _ = staleness_thread.join();
    })
    .await;
    membership.leave().await;
    transport.close().await;
    tracing::info!("stopped");
    Ok(outcome)
}

/// "Address already in use".
fn addr_in_use(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrInUse
}

async fn wait_api(
    api: tokio::task::JoinHandle<Result<(), crate::http::HttpError>>,
) -> Result<(), AgentError> {
    match api.await {
        Ok(r) => r.map_err(AgentError::from),
        Err(e) => {
            tracing::error!("HTTP API task failed: {e}");
            Ok(())
        }
    }
}

async fn resolve_bootstrap(entries: &[String]) -> Result<Vec<SocketAddr>, AgentError> {
    let mut out = Vec::new();
    for e in entries {
        let addrs =
            tokio::net::lookup_host(e.as_str())
                .await
                .map_err(|err| AgentError::Bootstrap {
                    entry: e.clone(),
                    reason: err.to_string(),
                })?;
        out.extend(addrs.take(1));
    }
    Ok(out)
}

#[cfg(test)]
mod disk_full_tests {
    use super::*;

    fn sqlite(code: std::os::raw::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn a_full_disk_is_recognised_beneath_the_start_errors() {
        let full = AgentError::Schema {
            paths: "schema.sql".into(),
            source: schema::SchemaError::Sqlite(sqlite(rusqlite::ffi::SQLITE_FULL)),
        };
        assert!(is_disk_full(&full));
        let full = AgentError::Sqlite {
            path: "x.db".into(),
            source: sqlite(rusqlite::ffi::SQLITE_FULL),
        };
        assert!(is_disk_full(&full));
        let other = AgentError::Sqlite {
            path: "x.db".into(),
            source: sqlite(rusqlite::ffi::SQLITE_CORRUPT),
        };
        assert!(!is_disk_full(&other));
    }
}
