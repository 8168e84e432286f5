//! What this node has received, kept in the database next to the data.
//!
//! `patina_sync_cursors` holds, per peer site, how far into that peer's feed everything is
//! applied; `patina_sync_ranges` the units applied past a gap (out-of-order arrivals), so
//! the cursor jumps once the gap fills; `patina_sync_inbox` buffers the chunks of a large unit until the unit is whole.
//! Both are written in the same transaction as the changes they describe, so memory and
//! disk cannot disagree and a crash never needs a repair tool.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::sync::{advance_with_ranges, skipped_covered, Chunk, SiteId, Skipped};

/// The bookkeeping tables (plain tables, not replicated).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS patina_sync_cursors (
    peer_site BLOB PRIMARY KEY NOT NULL,
    after     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patina_sync_ranges (
    peer_site BLOB NOT NULL,
    from_v    INTEGER NOT NULL,
    to_v      INTEGER NOT NULL,
    PRIMARY KEY (peer_site, from_v)
);
CREATE TABLE IF NOT EXISTS patina_site_bindings (
    site_id   BLOB PRIMARY KEY NOT NULL,
    identity  TEXT NOT NULL,
    bound_at  INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER))
);
CREATE TABLE IF NOT EXISTS patina_sync_inbox (
    peer_site  BLOB NOT NULL,
    unit_from  INTEGER NOT NULL,
    unit_to    INTEGER NOT NULL,
    chunk_from INTEGER NOT NULL,
    chunk_to   INTEGER NOT NULL,
    payload    BLOB NOT NULL,
    PRIMARY KEY (peer_site, unit_from, unit_to, chunk_from)
);
";

/// Creates the bookkeeping tables if missing.
pub fn ensure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

/// Stores that `site` is bound to the peer `identity`, once: an existing binding is never
/// replaced (see `sync::identity`). Returns whether this call stored it.
pub fn bind_site(conn: &Connection, site: &SiteId, identity: &str) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO patina_site_bindings (site_id, identity) VALUES (?1, ?2)",
        )?
        .execute(params![site.as_slice(), identity])?;
    Ok(n == 1)
}

/// All stored site bindings: site id → the identity that may speak for it.
pub fn load_bindings(conn: &Connection) -> rusqlite::Result<HashMap<SiteId, String>> {
    let mut stmt = conn.prepare("SELECT site_id, identity FROM patina_site_bindings")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = HashMap::new();
    for row in rows {
        let (site, identity) = row?;
        if let Ok(s) = <SiteId>::try_from(site.as_slice()) {
            out.insert(s, identity);
        }
    }
    Ok(out)
}

/// All stored cursors.
pub fn load_cursors(conn: &Connection) -> rusqlite::Result<HashMap<SiteId, i64>> {
    let mut stmt = conn.prepare("SELECT peer_site, after FROM patina_sync_cursors")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = HashMap::new();
    for row in rows {
        let (site, after) = row?;
        if let Ok(s) = <SiteId>::try_from(site.as_slice()) {
            out.insert(s, after);
        }
    }
    Ok(out)
}

