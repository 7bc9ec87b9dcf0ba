//! `tether serve` configuration: flags, `TETHER_*` environment variables and
//! an optional TOML file, in that order of precedence, resolved into one
//! [`ServeConfig`] with every default filled in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a peer has to open its first stream and send its first frame.
pub(crate) const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for tether serve: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Parses durations like `30s`, `5m`, `1h 30m`, `500ms`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Flags of `tether serve` (each also a `TETHER_<NAME>` variable and a TOML key).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the CA, master key, SQLite file and admin.token.
    #[arg(long, env = "TETHER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP API listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "TETHER_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// QUIC listen address for agents [default: 0.0.0.0:7443].
    #[arg(long, env = "TETHER_QUIC_LISTEN")]
    pub quic_listen: Option<SocketAddr>,
    /// HOST:PORT agents are told to dial [default: the QUIC listen address].
    #[arg(long, env = "TETHER_PUBLIC_QUIC_ADDR")]
    pub public_quic_addr: Option<String>,
    /// Public base URL of the HTTP API [default: http://<api-listen>].
    #[arg(long, env = "TETHER_PUBLIC_API_URL")]
    pub public_api_url: Option<String>,
    /// sqlite://PATH or postgres://... [default: sqlite in the data dir].
    #[arg(long, env = "TETHER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Master key file [default: DATA_DIR/master.key].
    #[arg(long, env = "TETHER_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Metrics reporting interval pushed to agents [default: 30s].
    #[arg(long, env = "TETHER_METRICS_INTERVAL", value_parser = parse_duration)]
    pub metrics_interval: Option<Duration>,
    /// A server silent this long is offline [default: 90s].
    #[arg(long, env = "TETHER_OFFLINE_AFTER", value_parser = parse_duration)]
    pub offline_after: Option<Duration>,
    /// Lifetime of agent certificates; renewed at 2/3 [default: 30d].
    #[arg(long, env = "TETHER_AGENT_CERT_TTL", value_parser = parse_duration)]
    pub agent_cert_ttl: Option<Duration>,
    /// Human name of this branch [default: the host name].
    #[arg(long, env = "TETHER_BRANCH_NAME")]
    pub branch_name: Option<String>,
    /// How long raw metrics points are kept [default: 7d].
    #[arg(long, env = "TETHER_METRICS_RETENTION", value_parser = parse_duration)]
    pub metrics_retention: Option<Duration>,
    /// How long 5-minute and 1-hour rollups are kept [default: 90d].
    #[arg(long, env = "TETHER_ROLLUP_RETENTION", value_parser = parse_duration)]
    pub rollup_retention: Option<Duration>,
    /// How often rollups and retention run [default: 60s].
    #[arg(long, env = "TETHER_ROLLUP_INTERVAL", value_parser = parse_duration)]
    pub rollup_interval: Option<Duration>,
    /// API requests per minute per token [default: 600].
    #[arg(long, env = "TETHER_API_RATE_LIMIT")]
    pub api_rate_limit: Option<u32>,
    /// API requests per minute per admin token [default: 3000].
    #[arg(long, env = "TETHER_API_RATE_LIMIT_ADMIN")]
    pub api_rate_limit_admin: Option<u32>,
    /// The terraform binary [default: `terraform` on PATH].
    #[arg(long, env = "TETHER_TERRAFORM_BIN")]
    pub terraform_bin: Option<PathBuf>,
    /// Directory of agent binaries served at /agent/download/{os}/{arch}
    /// (`tether-agent-<os>-<arch>`, or `tether-agent` for this machine's
    /// platform) [default: the directory of the `tether` executable].
    #[arg(long, env = "TETHER_AGENT_DIR")]
    pub agent_dir: Option<PathBuf>,
    /// A provisioned server that has not enrolled and reported after this
    /// long fails its deployment (and is rolled back) [default: 10m].
    #[arg(long, env = "TETHER_REGISTRATION_TIMEOUT", value_parser = parse_duration)]
    pub registration_timeout: Option<Duration>,
    /// Providers deployments may use, comma separated [default: all].
    #[arg(long, env = "TETHER_ALLOWED_PROVIDERS", value_delimiter = ',')]
    pub allowed_providers: Option<Vec<String>>,
    /// Enable the `local` and `docker` targets, which run servers on this
    /// host (for the root organization only) [default: off].
    #[arg(long, env = "TETHER_ENABLE_HOST_TARGETS", value_parser = clap::builder::BoolishValueParser::new())]
    pub enable_host_targets: bool,
    /// Deployments one replica drives at once [default: 4].
    #[arg(long, env = "TETHER_PROVISION_WORKERS")]
    pub provision_workers: Option<u32>,
    /// Commands of one fan-out dispatched at once [default: 64].
    #[arg(long, env = "TETHER_COMMAND_CONCURRENCY")]
    pub command_concurrency: Option<u32>,
    /// Provisioned servers run the agent as this dedicated system user, in
    /// the `docker` group, instead of root [default: root].
    #[arg(long, env = "TETHER_PROVISION_AGENT_USER")]
    pub provision_agent_user: Option<String>,
    /// Transient Terraform failures (rate limits, timeouts, connection
    /// resets, 5xx from a provider API, a held state lock) of one step are
    /// retried this many times before the deployment fails [default: 3].
    #[arg(long, env = "TETHER_PROVISION_RETRIES")]
    pub provision_retries: Option<u32>,
    /// Delay before the first retry; each further retry doubles it (with
    /// jitter, at most 5 min) [default: 10s].
    #[arg(long, env = "TETHER_PROVISION_RETRY_DELAY", value_parser = parse_duration)]
    pub provision_retry_delay: Option<Duration>,
    /// Operator-trusted Terraform modules: `DIR/<target>/` replaces the
    /// embedded module of that target (an existing one only). Never set
    /// through the API [default: the embedded modules].
    #[arg(long, env = "TETHER_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// An HTTP client must send a request's headers within this long after
    /// connecting (or after its previous response); otherwise the
    /// connection is closed [default: 10s].
    #[arg(long, env = "TETHER_HTTP_HEADER_TIMEOUT", value_parser = parse_duration)]
    pub http_header_timeout: Option<Duration>,
    /// An HTTP request's body must arrive in full within this long after
    /// its headers; otherwise the request fails with 408 [default: 60s].
    #[arg(long, env = "TETHER_HTTP_BODY_TIMEOUT", value_parser = parse_duration)]
    pub http_body_timeout: Option<Duration>,
    /// HTTP connections served at once; further clients wait in the listen
    /// queue until one closes [default: 1024].
    #[arg(long, env = "TETHER_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<u32>,
    /// Agent downloads (`/agent/download`) per minute per source address
    /// [default: 60].
    #[arg(long, env = "TETHER_DOWNLOAD_RATE_LIMIT")]
    pub download_rate_limit: Option<u32>,
    /// Failed enrollments a source address may make per
    /// `--enroll-failure-window`; past it, its enrollments are refused
    /// (`rate_limited`) until the window ends [default: 10].
    #[arg(long, env = "TETHER_ENROLL_FAILURE_LIMIT")]
    pub enroll_failure_limit: Option<u32>,
    /// The window of `--enroll-failure-limit`; the audit log gets one
    /// `server.enroll` row per source and window with the count of its
    /// failures [default: 1m].
    #[arg(long, env = "TETHER_ENROLL_FAILURE_WINDOW", value_parser = parse_duration)]
    pub enroll_failure_window: Option<Duration>,
    /// Let webhooks reach loopback and private receivers (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, fc00::/7), for on-premises setups and tests;
    /// this control plane's own listeners, link-local and metadata
    /// addresses stay refused [default: off].
    #[arg(long, env = "TETHER_ALLOW_PRIVATE_WEBHOOKS")]
    pub allow_private_webhooks: bool,
    /// Directory of instance-catalog overrides: `DIR/<provider>.toml`
    /// replaces the embedded file of that provider (docs/provisioning.md,
    /// *Governance*); a malformed file stops the start [default: none].
    #[arg(long, env = "TETHER_CATALOG_DIR")]
    pub catalog_dir: Option<PathBuf>,
    /// A provision waiting for approval expires (status `expired`) after
    /// this long [default: 72h].
    #[arg(long, env = "TETHER_APPROVAL_TTL", value_parser = parse_duration)]
    pub approval_ttl: Option<Duration>,
}

