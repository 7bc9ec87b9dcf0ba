//! Health checks pushed by the control plane: their validation and one run
//! of each kind.
//!
//! * HTTP — `GET url` with reqwest (https verified against the system's
//!   roots, no proxy, redirects not followed); passes on the expected
//!   status (any 2xx when none) and, when asked, when the first
//!   [`BODY_LIMIT`] bytes of the body contain a string.
//! * TCP — a connection to `host:port` is established.
//! * exec — the program exits with 0, run through [`crate::process::capture`]
//!   (own process group, killed at the timeout, subject to `[commands]`:
//!   `enabled`, `allow`, `run_as`).
//!
//! HTTP and TCP results say the status, the latency and a fixed reason
//! (`connection refused`, `timed out`, ...), never anything the target sent
//! (no body, no header, no error text of the peer's). Their targets go
//! through [`super::target`]: link-local and metadata addresses are refused
//! before any connection unless `[health] allow_metadata_targets`.

use std::sync::OnceLock;
use std::time::Duration;

use tether_protocol::{
    CommandStatus, HealthCheckKind, HealthCheckSpec, BUILTIN_HEALTH_CHECK_PREFIX,
    HEALTH_OUTPUT_LIMIT,
};
use tokio::time::Instant;

use super::target::{self, GuardedResolver, RefusedTarget};
use super::Probe;
use crate::config::CommandPolicy;
use crate::process;

/// Bounds on a pushed check's interval, in milliseconds.
pub const MIN_INTERVAL_MS: u64 = 1_000;
pub const MAX_INTERVAL_MS: u64 = 7 * 86_400_000;
/// Bound on a pushed check's timeout, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// Longest id or name.
pub const MAX_ID_LEN: usize = 128;
/// Bytes of an HTTP body searched for `body_contains`.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Why a spec cannot run, or `Ok` (targets that are link-local or metadata
/// addresses by their very name are refused here, see [`target`]).
pub fn validate(spec: &HealthCheckSpec, ctx: &PushedContext) -> Result<(), String> {
    let policy = &ctx.policy;
    if spec.id.is_empty() || spec.id.len() > MAX_ID_LEN || spec.id.chars().any(char::is_control) {
        return Err(format!(
            "id must be 1 to {MAX_ID_LEN} bytes without control characters"
        ));
    }
    if spec.id.starts_with(BUILTIN_HEALTH_CHECK_PREFIX) {
        return Err(format!(
            "ids starting with {BUILTIN_HEALTH_CHECK_PREFIX} are reserved for built-in checks"
        ));
    }
    if spec.name.len() > MAX_ID_LEN {
        return Err(format!("name must be at most {MAX_ID_LEN} bytes"));
    }
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&spec.interval_ms) {
        return Err(format!(
            "interval_ms must be between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS}"
        ));
    }
    if !(1..=MAX_TIMEOUT_MS).contains(&spec.timeout_ms) {
        return Err(format!("timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"));
    }
    match &spec.kind {
        HealthCheckKind::Http {
            url,
            expected_status,
            body_contains,
        } => {
            let parsed = reqwest::Url::parse(url).map_err(|err| format!("invalid url: {err}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err("url must be http:// or https://".into());
            }
            if expected_status.is_some_and(|status| !(100..=599).contains(&status)) {
                return Err("expected_status must be between 100 and 599".into());
            }
            if body_contains.as_ref().is_some_and(|text| text.len() > 1024) {
                return Err("body_contains must be at most 1024 bytes".into());
            }
            let host = parsed.host_str().unwrap_or_default();
            if !ctx.allow_metadata_targets && target::is_refused_host(host) {
                return Err(RefusedTarget {
                    target: host.to_string(),
                }
                .to_string());
            }
        }
        HealthCheckKind::Tcp { address } => {
            let port = address
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port > 0) {
                return Err("address must be host:port".into());
            }
            let host = address.rsplit_once(':').map_or("", |(host, _)| host);
            if !ctx.allow_metadata_targets && target::is_refused_host(host) {
                return Err(RefusedTarget {
                    target: host.to_string(),
                }
                .to_string());
            }
        }
        HealthCheckKind::Exec { argv } => match process::check_policy(policy, argv) {
            // A program that is missing now may be installed later: the
            // runs will say so.
            Ok(_) | Err(CommandStatus::FailedToStart { .. }) => {}
            Err(CommandStatus::Refused { reason }) => return Err(reason),
            Err(other) => return Err(format!("{other:?}")),
        },
    }
    Ok(())
}

