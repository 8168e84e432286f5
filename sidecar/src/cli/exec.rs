//! `patina exec SQL`: runs statements on a node in one transaction (`POST /sql`).

use super::client::{cell, cells, table, Client};
use super::ExecArgs;

/// Runs `patina exec`.
pub fn run(args: ExecArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client);
    let v = client.json(
        "POST",
        "/sql",
        Some(("application/sql", args.sql.as_bytes())),
    )?;
    if let (Some(cols), Some(rows)) = (v["columns"].as_array(), v["rows"].as_array()) {
        let columns: Vec<String> = cols.iter().map(cell).collect();
        print!("{}", table(&columns, &cells(rows)));
    }
    println!(
        "rows_affected: {}, version: {}",
        v["rows_affected"],
        cell(&v["version"])
    );
    Ok(())
}
