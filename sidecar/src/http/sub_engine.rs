//! Subscriptions: live queries whose result changes are kept as a persisted, contiguous
//! change log per subscription.
//!
//! One engine thread owns one connection. Whenever the node's `db_version` moves (local API
//! writes, merged remote changes, writes by apps that loaded nothing — the core watches
//! them all) or the API commits a write, the engine re-runs every subscription's query and
//! diffs the result against the subscription's current rows: keyed by the primary keys of
//! the tables the rows come from when every key column is selected, else by the whole row.
//! New keys are `insert`s (a fresh per-subscription row id), changed values `update`s (the
//! row id stays), vanished keys `delete`s. The changes, the new rows and the last change id
//! are written in ONE transaction to `patina_api_*` tables, so the log a client resumes
//! from and the rows a new client starts from always agree, across restarts too. Only then
//! do listeners hear of the new change id; they read the log themselves, which is how a
//! resume `from=N` gets no gap and no duplicate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value as Json;
use tokio::sync::{oneshot, watch};

use super::error::HttpError;
use super::json_values::StatementSpec;
use super::pool::{open_api_conn, ApiConn, Limits};
use super::queries::prepare_readonly;
use super::sub_rows::{diff, evaluate, key_columns, Change};
use crate::config::Synchronous;
use crate::node::NodeShared;

/// A subscription no stream has attached to for this long is deleted with its log.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(3600);
/// How often the engine looks for expired subscriptions.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Changes kept per subscription for resuming; older ones are pruned.
pub const RETAINED_CHANGES: i64 = 100_000;

