//! Property: the merge paths are one behaviour. The same changes merged one by one
//! (`INSERT INTO crsql_changes` per change), batched (queued under `merging = 1`, applied
//! grouped by row) and as `patina_batch` blobs into three copies of one database give
//! identical tables, clocks,
//! `crsql_rows_impacted()` and effects of the app's own triggers (the state a trigger
//! derives; the batched path writes a row once with its net change, so a trigger that
//! counts firings sees fewer — see the README).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

use proptest::prelude::*;
use rusqlite::Connection;

#[derive(Clone, Debug)]
enum Op {
    Insert(i64, i64, i64),
    Update(i64, &'static str, i64),
    Delete(i64),
    Replace(i64, i64),
    Upsert(i64, i64),
    /// Source `i` receives the other source's whole feed.
    Sync,
}

fn op() -> impl Strategy<Value = (usize, Op)> {
    let key = 0i64..3;
    // Few values, so equal-value changes are common.
    let v = || prop_oneof![Just(0i64), Just(1)];
    let op = prop_oneof![
        4 => (key.clone(), v(), v()).prop_map(|(k, a, b)| Op::Insert(k, a, b)),
        4 => (key.clone(), prop_oneof![Just("a"), Just("b")], v()).prop_map(|(k, c, x)| Op::Update(k, c, x)),
        2 => key.clone().prop_map(Op::Delete),
        1 => (key.clone(), v()).prop_map(|(k, a)| Op::Replace(k, a)),
        1 => (key.clone(), v()).prop_map(|(k, a)| Op::Upsert(k, a)),
        2 => Just(Op::Sync),
    ];
    (0usize..3, op)
}

fn apply(c: &Connection, op: &Op) {
    // A failing write (duplicate key) changes nothing; that is fine here.
    let _ = match op {
        Op::Insert(k, a, b) => c.execute("INSERT INTO t VALUES (?1, ?2, ?3)", [k, a, b]),
        Op::Update(k, col, x) => {
            c.execute(&format!("UPDATE t SET {col} = ?2 WHERE id = ?1"), [k, x])
        }
        Op::Delete(k) => c.execute("DELETE FROM t WHERE id = ?1", [k]),
        Op::Replace(k, a) => c.execute("INSERT OR REPLACE INTO t (id, a) VALUES (?1, ?2)", [k, a]),
        Op::Upsert(k, a) => c.execute(
            "INSERT INTO t (id, a) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET a = excluded.a",
            [k, a],
        ),
        Op::Sync => Ok(0),
    };
}

fn shuffle<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut v: Vec<T> = items.to_vec();
    v.extend(items.iter().step_by(3).cloned()); // duplicates
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

const DDL: &str =
    "CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b DEFAULT 1); SELECT crsql_as_crr('t');";

/// The app's own triggers: a mirror of `t`, kept by insert, update and delete triggers.
const APP_TRIGGERS: &str = "
    CREATE TABLE mirror(id PRIMARY KEY, a, b);
    CREATE TRIGGER app_ins AFTER INSERT ON t BEGIN
        INSERT OR REPLACE INTO mirror VALUES (NEW.id, NEW.a, NEW.b); END;
    CREATE TRIGGER app_upd AFTER UPDATE ON t BEGIN
        INSERT OR REPLACE INTO mirror VALUES (NEW.id, NEW.a, NEW.b); END;
    CREATE TRIGGER app_del AFTER DELETE ON t BEGIN
        DELETE FROM mirror WHERE id = OLD.id; END;";

/// Every clock column but the local change numbers (`*dbv`), which each path hands out
/// in its own order.
fn clocks(c: &Connection) -> Vec<Vec<String>> {
    let cols: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('t__patina_clock') WHERE name NOT LIKE '%dbv'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let sql = format!(
        "SELECT {} FROM t__patina_clock ORDER BY id",
        cols.iter()
            .map(|c| format!("quote(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(" || ' ' || ")
    );
    dump_sql(c, &sql)
}

fn dump_sql(c: &Connection, sql: &str) -> Vec<Vec<String>> {
    let mut s = c.prepare(sql).unwrap();
    let n = s.column_count();
    s.query_map([], |r| {
        Ok((0..n)
            .map(|i| format!("{:?}", r.get::<_, rusqlite::types::Value>(i).unwrap()))
            .collect())
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn run(
    ops: &[(usize, Op)],
    local_ops: usize,
    seed: u64,
    equal_values: bool,
) -> Result<(), TestCaseError> {
    // Two sources write and exchange; the target (index 2) takes some local writes and
    // part of the sources' feeds before it is copied.
    let dir = tempfile::tempdir().unwrap();
    let srcs: Vec<Connection> = (0..2)
        .map(|_| {
            let c = memory();
            c.execute_batch(DDL).unwrap();
            c
        })
        .collect();
    let base = dir.path().join("base.db");
    {
        let target = open(&base);
        target.execute_batch(DDL).unwrap();
        target.execute_batch(APP_TRIGGERS).unwrap();
        for (i, (at, op)) in ops.iter().enumerate() {
            match (at, op) {
                (2, _) if i >= local_ops => {}
                (2, Op::Sync) => merge(&target, &changes_after(&srcs[i % 2], 0)),
                (2, op) => apply(&target, op),
                (s, Op::Sync) => merge(&srcs[*s], &changes_after(&srcs[1 - s], 0)),
                (s, op) => apply(&srcs[*s], op),
            }
        }
        target
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
    }
    let mut feed = changes_after(&srcs[0], 0);
    feed.extend(changes_after(&srcs[1], 0));
    let feed = shuffle(&feed, seed);

    let (one_by_one, batched, packed) = (
        dir.path().join("a.db"),
        dir.path().join("b.db"),
        dir.path().join("c.db"),
    );
    for p in [&one_by_one, &batched, &packed] {
        std::fs::copy(&base, p).unwrap();
    }
    let (a, b, c) = (open(&one_by_one), open(&batched), open(&packed));
    let config = format!(
        "SELECT crsql_config_set('merge-equal-values', {})",
        i64::from(equal_values)
    );
    for db in [&a, &b, &c] {
        db.execute_batch(&config).unwrap();
    }
    a.execute_batch("BEGIN").unwrap();
    merge(&a, &feed);
    let impacted_a: i64 = one(&a, "SELECT crsql_rows_impacted()");
    a.execute_batch("COMMIT").unwrap();

    b.execute_batch("BEGIN; UPDATE patina_state SET merging = 1")
        .unwrap();
    merge(&b, &feed);
    b.execute_batch("SELECT patina_flush()").unwrap();
    let impacted_b: i64 = one(&b, "SELECT crsql_rows_impacted()");
    b.execute_batch("UPDATE patina_state SET merging = 0; COMMIT")
        .unwrap();

    // The third copy takes the feed as patina_batch blobs, split at a point the seed picks.
    let split = (seed as usize) % (feed.len() + 1);
    c.execute_batch("BEGIN").unwrap();
    for part in [&feed[..split], &feed[split..]] {
        if !part.is_empty() {
            c.execute(
                "INSERT INTO crsql_changes (patina_batch) VALUES (?1)",
                [pack_batch(&c, part)],
            )
            .unwrap();
        }
    }
    let impacted_c: i64 = one(&c, "SELECT crsql_rows_impacted()");
    c.execute_batch("COMMIT").unwrap();

    prop_assert_eq!(impacted_a, impacted_b, "crsql_rows_impacted()");
    prop_assert_eq!(
        impacted_a,
        impacted_c,
        "crsql_rows_impacted() of patina_batch"
    );
    prop_assert_eq!(dump(&a, "t", "id"), dump(&c, "t", "id"));
    prop_assert_eq!(clocks(&a), clocks(&c));
    prop_assert_eq!(origin_ranges(&a), origin_ranges(&c), "held origin ranges");
    prop_assert_eq!(converging_state(&a), converging_state(&c));
    prop_assert_eq!(dump(&a, "mirror", "id"), dump(&c, "mirror", "id"));
    prop_assert_eq!(
        one::<i64>(&a, "SELECT crsql_db_version()"),
        one::<i64>(&c, "SELECT crsql_db_version()")
    );
    prop_assert_eq!(dump(&a, "t", "id"), dump(&b, "t", "id"));
    prop_assert_eq!(clocks(&a), clocks(&b));
    prop_assert_eq!(origin_ranges(&a), origin_ranges(&b), "held origin ranges");
    prop_assert_eq!(converging_state(&a), converging_state(&b));
    prop_assert_eq!(dump(&a, "mirror", "id"), dump(&b, "mirror", "id"));
    prop_assert_eq!(
        dump(&a, "mirror", "id"),
        dump(&a, "t", "id"),
        "the app's mirror follows t"
    );
    // The same local change numbers were handed out, and nothing was captured as local.
    prop_assert_eq!(
        one::<i64>(&a, "SELECT crsql_db_version()"),
        one::<i64>(&b, "SELECT crsql_db_version()")
    );
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PATINA_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]
    #[test]
    fn one_by_one_and_batched_merges_agree(
        ops in proptest::collection::vec(op(), 1..30),
        local_ops in 0usize..30,
        seed in any::<u64>(),
        equal_values in any::<bool>(),
    ) {
        run(&ops, local_ops, seed, equal_values)?;
    }
}
