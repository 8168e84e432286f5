//! The extension in real hosts: the system `sqlite3` shell (`.load`) running the SQL
//! scripts of `sql/tests/` against their expected output, and Debian's `/usr/bin/python3`
//! as an app that writes a replicated table without loading anything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

fn require(tool: &str) {
    assert!(
        Path::new(tool).exists() || Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map(|o| o.status.success()).unwrap_or(false),
        "{tool} is required for this test: apt-get install sqlite3 python3 (scripts/test installs them)"
    );
}

#[test]
fn sqlite3_shell_scripts_match_expected_output() {
    require("sqlite3");
    let so = common::ext_path();
    let lib = so.with_extension(""); // `.load` adds the suffix itself, as a person would type it
    let dir = repo().join("sql/tests");
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).expect("sql/tests").flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("sql") {
            continue;
        }
        let script = std::fs::read_to_string(&path).expect("script");
        let expected =
            std::fs::read_to_string(path.with_extension("expected")).expect("expected output");
        let input = format!(".load {}\n{script}", lib.display());
        // One stream, as a person sees it: errors interleaved with results.
        let mut child = Command::new("sh")
            .args(["-c", "exec sqlite3 :memory: 2>&1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sqlite3");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write script");
        let out = child.wait_with_output().expect("sqlite3 output");
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(got, expected, "{}", path.display());
        ran += 1;
    }
    assert!(ran >= 2, "no scripts found in {}", dir.display());
}

#[test]
fn python_app_that_loads_nothing_is_captured() {
    require("/usr/bin/python3");
    let out = Command::new("/usr/bin/python3")
        .arg(repo().join("tests/python/app_without_extension.py"))
        .arg(common::ext_path())
        .output()
        .expect("run /usr/bin/python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" passed, 0 failed"), "{text}");
}

#[test]
fn loads_into_rusqlites_bundled_sqlite_too() {
    let c = common::memory();
    let v: String = c
        .query_row(
            "SELECT patina_version() || ' on ' || sqlite_version()",
            [],
            |r| r.get(0),
        )
        .expect("version");
    assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
}
