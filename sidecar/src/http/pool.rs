//! The API's SQLite connections: one writer connection with group commit, a small pool
//! of readers.
//!
//! SQLite lets one transaction write at a time, so a single writer connection loses
//! nothing and lets concurrent requests share one commit. A request queues its job and,
//! unless another request is already leading, leads: on its own worker thread
//! (`block_in_place`, so no hop to another thread on the common path) it takes the first
//! waiting job, opens `BEGIN IMMEDIATE`, runs it, keeps taking whatever else is already
//! waiting (each later job in its own SAVEPOINT: a failing request rolls back alone),
//! commits once and answers everyone. One client sending one request at a time still gets
//! one commit per request. Readers run on their own niced threads (`readers`); WAL lets
//! them read while the writer writes.
//!
//! Every connection runs under `api.query_timeout` and its request's cancellation (the
//! `limits` watchdog); a reader slot is waited for at most [`READER_WAIT`], the writer at
//! most `api.query_timeout`, then the answer is 503: overload is told, never queued
//! without bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::authorizer::AuthState;
use super::error::HttpError;
use super::exec::{run_specs, Keep, StmtResult};
use super::json_values::StatementSpec;
use super::limits::{limit_value_size, Armed, CancelToken, Watchdog};
use super::readers::ReaderThreads;
use crate::config::{ApiConfig, Synchronous};
use crate::node::NodeShared;

/// Called after each commit with the requests it carried and whether data changed.
pub type OnCommit = Arc<dyn Fn(usize, bool) + Send + Sync>;

/// How many requests one group commit takes at most.
const MAX_GROUP: usize = 128;
/// How many reader connections run at once.
pub const READERS: usize = 8;

/// How long a request waits for a reader slot before it is answered 503. Slots free up
/// within `api.query_timeout` at worst; an unbounded queue would only turn overload into
/// requests that hang (issue 7 item 3), so a caller is told at once to retry.
pub const READER_WAIT: Duration = Duration::from_millis(20);

/// The largest TEXT or BLOB the writer connection creates or reads. Larger than
/// `api.max_result_bytes` on purpose: an UPDATE must be able to rewrite a row holding a
/// big value some app stored, but `/sql` must not build values of any size while it
/// holds the write lock.
pub const WRITER_MAX_VALUE: usize = 64 * 1024 * 1024;

/// Answers `/sql` may hold in memory at once, in multiples of `api.max_result_bytes`
/// (32 MiB by default; an answer also needs about as much again while it is encoded).
pub const ANSWER_BUDGET_FACTOR: usize = 4;

/// The limits every API connection runs under (from `[api]`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `api.query_timeout`.
    pub query_timeout: Duration,
    /// `api.max_result_bytes`.
    pub max_result_bytes: usize,
}

impl Limits {
    pub fn from_config(api: &ApiConfig) -> Limits {
        Limits {
            query_timeout: api.query_timeout,
            max_result_bytes: api.max_result_bytes,
        }
    }
}

/// A connection with the API's authorizer and watchdog installed.
pub struct ApiConn {
    pub conn: Connection,
    pub auth: Arc<AuthState>,
    /// Stops a request's statements past `api.query_timeout` or once its client left.
    pub dog: Arc<Watchdog>,
}

/// Opens an API connection: the extension loaded, the authorizer and the watchdog
/// installed, TEXT and BLOB values capped at `max_value` bytes. Readers are also
/// `query_only`, a second fence behind the authorizer.
pub fn open_api_conn(
    shared: &NodeShared,
    sync: Synchronous,
    query_only: bool,
    max_value: usize,
) -> Result<ApiConn, HttpError> {
    let mut conn = crate::db::open(&shared.db_path, &shared.extension_path, sync)
        .map_err(|e| HttpError::Internal(e.to_string()))?;
    if query_only {
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| HttpError::Internal(format!("cannot make a reader query_only: {e}")))?;
        // Up to READERS of them exist: 1 MiB of page cache each (SQLite's default is 2)
        // keeps a busy node's memory in bounds; the OS page cache serves the rest.
        conn.pragma_update(None, "cache_size", -1024)
            .map_err(|e| HttpError::Internal(format!("cannot size a reader's cache: {e}")))?;
    }
    conn.set_prepared_statement_cache_capacity(64);
    let auth = Arc::new(AuthState::default());
    let hook = auth.clone();
    conn.authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
        hook.authorize(ctx)
    }))
    .map_err(|e| HttpError::Internal(format!("cannot install the API authorizer: {e}")))?;
    let dog = Watchdog::install(&mut conn)?;
    limit_value_size(&conn, max_value)?;
    Ok(ApiConn { conn, auth, dog })
}

