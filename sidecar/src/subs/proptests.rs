//! The incremental engine against the reference: random writes — rows entering and leaving
//! a filter, deletes, primary key changes, remote changes merged through `crsql_changes`,
//! writes to a table no subscription reads — and, after each batch, the same subscriptions
//! matched by touched key on one engine and re-run whole (today's engine) on another must
//! emit the same changes and hold the same rows.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use proptest::prelude::*;
use rusqlite::Connection;

use super::engine::Core;
use super::storage;
use crate::config::Synchronous;
use crate::db::touched::TouchedKeys;
use crate::http::json_values::{Param, Params, StatementSpec};
use crate::http::pool::{open_api_conn, Limits};
use crate::node::{Metrics, NodeShared};

const SCHEMA: &str = "
CREATE TABLE m (id TEXT PRIMARY KEY NOT NULL, status TEXT, region TEXT, n INTEGER);
CREATE INDEX m_region ON m (region);
CREATE TABLE pair (a INTEGER NOT NULL, b TEXT NOT NULL, v INTEGER, PRIMARY KEY (a, b));
CREATE TABLE other (id INTEGER PRIMARY KEY NOT NULL, x TEXT);
SELECT crsql_as_crr('m');
SELECT crsql_as_crr('pair');
SELECT crsql_as_crr('other');
";

/// One write.
#[derive(Debug, Clone)]
enum Op {
    Upsert {
        id: u8,
        status: u8,
        region: u8,
        n: i8,
    },
    SetRegion {
        id: u8,
        region: u8,
    },
    SetStatus {
        id: u8,
        status: u8,
    },
    Delete {
        id: u8,
    },
    ChangeKey {
        from: u8,
        to: u8,
    },
    Pair {
        a: u8,
        b: u8,
        v: Option<i8>,
    },
    Other {
        id: u8,
    },
    /// The same upsert made on another replica and merged here.
    Remote {
        id: u8,
        status: u8,
        region: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..10u8, 0..3u8, 0..3u8, any::<i8>()).prop_map(|(id, status, region, n)| Op::Upsert {
            id,
            status,
            region,
            n
        }),
        (0..10u8, 0..3u8).prop_map(|(id, region)| Op::SetRegion { id, region }),
        (0..10u8, 0..3u8).prop_map(|(id, status)| Op::SetStatus { id, status }),
        (0..10u8).prop_map(|id| Op::Delete { id }),
        (0..10u8, 0..10u8).prop_map(|(from, to)| Op::ChangeKey { from, to }),
        (0..3u8, 0..3u8, proptest::option::of(any::<i8>())).prop_map(|(a, b, v)| Op::Pair {
            a,
            b,
            v
        }),
        (0..5u8).prop_map(|id| Op::Other { id }),
        (0..10u8, 0..3u8, 0..3u8).prop_map(|(id, status, region)| Op::Remote {
            id,
            status,
            region
        }),
    ]
}

const STATUS: [&str; 3] = ["up", "down", "unknown"];
const REGION: [&str; 3] = ["ams", "iad", "syd"];

fn run(conn: &Connection, remote: &Connection, op: &Op) {
    // Constraint failures (a key change onto an existing key) are part of the game.
    let _ = match op {
        Op::Upsert { id, status, region, n } => conn.execute(
            "INSERT INTO m (id, status, region, n) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, region = excluded.region, n = excluded.n",
            rusqlite::params![format!("m-{id}"), STATUS[*status as usize], REGION[*region as usize], n],
        ),
        Op::SetRegion { id, region } => conn.execute(
            "UPDATE m SET region = ?2 WHERE id = ?1",
            rusqlite::params![format!("m-{id}"), REGION[*region as usize]],
        ),
        Op::SetStatus { id, status } => conn.execute(
            "UPDATE m SET status = ?2 WHERE id = ?1",
            rusqlite::params![format!("m-{id}"), STATUS[*status as usize]],
        ),
        Op::Delete { id } => conn.execute("DELETE FROM m WHERE id = ?1", [format!("m-{id}")]),
        Op::ChangeKey { from, to } => conn.execute(
            "UPDATE m SET id = ?2 WHERE id = ?1",
            [format!("m-{from}"), format!("m-{to}")],
        ),
        Op::Pair { a, b, v: None } => conn.execute(
            "DELETE FROM pair WHERE a = ?1 AND b = ?2",
            rusqlite::params![a, b.to_string()],
        ),
        Op::Pair { a, b, v: Some(v) } => conn.execute(
            "INSERT INTO pair (a, b, v) VALUES (?1, ?2, ?3) ON CONFLICT DO UPDATE SET v = excluded.v",
            rusqlite::params![a, b.to_string(), v],
        ),
        Op::Other { id } => conn.execute(
            "INSERT INTO other (id, x) VALUES (?1, 'x') ON CONFLICT DO UPDATE SET x = x || 'x'",
            [id],
        ),
        Op::Remote { id, status, region } => {
            let before: i64 = remote
                .query_row("SELECT crsql_db_version()", [], |r| r.get(0))
                .unwrap();
            remote
                .execute(
                    "INSERT INTO m (id, status, region) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO \
                     UPDATE SET status = excluded.status, region = excluded.region",
                    [format!("m-{id}"), STATUS[*status as usize].into(), REGION[*region as usize].into()],
                )
                .unwrap();
            merge(remote, conn, before);
            Ok(1)
        }
    };
}

