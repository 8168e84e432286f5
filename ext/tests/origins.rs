//! Per-origin knowledge: local writes get a gap-free origin numbering that merges do not
//! consume; every merge, on either path and from any connection, records the origin
//! versions it saw (superseded ones included) in coalesced ranges; the helpers report
//! heads, gaps and what is missing; databases from before all this are migrated.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

use rusqlite::Connection;

fn node(path: Option<&std::path::Path>) -> Connection {
    let c = match path {
        Some(p) => open(p),
        None => memory(),
    };
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b);
         SELECT crsql_as_crr('t');",
    )
    .unwrap();
    c
}

fn site(c: &Connection) -> Vec<u8> {
    one(c, "SELECT crsql_site_id()")
}

fn counters(c: &Connection) -> (i64, i64) {
    c.query_row(
        "SELECT db_version, origin_version FROM patina_state WHERE id = 0",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// The origin version of the change to `cid` of row `id` in `c`'s feed.
fn ov_of(c: &Connection, id: i64, cid: &str) -> i64 {
    c.query_row(
        "SELECT origin_version FROM crsql_changes WHERE pk = crsql_pack_columns(?1) AND cid = ?2",
        rusqlite::params![id, cid],
        |r| r.get(0),
    )
    .unwrap()
}

fn merge_batched(c: &Connection, feed: &[ChangeRow]) {
    c.execute_batch("BEGIN; UPDATE patina_state SET merging = 1")
        .unwrap();
    merge(c, feed);
    c.execute_batch("SELECT patina_flush(); UPDATE patina_state SET merging = 0; COMMIT")
        .unwrap();
}

fn merge_per_change(c: &Connection, feed: &[ChangeRow]) {
    c.execute_batch("BEGIN").unwrap();
    merge(c, feed);
    c.execute_batch("COMMIT").unwrap();
}

#[test]
fn local_origin_versions_are_gap_free_across_merges() {
    let a = node(None);
    let b = node(None);
    let control = node(None); // the same local writes, no merges
    for c in [&a, &control] {
        c.execute("INSERT INTO t VALUES (1, 0, 0)", []).unwrap();
    }
    // Insert of a row with two columns: 3 change numbers (the row clock's, reserved, then
    // a, b) but 2 origin numbers (a first life sends no row clock).
    assert_eq!(counters(&a), (3, 2));
    assert_eq!(ov_of(&a, 1, "a"), 1);
    assert_eq!(ov_of(&a, 1, "b"), 2);
    let mut seen = 0;
    for i in 1..=10i64 {
        // B writes a row of its own; A merges it (both paths in turn), then writes locally.
        b.execute("INSERT INTO t VALUES (?1, 1, 1)", [100 + i])
            .unwrap();
        let feed = changes_after(&b, seen);
        seen = one(&b, "SELECT crsql_db_version()");
        if i % 2 == 0 {
            merge_batched(&a, &feed);
        } else {
            merge_per_change(&a, &feed);
        }
        for c in [&a, &control] {
            c.execute("UPDATE t SET a = ?1 WHERE id = 1", [i]).unwrap();
        }
        // Consecutive origin numbers, whatever merges took of db_version in between.
        assert_eq!(ov_of(&a, 1, "a"), 2 + i, "update {i}");
    }
    let (dbv, ov) = counters(&a);
    assert_eq!(ov, 12);
    assert!(dbv > ov + 10, "merges took db_version numbers: {dbv}");
    assert_eq!(counters(&control).1, ov);
    // The local changes in the feed carry the same origin numbers as the control's.
    let mine = |c: &Connection| -> Vec<(Vec<u8>, String, i64)> {
        let me = site(c);
        let mut v: Vec<_> = changes_after(c, 0)
            .into_iter()
            .filter(|ch| ch.6 == me)
            .map(|ch| (ch.1, ch.2, ch.9))
            .collect();
        v.sort();
        v
    };
    assert_eq!(mine(&a), mine(&control));
    // Every path that numbers a local write advances the origin counter: delete (1),
    // resurrection (2: its row clock shares the first column's number), key change
    // (delete 1 + first life 2), and rows adopted by crsql_as_crr.
    let before = counters(&a);
    a.execute_batch("DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (1, 5, 5);")
        .unwrap();
    let resurrected = counters(&a);
    assert_eq!(resurrected.1 - before.1, 3);
    assert_eq!(ov_of(&a, 1, "-1"), before.1 + 2);
    assert_eq!(ov_of(&a, 1, "a"), before.1 + 2);
    assert_eq!(ov_of(&a, 1, "b"), before.1 + 3);
    a.execute_batch("UPDATE t SET id = 2 WHERE id = 1;")
        .unwrap();
    let after = counters(&a);
    assert_eq!(after.0 - resurrected.0, 4);
    assert_eq!(after.1 - resurrected.1, 3);
    assert_eq!(ov_of(&a, 1, "-1"), resurrected.1 + 1);
    assert_eq!(ov_of(&a, 2, "b"), after.1);
    a.execute_batch("CREATE TABLE u(id INTEGER PRIMARY KEY NOT NULL, x); INSERT INTO u VALUES (1, 1), (2, 2); SELECT crsql_as_crr('u');")
        .unwrap();
    let adopted = counters(&a);
    assert_eq!(adopted.0 - after.0, 2);
    assert_eq!(adopted.1 - after.1, 2);
    // The node's own versions are all held, and not stored as rows.
    let me = site(&a);
    assert!(origin_ranges(&a).iter().all(|r| r.0 != me));
    let missing: String = a
        .query_row(
            "SELECT patina_origin_missing(crsql_site_id(), 1, origin_version) FROM patina_state",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(missing, "[]");
    let held: (i64, i64) = a
        .query_row(
            "SELECT start, \"end\" FROM patina_origin_held WHERE site_id = crsql_site_id()",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(held, (1, adopted.1));
}

/// Two sources; the input holds changes that lose (an older copy of a cell arriving after
/// the newer one), so a merge skips them.
fn input_with_superseded() -> (Vec<ChangeRow>, Vec<u8>, Vec<u8>) {
    let s1 = node(None);
    let s2 = node(None);
    s1.execute_batch("INSERT INTO t VALUES (1, 1, 1); INSERT INTO t VALUES (2, 2, 2);")
        .unwrap();
    let old = changes_after(&s1, 0);
    s1.execute_batch("UPDATE t SET a = 10 WHERE id = 1; UPDATE t SET a = 11 WHERE id = 1; DELETE FROM t WHERE id = 2;")
        .unwrap();
    s2.execute_batch("INSERT INTO t VALUES (3, 3, 3); UPDATE t SET b = 4 WHERE id = 3;")
        .unwrap();
    let mut input = changes_after(&s1, 0);
    input.extend(changes_after(&s2, 0));
    input.extend(old); // superseded by what came before
    (input, site(&s1), site(&s2))
}

#[test]
fn both_paths_record_the_same_ranges_superseded_included() {
    let (input, s1, s2) = input_with_superseded();
    let per = node(None);
    let batched = node(None);
    merge_per_change(&per, &input);
    merge_batched(&batched, &input);
    assert_eq!(dump(&per, "t", "id"), dump(&batched, "t", "id"));
    let ranges = origin_ranges(&per);
    assert_eq!(ranges, origin_ranges(&batched));
    // s1: inserts 1..=6 (row clocks 1 and 4 reserved, never sent), updates 7, 8, delete 9.
    // Its old copy of a@1 (version 2) was superseded and still counts.
    let held: Vec<(Vec<u8>, i64, i64)> = input
        .iter()
        .map(|c| (c.6.clone(), c.9, c.9))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(held.iter().any(|h| h.0 == s1 && h.1 == 1));
    for (site, v, _) in &held {
        let m: String = per
            .query_row(
                "SELECT patina_origin_missing(?1, ?2, ?2)",
                rusqlite::params![site, v],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(m, "[]", "version {v} of a source is held");
    }
    // Coalesced. s1 numbered 1..=7: the columns 1, 2, 3, 4, a = 10 as 5 (superseded at the
    // source, never sent), a = 11 as 6, the delete 7; the input holds 6, 2, 7 and the old
    // 1, 2, 3, 4. s2 numbered 1..=3 (b = 4 as 3 superseded its 2) and sent 1 and 3.
    let expect = |s: &[u8], r: &[(i64, i64)]| -> Vec<(Vec<u8>, i64, i64)> {
        r.iter().map(|(a, b)| (s.to_vec(), *a, *b)).collect()
    };
    let mut want = expect(&s1, &[(1, 4), (6, 7)]);
    want.extend(expect(&s2, &[(1, 1), (3, 3)]));
    want.sort();
    assert_eq!(ranges, want);
    // Merging everything again changes nothing.
    merge_per_change(&per, &input);
    merge_batched(&per, &input);
    assert_eq!(origin_ranges(&per), want);
}

#[test]
fn an_app_merging_with_plain_sql_records_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    node(Some(&path));
    let app = open(&path); // the app's own sync code: a connection and plain SQL
    let x = "x'000102030405060708090a0b0c0d0e0f'";
    app.execute_batch(&format!(
        "BEGIN;
         INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq)
           VALUES ('t', crsql_pack_columns(1), 'a', 'one', 1, 1, {x}, 1, 0);
         INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version)
           VALUES ('t', crsql_pack_columns(2), 'a', 'two', 1, 40, {x}, 1, 0, 2);
         INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version)
           VALUES ('t', crsql_pack_columns(3), 'a', 'six', 1, 41, {x}, 1, 0, 6);
         COMMIT;
         BEGIN; UPDATE patina_state SET merging = 1;
         INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version)
           VALUES ('t', crsql_pack_columns(4), 'a', 'three', 1, 42, {x}, 1, 0, 3);
         INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version)
           VALUES ('t', crsql_pack_columns(4), 'a', 'a-old', 1, 43, {x}, 1, 0, 9);
         SELECT patina_flush(); UPDATE patina_state SET merging = 0; COMMIT;"
    ))
    .unwrap();
    drop(app);
    let c = open(&path);
    let x_id: Vec<u8> = (0u8..16).collect();
    assert_eq!(
        origin_ranges(&c),
        vec![
            (x_id.clone(), 1, 3),
            (x_id.clone(), 6, 6),
            (x_id.clone(), 9, 9)
        ]
    );
    let summary: String = one(&c, "SELECT patina_origin_summary()");
    assert!(
        summary.contains(
            "{\"site_id\":\"000102030405060708090a0b0c0d0e0f\",\"local\":false,\"head\":9,\"held\":5,\"gaps\":[[4,5],[7,8]]}"
        ),
        "{summary}"
    );
    let missing: String = one(&c, &format!("SELECT patina_origin_missing({x}, 2, 12)"));
    assert_eq!(missing, "[[4,5],[7,8],[10,12]]");
    // A rolled-back merge leaves no range behind.
    let before = origin_ranges(&c);
    c.execute_batch(&format!(
        "BEGIN;
         INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq, origin_version)
           VALUES ('t', crsql_pack_columns(5), 'a', 'gone', 1, 50, {x}, 1, 0, 4);
         ROLLBACK;"
    ))
    .unwrap();
    assert_eq!(origin_ranges(&c), before);
    // Arguments are checked.
    let err = c
        .query_row("SELECT patina_origin_missing(x'01', 1, 2)", [], |r| {
            r.get::<_, String>(0)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("site_id") && err.contains("16-byte"), "{err}");
}