/// What pushed checks need: the command policy and an HTTP client, built
/// on first use.
pub struct PushedContext {
    policy: CommandPolicy,
    /// `[health] allow_metadata_targets`.
    allow_metadata_targets: bool,
    http: OnceLock<Result<reqwest::Client, String>>,
}

impl PushedContext {
    pub fn new(policy: CommandPolicy) -> Self {
        Self {
            policy,
            allow_metadata_targets: false,
            http: OnceLock::new(),
        }
    }

    /// Lets HTTP and TCP checks reach link-local and metadata targets.
    pub fn allow_metadata_targets(mut self, allow: bool) -> Self {
        self.allow_metadata_targets = allow;
        self
    }

    pub fn policy(&self) -> &CommandPolicy {
        &self.policy
    }

    fn http(&self) -> Result<&reqwest::Client, String> {
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("tether-agent/", env!("CARGO_PKG_VERSION")))
                    .dns_resolver(std::sync::Arc::new(GuardedResolver {
                        allow: self.allow_metadata_targets,
                    }))
                    .build()
                    .map_err(|err| format!("cannot build an HTTP client: {err}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// One run of a pushed check, within `timeout`.
pub async fn run(kind: &HealthCheckKind, timeout: Duration, ctx: &PushedContext) -> Probe {
    match kind {
        HealthCheckKind::Http {
            url,
            expected_status,
            body_contains,
        } => match ctx.http() {
            Ok(client) => {
                http(
                    client,
                    url,
                    *expected_status,
                    body_contains.as_deref(),
                    timeout,
                    ctx.allow_metadata_targets,
                )
                .await
            }
            Err(why) => Probe::Fail(why),
        },
        HealthCheckKind::Tcp { address } => tcp(address, timeout, ctx.allow_metadata_targets).await,
        HealthCheckKind::Exec { argv } => exec(&ctx.policy, argv, timeout).await,
    }
}

/// The refusal of a target somewhere in `err`'s causes.
fn refused_target<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a RefusedTarget> {
    let mut source = Some(err);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<RefusedTarget>() {
            return Some(refused);
        }
        source = cause.source();
    }
    None
}

/// A fixed reason for a failed connection: never text the peer chose.
fn io_reason(err: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "connection reset",
        ErrorKind::TimedOut => "timed out",
        ErrorKind::NotFound => "name not resolved",
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
        ErrorKind::AddrNotAvailable => "address not available",
        ErrorKind::PermissionDenied => "permission denied",
        _ => "cannot connect",
    }
}

/// A fixed reason for a failed HTTP exchange.
fn http_reason(err: &reqwest::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io_reason(io);
        }
        source = cause.source();
    }
    if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else if err.is_body() || err.is_decode() {
        "the body could not be read"
    } else if err.is_request() {
        "invalid HTTP answer"
    } else {
        "HTTP error"
    }
}

