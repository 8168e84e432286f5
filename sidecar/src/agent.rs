//! Placeholder until membership lands (the real node lives in agent/ on the sync engineer's side).
use std::future::Future;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("patina agent: not wired yet (waiting for membership)")]
    NotYet,
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    _config: crate::config::Config,
    _shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    Err(AgentError::NotYet)
}
