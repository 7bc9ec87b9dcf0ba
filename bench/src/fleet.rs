//! The fleet simulator: N simulated agents against one real `tether serve`.
//!
//! Every simulated agent makes its own P-256 key and CSR, enrolls over QUIC
//! with a token created through the HTTP API (no client certificate, CA
//! pinned), reconnects with the certificate it got, opens its control stream
//! (`Hello` -> `Welcome`), keeps heartbeating at the interval it was told,
//! and sends its reports, each `MetricsBatch` on its own bidirectional stream
//! (or `--batches-per-stream` of them on one, as an agent replaying its spool
//! does), waiting for the `Ack`s the control plane sends once the batches are
//! committed.
//! Many agents share one UDP socket (one quinn endpoint per
//! `--agents-per-endpoint` connections) and all run on one tokio runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{bail, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tether_certs::{AgentKey, CaFingerprint};
use tether_protocol::{
    AgentMessage, CommandOutcome, CommandStatus, ControlMessage, EnrollRequest,
    HealthChecksConfigured, Heartbeat, Hello, HostFacts, OutputStream, MAX_FRAME_LEN,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tether_transport::AgentStream;
use tokio_util::sync::CancellationToken;

use crate::control_plane::{self, ControlPlane};
use crate::http_baseline::{self, HttpResult};
use crate::procfs::{self, CpuMark};
use crate::report::{now_unix_ms, realistic_batch};

/// Which database the control plane runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Database {
    Sqlite,
    Postgres,
}

/// `tether-bench fleet`.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Simulated agents (each its own key, certificate and QUIC connection).
    #[arg(long, default_value_t = 1000)]
    pub agents: u32,
    /// Reports each agent sends in the load phase.
    #[arg(long, default_value_t = 20)]
    pub reports_per_agent: u64,
    /// Reports sent on one stream, as an agent replaying its spool sends
    /// them (1 = one stream per report, the steady state; at most
    /// `MAX_BATCHES_PER_STREAM`, 16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=tether_protocol::MAX_BATCHES_PER_STREAM as u64))]
    pub batches_per_stream: u64,
    #[arg(long, value_enum, default_value_t = Database::Sqlite)]
    pub database: Database,
    /// PostgreSQL admin URL (a fresh database is created on its server per
    /// run) [default: $TETHER_BENCH_POSTGRES_URL].
    #[arg(long, env = "TETHER_BENCH_POSTGRES_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Enrollments and session set-ups in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Enrollment tokens created through the API at once.
    #[arg(long, default_value_t = 32)]
    pub token_concurrency: usize,
    /// QUIC connections sharing one client endpoint (one UDP socket).
    #[arg(long, default_value_t = 500)]
    pub agents_per_endpoint: u32,
    /// Seconds the connected fleet sits idle (heartbeats only) while the
    /// control plane's CPU and memory are measured.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Upper bound on the load phase, in seconds (each agent also stops
    /// after --reports-per-agent reports).
    #[arg(long, default_value_t = 60)]
    pub load_seconds: u64,
    /// Skip the HTTP+JSON baseline.
    #[arg(long)]
    pub no_http_baseline: bool,
    /// Work directory (data dirs, logs) [default: /var/tmp/tether-bench].
    #[arg(long, default_value = "/var/tmp/tether-bench")]
    pub work_dir: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Default)]
pub(crate) struct Counters {
    acked: AtomicU64,
    report_errors: AtomicU64,
    finished: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) heartbeat_errors: AtomicU64,
}

/// What an enrolled, connected simulated agent holds.
struct Session {
    index: u32,
    connection: quinn::Connection,
    server_id: String,
}

/// A session just set up: agent index, connection, control stream, server
/// id and heartbeat interval.
type Connected = (u32, quinn::Connection, String, tokio::task::JoinHandle<()>);

fn one_batch_per_stream() -> u64 {
    1
}

/// Results of one fleet run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetResult {
    pub database: Database,
    pub agents_requested: u32,
    pub reports_per_agent: u64,
    /// Reports per stream in the load phase (results from before it existed
    /// sent one per stream).
    #[serde(default = "one_batch_per_stream")]
    pub batches_per_stream: u64,
    pub concurrency: usize,
    pub agents_per_endpoint: u32,
    pub tokens: PhaseResult,
    pub enrollment: PhaseResult,
    pub sessions: PhaseResult,
    pub idle: IdleResult,
    pub load: LoadResult,
    /// Packets dropped at the control plane's QUIC socket (receive buffer
    /// full), per phase.
    pub cp_socket_drops: SocketDrops,
    pub http: Option<HttpResult>,
    pub ratios: Option<Ratios>,
}

/// Kernel drops at the control plane's UDP socket, per phase.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SocketDrops {
    pub enrollment: u64,
    pub sessions: u64,
    pub idle: u64,
    pub load: u64,
}

