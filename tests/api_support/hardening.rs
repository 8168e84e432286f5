//! Issue 7, the API side: values that are not valid UTF-8 are never answered altered,
//! runaway queries stop at `api.query_timeout` and when their client leaves, overload is a
//! fast 503, huge results are refused by `api.max_result_bytes` with bounded memory, NUL
//! bytes in SQL text are refused with their offset, `patina_new_site_id()` is refused by
//! name. Runaway and memory attacks run against real `patina agent` processes; the
//! figures they measure (latency of the 503, CPU after the attack, peak RSS) are printed.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::agent::Agent;
use super::{post_json, post_sql, wait_for, Node, Stream, Url};

const RUNAWAY: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) \
                       SELECT count(*) FROM c";

/// Inserts a row whose `name` is TEXT holding the bytes FF 00 FE (not UTF-8).
fn insert_bad_text(n: &impl Url, id: &str) {
    let a = post_json(
        n,
        "/v1/transactions",
        &json!([[
            "INSERT INTO machines (id, name) VALUES (?, CAST(X'FF00FE' AS TEXT))",
            [id]
        ]]),
    );
    assert_eq!(a.status, 200, "{}", a.body);
}

/// The error names the column and says how to read it as bytes.
fn assert_names_column(msg: &str) {
    assert!(msg.contains("\"name\""), "{msg}");
    assert!(msg.contains("not valid UTF-8"), "{msg}");
    assert!(msg.contains("CAST(name AS BLOB)"), "{msg}");
    assert!(!msg.contains('\u{FFFD}'), "{msg}");
}

#[test]
fn text_that_is_not_utf8_is_never_answered_altered() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(&dir.path().join("node.db"), None, 64 * 1024);
    let a = post_sql(
        &n,
        "INSERT INTO machines (id, name) VALUES ('a-good', 'fine')",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    insert_bad_text(&n, "b-bad");

    // /sql: 400 naming the column; nothing of the request applied.
    let a = post_sql(
        &n,
        "UPDATE machines SET status = 'x' WHERE id = 'a-good'; \
         SELECT id, name FROM machines ORDER BY id",
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert_names_column(a.json()["error"].as_str().unwrap());
    let a = post_sql(&n, "SELECT status FROM machines WHERE id = 'a-good'");
    assert_eq!(
        a.json()["rows"],
        json!([["unknown"]]),
        "the failed request wrote"
    );
    // Read as bytes, the value is exact.
    let a = post_sql(
        &n,
        "SELECT CAST(name AS BLOB), hex(name) FROM machines WHERE id = 'b-bad'",
    );
    assert_eq!(
        a.json()["rows"],
        json!([[[255, 0, 254], "FF00FE"]]),
        "{}",
        a.body
    );

    // /v1/queries: bad first row → 400; bad later row → an error event ends the stream.
    let e = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!("SELECT name FROM machines WHERE id = 'b-bad'")),
    )
    .err()
    .expect("a 400");
    assert_eq!(e.status, 400, "{}", e.body);
    assert_names_column(e.json()["error"].as_str().unwrap());
    let mut s = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!("SELECT id, name FROM machines ORDER BY id")),
    )
    .unwrap();
    assert_eq!(s.next().unwrap()["columns"], json!(["id", "name"]));
    assert_eq!(s.next().unwrap()["row"], json!([1, ["a-good", "fine"]]));
    let ev = s.next().unwrap();
    assert_names_column(ev["error"].as_str().unwrap());
    assert!(s.next().is_none());

    // /v1/subscriptions: refused when created over such a row.
    let e = Stream::open(
        "POST",
        &n.url("/v1/subscriptions"),
        Some(&json!("SELECT id, name FROM machines")),
    )
    .err()
    .expect("a 400");
    assert_eq!(e.status, 400, "{}", e.body);
    assert_names_column(e.json()["error"].as_str().unwrap());

    // A live subscription: the change that would carry such a value ends the stream
    // with an error event; resuming it is refused the same way.
    let q = json!("SELECT id, name FROM machines WHERE id LIKE 'c%'");
    let mut sub = Stream::open("POST", &n.url("/v1/subscriptions"), Some(&q)).unwrap();
    let id = sub.header("corro-query-id").unwrap();
    let ev = sub.until_eoq();
    assert_eq!(ev.len(), 2, "{ev:?}");
    let a = post_sql(
        &n,
        "INSERT INTO machines (id, name) VALUES ('c-good', 'ok')",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let ev = sub.next().unwrap();
    assert_eq!(ev["change"][2], json!(["c-good", "ok"]), "{ev}");
    insert_bad_text(&n, "c-bad");
    let ev = sub.next().unwrap();
    assert_names_column(ev["error"].as_str().unwrap());
    assert!(sub.next().is_none());
    let e = Stream::open(
        "GET",
        &n.url(&format!("/v1/subscriptions/{id}?from=1")),
        None,
    )
    .err()
    .expect("a 400");
    assert_eq!(e.status, 400, "{}", e.body);
    assert_names_column(e.json()["error"].as_str().unwrap());

    // `patina query` fails loudly instead of printing U+FFFD.
    let o = Command::new(env!("CARGO_BIN_EXE_patina"))
        .args(["query", "--api", &n.addr.to_string()])
        .arg("SELECT name FROM machines WHERE id = 'b-bad'")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("CAST(name AS BLOB)"), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains('\u{FFFD}'));
}

