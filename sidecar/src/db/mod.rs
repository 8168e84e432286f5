//! The node's SQLite side: connections with the extension loaded, tailing the local change
//! feed, applying remote units, and the bookkeeping of what was received.
//!
//! # Layout
//! - `conn`        — opening a connection: WAL, busy timeout, `libpatina.so` loaded (shared seam).
//! - `feed`        — reading `crsql_changes` by `db_version` in one read transaction.
//! - `tail`        — the tailer thread: notices local commits from any process, ships units.
//! - `touched`     — the (table, key) pairs each feed read touched, fanned out to listeners.
//! - `apply`       — the apply thread: the one writer of remote changes, batched, atomic.
//! - `packed`      — changes packed into one `patina_batch` blob, merged in one statement.
//! - `bookkeeping` — per-peer cursors, out-of-order ranges and site bindings, in the database.
//! - `inbox`       — chunks of large units buffered until whole; bounded and expiring.
//! - `retention`   — tombstone collection, forgetting departed members, re-seeding.
//! - `buffer`      — whole units naming tables or columns this node lacks yet, kept until it has them.
//! - `buffering`   — the apply thread's side of it: keeping such a unit, applying it once allowed.
//! - `schema`      — schema files: create, migrate (add columns), make replicated.
//! - `seed`        — snapshots that seed a node holding nothing: made by a peer, installed.
//! - `staleness`   — `patina_staleness`, the per-origin staleness table, and its writer.

pub mod apply;
pub mod bookkeeping;
pub mod buffer;
mod buffering;
pub mod conn;
pub mod feed;
pub mod inbox;
mod packed;
pub mod retention;
pub mod schema;
pub mod seed;
pub mod staleness;
pub mod tail;
pub mod touched;

pub use conn::{extension_path, open, DbError};
