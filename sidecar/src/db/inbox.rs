//! The inbox: chunks of a large unit buffered durably until the unit is whole, then
//! applied atomically (DESIGN §2). Bounded in age, units and bytes (issue 7, item 7).
//!
//! A peer that starts units and never finishes them (a crash mid-pull, a hostile peer)
//! used to leave their chunks here forever: 50 such 1 MB chunks grew a database from 0.4
//! to 69.5 MB. Now:
//! - chunks are buffered in order only: a chunk must start where the buffered prefix of
//!   its unit ends (honest senders deliver in order: pushes wait for each
//!   acknowledgement, pulls ask for each continuation), so a unit holds no holes;
//! - a peer has at most [`InboxLimits::max_units_per_peer`] incomplete units; starting
//!   one more drops its oldest (a pull that timed out starts a new unit anyway);
//! - a unit whose newest chunk is older than [`InboxLimits::max_age`] is dropped
//!   ([`expire`], run by the apply thread); its cursor never moved, so anti-entropy
//!   fetches it again from whoever has it;
//! - the bytes buffered per peer and node-wide are capped: a chunk past a cap is refused
//!   (counted as apply failures), so a unit larger than the per-peer cap cannot
//!   replicate — split such transactions.
//!
//! Deleted rows' pages go to SQLite's free list and are reused by later inserts.

use std::time::Duration;

use rusqlite::{params, Connection};

use crate::sync::{Chunk, SiteId};

/// The inbox table; `received_at` (unix seconds) drives expiry.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS patina_sync_inbox (
    peer_site   BLOB NOT NULL,
    unit_from   INTEGER NOT NULL,
    unit_to     INTEGER NOT NULL,
    chunk_from  INTEGER NOT NULL,
    chunk_to    INTEGER NOT NULL,
    payload     BLOB NOT NULL,
    received_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (peer_site, unit_from, unit_to, chunk_from)
);
";

/// How long an incomplete unit is kept after its newest chunk arrived. Honest chunks of a
/// unit follow each other within a pull timeout (10 s); 10 minutes leaves room for a slow
/// apply queue and a restart.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Incomplete units per peer (one pull in flight plus multi-chunk pushes).
pub const MAX_UNITS_PER_PEER: usize = 4;
/// Bytes of buffered chunks per peer: also the largest unit that can replicate.
pub const MAX_PEER_BYTES: u64 = 256 * 1024 * 1024;
/// Bytes of buffered chunks node-wide.
pub const MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// The inbox bounds; [`Default`] is the node's (the constants above).
#[derive(Clone, Copy, Debug)]
pub struct InboxLimits {
    pub max_age: Duration,
    pub max_units_per_peer: usize,
    pub max_peer_bytes: u64,
    pub max_bytes: u64,
}

impl Default for InboxLimits {
    fn default() -> Self {
        InboxLimits {
            max_age: MAX_AGE,
            max_units_per_peer: MAX_UNITS_PER_PEER,
            max_peer_bytes: MAX_PEER_BYTES,
            max_bytes: MAX_BYTES,
        }
    }
}

/// Errors of the inbox. Each leaves the applying transaction to be rolled back by the
/// caller (nothing of the chunk is kept).
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("sync inbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("sync inbox: cannot encode a chunk: {0}")]
    Encode(String),
    #[error("sync inbox: a buffered chunk does not decode: {0}")]
    Decode(String),
    /// Buffering the chunk would pass a byte cap; the chunk was refused.
    #[error(
        "sync inbox full: {what} holds {held} bytes of incomplete units, the cap is {cap} \
         (a unit larger than the per-peer cap cannot replicate; split the transaction)"
    )]
    Full {
        what: &'static str,
        held: u64,
        cap: u64,
    },
}

