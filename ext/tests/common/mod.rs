//! Fixtures: connections to real database files with the built `libpatina.so` loaded
//! (and connections that load nothing, like an existing app).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::Connection;

/// `target/<profile>/libpatina.so`, beside the `deps/` folder the test binary runs from.
pub fn ext_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let so = dir.join("libpatina.so");
    assert!(
        so.exists(),
        "{} missing: run `cargo build -p patina` first",
        so.display()
    );
    // `cargo test` rebuilds the rlib these tests link, not the cdylib they load: refuse a
    // library older than the sources rather than test stale code.
    let built = std::fs::metadata(&so)
        .and_then(|m| m.modified())
        .expect("mtime of libpatina.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).expect("ext/src").flatten() {
        let changed = entry.metadata().and_then(|m| m.modified()).expect("mtime");
        assert!(
            changed <= built,
            "{} is older than {}: run `cargo build -p patina` (scripts/test does) before cargo test",
            so.display(),
            entry.path().display()
        );
    }
    so
}

/// Opens `path` with the extension loaded (WAL, busy timeout).
pub fn open(path: &Path) -> Connection {
    let c = open_plain(path);
    unsafe {
        c.load_extension_enable().expect("enable");
        c.load_extension(ext_path(), Some("sqlite3_patina_init"))
            .expect("load libpatina");
        c.load_extension_disable().expect("disable");
    }
    c
}

/// Opens `path` without loading anything: the app that knows nothing of patina.
pub fn open_plain(path: &Path) -> Connection {
    let c = Connection::open(path).expect("open");
    c.busy_timeout(std::time::Duration::from_secs(5))
        .expect("busy timeout");
    c.pragma_update(None, "journal_mode", "WAL").expect("wal");
    c
}

pub fn memory() -> Connection {
    let c = Connection::open_in_memory().expect("open");
    unsafe {
        c.load_extension_enable().expect("enable");
        c.load_extension(ext_path(), Some("sqlite3_patina_init"))
            .expect("load libpatina");
    }
    c
}

/// One change row: (table, pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version).
pub type ChangeRow = (
    String,
    Vec<u8>,
    String,
    Value,
    i64,
    i64,
    Vec<u8>,
    i64,
    i64,
    i64,
);

pub fn changes_after(c: &Connection, after: i64) -> Vec<ChangeRow> {
    let mut s = c
        .prepare(
            "SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version \
             FROM crsql_changes WHERE db_version > ?1",
        )
        .expect("prepare feed");
    let rows = s
        .query_map([after], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
            ))
        })
        .expect("query feed");
    rows.map(|r| r.expect("row")).collect()
}

/// Merges `changes` into `c` through `INSERT INTO crsql_changes`, one statement each.
pub fn merge(c: &Connection, changes: &[ChangeRow]) {
    let mut s = c
        .prepare_cached(
            "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .expect("prepare merge");
    for ch in changes {
        s.execute(rusqlite::params![
            ch.0, ch.1, ch.2, ch.3, ch.4, ch.5, ch.6, ch.7, ch.8, ch.9
        ])
        .expect("merge");
    }
}

/// A `patina_batch` blob of `changes`: each change's ten fields packed by the extension's
/// own `crsql_pack_columns` (on connection `c`), one record after another.
pub fn pack_batch(c: &Connection, changes: &[ChangeRow]) -> Vec<u8> {
    let mut s = c
        .prepare_cached("SELECT crsql_pack_columns(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)")
        .expect("prepare pack");
    let mut out = Vec::new();
    for ch in changes {
        let rec: Vec<u8> = s
            .query_row(
                rusqlite::params![ch.0, ch.1, ch.2, ch.3, ch.4, ch.5, ch.6, ch.7, ch.8, ch.9],
                |r| r.get(0),
            )
            .expect("pack");
        out.extend_from_slice(&rec);
    }
    out
}

/// The replica state that must converge: every change row on the columns that are not
/// local numbers, sorted.
/// `(table, pk, cid, val, col_version, cl, site_id)` of one change.
pub type Converging = (String, Vec<u8>, String, String, i64, i64, Vec<u8>);

pub fn converging_state(c: &Connection) -> Vec<Converging> {
    let mut v: Vec<_> = changes_after(c, i64::MIN)
        .into_iter()
        .map(|(t, pk, cid, val, cv, _, site, cl, _, _)| {
            (t, pk, cid, format!("{val:?}"), cv, cl, site)
        })
        .collect();
    v.sort();
    v
}

/// A canonical dump of a table: every row, every column, sorted by the primary key.
pub fn dump(c: &Connection, table: &str, order_by: &str) -> Vec<Vec<String>> {
    let mut s = c
        .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY {order_by}"))
        .expect("dump");
    let n = s.column_count();
    let rows = s
        .query_map([], |r| {
            Ok((0..n)
                .map(|i| format!("{:?}", r.get::<_, Value>(i).expect("value")))
                .collect::<Vec<_>>())
        })
        .expect("dump rows");
    rows.map(|r| r.expect("row")).collect()
}

pub fn one<T: rusqlite::types::FromSql>(c: &Connection, sql: &str) -> T {
    c.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `patina_origin_ranges`, ordered: what a database records it holds of other origins.
pub fn origin_ranges(c: &Connection) -> Vec<(Vec<u8>, i64, i64)> {
    let mut s = c
        .prepare("SELECT site_id, start, \"end\" FROM patina_origin_ranges ORDER BY site_id, start")
        .expect("ranges");
    let rows = s
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("ranges rows");
    rows.map(|r| r.expect("row")).collect()
}
