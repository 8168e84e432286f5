//! `GET /v1/health`, `GET /v1/members`, `GET /metrics`: what operators and load balancers
//! look at.

use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
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
    /// Corrosion's "missing versions" threshold: unhealthy when more versions than this,
    /// summed over every origin, are known to exist and not held here.
    pub gaps: Option<u64>,
    /// Unhealthy when some origin misses more versions than this (known to exist, not
    /// held here): this node is that far behind on that origin's writes.
    pub max_lag_versions: Option<i64>,
    /// Unhealthy when some origin (an alive member, or one heard from in the last
    /// `sync::FORGET_AFTER`) has not been heard from for more than this many seconds:
    /// it may have written what this node has not seen (a partition, or it is down).
    pub max_lag_secs: Option<f64>,
    /// Corrosion's commit-lag threshold. patina does not sample a lag quantile, so it
    /// reports 0 and this threshold never fails; use `max_lag_secs`/`max_lag_versions`.
    pub p99_lag: Option<f64>,
    /// Unhealthy when a unit has waited in the schema buffer (for a table or column this
    /// node lacks) for more than this many seconds: a schema rollout left unfinished.
    pub max_buffered_age: Option<u64>,
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
    let apply = m.apply_queue_depth.get().max(0) as u64;
    let broadcast = m.broadcast_queue_depth.get().max(0) as u64;
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
    if let Ok(problem) = m.sync_problem.read() {
        if let Some(problem) = problem.as_ref() {
            problems.push(problem.clone());
        }
    }
    if let Some(max) = p.max_queue.or(p.queue_size) {
        if queue > max {
            problems.push(format!(
                "queues hold {queue} units, more than max_queue={max}"
            ));
        }
    }
    if let Some(max) = p.max_lag_secs {
        if !max.is_finite() || max < 0.0 {
            return Err(HttpError::BadRequest(format!(
                "max_lag_secs={max} is not a number of seconds ≥ 0"
            )));
        }
    }
    let report = m.staleness.report();
    let lag = crate::staleness::check(
        &report,
        crate::db::tail::unix_ms() as i64,
        p.max_lag_versions,
        p.max_lag_secs,
    );
    let gaps = lag.missing.max(0) as u64;
    problems.extend(lag.problems.iter().cloned());
    if let Some(max) = p.gaps {
        if gaps > max {
            problems.push(format!(
                "{gaps} versions known to exist are missing here, more than gaps={max}"
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
    let (fingerprint, buffered) = m.schema.snapshot();
    let buffered_age = buffered.oldest_received_at.map(|t| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        now.saturating_sub(t).max(0) as u64
    });
    if let (Some(max), Some(age)) = (p.max_buffered_age, buffered_age) {
        if age > max {
            problems.push(format!(
                "{} units have waited up to {age} s in the schema buffer, more than \
                 max_buffered_age={max}; this node lacks {}",
                buffered.units,
                buffered.missing.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        let error = format!(
            "unhealthy: {} (members alive {alive}, queue_size {queue}, gaps {gaps})",
            problems.join("; ")
        );
        tracing::debug!(%error, "health check failed");
        return Ok((failure, Json(json!({ "error": error }))).into_response());
    }
    Ok(Json(json!({
        "response": {
            "gaps": gaps,
            "members": alive,
            "p99_lag": 0.0,
            "queue_size": queue,
            "ok": true,
            "db_version": version,
            "members_alive": alive,
            "apply_queue_depth": apply,
            "broadcast_queue_depth": broadcast,
            "schema": {
                "fingerprint": fingerprint.map(|f| format!("{f:016x}")),
                "buffered_units": buffered.units,
                "buffered_changes": buffered.changes,
                "oldest_buffered_s": buffered_age,
                "missing": buffered.missing,
                "origins_elsewhere": m.schema.elsewhere().into_iter()
                    .map(|(site_id, fingerprint)| json!({"site_id": site_id, "fingerprint": fingerprint}))
                    .collect::<Vec<_>>(),
            },
            "missing_versions": gaps,
            "max_silent_secs": lag.max_silent_secs,
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

/// `GET /metrics`: Prometheus text exposition (format 0.0.4) of the node's registry, the
/// API's, and the values only known at scrape time (membership, loop health, versions).
pub async fn get_metrics(State(st): State<AppState>) -> Response {
    let m = &st.shared.metrics;
    m.staleness
        .refresh_silence(crate::db::tail::unix_ms() as i64);
    let mut families = m.gather();
    families.extend(st.stats.gather());
    // The older name of the apply histogram, kept as the summary it always was.
    families.push(family(
        "patina_apply_latency_seconds",
        "Time to apply a batch of remote changes (sum and count of patina_apply_batch_seconds).",
        MetricType::SUMMARY,
        vec![(
            vec![],
            Value::Summary(
                m.apply_batch.get_sample_sum(),
                m.apply_batch.get_sample_count(),
            ),
        )],
    ));
    families.push(family(
        "patina_loop_failures_total",
        "Failed attempts of a background loop (tailer, apply, pull_server); each keeps retrying.",
        MetricType::COUNTER,
        m.loops
            .each()
            .iter()
            .map(|(name, state)| {
                let n = state.failures.load(Ordering::Relaxed) as f64;
                (vec![("loop", *name)], Value::Plain(n))
            })
            .collect(),
    ));
    let now = std::time::Instant::now();
    families.push(family(
        "patina_loop_failing",
        &format!(
            "Whether a background loop has been failing for at least {} s (1) or not (0).",
            FAILING_FOR.as_secs()
        ),
        MetricType::GAUGE,
        m.loops
            .each()
            .iter()
            .map(|(name, state)| {
                let failing = f64::from(u8::from(state.stuck(now, FAILING_FOR).is_some()));
                (vec![("loop", *name)], Value::Plain(failing))
            })
            .collect(),
    ));
    let all = members(&st);
    families.push(family(
        "patina_members",
        "Cluster members by SWIM state (this node not included).",
        MetricType::GAUGE,
        ["alive", "suspect", "down"]
            .into_iter()
            .map(|state| {
                let n = all.iter().filter(|x| x.state == state).count() as f64;
                (vec![("state", state)], Value::Plain(n))
            })
            .collect(),
    ));
    let version = *st.shared.db_version.borrow();
    families.push(family(
        "patina_db_version",
        "Latest local crsql_db_version().",
        MetricType::GAUGE,
        vec![(vec![], Value::Plain(version as f64))],
    ));
    families.push(family(
        "patina_api_subscriptions",
        "Live subscriptions.",
        MetricType::GAUGE,
        vec![(vec![], Value::Plain(st.subs.count() as f64))],
    ));
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!("cannot encode /metrics: {e}");
        return (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response();
    }
    let mut resp = (StatusCode::OK, out).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// A sample's value in a scrape-time family.
enum Value {
    /// A counter's or gauge's value.
    Plain(f64),
    /// A summary without quantiles: (sum, count).
    Summary(f64, u64),
}

/// One metric family built at scrape time from `(labels, value)` samples.
fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<(Vec<(&str, &str)>, Value)>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    let metrics = samples
        .into_iter()
        .map(|(labels, value)| {
            let mut metric = Metric::default();
            metric.set_label(
                labels
                    .into_iter()
                    .map(|(k, v)| {
                        let mut l = LabelPair::default();
                        l.set_name(k.to_owned());
                        l.set_value(v.to_owned());
                        l
                    })
                    .collect(),
            );
            match value {
                Value::Plain(v) if kind == MetricType::COUNTER => {
                    let mut c = prometheus::proto::Counter::default();
                    c.set_value(v);
                    metric.set_counter(c);
                }
                Value::Plain(v) => {
                    let mut g = prometheus::proto::Gauge::default();
                    g.set_value(v);
                    metric.set_gauge(g);
                }
                Value::Summary(sum, count) => {
                    let mut s = prometheus::proto::Summary::default();
                    s.set_sample_sum(sum);
                    s.set_sample_count(count);
                    metric.set_summary(s);
                }
            }
            metric
        })
        .collect();
    f.set_metric(metrics);
    f
}
