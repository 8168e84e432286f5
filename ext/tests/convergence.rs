//! Property: replicas that take random writes (some through connections that loaded
//! nothing), then exchange their feeds partially, in random orders, with duplicates,
//! end identical — tables and every converging clock column of `crsql_changes`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

use proptest::prelude::*;
use rusqlite::Connection;

const REPLICAS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Insert {
        key: i64,
        a: V,
        b: V,
    },
    Update {
        key: i64,
        col: &'static str,
        v: V,
    },
    Delete {
        key: i64,
    },
    Replace {
        key: i64,
        a: V,
    },
    Upsert {
        key: i64,
        a: V,
    },
    MoveKey {
        from: i64,
        to: i64,
    },
    /// Deliver `from`'s feed after a random point to `to`, shuffled, some twice.
    Sync {
        from: usize,
        skip: usize,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
enum V {
    Null,
    Int(i64),
    Real(f64),
    Text(&'static str),
    Blob(u8),
}

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value};
        Ok(ToSqlOutput::Owned(match self {
            V::Null => Value::Null,
            V::Int(i) => Value::Integer(*i),
            V::Real(f) => Value::Real(*f),
            V::Text(t) => Value::Text(t.to_string()),
            V::Blob(b) => Value::Blob(vec![*b]),
        }))
    }
}

fn value() -> impl Strategy<Value = V> {
    prop_oneof![
        Just(V::Null),
        (0i64..3).prop_map(V::Int),
        (0i64..3).prop_map(|i| V::Real(i as f64)),
        prop_oneof![Just("x"), Just("y")].prop_map(V::Text),
        (0u8..2).prop_map(V::Blob),
    ]
}

fn op() -> impl Strategy<Value = (usize, bool, Op)> {
    let key = 0i64..3;
    let write = prop_oneof![
        4 => (key.clone(), value(), value()).prop_map(|(key, a, b)| Op::Insert { key, a, b }),
        4 => (key.clone(), prop_oneof![Just("a"), Just("b")], value()).prop_map(|(key, col, v)| Op::Update { key, col, v }),
        3 => key.clone().prop_map(|key| Op::Delete { key }),
        1 => (key.clone(), value()).prop_map(|(key, a)| Op::Replace { key, a }),
        1 => (key.clone(), value()).prop_map(|(key, a)| Op::Upsert { key, a }),
        1 => (key.clone(), key.clone()).prop_map(|(from, to)| Op::MoveKey { from, to }),
        3 => (0..REPLICAS, 0usize..20, any::<u64>()).prop_map(|(from, skip, seed)| Op::Sync { from, skip, seed }),
    ];
    (0..REPLICAS, any::<bool>(), write)
}

/// A replica: a file with one connection that loaded patina and one that did not.
struct Replica {
    ext: Connection,
    plain: Connection,
}

fn shuffle<T: Clone>(items: &[T], seed: u64, dupes: bool) -> Vec<T> {
    let mut v: Vec<T> = items.to_vec();
    if dupes {
        v.extend(items.iter().step_by(3).cloned());
    }
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn apply(c: &Connection, op: &Op) {
    // Writes may legitimately fail (duplicate key on INSERT, moving onto an existing
    // key); a failed statement changes nothing, which is part of what is tested.
    let _ = match op {
        Op::Insert { key, a, b } => c.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3)",
            rusqlite::params![key, a, b],
        ),
        Op::Update { key, col, v } => c.execute(
            &format!("UPDATE t SET {col} = ?2 WHERE id = ?1"),
            rusqlite::params![key, v],
        ),
        Op::Delete { key } => c.execute("DELETE FROM t WHERE id = ?1", [key]),
        Op::Replace { key, a } => c.execute(
            "INSERT OR REPLACE INTO t (id, a) VALUES (?1, ?2)",
            rusqlite::params![key, a],
        ),
        Op::Upsert { key, a } => c.execute(
            "INSERT INTO t (id, a) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET a = excluded.a",
            rusqlite::params![key, a],
        ),
        Op::MoveKey { from, to } => c.execute("UPDATE t SET id = ?2 WHERE id = ?1", [from, to]),
        Op::Sync { .. } => Ok(0),
    };
}

fn deliver(from: &Connection, to: &Connection, skip: usize, seed: u64) {
    let feed = changes_after(from, 0);
    let part: Vec<_> = feed.into_iter().skip(skip.min(3)).collect();
    // One delivery is one transaction (as the sidecar applies a unit), through one of the
    // three merge paths: change by change; batched and flushed explicitly; batched with
    // the flag cleared first, so that commit flushes.
    to.execute_batch("BEGIN").unwrap();
    match seed % 3 {
        0 => merge(to, &shuffle(&part, seed, true)),
        1 => {
            to.execute_batch("UPDATE patina_state SET merging = 1")
                .unwrap();
            merge(to, &shuffle(&part, seed, true));
            to.execute_batch("SELECT patina_flush(); UPDATE patina_state SET merging = 0")
                .unwrap();
        }
        _ => {
            to.execute_batch("UPDATE patina_state SET merging = 1")
                .unwrap();
            merge(to, &shuffle(&part, seed, true));
            to.execute_batch("UPDATE patina_state SET merging = 0")
                .unwrap();
        }
    }
    to.execute_batch("COMMIT").unwrap();
}

fn run(ops: &[(usize, bool, Op)], seed: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| {
            let path = dir.path().join(format!("r{i}.db"));
            let ext = open(&path);
            ext.execute_batch("PRAGMA synchronous = OFF; CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');").unwrap();
            let plain = open_plain(&path);
            plain.execute_batch("PRAGMA synchronous = OFF").unwrap();
            Replica { plain, ext }
        })
        .collect();
    for (i, (at, plain, op)) in ops.iter().enumerate() {
        let r = &replicas[*at];
        match op {
            Op::Sync {
                from, skip, seed, ..
            } if *from != *at => deliver(&replicas[*from].ext, &r.ext, *skip, *seed),
            Op::Sync { .. } => {}
            _ => apply(if *plain { &r.plain } else { &r.ext }, op),
        }
        let _ = i;
    }
    // Heal: two full rounds of every replica's feed to every other, in a random order.
    for round in 0..2u64 {
        let mut pairs: Vec<(usize, usize)> = (0..REPLICAS)
            .flat_map(|a| (0..REPLICAS).map(move |b| (a, b)))
            .filter(|(a, b)| a != b)
            .collect();
        pairs = shuffle(&pairs, seed ^ round, false);
        for (a, b) in pairs {
            deliver(
                &replicas[a].ext,
                &replicas[b].ext,
                0,
                seed.wrapping_add(round),
            );
        }
    }
    let first = &replicas[0].ext;
    for r in &replicas[1..] {
        prop_assert_eq!(dump(first, "t", "id"), dump(&r.ext, "t", "id"));
        prop_assert_eq!(converging_state(first), converging_state(&r.ext));
    }
    prop_assert_eq!(one::<i64>(first, "SELECT merging FROM patina_state"), 0);
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PATINA_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn replicas_converge(ops in proptest::collection::vec(op(), 1..40), seed in any::<u64>()) {
        run(&ops, seed)?;
    }
}
