//! `INSERT INTO crsql_changes (patina_batch) VALUES (?)`: many changes in one statement.
//!
//! A batch applies rows many at a time (multi-row statements of up to 32 rows), so these
//! tests use enough rows to fill several chunks. A batch must end where merging its changes
//! one by one ends, and a malformed one must be refused whole.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

use rusqlite::Connection;

const DDL: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b DEFAULT 'dflt', c);
     SELECT crsql_as_crr('t');
     CREATE TABLE k(x TEXT NOT NULL, y INTEGER NOT NULL, PRIMARY KEY (x, y));
     SELECT crsql_as_crr('k');";

const BATCH: &str = "INSERT INTO crsql_changes (patina_batch) VALUES (?1)";

/// Two writers with overlapping rows, deletes, resurrections and key-only rows.
fn sources() -> (Connection, Connection) {
    let (s1, s2) = (memory(), memory());
    for s in [&s1, &s2] {
        s.execute_batch(DDL).unwrap();
    }
    s1.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 299)
         INSERT INTO t(id, a, c) SELECT i, 'one ' || i, i * 1.5 FROM n;
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99)
         INSERT INTO k SELECT 'key' || (i % 7), i FROM n;
         DELETE FROM t WHERE id % 10 = 3;
         INSERT INTO t(id, a) SELECT id, 'back' FROM t WHERE 0;
         INSERT INTO t(id, a) VALUES (3, 'resurrected'), (13, 'resurrected');
         DELETE FROM k WHERE y % 5 = 0;",
    )
    .unwrap();
    s2.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 150 UNION ALL SELECT i + 1 FROM n WHERE i < 449)
         INSERT INTO t(id, b) SELECT i, 'two ' || i FROM n;
         UPDATE t SET b = NULL WHERE id % 4 = 0;
         DELETE FROM t WHERE id % 9 = 0;",
    )
    .unwrap();
    merge(&s2, &changes_after(&s1, 0));
    s2.execute_batch("UPDATE t SET a = 'two wins' WHERE id BETWEEN 100 AND 199")
        .unwrap();
    (s1, s2)
}

fn tables(c: &Connection) -> Vec<(i64, String, String, String)> {
    let mut s = c
        .prepare("SELECT id, quote(a), quote(b), quote(c) FROM t ORDER BY id")
        .unwrap();
    let rows = s
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// Rows, clocks, causal lengths and sites are identical (the first differences shown).
fn same_state(a: &Connection, b: &Connection, what: &str) {
    let (x, y) = (converging_state(a), converging_state(b));
    let only_a: Vec<_> = x.iter().filter(|c| !y.contains(c)).take(4).collect();
    let only_b: Vec<_> = y.iter().filter(|c| !x.contains(c)).take(4).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty() && x.len() == y.len(),
        "{what}: only in the first {only_a:?}; only in the second {only_b:?}"
    );
}

