//! The mark a one-by-one merge leaves in `patina_state.merging` keeps the capture
//! triggers quiet for that merge's own writes only: the app's writes in the same
//! transaction, before or after, are captured, and no other connection ever sees it set.
//! Databases whose triggers predate the mark get new ones on load.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

const DDL: &str =
    "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');";

fn local_changes(c: &rusqlite::Connection) -> i64 {
    one(
        c,
        "SELECT count(*) FROM crsql_changes WHERE site_id = crsql_site_id()",
    )
}

#[test]
fn app_writes_between_merges_in_one_transaction_are_captured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let x = open(&path);
    x.execute_batch(DDL).unwrap();
    let y = memory();
    y.execute_batch(DDL).unwrap();
    y.execute_batch("INSERT INTO t VALUES (1, 1, 1); INSERT INTO t VALUES (2, 2, 2);")
        .unwrap();
    let feed = changes_after(&y, 0);
    assert_eq!(feed.len(), 4);

    x.execute_batch("BEGIN").unwrap();
    merge(&x, &feed[..2]);
    // The app writes between two merges, on the merging connection.
    x.execute_batch("INSERT INTO t VALUES (3, 3, 3); UPDATE t SET a = 9 WHERE id = 1;")
        .unwrap();
    merge(&x, &feed[2..]);
    x.execute_batch("UPDATE t SET b = 8 WHERE id = 2; DELETE FROM t WHERE id = 3;")
        .unwrap();
    // Merged changes took one number each; the app's writes were captured.
    assert_eq!(local_changes(&x), 3, "row 3's delete; a of 1; b of 2");
    // Another connection sees no mark, before and after the commit.
    let other = open_plain(&path);
    assert_eq!(one::<i64>(&other, "SELECT merging FROM patina_state"), 0);
    x.execute_batch("COMMIT").unwrap();
    assert_eq!(one::<i64>(&other, "SELECT merging FROM patina_state"), 0);
    assert_eq!(one::<i64>(&x, "SELECT merging FROM patina_state"), 0);
    // A write from a connection that loaded nothing is captured after the merge.
    other
        .execute("UPDATE t SET a = 7 WHERE id = 2", [])
        .unwrap();
    assert_eq!(local_changes(&x), 4);
    assert_eq!(
        dump(&x, "t", "id"),
        vec![
            vec![
                "Integer(1)".to_string(),
                "Integer(9)".into(),
                "Integer(1)".into()
            ],
            vec![
                "Integer(2)".to_string(),
                "Integer(7)".into(),
                "Integer(8)".into()
            ],
        ]
    );
}

#[test]
fn merges_into_a_table_with_app_triggers_are_not_captured() {
    let x = memory();
    x.execute_batch(DDL).unwrap();
    x.execute_batch(
        "CREATE TABLE log(n INTEGER);
         CREATE TRIGGER app_before BEFORE INSERT ON t BEGIN INSERT INTO log VALUES (1); END;
         CREATE TRIGGER app_after AFTER UPDATE ON t BEGIN INSERT INTO log VALUES (2); END;",
    )
    .unwrap();
    let y = memory();
    y.execute_batch(DDL).unwrap();
    y.execute_batch("INSERT INTO t VALUES (1, 1, 1); UPDATE t SET a = 5 WHERE id = 1;")
        .unwrap();
    let feed = changes_after(&y, 0);
    x.execute_batch("BEGIN").unwrap();
    merge(&x, &feed);
    x.execute_batch("COMMIT").unwrap();
    assert_eq!(local_changes(&x), 0);
    assert_eq!(
        one::<i64>(&x, "SELECT crsql_db_version()"),
        feed.len() as i64
    );
    assert!(one::<i64>(&x, "SELECT count(*) FROM log") > 0);
}

#[test]
fn triggers_of_an_older_layout_are_regenerated_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let c = open(&path);
        c.execute_batch(DDL).unwrap();
        // As the previous layout left it: triggers that know only merging = 0 / 1.
        let old = "CREATE TRIGGER t__patina_ins AFTER INSERT ON t BEGIN SELECT 1; END;";
        let triggers: Vec<String> = c
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'trigger'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for t in triggers {
            c.execute_batch(&format!("DROP TRIGGER \"{t}\"")).unwrap();
        }
        // ... and a state table from before `cl_floor`.
        c.execute_batch(&format!(
            "ALTER TABLE patina_state DROP COLUMN cl_floor; {old} UPDATE patina_state SET layout = 1;"
        ))
        .unwrap();
    }
    let c = open(&path);
    assert_eq!(one::<i64>(&c, "SELECT layout FROM patina_state"), 3);
    assert_eq!(one::<i64>(&c, "SELECT cl_floor FROM patina_state"), 0);
    let sql: String = one(
        &c,
        "SELECT sql FROM sqlite_schema WHERE name = 't__patina_ins'",
    );
    assert!(sql.contains("total_changes()"), "{sql}");
    c.execute("INSERT INTO t VALUES (1, 1, 1)", []).unwrap();
    assert_eq!(local_changes(&c), 2);
}

#[test]
fn triggers_that_predate_the_mark_see_a_plain_flag() {
    // A database the extension could not migrate at load (read-only, busy) keeps triggers
    // that take any nonzero `merging` as a merge in progress: merges there set and clear 1.
    let x = memory();
    x.execute_batch(DDL).unwrap();
    x.execute_batch(
        "CREATE TABLE seen(id);
         DROP TRIGGER t__patina_ins;
         CREATE TRIGGER t__patina_ins AFTER INSERT ON t
           WHEN (SELECT merging FROM patina_state WHERE id = 0) = 0
           BEGIN INSERT INTO seen VALUES (NEW.id); END;
         UPDATE patina_state SET layout = 1;",
    )
    .unwrap();
    let y = memory();
    y.execute_batch(DDL).unwrap();
    y.execute_batch("INSERT INTO t VALUES (1, 1, 1)").unwrap();
    x.execute_batch("BEGIN").unwrap();
    merge(&x, &changes_after(&y, 0));
    x.execute_batch("INSERT INTO t VALUES (2, 2, 2); COMMIT;")
        .unwrap();
    // The merged row was not seen as an app write; the app's row after it was.
    assert_eq!(one::<String>(&x, "SELECT group_concat(id) FROM seen"), "2");
}

#[test]
fn a_trigger_added_between_merges_of_one_transaction_is_respected() {
    let x = memory();
    x.execute_batch(DDL).unwrap();
    let y = memory();
    y.execute_batch(DDL).unwrap();
    y.execute_batch("INSERT INTO t VALUES (1, 1, 1); INSERT INTO t VALUES (2, 2, 2);")
        .unwrap();
    let feed = changes_after(&y, 0);
    x.execute_batch("BEGIN").unwrap();
    merge(&x, &feed[..1]);
    // The app's trigger writes before patina's capture trigger runs (newest fires first).
    x.execute_batch(
        "CREATE TABLE log(id);
         CREATE TRIGGER app_ins AFTER INSERT ON t BEGIN INSERT INTO log VALUES (NEW.id); END;
         CREATE TRIGGER app_upd AFTER UPDATE ON t BEGIN INSERT INTO log VALUES (NEW.id); END;",
    )
    .unwrap();
    merge(&x, &feed[1..]);
    x.execute_batch("COMMIT").unwrap();
    assert_eq!(local_changes(&x), 0, "no merged change captured as local");
    assert_eq!(
        one::<i64>(&x, "SELECT crsql_db_version()"),
        feed.len() as i64
    );
    assert!(one::<i64>(&x, "SELECT count(*) FROM log") > 0);
}