/// A phase that creates things: how many, how fast, at what CPU cost.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PhaseResult {
    pub ok: u64,
    pub failed: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Control-plane CPU milliseconds per item.
    pub cp_cpu_ms_per_item: f64,
    /// Simulator (client) CPU milliseconds per item.
    pub client_cpu_ms_per_item: f64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct IdleResult {
    pub connected_agents: u64,
    pub window_seconds: f64,
    /// Control-plane RSS before any agent enrolled (tokens created).
    pub cp_rss_before_kib: u64,
    /// Control-plane RSS after every agent enrolled (enrollment connections
    /// closed), before any session.
    pub cp_rss_after_enrollment_kib: u64,
    pub cp_rss_connected_kib: u64,
    pub cp_pss_connected_kib: Option<u64>,
    /// (RSS connected - RSS before) / agents.
    pub kib_per_agent_marginal: f64,
    /// RSS connected / agents.
    pub kib_per_agent_total: f64,
    pub cp_cpu_percent_of_core: f64,
    pub cp_cpu_percent_per_1000_agents: f64,
    /// PostgreSQL server processes, when on PostgreSQL.
    pub db_cpu_percent_of_core: Option<f64>,
    /// UDP payload bytes (both directions) per agent per minute while idle.
    pub udp_bytes_per_agent_per_minute: f64,
    pub heartbeats_sent: u64,
    /// The whole machine's busy CPU during the window, % of one core (200 =
    /// both cores); other = machine - control plane - simulator - PostgreSQL.
    pub machine_cpu_percent: f64,
    pub other_processes_cpu_percent: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct LoadResult {
    pub acked: u64,
    pub errors: u64,
    pub seconds: f64,
    pub reports_per_second_overall: f64,
    /// Window during which every agent was still sending (warm-up excluded).
    pub window_seconds: f64,
    pub reports_per_second_sustained: f64,
    pub cp_cpu_percent_of_core: f64,
    pub cp_cpu_seconds_per_1000_reports: f64,
    pub db_cpu_seconds_per_1000_reports: Option<f64>,
    pub client_cpu_seconds_per_1000_reports: f64,
    /// postcard frame of the MetricsBatch (length prefix included).
    pub batch_frame_bytes: usize,
    pub ack_frame_bytes: usize,
    /// QUIC UDP payload bytes, both directions, per acked report.
    pub udp_payload_bytes_per_report: f64,
    pub udp_datagrams_per_report: f64,
    /// UDP payload + 28 bytes of IPv4/UDP header per datagram.
    pub ip_bytes_per_report: f64,
    /// The same, less the idle traffic (keep-alives, heartbeats) the fleet
    /// would have sent anyway during the load phase.
    pub ip_bytes_per_report_net_of_idle: f64,
    pub lost_packets: u64,
    pub machine_cpu_percent: f64,
    pub other_processes_cpu_percent: f64,
    pub cp_rss_after_kib: u64,
    pub cp_peak_rss_kib: u64,
    pub stored_points_checked: Option<String>,
}

/// QUIC+postcard over HTTP+JSON, from the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratios {
    /// QUIC IP bytes per report / HTTP IP bytes per report.
    pub bytes_per_report: f64,
    /// Server CPU per report, QUIC / HTTP (database CPU included on PostgreSQL).
    pub server_cpu_per_report: f64,
    /// Client CPU per report, QUIC / HTTP.
    pub client_cpu_per_report: f64,
    /// Sustained reports/s, QUIC / HTTP.
    pub throughput: f64,
}

fn facts(index: u32) -> HostFacts {
    HostFacts {
        hostname: format!("sim-{index:05}.fleet.example"),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        arch: "x86_64".into(),
        kernel_version: Some("6.1.0-26-amd64".into()),
        cpu_cores: 4,
        memory_bytes: 16 << 30,
        agent_version: "0.1.0-fleet-sim".into(),
    }
}