/// A write request: statements run in order, all or nothing.
pub struct WriteRequest {
    pub specs: Vec<StatementSpec>,
    /// Collect returned rows (`/sql` answers the last statement's rows), at most
    /// `api.max_result_bytes` of them as JSON.
    pub keep_rows: bool,
    /// Set when the client went away: the request's statements stop and roll back.
    pub cancel: CancelToken,
    /// Lead the writer from a blocking thread rather than in place (`block_in_place`).
    /// In place saves a thread hop on the hot path (`/v1/transactions`), but the
    /// request's own future is then busy until its group commits, so a client leaving
    /// cannot cancel a request that leads: it stops at `api.query_timeout` at the
    /// latest. `/sql`, where hand-typed runaway statements come from, leads off-thread
    /// and is cancelled at once.
    pub lead_off_thread: bool,
}

/// What a committed write request did.
#[derive(Debug)]
pub struct WriteOutcome {
    pub results: Vec<StmtResult>,
    /// `crsql_db_version()` right after this request's changes; `None` when it changed
    /// nothing replicated.
    pub version: Option<i64>,
}

struct WriteJob {
    req: WriteRequest,
    reply: oneshot::Sender<Result<WriteOutcome, HttpError>>,
    queued_at: Instant,
}

/// The API's connections.
pub struct Pool {
    shared: Arc<NodeShared>,
    sync: Synchronous,
    writer: Arc<Writer>,
    readers: Mutex<Vec<ApiConn>>,
    slots: Arc<Semaphore>,
    /// Where reads run: one niced thread per slot.
    threads: ReaderThreads,
    limits: Limits,
}

impl Pool {
    /// Opens the writer (on its own thread) and one reader; `on_commit(requests, changed)`
    /// runs after every commit: how many requests it carried, whether any changed data.
    pub fn open(
        shared: Arc<NodeShared>,
        sync: Synchronous,
        on_commit: OnCommit,
        limits: Limits,
    ) -> Result<Arc<Pool>, HttpError> {
        let writer = open_api_conn(
            &shared,
            sync,
            false,
            WRITER_MAX_VALUE.max(limits.max_result_bytes),
        )?;
        let reader = open_api_conn(&shared, sync, true, limits.max_result_bytes)?;
        let writer = Arc::new(Writer {
            state: Mutex::new(WriterState {
                api: writer,
                keep: Keep {
                    limit: limits.max_result_bytes,
                    budget: Arc::new(Semaphore::new(
                        limits.max_result_bytes.saturating_mul(ANSWER_BUDGET_FACTOR),
                    )),
                },
                limits,
                ctl: Ctl::new(),
            }),
            queue: Mutex::new(VecDeque::new()),
            leading: AtomicBool::new(false),
            max_queue_wait: limits.query_timeout,
            on_commit,
        });
        Ok(Arc::new(Pool {
            shared,
            sync,
            writer,
            readers: Mutex::new(vec![reader]),
            slots: Arc::new(Semaphore::new(READERS)),
            threads: ReaderThreads::start(READERS)?,
            limits,
        }))
    }

    /// The limits API connections run under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Queues a write request, leads the writer if nobody does, and waits for the commit.
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, HttpError> {
        let off_thread = req.lead_off_thread;
        let (reply, rx) = oneshot::channel();
        self.writer
            .queue
            .lock()
            .map_err(|_| HttpError::Internal("the API write queue is poisoned".into()))?
            .push_back(WriteJob {
                req,
                reply,
                queued_at: Instant::now(),
            });
        if !self.writer.leading.load(Ordering::SeqCst) {
            let writer = self.writer.clone();
            let flavor = tokio::runtime::Handle::current().runtime_flavor();
            if flavor == tokio::runtime::RuntimeFlavor::MultiThread && !off_thread {
                tokio::task::block_in_place(|| writer.lead());
            } else {
                tokio::task::spawn_blocking(move || writer.lead());
            }
        }
        rx.await
            .map_err(|_| HttpError::Internal("the API writer dropped a request".into()))?
    }

