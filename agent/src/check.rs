//! `tether-agent check`: whether the state dir holds a valid identity, when
//! its certificate expires, whether the control plane completes a QUIC
//! handshake, and the built-in health checks run once (`docker`, `disk`,
//! `memory`; `clock_skew` needs the heartbeats of a running session and is
//! listed as skipped). One line each; any `FAIL` makes the exit status
//! non-zero.

use std::fmt;
use std::time::{Instant, SystemTime};

use tether_certs::agent_client_config;
use tether_protocol::CloseCode;

use crate::config::Config;
use crate::dial::dial;
use crate::format_time;
use crate::health::builtin::{self, Builtin, BuiltinContext};
use crate::health::{Probe, SessionSignals};
use crate::metrics::docker::DockerConnection;
use crate::state::StateDir;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub name: &'static str,
    /// False only for a failure (a skipped check is ok).
    pub ok: bool,
    /// Not run here.
    pub skipped: bool,
    pub detail: String,
}

impl CheckLine {
    fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok,
            skipped: false,
            detail: detail.into(),
        }
    }

    fn skipped(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            skipped: true,
            ..Self::new(name, true, detail)
        }
    }
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.ok, self.skipped) {
            (_, true) => "skip",
            (true, false) => "ok",
            (false, false) => "FAIL",
        };
        write!(f, "{status:<5} {}: {}", self.name, self.detail)
    }
}

/// Runs every check once.
pub async fn check(state_dir: &StateDir, config: &Config) -> Vec<CheckLine> {
    let mut lines = Vec::new();
    let state = match state_dir.load() {
        Ok(Some(state)) => {
            let identity = &state.identity;
            lines.push(CheckLine::new(
                "identity",
                true,
                format!(
                    "server {} (branch {}), CA {}, state dir {}",
                    identity.server_id,
                    identity.branch_id,
                    identity.ca_fingerprint,
                    state_dir.path().display()
                ),
            ));
            let cert = &state.credentials.certificate;
            let now = SystemTime::now();
            lines.push(if state.credentials.expired(now) {
                CheckLine::new(
                    "certificate",
                    false,
                    format!("expired at {}", format_time(cert.not_after)),
                )
            } else {
                let renewal = if cert.renew_at() <= now {
                    "overdue since"
                } else {
                    "due"
                };
                CheckLine::new(
                    "certificate",
                    true,
                    format!(
                        "valid until {}, renewal {renewal} {}",
                        format_time(cert.not_after),
                        format_time(cert.renew_at())
                    ),
                )
            });
            Some(state)
        }
        Ok(None) => {
            let detail = format!(
                "not enrolled: {} holds no identity",
                state_dir.path().display()
            );
            lines.push(CheckLine::new("identity", false, detail));
            None
        }
        Err(err) => {
            lines.push(CheckLine::new("identity", false, err.to_string()));
            None
        }
    };

    let server = config
        .server
        .clone()
        .or_else(|| state.as_ref().map(|s| s.identity.server.clone()));
    let tls = match &state {
        Some(state) => Some(Ok(state.credentials.tls.clone())),
        None => config
            .ca_fingerprint
            .map(|pin| agent_client_config(pin, None)),
    };
    let line = match (server, tls) {
        (Some(server), Some(Ok(tls))) => {
            let started = Instant::now();
            match dial(&server, tls).await {
                Ok(dialed) => {
                    let detail = format!(
                        "{server} ({}) completed a QUIC handshake in {} ms",
                        dialed.addr,
                        started.elapsed().as_millis()
                    );
                    dialed.close(CloseCode::Normal).await;
                    CheckLine::new("control plane", true, detail)
                }
                Err(err) => CheckLine::new("control plane", false, err.to_string()),
            }
        }
        (_, Some(Err(err))) => CheckLine::new("control plane", false, err.to_string()),
        _ => CheckLine::new(
            "control plane",
            false,
            "no address and CA fingerprint known: enroll, or set server and ca_fingerprint in agent.toml",
        ),
    };
    lines.push(line);
    lines.extend(builtin_checks(config).await);
    lines
}

/// The built-in health checks `config` enables, run once.
async fn builtin_checks(config: &Config) -> Vec<CheckLine> {
    let context = BuiltinContext {
        docker: config
            .docker
            .enabled
            .then(|| DockerConnection::new(config.docker.socket.clone())),
        config: config.health.clone(),
        signals: SessionSignals::default(),
    };
    let mut lines = Vec::new();
    for check in Builtin::enabled(config) {
        let name = match check {
            Builtin::Docker => "docker",
            Builtin::Disk => "disk",
            Builtin::Memory => "memory",
            // The QUIC handshake above stands for it.
            Builtin::ControlPlane => continue,
            Builtin::ClockSkew => {
                lines.push(CheckLine::skipped(
                    "clock skew",
                    "measured from heartbeat answers while `tether-agent run` holds a session",
                ));
                continue;
            }
        };
        lines.push(match builtin::run(check, &context).await {
            Probe::Pass(detail) => CheckLine::new(name, true, detail),
            Probe::Fail(detail) => CheckLine::new(name, false, detail),
            Probe::Pending(detail) => CheckLine::skipped(name, detail),
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unenrolled_and_unconfigured_agent_fails_both_checks() {
        let root = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.docker.enabled = false;
        let lines = check(&StateDir::new(root.path()), &config).await;
        let names: Vec<_> = lines.iter().map(|line| line.name).collect();
        assert_eq!(
            names,
            ["identity", "control plane", "disk", "memory", "clock skew"]
        );
        assert!(!lines[0].ok && !lines[1].ok);
        assert!(lines[0]
            .to_string()
            .starts_with("FAIL  identity: not enrolled"));
        assert!(lines[4].to_string().starts_with("skip  clock skew: "));
    }

    #[tokio::test]
    async fn builtin_thresholds_decide_the_lines() {
        let mut config = Config::default();
        config.docker.enabled = false;
        config.health.disabled = vec!["clock_skew".into()];
        config.health.memory_max_percent = 100.0;
        let lines = builtin_checks(&config).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].ok, "{}", lines[1]);
        config.health.memory_max_percent = 0.001;
        let lines = builtin_checks(&config).await;
        assert!(
            lines[1].to_string().starts_with("FAIL  memory: "),
            "{}",
            lines[1]
        );
    }

    #[tokio::test]
    async fn docker_line_says_why_the_daemon_is_unreachable() {
        let root = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.docker.socket = root.path().join("docker.sock").display().to_string();
        config.health.disabled = vec!["disk".into(), "memory".into(), "clock_skew".into()];
        let lines = builtin_checks(&config).await;
        assert_eq!(lines.len(), 1);
        assert!(!lines[0].ok);
        assert!(lines[0].to_string().contains("docker.sock"), "{}", lines[0]);
    }
}