#[test]
fn a_nul_byte_in_sql_text_is_refused_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(&dir.path().join("node.db"), None, 64 * 1024);
    let first = "INSERT INTO machines (id) VALUES ('n1');";
    let body = format!("{first}\0INSERT INTO machines (id) VALUES ('n2');");
    let a = post_sql(&n, &body);
    assert_eq!(a.status, 400, "{}", a.body);
    let msg = a.json()["error"].as_str().unwrap().to_owned();
    assert!(
        msg.contains(&format!("NUL byte at offset {}", first.len())),
        "{msg}"
    );
    let a = post_sql(&n, "SELECT count(*) FROM machines");
    assert_eq!(a.json()["rows"], json!([[0]]), "something was written");
    // The same through JSON strings.
    let a = post_json(&n, "/v1/transactions", &json!([body]));
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("NUL byte at offset"), "{}", a.body);
    let e = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!("SELECT 1;\u{0}SELECT 2")),
    )
    .err()
    .expect("a 400");
    assert_eq!(e.status, 400, "{}", e.body);
    let a = post_sql(&n, "SELECT count(*) FROM machines");
    assert_eq!(a.json()["rows"], json!([[0]]), "something was written");
}

#[test]
fn patina_new_site_id_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(&dir.path().join("node.db"), None, 64 * 1024);
    let a = post_sql(&n, "SELECT patina_new_site_id()");
    assert_eq!(a.status, 403, "{}", a.body);
    let msg = a.json()["error"].as_str().unwrap().to_owned();
    assert!(msg.contains("patina_new_site_id()"), "{msg}");
    assert!(!msg.contains("transaction control"), "{msg}");
}

#[test]
fn huge_results_are_refused_by_max_result_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(&dir.path().join("node.db"), None, 64 * 1024);
    // Past the limit: 400 naming it, and the request's write is rolled back.
    let a = post_sql(
        &n,
        "INSERT INTO machines (id) VALUES ('big'); SELECT randomblob(40000000)",
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("api.max_result_bytes"), "{}", a.body);
    let a = post_sql(&n, "SELECT count(*) FROM machines");
    assert_eq!(a.json()["rows"], json!([[0]]), "the failed request wrote");
    // Many rows add up the same way.
    let a = post_sql(
        &n,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 200000) \
         SELECT x, printf('%040d', x) FROM c",
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("api.max_result_bytes"), "{}", a.body);
    // A stream refuses a value larger than the limit (SQLite refuses to build it).
    let e = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!("SELECT randomblob(40000000)")),
    )
    .err()
    .expect("a 400");
    assert_eq!(e.status, 400, "{}", e.body);
    assert!(e.body.contains("too big"), "{}", e.body);
    // Under the limit, blobs still come back exact.
    let a = post_sql(&n, "SELECT length(randomblob(1000000)), X'00FF'");
    assert_eq!(a.json()["rows"], json!([[1000000, [0, 255]]]), "{}", a.body);
    let a = post_sql(&n, "SELECT zeroblob(100000)");
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["rows"][0][0].as_array().unwrap().len(), 100000);
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A field of /proc/PID/status in kB (`VmHWM`, `VmRSS`).
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Posts a query with a client-side timeout; `None` when the client gave up.
fn query_with_timeout(n: &impl Url, sql: &str, timeout: Duration) -> Option<(u16, String)> {
    let res = ureq::AgentBuilder::new()
        .timeout(timeout)
        .build()
        .post(&n.url("/v1/queries"))
        .set("Content-Type", "application/json")
        .send_string(&Value::String(sql.into()).to_string());
    let r = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(_) => return None,
    };
    let status = r.status();
    r.into_string().ok().map(|b| (status, b))
}

/// Waits until the node's CPU time stops growing (≤ 20 ticks, 0.2 core, over a second; the attack burns 200), printing it.
fn wait_cpu_quiet(pid: u32, what: &str) {
    let mut samples = 0;
    wait_for(what, || {
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(1));
        let grew = cpu_ticks(pid) - before;
        samples += 1;
        println!("{what}: node CPU grew {grew} ticks in 1 s (sample {samples})");
        grew <= 20
    });
}

