//! `patina agent`.

use super::AgentArgs;

/// Runs `patina agent`.
pub fn run(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina agent: not implemented yet")
}
