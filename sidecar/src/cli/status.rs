//! `patina status`: a node's identity, version counter, members and queues
//! (`GET /v1/status`), one `key: value` per line, then its latencies in words.

use super::client::{cell, Client};
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
        for (k, val) in obj.iter().filter(|(k, _)| *k != "latency") {
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
    Ok(())
}
