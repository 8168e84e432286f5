//! The `patina` node: replicates patina tables between machines.
//!
//! # Layout
//! - `config`     — TOML config + flags, defaults of DESIGN §2 (core).
//! - `claim`      — a process's exclusive `flock` claim on its database (`<db>.lock`).
//! - `node`       — [`node::NodeShared`], the seam between the core and the HTTP API.
//! - `db`         — connections with the extension loaded, tailing the feed, applying units, bookkeeping (core).
//! - `sync`       — the anti-entropy / broadcast state machine, no I/O (core).
//! - `memory`     — glibc arena cap and periodic trim: RSS close to the live heap.
//! - `staleness`  — the published per-origin staleness report, its gauges and thresholds.
//! - `membership` — the foca (SWIM) driver (core).
//! - `net`        — QUIC transport, TLS, CBOR frames (core).
//! - `agent`      — wires everything into a running node; `run(config, shutdown)` (core).
//! - `shutdown`   — SIGTERM/SIGINT as one future: the clean-stop trigger (core).
//! - `demo`       — `patina demo`, a local 3-node cluster (core).
//! - `http`       — the HTTP API, one file per route family (api).
//! - `cli`        — clap definitions and one file per client subcommand (api + core).
pub mod agent;
pub mod claim;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod http;
pub mod membership;
pub mod memory;
pub mod net;
pub mod node;
pub mod shutdown;
pub mod staleness;
pub mod subs;
pub mod sync;
