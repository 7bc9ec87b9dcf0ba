//! A real agent session (`session::run`) against a tiny in-test control
//! plane over a real QUIC loopback connection: the control plane opens
//! command and health-config streams the way the real one will, and
//! receives the agent's health reports on the agent's own streams.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether_agent::config::Config;
use tether_agent::session;
use tether_agent::state::{Credentials, Identity, StateDir};
use tether_certs::authority::{pem_to_der, pem_to_private_key};
use tether_certs::{control_plane_server_config, AgentIdentity, AgentKey, CertificateAuthority};
use tether_protocol::{
    AgentConfig, AgentMessage, CommandRequest, CommandStatus, ControlMessage, HealthCheckKind,
    HealthCheckSpec, HealthReport, HealthStatus, HeartbeatAck, OutputStream, Welcome,
    PROTOCOL_VERSION,
};
use tether_transport::ControlStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The control plane's end of one established session.
struct Harness {
    connection: quinn::Connection,
    reports: mpsc::UnboundedReceiver<HealthReport>,
    shutdown: CancellationToken,
    agent: JoinHandle<()>,
    _endpoint: quinn::Endpoint,
    _state: tempfile::TempDir,
}

impl Harness {
    /// A control plane on loopback, an agent enrolled with it, and the
    /// session between them once `Welcome` went out.
    async fn start() -> Self {
        tether_certs::install_crypto_provider();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let server = ca
            .issue_server_certificate(&["127.0.0.1".into()], Duration::from_secs(3600))
            .unwrap();
        let chain = vec![pem_to_der(&server.cert_pem).unwrap(), ca.cert_der().clone()];
        let tls = control_plane_server_config(
            ca.cert_der(),
            chain,
            pem_to_private_key(&server.key_pem).unwrap(),
        )
        .unwrap();
        let endpoint = tether_transport::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            b"session-streams-test-reset-secret",
        )
        .unwrap();
        let addr: SocketAddr = endpoint.local_addr().unwrap();

        let state_root = tempfile::tempdir().unwrap();
        let state = StateDir::new(state_root.path());
        let key = AgentKey::generate().unwrap();
        let cert = ca
            .sign_agent_csr(
                &key.csr_der("host").unwrap(),
                &AgentIdentity::new("b1", "s1"),
                Duration::from_secs(3600),
            )
            .unwrap();
        let credentials = Credentials::new(
            key,
            vec![cert.der, ca.cert_der().clone()],
            ca.fingerprint(),
            "s1",
            "b1",
        )
        .unwrap();
        let identity = Identity {
            server_id: "s1".into(),
            branch_id: "b1".into(),
            server: addr.to_string(),
            ca_fingerprint: ca.fingerprint(),
        };
        state.save_identity(&identity, &credentials).unwrap();

        let mut config = Config::default();
        config.docker.enabled = false;
        config.health.interval_seconds = 1;
        config.health.disabled = vec!["disk".into(), "memory".into()];
        let shutdown = CancellationToken::new();
        let agent = {
            let shutdown = shutdown.clone();
            let state = StateDir::new(state_root.path());
            tokio::spawn(async move {
                session::run(&state, &config, &shutdown).await.unwrap();
            })
        };

        let connection = tokio::time::timeout(WAIT, async {
            endpoint.accept().await.unwrap().await.unwrap()
        })
        .await
        .expect("the agent dials");
        let (send, recv) = connection.accept_bi().await.unwrap();
        let mut control = ControlStream::new(send, recv);
        let hello = control.recv_required().await.unwrap();
        assert!(matches!(hello, AgentMessage::Hello(_)), "{hello:?}");
        control
            .send(&ControlMessage::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                server_id: "s1".into(),
                branch_id: "b1".into(),
                config: AgentConfig {
                    metrics_interval_ms: 60_000,
                    heartbeat_interval_ms: 1_000,
                },
            }))
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Ok(Some(AgentMessage::Heartbeat(_))) = control.recv().await {
                let ack = ControlMessage::HeartbeatAck(HeartbeatAck {
                    received_at_unix_ms: unix_ms(),
                });
                if control.send(&ack).await.is_err() {
                    return;
                }
            }
        });
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let streams = connection.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = streams.accept_bi().await {
                let reports_tx = reports_tx.clone();
                tokio::spawn(async move {
                    let mut stream = ControlStream::new(send, recv);
                    match stream.recv_required().await {
                        Ok(AgentMessage::MetricsBatch(batch)) => {
                            let ack = tether_protocol::Ack { seq: batch.seq };
                            let _ = stream.send(&ControlMessage::Ack(ack)).await;
                        }
                        Ok(AgentMessage::HealthReport(report)) => {
                            let seq = report.seq;
                            let _ = stream.send(&ControlMessage::HealthAck { seq }).await;
                            let _ = reports_tx.send(report);
                        }
                        other => panic!("unexpected agent stream {other:?}"),
                    }
                    let _ = stream.finish();
                });
            }
        });
        Self {
            connection,
            reports,
            shutdown,
            agent,
            _endpoint: endpoint,
            _state: state_root,
        }
    }

    async fn open(&self, first: ControlMessage) -> ControlStream {
        let mut stream = ControlStream::open(&self.connection).await.unwrap();
        stream.send(&first).await.unwrap();
        stream
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.agent)
            .await
            .expect("the agent stops")
            .unwrap();
    }
}

