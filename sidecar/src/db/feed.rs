//! Reading the change feed: `crsql_changes` by local `db_version`, as sync messages.
//!
//! Every read here runs inside one read transaction, so it contains whole transactions
//! only (DESIGN §2): the tailer ships each read as one unit, and a pull answer is a
//! version-ranged chunk of one fixed unit.

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, Row};

use crate::sync::{known_covers, Change, Chunk, Held, SiteId, Value};

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
    // TEXT is read as bytes: SQLite does not promise UTF-8, and one such value must not
    // stop the feed (rusqlite's `Value` would refuse it as "invalid utf-8").
    let val = match r.get_ref(3)? {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(s) => Value::Text(s.to_vec()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
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
///
/// With limits, the range is read in version windows of `max_changes` (every change has
/// its own version, so a window never holds more rows than that), so a chunk costs the
/// same however large the unit is — whatever the virtual table materialises per query.
/// Windows whose rows were all left out (`exclude`, `known`) are skipped over, up to
/// 16 windows per chunk, each twice as wide as the one before (at most 16 times).
pub fn read_range(
    conn: &Connection,
    after: i64,
    upto: i64,
    exclude: Option<&SiteId>,
    known: &Held,
    limits: Option<ChunkLimits>,
) -> rusqlite::Result<(Vec<Change>, i64)> {
    let mut stmt = conn.prepare_cached(FEED_SQL)?;
    let exclude = exclude.map(|s| s.to_vec());
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let Some(l) = limits else {
        let mut rows = stmt.query(params![after, upto, exclude])?;
        while let Some(r) = rows.next()? {
            let c = row_to_change(r)?;
            if !known_covers(known, &c) {
                out.push(c);
            }
        }
        return Ok((out, upto));
    };
    // A window that yields nothing doubles the next one (up to 16 times `max_changes`,
    // which bounds what one query materialises): a requester whose cursor is far behind
    // but who holds nearly everything crosses the gap in a few round trips.
    let mut window = l.max_changes.max(1) as i64;
    let widest = window.saturating_mul(16);
    let mut lo = after;
    for _ in 0..16 {
        let hi = upto.min(lo.saturating_add(window));
        window = window.saturating_mul(2).min(widest);
        let mut rows = stmt.query(params![lo, hi, exclude])?;
        while let Some(r) = rows.next()? {
            let c = row_to_change(r)?;
            if known_covers(known, &c) {
                continue;
            }
            bytes += c.approx_size();
            out.push(c);
            if out.len() >= l.max_changes || bytes >= l.max_bytes {
                let last = out.last().map_or(hi, |c| c.db_version);
                return Ok((out, last));
            }
        }
        lo = hi;
        if lo >= upto || !out.is_empty() {
            break;
        }
    }
    Ok((out, lo))
}

/// This site's own numbering: it holds versions `1..=origin_version()` of itself.
pub fn origin_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT origin_version FROM patina_state WHERE id = 0",
        [],
        |r| r.get(0),
    )
}

/// One read of the local feed after `after` in one read transaction: `(to, own head,
/// changes)`, where the own head is `origin_version()` at the same snapshot; `None` for
/// the changes when more than `large_after` versions are new (not read: the unit travels
/// by pulls, chunk by chunk).
pub fn read_unit(
    conn: &mut Connection,
    after: i64,
    large_after: i64,
) -> rusqlite::Result<(i64, i64, Option<Vec<Change>>)> {
    let tx = conn.transaction()?;
    let to = db_version(&tx)?;
    let own = origin_version(&tx)?;
    let changes = if to - after > large_after {
        None
    } else if to > after {
        Some(read_range(&tx, after, to, None, &Held::default(), None)?.0)
    } else {
        Some(Vec::new())
    };
    tx.commit()?;
    Ok((to, own, changes))
}

