//! The client subcommands (`patina exec|query|members|status|reload|backup|restore`) as
//! processes against an API served in this process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::{extension, Node};

#[test]
fn cli_subcommands_talk_to_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(&dir.path().join("node.db"), None, 64 * 1024);
    let api = n.addr.to_string();
    let patina = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_patina"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, err) = patina(&[
        "exec",
        "--api",
        &api,
        "INSERT INTO machines (id, name) VALUES ('c1', 'alpha'), ('c2', 'beta')",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("rows_affected: 2"), "{out}");
    let (ok, out, err) = patina(&[
        "query",
        "--api",
        &api,
        "SELECT id, name FROM machines ORDER BY id",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("id") && lines[0].contains("name"),
        "{out}"
    );
    assert!(out.contains("c1") && out.contains("beta"), "{out}");
    let (ok, out, _) = patina(&[
        "query",
        "--api",
        &api,
        "--json",
        "SELECT id FROM machines ORDER BY id",
    ]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rows"], json!([["c1"], ["c2"]]));
    let (ok, _, err) = patina(&["query", "--api", &api, "SELECT * FROM ghosts"]);
    assert!(!ok);
    assert!(err.contains("no such table"), "{err}");
    let (ok, out, err) = patina(&["status", "--api", &api]);
    assert!(ok, "{err}");
    assert!(out.contains("site_id"), "{out}");
    let (ok, out, err) = patina(&["members", "--api", &api]);
    assert!(ok, "{err}");
    assert!(out.contains("alive"), "{out}");
    let (ok, out, err) = patina(&["reload", "--api", &api]);
    assert!(ok, "{err}");
    assert!(out.contains("machines"), "{out}");
    let backup = dir.path().join("b.db");
    let (ok, _, err) = patina(&["backup", "--api", &api, backup.to_str().unwrap()]);
    assert!(ok, "{err}");
    // restore refuses while a node answers on --api.
    let target = dir.path().join("restored.db");
    let (ok, _, err) = patina(&[
        "restore",
        "--api",
        &api,
        "--db-path",
        target.to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("answers"), "{err}");
    // Unreachable node: clear error, non-zero exit.
    let (ok, _, err) = patina(&["status", "--api", "127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    drop(n);
    let (ok, _, err) = patina(&[
        "restore",
        "--api",
        &api,
        "--db-path",
        target.to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let c = patina_sidecar::db::open(
        &target,
        &extension(),
        patina_sidecar::config::Synchronous::Normal,
    )
    .unwrap();
    let k: i64 = c
        .query_row("SELECT count(*) FROM machines", [], |r| r.get(0))
        .unwrap();
    assert_eq!(k, 2);
    let restored_site: Vec<u8> = c
        .query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .unwrap();
    drop(c);
    let backup_site = site_of(&backup);
    assert_ne!(
        restored_site, backup_site,
        "restore must give a fresh site id"
    );
    // --keep-site-id keeps the backup's.
    let (ok, _, err) = patina(&[
        "restore",
        "--api",
        &api,
        "--keep-site-id",
        "--db-path",
        target.to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(site_of(&target), backup_site);
    // A process holding the database's write lock: refused, file untouched.
    let mut holder = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('locked', flush=True)\n\
             sys.stdin.read()",
        )
        .arg(&target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let (ok, _, err) = patina(&[
        "restore",
        "--api",
        &api,
        "--db-path",
        target.to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("locked"), "{err}");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert_eq!(site_of(&target), backup_site);
}

/// `crsql_site_id()` of a database file.
fn site_of(db: &std::path::Path) -> Vec<u8> {
    let c = patina_sidecar::db::open(
        db,
        &extension(),
        patina_sidecar::config::Synchronous::Normal,
    )
    .unwrap();
    c.query_row("SELECT crsql_site_id()", [], |r| r.get(0))
        .unwrap()
}
