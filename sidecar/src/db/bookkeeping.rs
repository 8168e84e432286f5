//! What this node has received, kept in the database next to the data.
//!
//! `patina_sync_cursors` holds, per peer site, how far into that peer's feed everything is
//! applied; `patina_sync_ranges` the units applied past a gap (out-of-order arrivals), so
//! the cursor jumps once the gap fills; `patina_site_bindings` which peer identity may
//! speak for each site id (`sync::identity`); `db::inbox` buffers the chunks of a large
//! unit until the unit is whole. All are written in the same transaction as the changes they describe, so memory and
//! disk cannot disagree and a crash never needs a repair tool.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::sync::{advance_with_ranges, skipped_covered, SiteId, Skipped};

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
";

/// Creates the bookkeeping tables (and the inbox, `db::inbox`) if missing.
pub fn ensure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    super::inbox::ensure(conn)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_follows_the_rule() {
        let conn = Connection::open_in_memory().expect("in-memory db");
        ensure(&conn).expect("schema");
        let site = [9u8; 16];
        assert!(bind_site(&conn, &site, "address 127.0.0.1:1").expect("bind"));
        assert!(!bind_site(&conn, &site, "address 127.0.0.1:2").expect("bound once"));
        assert_eq!(
            load_bindings(&conn)
                .expect("load")
                .get(&site)
                .map(String::as_str),
            Some("address 127.0.0.1:1")
        );
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
