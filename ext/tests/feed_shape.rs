//! The feed's shape is cr-sqlite's: a first life of a row with columns is carried by its
//! column changes alone; the row's own clock (`cid = '-1'`) appears for key-only tables,
//! deletes and resurrections, decided per row as it is written. Every case below must
//! still reach a fresh replica whole.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;
use rusqlite::Connection;

fn with(ddl: &str) -> Connection {
    let c = memory();
    c.execute_batch(ddl).unwrap();
    c
}

fn sentinels(c: &Connection) -> Vec<(String, i64)> {
    let mut s = c
        .prepare("SELECT hex(pk), cl FROM crsql_changes WHERE cid = '-1' ORDER BY 1")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A fresh replica of `ddl` that merged `from`'s whole feed holds what `from` holds.
fn assert_fresh_replica_receives(from: &Connection, ddl: &str, tables: &[&str]) -> Connection {
    let fresh = with(ddl);
    merge(&fresh, &changes_after(from, 0));
    for t in tables {
        assert_eq!(dump(&fresh, t, "1"), dump(from, t, "1"), "table {t}");
    }
    assert_eq!(converging_state(&fresh), converging_state(from));
    fresh
}

const T: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a DEFAULT 5, b TEXT DEFAULT 'x'); SELECT crsql_as_crr('t');";

#[test]
fn first_lives_carry_no_sentinel_yet_defaults_and_nulls_arrive() {
    let c = with(T);
    c.execute_batch(
        "INSERT INTO t (id) VALUES (1);            -- only DEFAULTs
         INSERT INTO t VALUES (2, NULL, NULL);      -- all NULLs
         INSERT INTO t VALUES (3, 1, 'y') ON CONFLICT (id) DO UPDATE SET a = 9;
         INSERT INTO t VALUES (3, 1, 'y') ON CONFLICT (id) DO UPDATE SET a = 9; -- upsert updates",
    )
    .unwrap();
    assert_eq!(sentinels(&c), vec![], "no '-1' change for a first life");
    assert_eq!(
        changes_after(&c, 0).len(),
        6,
        "two columns per row (the upsert superseded one)"
    );
    // Each insert reserves its row clock's number (unused in a first life, like a
    // superseded change's), then one per column; the upsert's update takes one.
    assert_eq!(one::<i64>(&c, "SELECT crsql_db_version()"), 10);
    let fresh = assert_fresh_replica_receives(&c, T, &["t"]);
    assert_eq!(one::<i64>(&fresh, "SELECT a FROM t WHERE id = 3"), 9);
    assert_eq!(
        sentinels(&fresh),
        vec![],
        "merges that create rows add no sentinel"
    );
}

#[test]
fn deletes_resurrections_and_replace_carry_the_row_clock() {
    for recursive in [false, true] {
        let c = with(T);
        c.pragma_update(None, "recursive_triggers", recursive)
            .unwrap();
        c.execute_batch(
            "INSERT INTO t VALUES (1, 1, 'a'), (2, 2, 'b'), (3, 3, 'c');
             DELETE FROM t WHERE id = 1;
             DELETE FROM t WHERE id = 2; INSERT INTO t VALUES (2, 22, 'bb');
             INSERT OR REPLACE INTO t VALUES (3, 33, 'cc');",
        )
        .unwrap();
        let cls: Vec<i64> = sentinels(&c).iter().map(|s| s.1).collect();
        assert_eq!(cls, vec![2, 3, 3], "recursive_triggers={recursive}");
        assert_fresh_replica_receives(&c, T, &["t"]);
    }
}

#[test]
fn key_only_tables_carry_every_row_by_its_sentinel() {
    let ddl = "CREATE TABLE k(id TEXT PRIMARY KEY NOT NULL); SELECT crsql_as_crr('k');";
    let c = with(ddl);
    c.execute_batch("INSERT INTO k VALUES ('a'), ('b'), ('c'); DELETE FROM k WHERE id = 'b';")
        .unwrap();
    let cls: Vec<i64> = sentinels(&c).iter().map(|s| s.1).collect();
    assert_eq!(cls, vec![1, 2, 1]);
    assert_fresh_replica_receives(&c, ddl, &["k"]);
}

