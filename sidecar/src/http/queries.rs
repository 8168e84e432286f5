//! `POST /v1/queries`: a read-only query streamed as NDJSON, Corrosion's events:
//! `{"columns": [...]}`, `{"row": [rowid, [values]]}` per row, `{"eoq": {"time"}}`.
//!
//! Errors found before the first event (bad SQL, unknown table, a write statement,
//! parameter mismatch, and anything wrong with the first row: the time limit, TEXT that is
//! not UTF-8, a row past `api.max_result_bytes`) are a 400 `{"error"}`: the first row is
//! stepped before the answer starts. An error while stepping later rows arrives as an
//! `{"error"}` event and ends the stream.
//!
//! A query runs under `api.query_timeout`. A client that goes away stops it: the handler
//! future and then the response body hold a [`CancelOnDrop`], and the connection's
//! watchdog interrupts the statement at its next check, even in the middle of a step that
//! produces no row (a `count(*)` over a runaway CTE). Lines wait for the socket under a
//! budget of bytes, not of lines, so a slow reader of big rows cannot fill memory.

use std::convert::Infallible;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::{Batch, Row, Statement};
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::authorizer::AuthState;
use super::exec::{bind, column_names, refuse_nul, refuse_unauthorizable, sql_error};
use super::json_values::{add_json_len, check_utf8, parse_body, JsonRef, StatementSpec};
use super::limits::{Armed, CancelOnDrop, CancelToken};
use super::pool::ApiConn;
use super::{body_bytes, require_json, AppState, HttpError};

/// NDJSON lines buffered between the reader thread and the socket.
const STREAM_BUFFER: usize = 256;
/// Bytes of NDJSON a stream may have waiting for the socket (one bigger line passes
/// alone).
const STREAM_BYTES: usize = 1 << 20;

