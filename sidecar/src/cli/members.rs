//! `patina members`: the cluster members a node sees (`GET /v1/members`).

use serde_json::Value;

use super::client::{cell, table, Client};
use super::MembersArgs;

/// Runs `patina members`.
pub fn run(args: MembersArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let v = client.json("GET", "/v1/members", None)?;
    let columns: Vec<String> = ["site_id", "addr", "state", "rtt_ms"]
        .map(String::from)
        .to_vec();
    let rows: Vec<Vec<String>> = v["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    columns
                        .iter()
                        .map(|c| {
                            let v = cell(m.get(c).unwrap_or(&Value::Null));
                            if c == "state" && m["self"] == Value::Bool(true) {
                                format!("{v} (this node)")
                            } else {
                                v
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    print!("{}", table(&columns, &rows));
    Ok(())
}
