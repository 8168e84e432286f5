//! Shutdown signals: SIGTERM (systemd, supervisors) and SIGINT (Ctrl-C) both mean "stop
//! cleanly": stop accepting, finish the current apply batch, leave the cluster, exit 0.

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
                return;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("cannot install signal handlers ({e}); only Ctrl-C stops the node");
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
