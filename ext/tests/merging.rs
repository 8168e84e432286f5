//! Merging through `INSERT INTO crsql_changes`: the rules of DESIGN §1 and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;
use rusqlite::types::Value;

fn replica() -> rusqlite::Connection {
    let c = memory();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');",
    )
    .unwrap();
    c
}

fn sync(from: &rusqlite::Connection, to: &rusqlite::Connection) {
    merge(to, &changes_after(from, 0));
}

#[test]
fn two_replicas_converge_and_merges_are_not_recaptured() {
    let (x, y) = (replica(), replica());
    x.execute_batch("INSERT INTO t VALUES (1, 'x', 'x'); INSERT INTO t VALUES (2, 'x', 'x');")
        .unwrap();
    y.execute_batch("INSERT INTO t VALUES (1, 'y', 'y'); UPDATE t SET a = 'y2' WHERE id = 1; INSERT INTO t VALUES (3, 'y', 'y');").unwrap();
    sync(&x, &y);
    sync(&y, &x);
    assert_eq!(dump(&x, "t", "id"), dump(&y, "t", "id"));
    assert_eq!(converging_state(&x), converging_state(&y));
    // y's a=y2 has col_version 2 and wins everywhere.
    assert_eq!(one::<String>(&x, "SELECT a FROM t WHERE id = 1"), "y2");
    // Merged changes keep their origin's site id and number; re-merging is a no-op.
    let xs: Vec<u8> = one(&x, "SELECT crsql_site_id()");
    let ys: Vec<u8> = one(&y, "SELECT crsql_site_id()");
    let on_x = changes_after(&x, 0);
    assert!(
        on_x.iter().any(|r| r.6 == ys && r.2 == "a" && r.9 == 4),
        "origin number of y's update rides along"
    );
    let v = one::<i64>(&x, "SELECT crsql_db_version()");
    sync(&y, &x);
    sync(&x, &x);
    assert_eq!(
        v,
        one::<i64>(&x, "SELECT crsql_db_version()"),
        "duplicates create no versions"
    );
    assert!(changes_after(&x, 0).iter().all(|r| r.6 == xs || r.6 == ys));
}

#[test]
fn integer_one_against_real_one_point_zero() {
    let (x, y) = (replica(), replica());
    x.execute_batch("INSERT INTO t VALUES (1, 1, NULL)")
        .unwrap();
    y.execute_batch("INSERT INTO t VALUES (1, 1.0, NULL)")
        .unwrap();
    sync(&x, &y);
    sync(&y, &x);
    for c in [&x, &y] {
        assert_eq!(
            one::<String>(c, "SELECT typeof(a) FROM t"),
            "real",
            "REAL 1.0 outranks INTEGER 1"
        );
    }
    assert_eq!(converging_state(&x), converging_state(&y));
}

#[test]
fn value_order_null_numbers_text_blob() {
    for (lo, hi) in [
        ("NULL", "-5"),
        ("99", "'a'"),
        ("'zzz'", "x'00'"),
        ("2", "2.5"),
    ] {
        let (x, y) = (replica(), replica());
        x.execute_batch(&format!("INSERT INTO t VALUES (1, {lo}, 0)"))
            .unwrap();
        y.execute_batch(&format!("INSERT INTO t VALUES (1, {hi}, 0)"))
            .unwrap();
        sync(&x, &y);
        sync(&y, &x);
        let want: Value = one(&y, &format!("SELECT {hi}"));
        assert_eq!(one::<Value>(&x, "SELECT a FROM t"), want, "{lo} < {hi}");
        assert_eq!(converging_state(&x), converging_state(&y));
    }
}

#[test]
fn equal_values_credit_the_greater_site_whatever_merge_equal_values_says() {
    for mev in [0, 1] {
        let (x, y) = (replica(), replica());
        for c in [&x, &y] {
            c.execute_batch(&format!(
                "SELECT crsql_config_set('merge-equal-values', {mev})"
            ))
            .unwrap();
            c.execute_batch("INSERT INTO t VALUES (1, 'same', 'same')")
                .unwrap();
        }
        sync(&x, &y);
        let y_impacted: i64 = one(&y, "SELECT crsql_rows_impacted()");
        sync(&y, &x);
        let x_impacted: i64 = one(&x, "SELECT crsql_rows_impacted()");
        assert_eq!(
            converging_state(&x),
            converging_state(&y),
            "merge-equal-values={mev}"
        );
        // Exactly one side took credit; it rewrote its row only when told to.
        assert_eq!(
            x_impacted + y_impacted,
            if mev == 1 { 1 } else { 0 },
            "merge-equal-values={mev}"
        );
    }
}

