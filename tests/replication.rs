//! End-to-end replication: real `patina agent` processes on 127.0.0.1, each in its own
//! temporary directory, writers on their database files (with and without the extension),
//! convergence checked by comparing canonical dumps — the replicated tables' rows sorted by
//! primary key, and `crsql_changes` on (table, pk, cid, val, col_version, cl, site_id).
//!
//! Needs the extension built beside the binary: `cargo build -p patina` first.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod cluster;
mod common;

use cluster::*;
use rusqlite::{Connection, OpenFlags};
#[test]
fn three_nodes_with_concurrent_writers_converge() {
    let nodes = cluster(3);
    std::thread::scope(|s| {
        for (n, node) in nodes.iter().enumerate() {
            for t in 0..3i64 {
                let base = 1_000_000 * (n as i64 + 1) + 10_000 * t;
                s.spawn(move || write_burst(node, base, 60, &format!("n{n}t{t}")));
            }
        }
        let db = nodes[1].db.clone();
        s.spawn(move || {
            let out = python_writer(&db, 9_000_000, 150);
            assert!(
                out.status.success(),
                "python writer failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
    });
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(60));
    // 3 nodes × 3 threads × 60 inserts + 150 python inserts + the 20 shared rows.
    assert_eq!(d.rows.len(), 9 * 60 + 150 + 20, "every write is present");
    // Bandwidth of the per-peer cursor scheme: changes each node received (pushes and
    // pulls, duplicates included) against the changes it needed (final changes credited
    // to another site).
    let mut shipped = 0u64;
    let mut needed = 0u64;
    for n in &nodes {
        shipped += metric(n, "patina_changes_applied_total");
        let site: Vec<u8> = n
            .conn()
            .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
            .expect("site id");
        let site = site.iter().map(|b| format!("{b:02X}")).collect::<String>();
        needed += d.changes.iter().filter(|c| !c.ends_with(&site)).count() as u64;
    }
    eprintln!(
        "bandwidth (3 nodes, cursor scheme): {shipped} changes shipped for {needed} needed \
         ({:.2}x)",
        shipped as f64 / needed.max(1) as f64
    );
    assert!(shipped >= needed, "fewer changes received than needed");
    assert!(
        shipped < 10 * needed,
        "rebroadcast is not bounded: {shipped} for {needed}"
    );
    assert!(
        d.rows.iter().any(|r| r.starts_with("9000149|'py'")),
        "python's writes replicated"
    );
}

#[test]
fn a_node_killed_mid_write_catches_up_without_loss() {
    let mut nodes = cluster(3);
    let stop = AtomicBool::new(false);
    let written = Mutex::new(Vec::new());
    let next = AtomicI64::new(0);
    let (writers, rest) = nodes.split_at_mut(2);
    let victim = &mut rest[0];
    std::thread::scope(|s| {
        // A failed wait below must still stop the writers, or the scope never ends.
        let _stop_writers = StopOnDrop(&stop);
        for (n, node) in writers.iter().enumerate() {
            let (stop, written, next) = (&stop, &written, &next);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let ids = write_burst(node, 5_000_000 + k * 10, 5, &format!("k{n}"));
                    if let Ok(mut w) = written.lock() {
                        w.extend(ids);
                    }
                }
            });
        }
        // Let some writes replicate, then kill node 3 while the others keep writing.
        wait_for("writes to reach node3", Duration::from_secs(30), || {
            count_ids(
                victim,
                &written.lock().map(|w| w.clone()).unwrap_or_default(),
            ) > 50
        });
        victim.kill9();
        let before = written.lock().map(|w| w.len()).unwrap_or(0);
        wait_for(
            "more writes while node3 is down",
            Duration::from_secs(30),
            || written.lock().map(|w| w.len()).unwrap_or(0) > before + 200,
        );
        victim.start();
        let restarted = written.lock().map(|w| w.len()).unwrap_or(0);
        wait_for("writes after the restart", Duration::from_secs(30), || {
            written.lock().map(|w| w.len()).unwrap_or(0) > restarted + 100
        });
        stop.store(true, Ordering::Relaxed);
    });
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(60));
    let ids = written.lock().map(|w| w.clone()).unwrap_or_default();
    assert_eq!(
        count_ids(&nodes[2], &ids),
        ids.len(),
        "no write lost on the restarted node"
    );
    // Each burst of 5 also upserts the shared ids 1..=5.
    assert_eq!(d.rows.len(), ids.len() + 5);
}

