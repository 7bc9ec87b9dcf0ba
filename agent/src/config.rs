//! `agent.toml` and its `TETHER_AGENT_*` environment overrides: where the
//! control plane is, which CA to pin, the bootstrap token, the deployment the
//! server belongs to, the local command policy, the metrics spool bound,
//! the Docker socket and the built-in health checks' thresholds.
//!
//! Every key is optional. A missing file is an empty configuration unless the
//! operator named the file explicitly.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use tether_certs::CaFingerprint;

/// Where the agent looks for its configuration when told nothing.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tether/agent.toml";

/// A one-time enrollment token. A secret: its `Debug` output is redacted and
/// it is never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken(String);

impl BootstrapToken {
    /// The token in clear, for the enrollment request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BootstrapToken(<redacted>)")
    }
}

impl FromStr for BootstrapToken {
    type Err = EmptyToken;

    fn from_str(s: &str) -> Result<Self, EmptyToken> {
        let token = s.trim();
        if token.is_empty() {
            Err(EmptyToken)
        } else {
            Ok(Self(token.to_string()))
        }
    }
}

/// An empty bootstrap token was given.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the enrollment token is empty")]
pub struct EmptyToken;

/// Which commands relayed by the control plane (and pushed `exec` health
/// checks) this agent runs, and as whom (`[commands]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandPolicy {
    /// `false` refuses every command.
    pub enabled: bool,
    /// When present and not empty, only what an entry matches may run.
    /// Absent or empty: every program may run (`enabled = false` refuses
    /// all). See [`AllowEntry`] for the two forms.
    #[serde(deserialize_with = "parse_allow")]
    pub allow: Option<Vec<AllowEntry>>,
    /// Runs commands and `exec` checks as this user (a name or a numeric
    /// uid) with its primary group and supplementary groups, `HOME`,
    /// `USER` and `LOGNAME` set from its passwd entry. Absent: as the
    /// agent's own user. Needs the agent to run as root (or as that user).
    pub run_as: Option<String>,
}

impl Default for CommandPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            allow: None,
            run_as: None,
        }
    }
}

/// One entry of `[commands] allow`.
///
/// * A string (`"uptime"`, `"/usr/bin/uptime"`) matches `argv[0]` only, with
///   any arguments: a bare name matches a bare `argv[0]` looked up in the
///   agent's `PATH`; an absolute path matches that `argv[0]` or a bare name
///   that resolves to it. A listed shell or interpreter therefore allows
///   everything: pin its arguments with the array form.
/// * An array (`["/bin/sh", "-c", "echo hi"]`, `["systemctl", "status",
///   "*"]`) pins the whole argv: its first element matches `argv[0]` as a
///   string entry does; each further element matches the argument at its
///   position exactly, except `"*"`, which matches any one argument, and a
///   last `"**"`, which matches any number of remaining arguments (zero
///   included). The argv must have no arguments beyond the pattern's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AllowEntry {
    Program(String),
    Argv(Vec<String>),
}

impl AllowEntry {
    /// The entry's `argv[0]` part.
    pub fn program(&self) -> &str {
        match self {
            Self::Program(program) => program,
            Self::Argv(pattern) => pattern.first().map_or("", String::as_str),
        }
    }

    /// Whether `args` (the argv after `argv[0]`) match the entry.
    pub fn matches_args(&self, args: &[String]) -> bool {
        let Self::Argv(pattern) = self else {
            return true;
        };
        let pattern = pattern.get(1..).unwrap_or_default();
        let mut args = args.iter();
        for (i, element) in pattern.iter().enumerate() {
            if element == "**" && i + 1 == pattern.len() {
                return true;
            }
            match args.next() {
                Some(arg) if element == "*" || element == arg => {}
                _ => return false,
            }
        }
        args.next().is_none()
    }
}

impl From<&str> for AllowEntry {
    fn from(program: &str) -> Self {
        Self::Program(program.to_string())
    }
}

fn parse_allow<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<AllowEntry>>, D::Error> {
    let entries = Vec::<AllowEntry>::deserialize(deserializer)?;
    for entry in &entries {
        if entry.program().is_empty() {
            return Err(serde::de::Error::custom(
                "an allow entry needs a program: a non-empty string, or an array starting with one",
            ));
        }
    }
    Ok(Some(entries))
}

/// Where unsent metrics batches are kept (`[spool]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Bound on the spooled batches, in bytes; past it the oldest batches
    /// are dropped (and counted). At least [`MIN_SPOOL_BYTES`].
    #[serde(deserialize_with = "parse_spool_bytes")]
    pub max_bytes: u64,
}

/// The smallest spool bound accepted: room for a few dozen batches.
pub const MIN_SPOOL_BYTES: u64 = 64 * 1024;

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: crate::spool::DEFAULT_MAX_BYTES,
        }
    }
}

