//! `patina restore` (API helper fills this in).

use super::RestoreArgs;

/// Runs `patina restore`.
pub fn run(_args: RestoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina restore: not implemented yet")
}