#[test]
fn a_batch_ends_where_merging_one_by_one_ends() {
    let (s1, s2) = sources();
    let mut feed = changes_after(&s1, 0);
    feed.extend(changes_after(&s2, 0));
    let dir = tempfile::tempdir().unwrap();
    // Two copies of one database (one site id) with local rows the merge must keep or
    // lose by the same rules.
    let base = dir.path().join("base.db");
    {
        let c = open(&base);
        c.execute_batch(DDL).unwrap();
        c.execute_batch(
            "INSERT INTO t(id, a) VALUES (5, 'local'), (1000, 'only here');
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
    }
    for name in ["one.db", "many.db"] {
        std::fs::copy(&base, dir.path().join(name)).unwrap();
    }
    let one = open(&dir.path().join("one.db"));
    let many = open(&dir.path().join("many.db"));
    one.execute_batch("BEGIN").unwrap();
    merge(&one, &feed);
    let impacted_one: i64 = common::one(&one, "SELECT crsql_rows_impacted()");
    one.execute_batch("COMMIT").unwrap();

    many.execute_batch("BEGIN").unwrap();
    // In three statements of uneven size, so chunks and statements do not line up.
    let cuts = [0, 7, feed.len() / 2, feed.len()];
    for w in cuts.windows(2) {
        many.execute(BATCH, [pack_batch(&many, &feed[w[0]..w[1]])])
            .unwrap();
    }
    let impacted_many: i64 = common::one(&many, "SELECT crsql_rows_impacted()");
    many.execute_batch("COMMIT").unwrap();

    assert!(tables(&one).len() > 300, "the feed made rows");
    assert_eq!(tables(&one), tables(&many));
    same_state(&one, &many, "per change vs batch");
    assert_eq!(impacted_one, impacted_many);
    assert_eq!(
        common::one::<i64>(&one, "SELECT crsql_db_version()"),
        common::one::<i64>(&many, "SELECT crsql_db_version()")
    );
    // Nothing was captured as a local write: the merged copy's feed, merged back into the
    // sources, converges them with it.
    for s in [&s1, &s2] {
        merge(s, &changes_after(&many, 0));
        same_state(s, &many, "a source after merging the batch's result");
    }
}

#[test]
fn a_malformed_batch_is_refused_whole() {
    let (s1, _) = sources();
    let feed = changes_after(&s1, 0);
    let good = pack_batch(&s1, &feed[..40]);
    let c = memory();
    c.execute_batch(DDL).unwrap();
    let before = (
        tables(&c),
        common::one::<i64>(&c, "SELECT crsql_db_version()"),
    );

    let mut bad_site = feed[..40].to_vec();
    bad_site[30].6 = vec![1, 2, 3];
    let mut bad_table = feed[..40].to_vec();
    bad_table[39].0 = "nope".into();
    let mut null_key = feed[..40].to_vec();
    null_key[20].1 = if null_key[20].0 == "k" {
        vec![2, 5, 5] // two values, both NULL
    } else {
        vec![1, 5] // one value, NULL
    };
    let nine_fields: Vec<u8> = {
        let mut s = c
            .prepare("SELECT crsql_pack_columns('t', ?1, 'a', 1, 1, 1, ?2, 1, 0)")
            .unwrap();
        s.query_row(rusqlite::params![feed[0].1, feed[0].6], |r| r.get(0))
            .unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() - 3].to_vec(), "patina_batch"),
        (
            "a site id of 3 bytes",
            pack_batch(&s1, &bad_site),
            "16-byte",
        ),
        (
            "an unknown table",
            pack_batch(&s1, &bad_table),
            "unknown table 'nope'",
        ),
        ("a NULL key", pack_batch(&s1, &null_key), "is NULL"),
        (
            "a record of nine fields",
            [good.clone(), nine_fields].concat(),
            "10",
        ),
        (
            "a stray byte",
            [good.clone(), vec![0x07]].concat(),
            "patina_batch",
        ),
    ];
    for (what, blob, says) in cases {
        let err = c.execute(BATCH, [blob]).expect_err(what).to_string();
        assert!(err.contains(says), "{what}: {err}");
        assert_eq!(
            (
                tables(&c),
                common::one::<i64>(&c, "SELECT crsql_db_version()")
            ),
            before,
            "{what}: nothing was written"
        );
    }
    let err = c
        .execute(
            "INSERT INTO crsql_changes (\"table\", patina_batch) VALUES ('t', ?1)",
            [good.clone()],
        )
        .expect_err("a change and a batch in one row")
        .to_string();
    assert!(err.contains("not both"), "{err}");
    let err = c
        .execute(BATCH, ["not a blob"])
        .expect_err("text")
        .to_string();
    assert!(err.contains("BLOB"), "{err}");

    // The good batch still applies afterwards, and an empty one is a no-op.
    c.execute(BATCH, [good]).unwrap();
    c.execute(BATCH, [Vec::<u8>::new()]).unwrap();
    assert_eq!(tables(&c).len(), 40 / 3 + 1);
}

