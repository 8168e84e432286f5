//! Per-origin knowledge in SQL: which versions of each origin this database holds
//! (`patina_origin_ranges`, written inside every merge), the helpers the sidecar reads
//! (`patina_origin_summary()`, `patina_origin_missing()`), and the migration of databases
//! made before the origin counter existed. The range arithmetic is `ranges` (pure).
//!
//! This site's own versions are never stored: the triggers number them gap-free with
//! `patina_state.origin_version`, so it holds exactly `1..=origin_version`, at no cost to a
//! write. Changes of this site that come back from peers are therefore not recorded.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::error::{Error, Result};
use crate::ranges::{merge_plan, RangeSet};
use crate::sqlite::{Conn, Stmt, Value};

/// Prepared statements for writing ranges, cached per connection by the merger (and
/// dropped with its other statements at the end of each transaction).
#[derive(Default)]
pub(crate) struct RangeStmts {
    touching: Option<Stmt>,
    delete: Option<Stmt>,
    insert: Option<Stmt>,
    local: Option<Vec<u8>>,
}

fn cached<'a>(slot: &'a mut Option<Stmt>, conn: Conn, sql: &str) -> Result<&'a mut Stmt> {
    if slot.is_none() {
        *slot = Some(conn.prepare(sql)?);
    }
    slot.as_mut()
        .ok_or_else(|| Error::State("range statement cache".into()))
}

impl RangeStmts {
    /// True when `site` is this database's own id (its versions are the counter's).
    fn is_local(&mut self, conn: Conn, site: &[u8]) -> Result<bool> {
        if self.local.is_none() {
            self.local = Some(crate::state::site_id(conn)?);
        }
        Ok(self.local.as_deref() == Some(site))
    }

    /// Records that this database holds `versions` of origin `site`, coalescing with the
    /// stored ranges: one read and at most one delete and one write per range, and no
    /// write at all when the versions were held already.
    pub(crate) fn record(&mut self, conn: Conn, site: &[u8], versions: &RangeSet) -> Result<()> {
        if versions.is_empty() || self.is_local(conn, site)? {
            return Ok(());
        }
        let site_v = Value::Blob(site.to_vec());
        for (a, b) in versions.iter() {
            // Stored ranges are disjoint and sorted: walk down from the last one starting
            // at or before b + 1 while they reach a - 1.
            let s = cached(
                &mut self.touching,
                conn,
                "SELECT start, \"end\" FROM patina_origin_ranges \
                 WHERE site_id = ?1 AND start <= ?2 ORDER BY start DESC",
            )?;
            s.reset();
            s.bind_all(&[site_v.clone(), Value::Integer(b.saturating_add(1))])?;
            let mut touching = Vec::new();
            while s.step()? {
                let (x, y) = (s.column_i64(0), s.column_i64(1));
                if y < a.saturating_sub(1) {
                    break;
                }
                touching.push((x, y));
            }
            s.reset();
            touching.reverse();
            let (delete, write) = merge_plan(&touching, (a, b));
            // The range that keeps its start is rewritten in place by the upsert below
            // (the common case: the next version of an origin extends its last range).
            let kept = write.map(|(x, _)| x);
            for start in delete.into_iter().filter(|s| Some(*s) != kept) {
                let d = cached(
                    &mut self.delete,
                    conn,
                    "DELETE FROM patina_origin_ranges WHERE site_id = ?1 AND start = ?2",
                )?;
                d.execute(&[site_v.clone(), Value::Integer(start)])?;
            }
            if let Some((x, y)) = write {
                let i = cached(
                    &mut self.insert,
                    conn,
                    "INSERT INTO patina_origin_ranges (site_id, start, \"end\") VALUES (?1, ?2, ?3) \
                     ON CONFLICT (site_id, start) DO UPDATE SET \"end\" = excluded.\"end\"",
                )?;
                i.execute(&[site_v.clone(), Value::Integer(x), Value::Integer(y)])?;
            }
        }
        Ok(())
    }
}

/// Records held versions with statements of its own (migration, site id changes).
pub(crate) fn record(conn: Conn, site: &[u8], versions: &RangeSet) -> Result<()> {
    RangeStmts::default().record(conn, site, versions)
}

/// Held versions by origin site id.
type HeldBySite = BTreeMap<Vec<u8>, RangeSet>;

