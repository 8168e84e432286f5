//! `patina status`: a node's identity, version counter, members and queues
//! (`GET /v1/status`), one `key: value` per line, then its latencies in words, then how
//! stale it is on each origin (one row per origin).

use serde_json::Value;

use super::client::{cell, table, Client};
use super::StatusArgs;
use crate::http::latency::in_words;

/// How each latency of `/v1/status` reads in `patina status`.
const LATENCY_WORDS: &[(&str, &str)] = &[
    ("commit_to_applied", "commit→applied"),
    ("apply_batch", "apply batch"),
    ("api_request", "API request"),
    ("subscription_event", "subscription event"),
    ("sync_round", "sync round"),
];

/// Runs `patina status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let v = client.json("GET", "/v1/status", None)?;
    if let Some(obj) = v.as_object() {
        let width = obj.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in obj
            .iter()
            .filter(|(k, _)| *k != "latency" && *k != "staleness")
        {
            println!("{k:width$}  {}", cell(val));
        }
    }
    if let Some(lat) = v.get("latency").filter(|l| l.is_object()) {
        println!("latency:");
        let width = LATENCY_WORDS
            .iter()
            .map(|(_, w)| w.chars().count())
            .max()
            .unwrap_or(0);
        for (key, words) in LATENCY_WORDS {
            let pad = width - words.chars().count();
            println!("  {words}{:pad$}  {}", "", in_words(&lat[*key]));
        }
    }
    if let Some(rows) = v.get("staleness").and_then(Value::as_array) {
        println!("staleness:");
        print!("{}", staleness_table(rows));
    }
    Ok(())
}

/// The per-origin staleness rows of `/v1/status` as an aligned table, this node marked.
fn staleness_table(rows: &[Value]) -> String {
    let columns: Vec<String> = ["origin", "known", "held", "missing", "silent"]
        .map(String::from)
        .to_vec();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let site = r["site_id"].as_str().unwrap_or("?");
            let me = if r["is_self"].as_bool() == Some(true) {
                " (this node)"
            } else {
                ""
            };
            let silent = match (r["is_self"].as_bool(), r["silent_secs"].as_f64()) {
                (Some(true), _) => "-".to_string(),
                (_, Some(s)) if r["last_heard_ms"].is_null() => format!("{s:.0} s (never)"),
                (_, Some(s)) => format!("{s:.1} s"),
                _ => "?".to_string(),
            };
            let held = if r["newest_held"] != r["held_version"] {
                format!(
                    "{} (newest {})",
                    cell(&r["held_version"]),
                    cell(&r["newest_held"])
                )
            } else {
                cell(&r["held_version"])
            };
            vec![
                format!("{site}{me}"),
                cell(&r["known_version"]),
                held,
                cell(&r["missing"]),
                silent,
            ]
        })
        .collect();
    let text = table(&columns, &cells);
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_rows_read_as_a_table() {
        let rows: Vec<Value> = serde_json::from_str(
            r#"[{"site_id":"aa","is_self":true,"known_version":9,"held_version":9,
                 "newest_held":9,"held_count":9,"missing":0,"last_heard_ms":null,
                 "silent_secs":0.0},
                {"site_id":"bb","is_self":false,"known_version":12,"held_version":4,
                 "newest_held":8,"held_count":6,"missing":6,"last_heard_ms":1000,
                 "silent_secs":2.5}]"#,
        )
        .expect("json");
        let t = staleness_table(&rows);
        assert!(t.contains("aa (this node)"), "{t}");
        assert!(t.contains("4 (newest 8)") && t.contains("2.5 s"), "{t}");
    }
}
