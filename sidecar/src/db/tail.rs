//! The tailer: notices local commits from any process and reads them as units.
//!
//! A blocking thread with its own read connection. The node's API pokes it after each
//! write (instant pickup); commits by other processes — the app that loads nothing, the
//! `sqlite3` shell — and by the apply thread show up as a change of `PRAGMA data_version`,
//! polled every few milliseconds (a cheap header read). Each wake-up reads everything
//! after the last shipped version in one read transaction and hands it on as one unit.
//! It never writes to mark versions: there is nothing to "close". Its one write is rare:
//! regenerating a table's triggers after an app altered the table without the extension.
//! Every read's `(table, key)` pairs go to the subscription engine (`TouchedHub`) first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use super::feed::{db_version, origin_version, read_unit};
use super::touched::{Touched, TouchedHub, TouchedKeys};
use crate::node::Metrics;
use crate::sync::Change;

/// One read of this node's feed: `(from, to]`, whole transactions only. A large unit
/// (more versions than `large_after`; every change has its own version) is not read at
/// all: `large` is set and peers pull it chunk by chunk instead.
#[derive(Debug)]
pub struct Unit {
    pub from: i64,
    pub to: i64,
    /// This site's own versions the unit covers: `(own_from, own_to]` of its numbering.
    pub own_from: i64,
    pub own_to: i64,
    /// When the tailer read it (ms since the Unix epoch): the unit's commit time as far
    /// as peers can tell.
    pub read_ms: u64,
    pub changes: Vec<Change>,
    pub large: bool,
    /// This node's schema fingerprint during the read (`sync::Schema::fingerprint`);
    /// `None` when the schema changed while it read, or could not be read.
    pub schema: Option<u64>,
}

/// How often `PRAGMA data_version` is checked when nobody pokes.
pub const POLL: Duration = Duration::from_millis(2);

/// Starts the tailer on `conn` (a connection of its own, extension loaded). It ships
/// versions after the current one (history is served by anti-entropy pulls), keeps
/// `version` up to date and stops when `stop` is set or `out` is closed. Every failed
/// read is recorded in `metrics.loops.tailer` until a read succeeds, so `/v1/health` can
/// tell a tailer that keeps failing.
// Each argument is one wire of the node's plumbing, all given once at start.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    mut conn: Connection,
    wake: Receiver<()>,
    out: mpsc::Sender<Unit>,
    version: watch::Sender<i64>,
    stop: Arc<AtomicBool>,
    large_after: i64,
    metrics: Arc<Metrics>,
    touched: Arc<TouchedHub>,
) -> std::io::Result<JoinHandle<()>> {
    let fail = {
        let metrics = metrics.clone();
        move |msg: String| {
            tracing::warn!("{msg}");
            metrics.loops.tailer.failed(msg);
        }
    };
    std::thread::Builder::new()
        .name("patina-tail".into())
        .spawn(move || {
            // Retried rather than given up: a tailer that stops is a node that silently
            // stops replicating.
            let (mut last, mut last_own) = loop {
                match db_version(&conn).and_then(|v| Ok((v, origin_version(&conn)?))) {
                    Ok(v) => break v,
                    Err(e) => fail(format!("tailer cannot read crsql_db_version(): {e}")),
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            version.send_replace(last);
            let mut last_dv = data_version(&conn).unwrap_or(-1);
            let mut last_schema = schema_version(&conn).unwrap_or(-1);
            let mut fingerprint = super::schema::SchemaCache::default();
            while !stop.load(Ordering::Relaxed) {
                let poked = match wake.recv_timeout(POLL) {
                    Ok(()) => true,
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(POLL);
                        false
                    }
                };
                while wake.try_recv().is_ok() {}
                let dv = match data_version(&conn) {
                    Ok(dv) => dv,
                    Err(e) => {
                        fail(format!("tailer cannot read PRAGMA data_version: {e}"));
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if !poked && dv == last_dv {
                    continue;
                }
                last_dv = dv;
                // An app that altered a replicated table without the extension left its
                // triggers describing the old columns: repair before reading on.
                if let Ok(sv) = schema_version(&conn) {
                    if sv != last_schema {
                        if let Err(e) = super::schema::repair_drift(&conn) {
                            tracing::error!(
                                "cannot repair a schema change made outside patina: {e}"
                            );
                        }
                        last_schema = schema_version(&conn).unwrap_or(sv);
                    }
                }
                let noticed = Instant::now();
                // The fingerprint holds for the read when the schema did not move under it.
                let before = fingerprint.refresh(&conn).map(|_| fingerprint.version());
                let read = read_unit(&mut conn, last, large_after);
                let schema = match (before, schema_version(&conn)) {
                    (Ok(Some(a)), Ok(b)) if a == b => Some(fingerprint.fingerprint()),
                    _ => None,
                };
                match read {
                    Ok((to, own, changes)) => {
                        metrics.loops.tailer.succeeded();
                        if to <= last {
                            continue;
                        }
                        version.send_replace(to);
                        tracing::trace!(
                            from = last,
                            to,
                            changes = changes.as_ref().map(Vec::len),
                            "tail: unit read"
                        );
                        // Subscriptions hear of the keys before the network side
                        // (which may block on backpressure) gets the unit.
                        touched.publish(Touched {
                            to,
                            keys: touched_keys(changes.as_deref()),
                            noticed,
                        });
                        let unit = Unit {
                            from: last,
                            to,
                            own_from: last_own,
                            own_to: own.max(last_own),
                            read_ms: unix_ms(),
                            large: changes.is_none(),
                            changes: changes.unwrap_or_default(),
                            schema,
                        };
                        last = to;
                        last_own = own.max(last_own);
                        // Blocks while the network side is behind: backpressure, and the
                        // next read simply covers more versions.
                        if out.blocking_send(unit).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        fail(format!(
                            "tailer cannot read the change feed after {last}: {e}"
                        ));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The keys a read touched; all of them when the unit was too large to read.
fn touched_keys(changes: Option<&[Change]>) -> TouchedKeys {
    match changes {
        None => TouchedKeys::All,
        Some(cs) => {
            let mut keys = TouchedKeys::none();
            for c in cs {
                keys.add(&c.table, &c.pk);
            }
            keys
        }
    }
}

// Both run every few milliseconds: from the statement cache, not parsed each time.
fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA schema_version")?
        .query_row([], |r| r.get(0))
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))
}
