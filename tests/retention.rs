//! Bounded metadata with real `patina agent` processes: tombstones collected once every
//! member holds the delete, their space reused; a node away longer than the retention is
//! re-seeded instead of bringing deleted rows back; a node that was forgotten comes back
//! with a fresh site id. Convergence is checked on canonical dumps (rows and clocks).
//!
//! Needs the extension built beside the binary: `cargo build -p patina` first.

use std::time::{Duration, Instant};

mod cluster;
mod common;

use cluster::*;
use rusqlite::Connection;

/// Clock rows of `items` (the patina metadata per row).
fn clock_rows(node: &Node) -> i64 {
    node.conn()
        .query_row("SELECT count(*) FROM items__patina_clock", [], |r| r.get(0))
        .expect("count clock rows")
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect(sql)
}

fn site_hex(node: &Node) -> String {
    node.conn()
        .query_row("SELECT hex(crsql_site_id())", [], |r| r.get(0))
        .expect("site id")
}

/// Inserts ids `from..from+n` in one transaction on `node`'s file.
fn insert_rows(node: &Node, from: i64, n: i64) {
    let mut conn = node.conn();
    let tx = conn.transaction().expect("begin");
    {
        let mut s = tx
            .prepare("INSERT INTO items (id, node, val, note) VALUES (?1, 'churn', ?1, 'row')")
            .expect("prepare");
        for id in from..from + n {
            s.execute([id]).expect("insert");
        }
    }
    tx.commit().expect("commit");
}

#[test]
fn churned_rows_leave_almost_no_metadata_and_their_pages_are_reused() {
    const N: i64 = 100_000;
    let nodes = cluster(2);
    insert_rows(&nodes[0], 1, N);
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(120));
    assert_eq!(d.rows.len() as i64, N);
    let peak = clock_rows(&nodes[0]);
    assert_eq!(peak, N, "one clock row per row at the peak");
    nodes[0]
        .conn()
        .execute("DELETE FROM items", [])
        .expect("delete everything");
    // Within two minutes, both nodes keep at most 1% of the peak's metadata.
    let started = Instant::now();
    wait_for(
        "the tombstones to be collected on both nodes",
        Duration::from_secs(120),
        || nodes.iter().all(|n| clock_rows(n) <= peak / 100),
    );
    eprintln!(
        "tombstones collected on both nodes {:.1} s after the delete",
        started.elapsed().as_secs_f64()
    );
    for n in &nodes {
        let c = n.conn();
        assert_eq!(count(&c, "SELECT count(*) FROM items"), 0);
        assert_eq!(
            count(&c, "SELECT count(*) FROM crsql_changes"),
            clock_rows(n),
            "the feed carries no collected delete"
        );
        assert!(
            count(&c, "SELECT cl_floor FROM patina_state") >= 2,
            "{}: new rows start above the collected tombstones",
            n.name
        );
        // Counted when the driver takes the collection's report, just after its commit.
        wait_for(
            &format!("{}: collected tombstones counted in /metrics", n.name),
            Duration::from_secs(30),
            || metric(n, "patina_tombstones_collected_total") >= (N - peak / 100) as u64,
        );
    }
    // The freed pages are reused: the same number of rows again, written as ordinary
    // transactions of 1,000 rows (units small enough to broadcast), does not grow the
    // file on either node.
    let pages = |n: &Node| count(&n.conn(), "PRAGMA page_count");
    let before: Vec<i64> = nodes.iter().map(pages).collect();
    for k in 0..N / 1000 {
        insert_rows(&nodes[1], N + 1 + k * 1000, 1000);
    }
    let d = wait_converged(&refs, Duration::from_secs(120));
    assert_eq!(d.rows.len() as i64, N);
    for (n, b) in nodes.iter().zip(&before) {
        let after = pages(n);
        let c = n.conn();
        let tables: Vec<String> = c
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
            .and_then(|mut st| st.query_map([], |r| r.get::<_, String>(0))?.collect())
            .unwrap_or_default();
        let sizes: Vec<String> = tables
            .iter()
            .map(|t| {
                format!(
                    "{t}: {}",
                    count(&c, &format!("SELECT count(*) FROM \"{t}\""))
                )
            })
            .collect();
        // The live rows fit in the pages the first generation used. A node that fell
        // behind meanwhile buffers a catch-up whole before applying it (`db::inbox`), so
        // its file may grow by that; the origin's may not.
        let free = count(&c, "PRAGMA freelist_count");
        eprintln!("{}: {b} pages before, {after} after ({free} free)", n.name);
        assert!(
            after - free <= b + b / 4,
            "{}: {after} pages ({free} free) after re-inserting {N} rows, {b} before: the \
             freed pages were not reused (rows {sizes:?})",
            n.name,
        );
        if n.name == "node2" {
            assert!(
                after <= b + b / 20,
                "node2 wrote the rows: its file must not grow"
            );
        }
    }
    // A row re-inserted with a key whose tombstone was collected replicates.
    nodes[0]
        .conn()
        .execute("INSERT INTO items (id, node) VALUES (5, 'again')", [])
        .expect("re-insert a collected key");
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert!(d.rows.iter().any(|r| r.starts_with("5|'again'")));
}

