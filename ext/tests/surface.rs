//! The SQL surface: exactly which functions and modules load, argument errors, schema
//! refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

#[test]
fn registers_exactly_these_functions_and_modules() {
    let c = memory();
    let mut s = c
        .prepare("SELECT name, narg FROM pragma_function_list WHERE name LIKE 'crsql%' OR name LIKE 'patina%' ORDER BY name, narg")
        .unwrap();
    let got: Vec<(String, i64)> = s
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let want: Vec<(String, i64)> = [
        ("crsql_as_crr", 1),
        ("crsql_as_crr", 2),
        ("crsql_as_table", 1),
        ("crsql_begin_alter", 1),
        ("crsql_commit_alter", 1),
        ("crsql_config_get", 1),
        ("crsql_config_set", 2),
        ("crsql_db_version", 0),
        ("crsql_finalize", 0),
        ("crsql_pack_columns", -1),
        ("crsql_rows_impacted", 0),
        ("crsql_site_id", 0),
        ("patina_collect_tombstones", 1),
        ("patina_flush", 0),
        ("patina_new_site_id", 0),
        ("patina_origin_missing", 3),
        ("patina_origin_summary", 0),
        ("patina_version", 0),
    ]
    .iter()
    .map(|(n, a)| (n.to_string(), *a))
    .collect();
    assert_eq!(got, want);
    let modules: Vec<String> = c
        .prepare("SELECT name FROM pragma_module_list WHERE name LIKE 'crsql%' OR name LIKE 'patina%' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(modules, vec!["crsql_changes".to_string()]);
}

#[test]
fn site_id_is_stable_per_database_and_reads_never_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let first: Vec<u8> = one(&open(&path), "SELECT crsql_site_id()");
    assert_eq!(first.len(), 16);
    let c = open(&path);
    let again: Vec<u8> = one(&c, "SELECT crsql_site_id()");
    assert_eq!(first, again);
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 1);").unwrap();
    let before: i64 = one(&c, "SELECT total_changes()");
    let _: i64 = one(
        &c,
        "SELECT count(*) FROM crsql_changes WHERE db_version > 0",
    );
    let _: i64 = one(
        &c,
        "SELECT crsql_db_version() + length(crsql_site_id()) + crsql_rows_impacted()",
    );
    assert_eq!(
        before,
        one::<i64>(&c, "SELECT total_changes()"),
        "reading the feed or calling functions wrote"
    );
}

#[test]
fn argument_errors_name_the_argument() {
    let c = memory();
    let err = |sql: &str| c.query_row(sql, [], |_| Ok(())).expect_err(sql).to_string();
    assert!(err("SELECT crsql_as_crr(5)").contains("argument 1 (table)"));
    assert!(err("SELECT crsql_as_crr('other', 't')").contains("argument 1 (schema)"));
    assert!(err("SELECT crsql_as_crr()").contains("wrong number of arguments"));
    assert!(err("SELECT crsql_config_set('nope', 1)").contains("merge-equal-values"));
    assert!(
        err("SELECT crsql_config_set('merge-equal-values', 'yes')").contains("argument 2 (value)")
    );
    assert!(err("SELECT crsql_pack_columns()").contains("missing"));
    assert!(err("SELECT crsql_as_table('t')").contains("not replicated"));
}

#[test]
fn schema_rules_refuse_with_the_culprit_named() {
    let c = memory();
    c.execute_batch(
        "CREATE TABLE nopk(a, b);
         CREATE TABLE nullpk(id TEXT PRIMARY KEY, a);
         CREATE TABLE rowidpk(id INTEGER PRIMARY KEY, a);
         CREATE TABLE uniq(id INTEGER PRIMARY KEY NOT NULL, email TEXT); CREATE UNIQUE INDEX uniq_email ON uniq(email);
         CREATE TABLE uniq2(id INTEGER PRIMARY KEY NOT NULL, email TEXT UNIQUE);
         CREATE TABLE parent(id INTEGER PRIMARY KEY NOT NULL);
         CREATE TABLE child(id INTEGER PRIMARY KEY NOT NULL, parent_id INTEGER REFERENCES parent(id));
         CREATE TABLE nodefault(id INTEGER PRIMARY KEY NOT NULL, name TEXT NOT NULL);",
    )
    .unwrap();
    let refuse = |t: &str, needle: &str| {
        let e = c
            .query_row(&format!("SELECT crsql_as_crr('{t}')"), [], |_| Ok(()))
            .expect_err(t)
            .to_string();
        assert!(
            e.contains(&format!("'{t}'")) && e.contains(needle),
            "{t}: {e}"
        );
    };
    refuse("nopk", "PRIMARY KEY");
    refuse("nullpk", "'id' must be declared NOT NULL");
    refuse("rowidpk", "'id' must be declared NOT NULL");
    refuse("uniq", "unique index 'uniq_email'");
    refuse("uniq2", "unique index 'sqlite_autoindex_uniq2_1'");
    refuse("child", "column 'parent_id' has a FOREIGN KEY");
    refuse("nodefault", "column 'name' is NOT NULL without a DEFAULT");
    refuse("missing", "no such table");
    // A refusal leaves nothing behind.
    let objs: i64 = one(
        &c,
        "SELECT count(*) FROM sqlite_schema WHERE instr(name, '__patina') > 0",
    );
    assert_eq!(objs, 0);
}

#[test]
fn as_crr_is_idempotent_and_as_table_undoes_it() {
    let c = memory();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a); INSERT INTO t VALUES (1, 'x'), (2, 'y');").unwrap();
    c.execute_batch(
        "SELECT crsql_as_crr('t'); SELECT crsql_as_crr('t'); SELECT crsql_as_crr('main', 't');",
    )
    .unwrap();
    assert_eq!(
        changes_after(&c, 0).len(),
        2,
        "2 rows backfilled once: one column each (a first life records no row clock)"
    );
    c.execute_batch("SELECT crsql_as_table('t')").unwrap();
    let objs: i64 = one(
        &c,
        "SELECT count(*) FROM sqlite_schema WHERE instr(name, 't__patina') = 1",
    );
    assert_eq!(objs, 0);
    assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t"), 2);
}

#[test]
fn pack_columns_matches_cr_sqlite() {
    let c = memory();
    let b: Vec<u8> = one(&c, "SELECT crsql_pack_columns(1, 'ab', NULL, x'07', -1)");
    assert_eq!(
        b,
        vec![
            5, 0x09, 1, 0x0b, 2, b'a', b'b', 5, 0x0c, 1, 7, 0x41, 255, 255, 255, 255, 255, 255,
            255, 255
        ]
    );
}
