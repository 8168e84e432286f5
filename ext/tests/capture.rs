//! Local writes captured by the plain-SQL triggers: clocks, numbering, causal length.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;
use rusqlite::types::Value;

fn setup() -> rusqlite::Connection {
    let c = memory();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');",
    )
    .unwrap();
    c
}

fn row_clock(c: &rusqlite::Connection, id: i64) -> Vec<(String, i64, i64)> {
    let mut s = c.prepare("SELECT cid, col_version, cl FROM crsql_changes WHERE pk = crsql_pack_columns(?1) ORDER BY cid").unwrap();
    s.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn numbers_are_gap_free_consecutive_and_per_change() {
    let c = setup();
    c.execute_batch(
        "BEGIN; INSERT INTO t VALUES (1, 'a', 'b'); UPDATE t SET a = 'c' WHERE id = 1; COMMIT;",
    )
    .unwrap();
    // insert: 1 reserved for the row clock (a first life records none), a 2, b 3; update
    // of a: 4 (a's old change 2 is superseded).
    let v: Vec<i64> = changes_after(&c, 0).iter().map(|r| r.5).collect();
    assert_eq!(v, vec![3, 4]);
    assert_eq!(one::<i64>(&c, "SELECT crsql_db_version()"), 4);
    // A rolled-back transaction gives its numbers back.
    c.execute_batch("BEGIN; INSERT INTO t VALUES (2, 1, 1); ROLLBACK;")
        .unwrap();
    assert_eq!(one::<i64>(&c, "SELECT crsql_db_version()"), 4);
    // An update that changes nothing records nothing.
    c.execute_batch("UPDATE t SET a = 'c' WHERE id = 1")
        .unwrap();
    assert_eq!(one::<i64>(&c, "SELECT crsql_db_version()"), 4);
    // 1 -> 1.0 is a change (storage class differs).
    c.execute_batch("UPDATE t SET b = 1 WHERE id = 1; UPDATE t SET b = 1.0 WHERE id = 1;")
        .unwrap();
    assert_eq!(one::<i64>(&c, "SELECT crsql_db_version()"), 6);
    // A resurrection records the row's own clock with its number: delete 7, re-insert 8
    // (row), 9, 10.
    c.execute_batch("DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (1, 'r', 'r');")
        .unwrap();
    let v: Vec<i64> = changes_after(&c, 6).iter().map(|r| r.5).collect();
    assert_eq!(v, vec![8, 9, 10]);
}

#[test]
fn delete_and_resurrect_walk_causal_length() {
    let c = setup();
    c.execute_batch("INSERT INTO t VALUES (1, 'a', 'b'); UPDATE t SET a = 'x' WHERE id = 1;")
        .unwrap();
    assert_eq!(
        row_clock(&c, 1),
        vec![("a".into(), 2, 1), ("b".into(), 1, 1)]
    );
    c.execute_batch("DELETE FROM t WHERE id = 1").unwrap();
    assert_eq!(row_clock(&c, 1), vec![("-1".into(), 2, 2)]);
    c.execute_batch("INSERT INTO t VALUES (1, 'n', NULL)")
        .unwrap();
    // Resurrection restarts column clocks.
    assert_eq!(
        row_clock(&c, 1),
        vec![("-1".into(), 3, 3), ("a".into(), 1, 3), ("b".into(), 1, 3)]
    );
}

#[test]
fn insert_or_replace_is_delete_plus_insert_with_or_without_recursive_triggers() {
    for recursive in [false, true] {
        let c = setup();
        c.pragma_update(None, "recursive_triggers", recursive)
            .unwrap();
        c.execute_batch(
            "INSERT INTO t VALUES (1, 'a', 'b'); INSERT OR REPLACE INTO t VALUES (1, 'c', 'd');",
        )
        .unwrap();
        assert_eq!(
            row_clock(&c, 1),
            vec![("-1".into(), 3, 3), ("a".into(), 1, 3), ("b".into(), 1, 3)],
            "recursive_triggers={recursive}"
        );
    }
}

#[test]
fn upsert_multi_row_and_key_updates() {
    let c = setup();
    c.execute_batch(
        "INSERT INTO t VALUES (1, 'a', 'b'), (2, 'a', 'b'), (3, 'a', 'b');
         INSERT INTO t VALUES (1, 'z', 'b') ON CONFLICT (id) DO UPDATE SET a = excluded.a;
         UPDATE t SET b = 'm' WHERE id >= 2;
         DELETE FROM t WHERE id = 3;
         UPDATE t SET id = 10 WHERE id = 2;",
    )
    .unwrap();
    assert_eq!(
        row_clock(&c, 1),
        vec![("a".into(), 2, 1), ("b".into(), 1, 1)]
    );
    assert_eq!(row_clock(&c, 3), vec![("-1".into(), 2, 2)]);
    assert_eq!(
        row_clock(&c, 2),
        vec![("-1".into(), 2, 2)],
        "old key deleted"
    );
    assert_eq!(
        row_clock(&c, 10),
        vec![("a".into(), 1, 1), ("b".into(), 1, 1)],
        "new key inserted"
    );
}

#[test]
fn composite_keys_and_every_value_type() {
    let c = memory();
    c.execute_batch("CREATE TABLE kv(k1 TEXT NOT NULL, k2 INTEGER NOT NULL, v, PRIMARY KEY (k1, k2)); SELECT crsql_as_crr('kv');").unwrap();
    let big = vec![0xabu8; 1 << 20];
    c.execute(
        "INSERT INTO kv VALUES ('x', 1, ?1)",
        [Value::Blob(big.clone())],
    )
    .unwrap();
    c.execute_batch("INSERT INTO kv VALUES ('x', 2, NULL), ('y', 1, 1.5), ('y', 2, 'text'), ('z', -5, 9223372036854775807);").unwrap();
    let rows = changes_after(&c, 0);
    let pk: Vec<u8> = one(&c, "SELECT crsql_pack_columns('x', 1)");
    let v = rows
        .iter()
        .find(|r| r.1 == pk && r.2 == "v")
        .expect("change for ('x', 1)");
    assert_eq!(v.3, Value::Blob(big));
    let vals: Vec<Value> = rows
        .iter()
        .filter(|r| r.2 == "v")
        .map(|r| r.3.clone())
        .collect();
    assert!(
        vals.contains(&Value::Null)
            && vals.contains(&Value::Real(1.5))
            && vals.contains(&Value::Integer(i64::MAX))
    );
}

#[test]
fn writes_from_a_connection_that_loaded_nothing_are_captured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let c = open(&path);
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');",
    )
    .unwrap();
    let app = open_plain(&path);
    app.execute_batch("INSERT INTO t VALUES (1, 'a', 'b'); UPDATE t SET a = 'c'; INSERT INTO t VALUES (2, 1, 2); DELETE FROM t WHERE id = 2;").unwrap();
    assert_eq!(
        row_clock(&c, 1),
        vec![("a".into(), 2, 1), ("b".into(), 1, 1)]
    );
    assert_eq!(row_clock(&c, 2), vec![("-1".into(), 2, 2)]);
    let site: Vec<u8> = one(&c, "SELECT crsql_site_id()");
    assert!(
        changes_after(&c, 0).iter().all(|r| r.6 == site),
        "credited to this database's site"
    );
}

