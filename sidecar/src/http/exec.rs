//! Running a caller's statements on an API connection: statement-tail splitting, parameter
//! binding, the VACUUM refusal the authorizer cannot make, and result collection.
//!
//! Everything here runs on a blocking thread with the connection's authorizer in force; the
//! caller (the writer, a reader) owns the transaction around it.

use std::sync::Arc;
use std::time::Instant;

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::{Batch, Connection, Statement};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::authorizer::{leading_keyword, AuthState, VACUUM_REFUSED};
use super::error::HttpError;
use super::json_values::{add_json_len, Cell, Params, StatementSpec};

/// How a request keeps returned rows (only `/sql` answers them).
#[derive(Clone, Debug)]
pub struct Keep {
    /// `api.max_result_bytes`: the largest answer, counted as JSON bytes.
    pub limit: usize,
    /// Bytes of answers the node holds in memory at once, all requests together: without
    /// it, many concurrent answers just under the limit (or slow readers of them) would
    /// add up without bound.
    pub budget: Arc<Semaphore>,
}

/// Bytes taken from [`Keep::budget`] at a time (one semaphore call per 64 KiB).
const BUDGET_CHUNK: usize = 64 * 1024;

/// Column names and rows of a statement's result.
#[derive(Debug)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
    /// This answer's share of [`Keep::budget`]; released once the answer has been sent.
    pub held: Option<OwnedSemaphorePermit>,
}

/// What one statement did.
#[derive(Debug)]
pub struct StmtResult {
    /// Which spec of the request this statement came from (a spec's text may hold several).
    pub spec: usize,
    /// Rows changed by this statement (0 for a query).
    pub rows_affected: usize,
    /// Seconds spent running it.
    pub time: f64,
    /// Column names and rows when the statement returned rows (a query, or `RETURNING`)
    /// and rows were kept: only the last statement's, as only they are answered. Values
    /// stay SQLite values here; they are written as JSON after the transaction ended, so
    /// the write lock is never held while encoding.
    pub rows: Option<Rows>,
}

/// Maps a SQLite error, naming the authorizer's reason when it refused the statement.
/// SQLite reports some refusals (a denied function) as a plain error, so a recorded denial
/// decides: it is a 403 whatever the error code.
pub fn sql_error(err: rusqlite::Error, auth: &AuthState) -> HttpError {
    match auth.take_denial() {
        Some(reason) => HttpError::Forbidden(reason),
        None => HttpError::from_sqlite(err, None),
    }
}

/// Runs every statement of every spec in order, collecting one [`StmtResult`] per SQL
/// statement. `keep_rows` (only `/sql` answers rows) keeps the last returned rows, up to
/// that many bytes as JSON: past it the request fails with
/// [`HttpError::ResultTooLarge`]. Stops at the first error; the caller rolls back.
pub fn run_specs(
    conn: &Connection,
    auth: &AuthState,
    specs: &[StatementSpec],
    keep_rows: Option<&Keep>,
) -> Result<Vec<StmtResult>, HttpError> {
    let mut out: Vec<StmtResult> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        run_spec(conn, auth, i, spec, keep_rows, &mut out)?;
    }
    Ok(out)
}

/// The statement's column names. rusqlite panics on a name that is not UTF-8 (an app can
/// create a table with any bytes in its column names); that becomes a 400 naming the
/// column's position instead of a dropped connection.
pub fn column_names(stmt: &Statement<'_>) -> Result<Vec<String>, HttpError> {
    (0..stmt.column_count())
        .map(|i| {
            let name = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                stmt.column_name(i).map(String::from)
            }));
            match name {
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => Err(HttpError::Sql(e.to_string())),
                Err(_) => Err(HttpError::BadRequest(format!(
                    "the name of result column {} is not valid UTF-8; give it an alias \
                     (SELECT col AS name)",
                    i + 1
                ))),
            }
        })
        .collect()
}

