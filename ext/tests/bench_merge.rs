//! Merge throughput driven through rusqlite, as the sidecar drives it (no Python driver
//! in the measurement). Ignored by default; it asserts nothing about time:
//!
//! ```sh
//! cargo build --release -p patina
//! cargo test --release -p patina --test bench_merge -- --ignored --nocapture
//! PATINA_BENCH_SO=/tmp/old/libpatina.so cargo test --release -p patina --test bench_merge -- --ignored --nocapture
//! ```
//! `PATINA_BENCH_ROWS` (default 100000: 300k changes) and `PATINA_BENCH_RUNS` (default 3)
//! change the size and the number of runs (medians are printed).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node(path: &Path) -> Connection {
    let c = open_plain(path);
    let so = std::env::var("PATINA_BENCH_SO")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| ext_path());
    unsafe {
        c.load_extension_enable().unwrap();
        c.load_extension(so, Some("sqlite3_patina_init")).unwrap();
    }
    c.execute_batch(
        "PRAGMA synchronous = NORMAL;
         CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, a, b, c); SELECT crsql_as_crr('t');",
    )
    .unwrap();
    c
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// How the changes are written into `crsql_changes`.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// One INSERT per change (cr-sqlite's documented way).
    PerChange,
    /// One INSERT per change under `merging = 1`, then `patina_flush()`.
    Batched,
    /// One INSERT of a `patina_batch` blob holding every change (the node's path).
    Batch,
}

fn merge_all(c: &Connection, feed: &[ChangeRow], path: Via, blob: &[u8]) -> Duration {
    let t = Instant::now();
    c.execute_batch("BEGIN").unwrap();
    if path == Via::Batch {
        c.execute(
            "INSERT INTO crsql_changes (patina_batch) VALUES (?1)",
            [blob],
        )
        .unwrap();
        c.execute_batch("COMMIT").unwrap();
        return t.elapsed();
    }
    let batched = path == Via::Batched;
    if batched {
        c.execute_batch("UPDATE patina_state SET merging = 1")
            .unwrap();
    }
    merge(c, feed);
    if batched {
        c.execute_batch("SELECT patina_flush(); UPDATE patina_state SET merging = 0")
            .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    t.elapsed()
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture on a release build"]
fn merge_throughput() {
    let rows = env("PATINA_BENCH_ROWS", 100_000);
    let runs = env("PATINA_BENCH_RUNS", 3);
    let dir = tempfile::tempdir().unwrap();
    let src = node(&dir.path().join("src.db"));
    {
        src.execute_batch("BEGIN").unwrap();
        let mut s = src
            .prepare("INSERT INTO t VALUES (?1, ?1, ?2, ?3)")
            .unwrap();
        for i in 0..rows as i64 {
            s.execute(rusqlite::params![i, format!("text {i}"), i as f64 * 0.5])
                .unwrap();
        }
        src.execute_batch("COMMIT").unwrap();
    }
    let feed = changes_after(&src, 0);
    let blob = pack_batch(&src, &feed);
    for (name, path) in [
        ("per change", Via::PerChange),
        ("batched", Via::Batched),
        ("one patina_batch", Via::Batch),
    ] {
        if std::env::var("PATINA_BENCH_ONLY").is_ok_and(|o| o != name) {
            continue;
        }
        let mut times = Vec::new();
        for run in 0..runs {
            let c = node(&dir.path().join(format!("dst-{name}-{run}.db")));
            times.push(merge_all(&c, &feed, path, &blob));
            assert_eq!(
                one::<i64>(&c, "SELECT count(*) FROM t"),
                rows as i64,
                "every row merged"
            );
            assert_eq!(
                converging_state(&c),
                converging_state(&src),
                "same rows and clocks"
            );
        }
        println!(
            "merge {} changes ({} rows), {name}: median {:.0} ms of {runs}",
            feed.len(),
            rows,
            median(times).as_secs_f64() * 1000.0
        );
    }
}
