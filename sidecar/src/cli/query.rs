//! `patina query SQL`: a read-only query (`POST /v1/queries`), printed as an aligned table
//! or, with `--json`, as `{"columns": [...], "rows": [[...]]}`.

use std::io::{BufRead, BufReader};

use anyhow::{anyhow, Context};
use serde_json::{json, Value};

use super::client::{cell, cells, table, Client};
use super::QueryArgs;

/// Runs `patina query`.
pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let body = Value::String(args.sql.clone()).to_string();
    let r = client.send(
        "POST",
        "/v1/queries",
        Some(("application/json", body.as_bytes())),
    )?;
    let mut columns: Vec<String> = Vec::new();
    let mut rows: Vec<Value> = Vec::new();
    let mut finished = false;
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.with_context(|| format!("reading the query stream from {}", client.api))?;
        if line.trim().is_empty() {
            continue;
        }
        let ev: Value = serde_json::from_str(&line)
            .with_context(|| format!("bad event from {}: {line}", client.api))?;
        if let Some(c) = ev.get("columns").and_then(Value::as_array) {
            columns = c.iter().map(cell).collect();
        } else if let Some(row) = ev.get("row") {
            rows.push(row.get(1).cloned().unwrap_or(Value::Null));
        } else if ev.get("eoq").is_some() {
            finished = true;
        } else if let Some(e) = ev.get("error") {
            return Err(anyhow!("query failed on {}: {}", client.api, cell(e)));
        }
    }
    if !finished {
        return Err(anyhow!("the query stream from {} ended early", client.api));
    }
    if args.json {
        println!("{}", json!({ "columns": columns, "rows": rows }));
    } else {
        print!("{}", table(&columns, &cells(&rows)));
    }
    Ok(())
}
