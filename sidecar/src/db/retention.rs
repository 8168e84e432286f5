//! Bounded metadata, the database side: collecting tombstones with the limits the sync
//! machine decides (`sync::stability`), remembering what was collected, forgetting
//! departed members, and re-seeding a node that was away too long.
//!
//! Tables (plain, never replicated):
//! - `patina_collected`: per origin, the highest delete version whose tombstone this
//!   node removed. Advertised in summaries: a peer lacking versions at or below it may
//!   keep rows those deletes removed, and is re-seeded.
//! - `patina_site_seen`: when each peer site was last seen alive (unix ms), so members
//!   that are down still count for stability after a restart, and members gone longer
//!   than `sync.forget_after` are forgotten.
//! - `patina_node_flags`: `reseed` → why this node must be re-seeded at its next start;
//!   `last_contact` → when it last had a live peer (unix ms).

use super::schema::quote;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::sync::stability::Prefixes;
use crate::sync::SiteId;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS patina_collected (
    site_id BLOB PRIMARY KEY NOT NULL,
    upto    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patina_site_seen (
    site_id   BLOB PRIMARY KEY NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patina_node_flags (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
";

/// What one collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Tombstones removed by this run.
    pub removed: i64,
    /// Every origin's floor after the run (what summaries advertise).
    pub floors: Prefixes,
    /// `patina_state.cl_floor` after the run.
    pub cl_floor: i64,
}

/// Errors of this module: SQLite, or the extension's answer not being what it documents.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("patina_collect_tombstones answered {answer:?}: {reason}")]
    Answer { answer: String, reason: String },
    #[error("cannot set the database aside as {path} before re-seeding: {source}")]
    Backup {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

fn site_of(bytes: &[u8]) -> Option<SiteId> {
    SiteId::try_from(bytes).ok()
}

/// Removes the tombstones `limits` allow (one immediate transaction, with the floors it
/// raises), and returns every floor.
pub fn collect(conn: &mut Connection, limits: &Prefixes) -> Result<Collected, RetentionError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let removed = if limits.is_empty() {
        0
    } else {
        let json = serde_json::Value::Object(
            limits
                .iter()
                .map(|(s, v)| (hex::encode(s), serde_json::Value::from(*v)))
                .collect(),
        )
        .to_string();
        let answer: String =
            tx.query_row("SELECT patina_collect_tombstones(?1)", [&json], |r| {
                r.get(0)
            })?;
        let bad = |reason: &str| RetentionError::Answer {
            answer: answer.clone(),
            reason: reason.to_string(),
        };
        let parsed: serde_json::Value =
            serde_json::from_str(&answer).map_err(|e| bad(&e.to_string()))?;
        let removed = parsed["removed"]
            .as_i64()
            .ok_or_else(|| bad("no integer \"removed\""))?;
        let floors = parsed["floors"]
            .as_object()
            .ok_or_else(|| bad("no object \"floors\""))?;
        let mut up = tx.prepare_cached(
            "INSERT INTO patina_collected (site_id, upto) VALUES (?1, ?2) \
             ON CONFLICT (site_id) DO UPDATE SET upto = max(upto, excluded.upto)",
        )?;
        for (site, v) in floors {
            let site = hex::decode(site).map_err(|e| bad(&e.to_string()))?;
            let v = v.as_i64().ok_or_else(|| bad("a floor is not an integer"))?;
            up.execute(params![site, v])?;
        }
        drop(up);
        removed
    };
    let floors = load_collected(&tx)?;
    let cl_floor = cl_floor(&tx)?;
    tx.commit()?;
    Ok(Collected {
        removed,
        floors,
        cl_floor,
    })
}

/// Every origin's collected floor.
pub fn load_collected(conn: &Connection) -> rusqlite::Result<Prefixes> {
    let mut s = conn.prepare_cached("SELECT site_id, upto FROM patina_collected")?;
    let rows = s.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = HashMap::new();
    for row in rows {
        let (site, upto) = row?;
        if let Some(s) = site_of(&site) {
            out.insert(s, upto);
        }
    }
    Ok(out)
}

/// `patina_state.cl_floor`.
pub fn cl_floor(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT cl_floor FROM patina_state WHERE id = 0", [], |r| {
        r.get(0)
    })
}

/// Raises `patina_state.cl_floor` to at least `floor` (learned from a peer).
pub fn raise_cl_floor(conn: &Connection, floor: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE patina_state SET cl_floor = max(cl_floor, ?1) WHERE id = 0")?
        .execute([floor])?;
    Ok(())
}

/// Records when each site was last seen alive (unix ms).
pub fn mark_seen(conn: &mut Connection, seen: &[(SiteId, i64)]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (s, t) in seen {
        note_seen(&tx, s, *t)?;
    }
    tx.commit()
}