#[test]
fn delete_beats_concurrent_update_and_resurrection_beats_delete() {
    let (x, y) = (replica(), replica());
    x.execute_batch("INSERT INTO t VALUES (1, 'a', 'b')")
        .unwrap();
    sync(&x, &y);
    x.execute_batch("DELETE FROM t WHERE id = 1").unwrap();
    y.execute_batch("UPDATE t SET a = 'late', b = 'later' WHERE id = 1")
        .unwrap();
    sync(&x, &y);
    sync(&y, &x);
    for c in [&x, &y] {
        assert_eq!(one::<i64>(c, "SELECT count(*) FROM t"), 0);
    }
    y.execute_batch("INSERT INTO t VALUES (1, 'back', NULL)")
        .unwrap();
    sync(&y, &x);
    assert_eq!(dump(&x, "t", "id"), dump(&y, "t", "id"));
    assert_eq!(
        one::<i64>(&x, "SELECT cl FROM crsql_changes WHERE cid = '-1'"),
        3
    );
    assert_eq!(converging_state(&x), converging_state(&y));
}

#[test]
fn bad_changes_are_refused_by_name_and_change_nothing() {
    let x = replica();
    x.execute_batch("INSERT INTO t VALUES (1, 'a', 'b')")
        .unwrap();
    let site = vec![9u8; 16];
    let pk: Vec<u8> = one(&x, "SELECT crsql_pack_columns(1)");
    let ins = "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq) VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, 0)";
    // (table, pk, cid, col_version, site_id, cl, expected message)
    type Case<'a> = (&'a str, Value, &'a str, i64, Vec<u8>, i64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "nope",
            Value::Blob(pk.clone()),
            "a",
            5,
            site.clone(),
            1,
            "unknown table 'nope'",
        ),
        (
            "t",
            Value::Blob(pk.clone()),
            "zz",
            5,
            site.clone(),
            1,
            "unknown column 'zz'",
        ),
        (
            "t",
            Value::Blob(vec![1, 0x0b, 9]),
            "a",
            5,
            site.clone(),
            1,
            "malformed packed primary key",
        ),
        (
            "t",
            Value::Blob(vec![2, 0x09, 1, 0x09, 2]),
            "a",
            5,
            site.clone(),
            1,
            "has 2 values",
        ),
        (
            "t",
            Value::Text("1".into()),
            "a",
            5,
            site.clone(),
            1,
            "pk must be a BLOB",
        ),
        (
            "t",
            Value::Blob(pk.clone()),
            "a",
            5,
            vec![1, 2, 3],
            1,
            "16-byte",
        ),
        (
            "t",
            Value::Blob(pk.clone()),
            "a",
            5,
            site.clone(),
            2,
            "even cl",
        ),
        (
            "t",
            Value::Blob(pk.clone()),
            "a",
            0,
            site.clone(),
            1,
            "col_version",
        ),
    ];
    let before = (
        dump(&x, "t", "id"),
        converging_state(&x),
        one::<i64>(&x, "SELECT crsql_db_version()"),
    );
    for explicit in [false, true] {
        for (table, pk, cid, cv, s, cl, needle) in &cases {
            if explicit {
                x.execute_batch("BEGIN").unwrap();
            }
            let e = x
                .execute(ins, rusqlite::params![table, pk, cid, "new", cv, s, cl])
                .expect_err(needle)
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
            if explicit {
                x.execute_batch("COMMIT").unwrap();
            }
        }
    }
    assert!(x
        .execute("DELETE FROM crsql_changes", [])
        .unwrap_err()
        .to_string()
        .contains("only INSERT"));
    let after = (
        dump(&x, "t", "id"),
        converging_state(&x),
        one::<i64>(&x, "SELECT crsql_db_version()"),
    );
    assert_eq!(before, after);
    assert_eq!(one::<i64>(&x, "SELECT merging FROM patina_state"), 0);
}

