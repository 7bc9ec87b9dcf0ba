//! `tether-agent check`: whether the state dir holds a valid identity, when
//! its certificate expires, and whether the control plane completes a QUIC
//! handshake. Health checks join this list in a later issue.

use std::fmt;
use std::time::{Instant, SystemTime};

use tether_certs::agent_client_config;
use tether_protocol::CloseCode;

use crate::config::Config;
use crate::dial::dial;
use crate::format_time;
use crate::state::StateDir;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl CheckLine {
    fn new(name: &'static str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.ok { "ok" } else { "FAIL" };
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
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unenrolled_and_unconfigured_agent_fails_both_checks() {
        let root = tempfile::tempdir().unwrap();
        let lines = check(&StateDir::new(root.path()), &Config::default()).await;
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|line| !line.ok));
        assert!(lines[0]
            .to_string()
            .starts_with("FAIL  identity: not enrolled"));
    }
}
