//! Corrosion's own client crate (`corro-client`, unchanged from crates.io) against real
//! `patina agent` processes: HTTP/2 with prior knowledge on the API port, every call the
//! client offers, and `CorrosionPooledClient` failing over between two nodes.
//!
//! Needs the workspace built first (`cargo build --workspace --locked`): the nodes are
//! `target/debug/patina` (or `$PATINA_BIN`) loading `target/debug/libpatina.so`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corro_api_types::{
    ChangeId, ExecResponse, ExecResult, HealthResponse, RowId, SqliteValue, Statement,
    TypedNotifyEvent, TypedQueryEvent,
};
use corro_client::{CorrosionApiClient, CorrosionPooledClient};
use futures::StreamExt;

const SCHEMA: &str = "CREATE TABLE machines (id TEXT PRIMARY KEY NOT NULL, status TEXT, \
                      n INTEGER, r REAL, b BLOB);\n";
/// How long any single expected event may take before the test gives up.
const WAIT: Duration = Duration::from_secs(30);

fn patina_bin() -> PathBuf {
    std::env::var_os("PATINA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/patina"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One `patina agent` process, killed on drop.
struct Node {
    api: SocketAddr,
    gossip: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Node {
    fn start(dir: &Path, name: &str, bootstrap: Option<&Node>) -> Node {
        let schema = dir.join("schema.sql");
        std::fs::write(&schema, SCHEMA).expect("write schema");
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let gossip: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(patina_bin());
        cmd.arg("agent")
            .arg("--db-path")
            .arg(dir.join(format!("{name}.db")))
            .arg("--db-schema-paths")
            .arg(&schema)
            .arg("--api-addr")
            .arg(api.to_string())
            .arg("--gossip-addr")
            .arg(gossip.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(b) = bootstrap {
            cmd.arg("--gossip-bootstrap").arg(b.gossip.to_string());
        }
        let child = cmd
            .spawn()
            .expect("spawn patina (build the workspace first)");
        let mut node = Node {
            api,
            gossip,
            child,
            log,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(api).is_err() {
            if let Ok(Some(st)) = node.child.try_wait() {
                panic!("{name} exited ({st}):\n{}", node.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{name} never listened:\n{}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn client(&self) -> CorrosionApiClient {
        CorrosionApiClient::new(self.api).expect("client")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw HTTP/2-prior-knowledge client, as corro-client builds its own, for the calls the
/// crate has no method for (`/v1/health`, `/v1/migrations`).
fn h2() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("reqwest client")
}

async fn next<S, T>(s: &mut S, what: &str) -> T
where
    S: futures::Stream<Item = T> + Unpin,
{
    tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("stream ended before {what}"))
}

fn stmt(sql: &str) -> Statement {
    Statement::Simple(sql.into())
}

async fn rows<T: serde::de::DeserializeOwned + Unpin + std::fmt::Debug>(
    c: &CorrosionApiClient,
    sql: &str,
) -> Vec<T> {
    let mut q = c.query_typed::<T>(&stmt(sql), None).await.expect("query");
    let mut out = Vec::new();
    loop {
        match next(&mut q, "query event").await.expect("query event") {
            TypedQueryEvent::Columns(_) => {}
            TypedQueryEvent::Row(_, r) => out.push(r),
            TypedQueryEvent::EndOfQuery { .. } => return out,
            other => panic!("unexpected query event {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corro_client_drives_patina() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path(), "a", None);
    let c = node.client();

    // execute: every statement form, i64 extremes, reals, blobs.
    let named: HashMap<String, _> = [
        ("id".to_string(), "m-3".into()),
        ("s".to_string(), "named".into()),
    ]
    .into_iter()
    .collect();
    let res = c
        .execute(
            &[
                stmt("INSERT INTO machines (id, status) VALUES ('m-1', 'simple')"),
                Statement::WithParams(
                    "INSERT INTO machines (id, status, n) VALUES (?, ?, ?)".into(),
                    vec!["m-2".into(), "params".into(), i64::MAX.into()],
                ),
                Statement::WithNamedParams(
                    "INSERT INTO machines (id, status) VALUES (:id, :s)".into(),
                    named,
                ),
                Statement::Verbose {
                    query: "INSERT INTO machines (id, status, n, b) VALUES (?, ?, ?, ?)".into(),
                    params: Some(vec![
                        "m-4".into(),
                        "verbose".into(),
                        i64::MIN.into(),
                        vec![0u8, 255].into(),
                    ]),
                    named_params: None,
                },
                stmt("UPDATE machines SET r = 1.5 WHERE id = 'm-1'"),
            ],
            None,
        )
        .await
        .expect("execute");
    assert_eq!(res.results.len(), 5);
    assert!(res.results.iter().all(|r| matches!(
        r,
        ExecResult::Execute {
            rows_affected: 1,
            ..
        }
    )));
    assert!(res.version.is_some());
    // A failing statement is the client's ResponseError, and nothing was written.
    let err = c
        .execute(
            &[
                stmt("INSERT INTO machines (id) VALUES ('m-9')"),
                stmt("INSERT INTO nope VALUES (1)"),
            ],
            None,
        )
        .await
        .expect_err("unknown table");
    assert!(err.to_string().contains("nope"), "{err}");

    // Typed queries.
    let got: Vec<(
        String,
        Option<String>,
        Option<i64>,
        Option<f64>,
        Option<Vec<u8>>,
    )> = rows(&c, "SELECT id, status, n, r, b FROM machines ORDER BY id").await;
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0].3, Some(1.5));
    assert_eq!(got[1].2, Some(i64::MAX));
    assert_eq!(got[2].1.as_deref(), Some("named"));
    assert_eq!(got[3].2, Some(i64::MIN));
    assert_eq!(got[3].4, Some(vec![0, 255]));
    let untyped = c
        .query(&stmt("SELECT count(*) FROM machines"), None)
        .await
        .expect("query");
    drop(untyped);
    let err = c
        .query(&stmt("DELETE FROM machines"), None)
        .await
        .err()
        .expect("a write through queries is refused");
    assert!(err.to_string().contains("readonly"), "{err}");

    // Subscriptions: initial rows, eoq with a change id, then contiguous changes.
    let sql = "SELECT id, status FROM machines";
    let mut sub = c
        .subscribe_typed::<(String, Option<String>)>(&stmt(sql), false, None)
        .await
        .expect("subscribe");
    let id = sub.id();
    assert!(sub.hash().is_some(), "corro-query-hash header");
    let mut initial = 0;
    let eoq = loop {
        match next(&mut sub, "subscription event").await.expect("event") {
            TypedQueryEvent::Columns(cols) => assert_eq!(cols.len(), 2),
            TypedQueryEvent::Row(RowId(_), _) => initial += 1,
            TypedQueryEvent::EndOfQuery { change_id, .. } => break change_id.expect("change id"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(initial, 4);
    // skip_rows: no columns, rows or eoq; only the changes.
    let mut skipping = c
        .subscribe_typed::<(String, Option<String>)>(&stmt(sql), true, None)
        .await
        .expect("subscribe skip_rows");
    let mut updates = c.updates("machines").await.expect("updates");
    c.execute(
        &[stmt(
            "UPDATE machines SET status = 'changed' WHERE id = 'm-1'",
        )],
        None,
    )
    .await
    .expect("update");
    let first = match next(&mut sub, "change").await.expect("change") {
        TypedQueryEvent::Change(_, _, (id, status), change_id) => {
            assert_eq!((id.as_str(), status.as_deref()), ("m-1", Some("changed")));
            assert_eq!(change_id, eoq + 1, "contiguous");
            change_id
        }
        other => panic!("expected a change, got {other:?}"),
    };
    match next(&mut skipping, "skip_rows change")
        .await
        .expect("change")
    {
        TypedQueryEvent::Change(_, _, (id, _), _) => assert_eq!(id, "m-1"),
        other => panic!("skip_rows sent {other:?} before a change"),
    }
    match next(&mut updates, "updates notify").await.expect("notify") {
        TypedNotifyEvent::Notify(_, pk) => {
            assert_eq!(pk, vec![SqliteValue::Text("m-1".into())])
        }
        other => panic!("unexpected {other:?}"),
    }
    // Resume by change id after dropping the stream: the next change, no gap, no repeat.
    drop(sub);
    c.execute(&[stmt("DELETE FROM machines WHERE id = 'm-2'")], None)
        .await
        .expect("delete");
    let mut resumed = c
        .subscription_typed::<(String, Option<String>)>(id, false, Some(first))
        .await
        .expect("resume");
    match next(&mut resumed, "resumed change").await.expect("change") {
        TypedQueryEvent::Change(kind, _, (id, _), change_id) => {
            assert_eq!(id, "m-2");
            assert_eq!(format!("{kind:?}").to_lowercase(), "delete");
            assert_eq!(change_id, ChangeId(first.0 + 1));
        }
        other => panic!("expected the delete, got {other:?}"),
    }
    match next(&mut updates, "delete notify").await.expect("notify") {
        TypedNotifyEvent::Notify(kind, pk) => {
            assert_eq!(format!("{kind:?}").to_lowercase(), "delete");
            assert_eq!(pk, vec![SqliteValue::Text("m-2".into())]);
        }
        other => panic!("unexpected {other:?}"),
    }

    // Health decodes as Corrosion's HealthResponse, healthy and not.
    let base = format!("http://{}", node.api);
    let r = h2()
        .get(format!("{base}/v1/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    match serde_json::from_slice::<HealthResponse>(&body).expect("HealthResponse") {
        HealthResponse::Response { members, gaps, .. } => assert_eq!((members, gaps), (1, 0)),
        other => panic!("{other:?}"),
    }
    let r = h2()
        .get(format!("{base}/v1/health?min_members=3"))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 503);
    let body = r.bytes().await.expect("body");
    assert!(matches!(
        serde_json::from_slice::<HealthResponse>(&body).expect("HealthResponse"),
        HealthResponse::Error(_)
    ));

    // Migrations: a new table, usable at once and kept across a restart.
    let r = h2()
        .post(format!("{base}/v1/migrations"))
        .header("content-type", "application/json")
        .body(r#"["CREATE TABLE extra (id INTEGER PRIMARY KEY NOT NULL, v TEXT)"]"#)
        .send()
        .await
        .expect("migrations");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    let resp: ExecResponse = serde_json::from_slice(&body).expect("ExecResponse");
    assert!(resp.actor_id.is_some());
    c.execute(&[stmt("INSERT INTO extra VALUES (1, 'kept')")], None)
        .await
        .expect("write to the migrated table");

    // Restart on the same database: the migrated table is still there, and the
    // subscription resumes after its last change id with the next change only.
    let last = first.0 + 1;
    drop(node);
    let node = Node::start(dir.path(), "a", None);
    let c = node.client();
    let got: Vec<(i64, String)> = rows(&c, "SELECT id, v FROM extra").await;
    assert_eq!(got, vec![(1, "kept".to_string())]);
    let mut resumed = c
        .subscription_typed::<(String, Option<String>)>(id, false, Some(ChangeId(last)))
        .await
        .expect("resume after restart");
    c.execute(
        &[stmt(
            "INSERT INTO machines (id, status) VALUES ('m-5', 'after')",
        )],
        None,
    )
    .await
    .expect("insert");
    match next(&mut resumed, "change after restart")
        .await
        .expect("change")
    {
        TypedQueryEvent::Change(_, _, (id, _), change_id) => {
            assert_eq!(id, "m-5");
            assert_eq!(change_id, ChangeId(last + 1));
        }
        other => panic!("expected the insert, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_client_fails_over_between_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let da = dir.path().join("a");
    let db = dir.path().join("b");
    std::fs::create_dir_all(&da).expect("dir");
    std::fs::create_dir_all(&db).expect("dir");
    let mut a = Node::start(&da, "a", None);
    let b = Node::start(&db, "b", Some(&a));
    a.client()
        .execute(
            &[stmt(
                "INSERT INTO machines (id, status) VALUES ('p-1', 'from a')",
            )],
            None,
        )
        .await
        .expect("write on a");
    // Wait until b holds the write (replication, not the client, is under test here).
    let deadline = Instant::now() + WAIT;
    loop {
        let got: Vec<(String,)> = rows(&b.client(), "SELECT id FROM machines").await;
        if !got.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never received the write:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Tried in this order: a first, so losing a is a failover.
    let addrs = vec![a.api.to_string(), b.api.to_string()];
    let resolver = hickory_resolver::Resolver::builder_tokio()
        .expect("resolver")
        .build()
        .expect("resolver");
    let pooled = CorrosionPooledClient::new(addrs, Duration::from_nanos(1), resolver);
    let q = stmt("SELECT id, status FROM machines");
    let mut s = pooled
        .query_typed::<(String, String)>(&q, None)
        .await
        .expect("query through the pool");
    assert!(matches!(
        next(&mut s, "columns").await.expect("event"),
        TypedQueryEvent::Columns(_)
    ));
    drop(s);
    // Subscribe through the pool, then lose the node serving it: the pool moves on.
    let sub = pooled
        .subscribe_typed::<(String, String)>(&q, false, None)
        .await
        .expect("subscribe through the pool");
    drop(sub);
    a.kill();
    let mut answered = None;
    for _ in 0..10 {
        if let Ok(mut s) = pooled.query_typed::<(String, String)>(&q, None).await {
            let mut found = Vec::new();
            loop {
                match next(&mut s, "event").await {
                    Ok(TypedQueryEvent::Row(_, r)) => found.push(r),
                    Ok(TypedQueryEvent::EndOfQuery { .. }) => break,
                    Ok(_) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            answered = Some(found);
            break;
        }
    }
    let found = answered.expect("the pool reached the surviving node");
    assert_eq!(found, vec![("p-1".to_string(), "from a".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrosion_client_writes_through_the_api_and_reads_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path(), "a", None);
    let client = corro_client::CorrosionClient::new(node.api, dir.path().join("a.db"))
        .expect("CorrosionClient");
    client
        .execute(
            &[stmt(
                "INSERT INTO machines (id, status) VALUES ('f-1', 'file')",
            )],
            None,
        )
        .await
        .expect("execute through the API");
    // Its pool reads the node's database file directly (WAL), as Corrosion's apps do.
    let conn = client.pool().get().await.expect("pooled connection");
    let status: String = conn
        .query_row("SELECT status FROM machines WHERE id = 'f-1'", [], |r| {
            r.get(0)
        })
        .expect("read the file");
    assert_eq!(status, "file");
}