/// The engine's tables (created on start; refused to API callers like every `patina_*`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS patina_api_subs (
    id TEXT PRIMARY KEY NOT NULL,
    hash TEXT NOT NULL,
    query TEXT NOT NULL,
    columns TEXT NOT NULL,
    last_change_id INTEGER NOT NULL DEFAULT 0,
    next_rowid INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS patina_api_sub_rows (
    sub_id TEXT NOT NULL,
    key TEXT NOT NULL,
    rowid INTEGER NOT NULL,
    vals TEXT NOT NULL,
    PRIMARY KEY (sub_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS patina_api_sub_changes (
    sub_id TEXT NOT NULL,
    change_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    rowid INTEGER NOT NULL,
    vals TEXT NOT NULL,
    PRIMARY KEY (sub_id, change_id)
) WITHOUT ROWID;
";

/// What HTTP streams see of a subscription.
pub struct SubHandle {
    pub id: String,
    pub hash: String,
    pub columns: Vec<String>,
    /// The last change id committed to the log; streams wait on it.
    pub last_change: watch::Sender<i64>,
    /// Why the subscription stopped for good (its query hit the time limit, a value it
    /// cannot answer unchanged); streams send it as an `{"error"}` event and end.
    pub failure: watch::Sender<Option<String>>,
    /// Streams attached now. Only subscriptions someone listens to are re-evaluated on
    /// every change; an idle one catches up (its changes coalesced, ids still contiguous)
    /// when a stream attaches again.
    listeners: AtomicUsize,
    /// When the last stream left (for expiry).
    idle_since: Mutex<Instant>,
}

impl SubHandle {
    fn new(id: String, hash: String, columns: Vec<String>, last_change: i64) -> SubHandle {
        SubHandle {
            id,
            hash,
            columns,
            last_change: watch::channel(last_change).0,
            failure: watch::channel(None).0,
            listeners: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    /// Registers a stream; the guard unregisters it when dropped.
    pub fn listen(self: &Arc<Self>) -> ListenGuard {
        self.listeners.fetch_add(1, Ordering::SeqCst);
        ListenGuard(self.clone())
    }

    fn is_listened(&self) -> bool {
        self.listeners.load(Ordering::SeqCst) > 0
    }

    fn idle_for(&self) -> Duration {
        if self.is_listened() {
            return Duration::ZERO;
        }
        self.idle_since
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::ZERO)
    }
}

/// One attached stream (see [`SubHandle::listen`]).
pub struct ListenGuard(Arc<SubHandle>);

impl Drop for ListenGuard {
    fn drop(&mut self) {
        if self.0.listeners.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Ok(mut t) = self.0.idle_since.lock() {
                *t = Instant::now();
            }
        }
    }
}

enum Cmd {
    Poke,
    Create {
        spec: StatementSpec,
        reply: oneshot::Sender<Result<Arc<SubHandle>, HttpError>>,
    },
    /// Re-evaluates one subscription now (a stream is about to attach).
    CatchUp {
        id: String,
        reply: oneshot::Sender<Result<(), HttpError>>,
    },
    Stop,
}

/// The handle the API holds; the state lives on the engine thread.
pub struct SubEngine {
    cmd: crossbeam_channel::Sender<Cmd>,
    subs: RwLock<HashMap<String, Arc<SubHandle>>>,
    stopped: AtomicBool,
    limits: Limits,
}

/// One subscription as the engine thread keeps it.
struct SubState {
    handle: Arc<SubHandle>,
    spec: StatementSpec,
    /// Result columns forming the row key; `None`: the whole row is the key.
    key_cols: Option<Vec<usize>>,
    /// key → (row id, values as JSON text).
    rows: HashMap<String, (i64, String)>,
    next_rowid: i64,
    last_change: i64,
    /// The query no longer prepares (a table was dropped); kept, not re-run.
    broken: bool,
}

impl SubEngine {
    /// Opens the engine's connection, creates its tables, loads persisted subscriptions
    /// and starts the engine thread (which re-evaluates them once at once).
    pub fn start(
        shared: Arc<NodeShared>,
        sync: Synchronous,
        limits: Limits,
    ) -> Result<Arc<SubEngine>, HttpError> {
        // Values are capped as on readers; the rows it stores are capped per row below.
        let api = open_api_conn(&shared, sync, false, limits.max_result_bytes)?;
        api.auth
            .trusted(|| api.conn.execute_batch(SCHEMA))
            .map_err(|e| {
                HttpError::Internal(format!("cannot create the subscription tables: {e}"))
            })?;
        let states = load(&api)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let engine = Arc::new(SubEngine {
            cmd: tx,
            subs: RwLock::new(
                states
                    .iter()
                    .map(|s| (s.handle.id.clone(), s.handle.clone()))
                    .collect(),
            ),
            stopped: AtomicBool::new(false),
            limits,
        });
        let me = engine.clone();
        std::thread::Builder::new()
            .name("patina-api-subs".into())
            .spawn(move || me.run(api, states, rx))
            .map_err(HttpError::Io)?;
        engine.poke();
        Ok(engine)
    }

    /// Asks for a re-evaluation (coalesced with any already pending). Without any
    /// subscription there is nothing to re-evaluate, and the engine thread is left asleep.
    pub fn poke(&self) {
        if self.count() > 0 {
            let _ = self.cmd.send(Cmd::Poke);
        }
    }

    /// Stops the engine thread.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.cmd.send(Cmd::Stop);
    }

    /// The subscription `id`, if it exists.
    pub fn get(&self, id: &str) -> Option<Arc<SubHandle>> {
        self.subs.read().ok().and_then(|m| m.get(id).cloned())
    }

    /// How many subscriptions exist.
    pub fn count(&self) -> usize {
        self.subs.read().map(|m| m.len()).unwrap_or(0)
    }

    /// How many subscription streams are attached now.
    pub fn streams(&self) -> usize {
        self.subs
            .read()
            .map(|m| m.values().map(|h| h.listeners.load(Ordering::SeqCst)).sum())
            .unwrap_or(0)
    }

    /// Creates a subscription, or returns the existing one for the same statement.
    pub async fn create(&self, spec: StatementSpec) -> Result<Arc<SubHandle>, HttpError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Create { spec, reply })
            .map_err(|_| HttpError::Internal("the subscription engine has stopped".into()))?;
        rx.await
            .map_err(|_| HttpError::Internal("the subscription engine dropped a request".into()))?
    }

    /// Brings one subscription up to date before a stream reads it.
    pub async fn catch_up(&self, id: &str) -> Result<(), HttpError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::CatchUp {
                id: id.to_owned(),
                reply,
            })
            .map_err(|_| HttpError::Internal("the subscription engine has stopped".into()))?;
        rx.await
            .map_err(|_| HttpError::Internal("the subscription engine dropped a request".into()))?
    }

    /// The engine thread.
    fn run(&self, api: ApiConn, mut states: Vec<SubState>, rx: crossbeam_channel::Receiver<Cmd>) {
        let mut retry = false;
        let mut last_sweep = Instant::now();
        loop {
            let wait = if retry {
                Duration::from_millis(100)
            } else {
                SWEEP_EVERY
            };
            let first = match rx.recv_timeout(wait) {
                Ok(c) => Some(c),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            let mut refresh = first.is_none() && retry;
            for cmd in first.into_iter().chain(rx.try_iter()) {
                match cmd {
                    Cmd::Poke => refresh = true,
                    Cmd::Stop => return,
                    Cmd::Create { spec, reply } => {
                        let res = self.create_blocking(&api, &mut states, spec);
                        let _ = reply.send(res);
                        // A write that committed while the new subscription was being set
                        // up poked nobody: look once more.
                        refresh = true;
                    }
                    Cmd::CatchUp { id, reply } => {
                        let res = match states.iter().find(|s| s.handle.id == id) {
                            None => Err(HttpError::NotFound(format!(
                                "subscription {id} expired; subscribe again"
                            ))),
                            Some(s) if s.broken => Err(HttpError::BadRequest(
                                s.handle.failure.borrow().clone().unwrap_or_else(|| {
                                    format!(
                                        "the query of subscription {id} no longer runs (its \
                                         table changed or is gone); subscribe again"
                                    )
                                }),
                            )),
                            Some(_) => {
                                refresh_some(&api, self.limits, &mut states, |s| s.handle.id == id)
                                    .and_then(|()| failure_of(&states, &id))
                            }
                        };
                        let _ = reply.send(res);
                    }
                }
            }
            if refresh && !self.stopped.load(Ordering::SeqCst) {
                let listened = |s: &SubState| s.handle.is_listened();
                retry = match refresh_some(&api, self.limits, &mut states, listened) {
                    Ok(()) => false,
                    Err(e) => {
                        tracing::warn!(error = %e, "subscription refresh failed; retrying");
                        true
                    }
                };
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                self.expire(&api, &mut states);
            }
        }
    }

    /// Deletes subscriptions idle past [`IDLE_EXPIRY`], with their rows and log.
    fn expire(&self, api: &ApiConn, states: &mut Vec<SubState>) {
        let expired: Vec<String> = states
            .iter()
            .filter(|s| s.handle.idle_for() >= IDLE_EXPIRY)
            .map(|s| s.handle.id.clone())
            .collect();
        for id in expired {
            let res = api.auth.trusted(|| {
                api.conn.execute_batch("BEGIN IMMEDIATE")?;
                let r = (|| {
                    for t in ["patina_api_sub_changes", "patina_api_sub_rows"] {
                        api.conn
                            .execute(&format!("DELETE FROM {t} WHERE sub_id = ?1"), [&id])?;
                    }
                    api.conn
                        .execute("DELETE FROM patina_api_subs WHERE id = ?1", [&id])
                })();
                match r {
                    Ok(_) => api.conn.execute_batch("COMMIT"),
                    Err(e) => {
                        let _ = api.conn.execute_batch("ROLLBACK");
                        Err(e)
                    }
                }
            });
            match res {
                Ok(()) => {
                    tracing::info!(sub = %id, "subscription expired after no stream attached for an hour");
                    states.retain(|s| s.handle.id != id);
                    if let Ok(mut m) = self.subs.write() {
                        m.remove(&id);
                    }
                }
                Err(e) => tracing::warn!(sub = %id, error = %e, "cannot expire subscription"),
            }
        }
    }

    fn create_blocking(
        &self,
        api: &ApiConn,
        states: &mut Vec<SubState>,
        spec: StatementSpec,
    ) -> Result<Arc<SubHandle>, HttpError> {
        let query = spec.to_json().to_string();
        let hash = fnv_hex(query.as_bytes());
        if let Some(s) = states.iter().find(|s| s.handle.hash == hash && !s.broken) {
            return Ok(s.handle.clone());
        }
        let (columns, key_cols, result) = {
            let mut stmt = prepare_readonly(&api.conn, &api.auth, &spec)?;
            let columns = super::exec::column_names(&stmt)?;
            let key_cols = api.auth.trusted(|| key_columns(&api.conn, &stmt));
            let armed = api.dog.arm(self.limits.query_timeout, None);
            let result = evaluate(
                &mut stmt,
                &columns,
                key_cols.as_deref(),
                &api.auth,
                self.limits,
            )
            .map_err(|e| armed.explain(e))?;
            (columns, key_cols, result)
        };
        let id = new_id();
        let mut rows = HashMap::new();
        let mut next_rowid = 1;
        for (key, vals) in result {
            rows.insert(key, (next_rowid, vals));
            next_rowid += 1;
        }
        let cols_json = Json::from(columns.clone()).to_string();
        api.auth
            .trusted(|| -> rusqlite::Result<()> {
                api.conn.execute_batch("BEGIN IMMEDIATE")?;
                let res = (|| {
                    api.conn.execute(
                        "INSERT INTO patina_api_subs (id, hash, query, columns, last_change_id, next_rowid) \
                         VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                        params![id, hash, query, cols_json, next_rowid],
                    )?;
                    let mut ins = api.conn.prepare_cached(
                        "INSERT INTO patina_api_sub_rows (sub_id, key, rowid, vals) VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for (key, (rowid, vals)) in &rows {
                        ins.execute(params![id, key, rowid, vals])?;
                    }
                    Ok(())
                })();
                match res {
                    Ok(()) => api.conn.execute_batch("COMMIT"),
                    Err(e) => {
                        let _ = api.conn.execute_batch("ROLLBACK");
                        Err(e)
                    }
                }
            })
            .map_err(|e| HttpError::from_sqlite(e, None))?;
        let handle = Arc::new(SubHandle::new(id.clone(), hash, columns, 0));
        if let Ok(mut m) = self.subs.write() {
            m.insert(id, handle.clone());
        }
        states.push(SubState {
            handle: handle.clone(),
            spec,
            key_cols,
            rows,
            next_rowid,
            last_change: 0,
            broken: false,
        });
        Ok(handle)
    }
}