/// Creates the inbox table, adding `received_at` to one made by an older version (its
/// rows count as ancient and expire at the next sweep).
pub fn ensure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    let has_received_at: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('patina_sync_inbox') WHERE name = 'received_at'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_received_at {
        conn.execute_batch(
            "ALTER TABLE patina_sync_inbox ADD COLUMN received_at INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

/// Where the buffered, contiguous prefix of a unit ends (`unit_from` when none is held).
fn buffered_to(
    conn: &Connection,
    site: &SiteId,
    unit_from: i64,
    unit_to: i64,
) -> rusqlite::Result<i64> {
    let ranges: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT chunk_from, chunk_to FROM patina_sync_inbox \
             WHERE peer_site = ?1 AND unit_from = ?2 AND unit_to = ?3 ORDER BY chunk_from",
        )?
        .query_map(params![site.as_slice(), unit_from, unit_to], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut at = unit_from;
    for (from, to) in ranges {
        if from == at {
            at = to;
        }
    }
    Ok(at)
}

/// Buffers one chunk of a multi-chunk unit (already validated: `sync::validate_chunk`);
/// returns whether the buffered chunks now tile the whole unit. A duplicate or a chunk
/// past a hole is not buffered. `now` is unix seconds.
pub fn put(
    conn: &Connection,
    site: &SiteId,
    chunk: &Chunk,
    now: i64,
    limits: &InboxLimits,
) -> Result<bool, InboxError> {
    let at = buffered_to(conn, site, chunk.unit_from, chunk.unit_to)?;
    if chunk.from != at {
        tracing::debug!(
            site_id = %hex::encode(site),
            "sync inbox: chunk ({}, {}] of unit ({}, {}] does not follow the buffered prefix \
             ending at {at}: not buffered",
            chunk.from,
            chunk.to,
            chunk.unit_from,
            chunk.unit_to
        );
        return Ok(at == chunk.unit_to);
    }
    if at == chunk.unit_from {
        make_room_for_a_unit(conn, site, chunk, limits)?;
    }
    let payload = minicbor::to_vec(chunk).map_err(|e| InboxError::Encode(e.to_string()))?;
    let len = payload.len() as u64;
    let held = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<u64> {
        conn.prepare_cached(sql)?
            .query_row(p, |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
    };
    let peer = held(
        "SELECT coalesce(sum(length(payload)), 0) FROM patina_sync_inbox WHERE peer_site = ?1",
        &[&site.as_slice()],
    )?;
    if peer + len > limits.max_peer_bytes {
        return Err(InboxError::Full {
            what: "this peer",
            held: peer,
            cap: limits.max_peer_bytes,
        });
    }
    let all = held(
        "SELECT coalesce(sum(length(payload)), 0) FROM patina_sync_inbox",
        &[],
    )?;
    if all + len > limits.max_bytes {
        return Err(InboxError::Full {
            what: "the node",
            held: all,
            cap: limits.max_bytes,
        });
    }
    conn.prepare_cached(
        "INSERT OR IGNORE INTO patina_sync_inbox \
         (peer_site, unit_from, unit_to, chunk_from, chunk_to, payload, received_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        site.as_slice(),
        chunk.unit_from,
        chunk.unit_to,
        chunk.from,
        chunk.to,
        payload,
        now
    ])?;
    Ok(chunk.to == chunk.unit_to)
}

/// Before a new unit of `site` is buffered: drops that peer's oldest incomplete units so
/// at most `max_units_per_peer - 1` others remain.
fn make_room_for_a_unit(
    conn: &Connection,
    site: &SiteId,
    chunk: &Chunk,
    limits: &InboxLimits,
) -> rusqlite::Result<()> {
    let units: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT unit_from, unit_to FROM patina_sync_inbox WHERE peer_site = ?1 \
             AND NOT (unit_from = ?2 AND unit_to = ?3) \
             GROUP BY unit_from, unit_to ORDER BY max(received_at), unit_to",
        )?
        .query_map(
            params![site.as_slice(), chunk.unit_from, chunk.unit_to],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let keep = limits.max_units_per_peer.saturating_sub(1);
    let excess = units.len().saturating_sub(keep);
    for (f, t) in units.into_iter().take(excess) {
        tracing::warn!(
            site_id = %hex::encode(site),
            "sync inbox: dropping incomplete unit ({f}, {t}) of site {}: the peer started \
             more than {} units without finishing them",
            hex::encode(site),
            limits.max_units_per_peer
        );
        conn.prepare_cached(
            "DELETE FROM patina_sync_inbox WHERE peer_site = ?1 AND unit_from = ?2 AND unit_to = ?3",
        )?
        .execute(params![site.as_slice(), f, t])?;
    }
    Ok(())
}

/// Drops every incomplete unit whose newest chunk arrived before `now - max_age` (unix
/// seconds). Returns the chunks removed.
pub fn expire(conn: &Connection, now: i64, max_age: Duration) -> rusqlite::Result<usize> {
    let cutoff = now.saturating_sub(max_age.as_secs() as i64);
    conn.prepare_cached(
        "DELETE FROM patina_sync_inbox WHERE (peer_site, unit_from, unit_to) IN \
         (SELECT peer_site, unit_from, unit_to FROM patina_sync_inbox \
          GROUP BY peer_site, unit_from, unit_to HAVING max(received_at) < ?1)",
    )?
    .execute([cutoff])
}

/// Hands the buffered chunks of a whole unit to `f` in order, one at a time (a large unit
/// is never decoded all at once), then removes them.
pub fn drain<E: From<InboxError>>(
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
                continue; // not part of the tiling (cannot happen with in-order puts)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{Change, Value};

    fn chunk(unit_from: i64, unit_to: i64, from: i64, to: i64, bytes: usize) -> Chunk {
        Chunk {
            unit_from,
            unit_to,
            from,
            to,
            changes: vec![Change {
                table: "t".into(),
                pk: vec![1, 9, 1],
                cid: "a".into(),
                val: Value::Blob(vec![7; bytes]),
                col_version: 1,
                db_version: to,
                site_id: vec![7; 16],
                cl: 1,
                seq: 0,
                origin_version: Some(to),
            }],
            held: None,
            schema: None,
        }
    }

    fn db() -> Connection {
        let conn = Connection::open_in_memory().expect("in-memory db");
        ensure(&conn).expect("schema");
        conn
    }

    fn rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM patina_sync_inbox", [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn a_unit_is_returned_once_whole_in_order_only() {
        let conn = db();
        let l = InboxLimits::default();
        let site = [9u8; 16];
        // Past a hole: not buffered.
        assert!(!put(&conn, &site, &chunk(10, 30, 20, 30, 1), 1, &l).expect("put"));
        assert_eq!(rows(&conn), 0);
        assert!(!put(&conn, &site, &chunk(10, 30, 10, 20, 1), 1, &l).expect("put"));
        assert!(!put(&conn, &site, &chunk(10, 30, 10, 20, 1), 1, &l).expect("dup"));
        assert!(put(&conn, &site, &chunk(10, 30, 20, 30, 1), 1, &l).expect("put"));
        let mut seen = Vec::new();
        drain::<InboxError>(&conn, &site, 10, 30, |c| {
            seen.push((c.from, c.to));
            Ok(())
        })
        .expect("drain");
        assert_eq!(seen, vec![(10, 20), (20, 30)]);
        assert_eq!(rows(&conn), 0);
    }

    /// Issue 7, item 7: 50 never-completed chunks used to stay forever.
    #[test]
    fn incomplete_units_expire_and_are_bounded_per_peer_and_node_wide() {
        let conn = db();
        let l = InboxLimits {
            max_age: Duration::from_secs(600),
            max_units_per_peer: 4,
            max_peer_bytes: 64 * 1024,
            max_bytes: 100 * 1024,
        };
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        for k in 0..50 {
            put(
                &conn,
                &a,
                &chunk(k * 10, k * 10 + 10, k * 10, k * 10 + 1, 100),
                1000 + k,
                &l,
            )
            .expect("put");
        }
        assert_eq!(rows(&conn), 4, "at most 4 incomplete units per peer");
        // A unit that keeps arriving is kept; its bytes count against the peer's cap.
        let mut at = 0;
        let mut refused = None;
        for _ in 0..100 {
            match put(&conn, &b, &chunk(0, 1_000, at, at + 1, 10_000), 2000, &l) {
                Ok(_) => at += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(
            refused,
            Some(InboxError::Full {
                what: "this peer",
                ..
            })
        ));
        assert!(
            (5..=7).contains(&at),
            "{at} chunks of 10 kB under a 64 kB cap"
        );
        // Node-wide: a third peer meets the node's cap before its own.
        let mut refused = None;
        for i in 0..100 {
            if let Err(e) = put(&conn, &c, &chunk(0, 1_000, i, i + 1, 10_000), 2000, &l) {
                refused = Some(e);
                break;
            }
        }
        assert!(matches!(
            refused,
            Some(InboxError::Full {
                what: "the node",
                ..
            })
        ));
        // Expiry: peer a's units (newest chunk at 1046) go 600 s later; the others stay.
        assert_eq!(expire(&conn, 1500, l.max_age).expect("expire"), 0);
        assert_eq!(expire(&conn, 1650, l.max_age).expect("expire"), 4);
        let left: i64 = conn
            .query_row(
                "SELECT count(*) FROM patina_sync_inbox WHERE peer_site = ?1",
                [a.as_slice()],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(left, 0);
        assert!(rows(&conn) > 0);
        assert!(expire(&conn, 2601, l.max_age).expect("expire") > 0);
        assert_eq!(rows(&conn), 0);
    }

    #[test]
    fn an_inbox_of_an_older_version_gains_received_at() {
        let conn = Connection::open_in_memory().expect("db");
        conn.execute_batch(
            "CREATE TABLE patina_sync_inbox (peer_site BLOB NOT NULL, unit_from INTEGER NOT NULL,
             unit_to INTEGER NOT NULL, chunk_from INTEGER NOT NULL, chunk_to INTEGER NOT NULL,
             payload BLOB NOT NULL, PRIMARY KEY (peer_site, unit_from, unit_to, chunk_from));
             INSERT INTO patina_sync_inbox VALUES (x'01', 0, 9, 0, 1, x'00');",
        )
        .expect("old schema");
        ensure(&conn).expect("migrate");
        ensure(&conn).expect("idempotent");
        assert_eq!(expire(&conn, 10_000, MAX_AGE).expect("expire"), 1);
    }
}
