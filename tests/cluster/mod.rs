//! Fixtures of the cross-process replication tests (`replication`, `hardening`): real
//! `patina agent` processes on 127.0.0.1, each in its own temporary directory, and
//! canonical dumps to compare replicas.
#![allow(dead_code)] // each test crate uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{free_tcp, free_udp};
use patina_sidecar::config::Synchronous;
use rusqlite::Connection;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    id   INTEGER PRIMARY KEY NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    val  INTEGER,
    note TEXT
);
";

pub fn ext() -> PathBuf {
    patina_sidecar::db::extension_path(None)
        .expect("libpatina.so beside the test binary: run `cargo build -p patina` first")
}

/// One node: its directory, addresses and (while running) its process.
pub struct Node {
    pub name: String,
    pub _dir: tempfile::TempDir,
    pub db: PathBuf,
    pub schema: PathBuf,
    pub log: PathBuf,
    pub api: SocketAddr,
    pub gossip: SocketAddr,
    pub bootstrap: Vec<SocketAddr>,
    pub child: Option<Child>,
    pub starts: usize,
    /// Extra `patina agent` flags (TLS files, …).
    pub extra: Vec<String>,
    /// Extra environment variables (e.g. `PATINA_TEST_RELEASE_AHEAD`).
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn new(name: &str, bootstrap: &[SocketAddr]) -> Node {
        Node::with_schema(name, bootstrap, SCHEMA)
    }