#[test]
fn rows_backfilled_or_from_before_an_add_column_arrive() {
    let c = memory();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a);
         INSERT INTO t VALUES (1, 'before crr'), (2, NULL);
         SELECT crsql_as_crr('t');
         INSERT INTO t VALUES (3, 'after');
         CREATE TABLE k(id INTEGER PRIMARY KEY NOT NULL);
         INSERT INTO k VALUES (1);
         SELECT crsql_as_crr('k');
         INSERT INTO k VALUES (2);
         SELECT crsql_begin_alter('t'); ALTER TABLE t ADD COLUMN c DEFAULT 'new'; SELECT crsql_commit_alter('t');
         SELECT crsql_begin_alter('k'); ALTER TABLE k ADD COLUMN v; SELECT crsql_commit_alter('k');
         INSERT INTO k VALUES (3, 'v3');",
    )
    .unwrap();
    // Backfilled rows of a table with columns: no sentinel; of a key-only table: one each.
    assert_eq!(
        sentinels(&c).len(),
        2,
        "k's rows 1 and 2 (written while key-only); none for t or k's row 3"
    );
    let ddl = "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, c DEFAULT 'new'); SELECT crsql_as_crr('t');
               CREATE TABLE k(id INTEGER PRIMARY KEY NOT NULL, v); SELECT crsql_as_crr('k');";
    assert_fresh_replica_receives(&c, ddl, &["t", "k"]);
}

#[test]
fn rows_left_key_only_by_a_drop_column_get_a_sentinel() {
    let c = memory();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');
         INSERT INTO t VALUES (1, 'a', 'b'), (2, 'c', 'd');
         UPDATE t SET b = 'resurrected later' WHERE id = 2;
         SELECT crsql_begin_alter('t'); ALTER TABLE t DROP COLUMN a; SELECT crsql_commit_alter('t');",
    )
    .unwrap();
    assert_eq!(sentinels(&c), vec![], "column b still carries both rows");
    let before = one::<i64>(&c, "SELECT crsql_db_version()");
    c.execute_batch("SELECT crsql_begin_alter('t'); ALTER TABLE t DROP COLUMN b; SELECT crsql_commit_alter('t');")
        .unwrap();
    assert_eq!(sentinels(&c).len(), 2, "both rows are key-only now");
    assert_eq!(
        one::<i64>(&c, "SELECT crsql_db_version()"),
        before + 2,
        "gap-free"
    );
    let ddl = "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL); SELECT crsql_as_crr('t');";
    assert_fresh_replica_receives(&c, ddl, &["t"]);
}

#[test]
fn merges_pass_rows_on_and_no_op_merges_add_no_sentinel() {
    let (a, b) = (with(T), with(T));
    a.execute_batch("INSERT INTO t VALUES (1, 1, 'a'), (2, 2, 'b'); DELETE FROM t WHERE id = 2;")
        .unwrap();
    merge(&b, &changes_after(&a, 0));
    let b_feed = changes_after(&b, 0);
    // Re-merging, and merging an older life's column change, change nothing.
    merge(&b, &changes_after(&a, 0));
    b.execute_batch("INSERT INTO t VALUES (3, 3, 'c')").unwrap();
    let top = one::<i64>(&b, "SELECT crsql_db_version()");
    merge(&b, &changes_after(&a, 0));
    assert_eq!(
        one::<i64>(&b, "SELECT crsql_db_version()"),
        top,
        "no-op merges number nothing"
    );
    assert_eq!(sentinels(&b), sentinels(&a), "only the delete's row clock");
    assert_eq!(changes_after(&b, 0)[..b_feed.len()], b_feed[..]);
    // A third replica that only ever hears from b holds a's rows.
    let c = with(T);
    merge(&c, &changes_after(&b, 0));
    assert_eq!(dump(&c, "t", "id"), dump(&b, "t", "id"));
    assert_eq!(converging_state(&c), converging_state(&b));
}