#[test]
fn a_new_site_id_keeps_the_old_numbering_held() {
    let a = node(None);
    a.execute_batch("INSERT INTO t VALUES (1, 1, 1); UPDATE t SET a = 2 WHERE id = 1;")
        .unwrap();
    let old = site(&a);
    a.execute_batch("SELECT patina_new_site_id()").unwrap();
    assert_eq!(origin_ranges(&a), vec![(old, 1, 3)]);
    assert_eq!(counters(&a).1, 0);
    a.execute("UPDATE t SET b = 3 WHERE id = 1", []).unwrap();
    assert_eq!(ov_of(&a, 1, "b"), 1);
}

/// A database as the previous release left it: no origin counter, no ranges table, and
/// local clocks with NULL origin numbers (the feed reports the change number for them).
fn make_old_release_db(path: &std::path::Path) -> (Vec<u8>, Vec<ChangeRow>) {
    let c = node(Some(path));
    let (input, _, _) = input_with_superseded();
    c.execute_batch("INSERT INTO t VALUES (10, 1, 1); INSERT INTO t VALUES (11, 1, 1);")
        .unwrap();
    merge_per_change(&c, &input);
    c.execute_batch("UPDATE t SET a = 5 WHERE id = 10;")
        .unwrap();
    let me = site(&c);
    let ord: i64 = one(&c, "SELECT local_site FROM patina_state");
    c.execute_batch(&format!(
        "DROP TRIGGER t__patina_ins; DROP TRIGGER t__patina_updpk; DROP TRIGGER t__patina_del;
         DROP TRIGGER t__patina_upd_0; DROP TRIGGER t__patina_upd_1;
         DROP VIEW patina_origin_held; DROP TABLE patina_origin_ranges;
         ALTER TABLE patina_state DROP COLUMN origin_version;
         UPDATE t__patina_clock SET __patina_s_ov = NULL WHERE __patina_s_site = {ord};
         UPDATE t__patina_clock SET a__patina_ov = NULL WHERE a__patina_site = {ord};
         UPDATE t__patina_clock SET b__patina_ov = NULL WHERE b__patina_site = {ord};"
    ))
    .unwrap();
    (me, input)
}