fn parse_spool_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let bytes = u64::deserialize(deserializer)?;
    if bytes < MIN_SPOOL_BYTES {
        return Err(serde::de::Error::custom(format!(
            "spool max_bytes must be at least {MIN_SPOOL_BYTES} (64 KiB), got {bytes}"
        )));
    }
    Ok(bytes)
}

/// Container metrics from the local Docker daemon (`[docker]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// `false` reports no container metrics at all.
    pub enabled: bool,
    /// The daemon's unix socket (a path, or `unix://` + path).
    pub socket: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: crate::metrics::docker::DEFAULT_SOCKET.to_string(),
        }
    }
}

/// The built-in health checks (`[health]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// How often the built-in checks run, in seconds (at least 1).
    #[serde(deserialize_with = "parse_interval_seconds")]
    pub interval_seconds: u64,
    /// `builtin:disk` fails when a real filesystem's space or inodes are
    /// used above this percentage.
    #[serde(deserialize_with = "parse_percent")]
    pub disk_max_percent: f64,
    /// `builtin:memory` fails when memory in use (total minus available) is
    /// above this percentage.
    #[serde(deserialize_with = "parse_percent")]
    pub memory_max_percent: f64,
    /// `builtin:clock_skew` fails when the clock differs from the control
    /// plane's by more than this, in milliseconds.
    pub clock_skew_max_ms: u64,
    /// Built-in checks not to run, by name: `docker`, `disk`, `memory`,
    /// `control_plane`, `clock_skew`. (`docker` is also off when
    /// `[docker] enabled = false`.)
    #[serde(deserialize_with = "parse_builtin_names")]
    pub disabled: Vec<String>,
    /// `true` lets pushed HTTP and TCP checks reach link-local addresses
    /// (169.254.0.0/16, fe80::/10) and cloud metadata endpoints
    /// (169.254.169.254, fd00:ec2::254, 168.63.129.16, 100.100.100.200,
    /// `metadata.google.internal`, ...). Off by default: such targets are
    /// refused before any connection, names checked after resolution.
    pub allow_metadata_targets: bool,
}

/// Names of the built-in health checks (ids are `builtin:<name>`).
pub const BUILTIN_CHECKS: [&str; 5] = ["docker", "disk", "memory", "control_plane", "clock_skew"];

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_seconds: 30,
            disk_max_percent: 90.0,
            memory_max_percent: 95.0,
            clock_skew_max_ms: 5_000,
            disabled: Vec::new(),
            allow_metadata_targets: false,
        }
    }
}

fn parse_interval_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let seconds = u64::deserialize(deserializer)?;
    if !(1..=86_400).contains(&seconds) {
        return Err(serde::de::Error::custom(format!(
            "interval_seconds must be between 1 and 86400, got {seconds}"
        )));
    }
    Ok(seconds)
}

fn parse_percent<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let percent = f64::deserialize(deserializer)?;
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(serde::de::Error::custom(format!(
            "a percentage must be above 0 and at most 100, got {percent}"
        )));
    }
    Ok(percent)
}

fn parse_builtin_names<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(deserializer)?;
    for name in &names {
        let bare = name.strip_prefix("builtin:").unwrap_or(name);
        if !BUILTIN_CHECKS.contains(&bare) {
            return Err(serde::de::Error::custom(format!(
                "unknown built-in health check {name:?} (known: {})",
                BUILTIN_CHECKS.join(", ")
            )));
        }
    }
    Ok(names
        .into_iter()
        .map(|name| name.trim_start_matches("builtin:").to_string())
        .collect())
}

/// The parsed `agent.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control plane QUIC address, `host:port`.
    #[serde(default)]
    pub server: Option<String>,
    /// The control plane CA to pin, `sha256:<hex>`.
    #[serde(default, deserialize_with = "parse_optional")]
    pub ca_fingerprint: Option<CaFingerprint>,
    /// Bootstrap token used when the state dir holds no identity yet.
    #[serde(default, deserialize_with = "parse_optional")]
    pub token: Option<BootstrapToken>,
    /// Deployment this server was provisioned by, if any.
    #[serde(default)]
    pub deployment_id: Option<String>,
    #[serde(default)]
    pub commands: CommandPolicy,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    #[serde(default)]
    pub health: HealthConfig,
}

/// What is needed to enroll.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub server: String,
    pub ca_fingerprint: CaFingerprint,
    pub token: BootstrapToken,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is invalid: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("environment variable {name} is invalid: {message}")]
    Env { name: &'static str, message: String },
}

