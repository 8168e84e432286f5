//! `patina demo`.

use super::DemoArgs;

/// Runs `patina demo` (see [`crate::demo`]).
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    crate::demo::run(args)
}
