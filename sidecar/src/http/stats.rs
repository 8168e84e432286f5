//! The API's own counters, rendered by `GET /metrics` beside the node's: requests by route
//! and status, and how well group commit groups.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;

/// Counters of the HTTP API.
#[derive(Debug, Default)]
pub struct ApiStats {
    /// (route, status) → requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Commits of the API writer.
    pub write_groups: AtomicU64,
    /// Write requests committed (over `write_groups`: the mean group size).
    pub write_requests: AtomicU64,
}

impl ApiStats {
    /// Counts one answered request.
    pub fn count(&self, route: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route.to_owned(), status)).or_insert(0) += 1;
        }
    }

    /// Prometheus text of these counters.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP patina_api_requests_total HTTP API requests answered, by route and status.\n\
             # TYPE patina_api_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "patina_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP patina_api_write_groups_total Commits of the API writer (group commit).\n\
             # TYPE patina_api_write_groups_total counter\n\
             patina_api_write_groups_total {}\n\
             # HELP patina_api_write_requests_total Write requests committed by the API writer.\n\
             # TYPE patina_api_write_requests_total counter\n\
             patina_api_write_requests_total {}",
            self.write_groups.load(Ordering::Relaxed),
            self.write_requests.load(Ordering::Relaxed)
        );
    }
}

/// Middleware (on matched routes): counts each answer by route template and status.
pub async fn count_requests(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    st.stats.count(&route, resp.status().as_u16());
    resp
}
