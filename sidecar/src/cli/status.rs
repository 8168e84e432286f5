//! `patina status` (API helper fills this in).

use super::StatusArgs;

/// Runs `patina status`.
pub fn run(_args: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina status: not implemented yet")
}
