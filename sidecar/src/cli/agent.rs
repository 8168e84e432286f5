//! `patina agent`: the config file, then flags over it (flags win), then run the node.

use anyhow::Context;

use super::AgentArgs;
use crate::config::Config;

/// Runs `patina agent`.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    init_tracing(&config.log.level);
    crate::memory::limit_arenas();
    // Two workers are plenty for a node (SQLite work runs on its own threads) and keep
    // the idle footprint small.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("patina")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let restart = std::env::var_os(RESTARTED).is_some();
    let outcome = rt.block_on(async {
        crate::memory::spawn_trimmer();
        crate::agent::run(config, crate::shutdown::signal(), restart).await
    })?;
    drop(rt);
    if outcome == crate::agent::Outcome::Reseed {
        // A fresh process image: no socket, thread or task of the run that stopped
        // survives, the pid stays (supervisors see one process), and the start re-seeds.
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("cannot find this executable to restart")?;
        let err = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(RESTARTED, "1")
            .exec();
        return Err(anyhow::anyhow!(
            "cannot restart {} to re-seed ({err}); the re-seed is recorded: start the node \
             again",
            exe.display()
        ));
    }
    Ok(())
}

/// Set in the environment of a node that re-executed itself to re-seed.
const RESTARTED: &str = "PATINA_RESTARTED_TO_RESEED";

/// The config file (when given) with every flag that was set applied over it.
pub fn build_config(args: &AgentArgs) -> anyhow::Result<Config> {
    let mut c = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = &args.db_path {
        c.db.path = v.clone();
    }
    if !args.db_schema_paths.is_empty() {
        c.db.schema_paths = args.db_schema_paths.clone();
    }
    if let Some(v) = &args.db_extension_path {
        c.db.extension_path = Some(v.clone());
    }
    if let Some(v) = args.db_synchronous {
        c.db.synchronous = v;
    }
    if let Some(v) = args.api_addr {
        c.api.addr = v;
    }
    if let Some(v) = &args.api_token {
        c.api.token = Some(v.clone());
    }
    if let Some(v) = args.api_max_body {
        c.api.max_body = v;
    }
    if let Some(v) = args.api_query_timeout {
        c.api.query_timeout = v;
    }
    if let Some(v) = args.api_max_result_bytes {
        c.api.max_result_bytes = v;
    }
    if let Some(v) = args.gossip_addr {
        c.gossip.addr = v;
    }
    if !args.gossip_bootstrap.is_empty() {
        c.gossip.bootstrap = args.gossip_bootstrap.clone();
    }
    if let Some(v) = args.gossip_cluster_id {
        c.gossip.cluster_id = v;
    }
    if let Some(v) = &args.gossip_tls_ca_file {
        c.gossip.tls.ca_file = Some(v.clone());
    }
    if let Some(v) = &args.gossip_tls_cert_file {
        c.gossip.tls.cert_file = Some(v.clone());
    }
    if let Some(v) = &args.gossip_tls_key_file {
        c.gossip.tls.key_file = Some(v.clone());
    }
    if args.gossip_insecure {
        c.gossip.insecure = true;
    }
    if let Some(v) = args.sync_tombstone_retention {
        c.sync.tombstone_retention = v;
    }
    if let Some(v) = args.sync_forget_after {
        c.sync.forget_after = v;
    }
    if let Some(v) = args.sync_auto_reseed {
        c.sync.auto_reseed = v;
    }
    if let Some(v) = args.sync_seed_from_snapshot {
        c.sync.seed_from_snapshot = v;
    }
    if let Some(v) = &args.log_level {
        c.log.level = v.clone();
    }
    Ok(c)
}

/// Logs to stderr; `RUST_LOG` wins over `log.level`.
fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("p.toml");
        std::fs::write(
            &f,
            "[db]\npath = \"file.db\"\n[gossip]\ncluster_id = 3\nbootstrap = [\"a:1\"]\n",
        )
        .expect("write");
        let args = AgentArgs {
            config: Some(f),
            db_path: Some("flag.db".into()),
            gossip_bootstrap: vec!["b:2".into()],
            ..AgentArgs::default()
        };
        let c = build_config(&args).expect("config");
        assert_eq!(c.db.path, std::path::PathBuf::from("flag.db"));
        assert_eq!(c.gossip.cluster_id, 3);
        assert_eq!(c.gossip.bootstrap, vec!["b:2".to_string()]);
    }
}
