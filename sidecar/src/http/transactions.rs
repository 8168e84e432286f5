//! `POST /v1/transactions`: Corrosion's write endpoint. A JSON array of statements, run in
//! order, all or nothing.
//!
//! Success: `{"results": [{"rows_affected", "time"}], "time", "version", "actor_id"}`.
//! Failure of a statement: `{"results": [{"error"}], "time", "version": null, "actor_id"}`
//! with 400 (Corrosion answers 500; patina keeps 5xx for its own faults) — or 403 when the
//! authorizer refused it, 503 when the database was busy.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value as Json_};

use super::json_values::{parse_body, StatementSpec};
use super::limits::CancelToken;
use super::pool::WriteRequest;
use super::{actor_id, body_bytes, require_json, AppState, HttpError};

/// `POST /v1/transactions`.
pub async fn post_transactions(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let specs = match parse_request(&st, &headers, body) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let start = Instant::now();
    let n = specs.len();
    let actor = actor_id(&st.shared.site_id_hex);
    let cancel = CancelToken::new();
    // Dropped with this handler's future when the client leaves: the statements stop.
    let guard = cancel.on_drop();
    let written = st
        .pool
        .write(WriteRequest {
            specs,
            keep_rows: false,
            cancel,
            lead_off_thread: false,
        })
        .await;
    guard.disarm();
    match written {
        Ok(out) => {
            let mut per_spec = vec![(0usize, 0f64); n];
            for r in &out.results {
                if let Some(slot) = per_spec.get_mut(r.spec) {
                    slot.0 += r.rows_affected;
                    slot.1 += r.time;
                }
            }
            let results: Vec<Json_> = per_spec
                .into_iter()
                .map(|(rows_affected, time)| json!({"rows_affected": rows_affected, "time": time}))
                .collect();
            Json(json!({
                "results": results,
                "time": start.elapsed().as_secs_f64(),
                "version": out.version,
                "actor_id": actor,
            }))
            .into_response()
        }
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(error = %e, "transaction failed");
            }
            (
                e.status(),
                Json(json!({
                    "results": [{"error": e.to_string()}],
                    "time": start.elapsed().as_secs_f64(),
                    "version": null,
                    "actor_id": actor,
                })),
            )
                .into_response()
        }
    }
}

/// The statements of the body; errors here are answered as `{"error"}` (413, 415, 422).
fn parse_request(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<StatementSpec>, HttpError> {
    let body = body_bytes(body, st.api.max_body)?;
    require_json(headers)?;
    let json = parse_body(&body)?;
    let items = json.as_array().ok_or_else(|| {
        HttpError::MalformedJson(
            "the body must be a JSON array of statements, e.g. [\"INSERT ...\", [\"UPDATE ... \
             WHERE id = ?\", [1]]]"
                .into(),
        )
    })?;
    if items.is_empty() {
        return Err(HttpError::BadRequest(
            "no statements: send a JSON array with at least one statement".into(),
        ));
    }
    items.iter().map(StatementSpec::from_json).collect()
}
