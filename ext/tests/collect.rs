//! Tombstone collection (`patina_collect_tombstones`): what goes, what stays, and that a
//! row inserted after a collection outranks a tombstone a peer still keeps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

fn site_hex(c: &rusqlite::Connection) -> String {
    one(c, "SELECT lower(hex(crsql_site_id()))")
}

fn limits(site: &str, upto: i64) -> String {
    format!("{{\"{site}\": {upto}}}")
}

/// Collects; returns how many tombstones went.
fn collect(c: &rusqlite::Connection, limits: &str) -> i64 {
    let json: String = c
        .query_row("SELECT patina_collect_tombstones(?1)", [limits], |r| {
            r.get(0)
        })
        .expect("collect");
    c.query_row("SELECT json_extract(?1, '$.removed')", [&json], |r| {
        r.get(0)
    })
    .expect("removed")
}

fn table(c: &rusqlite::Connection) {
    c.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a, b);
         SELECT crsql_as_crr('t');",
    )
    .expect("schema");
}

#[test]
fn deletes_up_to_the_limit_go_and_live_rows_and_later_deletes_stay() {
    let c = memory();
    table(&c);
    c.execute_batch(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1000)
         INSERT INTO t SELECT x, x, 'v' FROM n;",
    )
    .unwrap();
    c.execute_batch("DELETE FROM t WHERE id <= 600").unwrap();
    let after_first: i64 = one(&c, "SELECT origin_version FROM patina_state");
    c.execute_batch("DELETE FROM t WHERE id > 900").unwrap();
    assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t__patina_clock"), 1000);
    let me = site_hex(&c);
    // Only the first 600 deletes are at or below the limit; the floor is the highest
    // delete version that went.
    let json: String = c
        .query_row(
            "SELECT patina_collect_tombstones(?1)",
            [limits(&me, after_first)],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        json,
        format!("{{\"removed\":600,\"floors\":{{\"{me}\":{after_first}}}}}")
    );
    assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t__patina_clock"), 400);
    assert_eq!(
        one::<i64>(
            &c,
            "SELECT count(*) FROM t__patina_clock WHERE __patina_cl % 2 = 0"
        ),
        100
    );
    // The feed no longer carries them; the live rows are untouched.
    assert_eq!(
        one::<i64>(&c, "SELECT count(*) FROM crsql_changes WHERE cid = '-1'"),
        100
    );
    assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t"), 300);
    // Collecting again finds nothing; an unknown origin is ignored.
    assert_eq!(collect(&c, &limits(&me, after_first)), 0);
    assert_eq!(collect(&c, &limits(&"ab".repeat(16), i64::MAX)), 0);
    assert_eq!(one::<i64>(&c, "SELECT cl_floor FROM patina_state"), 2);
}

#[test]
fn a_row_inserted_after_a_collection_outranks_the_peers_tombstone() {
    let a = memory();
    let b = memory();
    table(&a);
    table(&b);
    a.execute_batch("INSERT INTO t VALUES (1, 'one', 'x'); DELETE FROM t WHERE id = 1;")
        .unwrap();
    merge(&b, &changes_after(&a, 0));
    assert_eq!(one::<i64>(&b, "SELECT count(*) FROM t__patina_clock"), 1);
    // a forgets the tombstone; b still keeps it. A new insert of the same key on a must
    // still reach b.
    let me = site_hex(&a);
    assert_eq!(collect(&a, &limits(&me, 1_000)), 1);
    let before: i64 = one(&a, "SELECT crsql_db_version()");
    a.execute_batch("INSERT INTO t VALUES (1, 'again', 'y')")
        .unwrap();
    assert_eq!(
        one::<i64>(&a, "SELECT __patina_cl FROM t__patina_clock WHERE id = 1"),
        3
    );
    merge(&b, &changes_after(&a, before));
    assert_eq!(one::<String>(&b, "SELECT a FROM t WHERE id = 1"), "again");
    // A delete of a row no clock saw also starts above the floor.
    a.execute_batch(
        "DELETE FROM t WHERE id = 1; SELECT patina_collect_tombstones(json_object(lower(hex(crsql_site_id())), 1000));",
    )
    .unwrap();
    assert_eq!(one::<i64>(&a, "SELECT cl_floor FROM patina_state"), 4);
}

#[test]
fn malformed_limits_are_refused_by_name() {
    let c = memory();
    table(&c);
    for bad in [
        "[]",
        "not json",
        "{\"zz\": 1}",
        &format!("{{\"{}\": \"x\"}}", "ab".repeat(16)),
    ] {
        let err = c
            .query_row("SELECT patina_collect_tombstones(?1)", [bad], |r| {
                r.get::<_, i64>(0)
            })
            .expect_err(bad);
        assert!(
            err.to_string().contains("patina_collect_tombstones"),
            "{bad}: {err}"
        );
    }
    let err = c
        .query_row("SELECT patina_collect_tombstones(1)", [], |r| {
            r.get::<_, i64>(0)
        })
        .expect_err("integer");
    assert!(err.to_string().contains("must be TEXT"), "{err}");
}