/// The TOML file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    api_listen: Option<SocketAddr>,
    quic_listen: Option<SocketAddr>,
    public_quic_addr: Option<String>,
    public_api_url: Option<String>,
    database_url: Option<String>,
    master_key_file: Option<PathBuf>,
    metrics_interval: Option<String>,
    offline_after: Option<String>,
    agent_cert_ttl: Option<String>,
    branch_name: Option<String>,
    api_rate_limit: Option<u32>,
    api_rate_limit_admin: Option<u32>,
    metrics_retention: Option<String>,
    rollup_retention: Option<String>,
    rollup_interval: Option<String>,
    terraform_bin: Option<PathBuf>,
    agent_dir: Option<PathBuf>,
    registration_timeout: Option<String>,
    allowed_providers: Option<Vec<String>>,
    enable_host_targets: Option<bool>,
    provision_workers: Option<u32>,
    command_concurrency: Option<u32>,
    provision_agent_user: Option<String>,
    provision_retries: Option<u32>,
    provision_retry_delay: Option<String>,
    templates_dir: Option<PathBuf>,
    http_header_timeout: Option<String>,
    http_body_timeout: Option<String>,
    http_max_connections: Option<u32>,
    download_rate_limit: Option<u32>,
    enroll_failure_limit: Option<u32>,
    enroll_failure_window: Option<String>,
    allow_private_webhooks: Option<bool>,
    catalog_dir: Option<PathBuf>,
    approval_ttl: Option<String>,
}

