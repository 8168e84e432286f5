//! `patina_staleness`: the staleness report as a plain table any app reads with plain SQL,
//! no extension loaded (README "Staleness").
//!
//! Written only by the node, on a thread and connection of its own, in one short
//! transaction at most once a second and only when some row changed: the rows that
//! changed are upserted, the origins that left the report deleted. It is a plain table
//! (not replicated: no triggers, so no change is captured and `crsql_db_version()` does
//! not move), like the other bookkeeping tables; the API's authorizer refuses writes to
//! it as to every `patina_*` table. At start the node empties it, so figures of a
//! previous life (or of the node a backup was taken from) never linger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::{params, Connection, TransactionBehavior};

use crate::staleness::OriginRow;
use crate::sync::SiteId;

/// The table; `site_id` is the origin's 16-byte id (`hex(site_id)` to read it as text).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS patina_staleness (
    site_id       BLOB PRIMARY KEY NOT NULL,
    is_self       INTEGER NOT NULL,
    known_version INTEGER NOT NULL,
    held_version  INTEGER NOT NULL,
    newest_held   INTEGER NOT NULL,
    held_count    INTEGER NOT NULL,
    missing       INTEGER NOT NULL,
    last_heard_ms INTEGER,
    updated_ms    INTEGER NOT NULL
);
";

/// How often a failed write is retried while no newer report arrives.
const RETRY: Duration = Duration::from_secs(1);

/// Creates the table if missing and empties it (a previous life's figures).
pub fn ensure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute("DELETE FROM patina_staleness", [])?;
    Ok(())
}

/// Writes `rows` over what was `written` before, in one transaction: changed rows are
/// upserted (stamped `now_ms`), rows of origins no longer reported deleted. Returns how
/// many rows it wrote or deleted; with nothing changed it does not even begin a
/// transaction.
pub fn write(
    conn: &mut Connection,
    written: &HashMap<SiteId, OriginRow>,
    rows: &[OriginRow],
    now_ms: i64,
) -> rusqlite::Result<usize> {
    let changed: Vec<&OriginRow> = rows
        .iter()
        .filter(|r| written.get(&r.site_id) != Some(*r))
        .collect();
    let keep: std::collections::HashSet<SiteId> = rows.iter().map(|r| r.site_id).collect();
    let gone: Vec<&SiteId> = written.keys().filter(|s| !keep.contains(*s)).collect();
    if changed.is_empty() && gone.is_empty() {
        return Ok(0);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut up = tx.prepare_cached(
            "INSERT INTO patina_staleness (site_id, is_self, known_version, held_version, \
             newest_held, held_count, missing, last_heard_ms, updated_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT (site_id) DO UPDATE SET is_self = excluded.is_self, \
             known_version = excluded.known_version, held_version = excluded.held_version, \
             newest_held = excluded.newest_held, held_count = excluded.held_count, \
             missing = excluded.missing, last_heard_ms = excluded.last_heard_ms, \
             updated_ms = excluded.updated_ms",
        )?;
        for r in &changed {
            up.execute(params![
                r.site_id.as_slice(),
                r.is_self,
                r.known_version,
                r.held_version,
                r.newest_held,
                r.held_count,
                r.missing,
                r.last_heard_ms,
                now_ms
            ])?;
        }
        let mut del = tx.prepare_cached("DELETE FROM patina_staleness WHERE site_id = ?1")?;
        for s in &gone {
            del.execute([s.as_slice()])?;
        }
    }
    tx.commit()?;
    Ok(changed.len() + gone.len())
}

/// Starts the writer on `conn` (a connection of its own). It writes each report it
/// receives (the driver sends one a second at most, only when it changed), retries a
/// failed write while no newer report comes, and stops with `stop` or when the sender
/// is gone.
pub fn spawn(
    mut conn: Connection,
    reports: Receiver<Vec<OriginRow>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("patina-staleness".into())
        .spawn(move || {
            let mut written: HashMap<SiteId, OriginRow> = HashMap::new();
            let mut pending: Option<Vec<OriginRow>> = None;
            let mut last_warned: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                match reports.recv_timeout(RETRY) {
                    Ok(rows) => pending = Some(rows),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                let Some(rows) = pending.take() else { continue };
                match write(
                    &mut conn,
                    &written,
                    &rows,
                    crate::db::tail::unix_ms() as i64,
                ) {
                    Ok(_) => written = rows.into_iter().map(|r| (r.site_id, r)).collect(),
                    Err(e) => {
                        // Retried with the next report or after RETRY; said once a minute.
                        if !matches!(last_warned, Some(t) if t.elapsed() < Duration::from_secs(60))
                        {
                            tracing::warn!("cannot write patina_staleness (retrying): {e}");
                            last_warned = Some(Instant::now());
                        }
                        pending = Some(rows);
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(site: u8, known: i64) -> OriginRow {
        OriginRow {
            site_id: [site; 16],
            is_self: site == 1,
            known_version: known,
            held_version: 1,
            newest_held: 1,
            held_count: 1,
            missing: known - 1,
            last_heard_ms: Some(5),
        }
    }

    fn stored(conn: &Connection) -> Vec<(Vec<u8>, i64, i64)> {
        conn.prepare("SELECT site_id, known_version, updated_ms FROM patina_staleness ORDER BY 1")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .expect("read the table")
    }

    #[test]
    fn only_changed_rows_are_written_and_departed_ones_deleted() {
        let mut conn = Connection::open_in_memory().expect("db");
        ensure(&conn).expect("schema");
        let first = vec![row(1, 1), row(2, 4)];
        assert_eq!(
            write(&mut conn, &HashMap::new(), &first, 100).expect("write"),
            2
        );
        let written: HashMap<SiteId, OriginRow> =
            first.iter().map(|r| (r.site_id, r.clone())).collect();
        assert_eq!(write(&mut conn, &written, &first, 200).expect("same"), 0);
        let next = vec![row(1, 1), row(3, 2)];
        assert_eq!(write(&mut conn, &written, &next, 300).expect("write"), 2);
        assert_eq!(
            stored(&conn),
            vec![(vec![1; 16], 1, 100), (vec![3; 16], 2, 300)],
            "the unchanged row keeps its stamp; the departed one is gone"
        );
        ensure(&conn).expect("again");
        assert!(stored(&conn).is_empty(), "emptied at start");
    }
}
