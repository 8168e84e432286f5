//! The HTTP API end to end: a real HTTP client (ureq, and real `curl` for the seed's line)
//! against the API served over a real database with the real extension loaded.
//!
//! Covers: the seed's curl line; the shapes of `/sql`, `/v1/transactions`, `/v1/queries`,
//! `/v1/subscriptions`, health, members, metrics, status, backup, reload; every bad input
//! of issue 4 answered in the endpoint's error shape while the node keeps serving;
//! subscriptions fed by API writes and by an extension-less python3 writer, resumed after
//! a reconnect and after a restart without gaps or duplicates; the client subcommands;
//! `/v1/transactions` throughput (printed, not asserted). Issue 7's API hardening (values
//! that are not UTF-8, runaway and abandoned queries, overload, huge results, NUL bytes)
//! is in `api_support/hardening.rs`.

#![allow(clippy::unwrap_used)] // a test that cannot set up should panic

mod common;
#[path = "api_support/mod.rs"]
mod support;

use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};
use support::*;

const MAX_BODY: usize = 64 * 1024;

fn node(dir: &tempfile::TempDir) -> Node {
    Node::start(&dir.path().join("node.db"), None, MAX_BODY)
}

/// The node still answers a plain query.
fn assert_serving(n: &impl Url) {
    let a = post_sql(n, "SELECT 1 AS one");
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["rows"], json!([[1]]));
}

#[test]
fn seed_curl_line_updates_a_machine() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let a = post_sql(
        &n,
        "INSERT INTO machines (id, name) VALUES ('machine-123', 'web-1')",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let url = n.url("/sql");
    let out = Command::new("curl")
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
        .output();
    let body = match out {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
        _ => {
            post_sql(
                &n,
                "UPDATE machines SET status = 'healthy' WHERE id = 'machine-123';",
            )
            .body
        }
    };
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rows_affected"], 1, "{body}");
    assert!(v["version"].as_i64().unwrap() > 0, "{body}");
    let a = post_sql(&n, "SELECT status FROM machines WHERE id = 'machine-123'");
    assert_eq!(a.json()["rows"], json!([["healthy"]]));
}

#[test]
fn sql_runs_statements_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    // A semicolon inside a literal does not split the statement.
    let a = post_sql(
        &n,
        "INSERT INTO machines (id, name) VALUES ('a;1', 'x; y');\n\
         INSERT INTO machines (id) VALUES ('b');\n\
         SELECT id, name FROM machines ORDER BY id",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(v["columns"], json!(["id", "name"]));
    assert_eq!(v["rows"], json!([["a;1", "x; y"], ["b", ""]]));
    assert_eq!(v["rows_affected"], 2);
    assert!(v["version"].is_i64());
    // Nothing changed: version null.
    let v = post_sql(&n, "UPDATE machines SET name = 'z' WHERE id = 'nope'").json();
    assert_eq!(v, json!({"rows_affected": 0, "version": null}));
    // All or nothing: the failing second statement takes the first one back.
    let a = post_sql(
        &n,
        "INSERT INTO machines (id) VALUES ('c'); INSERT INTO nowhere VALUES (1)",
    );
    assert_eq!(a.status, 400);
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .contains("no such table: nowhere"));
    let v = post_sql(&n, "SELECT count(*) FROM machines WHERE id = 'c'").json();
    assert_eq!(v["rows"], json!([[0]]));
    // text/plain is accepted too.
    let a = send(
        "POST",
        &n.url("/sql"),
        &[("Content-Type", "text/plain; charset=utf-8")],
        Some(b"SELECT 2"),
    );
    assert_eq!(a.json()["rows"], json!([[2]]));
}