    /// Runs `f` on a reader connection on a reader thread, under `api.query_timeout`.
    /// Answers 503 at once when every reader slot stays busy for [`READER_WAIT`].
    pub async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, HttpError>
    where
        T: Send + 'static,
        F: FnOnce(&ApiConn) -> Result<T, HttpError> + Send + 'static,
    {
        let permit = self.permit().await?;
        self.read_with(permit, f).await
    }

    /// As [`Pool::read`], but waits for a slot as long as it takes: for a live
    /// subscription stream, whose client is waiting for changes anyway and should not lose
    /// its stream to a burst of queries.
    pub async fn read_patiently<T, F>(self: &Arc<Self>, f: F) -> Result<T, HttpError>
    where
        T: Send + 'static,
        F: FnOnce(&ApiConn) -> Result<T, HttpError> + Send + 'static,
    {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HttpError::Unavailable("the API is shutting down".into()))?;
        self.read_with(permit, f).await
    }

    async fn read_with<T, F>(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        f: F,
    ) -> Result<T, HttpError>
    where
        T: Send + 'static,
        F: FnOnce(&ApiConn) -> Result<T, HttpError> + Send + 'static,
    {
        let me = self.clone();
        let (tx, rx) = oneshot::channel();
        self.spawn_reader(move || {
            let out = me.read_blocking(permit, None, |api, armed| {
                f(api).map_err(|e| armed.explain(e))
            });
            let _ = tx.send(out);
        })?;
        rx.await
            .map_err(|_| HttpError::Internal("a reader thread dropped its job".into()))?
    }

    /// Runs `job` on a reader thread (niced, see `readers`); call holding a reader slot.
    pub fn spawn_reader(&self, job: impl FnOnce() + Send + 'static) -> Result<(), HttpError> {
        self.threads.run(job)
    }

    /// Takes a reader slot (held for as long as a stream reads), or answers 503 when none
    /// frees up within [`READER_WAIT`].
    pub async fn permit(&self) -> Result<OwnedSemaphorePermit, HttpError> {
        match tokio::time::timeout(READER_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(HttpError::Unavailable("the API is shutting down".into())),
            Err(_) => Err(HttpError::Unavailable(format!(
                "overloaded: all {READERS} API reader connections are busy; retry shortly \
                 (queries are stopped after api.query_timeout = {:?})",
                self.limits.query_timeout
            ))),
        }
    }

    /// Runs `f` on a reader under `api.query_timeout` (and `cancel`, when given); call
    /// from a reader thread ([`Pool::spawn_reader`]) holding a permit.
    pub fn read_blocking<T>(
        &self,
        permit: OwnedSemaphorePermit,
        cancel: Option<CancelToken>,
        f: impl FnOnce(&ApiConn, &Armed<'_>) -> Result<T, HttpError>,
    ) -> Result<T, HttpError> {
        let taken = self.readers.lock().ok().and_then(|mut r| r.pop());
        let conn = match taken {
            Some(c) => c,
            None => open_api_conn(&self.shared, self.sync, true, self.limits.max_result_bytes)?,
        };
        let out = {
            let armed = conn.dog.arm(self.limits.query_timeout, cancel);
            f(&conn, &armed)
        };
        // A reader left inside a transaction (a failed stream) is not reused.
        if conn.conn.is_autocommit() {
            if let Ok(mut r) = self.readers.lock() {
                r.push(conn);
            }
        }
        drop(permit);
        out
    }
}

/// The writer's own transaction-control statements. They are prepared once and cached;
/// a per-process nonce in their text keeps a caller's identical text from ever reusing a
/// statement that was authorized in trusted mode.
struct Ctl {
    begin: String,
    commit: String,
    rollback: String,
    savepoint: String,
    release: String,
    rollback_to: String,
}

impl Ctl {
    fn new() -> Ctl {
        let nonce: u64 = rand::random();
        let sp = format!("patina_api_{nonce:016x}");
        let tag = format!("/* patina api {nonce:016x} */");
        Ctl {
            begin: format!("BEGIN IMMEDIATE {tag}"),
            commit: format!("COMMIT {tag}"),
            rollback: format!("ROLLBACK {tag}"),
            savepoint: format!("SAVEPOINT {sp}"),
            release: format!("RELEASE {sp}"),
            rollback_to: format!("ROLLBACK TO {sp}"),
        }
    }