/// Resolved configuration of a control plane.
#[derive(Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub quic_listen: SocketAddr,
    pub public_quic_addr: Option<String>,
    pub public_api_url: Option<String>,
    pub database_url: String,
    pub master_key_file: PathBuf,
    pub metrics_interval: Duration,
    pub offline_after: Duration,
    pub agent_cert_ttl: Duration,
    pub branch_name: String,
    pub api_rate_limit: u32,
    pub api_rate_limit_admin: u32,
    pub metrics_retention: Duration,
    pub rollup_retention: Duration,
    pub rollup_interval: Duration,
    pub terraform_bin: PathBuf,
    /// `None`: the directory of the running executable.
    pub agent_dir: Option<PathBuf>,
    pub registration_timeout: Duration,
    /// `None`: every provider.
    pub allowed_providers: Option<Vec<String>>,
    /// Whether `local` and `docker` deployments may be requested (by the
    /// root organization).
    pub enable_host_targets: bool,
    pub provision_workers: u32,
    pub command_concurrency: u32,
    /// `None`: provisioned agents run as root.
    pub provision_agent_user: Option<String>,
    /// Retries of a step's transient Terraform failures.
    pub provision_retries: u32,
    /// Delay before the first retry (doubled for each further one).
    pub provision_retry_delay: Duration,
    /// `None`: the embedded modules only.
    pub templates_dir: Option<PathBuf>,
    pub http_header_timeout: Duration,
    pub http_body_timeout: Duration,
    pub http_max_connections: u32,
    pub download_rate_limit: u32,
    pub enroll_failure_limit: u32,
    pub enroll_failure_window: Duration,
    /// Whether webhooks may reach loopback and private addresses.
    pub allow_private_webhooks: bool,
    /// Instance-catalog overrides (`None`: the embedded files only).
    pub catalog_dir: Option<PathBuf>,
    /// How long a provision waits for approval before it expires.
    pub approval_ttl: Duration,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("data_dir", &self.data_dir)
            .field("api_listen", &self.api_listen)
            .field("quic_listen", &self.quic_listen)
            .field("public_quic_addr", &self.public_quic_addr)
            .field(
                "database_url",
                &crate::store::redact_url(&self.database_url),
            )
            .field("metrics_interval", &self.metrics_interval)
            .field("offline_after", &self.offline_after)
            .finish_non_exhaustive()
    }
}

fn file_duration(
    key: &'static str,
    value: Option<String>,
) -> Result<Option<Duration>, ConfigError> {
    value
        .map(|v| parse_duration(&v).map_err(|message| ConfigError::Invalid { key, message }))
        .transpose()
}

