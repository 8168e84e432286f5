//! The subscriptions' persisted state, in `patina_api_*` tables of the node's database:
//! each subscription's statement, its current rows and its change log. One engine
//! transaction writes a round's changes, rows and last change id together, so the log a
//! client resumes from and the rows a new client starts from always agree, across
//! restarts too. Streams read the log through reader connections (`snapshot`,
//! `changes_after`).

use rusqlite::{params, Connection, OptionalExtension};

use super::diff::{Change, Rows};
use super::error::SubError;
use crate::http::authorizer::AuthState;

/// Changes kept per subscription for resuming; older ones are pruned.
pub const RETAINED_CHANGES: i64 = 100_000;

/// The engine's tables (created on start; refused to API callers like every `patina_*`).
pub const SCHEMA: &str = "
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

/// One stored subscription as loaded at start.
pub struct Stored {
    pub id: String,
    pub hash: String,
    /// The statement as JSON text (`StatementSpec::to_json`).
    pub query: String,
    /// Result column names as a JSON array.
    pub columns: String,
    pub last_change: i64,
    pub next_rowid: i64,
    pub rows: Rows,
}

/// Runs `f` in one `BEGIN IMMEDIATE` transaction, rolled back when it fails.
pub fn in_transaction<T>(
    conn: &Connection,
    f: impl FnOnce() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match f() {
        Ok(v) => conn.execute_batch("COMMIT").map(|()| v),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// One read snapshot held across the evaluations of a round (a deferred transaction).
///
/// Outside a transaction every keyed query is its own read transaction, and taking and
/// dropping the WAL read lock (shared-memory `fcntl` locks, a page cache check) cost more
/// than the lookup itself: a quarter of the engine's CPU with 100 subscriptions. Inside
/// one, the lock is taken once per round, and all the round's subscriptions see the same
/// database state. Writes to `temp` tables (the touched keys) are allowed; the main
/// database is only read. Rolled back when dropped without a successful
/// [`ReadSnapshot::end`] (a round that failed), under the engine's trust: the API's
/// authorizer refuses transaction control otherwise, and a transaction left open would
/// make every later round fail to begin.
pub struct ReadSnapshot<'c> {
    conn: &'c Connection,
    auth: &'c AuthState,
    open: bool,
}

impl<'c> ReadSnapshot<'c> {
    /// Begins the transaction; the snapshot is taken at its first read.
    pub fn begin(conn: &'c Connection, auth: &'c AuthState) -> rusqlite::Result<ReadSnapshot<'c>> {
        auth.trusted(|| conn.prepare_cached("BEGIN")?.execute([]))?;
        Ok(ReadSnapshot {
            conn,
            auth,
            open: true,
        })
    }

    /// Ends the transaction (keeping what it wrote to `temp`).
    pub fn end(mut self) -> rusqlite::Result<()> {
        self.auth
            .trusted(|| self.conn.prepare_cached("COMMIT")?.execute([]))?;
        self.open = false;
        Ok(())
    }
}

impl Drop for ReadSnapshot<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.auth.trusted(|| self.conn.execute_batch("ROLLBACK"));
        }
    }
}

/// Every persisted subscription with its rows.
pub fn load(conn: &Connection) -> Result<Vec<Stored>, SubError> {
    let mut stmt = conn.prepare(
        "SELECT id, hash, query, columns, last_change_id, next_rowid FROM patina_api_subs",
    )?;
    let subs = stmt
        .query_map([], |r| {
            Ok(Stored {
                id: r.get(0)?,
                hash: r.get(1)?,
                query: r.get(2)?,
                columns: r.get(3)?,
                last_change: r.get(4)?,
                next_rowid: r.get(5)?,
                rows: Rows::new(),
            })
        })?
        .collect::<rusqlite::Result<Vec<Stored>>>()?;
    let mut rows_stmt =
        conn.prepare("SELECT key, rowid, vals FROM patina_api_sub_rows WHERE sub_id = ?1")?;
    let mut out = Vec::with_capacity(subs.len());
    for mut s in subs {
        s.rows = rows_stmt
            .query_map([&s.id], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
            .collect::<rusqlite::Result<Rows>>()?;
        out.push(s);
    }
    Ok(out)
}

/// Records a new subscription and its first rows (inside the caller's transaction).
pub fn insert(
    conn: &Connection,
    id: &str,
    hash: &str,
    query: &str,
    columns: &str,
    rows: &Rows,
    next_rowid: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO patina_api_subs (id, hash, query, columns, last_change_id, next_rowid) \
         VALUES (?1, ?2, ?3, ?4, 0, ?5)",
        params![id, hash, query, columns, next_rowid],
    )?;
    let mut ins = conn.prepare_cached(
        "INSERT INTO patina_api_sub_rows (sub_id, key, rowid, vals) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (key, (rowid, vals)) in rows {
        ins.execute(params![id, key, rowid, vals])?;
    }
    Ok(())
}