/// Refuses SQL text holding a NUL byte: SQLite stops reading at the first NUL, so the
/// statements after it would be dropped without a word.
pub fn refuse_nul(sql: &str) -> Result<(), HttpError> {
    match sql.bytes().position(|b| b == 0) {
        Some(at) => Err(HttpError::BadRequest(format!(
            "the SQL text holds a NUL byte at offset {at}; SQLite would silently ignore \
             everything after it, so nothing was run"
        ))),
        None => Ok(()),
    }
}

/// Runs one spec: its SQL text may hold several statements when it has no parameters.
fn run_spec(
    conn: &Connection,
    auth: &AuthState,
    index: usize,
    spec: &StatementSpec,
    keep_rows: Option<&Keep>,
    out: &mut Vec<StmtResult>,
) -> Result<(), HttpError> {
    refuse_nul(&spec.sql)?;
    if is_single_statement(&spec.sql) {
        let _ = auth.take_denial();
        let mut stmt = conn
            .prepare_cached(&spec.sql)
            .map_err(|e| sql_error(e, auth))?;
        refuse_unauthorizable(&stmt)?;
        bind(&mut stmt, &spec.params)?;
        let res = step(conn, auth, &mut stmt, keep_rows)?;
        push(out, index, res);
        return Ok(());
    }
    let mut batch = Batch::new(conn, &spec.sql);
    let mut count = 0usize;
    loop {
        let _ = auth.take_denial();
        let next = batch.next().map_err(|e| sql_error(e, auth))?;
        let Some(mut stmt) = next else { break };
        count += 1;
        if count > 1 && !matches!(spec.params, Params::None) {
            return Err(HttpError::BadRequest(format!(
                "parameters were given for a text holding several statements; send each \
                 statement separately: {}",
                spec.sql
            )));
        }
        refuse_unauthorizable(&stmt)?;
        bind(&mut stmt, &spec.params)?;
        let res = step(conn, auth, &mut stmt, keep_rows)?;
        push(out, index, res);
    }
    if count == 0 {
        return Err(HttpError::BadRequest(format!(
            "no SQL statement in {:?}",
            spec.sql
        )));
    }
    Ok(())
}

/// Records a statement's result; only the last returned rows are kept.
fn push(out: &mut Vec<StmtResult>, index: usize, mut res: StmtResult) {
    res.spec = index;
    if res.rows.is_some() {
        for earlier in out.iter_mut() {
            earlier.rows = None;
        }
    }
    out.push(res);
}

/// True when the text surely holds one statement (no `;` but trailing ones): then it is
/// prepared through the connection's statement cache. A `;` inside a literal only sends
/// the text down the general path.
fn is_single_statement(sql: &str) -> bool {
    let body = sql.trim_end().trim_end_matches(';');
    !body.trim().is_empty() && !body.contains(';') && !sql.contains("--") && !sql.contains("/*")
}

/// Refuses what SQLite never shows the authorizer: VACUUM (including VACUUM INTO).
pub fn refuse_unauthorizable(stmt: &Statement<'_>) -> Result<(), HttpError> {
    let sql = stmt.expanded_sql().unwrap_or_default();
    if leading_keyword(&sql) == "VACUUM" {
        return Err(HttpError::Forbidden(VACUUM_REFUSED.into()));
    }
    Ok(())
}

/// Binds positional or named parameters, checking their count and names first so the
/// caller gets a clear 400 instead of a silently NULL parameter.
pub fn bind(stmt: &mut Statement<'_>, params: &Params) -> Result<(), HttpError> {
    let expected = stmt.parameter_count();
    match params {
        Params::None => {
            if expected > 0 {
                return Err(HttpError::Sql(format!(
                    "wrong number of parameters: the statement takes {expected}, got 0"
                )));
            }
        }
        Params::Positional(ps) => {
            if ps.len() != expected {
                return Err(HttpError::Sql(format!(
                    "wrong number of parameters: the statement takes {expected}, got {}",
                    ps.len()
                )));
            }
            for (i, p) in ps.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, p)
                    .map_err(|e| HttpError::Sql(e.to_string()))?;
            }
        }
        Params::Named(ns) => {
            for (name, p) in ns {
                let idx = named_index(stmt, name)?;
                stmt.raw_bind_parameter(idx, p)
                    .map_err(|e| HttpError::Sql(e.to_string()))?;
            }
            if ns.len() != expected {
                return Err(HttpError::Sql(format!(
                    "wrong number of parameters: the statement takes {expected}, got {}",
                    ns.len()
                )));
            }
        }
    }
    Ok(())
}

