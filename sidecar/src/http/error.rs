//! The API's one error type, and the one place that maps errors to HTTP statuses.
//!
//! Every handler returns [`HttpError`]; [`HttpError::status`] decides the status code and
//! [`IntoResponse`] renders patina's error shape `{"error": "..."}`. Endpoints with another
//! error shape (`/v1/transactions`) still take the status from [`HttpError::status`].

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rusqlite::ErrorCode;

/// Why a request failed. Each variant says what happened to the node's state: none of them
/// leaves a partial write behind (a failing request's transaction is rolled back whole).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The caller sent something unusable (bad SQL, bad parameters, a missing argument).
    /// Nothing was written.
    #[error("{0}")]
    BadRequest(String),
    /// SQLite refused a statement (syntax error, unknown table, constraint, ...); the
    /// message is SQLite's. The request's transaction was rolled back.
    #[error("{0}")]
    Sql(String),
    /// The SQLite authorizer refused a statement (DESIGN §6: internal tables, ATTACH,
    /// schema changes, ...). Nothing was written.
    #[error("{0}")]
    Forbidden(String),
    /// Missing or wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// No such route or subscription.
    #[error("{0}")]
    NotFound(String),
    /// The body is larger than `api.max_body`; it was not read to the end.
    #[error("request body larger than the limit of {limit} bytes (api.max_body)")]
    TooLarge { limit: usize },
    /// The `Content-Type` is not one the endpoint accepts.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body is not the JSON the endpoint expects.
    #[error("{0}")]
    MalformedJson(String),
    /// The request's statements ran past `api.query_timeout` and SQLite interrupted them.
    /// Its transaction was rolled back (reads change nothing anyway).
    #[error(
        "interrupted: the request ran longer than api.query_timeout ({}); nothing of it was \
         applied. Make it cheaper (a LIMIT, an index) or raise api.query_timeout",
        fmt_duration(*limit)
    )]
    QueryTimeout { limit: std::time::Duration },
    /// The client went away; its statement was interrupted and rolled back. Nobody reads
    /// this answer; it exists so the work stops.
    #[error("the client went away; the request was interrupted and nothing of it was applied")]
    Cancelled,
    /// The answer would be larger than `api.max_result_bytes`. Nothing was written: the
    /// request's transaction was rolled back.
    #[error(
        "the result is larger than api.max_result_bytes ({limit} bytes of JSON for a /sql \
         answer, or for one row of a stream); nothing was applied. Select fewer rows or \
         columns (LIMIT/OFFSET, substr), stream rows with /v1/queries, or raise \
         api.max_result_bytes"
    )]
    ResultTooLarge { limit: usize },
    /// A TEXT value is not valid UTF-8, so a JSON string cannot carry it unchanged; the
    /// API refuses to answer it rather than alter it. Nothing was written.
    #[error(
        "column {column:?} holds TEXT that is not valid UTF-8 (bytes {preview}); JSON cannot \
         carry it unchanged, so it is not answered. Read it as bytes with CAST({column} AS \
         BLOB) or hex({column})"
    )]
    NotUtf8 { column: String, preview: String },
    /// The node is unhealthy or overloaded (health thresholds, SQLITE_BUSY past the
    /// busy timeout). Retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The node's own fault (I/O, a disk error, a bug). The request was not applied.
    #[error("{0}")]
    Internal(String),
    /// Binding or serving the listener failed.
    #[error("HTTP server I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl HttpError {
    /// The status code of each error: the one mapping of the API.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::BadRequest(_)
            | HttpError::Sql(_)
            | HttpError::QueryTimeout { .. }
            | HttpError::Cancelled
            | HttpError::ResultTooLarge { .. }
            | HttpError::NotUtf8 { .. } => StatusCode::BAD_REQUEST,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpError::MalformedJson(_) => StatusCode::UNPROCESSABLE_ENTITY,
            HttpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::Internal(_) | HttpError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The same error again (errors are answered to every request of a group commit).
    pub fn clone_msg(&self) -> HttpError {
        let m = self.to_string();
        match self {
            HttpError::BadRequest(_) => HttpError::BadRequest(m),
            HttpError::Sql(_) => HttpError::Sql(m),
            HttpError::Forbidden(_) => HttpError::Forbidden(m),
            HttpError::Unauthorized(_) => HttpError::Unauthorized(m),
            HttpError::NotFound(_) => HttpError::NotFound(m),
            HttpError::TooLarge { limit } => HttpError::TooLarge { limit: *limit },
            HttpError::QueryTimeout { limit } => HttpError::QueryTimeout { limit: *limit },
            HttpError::Cancelled => HttpError::Cancelled,
            HttpError::ResultTooLarge { limit } => HttpError::ResultTooLarge { limit: *limit },
            HttpError::NotUtf8 { column, preview } => HttpError::NotUtf8 {
                column: column.clone(),
                preview: preview.clone(),
            },
            HttpError::UnsupportedMediaType(_) => HttpError::UnsupportedMediaType(m),
            HttpError::MalformedJson(_) => HttpError::MalformedJson(m),
            HttpError::Unavailable(_) => HttpError::Unavailable(m),
            HttpError::Internal(_) | HttpError::Io(_) => HttpError::Internal(m),
        }
    }

    /// Classifies a SQLite error. `denial` is the authorizer's reason, if it refused
    /// something while the failing statement was prepared.
    pub fn from_sqlite(err: rusqlite::Error, denial: Option<String>) -> HttpError {
        match &err {
            rusqlite::Error::SqliteFailure(e, msg) => match e.code {
                ErrorCode::AuthorizationForStatementDenied => {
                    let reason = denial
                        .or_else(|| msg.clone())
                        .unwrap_or_else(|| "not authorized".into());
                    HttpError::Forbidden(reason)
                }
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                    HttpError::Unavailable(format!("database is busy, retry later: {err}"))
                }
                ErrorCode::TooBig => HttpError::Sql(format!(
                    "{err}: a TEXT or BLOB value is larger than the API allows \
                     (api.max_result_bytes on reads, {} MiB on writes)",
                    super::pool::WRITER_MAX_VALUE / (1024 * 1024)
                )),
                ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory
                | ErrorCode::NotADatabase
                | ErrorCode::InternalMalfunction => HttpError::Internal(err.to_string()),
                _ => HttpError::Sql(err.to_string()),
            },
            rusqlite::Error::SqlInputError { .. }
            | rusqlite::Error::InvalidParameterCount(..)
            | rusqlite::Error::InvalidParameterName(_)
            | rusqlite::Error::MultipleStatement
            | rusqlite::Error::Utf8Error(..)
            | rusqlite::Error::InvalidColumnType(..) => HttpError::Sql(err.to_string()),
            _ => HttpError::Internal(err.to_string()),
        }
    }
}

/// `5s`, `250ms`: how a limit is written in the config.
fn fmt_duration(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "API request failed");
        }
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}