#[test]
fn a_merge_that_fails_midway_in_a_transaction_leaves_nothing() {
    let x = memory();
    x.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a CHECK (a IS NOT 'boom'), b); SELECT crsql_as_crr('t');").unwrap();
    let y = memory();
    // b before a, so b's change (which creates the row) comes first in y's feed.
    y.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, b, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 'ok', 'boom');").unwrap();
    let feed = changes_after(&y, 0);
    x.execute_batch("BEGIN").unwrap();
    let mut s = x.prepare("INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)").unwrap();
    s.execute(rusqlite::params![
        feed[0].0, feed[0].1, feed[0].2, feed[0].3, feed[0].4, feed[0].5, feed[0].6, feed[0].7,
        feed[0].8, feed[0].9
    ])
    .unwrap();
    let e = s
        .execute(rusqlite::params![
            feed[1].0, feed[1].1, feed[1].2, feed[1].3, feed[1].4, feed[1].5, feed[1].6, feed[1].7,
            feed[1].8, feed[1].9
        ])
        .unwrap_err();
    assert!(e.to_string().contains("CHECK"), "{e}");
    drop(s);
    x.execute_batch("COMMIT").unwrap();
    // The row arrived (first change) but the refused value left no clock behind.
    assert_eq!(
        one::<Value>(&x, "SELECT a FROM t WHERE id = 1"),
        Value::Null
    );
    assert!(changes_after(&x, 0).iter().all(|r| r.2 != "a"));
    assert_eq!(one::<i64>(&x, "SELECT merging FROM patina_state"), 0);
}

#[test]
fn batched_merge_path_and_feed_filters() {
    let (x, y) = (replica(), replica());
    y.execute_batch("INSERT INTO t VALUES (1, 'a', 'b'), (2, 'c', 'd')")
        .unwrap();
    x.execute_batch("INSERT INTO t VALUES (9, 'mine', NULL)")
        .unwrap();
    let feed = changes_after(&y, 0);
    x.execute_batch("BEGIN; UPDATE patina_state SET merging = 1;")
        .unwrap();
    merge(&x, &feed);
    x.execute_batch("UPDATE patina_state SET merging = 0; COMMIT;")
        .unwrap();
    assert_eq!(dump(&x, "t", "id").len(), 3);
    let ys: Vec<u8> = one(&y, "SELECT crsql_site_id()");
    let xs: Vec<u8> = one(&x, "SELECT crsql_site_id()");
    let not_y: i64 = x
        .query_row(
            "SELECT count(*) FROM crsql_changes WHERE site_id IS NOT ?1",
            [&ys],
            |r| r.get(0),
        )
        .unwrap();
    let only_y: i64 = x
        .query_row(
            "SELECT count(*) FROM crsql_changes WHERE site_id = ?1",
            [&ys],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        (not_y, only_y),
        (2, 4),
        "two columns per row, no row-clock changes"
    );
    let window: i64 = one(
        &x,
        "SELECT count(*) FROM crsql_changes WHERE db_version > 2 AND db_version <= 4",
    );
    assert_eq!(window, 2);
    let ordered: Vec<i64> = x
        .prepare("SELECT db_version FROM crsql_changes ORDER BY db_version")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    // x's insert reserved 1 for its row clock (unused in a first life).
    assert_eq!(ordered, (2..=7).collect::<Vec<_>>());
    assert_eq!(
        one::<i64>(
            &x,
            "SELECT count(*) FROM crsql_changes WHERE \"table\" = 't' AND db_version >= 7"
        ),
        1
    );
    let _ = xs;
}

#[test]
fn concurrent_deletes_and_resurrections_credit_one_site_everywhere() {
    let (x, y, z) = (replica(), replica(), replica());
    x.execute_batch("INSERT INTO t VALUES (1, 'a', 'b')")
        .unwrap();
    sync(&x, &y);
    sync(&x, &z);
    x.execute_batch("DELETE FROM t WHERE id = 1").unwrap();
    y.execute_batch("DELETE FROM t WHERE id = 1").unwrap();
    z.execute_batch("DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (1, 'z', 'z');")
        .unwrap();
    // Resurrect concurrently on x and y too (same cl 3 as z).
    x.execute_batch("INSERT INTO t VALUES (1, 'x', 'x')")
        .unwrap();
    y.execute_batch("INSERT INTO t VALUES (1, 'y', 'y')")
        .unwrap();
    for (a, b) in [(&x, &y), (&y, &z), (&z, &x), (&y, &x), (&x, &z), (&z, &y)] {
        sync(a, b);
    }
    assert_eq!(converging_state(&x), converging_state(&y));
    assert_eq!(converging_state(&y), converging_state(&z));
    assert_eq!(dump(&x, "t", "id"), dump(&z, "t", "id"));
}