/// The index of a named parameter; a name without its sigil matches `:name`, `@name` or
/// `$name`.
fn named_index(stmt: &Statement<'_>, name: &str) -> Result<usize, HttpError> {
    let candidates: Vec<String> = if name.starts_with([':', '@', '$']) {
        vec![name.to_owned()]
    } else {
        vec![format!(":{name}"), format!("@{name}"), format!("${name}")]
    };
    for c in &candidates {
        if let Ok(Some(i)) = stmt.parameter_index(c) {
            return Ok(i);
        }
    }
    Err(HttpError::Sql(format!(
        "no parameter named {name} in the statement"
    )))
}

/// Steps a bound statement to completion, keeping its rows when `keep_rows` gives a
/// budget of JSON bytes.
fn step(
    conn: &Connection,
    auth: &AuthState,
    stmt: &mut Statement<'_>,
    keep_rows: Option<&Keep>,
) -> Result<StmtResult, HttpError> {
    let start = Instant::now();
    let ncols = stmt.column_count();
    if ncols == 0 {
        let n = stmt.raw_execute().map_err(|e| sql_error(e, auth))?;
        return Ok(StmtResult {
            spec: 0,
            rows_affected: n,
            time: start.elapsed().as_secs_f64(),
            rows: None,
        });
    }
    let readonly = stmt.readonly();
    let columns = column_names(stmt)?;
    let mut rows_out = Vec::new();
    // `{"columns":[...],"rows":[` and the brackets and commas of each row count too.
    let mut size = columns.iter().map(|c| c.len() + 3).sum::<usize>() + 64;
    let mut held: Option<OwnedSemaphorePermit> = None;
    {
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(|e| sql_error(e, auth))? {
            let Some(keep) = keep_rows else { continue };
            let mut vals = Vec::with_capacity(ncols);
            size += 2;
            for (i, column) in columns.iter().enumerate() {
                let v = row.get_ref(i).map_err(|e| sql_error(e, auth))?;
                // Measured before anything is copied: a 40 MB blob is refused, not cloned.
                add_json_len(&mut size, v, keep.limit)?;
                charge(keep, size, &mut held)?;
                vals.push(Cell::from_ref(v, column)?);
            }
            rows_out.push(vals);
        }
    }
    let rows_affected = if readonly {
        0
    } else {
        usize::try_from(conn.changes()).unwrap_or(0)
    };
    Ok(StmtResult {
        spec: 0,
        rows_affected,
        time: start.elapsed().as_secs_f64(),
        rows: keep_rows.map(|_| Rows {
            columns,
            rows: rows_out,
            held,
        }),
    })
}

/// Takes budget up to `size` bytes (never waits: the writer holds the write lock here).
fn charge(
    keep: &Keep,
    size: usize,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), HttpError> {
    let have = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
    if size <= have {
        return Ok(());
    }
    let want = (size - have).div_ceil(BUDGET_CHUNK) * BUDGET_CHUNK;
    let n = u32::try_from(want).unwrap_or(u32::MAX);
    match keep.budget.clone().try_acquire_many_owned(n) {
        Ok(p) => {
            match held {
                Some(h) => h.merge(p),
                None => *held = Some(p),
            }
            Ok(())
        }
        Err(_) => Err(HttpError::Unavailable(format!(
            "the node holds as many large answers as it may right now ({} bytes in all); \
             retry shortly, or select less",
            keep.budget.available_permits() + have
        ))),
    }
}
