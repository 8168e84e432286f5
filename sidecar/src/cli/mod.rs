//! Command-line interface: clap definitions; each subcommand's body lives in its own file.
//!
//! Core-owned: `agent`, `demo`, `tls`. API-owned: `exec`, `query`, `members`, `status`,
//! `backup`, `restore`, `reload` (they talk to a node over HTTP, `--api`, `--token`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Synchronous;

pub mod agent;
pub mod backup;
pub mod client;
pub mod demo;
pub mod exec;
pub mod members;
pub mod query;
pub mod reload;
pub mod reseed;
pub mod restore;
pub mod status;
pub mod tls;

/// `patina`: multi-writer SQLite replication.
#[derive(Debug, Parser)]
#[command(
    name = "patina",
    version,
    about = "patina: multi-writer SQLite replication. Run one node per machine; every node is writable.",
    propagate_version = true,
    after_help = "Quick start:
  patina demo                                      a local 3-node cluster showing a write replicating
  patina agent --db-path app.db --db-schema-paths schema/ --gossip-bootstrap HOST:8787
  patina exec \"UPDATE machines SET status = 'healthy' WHERE id = 'machine-123'\"
  patina query \"SELECT * FROM machines\"        (--json for JSON)

Client commands reach a node with --api ADDR (default 127.0.0.1:8080) and --token or PATINA_TOKEN.
The node's config keys are flags of `patina agent` (see `patina agent --help`).
More: README.md and docs/http-api.md."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start; boxing buys nothing
pub enum Command {
    /// Run a node.
    Agent(AgentArgs),
    /// Start a local 3-node cluster and show a write replicating.
    Demo(DemoArgs),
    /// Run SQL statements (one transaction) on a node.
    Exec(ExecArgs),
    /// Run a read-only query on a node.
    Query(QueryArgs),
    /// List the cluster members a node sees.
    Members(MembersArgs),
    /// Show a node's status.
    Status(StatusArgs),
    /// Write a consistent snapshot of a node's database, without node identity.
    Backup(BackupArgs),
    /// Replace a stopped node's database with a backup (fresh site id unless told not to).
    Restore(RestoreArgs),
    /// Re-apply a node's schema files.
    Reload(ReloadArgs),
    /// Empty a stopped node's replicated tables and give it a fresh site id, so that it
    /// fills up again from its peers (its database is set aside first).
    Reseed(ReseedArgs),
    /// Generate PEM files for mutual TLS between peers.
    Tls(TlsArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(a) => agent::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Exec(a) => exec::run(a),
        Command::Query(a) => query::run(a),
        Command::Members(a) => members::run(a),
        Command::Status(a) => status::run(a),
        Command::Backup(a) => backup::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Reload(a) => reload::run(a),
        Command::Reseed(a) => reseed::run(a),
        Command::Tls(a) => tls::run(a),
    }
}

/// How a client subcommand reaches a node.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// HTTP API address of the node.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api: String,
    /// Bearer token of the node's API.
    #[arg(long, env = "PATINA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `patina agent`: every config key is also a flag (dots/underscores become dashes).
#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// TOML config file; flags override its keys.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// db.path: the database file.
    #[arg(long)]
    pub db_path: Option<PathBuf>,
    /// db.schema_paths: schema `.sql` files or folders (repeatable).
    #[arg(long)]
    pub db_schema_paths: Vec<PathBuf>,
    /// db.extension_path: libpatina.so (default: beside this executable).
    #[arg(long)]
    pub db_extension_path: Option<PathBuf>,
    /// db.synchronous: normal or full.
    #[arg(long, value_enum)]
    pub db_synchronous: Option<Synchronous>,
    /// api.addr: HTTP API listen address.
    #[arg(long)]
    pub api_addr: Option<SocketAddr>,
    /// api.token: bearer token for the API.
    #[arg(long, env = "PATINA_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// api.max_body: largest request body (e.g. 8MiB).
    #[arg(long, value_parser = crate::config::parse_size)]
    pub api_max_body: Option<usize>,
    /// api.query_timeout: how long a request's statements may run (e.g. 5s, 500ms).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub api_query_timeout: Option<std::time::Duration>,
    /// api.max_result_bytes: largest /sql answer, or /v1/queries row, as JSON (e.g. 8MiB).
    #[arg(long, value_parser = crate::config::parse_size)]
    pub api_max_result_bytes: Option<usize>,
    /// gossip.addr: QUIC (UDP) listen address.
    #[arg(long)]
    pub gossip_addr: Option<SocketAddr>,
    /// gossip.bootstrap: host:port of a peer to join (repeatable).
    #[arg(long)]
    pub gossip_bootstrap: Vec<String>,
    /// gossip.cluster_id: peers of another cluster id are refused.
    #[arg(long)]
    pub gossip_cluster_id: Option<u64>,
    /// gossip.tls.ca_file: cluster CA certificate (PEM).
    #[arg(long)]
    pub gossip_tls_ca_file: Option<PathBuf>,
    /// gossip.tls.cert_file: this node's certificate (PEM).
    #[arg(long)]
    pub gossip_tls_cert_file: Option<PathBuf>,
    /// gossip.tls.key_file: this node's private key (PEM).
    #[arg(long)]
    pub gossip_tls_key_file: Option<PathBuf>,
    /// gossip.insecure: allow unauthenticated peers on a non-loopback address.
    #[arg(long)]
    pub gossip_insecure: bool,
    /// sync.tombstone_retention: deletes held this long are collected anyway (e.g. 72h).
    #[arg(long, value_parser = crate::config::parse_long_duration)]
    pub sync_tombstone_retention: Option<std::time::Duration>,
    /// sync.forget_after: members unseen this long are forgotten (e.g. 7d).
    #[arg(long, value_parser = crate::config::parse_long_duration)]
    pub sync_forget_after: Option<std::time::Duration>,
    /// sync.auto_reseed: re-seed on its own after being away too long (true or false).
    #[arg(long)]
    pub sync_auto_reseed: Option<bool>,
    /// sync.seed_from_snapshot: a node holding nothing copies a peer's snapshot (true or false).
    #[arg(long)]
    pub sync_seed_from_snapshot: Option<bool>,
    /// log.level (RUST_LOG wins when set).
    #[arg(long)]
    pub log_level: Option<String>,
}

