//! `patina query` (API helper fills this in).

use super::QueryArgs;

/// Runs `patina query`.
pub fn run(_args: QueryArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina query: not implemented yet")
}
