//! The extension's one error type. Every message names the thing at fault (table, column,
//! argument) because it reaches a person through the sqlite3 shell or an HTTP 4xx body.

use thiserror::Error;

/// Errors raised by patina's SQL functions and by `crsql_changes`.
///
/// None of them leaves partial state behind: schema changes run inside a savepoint that
/// is rolled back on error, and merges validate a change before writing any of it.
#[derive(Debug, Error)]
pub enum Error {
    /// SQLite refused a statement patina ran; carries SQLite's own message.
    #[error("{context}: {message}")]
    Sqlite {
        context: String,
        message: String,
        code: i32,
    },
    /// The named table cannot become replicated (no pk, unique index, …).
    #[error("cannot replicate table '{table}': {reason}")]
    Schema { table: String, reason: String },
    /// A function argument was missing or of the wrong type.
    #[error("{function}: argument {position} ({name}) {problem}")]
    Argument {
        function: &'static str,
        position: usize,
        name: &'static str,
        problem: String,
    },
    /// A change written to `crsql_changes` is malformed or targets something unknown.
    #[error("crsql_changes: {0}")]
    Change(String),
    /// A change's `cl` or `col_version` is outside `1..=2^62` (see `merge::MAX_CLOCK`);
    /// the change is refused whole and nothing is written.
    #[error("crsql_changes: {field} of table '{table}', column '{cid}' is {value}, outside 1..={max}: \
             a larger clock could overflow when written locally (see merge::MAX_CLOCK)", max = crate::merge::MAX_CLOCK)]
    Clock {
        table: String,
        cid: String,
        field: crate::merge::ClockField,
        value: i64,
    },
    /// A packed primary key blob could not be decoded.
    #[error("malformed packed primary key: {0}")]
    Pk(String),
    /// The table is not replicated (for functions that need a replicated table).
    #[error("table '{0}' is not replicated (run SELECT crsql_as_crr('{0}') first)")]
    NotReplicated(String),
    /// Patina's internal tables are missing or from an incompatible layout.
    #[error("patina state: {0}")]
    State(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
