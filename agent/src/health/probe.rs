//! Health checks pushed by the control plane: their validation and one run
//! of each kind.
//!
//! * HTTP — `GET url` with reqwest (https verified against the system's
//!   roots, no proxy, redirects not followed); passes on the expected
//!   status (any 2xx when none) and, when asked, when the first
//!   [`BODY_LIMIT`] bytes of the body contain a string.
//! * TCP — a connection to `host:port` is established.
//! * exec — the program exits with 0, run through [`crate::command::capture`]
//!   (own process group, killed at the timeout, subject to `[commands]`).

use std::sync::OnceLock;
use std::time::Duration;

use tether_protocol::{
    CommandStatus, HealthCheckKind, HealthCheckSpec, BUILTIN_HEALTH_CHECK_PREFIX,
    HEALTH_OUTPUT_LIMIT,
};
use tokio::time::Instant;

use super::Probe;
use crate::command;
use crate::config::CommandPolicy;

/// Bounds on a pushed check's interval, in milliseconds.
pub const MIN_INTERVAL_MS: u64 = 1_000;
pub const MAX_INTERVAL_MS: u64 = 7 * 86_400_000;
/// Bound on a pushed check's timeout, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// Longest id or name.
pub const MAX_ID_LEN: usize = 128;
/// Bytes of an HTTP body searched for `body_contains`.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Bytes of an HTTP body quoted in a failure.
const BODY_QUOTE: usize = 512;

/// Why a spec cannot run, or `Ok`.
pub fn validate(spec: &HealthCheckSpec, policy: &CommandPolicy) -> Result<(), String> {
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
        }
        HealthCheckKind::Tcp { address } => {
            let port = address
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port > 0) {
                return Err("address must be host:port".into());
            }
        }
        HealthCheckKind::Exec { argv } => match command::check_policy(policy, argv) {
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
    http: OnceLock<Result<reqwest::Client, String>>,
}

impl PushedContext {
    pub fn new(policy: CommandPolicy) -> Self {
        Self {
            policy,
            http: OnceLock::new(),
        }
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
                )
                .await
            }
            Err(why) => Probe::Fail(why),
        },
        HealthCheckKind::Tcp { address } => tcp(address, timeout).await,
        HealthCheckKind::Exec { argv } => exec(&ctx.policy, argv, timeout).await,
    }
}

/// An error and its causes on one line.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

async fn http(
    client: &reqwest::Client,
    url: &str,
    expected_status: Option<u16>,
    body_contains: Option<&str>,
    timeout: Duration,
) -> Probe {
    let started = Instant::now();
    let exchange = async {
        let mut response = client.get(url).send().await?;
        let status = response.status();
        let mut body = Vec::new();
        let wants_body = body_contains.is_some() || !expected(status.as_u16(), expected_status);
        while wants_body && body.len() < BODY_LIMIT {
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
    let (status, body) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => return Probe::Fail(format!("GET {url} failed: {}", describe(&err))),
        Err(_) => {
            return Probe::Fail(format!(
                "GET {url} got no complete answer within {} ms",
                timeout.as_millis()
            ))
        }
    };
    let elapsed = started.elapsed().as_millis();
    let line = format!("GET {url}: HTTP {status} in {elapsed} ms");
    let quote = || {
        let end = body.len().min(BODY_QUOTE);
        String::from_utf8_lossy(&body[..end]).into_owned()
    };
    if !expected(status.as_u16(), expected_status) {
        let wanted = expected_status.map_or("2xx".to_string(), |code| code.to_string());
        return Probe::Fail(format!("{line} (expected {wanted})\n{}", quote()));
    }
    if let Some(needle) = body_contains {
        let found = body
            .windows(needle.len().max(1))
            .any(|window| window == needle.as_bytes());
        if !found && !needle.is_empty() {
            return Probe::Fail(format!(
                "{line}, but the body does not contain {needle:?}\n{}",
                quote()
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

async fn tcp(address: &str, timeout: Duration) -> Probe {
    let started = Instant::now();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| address.to_string(), |addr| addr.to_string());
            Probe::Pass(format!(
                "connected to {address} ({peer}) in {} ms",
                started.elapsed().as_millis()
            ))
        }
        Ok(Err(err)) => Probe::Fail(format!("cannot connect to {address}: {err}")),
        Err(_) => Probe::Fail(format!(
            "no connection to {address} within {} ms",
            timeout.as_millis()
        )),
    }
}

async fn exec(policy: &CommandPolicy, argv: &[String], timeout: Duration) -> Probe {
    let (outcome, output) = command::capture(policy, argv, timeout, HEALTH_OUTPUT_LIMIT).await;
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
        let policy = CommandPolicy::default();
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
        let locked = CommandPolicy {
            enabled: false,
            allow: None,
        };
        assert!(validate(&exec, &locked).unwrap_err().contains("disabled"));
        let empty = spec(HealthCheckKind::Exec { argv: vec![] });
        assert!(validate(&empty, &policy).is_err());
    }
}