#[test]
fn transactions_have_corrosions_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let a = post_json(
        &n,
        "/v1/transactions",
        &json!([
            "INSERT INTO machines (id) VALUES ('m1')",
            ["INSERT INTO machines (id, name) VALUES (?, ?)", ["m2", "two"]],
            ["UPDATE machines SET name = :name WHERE id = :id", {"name": "one", "id": "m1"}],
            {"query": "UPDATE machines SET updated_at = ? WHERE id = ?", "params": [9223372036854775807i64, "m2"]}
        ]),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for r in results {
        assert_eq!(r["rows_affected"], 1);
        assert!(r["time"].is_f64());
    }
    assert!(v["time"].is_f64());
    assert!(v["version"].as_i64().unwrap() > 0);
    assert_eq!(v["actor_id"].as_str().unwrap().len(), 36);
    let rows = post_sql(&n, "SELECT id, name, updated_at FROM machines ORDER BY id").json();
    assert_eq!(
        rows["rows"],
        json!([["m1", "one", 0], ["m2", "two", 9223372036854775807i64]])
    );
    // No change: version null.
    let v = post_json(
        &n,
        "/v1/transactions",
        &json!(["DELETE FROM machines WHERE id = 'zz'"]),
    )
    .json();
    assert_eq!(v["version"], Value::Null);
    assert_eq!(v["results"][0]["rows_affected"], 0);
    // A failing statement: the error shape, 400, nothing applied.
    let a = post_json(
        &n,
        "/v1/transactions",
        &json!([
            "INSERT INTO machines (id) VALUES ('m3')",
            "INSERT INTO nope VALUES (1)"
        ]),
    );
    assert_eq!(a.status, 400);
    let v = a.json();
    assert!(v["results"][0]["error"]
        .as_str()
        .unwrap()
        .contains("no such table: nope"));
    assert_eq!(v["version"], Value::Null);
    assert!(v["actor_id"].is_string());
    let rows = post_sql(&n, "SELECT count(*) FROM machines WHERE id = 'm3'").json();
    assert_eq!(rows["rows"], json!([[0]]));
}

#[test]
fn bad_inputs_are_answered_in_the_endpoints_shape() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    // Malformed SQL.
    let a = post_sql(&n, "SELEKT 1");
    assert_eq!(a.status, 400);
    assert!(
        a.json()["error"].as_str().unwrap().contains("syntax error"),
        "{}",
        a.body
    );
    // Unknown table.
    let a = post_sql(&n, "SELECT * FROM ghosts");
    assert_eq!(a.status, 400);
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .contains("no such table: ghosts"));
    // Wrong content type.
    let a = send(
        "POST",
        &n.url("/sql"),
        &[("Content-Type", "application/json")],
        Some(b"SELECT 1"),
    );
    assert_eq!(a.status, 415);
    assert!(a.json()["error"].is_string());
    let a = send(
        "POST",
        &n.url("/v1/transactions"),
        &[("Content-Type", "text/csv")],
        Some(b"[]"),
    );
    assert_eq!(a.status, 415);
    // Malformed JSON.
    for path in ["/v1/transactions", "/v1/queries", "/v1/subscriptions"] {
        let a = send(
            "POST",
            &n.url(path),
            &[("Content-Type", "application/json")],
            Some(b"[\"SELECT 1\""),
        );
        assert_eq!(a.status, 422, "{path}: {}", a.body);
        assert!(a.json()["error"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"));
    }
    // Body over the limit.
    let big = format!("SELECT '{}'", "x".repeat(MAX_BODY + 10));
    let a = post_sql(&n, &big);
    assert_eq!(a.status, 413);
    assert!(a.json()["error"].as_str().unwrap().contains("limit"));
    let a = post_json(&n, "/v1/transactions", &json!([big]));
    assert_eq!(a.status, 413);
    // Parameter count mismatch.
    let a = post_json(
        &n,
        "/v1/transactions",
        &json!([["INSERT INTO machines (id) VALUES (?)", [1, 2]]]),
    );
    assert_eq!(a.status, 400);
    assert!(a.json()["results"][0]["error"]
        .as_str()
        .unwrap()
        .contains("wrong number of parameters"));
    let a = post_json(&n, "/v1/queries", &json!(["SELECT ?", []]));
    assert_eq!(a.status, 400);
    // A write sent to /v1/queries.
    let a = post_json(&n, "/v1/queries", &json!("DELETE FROM machines"));
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"], "statement is not readonly");
    // Unknown endpoint.
    assert_eq!(send("GET", &n.url("/v2/nothing"), &[], None).status, 404);
    assert_serving(&n);
}

#[test]
fn authorizer_refusals_are_403() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let other = dir.path().join("other.db");
    let refused = [
        format!("ATTACH DATABASE '{}' AS other", other.display()),
        format!("VACUUM INTO '{}'", dir.path().join("copy.db").display()),
        "VACUUM".to_string(),
        "SELECT load_extension('/tmp/nothing.so')".to_string(),
        "UPDATE patina_state SET merging = 1".to_string(),
        "DELETE FROM machines__patina_clock".to_string(),
        "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq) VALUES ('machines', x'01', 'name', 'x', 1, 1, x'00', 1, 0)".to_string(),
        "CREATE TABLE sneaky (id INTEGER PRIMARY KEY)".to_string(),
        "DROP TABLE machines".to_string(),
        "PRAGMA journal_mode = DELETE".to_string(),
        "SELECT crsql_as_table('machines')".to_string(),
        "SELECT patina_collect_tombstones('{}')".to_string(),
        "BEGIN".to_string(),
    ];
    for sql in &refused {
        let a = post_sql(&n, sql);
        assert_eq!(a.status, 403, "{sql}: {}", a.body);
        assert!(
            a.json()["error"]
                .as_str()
                .unwrap()
                .contains("not authorized"),
            "{sql}: {}",
            a.body
        );
        let a = post_json(&n, "/v1/transactions", &json!([sql]));
        assert_eq!(a.status, 403, "{sql}: {}", a.body);
        assert!(a.json()["results"][0]["error"].is_string());
    }
    assert!(!other.exists() && !dir.path().join("copy.db").exists());
    // Triggers still write the clock tables for an ordinary write.
    let a = post_sql(&n, "INSERT INTO machines (id) VALUES ('ok')");
    assert_eq!(a.status, 200, "{}", a.body);
    // Reading the change feed is allowed.
    let a = post_sql(
        &n,
        "SELECT count(*) FROM crsql_changes WHERE db_version > 0",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_serving(&n);
}

#[test]
fn token_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(&dir.path().join("node.db"), Some("s3cret"), MAX_BODY);
    let a = post_sql(&n, "SELECT 1");
    assert_eq!(a.status, 401);
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .contains("missing bearer token"));
    let a = send(
        "POST",
        &n.url("/sql"),
        &[
            ("Content-Type", "application/sql"),
            ("Authorization", "Bearer nope"),
        ],
        Some(b"SELECT 1"),
    );
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["error"], "wrong bearer token");
    let a = send(
        "POST",
        &n.url("/sql"),
        &[
            ("Content-Type", "application/sql"),
            ("Authorization", "Bearer s3cret"),
        ],
        Some(b"SELECT 1"),
    );
    assert_eq!(a.status, 200);
    assert_eq!(send("GET", &n.url("/metrics"), &[], None).status, 401);
}

