//! `GET /v1/health`, `GET /v1/members`, `GET /metrics`: what operators and load balancers
//! look at.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{AppState, HttpError};
use crate::node::{MemberInfo, FAILING_FOR};

/// Thresholds of `GET /v1/health`; each one given makes the check stricter. The names
/// are Corrosion's `HealthQuery` plus patina's `min_members`.
#[derive(Debug, Default, Deserialize)]
pub struct HealthParams {
    /// Unhealthy when the apply plus broadcast queues hold more than this.
    pub max_queue: Option<u64>,
    /// Corrosion's name for `max_queue`.
    pub queue_size: Option<u64>,
    /// Unhealthy when fewer members (this node included) are alive.
    pub min_members: Option<usize>,
    /// Corrosion's "missing version ranges" threshold. patina pulls each peer's feed by a
    /// gap-free cursor, so it has no gaps to count: the answer is always 0.
    pub gaps: Option<u64>,
    /// Corrosion's commit-lag threshold. patina does not sample a lag quantile, so it
    /// reports 0 and this threshold never fails; per-origin staleness is in `/metrics`.
    pub p99_lag: Option<f64>,
    /// The status sent when unhealthy (Corrosion's parameter); 503 by default.
    pub failure_status: Option<u16>,
}

/// The members as the core last published them.
pub fn members(st: &AppState) -> Vec<MemberInfo> {
    st.shared
        .members
        .read()
        .map(|m| m.clone())
        .unwrap_or_default()
}

/// `GET /v1/health`: 200 `{"response": {...}}`, or 503 `{"error": "..."}` naming what is
/// wrong. Both decode as Corrosion's `corro_api_types::HealthResponse` (an externally
/// tagged enum: exactly one key); patina's own figures ride inside `response`.
pub async fn get_health(
    State(st): State<AppState>,
    params: Result<Query<HealthParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(p) =
        params.map_err(|e| HttpError::BadRequest(format!("bad health thresholds: {e}")))?;
    let failure = match p.failure_status {
        None => StatusCode::SERVICE_UNAVAILABLE,
        Some(code) => StatusCode::from_u16(code)
            .ok()
            .filter(|c| c.is_client_error() || c.is_server_error())
            .ok_or_else(|| {
                HttpError::BadRequest(format!("failure_status={code} is not a 4xx or 5xx status"))
            })?,
    };
    let m = &st.shared.metrics;
    let apply = m.apply_queue_depth.load(Ordering::Relaxed);
    let broadcast = m.broadcast_queue_depth.load(Ordering::Relaxed);
    let queue = apply + broadcast;
    let alive = alive_with_self(&members(&st));
    // The core's last observed version: health never waits for a reader connection, so
    // it answers while runaway queries hold every reader.
    let version = *st.shared.db_version.borrow();
    let mut problems = Vec::new();
    let now = std::time::Instant::now();
    for (name, state) in m.loops.each() {
        if let Some(stuck) = state.stuck(now, FAILING_FOR) {
            problems.push(format!(
                "the {name} loop has been failing for {:.0} s ({} attempts): {}",
                stuck.failing_for.as_secs_f64(),
                stuck.streak,
                stuck.last_error
            ));
        }
    }
    if let Some(max) = p.max_queue.or(p.queue_size) {
        if queue > max {
            problems.push(format!(
                "queues hold {queue} units, more than max_queue={max}"
            ));
        }
    }
    if let Some(min) = p.min_members {
        if alive < min {
            problems.push(format!(
                "{alive} members alive, fewer than min_members={min}"
            ));
        }
    }
    if !problems.is_empty() {
        let error = format!(
            "unhealthy: {} (members alive {alive}, queue_size {queue}, gaps 0)",
            problems.join("; ")
        );
        tracing::debug!(%error, "health check failed");
        return Ok((failure, Json(json!({ "error": error }))).into_response());
    }
    Ok(Json(json!({
        "response": {
            "gaps": 0,
            "members": alive,
            "p99_lag": 0.0,
            "queue_size": queue,
            "ok": true,
            "db_version": version,
            "members_alive": alive,
            "apply_queue_depth": apply,
            "broadcast_queue_depth": broadcast,
        }
    }))
    .into_response())
}

/// Alive members counting this node: a running node is alive by definition, so a healthy
/// single node has one member alive and `min_members=1` holds.
pub fn alive_with_self(all: &[MemberInfo]) -> usize {
    all.iter().filter(|x| x.state == "alive").count() + 1
}