/// Answers a pull: the first chunk of `(after, ..]` — of the fixed `unit` on a
/// continuation, else of a new unit ending at the current version — without changes
/// credited to `exclude` and without those the requester `known`s. The first chunk of a
/// new unit carries what this database held at the same snapshot.
pub fn serve_pull(
    conn: &mut Connection,
    after: i64,
    unit: Option<(i64, i64)>,
    exclude: &SiteId,
    known: &Held,
    limits: ChunkLimits,
) -> rusqlite::Result<Chunk> {
    let tx = conn.transaction()?;
    // Versions held only in the schema buffer are not in this feed: never claimed.
    let held = match unit {
        Some(_) => None,
        None => Some(
            super::bookkeeping::load_held(&tx)?
                .minus(&super::buffer::held(&tx).map_err(buffer_error)?)
                .to_wire(usize::MAX),
        ),
    };
    let schema = super::schema::replicated(&tx)?.fingerprint();
    let (unit_from, unit_to) = match unit {
        Some(u) => u,
        None => {
            let now = db_version(&tx)?;
            if now < after {
                // The requester has seen versions this database never reached: it was
                // replaced by an older copy that kept its site id. Its new changes would
                // hide below that cursor, so say so loudly.
                tracing::error!(
                    "a peer asks for changes after version {after} but this database is at \
                     {now}: it was rolled back or restored without a fresh site id; give it \
                     one (`patina restore` does by default) or peers will miss its changes"
                );
            }
            (after, now.max(after))
        }
    };
    let (changes, to) = read_range(&tx, after, unit_to, Some(exclude), known, Some(limits))?;
    tx.commit()?;
    Ok(Chunk {
        unit_from,
        unit_to,
        from: after,
        to,
        changes,
        held,
        schema: Some(schema),
    })
}

/// A schema buffer that does not decode, as the SQLite error pulls report.
fn buffer_error(e: super::buffer::BufferError) -> rusqlite::Error {
    match e {
        super::buffer::BufferError::Sqlite(e) => e,
        other => rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            Box::new(other),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    /// A database with the extension, or None when `libpatina.so` is not built.
    fn db() -> Option<(tempfile::TempDir, Connection)> {
        let ext = crate::db::extension_path(None).ok()?;
        let dir = tempfile::tempdir().ok()?;
        let conn = crate::db::open(&dir.path().join("t.db"), &ext, Synchronous::Normal).ok()?;
        Some((dir, conn))
    }

    #[test]
    fn chunked_reads_tile_the_unit_and_leave_out_what_is_known() {
        let Some((_dir, mut conn)) = db() else {
            eprintln!("libpatina.so not built (cargo build -p patina): skipped");
            return;
        };
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT);
             SELECT crsql_as_crr('t');",
        )
        .expect("schema");
        super::super::bookkeeping::ensure(&conn).expect("bookkeeping");
        for i in 0..10 {
            conn.execute("INSERT INTO t VALUES (?1, 'x')", [i])
                .expect("insert");
        }
        let (to, own, all) = read_unit(&mut conn, 0, 1_000).expect("read");
        let all = all.expect("small unit is read");
        assert_eq!(own, 10, "one origin version per inserted column");
        assert!(all.len() >= 10);
        assert!(
            read_unit(&mut conn, 0, 3).expect("read").2.is_none(),
            "large unit not read"
        );
        let limits = ChunkLimits {
            max_changes: 3,
            max_bytes: usize::MAX,
        };
        let other = [0u8; 16];
        let mut after = 0;
        let mut got = Vec::new();
        while after < to {
            let chunk = serve_pull(
                &mut conn,
                after,
                Some((0, to)),
                &other,
                &Held::default(),
                limits,
            )
            .expect("serve");
            assert_eq!(chunk.from, after);
            assert!(chunk.changes.len() <= 3);
            after = chunk.to;
            got.extend(chunk.changes);
        }
        assert_eq!(got, all);
        // The requester knows this site's changes up to version 5: those are left out.
        let site = site_id(&conn).expect("site");
        let mut known = Held::default();
        known.insert(site, 1, 5);
        let chunk = serve_pull(
            &mut conn,
            0,
            None,
            &other,
            &known,
            ChunkLimits {
                max_changes: 1_000,
                max_bytes: usize::MAX,
            },
        )
        .expect("serve");
        assert!(chunk.changes.iter().all(|c| c.origin_version > Some(5)));
        assert_eq!(chunk.to, to);
        let held = Held::from_wire(chunk.held.as_deref().unwrap_or_default());
        assert!(
            held.covers(&site, 1, 10),
            "the first chunk says what the server holds"
        );
    }
}
