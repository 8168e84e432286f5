//! `patina tls`.

use super::TlsArgs;

/// Runs `patina tls`.
pub fn run(_args: TlsArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina tls: not implemented yet")
}
