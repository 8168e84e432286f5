//! The API's own metrics, rendered by `GET /metrics` beside the node's: requests by route
//! and status (a counter and a duration histogram), and how well group commit groups.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use super::AppState;
use crate::node::LATENCY_BUCKETS;

/// Metrics of the HTTP API, in a registry of their own (the API can be started and
/// stopped apart from the node in tests).
pub struct ApiStats {
    registry: Registry,
    /// `patina_api_requests_total{route,status}`: requests answered.
    requests: IntCounterVec,
    /// `patina_http_request_seconds{route,status}`: request to response head. Streams
    /// (queries, subscriptions) count until their head is sent, not until they end.
    request_seconds: HistogramVec,
    /// Commits of the API writer.
    pub write_groups: IntCounter,
    /// Write requests committed (over `write_groups`: the mean group size).
    pub write_requests: IntCounter,
}

impl Default for ApiStats {
    fn default() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "patina_api_requests_total",
                "HTTP API requests answered, by route and status.",
            ),
            &["route", "status"],
        )
        .expect("metric names are constant and valid");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "patina_http_request_seconds",
                "HTTP API request duration to the response head, by route and status.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "status"],
        )
        .expect("metric names are constant and valid");
        let write_groups = IntCounter::new(
            "patina_api_write_groups_total",
            "Commits of the API writer (group commit).",
        )
        .expect("metric names are constant and valid");
        let write_requests = IntCounter::new(
            "patina_api_write_requests_total",
            "Write requests committed by the API writer.",
        )
        .expect("metric names are constant and valid");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(write_groups.clone()),
            Box::new(write_requests.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::error!("cannot register an API metric: {e}");
            }
        }
        ApiStats {
            registry,
            requests,
            request_seconds,
            write_groups,
            write_requests,
        }
    }
}

impl std::fmt::Debug for ApiStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiStats").finish_non_exhaustive()
    }
}

impl ApiStats {
    /// Counts one answered request and its duration.
    pub fn count(&self, route: &str, status: u16, seconds: f64) {
        let status = status.to_string();
        let labels = [route, status.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.request_seconds
            .with_label_values(&labels)
            .observe(seconds);
    }

    /// Everything registered, for the `/metrics` encoder.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

/// Middleware (on matched routes): counts each answer by route template and status.
pub async fn count_requests(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    st.stats.count(
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}
