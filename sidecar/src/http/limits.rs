//! Limits on what a caller's SQL may cost: a time limit and cancellation enforced through
//! SQLite's progress handler, and a cap on the size of any one value.
//!
//! Why: the API runs whatever SQL a caller sends. A recursive CTE without an end runs
//! forever; each such query held a reader slot (or, through `/sql`, the write lock) and a
//! core for good, and went on after its client had left. Every API connection therefore
//! carries a [`Watchdog`]: while a request runs, SQLite calls it every few thousand VM
//! steps, and it stops the statement once `api.query_timeout` has passed or the request's
//! [`CancelToken`] was set (the client went away: its response body or handler future was
//! dropped). `SELECT randomblob(1e9)` is stopped by SQLite itself: API connections get a
//! `SQLITE_LIMIT_LENGTH` (see [`limit_value_size`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::error::HttpError;

/// VM steps between two looks at the clock: ~0.1 ms of work, so a limit is kept to well
/// under a millisecond and the check costs nothing measurable.
const STEPS_PER_CHECK: i32 = 10_000;

/// Set when nobody wants a request's answer any more; the statement running for it stops
/// at the watchdog's next check.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// A guard that cancels when dropped: held by the handler future and then by the
    /// response body, so a client leaving at any point stops the work done for it.
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// Cancels its token when dropped (see [`CancelToken::on_drop`]).
#[derive(Debug)]
pub struct CancelOnDrop(CancelToken);

impl CancelOnDrop {
    /// The request finished normally: dropping the guard no longer cancels anything.
    pub fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

const FIRED_NONE: u8 = 0;
const FIRED_TIMEOUT: u8 = 1;
const FIRED_CANCELLED: u8 = 2;

/// The progress handler of one connection and the limits of the request it runs now.
#[derive(Debug)]
pub struct Watchdog {
    epoch: Instant,
    /// Milliseconds since `epoch` past which statements are stopped; 0: no request runs.
    deadline_ms: AtomicU64,
    cancel: Mutex<Option<CancelToken>>,
    /// Why the handler last stopped a statement (`FIRED_*`).
    fired: AtomicU8,
}

impl Watchdog {
    /// Installs the progress handler on `conn`.
    pub fn install(conn: &mut Connection) -> Result<Arc<Watchdog>, HttpError> {
        let dog = Arc::new(Watchdog {
            epoch: Instant::now(),
            deadline_ms: AtomicU64::new(0),
            cancel: Mutex::new(None),
            fired: AtomicU8::new(FIRED_NONE),
        });
        let d = dog.clone();
        conn.progress_handler(STEPS_PER_CHECK, Some(move || d.should_stop()))
            .map_err(|e| {
                HttpError::Internal(format!("cannot install the query time limit: {e}"))
            })?;
        Ok(dog)
    }

    /// Called by SQLite; `true` interrupts the running statement.
    fn should_stop(&self) -> bool {
        let deadline = self.deadline_ms.load(Ordering::Relaxed);
        if deadline == 0 {
            return false;
        }
        if self.epoch.elapsed().as_millis() as u64 >= deadline {
            self.fired.store(FIRED_TIMEOUT, Ordering::Relaxed);
            return true;
        }
        let cancelled = self
            .cancel
            .lock()
            .map(|c| c.as_ref().is_some_and(CancelToken::is_cancelled))
            .unwrap_or(false);
        if cancelled {
            self.fired.store(FIRED_CANCELLED, Ordering::Relaxed);
        }
        cancelled
    }

    /// Starts the limits of one request; they end when the returned guard is dropped.
    pub fn arm(&self, timeout: Duration, cancel: Option<CancelToken>) -> Armed<'_> {
        let deadline = (self.epoch.elapsed() + timeout).as_millis().max(1) as u64;
        if let Ok(mut c) = self.cancel.lock() {
            *c = cancel;
        }
        self.fired.store(FIRED_NONE, Ordering::Relaxed);
        self.deadline_ms.store(deadline, Ordering::Relaxed);
        Armed { dog: self, timeout }
    }
}

/// The limits of one running request (see [`Watchdog::arm`]).
pub struct Armed<'a> {
    dog: &'a Watchdog,
    timeout: Duration,
}

impl Armed<'_> {
    /// Turns the error of a statement the watchdog stopped into one that says why; any
    /// other error is returned as it is.
    pub fn explain(&self, err: HttpError) -> HttpError {
        match self.dog.fired.load(Ordering::Relaxed) {
            FIRED_TIMEOUT => HttpError::QueryTimeout {
                limit: self.timeout,
            },
            FIRED_CANCELLED => HttpError::Cancelled,
            _ => err,
        }
    }

    /// True once the client of this request went away.
    pub fn cancelled(&self) -> bool {
        self.dog
            .cancel
            .lock()
            .map(|c| c.as_ref().is_some_and(CancelToken::is_cancelled))
            .unwrap_or(false)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.dog.deadline_ms.store(0, Ordering::Relaxed);
        if let Ok(mut c) = self.dog.cancel.lock() {
            *c = None;
        }
    }
}

/// Caps every TEXT or BLOB value the connection creates or reads at `bytes`
/// (`SQLITE_LIMIT_LENGTH`), so `SELECT randomblob(1e9)` fails in SQLite with "string or
/// blob too big" instead of allocating a gigabyte before the API could refuse the result.
pub fn limit_value_size(conn: &Connection, bytes: usize) -> Result<(), HttpError> {
    let n = i32::try_from(bytes).unwrap_or(i32::MAX);
    conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, n)
        .map(|_| ())
        .map_err(|e| HttpError::Internal(format!("cannot limit value sizes: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RUNAWAY: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                           SELECT count(*) FROM c";

    fn run(conn: &Connection, sql: &str) -> Result<i64, HttpError> {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map_err(|e| HttpError::from_sqlite(e, None))
    }

    #[test]
    fn a_runaway_query_stops_at_the_limit_and_the_next_one_runs() {
        let mut conn = Connection::open_in_memory().unwrap();
        let dog = Watchdog::install(&mut conn).unwrap();
        {
            let armed = dog.arm(Duration::from_millis(100), None);
            let err = armed.explain(run(&conn, RUNAWAY).unwrap_err());
            assert!(matches!(err, HttpError::QueryTimeout { .. }), "{err}");
            assert!(err.to_string().contains("api.query_timeout"), "{err}");
        }
        // Disarmed: nothing stops a statement between requests.
        assert_eq!(run(&conn, "SELECT 41 + 1").unwrap(), 42);
        let armed = dog.arm(Duration::from_secs(60), None);
        assert_eq!(run(&conn, "SELECT 42").unwrap(), 42);
        drop(armed);
    }

    #[test]
    fn a_cancelled_request_stops_its_statement() {
        let mut conn = Connection::open_in_memory().unwrap();
        let dog = Watchdog::install(&mut conn).unwrap();
        let token = CancelToken::new();
        let guard = token.on_drop();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(guard);
        });
        let armed = dog.arm(Duration::from_secs(600), Some(token));
        let err = armed.explain(run(&conn, RUNAWAY).unwrap_err());
        assert!(matches!(err, HttpError::Cancelled), "{err}");
        canceller.join().unwrap();
    }

    #[test]
    fn values_past_the_size_limit_are_refused_by_sqlite() {
        let conn = Connection::open_in_memory().unwrap();
        limit_value_size(&conn, 1024).unwrap();
        let err = conn
            .query_row("SELECT length(randomblob(2000))", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_err();
        assert!(err.to_string().contains("too big"), "{err}");
        let n: i64 = conn
            .query_row("SELECT length(randomblob(1000))", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1000);
    }
}