impl Config {
    /// Parses `agent.toml` text. Errors are one line, with the line number.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|err| match err.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {}", err.message().trim())
            }
            None => err.message().trim().to_string(),
        })
    }

    /// Reads `path`. A missing file is an empty configuration unless
    /// `required` (the operator named the file).
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Self::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Overrides keys from the environment (`TETHER_AGENT_SERVER`,
    /// `TETHER_AGENT_CA_FINGERPRINT`, `TETHER_AGENT_TOKEN`,
    /// `TETHER_AGENT_DEPLOYMENT_ID`); empty variables are ignored.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        if let Some(server) = get("TETHER_AGENT_SERVER") {
            self.server = Some(server.trim().to_string());
        }
        if let Some(pin) = get("TETHER_AGENT_CA_FINGERPRINT") {
            let pin = pin
                .parse()
                .map_err(|err: tether_certs::CertError| ConfigError::Env {
                    name: "TETHER_AGENT_CA_FINGERPRINT",
                    message: err.to_string(),
                })?;
            self.ca_fingerprint = Some(pin);
        }
        if let Some(token) = get("TETHER_AGENT_TOKEN") {
            self.token = token.parse().ok();
        }
        if let Some(deployment) = get("TETHER_AGENT_DEPLOYMENT_ID") {
            self.deployment_id = Some(deployment.trim().to_string());
        }
        Ok(())
    }

    /// The file (explicit path, or the default one if it exists) plus the
    /// process environment.
    pub fn from_sources(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match explicit {
            Some(path) => Self::load(path, true)?,
            None => Self::load(Path::new(DEFAULT_CONFIG_PATH), false)?,
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Everything needed to enroll, when the configuration holds all of it.
    pub fn bootstrap(&self) -> Option<Bootstrap> {
        Some(Bootstrap {
            server: self.server.clone()?,
            ca_fingerprint: self.ca_fingerprint?,
            token: self.token.clone()?,
        })
    }
}

fn parse_optional<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn full_config_parses_every_key() {
        let text = format!(
            r#"
            server = "cp.example.com:7443"
            ca_fingerprint = "{PIN}"
            token = "s3cret"
            deployment_id = "d-1"
            [commands]
            enabled = false
            allow = ["/usr/bin/uptime"]
            [spool]
            max_bytes = 1048576
            [docker]
            enabled = false
            socket = "/run/user/1000/docker.sock"
            [health]
            interval_seconds = 10
            disk_max_percent = 80
            memory_max_percent = 97.5
            clock_skew_max_ms = 2000
            disabled = ["docker", "builtin:clock_skew"]
            "#
        );
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.server.as_deref(), Some("cp.example.com:7443"));
        assert_eq!(config.ca_fingerprint.unwrap().to_string(), PIN);
        assert_eq!(config.token.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(config.deployment_id.as_deref(), Some("d-1"));
        assert!(!config.commands.enabled);
        assert_eq!(config.commands.allow, Some(vec!["/usr/bin/uptime".into()]));
        assert_eq!(config.spool.max_bytes, 1 << 20);
        assert!(!config.docker.enabled);
        assert_eq!(config.docker.socket, "/run/user/1000/docker.sock");
        assert_eq!(config.health.interval_seconds, 10);
        assert_eq!(config.health.disk_max_percent, 80.0);
        assert_eq!(config.health.memory_max_percent, 97.5);
        assert_eq!(config.health.clock_skew_max_ms, 2000);
        assert_eq!(config.health.disabled, vec!["docker", "clock_skew"]);
        let bootstrap = config.bootstrap().unwrap();
        assert_eq!(bootstrap.server, "cp.example.com:7443");
    }

    #[test]
    fn spool_and_docker_default_to_16_mib_and_the_local_socket() {
        let config = Config::parse("[docker]\nenabled = true\n").unwrap();
        assert_eq!(config.spool.max_bytes, 16 * 1024 * 1024);
        assert!(config.docker.enabled);
        assert_eq!(config.docker.socket, "/var/run/docker.sock");
        let tiny = Config::parse("[spool]\nmax_bytes = 10").unwrap_err();
        assert!(
            tiny.starts_with("line 2:") && tiny.contains("at least"),
            "{tiny}"
        );
        let typo = Config::parse("[docker]\nsokcet = \"/x\"").unwrap_err();
        assert!(typo.contains("sokcet"), "{typo}");
        let typo = Config::parse("[spool]\nmax_byte = 100000").unwrap_err();
        assert!(typo.contains("max_byte"), "{typo}");
    }

    #[test]
    fn health_defaults_and_invalid_health_values() {
        let health = Config::parse("").unwrap().health;
        assert_eq!(health.interval_seconds, 30);
        assert_eq!(health.disk_max_percent, 90.0);
        assert_eq!(health.memory_max_percent, 95.0);
        assert_eq!(health.clock_skew_max_ms, 5000);
        assert!(health.disabled.is_empty());
        let err = Config::parse("[health]\ndisk_max_percent = 120").unwrap_err();
        assert!(
            err.starts_with("line 2:") && err.contains("at most 100"),
            "{err}"
        );
        let err = Config::parse("[health]\ndisabled = [\"dsik\"]").unwrap_err();
        assert!(
            err.contains("dsik") && err.contains("control_plane"),
            "{err}"
        );
        let err = Config::parse("[health]\ninterval_seconds = 0").unwrap_err();
        assert!(err.contains("interval_seconds"), "{err}");
    }

    #[test]
    fn empty_config_allows_all_commands_and_cannot_bootstrap() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert!(config.commands.enabled);
        assert!(config.commands.allow.is_none());
        assert!(config.docker.enabled);
        assert!(config.bootstrap().is_none());
    }

    #[test]
    fn allow_entries_are_programs_or_argv_patterns_and_run_as_and_metadata_parse() {
        let config = Config::parse(
            r#"
            [commands]
            allow = ["uptime", ["/bin/sh", "-c", "echo hi"], ["systemctl", "status", "*"], ["journalctl", "**"]]
            run_as = "nobody"
            [health]
            allow_metadata_targets = true
            "#,
        )
        .unwrap();
        let allow = config.commands.allow.unwrap();
        assert_eq!(allow[0], AllowEntry::Program("uptime".into()));
        assert_eq!(
            allow[1],
            AllowEntry::Argv(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()])
        );
        assert_eq!(config.commands.run_as.as_deref(), Some("nobody"));
        assert!(config.health.allow_metadata_targets);
        assert!(!Config::default().health.allow_metadata_targets);
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // A string entry: any arguments.
        assert!(allow[0].matches_args(&args(&["-p", "x"])));
        // Exact argv only.
        assert!(allow[1].matches_args(&args(&["-c", "echo hi"])));
        assert!(!allow[1].matches_args(&args(&["-c", "id"])));
        assert!(!allow[1].matches_args(&args(&["-c", "echo hi", "extra"])));
        assert!(!allow[1].matches_args(&args(&["-c"])));
        // `*`: exactly one argument, any value.
        assert!(allow[2].matches_args(&args(&["status", "nginx"])));
        assert!(!allow[2].matches_args(&args(&["status"])));
        assert!(!allow[2].matches_args(&args(&["stop", "nginx"])));
        assert!(!allow[2].matches_args(&args(&["status", "a", "b"])));
        // A last `**`: any rest, none included.
        assert!(allow[3].matches_args(&args(&[])));
        assert!(allow[3].matches_args(&args(&["-u", "x", "-n", "5"])));
        for bad in ["allow = [[]]", "allow = [\"\"]", "allow = [[\"\", \"-c\"]]"] {
            let err = Config::parse(&format!("[commands]\n{bad}")).unwrap_err();
            assert!(err.contains("needs a program"), "{bad}: {err}");
        }
    }

    #[test]
    fn token_never_appears_in_debug_output() {
        let config = Config::parse(r#"token = "s3cret""#).unwrap();
        let debug = format!("{config:?} {:?}", config.bootstrap());
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("redacted"));
    }

    #[test]
    fn invalid_values_and_unknown_keys_are_one_line_errors_with_the_line() {
        let bad_pin = Config::parse("server = \"a:1\"\nca_fingerprint = \"md5:00\"").unwrap_err();
        assert!(bad_pin.starts_with("line 2:"), "{bad_pin}");
        let typo = Config::parse("servr = \"a:1\"").unwrap_err();
        assert!(typo.contains("servr") && !typo.contains('\n'), "{typo}");
    }

    #[test]
    fn missing_file_is_empty_unless_named_explicitly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        assert_eq!(Config::load(&path, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(&path, true),
            Err(ConfigError::Read { .. })
        ));
        std::fs::write(&path, "deployment_id = \"d-9\"").unwrap();
        assert_eq!(
            Config::load(&path, true).unwrap().deployment_id.as_deref(),
            Some("d-9")
        );
    }

    #[test]
    fn environment_overrides_the_file_and_ignores_empty_values() {
        let mut config = Config::parse("server = \"file:1\"\ntoken = \"from-file\"").unwrap();
        config
            .apply_env(|name| match name {
                "TETHER_AGENT_SERVER" => Some("env:2".into()),
                "TETHER_AGENT_CA_FINGERPRINT" => Some(PIN.into()),
                "TETHER_AGENT_TOKEN" => Some("  ".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.server.as_deref(), Some("env:2"));
        assert!(config.ca_fingerprint.is_some());
        assert_eq!(config.token.unwrap().expose(), "from-file");
        let mut config = Config::default();
        let err = config
            .apply_env(|name| (name == "TETHER_AGENT_CA_FINGERPRINT").then(|| "nope".into()))
            .unwrap_err();
        assert!(err.to_string().contains("TETHER_AGENT_CA_FINGERPRINT"));
    }
}
