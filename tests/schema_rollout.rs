//! A rolling schema change across a cluster of real `patina agent` processes (issue 12,
//! part 3): ten nodes take an `ADD COLUMN` one at a time through their schema file and
//! `POST /v1/reload`, while one writer keeps writing — the new column on nodes already
//! migrated, the old columns and an unrelated table everywhere. Nodes not yet migrated
//! buffer the units naming the new column (durably: one of them is killed with SIGKILL
//! and restarted mid-rollout) and keep applying everything else. The tenth node joins
//! empty, on the old schema, half way through.
//!
//! Checked: writes to the unrelated table reach every node while the rollout is half
//! done; every acknowledged write is present everywhere at the end; the buffers empty;
//! and the canonical dumps (rows of both tables, and `crsql_changes` on `(table, pk, cid,
//! val, col_version, cl, site_id)`) of all ten replicas are identical.
//!
//! Needs the extension built beside the binary: `cargo build -p patina` first.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

mod cluster;
mod common;

use cluster::{metric, wait_for, Node, StopOnDrop};

const NODES: usize = 10;
/// The node that joins mid-rollout.
const JOINER: usize = NODES - 1;

const V1: &str = "
CREATE TABLE IF NOT EXISTS items (
    id   INTEGER PRIMARY KEY NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    val  INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    id  INTEGER PRIMARY KEY NOT NULL,
    who TEXT
);
";

/// V1 with `items.extra` added.
const V2: &str = "
CREATE TABLE IF NOT EXISTS items (
    id    INTEGER PRIMARY KEY NOT NULL,
    node  TEXT NOT NULL DEFAULT '',
    val   INTEGER,
    extra TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id  INTEGER PRIMARY KEY NOT NULL,
    who TEXT
);
";

/// Rows updated from every node, so buffered changes meet concurrent ones.
const SHARED: i64 = 5;

/// What one committed write left behind.
#[derive(Clone, Debug)]
enum Ack {
    Item { id: i64, extra: bool },
    Event { id: i64 },
}

/// Canonical content of one replica: both tables' rows and the replicated clocks.
fn dump(node: &Node) -> Vec<String> {
    let conn = node.conn();
    let mut out = Vec::new();
    for sql in [
        "SELECT 'row:items', id, quote(node), quote(val), quote(extra) FROM items ORDER BY id",
        "SELECT 'row:events', id, quote(who), '', '' FROM events ORDER BY id",
    ] {
        let mut stmt = conn.prepare(sql).expect("prepare dump");
        let rows = stmt
            .query_map([], |r| {
                Ok(format!(
                    "{}|{}|{}|{}|{}",
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?
                ))
            })
            .expect("dump")
            .collect::<rusqlite::Result<Vec<_>>>()
            .expect("dump rows");
        out.extend(rows);
    }
    let mut stmt = conn
        .prepare(
            "SELECT \"table\", hex(pk), cid, quote(val), col_version, cl, hex(site_id) \
             FROM crsql_changes ORDER BY 1, 2, 3",
        )
        .expect("prepare changes");
    let changes = stmt
        .query_map([], |r| {
            Ok(format!(
                "clock:{}|{}|{}|{}|{}|{}|{}",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?
            ))
        })
        .expect("changes")
        .collect::<rusqlite::Result<Vec<_>>>()
        .expect("change rows");
    out.extend(changes);
    out
}

fn has_event(node: &Node, id: i64) -> bool {
    node.conn()
        .prepare("SELECT 1 FROM events WHERE id = ?1")
        .and_then(|mut s| s.exists([id]))
        .unwrap_or(false)
}

fn reload(node: &Node) {
    let r = ureq::post(&format!("http://{}/v1/reload", node.api)).call();
    assert!(r.is_ok(), "reload of {} failed: {r:?}", node.name);
}

fn health(node: &Node) -> serde_json::Value {
    ureq::get(&format!("http://{}/v1/health", node.api))
        .call()
        .ok()
        .and_then(|r| r.into_json().ok())
        .unwrap_or_default()
}

