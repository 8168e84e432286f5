//! The node's SQLite side: connections with the extension loaded, tailing the local change
//! feed, applying remote units, and the bookkeeping of what was received.
//!
//! # Layout
//! - `conn`  — opening a connection: WAL, busy timeout, `libpatina.so` loaded (shared seam).

pub mod conn;

pub use conn::{extension_path, open, DbError};
