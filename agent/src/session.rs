//! The agent's run loop: enroll if needed, then hold a mutual-TLS QUIC
//! session with the control plane and reconnect, with backoff, whenever it
//! ends.
//!
//! One session: `Hello` -> `Welcome` on the control stream, then until the
//! connection ends, concurrently: heartbeats on the control stream (their
//! answers feed the `control_plane` and `clock_skew` health checks), streams
//! opened by the control plane (commands and health configuration, see
//! [`crate::incoming`]), certificate renewal at 2/3 of the certificate's
//! lifetime, delivery of spooled metrics batches and health reports.
//!
//! Metrics are collected and health checks run for the whole life of the
//! process, sessions or not ([`crate::telemetry`], [`crate::health`]);
//! `Welcome` sets the metrics interval, which is also the longest time
//! between two health reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use tether_certs::{AgentKey, CertError, CertificateInfo};
use tether_protocol::{
    AgentMessage, CertificateRenewalRequest, CloseCode, ControlMessage, Heartbeat, Hello,
    HelloRejection, HostFacts, RenewalRejection, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tether_transport::{close_code_of, AgentStream, TransportError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::command::CommandRunner;
use crate::config::Config;
use crate::dial::{dial, DialError};
use crate::enroll::{enroll, verify_chain, EnrollError, EnrollParams};
use crate::facts::{self, AGENT_VERSION};
use crate::health::{self, Health, SessionSignals};
use crate::incoming::{self, Services};
use crate::metrics::docker::DockerConnection;
use crate::reconnect::{Outcome, ReconnectPolicy};
use crate::spool::SpoolError;
use crate::state::{AgentState, CredentialError, Credentials, Identity, StateDir, StateError};
use crate::telemetry::{self, Telemetry};
use crate::{format_duration, format_time};

/// How long the control plane may take to answer `Hello` or a renewal.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds on the heartbeat interval the control plane may ask for.
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
const MAX_HEARTBEAT: Duration = Duration::from_secs(300);
/// A heartbeat ack may be this many intervals late before the session ends.
const MISSED_HEARTBEATS: u32 = 3;
/// Renewal retries never come sooner than this.
const MIN_RENEWAL_RETRY: Duration = Duration::from_secs(10);

/// Why `run` gave up. Anything else is retried.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "not enrolled: {} holds no identity; run `tether-agent enroll --server HOST:PORT --token TOKEN \
         --ca-fingerprint sha256:HEX` or set server, ca_fingerprint and token in agent.toml",
        dir.display()
    )]
    NotEnrolled { dir: PathBuf },
    #[error(transparent)]
    State(StateError),
    #[error(transparent)]
    Enroll(EnrollError),
    #[error("metrics spool unusable: {0}")]
    Spool(SpoolError),
}

/// Runs the agent until `shutdown` is cancelled: enrolls first when the state
/// dir holds no identity and `config` has a server, CA fingerprint and token,
/// then collects metrics and keeps a session with the control plane.
pub async fn run(
    state_dir: &StateDir,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut policy = ReconnectPolicy::new();
    if state_dir.load().map_err(RunError::State)?.is_none() {
        let bootstrap = config.bootstrap().ok_or_else(|| RunError::NotEnrolled {
            dir: state_dir.path().to_path_buf(),
        })?;
        if !enroll_until_done(state_dir, bootstrap.into(), &mut policy, shutdown).await? {
            return Ok(());
        }
    }
    let stop_background = shutdown.child_token();
    let docker = config
        .docker
        .enabled
        .then(|| DockerConnection::new(config.docker.socket.clone()));
    let telemetry = Telemetry::start(
        state_dir.path(),
        config,
        docker.clone(),
        stop_background.clone(),
    )
    .map_err(RunError::Spool)?;
    let signals = SessionSignals::default();
    let server_id = match state_dir.load() {
        Ok(Some(state)) => state.identity.server_id,
        _ => String::new(),
    };
    let health = tracing::info_span!("health", %server_id).in_scope(|| {
        Arc::new(Health::start(
            config,
            docker,
            signals.clone(),
            stop_background.clone(),
        ))
    });
    let agent = Agent {
        telemetry,
        signals,
        services: Services {
            commands: CommandRunner::new(config.commands.clone()),
            health,
        },
    };
    let result = sessions(state_dir, config, shutdown, &agent, &mut policy).await;
    stop_background.cancel();
    let Agent {
        telemetry,
        services,
        ..
    } = agent;
    telemetry.stopped().await;
    if let Ok(health) = Arc::try_unwrap(services.health) {
        health.stopped().await;
    }
    result
}

/// What lives as long as the process and serves every session.
struct Agent {
    telemetry: Telemetry,
    signals: SessionSignals,
    services: Services,
}

/// Keeps a session, reconnecting with backoff, until `shutdown`.
async fn sessions(
    state_dir: &StateDir,
    config: &Config,
    shutdown: &CancellationToken,
    agent: &Agent,
    policy: &mut ReconnectPolicy,
) -> Result<(), RunError> {
    loop {
        let (span, report) = match state_dir.load() {
            Ok(Some(state)) => {
                let span = tracing::info_span!("session", server_id = %state.identity.server_id);
                let server = config
                    .server
                    .clone()
                    .unwrap_or_else(|| state.identity.server.clone());
                let report = attempt(state_dir, state, &server, agent, shutdown)
                    .instrument(span.clone())
                    .await;
                (span, report)
            }
            Ok(None) => (
                tracing::Span::current(),
                Report::ended(SessionEnd::NoIdentity(None)),
            ),
            Err(err) => (
                tracing::Span::current(),
                Report::ended(SessionEnd::NoIdentity(Some(err))),
            ),
        };
        if matches!(report.end, SessionEnd::Shutdown) {
            return Ok(());
        }
        let outcome = Outcome {
            established_for: report.established_for,
            close_code: report.end.close_code(),
        };
        let delay = policy.next_delay(outcome);
        span.in_scope(|| {
            if outcome.close_code == Some(CloseCode::Revoked) {
                tracing::error!(
                    "session ended: the control plane revoked this server's certificate; reconnecting in {} \
                     (re-enroll with `tether-agent enroll` if the server should come back)",
                    format_duration(delay)
                );
            } else {
                tracing::warn!("session ended: {}; reconnecting in {}", report.end, format_duration(delay));
            }
        });
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Enrolls, retrying transient failures with backoff. `Ok(false)` when
/// shutdown came first.
async fn enroll_until_done(
    state_dir: &StateDir,
    params: EnrollParams,
    policy: &mut ReconnectPolicy,
    shutdown: &CancellationToken,
) -> Result<bool, RunError> {
    loop {
        tracing::info!(server = %params.server, "no identity in {}, enrolling", state_dir.path().display());
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            result = enroll(state_dir, &params, facts::collect()) => result,
        };
        match result {
            Ok(enrolled) => {
                tracing::info!(
                    branch_id = %enrolled.identity.branch_id,
                    "enrolled as server {}, certificate valid until {}",
                    enrolled.identity.server_id,
                    format_time(enrolled.certificate.not_after)
                );
                return Ok(true);
            }
            Err(err) if err.is_permanent() => return Err(RunError::Enroll(err)),
            Err(err) => {
                let delay = policy.next_delay(Outcome::default());
                tracing::warn!("{err}; retrying in {}", format_duration(delay));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// How one connection attempt went.
struct Report {
    established_for: Option<Duration>,
    end: SessionEnd,
}

impl Report {
    fn ended(end: SessionEnd) -> Self {
        Self {
            established_for: None,
            end,
        }
    }
}

/// Why a session (or the attempt at one) ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    NoIdentity(Option<StateError>),
    Dial(DialError),
    HelloRefused(HelloRejection),
    Hello(String),
    HeartbeatTimeout(Duration),
    ControlStream(String),
    Closed(quinn::ConnectionError),
}

impl SessionEnd {
    fn close_code(&self) -> Option<CloseCode> {
        match self {
            Self::Closed(err) => close_code_of(err),
            _ => None,
        }
    }
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shutdown => f.write_str("shutting down"),
            Self::NoIdentity(None) => f.write_str("the state dir no longer holds an identity"),
            Self::NoIdentity(Some(err)) => write!(f, "cannot load the identity: {err}"),
            Self::Dial(err) => err.fmt(f),
            Self::HelloRefused(r) => write!(
                f,
                "control plane refused Hello: it speaks protocol versions {}..={}, this agent {}..={}",
                r.supported_min, r.supported_max, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
            ),
            Self::Hello(why) => write!(f, "session setup failed: {why}"),
            Self::HeartbeatTimeout(after) => {
                write!(f, "no heartbeat answer within {}", format_duration(*after))
            }
            Self::ControlStream(why) => write!(f, "control stream failed: {why}"),
            Self::Closed(err) => match close_code_of(err) {
                Some(code) => write!(f, "control plane closed the connection: {}", code.reason()),
                None => write!(f, "connection lost: {err}"),
            },
        }
    }
}

/// One connection: dial, establish, run until it ends, close.
async fn attempt(
    state_dir: &StateDir,
    state: AgentState,
    server: &str,
    agent: &Agent,
    shutdown: &CancellationToken,
) -> Report {
    let AgentState {
        identity,
        credentials,
    } = state;
    if credentials.expired(SystemTime::now()) {
        tracing::error!(
            "the agent certificate expired at {}; the control plane will refuse it until the server is re-enrolled",
            format_time(credentials.certificate.not_after)
        );
    }
    let dialed = tokio::select! {
        _ = shutdown.cancelled() => return Report::ended(SessionEnd::Shutdown),
        dialed = dial(server, credentials.tls.clone()) => match dialed {
            Ok(dialed) => dialed,
            Err(err) => return Report::ended(SessionEnd::Dial(err)),
        },
    };
    tracing::debug!(addr = %dialed.addr, "connected to the control plane");
    let connection = &dialed.connection;
    let (welcomed_at, end) = tokio::select! {
        _ = shutdown.cancelled() => (None, SessionEnd::Shutdown),
        result = established(connection, state_dir, &identity, credentials.certificate, facts::collect(), agent) => result,
    };
    let end = match (end, connection.close_reason()) {
        (SessionEnd::Shutdown, _) => SessionEnd::Shutdown,
        (_, Some(reason)) if !matches!(reason, quinn::ConnectionError::LocallyClosed) => {
            SessionEnd::Closed(reason)
        }
        (end, _) => end,
    };
    let established_for = welcomed_at.map(|at| at.elapsed());
    dialed.close(CloseCode::Normal).await;
    Report {
        established_for,
        end,
    }
}

/// `Hello` -> `Welcome`, then heartbeats, incoming streams, renewal and
/// metrics delivery until one of them ends the session. Returns when
/// `Welcome` arrived.
async fn established(
    connection: &quinn::Connection,
    state_dir: &StateDir,
    identity: &Identity,
    certificate: CertificateInfo,
    facts: HostFacts,
    agent: &Agent,
) -> (Option<Instant>, SessionEnd) {
    let telemetry = &agent.telemetry;
    let hostname = facts.hostname.clone();
    let hello = AgentMessage::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent_version: AGENT_VERSION.to_string(),
        facts,
    });
    let opened = async {
        let mut control = AgentStream::open(connection).await?;
        let answer = control.request(&hello).await?;
        Ok::<_, TransportError>((control, answer))
    };
    let (mut control, welcome) = match tokio::time::timeout(ANSWER_TIMEOUT, opened).await {
        Ok(Ok((control, ControlMessage::Welcome(welcome)))) => (control, welcome),
        Ok(Ok((_, ControlMessage::HelloRejected(rejection)))) => {
            return (None, SessionEnd::HelloRefused(rejection))
        }
        Ok(Ok((_, other))) => {
            let why = format!("unexpected answer to Hello ({})", other.kind());
            return (None, SessionEnd::Hello(why));
        }
        Ok(Err(err)) => return (None, SessionEnd::Hello(err.to_string())),
        Err(_) => {
            let why = format!(
                "no answer to Hello within {}",
                format_duration(ANSWER_TIMEOUT)
            );
            return (None, SessionEnd::Hello(why));
        }
    };
    let since = Instant::now();
    if welcome.server_id != identity.server_id {
        tracing::warn!(welcome_server_id = %welcome.server_id, "control plane welcomed a different server id");
    }
    tracing::info!(
        protocol_version = welcome.protocol_version,
        branch_id = %welcome.branch_id,
        "session established"
    );
    let interval = Duration::from_millis(welcome.config.heartbeat_interval_ms)
        .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
    // 0 means the control plane did not say: keep the current interval.
    if welcome.config.metrics_interval_ms > 0 {
        telemetry.set_interval_ms(welcome.config.metrics_interval_ms);
    }
    agent.signals.session_started(interval);
    let end = tokio::select! {
        end = heartbeat(&mut control, interval, &agent.signals) => end,
        err = incoming::accept(connection, &agent.services) => SessionEnd::Closed(err),
        end = renew_certificate(connection, state_dir, identity, certificate, &hostname) => end,
        never = telemetry::deliver(telemetry.outbox(), connection) => match never {},
        never = health::report::deliver(&agent.services.health, connection, || telemetry.interval()) => match never {},
        err = connection.closed() => SessionEnd::Closed(err),
    };
    (Some(since), end)
}

/// Sends a heartbeat every `interval` and waits for its ack; a missing ack
/// ends the session. Each ack is recorded in `signals` with the clock skew
/// it shows.
async fn heartbeat(
    control: &mut AgentStream,
    interval: Duration,
    signals: &SessionSignals,
) -> SessionEnd {
    let patience = (interval * MISSED_HEARTBEATS).max(Duration::from_secs(5));
    loop {
        tokio::time::sleep(interval).await;
        let sent_at_unix_ms = unix_ms(SystemTime::now());
        let exchange = async {
            control
                .send(&AgentMessage::Heartbeat(Heartbeat { sent_at_unix_ms }))
                .await?;
            loop {
                match control.recv().await? {
                    Some(ControlMessage::HeartbeatAck(ack)) => {
                        return Ok::<_, TransportError>(Some(ack))
                    }
                    Some(other) => {
                        tracing::debug!("ignoring {} on the control stream", other.kind())
                    }
                    None => return Ok(None),
                }
            }
        };
        match tokio::time::timeout(patience, exchange).await {
            Ok(Ok(Some(ack))) => {
                let answered_at = unix_ms(SystemTime::now());
                let midpoint = sent_at_unix_ms / 2 + answered_at / 2;
                let skew_ms = i128::from(ack.received_at_unix_ms) - i128::from(midpoint);
                let skew_ms = i64::try_from(skew_ms).unwrap_or(i64::MAX);
                signals.heartbeat_acked(skew_ms, answered_at.saturating_sub(sent_at_unix_ms));
                tracing::trace!(skew_ms, "heartbeat acknowledged");
            }
            Ok(Ok(None)) => {
                return SessionEnd::ControlStream("the control plane finished it".into())
            }
            Ok(Err(err)) => return SessionEnd::ControlStream(err.to_string()),
            Err(_) => return SessionEnd::HeartbeatTimeout(patience),
        }
    }
}

/// Why a renewal attempt failed.
#[derive(Debug, thiserror::Error)]
enum RenewError {
    #[error("cannot make a key or CSR: {0}")]
    Key(CertError),
    #[error("{0}")]
    Transport(TransportError),
    #[error("no answer within {}", format_duration(ANSWER_TIMEOUT))]
    Timeout,
    #[error("refused: {0}")]
    Rejected(RenewalRejection),
    #[error("unexpected answer ({0})")]
    Unexpected(&'static str),
    #[error("the control plane issued an unusable certificate: {0}")]
    Invalid(CredentialError),
    #[error("cannot store the new certificate: {0}")]
    State(StateError),
}

/// Renews the certificate at 2/3 of its lifetime (at once if that is past),
/// retrying failures with backoff before it expires. Never ends the session.
async fn renew_certificate(
    connection: &quinn::Connection,
    state_dir: &StateDir,
    identity: &Identity,
    mut certificate: CertificateInfo,
    hostname: &str,
) -> SessionEnd {
    let retry_policy = ExponentialBuilder::new()
        .with_min_delay(Duration::from_secs(30))
        .with_max_delay(Duration::from_secs(3600))
        .with_jitter()
        .without_max_times();
    let mut retries = retry_policy.build();
    let mut due = certificate.renew_at();
    loop {
        sleep_until(due).await;
        match renew_once(connection, state_dir, identity, hostname).await {
            Ok(credentials) => {
                certificate = credentials.certificate;
                tracing::info!(
                    "certificate renewed, valid until {}",
                    format_time(certificate.not_after)
                );
                due = certificate.renew_at();
                retries = retry_policy.build();
            }
            Err(err) => {
                let now = SystemTime::now();
                let left = certificate
                    .not_after
                    .duration_since(now)
                    .unwrap_or_default();
                let delay = retries
                    .next()
                    .unwrap_or(Duration::from_secs(3600))
                    .min(left / 2)
                    .max(MIN_RENEWAL_RETRY);
                let message = format!(
                    "certificate renewal failed: {err}; retrying in {} (certificate valid until {})",
                    format_duration(delay),
                    format_time(certificate.not_after)
                );
                if matches!(err, RenewError::Rejected(RenewalRejection::Revoked)) {
                    tracing::error!("{message}");
                } else {
                    tracing::warn!("{message}");
                }
                due = now + delay;
            }
        }
    }
}

/// One renewal: new key, CSR over a new stream, check and store the chain.
/// The agent finishes its side of the stream only once the new certificate
/// is stored: that end-of-stream is the acknowledgement after which the
/// control plane revokes the older certificates. Any failure resets the
/// stream instead, and the old certificate stays valid.
async fn renew_once(
    connection: &quinn::Connection,
    state_dir: &StateDir,
    identity: &Identity,
    hostname: &str,
) -> Result<Credentials, RenewError> {
    let key = AgentKey::generate().map_err(RenewError::Key)?;
    let csr_der = key.csr_der(hostname).map_err(RenewError::Key)?;
    let exchange = async {
        let mut stream = AgentStream::open(connection).await?;
        let answer = stream
            .request(&AgentMessage::RenewCertificate(CertificateRenewalRequest {
                csr_der,
            }))
            .await?;
        Ok((stream, answer))
    };
    let (mut stream, answer) = match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => return Err(RenewError::Transport(err)),
        Err(_) => return Err(RenewError::Timeout),
    };
    let stored = match answer {
        ControlMessage::CertificateRenewed(chain) => verify_chain(
            key,
            chain.certificates_der,
            identity.ca_fingerprint,
            &identity.server_id,
            &identity.branch_id,
        )
        .map_err(RenewError::Invalid)
        .and_then(|credentials| {
            state_dir
                .save_credentials(&credentials)
                .map_err(RenewError::State)?;
            Ok(credentials)
        }),
        ControlMessage::RenewalRejected(reason) => Err(RenewError::Rejected(reason)),
        other => Err(RenewError::Unexpected(other.kind())),
    };
    match &stored {
        Ok(_) => {
            let _ = stream.finish();
        }
        Err(_) => stream.reset(),
    }
    stored
}

/// Sleeps until a wall-clock time, re-checking the clock at least hourly.
async fn sleep_until(when: SystemTime) {
    while let Ok(left) = when.duration_since(SystemTime::now()) {
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_secs(3600))).await;
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_end_reasons_read_as_operator_sentences() {
        let hello = SessionEnd::HelloRefused(HelloRejection {
            supported_min: 2,
            supported_max: 3,
        });
        assert!(hello.to_string().contains("versions 2..=3"));
        assert_eq!(hello.close_code(), None);
        let timeout = SessionEnd::HeartbeatTimeout(Duration::from_secs(15));
        assert_eq!(timeout.to_string(), "no heartbeat answer within 15.0s");
    }

    #[tokio::test]
    async fn run_without_identity_or_bootstrap_config_says_how_to_enroll() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path());
        let err = run(&state, &Config::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::NotEnrolled { .. }));
        assert!(err.to_string().contains("tether-agent enroll"));
    }

    #[tokio::test]
    async fn sleep_until_a_past_time_returns_at_once() {
        sleep_until(SystemTime::now() - Duration::from_secs(5)).await;
        sleep_until(SystemTime::UNIX_EPOCH).await;
    }
}
