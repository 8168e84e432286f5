//! `POST /v1/queries`: a read-only query streamed as NDJSON, Corrosion's events:
//! `{"columns": [...]}`, `{"row": [rowid, [values]]}` per row, `{"eoq": {"time"}}`.
//!
//! Errors found before the first event (bad SQL, unknown table, a write statement,
//! parameter mismatch) are a 400 `{"error"}`; an error while stepping rows arrives as an
//! `{"error"}` event and ends the stream. A client that goes away stops the query at the
//! next row: the reader thread sees the closed channel and returns its connection.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::{Batch, Statement};
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::authorizer::AuthState;
use super::exec::{bind, refuse_unauthorizable, sql_error};
use super::json_values::{parse_body, value_to_json, StatementSpec};
use super::pool::ApiConn;
use super::{body_bytes, require_json, AppState, HttpError};

/// NDJSON lines buffered between the reader thread and the socket.
const STREAM_BUFFER: usize = 256;

/// `POST /v1/queries`.
pub async fn post_queries(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let spec = parse_statement(&st, &headers, body)?;
    let permit = st.pool.permit().await?;
    let (first_tx, first_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    let pool = st.pool.clone();
    let stop = st.stop.clone();
    tokio::task::spawn_blocking(move || {
        pool.read_blocking(permit, |api| {
            stream_rows(api, &spec, first_tx, &tx, &stop);
            Ok(())
        })
    });
    first_rx
        .await
        .map_err(|_| HttpError::Internal("the query's reader thread stopped".into()))??;
    Ok(ndjson_response(rx))
}

/// The body as one statement: `"sql"`, `["sql", [params]]`, `["sql", {named}]` or
/// `{"query", "params", "named_params"}`.
pub fn parse_statement(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatementSpec, HttpError> {
    let body = body_bytes(body, st.api.max_body)?;
    require_json(headers)?;
    let json = parse_body(&body)?;
    StatementSpec::from_json(&json)
}

/// An NDJSON streaming response over the lines of `rx`.
pub fn ndjson_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>);
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// One NDJSON line.
pub fn line(v: &Json) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Prepares the one read-only statement of `spec` and binds its parameters.
pub fn prepare_readonly<'c>(
    conn: &'c rusqlite::Connection,
    auth: &AuthState,
    spec: &StatementSpec,
) -> Result<Statement<'c>, HttpError> {
    let mut batch = Batch::new(conn, &spec.sql);
    let _ = auth.take_denial();
    let mut stmt = batch
        .next()
        .map_err(|e| sql_error(e, auth))?
        .ok_or_else(|| HttpError::BadRequest(format!("no SQL statement in {:?}", spec.sql)))?;
    if batch.next().map_err(|e| sql_error(e, auth))?.is_some() {
        return Err(HttpError::BadRequest(
            "send one statement per query (the text holds several)".into(),
        ));
    }
    refuse_unauthorizable(&stmt)?;
    if !stmt.readonly() {
        return Err(HttpError::BadRequest("statement is not readonly".into()));
    }
    bind(&mut stmt, &spec.params)?;
    Ok(stmt)
}

/// Runs the query, answering `first` once it is known whether it can run, then sending
/// NDJSON lines until the end or until the client is gone.
fn stream_rows(
    api: &ApiConn,
    spec: &StatementSpec,
    first: oneshot::Sender<Result<(), HttpError>>,
    tx: &mpsc::Sender<Bytes>,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    let start = Instant::now();
    let mut stmt = match prepare_readonly(&api.conn, &api.auth, spec) {
        Ok(s) => s,
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    };
    let _ = first.send(Ok(()));
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    let ncols = columns.len();
    if tx
        .blocking_send(line(&json!({ "columns": columns })))
        .is_err()
    {
        return;
    }
    let mut rows = stmt.raw_query();
    let mut rowid: u64 = 0;
    loop {
        match rows.next() {
            Ok(Some(row)) => {
                rowid += 1;
                // A node shutting down ends its streams so the server can drain.
                if rowid & 1023 == 0 && *stop.borrow() {
                    let _ =
                        tx.blocking_send(line(&json!({ "error": "the node is shutting down" })));
                    return;
                }
                let mut vals = Vec::with_capacity(ncols);
                for i in 0..ncols {
                    match row.get_ref(i) {
                        Ok(v) => vals.push(value_to_json(v)),
                        Err(e) => {
                            let _ = tx.blocking_send(line(&json!({ "error": e.to_string() })));
                            return;
                        }
                    }
                }
                if tx
                    .blocking_send(line(&json!({ "row": [rowid, vals] })))
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let e = sql_error(e, &api.auth);
                let _ = tx.blocking_send(line(&json!({ "error": e.to_string() })));
                return;
            }
        }
    }
    let _ = tx.blocking_send(line(
        &json!({ "eoq": { "time": start.elapsed().as_secs_f64() } }),
    ));
}