/// `patina demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Exit 0 once the demo write is visible on every node (for CI).
    #[arg(long)]
    pub exit_after_convergence: bool,
    /// Keep the nodes' files here instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// First HTTP API port; nodes use this and the next two (0: pick free ports).
    #[arg(long, default_value_t = 0)]
    pub api_port: u16,
}

/// `patina exec SQL`.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// SQL statements, run in order in one transaction.
    pub sql: String,
}

/// `patina query SQL`.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print `{"columns": [...], "rows": [[...]]}` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A read-only query.
    pub sql: String,
}

/// `patina members`.
#[derive(Debug, Clone, Args)]
pub struct MembersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `patina status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `patina backup PATH`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Where to write the snapshot.
    pub path: PathBuf,
    /// Keep the node's site id in the copy, to bring this very node back after losing
    /// its disk (then restore with --keep-site-id). Default: a fresh id, so the copy can
    /// seed a new node.
    #[arg(long)]
    pub keep_site_id: bool,
}

/// `patina restore PATH` (the node must be stopped).
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The backup file to restore from.
    pub path: PathBuf,
    /// The node's database file to replace.
    #[arg(long, default_value = "patina.db")]
    pub db_path: PathBuf,
    /// libpatina.so (default: beside this executable).
    #[arg(long)]
    pub db_extension_path: Option<PathBuf>,
    /// Keep the site id the backup holds instead of giving the node a fresh one. Only
    /// meaningful for a backup taken with `patina backup --keep-site-id`, restored onto
    /// the node it came from while no other copy of that node runs.
    #[arg(long)]
    pub keep_site_id: bool,
}

/// `patina reseed` (the node must be stopped).
#[derive(Debug, Clone, Args)]
pub struct ReseedArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The node's database file.
    #[arg(long, default_value = "patina.db")]
    pub db_path: PathBuf,
    /// libpatina.so (default: beside this executable).
    #[arg(long)]
    pub db_extension_path: Option<PathBuf>,
}

/// `patina reload`.
#[derive(Debug, Clone, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `patina tls ...`.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    #[command(subcommand)]
    pub kind: TlsKind,
}

/// Which PEM pair to generate.
#[derive(Debug, Clone, Subcommand)]
pub enum TlsKind {
    /// The cluster CA: `ca.pem` + `ca.key`.
    Ca {
        #[command(subcommand)]
        action: TlsCaGenerate,
    },
    /// A node certificate signed by the CA: `server.pem` + `server.key`.
    Server {
        #[command(subcommand)]
        action: TlsGenerate,
    },
    /// A client certificate signed by the CA: `client.pem` + `client.key`.
    Client {
        #[command(subcommand)]
        action: TlsGenerate,
    },
}

/// `generate` and its options.
#[derive(Debug, Clone, Subcommand)]
pub enum TlsGenerate {
    /// Write the PEM files.
    Generate(TlsGenerateArgs),
}

/// `patina tls ca generate` and its options: a CA is self-signed, so the CA-file and
/// `--san` options of node certificates do not apply and are not offered.
#[derive(Debug, Clone, Subcommand)]
pub enum TlsCaGenerate {
    /// Write the PEM files.
    Generate(TlsCaGenerateArgs),
}

/// Options of `patina tls ca generate`.
#[derive(Debug, Clone, Args)]
pub struct TlsCaGenerateArgs {
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// File name stem of the output (default: ca).
    #[arg(long)]
    pub name: Option<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Options of `patina tls server|client generate`.
#[derive(Debug, Clone, Args)]
pub struct TlsGenerateArgs {
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// CA certificate (for server/client).
    #[arg(long, default_value = "ca.pem")]
    pub ca_cert: PathBuf,
    /// CA private key (for server/client).
    #[arg(long, default_value = "ca.key")]
    pub ca_key: PathBuf,
    /// Subject alternative names: DNS names or IP addresses (repeatable).
    #[arg(long = "san", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
    pub sans: Vec<String>,
    /// File name stem of the output (default: ca, server or client).
    #[arg(long)]
    pub name: Option<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}
