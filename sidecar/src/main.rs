//! `patina` — parses the command line and hands off to `patina_sidecar::cli`.
fn main() {}