#[test]
fn queries_stream_ndjson_with_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let mut s = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!(["SELECT 9223372036854775807 AS big, -9223372036854775808 AS small, 1.5 AS r, 'hé' AS t, x'00ff' AS b, NULL AS n, ? AS p", [[1, 2]]])),
    )
    .unwrap();
    assert_eq!(s.status, 200);
    let ev = s.until_eoq();
    assert_eq!(
        ev[0],
        json!({"columns": ["big", "small", "r", "t", "b", "n", "p"]})
    );
    assert_eq!(
        ev[1],
        json!({"row": [1, [9223372036854775807i64, -9223372036854775808i64, 1.5, "hé", [0, 255], null, [1, 2]]]})
    );
    assert!(ev[2]["eoq"]["time"].is_f64());
    assert!(s.next().is_none());
    // Unknown table: 400 {"error"} before any event.
    let err = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!("SELECT * FROM ghosts")),
    )
    .err()
    .unwrap();
    assert_eq!(err.status, 400);
    assert!(err.json()["error"]
        .as_str()
        .unwrap()
        .contains("no such table"));
}

#[test]
fn client_disconnecting_mid_stream_does_not_hurt_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    for _ in 0..12 {
        let mut s = Stream::open(
            "POST",
            &n.url("/v1/queries"),
            Some(&json!("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5000000) SELECT x, 'padding padding padding' FROM c")),
        )
        .unwrap();
        assert!(s.next().unwrap().get("columns").is_some());
        assert!(s.next().unwrap().get("row").is_some());
        drop(s);
    }
    // More aborted streams than reader slots: every slot came back.
    assert_serving(&n);
    let v = post_json(
        &n,
        "/v1/transactions",
        &json!(["INSERT INTO machines (id) VALUES ('after')"]),
    )
    .json();
    assert!(v["version"].is_i64());
    let mut s = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!("SELECT id FROM machines")),
    )
    .unwrap();
    assert_eq!(s.until_eoq().len(), 3);
}