#[test]
fn a_node_away_longer_than_the_retention_is_reseeded_and_resurrects_nothing() {
    let retention = ["--sync-tombstone-retention", "6s"].map(String::from);
    let mut nodes = vec![Node::new("node1", &[])];
    let first = nodes[0].gossip;
    nodes.push(Node::new("node2", &[first]));
    nodes.push(Node::new("node3", &[first]));
    for n in nodes.iter_mut() {
        n.extra.extend(retention.iter().cloned());
        n.start();
    }
    insert_rows(&nodes[0], 1, 100);
    {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_converged(&refs, Duration::from_secs(60));
    }
    let old_site = site_hex(&nodes[2]);
    nodes[2].kill9();
    nodes[0]
        .conn()
        .execute("DELETE FROM items WHERE id <= 50", [])
        .expect("delete half");
    // node3 is down, so the deletes are never stable: only the retention collects them.
    wait_for(
        "the retention to collect the deletes on node1 and node2",
        Duration::from_secs(90),
        || clock_rows(&nodes[0]) == 50 && clock_rows(&nodes[1]) == 50,
    );
    // A retention of hours outlives the units peers keep in memory (2 minutes); here the
    // peers restart instead, so the deletes exist nowhere any more.
    nodes[0].kill9();
    nodes[1].kill9();
    nodes[0].start();
    nodes[1].start();
    // While away, an app writes to node3's file without patina: an update of a row the
    // others deleted and forgot, and a new row.
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3\nc = sqlite3.connect({:?})\n\
             c.execute(\"UPDATE items SET note = 'offline' WHERE id = 10\")\n\
             c.execute(\"INSERT INTO items (id, node, note) VALUES (1000, 'n3', 'offline')\")\n\
             c.commit()\n",
            nodes[2].db.display().to_string()
        ))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nodes[2].start();
    wait_for(
        "node3 to re-seed and run again",
        Duration::from_secs(60),
        || nodes[2].log_text().matches("patina node running").count() >= 3,
    );
    let log = nodes[2].log_text();
    assert!(
        log.contains("away longer than sync.tombstone_retention"),
        "node3 says why it re-seeds:\n{log}"
    );
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(90));
    assert_eq!(d.rows.len(), 50, "rows 51..=100 only: nothing came back");
    assert!(
        d.rows.iter().all(|r| !r.starts_with("10|")),
        "row 10 stays deleted"
    );
    assert_ne!(site_hex(&nodes[2]), old_site, "a fresh site id");
    // What node3 wrote while away is set aside, not lost.
    let dir = nodes[2].db.parent().expect("dir").to_path_buf();
    let copy = std::fs::read_dir(&dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("before-reseed-"))
        .expect("the database is set aside before the re-seed");
    let kept = Connection::open(&copy).expect("open the copy");
    assert_eq!(
        count(
            &kept,
            "SELECT count(*) FROM items WHERE id = 1000 AND note = 'offline'"
        ),
        1
    );
}

#[test]
fn a_forgotten_node_returns_with_a_fresh_site_id_and_converges() {
    let knobs = [
        "--sync-tombstone-retention",
        "3s",
        "--sync-forget-after",
        "6s",
    ]
    .map(String::from);
    let mut nodes = vec![Node::new("node1", &[])];
    let first = nodes[0].gossip;
    nodes.push(Node::new("node2", &[first]));
    for n in nodes.iter_mut() {
        n.extra.extend(knobs.iter().cloned());
        n.start();
    }
    insert_rows(&nodes[1], 1, 20);
    {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_converged(&refs, Duration::from_secs(60));
    }
    let old_site = site_hex(&nodes[1]);
    // The premise: node2 knows it had a live peer (stored at its first contact). A joiner
    // seeded from a snapshot converges within a second, possibly before that write.
    wait_for(
        "node2 to record its first contact",
        Duration::from_secs(30),
        || {
            count(
                &nodes[1].conn(),
                "SELECT count(*) FROM patina_node_flags WHERE key = 'last_contact'",
            ) == 1
        },
    );
    nodes[1].kill9();
    // node1 forgets node2: its cursor, ranges and membership rows go.
    let old = old_site.clone();
    wait_for("node1 to forget node2", Duration::from_secs(60), || {
        let c = nodes[0].conn();
        let q = |table: &str, col: &str| {
            count(
                &c,
                &format!("SELECT count(*) FROM {table} WHERE hex({col}) = '{old}'"),
            )
        };
        q("patina_site_seen", "site_id") == 0
            && q("patina_site_bindings", "site_id") == 0
            && q("patina_origin_ranges", "site_id") == 0
            && metric(&nodes[0], "patina_members_forgotten_total") >= 1
    });
    insert_rows(&nodes[0], 100, 5);
    nodes[1].start();
    wait_for(
        "node2 to re-seed and run again",
        Duration::from_secs(60),
        || nodes[1].log_text().matches("patina node running").count() >= 3,
    );
    assert!(nodes[1]
        .log_text()
        .contains("longer than sync.forget_after"));
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert_eq!(
        d.rows.len(),
        25,
        "node2's rows came back from node1, and node1's new ones"
    );
    assert_ne!(site_hex(&nodes[1]), old_site, "a fresh site id");
}

#[test]
fn patina_reseed_empties_a_stopped_node_which_then_fills_up_from_its_peer() {
    let mut nodes = cluster(2);
    insert_rows(&nodes[0], 1, 30);
    {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_converged(&refs, Duration::from_secs(60));
    }
    let old_site = site_hex(&nodes[1]);
    nodes[1].kill9();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patina"))
        .arg("reseed")
        .arg("--db-path")
        .arg(&nodes[1].db)
        .arg("--db-extension-path")
        .arg(ext())
        .arg("--api")
        .arg(nodes[1].api.to_string())
        .output()
        .expect("run patina reseed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("fresh site id"), "{said}");
    assert_eq!(count(&nodes[1].conn(), "SELECT count(*) FROM items"), 0);
    assert_ne!(site_hex(&nodes[1]), old_site);
    nodes[1].start();
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = wait_converged(&refs, Duration::from_secs(60));
    assert_eq!(d.rows.len(), 30);
}
