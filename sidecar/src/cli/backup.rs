//! `patina backup` (API helper fills this in).

use super::BackupArgs;

/// Runs `patina backup`.
pub fn run(_args: BackupArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina backup: not implemented yet")
}
