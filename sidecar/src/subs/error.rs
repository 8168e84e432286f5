//! The subscription side's one error type; `http/` maps it to status codes in one place
//! (`impl From<SubError> for HttpError`).

use crate::http::HttpError;

/// Why a subscription operation failed. Each variant says what it did to state.
#[derive(Debug, thiserror::Error)]
pub enum SubError {
    /// No such subscription (never made, or expired). Nothing changed.
    #[error("subscription {id} expired; subscribe again")]
    Expired { id: String },
    /// The subscription's query stopped working for good (past the time limit, a value
    /// it cannot answer unchanged, its table gone). The subscription is kept, marked
    /// failed; its streams end with this reason.
    #[error("{reason}")]
    Failed { reason: String },
    /// The caller's statement is refused or does not run (bad SQL, not read-only, not
    /// authorized, a bad parameter). No subscription was made.
    #[error(transparent)]
    Statement(Box<HttpError>),
    /// The engine's own tables could not be read or written (busy past the timeout, disk
    /// full). The round is rolled back and retried; no change id was used.
    #[error("subscription storage: {0}")]
    Storage(#[from] rusqlite::Error),
    /// A touched primary key did not decode. The subscriptions of its table are re-run
    /// whole instead.
    #[error("{0}")]
    BadKey(String),
    /// The engine thread is gone (the API is shutting down). Nothing changed.
    #[error("the subscription engine has stopped")]
    Stopped,
}

impl From<HttpError> for SubError {
    fn from(e: HttpError) -> Self {
        SubError::Statement(Box::new(e))
    }
}

impl From<SubError> for HttpError {
    fn from(e: SubError) -> Self {
        match e {
            SubError::Expired { .. } => HttpError::NotFound(e.to_string()),
            SubError::Failed { reason } => HttpError::BadRequest(reason),
            SubError::Statement(e) => *e,
            SubError::Storage(_) | SubError::BadKey(_) | SubError::Stopped => {
                HttpError::Internal(e.to_string())
            }
        }
    }
}
