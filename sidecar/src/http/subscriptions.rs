//! `POST /v1/subscriptions` and `GET /v1/subscriptions/{id}[?from=N]`: Corrosion's live
//! queries, streamed as NDJSON.
//!
//! A new stream gets `{"columns"}`, one `{"row": [rowid, [values]]}` per current row and
//! `{"eoq": {"time", "change_id"}}`, then `{"change": [type, rowid, [values], change_id]}`
//! for every later change. With `from=N` it gets only the changes after `N`, read from the
//! persisted log — the same log live changes come from (a live stream that keeps up takes
//! the latest of them from the engine's memory, `subs::recent`, as committed to the log),
//! so nothing is skipped or repeated.
//! The headers `corro-query-id` and `corro-query-hash` name the subscription.
//!
//! A subscription whose query stops working for good — past `api.query_timeout`, or a row
//! it cannot answer unchanged (TEXT that is not UTF-8, a row past `api.max_result_bytes`)
//! — is refused with 400 when created or resumed, and its live streams get one
//! `{"error"}` event naming the reason and end. Nothing is ever answered altered.
//!
//! `skip_rows=true` without `from` sends no `columns`, rows or `eoq`: only the changes
//! after the subscription's current last change id, as Corrosion's `catch_up_sub` does
//! (its client passes `skip_rows` on every call). `from` is accepted on `POST` too,
//! because the client sends it there when it resumes by statement.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::queries::{line, line_channel, ndjson_response, parse_statement, LineSender};
use super::{AppState, HttpError};
use crate::subs::{change_line, changes_after, snapshot, ListenGuard, SubHandle};

/// Changes read from the log per round trip of a stream.
const PAGE: i64 = 1000;

/// `?from=N&skip_rows=bool`.
#[derive(Debug, Default, Deserialize)]
pub struct SubParams {
    /// Resume after this change id.
    pub from: Option<i64>,
    /// Without `from`: send only changes, no initial result.
    #[serde(default)]
    pub skip_rows: bool,
}

/// `POST /v1/subscriptions`.
pub async fn post_subscription(
    State(st): State<AppState>,
    query: Result<Query<SubParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = query.map_err(|e| HttpError::BadRequest(format!("bad query string: {e}")))?;
    let spec = parse_statement(&st, &headers, body)?;
    let handle = st.subs.create(spec).await.map_err(HttpError::from)?;
    open_stream(st, handle, q).await
}

/// `GET /v1/subscriptions/{id}?from=N`.
pub async fn get_subscription(
    State(st): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<SubParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = query.map_err(|e| HttpError::BadRequest(format!("bad query string: {e}")))?;
    let handle = st
        .subs
        .get(&id)
        .ok_or_else(|| HttpError::NotFound(format!("no subscription {id}")))?;
    open_stream(st, handle, q).await
}

/// Builds the stream: the full current result, only later changes (`skip_rows`), or the
/// changes after `from`. `from=0` is every change since the subscription began (the
/// client resumes with it after an `eoq` at change 0).
async fn open_stream(
    st: AppState,
    handle: std::sync::Arc<SubHandle>,
    params: SubParams,
) -> Result<Response, HttpError> {
    let from = params.from;
    let start = Instant::now();
    let id = handle.id.clone();
    // Registered before catching up, so no change between the two goes unevaluated.
    let guard = handle.listen();
    st.subs.catch_up(&id).await.map_err(HttpError::from)?;
    let mut initial = Vec::new();
    let cursor = match from {
        None if params.skip_rows => *handle.last_change.borrow(),
        None => {
            let sid = id.clone();
            let (rows, last) = st
                .pool
                .read(move |api| snapshot(api, &sid).map_err(HttpError::from))
                .await?;
            initial.push(line(&json!({ "columns": handle.columns })));
            for (rowid, vals) in rows {
                initial.push(Bytes::from(format!("{{\"row\":[{rowid},{vals}]}}\n")));
            }
            initial.push(line(&json!({
                "eoq": { "time": start.elapsed().as_secs_f64(), "change_id": last }
            })));
            last
        }
        Some(n) => {
            let last = *handle.last_change.borrow();
            if n < 0 || n > last {
                return Err(HttpError::BadRequest(format!(
                    "from={n} is not a change id of subscription {id} (its last is {last})"
                )));
            }
            let sid = id.clone();
            let (_, oldest) = st
                .pool
                .read(move |api| changes_after(api, &sid, n, 0).map_err(HttpError::from))
                .await?;
            if let Some(oldest) = oldest {
                if n + 1 < oldest {
                    return Err(HttpError::BadRequest(format!(
                        "changes after {n} are no longer kept for subscription {id} (oldest is \
                         {oldest}); subscribe again without from"
                    )));
                }
            }
            n
        }
    };
    let (tx, rx) = line_channel();
    let hash = handle.hash.clone();
    tokio::spawn(follow(st, handle, cursor, initial, tx, guard));
    let mut resp = ndjson_response(rx, None);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(HeaderName::from_static("corro-query-id"), v);
    }
    if let Ok(v) = HeaderValue::from_str(&hash) {
        h.insert(HeaderName::from_static("corro-query-hash"), v);
    }
    Ok(resp)
}

/// Sends the initial lines, then every logged change after `cursor` as it is committed,
/// until the client leaves or the server stops.
async fn follow(
    st: AppState,
    handle: std::sync::Arc<SubHandle>,
    mut cursor: i64,
    initial: Vec<Bytes>,
    tx: LineSender,
    _listening: ListenGuard,
) {
    for l in initial {
        if !tx.send(l).await {
            return;
        }
    }
    let mut latest_rx = handle.last_change.subscribe();
    let mut failure_rx = handle.failure.subscribe();
    let mut stop = st.stop.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let failed = failure_rx.borrow_and_update().clone();
        if let Some(reason) = failed {
            let _ = tx.send(line(&json!({ "error": reason }))).await;
            return;
        }
        let latest = *latest_rx.borrow_and_update();
        if latest > cursor {
            // Live streams find the latest changes in memory (`subs::recent`).
            if let Some(lines) = handle.recent_after(cursor, latest) {
                for (change_id, l) in lines {
                    if !tx.send(l).await {
                        return;
                    }
                    cursor = change_id;
                }
                continue;
            }
            let id = handle.id.clone();
            let after = cursor;
            // A live stream waits for a reader slot rather than end on a burst of queries.
            let page = st
                .pool
                .read_patiently(move |api| {
                    changes_after(api, &id, after, PAGE).map_err(HttpError::from)
                })
                .await;
            let changes = match page {
                Ok((c, _)) => c,
                Err(e) => {
                    let _ = tx.send(line(&json!({ "error": e.to_string() }))).await;
                    return;
                }
            };
            if changes.first().map(|c| c.0) != Some(cursor + 1) {
                let _ = tx
                    .send(line(&json!({
                        "error": format!("changes after {cursor} are no longer kept; subscribe again")
                    })))
                    .await;
                return;
            }
            for (change_id, kind, rowid, vals) in changes {
                if !tx.send(change_line(change_id, &kind, rowid, &vals)).await {
                    return;
                }
                cursor = change_id;
            }
            continue;
        }
        tokio::select! {
            r = latest_rx.changed() => if r.is_err() { return },
            r = failure_rx.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
            _ = stop.changed() => return,
        }
    }
}
