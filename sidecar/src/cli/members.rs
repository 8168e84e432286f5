//! `patina members` (API helper fills this in).

use super::MembersArgs;

/// Runs `patina members`.
pub fn run(_args: MembersArgs) -> anyhow::Result<()> {
    anyhow::bail!("patina members: not implemented yet")
}