#[test]
fn a_late_empty_node_catches_up() {
    let mut nodes = cluster(2);
    let ids = write_burst(&nodes[0], 100, 300, "a");
    let ids2 = write_burst(&nodes[1], 10_000, 300, "b");
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(60));
    let mut late = Node::new("node3", &[nodes[1].gossip]);
    late.start();
    nodes.push(late);
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert_eq!(d.rows.len(), ids.len() + ids2.len() + 20);
}

/// What a node holds of every origin (`patina_origin_held`), canonical.
fn held(node: &Node) -> Vec<(String, i64, i64)> {
    node.conn()
        .prepare("SELECT hex(site_id), start, \"end\" FROM patina_origin_held ORDER BY 1, 2")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .expect("read patina_origin_held")
}

fn wait_same_held(nodes: &[&Node]) {
    wait_for(
        "every node to hold the same versions",
        Duration::from_secs(30),
        || {
            let all: Vec<_> = nodes.iter().map(|n| held(n)).collect();
            all.windows(2).all(|w| w[0] == w[1])
        },
    );
}

/// A node that holds nothing copies one peer's snapshot — rows, clocks (deletes and a
/// resurrection among them), what that peer held per origin — instead of merging its
/// feed, and then replicates like any other: every replica identical, clocks and
/// per-origin knowledge included, after new writes everywhere and after a restart.
#[test]
fn an_empty_node_is_seeded_from_a_snapshot_then_replicates_like_any_other() {
    let mut nodes = cluster(3);
    write_burst(&nodes[0], 100, 150, "a");
    write_burst(&nodes[1], 10_000, 150, "b");
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(60));
    {
        let c = nodes[2].conn();
        c.execute("DELETE FROM items WHERE id BETWEEN 100 AND 139", [])
            .expect("delete");
        c.execute("DELETE FROM items WHERE id = 10000", [])
            .expect("delete");
        c.execute(
            "INSERT INTO items (id, node, val) VALUES (10000, 'again', 1)",
            [],
        )
        .expect("resurrect");
    }
    let out = python_writer(&nodes[2].db, 50_000, 40);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(60));

    let mut late = Node::new("late", &[nodes[1].gossip]);
    late.start();
    nodes.push(late);
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert_eq!(
        d.rows.len(),
        150 - 40 + 150 + 40 + 20,
        "every live row, none deleted"
    );
    // (The log is written by a background thread: it may lag a little.)
    wait_for(
        "the late node to log its seeding",
        Duration::from_secs(10),
        || nodes[3].log_text().contains("seeded from a snapshot"),
    );
    wait_same_held(&refs);

    // Afterwards it writes, deletes and receives like any member.
    write_burst(&nodes[3], 70_000, 40, "late");
    write_burst(&nodes[0], 80_000, 40, "a2");
    nodes[3]
        .conn()
        .execute("DELETE FROM items WHERE id BETWEEN 140 AND 149", [])
        .expect("delete on the seeded node");
    // (Rows 140..=149 came with the snapshot: the delete removes 10 rows.)
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert_eq!(d.rows.len(), 150 - 50 + 150 + 40 + 20 + 80);
    wait_same_held(&refs);
    nodes[3].kill9();
    write_burst(&nodes[1], 90_000, 20, "b2");
    nodes[3].start();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(60));
    wait_same_held(&refs);
}

/// With snapshots off (and for a node that wrote before it first started: not empty),
/// a late node catches up from feeds alone, to the same state.
#[test]
fn a_late_node_catches_up_from_feeds_when_it_cannot_be_seeded() {
    let mut nodes = cluster(2);
    write_burst(&nodes[0], 100, 200, "a");
    write_burst(&nodes[1], 10_000, 200, "b");
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(60));
    let mut off = Node::new("off", &[nodes[1].gossip]);
    off.extra = vec!["--sync-seed-from-snapshot".into(), "false".into()];
    off.start();
    nodes.push(off);
    // This one's app wrote before its node first started.
    // (Started alone first, so that its tables and triggers exist.)
    let mut wrote = Node::new("wrote", &[]);
    wrote.start();
    wrote.kill9();
    let out = python_writer(&wrote.db, 60_000, 5);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wrote.bootstrap = vec![nodes[0].gossip];
    wrote.start();
    nodes.push(wrote);
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert_eq!(d.rows.len(), 400 + 5 + 20);
    wait_same_held(&refs);
    for n in &nodes[2..] {
        assert!(
            !n.log_text().contains("seeded from a snapshot"),
            "{} was not to be seeded",
            n.name
        );
    }
}

