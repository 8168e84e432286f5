//! `patina reload` (API helper fills this in).

use super::ReloadArgs;

/// Runs `patina reload`.
pub fn run(_args: ReloadArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina reload: not implemented yet")
}