    /// Runs one of the statements above with the authorizer's trust.
    fn run(&self, api: &ApiConn, sql: &str) -> Result<(), HttpError> {
        api.auth
            .trusted(|| api.conn.prepare_cached(sql).and_then(|mut s| s.execute([])))
            .map(|_| ())
            .map_err(|e| HttpError::from_sqlite(e, None))
    }
}

/// The writer connection and what runs with it.
struct WriterState {
    api: ApiConn,
    /// How `/sql` keeps rows, and the node-wide budget of answers held.
    keep: Keep,
    limits: Limits,
    ctl: Ctl,
}

/// The write queue and whoever leads it.
struct Writer {
    state: Mutex<WriterState>,
    queue: Mutex<VecDeque<WriteJob>>,
    /// True while a leader holds `state`: a new request then only queues.
    leading: AtomicBool,
    /// A request that waited longer than this for the writer is answered 503 unrun
    /// (`api.query_timeout`): runaway requests ahead of it, each stopped only at the
    /// limit, must not add up to a queue that hangs every writer.
    max_queue_wait: Duration,
    on_commit: OnCommit,
}

/// Groups one leader commits before handing the lead on (so no request's own answer waits
/// behind an endless stream of others).
const GROUPS_PER_LEADER: usize = 4;

impl Writer {
    /// The next job to run. Jobs whose client already left are dropped unrun (a short
    /// statement finishes before the watchdog's first check, so cancellation alone would
    /// still apply it); jobs that waited past `max_queue_wait` are answered 503 unrun.
    fn pop(&self) -> Option<WriteJob> {
        loop {
            let job = self.queue.lock().ok().and_then(|mut q| q.pop_front())?;
            if job.req.cancel.is_cancelled() {
                let _ = job.reply.send(Err(HttpError::Cancelled));
                continue;
            }
            let waited = job.queued_at.elapsed();
            if waited > self.max_queue_wait {
                let _ = job.reply.send(Err(HttpError::Unavailable(format!(
                    "the writer is busy: this request waited {} ms behind others (more than \
                     api.query_timeout) and was not run; nothing was applied, retry shortly",
                    waited.as_millis()
                ))));
                continue;
            }
            return Some(job);
        }
    }

    fn queued(&self) -> bool {
        self.queue.lock().map(|q| !q.is_empty()).unwrap_or(false)
    }

    /// Commits waiting jobs if no one else is; hands the lead to a blocking thread when
    /// jobs remain. A request that saw `leading` set and only queued is picked up because
    /// the leader looks at the queue again after clearing the flag.
    fn lead(self: &Arc<Self>) {
        let state = match self.state.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        self.leading.store(true, Ordering::SeqCst);
        for _ in 0..GROUPS_PER_LEADER {
            match self.pop() {
                Some(first) => state.run_group(first, || self.pop(), &self.on_commit),
                None => break,
            }
        }
        self.leading.store(false, Ordering::SeqCst);
        drop(state);
        if self.queued() {
            let next = self.clone();
            tokio::task::spawn_blocking(move || next.lead());
        }
    }
}