async fn http(
    client: &reqwest::Client,
    url: &str,
    expected_status: Option<u16>,
    body_contains: Option<&str>,
    timeout: Duration,
    allow_metadata_targets: bool,
) -> Probe {
    // Literal addresses never reach the resolver: checked here.
    if let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_string))
    {
        if !allow_metadata_targets && target::is_refused_host(&host) {
            return Probe::Fail(RefusedTarget { target: host }.to_string());
        }
    }
    let started = Instant::now();
    let exchange = async {
        let mut response = client.get(url).send().await?;
        let status = response.status();
        let mut body = Vec::new();
        while body_contains.is_some() && body.len() < BODY_LIMIT {
            match response.chunk().await? {
                Some(chunk) => {
                    let room = BODY_LIMIT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                None => break,
            }
        }
        Ok::<_, reqwest::Error>((status, body))
    };
    let elapsed = || started.elapsed().as_millis();
    let (status, body) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => {
            if let Some(refused) = refused_target(&err) {
                return Probe::Fail(refused.to_string());
            }
            return Probe::Fail(format!(
                "GET {url} failed after {} ms: {}",
                elapsed(),
                http_reason(&err)
            ));
        }
        Err(_) => {
            return Probe::Fail(format!(
                "GET {url} got no complete answer within {} ms",
                timeout.as_millis()
            ))
        }
    };
    let line = format!("GET {url}: HTTP {} in {} ms", status.as_u16(), elapsed());
    if !expected(status.as_u16(), expected_status) {
        let wanted = expected_status.map_or("2xx".to_string(), |code| code.to_string());
        return Probe::Fail(format!("{line} (expected {wanted})"));
    }
    if let Some(needle) = body_contains {
        let found = body
            .windows(needle.len().max(1))
            .any(|window| window == needle.as_bytes());
        if !found && !needle.is_empty() {
            return Probe::Fail(format!(
                "{line}, but the first {} KiB of the body do not contain the expected text",
                BODY_LIMIT / 1024
            ));
        }
    }
    Probe::Pass(line)
}

fn expected(status: u16, expected_status: Option<u16>) -> bool {
    match expected_status {
        Some(code) => status == code,
        None => (200..300).contains(&status),
    }
}

async fn tcp(address: &str, timeout: Duration, allow_metadata_targets: bool) -> Probe {
    let started = Instant::now();
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let connect = async {
        if !allow_metadata_targets && target::is_refused_host(host) {
            return Err(Err(RefusedTarget {
                target: host.to_string(),
            }));
        }
        let addrs = tokio::net::lookup_host(address)
            .await
            .map_err(|err| Ok(io_reason(&err)))?;
        let addrs = target::check_resolved(host, addrs, allow_metadata_targets).map_err(Err)?;
        let mut last = "name not resolved";
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => return Ok((stream, addr)),
                Err(err) => last = io_reason(&err),
            }
        }
        Err(Ok(last))
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok((_stream, peer))) => Probe::Pass(format!(
            "connected to {address} ({peer}) in {} ms",
            started.elapsed().as_millis()
        )),
        Ok(Err(Err(refused))) => Probe::Fail(refused.to_string()),
        Ok(Err(Ok(reason))) => Probe::Fail(format!(
            "cannot connect to {address} after {} ms: {reason}",
            started.elapsed().as_millis()
        )),
        Err(_) => Probe::Fail(format!(
            "no connection to {address} within {} ms",
            timeout.as_millis()
        )),
    }
}

