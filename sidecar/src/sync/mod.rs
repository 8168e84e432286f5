//! Replication between nodes as a state machine without I/O (DESIGN §2 "Network").
//!
//! Every origin numbers its own writes gap-free (`origin_version`), and every node knows,
//! per origin, which of those versions it holds (`patina_origin_ranges`, written inside
//! every merge). Sync is built on that: an origin's new units travel down a broadcast
//! tree (each node receives each unit once), summaries of what each node holds are
//! exchanged with a random peer every round and answered with exactly the whole units
//! the other lacks, and a node that lacks more than its peers keep in memory pulls one
//! peer's feed, leaving out every change it holds. See `machine` for the details and the
//! figures in BENCHMARKS.md ("Sync at scale").
//!
//! # Layout
//! - `msg`      — the CBOR payload: units, summaries, pulls, chunks.
//! - `held`     — per-origin version sets (what a node holds), pure.
//! - `machine`  — [`Replicator`]: messages, local units, apply confirmations and time in;
//!   effects out.
//! - `recent`   — the units kept in memory to answer repairs.
//! - `receive`  — the apply side's decisions (whole units, held ranges, cursors), pure:
//!   the node's apply thread and the simulation both call it.
//! - `ranges`   — the cursor rule and the rules every range from a peer must meet, pure.
//! - `seed`     — seeding a node that holds nothing from one peer's snapshot, pure.
//! - `stability` — which deletes may be forgotten (tombstone collection), pure.
//! - `identity` — which peer identity may speak for a site id (bound once, durably).
//! - `schema`   — replicated tables and columns as values: the fingerprint units carry and
//!   the rule for units naming a table or column this node lacks yet (buffered whole).
//! - `staleness` — per origin: known, held, missing, when last heard from, pure.
//! - `versions` — per-peer protocol versions, what each may be sent, unknown kinds, pure.
//! - `sim`      — (tests) a deterministic simulation of many nodes: loss, partitions,
//!   crashes, joins, regions.

mod held;
mod identity;
pub mod machine;
pub mod msg;
mod ranges;
mod receive;
mod recent;
mod schema;
pub mod seed;
#[cfg(test)]
mod sim;
pub mod stability;
mod staleness;
#[cfg(test)]
mod test_support;
pub mod versions;

pub use held::{Held, RangeSet};
pub use identity::{check_claim, is_portable, Claim, CERTIFICATE_PREFIX, MAX_SITES_PER_IDENTITY};
pub use machine::{
    tree_children, Applied, ApplyJob, Effect, Replicator, SyncConfig, SyncStats, Work,
};
pub use msg::{
    chunk_unit, known_covers, Change, Chunk, HeardAge, Msg, OriginRanges, OriginUnit, SeedAsk,
    SiteId, Value,
};
pub use ranges::{advance_cursor, advance_with_ranges, MAX_RANGES, MAX_VERSION};
pub use ranges::{
    validate_chunk, validate_origin_ranges, validate_pull, validate_unit, RangeError,
};
pub use receive::{held_after_catch_up, held_after_unit, unit_complete};
pub use schema::{
    buffered_versions, describe as describe_missing, waiting_origins, Missing, Schema,
};
pub use staleness::{OriginStaleness, FORGET_AFTER};