impl WriterState {
    /// One group commit: `first`, then whatever `pop` yields (up to [`MAX_GROUP`]).
    ///
    /// The first request of a group runs bare in the transaction (if it fails, the whole
    /// transaction is rolled back: nothing else is in it); each later one runs in a
    /// savepoint, so its failure takes back only its own statements.
    fn run_group(
        &self,
        first: WriteJob,
        mut pop: impl FnMut() -> Option<WriteJob>,
        on_commit: &OnCommit,
    ) {
        let (api, ctl, limits, keep) = (&self.api, &self.ctl, self.limits, &self.keep);
        if let Err(e) = begin(api, ctl) {
            let _ = first.reply.send(Err(e));
            return;
        }
        let mut version = match db_version(api) {
            Ok(v) => v,
            Err(e) => {
                let _ = ctl.run(api, &ctl.rollback);
                let _ = first.reply.send(Err(e));
                return;
            }
        };
        let mut done: Vec<(WriteJob, Result<WriteOutcome, HttpError>)> = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            let first_of_group = done.is_empty();
            let res = {
                let armed = api
                    .dog
                    .arm(limits.query_timeout, Some(job.req.cancel.clone()));
                let keep = job.req.keep_rows.then_some(keep);
                run_job(api, ctl, &job.req, keep, version, !first_of_group)
                    .map_err(|e| armed.explain(e))
            };
            if first_of_group && res.is_err() {
                if !api.conn.is_autocommit() {
                    let _ = ctl.run(api, &ctl.rollback);
                }
                let _ = job.reply.send(res);
                return;
            }
            if api.conn.is_autocommit() {
                // SQLite rolled the whole transaction back (disk full, I/O error): every
                // request of the group is lost, so none may be acknowledged.
                let err = match &res {
                    Err(e) => e.clone_msg(),
                    Ok(_) => HttpError::Internal("the write transaction was rolled back".into()),
                };
                for (j, r) in done.drain(..) {
                    let _ = j.reply.send(r.and_then(|_| Err(err.clone_msg())));
                }
                let _ = job.reply.send(res.and_then(|_| Err(err.clone_msg())));
                return;
            }
            if let Ok(o) = &res {
                if let Some(v) = o.version {
                    version = v;
                }
            }
            done.push((job, res));
            if done.len() < MAX_GROUP {
                next = pop();
            }
        }
        let changed = done
            .iter()
            .any(|(_, r)| r.as_ref().is_ok_and(|o| o.version.is_some()));
        if let Err(err) = ctl.run(api, &ctl.commit) {
            let _ = ctl.run(api, &ctl.rollback);
            for (j, r) in done {
                let _ = j.reply.send(r.and_then(|_| Err(err.clone_msg())));
            }
            return;
        }
        on_commit(done.iter().filter(|(_, r)| r.is_ok()).count(), changed);
        for (j, r) in done {
            let _ = j.reply.send(r);
        }
    }
}

/// `BEGIN IMMEDIATE`: waits up to the busy timeout for another process's write lock, then
/// tries once more before answering 503.
fn begin(api: &ApiConn, ctl: &Ctl) -> Result<(), HttpError> {
    match ctl.run(api, &ctl.begin) {
        Ok(()) => Ok(()),
        Err(_) => {
            std::thread::sleep(Duration::from_millis(10));
            ctl.run(api, &ctl.begin)
        }
    }
}

/// Runs one request in the group's transaction (in its own savepoint unless it is the
/// group's first). `before` is `crsql_db_version()` before it.
fn run_job(
    api: &ApiConn,
    ctl: &Ctl,
    req: &WriteRequest,
    keep_rows: Option<&Keep>,
    before: i64,
    savepoint: bool,
) -> Result<WriteOutcome, HttpError> {
    if savepoint {
        ctl.run(api, &ctl.savepoint)?;
    }
    let changes_before = api.conn.total_changes();
    match run_specs(&api.conn, &api.auth, &req.specs, keep_rows) {
        Ok(results) => {
            if savepoint {
                ctl.run(api, &ctl.release)?;
            }
            // No row written (triggers included): no need to ask the extension.
            let after = if api.conn.total_changes() == changes_before {
                before
            } else {
                db_version(api)?
            };
            Ok(WriteOutcome {
                results,
                version: (after != before).then_some(after),
            })
        }
        Err(e) => {
            if savepoint && !api.conn.is_autocommit() {
                let _ = ctl.run(api, &ctl.rollback_to);
                let _ = ctl.run(api, &ctl.release);
            }
            Err(e)
        }
    }
}

/// `crsql_db_version()` on this connection (its own uncommitted changes included).
///
/// Read straight from the extension's state row with a cached statement: the function
/// prepares two statements per call (~12 µs), twice per request on the write path. The
/// function stays the fallback should the state table ever change shape.
pub fn db_version(api: &ApiConn) -> Result<i64, HttpError> {
    api.auth.trusted(|| {
        let direct = api
            .conn
            .prepare_cached("SELECT db_version FROM patina_state WHERE id = 0")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)));
        match direct {
            Ok(v) => Ok(v),
            Err(_) => api
                .conn
                .prepare_cached("SELECT crsql_db_version()")
                .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
                .map_err(|e| HttpError::Internal(format!("cannot read crsql_db_version(): {e}"))),
        }
    })
}
