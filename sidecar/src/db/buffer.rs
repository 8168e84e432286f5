//! The schema buffer: whole units that name a table or column this node does not have
//! yet, kept durably until the local schema catches up (the rule: `sync::schema`).
//!
//! A buffered unit is written in the transaction that records it as received (held
//! versions, the catch-up cursor), so memory and disk never disagree and a crash loses
//! nothing: the apply thread applies it after a restart as before. Each entry keeps the
//! versions whose changes are only here (`versions`), which the node never vouches for
//! to peers until the entry is applied.
//!
//! The changes are stored in parts of at most [`PART_CHANGES`] changes (CBOR), so a large
//! catch-up unit is never encoded or decoded all at once.

use std::sync::Mutex;

use minicbor::{Decode, Encode};
use prometheus::{IntCounter, IntGauge, Registry};
use rusqlite::{params, Connection, OptionalExtension};

use crate::sync::{Change, Held, Missing, OriginRanges};

/// The buffer tables (plain tables, not replicated).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS patina_schema_buffer (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL,
    site        BLOB NOT NULL,
    from_v      INTEGER NOT NULL,
    to_v        INTEGER NOT NULL,
    missing     TEXT NOT NULL,
    versions    BLOB NOT NULL DEFAULT x'8180',
    changes     INTEGER NOT NULL DEFAULT 0,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patina_schema_buffer_parts (
    id      INTEGER NOT NULL,
    part    INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (id, part)
) WITHOUT ROWID;
";

/// Changes per stored part.
pub const PART_CHANGES: usize = 4096;

/// Errors of the buffer; each leaves the caller's transaction to be rolled back.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("schema buffer: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored part or version list does not decode (the file was edited or damaged).
    #[error("schema buffer: entry {id} does not decode: {reason}")]
    Decode { id: i64, reason: String },
}

/// Where a buffered unit came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An origin's unit (broadcast or repair): `site` is the origin, `(from, to]` its
    /// versions.
    Unit,
    /// One origin's changes in a catch-up unit of a peer's feed: `site` is the origin,
    /// `(from, to]` the peer's feed range.
    CatchUp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Unit => "unit",
            Kind::CatchUp => "catch-up",
        }
    }
}

/// Creates the buffer tables if missing.
pub fn ensure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

/// Wire shape of the stored version list.
#[derive(Encode, Decode)]
struct Versions(#[n(0)] Vec<OriginRanges>);

/// One entry being written: [`start`], then [`Writer::append`] per batch of changes,
/// then [`Writer::finish`].
pub struct Writer {
    id: i64,
    part: i64,
    changes: i64,
    versions: Held,
}

/// Starts an entry for a unit from `site` covering `(from, to]`, missing `missing`.
pub fn start(
    conn: &Connection,
    kind: Kind,
    site: &[u8],
    from: i64,
    to: i64,
    missing: &[Missing],
    now: i64,
) -> rusqlite::Result<Writer> {
    conn.prepare_cached(
        "INSERT INTO patina_schema_buffer (kind, site, from_v, to_v, missing, received_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        kind.as_str(),
        site,
        from,
        to,
        crate::sync::describe_missing(missing),
        now
    ])?;
    Ok(Writer {
        id: conn.last_insert_rowid(),
        part: 0,
        changes: 0,
        versions: Held::default(),
    })
}

impl Writer {
    /// The entry's id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Stores `changes` (in parts) and notes their versions.
    pub fn append(&mut self, conn: &Connection, changes: &[Change]) -> rusqlite::Result<()> {
        let mut ins = conn.prepare_cached(
            "INSERT INTO patina_schema_buffer_parts (id, part, payload) VALUES (?1, ?2, ?3)",
        )?;
        for part in changes.chunks(PART_CHANGES) {
            // Encoding into a Vec cannot fail (the writer is infallible).
            let payload = minicbor::to_vec(part).unwrap_or_default();
            ins.execute(params![self.id, self.part, payload])?;
            self.part += 1;
            self.changes += part.len() as i64;
            self.versions
                .union_with(&crate::sync::buffered_versions(part));
        }
        Ok(())
    }

    /// Completes the entry. `versions` are the versions held only here; `None` means
    /// those of the changes appended (a catch-up unit).
    pub fn finish(self, conn: &Connection, versions: Option<&Held>) -> rusqlite::Result<i64> {
        let v = versions.unwrap_or(&self.versions).to_wire(usize::MAX);
        let payload = minicbor::to_vec(Versions(v)).unwrap_or_default();
        conn.prepare_cached(
            "UPDATE patina_schema_buffer SET versions = ?2, changes = ?3 WHERE id = ?1",
        )?
        .execute(params![self.id, payload, self.changes])?;
        Ok(self.changes)
    }
}

/// One buffered entry, without its changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub unit: bool,
    pub site: Vec<u8>,
    pub from: i64,
    pub to: i64,
    pub missing: String,
    pub changes: i64,
    pub received_at: i64,
}

