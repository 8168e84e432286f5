//! `POST /sql`: SQL text (`application/sql` or `text/plain`), every statement in order in
//! one transaction. The answer is the last statement's result — `columns` and `rows` for
//! a query — plus `rows_affected` summed over all statements and `version`, the node's
//! `crsql_db_version()` after the commit (`null` when nothing replicated changed).
//!
//! The rows are collected as SQLite values under `api.max_result_bytes` inside the
//! transaction and written as JSON only after the commit, on a blocking thread: encoding
//! a big answer must not hold the write lock (issue 7 item 6: 31 s and 2.5 GB for one
//! `randomblob(40000000)`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::exec::refuse_nul;
use super::json_values::{Cell, StatementSpec};
use super::limits::CancelToken;
use super::pool::WriteRequest;
use super::{body_bytes, media_type, AppState, HttpError};

/// An encoded answer and its share of the node's answer budget, released when the
/// server has sent it and drops the bytes.
struct Held {
    buf: Vec<u8>,
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// The answer of `/sql`, written straight from the collected values.
#[derive(Serialize)]
struct SqlAnswer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    columns: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows: Option<&'a [Vec<Cell>]>,
    rows_affected: usize,
    version: Option<i64>,
}

/// `POST /sql`.
pub async fn post_sql(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = body_bytes(body, st.api.max_body)?;
    match media_type(&headers).as_deref() {
        Some("application/sql") | Some("text/plain") => {}
        Some(other) => {
            return Err(HttpError::UnsupportedMediaType(format!(
                "Content-Type {other} is not accepted by /sql; send application/sql or text/plain"
            )))
        }
        None => {
            return Err(HttpError::UnsupportedMediaType(
                "no Content-Type: /sql takes application/sql or text/plain".into(),
            ))
        }
    }
    let text = std::str::from_utf8(&body)
        .map_err(|e| HttpError::BadRequest(format!("the SQL text is not UTF-8: {e}")))?;
    refuse_nul(text)?;
    if text.trim().is_empty() {
        return Err(HttpError::BadRequest(
            "empty body: send one or more SQL statements".into(),
        ));
    }
    let cancel = CancelToken::new();
    // Dropped with this handler's future when the client leaves: the statements stop.
    let guard = cancel.on_drop();
    let out = st
        .pool
        .write(WriteRequest {
            specs: vec![StatementSpec::plain(text)],
            keep_rows: true,
            cancel,
            lead_off_thread: true,
        })
        .await?;
    guard.disarm();
    let body = tokio::task::spawn_blocking(move || {
        let mut out = out;
        let total: usize = out.results.iter().map(|r| r.rows_affected).sum();
        let held = out
            .results
            .last_mut()
            .and_then(|r| r.rows.as_mut())
            .and_then(|r| r.held.take());
        let rows = out.results.last().and_then(|r| r.rows.as_ref());
        let answer = SqlAnswer {
            columns: rows.map(|r| r.columns.as_slice()),
            rows: rows.map(|r| r.rows.as_slice()),
            rows_affected: total,
            version: out.version,
        };
        serde_json::to_vec(&answer).map(|buf| Bytes::from_owner(Held { buf, _held: held }))
    })
    .await
    .map_err(|e| HttpError::Internal(format!("encoding the answer failed: {e}")))?
    .map_err(|e| HttpError::Internal(format!("encoding the answer failed: {e}")))?;
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