#[test]
fn health_members_metrics_status() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let a = send("GET", &n.url("/v1/health"), &[], None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["response"]["ok"], true);
    let a = send("GET", &n.url("/v1/health?min_members=3"), &[], None);
    assert_eq!(a.status, 503);
    assert!(a.json()["error"]
        .as_str()
        .unwrap()
        .contains("min_members=3"));
    n.metrics.apply_queue_depth.set(50);
    assert_eq!(
        send("GET", &n.url("/v1/health?max_queue=10"), &[], None).status,
        503
    );
    assert_eq!(
        send("GET", &n.url("/v1/health?max_queue=100"), &[], None).status,
        200
    );
    // Corrosion's parameter names and summary.
    let a = send("GET", &n.url("/v1/health?gaps=0&queue_size=10"), &[], None);
    assert_eq!(a.status, 503);
    // Corrosion's HealthResponse: one key, `error` when unhealthy.
    assert_eq!(a.json().as_object().map(|o| o.len()), Some(1), "{}", a.body);
    assert!(a.json()["error"].as_str().unwrap().contains("max_queue=10"));
    assert_eq!(
        send("GET", &n.url("/v1/health?max_queue=abc"), &[], None).status,
        400
    );
    let v = send("GET", &n.url("/v1/members"), &[], None).json();
    assert_eq!(v["members"][0]["state"], "alive");
    assert!(v["members"][0]["addr"].is_string());
    let m = send("GET", &n.url("/metrics"), &[], None);
    assert_eq!(m.status, 200);
    for name in [
        "patina_changes_applied_total",
        "patina_changes_broadcast_total",
        "patina_sync_rounds_total",
        "patina_apply_queue_depth 50",
        "patina_members{state=\"alive\"} 1",
        "patina_apply_latency_seconds_count",
        "patina_api_requests_total{route=\"/v1/health\",status=\"503\"} 3",
        "patina_api_write_groups_total",
    ] {
        assert!(m.body.contains(name), "{name} missing from:\n{}", m.body);
    }
    let s = send("GET", &n.url("/v1/status"), &[], None).json();
    assert_eq!(s["site_id"].as_str().unwrap().len(), 32);
    assert!(s["db_version"].is_i64());
    assert_eq!(s["members"], 2, "the fixture's member and the node itself");
    let r = send("POST", &n.url("/v1/reload"), &[], None);
    assert_eq!(r.json()["tables"], json!(["machines"]));
}

/// The first change event of a stream, skipping nothing else.
fn change(s: &mut Stream) -> Value {
    let e = s.next().expect("stream ended");
    e.get("change")
        .cloned()
        .unwrap_or_else(|| panic!("not a change: {e}"))
}

