//! Fixtures for the API tests: an in-process API server over a real database with the
//! real extension loaded, and a small blocking HTTP client.
//!
//! The in-process node stands in for `patina agent` where only the API is under test: the
//! node's real tailer publishes `crsql_db_version()` and the keys each commit touched (so
//! writes by other processes reach subscriptions, as in the agent); nothing replicates.

#![allow(dead_code)]

pub mod agent;
pub mod cli;
pub mod hardening;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use patina_sidecar::config::{ApiConfig, Synchronous};
use patina_sidecar::db::touched::TouchedHub;
use patina_sidecar::node::{MemberInfo, Metrics, NodeShared};
use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(30);

pub const MACHINES: &str = "CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'unknown',
    updated_at INTEGER NOT NULL DEFAULT 0
);";

/// `target/debug/libpatina.so`, waiting (bounded) for a concurrent `cargo build -p patina`.
pub fn extension() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_patina"));
    let lib = exe
        .parent()
        .map(|d| d.join("libpatina.so"))
        .unwrap_or_else(|| PathBuf::from("target/debug/libpatina.so"));
    let deadline = Instant::now() + Duration::from_secs(600);
    while !lib.exists() {
        assert!(
            Instant::now() < deadline,
            "{} missing: run `cargo build -p patina`",
            lib.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    lib
}

/// Creates `machines` as a replicated table in the database at `db`.
pub fn prepare_db(db: &Path) {
    let conn = patina_sidecar::db::open(db, &extension(), Synchronous::Normal).unwrap();
    conn.execute_batch(MACHINES).unwrap();
    conn.query_row("SELECT crsql_as_crr('machines')", [], |_| Ok(()))
        .unwrap();
}

/// Anything with an API base URL: the in-process node or a `patina agent`.
pub trait Url {
    fn url(&self, path: &str) -> String;
}

impl Url for Node {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// An API server running in this process.
pub struct Node {
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub members: Arc<RwLock<Vec<MemberInfo>>>,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    poller_stop: Arc<AtomicBool>,
}

impl Node {
    /// Starts a server over `db` (created with `machines` when new).
    pub fn start(db: &Path, token: Option<&str>, max_body: usize) -> Node {
        prepare_db(db);
        let ext = extension();
        let conn = patina_sidecar::db::open(db, &ext, Synchronous::Normal).unwrap();
        let site: Vec<u8> = conn
            .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
            .unwrap();
        let v0: i64 = conn
            .query_row("SELECT crsql_db_version()", [], |r| r.get(0))
            .unwrap();
        let (vtx, vrx) = tokio::sync::watch::channel(v0);
        let poller_stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        // The node's real tailer: it publishes db_version and the keys every commit touched
        // (what subscriptions match on); the units it reads for peers are dropped.
        let touched = Arc::new(TouchedHub::default());
        let (_wake_tx, wake_rx) = crossbeam_channel::bounded::<()>(1);
        let (unit_tx, mut unit_rx) = tokio::sync::mpsc::channel(16);
        std::thread::spawn(move || while unit_rx.blocking_recv().is_some() {});
        patina_sidecar::db::tail::spawn(
            conn,
            wake_rx,
            unit_tx,
            vtx,
            poller_stop.clone(),
            10_000,
            metrics.clone(),
            touched.clone(),
        )
        .unwrap();
        let members = Arc::new(RwLock::new(vec![MemberInfo {
            site_id: hex::encode(&site),
            addr: "127.0.0.1:8787".into(),
            state: "alive".into(),
            rtt_ms: None,
        }]));
        let reload_db = db.to_path_buf();
        let reload_ext = ext.clone();
        let shared = Arc::new(NodeShared {
            db_path: db.to_path_buf(),
            extension_path: ext,
            site_id_hex: hex::encode(&site),
            db_version: vrx,
            touched,
            local_write: Arc::new(tokio::sync::Notify::new()),
            members: members.clone(),
            metrics: metrics.clone(),
            synchronous: Synchronous::Normal,
            schema_paths: Vec::new(),
            gossip_addr: "127.0.0.1:8787".parse().ok(),
            reload: Arc::new(move || {
                let c = patina_sidecar::db::open(&reload_db, &reload_ext, Synchronous::Normal)
                    .map_err(|e| e.to_string())?;
                c.query_row("SELECT crsql_as_crr('machines')", [], |_| Ok(()))
                    .map_err(|e| e.to_string())?;
                Ok(vec!["machines".to_string()])
            }),
        });
        let api = ApiConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: token.map(String::from),
            max_body,
            ..ApiConfig::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(api.addr).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                patina_sidecar::http::serve(listener, shared, api, async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(WAIT).unwrap();
        Node {
            addr,
            db: db.to_path_buf(),
            members,
            metrics,
            stop: Some(stop_tx),
            thread: Some(thread),
            poller_stop,
        }
    }

    /// Stops the server and waits for it to finish draining.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.poller_stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The HTTP client of the API tests. Its read timeout bounds a wait for the next line of
/// a stream; it is generous because the suite's own load tests (runaway queries,
/// throughput) share the machine's two cores with the nodes under test. No test asserts
/// a latency through it.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(60))
        .build()
}

fn collect(r: ureq::Response) -> Answer {
    let status = r.status();
    let headers = r
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = r.header(&n).unwrap_or_default().to_string();
            (n, v)
        })
        .collect();
    let mut body = String::new();
    r.into_reader().read_to_string(&mut body).unwrap();
    Answer {
        status,
        body,
        headers,
    }
}

/// Sends a request; any status is an answer (transport errors panic).
pub fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Answer {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    match res {
        Ok(r) => collect(r),
        Err(ureq::Error::Status(_, r)) => collect(r),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

pub fn post_sql(node: &impl Url, sql: &str) -> Answer {
    send(
        "POST",
        &node.url("/sql"),
        &[("Content-Type", "application/sql")],
        Some(sql.as_bytes()),
    )
}

pub fn post_json(node: &impl Url, path: &str, body: &Value) -> Answer {
    send(
        "POST",
        &node.url(path),
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
}

/// An open NDJSON stream.
pub struct Stream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<Box<dyn Read + Send + Sync>>,
}

impl Stream {
    pub fn open(method: &str, url: &str, body: Option<&Value>) -> Result<Stream, Answer> {
        let req = agent()
            .request(method, url)
            .set("Content-Type", "application/json");
        let res = match body {
            Some(b) => req.send_string(&b.to_string()),
            None => req.call(),
        };
        match res {
            Ok(r) => {
                let headers = r
                    .headers_names()
                    .into_iter()
                    .map(|n| {
                        let v = r.header(&n).unwrap_or_default().to_string();
                        (n, v)
                    })
                    .collect();
                Ok(Stream {
                    status: r.status(),
                    headers,
                    reader: BufReader::new(r.into_reader()),
                })
            }
            Err(ureq::Error::Status(_, r)) => Err(collect(r)),
            Err(e) => panic!("{method} {url}: {e}"),
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// The next event, or `None` at the end of the stream.
    pub fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(line.trim())
                    .unwrap_or_else(|e| panic!("bad NDJSON line ({e}): {line}")),
            ),
            Err(e) => panic!("stream read failed: {e}"),
        }
    }

    /// Events up to and including `eoq`.
    pub fn until_eoq(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(e) = self.next() {
            let done = e.get("eoq").is_some();
            out.push(e);
            if done {
                return out;
            }
        }
        panic!("stream ended before eoq: {out:?}");
    }
}

/// Waits for `cond` with a deadline.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
