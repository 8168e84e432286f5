//! The engine thread: owns one connection and every subscription's state, and turns the
//! keys each commit touched (`db::touched`, from the tailer) into change-log entries.
//!
//! For each round of touched keys, a subscription with a stream attached is
//! - skipped when it reads none of the touched tables (no evaluation at all);
//! - matched by key when its plan is incremental (`plan`): its keyed query runs for the
//!   touched keys of its table only, and those rows are diffed against its stored ones;
//! - re-run whole otherwise (or when the keys are unknown: a unit too large to read).
//!
//! A subscription nobody listens to is not evaluated; it catches up — re-run whole, its
//! changes coalesced, ids still contiguous — when a stream attaches. All changes of a round
//! are committed in ONE transaction with the new rows and last change ids (`storage`);
//! only then are the changes' stream lines kept in memory (`recent`) and the new ids
//! published. Streams take the lines from memory while they keep up and read the log
//! otherwise — the same changes either way — which is how a resume `from=N` gets no gap
//! and no duplicate.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use crossbeam_channel::{select, Receiver};
use rusqlite::config::DbConfig;
use rusqlite::types::Value;
use serde_json::Value as Json;
use tokio::sync::{oneshot, watch};

use super::diff::{apply, diff, diff_keys, evaluate, key_columns, key_of, Change, Rows};
use super::error::SubError;
use super::plan::{plan, Keyed, Plan, KEYS_SCHEMA};
use super::recent::{change_line, Recent};
use super::storage;
use crate::config::Synchronous;
use crate::db::touched::{Touched, TouchedKeys};
use crate::http::json_values::StatementSpec;
use crate::http::pool::{open_api_conn, ApiConn, Limits};
use crate::http::queries::prepare_readonly;
use crate::http::HttpError;
use crate::node::{Metrics, NodeShared};

/// A subscription no stream has attached to for this long is deleted with its log.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(3600);
/// How often the engine looks for expired subscriptions.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Pause before retrying a round that failed (a busy database).
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Under a steady stream of writes, rounds start at most this often (keys touched
/// meanwhile are matched together). Zero: a round as soon as keys arrive; keys touched
/// while a round runs still go together into the next. 10 ms was measured
/// (BENCHMARKS.md): rounds fell to a few per second under 1,000 app commits/s, so pacing
/// stays off until that is understood.
pub const ROUND_GAP: Duration = Duration::ZERO;

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
    /// Streams attached now. Only subscriptions someone listens to are evaluated on
    /// every change.
    listeners: AtomicUsize,
    /// When the last stream left (for expiry).
    idle_since: Mutex<Instant>,
    /// The latest committed changes as stream lines (`recent`).
    recent: Mutex<Recent>,
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
            recent: Mutex::new(Recent::default()),
        }
    }

    /// The stream lines of the changes after `cursor` up to `latest` if they are still
    /// in memory; `None`: read them from the log.
    pub fn recent_after(&self, cursor: i64, latest: i64) -> Option<Vec<(i64, Bytes)>> {
        self.recent.lock().ok()?.after(cursor, latest)
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
    /// Re-runs every listened subscription whole (the schema changed).
    RefreshAll,
    Create {
        spec: StatementSpec,
        reply: oneshot::Sender<Result<Arc<SubHandle>, SubError>>,
    },
    /// Re-evaluates one subscription now (a stream is about to attach).
    CatchUp {
        id: String,
        reply: oneshot::Sender<Result<(), SubError>>,
    },
    Stop,
}

/// The handle the API holds; the state lives on the engine thread.
pub struct SubEngine {
    cmd: crossbeam_channel::Sender<Cmd>,
    subs: RwLock<HashMap<String, Arc<SubHandle>>>,
    stopped: AtomicBool,
}

/// One subscription as the engine thread keeps it.
pub(crate) struct SubState {
    pub(crate) handle: Arc<SubHandle>,
    spec: StatementSpec,
    /// Result columns forming the row key; `None`: the whole row is the key.
    key_cols: Option<Vec<usize>>,
    plan: Plan,
    pub(crate) rows: Rows,
    next_rowid: i64,
    last_change: i64,
    /// The query no longer prepares, or failed for good; kept, not re-run.
    broken: bool,
}

