//! Node configuration: the TOML file of DESIGN §2, every key also a flag.
//!
//! Defaults serve one local node (loopback API and gossip, `patina.db` in the working
//! directory), so `patina agent` with nothing given just works. Flags override the file;
//! the file overrides defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Errors while reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read; nothing was loaded.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole node configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub db: DbConfig,
    pub api: ApiConfig,
    pub gossip: GossipConfig,
    pub sync: SyncSection,
    pub log: LogConfig,
}

/// `[db]`: the database file and the schema it carries.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    /// The database file, opened in WAL mode.
    pub path: PathBuf,
    /// `.sql` files or folders applied, made replicated and migrated at start and on reload.
    pub schema_paths: Vec<PathBuf>,
    /// `libpatina.so`; found beside the executable when unset.
    pub extension_path: Option<PathBuf>,
    /// `normal` (default) or `full`: `full` survives power loss at some write cost.
    pub synchronous: Synchronous,
}

impl Default for DbConfig {
    fn default() -> Self {
        DbConfig {
            path: PathBuf::from("patina.db"),
            schema_paths: Vec::new(),
            extension_path: None,
            synchronous: Synchronous::Normal,
        }
    }
}

/// SQLite `PRAGMA synchronous` level for the node's connections.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

impl Synchronous {
    /// The pragma value.
    pub fn as_sql(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// `[api]`: the HTTP API.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address of the HTTP API.
    pub addr: SocketAddr,
    /// Bearer token; required when `addr` is not loopback.
    pub token: Option<String>,
    /// Largest accepted request body in bytes (`"8MiB"` style or a number in the file).
    #[serde(deserialize_with = "de_size")]
    pub max_body: usize,
    /// How long one request's statements may run (a query, a stream, a write request)
    /// before SQLite's progress handler interrupts them (`"5s"`, `"500ms"`, or seconds as
    /// a number). A runaway query would otherwise hold a reader slot, or the write lock,
    /// and a core, forever.
    #[serde(deserialize_with = "de_duration")]
    pub query_timeout: Duration,
    /// Largest answer `/sql` builds in memory, counted as JSON bytes; also the largest
    /// single row `/v1/queries` and subscriptions send, and the largest TEXT or BLOB value
    /// an API read connection creates. Past it the request fails with 400 naming the limit.
    #[serde(deserialize_with = "de_size")]
    pub max_result_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            max_body: 8 * 1024 * 1024,
            query_timeout: Duration::from_secs(5),
            max_result_bytes: 8 * 1024 * 1024,
        }
    }
}

/// `[gossip]`: the QUIC transport and membership.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// QUIC (UDP) listen address.
    pub addr: SocketAddr,
    /// `host:port` of peers to join.
    pub bootstrap: Vec<String>,
    /// Peers of another cluster id are refused.
    pub cluster_id: u64,
    /// Mutual TLS from a cluster CA.
    pub tls: TlsConfig,
    /// Allow unauthenticated peers on a non-loopback address.
    pub insecure: bool,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8787)),
            bootstrap: Vec::new(),
            cluster_id: 0,
            tls: TlsConfig::default(),
            insecure: false,
        }
    }
}

/// `[sync]`: how long replication metadata is kept (README, "Bounded metadata").
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSection {
    /// A delete's tombstone is collected once every member holds it, or once this node
    /// has held it this long even if some member (down, partitioned) cannot confirm it.
    /// A node away longer than this is re-seeded when it returns (`"72h"`, `"7d"`).
    #[serde(deserialize_with = "de_long_duration")]
    pub tombstone_retention: Duration,
    /// Members not seen for this long are forgotten: their cursors, ranges and
    /// membership rows go. Never shorter than `tombstone_retention`.
    #[serde(deserialize_with = "de_long_duration")]
    pub forget_after: Duration,
    /// Re-seed this node from its peers on its own when it learns it was away too long
    /// (its database is set aside first). When false it stops replicating and says
    /// which command to run.
    pub auto_reseed: bool,
    /// A node that holds nothing yet (a new member, a re-seeded one) copies one peer's
    /// snapshot of the replicated tables instead of merging its whole feed
    /// (`sync::seed`). False: it catches up from feeds only.
    pub seed_from_snapshot: bool,
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            tombstone_retention: Duration::from_secs(72 * 3600),
            forget_after: Duration::from_secs(7 * 24 * 3600),
            auto_reseed: true,
            seed_from_snapshot: true,
        }
    }
}