/// Merges `from`'s changes after `after` into `into`, as the apply thread does.
fn merge(from: &Connection, into: &Connection, after: i64) {
    let mut read = from
        .prepare(
            "SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq \
             FROM crsql_changes WHERE db_version > ?1",
        )
        .unwrap();
    let rows: Vec<Vec<rusqlite::types::Value>> = read
        .query_map([after], |r| (0..9).map(|i| r.get(i)).collect())
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let tx = into.unchecked_transaction().unwrap();
    for row in rows {
        tx.execute(
            "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, \
             site_id, cl, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params_from_iter(row),
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// What the tailer would hand on: the keys touched after `after`, and the new version.
fn touched_after(conn: &Connection, after: i64) -> (TouchedKeys, i64) {
    let now: i64 = conn
        .query_row("SELECT crsql_db_version()", [], |r| r.get(0))
        .unwrap();
    let mut keys = TouchedKeys::none();
    let mut st = conn
        .prepare(
            "SELECT \"table\", pk FROM crsql_changes WHERE db_version > ?1 AND db_version <= ?2",
        )
        .unwrap();
    let mut rows = st.query(rusqlite::params![after, now]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let t: String = r.get(0).unwrap();
        let pk: Vec<u8> = r.get(1).unwrap();
        keys.add(&t, &pk);
    }
    (keys, now)
}

fn shared(db: &Path) -> Arc<NodeShared> {
    let ext = crate::db::extension_path(None).unwrap();
    Arc::new(NodeShared {
        db_path: db.to_path_buf(),
        extension_path: ext,
        site_id_hex: String::new(),
        db_version: tokio::sync::watch::channel(0).1,
        touched: Arc::default(),
        local_write: Arc::default(),
        gossip_addr: None,
        members: Arc::new(RwLock::new(Vec::new())),
        metrics: Arc::default(),
        synchronous: Synchronous::Normal,
        schema_paths: Vec::new(),
        reload: Arc::new(|| Ok(Vec::new())),
    })
}

fn core(shared: &NodeShared) -> Core {
    let api = open_api_conn(shared, Synchronous::Normal, false, 1 << 20).unwrap();
    let states = Core::open(&api).unwrap();
    Core {
        api,
        limits: Limits {
            query_timeout: std::time::Duration::from_secs(10),
            max_result_bytes: 1 << 20,
        },
        metrics: Arc::new(Metrics::default()),
        states,
    }
}

/// The subscriptions under test: incremental shapes (a parameter, an alias, a composite
/// key, an expression in the result, a keyless filter), several subscriptions of one shape
/// with different parameters (evaluated on one shared statement, re-bound for each), and
/// whole-run ones (an aggregate, a LIMIT, a join).
fn specs() -> Vec<(StatementSpec, bool)> {
    let p = |sql: &str, params: Params| StatementSpec {
        sql: sql.into(),
        params,
    };
    let text = |s: &str| Param(rusqlite::types::Value::Text(s.into()));
    let int = |n: i64| Param(rusqlite::types::Value::Integer(n));
    let mut out = vec![];
    for region in REGION {
        out.push((
            p(
                "SELECT id, status, region FROM m WHERE region = ?",
                Params::Positional(vec![text(region)]),
            ),
            true,
        ));
    }
    for (region, status) in [("ams", "up"), ("iad", "up"), ("ams", "down")] {
        out.push((
            p(
                "SELECT id, status FROM m WHERE region = ? AND status <> ?",
                Params::Positional(vec![text(region), text(status)]),
            ),
            true,
        ));
    }
    for min in [-50, 0, 50] {
        out.push((
            p(
                "SELECT id, n FROM m WHERE n > :min",
                Params::Named(vec![(":min".into(), int(min))]),
            ),
            true,
        ));
    }
    out.extend(vec![
        (
            p(
                "SELECT x.status, x.id FROM m AS x WHERE x.status <> 'down'",
                Params::None,
            ),
            true,
        ),
        (
            p(
                "SELECT id, n * 2 AS twice, region FROM m WHERE n > 0 ORDER BY n",
                Params::None,
            ),
            true,
        ),
        (
            p("SELECT b, a, v FROM pair WHERE v IS NOT NULL", Params::None),
            true,
        ),
        (
            p(
                "SELECT region, count(*) FROM m GROUP BY region",
                Params::None,
            ),
            false,
        ),
        (
            p("SELECT id, status FROM m ORDER BY id LIMIT 3", Params::None),
            false,
        ),
        (
            p("SELECT status FROM m WHERE region = 'iad'", Params::None),
            false,
        ),
        (
            p(
                "SELECT m.id, pair.v FROM m JOIN pair ON pair.a = m.n",
                Params::None,
            ),
            false,
        ),
    ]);
    out
}

type Seen = BTreeMap<String, Vec<(String, String, String)>>;

/// Every change each subscription logged after `after` (kind, key, values), sorted
/// per subscription — a round's order among rows is the query's, not a contract.
fn logged(core: &Core, after: &BTreeMap<String, i64>) -> (Seen, BTreeMap<String, i64>) {
    let mut out = Seen::new();
    let mut last = BTreeMap::new();
    for (i, s) in core.states.iter().enumerate() {
        let id = &s.handle.id;
        let from = after.get(id).copied().unwrap_or(0);
        let (changes, _) = storage::changes_after(&core.api.conn, id, from, i64::MAX).unwrap();
        let mut ids = Vec::new();
        let mut v: Vec<(String, String, String)> = changes
            .into_iter()
            .map(|(cid, kind, rowid, vals)| {
                ids.push(cid);
                let key = s
                    .rows
                    .iter()
                    .find(|(_, (r, _))| *r == rowid)
                    .map(|(k, _)| k.clone())
                    .unwrap_or_else(|| format!("gone {vals}"));
                let key = if kind == "delete" {
                    format!("gone {vals}")
                } else {
                    key
                };
                (kind, key, vals)
            })
            .collect();
        // Change ids are contiguous.
        for (n, cid) in ids.iter().enumerate() {
            assert_eq!(
                *cid,
                from + 1 + n as i64,
                "subscription {i}: change ids have a gap"
            );
        }
        v.sort();
        out.insert(format!("{i}"), v);
        last.insert(id.clone(), *s.handle.last_change.borrow());
    }
    (out, last)
}

fn rows_of(core: &Core) -> Vec<BTreeMap<String, String>> {
    core.states
        .iter()
        .map(|s| {
            s.rows
                .iter()
                .map(|(k, (_, v))| (k.clone(), v.clone()))
                .collect()
        })
        .collect()
}

/// A node's database with the test schema, and a writer connection to it; `None` (the
/// test is skipped) when libpatina.so is not built.
fn node_db() -> Option<(tempfile::TempDir, std::path::PathBuf, Connection)> {
    let Ok(ext) = crate::db::extension_path(None) else {
        eprintln!("libpatina.so not built (cargo build -p patina): skipped");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("node.db");
    let writer = crate::db::open(&db, &ext, Synchronous::Normal).unwrap();
    writer.execute_batch(SCHEMA).unwrap();
    Some((dir, db, writer))
}

fn check(batches: Vec<Vec<Op>>) {
    let Some((dir, db, writer)) = node_db() else {
        return;
    };
    let ext = crate::db::extension_path(None).unwrap();
    let remote = crate::db::open(&dir.path().join("remote.db"), &ext, Synchronous::Normal).unwrap();
    remote.execute_batch(SCHEMA).unwrap();
    let sh = shared(&db);
    let mut inc = core(&sh);
    let mut whole = core(&sh);
    for (spec, incremental) in specs() {
        inc.create(spec.clone()).unwrap();
        whole.create(spec).unwrap();
        let s = inc.states.last().unwrap();
        assert_eq!(
            s.plan_is_incremental(),
            incremental,
            "{:?}: {:?}",
            s.spec_sql(),
            s.plan_reason()
        );
    }
    for s in &mut whole.states {
        s.force_whole();
    }
    let mut version: i64 = writer
        .query_row("SELECT crsql_db_version()", [], |r| r.get(0))
        .unwrap();
    let mut after_inc = BTreeMap::new();
    let mut after_whole = BTreeMap::new();
    for batch in batches {
        for op in &batch {
            run(&writer, &remote, op);
        }
        let (keys, now) = touched_after(&writer, version);
        version = now;
        let only_other = match &keys {
            TouchedKeys::Keys(m) => !m.is_empty() && m.keys().all(|t| t == "other"),
            TouchedKeys::All => false,
        };
        let evals = inc.metrics.subscription_evaluations.get();
        inc.round(&keys, None, |_| true).unwrap();
        if only_other {
            assert_eq!(
                inc.metrics.subscription_evaluations.get(),
                evals,
                "a write no subscription reads evaluated one"
            );
        }
        whole.round(&TouchedKeys::All, None, |_| true).unwrap();
        let (a, la) = logged(&inc, &after_inc);
        let (b, lb) = logged(&whole, &after_whole);
        assert_eq!(a, b, "after {batch:?}");
        assert_eq!(rows_of(&inc), rows_of(&whole), "after {batch:?}");
        after_inc = la;
        after_whole = lb;
    }
}

/// Subscriptions of one shape with different parameters share one cached keyed
/// statement; re-binding it must not make SQLite re-plan it (query planner stability,
/// `Core::open`), or every evaluation pays a full prepare.
#[test]
fn a_shape_shared_by_parameters_is_not_re_prepared() {
    let Some((_dir, db, writer)) = node_db() else {
        return;
    };
    let sh = shared(&db);
    let mut inc = core(&sh);
    for region in REGION {
        inc.create(StatementSpec {
            sql: "SELECT id, status, region FROM m WHERE region = ?".into(),
            params: Params::Positional(vec![Param(rusqlite::types::Value::Text(region.into()))]),
        })
        .unwrap();
    }
    let sql = inc.states[0].keyed_sql().unwrap().to_owned();
    let mut version = 0;
    for i in 0..6u8 {
        run(
            &writer,
            &writer,
            &Op::Upsert {
                id: i,
                status: i % 3,
                region: i % 3,
                n: 1,
            },
        );
        let (keys, now) = touched_after(&writer, version);
        version = now;
        inc.round(&keys, None, |_| true).unwrap();
    }
    let reprepared = inc
        .api
        .conn
        .prepare_cached(&sql)
        .unwrap()
        .get_status(rusqlite::StatementStatus::RePrepare);
    assert_eq!(reprepared, 0, "the shared keyed statement was re-prepared");
    assert_eq!(
        inc.states.iter().map(|s| s.rows.len()).collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
}

/// A round that fails leaves no transaction open: the snapshot it read is rolled back
/// (the authorizer refuses an untrusted ROLLBACK), and the next round can begin.
#[test]
fn a_dropped_read_snapshot_rolls_back() {
    let Some((_dir, db, _writer)) = node_db() else {
        return;
    };
    let mut inc = core(&shared(&db));
    {
        let _s = storage::ReadSnapshot::begin(&inc.api.conn, &inc.api.auth).unwrap();
        assert!(!inc.api.conn.is_autocommit());
    }
    assert!(inc.api.conn.is_autocommit(), "a transaction was left open");
    inc.round(&TouchedKeys::All, None, |_| true).unwrap();
    assert!(inc.api.conn.is_autocommit());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn incremental_matching_emits_what_a_whole_rerun_emits(
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..25)
    ) {
        check(batches);
    }
}