/// Every entry, in the order they are applied: by site and version range (an origin's
/// units in its order), then by arrival.
pub fn entries(conn: &Connection) -> rusqlite::Result<Vec<Entry>> {
    conn.prepare_cached(
        "SELECT id, kind, site, from_v, to_v, missing, changes, received_at \
         FROM patina_schema_buffer ORDER BY site, from_v, id",
    )?
    .query_map([], |r| {
        Ok(Entry {
            id: r.get(0)?,
            unit: r.get::<_, String>(1)? == Kind::Unit.as_str(),
            site: r.get(2)?,
            from: r.get(3)?,
            to: r.get(4)?,
            missing: r.get(5)?,
            changes: r.get(6)?,
            received_at: r.get(7)?,
        })
    })?
    .collect()
}

/// Hands the changes of entry `id` to `f`, part by part, in order.
pub fn parts<E: From<BufferError>>(
    conn: &Connection,
    id: i64,
    mut f: impl FnMut(Vec<Change>) -> Result<(), E>,
) -> Result<(), E> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT payload FROM patina_schema_buffer_parts WHERE id = ?1 ORDER BY part",
        )
        .map_err(BufferError::from)?;
    let mut rows = stmt.query([id]).map_err(BufferError::from)?;
    while let Some(row) = rows.next().map_err(BufferError::from)? {
        let bytes = row
            .get_ref(0)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(BufferError::from)?;
        let changes: Vec<Change> = minicbor::decode(bytes).map_err(|e| BufferError::Decode {
            id,
            reason: e.to_string(),
        })?;
        f(changes)?;
    }
    Ok(())
}

/// Records what entry `id` misses now (the schema moved, but not far enough).
pub fn set_missing(conn: &Connection, id: i64, missing: &[Missing]) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE patina_schema_buffer SET missing = ?2 WHERE id = ?1")?
        .execute(params![id, crate::sync::describe_missing(missing)])?;
    Ok(())
}

/// Removes entry `id` (applied).
pub fn remove(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM patina_schema_buffer_parts WHERE id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM patina_schema_buffer WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Every version held only in the buffer: what this node must not vouch for to peers.
pub fn held(conn: &Connection) -> Result<Held, BufferError> {
    let mut out = Held::default();
    let mut stmt = conn.prepare_cached("SELECT id, versions FROM patina_schema_buffer")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let bytes = row.get_ref(1).and_then(|v| Ok(v.as_blob()?))?;
        let Versions(list) = minicbor::decode(bytes).map_err(|e| BufferError::Decode {
            id,
            reason: e.to_string(),
        })?;
        out.union_with(&Held::from_wire(&list));
    }
    Ok(out)
}

/// Whether anything is buffered (cheap: one index probe).
pub fn is_empty(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM patina_schema_buffer LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?
        .is_none())
}

/// What the buffer holds, for `/v1/health` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Buffered units.
    pub units: u64,
    /// Their changes.
    pub changes: u64,
    /// Arrival (unix seconds) of the oldest, when any.
    pub oldest_received_at: Option<i64>,
    /// What they miss, each once: `column t.c`, `table u`.
    pub missing: Vec<String>,
}

/// Summarises the entries.
pub fn summarize(entries: &[Entry]) -> Summary {
    let mut missing: Vec<String> = entries
        .iter()
        .flat_map(|e| e.missing.split(", ").map(str::to_string))
        .filter(|m| !m.is_empty())
        .collect();
    missing.sort();
    missing.dedup();
    Summary {
        units: entries.len() as u64,
        changes: entries.iter().map(|e| e.changes.max(0) as u64).sum(),
        oldest_received_at: entries.iter().map(|e| e.received_at).min(),
        missing,
    }
}

/// The buffer's figures as the node shares them: gauges and counters in `/metrics`, the
/// last summary for `/v1/health` (which never reads the database).
pub struct SchemaMetrics {
    /// `patina_schema_buffered_units`: units received whose tables or columns this node
    /// lacks yet, waiting in the buffer.
    pub buffered_units: IntGauge,
    /// `patina_schema_buffered_changes`: their changes.
    pub buffered_changes: IntGauge,
    /// `patina_schema_buffered_oldest_seconds`: age of the oldest (0 when none).
    pub oldest_seconds: IntGauge,
    /// `patina_schema_units_buffered_total` / `patina_schema_units_unbuffered_total`:
    /// units put into the buffer, and taken out applied.
    pub buffered_total: IntCounter,
    pub unbuffered_total: IntCounter,
    /// This node's schema fingerprint (`sync::Schema::fingerprint`), and the buffer's
    /// last summary.
    pub status: Mutex<(Option<u64>, Summary)>,
    /// `patina_schema_origins_elsewhere`: origins whose last unit carried a fingerprint
    /// other than this node's (site id and fingerprint, hex): nodes on another schema.
    pub origins_elsewhere: IntGauge,
    pub elsewhere: Mutex<Vec<(String, String)>>,
}

