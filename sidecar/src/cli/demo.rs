//! `patina demo`.

use super::DemoArgs;

/// Runs `patina demo`.
pub fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina demo: not implemented yet")
}
