//! Subscriptions: live queries whose result changes are kept as a persisted, contiguous
//! change log per subscription (Corrosion's `/v1/subscriptions`; the HTTP side is
//! `http/subscriptions.rs`).
//!
//! # Layout
//! - `engine`  — the engine thread: matches touched keys to subscriptions, runs rounds.
//! - `plan`    — which tables a query reads and whether it is matched by key (incremental).
//! - `diff`    — evaluating a query into keyed rows; the diff, whole or for touched keys.
//! - `storage` — the `patina_api_*` tables: statements, current rows, change logs.
//! - `recent`  — the latest committed changes as stream lines, for live streams.
//! - `pk`      — packed primary keys back into values.
//! - `error`   — [`SubError`], mapped to HTTP statuses in one place.
//!
//! Rows are keyed by the primary key of their table when every key column is selected,
//! else by the whole row. New keys are `insert`s (a fresh per-subscription row id),
//! changed values `update`s (the row id stays), vanished keys `delete`s.

mod diff;
mod engine;
mod error;
mod pk;
mod plan;
mod recent;
mod storage;

#[cfg(test)]
mod proptests;

pub use engine::{changes_after, snapshot, ListenGuard, SubEngine, SubHandle, IDLE_EXPIRY};
pub use error::SubError;
pub use recent::change_line;
pub use storage::RETAINED_CHANGES;
