//! Broadcast and anti-entropy as a state machine without I/O (DESIGN §2 "Network").
//!
//! Every node's feed (`crsql_changes` by local `db_version`) is gap-free and carries what
//! the node merged from others, so pulling one peer's feed after a per-peer cursor is
//! complete, and pushing each new local unit to a few peers is a bounded rebroadcast (a
//! duplicate merge creates no new version, so it stops).
//!
//! # Layout
//! - `msg`     — the CBOR payload: `Push`, `Pull`, `Changes`, chunks of a unit.
//! - `machine` — [`Sync`]: messages, local units, apply confirmations and time in; effects out.
//! - `sim`     — (tests) a deterministic simulation of many nodes with drops and partitions.

pub mod machine;
pub mod msg;
#[cfg(test)]
mod sim;

pub use machine::{
    advance_cursor, advance_with_ranges, merge_skipped, skipped_covered, ApplyJob, Effect, Sync,
    SyncConfig, SyncStats,
};
pub use msg::{chunk_unit, known_covers, Change, Chunk, Msg, SiteId, Skipped, Value};