#[test]
fn a_batch_after_queued_changes_applies_after_them() {
    // The sidecar's older way (merging = 1, one INSERT per change) and a batch in one
    // transaction: the batch's changes come after the queued ones, as their order says.
    let (s1, _) = sources();
    let feed = changes_after(&s1, 0);
    let (head, tail) = feed.split_at(feed.len() / 3);
    let a = memory();
    let b = memory();
    for c in [&a, &b] {
        c.execute_batch(DDL).unwrap();
    }
    merge(&a, &feed);
    b.execute_batch("BEGIN; UPDATE patina_state SET merging = 1")
        .unwrap();
    merge(&b, head);
    b.execute(BATCH, [pack_batch(&b, tail)]).unwrap();
    b.execute_batch("SELECT patina_flush(); UPDATE patina_state SET merging = 0; COMMIT")
        .unwrap();
    assert_eq!(tables(&a), tables(&b));
    same_state(&a, &b, "queued then batch");
}

#[test]
fn a_wide_table_merges_as_one_by_one() {
    // 300 columns: a clock row binds 1 + 5 + 4 * 300 parameters, so a statement carries
    // 27 rows under SQLite's default limit, and none under a limit of 999.
    let cols: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
    let ddl = format!(
        "CREATE TABLE w(id INTEGER PRIMARY KEY NOT NULL, {}); SELECT crsql_as_crr('w');",
        cols.join(", ")
    );
    let src = memory();
    src.execute_batch(&ddl).unwrap();
    for id in 0..5 {
        src.execute(
            &format!("INSERT INTO w(id, c0, c150, c299) VALUES ({id}, 'a{id}', {id}, x'00')"),
            [],
        )
        .unwrap();
    }
    src.execute_batch("UPDATE w SET c7 = 'seven' WHERE id = 3; DELETE FROM w WHERE id = 1")
        .unwrap();
    let feed = changes_after(&src, 0);
    let (one, many) = (memory(), memory());
    for c in [&one, &many] {
        c.execute_batch(&ddl).unwrap();
    }
    merge(&one, &feed);
    many.execute(BATCH, [pack_batch(&many, &feed)]).unwrap();
    same_state(&one, &many, "wide table");
    same_state(&src, &many, "wide table, against the source");
    let rows = |c: &Connection| -> Vec<String> {
        let mut s = c
            .prepare("SELECT id || quote(c0) || quote(c7) || quote(c150) || quote(c299) FROM w ORDER BY id")
            .unwrap();
        let r = s.query_map([], |r| r.get(0)).unwrap();
        r.map(Result::unwrap).collect()
    };
    assert_eq!(rows(&many), rows(&src));
    assert_eq!(rows(&many).len(), 4);

    // Where the app lowered the limit below one clock row, the grouped path refuses the
    // table by name and figures, and writes nothing; one by one it still merges.
    let low = memory();
    low.execute_batch(&ddl).unwrap();
    // SAFETY: a live connection; sqlite3_limit only reads and sets a number.
    unsafe { rusqlite::ffi::sqlite3_limit(low.handle(), 9, 999) };
    let err = low
        .execute(BATCH, [pack_batch(&low, &feed)])
        .expect_err("one clock row binds 1206 parameters")
        .to_string();
    assert!(
        err.contains("'w'") && err.contains("1206") && err.contains("999"),
        "{err}"
    );
    assert_eq!(common::one::<i64>(&low, "SELECT count(*) FROM w"), 0);
    merge(&low, &feed);
    same_state(&src, &low, "wide table one by one under a limit of 999");
}

/// A replica of `c(id, v)` holding rows `(i, i)` for `i` in `0..n`.
fn counted(n: i64) -> Connection {
    let c = memory();
    c.execute_batch(&format!(
        "CREATE TABLE c(id INTEGER PRIMARY KEY NOT NULL, v INTEGER); SELECT crsql_as_crr('c');
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {n} - 1)
         INSERT INTO c SELECT i, i FROM n;"
    ))
    .unwrap();
    c
}