/// Writes one subscription's changes after `last_change`, its rows and counters (inside
/// the caller's transaction). Returns the new last change id.
pub fn persist(
    conn: &Connection,
    id: &str,
    last_change: i64,
    changes: &[Change],
    next_rowid: i64,
) -> rusqlite::Result<i64> {
    let mut log = conn.prepare_cached(
        "INSERT INTO patina_api_sub_changes (sub_id, change_id, kind, rowid, vals) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut upsert = conn.prepare_cached(
        "INSERT INTO patina_api_sub_rows (sub_id, key, rowid, vals) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (sub_id, key) DO UPDATE SET rowid = excluded.rowid, vals = excluded.vals",
    )?;
    let mut delete =
        conn.prepare_cached("DELETE FROM patina_api_sub_rows WHERE sub_id = ?1 AND key = ?2")?;
    let mut change_id = last_change;
    for c in changes {
        change_id += 1;
        log.execute(params![id, change_id, c.kind, c.rowid, c.vals])?;
        if c.kind == "delete" {
            delete.execute(params![id, c.key])?;
        } else {
            upsert.execute(params![id, c.key, c.rowid, c.vals])?;
        }
    }
    conn.prepare_cached(
        "UPDATE patina_api_subs SET last_change_id = ?2, next_rowid = ?3 WHERE id = ?1",
    )?
    .execute(params![id, change_id, next_rowid])?;
    conn.prepare_cached(
        "DELETE FROM patina_api_sub_changes WHERE sub_id = ?1 AND change_id <= ?2",
    )?
    .execute(params![id, change_id - RETAINED_CHANGES])?;
    Ok(change_id)
}

/// Deletes a subscription with its rows and log (inside the caller's transaction).
pub fn delete(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    for t in ["patina_api_sub_changes", "patina_api_sub_rows"] {
        conn.execute(&format!("DELETE FROM {t} WHERE sub_id = ?1"), [id])?;
    }
    conn.execute("DELETE FROM patina_api_subs WHERE id = ?1", [id])?;
    Ok(())
}

/// The rows of a subscription (row id, values as JSON text) and its last change id, read
/// in one snapshot.
pub fn snapshot(conn: &Connection, id: &str) -> Result<(Vec<(i64, String)>, i64), SubError> {
    conn.execute_batch("BEGIN")?;
    let res = (|| {
        let last: i64 = conn
            .query_row(
                "SELECT last_change_id FROM patina_api_subs WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let mut stmt = conn.prepare_cached(
            "SELECT rowid, vals FROM patina_api_sub_rows WHERE sub_id = ?1 ORDER BY rowid",
        )?;
        let rows: Vec<(i64, String)> = stmt
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok((rows, last))
    })();
    let _ = conn.execute_batch("COMMIT");
    res.map_err(SubError::Storage)
}

/// One logged change: (change id, kind, row id, values as JSON text).
pub type LoggedChange = (i64, String, i64, String);

/// Up to `limit` logged changes after `after`, in order, and the oldest retained id.
pub fn changes_after(
    conn: &Connection,
    id: &str,
    after: i64,
    limit: i64,
) -> Result<(Vec<LoggedChange>, Option<i64>), SubError> {
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT min(change_id) FROM patina_api_sub_changes WHERE sub_id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let mut stmt = conn.prepare_cached(
        "SELECT change_id, kind, rowid, vals FROM patina_api_sub_changes \
         WHERE sub_id = ?1 AND change_id > ?2 ORDER BY change_id LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![id, after, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<Vec<LoggedChange>>>()?;
    Ok((rows, oldest))
}