fn run_command(argv: &[&str], timeout_ms: u64) -> ControlMessage {
    ControlMessage::RunCommand(CommandRequest {
        command_id: "c-1".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        stdin: None,
        timeout_ms,
        max_output_bytes: 1 << 20,
    })
}

async fn recv(stream: &mut ControlStream) -> AgentMessage {
    tokio::time::timeout(WAIT, stream.recv_required())
        .await
        .expect("the agent answers")
        .unwrap()
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

async fn assert_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_command_stream_carries_started_output_and_finished_then_ends() {
    let harness = Harness::start().await;
    let mut stream = harness
        .open(run_command(&["echo", "over quic"], 10_000))
        .await;
    assert!(matches!(recv(&mut stream).await, AgentMessage::CommandStarted { pid } if pid > 0));
    assert_eq!(
        recv(&mut stream).await,
        AgentMessage::CommandOutput {
            stream: OutputStream::Stdout,
            data: b"over quic\n".to_vec()
        }
    );
    match recv(&mut stream).await {
        AgentMessage::CommandFinished(outcome) => {
            assert_eq!(outcome.status, CommandStatus::Exited { code: 0 });
            assert_eq!(outcome.output_bytes, 10);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        stream.recv().await.unwrap().is_none(),
        "the agent finished the stream"
    );
    harness.stop().await;
}

#[tokio::test]
async fn cancel_command_on_the_stream_kills_the_process_group() {
    let harness = Harness::start().await;
    let mut stream = harness.open(run_command(&["sleep", "30"], 60_000)).await;
    let AgentMessage::CommandStarted { pid } = recv(&mut stream).await else {
        panic!("not started")
    };
    assert!(!process_gone(pid));
    stream.send(&ControlMessage::CancelCommand).await.unwrap();
    match recv(&mut stream).await {
        AgentMessage::CommandFinished(outcome) => {
            assert_eq!(outcome.status, CommandStatus::Cancelled)
        }
        other => panic!("{other:?}"),
    }
    assert_gone(pid).await;
    harness.stop().await;
}

#[tokio::test]
async fn a_refused_command_answers_only_finished() {
    let harness = Harness::start().await;
    let mut stream = harness.open(run_command(&[], 10_000)).await;
    assert!(matches!(
        recv(&mut stream).await,
        AgentMessage::CommandFinished(outcome) if matches!(outcome.status, CommandStatus::Refused { .. })
    ));
    assert!(stream.recv().await.unwrap().is_none());
    harness.stop().await;
}

#[tokio::test]
async fn health_is_reported_on_agent_streams_configured_and_run_on_demand() {
    let mut harness = Harness::start().await;
    // Built-ins fed by the heartbeats: reported on the agent's own streams.
    let deadline = Instant::now() + WAIT;
    loop {
        let report = tokio::time::timeout_at(deadline.into(), harness.reports.recv())
            .await
            .expect("a report with both built-ins passing")
            .unwrap();
        let passing = |id: &str| {
            report
                .results
                .iter()
                .any(|r| r.check_id == id && r.status == HealthStatus::Passing)
        };
        if passing("builtin:control_plane") && passing("builtin:clock_skew") {
            break;
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let spec = HealthCheckSpec {
        id: "tcp".into(),
        name: "listener".into(),
        kind: HealthCheckKind::Tcp {
            address: listener.local_addr().unwrap().to_string(),
        },
        interval_ms: 3_600_000,
        timeout_ms: 1_000,
        retries: 1,
        start_period_ms: 0,
    };
    let mut stream = harness
        .open(ControlMessage::ConfigureHealthChecks(vec![spec]))
        .await;
    match recv(&mut stream).await {
        AgentMessage::HealthChecksConfigured(configured) => {
            assert_eq!(configured.active, vec!["tcp"]);
            assert!(configured.rejected.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(stream.recv().await.unwrap().is_none());

    let mut stream = harness.open(ControlMessage::RunHealthChecksNow).await;
    let report = match recv(&mut stream).await {
        AgentMessage::HealthReport(report) => report,
        other => panic!("{other:?}"),
    };
    let ids: Vec<_> = report.results.iter().map(|r| r.check_id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["builtin:clock_skew", "builtin:control_plane", "tcp"]
    );
    assert!(
        report
            .results
            .iter()
            .all(|r| r.status == HealthStatus::Passing),
        "{report:#?}"
    );
    stream
        .send(&ControlMessage::HealthAck { seq: report.seq })
        .await
        .unwrap();
    assert!(stream.recv().await.unwrap().is_none());
    harness.stop().await;
}

#[tokio::test]
async fn a_stream_opened_with_a_non_opener_is_reset_and_the_session_goes_on() {
    let harness = Harness::start().await;
    let mut stream = harness.open(ControlMessage::HealthAck { seq: 1 }).await;
    let answer = tokio::time::timeout(WAIT, stream.recv()).await.unwrap();
    assert!(answer.is_err(), "reset, got {answer:?}");
    let mut stream = harness.open(run_command(&["true"], 10_000)).await;
    assert!(matches!(
        recv(&mut stream).await,
        AgentMessage::CommandStarted { .. }
    ));
    harness.stop().await;
}

#[tokio::test]
async fn commands_still_running_when_the_session_ends_are_killed() {
    let harness = Harness::start().await;
    let mut stream = harness.open(run_command(&["sleep", "30"], 60_000)).await;
    let AgentMessage::CommandStarted { pid } = recv(&mut stream).await else {
        panic!("not started")
    };
    harness.connection.close(0u32.into(), b"bye");
    assert_gone(pid).await;
    harness.stop().await;
}