pub(crate) fn quinn_client_config(
    tls: rustls::ClientConfig,
) -> crate::error::Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| crate::error::bench_error!("TLS config not usable for QUIC: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(tether_transport::KEEP_ALIVE_INTERVAL));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(tether_transport::IDLE_TIMEOUT).ok());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Enrolls one agent; returns its session client configuration.
pub(crate) async fn enroll_one(
    endpoint: quinn::Endpoint,
    enroll_config: quinn::ClientConfig,
    addr: SocketAddr,
    pin: CaFingerprint,
    token: String,
    index: u32,
) -> crate::error::Result<quinn::ClientConfig> {
    let key = AgentKey::generate()?;
    let facts = facts(index);
    let csr_der = key.csr_der(&facts.hostname)?;
    let connection = endpoint
        .connect_with(
            enroll_config,
            addr,
            tether_protocol::CONTROL_PLANE_SERVER_NAME,
        )?
        .await?;
    let mut stream = AgentStream::open(&connection).await?;
    let answer = stream
        .request(&AgentMessage::Enroll(EnrollRequest {
            token,
            csr_der,
            facts,
        }))
        .await?;
    let _ = stream.finish();
    connection.close(0u32.into(), b"enrolled");
    let grant = match answer {
        ControlMessage::Enrolled(grant) => grant,
        ControlMessage::EnrollRejected(why) => bail!("enrollment rejected: {why}"),
        other => bail!("unexpected answer to Enroll: {other:?}"),
    };
    let chain = grant
        .chain
        .certificates_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let tls = tether_certs::agent_client_config(pin, Some((chain, key.private_key_der())))?;
    quinn_client_config(tls)
}

/// Connects with the agent's certificate and says Hello.
pub(crate) async fn connect_one(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    index: u32,
) -> crate::error::Result<(quinn::Connection, AgentStream, String, Duration)> {
    let connection = endpoint
        .connect_with(config, addr, tether_protocol::CONTROL_PLANE_SERVER_NAME)?
        .await?;
    let mut control = AgentStream::open(&connection).await?;
    let answer = control
        .request(&AgentMessage::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent_version: "0.1.0-fleet-sim".into(),
            facts: facts(index),
        }))
        .await?;
    match answer {
        ControlMessage::Welcome(welcome) => {
            let heartbeat = Duration::from_millis(welcome.config.heartbeat_interval_ms.max(1000));
            Ok((connection, control, welcome.server_id, heartbeat))
        }
        other => bail!("unexpected answer to Hello: {other:?}"),
    }
}

/// Answers every stream the control plane opens, at once, as a real agent
/// would: a `RunCommand` with a command that printed `ok` and exited 0, a
/// `ConfigureHealthChecks` with every check active (the control plane pushes
/// the checks after each `Welcome` and re-pushes until an agent answered).
pub(crate) async fn answer_control_plane(connection: quinn::Connection, stop: CancellationToken) {
    loop {
        let (send, recv) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = connection.accept_bi() => match accepted {
                Ok(pair) => pair,
                Err(_) => return,
            },
        };
        tokio::spawn(async move {
            let mut stream = AgentStream::new(send, recv);
            let answers = match stream.recv().await {
                Ok(Some(ControlMessage::RunCommand(_))) => vec![
                    AgentMessage::CommandStarted { pid: 1 },
                    AgentMessage::CommandOutput {
                        stream: OutputStream::Stdout,
                        data: b"ok\n".to_vec(),
                    },
                    AgentMessage::CommandFinished(CommandOutcome {
                        status: CommandStatus::Exited { code: 0 },
                        output_truncated: false,
                        output_bytes: 3,
                        duration_ms: 0,
                    }),
                ],
                Ok(Some(ControlMessage::ConfigureHealthChecks(specs))) => {
                    vec![AgentMessage::HealthChecksConfigured(
                        HealthChecksConfigured {
                            active: specs.into_iter().map(|spec| spec.id).collect(),
                            rejected: Vec::new(),
                        },
                    )]
                }
                _ => return,
            };
            for message in answers {
                if stream.send(&message).await.is_err() {
                    return;
                }
            }
            let _ = stream.finish();
            // Let the control plane read to the end before the stream drops.
            let _ = stream.recv().await;
        });
    }
}