/// Records that `site` was seen alive at `at` (unix ms), unless it was seen later, inside
/// the caller's transaction.
pub(super) fn note_seen(conn: &Connection, site: &SiteId, at: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO patina_site_seen (site_id, last_seen) VALUES (?1, ?2) \
         ON CONFLICT (site_id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
    )?
    .execute(params![site.as_slice(), at])?;
    Ok(())
}

/// When each site was last seen alive (unix ms).
pub fn load_seen(conn: &Connection) -> rusqlite::Result<HashMap<SiteId, i64>> {
    let mut s = conn.prepare_cached("SELECT site_id, last_seen FROM patina_site_seen")?;
    let rows = s.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = HashMap::new();
    for row in rows {
        let (site, t) = row?;
        if let Some(site) = site_of(&site) {
            out.insert(site, t);
        }
    }
    Ok(out)
}

/// Forgets every site last seen before `before_ms`: its cursor, out-of-order ranges,
/// buffered chunks, identity binding, held ranges and its row here. Returns them.
pub fn forget_departed(conn: &mut Connection, before_ms: i64) -> rusqlite::Result<Vec<SiteId>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let gone: Vec<Vec<u8>> = tx
        .prepare_cached("SELECT site_id FROM patina_site_seen WHERE last_seen < ?1")?
        .query_map([before_ms], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for site in &gone {
        for sql in [
            "DELETE FROM patina_sync_cursors WHERE peer_site = ?1",
            "DELETE FROM patina_sync_ranges WHERE peer_site = ?1",
            "DELETE FROM patina_sync_inbox WHERE peer_site = ?1",
            "DELETE FROM patina_site_bindings WHERE site_id = ?1",
            "DELETE FROM patina_origin_ranges WHERE site_id = ?1",
            "DELETE FROM patina_collected WHERE site_id = ?1",
            "DELETE FROM patina_site_seen WHERE site_id = ?1",
        ] {
            tx.prepare_cached(sql)?.execute([site.as_slice()])?;
        }
    }
    tx.commit()?;
    Ok(gone.iter().filter_map(|s| site_of(s)).collect())
}

/// Records `key` → `value` in `patina_node_flags`.
pub fn set_flag(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO patina_node_flags (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([key, value])?;
    Ok(())
}

/// The value of `key` in `patina_node_flags`.
pub fn flag(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT value FROM patina_node_flags WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// Records that this node must be re-seeded at its next start, and why.
pub fn request_reseed(conn: &Connection, reason: &str) -> rusqlite::Result<()> {
    set_flag(conn, "reseed", reason)
}

/// Why this node must be re-seeded, when it must.
pub fn pending_reseed(conn: &Connection) -> rusqlite::Result<Option<String>> {
    flag(conn, "reseed")
}

/// Re-seeds this database: sets a copy aside (`<db>.before-reseed-<unix s>`), then, in one
/// transaction, empties every replicated table and its clocks without recording a
/// change, drops what it knew of every origin and peer feed, and takes a fresh site id.
/// The node then joins as a new member and fills up from its peers. Returns the copy.
pub fn reseed(
    conn: &mut Connection,
    db_path: &Path,
    now_s: u64,
) -> Result<PathBuf, RetentionError> {
    let mut name = db_path.as_os_str().to_owned();
    name.push(format!(".before-reseed-{now_s}"));
    let copy = PathBuf::from(name);
    conn.execute("VACUUM INTO ?1", [copy.to_string_lossy()])
        .map_err(|source| RetentionError::Backup {
            path: copy.clone(),
            source,
        })?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let tables = super::schema::replicated_tables(&tx)?;
    // merging = 1: the capture triggers record nothing of these deletes.
    tx.execute_batch("UPDATE patina_state SET merging = 1 WHERE id = 0")?;
    for table in &tables {
        let clock = format!("{table}{}", super::schema::CLOCK_SUFFIX);
        tx.execute_batch(&format!(
            "DELETE FROM {}; DELETE FROM {};",
            quote(table),
            quote(&clock)
        ))?;
    }
    tx.execute_batch("UPDATE patina_state SET merging = 0 WHERE id = 0")?;
    let _: Vec<u8> = tx.query_row("SELECT patina_new_site_id()", [], |r| r.get(0))?;
    tx.execute_batch(
        "DELETE FROM patina_origin_ranges;
         DELETE FROM patina_sync_cursors;
         DELETE FROM patina_sync_ranges;
         DELETE FROM patina_sync_inbox;
         DELETE FROM patina_collected;
         DELETE FROM patina_schema_buffer;
         DELETE FROM patina_schema_buffer_parts;
         DELETE FROM patina_node_flags WHERE key IN ('reseed', 'last_contact');",
    )?;
    tx.commit()?;
    Ok(copy)
}