#[test]
fn a_batch_refused_midway_leaves_clocks_that_credit_every_written_row() {
    // The target's CHECK refuses rows the source holds: the batch fails in its second
    // chunk. A caller that carries on (instead of rolling back) must still have its own
    // writes captured and numbered after the merged ones, and every row written so far
    // must be credited by its clock.
    let src = counted(200);
    let c = memory();
    c.execute_batch(
        "CREATE TABLE c(id INTEGER PRIMARY KEY NOT NULL, v INTEGER CHECK (v < 100));
         SELECT crsql_as_crr('c');",
    )
    .unwrap();
    c.execute_batch("BEGIN").unwrap();
    let err = c
        .execute(BATCH, [pack_batch(&c, &changes_after(&src, 0))])
        .expect_err("the CHECK refuses a row")
        .to_string();
    assert!(err.contains("CHECK"), "{err}");
    assert_eq!(
        common::one::<i64>(&c, "SELECT merging FROM patina_state"),
        0
    );
    c.execute_batch("INSERT INTO c VALUES (5000, 1); COMMIT")
        .unwrap();

    let written: i64 = common::one(&c, "SELECT count(*) FROM c");
    assert!(
        written > 1 && written < 100,
        "some chunks went through: {written}"
    );
    let feed = changes_after(&c, 0);
    let mut versions: Vec<i64> = feed.iter().map(|ch| ch.5).collect();
    let local = feed
        .iter()
        .find(|ch| ch.1 == vec![1, 17, 19, 136])
        .expect("the local write");
    assert!(
        versions.iter().all(|v| *v <= local.5),
        "the local write is numbered last"
    );
    versions.sort_unstable();
    let n = versions.len();
    versions.dedup();
    assert_eq!(versions.len(), n, "no change number was handed out twice");
    // A replica built from this feed alone holds exactly these rows.
    let replica = memory();
    replica
        .execute_batch(
            "CREATE TABLE c(id INTEGER PRIMARY KEY NOT NULL, v INTEGER); SELECT crsql_as_crr('c');",
        )
        .unwrap();
    merge(&replica, &feed);
    let rows = |db: &Connection| -> Vec<(i64, i64)> {
        let mut s = db.prepare("SELECT id, v FROM c ORDER BY id").unwrap();
        let r = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        r.map(Result::unwrap).collect()
    };
    assert_eq!(rows(&replica), rows(&c));
}

// Found by an independent review of the grouped path (keys one row under two spellings,
// RAISE(FAIL) midway, ROLLBACK TO after a batch).

fn t_values(c: &Connection) -> Vec<(String, String)> {
    let mut s = c
        .prepare("SELECT quote(id), quote(x) FROM t ORDER BY id")
        .unwrap();
    let r = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    r.map(Result::unwrap).collect()
}

fn t_clocks(c: &Connection) -> Vec<String> {
    let mut s = c
        .prepare(
            "SELECT quote(id) || ' cl=' || __patina_cl || ' x_v=' || x__patina_v FROM t__patina_clock ORDER BY id",
        )
        .unwrap();
    let r = s.query_map([], |r| r.get(0)).unwrap();
    r.map(Result::unwrap).collect()
}