/// Heartbeats on the control stream until `stop`.
pub(crate) async fn heartbeat_loop(
    mut control: AgentStream,
    interval: Duration,
    index: u32,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    // Spread the fleet's heartbeats over the interval.
    let offset = interval.mul_f64(f64::from(index % 997) / 997.0);
    let mut next = tokio::time::Instant::now() + offset;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next += interval;
        let heartbeat = AgentMessage::Heartbeat(Heartbeat {
            sent_at_unix_ms: now_unix_ms(),
        });
        let answered = tokio::time::timeout(Duration::from_secs(30), control.request(&heartbeat));
        let ok = tokio::select! {
            _ = stop.cancelled() => return,
            answer = answered => matches!(answer, Ok(Ok(ControlMessage::HeartbeatAck(_)))),
        };
        if ok {
            counters.heartbeats.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Sends reports `seqs` on one stream and waits for their Acks, in order.
async fn send_reports(
    connection: &quinn::Connection,
    index: u32,
    seqs: std::ops::RangeInclusive<u64>,
) -> crate::error::Result<()> {
    let mut stream = AgentStream::open(connection).await?;
    for seq in seqs.clone() {
        stream
            .send(&AgentMessage::MetricsBatch(realistic_batch(index, seq)))
            .await?;
    }
    stream.finish()?;
    for seq in seqs {
        match stream.recv_required().await? {
            ControlMessage::Ack(ack) if ack.seq == seq => {}
            other => bail!("expected Ack {seq}, got {other:?}"),
        }
    }
    // The control plane finishes the stream after the last Ack.
    let _ = stream.recv().await;
    Ok(())
}

async fn report_loop(
    connection: quinn::Connection,
    index: u32,
    reports: u64,
    batches_per_stream: u64,
    deadline: tokio::time::Instant,
    counters: Arc<Counters>,
    first_error: Arc<std::sync::Mutex<Option<String>>>,
) {
    let mut next = 1;
    while next <= reports {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let last = (next + batches_per_stream - 1).min(reports);
        match tokio::time::timeout(
            Duration::from_secs(30),
            send_reports(&connection, index, next..=last),
        )
        .await
        {
            Ok(Ok(())) => {
                counters.acked.fetch_add(last - next + 1, Ordering::Relaxed);
            }
            // Every report of the stream failed (none of them was acked).
            Ok(Err(e)) => {
                counters
                    .report_errors
                    .fetch_add(last - next + 1, Ordering::Relaxed);
                first_error.lock().unwrap().get_or_insert(e.to_string());
                break;
            }
            Err(_) => {
                counters
                    .report_errors
                    .fetch_add(last - next + 1, Ordering::Relaxed);
                first_error
                    .lock()
                    .unwrap()
                    .get_or_insert("no Ack within 30 s".into());
                break;
            }
        }
        next = last + 1;
    }
    counters.finished.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, Default)]
struct UdpTotals {
    bytes: u64,
    datagrams: u64,
    lost: u64,
}

fn udp_totals(sessions: &[Session]) -> UdpTotals {
    sessions.iter().fold(UdpTotals::default(), |acc, s| {
        let stats = s.connection.stats();
        UdpTotals {
            bytes: acc.bytes + stats.udp_tx.bytes + stats.udp_rx.bytes,
            datagrams: acc.datagrams + stats.udp_tx.datagrams + stats.udp_rx.datagrams,
            lost: acc.lost + stats.path.lost_packets,
        }
    })
}

/// One sample of the load phase.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    acked: u64,
    finished: u64,
    cp: CpuMark,
    client: CpuMark,
    db: Option<CpuMark>,
    machine: procfs::MachineMark,
}

fn per_item_ms(cpu_seconds: f64, items: u64) -> f64 {
    if items == 0 {
        0.0
    } else {
        1000.0 * cpu_seconds / items as f64
    }
}