/// Loads persisted subscriptions.
fn load(api: &ApiConn) -> Result<Vec<SubState>, HttpError> {
    let internal =
        |e: rusqlite::Error| HttpError::Internal(format!("cannot load subscriptions: {e}"));
    api.auth.trusted(|| {
        let mut stmt = api
            .conn
            .prepare(
                "SELECT id, hash, query, columns, last_change_id, next_rowid FROM patina_api_subs",
            )
            .map_err(internal)?;
        let subs: Vec<(String, String, String, String, i64, i64)> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .and_then(|it| it.collect())
            .map_err(internal)?;
        let mut rows_stmt = api
            .conn
            .prepare("SELECT key, rowid, vals FROM patina_api_sub_rows WHERE sub_id = ?1")
            .map_err(internal)?;
        let mut out = Vec::new();
        for (id, hash, query, columns, last_change, next_rowid) in subs {
            let rows: HashMap<String, (i64, String)> = rows_stmt
                .query_map([&id], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
                .and_then(|it| it.collect())
                .map_err(internal)?;
            let columns: Vec<String> = serde_json::from_str(&columns).unwrap_or_default();
            let spec = serde_json::from_str::<Json>(&query)
                .map_err(|e| HttpError::Internal(format!("subscription {id}: stored query: {e}")))
                .and_then(|j| StatementSpec::from_json(&j));
            let (spec, key_cols, broken) = match spec {
                Ok(spec) => match prepare_readonly(&api.conn, &api.auth, &spec) {
                    Ok(stmt) => {
                        let k = key_columns(&api.conn, &stmt);
                        (spec, k, false)
                    }
                    Err(e) => {
                        tracing::warn!(sub = %id, error = %e, "subscription query no longer runs");
                        (spec, None, true)
                    }
                },
                Err(e) => {
                    tracing::warn!(sub = %id, error = %e, "subscription query unreadable");
                    (StatementSpec::plain(""), None, true)
                }
            };
            out.push(SubState {
                handle: Arc::new(SubHandle::new(id, hash, columns, last_change)),
                spec,
                key_cols,
                rows,
                next_rowid,
                last_change,
                broken,
            });
        }
        Ok(out)
    })
}

/// One subscription's refresh waiting for its commit: index, changes, new rows, next row id.
type Pending = (usize, Vec<Change>, HashMap<String, (i64, String)>, i64);

/// Re-runs the chosen subscriptions and commits all their changes in one transaction.
///
/// A query that fails for good — past `api.query_timeout`, or a row it cannot answer
/// unchanged (TEXT that is not UTF-8, a row past `api.max_result_bytes`) — marks only its
/// own subscription failed (its streams get the reason as an `{"error"}` event); other
/// errors (a busy database) fail the round, which is retried.
fn refresh_some(
    api: &ApiConn,
    limits: Limits,
    states: &mut [SubState],
    chosen: impl Fn(&SubState) -> bool,
) -> Result<(), HttpError> {
    let mut pending: Vec<Pending> = Vec::new();
    for (i, s) in states.iter_mut().enumerate() {
        if s.broken || !chosen(s) {
            continue;
        }
        let result = {
            let mut stmt = match prepare_readonly(&api.conn, &api.auth, &s.spec) {
                Ok(st) => st,
                Err(e) => {
                    tracing::warn!(sub = %s.handle.id, error = %e, "subscription query failed");
                    continue;
                }
            };
            let columns = s.handle.columns.clone();
            let armed = api.dog.arm(limits.query_timeout, None);
            match evaluate(
                &mut stmt,
                &columns,
                s.key_cols.as_deref(),
                &api.auth,
                limits,
            ) {
                Ok(r) => r,
                Err(e) => match armed.explain(e) {
                    e @ (HttpError::QueryTimeout { .. }
                    | HttpError::NotUtf8 { .. }
                    | HttpError::ResultTooLarge { .. }) => {
                        let reason = format!("subscription {} stopped: {e}", s.handle.id);
                        tracing::warn!(error = %reason, "subscription failed");
                        s.broken = true;
                        s.handle.failure.send_replace(Some(reason));
                        continue;
                    }
                    e => {
                        return Err(HttpError::Internal(format!(
                            "subscription {}: {e}",
                            s.handle.id
                        )))
                    }
                },
            }
        };
        let (changes, rows, next_rowid) = diff(&s.rows, result, s.next_rowid);
        if !changes.is_empty() {
            pending.push((i, changes, rows, next_rowid));
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    api.auth
        .trusted(|| -> rusqlite::Result<()> {
            api.conn.execute_batch("BEGIN IMMEDIATE")?;
            let res = (|| {
                for (i, changes, _, next_rowid) in &pending {
                    persist(&api.conn, &states[*i], changes, *next_rowid)?;
                }
                Ok(())
            })();
            match res {
                Ok(()) => api.conn.execute_batch("COMMIT"),
                Err(e) => {
                    let _ = api.conn.execute_batch("ROLLBACK");
                    Err(e)
                }
            }
        })
        .map_err(|e| HttpError::Internal(format!("cannot record subscription changes: {e}")))?;
    for (i, changes, rows, next_rowid) in pending {
        let s = &mut states[i];
        s.last_change += changes.len() as i64;
        s.rows = rows;
        s.next_rowid = next_rowid;
        s.handle.last_change.send_replace(s.last_change);
    }
    Ok(())
}

/// Writes one subscription's changes, rows and counters (inside the caller's transaction).
fn persist(
    conn: &Connection,
    s: &SubState,
    changes: &[Change],
    next_rowid: i64,
) -> rusqlite::Result<()> {
    let id = &s.handle.id;
    let mut log = conn.prepare_cached(
        "INSERT INTO patina_api_sub_changes (sub_id, change_id, kind, rowid, vals) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut upsert = conn.prepare_cached(
        "INSERT INTO patina_api_sub_rows (sub_id, key, rowid, vals) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (sub_id, key) DO UPDATE SET rowid = excluded.rowid, vals = excluded.vals",
    )?;
    let mut delete =
        conn.prepare_cached("DELETE FROM patina_api_sub_rows WHERE sub_id = ?1 AND key = ?2")?;
    let mut change_id = s.last_change;
    for c in changes {
        change_id += 1;
        log.execute(params![id, change_id, c.kind, c.rowid, c.vals])?;
        if c.kind == "delete" {
            delete.execute(params![id, c.key])?;
        } else {
            upsert.execute(params![id, c.key, c.rowid, c.vals])?;
        }
    }
    conn.execute(
        "UPDATE patina_api_subs SET last_change_id = ?2, next_rowid = ?3 WHERE id = ?1",
        params![id, change_id, next_rowid],
    )?;
    conn.execute(
        "DELETE FROM patina_api_sub_changes WHERE sub_id = ?1 AND change_id <= ?2",
        params![id, change_id - RETAINED_CHANGES],
    )?;
    Ok(())
}

/// The error of a subscription that stopped for good, if `id` is one.
fn failure_of(states: &[SubState], id: &str) -> Result<(), HttpError> {
    match states.iter().find(|s| s.handle.id == id) {
        Some(s) if s.broken => Err(HttpError::BadRequest(
            s.handle.failure.borrow().clone().unwrap_or_default(),
        )),
        _ => Ok(()),
    }
}

/// The rows of a subscription and its last change id, read in one snapshot.
pub fn snapshot(api: &ApiConn, id: &str) -> Result<(Vec<(i64, String)>, i64), HttpError> {
    let err =
        |e: rusqlite::Error| HttpError::Internal(format!("cannot read subscription {id}: {e}"));
    api.auth.trusted(|| {
        api.conn.execute_batch("BEGIN").map_err(err)?;
        let res = (|| {
            let last: i64 = api
                .conn
                .query_row(
                    "SELECT last_change_id FROM patina_api_subs WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            let mut stmt = api.conn.prepare_cached(
                "SELECT rowid, vals FROM patina_api_sub_rows WHERE sub_id = ?1 ORDER BY rowid",
            )?;
            let rows: Vec<(i64, String)> = stmt
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok((rows, last))
        })();
        let _ = api.conn.execute_batch("COMMIT");
        res.map_err(err)
    })
}

/// One logged change: (change id, kind, row id, values as JSON text).
pub type LoggedChange = (i64, String, i64, String);

/// Up to `limit` logged changes after `after`, in order, and the oldest retained id.
pub fn changes_after(
    api: &ApiConn,
    id: &str,
    after: i64,
    limit: i64,
) -> Result<(Vec<LoggedChange>, Option<i64>), HttpError> {
    let err =
        |e: rusqlite::Error| HttpError::Internal(format!("cannot read subscription {id}: {e}"));
    api.auth.trusted(|| {
        let oldest: Option<i64> = api
            .conn
            .query_row(
                "SELECT min(change_id) FROM patina_api_sub_changes WHERE sub_id = ?1",
                [id],
                |r| r.get(0),
            )
            .map_err(err)?;
        let mut stmt = api
            .conn
            .prepare_cached(
                "SELECT change_id, kind, rowid, vals FROM patina_api_sub_changes \
                 WHERE sub_id = ?1 AND change_id > ?2 ORDER BY change_id LIMIT ?3",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![id, after, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<LoggedChange>>>())
            .map_err(err)?;
        Ok((rows, oldest))
    })
}

/// FNV-1a, 64 bits, as hex: a stable hash of the statement (`corro-query-hash`).
fn fnv_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A random id in UUID form.
fn new_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    super::actor_id(&h)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        assert_eq!(fnv_hex(b""), "cbf29ce484222325");
        assert_eq!(new_id().len(), 36);
    }
}
