//! `patina exec` (API helper fills this in).

use super::ExecArgs;

/// Runs `patina exec`.
pub fn run(_args: ExecArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina exec: not implemented yet")
}