/// Runs `tether-bench fleet`.
pub async fn run(args: FleetArgs) -> crate::error::Result<FleetResult> {
    let nofile = procfs::raise_nofile_limit();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let run_name = format!("fleet-{:?}-{}-{stamp}", args.database, args.agents).to_lowercase();
    let run_dir = args.work_dir.join(&run_name);
    std::fs::create_dir_all(&run_dir)?;
    println!(
        "== fleet: {} agents x {} reports ({} per stream) on {:?} (concurrency {}, {} agents per UDP socket, open files limit {nofile}); work dir {}",
        args.agents,
        args.reports_per_agent,
        args.batches_per_stream,
        args.database,
        args.concurrency,
        args.agents_per_endpoint,
        run_dir.display()
    );

    let (database_url, pg) = match args.database {
        Database::Sqlite => (None, None),
        Database::Postgres => {
            let admin = args.database_url.clone().context(
                "--database postgres needs --database-url (or TETHER_BENCH_POSTGRES_URL)",
            )?;
            let name = format!("tether_bench_{}", uuid::Uuid::new_v4().simple());
            let url = control_plane::create_postgres_database(&admin, &name).await?;
            (Some(url), Some((admin, name)))
        }
    };
    let is_pg = pg.is_some();

    let result = run_with(&args, &run_dir, database_url.as_deref(), is_pg).await;
    if let Some((admin, name)) = &pg {
        if let Err(e) = control_plane::drop_postgres_database(admin, name).await {
            eprintln!("warning: could not drop database {name}: {e}");
        }
    }
    let mut result = result?;

    if !args.no_http_baseline {
        let (baseline_url, pg) = match &args.database_url {
            Some(admin) if is_pg => {
                let name = format!("tether_bench_http_{}", uuid::Uuid::new_v4().simple());
                let url = control_plane::create_postgres_database(admin, &name).await?;
                (url, Some((admin.clone(), name)))
            }
            _ => (
                format!("sqlite://{}", run_dir.join("http-baseline.db").display()),
                None,
            ),
        };
        let http = http_baseline::run_client(&http_baseline::BaselineParams {
            agents: args.agents,
            reports_per_agent: args.reports_per_agent,
            load_seconds: args.load_seconds,
            database_url: baseline_url,
            work_dir: run_dir.clone(),
            measure_postgres: is_pg,
        })
        .await;
        if let Some((admin, name)) = &pg {
            if let Err(e) = control_plane::drop_postgres_database(admin, name).await {
                eprintln!("warning: could not drop database {name}: {e}");
            }
        }
        match http {
            Ok(http) => {
                let quic_server = result.load.cp_cpu_seconds_per_1000_reports
                    + result.load.db_cpu_seconds_per_1000_reports.unwrap_or(0.0);
                let http_server = http.server_cpu_seconds_per_1000_reports
                    + http.db_cpu_seconds_per_1000_reports.unwrap_or(0.0);
                result.ratios = Some(Ratios {
                    bytes_per_report: ratio(
                        result.load.ip_bytes_per_report,
                        http.ip_bytes_per_report,
                    ),
                    server_cpu_per_report: ratio(quic_server, http_server),
                    client_cpu_per_report: ratio(
                        result.load.client_cpu_seconds_per_1000_reports,
                        http.client_cpu_seconds_per_1000_reports,
                    ),
                    throughput: ratio(
                        result.load.reports_per_second_sustained,
                        http.reports_per_second_sustained,
                    ),
                });
                result.http = Some(http);
            }
            Err(e) => eprintln!("HTTP baseline failed: {e:#}"),
        }
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
        println!("results written to {}", path.display());
    }
    Ok(result)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

async fn run_with(
    args: &FleetArgs,
    run_dir: &std::path::Path,
    database_url: Option<&str>,
    is_pg: bool,
) -> crate::error::Result<FleetResult> {
    let n = args.agents;
    let mut cp = ControlPlane::start(&run_dir.join("control-plane"), database_url, &[]).await?;
    let cp_pid = cp.pid();
    let self_pid = procfs::self_pid();
    let pin: CaFingerprint = cp
        .ca_fingerprint
        .parse()
        .map_err(|e| crate::error::bench_error!("{e}"))?;
    println!(
        "control plane pid {cp_pid}: API {}, QUIC {}, log {}",
        cp.api_url,
        cp.quic_addr,
        cp.log_path.display()
    );

    // 1. Enrollment tokens through the real API.
    let phase_cp = CpuMark::of(cp_pid);
    let phase_client = CpuMark::of(self_pid);
    let tokens: Vec<crate::error::Result<String>> = futures::stream::iter(0..n)
        .map(|i| {
            let cp = &cp;
            async move { cp.enrollment_token(&format!("sim-{i:05}")).await }
        })
        .buffered(args.token_concurrency.max(1))
        .collect()
        .await;
    let token_phase = phase(&tokens, phase_cp, phase_client, cp_pid, self_pid);
    println!(
        "tokens: {} created in {:.1} s ({:.0} tokens/s) through POST /api/v1/enrollment-tokens",
        token_phase.ok, token_phase.seconds, token_phase.per_second
    );
    let tokens: Vec<String> = tokens.into_iter().filter_map(Result::ok).collect();
    if tokens.len() < n as usize {
        bail!(
            "only {} of {n} enrollment tokens were created: {:?}",
            tokens.len(),
            token_phase.first_error
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = procfs::status_kib(cp_pid, "VmRSS").unwrap_or(0);

    // 2. Enrollment over QUIC, without a client certificate.
    let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(args.agents_per_endpoint.max(1)))
        .map(|_| {
            let socket =
                tether_transport::shared_udp_socket((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
            let runtime = quinn::default_runtime().context("no async runtime")?;
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .context("binding a client endpoint")
        })
        .collect::<crate::error::Result<_>>()?;
    let enroll_config = quinn_client_config(tether_certs::agent_client_config(pin, None)?)?;
    let endpoint_of = |i: u32| endpoints[(i / args.agents_per_endpoint.max(1)) as usize].clone();
    let addr = cp.quic_addr;
    let quic_port = cp.quic_addr.port();
    let drops_start = procfs::udp_socket_drops(quic_port);
    let phase_cp = CpuMark::of(cp_pid);
    let phase_client = CpuMark::of(self_pid);
    let configs: Vec<crate::error::Result<quinn::ClientConfig>> =
        futures::stream::iter(tokens.into_iter().enumerate())
            .map(|(i, token)| {
                let endpoint = endpoint_of(i as u32);
                let config = enroll_config.clone();
                async move {
                    tokio::time::timeout(
                        Duration::from_secs(60),
                        enroll_one(endpoint, config, addr, pin, token, i as u32),
                    )
                    .await
                    .map_err(|_| crate::error::bench_error!("enrollment took over 60 s"))?
                }
            })
            .buffered(args.concurrency.max(1))
            .collect()
            .await;
    let enrollment = phase(&configs, phase_cp, phase_client, cp_pid, self_pid);
    println!(
        "enrollment: {} enrolled, {} failed in {:.1} s = {:.0} enrollments/s ({:.2} ms control-plane CPU each){}",
        enrollment.ok,
        enrollment.failed,
        enrollment.seconds,
        enrollment.per_second,
        enrollment.cp_cpu_ms_per_item,
        enrollment
            .first_error
            .as_deref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );

    let drops_enrolled = procfs::udp_socket_drops(quic_port);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_enrollment = procfs::status_kib(cp_pid, "VmRSS").unwrap_or(0);

    // 3. Sessions with the agents' certificates: Hello -> Welcome.
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let phase_cp = CpuMark::of(cp_pid);
    let phase_client = CpuMark::of(self_pid);
    let connected: Vec<crate::error::Result<Connected>> = futures::stream::iter(
        configs
            .into_iter()
            .enumerate()
            .filter_map(|(i, config)| config.ok().map(|config| (i, config))),
    )
    .map(|(i, config)| {
        let endpoint = endpoint_of(i as u32);
        let counters = counters.clone();
        let stop = stop.clone();
        async move {
            let (c, s, id, hb) = tokio::time::timeout(
                Duration::from_secs(60),
                connect_one(endpoint, config, addr, i as u32),
            )
            .await
            .map_err(|_| crate::error::bench_error!("session set-up took over 60 s"))??;
            // Heartbeat from the start, as a real agent does: a session
            // phase longer than --offline-after (10,000 agents on a busy
            // machine) must not cost the first agents their sessions.
            tokio::spawn(answer_control_plane(c.clone(), stop.clone()));
            let heartbeat = tokio::spawn(heartbeat_loop(s, hb, i as u32, counters, stop));
            Ok((i as u32, c, id, heartbeat))
        }
    })
    .buffered(args.concurrency.max(1))
    .collect()
    .await;
    let session_phase = phase(&connected, phase_cp, phase_client, cp_pid, self_pid);
    let drops_sessions = procfs::udp_socket_drops(quic_port);
    println!(
        "sessions: {} connected (mTLS + Hello/Welcome), {} failed in {:.1} s = {:.0} sessions/s{}",
        session_phase.ok,
        session_phase.failed,
        session_phase.seconds,
        session_phase.per_second,
        session_phase
            .first_error
            .as_deref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    let mut sessions = Vec::with_capacity(connected.len());
    let mut heartbeat_tasks = Vec::with_capacity(connected.len());
    for (index, connection, server_id, heartbeat) in connected.into_iter().flatten() {
        heartbeat_tasks.push(heartbeat);
        sessions.push(Session {
            index,
            connection,
            server_id,
        });
    }
    if sessions.is_empty() {
        bail!(
            "no simulated agent got a session; see {}",
            cp.log_path.display()
        );
    }
    let connected_count = sessions.len() as u64;

    // 4. Idle: everyone connected, heartbeats and keep-alives only.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let drops_idle_start = procfs::udp_socket_drops(quic_port);
    let idle_cp = CpuMark::of(cp_pid);
    let idle_client = CpuMark::of(self_pid);
    let idle_machine = procfs::MachineMark::now();
    let idle_db = is_pg.then(|| CpuMark::of_name("postgres"));
    let idle_udp = udp_totals(&sessions);
    let heartbeats_before = counters.heartbeats.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let drops_idle_end = procfs::udp_socket_drops(quic_port);
    let idle_cp_end = CpuMark::of(cp_pid);
    let idle_client_end = CpuMark::of(self_pid);
    let idle_machine_end = procfs::MachineMark::now();
    let idle_db_end = is_pg.then(|| CpuMark::of_name("postgres"));
    let idle_udp_end = udp_totals(&sessions);
    let rss_connected = procfs::status_kib(cp_pid, "VmRSS").unwrap_or(0);
    let idle_window = idle_cp_end.at.duration_since(idle_cp.at).as_secs_f64();
    let cp_idle_percent = idle_cp_end.percent_since(&idle_cp);
    let idle_db_cpu = idle_db
        .zip(idle_db_end)
        .map(|(a, b)| b.cpu_since(&a))
        .unwrap_or(0.0);
    let idle_machine_percent = 100.0 * idle_machine_end.busy_since(&idle_machine) / idle_window;
    let idle_other_percent = idle_machine_percent
        - 100.0
            * (idle_cp_end.cpu_since(&idle_cp)
                + idle_client_end.cpu_since(&idle_client)
                + idle_db_cpu)
            / idle_window;
    let idle = IdleResult {
        connected_agents: connected_count,
        window_seconds: idle_window,
        cp_rss_before_kib: rss_before,
        cp_rss_after_enrollment_kib: rss_after_enrollment,
        cp_rss_connected_kib: rss_connected,
        cp_pss_connected_kib: procfs::pss_kib(cp_pid),
        kib_per_agent_marginal: rss_connected.saturating_sub(rss_before) as f64
            / connected_count as f64,
        kib_per_agent_total: rss_connected as f64 / connected_count as f64,
        cp_cpu_percent_of_core: cp_idle_percent,
        cp_cpu_percent_per_1000_agents: cp_idle_percent * 1000.0 / connected_count as f64,
        db_cpu_percent_of_core: idle_db.zip(idle_db_end).map(|(a, b)| b.percent_since(&a)),
        udp_bytes_per_agent_per_minute: (idle_udp_end.bytes - idle_udp.bytes) as f64
            / connected_count as f64
            / (idle_window / 60.0),
        heartbeats_sent: counters.heartbeats.load(Ordering::Relaxed) - heartbeats_before,
        machine_cpu_percent: idle_machine_percent,
        other_processes_cpu_percent: idle_other_percent.max(0.0),
    };
    let idle_ip_bytes_per_agent_second = ((idle_udp_end.bytes - idle_udp.bytes)
        + 28 * (idle_udp_end.datagrams - idle_udp.datagrams))
        as f64
        / connected_count as f64
        / idle_window.max(1e-9);
    println!(
        "idle: {} agents connected; control plane RSS {} KiB (was {} KiB before enrollment) = {:.1} KiB/agent marginal, {:.1} KiB/agent total; CPU {:.2} % of one core ({:.3} % per 1,000 agents){}",
        connected_count,
        rss_connected,
        rss_before,
        idle.kib_per_agent_marginal,
        idle.kib_per_agent_total,
        idle.cp_cpu_percent_of_core,
        idle.cp_cpu_percent_per_1000_agents,
        idle.db_cpu_percent_of_core
            .map(|p| format!("; PostgreSQL CPU {p:.2} % of one core"))
            .unwrap_or_default()
    );

    // 5. Load: every agent sends its reports as fast as Acks come back.
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let load_udp = udp_totals(&sessions);
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.load_seconds);
    let sample = |counters: &Counters| Sample {
        at: Instant::now(),
        acked: counters.acked.load(Ordering::Relaxed),
        finished: counters.finished.load(Ordering::Relaxed),
        cp: CpuMark::of(cp_pid),
        client: CpuMark::of(self_pid),
        db: is_pg.then(|| CpuMark::of_name("postgres")),
        machine: procfs::MachineMark::now(),
    };
    let mut samples = vec![sample(&counters)];
    let mut report_tasks = tokio::task::JoinSet::new();
    for s in &sessions {
        report_tasks.spawn(report_loop(
            s.connection.clone(),
            s.index,
            args.reports_per_agent,
            args.batches_per_stream,
            deadline,
            counters.clone(),
            first_error.clone(),
        ));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => samples.push(sample(&counters)),
            joined = report_tasks.join_next() => if joined.is_none() { break },
        }
    }
    samples.push(sample(&counters));
    let load_udp_end = udp_totals(&sessions);
    let drops_load_end = procfs::udp_socket_drops(quic_port);
    let load_seconds = start.elapsed().as_secs_f64();
    let acked = counters.acked.load(Ordering::Relaxed);
    let errors = counters.report_errors.load(Ordering::Relaxed);
    // Agents that stopped early (an error) do not end the window: it ends
    // when more than 1 % of the agents are done.
    let stragglers = (sessions.len() as u64) / 100;
    // Sustained window: after 1 s of warm-up, while (almost) every agent was sending.
    let first = samples
        .iter()
        .find(|s| s.at.duration_since(start) >= Duration::from_secs(1))
        .copied()
        .unwrap_or(samples[0]);
    let mut last = samples
        .iter()
        .rev()
        .find(|s| s.finished <= stragglers && s.at > first.at)
        .copied()
        .unwrap_or(samples[samples.len() - 1]);
    let (first, last) = if last.at.duration_since(first.at) < Duration::from_secs(2) {
        last = samples[samples.len() - 1];
        (samples[0], last)
    } else {
        (first, last)
    };
    let window = last.at.duration_since(first.at).as_secs_f64();
    let window_acked = last.acked - first.acked;
    let per_1000 = |cpu: f64| {
        if window_acked == 0 {
            0.0
        } else {
            1000.0 * cpu / window_acked as f64
        }
    };
    let batch_frame_bytes = tether_protocol::codec::encode_frame(
        &AgentMessage::MetricsBatch(realistic_batch(1, 1)),
        MAX_FRAME_LEN,
    )?
    .len();
    let ack_frame_bytes = tether_protocol::codec::encode_frame(
        &ControlMessage::Ack(tether_protocol::Ack { seq: 1 }),
        MAX_FRAME_LEN,
    )?
    .len();
    let udp_bytes = load_udp_end.bytes - load_udp.bytes;
    let udp_datagrams = load_udp_end.datagrams - load_udp.datagrams;
    let per_report = |v: u64| {
        if acked == 0 {
            0.0
        } else {
            v as f64 / acked as f64
        }
    };
    let idle_share = idle_ip_bytes_per_agent_second * connected_count as f64 * load_seconds;
    let window_machine = last.machine.busy_since(&first.machine);
    let window_ours = last.cp.cpu_since(&first.cp)
        + last.client.cpu_since(&first.client)
        + first
            .db
            .zip(last.db)
            .map(|(a, b)| b.cpu_since(&a))
            .unwrap_or(0.0);
    // Check one agent's points really are in the store.
    let stored_points_checked = match sessions.first() {
        Some(s) => {
            let from = (chrono::Utc::now() - chrono::Duration::hours(1))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            match cp
                .get(&format!(
                    "/api/v1/servers/{}/metrics?from={from}&limit=10000",
                    s.server_id
                ))
                .await
            {
                Ok(body) => Some(format!(
                    "server {} has {} stored points",
                    s.server_id,
                    body["data"].as_array().map_or(0, Vec::len)
                )),
                Err(e) => Some(format!("could not read back points: {e}")),
            }
        }
        None => None,
    };
    let load = LoadResult {
        acked,
        errors,
        seconds: load_seconds,
        reports_per_second_overall: acked as f64 / load_seconds,
        window_seconds: window,
        reports_per_second_sustained: window_acked as f64 / window.max(1e-9),
        cp_cpu_percent_of_core: last.cp.percent_since(&first.cp),
        cp_cpu_seconds_per_1000_reports: per_1000(last.cp.cpu_since(&first.cp)),
        db_cpu_seconds_per_1000_reports: first
            .db
            .zip(last.db)
            .map(|(a, b)| per_1000(b.cpu_since(&a))),
        client_cpu_seconds_per_1000_reports: per_1000(last.client.cpu_since(&first.client)),
        batch_frame_bytes,
        ack_frame_bytes,
        udp_payload_bytes_per_report: per_report(udp_bytes),
        udp_datagrams_per_report: per_report(udp_datagrams),
        ip_bytes_per_report: per_report(udp_bytes + 28 * udp_datagrams),
        ip_bytes_per_report_net_of_idle: if acked == 0 {
            0.0
        } else {
            ((udp_bytes + 28 * udp_datagrams) as f64 - idle_share).max(0.0) / acked as f64
        },
        lost_packets: load_udp_end.lost - load_udp.lost,
        machine_cpu_percent: 100.0 * window_machine / window.max(1e-9),
        other_processes_cpu_percent: (100.0 * (window_machine - window_ours) / window.max(1e-9))
            .max(0.0),
        cp_rss_after_kib: procfs::status_kib(cp_pid, "VmRSS").unwrap_or(0),
        cp_peak_rss_kib: procfs::status_kib(cp_pid, "VmHWM").unwrap_or(0),
        stored_points_checked,
    };
    println!(
        "load: {} reports acked, {} errors in {:.1} s = {:.0} reports/s overall; sustained {:.0} reports/s over {:.1} s; control plane {:.0} % of one core, {:.3} CPU-s per 1,000 reports{}; {:.0} UDP payload bytes ({:.1} datagrams) per report{}",
        load.acked,
        load.errors,
        load.seconds,
        load.reports_per_second_overall,
        load.reports_per_second_sustained,
        load.window_seconds,
        load.cp_cpu_percent_of_core,
        load.cp_cpu_seconds_per_1000_reports,
        load.db_cpu_seconds_per_1000_reports
            .map(|c| format!(" + PostgreSQL {c:.3} CPU-s"))
            .unwrap_or_default(),
        load.udp_payload_bytes_per_report,
        load.udp_datagrams_per_report,
        first_error
            .lock()
            .unwrap()
            .as_deref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    if let Some(check) = &load.stored_points_checked {
        println!("check: {check}");
    }

    stop.cancel();
    for task in heartbeat_tasks {
        let _ = task.await;
    }
    for s in &sessions {
        s.connection.close(0u32.into(), b"bench done");
    }
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    }
    let hb_errors = counters.heartbeat_errors.load(Ordering::Relaxed);
    if hb_errors > 0 {
        println!("warning: {hb_errors} heartbeat failures during the run");
    }
    cp.stop();

    Ok(FleetResult {
        database: args.database,
        agents_requested: n,
        reports_per_agent: args.reports_per_agent,
        batches_per_stream: args.batches_per_stream,
        concurrency: args.concurrency,
        agents_per_endpoint: args.agents_per_endpoint,
        tokens: token_phase,
        enrollment,
        sessions: session_phase,
        idle,
        load,
        cp_socket_drops: SocketDrops {
            enrollment: drops_enrolled.saturating_sub(drops_start),
            sessions: drops_sessions.saturating_sub(drops_enrolled),
            idle: drops_idle_end.saturating_sub(drops_idle_start),
            load: drops_load_end.saturating_sub(drops_idle_end),
        },
        http: None,
        ratios: None,
    })
}

fn phase<T>(
    results: &[crate::error::Result<T>],
    cp_start: CpuMark,
    client_start: CpuMark,
    cp_pid: u32,
    self_pid: u32,
) -> PhaseResult {
    let cp_end = CpuMark::of(cp_pid);
    let client_end = CpuMark::of(self_pid);
    let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
    let seconds = cp_end.at.duration_since(cp_start.at).as_secs_f64();
    PhaseResult {
        ok,
        failed: results.len() as u64 - ok,
        seconds,
        per_second: ok as f64 / seconds.max(1e-9),
        cp_cpu_ms_per_item: per_item_ms(cp_end.cpu_since(&cp_start), ok),
        client_cpu_ms_per_item: per_item_ms(client_end.cpu_since(&client_start), ok),
        first_error: results
            .iter()
            .find_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))),
    }
}