#[test]
fn a_database_of_the_previous_release_is_migrated_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let (me, input) = make_old_release_db(&path);
    let legacy_feed = {
        let plain = open_plain(&path);
        let n: i64 = one(
            &plain,
            "SELECT count(*) FROM sqlite_schema WHERE name = 'patina_origin_ranges'",
        );
        assert_eq!(n, 0, "the old layout has no ranges table");
        one::<i64>(&plain, "SELECT db_version FROM patina_state")
    };
    let c = open(&path);
    let (dbv, ov) = counters(&c);
    assert_eq!(
        (dbv, ov),
        (legacy_feed, legacy_feed),
        "the counter continues above db_version"
    );
    // Local legacy changes report their change number, below the new counter.
    let local: Vec<i64> = changes_after(&c, 0)
        .into_iter()
        .filter(|ch| ch.6 == me)
        .map(|ch| ch.9)
        .collect();
    assert!(!local.is_empty() && local.iter().all(|v| *v <= ov));
    // Ranges rebuilt from the clocks: every standing change of each other origin.
    let mut rebuilt = std::collections::BTreeMap::<Vec<u8>, Vec<i64>>::new();
    for ch in changes_after(&c, 0).into_iter().filter(|ch| ch.6 != me) {
        rebuilt.entry(ch.6).or_default().push(ch.9);
    }
    for (site, versions) in &rebuilt {
        for v in versions {
            let m: String = c
                .query_row(
                    "SELECT patina_origin_missing(?1, ?2, ?2)",
                    rusqlite::params![site, v],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(m, "[]");
        }
    }
    // The superseded old copy (s1's version 1) left no trace: it is a gap now.
    let s1 = input[0].6.clone();
    let m: String = c
        .query_row(
            "SELECT patina_origin_missing(?1, 1, 1)",
            rusqlite::params![s1],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(m, "[[1,1]]");
    drop(c);
    // Triggers were regenerated: an app that loads nothing now advances the counter.
    let plain = open_plain(&path);
    plain
        .execute("UPDATE t SET b = 9 WHERE id = 11", [])
        .unwrap();
    let (dbv2, ov2): (i64, i64) = plain
        .query_row(
            "SELECT db_version, origin_version FROM patina_state",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((dbv2, ov2), (dbv + 1, ov + 1));
    drop(plain);
    let c = open(&path);
    assert_eq!(ov_of(&c, 11, "b"), ov + 1);
    // Loading again does not migrate again.
    let before = origin_ranges(&c);
    drop(c);
    let c = open(&path);
    assert_eq!(origin_ranges(&c), before);
    assert_eq!(counters(&c), (dbv + 1, ov + 1));
}