/// `POST /v1/queries`.
pub async fn post_queries(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let spec = parse_statement(&st, &headers, body)?;
    let permit = st.pool.permit().await?;
    let cancel = CancelToken::new();
    // Cancels the query if this future is dropped (the client left before the first
    // row); moved into the response body afterwards.
    let guard = cancel.on_drop();
    let (first_tx, first_rx) = oneshot::channel();
    let (tx, rx) = line_channel();
    let pool = st.pool.clone();
    let stop = st.stop.clone();
    let max_row = pool.limits().max_result_bytes;
    st.pool.spawn_reader(move || {
        let _ = pool.read_blocking(permit, Some(cancel), |api, armed| {
            stream_rows(api, armed, &spec, first_tx, &tx, &stop, max_row);
            Ok(())
        });
    })?;
    first_rx
        .await
        .map_err(|_| HttpError::Internal("the query's reader thread stopped".into()))??;
    Ok(ndjson_response(rx, Some(guard)))
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

/// The sending half of an NDJSON stream: lines wait under a budget of bytes.
pub struct LineSender {
    tx: mpsc::Sender<(Bytes, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    rt: tokio::runtime::Handle,
}

/// The receiving half (see [`ndjson_response`]).
pub type LineReceiver = mpsc::Receiver<(Bytes, OwnedSemaphorePermit)>;

/// A new stream's channel; call within the runtime.
pub fn line_channel() -> (LineSender, LineReceiver) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let sender = LineSender {
        tx,
        budget: Arc::new(Semaphore::new(STREAM_BYTES)),
        rt: tokio::runtime::Handle::current(),
    };
    (sender, rx)
}

impl LineSender {
    /// Queues a line once the budget allows; false when the client is gone.
    pub async fn send(&self, line: Bytes) -> bool {
        let n = u32::try_from(line.len().clamp(1, STREAM_BYTES)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            p = self.budget.clone().acquire_many_owned(n) => match p {
                Ok(p) => p,
                Err(_) => return false,
            },
            _ = self.tx.closed() => return false,
        };
        self.tx.send((line, permit)).await.is_ok()
    }

    /// [`LineSender::send`] from a blocking thread.
    pub fn send_blocking(&self, line: Bytes) -> bool {
        self.rt.block_on(self.send(line))
    }

    /// Resolves when the client is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// An NDJSON streaming response over the lines of `rx`; `guard` lives as long as the
/// body, so dropping the body (the client left) cancels the work behind it.
pub fn ndjson_response(rx: LineReceiver, guard: Option<CancelOnDrop>) -> Response {
    let stream = ReceiverStream::new(rx).map(move |(line, permit)| {
        drop(permit);
        let _alive = &guard;
        Ok::<Bytes, Infallible>(line)
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// An NDJSON streaming response over plain lines, for streams that hold no reader slot
/// and no answer budget (`/v1/updates`); dropping the body ends the sender's loop.
pub fn ndjson_lines_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
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
    refuse_nul(&spec.sql)?;
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

/// Runs the query, answering `first` once the first row (or the end) is reached, then
/// sending NDJSON lines until the end or until the client is gone.
fn stream_rows(
    api: &ApiConn,
    armed: &Armed<'_>,
    spec: &StatementSpec,
    first: oneshot::Sender<Result<(), HttpError>>,
    tx: &LineSender,
    stop: &tokio::sync::watch::Receiver<bool>,
    max_row: usize,
) {
    let start = Instant::now();
    let mut stmt = match prepare_readonly(&api.conn, &api.auth, spec) {
        Ok(s) => s,
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    };
    let columns = match column_names(&stmt) {
        Ok(c) => c,
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    };
    let mut first = Some(first);
    // Before the answer started: a status. After: an error event, the stream ends.
    let fail = |first: &mut Option<oneshot::Sender<Result<(), HttpError>>>, e: HttpError| {
        let e = armed.explain(e);
        match first.take() {
            Some(f) => {
                let _ = f.send(Err(e));
            }
            None => {
                let _ = tx.send_blocking(line(&json!({ "error": e.to_string() })));
            }
        }
    };
    let mut rows = stmt.raw_query();
    let mut rowid: u64 = 0;
    loop {
        let next = match rows.next() {
            Ok(Some(row)) => {
                rowid += 1;
                // A node shutting down ends its streams so the server can drain.
                if rowid & 1023 == 0 && *stop.borrow() {
                    fail(
                        &mut first,
                        HttpError::Unavailable("the node is shutting down".into()),
                    );
                    return;
                }
                match row_line(row, rowid, &columns, max_row, &api.auth) {
                    Ok(l) => Some(l),
                    Err(e) => return fail(&mut first, e),
                }
            }
            Ok(None) => None,
            Err(e) => return fail(&mut first, sql_error(e, &api.auth)),
        };
        if let Some(f) = first.take() {
            let _ = f.send(Ok(()));
            if !tx.send_blocking(line(&json!({ "columns": columns }))) {
                return;
            }
        }
        match next {
            Some(l) => {
                if !tx.send_blocking(l) {
                    return;
                }
            }
            None => break,
        }
    }
    let _ = tx.send_blocking(line(
        &json!({ "eoq": { "time": start.elapsed().as_secs_f64() } }),
    ));
}

/// One `{"row": [rowid, [values]]}` line, written straight from SQLite's values; refused
/// when a TEXT value is not UTF-8 or the line would pass `max_row` bytes.
fn row_line(
    row: &Row<'_>,
    rowid: u64,
    columns: &[String],
    max_row: usize,
    auth: &AuthState,
) -> Result<Bytes, HttpError> {
    let mut size = 32;
    for (i, column) in columns.iter().enumerate() {
        let v = row.get_ref(i).map_err(|e| sql_error(e, auth))?;
        check_utf8(v, column)?;
        add_json_len(&mut size, v, max_row)?;
    }
    let internal = |e: &dyn std::fmt::Display| HttpError::Internal(format!("encoding a row: {e}"));
    let mut buf = Vec::with_capacity(size);
    write!(buf, "{{\"row\":[{rowid},[").map_err(|e| internal(&e))?;
    for i in 0..columns.len() {
        if i > 0 {
            buf.push(b',');
        }
        let v = row.get_ref(i).map_err(|e| sql_error(e, auth))?;
        serde_json::to_writer(&mut buf, &JsonRef(v)).map_err(|e| internal(&e))?;
    }
    buf.extend_from_slice(b"]]}\n");
    Ok(Bytes::from(buf))
}