#[test]
fn subscriptions_stream_changes_and_resume_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("node.db");
    let n = Node::start(&db, None, MAX_BODY);
    post_sql(&n, "INSERT INTO machines (id, status) VALUES ('m1', 'up')");
    let q = json!("SELECT id, status FROM machines ORDER BY id");
    let mut s = Stream::open("POST", &n.url("/v1/subscriptions"), Some(&q)).unwrap();
    let id = s.header("corro-query-id").expect("corro-query-id");
    assert!(s.header("corro-query-hash").is_some());
    let ev = s.until_eoq();
    assert_eq!(ev[0], json!({"columns": ["id", "status"]}));
    assert_eq!(ev[1], json!({"row": [1, ["m1", "up"]]}));
    assert_eq!(ev[2]["eoq"]["change_id"], 0);
    post_sql(&n, "INSERT INTO machines (id, status) VALUES ('m2', 'up')");
    assert_eq!(change(&mut s), json!(["insert", 2, ["m2", "up"], 1]));
    post_sql(&n, "UPDATE machines SET status = 'down' WHERE id = 'm1'");
    assert_eq!(change(&mut s), json!(["update", 1, ["m1", "down"], 2]));
    post_sql(&n, "DELETE FROM machines WHERE id = 'm2'");
    assert_eq!(change(&mut s), json!(["delete", 2, ["m2", "up"], 3]));
    // A writer that loads nothing (Debian's python3, plain sqlite3 module).
    let py = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3; c = sqlite3.connect({:?}, timeout=10); \
             c.execute(\"INSERT INTO machines (id, status) VALUES ('py', 'new')\"); c.commit()",
            db.display().to_string()
        ))
        .status()
        .unwrap();
    assert!(py.success());
    assert_eq!(change(&mut s), json!(["insert", 3, ["py", "new"], 4]));
    drop(s);
    // Same statement again: the same subscription.
    let mut again = Stream::open("POST", &n.url("/v1/subscriptions"), Some(&q)).unwrap();
    assert_eq!(again.header("corro-query-id").as_deref(), Some(id.as_str()));
    let ev = again.until_eoq();
    assert_eq!(ev.last().unwrap()["eoq"]["change_id"], 4);
    assert_eq!(ev.len(), 4, "{ev:?}");
    drop(again);
    // Changes while nobody listens, then resume from 2: exactly 3, 4, 5, 6.
    post_sql(&n, "UPDATE machines SET status = 'old' WHERE id = 'py'");
    post_sql(&n, "INSERT INTO machines (id, status) VALUES ('m5', 'up')");
    let mut r = Stream::open(
        "GET",
        &n.url(&format!("/v1/subscriptions/{id}?from=2")),
        None,
    )
    .unwrap();
    let ids: Vec<i64> = (0..4)
        .map(|_| change(&mut r)[3].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![3, 4, 5, 6]);
    drop(r);
    // Bad resumes.
    let e = Stream::open(
        "GET",
        &n.url(&format!("/v1/subscriptions/{id}?from=99")),
        None,
    )
    .err()
    .unwrap();
    assert_eq!(e.status, 400);
    let e = Stream::open("GET", &n.url("/v1/subscriptions/nope"), None)
        .err()
        .unwrap();
    assert_eq!(e.status, 404);
    let e = Stream::open(
        "POST",
        &n.url("/v1/subscriptions"),
        Some(&json!("DELETE FROM machines")),
    )
    .err()
    .unwrap();
    assert_eq!(e.status, 400);
    // Restart: the subscription and its log survive; a change made while the node was
    // down arrives as change 7.
    n.stop();
    let py = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3; c = sqlite3.connect({:?}, timeout=10); \
             c.execute(\"UPDATE machines SET status = 'back' WHERE id = 'm5'\"); c.commit()",
            db.display().to_string()
        ))
        .status()
        .unwrap();
    assert!(py.success());
    let n = Node::start(&db, None, MAX_BODY);
    let mut r = Stream::open(
        "GET",
        &n.url(&format!("/v1/subscriptions/{id}?from=5")),
        None,
    )
    .unwrap();
    assert_eq!(change(&mut r)[3], 6);
    let c = change(&mut r);
    assert_eq!(c, json!(["update", c[1].clone(), ["m5", "back"], 7]));
    post_sql(&n, "DELETE FROM machines WHERE id = 'm1'");
    assert_eq!(change(&mut r), json!(["delete", 1, ["m1", "down"], 8]));
}