async fn exec(policy: &CommandPolicy, argv: &[String], timeout: Duration) -> Probe {
    let (outcome, output) = process::capture(policy, argv, timeout, HEALTH_OUTPUT_LIMIT).await;
    let output = String::from_utf8_lossy(&output).into_owned();
    let status = match outcome.status {
        CommandStatus::Exited { code: 0 } => return Probe::Pass(output),
        CommandStatus::Exited { code } => format!("exited with {code}"),
        CommandStatus::Killed { signal } => format!("killed by signal {signal}"),
        CommandStatus::TimedOut => format!("timed out after {} ms", timeout.as_millis()),
        CommandStatus::Cancelled => "cancelled".to_string(),
        CommandStatus::Refused { reason } => format!("refused: {reason}"),
        CommandStatus::FailedToStart { reason } => reason,
    };
    if output.is_empty() {
        Probe::Fail(status)
    } else {
        Probe::Fail(format!("{status}\n{output}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: HealthCheckKind) -> HealthCheckSpec {
        HealthCheckSpec {
            id: "c1".into(),
            name: "check".into(),
            kind,
            interval_ms: 10_000,
            timeout_ms: 1_000,
            retries: 3,
            start_period_ms: 0,
        }
    }

    fn http_kind(url: &str) -> HealthCheckKind {
        HealthCheckKind::Http {
            url: url.into(),
            expected_status: None,
            body_contains: None,
        }
    }

    #[test]
    fn specs_are_validated() {
        let policy = PushedContext::new(CommandPolicy::default());
        assert!(validate(&spec(http_kind("http://127.0.0.1:8080/health")), &policy).is_ok());
        assert!(validate(&spec(http_kind("ftp://example.com/")), &policy).is_err());
        assert!(validate(&spec(http_kind("not a url")), &policy).is_err());
        let tcp = |address: &str| {
            spec(HealthCheckKind::Tcp {
                address: address.into(),
            })
        };
        assert!(validate(&tcp("db:5432"), &policy).is_ok());
        assert!(validate(&tcp("[::1]:5432"), &policy).is_ok());
        assert!(validate(&tcp("db"), &policy).is_err());
        assert!(validate(&tcp(":80"), &policy).is_err());
        let mut reserved = tcp("db:1");
        reserved.id = "builtin:disk".into();
        assert!(validate(&reserved, &policy)
            .unwrap_err()
            .contains("reserved"));
        let mut fast = tcp("db:1");
        fast.interval_ms = 10;
        assert!(validate(&fast, &policy).is_err());
        let mut no_timeout = tcp("db:1");
        no_timeout.timeout_ms = 0;
        assert!(validate(&no_timeout, &policy).is_err());
        let exec = spec(HealthCheckKind::Exec {
            argv: vec!["true".into()],
        });
        assert!(validate(&exec, &policy).is_ok());
        let locked = PushedContext::new(CommandPolicy {
            enabled: false,
            ..CommandPolicy::default()
        });
        assert!(validate(&exec, &locked).unwrap_err().contains("disabled"));
        let empty = spec(HealthCheckKind::Exec { argv: vec![] });
        assert!(validate(&empty, &policy).is_err());
    }

    #[test]
    fn metadata_targets_are_rejected_unless_the_agent_allows_them() {
        let strict = PushedContext::new(CommandPolicy::default());
        let open = PushedContext::new(CommandPolicy::default()).allow_metadata_targets(true);
        for kind in [
            http_kind("http://169.254.169.254/latest/meta-data/"),
            http_kind("http://metadata.google.internal/computeMetadata/v1/"),
            http_kind("http://[fd00:ec2::254]/latest/"),
            HealthCheckKind::Tcp {
                address: "169.254.169.254:80".into(),
            },
            HealthCheckKind::Tcp {
                address: "[fe80::1]:22".into(),
            },
        ] {
            let why = validate(&spec(kind.clone()), &strict).unwrap_err();
            assert!(why.starts_with("refused_target: "), "{kind:?}: {why}");
            assert!(validate(&spec(kind), &open).is_ok());
        }
    }

    #[tokio::test]
    async fn a_refused_target_fails_before_any_connection() {
        let strict = PushedContext::new(CommandPolicy::default());
        let timeout = Duration::from_secs(5);
        let started = Instant::now();
        let probe = run(
            &http_kind("http://169.254.169.254/latest/"),
            timeout,
            &strict,
        )
        .await;
        assert!(
            matches!(&probe, Probe::Fail(why) if why.starts_with("refused_target: 169.254.169.254")),
            "{probe:?}"
        );
        let probe = run(
            &HealthCheckKind::Tcp {
                address: "169.254.169.254:80".into(),
            },
            timeout,
            &strict,
        )
        .await;
        assert!(
            matches!(&probe, Probe::Fail(why) if why.starts_with("refused_target: ")),
            "{probe:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
