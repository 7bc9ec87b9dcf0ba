//! The HTTP+JSON ingestion baseline: the same reports, pushed the way
//! Coolify's Sentinel agent pushes (an HTTP POST of a JSON document with a
//! bearer token over a keep-alive connection), received by a minimal axum
//! server that parses them and stores them through the same store
//! implementation and the same group-committing writer as the control plane
//! (`tether_control_plane::gateway::ingest::Ingestor`), answering 200 only
//! after the commit.
//!
//! The server runs in its own process (`tether-bench http-baseline-server`)
//! so that its CPU is measured apart from the clients'. It counts the TCP
//! payload bytes of every connection, and the TCP segments from `TCP_INFO`
//! when a connection closes, so that bytes per report can be compared with
//! QUIC's UDP counters at the IP level.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use crate::error::{bail, Context};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tether_control_plane::gateway::ingest::Ingestor;
use tether_control_plane::store::{
    ApiToken, CertificateRecord, Enrollment, Instance, NewEnrollmentToken, Organization, Quotas,
    Store,
};
use tether_protocol::MetricsBatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use uuid::Uuid;

use crate::control_plane::{binary, stop_child};
use crate::procfs::{self, CpuMark};
use crate::report::realistic_batch;

/// IPv4 (20) + TCP with the timestamp option (32) header bytes per segment.
const TCP_IP_HEADER_BYTES: u64 = 52;

// ---------------------------------------------------------------- server

/// `tether-bench http-baseline-server`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Store to write to (a fresh one): sqlite://PATH or postgres://...
    #[arg(
        long,
        env = "TETHER_BENCH_BASELINE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Servers to create (one bearer token each).
    #[arg(long)]
    pub agents: u32,
    /// Where to write the agents' bearer tokens (JSON array).
    #[arg(long)]
    pub tokens_file: PathBuf,
}

#[derive(Default)]
struct ByteCounters {
    read: AtomicU64,
    written: AtomicU64,
    connections: AtomicU64,
    closed: AtomicU64,
    segments_in: AtomicU64,
    segments_out: AtomicU64,
    requests: AtomicU64,
}

/// A TCP stream that counts its payload bytes, and its segments when closed.
struct CountingStream {
    inner: tokio::net::TcpStream,
    counters: Arc<ByteCounters>,
}

impl Drop for CountingStream {
    fn drop(&mut self) {
        if let Some((segs_in, segs_out)) = tcp_segments(self.inner.as_raw_fd()) {
            self.counters
                .segments_in
                .fetch_add(segs_in, Ordering::Relaxed);
            self.counters
                .segments_out
                .fetch_add(segs_out, Ordering::Relaxed);
        }
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// `tcpi_segs_in` and `tcpi_segs_out` of a TCP socket (Linux `TCP_INFO`).
fn tcp_segments(fd: i32) -> Option<(u64, u64)> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // struct tcp_info: tcpi_segs_out at offset 136, tcpi_segs_in at 140.
    if rc != 0 || (len as usize) < 144 {
        return None;
    }
    let at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
    Some((u64::from(at(140)), u64::from(at(136))))
}

impl AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters.read.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counters
                .written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counters
                .written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct CountingListener {
    inner: tokio::net::TcpListener,
    counters: Arc<ByteCounters>,
}

impl axum::serve::Listener for CountingListener {
    type Io = CountingStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    self.counters.connections.fetch_add(1, Ordering::Relaxed);
                    return (
                        CountingStream {
                            inner: stream,
                            counters: self.counters.clone(),
                        },
                        addr,
                    );
                }
                // Out of file descriptors and the like: wait, retry.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct App {
    tokens: HashMap<String, Uuid>,
    ingestor: Ingestor,
    counters: Arc<ByteCounters>,
}

