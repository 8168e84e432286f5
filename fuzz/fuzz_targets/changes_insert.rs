//! Arbitrary 9- and 10-column rows written into `crsql_changes` of a real database with
//! the extension loaded (`PATINA_FUZZ_EXT`, set by `scripts/fuzz`), on every merge path:
//! one change at a time, queued under `merging = 1`, and packed into one `patina_batch`
//! blob (with arbitrary bytes after the last change), as the node merges. Any row or
//! blob must be merged or refused with an error; afterwards the database must pass its
//! integrity check, keep integer clocks, and read back through the feed.
#![no_main]

use std::cell::RefCell;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, LoadExtensionGuard};

#[derive(Arbitrary, Debug)]
enum Num {
    Small(u8),
    Max,
    MaxMinus1,
    Min,
    Negative(u8),
    Raw(i64),
}

impl Num {
    fn get(&self) -> i64 {
        match self {
            Num::Small(v) => i64::from(*v % 8),
            Num::Max => i64::MAX,
            Num::MaxMinus1 => i64::MAX - 1,
            Num::Min => i64::MIN,
            Num::Negative(v) => -i64::from(*v),
            Num::Raw(v) => *v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Val {
    Null,
    Int(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl Val {
    fn sql(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Int(v) => Value::Integer(*v),
            Val::Real(v) => Value::Real(*v),
            Val::Text(b) => Value::Text(String::from_utf8_lossy(b).into_owned()),
            Val::Blob(b) => Value::Blob(b.clone()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    /// A well-formed key of the table: packed by the extension itself.
    Id(i64),
    /// Any bytes at all.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Change {
    table: u8,
    key: Key,
    cid: u8,
    val: Val,
    col_version: Num,
    db_version: Num,
    site: [u8; 16],
    short_site: bool,
    cl: Num,
    seq: Num,
    origin_version: Option<Num>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    batched: bool,
    /// The changes go in as one `patina_batch`, followed by `tail`.
    packed: bool,
    tail: Vec<u8>,
    changes: Vec<Change>,
    local_write_after: bool,
}

const TABLES: [&str; 4] = ["t", "k", "missing", ""];
const CIDS: [&str; 5] = ["-1", "a", "b", "nope", ""];

fn open() -> Connection {
    let ext = std::env::var("PATINA_FUZZ_EXT").expect("PATINA_FUZZ_EXT names libpatina.so");
    let conn = Connection::open_in_memory().expect("in-memory database");
    // SAFETY: loading our own extension, built from this repository.
    unsafe {
        let _guard = LoadExtensionGuard::new(&conn).expect("enable extension loading");
        conn.load_extension(&ext, Some("sqlite3_patina_init"))
            .expect("load libpatina");
    }
    conn.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a, b TEXT);
         CREATE TABLE k (id INTEGER PRIMARY KEY NOT NULL);
         SELECT crsql_as_crr('t'); SELECT crsql_as_crr('k');",
    )
    .expect("schema");
    conn
}

thread_local! {
    static CONN: RefCell<Option<Connection>> = const { RefCell::new(None) };
}

fn run(conn: &Connection, input: &Input) {
    conn.execute_batch("BEGIN").expect("begin");
    if input.batched {
        let _ = conn.execute("UPDATE patina_state SET merging = 1", []);
    }
    let mut blob = Vec::new();
    for c in input.changes.iter().take(32) {
        let table = TABLES[c.table as usize % TABLES.len()];
        let pk: Value = match &c.key {
            Key::Id(id) => conn
                .query_row("SELECT crsql_pack_columns(?1)", [id], |r| r.get(0))
                .unwrap_or(Value::Null),
            Key::Raw(b) => Value::Blob(b.clone()),
        };
        let site = if c.short_site {
            c.site[..5].to_vec()
        } else {
            c.site.to_vec()
        };
        let mut row = vec![
            Value::Text(table.into()),
            pk,
            Value::Text(CIDS[c.cid as usize % CIDS.len()].into()),
            c.val.sql(),
            Value::Integer(c.col_version.get()),
            Value::Integer(c.db_version.get()),
            Value::Blob(site),
            Value::Integer(c.cl.get()),
            Value::Integer(c.seq.get()),
        ];
        if input.packed {
            row.push(c.origin_version.as_ref().map_or(Value::Null, |ov| Value::Integer(ov.get())));
            let record: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT crsql_pack_columns(?,?,?,?,?,?,?,?,?,?)",
                    params_from_iter(row),
                    |r| r.get(0),
                )
                .ok();
            blob.extend(record.unwrap_or_default());
            continue;
        }
        let sql = match &c.origin_version {
            Some(ov) => {
                row.push(Value::Integer(ov.get()));
                "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, \
                 site_id, cl, seq, origin_version) VALUES (?,?,?,?,?,?,?,?,?,?)"
            }
            None => "INSERT INTO crsql_changes VALUES (?,?,?,?,?,?,?,?,?)",
        };
        let _ = conn.execute(sql, params_from_iter(row));
    }
    if input.packed {
        blob.extend_from_slice(&input.tail);
        let _ = conn.execute(
            "INSERT INTO crsql_changes (patina_batch) VALUES (?1)",
            [Value::Blob(blob)],
        );
    }
    if input.batched {
        let _ = conn.execute("UPDATE patina_state SET merging = 0", []);
    }
    if input.local_write_after {
        let _ = conn.execute_batch(
            "INSERT INTO t (id, a, b) VALUES (1, 'local', 'x') \
             ON CONFLICT (id) DO UPDATE SET a = 'local2'; DELETE FROM k WHERE id % 2 = 0;",
        );
    }
    let _ = conn.execute_batch("COMMIT");
    let _ = conn.execute_batch("ROLLBACK");
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check runs");
    assert_eq!(ok, "ok");
    let reals: i64 = conn
        .query_row(
            "SELECT count(*) FROM crsql_changes WHERE typeof(col_version) != 'integer' \
             OR typeof(cl) != 'integer' OR typeof(db_version) != 'integer'",
            [],
            |r| r.get(0),
        )
        .expect("the feed reads");
    assert_eq!(reals, 0, "a clock left the integers");
}

fuzz_target!(|input: Input| {
    CONN.with(|cell| {
        let mut slot = cell.borrow_mut();
        // One database across inputs reaches states a single input cannot build; it is
        // replaced once it grows, so runs stay fast.
        let conn = slot.get_or_insert_with(open);
        run(conn, &input);
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap_or(0);
        if n > 256 {
            *slot = None;
        }
    });
});
