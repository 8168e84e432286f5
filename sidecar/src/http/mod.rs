//! The HTTP API (DESIGN §2): `POST /sql`, Corrosion's `/v1/*` endpoints, `/metrics`.
//!
//! # Layout
//! - `error`         — the API's error type and its one status mapping.
//! - `authorizer`    — the SQLite authorizer every API connection runs under.
//! - `json_values`   — SQLite values ↔ JSON the way Corrosion writes them; statement forms.
//! - `auth`          — the bearer-token check (constant-time).
//! - `limits`        — the query time limit, cancellation and value-size cap.
//! - `pool`          — the writer (group commit, led by the requests) and the reader pool.
//! - `readers`       — the niced threads reads run on.
//! - `exec`          — running a caller's statements: tail splitting, binding, VACUUM refusal.
//! - `sql`           — `POST /sql`.
//! - `transactions`  — `POST /v1/transactions`.
//! - `queries`       — `POST /v1/queries` (NDJSON).
//! - `subscriptions` — `POST /v1/subscriptions`, `GET /v1/subscriptions/{id}` (NDJSON); the
//!   engine behind them is `crate::subs`.
//! - `updates`       — `POST /v1/updates/{table}` (NDJSON of changed primary keys).
//! - `migrations`    — `POST /v1/migrations`: schema statements, persisted beside the db.
//! - `health`        — `GET /v1/health`, `GET /v1/members`, `GET /metrics`.
//! - `stats`         — the API's own metrics (requests by route and status, group commit).
//! - `latency`       — p50/p99 from the histograms, for `/v1/status` and `patina status`.
//! - `admin`         — `GET /v1/status`, `POST /v1/backup`, `POST /v1/reload`.

pub mod admin;
pub mod auth;
pub mod authorizer;
pub mod error;
pub mod exec;
pub mod health;
pub mod json_values;
pub mod latency;
pub mod limits;
pub mod migrations;
pub mod pool;
pub mod queries;
mod readers;
pub mod sql;
pub mod stats;
pub mod subscriptions;
pub mod transactions;
pub mod updates;

use std::future::Future;

use axum::serve::ListenerExt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::watch;

use crate::config::ApiConfig;
use crate::node::NodeShared;

pub use error::HttpError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<NodeShared>,
    pub api: Arc<ApiConfig>,
    pub pool: Arc<pool::Pool>,
    pub subs: Arc<crate::subs::SubEngine>,
    pub stats: Arc<stats::ApiStats>,
    /// Turns true when the server shuts down, so endless streams end and draining finishes.
    pub stop: watch::Receiver<bool>,
}

/// Serves the API on `listener` until `shutdown` resolves, then drains in-flight requests.
///
/// The caller binds the listener so a port already in use fails the node's start with a
/// clear error instead of a background task dying later.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<NodeShared>,
    api: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && api.token.is_none() {
        return Err(HttpError::BadRequest(format!(
            "refusing to serve the API on non-loopback address {local} without a token; \
             set api.token (--api-token or PATINA_TOKEN)"
        )));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = build_state(shared, api, stop_rx).await?;
    let subs = state.subs.clone();
    let app = router(state);
    tracing::info!(addr = %local, "HTTP API listening");
    // Streamed answers (NDJSON) are several small writes; without TCP_NODELAY the last
    // ones wait for the client's delayed ACK (~40 ms per query).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on an API connection: {e}");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    subs.stop();
    served?;
    Ok(())
}

/// Opens the API's connections and starts the subscription engine.
async fn build_state(
    shared: Arc<NodeShared>,
    api: ApiConfig,
    stop: watch::Receiver<bool>,
) -> Result<AppState, HttpError> {
    let sync = shared.synchronous;
    let limits = pool::Limits::from_config(&api);
    let sh = shared.clone();
    let subs = tokio::task::spawn_blocking(move || crate::subs::SubEngine::start(sh, sync, limits))
        .await
        .map_err(|e| HttpError::Internal(format!("subscription engine failed to start: {e}")))??;
    let notify = shared.local_write.clone();
    let stats = Arc::new(stats::ApiStats::default());
    let counters = stats.clone();
    // A commit wakes the tailer at once; the tailer hands the keys it touched to the
    // subscription engine (as it does for merges and other processes' writes).
    let on_commit: pool::OnCommit = Arc::new(move |requests, changed| {
        counters.write_groups.inc();
        counters.write_requests.inc_by(requests as u64);
        if changed {
            notify.notify_one();
        }
    });
    let sh = shared.clone();
    let pool = tokio::task::spawn_blocking(move || pool::Pool::open(sh, sync, on_commit, limits))
        .await
        .map_err(|e| HttpError::Internal(format!("API connections failed to open: {e}")))??;
    Ok(AppState {
        shared,
        api: Arc::new(api),
        pool,
        subs,
        stats,
        stop,
    })
}

/// The routes.
pub fn router(state: AppState) -> Router {
    let limit = state.api.max_body;
    Router::new()
        .route("/sql", post(sql::post_sql))
        .route("/v1/transactions", post(transactions::post_transactions))
        .route("/v1/queries", post(queries::post_queries))
        .route("/v1/subscriptions", post(subscriptions::post_subscription))
        .route(
            "/v1/subscriptions/{id}",
            get(subscriptions::get_subscription),
        )
        .route("/v1/updates/{table}", post(updates::post_updates))
        .route("/v1/migrations", post(migrations::post_migrations))
        .route("/v1/health", get(health::get_health))
        .route("/v1/members", get(health::get_members))
        .route("/metrics", get(health::get_metrics))
        .route("/v1/status", get(admin::get_status))
        .route("/v1/backup", post(admin::post_backup))
        .route("/v1/reload", post(admin::post_reload))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            stats::count_requests,
        ))
        .fallback(|| async { HttpError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(serde_json::json!({"error": "method not allowed on this endpoint"})),
            )
                .into_response()
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(axum::middleware::map_response(json_newline))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Ends every `application/json` answer with a newline, as NDJSON lines and curl users
/// expect (a shell prompt otherwise lands on the answer's last line). JSON answers are
/// small and already whole in memory; streamed answers (NDJSON, backups) are untouched.
async fn json_newline(resp: axum::response::Response) -> axum::response::Response {
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let mut bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b.to_vec(),
        Err(e) => {
            tracing::warn!("cannot buffer a JSON answer: {e}");
            return (StatusCode::INTERNAL_SERVER_ERROR, "").into_response();
        }
    };
    if bytes.last() != Some(&b'\n') {
        bytes.push(b'\n');
    }
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The request body, or 413 past `api.max_body`.
pub fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, HttpError> {
    body.map_err(|r| match r {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
            HttpError::TooLarge { limit }
        }
        other => HttpError::BadRequest(format!("cannot read the request body: {other}")),
    })
}

/// The media type of the request, lower-cased, without parameters (`; charset=...`).
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
}

/// JSON endpoints accept `application/json` (or no content type, for hand-written curl
/// lines); anything else is 415.
pub fn require_json(headers: &HeaderMap) -> Result<(), HttpError> {
    match media_type(headers).as_deref() {
        None | Some("application/json") => Ok(()),
        Some(other) => Err(HttpError::UnsupportedMediaType(format!(
            "Content-Type {other} is not accepted here; send application/json"
        ))),
    }
}

/// Corrosion's `actor_id`: the site id as a hyphenated UUID.
pub fn actor_id(site_id_hex: &str) -> String {
    if site_id_hex.len() != 32 || !site_id_hex.is_ascii() {
        return site_id_hex.to_owned();
    }
    let h = site_id_hex;
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
