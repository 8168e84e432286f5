//! `patina status`: a node's identity, version counter, members and queues
//! (`GET /v1/status`), one `key: value` per line.

use super::client::{cell, Client};
use super::StatusArgs;

/// Runs `patina status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let v = client.json("GET", "/v1/status", None)?;
    if let Some(obj) = v.as_object() {
        let width = obj.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in obj {
            println!("{k:width$}  {}", cell(val));
        }
    }
    Ok(())
}
