//! Clocks at the integer limits (issue 7, item 4): a forged change at `i64::MAX` must not
//! turn any clock into a REAL or split replicas for good.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;
use rusqlite::Connection;

/// 2^62, the largest clock a merge accepts (`merge::MAX_CLOCK`).
const BOUND: i64 = 1 << 62;

fn replica() -> Connection {
    let c = memory();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');",
    )
    .unwrap();
    c
}

fn forged(c: &Connection, cid: &str, col_version: i64, cl: i64) -> rusqlite::Result<usize> {
    let pk: Vec<u8> = one(c, "SELECT crsql_pack_columns(1)");
    c.execute(
        "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq) \
         VALUES ('t', ?1, ?2, 'forged', ?3, 1, ?4, ?5, 0)",
        rusqlite::params![pk, cid, col_version, vec![7u8; 16], cl],
    )
}

/// No clock anywhere is stored as anything but an integer.
fn assert_integer_clocks(c: &Connection) {
    let reals: i64 = one(
        c,
        "SELECT count(*) FROM crsql_changes WHERE typeof(col_version) <> 'integer' OR typeof(cl) <> 'integer'",
    );
    assert_eq!(reals, 0, "a clock became a non-integer");
    let mut s = c
        .prepare("SELECT name FROM pragma_table_info('t__patina_clock')")
        .unwrap();
    let cols: Vec<String> = s
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for col in cols {
        let n: i64 = one(
            c,
            &format!("SELECT count(*) FROM t__patina_clock WHERE typeof(\"{col}\") = 'real'"),
        );
        assert_eq!(n, 0, "clock column {col} holds a REAL");
    }
}

fn sync_both(x: &Connection, y: &Connection) {
    merge(y, &changes_after(x, 0));
    merge(x, &changes_after(y, 0));
}

#[test]
fn clocks_above_the_bound_are_refused_by_name_on_both_merge_paths() {
    for batched in [false, true] {
        let x = replica();
        x.execute_batch("INSERT INTO t VALUES (1, 'a', 'b')")
            .unwrap();
        if batched {
            x.execute_batch("BEGIN; UPDATE patina_state SET merging = 1;")
                .unwrap();
        }
        for (cid, v, cl, field, value) in [
            ("a", i64::MAX, 1, "col_version", i64::MAX),
            ("a", i64::MAX - 1, 1, "col_version", i64::MAX - 1),
            ("a", BOUND + 1, 1, "col_version", BOUND + 1),
            ("a", 1, i64::MAX, "cl", i64::MAX),
            ("-1", 1, i64::MAX - 1, "cl", i64::MAX - 1),
            ("-1", 1, i64::MAX, "cl", i64::MAX),
        ] {
            let err = forged(&x, cid, v, cl).unwrap_err().to_string();
            for needle in [
                format!("{field} of table 't'"),
                format!("column '{cid}'"),
                value.to_string(),
            ] {
                assert!(
                    err.contains(&needle),
                    "batched={batched}: {err:?} lacks {needle:?}"
                );
            }
        }
        if batched {
            x.execute_batch("SELECT patina_flush(); UPDATE patina_state SET merging = 0; COMMIT;")
                .unwrap();
        }
        // Nothing of them was written; a local write after them counts on normally.
        x.execute_batch("UPDATE t SET a = 'local' WHERE id = 1; DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (1, 'c', 'd');")
            .unwrap();
        assert_integer_clocks(&x);
        assert_eq!(one::<i64>(&x, "SELECT max(cl) FROM crsql_changes"), 3);
        let y = replica();
        sync_both(&x, &y);
        assert_eq!(converging_state(&x), converging_state(&y));
    }
}

#[test]
fn clocks_at_the_bound_stay_integers_and_replicas_converge() {
    for batched in [false, true] {
        let (x, y) = (replica(), replica());
        x.execute_batch("INSERT INTO t VALUES (1, 'x', 'x')")
            .unwrap();
        y.execute_batch("INSERT INTO t VALUES (1, 'y', 'y')")
            .unwrap();
        if batched {
            x.execute_batch("BEGIN; UPDATE patina_state SET merging = 1;")
                .unwrap();
        }
        forged(&x, "a", BOUND, 1).unwrap();
        if batched {
            x.execute_batch("UPDATE patina_state SET merging = 0; COMMIT;")
                .unwrap();
        }
        assert_eq!(one::<String>(&x, "SELECT a FROM t"), "forged");
        // Local writes on both sides at the bound: the version stays at the bound.
        x.execute_batch("UPDATE t SET a = 'x2'").unwrap();
        sync_both(&x, &y);
        y.execute_batch("UPDATE t SET a = 'y3'").unwrap();
        x.execute_batch("UPDATE t SET a = 'x3'").unwrap();
        for c in [&x, &y] {
            assert_integer_clocks(c);
            assert_eq!(
                one::<i64>(
                    c,
                    "SELECT max(col_version) FROM crsql_changes WHERE cid = 'a'"
                ),
                BOUND
            );
        }
        sync_both(&x, &y);
        assert_eq!(dump(&x, "t", "id"), dump(&y, "t", "id"));
        assert_eq!(converging_state(&x), converging_state(&y));
        // At the bound, ties go to the greater value: 'y3' > 'x3' everywhere.
        assert_eq!(one::<String>(&x, "SELECT a FROM t"), "y3");

        // A row deleted at the causal-length bound: re-inserting it is refused with the
        // table named, nothing changes, and replicas still agree.
        forged(&x, "-1", 1, BOUND).unwrap(); // even: a later life, deleted
        assert_eq!(one::<i64>(&x, "SELECT count(*) FROM t"), 0);
        let err = x
            .execute("INSERT INTO t VALUES (1, 'again', 'again')", [])
            .unwrap_err();
        assert!(
            err.to_string().contains("table 't'")
                && err.to_string().contains("causal length limit"),
            "{err}"
        );
        assert_eq!(one::<i64>(&x, "SELECT count(*) FROM t"), 0);
        x.execute_batch("INSERT INTO t VALUES (2, 'other', 'row')")
            .unwrap();
        x.execute_batch("UPDATE t SET b = 'z'").unwrap();
        sync_both(&x, &y);
        for c in [&x, &y] {
            assert_integer_clocks(c);
        }
        assert_eq!(dump(&x, "t", "id"), dump(&y, "t", "id"));
        assert_eq!(converging_state(&x), converging_state(&y));
    }
}