#[cfg(test)]
impl SubState {
    pub(crate) fn plan_is_incremental(&self) -> bool {
        self.plan.mode.is_ok()
    }
    pub(crate) fn plan_reason(&self) -> Option<&'static str> {
        self.plan.mode.as_ref().err().copied()
    }
    pub(crate) fn spec_sql(&self) -> &str {
        &self.spec.sql
    }
    pub(crate) fn keyed_sql(&self) -> Option<&str> {
        self.plan.mode.as_ref().ok().map(|k| k.sql.as_str())
    }
    /// Makes this subscription re-run whole, as the engine before key matching did.
    pub(crate) fn force_whole(&mut self) {
        self.plan.mode = Err("forced whole by a test");
    }
}

/// How a round evaluates one subscription.
enum Eval {
    Whole,
    /// By the touched keys (their row keys, shared by the subscriptions of the table).
    Keys(Rc<Vec<String>>),
}

impl SubEngine {
    /// Opens the engine's connection, creates its tables, loads persisted subscriptions
    /// and starts the engine thread, listening to the keys the tailer reports.
    pub fn start(
        shared: Arc<NodeShared>,
        sync: Synchronous,
        limits: Limits,
    ) -> Result<Arc<SubEngine>, HttpError> {
        // Values are capped as on readers; the rows it stores are capped per row below.
        let api = open_api_conn(&shared, sync, false, limits.max_result_bytes)?;
        // Keyed queries run from the statement cache every round: room for many distinct
        // subscription statements (subscriptions differing only in parameters share one).
        api.conn.set_prepared_statement_cache_capacity(512);
        let states = Core::open(&api)?;
        let touched = shared.touched.listen();
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
        });
        let me = engine.clone();
        let mut core = Core {
            api,
            limits,
            metrics: shared.metrics.clone(),
            states,
        };
        std::thread::Builder::new()
            .name("patina-api-subs".into())
            .spawn(move || me.run(&mut core, rx, touched))
            .map_err(HttpError::Io)?;
        Ok(engine)
    }

    /// Re-runs every subscription with a stream attached whole, soon: after a schema
    /// change, which touches no key.
    pub fn refresh_all(&self) {
        let _ = self.cmd.send(Cmd::RefreshAll);
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
    pub async fn create(&self, spec: StatementSpec) -> Result<Arc<SubHandle>, SubError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Create { spec, reply })
            .map_err(|_| SubError::Stopped)?;
        rx.await.map_err(|_| SubError::Stopped)?
    }

    /// Brings one subscription up to date before a stream reads it.
    pub async fn catch_up(&self, id: &str) -> Result<(), SubError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::CatchUp {
                id: id.to_owned(),
                reply,
            })
            .map_err(|_| SubError::Stopped)?;
        rx.await.map_err(|_| SubError::Stopped)?
    }

    /// The engine thread: commands first, then the touched keys gathered meanwhile.
    fn run(&self, core: &mut Core, rx: Receiver<Cmd>, touched: Receiver<Arc<Touched>>) {
        let mut pending = TouchedKeys::none();
        let mut noticed: Option<Instant> = None;
        let mut last_sweep = Instant::now();
        let mut retry = false;
        let mut last_round: Option<Instant> = None;
        loop {
            let since = last_round.map(|t| t.elapsed());
            let gap_left = since.map_or(Duration::ZERO, |d| ROUND_GAP.saturating_sub(d));
            let wait = if retry {
                RETRY_AFTER
            } else if !pending.is_empty() {
                gap_left
            } else {
                SWEEP_EVERY
            };
            let mut cmds = Vec::new();
            let mut gather = |t: Arc<Touched>, pending: &mut TouchedKeys| {
                pending.merge(t.keys.clone());
                noticed = Some(noticed.map_or(t.noticed, |n| n.min(t.noticed)));
            };
            select! {
                recv(rx) -> c => match c {
                    Ok(c) => cmds.push(c),
                    Err(_) => return,
                },
                recv(touched) -> t => match t {
                    Ok(t) => gather(t, &mut pending),
                    // The tailer is gone (the node is stopping): commands only.
                    Err(_) => pending = TouchedKeys::none(),
                },
                default(wait) => {}
            }
            cmds.extend(rx.try_iter());
            for t in touched.try_iter() {
                gather(t, &mut pending);
            }
            for cmd in cmds {
                match cmd {
                    Cmd::Stop => return,
                    Cmd::RefreshAll => pending.merge(TouchedKeys::All),
                    Cmd::Create { spec, reply } => {
                        let res = core.create(spec);
                        if let Ok(h) = &res {
                            if let Ok(mut m) = self.subs.write() {
                                m.insert(h.id.clone(), h.clone());
                            }
                        }
                        let _ = reply.send(res);
                    }
                    Cmd::CatchUp { id, reply } => {
                        let _ = reply.send(core.catch_up(&id));
                    }
                }
            }
            let paced = last_round.is_some_and(|t| t.elapsed() < ROUND_GAP);
            if (!pending.is_empty() || retry) && !paced && !self.stopped.load(Ordering::SeqCst) {
                last_round = Some(Instant::now());
                match core.round(&pending, noticed, |s| s.handle.is_listened()) {
                    Ok(()) => {
                        retry = false;
                        pending = TouchedKeys::none();
                        noticed = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "subscription round failed; retrying");
                        retry = true;
                    }
                }
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                for id in core.expire() {
                    if let Ok(mut m) = self.subs.write() {
                        m.remove(&id);
                    }
                }
            }
        }
    }
}

