//! What an operator meets, against real `patina` processes: HTTP/2 (h2c) and HTTP/1.1 on
//! one port, the database claim (a second agent and `restore` refused while a node runs),
//! backup/restore keeping or renewing identity on purpose, the node counting itself, and
//! the small things — errors said once, no file created before a busy port fails the
//! start, JSON ending in a newline, `tls` help and advice, broadcast counted only to peers;
//! and Corrosion's `skip_rows` and `/v1/migrations` kept across a restart.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_tcp, free_udp};

const WAIT: Duration = Duration::from_secs(30);
const SCHEMA: &str = "CREATE TABLE machines (id TEXT PRIMARY KEY NOT NULL, status TEXT);\n";

fn patina() -> Command {
    Command::new(env!("CARGO_BIN_EXE_patina"))
}

fn extension() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/libpatina.so")
}

/// A `patina agent` on `db`, killed on drop.
struct Agent {
    api: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, db: &Path) -> Agent {
        let schema = dir.join("schema.sql");
        std::fs::write(&schema, SCHEMA).expect("schema");
        let api = free_tcp();
        let log = dir.join(format!("agent-{}.log", api.port()));
        let child = patina()
            .args(["agent", "--db-path"])
            .arg(db)
            .arg("--db-schema-paths")
            .arg(&schema)
            .arg("--db-extension-path")
            .arg(extension())
            .args(["--api-addr", &api.to_string()])
            .args(["--gossip-addr", &free_udp().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn patina agent");
        let mut a = Agent { api, child, log };
        let deadline = Instant::now() + WAIT;
        while curl(&a, &["/v1/health"]).0 != "200" {
            if let Ok(Some(st)) = a.child.try_wait() {
                panic!("agent exited ({st}):\n{}", a.log_text());
            }
            assert!(Instant::now() < deadline, "no API:\n{}", a.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` against the agent: (status, body, HTTP version). `args` are the path and any
/// extra curl options.
fn curl(a: &Agent, args: &[&str]) -> (String, String, String) {
    let (path, extra) = args.split_first().expect("a path");
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("http://{}{path}", a.api))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, version) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.to_owned(), body.to_owned(), version.to_owned())
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run patina")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn http2_prior_knowledge_and_http1_share_the_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Agent::start(dir.path(), &dir.path().join("n.db"));
    let (code, body, version) = curl(&a, &["/v1/health", "--http2-prior-knowledge"]);
    assert_eq!((code.as_str(), version.as_str()), ("200", "2"), "{body}");
    let (code, _, version) = curl(&a, &["/v1/health"]);
    assert_eq!((code.as_str(), version.as_str()), ("200", "1.1"));
    // A write over h2c, read back over HTTP/1.1.
    let (code, body, _) = curl(
        &a,
        &[
            "/v1/transactions",
            "--http2-prior-knowledge",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"["INSERT INTO machines VALUES ('m-1', 'up')"]"#,
        ],
    );
    assert_eq!(code, "200", "{body}");
    let (_, body, _) = curl(
        &a,
        &[
            "/v1/queries",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#""SELECT status FROM machines""#,
        ],
    );
    assert!(body.contains(r#"["up"]"#), "{body}");
}

#[test]
fn one_process_per_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("n.db");
    let a = Agent::start(dir.path(), &db);
    let pid = a.child.id();
    // A second agent on the same file refuses, naming the first.
    let o = run(patina()
        .args(["agent", "--db-path"])
        .arg(&db)
        .arg("--db-extension-path")
        .arg(extension())
        .args(["--api-addr", &free_tcp().to_string()])
        .args(["--gossip-addr", &free_udp().to_string()]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("pid {pid} (patina agent)")),
        "{}",
        stderr(&o)
    );
    // Restore refuses while the node runs (on another API port than --api says), and the
    // node's files are untouched.
    let backup = dir.path().join("b.db");
    let o = run(patina()
        .args(["backup", "--api", &a.api.to_string()])
        .arg(&backup));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(patina()
        .args(["restore", "--api", "127.0.0.1:1", "--db-path"])
        .arg(&db)
        .arg("--db-extension-path")
        .arg(extension())
        .arg(&backup));
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("pid {pid}")), "{}", stderr(&o));
    assert!(Path::new(&format!("{}-wal", db.display())).exists());
    let (code, _, _) = curl(
        &a,
        &[
            "/sql",
            "-H",
            "Content-Type: application/sql",
            "-d",
            "INSERT INTO machines VALUES ('x', 'y')",
        ],
    );
    assert_eq!(code, "200");
    // Once stopped, the claim is gone and restore proceeds.
    a.stop();
    let o = run(patina()
        .args(["restore", "--api", "127.0.0.1:1", "--db-path"])
        .arg(&db)
        .arg("--db-extension-path")
        .arg(extension())
        .arg(&backup));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The site id a node reports in `/v1/status`.
fn site_id(a: &Agent) -> String {
    let (_, body, _) = curl(a, &["/v1/status"]);
    let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    v["site_id"].as_str().expect("site_id").to_owned()
}

#[test]
fn backup_and_restore_keep_or_renew_identity_on_purpose() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("n.db");
    let a = Agent::start(dir.path(), &db);
    let original = site_id(&a);
    let seed = dir.path().join("seed.db");
    let same = dir.path().join("same.db");
    assert!(run(patina()
        .args(["backup", "--api", &a.api.to_string()])
        .arg(&seed))
    .status
    .success());
    let o = run(patina()
        .args(["backup", "--keep-site-id", "--api", &a.api.to_string()])
        .arg(&same));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&original));
    a.stop();
    let restore = |from: &Path, keep: bool| {
        let mut c = patina();
        c.args(["restore", "--api", "127.0.0.1:1", "--db-path"])
            .arg(&db)
            .arg("--db-extension-path")
            .arg(extension());
        if keep {
            c.arg("--keep-site-id");
        }
        let o = run(c.arg(from));
        assert!(o.status.success(), "{}", stderr(&o));
        let a = Agent::start(dir.path(), &db);
        let id = site_id(&a);
        a.stop();
        id
    };
    assert_eq!(restore(&same, true), original, "kept on purpose");
    assert_ne!(restore(&same, false), original, "renewed by default");
    assert_ne!(
        restore(&seed, true),
        original,
        "a seed backup carries no identity"
    );
}

#[test]
fn a_single_node_counts_itself_and_json_ends_with_a_newline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Agent::start(dir.path(), &dir.path().join("n.db"));
    let (code, body, _) = curl(&a, &["/v1/health?min_members=1"]);
    assert_eq!(code, "200", "{body}");
    let (_, body, _) = curl(&a, &["/v1/members"]);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(v["members"][0]["self"], true);
    assert_eq!(v["members"][0]["state"], "alive");
    let (_, status, _) = curl(&a, &["/v1/status"]);
    let s: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(
        (s["members"].as_u64(), s["members_alive"].as_u64()),
        (Some(1), Some(1))
    );
    for path in ["/v1/members", "/v1/status", "/v1/health", "/nope"] {
        let (_, body, _) = curl(&a, &[path]);
        assert!(body.ends_with("}\n"), "{path}: {body:?}");
    }
    let (_, body, _) = curl(
        &a,
        &[
            "/sql",
            "-H",
            "Content-Type: application/sql",
            "-d",
            "INSERT INTO machines VALUES ('a', 'b')",
        ],
    );
    assert!(body.ends_with("}\n"), "{body:?}");
    // No peer: nothing was pushed to anyone.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, m, _) = curl(&a, &["/metrics"]);
        if m.contains("patina_db_version 1") || m.contains("patina_db_version 2") {
            assert!(m.contains("patina_changes_broadcast_total 0"), "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write never reached the feed:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn busy_port_fails_before_any_file_and_says_its_cause_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let db = dir.path().join("n.db");
    let o = run(patina()
        .args(["agent", "--db-path"])
        .arg(&db)
        .arg("--db-extension-path")
        .arg(extension())
        .args(["--api-addr", &busy.local_addr().expect("addr").to_string()])
        .args(["--gossip-addr", &free_udp().to_string()]));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.map(|e| e.file_name()))
        .collect();
    assert!(left.is_empty(), "files created: {left:?}");
    // The same for a busy gossip (UDP) port.
    let busy_udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let o = run(patina()
        .args(["agent", "--db-path"])
        .arg(&db)
        .arg("--db-extension-path")
        .arg(extension())
        .args(["--api-addr", &free_tcp().to_string()])
        .args([
            "--gossip-addr",
            &busy_udp.local_addr().expect("addr").to_string(),
        ]));
    assert!(!o.status.success());
    assert!(!db.exists(), "the database was created: {}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.map(|e| e.file_name()))
        .collect();
    assert!(left.is_empty(), "files created: {left:?}");
}

#[test]
fn tls_ca_help_and_missing_ca_advice() {
    let o = run(patina().args(["tls", "ca", "generate", "--help"]));
    let help = String::from_utf8_lossy(&o.stdout);
    for absent in ["--ca-cert", "--ca-key", "--san"] {
        assert!(!help.contains(absent), "{absent} offered for a CA:\n{help}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(patina()
        .args(["tls", "server", "generate", "--out-dir"])
        .arg(dir.path())
        .current_dir(dir.path()));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("patina tls ca generate"),
        "{}",
        stderr(&o)
    );
}

/// Reads lines (trailing whitespace cut) until `stop` says so or the stream ends.
fn read_lines_until(
    out: &mut impl std::io::BufRead,
    mut stop: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => return lines,
            Ok(_) => {
                let l = line.trim_end().to_owned();
                let done = stop(&l);
                lines.push(l);
                if done {
                    return lines;
                }
            }
        }
    }
}

#[test]
fn skip_rows_streams_only_changes_and_migrations_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("n.db");
    let a = Agent::start(dir.path(), &db);
    let sql =
        |a: &Agent, q: &str| curl(a, &["/sql", "-H", "Content-Type: application/sql", "-d", q]);
    assert_eq!(sql(&a, "INSERT INTO machines VALUES ('old', 'x')").0, "200");
    // skip_rows=true: no columns, rows or eoq; the first line is the change. A raw
    // HTTP/1.1 request: curl holds the response headers back until body data arrives.
    let mut conn = std::net::TcpStream::connect(a.api).expect("connect");
    let body = r#""SELECT id, status FROM machines""#;
    write!(
        conn,
        "POST /v1/subscriptions?skip_rows=true HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    conn.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut out = std::io::BufReader::new(conn);
    // The headers (ending in a blank line) mean the stream is set up.
    let headers = read_lines_until(&mut out, |l| l.is_empty());
    assert!(headers[0].contains("200"), "{headers:?}");
    assert_eq!(sql(&a, "INSERT INTO machines VALUES ('new', 'y')").0, "200");
    // Chunked framing: size lines and blank lines between the NDJSON lines.
    let body = read_lines_until(&mut out, |l| l.starts_with("{\"change\""));
    let json: Vec<&String> = body.iter().filter(|l| l.starts_with('{')).collect();
    drop(out);
    assert_eq!(
        json,
        vec![r#"{"change":["insert",2,["new","y"],1]}"#],
        "skip_rows sent more than the change"
    );
    // A migration is applied at once and again after a restart (kept in n.db.schema.d).
    let (code, body, _) = curl(
        &a,
        &[
            "/v1/migrations",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"["CREATE TABLE extra (id INTEGER PRIMARY KEY NOT NULL, v TEXT)"]"#,
        ],
    );
    assert_eq!(code, "200", "{body}");
    assert_eq!(sql(&a, "INSERT INTO extra VALUES (1, 'kept')").0, "200");
    a.stop();
    let a = Agent::start(dir.path(), &db);
    let (code, body, _) = sql(&a, "SELECT v FROM extra");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("kept"), "{body}");
    let (_, status, _) = curl(&a, &["/v1/reload", "-X", "POST"]);
    assert!(
        status.contains("extra"),
        "reload keeps the migrated table: {status}"
    );
}