#[test]
fn trigger_statements_never_scan() {
    for ddl in [
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b)",
        "CREATE TABLE t(id TEXT COLLATE NOCASE PRIMARY KEY NOT NULL, a, b)",
        "CREATE TABLE t(k1 TEXT NOT NULL, k2 BLOB NOT NULL, a, b, PRIMARY KEY (k1, k2)) WITHOUT ROWID",
    ] {
        let c = memory();
        c.execute_batch(ddl).unwrap();
        c.execute_batch("SELECT crsql_as_crr('t')").unwrap();
        let bodies: Vec<String> = c
            .prepare("SELECT sql FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = 't'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(bodies.len(), 5, "insert, delete, key change, one per column");
        for body in bodies {
            let inner = &body[body.find("BEGIN").unwrap() + 5..body.rfind("END").unwrap()];
            for stmt in inner.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
                // NEW.x / OLD.x are parameters at this point.
                let mut sql = stmt.to_string();
                for col in ["id", "k1", "k2", "a", "b"] {
                    sql = sql.replace(&format!("NEW.\"{col}\""), "?").replace(&format!("OLD.\"{col}\""), "?");
                }
                // RAISE() prepares only inside a trigger; a NULL plans the same.
                while let Some(at) = sql.find("RAISE(ABORT, '") {
                    let end = at + sql[at..].find("')").unwrap() + 2;
                    sql.replace_range(at..end, "NULL");
                }
                let mut plan = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let mut rows = plan.raw_query(); // parameters stay unbound: the plan is the same
                let mut details: Vec<String> = Vec::new();
                while let Some(r) = rows.next().unwrap() {
                    details.push(r.get(3).unwrap());
                }
                assert!(!details.iter().any(|d| d.starts_with("SCAN")), "{ddl}\n{sql}\n{details:?}");
            }
        }
    }
}