#[test]
fn backup_carries_no_identity() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    post_sql(&n, "INSERT INTO machines (id) VALUES ('b1'), ('b2')");
    let site = send("GET", &n.url("/v1/status"), &[], None).json()["site_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = agent().post(&n.url("/v1/backup")).call().unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    let copy = dir.path().join("copy.db");
    std::fs::write(&copy, &bytes).unwrap();
    let c = patina_sidecar::db::open(
        &copy,
        &extension(),
        patina_sidecar::config::Synchronous::Normal,
    )
    .unwrap();
    let n_rows: i64 = c
        .query_row("SELECT count(*) FROM machines", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n_rows, 2);
    let s: Vec<u8> = c
        .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .unwrap();
    assert_ne!(hex::encode(s), site);
    // No temporary copy is left beside the database.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("backup"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn transactions_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let total = 2000;
    for conns in [1usize, 8] {
        let start = Instant::now();
        let per = total / conns;
        let handles: Vec<_> = (0..conns)
            .map(|c| {
                let url = n.url("/v1/transactions");
                std::thread::spawn(move || {
                    let agent = agent();
                    for i in 0..per {
                        let body = json!([[
                            "INSERT INTO machines (id, name) VALUES (?, ?)",
                            [format!("t{conns}-{c}-{i}"), "x"]
                        ]]);
                        let r = agent
                            .post(&url)
                            .set("Content-Type", "application/json")
                            .send_string(&body.to_string())
                            .unwrap();
                        assert_eq!(r.status(), 200);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!("THROUGHPUT /v1/transactions: {total} single-row writes over {conns} connection(s): {:.0}/s", total as f64 / secs);
    }
    let v = post_sql(&n, "SELECT count(*) FROM machines").json();
    assert_eq!(v["rows"], json!([[4000]]));
}

#[test]
fn concurrent_failing_requests_roll_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let handles: Vec<_> = (0..8)
        .map(|c| {
            let url = n.url("/v1/transactions");
            std::thread::spawn(move || {
                let agent = agent();
                for i in 0..40 {
                    let good = i % 2 == 0;
                    let mut body = vec![json!([
                        "INSERT INTO machines (id) VALUES (?)",
                        [format!("g{c}-{i}")]
                    ])];
                    if !good {
                        body.push(json!("INSERT INTO nowhere VALUES (1)"));
                    }
                    let r = agent
                        .post(&url)
                        .set("Content-Type", "application/json")
                        .send_string(&Value::Array(body).to_string());
                    match r {
                        Ok(r) => assert!(good, "a failing request answered {}", r.status()),
                        Err(ureq::Error::Status(400, _)) => assert!(!good),
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let v = post_sql(
        &n,
        "SELECT count(*), sum(CAST(substr(id, instr(id, '-') + 1) AS INTEGER) % 2) FROM machines",
    )
    .json();
    assert_eq!(v["rows"], json!([[160, 0]]));
}

#[test]
fn an_idle_subscription_catches_up_coalesced_and_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    let q = json!("SELECT id, status FROM machines");
    let mut s = Stream::open("POST", &n.url("/v1/subscriptions"), Some(&q)).unwrap();
    let id = s.header("corro-query-id").unwrap();
    s.until_eoq();
    post_sql(&n, "INSERT INTO machines (id) VALUES ('kept')");
    assert_eq!(change(&mut s)[3], 1);
    drop(s);
    wait_for("the stream to detach", || {
        send("GET", &n.url("/v1/status"), &[], None).json()["subscription_streams"] == 0
    });
    // While nobody listens: a row comes and goes, another is added.
    post_sql(&n, "INSERT INTO machines (id) VALUES ('brief')");
    post_sql(&n, "UPDATE machines SET status = 'x' WHERE id = 'brief'");
    post_sql(&n, "DELETE FROM machines WHERE id = 'brief'");
    post_sql(
        &n,
        "INSERT INTO machines (id, status) VALUES ('late', 'new')",
    );
    let mut r = Stream::open(
        "GET",
        &n.url(&format!("/v1/subscriptions/{id}?from=1")),
        None,
    )
    .unwrap();
    let c = change(&mut r);
    assert_eq!(c[0], "insert");
    assert_eq!(c[2], json!(["late", "new"]));
    assert_eq!(c[3], 2, "change ids stay contiguous: {c}");
    post_sql(&n, "UPDATE machines SET status = 'done' WHERE id = 'late'");
    assert_eq!(
        change(&mut r),
        json!(["update", c[1].clone(), ["late", "done"], 3])
    );
}

#[test]
fn a_subscription_without_its_keys_diffs_whole_rows() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(&dir);
    post_sql(&n, "INSERT INTO machines (id, name) VALUES ('k1', 'old')");
    let q = json!("SELECT name FROM machines");
    let mut s = Stream::open("POST", &n.url("/v1/subscriptions"), Some(&q)).unwrap();
    assert_eq!(s.until_eoq()[1], json!({"row": [1, ["old"]]}));
    post_sql(&n, "UPDATE machines SET name = 'new' WHERE id = 'k1'");
    let a = change(&mut s);
    let b = change(&mut s);
    let mut kinds = vec![a[0].clone(), b[0].clone()];
    kinds.sort_by_key(|k| k.to_string());
    assert_eq!(kinds, vec![json!("delete"), json!("insert")]);
    assert_eq!((a[3].clone(), b[3].clone()), (json!(1), json!(2)));
}
