//! The API against real `patina agent` processes: the seed's curl line on a node started
//! with the shipped `sql/schema/machines.sql`, bad inputs while the node keeps serving, and
//! a subscription on node B fed by writes on node A and by an extension-less python3
//! writer on B's file, resumed after a reconnect and after B restarts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{post_json, post_sql, send, wait_for, Stream, Url};
use crate::common::{free_tcp, free_udp};

/// The schema file the README tour and `patina demo` ship.
fn machines_schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sql/schema/machines.sql")
}

/// One `patina agent` process.
pub struct Agent {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub api: SocketAddr,
    pub gossip: SocketAddr,
    bootstrap: Vec<SocketAddr>,
    /// More flags for `patina agent` (set before `start`).
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl Url for Agent {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }
}

impl Agent {
    pub fn new(name: &str, bootstrap: &[SocketAddr]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        Agent {
            name: name.into(),
            db: dir.path().join("node.db"),
            dir,
            api: free_tcp(),
            gossip: free_udp(),
            bootstrap: bootstrap.to_vec(),
            extra: Vec::new(),
            child: None,
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// Starts the agent and waits until its API answers.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_patina"));
        cmd.arg("agent")
            .arg("--db-path")
            .arg(&self.db)
            .arg("--db-schema-paths")
            .arg(machines_schema())
            .arg("--db-extension-path")
            .arg(super::extension())
            .arg("--api-addr")
            .arg(self.api.to_string())
            .arg("--gossip-addr")
            .arg(self.gossip.to_string())
            .arg("--api-max-body")
            .arg("65536")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for b in &self.bootstrap {
            cmd.arg("--gossip-bootstrap").arg(b.to_string());
        }
        cmd.args(&self.extra);
        self.child = Some(cmd.spawn().expect("spawn patina agent"));
        let url = self.url("/v1/health");
        let name = self.name.clone();
        wait_for(&format!("{name}'s API"), || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("{name} exited early ({st}):\n{}", self.log_text());
                }
            }
            super::agent()
                .get(&url)
                .timeout(Duration::from_secs(2))
                .call()
                .is_ok()
        });
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let status = c.wait().expect("wait for agent");
            assert!(
                status.success(),
                "{} exited with {status}:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("---- last log lines of {} ----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            // What the file held when the test gave up: tells a change that never arrived
            // from one that arrived and was not streamed.
            let held = rusqlite::Connection::open(&self.db).and_then(|c| {
                c.query_row(
                    "SELECT (SELECT db_version FROM patina_state WHERE id = 0), \
                            (SELECT count(*) FROM machines)",
                    [],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
            });
            eprintln!(
                "---- {}'s database: (db_version, rows of machines) = {held:?}",
                self.name
            );
        }
    }
}

/// Runs `sql` on `db` from Debian's python3 with the plain `sqlite3` module (no extension).
fn python_write(db: &std::path::Path, sql: &str) {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=10)\n\
             c.execute(sys.argv[2])\n\
             c.commit()",
        )
        .arg(db)
        .arg(sql)
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn change(s: &mut Stream) -> Value {
    let e = s.next().expect("stream ended");
    e.get("change")
        .cloned()
        .unwrap_or_else(|| panic!("not a change: {e}"))
}

#[test]
fn agent_answers_the_seed_curl_line() {
    let mut a = Agent::new("a", &[]);
    a.start();
    let r = post_sql(
        &a,
        "INSERT INTO machines (id, name) VALUES ('machine-123', 'web-1')",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let url = a.url("/sql");
    let body = match Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/sql",
            "-d",
        ])
        .arg("UPDATE machines SET status = 'healthy' WHERE id = 'machine-123';")
        .arg(&url)
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            post_sql(
                &a,
                "UPDATE machines SET status = 'healthy' WHERE id = 'machine-123';",
            )
            .body
        }
    };
    let v: Value = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!(v["rows_affected"], 1, "{body}");
    assert!(v["version"].as_i64().is_some_and(|x| x > 0), "{body}");
    let v = post_json(
        &a,
        "/v1/queries",
        &json!("SELECT status FROM machines WHERE id = 'machine-123'"),
    );
    assert!(v.body.contains("[\"healthy\"]"), "{}", v.body);
    a.stop();
}