#[test]
fn feed_reads_use_the_index() {
    let c = setup();
    let plan: Vec<String> = c
        .prepare("EXPLAIN QUERY PLAN SELECT * FROM t__patina_clock WHERE __patina_dbv > 5")
        .unwrap()
        .query_map([], |r| r.get(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(plan.iter().any(|d| d.contains("t__patina_dbv")), "{plan:?}");
}

#[test]
fn adding_a_column_emits_no_change_per_row() {
    let c = setup();
    c.execute_batch("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) INSERT INTO t SELECT i, i, i FROM n;").unwrap();
    let before: i64 = one(&c, "SELECT crsql_db_version()");
    c.execute_batch("SELECT crsql_begin_alter('t'); ALTER TABLE t ADD COLUMN c TEXT DEFAULT 'd'; SELECT crsql_commit_alter('t');").unwrap();
    assert_eq!(
        before,
        one::<i64>(&c, "SELECT crsql_db_version()"),
        "no backfill storm"
    );
    c.execute_batch("UPDATE t SET c = 'new' WHERE id = 7")
        .unwrap();
    assert_eq!(
        row_clock(&c, 7).iter().find(|r| r.0 == "c"),
        Some(&("c".to_string(), 1, 1))
    );
    // Dropping a column drops its clocks; the feed no longer mentions it.
    c.execute_batch("SELECT crsql_begin_alter('t'); ALTER TABLE t DROP COLUMN c; SELECT crsql_commit_alter('t');").unwrap();
    assert!(changes_after(&c, 0).iter().all(|r| r.2 != "c"));
    c.execute_batch("UPDATE t SET a = 'still captured' WHERE id = 7")
        .unwrap();
    assert_eq!(
        row_clock(&c, 7).iter().find(|r| r.0 == "a"),
        Some(&("a".to_string(), 2, 1))
    );
}

#[test]
fn changing_the_primary_key_is_refused_clearly() {
    let c = memory();
    c.execute_batch("CREATE TABLE t(id INTEGER NOT NULL, k TEXT NOT NULL DEFAULT '', a, PRIMARY KEY (id)); SELECT crsql_as_crr('t'); SELECT crsql_begin_alter('t');").unwrap();
    c.execute_batch("CREATE TABLE t2(id INTEGER NOT NULL, k TEXT NOT NULL DEFAULT '', a, PRIMARY KEY (id, k)); INSERT INTO t2 SELECT * FROM t; DROP TABLE t; ALTER TABLE t2 RENAME TO t;").unwrap();
    let e = c
        .query_row("SELECT crsql_commit_alter('t')", [], |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'t'") && e.contains("primary key changed"),
        "{e}"
    );
}