/// One transaction on `node`'s file: an item (with `extra` once the node is migrated),
/// an update of a shared row, or an event; or, now and then, an item and an event in
/// one transaction (a unit the unmigrated nodes must keep whole).
fn write_one(conn: &rusqlite::Connection, n: usize, seq: i64, migrated: bool) -> Vec<Ack> {
    let id = (n as i64 + 1) * 1_000_000 + seq;
    let tag = format!("n{n}");
    let tx = conn.unchecked_transaction().expect("begin");
    let acks = match (seq % 4, migrated) {
        (0, true) => {
            tx.execute(
                "INSERT INTO items (id, node, val, extra) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![id, tag, seq, format!("x{seq}")],
            )
            .expect("insert item with extra");
            vec![Ack::Item { id, extra: true }]
        }
        (0, false) => {
            tx.execute(
                "INSERT INTO items (id, node, val) VALUES (?1, ?2, ?3)",
                rusqlite::params![id, tag, seq],
            )
            .expect("insert item");
            vec![Ack::Item { id, extra: false }]
        }
        (1, true) => {
            tx.execute(
                "UPDATE items SET extra = ?1, val = ?2 WHERE id = ?3",
                rusqlite::params![format!("{tag}-{seq}"), seq, 1 + seq % SHARED],
            )
            .expect("update shared with extra");
            vec![]
        }
        (1, false) => {
            tx.execute(
                "UPDATE items SET val = ?1, node = ?2 WHERE id = ?3",
                rusqlite::params![seq, tag, 1 + seq % SHARED],
            )
            .expect("update shared");
            vec![]
        }
        (2, true) if seq % 8 == 2 => {
            tx.execute(
                "INSERT INTO items (id, node, extra) VALUES (?1, ?2, 'both')",
                rusqlite::params![id, tag],
            )
            .expect("insert item in a mixed unit");
            tx.execute(
                "INSERT INTO events (id, who) VALUES (?1, ?2)",
                rusqlite::params![id, tag],
            )
            .expect("insert event in a mixed unit");
            vec![Ack::Item { id, extra: true }, Ack::Event { id }]
        }
        _ => {
            tx.execute(
                "INSERT INTO events (id, who) VALUES (?1, ?2)",
                rusqlite::params![id, tag],
            )
            .expect("insert event");
            vec![Ack::Event { id }]
        }
    };
    tx.commit().expect("commit");
    acks
}

