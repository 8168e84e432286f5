//! `patina reload`: re-applies a node's schema files (`POST /v1/reload`).

use serde_json::Value;

use super::client::Client;
use super::ReloadArgs;

/// Runs `patina reload`.
pub fn run(args: ReloadArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let v = client.json("POST", "/v1/reload", None)?;
    let tables: Vec<&str> = v["tables"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!("reloaded schema; replicated tables: {}", tables.join(", "));
    Ok(())
}