    pub fn with_schema(name: &str, bootstrap: &[SocketAddr], sql: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = dir.path().join("schema.sql");
        std::fs::write(&schema, sql).expect("write schema");
        Node {
            name: name.to_string(),
            db: dir.path().join("node.db"),
            log: dir.path().join("node.log"),
            schema,
            _dir: dir,
            api: free_tcp(),
            gossip: free_udp(),
            bootstrap: bootstrap.to_vec(),
            child: None,
            starts: 0,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Starts the agent and waits until it says it runs.
    pub fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_patina"));
        cmd.arg("agent")
            .arg("--db-path")
            .arg(&self.db)
            .arg("--db-schema-paths")
            .arg(&self.schema)
            .arg("--db-extension-path")
            .arg(ext())
            .arg("--api-addr")
            .arg(self.api.to_string())
            .arg("--gossip-addr")
            .arg(self.gossip.to_string())
            .env(
                "RUST_LOG",
                std::env::var("PATINA_TEST_LOG")
                    .unwrap_or_else(|_| "info,patina_sidecar=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for b in &self.bootstrap {
            cmd.arg("--gossip-bootstrap").arg(b.to_string());
        }
        cmd.args(&self.extra);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(cmd.spawn().expect("spawn patina agent"));
        let want = self.starts;
        wait_for(
            &format!("{} to start", self.name),
            Duration::from_secs(30),
            || {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        panic!("{} exited early ({st}):\n{}", self.name, self.log_text());
                    }
                }
                self.log_text().matches("patina node running").count() >= want
            },
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A writer connection with the extension loaded.
    pub fn conn(&self) -> Connection {
        patina_sidecar::db::open(&self.db, &ext(), Synchronous::Normal).expect("open node db")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("---- last log lines of {} ----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes (then panics naming `what`).
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sets its flag when dropped — also while a failed assertion unwinds — so writer threads
/// inside a `std::thread::scope` stop and the scope can end (else a failing test hangs).
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Starts `n` nodes, each bootstrapping to the first.
pub fn cluster(n: usize) -> Vec<Node> {
    cluster_with(n, &[])
}

/// Starts `n` nodes that never seed from a snapshot: a node that holds nothing catches up
/// from feeds, for tests of the feed's own paths (large units pulled in chunks).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn cluster_without_seeding(n: usize) -> Vec<Node> {
    cluster_with(n, &["--sync-seed-from-snapshot", "false"])
}

fn cluster_with(n: usize, flags: &[&str]) -> Vec<Node> {
    let mut nodes = vec![Node::new("node1", &[])];
    let first = nodes[0].gossip;
    for i in 1..n {
        nodes.push(Node::new(&format!("node{}", i + 1), &[first]));
    }
    for node in nodes.iter_mut() {
        node.extra.extend(flags.iter().map(|f| f.to_string()));
        node.start();
    }
    nodes
}

#[derive(Debug, PartialEq, Clone)]
pub struct Dump {
    pub rows: Vec<String>,
    pub changes: Vec<String>,
}

/// The canonical dump of one node's replicated content.
pub fn dump(node: &Node) -> Dump {
    let conn = node.conn();
    let rows = conn
        .prepare("SELECT id, quote(node), quote(val), quote(note) FROM items ORDER BY id")
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok(format!(
                    "{}|{}|{}|{}",
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .expect("dump rows");
    let changes = conn
        .prepare(
            "SELECT \"table\", hex(pk), cid, quote(val), col_version, cl, hex(site_id) \
             FROM crsql_changes ORDER BY 1, 2, 3",
        )
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok(format!(
                    "{}|{}|{}|{}|{}|{}|{}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .expect("dump crsql_changes");
    Dump { rows, changes }
}

/// Waits until every node's dump is identical; returns it.
pub fn wait_converged(nodes: &[&Node], limit: Duration) -> Dump {
    let deadline = Instant::now() + limit;
    loop {
        let dumps: Vec<Dump> = nodes.iter().map(|n| dump(n)).collect();
        if dumps.windows(2).all(|w| w[0] == w[1]) {
            return dumps[0].clone();
        }
        if Instant::now() > deadline {
            for (n, d) in nodes.iter().zip(&dumps) {
                eprintln!(
                    "{}: {} rows, {} changes",
                    n.name,
                    d.rows.len(),
                    d.changes.len()
                );
            }
            let a = &dumps[0].rows;
            for (n, d) in nodes.iter().zip(&dumps).skip(1) {
                let missing: Vec<&String> =
                    a.iter().filter(|r| !d.rows.contains(r)).take(5).collect();
                let extra: Vec<&String> =
                    d.rows.iter().filter(|r| !a.contains(r)).take(5).collect();
                eprintln!(
                    "{} vs {}: missing {missing:?} extra {extra:?}",
                    nodes[0].name, n.name
                );
            }
            panic!("nodes did not converge within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `count` transactions on `node`'s file through its own connection: inserts of
/// ids from `base` plus updates of the shared ids 1..=20 (conflicts across nodes).
/// Returns the ids committed.
pub fn write_burst(node: &Node, base: i64, count: i64, tag: &str) -> Vec<i64> {
    let conn = node.conn();
    let mut done = Vec::new();
    for i in 0..count {
        let id = base + i;
        conn.execute(
            "INSERT INTO items (id, node, val, note) VALUES (?1, ?2, ?3, 'w')",
            rusqlite::params![id, tag, i],
        )
        .expect("insert");
        conn.execute(
            "INSERT INTO items (id, node, val) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET val = excluded.val, node = excluded.node",
            rusqlite::params![1 + (i % 20), tag, i],
        )
        .expect("upsert shared");
        done.push(id);
    }
    done
}

pub fn python_writer(db: &Path, base: i64, count: i64) -> std::process::Output {
    let script = format!(
        "import sqlite3\n\
         c = sqlite3.connect({db:?}, timeout=30)\n\
         for i in range({count}):\n\
         \x20   c.execute('INSERT INTO items (id, node, val, note) VALUES (?, ?, ?, ?)', ({base} + i, 'py', i, 'python'))\n\
         \x20   c.execute('UPDATE items SET note = ? WHERE id = ?', ('py%d' % i, 1 + i % 20))\n\
         \x20   c.commit()\n",
        db = db.display().to_string()
    );
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run /usr/bin/python3")
}

pub fn count_ids(node: &Node, ids: &[i64]) -> usize {
    let conn = node.conn();
    let mut stmt = conn
        .prepare("SELECT 1 FROM items WHERE id = ?1")
        .expect("prepare");
    ids.iter()
        .filter(|id| stmt.exists([**id]).unwrap_or(false))
        .count()
}

/// A counter from the node's `GET /metrics`.
pub fn metric(node: &Node, name: &str) -> u64 {
    let text = ureq::get(&format!("http://{}/metrics", node.api))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}