impl SchemaMetrics {
    /// Creates the figures and registers them in `registry`.
    pub fn new(registry: &Registry) -> SchemaMetrics {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric names are constant and valid");
            if let Err(e) = registry.register(Box::new(g.clone())) {
                tracing::error!("cannot register a metric: {e}");
            }
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric names are constant and valid");
            if let Err(e) = registry.register(Box::new(c.clone())) {
                tracing::error!("cannot register a metric: {e}");
            }
            c
        };
        SchemaMetrics {
            buffered_units: gauge(
                "patina_schema_buffered_units",
                "Units naming a table or column this node lacks yet, buffered until it has them.",
            ),
            buffered_changes: gauge(
                "patina_schema_buffered_changes",
                "Changes of the units in the schema buffer.",
            ),
            oldest_seconds: gauge(
                "patina_schema_buffered_oldest_seconds",
                "Age of the oldest unit in the schema buffer (0 when empty).",
            ),
            buffered_total: counter(
                "patina_schema_units_buffered_total",
                "Units put into the schema buffer.",
            ),
            unbuffered_total: counter(
                "patina_schema_units_unbuffered_total",
                "Units taken out of the schema buffer and applied.",
            ),
            status: Mutex::new((None, Summary::default())),
            origins_elsewhere: gauge(
                "patina_schema_origins_elsewhere",
                "Origins whose last unit carried a schema fingerprint other than this node's.",
            ),
            elsewhere: Mutex::new(Vec::new()),
        }
    }

    /// Publishes a new summary (and the fingerprint, when known).
    pub fn publish(&self, fingerprint: Option<u64>, summary: Summary, now: i64) {
        self.buffered_units
            .set(i64::try_from(summary.units).unwrap_or(i64::MAX));
        self.buffered_changes
            .set(i64::try_from(summary.changes).unwrap_or(i64::MAX));
        self.oldest_seconds.set(
            summary
                .oldest_received_at
                .map_or(0, |t| now.saturating_sub(t).max(0)),
        );
        if let Ok(mut s) = self.status.lock() {
            if fingerprint.is_some() {
                s.0 = fingerprint;
            }
            s.1 = summary;
        }
    }

    /// Publishes the origins last seen on another schema.
    pub fn publish_elsewhere(&self, list: Vec<(String, String)>) {
        self.origins_elsewhere
            .set(i64::try_from(list.len()).unwrap_or(i64::MAX));
        if let Ok(mut e) = self.elsewhere.lock() {
            *e = list;
        }
    }

    /// The origins last seen on another schema.
    pub fn elsewhere(&self) -> Vec<(String, String)> {
        self.elsewhere.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The fingerprint and the last summary.
    pub fn snapshot(&self) -> (Option<u64>, Summary) {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or((None, Summary::default()))
    }
}

impl Default for SchemaMetrics {
    /// Figures registered nowhere (tests).
    fn default() -> Self {
        SchemaMetrics::new(&Registry::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Value;

    fn change(v: i64) -> Change {
        Change {
            table: "t".into(),
            pk: vec![1, 9, v as u8],
            cid: "c".into(),
            val: Value::Integer(v),
            col_version: 1,
            db_version: v,
            site_id: vec![7; 16],
            cl: 1,
            seq: 0,
            origin_version: Some(v),
        }
    }

    #[test]
    fn entries_round_trip_with_their_versions_and_go_when_removed() {
        let conn = Connection::open_in_memory().expect("db");
        ensure(&conn).expect("schema");
        assert!(is_empty(&conn).expect("empty"));
        let missing = [Missing::Column {
            table: "t".into(),
            column: "c".into(),
        }];
        let changes: Vec<Change> = (1..=(PART_CHANGES as i64 + 3)).map(change).collect();
        let mut w = start(&conn, Kind::CatchUp, &[2; 16], 10, 20, &missing, 100).expect("start");
        w.append(&conn, &changes).expect("append");
        assert_eq!(w.finish(&conn, None).expect("finish"), changes.len() as i64);
        let mut unit = Held::default();
        unit.insert([9; 16], 5, 6);
        let w = start(&conn, Kind::Unit, &[9; 16], 4, 6, &missing, 90).expect("start");
        w.finish(&conn, Some(&unit)).expect("finish");
        let only_here = held(&conn).expect("held");
        assert!(only_here.covers(&[7; 16], 1, PART_CHANGES as i64 + 3));
        assert!(only_here.covers(&[9; 16], 5, 6) && !only_here.contains(&[9; 16], 4));
        let list = entries(&conn).expect("entries");
        assert_eq!(list.len(), 2);
        assert!(!list[0].unit && list[0].site == vec![2; 16] && list[1].unit);
        let mut got = Vec::new();
        parts::<BufferError>(&conn, list[0].id, |p| {
            got.extend(p);
            Ok(())
        })
        .expect("parts");
        assert_eq!(got, changes);
        let s = summarize(&list);
        assert_eq!(s.units, 2);
        assert_eq!(s.oldest_received_at, Some(90));
        assert_eq!(s.missing, vec!["column t.c".to_string()]);
        remove(&conn, list[0].id).expect("remove");
        remove(&conn, list[1].id).expect("remove");
        assert!(is_empty(&conn).expect("empty"));
        assert!(held(&conn).expect("held").is_empty());
        let n: i64 = conn
            .query_row("SELECT count(*) FROM patina_schema_buffer_parts", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(n, 0);
    }
}