/// `[gossip.tls]`: PEM files of the cluster CA and this node's certificate.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// True when all three files are set.
    pub fn is_complete(&self) -> bool {
        self.ca_file.is_some() && self.cert_file.is_some() && self.key_file.is_some()
    }
    /// True when any file is set.
    pub fn is_any(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Default filter; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

impl Config {
    /// Reads a TOML file (missing keys take defaults).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the rules that make a configuration unsafe or meaningless.
    ///
    /// Returns whether gossip runs without authentication (to be logged loudly).
    pub fn validate(&self) -> Result<bool, ConfigError> {
        if !self.api.addr.ip().is_loopback() && self.api.token.is_none() {
            return Err(ConfigError::Invalid(format!(
                "api.addr {} is not loopback: set api.token (or --api-token / PATINA_TOKEN)",
                self.api.addr
            )));
        }
        if self.api.max_result_bytes < 1024 {
            return Err(ConfigError::Invalid(format!(
                "api.max_result_bytes {} is too small: give at least 1KiB",
                self.api.max_result_bytes
            )));
        }
        if self.sync.forget_after < self.sync.tombstone_retention {
            return Err(ConfigError::Invalid(format!(
                "sync.forget_after ({:?}) is shorter than sync.tombstone_retention ({:?}): a \
                 member must not be forgotten before the deletes it may lack are",
                self.sync.forget_after, self.sync.tombstone_retention
            )));
        }
        let tls = &self.gossip.tls;
        if tls.is_any() && !tls.is_complete() {
            return Err(ConfigError::Invalid(
                "gossip.tls needs all of ca_file, cert_file and key_file".to_string(),
            ));
        }
        if tls.is_complete() {
            return Ok(false);
        }
        if !self.gossip.addr.ip().is_loopback() && !self.gossip.insecure {
            return Err(ConfigError::Invalid(format!(
                "gossip.addr {} is not loopback and no gossip.tls files are set: \
                 set gossip.tls.{{ca_file,cert_file,key_file}} (see `patina tls`) \
                 or gossip.insecure = true",
                self.gossip.addr
            )));
        }
        Ok(true)
    }
}

/// Parses sizes like `8MiB`, `512KiB`, `1GiB`, `1000` (bytes).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 8MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses durations like `5s`, `500ms`, `2m`, or a number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_upto(s, 86_400.0, "a day")
}

/// Parses long durations (`90s`, `72h`, `7d`): retention periods, up to ten years.
pub fn parse_long_duration(s: &str) -> Result<Duration, String> {
    parse_duration_upto(s, 10.0 * 365.0 * 86_400.0, "ten years")
}

fn parse_duration_upto(s: &str, max_secs: f64, max_name: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 5s or 500ms"))?;
    let secs = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > max_secs {
        return Err(format!(
            "duration {s:?} is out of range (more than 0, at most {max_name})"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    de_duration_with(d, parse_duration)
}

fn de_long_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    de_duration_with(d, parse_long_duration)
}

/// A duration given as a number of seconds or a string, checked by `parse`.
fn de_duration_with<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<Duration, String>,
) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Dur {
        N(f64),
        S(String),
    }
    match Dur::deserialize(d)? {
        Dur::N(n) => parse(&n.to_string()).map_err(serde::de::Error::custom),
        Dur::S(s) => parse(&s).map_err(serde::de::Error::custom),
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(usize),
        S(String),
    }
    match Size::deserialize(d)? {
        Size::N(n) => Ok(n),
        Size::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_one_local_node() {
        let c = Config::from_toml("").expect("empty config parses");
        assert_eq!(c.db.path, PathBuf::from("patina.db"));
        assert_eq!(c.api.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.api.max_body, 8 * 1024 * 1024);
        assert_eq!(c.api.query_timeout, Duration::from_secs(5));
        assert_eq!(c.api.max_result_bytes, 8 * 1024 * 1024);
        assert_eq!(c.gossip.addr.to_string(), "127.0.0.1:8787");
        assert_eq!(c.sync.tombstone_retention, Duration::from_secs(72 * 3600));
        assert!(c.validate().expect("valid"));
        let short =
            Config::from_toml("[sync]\ntombstone_retention = \"7d\"\nforget_after = \"1d\"\n")
                .expect("parses");
        let err = short
            .validate()
            .expect_err("forget_after below the retention");
        assert!(err.to_string().contains("sync.forget_after"), "{err}");
    }

    #[test]
    fn file_keys_parse() {
        let c = Config::from_toml(
            r#"
            [db]
            path = "/var/lib/patina/db"
            schema_paths = ["schema/"]
            [api]
            addr = "0.0.0.0:8080"
            token = "x"
            max_body = "1MiB"
            query_timeout = "250ms"
            max_result_bytes = "2MiB"
            [gossip]
            addr = "10.0.0.1:8787"
            bootstrap = ["10.0.0.2:8787"]
            cluster_id = 7
            [gossip.tls]
            ca_file = "ca.pem"
            cert_file = "c.pem"
            key_file = "k.pem"
            "#,
        )
        .expect("parses");
        assert_eq!(c.api.max_body, 1024 * 1024);
        assert_eq!(c.api.query_timeout, Duration::from_millis(250));
        assert_eq!(c.api.max_result_bytes, 2 * 1024 * 1024);
        assert_eq!(c.gossip.cluster_id, 7);
        assert!(!c.validate().expect("valid"));
    }

    #[test]
    fn non_loopback_without_tls_refuses() {
        let c = Config::from_toml("[gossip]\naddr = \"10.0.0.1:8787\"").expect("parses");
        assert!(c.validate().is_err());
        let c = Config::from_toml("[gossip]\naddr = \"10.0.0.1:8787\"\ninsecure = true")
            .expect("parses");
        assert!(c.validate().expect("valid"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        let c = Config::from_toml("[api]\nquery_timeout = 1.5").expect("parses");
        assert_eq!(c.api.query_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::from_toml("[db]\npaht = \"x\"").is_err());
    }
}