/// Two peers write the same row under two keys that the table treats as one (`'a'` and
/// `'A'` under COLLATE NOCASE; `1` and `1.0` in a key column without affinity). Peer 1's
/// value has the higher col_version and must win on every path.
/// `respell` may rewrite peer 2's changes on their way (another packing of its key).
fn equal_keys_case(ddl: &str, k1: &str, k2: &str, respell: impl Fn(ChangeRow) -> ChangeRow) {
    let (s1, s2) = (memory(), memory());
    for s in [&s1, &s2] {
        s.execute_batch(ddl).unwrap();
    }
    s1.execute_batch(&format!(
        "INSERT INTO t VALUES ({k1}, 1); UPDATE t SET x = 5; UPDATE t SET x = 6;"
    ))
    .unwrap();
    s2.execute_batch(&format!("INSERT INTO t VALUES ({k2}, 2);"))
        .unwrap();
    let mut feed = changes_after(&s1, 0);
    feed.extend(changes_after(&s2, 0).into_iter().map(respell));

    let (one_by_one, grouped, packed) = (memory(), memory(), memory());
    for c in [&one_by_one, &grouped, &packed] {
        c.execute_batch(ddl).unwrap();
    }
    merge(&one_by_one, &feed);
    grouped
        .execute_batch("BEGIN; UPDATE patina_state SET merging = 1")
        .unwrap();
    merge(&grouped, &feed);
    grouped
        .execute_batch("SELECT patina_flush(); UPDATE patina_state SET merging = 0; COMMIT")
        .unwrap();
    packed.execute(BATCH, [pack_batch(&packed, &feed)]).unwrap();

    // The per-change path keeps peer 1's x = 6 (col_version 3 beats 1).
    assert_eq!(t_values(&one_by_one).len(), 1);
    assert_eq!(t_values(&one_by_one)[0].1, "6");
    assert_eq!(
        t_values(&one_by_one),
        t_values(&packed),
        "patina_batch: base table"
    );
    assert_eq!(
        t_clocks(&one_by_one),
        t_clocks(&packed),
        "patina_batch: clock"
    );
    assert_eq!(
        t_values(&one_by_one),
        t_values(&grouped),
        "merging = 1: base table"
    );
    assert_eq!(
        t_clocks(&one_by_one),
        t_clocks(&grouped),
        "merging = 1: clock"
    );
}

#[test]
fn nocase_keys_that_differ_in_case_are_one_row() {
    equal_keys_case(
        "CREATE TABLE t(id TEXT COLLATE NOCASE PRIMARY KEY NOT NULL, x); SELECT crsql_as_crr('t');",
        "'a'",
        "'A'",
        |ch| ch,
    );
}

#[test]
fn integer_and_real_keys_that_compare_equal_are_one_row() {
    equal_keys_case(
        "CREATE TABLE t(id PRIMARY KEY NOT NULL, x); SELECT crsql_as_crr('t');",
        "1",
        "1.0",
        |ch| ch,
    );
}

/// An integer key packed in more bytes than it needs names the same row as its
/// canonical packing: it must not be read and written beside it as another row.
#[test]
fn a_key_packed_in_extra_bytes_is_the_same_row() {
    equal_keys_case(
        "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, x); SELECT crsql_as_crr('t');",
        "1",
        "1",
        |mut ch| {
            // Peer 2's key 1 in two bytes (0x11 = width 2, integer) instead of one.
            assert_eq!(ch.1, vec![1, 0x09, 1]);
            ch.1 = vec![1, 0x11, 0, 1];
            ch
        },
    );
}

/// An app trigger refusing a row with RAISE(FAIL) (which, unlike ABORT, keeps what the
/// statement wrote before it): every base row the batch wrote is credited by its clock.
#[test]
fn a_raise_fail_midway_leaves_no_uncredited_base_rows() {
    let src = counted(200);
    let c = memory();
    c.execute_batch(
        "CREATE TABLE c(id INTEGER PRIMARY KEY NOT NULL, v INTEGER); SELECT crsql_as_crr('c');
         CREATE TRIGGER no50 AFTER INSERT ON c WHEN NEW.v = 50
         BEGIN SELECT RAISE(FAIL, 'app refuses 50'); END;",
    )
    .unwrap();
    c.execute_batch("BEGIN").unwrap();
    let err = c
        .execute(BATCH, [pack_batch(&c, &changes_after(&src, 0))])
        .expect_err("the trigger refuses a row");
    assert!(err.to_string().contains("app refuses 50"), "{err}");
    c.execute_batch("COMMIT").unwrap();
    let written: i64 = common::one(&c, "SELECT count(*) FROM c");
    let uncredited: i64 = common::one(
        &c,
        "SELECT count(*) FROM c WHERE id NOT IN (SELECT id FROM c__patina_clock)",
    );
    // The one-by-one path leaves at most the refused row itself uncredited.
    assert!(
        uncredited <= 1,
        "{uncredited} of {written} written base rows have no clock row"
    );
}

