//! Command-line interface: clap definitions; each subcommand's body lives in its own file.
//!
//! Core-owned: `agent`, `demo`, `tls`. API-owned: `exec`, `query`, `members`, `status`,
//! `backup`, `restore`, `reload` (they talk to a node over HTTP, `--api`, `--token`).