impl ServeArgs {
    /// Resolves flags, environment, file and defaults.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("tether-data"));
        let database_url = self
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("tether.db").display()));
        let master_key_file = self
            .master_key_file
            .or(file.master_key_file)
            .unwrap_or_else(|| data_dir.join("master.key"));
        let metrics_interval = self
            .metrics_interval
            .or(file_duration("metrics_interval", file.metrics_interval)?)
            .unwrap_or(Duration::from_secs(30));
        let offline_after = self
            .offline_after
            .or(file_duration("offline_after", file.offline_after)?)
            .unwrap_or(Duration::from_secs(90));
        let agent_cert_ttl = self
            .agent_cert_ttl
            .or(file_duration("agent_cert_ttl", file.agent_cert_ttl)?)
            .unwrap_or(Duration::from_secs(30 * 24 * 3600));
        for (key, value, min) in [
            (
                "metrics_interval",
                metrics_interval,
                Duration::from_millis(100),
            ),
            ("offline_after", offline_after, Duration::from_secs(1)),
            ("agent_cert_ttl", agent_cert_ttl, Duration::from_secs(3)),
        ] {
            if value < min {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("must be at least {}", humantime::format_duration(min)),
                });
            }
        }
        let branch_name = self
            .branch_name
            .or(file.branch_name)
            .or_else(hostname_of_this_machine)
            .unwrap_or_else(|| "tether".into());
        let metrics_retention = self
            .metrics_retention
            .or(file_duration("metrics_retention", file.metrics_retention)?)
            .unwrap_or(Duration::from_secs(7 * 24 * 3600));
        let rollup_retention = self
            .rollup_retention
            .or(file_duration("rollup_retention", file.rollup_retention)?)
            .unwrap_or(Duration::from_secs(90 * 24 * 3600));
        let rollup_interval = self
            .rollup_interval
            .or(file_duration("rollup_interval", file.rollup_interval)?)
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_millis(100));
        let provision_agent_user = self
            .provision_agent_user
            .or(file.provision_agent_user)
            .filter(|user| !user.is_empty());
        if let Some(user) = &provision_agent_user {
            if !crate::provision::bootstrap::valid_user_name(user) {
                return Err(ConfigError::Invalid {
                    key: "provision_agent_user",
                    message: format!(
                        "{user:?} is not a user name: 1-32 lowercase letters, digits, '_' or '-', starting with a letter or '_'"
                    ),
                });
            }
        }
        let registration_timeout = self
            .registration_timeout
            .or(file_duration(
                "registration_timeout",
                file.registration_timeout,
            )?)
            .unwrap_or(Duration::from_secs(600))
            .max(Duration::from_secs(1));
        let provision_retry_delay = self
            .provision_retry_delay
            .or(file_duration(
                "provision_retry_delay",
                file.provision_retry_delay,
            )?)
            .unwrap_or(Duration::from_secs(10))
            .clamp(Duration::from_millis(10), Duration::from_secs(300));
        let http_header_timeout = self
            .http_header_timeout
            .or(file_duration(
                "http_header_timeout",
                file.http_header_timeout,
            )?)
            .unwrap_or(Duration::from_secs(10))
            .clamp(Duration::from_millis(100), Duration::from_secs(3600));
        let http_body_timeout = self
            .http_body_timeout
            .or(file_duration("http_body_timeout", file.http_body_timeout)?)
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_millis(100), Duration::from_secs(3600));
        let enroll_failure_window = self
            .enroll_failure_window
            .or(file_duration(
                "enroll_failure_window",
                file.enroll_failure_window,
            )?)
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600));
        let approval_ttl = self
            .approval_ttl
            .or(file_duration("approval_ttl", file.approval_ttl)?)
            .unwrap_or(Duration::from_secs(72 * 3600))
            .clamp(Duration::from_secs(1), Duration::from_secs(365 * 24 * 3600));
        Ok(ServeConfig {
            catalog_dir: self.catalog_dir.or(file.catalog_dir),
            approval_ttl,
            http_header_timeout,
            http_body_timeout,
            http_max_connections: self
                .http_max_connections
                .or(file.http_max_connections)
                .unwrap_or(1024)
                .clamp(1, 1 << 20),
            download_rate_limit: self
                .download_rate_limit
                .or(file.download_rate_limit)
                .unwrap_or(60)
                .max(1),
            enroll_failure_limit: self
                .enroll_failure_limit
                .or(file.enroll_failure_limit)
                .unwrap_or(10)
                .max(1),
            enroll_failure_window,
            terraform_bin: self
                .terraform_bin
                .or(file.terraform_bin)
                .unwrap_or_else(|| PathBuf::from("terraform")),
            agent_dir: self.agent_dir.or(file.agent_dir),
            registration_timeout,
            allowed_providers: self.allowed_providers.or(file.allowed_providers),
            enable_host_targets: self.enable_host_targets
                || file.enable_host_targets.unwrap_or(false),
            provision_workers: self
                .provision_workers
                .or(file.provision_workers)
                .unwrap_or(4)
                .clamp(1, 64),
            provision_agent_user,
            provision_retries: self
                .provision_retries
                .or(file.provision_retries)
                .unwrap_or(3)
                .min(20),
            provision_retry_delay,
            templates_dir: self.templates_dir.or(file.templates_dir),
            command_concurrency: self
                .command_concurrency
                .or(file.command_concurrency)
                .unwrap_or(64)
                .clamp(1, 4096),
            allow_private_webhooks: self.allow_private_webhooks
                || file.allow_private_webhooks.unwrap_or(false),
            metrics_retention,
            rollup_retention,
            rollup_interval,
            data_dir,
            api_listen: self
                .api_listen
                .or(file.api_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            quic_listen: self
                .quic_listen
                .or(file.quic_listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7443))),
            public_quic_addr: self.public_quic_addr.or(file.public_quic_addr),
            public_api_url: self.public_api_url.or(file.public_api_url),
            database_url,
            master_key_file,
            metrics_interval,
            offline_after,
            agent_cert_ttl,
            branch_name,
            api_rate_limit: self
                .api_rate_limit
                .or(file.api_rate_limit)
                .unwrap_or(600)
                .max(1),
            api_rate_limit_admin: self
                .api_rate_limit_admin
                .or(file.api_rate_limit_admin)
                .unwrap_or(3000)
                .max(1),
        })
    }
}

