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

use crate::sync::{held_after_catch_up, Held, OriginRanges, RangeSet, SiteId};

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

/// Creates the bookkeeping tables (and the inbox, `db::inbox`, and the schema buffer,
/// `db::buffer`) if missing.
pub fn ensure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(super::retention::SCHEMA)?;
    super::buffer::ensure(conn)?;
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

/// Records that the catch-up unit `(unit_from, unit_to]` of `site`'s feed is applied
/// (inside the applying transaction): moves the cursor by the cursor rule, drops buffered
/// chunks it now covers, and — when the unit continued the cursor — records as held what
/// the server held when it fixed the unit (`sync::held_after_catch_up`). Returns the
/// stored cursor.
pub fn mark_applied(
    conn: &Connection,
    site: &SiteId,
    local: &SiteId,
    unit_from: i64,
    unit_to: i64,
    held: Option<&[OriginRanges]>,
) -> rusqlite::Result<i64> {
    let cur = cursor(conn, site)?;
    let mut ranges: Vec<(i64, i64)> = conn
        .prepare_cached("SELECT from_v, to_v FROM patina_sync_ranges WHERE peer_site = ?1")?
        .query_map([site.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let before = ranges.clone();
    let (next, claim) = held_after_catch_up(cur, &mut ranges, unit_from, unit_to, held, local);
    record_held(conn, &claim)?;
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

/// Everything this database holds, per origin (`patina_origin_held`: the stored ranges
/// plus this site's own `1..=origin_version`).
pub fn load_held(conn: &Connection) -> rusqlite::Result<Held> {
    let mut stmt = conn.prepare_cached("SELECT site_id, start, \"end\" FROM patina_origin_held")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = Held::default();
    for row in rows {
        let (site, a, b) = row?;
        if let Ok(s) = <SiteId>::try_from(site.as_slice()) {
            out.insert(s, a, b);
        }
    }
    Ok(out)
}

/// What this database holds of `origin`.
pub fn held_of(conn: &Connection, origin: &SiteId) -> rusqlite::Result<RangeSet> {
    let mut stmt =
        conn.prepare_cached("SELECT start, \"end\" FROM patina_origin_held WHERE site_id = ?1")?;
    let rows = stmt.query_map([origin.as_slice()], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut out = RangeSet::default();
    for row in rows {
        let (a, b) = row?;
        out.insert(a, b);
    }
    Ok(out)
}

/// Records `held` in `patina_origin_ranges` (inside the applying transaction), coalesced
/// with what is stored: the versions a unit or a catch-up proves held, including those
/// without a change (superseded, cleared). This site's own id is never stored there.
pub fn record_held(conn: &Connection, held: &Held) -> rusqlite::Result<()> {
    for (origin, add) in held.iter() {
        if add.is_empty() {
            continue;
        }
        let stored: Vec<(i64, i64)> = conn
            .prepare_cached("SELECT start, \"end\" FROM patina_origin_ranges WHERE site_id = ?1")?
            .query_map([origin.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut merged = RangeSet::from_ranges(stored.iter().copied());
        if add.minus(&merged).is_empty() {
            continue;
        }
        merged.union_with(add);
        // Rewrite only the rows that changed: those the new ranges swallowed go, the
        // merged ones are upserted by their start.
        let keep: std::collections::HashSet<(i64, i64)> = merged.ranges().iter().copied().collect();
        let mut del = conn
            .prepare_cached("DELETE FROM patina_origin_ranges WHERE site_id = ?1 AND start = ?2")?;
        for r in stored.iter().filter(|r| !keep.contains(r)) {
            del.execute(params![origin.as_slice(), r.0])?;
        }
        let old: std::collections::HashSet<(i64, i64)> = stored.into_iter().collect();
        let mut up = conn.prepare_cached(
            "INSERT INTO patina_origin_ranges (site_id, start, \"end\") VALUES (?1, ?2, ?3) \
             ON CONFLICT (site_id, start) DO UPDATE SET \"end\" = excluded.\"end\"",
        )?;
        for &(a, b) in merged.ranges().iter().filter(|r| !old.contains(r)) {
            up.execute(params![origin.as_slice(), a, b])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_follows_the_rule() {
        let conn = Connection::open_in_memory().expect("in-memory db");
        ensure(&conn).expect("schema");
        // The extension's table, as it creates it.
        conn.execute_batch(
            "CREATE TABLE patina_origin_ranges (site_id BLOB NOT NULL, start INTEGER NOT NULL, \
             \"end\" INTEGER NOT NULL, PRIMARY KEY (site_id, start)) WITHOUT ROWID;",
        )
        .expect("ranges table");
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
        // A gap does not move the cursor; a unit starting at it does. Past a gap:
        // remembered, and the cursor jumps over it once the gap fills.
        let local = [1u8; 16];
        let held = [OriginRanges {
            site: [7; 16],
            ranges: vec![(1, 5)],
        }];
        assert_eq!(
            mark_applied(&conn, &site, &local, 20, 30, Some(&held)).expect("mark"),
            0
        );
        assert_eq!(
            mark_applied(&conn, &site, &local, 0, 10, None).expect("mark"),
            10
        );
        assert_eq!(
            mark_applied(&conn, &site, &local, 10, 20, Some(&held)).expect("mark"),
            30
        );
        let stored: (i64, i64) = conn
            .query_row("SELECT start, \"end\" FROM patina_origin_ranges", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("recorded once, when the unit continued the cursor");
        assert_eq!(stored, (1, 5));
        let mut more = Held::default();
        more.insert([7; 16], 6, 8);
        more.insert([7; 16], 20, 21);
        record_held(&conn, &more).expect("record");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM patina_origin_ranges", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(n, 2, "1..=8 coalesced, 20..=21 apart");
        assert_eq!(load_cursors(&conn).expect("load").get(&site), Some(&30));
    }
}