/// Changes queued under `merging = 1` before a SAVEPOINT, then a patina_batch after it:
/// `ROLLBACK TO` drops only what came after the savepoint, as it does when the second
/// part is merged per change (the batch must not write the earlier queue inside the
/// savepoint).
#[test]
fn rollback_to_after_a_batch_keeps_changes_queued_before_the_savepoint() {
    let ddl = "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, x); SELECT crsql_as_crr('t');";
    let src = memory();
    src.execute_batch(ddl).unwrap();
    src.execute_batch("INSERT INTO t VALUES (1, 1), (2, 2);")
        .unwrap();
    let feed = changes_after(&src, 0);
    let (before, after): (Vec<_>, Vec<_>) =
        feed.into_iter().partition(|ch| ch.1 == vec![1, 0x09, 1]);
    let run = |as_batch: bool| -> Vec<(String, String)> {
        let c = memory();
        c.execute_batch(ddl).unwrap();
        c.execute_batch("BEGIN; UPDATE patina_state SET merging = 1")
            .unwrap();
        merge(&c, &before);
        c.execute_batch("SAVEPOINT a").unwrap();
        if as_batch {
            c.execute(BATCH, [pack_batch(&c, &after)]).unwrap();
        } else {
            merge(&c, &after);
        }
        c.execute_batch(
            "ROLLBACK TO a; RELEASE a; SELECT patina_flush();
             UPDATE patina_state SET merging = 0; COMMIT",
        )
        .unwrap();
        t_values(&c)
    };
    let per_change = run(false);
    assert_eq!(per_change, vec![("1".to_string(), "1".to_string())]);
    assert_eq!(
        run(true),
        per_change,
        "row 1 was queued before the savepoint"
    );
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        /// Any blob, or a valid one with bytes changed or cut, is merged or refused:
        /// never a crash, and a refusal writes nothing.
        #[test]
        fn any_blob_is_merged_or_refused_whole(
            junk in proptest::collection::vec(any::<u8>(), 0..200),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            use_valid in any::<bool>(),
        ) {
            let src = memory();
            src.execute_batch(DDL).unwrap();
            src.execute_batch("INSERT INTO t(id, a) VALUES (1, 'x'), (2, 'y'); DELETE FROM t WHERE id = 2;
                               INSERT INTO k VALUES ('p', 1)").unwrap();
            let blob = if use_valid {
                let mut b = pack_batch(&src, &changes_after(&src, 0));
                for (at, byte) in &flips {
                    let i = at.index(b.len());
                    b[i] = *byte;
                }
                let keep = cut.index(b.len() + 1);
                b.truncate(keep);
                b
            } else {
                junk
            };
            let c = memory();
            c.execute_batch(DDL).unwrap();
            let before = converging_state(&c);
            let v0: i64 = common::one(&c, "SELECT crsql_db_version()");
            if c.execute(BATCH, [blob]).is_err() {
                prop_assert_eq!(converging_state(&c), before);
                prop_assert_eq!(common::one::<i64>(&c, "SELECT crsql_db_version()"), v0);
            }
            // Either way the database is sound and merges a good batch afterwards.
            c.execute(BATCH, [pack_batch(&src, &changes_after(&src, 0))]).unwrap();
            prop_assert_eq!(common::one::<String>(&c, "PRAGMA quick_check"), "ok".to_string());
        }
    }
}