async fn ingest(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Json(batch): Json<MetricsBatch>,
) -> StatusCode {
    let server_id = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|token| app.tokens.get(token));
    let Some(server_id) = server_id else {
        return StatusCode::UNAUTHORIZED;
    };
    app.counters.requests.fetch_add(1, Ordering::Relaxed);
    match app.ingestor.submit(*server_id, batch).await {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct ServerStats {
    read: u64,
    written: u64,
    connections: u64,
    closed: u64,
    segments_in: u64,
    segments_out: u64,
    requests: u64,
}

async fn stats(State(app): State<Arc<App>>) -> Json<ServerStats> {
    let c = &app.counters;
    Json(ServerStats {
        read: c.read.load(Ordering::Relaxed),
        written: c.written.load(Ordering::Relaxed),
        connections: c.connections.load(Ordering::Relaxed),
        closed: c.closed.load(Ordering::Relaxed),
        segments_in: c.segments_in.load(Ordering::Relaxed),
        segments_out: c.segments_out.load(Ordering::Relaxed),
        requests: c.requests.load(Ordering::Relaxed),
    })
}

/// Creates the instance and `agents` enrolled servers in a fresh store;
/// returns (bearer token, server id) pairs.
pub(crate) async fn create_servers(
    store: &Arc<dyn Store>,
    agents: u32,
) -> crate::error::Result<Vec<(String, Uuid)>> {
    let now = Utc::now();
    let root = Organization {
        id: Uuid::now_v7(),
        name: "root".into(),
        parent_id: None,
        quotas: Quotas::default(),
        created_at: now,
    };
    let instance = Instance {
        branch_id: Uuid::now_v7(),
        branch_name: "http-baseline".into(),
        root_organization_id: root.id,
        ca_cert_pem: "not used by the HTTP baseline".into(),
        ca_key_sealed: "not used by the HTTP baseline".into(),
        created_at: now,
    };
    let admin = ApiToken {
        id: Uuid::now_v7(),
        organization_id: root.id,
        name: "admin".into(),
        scopes: vec!["admin".into()],
        created_at: now,
        expires_at: None,
        revoked_at: None,
    };
    let (instance, _) = store.init_instance(&instance, &root, &admin).await?;
    let organization_id = instance.root_organization_id;
    let created: Vec<crate::error::Result<(String, Uuid)>> = futures::stream::iter(0..agents)
        .map(|i| {
            let store = store.clone();
            async move {
                let token = format!("tet_http_{}", Uuid::new_v4().simple());
                let token_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
                let now = Utc::now();
                store
                    .create_enrollment_token(&NewEnrollmentToken {
                        id: Uuid::now_v7(),
                        token_hash: token_hash.clone(),
                        organization_id,
                        server_name: Some(format!("http-sim-{i:05}")),
                        labels: Default::default(),
                        deployment_id: None,
                        created_at: now,
                        expires_at: now + chrono::Duration::days(1),
                    })
                    .await?;
                let server_id = Uuid::now_v7();
                let enrolled = store
                    .enroll(&Enrollment {
                        token_hash,
                        server_id,
                        hostname: format!("http-sim-{i:05}.fleet.example"),
                        agent_version: "0.1.0-http-sim".into(),
                        facts: serde_json::json!({ "os": "Debian GNU/Linux 12 (bookworm)", "cpu_cores": 4 }),
                        certificate: CertificateRecord {
                            serial: format!("{:032x}", rand::random::<u128>()),
                            server_id,
                            not_before: now,
                            not_after: now + chrono::Duration::days(30),
                            issued_at: now,
                        },
                        at: now,
                    })
                    .await?;
                if let Err(refusal) = enrolled {
                    bail!("store refused enrollment: {refusal:?}");
                }
                Ok((token, server_id))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    created.into_iter().collect()
}

/// Runs the baseline server until SIGTERM.
pub async fn serve(args: ServerArgs) -> crate::error::Result<()> {
    let store = tether_control_plane::store::open(&args.database_url)
        .await
        .context("opening the baseline store")?;
    let servers = create_servers(&store, args.agents).await?;
    let tokens: Vec<&String> = servers.iter().map(|(t, _)| t).collect();
    std::fs::write(&args.tokens_file, serde_json::to_vec(&tokens)?)?;
    let counters = Arc::new(ByteCounters::default());
    let app = Arc::new(App {
        tokens: servers.iter().cloned().collect(),
        ingestor: Ingestor::start(store.clone()),
        counters: counters.clone(),
    });
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let listener = socket.listen(4096)?;
    let stats_listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let ingest_addr = listener.local_addr()?;
    let stats_addr = stats_listener.local_addr()?;
    let ingest_router = Router::new()
        .route("/ingest", post(ingest))
        .with_state(app.clone());
    let stats_router = Router::new()
        .route("/stats", get(stats))
        .with_state(app.clone());
    println!("READY {ingest_addr} {stats_addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let counted = CountingListener {
        inner: listener,
        counters,
    };
    tokio::select! {
        served = axum::serve(counted, ingest_router) => served?,
        served = axum::serve(stats_listener, stats_router) => served?,
        _ = term.recv() => {}
    }
    Ok(())
}

// ---------------------------------------------------------------- client

/// What the fleet run hands the baseline.
pub struct BaselineParams {
    pub agents: u32,
    pub reports_per_agent: u64,
    pub load_seconds: u64,
    pub database_url: String,
    pub work_dir: PathBuf,
    pub measure_postgres: bool,
}

/// Results of the HTTP+JSON baseline.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HttpResult {
    pub agents: u32,
    pub server_setup_seconds: f64,
    pub acked: u64,
    pub errors: u64,
    pub seconds: f64,
    pub reports_per_second_overall: f64,
    pub window_seconds: f64,
    pub reports_per_second_sustained: f64,
    pub server_cpu_percent_of_core: f64,
    pub server_cpu_seconds_per_1000_reports: f64,
    pub db_cpu_seconds_per_1000_reports: Option<f64>,
    pub client_cpu_seconds_per_1000_reports: f64,
    /// JSON body of one report.
    pub body_bytes: usize,
    /// Request line + headers + body and the response, as counted on the
    /// server's sockets (TCP payload), per report.
    pub http_bytes_per_report: f64,
    pub request_bytes_per_report: f64,
    pub response_bytes_per_report: f64,
    /// TCP segments per report (both directions, connection set-up and
    /// teardown included), from TCP_INFO.
    pub tcp_segments_per_report: f64,
    /// HTTP bytes + 52 bytes of IPv4/TCP header per segment.
    pub ip_bytes_per_report: f64,
    pub tcp_connections: u64,
    pub server_peak_rss_kib: u64,
    /// The whole machine's busy CPU during the window, % of one core.
    pub machine_cpu_percent: f64,
    /// Machine - server - clients - PostgreSQL, % of one core.
    pub other_processes_cpu_percent: f64,
    pub first_error: Option<String>,
}

async fn server_stats(
    client: &reqwest::Client,
    stats_url: &str,
) -> crate::error::Result<ServerStats> {
    Ok(client.get(stats_url).send().await?.json().await?)
}

/// Starts the baseline server, runs the same load against it, measures.
pub async fn run_client(params: &BaselineParams) -> crate::error::Result<HttpResult> {
    println!(
        "http baseline: creating {} servers in a fresh store, then {} JSON reports each over HTTP/1.1 keep-alive",
        params.agents, params.reports_per_agent
    );
    let tokens_file = params.work_dir.join("http-baseline-tokens.json");
    let log = std::fs::File::create(params.work_dir.join("http-baseline-server.log"))?;
    let setup_start = Instant::now();
    let mut child = Command::new(binary("tether-bench")?)
        .arg("http-baseline-server")
        .args(["--agents", &params.agents.to_string()])
        .arg("--tokens-file")
        .arg(&tokens_file)
        .env("TETHER_BENCH_BASELINE_DATABASE_URL", &params.database_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("spawning tether-bench http-baseline-server")?;
    let server_pid = child.id();
    let stdout = child.stdout.take().context("server stdout")?;
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = match tokio::time::timeout(Duration::from_secs(600), ready).await {
        Ok(Ok(Ok(line))) if line.starts_with("READY ") => line,
        other => {
            stop_child(&mut child, Duration::from_secs(5));
            bail!("baseline server did not start: {other:?}");
        }
    };
    let mut parts = line.split_whitespace().skip(1);
    let ingest_url = format!("http://{}/ingest", parts.next().context("ingest address")?);
    let stats_url = format!("http://{}/stats", parts.next().context("stats address")?);
    let tokens: Vec<String> = serde_json::from_slice(&std::fs::read(&tokens_file)?)?;
    let server_setup_seconds = setup_start.elapsed().as_secs_f64();

    let result = load(params, &ingest_url, &stats_url, tokens, server_pid).await;
    stop_child(&mut child, Duration::from_secs(10));
    let mut result = result?;
    result.server_setup_seconds = server_setup_seconds;
    println!(
        "http baseline: {} reports acked, {} errors in {:.1} s = {:.0} reports/s overall; sustained {:.0} reports/s; server {:.0} % of one core, {:.3} CPU-s per 1,000 reports{}; {:.0} HTTP bytes ({:.1} TCP segments) per report",
        result.acked,
        result.errors,
        result.seconds,
        result.reports_per_second_overall,
        result.reports_per_second_sustained,
        result.server_cpu_percent_of_core,
        result.server_cpu_seconds_per_1000_reports,
        result
            .db_cpu_seconds_per_1000_reports
            .map(|c| format!(" + PostgreSQL {c:.3} CPU-s"))
            .unwrap_or_default(),
        result.http_bytes_per_report,
        result.tcp_segments_per_report,
    );
    Ok(result)
}

/// One report as JSON; Ok once the server answered 200 (committed).
async fn post_report(
    client: reqwest::Client,
    url: Arc<str>,
    token: String,
    index: u32,
    seq: u64,
) -> crate::error::Result<()> {
    let response = client
        .post(&*url)
        .bearer_auth(token)
        .json(&realistic_batch(index, seq))
        .send()
        .await?;
    let status = response.status();
    let _ = response.bytes().await?;
    if status != reqwest::StatusCode::OK {
        bail!("POST /ingest answered {status}");
    }
    Ok(())
}

async fn load(
    params: &BaselineParams,
    ingest_url: &str,
    stats_url: &str,
    tokens: Vec<String>,
    server_pid: u32,
) -> crate::error::Result<HttpResult> {
    let stats_client = reqwest::Client::new();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(None)
        .timeout(Duration::from_secs(30))
        .build()?;
    let self_pid = procfs::self_pid();
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let body_bytes = serde_json::to_vec(&realistic_batch(1, 1))?.len();

    let url: Arc<str> = ingest_url.into();
    let post = move |client: reqwest::Client, token: String, index: u32, seq: u64| {
        post_report(client, url.clone(), token, index, seq)
    };

    // Warm-up: one report (seq 0) per agent opens the keep-alive connections,
    // so the measured window holds no TCP handshakes.
    let warm: Vec<crate::error::Result<()>> = futures::stream::iter(tokens.iter().enumerate())
        .map(|(i, token)| post(client.clone(), token.clone(), i as u32, 0))
        .buffer_unordered(tokens.len().max(1))
        .collect()
        .await;
    if let Some(Err(e)) = warm.iter().find(|r| r.is_err()) {
        bail!("warm-up request failed: {e:#}");
    }
    let warm_count = warm.len() as u64;

    #[derive(Clone, Copy)]
    struct Sample {
        at: Instant,
        acked: u64,
        finished: u64,
        server: CpuMark,
        client: CpuMark,
        db: Option<CpuMark>,
        machine: procfs::MachineMark,
    }
    let measure_pg = params.measure_postgres;
    let sample = |acked: &AtomicU64, finished: &AtomicU64| Sample {
        at: Instant::now(),
        acked: acked.load(Ordering::Relaxed),
        finished: finished.load(Ordering::Relaxed),
        server: CpuMark::of(server_pid),
        client: CpuMark::of(self_pid),
        db: measure_pg.then(|| CpuMark::of_name("postgres")),
        machine: procfs::MachineMark::now(),
    };
    let stats_start = server_stats(&stats_client, stats_url).await?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(params.load_seconds);
    let mut samples = vec![sample(&acked, &finished)];
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let (client, token) = (client.clone(), token.clone());
        let (acked, errors, finished, first_error) = (
            acked.clone(),
            errors.clone(),
            finished.clone(),
            first_error.clone(),
        );
        let post = post.clone();
        let reports = params.reports_per_agent;
        tasks.spawn(async move {
            for seq in 1..=reports {
                if Instant::now() >= deadline {
                    break;
                }
                match post(client.clone(), token.clone(), i as u32, seq).await {
                    Ok(()) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(format!("{e:#}"));
                        break;
                    }
                }
            }
            finished.fetch_add(1, Ordering::Relaxed);
        });
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => samples.push(sample(&acked, &finished)),
            joined = tasks.join_next() => if joined.is_none() { break },
        }
    }
    samples.push(sample(&acked, &finished));
    let seconds = start.elapsed().as_secs_f64();
    let stats_end = server_stats(&stats_client, stats_url).await?;
    // Close the keep-alive connections so the server reads their TCP_INFO.
    drop(client);
    let mut stats_closed = stats_end;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats_closed = server_stats(&stats_client, stats_url).await?;
        if stats_closed.closed >= stats_closed.connections {
            break;
        }
    }
    let total_acked = acked.load(Ordering::Relaxed);

    // Agents that stopped early (an error) do not end the window: it ends
    // when more than 1 % of the agents are done.
    let stragglers = (tokens.len() as u64) / 100;
    let first = samples
        .iter()
        .find(|s| s.at.duration_since(start) >= Duration::from_secs(1))
        .copied()
        .unwrap_or(samples[0]);
    let last = samples
        .iter()
        .rev()
        .find(|s| s.finished <= stragglers && s.at > first.at)
        .copied()
        .unwrap_or(samples[samples.len() - 1]);
    let (first, last) = if last.at.duration_since(first.at) < Duration::from_secs(2) {
        (samples[0], samples[samples.len() - 1])
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
    let per_report = |v: u64| {
        if total_acked == 0 {
            0.0
        } else {
            v as f64 / total_acked as f64
        }
    };
    let window_machine = last.machine.busy_since(&first.machine);
    let window_ours = last.server.cpu_since(&first.server)
        + last.client.cpu_since(&first.client)
        + first
            .db
            .zip(last.db)
            .map(|(a, b)| b.cpu_since(&a))
            .unwrap_or(0.0);
    let request_bytes = stats_end.read - stats_start.read;
    let response_bytes = stats_end.written - stats_start.written;
    let http_bytes_per_report = per_report(request_bytes + response_bytes);
    // Segments are known for whole connections: warm-up and handshakes included.
    let all_requests = total_acked + warm_count;
    let tcp_segments_per_report = if all_requests == 0 {
        0.0
    } else {
        (stats_closed.segments_in + stats_closed.segments_out) as f64 / all_requests as f64
    };
    let errors = errors.load(Ordering::Relaxed);
    let first_error = first_error.lock().unwrap().clone();
    Ok(HttpResult {
        agents: params.agents,
        server_setup_seconds: 0.0,
        acked: total_acked,
        errors,
        seconds,
        reports_per_second_overall: total_acked as f64 / seconds,
        window_seconds: window,
        reports_per_second_sustained: window_acked as f64 / window.max(1e-9),
        server_cpu_percent_of_core: last.server.percent_since(&first.server),
        server_cpu_seconds_per_1000_reports: per_1000(last.server.cpu_since(&first.server)),
        db_cpu_seconds_per_1000_reports: first
            .db
            .zip(last.db)
            .map(|(a, b)| per_1000(b.cpu_since(&a))),
        client_cpu_seconds_per_1000_reports: per_1000(last.client.cpu_since(&first.client)),
        body_bytes,
        http_bytes_per_report,
        request_bytes_per_report: per_report(request_bytes),
        response_bytes_per_report: per_report(response_bytes),
        tcp_segments_per_report,
        ip_bytes_per_report: http_bytes_per_report
            + tcp_segments_per_report * TCP_IP_HEADER_BYTES as f64,
        tcp_connections: stats_closed.connections,
        server_peak_rss_kib: procfs::status_kib(server_pid, "VmHWM").unwrap_or(0),
        machine_cpu_percent: 100.0 * window_machine / window.max(1e-9),
        other_processes_cpu_percent: (100.0 * (window_machine - window_ours) / window.max(1e-9))
            .max(0.0),
        first_error,
    })
}