#[test]
fn runaway_queries_stop_at_the_limit_and_overload_is_a_fast_503() {
    let mut a = Agent::new("runaway", &[]);
    // Long enough, and attackers enough, that eight of them hold every slot at once even
    // on a loaded 2-core machine running the other tests beside this one.
    a.extra = vec!["--api-query-timeout".into(), "10s".into()];
    a.start();
    let pid = a.pid().unwrap();
    let url_base = a.url("");
    let attackers: Vec<_> = (0..16)
        .map(|_| {
            let base = url_base.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let n = Base(base);
                let r = query_with_timeout(&n, RUNAWAY, Duration::from_secs(60));
                (r, start.elapsed())
            })
        })
        .collect();
    // While every reader slot is taken: a normal query gets a 503 quickly, never hangs;
    // health, members and metrics do not wait on a slot. The attackers beyond the eighth
    // are such queries too, so on a machine too loaded for a probe to land inside the
    // attack window their answers are the evidence (checked when they are joined).
    let attack = Instant::now();
    let mut fast_503 = None;
    let mut probes_200 = Vec::new();
    while fast_503.is_none() && attack.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        let r = query_with_timeout(&a, "SELECT 1", Duration::from_secs(20));
        let took = t.elapsed();
        match r {
            Some((503, body)) => {
                assert!(body.contains("overloaded"), "{body}");
                fast_503 = Some(took);
            }
            Some((200, _)) => probes_200.push(took),
            other => panic!("unexpected answer during the attack: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("probes answered 200 before any 503: {probes_200:?}; 503 in {fast_503:?}");
    if let Some(took) = fast_503 {
        assert!(took < Duration::from_secs(2), "503 took {took:?}");
    }
    for path in ["/v1/health", "/v1/members", "/metrics"] {
        let t = Instant::now();
        let r = super::send("GET", &a.url(path), &[], None);
        println!(
            "{path} during the attack: {} in {:?}",
            r.status,
            t.elapsed()
        );
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let mut timed_out = 0;
    let mut turned_away = 0;
    for t in attackers {
        let (r, took) = t.join().unwrap();
        match r {
            Some((400, body)) => {
                assert!(body.contains("api.query_timeout"), "{body}");
                timed_out += 1;
                println!("runaway query ended after {took:?}: {body}");
            }
            Some((503, body)) => {
                assert!(body.contains("overloaded"), "{body}");
                assert!(
                    took < Duration::from_secs(2),
                    "an overload 503 took {took:?}"
                );
                turned_away += 1;
            }
            other => panic!("a runaway query ended with {other:?} after {took:?}"),
        }
    }
    assert!(timed_out >= 1, "no runaway query ran into the limit");
    assert!(
        fast_503.is_some() || turned_away >= 1,
        "no request was answered 503 while every reader was busy"
    );
    // The slots are free again and the CPU is too.
    let r = query_with_timeout(&a, "SELECT 1", Duration::from_secs(20));
    assert_eq!(r.map(|x| x.0), Some(200));
    wait_cpu_quiet(pid, "CPU freed after the runaway queries");
    // A runaway write statement through /sql is stopped too (it would hold the write lock).
    let r = post_sql(&a, &format!("INSERT INTO machines (id) {RUNAWAY}"));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("api.query_timeout"), "{}", r.body);
    let r = post_sql(&a, "SELECT count(*) FROM machines");
    assert_eq!(r.json()["rows"], json!([[0]]), "{}", r.body);
    // Several at once: they do not add up to a queue that hangs every writer. Whatever
    // waited longer than the limit for the writer is answered 503 unrun.
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let base = Base(a.url(""));
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = post_sql(&base, &format!("INSERT INTO machines (id) {RUNAWAY}"));
                (r, t.elapsed())
            })
        })
        .collect();
    let mut busy = 0;
    for t in writers {
        let (r, took) = t.join().unwrap();
        println!("runaway /sql: {} after {took:?}", r.status);
        match r.status {
            400 => assert!(r.body.contains("api.query_timeout"), "{}", r.body),
            503 => {
                assert!(r.body.contains("writer is busy"), "{}", r.body);
                busy += 1;
            }
            s => panic!("runaway /sql answered {s}: {}", r.body),
        }
    }
    assert!(busy >= 1, "no queued runaway write was turned away");
    let r = post_sql(&a, "INSERT INTO machines (id) VALUES ('after')");
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn a_client_leaving_stops_its_query() {
    let mut a = Agent::new("leaving", &[]);
    // A limit far away: only cancellation can free the slots in time.
    a.extra = vec!["--api-query-timeout".into(), "10m".into()];
    a.start();
    let pid = a.pid().unwrap();
    let leavers: Vec<_> = (0..8)
        .map(|_| {
            let base = Base(a.url(""));
            std::thread::spawn(move || {
                query_with_timeout(&base, RUNAWAY, Duration::from_millis(500))
            })
        })
        .collect();
    let leaver_sql = {
        let base = Base(a.url(""));
        std::thread::spawn(move || {
            ureq::AgentBuilder::new()
                .timeout(Duration::from_millis(500))
                .build()
                .post(&base.url("/sql"))
                .set("Content-Type", "application/sql")
                .send_string(RUNAWAY)
                .is_err()
        })
    };
    for t in leavers {
        assert!(t.join().unwrap().is_none(), "a runaway query answered");
    }
    assert!(leaver_sql.join().unwrap(), "the runaway /sql answered");
    wait_cpu_quiet(pid, "CPU freed after the clients left");
    let r = query_with_timeout(&a, "SELECT 1", Duration::from_secs(20));
    assert_eq!(r.map(|x| x.0), Some(200));
    let r = post_sql(&a, "SELECT 2");
    assert_eq!(r.status, 200, "{}", r.body);
    // Clients leaving mid-stream, while the query computes between two rows.
    let sparse = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) \
                  SELECT x FROM c WHERE x % 1000000000 = 1";
    for _ in 0..8 {
        let mut s = Stream::open("POST", &a.url("/v1/queries"), Some(&json!(sparse))).unwrap();
        assert!(s.next().unwrap().get("columns").is_some());
        assert_eq!(s.next().unwrap()["row"], json!([1, [1]]));
        drop(s);
    }
    wait_cpu_quiet(pid, "CPU freed after the clients left mid-stream");
    let r = query_with_timeout(&a, "SELECT 3", Duration::from_secs(20));
    assert_eq!(r.map(|x| x.0), Some(200));
}