#[test]
fn a_large_transaction_replicates_atomically() {
    const ROWS: i64 = 50_000;
    // Announced and pulled in chunks (empty nodes would copy a snapshot instead).
    let nodes = cluster_without_seeding(3);
    let partial = Arc::new(AtomicI64::new(-1));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = nodes[1..]
        .iter()
        .map(|node| {
            let db = node.db.clone();
            let (partial, done) = (partial.clone(), done.clone());
            std::thread::spawn(move || {
                // A plain connection (the app that loads nothing) reading as apps do.
                let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .expect("reader");
                conn.busy_timeout(Duration::from_secs(5))
                    .expect("busy timeout");
                let mut seen_full = false;
                while !done.load(Ordering::Relaxed) || !seen_full {
                    let n: i64 = conn
                        .query_row("SELECT count(*) FROM items WHERE note = 'bulk'", [], |r| {
                            r.get(0)
                        })
                        .unwrap_or(0);
                    if n > 0 && n < ROWS {
                        partial.store(n, Ordering::Relaxed);
                    }
                    seen_full |= n == ROWS;
                    if done.load(Ordering::Relaxed) && !seen_full {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    let mut conn = nodes[0].conn();
    let tx = conn.transaction().expect("begin");
    {
        let mut stmt = tx
            .prepare("INSERT INTO items (id, node, val, note) VALUES (?1, 'bulk', ?1, 'bulk')")
            .expect("prepare");
        for i in 0..ROWS {
            stmt.execute([i + 1_000]).expect("insert");
        }
    }
    tx.commit().expect("commit 50k rows");
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(180));
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader thread");
    }
    assert_eq!(d.rows.len() as i64, ROWS);
    assert_eq!(
        partial.load(Ordering::Relaxed),
        -1,
        "a reader saw part of the transaction"
    );
}

#[test]
fn a_copied_database_is_refused_loudly() {
    let nodes = cluster(3);
    write_burst(&nodes[0], 100, 50, "a");
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(60));
    // A site id is bound to the first identity that presents it (README, "Protection"),
    // so the guarantee below holds for nodes that heard node 1 itself before the copy
    // appeared. A node seeded from a snapshot converges before it has, and these nodes
    // run without TLS, whose address bindings a snapshot does not carry (under mutual
    // TLS it does: `a_seeded_node_refuses_a_copy_it_meets_before_the_original`): wait
    // until each node has bound both others.
    wait_for(
        "every node to bind the other nodes' site ids",
        Duration::from_secs(30),
        || {
            nodes.iter().all(|n| {
                n.conn()
                    .query_row("SELECT count(*) FROM patina_site_bindings", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .is_ok_and(|c| c >= 2)
            })
        },
    );
    // Node 4 starts from a consistent copy of node 1's file: same site id.
    let mut copy = Node::new("copy", &[nodes[1].gossip]);
    nodes[0]
        .conn()
        .execute("VACUUM INTO ?1", [copy.db.display().to_string()])
        .expect("copy node1's database");
    copy.start();
    // Whoever meets the copy first says so: node 1 (its own id from a peer), the copy
    // (likewise), or another node (one id at two addresses).
    let refused = |n: &Node| {
        n.log_text()
            .contains("two nodes share one database identity")
    };
    let any_refused = |copy: &Node| refused(copy) || nodes.iter().any(&refused);
    wait_for(
        "the copied identity to be refused",
        Duration::from_secs(30),
        || any_refused(&copy),
    );
    // Writes on the copy stay out; writes elsewhere keep flowing.
    copy.conn()
        .execute(
            "INSERT INTO items (id, node, note) VALUES (777777, 'copy', 'copy')",
            [],
        )
        .expect("write on the copy");
    write_burst(&nodes[1], 20_000, 50, "b");
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert_eq!(d.rows.len(), 50 + 50 + 20);
    assert!(
        !d.rows.iter().any(|r| r.starts_with("777777|")),
        "the copy's write leaked"
    );
    // Give the copy time to try: the others still agree and never saw its write.
    std::thread::sleep(Duration::from_secs(3));
    let d2 = wait_converged(&refs, Duration::from_secs(30));
    assert_eq!(d, d2);
    assert!(any_refused(&copy));
}

#[test]
fn a_node_killed_mid_catch_up_applies_the_unit_whole_after_restart() {
    const ROWS: i64 = 20_000;
    // Pulled in chunks through the inbox (an empty node would copy a snapshot instead).
    let mut nodes = cluster_without_seeding(2);
    {
        let mut conn = nodes[0].conn();
        let tx = conn.transaction().expect("begin");
        {
            let mut stmt = tx
                .prepare("INSERT INTO items (id, node, val, note) VALUES (?1, 'big', ?1, 'bulk')")
                .expect("prepare");
            for i in 0..ROWS {
                stmt.execute([i + 1_000]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    // Kill node 2 while chunks of the unit sit in its durable inbox.
    let db = nodes[1].db.clone();
    let inbox = move || -> i64 {
        Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("SELECT count(*) FROM patina_sync_inbox", [], |r| r.get(0)))
            .unwrap_or(0)
    };
    wait_for("chunks in node2's inbox", Duration::from_secs(60), || {
        inbox() > 0
    });
    nodes[1].kill9();
    let bulk = |n: &Node| -> i64 {
        Connection::open_with_flags(&n.db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM items WHERE note = 'bulk'", [], |r| {
                    r.get(0)
                })
            })
            .unwrap_or(-1)
    };
    let after_kill = bulk(&nodes[1]);
    assert!(
        after_kill == 0 || after_kill == ROWS,
        "part of the unit visible: {after_kill}"
    );
    nodes[1].start();
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(120));
    assert_eq!(d.rows.len() as i64, ROWS);
}

#[test]
fn sigterm_stops_cleanly_with_exit_0() {
    let mut nodes = cluster(2);
    write_burst(&nodes[0], 100, 20, "a");
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(30));
    let mut child = nodes[1].child.take().expect("running");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    let log = nodes[1].log_text();
    assert!(
        log.contains("left the cluster") || log.contains("stopped"),
        "{log}"
    );
    // Restarted, it carries on where it stopped.
    nodes[1].start();
    write_burst(&nodes[0], 1_000, 20, "b");
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(30));
    assert_eq!(d.rows.len(), 40 + 20);
}

#[test]
fn changes_for_a_table_this_node_lacks_wait_whole_then_apply_after_migration() {
    let extra = "CREATE TABLE IF NOT EXISTS extra (id INTEGER PRIMARY KEY NOT NULL, v TEXT);";
    let mut a = Node::with_schema("node1", &[], &format!("{SCHEMA}{extra}"));
    a.start();
    let mut b = Node::with_schema("node2", &[a.gossip], SCHEMA);
    b.start();
    write_burst(&a, 100, 5, "a");
    wait_for("the first rows on node2", Duration::from_secs(30), || {
        count_ids(&b, &[100, 104]) == 2
    });
    // Each node counts itself: two healthy nodes satisfy min_members=2, not 3.
    wait_for(
        "node1 to see 2 members alive",
        Duration::from_secs(30),
        || health(&a, "?min_members=2").0 == 200,
    );
    assert_eq!(health(&a, "?min_members=3").0, 503);
    // One transaction touching both tables: node2 keeps all of it in its schema buffer
    // (never half a unit), and says so.
    {
        let mut conn = a.conn();
        let tx = conn.transaction().expect("begin");
        tx.execute("INSERT INTO items (id, node) VALUES (500, 'mixed')", [])
            .expect("items row");
        tx.execute("INSERT INTO extra (id, v) VALUES (1, 'x')", [])
            .expect("extra row");
        tx.commit().expect("commit");
    }
    wait_for("node2 to buffer the unit", Duration::from_secs(30), || {
        metric(&b, "patina_schema_buffered_units") == 1
    });
    assert!(
        b.log_text().contains("names table extra"),
        "the buffering is logged"
    );
    assert_eq!(count_ids(&b, &[500]), 0, "half of a unit was applied");
    // Later writes to the tables node2 has keep arriving meanwhile.
    write_burst(&a, 600, 3, "a");
    wait_for("later rows on node2", Duration::from_secs(30), || {
        count_ids(&b, &[600, 602]) == 2
    });
    // Waiting for a migration is not a failure of the node; a health check that gives
    // max_buffered_age says when a unit has waited too long, by name.
    assert_eq!(health(&b, "").0, 200);
    assert_eq!(metric(&b, "patina_loop_failures_total{loop=\"apply\"}"), 0);
    wait_for(
        "node2's health to turn 503 past max_buffered_age",
        Duration::from_secs(30),
        || {
            let (status, body) = health(&b, "?max_buffered_age=0");
            status == 503 && body.contains("schema buffer") && body.contains("table extra")
        },
    );
    assert_eq!(health(&a, "").0, 200, "node1 has nothing wrong");
    // Migrate node2 (schema file + restart applies it): the unit now goes through.
    std::fs::write(&b.schema, format!("{SCHEMA}{extra}")).expect("schema");
    b.kill9();
    b.start();
    let d = wait_converged(&[&a, &b], Duration::from_secs(60));
    assert!(d.rows.iter().any(|r| r.starts_with("500|")));
    assert!(d.changes.iter().any(|c| c.starts_with("extra|")));
    wait_for("node2's buffer to empty", Duration::from_secs(30), || {
        metric(&b, "patina_schema_buffered_units") == 0
            && health(&b, "?max_buffered_age=0").0 == 200
    });
}

/// `GET /v1/health` with `query`: (status, body).
fn health(node: &Node, query: &str) -> (u16, String) {
    match ureq::get(&format!("http://{}/v1/health{query}", node.api)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[test]
fn a_column_added_by_an_app_that_loads_nothing_is_adopted_and_replicates() {
    let nodes = cluster(2);
    write_burst(&nodes[0], 100, 3, "a");
    wait_for("the first rows on node2", Duration::from_secs(30), || {
        count_ids(&nodes[1], &[100, 102]) == 2
    });
    // The app alters both files with plain sqlite3: no crsql_begin/commit_alter, so the
    // triggers still describe the old columns until the node notices schema_version move.
    for n in &nodes {
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!(
                "import sqlite3\nc = sqlite3.connect({:?}, timeout=30)\nc.execute(\"ALTER TABLE items ADD COLUMN color TEXT DEFAULT 'none'\")\nc.commit()\n",
                n.db.display().to_string()
            ))
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for n in &nodes {
        wait_for(
            "the node to regenerate triggers",
            Duration::from_secs(30),
            || n.log_text().contains("altered without crsql_begin_alter"),
        );
    }
    nodes[0]
        .conn()
        .execute("UPDATE items SET color = 'red' WHERE id = 101", [])
        .expect("update new column");
    wait_for(
        "the new column's value on node2",
        Duration::from_secs(30),
        || {
            nodes[1]
                .conn()
                .query_row("SELECT color FROM items WHERE id = 101", [], |r| {
                    r.get::<_, String>(0)
                })
                .map(|c| c == "red")
                .unwrap_or(false)
        },
    );
    // No change per existing row was emitted for the added column.
    let colors: i64 = nodes[0]
        .conn()
        .query_row(
            "SELECT count(*) FROM crsql_changes WHERE cid = 'color'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(colors, 1);
}

/// `patina tls <kind> generate` into `dir`, as an operator would run it.
fn tls_generate(dir: &Path, kind: &str, name: &str) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patina"));
    cmd.args(["tls", kind, "generate", "--out-dir"]).arg(dir);
    if kind != "ca" {
        cmd.args(["--name", name, "--ca-cert"])
            .arg(dir.join("ca.pem"))
            .arg("--ca-key")
            .arg(dir.join("ca.key"));
    }
    let out = cmd.output().expect("patina tls generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_flags(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "--gossip-tls-ca-file".into(),
        dir.join("ca.pem").display().to_string(),
        "--gossip-tls-cert-file".into(),
        dir.join(format!("{name}.pem")).display().to_string(),
        "--gossip-tls-key-file".into(),
        dir.join(format!("{name}.key")).display().to_string(),
    ]
}

#[test]
fn mutual_tls_replicates_and_a_peer_from_another_ca_is_refused() {
    let cluster_ca = tempfile::tempdir().expect("tempdir");
    let other_ca = tempfile::tempdir().expect("tempdir");
    tls_generate(cluster_ca.path(), "ca", "ca");
    for name in ["node1", "node2"] {
        tls_generate(cluster_ca.path(), "server", name);
    }
    tls_generate(other_ca.path(), "ca", "ca");
    tls_generate(other_ca.path(), "server", "node3");

    let mut a = Node::new("node1", &[]);
    a.extra = tls_flags(cluster_ca.path(), "node1");
    a.start();
    let mut b = Node::new("node2", &[a.gossip]);
    b.extra = tls_flags(cluster_ca.path(), "node2");
    b.start();
    let mut stranger = Node::new("node3", &[a.gossip]);
    stranger.extra = tls_flags(other_ca.path(), "node3");
    stranger.start();

    write_burst(&a, 100, 10, "a");
    let d = wait_converged(&[&a, &b], Duration::from_secs(60));
    assert!(d.rows.len() >= 10);
    // The stranger keeps running but learns nothing, and the cluster says why.
    let stranger_addr = stranger.gossip.to_string();
    wait_for(
        "the refusal in node1's log",
        Duration::from_secs(30),
        || {
            a.log_text().lines().any(|l| {
                l.contains(&stranger_addr) && l.contains("refused") && l.contains("UnknownIssuer")
            })
        },
    );
    assert_eq!(
        count_ids(&stranger, &(100..110).collect::<Vec<_>>()),
        0,
        "a peer from another CA got rows"
    );
    assert!(
        !a.log_text().contains("UNAUTHENTICATED"),
        "a node with TLS files must not run unauthenticated"
    );
    // Under mutual TLS node1's site id is bound to its certificate, not its address.
    let site_a: Vec<u8> = a
        .conn()
        .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .expect("site id");
    let bound: String = b
        .conn()
        .query_row(
            "SELECT identity FROM patina_site_bindings WHERE site_id = ?1",
            [&site_a],
            |r| r.get(0),
        )
        .expect("node2 bound node1's site id");
    assert!(
        bound.starts_with("certificate sha256:") && bound.len() == "certificate sha256:".len() + 64,
        "{bound}"
    );
}

/// A node seeded from a snapshot takes the sender's certificate bindings, so a copy of
/// some node's database that it meets before that node itself is still refused (README,
/// "Protection"). Node 3 joins through node 2 while node 1 is down: it never hears node 1,
/// yet refuses the copy of node 1's file running under another certificate.
#[test]
fn a_seeded_node_refuses_a_copy_it_meets_before_the_original() {
    let ca = tempfile::tempdir().expect("tempdir");
    tls_generate(ca.path(), "ca", "ca");
    for name in ["node1", "node2", "node3", "copy"] {
        tls_generate(ca.path(), "server", name);
    }
    let mut a = Node::new("node1", &[]);
    a.extra = tls_flags(ca.path(), "node1");
    a.start();
    let mut b = Node::new("node2", &[a.gossip]);
    b.extra = tls_flags(ca.path(), "node2");
    b.start();
    write_burst(&a, 100, 20, "a");
    wait_converged(&[&a, &b], Duration::from_secs(60));
    let site_a: Vec<u8> = a
        .conn()
        .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .expect("site id");
    let binding = |n: &Node| -> Option<String> {
        n.conn()
            .query_row(
                "SELECT identity FROM patina_site_bindings WHERE site_id = ?1",
                [&site_a],
                |r| r.get(0),
            )
            .ok()
    };
    wait_for(
        "node2 to bind node1's site id",
        Duration::from_secs(30),
        || binding(&b).is_some(),
    );
    let node1_cert = binding(&b).expect("bound");
    assert!(
        node1_cert.starts_with("certificate sha256:"),
        "{node1_cert}"
    );

    // Node 1 goes down; a consistent copy of its file will come up under another certificate.
    let mut copy = Node::new("copy", &[]);
    a.conn()
        .execute("VACUUM INTO ?1", [copy.db.display().to_string()])
        .expect("copy node1's database");
    a.kill9();

    // Node 3 joins through node 2 alone and is seeded from its snapshot.
    let mut c = Node::new("node3", &[b.gossip]);
    c.extra = tls_flags(ca.path(), "node3");
    c.start();
    wait_converged(&[&b, &c], Duration::from_secs(60));
    assert!(
        c.log_text().contains("seeded from a snapshot"),
        "node 3 was to be seeded from node 2's snapshot"
    );
    assert_eq!(
        binding(&c).as_deref(),
        Some(node1_cert.as_str()),
        "node 3 holds node 2's binding of node 1's site id without having heard node 1"
    );

    // The copy meets node 3 first: refused, and its write reaches no one.
    copy.bootstrap = vec![c.gossip];
    copy.extra = tls_flags(ca.path(), "copy");
    copy.start();
    wait_for("node 3 to refuse the copy", Duration::from_secs(60), || {
        c.log_text()
            .contains("two nodes share one database identity")
    });
    copy.conn()
        .execute(
            "INSERT INTO items (id, node, note) VALUES (777777, 'copy', 'copy')",
            [],
        )
        .expect("write on the copy");
    write_burst(&b, 20_000, 5, "b");
    wait_converged(&[&b, &c], Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    for n in [&b, &c] {
        assert_eq!(
            count_ids(n, &[777777]),
            0,
            "the copy's write leaked to {}",
            n.name
        );
    }
    assert_eq!(binding(&c).as_deref(), Some(node1_cert.as_str()));
}

/// Commit→visible latency on 3 local nodes: 200 single-row writes on node 1's file,
/// 20 ms apart, polled every 2 ms on nodes 2 and 3. Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn latency_probe() {
    let nodes = cluster(3);
    // Let membership settle so pushes reach everyone.
    write_burst(&nodes[0], 1, 1, "warm");
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, Duration::from_secs(30));
    const N: usize = 200;
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let mut lat = Vec::new();
    std::thread::scope(|s| {
        let pollers: Vec<_> = nodes[1..]
            .iter()
            .map(|node| {
                let sent = sent.clone();
                s.spawn(move || {
                    let conn =
                        Connection::open_with_flags(&node.db, OpenFlags::SQLITE_OPEN_READ_ONLY)
                            .expect("reader");
                    let mut seen = 0usize;
                    let mut out = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while seen < N && Instant::now() < deadline {
                        let n: i64 = conn
                            .query_row("SELECT count(*) FROM items WHERE note = 'probe'", [], |r| {
                                r.get(0)
                            })
                            .unwrap_or(0);
                        let now = Instant::now();
                        let times = sent.lock().map(|v| v.clone()).unwrap_or_default();
                        while seen < (n as usize).min(times.len()) {
                            out.push(now.duration_since(times[seen]).as_secs_f64() * 1000.0);
                            seen += 1;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    out
                })
            })
            .collect();
        // PATINA_PROBE_API=1 writes through node 1's `/v1/transactions` (the API pokes the
        // tailer); otherwise straight into its file (noticed by the data_version poll).
        let via_api = std::env::var("PATINA_PROBE_API").is_ok();
        let conn = nodes[0].conn();
        let url = format!("http://{}/v1/transactions", nodes[0].api);
        for i in 0..N {
            let id = 100_000 + i as i64;
            if via_api {
                let body = serde_json::json!([[
                    "INSERT INTO items (id, node, note) VALUES (?, 'probe', 'probe')",
                    [id]
                ]]);
                ureq::post(&url)
                    .send_json(body)
                    .expect("probe write via the API");
            } else {
                conn.execute(
                    "INSERT INTO items (id, node, note) VALUES (?1, 'probe', 'probe')",
                    [id],
                )
                .expect("probe write");
            }
            if let Ok(mut v) = sent.lock() {
                v.push(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in pollers {
            lat.extend(p.join().expect("poller"));
        }
    });
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    eprintln!(
        "commit→visible over {} observations: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
    for n in &nodes {
        if let Some(c) = &n.child {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", c.id())).unwrap_or_default();
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS"))
                .unwrap_or("VmRSS: ?");
            eprintln!("{}: {rss}", n.name);
        }
    }
    if let Ok(dir) = std::env::var("PATINA_PROBE_LOGS") {
        for n in &nodes {
            let _ = std::fs::copy(&n.log, Path::new(&dir).join(format!("{}.log", n.name)));
        }
    }
    assert_eq!(lat.len(), 2 * N);
}