/// The stored cursor of one peer site (0 when never synced).
pub fn cursor(conn: &Connection, site: &SiteId) -> rusqlite::Result<i64> {
    Ok(conn
        .prepare_cached("SELECT after FROM patina_sync_cursors WHERE peer_site = ?1")?
        .query_row([site.as_slice()], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Records that the unit `(unit_from, unit_to]` of `site`'s feed is applied (inside the
/// applying transaction) and drops buffered chunks the cursor now covers. Changes the
/// sender left out (`skipped`) must be covered by our cursors for their origins, or the
/// cursor stays. Returns the stored cursor.
pub fn mark_applied(
    conn: &Connection,
    site: &SiteId,
    unit_from: i64,
    unit_to: i64,
    skipped: &[Skipped],
) -> rusqlite::Result<i64> {
    let cur = cursor(conn, site)?;
    let mut origins = Vec::with_capacity(skipped.len());
    for s in skipped {
        origins.push((s.site, cursor(conn, &s.site)?));
    }
    let covered = skipped_covered(skipped, |o| {
        origins.iter().find(|(s, _)| s == o).map_or(0, |(_, c)| *c)
    });
    if !covered {
        return Ok(cur);
    }
    let mut ranges: Vec<(i64, i64)> = conn
        .prepare_cached("SELECT from_v, to_v FROM patina_sync_ranges WHERE peer_site = ?1")?
        .query_map([site.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let before = ranges.clone();
    let next = advance_with_ranges(cur, &mut ranges, unit_from, unit_to);
    if ranges != before {
        conn.prepare_cached("DELETE FROM patina_sync_ranges WHERE peer_site = ?1")?
            .execute([site.as_slice()])?;
        let mut ins = conn.prepare_cached(
            "INSERT OR REPLACE INTO patina_sync_ranges (peer_site, from_v, to_v) VALUES (?1, ?2, ?3)",
        )?;
        for (f, t) in &ranges {
            ins.execute(params![site.as_slice(), f, t])?;
        }
    }
    if next != cur {
        conn.prepare_cached(
            "INSERT INTO patina_sync_cursors (peer_site, after) VALUES (?1, ?2) \
             ON CONFLICT (peer_site) DO UPDATE SET after = excluded.after",
        )?
        .execute(params![site.as_slice(), next])?;
        conn.prepare_cached(
            "DELETE FROM patina_sync_inbox WHERE peer_site = ?1 AND unit_to <= ?2",
        )?
        .execute(params![site.as_slice(), next])?;
    }
    Ok(next)
}

/// Buffers one chunk of a multi-chunk unit; returns whether the buffered chunks now tile
/// the whole unit.
pub fn inbox_put(conn: &Connection, site: &SiteId, chunk: &Chunk) -> Result<bool, InboxError> {
    let payload = minicbor::to_vec(chunk).map_err(|e| InboxError::Encode(e.to_string()))?;
    conn.prepare_cached(
        "INSERT OR IGNORE INTO patina_sync_inbox \
         (peer_site, unit_from, unit_to, chunk_from, chunk_to, payload) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        site.as_slice(),
        chunk.unit_from,
        chunk.unit_to,
        chunk.from,
        chunk.to,
        payload
    ])?;
    let ranges: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT chunk_from, chunk_to FROM patina_sync_inbox \
             WHERE peer_site = ?1 AND unit_from = ?2 AND unit_to = ?3 ORDER BY chunk_from",
        )?
        .query_map(
            params![site.as_slice(), chunk.unit_from, chunk.unit_to],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut at = chunk.unit_from;
    for (from, to) in ranges {
        if from == at {
            at = to;
        }
    }
    Ok(at == chunk.unit_to)
}

/// Hands the buffered chunks of a whole unit to `f` in order, one at a time (a large unit
/// is never decoded all at once), then removes them.
pub fn inbox_drain<E: From<InboxError>>(
    conn: &Connection,
    site: &SiteId,
    unit_from: i64,
    unit_to: i64,
    mut f: impl FnMut(Chunk) -> Result<(), E>,
) -> Result<(), E> {
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT chunk_from, payload FROM patina_sync_inbox \
                 WHERE peer_site = ?1 AND unit_from = ?2 AND unit_to = ?3 ORDER BY chunk_from",
            )
            .map_err(InboxError::from)?;
        let mut rows = stmt
            .query(params![site.as_slice(), unit_from, unit_to])
            .map_err(InboxError::from)?;
        let mut at = unit_from;
        while let Some(row) = rows.next().map_err(InboxError::from)? {
            let from: i64 = row.get(0).map_err(InboxError::from)?;
            if from != at {
                continue; // an overlapping duplicate; the tiling chunk was kept
            }
            let payload = row.get_ref(1).map_err(InboxError::from)?;
            let bytes = payload
                .as_blob()
                .map_err(|e| InboxError::Decode(e.to_string()))?;
            let c: Chunk =
                minicbor::decode(bytes).map_err(|e| InboxError::Decode(e.to_string()))?;
            at = c.to;
            f(c)?;
        }
    }
    conn.prepare_cached(
        "DELETE FROM patina_sync_inbox WHERE peer_site = ?1 AND unit_from = ?2 AND unit_to = ?3",
    )
    .map_err(InboxError::from)?
    .execute(params![site.as_slice(), unit_from, unit_to])
    .map_err(InboxError::from)?;
    Ok(())
}

/// Errors of the inbox. Each leaves the applying transaction to be rolled back by the caller.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("sync inbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("sync inbox: cannot encode a chunk: {0}")]
    Encode(String),
    #[error("sync inbox: a buffered chunk does not decode: {0}")]
    Decode(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(from: i64, to: i64) -> Chunk {
        Chunk {
            unit_from: 10,
            unit_to: 30,
            from,
            to,
            changes: vec![],
            skipped: None,
        }
    }

    #[test]
    fn inbox_returns_the_unit_once_whole_and_cursor_follows_the_rule() {
        let conn = Connection::open_in_memory().expect("in-memory db");
        ensure(&conn).expect("schema");
        let site = [9u8; 16];
        assert!(!inbox_put(&conn, &site, &chunk(20, 30)).expect("put"));
        assert!(!inbox_put(&conn, &site, &chunk(20, 30)).expect("dup"));
        assert!(inbox_put(&conn, &site, &chunk(10, 20)).expect("put"));
        let mut seen = Vec::new();
        inbox_drain::<InboxError>(&conn, &site, 10, 30, |c| {
            seen.push((c.from, c.to));
            Ok(())
        })
        .expect("drain");
        assert_eq!(seen, vec![(10, 20), (20, 30)]);
        let left: i64 = conn
            .query_row("SELECT count(*) FROM patina_sync_inbox", [], |r| r.get(0))
            .expect("count");
        assert_eq!(left, 0);
        // A gap does not move the cursor; a unit starting at it does.
        // Past a gap: remembered, and the cursor jumps over it once the gap fills.
        assert_eq!(mark_applied(&conn, &site, 40, 50, &[]).expect("mark"), 0);
        assert_eq!(mark_applied(&conn, &site, 0, 10, &[]).expect("mark"), 10);
        // Left-out changes of origin 7 up to 5: not covered while our cursor for 7 is 0.
        let skipped = [Skipped {
            site: [7; 16],
            upto: 5,
        }];
        assert_eq!(
            mark_applied(&conn, &site, 10, 30, &skipped).expect("mark"),
            10
        );
        assert_eq!(mark_applied(&conn, &[7; 16], 0, 5, &[]).expect("mark"), 5);
        assert_eq!(
            mark_applied(&conn, &site, 10, 30, &skipped).expect("mark"),
            30
        );
        assert_eq!(load_cursors(&conn).expect("load").get(&site), Some(&30));
    }
}