#[test]
fn randomblob_through_sql_stays_in_bounded_memory() {
    let mut a = Agent::new("memory", &[]);
    a.start();
    let pid = a.pid().unwrap();
    let before = status_kb(pid, "VmHWM");
    let t = Instant::now();
    let r = post_sql(&a, "SELECT randomblob(40000000)");
    let took = t.elapsed();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("api.max_result_bytes"), "{}", r.body);
    let peak_one = status_kb(pid, "VmHWM");
    // Many at once, each just under the default limit of 8 MiB as JSON: the node-wide
    // answer budget turns the excess away with 503 instead of holding them all.
    let many: Vec<_> = (0..16)
        .map(|_| {
            let base = Base(a.url(""));
            std::thread::spawn(move || post_sql(&base, "SELECT randomblob(2200000)").status)
        })
        .collect();
    let mut statuses = Vec::new();
    for t in many {
        let s = t.join().unwrap();
        assert!(s == 200 || s == 400 || s == 503, "{s}");
        statuses.push(s);
    }
    let peak = status_kb(pid, "VmHWM");
    println!(
        "randomblob(40000000) through /sql: {} in {took:?}; peak RSS {} MB before, {} MB \
         after it, {} MB after 16 concurrent ~8 MiB answers (statuses {statuses:?})",
        r.status,
        before / 1024,
        peak_one / 1024,
        peak / 1024
    );
    assert!(peak <= 150 * 1024, "peak RSS {} MB", peak / 1024);
    let r = post_sql(&a, "SELECT 1");
    assert_eq!(r.status, 200);
}

/// A base URL (to move into threads).
struct Base(String);

impl Url for Base {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.0, path)
    }
}

#[test]
fn a_column_name_that_is_not_utf8_is_refused_not_a_dropped_connection() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("node.db");
    {
        // An app may give a column any bytes for a name; SQL text cannot, so write the
        // schema directly.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE weird (id INTEGER PRIMARY KEY, x TEXT);
             INSERT INTO weird VALUES (1, 'a');
             PRAGMA writable_schema = ON;
             UPDATE sqlite_master
                SET sql = 'CREATE TABLE weird (id INTEGER PRIMARY KEY, ' ||
                          CAST(X'FF78' AS TEXT) || ' TEXT)'
              WHERE name = 'weird';
             PRAGMA writable_schema = OFF;",
        )
        .unwrap();
    }
    let n = Node::start(&db, None, 64 * 1024);
    // rusqlite's authorizer hook cannot pass such a name on and denies the statement.
    let a = post_sql(&n, "SELECT * FROM weird");
    assert_eq!(a.status, 403, "{}", a.body);
    let e = Stream::open(
        "POST",
        &n.url("/v1/queries"),
        Some(&json!("SELECT * FROM weird")),
    )
    .err()
    .expect("refused");
    assert_eq!(e.status, 403, "{}", e.body);
    let a = post_sql(&n, "SELECT id FROM weird");
    assert_eq!(a.json()["rows"], json!([[1]]), "{}", a.body);
}
