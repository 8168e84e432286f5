//! Reading the change feed: `crsql_changes` by local `db_version`, as sync messages.
//!
//! Every read here runs inside one read transaction, so it contains whole transactions
//! only (DESIGN §2): the tailer ships each read as one unit, and a pull answer is a
//! version-ranged chunk of one fixed unit.

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, Row};

use crate::sync::{known_covers, Change, Chunk, SiteId, Skipped, Value};

/// The feed query; `?3` excludes the changes credited to one site (the requester's own).
const FEED_SQL: &str =
    "SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, \
     origin_version FROM crsql_changes WHERE db_version > ?1 AND db_version <= ?2 \
     AND site_id IS NOT ?3";

/// Limits of one chunk.
#[derive(Clone, Copy, Debug)]
pub struct ChunkLimits {
    pub max_changes: usize,
    pub max_bytes: usize,
}

/// This database's current `crsql_db_version()`.
pub fn db_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT crsql_db_version()", [], |r| r.get(0))
}

/// This database's `crsql_site_id()`.
pub fn site_id(conn: &Connection) -> rusqlite::Result<SiteId> {
    let v: Vec<u8> = conn.query_row("SELECT crsql_site_id()", [], |r| r.get(0))?;
    let mut s = [0u8; 16];
    if v.len() != 16 {
        return Err(rusqlite::Error::InvalidColumnType(
            0,
            "crsql_site_id() (expected 16 bytes)".into(),
            rusqlite::types::Type::Blob,
        ));
    }
    s.copy_from_slice(&v);
    Ok(s)
}

fn row_to_change(r: &Row<'_>) -> rusqlite::Result<Change> {
    let val = match r.get::<_, SqlValue>(3)? {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => Value::Integer(i),
        SqlValue::Real(f) => Value::Real(f),
        SqlValue::Text(s) => Value::Text(s),
        SqlValue::Blob(b) => Value::Blob(b),
    };
    Ok(Change {
        table: r.get(0)?,
        pk: r.get(1)?,
        cid: r.get(2)?,
        val,
        col_version: r.get(4)?,
        db_version: r.get(5)?,
        site_id: r.get::<_, Option<Vec<u8>>>(6)?.unwrap_or_default(),
        cl: r.get(7)?,
        seq: r.get(8)?,
        origin_version: r.get(9)?,
    })
}

/// Reads `(after, upto]`, stopping after `limits` when given. Returns the changes and the
/// version the read covers up to (`upto` unless it stopped early). The caller holds the
/// read transaction.
pub fn read_range(
    conn: &Connection,
    after: i64,
    upto: i64,
    exclude: Option<&SiteId>,
    known: &[Skipped],
    limits: Option<ChunkLimits>,
) -> rusqlite::Result<(Vec<Change>, i64)> {
    let mut stmt = conn.prepare_cached(FEED_SQL)?;
    let exclude = exclude.map(|s| s.to_vec());
    let mut rows = stmt.query(params![after, upto, exclude])?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let c = row_to_change(r)?;
        if known_covers(known, &c) {
            continue;
        }
        bytes += c.approx_size();
        out.push(c);
        if let Some(l) = limits {
            if out.len() >= l.max_changes || bytes >= l.max_bytes {
                let last = out.last().map_or(upto, |c| c.db_version);
                // Only stop early if something is left to read.
                if last < upto {
                    return Ok((out, last));
                }
            }
        }
    }
    Ok((out, upto))
}

/// One read of the local feed after `after` in one read transaction: `(to, changes)`;
/// `None` for the changes when more than `large_after` versions are new (not read: the
/// unit travels by pulls, chunk by chunk).
pub fn read_unit(
    conn: &mut Connection,
    after: i64,
    large_after: i64,
) -> rusqlite::Result<(i64, Option<Vec<Change>>)> {
    let tx = conn.transaction()?;
    let to = db_version(&tx)?;
    let changes = if to - after > large_after {
        None
    } else if to > after {
        Some(read_range(&tx, after, to, None, &[], None)?.0)
    } else {
        Some(Vec::new())
    };
    tx.commit()?;
    Ok((to, changes))
}

/// Answers a pull: the first chunk of `(after, ..]` — of the fixed `unit` on a
/// continuation, else of a new unit ending at the current version — without changes
/// credited to `exclude` and without those the requester `known`s.
pub fn serve_pull(
    conn: &mut Connection,
    after: i64,
    unit: Option<(i64, i64)>,
    exclude: &SiteId,
    known: &[Skipped],
    limits: ChunkLimits,
) -> rusqlite::Result<Chunk> {
    let tx = conn.transaction()?;
    let (unit_from, unit_to) = match unit {
        Some(u) => u,
        None => (after, db_version(&tx)?.max(after)),
    };
    let (changes, to) = read_range(&tx, after, unit_to, Some(exclude), known, Some(limits))?;
    tx.commit()?;
    Ok(Chunk {
        unit_from,
        unit_to,
        from: after,
        to,
        changes,
        skipped: None,
    })
}