fn hostname_of_this_machine() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.display().to_string(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn approvals_expire_after_72_hours_unless_the_operator_says_otherwise() {
        let config = ServeArgs::default().resolve().unwrap();
        assert_eq!(config.approval_ttl, Duration::from_secs(72 * 3600));
        assert!(config.catalog_dir.is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(
            &path,
            "approval_ttl = \"2h\"\ncatalog_dir = \"/etc/tether/catalog\"\n",
        )
        .unwrap();
        let file = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(file.approval_ttl, Duration::from_secs(7200));
        assert_eq!(file.catalog_dir, Some(PathBuf::from("/etc/tether/catalog")));
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(
            &path,
            "data_dir = \"/srv/t\"\noffline_after = \"2m\"\nmetrics_interval = \"10s\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            metrics_interval: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/t"));
        assert_eq!(config.offline_after, Duration::from_secs(120));
        assert_eq!(config.metrics_interval, Duration::from_secs(1));
        assert_eq!(config.database_url, "sqlite:///srv/t/tether.db");
        assert_eq!(config.api_listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
    }

    #[test]
    fn host_targets_are_off_unless_a_flag_or_the_file_enables_them() {
        assert!(!ServeArgs::default().resolve().unwrap().enable_host_targets);
        let flag = ServeArgs {
            enable_host_targets: true,
            ..Default::default()
        };
        assert!(flag.resolve().unwrap().enable_host_targets);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, "enable_host_targets = true\n").unwrap();
        let file = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(file.resolve().unwrap().enable_host_targets);
    }

    #[test]
    fn private_webhook_receivers_are_refused_unless_a_flag_or_the_file_allows_them() {
        assert!(
            !ServeArgs::default()
                .resolve()
                .unwrap()
                .allow_private_webhooks
        );
        let flag = ServeArgs {
            allow_private_webhooks: true,
            ..Default::default()
        };
        assert!(flag.resolve().unwrap().allow_private_webhooks);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, "allow_private_webhooks = true\n").unwrap();
        let file = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(file.resolve().unwrap().allow_private_webhooks);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, "data_dri = \"/srv/t\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
    }
}