/// `GET /v1/members`: `{"members": [{"site_id", "addr", "state", "rtt_ms"}]}`, this node
/// first (`"self": true`, always alive): a healthy single node is a cluster of one, as
/// `/v1/health` and `/v1/status` count it.
pub async fn get_members(State(st): State<AppState>) -> Json<serde_json::Value> {
    let me = json!({
        "site_id": st.shared.site_id_hex,
        "addr": st.shared.gossip_addr.map(|a| a.to_string()),
        "state": "alive",
        "rtt_ms": null,
        "self": true,
    });
    let mut all = vec![me];
    for m in members(&st) {
        all.push(serde_json::to_value(m).unwrap_or(serde_json::Value::Null));
    }
    Json(json!({ "members": all }))
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn get_metrics(State(st): State<AppState>) -> Response {
    let m = &st.shared.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "patina_changes_applied_total",
        "counter",
        "Remote changes merged into this node.",
        load(&m.changes_applied).to_string(),
    );
    metric(
        "patina_changes_broadcast_total",
        "counter",
        "Local changes pushed to peers.",
        load(&m.changes_broadcast).to_string(),
    );
    metric(
        "patina_units_received_total",
        "counter",
        "Change units received from peers.",
        load(&m.units_received).to_string(),
    );
    metric(
        "patina_sync_rounds_total",
        "counter",
        "Anti-entropy rounds run.",
        load(&m.sync_rounds).to_string(),
    );
    metric(
        "patina_sync_changes_received_total",
        "counter",
        "Changes received in sync messages off the wire, duplicates included.",
        load(&m.sync_changes_received).to_string(),
    );
    metric(
        "patina_sync_bytes_received_total",
        "counter",
        "Bytes of sync messages received off the wire, duplicates included.",
        load(&m.sync_bytes_received).to_string(),
    );
    metric(
        "patina_frames_rejected_total",
        "counter",
        "Frames refused (corrupt, oversized, wrong cluster).",
        load(&m.frames_rejected).to_string(),
    );
    metric(
        "patina_peer_connections",
        "gauge",
        "QUIC connections to peers open now (idle ones are closed).",
        load(&m.peer_connections).to_string(),
    );
    metric(
        "patina_apply_queue_depth",
        "gauge",
        "Units waiting to be applied.",
        load(&m.apply_queue_depth).to_string(),
    );
    metric(
        "patina_broadcast_queue_depth",
        "gauge",
        "Units waiting to be broadcast.",
        load(&m.broadcast_queue_depth).to_string(),
    );
    let _ = writeln!(
        out,
        "# HELP patina_apply_latency_seconds Time to apply a batch of remote changes.\n\
         # TYPE patina_apply_latency_seconds summary\n\
         patina_apply_latency_seconds_sum {}\npatina_apply_latency_seconds_count {}",
        load(&m.apply_latency_us_total) as f64 / 1e6,
        load(&m.apply_batches)
    );
    let _ = writeln!(
        out,
        "# HELP patina_loop_failures_total Failed attempts of a background loop (tailer, apply, pull_server); each keeps retrying.\n# TYPE patina_loop_failures_total counter"
    );
    for (name, state) in m.loops.each() {
        let _ = writeln!(
            out,
            "patina_loop_failures_total{{loop=\"{name}\"}} {}",
            load(&state.failures)
        );
    }
    let _ = writeln!(
        out,
        "# HELP patina_loop_failing Whether a background loop has been failing for at least {} s (1) or not (0).\n# TYPE patina_loop_failing gauge",
        FAILING_FOR.as_secs()
    );
    let now = std::time::Instant::now();
    for (name, state) in m.loops.each() {
        let failing = u8::from(state.stuck(now, FAILING_FOR).is_some());
        let _ = writeln!(out, "patina_loop_failing{{loop=\"{name}\"}} {failing}");
    }
    let all = members(&st);
    let _ = writeln!(
        out,
        "# HELP patina_members Cluster members by SWIM state (this node not included).\n# TYPE patina_members gauge"
    );
    for state in ["alive", "suspect", "down"] {
        let n = all.iter().filter(|x| x.state == state).count();
        let _ = writeln!(out, "patina_members{{state=\"{state}\"}} {n}");
    }
    let version = *st.shared.db_version.borrow();
    let _ = writeln!(out, "# HELP patina_db_version Latest local crsql_db_version().\n# TYPE patina_db_version gauge\npatina_db_version {version}");
    let _ = writeln!(out, "# HELP patina_api_subscriptions Live subscriptions.\n# TYPE patina_api_subscriptions gauge\npatina_api_subscriptions {}", st.subs.count());
    st.stats.render(&mut out);
    let mut resp = (StatusCode::OK, out).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