/// This site's id and every origin's held versions: the stored ranges plus this site's
/// `1..=origin_version`.
fn held_all(conn: Conn) -> Result<(Vec<u8>, HeldBySite)> {
    let local = crate::state::site_id(conn)?;
    let mut all = HeldBySite::new();
    let mut s = conn.prepare("SELECT site_id, start, \"end\" FROM patina_origin_ranges")?;
    for (site, a, b) in s.query_map(&[], |r| (r.column(0), r.column_i64(1), r.column_i64(2)))? {
        if let Value::Blob(site) = site {
            all.entry(site).or_default().insert(a, b);
        }
    }
    let head = crate::state::origin_version(conn)?;
    if head > 0 {
        all.entry(local.clone()).or_default().insert(1, head);
    }
    Ok((local, all))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn ranges_json(r: &[(i64, i64)]) -> String {
    let items: Vec<String> = r.iter().map(|(a, b)| format!("[{a},{b}]")).collect();
    format!("[{}]", items.join(","))
}

/// `patina_origin_summary()`: per origin, the highest version held, how many are held and
/// the gaps below the head, as a JSON array ordered by site id:
/// `[{"site_id":"<hex>","local":false,"head":9,"held":7,"gaps":[[3,4]]}]`.
pub fn summary(conn: Conn) -> Result<String> {
    let (local, all) = held_all(conn)?;
    let items: Vec<String> = all
        .iter()
        .map(|(site, set)| {
            format!(
                "{{\"site_id\":\"{}\",\"local\":{},\"head\":{},\"held\":{},\"gaps\":{}}}",
                hex(site),
                *site == local,
                set.head(),
                set.count(),
                ranges_json(&set.gaps())
            )
        })
        .collect();
    Ok(format!("[{}]", items.join(",")))
}

/// `patina_origin_missing(site_id, a, b)`: the versions of origin `site` in `a..=b` this
/// database does not hold, as a JSON array of inclusive ranges.
pub fn missing(conn: Conn, site: &[u8], a: i64, b: i64) -> Result<String> {
    let mut set = RangeSet::new();
    let mut s = conn.prepare(
        "SELECT start, \"end\" FROM patina_origin_ranges WHERE site_id = ?1 AND start <= ?2",
    )?;
    for (x, y) in s.query_map(&[Value::Blob(site.to_vec()), Value::Integer(b)], |r| {
        (r.column_i64(0), r.column_i64(1))
    })? {
        set.insert(x, y);
    }
    if crate::state::site_id(conn)? == site {
        set.insert(1, crate::state::origin_version(conn)?);
    }
    Ok(ranges_json(&set.missing(a, b)))
}

/// True when this database predates per-origin knowledge (no `origin_version` column, or
/// no ranges table).
pub(crate) fn needs_migration(conn: Conn) -> Result<bool> {
    let col = conn.query_value(
        "SELECT 1 FROM pragma_table_info('patina_state') WHERE name = 'origin_version'",
        &[],
    )?;
    let table = conn.query_value(
        "SELECT 1 FROM main.sqlite_schema WHERE type = 'table' AND name = 'patina_origin_ranges'",
        &[],
    )?;
    Ok(col.is_none() || table.is_none())
}

/// Migrates a database made by a release without per-origin knowledge; the caller runs it
/// in a savepoint. The counter starts at `db_version`: this site's past changes were
/// numbered by `db_version` (clocks hold NULL for them and the feed reports the change
/// number), so its own numbering continues above all of them. Triggers are regenerated in
/// the same transaction, so no writer ever runs an old trigger beside the new counter.
///
/// Ranges of other origins are rebuilt from what the clocks still hold: every standing
/// change's `(site_id, origin_version)`. Versions whose changes were all superseded before
/// the migration left no trace and cannot be rebuilt; they show as gaps, which a peer's
/// answer (held, or cleared) closes.
pub(crate) fn migrate(conn: Conn, state_sql: &str) -> Result<()> {
    let col = conn.query_value(
        "SELECT 1 FROM pragma_table_info('patina_state') WHERE name = 'origin_version'",
        &[],
    )?;
    if col.is_none() {
        conn.exec(
            "ALTER TABLE patina_state ADD COLUMN origin_version INTEGER NOT NULL DEFAULT 0;\n\
             UPDATE patina_state SET origin_version = db_version WHERE id = 0;",
        )?;
    }
    conn.exec(state_sql)?;
    for table in crate::schema::replicated_tables(conn)? {
        crate::crr::install_triggers(conn, &table)?;
    }
    let local = crate::state::site_id(conn)?;
    let mut by_site = HeldBySite::new();
    let mut s = conn.prepare("SELECT site_id, origin_version FROM crsql_changes")?;
    for (site, ov) in s.query_map(&[], |r| (r.column(0), r.column(1)))? {
        if let (Value::Blob(site), Value::Integer(ov)) = (site, ov) {
            if site != local {
                by_site.entry(site).or_default().insert_one(ov);
            }
        }
    }
    drop(s);
    let mut w = RangeStmts::default();
    for (site, set) in &by_site {
        w.record(conn, site, set)?;
    }
    Ok(())
}