#[test]
fn agent_answers_bad_inputs_and_keeps_serving() {
    let mut a = Agent::new("a", &[]);
    a.start();
    let cases: Vec<(&str, &str, &str, Vec<u8>, u16)> = vec![
        (
            "/sql",
            "application/sql",
            "malformed SQL",
            b"SELEKT 1".to_vec(),
            400,
        ),
        (
            "/sql",
            "application/sql",
            "unknown table",
            b"SELECT * FROM ghosts".to_vec(),
            400,
        ),
        (
            "/sql",
            "application/json",
            "wrong content type",
            b"SELECT 1".to_vec(),
            415,
        ),
        (
            "/v1/transactions",
            "application/json",
            "malformed JSON",
            b"[\"SELECT 1\"".to_vec(),
            422,
        ),
        (
            "/sql",
            "application/sql",
            "body over the limit",
            vec![b' '; 70_000],
            413,
        ),
        (
            "/v1/transactions",
            "application/json",
            "parameter count",
            br#"[["INSERT INTO machines (id) VALUES (?)", [1, 2]]]"#.to_vec(),
            400,
        ),
        (
            "/v1/queries",
            "application/json",
            "write to queries",
            br#""DELETE FROM machines""#.to_vec(),
            400,
        ),
        (
            "/sql",
            "application/sql",
            "ATTACH",
            b"ATTACH DATABASE '/tmp/patina-attach.db' AS x".to_vec(),
            403,
        ),
        (
            "/sql",
            "application/sql",
            "VACUUM INTO",
            b"VACUUM INTO '/tmp/patina-vacuum.db'".to_vec(),
            403,
        ),
        (
            "/sql",
            "application/sql",
            "load_extension",
            b"SELECT load_extension('/tmp/x.so')".to_vec(),
            403,
        ),
        (
            "/sql",
            "application/sql",
            "internal table",
            b"DELETE FROM patina_state".to_vec(),
            403,
        ),
    ];
    for (path, ctype, what, body, status) in cases {
        let r = send(
            "POST",
            &a.url(path),
            &[("Content-Type", ctype)],
            Some(&body),
        );
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let v = r.json();
        let msg = v["error"]
            .as_str()
            .or_else(|| v["results"][0]["error"].as_str())
            .unwrap_or_else(|| panic!("{what}: no error message in {}", r.body));
        assert!(!msg.is_empty());
    }
    // Clients leaving mid-stream.
    for _ in 0..10 {
        let mut s = Stream::open(
            "POST",
            &a.url("/v1/queries"),
            Some(&json!("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 3000000) SELECT x FROM c")),
        )
        .expect("query stream");
        assert!(s.next().is_some());
        drop(s);
    }
    let r = post_sql(&a, "SELECT count(*) FROM machines");
    assert_eq!(r.status, 200, "{}", r.body);
    a.stop();
}

#[test]
fn subscription_on_b_follows_a_and_an_extensionless_writer_across_restarts() {
    let mut a = Agent::new("a", &[]);
    a.start();
    let mut b = Agent::new("b", &[a.gossip]);
    b.start();
    let q = json!("SELECT id, status FROM machines ORDER BY id");
    let mut s =
        Stream::open("POST", &b.url("/v1/subscriptions"), Some(&q)).expect("subscribe on b");
    let id = s.header("corro-query-id").expect("corro-query-id");
    let ev = s.until_eoq();
    assert_eq!(
        ev.last().map(|e| e["eoq"]["change_id"].clone()),
        Some(json!(0))
    );
    // Written on A, seen on B.
    let r = post_json(
        &a,
        "/v1/transactions",
        &json!([[
            "INSERT INTO machines (id, status) VALUES (?, ?)",
            ["from-a", "up"]
        ]]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(change(&mut s), json!(["insert", 1, ["from-a", "up"], 1]));
    // Written into B's file by a program that loads nothing.
    python_write(
        &b.db,
        "INSERT INTO machines (id, status) VALUES ('from-python', 'new')",
    );
    assert_eq!(
        change(&mut s),
        json!(["insert", 2, ["from-python", "new"], 2])
    );
    drop(s);
    // Reconnect: changes made meanwhile arrive after from=2, once each.
    post_sql(
        &a,
        "UPDATE machines SET status = 'down' WHERE id = 'from-a'",
    );
    let mut s = Stream::open(
        "GET",
        &b.url(&format!("/v1/subscriptions/{id}?from=2")),
        None,
    )
    .expect("resume");
    assert_eq!(change(&mut s), json!(["update", 1, ["from-a", "down"], 3]));
    drop(s);
    // Restart B; meanwhile A writes. Resume from 3 after the restart: 4, then live 5.
    b.stop();
    post_sql(
        &a,
        "INSERT INTO machines (id, status) VALUES ('while-b-down', 'up')",
    );
    b.start();
    let mut s = Stream::open(
        "GET",
        &b.url(&format!("/v1/subscriptions/{id}?from=3")),
        None,
    )
    .expect("resume after restart");
    assert_eq!(
        change(&mut s),
        json!(["insert", 3, ["while-b-down", "up"], 4])
    );
    python_write(&b.db, "DELETE FROM machines WHERE id = 'from-python'");
    assert_eq!(
        change(&mut s),
        json!(["delete", 2, ["from-python", "new"], 5])
    );
    drop(s);
    b.stop();
    a.stop();
}

/// Every metric `docs/grafana/patina.json` queries is exported by a running node: the
/// dashboard cannot silently graph nothing after a rename.
#[test]
fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/patina.json");
    let text = std::fs::read_to_string(&path).expect("docs/grafana/patina.json");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    let mut names: Vec<String> = Vec::new();
    for e in &exprs {
        let bytes = e.as_bytes();
        let mut i = 0;
        while let Some(at) = e[i..].find("patina_") {
            let start = i + at;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            names.push(e[start..end].to_string());
            i = end;
        }
    }
    names.sort();
    names.dedup();
    assert!(
        names.len() >= 15,
        "the dashboard queries too little: {names:?}"
    );
    let mut a = Agent::new("a", &[]);
    a.start();
    // One answered request so the per-route families have a series.
    assert_eq!(send("GET", &a.url("/v1/health"), &[], None).status, 200);
    let m = send("GET", &a.url("/metrics"), &[], None);
    assert_eq!(m.status, 200);
    let exported = |n: &str| {
        m.body.lines().any(|l| {
            l.strip_prefix(n)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
    };
    let missing: Vec<&String> = names.iter().filter(|n| !exported(n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the node does not export: {missing:?}"
    );
}