#[test]
fn a_rolling_add_column_converges_with_nothing_lost_and_no_stall() {
    // Nine nodes from the start; the tenth joins, empty and on the old schema, when the
    // rollout is half done (it fills up by a catch-up pull: `JOINER`).
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..NODES {
        let boot: Vec<_> = nodes
            .first()
            .map(|n: &Node| vec![n.gossip])
            .unwrap_or_default();
        let mut node = Node::with_schema(&format!("node{}", i + 1), &boot, V1);
        if i != JOINER {
            node.start();
        }
        nodes.push(node);
    }
    // The shared rows, everywhere before the rollout starts.
    {
        let conn = nodes[0].conn();
        for id in 1..=SHARED {
            conn.execute(
                "INSERT INTO items (id, node, val) VALUES (?1, 'seed', 0)",
                [id],
            )
            .expect("seed");
        }
    }
    wait_for("the seed rows everywhere", Duration::from_secs(60), || {
        nodes.iter().take(JOINER).all(|n| {
            n.conn()
                .query_row("SELECT count(*) FROM items", [], |r| r.get::<_, i64>(0))
                .unwrap_or(0)
                == SHARED
        })
    });

    let migrated: Vec<AtomicBool> = (0..NODES).map(|_| AtomicBool::new(false)).collect();
    let stop = AtomicBool::new(false);
    // 1 + the index of a node the writer leaves alone for a moment (0: none).
    let quiet = AtomicUsize::new(0);
    let joined = AtomicBool::new(false);
    let written = AtomicUsize::new(0);
    let acks: Mutex<Vec<Ack>> = Mutex::new(Vec::new());
    let paths: Vec<_> = nodes.iter().map(|n| n.db.clone()).collect();

    std::thread::scope(|s| {
        // The writer: one transaction every 10 ms, round robin over the nodes.
        s.spawn(|| {
            let mut conns: Vec<Option<rusqlite::Connection>> = (0..NODES).map(|_| None).collect();
            let mut seq = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let n = (seq as usize) % NODES;
                seq += 1;
                if quiet.load(Ordering::SeqCst) == n + 1
                    || (n == JOINER && !joined.load(Ordering::SeqCst))
                {
                    continue;
                }
                let conn = conns[n].get_or_insert_with(|| {
                    patina_sidecar::db::open(
                        &paths[n],
                        &cluster::ext(),
                        patina_sidecar::config::Synchronous::Normal,
                    )
                    .expect("open a node's file")
                });
                // Read before writing: a write with `extra` only once the node has it.
                let m = migrated[n].load(Ordering::SeqCst);
                let done = write_one(conn, n, seq, m);
                acks.lock().expect("acks").extend(done);
                written.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        // A failed check below must still stop the writer, or the scope never ends.
        let _stop_writer = StopOnDrop(&stop);
        let wait_writes = |k: usize| {
            let target = written.load(Ordering::SeqCst) + k;
            wait_for("the writer", Duration::from_secs(60), || {
                written.load(Ordering::SeqCst) >= target
            });
        };

        for i in 0..NODES {
            wait_writes(20);
            std::fs::write(&nodes[i].schema, V2).expect("write the new schema");
            reload(&nodes[i]);
            migrated[i].store(true, Ordering::SeqCst);
            if i == NODES / 2 - 1 {
                // Half done: nodes 1..=5 write `extra`, nodes 6..=10 lack it.
                wait_writes(40);
                let buffering = |n: &Node| metric(n, "patina_schema_buffered_units") > 0;
                let lagging = NODES - 2;
                wait_for(
                    "units naming items.extra buffered on an unmigrated node",
                    Duration::from_secs(30),
                    || buffering(&nodes[lagging]),
                );
                // The buffer is durable: a SIGKILL and a restart (still on the old
                // schema) keep it. The app keeps writing the file meanwhile.
                nodes[lagging].kill9();
                nodes[lagging].start();
                wait_for(
                    "the buffer back after a restart",
                    Duration::from_secs(30),
                    || buffering(&nodes[lagging]),
                );
                // A node joins on the old schema. Whether history reaches it as repaired
                // units or by a catch-up pull (split by origin), the changes of the
                // origins that never wrote `extra` apply at once; units naming it wait.
                let before: Vec<i64> = acks
                    .lock()
                    .expect("acks")
                    .iter()
                    .filter_map(|a| match a {
                        Ack::Event { id } if (id / 1_000_000 - 1) as usize >= NODES / 2 => {
                            Some(*id)
                        }
                        _ => None,
                    })
                    .collect();
                nodes[JOINER].start();
                joined.store(true, Ordering::SeqCst);
                wait_for(
                    "the joiner to hold the unmigrated origins' events",
                    Duration::from_secs(30),
                    || before.iter().all(|id| has_event(&nodes[JOINER], *id)),
                );
                wait_for(
                    "the joiner to buffer the migrated origins' changes",
                    Duration::from_secs(30),
                    || buffering(&nodes[JOINER]),
                );
                let lagging = &nodes[lagging];
                let h = health(lagging);
                assert_eq!(h["response"]["schema"]["missing"][0], "column items.extra");
                wait_for(
                    "health to fail a max_buffered_age threshold",
                    Duration::from_secs(30),
                    || {
                        let url = format!("http://{}/v1/health?max_buffered_age=0", lagging.api);
                        match ureq::get(&url).call() {
                            Err(ureq::Error::Status(503, r)) => r
                                .into_string()
                                .unwrap_or_default()
                                .contains("schema buffer"),
                            _ => false,
                        }
                    },
                );
                wait_for(
                    "the migrated origins to show as on another schema",
                    Duration::from_secs(30),
                    || {
                        health(lagging)["response"]["schema"]["origins_elsewhere"]
                            .as_array()
                            .is_some_and(|e| !e.is_empty())
                    },
                );
                assert!(
                    lagging.log_text().contains("schema buffer:"),
                    "the buffering is logged"
                );
                // No stall: an event written on a migrated node (whose earlier units
                // wait in buffers) and one on an unmigrated node reach every node.
                // The marker is made a unit of its own (a unit is one read of the
                // origin's feed, so a write committed with one naming `extra` in the
                // same few milliseconds would travel and wait with it): the writer
                // leaves its node alone until the node has read the marker.
                for (k, from) in [0, NODES - 1].into_iter().enumerate() {
                    let id = 900_000_000 + k as i64;
                    let node = &nodes[from];
                    quiet.store(from + 1, Ordering::SeqCst);
                    wait_writes(NODES);
                    let conn = node.conn();
                    let version = |c: &rusqlite::Connection| -> i64 {
                        c.query_row("SELECT crsql_db_version()", [], |r| r.get(0))
                            .unwrap_or(0)
                    };
                    let read_up_to = |v: i64| {
                        wait_for("the node to read its feed", Duration::from_secs(30), || {
                            health(node)["response"]["db_version"].as_i64() >= Some(v)
                        })
                    };
                    read_up_to(version(&conn));
                    conn.execute("INSERT INTO events (id, who) VALUES (?1, 'marker')", [id])
                        .expect("marker");
                    acks.lock().expect("acks").push(Ack::Event { id });
                    read_up_to(version(&conn));
                    quiet.store(0, Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    loop {
                        let lacking: Vec<&str> = nodes
                            .iter()
                            .filter(|n| !has_event(n, id))
                            .map(|n| n.name.as_str())
                            .collect();
                        if lacking.is_empty() {
                            break;
                        }
                        assert!(
                            std::time::Instant::now() < deadline,
                            "mid-rollout, an unrelated write on {} did not reach {lacking:?}",
                            node.name
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        wait_writes(40);
        stop.store(true, Ordering::SeqCst);
    });

    let acks = acks.into_inner().expect("acks");
    let refs: Vec<&Node> = nodes.iter().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let reference = loop {
        let dumps: Vec<Vec<String>> = refs.iter().map(|n| dump(n)).collect();
        if dumps.windows(2).all(|w| w[0] == w[1]) {
            break dumps.into_iter().next().unwrap_or_default();
        }
        if std::time::Instant::now() > deadline {
            for (n, d) in refs.iter().zip(&dumps) {
                eprintln!("{}: {} lines", n.name, d.len());
            }
            panic!("the replicas did not converge");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let items: Vec<&String> = reference
        .iter()
        .filter(|l| l.starts_with("row:items|"))
        .collect();
    let events: Vec<&String> = reference
        .iter()
        .filter(|l| l.starts_with("row:events|"))
        .collect();
    for a in &acks {
        match a {
            Ack::Item { id, extra } => {
                let row = items
                    .iter()
                    .find(|l| l.starts_with(&format!("row:items|{id}|")))
                    .unwrap_or_else(|| panic!("acknowledged item {id} is missing"));
                if *extra {
                    assert!(!row.ends_with("|NULL"), "item {id} lost its extra: {row}");
                }
            }
            Ack::Event { id } => assert!(
                events
                    .iter()
                    .any(|l| l.starts_with(&format!("row:events|{id}|"))),
                "acknowledged event {id} is missing"
            ),
        }
    }
    let mut buffered = Vec::new();
    for n in &nodes {
        buffered.push(metric(n, "patina_schema_units_buffered_total"));
        // At least: the restarted node also applied units buffered before its restart.
        assert!(
            metric(n, "patina_schema_units_unbuffered_total") >= *buffered.last().unwrap_or(&0),
            "{}: every unit buffered since its start was applied",
            n.name
        );
        assert_eq!(metric(n, "patina_schema_buffered_units"), 0, "{}", n.name);
        let h = health(n);
        assert_eq!(h["response"]["schema"]["buffered_units"], 0, "{}", n.name);
    }
    eprintln!(
        "rollout across {NODES} nodes: {} acknowledged writes, {} rows, {} clock entries; \
         units buffered per node: {buffered:?}",
        acks.len(),
        items.len() + events.len(),
        reference.len() - items.len() - events.len()
    );
}