/// The engine's connection and state; every method runs on the engine thread. Public to
/// the crate so the property test can drive it without a thread.
pub(crate) struct Core {
    pub(crate) api: ApiConn,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) states: Vec<SubState>,
}

impl Core {
    /// Creates the engine's tables and loads the persisted subscriptions.
    pub(crate) fn open(api: &ApiConn) -> Result<Vec<SubState>, SubError> {
        // Query planner stability. Without it SQLite marks a statement for re-planning
        // when the value bound to a parameter may improve its plan (bound values compared
        // while planning, STAT4 estimates, LIKE prefixes), and re-binding such a parameter
        // re-prepares the statement at its next step. The subscriptions of one shape share
        // one cached keyed statement with different parameters, so it was re-prepared on
        // every evaluation: a third of the engine's CPU (BENCHMARKS.md). Plans made once
        // also stay the plan `plan` checked with EXPLAIN QUERY PLAN, whatever the values.
        api.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        let stored = api.auth.trusted(|| -> Result<_, SubError> {
            api.conn.execute_batch(storage::SCHEMA)?;
            api.conn.execute_batch(KEYS_SCHEMA)?;
            storage::load(&api.conn)
        })?;
        let mut out = Vec::with_capacity(stored.len());
        for s in stored {
            let columns: Vec<String> = serde_json::from_str(&s.columns).unwrap_or_default();
            let spec = serde_json::from_str::<Json>(&s.query)
                .map_err(|e| {
                    HttpError::Internal(format!("subscription {}: stored query: {e}", s.id))
                })
                .and_then(|j| StatementSpec::from_json(&j));
            let planned = spec.and_then(|spec| {
                let (key_cols, ncols) = {
                    let stmt = prepare_readonly(&api.conn, &api.auth, &spec)?;
                    (
                        api.auth.trusted(|| key_columns(&api.conn, &stmt)),
                        stmt.column_count(),
                    )
                };
                let p = plan(api, &spec, key_cols.as_deref(), ncols)
                    .map_err(|e| HttpError::Internal(e.to_string()))?;
                Ok((spec, key_cols, p))
            });
            let (spec, key_cols, plan, broken) = match planned {
                Ok((spec, k, p)) => (spec, k, p, false),
                Err(e) => {
                    tracing::warn!(sub = %s.id, error = %e, "subscription query no longer runs");
                    (StatementSpec::plain(""), None, Plan::none(), true)
                }
            };
            out.push(SubState {
                handle: Arc::new(SubHandle::new(s.id, s.hash, columns, s.last_change)),
                spec,
                key_cols,
                plan,
                rows: s.rows,
                next_rowid: s.next_rowid,
                last_change: s.last_change,
                broken,
            });
        }
        Ok(out)
    }