#[test]
fn windowed_reads_match_one_read_and_see_new_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let c = open(&path);
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');",
    )
    .unwrap();
    c.execute_batch("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12000) INSERT INTO t SELECT i, i, i FROM n;").unwrap();
    c.execute_batch("UPDATE t SET b = 'later' WHERE id % 7 = 0")
        .unwrap(); // rows whose newest change is past earlier windows
    let window = |c: &rusqlite::Connection, a: i64, b: i64| -> Vec<i64> {
        c.prepare("SELECT db_version FROM crsql_changes WHERE db_version > ?1 AND db_version <= ?2")
            .unwrap()
            .query_map([a, b], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let all: Vec<i64> = changes_after(&c, 0).iter().map(|r| r.5).collect();
    let top: i64 = one(&c, "SELECT crsql_db_version()");
    c.execute_batch("BEGIN").unwrap();
    let mut stitched = Vec::new();
    let mut a = 0;
    while a < top {
        // Windows of several sizes, one wider than the cache's bound.
        let w = [500, 7000, 40000][(a / 500 % 3) as usize];
        stitched.extend(window(&c, a, a + w));
        a += w;
    }
    c.execute_batch("COMMIT").unwrap();
    assert_eq!(stitched, all);
    // Another connection commits: the next window sees it.
    window(&c, 0, 10);
    open_plain(&path)
        .execute_batch("UPDATE t SET a = 'fresh' WHERE id = 1")
        .unwrap();
    let newest: i64 = one(&c, "SELECT crsql_db_version()");
    assert_eq!(window(&c, newest - 1, newest), vec![newest]);
}

#[test]
fn batched_path_queues_then_applies_grouped_and_honours_rollback_to() {
    let (x, y) = (replica(), replica());
    y.execute_batch("INSERT INTO t VALUES (1, 'a', 'b'), (2, 'c', 'd'), (3, 'e', 'f'); DELETE FROM t WHERE id = 3;").unwrap();
    let feed = changes_after(&y, 0);
    let (first, second): (Vec<_>, Vec<_>) = feed
        .into_iter()
        .partition(|r| r.1 == one::<Vec<u8>>(&y, "SELECT crsql_pack_columns(1)"));
    x.execute_batch("BEGIN; UPDATE patina_state SET merging = 1;")
        .unwrap();
    merge(&x, &first);
    // Queued, not yet visible to this connection's plain reads.
    assert_eq!(one::<i64>(&x, "SELECT count(*) FROM t"), 0);
    x.execute_batch("SAVEPOINT job").unwrap();
    merge(&x, &second);
    x.execute_batch("ROLLBACK TO job; RELEASE job;").unwrap();
    x.execute_batch("SELECT patina_flush()").unwrap();
    assert_eq!(
        one::<i64>(&x, "SELECT count(*) FROM t"),
        1,
        "only the changes queued before the savepoint"
    );
    // Counted per change, as one by one: a and b.
    assert_eq!(one::<i64>(&x, "SELECT crsql_rows_impacted()"), 2);
    x.execute_batch("UPDATE patina_state SET merging = 0; COMMIT;")
        .unwrap();
    // Nothing the flush wrote was captured as a local change of x.
    let xs: Vec<u8> = one(&x, "SELECT crsql_site_id()");
    assert!(changes_after(&x, 0).iter().all(|r| r.6 != xs));
    // Now everything, batched, with commit as the only flush: same state as y.
    x.execute_batch("BEGIN; UPDATE patina_state SET merging = 1;")
        .unwrap();
    merge(&x, &changes_after(&y, 0));
    x.execute_batch("UPDATE patina_state SET merging = 0; COMMIT;")
        .unwrap();
    assert_eq!(dump(&x, "t", "id"), dump(&y, "t", "id"));
    assert_eq!(converging_state(&x), converging_state(&y));
    assert_eq!(one::<i64>(&x, "SELECT merging FROM patina_state"), 0);
    // Numbers stay unique and the counter covers them.
    let versions: Vec<i64> = changes_after(&x, 0).iter().map(|r| r.5).collect();
    let mut unique = versions.clone();
    unique.dedup();
    assert_eq!(versions, unique);
    assert!(versions
        .iter()
        .all(|v| *v <= one::<i64>(&x, "SELECT crsql_db_version()")));
    // A local write after the batch gets the next number.
    let top: i64 = one(&x, "SELECT crsql_db_version()");
    x.execute_batch("UPDATE t SET a = 'local' WHERE id = 1")
        .unwrap();
    assert_eq!(one::<i64>(&x, "SELECT crsql_db_version()"), top + 1);
}