    /// Creates a subscription (or finds the live one for the same statement): evaluated
    /// whole, planned, persisted with its first rows.
    pub(crate) fn create(&mut self, spec: StatementSpec) -> Result<Arc<SubHandle>, SubError> {
        let query = spec.to_json().to_string();
        let hash = fnv_hex(query.as_bytes());
        if let Some(s) = self
            .states
            .iter()
            .find(|s| s.handle.hash == hash && !s.broken)
        {
            return Ok(s.handle.clone());
        }
        let api = &self.api;
        let (columns, key_cols, result) = {
            let mut stmt = prepare_readonly(&api.conn, &api.auth, &spec)?;
            let columns = crate::http::exec::column_names(&stmt)?;
            let key_cols = api.auth.trusted(|| key_columns(&api.conn, &stmt));
            let armed = api.dog.arm(self.limits.query_timeout, None);
            self.metrics.subscription_evaluations.inc();
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
        let plan = plan(api, &spec, key_cols.as_deref(), columns.len())?;
        match &plan.mode {
            Ok(k) => tracing::debug!(table = %k.table, "subscription matched by key"),
            Err(why) => tracing::debug!(why, "subscription re-run whole on its tables' writes"),
        }
        let id = new_id();
        let (changes, next_rowid) = diff(&Rows::new(), result, 1);
        let mut rows = Rows::new();
        apply(&mut rows, changes);
        let cols_json = Json::from(columns.clone()).to_string();
        api.auth.trusted(|| {
            storage::in_transaction(&api.conn, || {
                storage::insert(&api.conn, &id, &hash, &query, &cols_json, &rows, next_rowid)
            })
        })?;
        let handle = Arc::new(SubHandle::new(id, hash, columns, 0));
        self.states.push(SubState {
            handle: handle.clone(),
            spec,
            key_cols,
            plan,
            rows,
            next_rowid,
            last_change: 0,
            broken: false,
        });
        Ok(handle)
    }

    /// Re-runs one subscription whole (a stream is about to attach).
    pub(crate) fn catch_up(&mut self, id: &str) -> Result<(), SubError> {
        match self.states.iter().find(|s| s.handle.id == id) {
            None => {
                return Err(SubError::Expired { id: id.to_owned() });
            }
            Some(s) if s.broken => {
                return Err(SubError::Failed {
                    reason: s.handle.failure.borrow().clone().unwrap_or_else(|| {
                        format!(
                            "the query of subscription {id} no longer runs (its table changed \
                             or is gone); subscribe again"
                        )
                    }),
                })
            }
            Some(_) => {}
        }
        self.round(&TouchedKeys::All, None, |s| s.handle.id == id)?;
        match self.states.iter().find(|s| s.handle.id == id) {
            Some(s) if s.broken => Err(SubError::Failed {
                reason: s.handle.failure.borrow().clone().unwrap_or_default(),
            }),
            _ => Ok(()),
        }
    }

    /// One round: evaluates the chosen subscriptions that `touched` concerns and commits
    /// all their changes in one transaction. A query that fails for good marks only its
    /// own subscription failed; other errors (a busy database) fail the round, which the
    /// caller retries with the same keys.
    pub(crate) fn round(
        &mut self,
        touched: &TouchedKeys,
        noticed: Option<Instant>,
        chosen: impl Fn(&SubState) -> bool,
    ) -> Result<(), SubError> {
        let mut keys_loaded: HashMap<String, Option<Rc<Vec<String>>>> = HashMap::new();
        let mut keys_cleared = false;
        let mut pending: Vec<(usize, Vec<Change>, i64)> = Vec::new();
        // Every evaluation of the round reads one snapshot (see `ReadSnapshot`); rolled
        // back if the round fails.
        let snapshot = storage::ReadSnapshot::begin(&self.api.conn, &self.api.auth)?;
        // The touched tables as plans name them, lower-cased once per round.
        let tables: Vec<(String, &String)> = match touched {
            TouchedKeys::Keys(m) => m.keys().map(|t| (t.to_ascii_lowercase(), t)).collect(),
            TouchedKeys::All => Vec::new(),
        };
        let mut evals: Vec<(usize, Eval)> = Vec::new();
        for i in 0..self.states.len() {
            let s = &self.states[i];
            if s.broken || !chosen(s) {
                continue;
            }
            let eval = match (touched, &s.plan.mode) {
                (TouchedKeys::All, _) => Eval::Whole,
                (TouchedKeys::Keys(m), mode) => {
                    let mut hit = tables.iter().filter(|(t, _)| s.plan.tables.contains(t));
                    match (hit.next(), hit.next(), mode) {
                        (None, _, _) => continue,
                        (Some((_, t)), None, Ok(k)) => {
                            if !keys_cleared {
                                self.api.auth.trusted(|| {
                                    self.api
                                        .conn
                                        .prepare_cached("DELETE FROM temp.patina_sub_keys")?
                                        .execute([])
                                })?;
                                keys_cleared = true;
                            }
                            let loaded = match keys_loaded.get(k.table.as_str()) {
                                Some(l) => l.clone(),
                                None => {
                                    let l = self.load_keys(&k.table, &m[*t], k)?.map(Rc::new);
                                    keys_loaded.insert(k.table.clone(), l.clone());
                                    l
                                }
                            };
                            match loaded {
                                Some(names) => Eval::Keys(names),
                                None => Eval::Whole,
                            }
                        }
                        _ => Eval::Whole,
                    }
                }
            };
            evals.push((i, eval));
        }
        // Subscriptions of one shape (the same keyed query, other parameters) next to each
        // other, so that they run on one statement, re-bound for each (the text is still
        // compared below: equal hashes only make neighbours).
        evals.sort_by_key(|(i, e)| match (e, &self.states[*i].plan.mode) {
            (Eval::Keys(_), Ok(k)) => Some(k.shape),
            _ => None,
        });
        let mut shared: Option<(String, rusqlite::CachedStatement<'_>)> = None;
        for (i, eval) in evals {
            let sql = match (&eval, &self.states[i].plan.mode) {
                (Eval::Keys(_), Ok(k)) => Some(&k.sql),
                _ => None,
            };
            if let Some(sql) = sql {
                if shared.as_ref().is_none_or(|(s, _)| s != sql) {
                    // A statement that does not prepare fails each subscription alone
                    // below, with its reason.
                    shared = self
                        .api
                        .conn
                        .prepare_cached(sql)
                        .ok()
                        .map(|st| (sql.clone(), st));
                }
            }
            let stmt = match (sql, shared.as_mut()) {
                (Some(_), Some((_, st))) => Some(&mut **st),
                _ => None,
            };
            let s = &mut self.states[i];
            match evaluate_one(&self.api, self.limits, &self.metrics, s, &eval, stmt) {
                Ok(Some((changes, next))) => pending.push((i, changes, next)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        drop(shared);
        snapshot.end()?;
        if pending.is_empty() {
            return Ok(());
        }
        let api = &self.api;
        let states = &self.states;
        let lasts = api.auth.trusted(|| {
            storage::in_transaction(&api.conn, || {
                pending
                    .iter()
                    .map(|(i, changes, next)| {
                        let s = &states[*i];
                        storage::persist(&api.conn, &s.handle.id, s.last_change, changes, *next)
                    })
                    .collect::<rusqlite::Result<Vec<i64>>>()
            })
        })?;
        let now = Instant::now();
        for ((i, changes, next), last) in pending.into_iter().zip(lasts) {
            let s = &mut self.states[i];
            if let Some(t) = noticed {
                let secs = now.saturating_duration_since(t).as_secs_f64();
                for _ in 0..changes.len() {
                    self.metrics.subscription_event.observe(secs);
                }
            }
            // Lines before the new id is published: a stream that sees the id finds them.
            if let Ok(mut recent) = s.handle.recent.lock() {
                for (id, c) in (s.last_change + 1..).zip(&changes) {
                    recent.push(id, change_line(id, c.kind, c.rowid, &c.vals));
                }
            }
            apply(&mut s.rows, changes);
            s.next_rowid = next;
            s.last_change = last;
            s.handle.last_change.send_replace(last);
        }
        Ok(())
    }

    /// Loads `pks` of `table` into `temp.patina_sub_keys`; returns their row keys as the
    /// subscriptions name them, or `None` when one does not decode (then the
    /// subscriptions of that table are re-run whole this round).
    fn load_keys(
        &self,
        table: &str,
        pks: &HashSet<Vec<u8>>,
        k: &Keyed,
    ) -> Result<Option<Vec<String>>, SubError> {
        let mut decoded: Vec<Vec<Value>> = Vec::with_capacity(pks.len());
        for pk in pks {
            match super::pk::unpack(pk) {
                Ok(v) if v.len() == k.width => decoded.push(v),
                Ok(_) | Err(_) => return Ok(None),
            }
        }
        let mut names = Vec::with_capacity(decoded.len());
        for v in &decoded {
            match key_of(v) {
                Ok(n) => names.push(n),
                Err(_) => return Ok(None),
            }
        }
        self.api.auth.trusted(|| -> rusqlite::Result<()> {
            let mut ins = self.api.conn.prepare_cached(
                "INSERT INTO temp.patina_sub_keys (tbl, k0, k1, k2, k3, k4, k5, k6, k7) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for v in &decoded {
                let mut row: Vec<&dyn rusqlite::ToSql> = vec![&table];
                for i in 0..8 {
                    row.push(v.get(i).unwrap_or(&Value::Null));
                }
                ins.execute(rusqlite::params_from_iter(row))?;
            }
            Ok(())
        })?;
        Ok(Some(names))
    }

    /// Deletes subscriptions idle past [`IDLE_EXPIRY`], with their rows and log; returns
    /// their ids.
    fn expire(&mut self) -> Vec<String> {
        let expired: Vec<String> = self
            .states
            .iter()
            .filter(|s| s.handle.idle_for() >= IDLE_EXPIRY)
            .map(|s| s.handle.id.clone())
            .collect();
        let mut gone = Vec::new();
        for id in expired {
            let api = &self.api;
            let res = api
                .auth
                .trusted(|| storage::in_transaction(&api.conn, || storage::delete(&api.conn, &id)));
            match res {
                Ok(()) => {
                    tracing::info!(sub = %id, "subscription expired after no stream attached for an hour");
                    self.states.retain(|s| s.handle.id != id);
                    gone.push(id);
                }
                Err(e) => tracing::warn!(sub = %id, error = %e, "cannot expire subscription"),
            }
        }
        gone
    }
}

/// Evaluates one subscription (whole or by key) and diffs: its changes and next row id,
/// `None` when nothing changed or its query failed for good (then it is marked failed).
/// `keyed` is its keyed statement when the round already holds it (shared by its shape).
fn evaluate_one(
    api: &ApiConn,
    limits: Limits,
    metrics: &Metrics,
    s: &mut SubState,
    eval: &Eval,
    keyed: Option<&mut rusqlite::Statement<'_>>,
) -> Result<Option<(Vec<Change>, i64)>, SubError> {
    let run = |stmt: &mut rusqlite::Statement<'_>| {
        let armed = api.dog.arm(limits.query_timeout, None);
        metrics.subscription_evaluations.inc();
        evaluate(
            stmt,
            &s.handle.columns,
            s.key_cols.as_deref(),
            &api.auth,
            limits,
        )
        .map_err(|e| armed.explain(e))
    };
    let outcome = match (eval, &s.plan.mode, keyed) {
        (Eval::Keys(_), Ok(_), Some(st)) => match crate::http::exec::bind(st, &s.spec.params) {
            Ok(()) => Ok(run(st)),
            Err(e) => Err(e),
        },
        (Eval::Keys(_), Ok(k), None) => match api.conn.prepare_cached(&k.sql) {
            Ok(mut st) => match crate::http::exec::bind(&mut st, &s.spec.params) {
                Ok(()) => Ok(run(&mut st)),
                Err(e) => Err(e),
            },
            Err(e) => Err(crate::http::exec::sql_error(e, &api.auth)),
        },
        _ => match prepare_readonly(&api.conn, &api.auth, &s.spec) {
            Ok(mut st) => Ok(run(&mut st)),
            Err(e) => Err(e),
        },
    };
    let result = match outcome {
        Err(e) => {
            let reason = format!(
                "subscription {} stopped: its query no longer runs: {e}",
                s.handle.id
            );
            tracing::warn!(error = %reason, "subscription failed");
            s.broken = true;
            s.handle.failure.send_replace(Some(reason));
            return Ok(None);
        }
        Ok(Ok(r)) => r,
        Ok(Err(
            e @ (HttpError::QueryTimeout { .. }
            | HttpError::NotUtf8 { .. }
            | HttpError::ResultTooLarge { .. }),
        )) => {
            let reason = format!("subscription {} stopped: {e}", s.handle.id);
            tracing::warn!(error = %reason, "subscription failed");
            s.broken = true;
            s.handle.failure.send_replace(Some(reason));
            return Ok(None);
        }
        Ok(Err(e)) => {
            return Err(SubError::Statement(Box::new(HttpError::Internal(format!(
                "subscription {}: {e}",
                s.handle.id
            )))))
        }
    };
    let (changes, next) = match eval {
        Eval::Keys(names) => diff_keys(&s.rows, names.as_slice(), result, s.next_rowid),
        Eval::Whole => diff(&s.rows, result, s.next_rowid),
    };
    Ok((!changes.is_empty()).then_some((changes, next)))
}

/// The rows of a subscription and its last change id, read in one snapshot.
pub fn snapshot(api: &ApiConn, id: &str) -> Result<(Vec<(i64, String)>, i64), SubError> {
    api.auth.trusted(|| storage::snapshot(&api.conn, id))
}

/// Up to `limit` logged changes after `after`, in order, and the oldest retained id.
pub fn changes_after(
    api: &ApiConn,
    id: &str,
    after: i64,
    limit: i64,
) -> Result<(Vec<storage::LoggedChange>, Option<i64>), SubError> {
    api.auth
        .trusted(|| storage::changes_after(&api.conn, id, after, limit))
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
    crate::http::actor_id(&h)
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
