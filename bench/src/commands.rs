//! `tether-bench commands`: the command round trip with N connected agents.
//!
//! N simulated agents enroll and keep real mutual-TLS QUIC sessions (as in
//! `fleet`, heartbeats included) and answer every `RunCommand` stream at once
//! with `CommandStarted`, one `CommandOutput` and `CommandFinished(Exited
//! {0})`. The client then runs `--commands` round trips one after another,
//! each on a random agent: `POST /api/v1/servers/{id}/commands`, then
//! `GET /api/v1/commands/{id}/output` (SSE) read to its end, which comes after
//! the final `status` event — so a round trip is "API call to terminal
//! status as a client sees it". Prints p50/p90/p99/max.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{bail, Context};
use futures::StreamExt;
use tether_certs::CaFingerprint;
use tokio_util::sync::CancellationToken;

use crate::control_plane::{self, ControlPlane};
use crate::fleet::{
    answer_control_plane, connect_one, enroll_one, heartbeat_loop, quinn_client_config, Counters,
    Database,
};

/// `tether-bench commands`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommandsArgs {
    /// Simulated agents connected while commands run.
    #[arg(long, default_value_t = 1000)]
    pub agents: u32,
    /// Round trips measured (one after another).
    #[arg(long, default_value_t = 2000)]
    pub commands: u32,
    /// Round trips before measuring (not counted).
    #[arg(long, default_value_t = 200)]
    pub warmup: u32,
    #[arg(long, value_enum, default_value_t = Database::Sqlite)]
    pub database: Database,
    /// PostgreSQL admin URL [default: $TETHER_BENCH_POSTGRES_URL].
    #[arg(long, env = "TETHER_BENCH_POSTGRES_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Enrollments and session set-ups in flight at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// QUIC connections sharing one client endpoint.
    #[arg(long, default_value_t = 500)]
    pub agents_per_endpoint: u32,
    /// Work directory [default: /var/tmp/tether-bench].
    #[arg(long, default_value = "/var/tmp/tether-bench")]
    pub work_dir: PathBuf,
}

/// Simulated agents enrolled at a control plane, each with a session that
/// heartbeats and answers every command at once; stopped when dropped.
pub struct AnsweringFleet {
    pub server_ids: Vec<String>,
    pub counters: Arc<Counters>,
    stop: CancellationToken,
}

impl AnsweringFleet {
    /// Enrolls `n` agents at `cp` and opens their sessions.
    pub async fn connect(
        cp: &ControlPlane,
        n: u32,
        concurrency: usize,
        agents_per_endpoint: u32,
    ) -> crate::error::Result<Self> {
        let pin: CaFingerprint = cp
            .ca_fingerprint
            .parse()
            .map_err(|e| crate::error::bench_error!("{e}"))?;
        let addr: SocketAddr = cp.quic_addr;
        let tokens: Vec<String> = futures::stream::iter(0..n)
            .map(|i| {
                let cp = &cp;
                async move { cp.enrollment_token(&format!("cmd-{i:05}")).await }
            })
            .buffered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<crate::error::Result<_>>()?;
        let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(agents_per_endpoint.max(1)))
            .map(|_| {
                quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())
                    .context("binding a client endpoint")
            })
            .collect::<crate::error::Result<_>>()?;
        let endpoint_of = |i: u32| endpoints[(i / agents_per_endpoint.max(1)) as usize].clone();
        let enroll_config = quinn_client_config(tether_certs::agent_client_config(pin, None)?)?;
        let configs: Vec<quinn::ClientConfig> =
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
                .buffered(concurrency.max(1))
                .collect::<Vec<crate::error::Result<_>>>()
                .await
                .into_iter()
                .filter_map(|r| r.map_err(|e| eprintln!("enrollment failed: {e:#}")).ok())
                .collect();
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        // Each session heartbeats and answers commands from the moment it is up
        // (a session set up early must not go silent while the rest connect).
        let server_ids: Vec<String> = futures::stream::iter(configs.into_iter().enumerate())
            .map(|(i, config)| {
                let endpoint = endpoint_of(i as u32);
                let counters = counters.clone();
                let stop = stop.clone();
                async move {
                    let (connection, control, server_id, heartbeat) = tokio::time::timeout(
                        Duration::from_secs(60),
                        connect_one(endpoint, config, addr, i as u32),
                    )
                    .await
                    .map_err(|_| crate::error::bench_error!("session set-up took over 60 s"))??;
                    tokio::spawn(heartbeat_loop(
                        control,
                        heartbeat,
                        i as u32,
                        counters,
                        stop.clone(),
                    ));
                    tokio::spawn(answer_control_plane(connection, stop));
                    Ok::<_, crate::error::BenchError>(server_id)
                }
            })
            .buffered(concurrency.max(1))
            .collect::<Vec<crate::error::Result<_>>>()
            .await
            .into_iter()
            .filter_map(|r| r.map_err(|e| eprintln!("session failed: {e:#}")).ok())
            .collect();
        if server_ids.is_empty() {
            bail!(
                "no simulated agent got a session; see {}",
                cp.log_path.display()
            );
        }
        Ok(Self {
            server_ids,
            counters,
            stop,
        })
    }
}

impl Drop for AnsweringFleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One round trip: `POST post_url` (202 with `command_id`), then the SSE
/// output of that command at `api_url` read to its end. Returns (whole
/// round trip ms, POST ms, succeeded).
pub async fn round_trip(
    http: &reqwest::Client,
    token: &str,
    post_url: &str,
    api_url: &str,
) -> crate::error::Result<(f64, f64, bool, String)> {
    let t0 = Instant::now();
    let response = http
        .post(post_url)
        .bearer_auth(token)
        .json(&serde_json::json!({ "argv": ["echo", "ok"], "timeout_seconds": 10 }))
        .send()
        .await?;
    if response.status() != reqwest::StatusCode::ACCEPTED {
        bail!(
            "POST {post_url}: {} {}",
            response.status(),
            response.text().await?
        );
    }
    let accepted: serde_json::Value = response.json().await?;
    let posted = t0.elapsed().as_secs_f64() * 1000.0;
    let id = accepted["command_id"].as_str().context("command_id")?;
    let sse = http
        .get(format!("{api_url}/api/v1/commands/{id}/output"))
        .bearer_auth(token)
        .send()
        .await?
        .text()
        .await?;
    let elapsed = t0.elapsed().as_secs_f64() * 1000.0;
    let succeeded = sse.contains("\"succeeded\"");
    Ok((elapsed, posted, succeeded, sse))
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub async fn run(args: CommandsArgs) -> crate::error::Result<()> {
    crate::procfs::raise_nofile_limit();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let run_dir = args
        .work_dir
        .join(format!("commands-{:?}-{}-{stamp}", args.database, args.agents).to_lowercase());
    std::fs::create_dir_all(&run_dir)?;
    let (database_url, pg) = match args.database {
        Database::Sqlite => (None, None),
        Database::Postgres => {
            let admin = args
                .database_url
                .clone()
                .context("--database postgres needs --database-url")?;
            let name = format!("tether_bench_cmd_{}", uuid::Uuid::new_v4().simple());
            let url = control_plane::create_postgres_database(&admin, &name).await?;
            (Some(url), Some((admin, name)))
        }
    };
    let result = run_with(&args, &run_dir, database_url.as_deref()).await;
    if let Some((admin, name)) = &pg {
        if let Err(e) = control_plane::drop_postgres_database(admin, name).await {
            eprintln!("warning: could not drop database {name}: {e}");
        }
    }
    result
}

async fn run_with(
    args: &CommandsArgs,
    run_dir: &std::path::Path,
    database_url: Option<&str>,
) -> crate::error::Result<()> {
    let n = args.agents;
    println!(
        "== commands: {n} agents, {} round trips on {:?}; work dir {}",
        args.commands,
        args.database,
        run_dir.display()
    );
    let cp = ControlPlane::start(&run_dir.join("control-plane"), database_url, &[]).await?;
    let started = Instant::now();
    let fleet = AnsweringFleet::connect(&cp, n, args.concurrency, args.agents_per_endpoint).await?;
    let server_ids = &fleet.server_ids;
    println!(
        "{} agents enrolled and connected in {:.1} s",
        server_ids.len(),
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut samples = Vec::with_capacity(args.commands as usize);
    let mut posts = Vec::with_capacity(args.commands as usize);
    let mut failures = 0u32;
    for round in 0..(args.warmup + args.commands) {
        let server_id = &server_ids[rand::random_range(0..server_ids.len())];
        let (elapsed, posted, succeeded, sse) = round_trip(
            &http,
            &cp.admin_token,
            &format!("{}/api/v1/servers/{server_id}/commands", cp.api_url),
            &cp.api_url,
        )
        .await?;
        if !succeeded {
            failures += 1;
            if failures <= 3 {
                eprintln!("round trip {round} did not succeed: {sse}");
            }
        }
        if round >= args.warmup {
            samples.push(elapsed);
            posts.push(posted);
        }
    }
    let counters = fleet.counters.clone();
    let connected = server_ids.len();
    drop(fleet);
    samples.sort_by(f64::total_cmp);
    posts.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    println!(
        "command round trip (POST -> SSE final status), {} agents connected, {:?}, {} samples, {failures} not succeeded:",
        connected,
        args.database,
        samples.len()
    );
    println!(
        "  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  mean {:.2} ms",
        percentile(&samples, 50.0),
        percentile(&samples, 90.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or(0.0),
        mean
    );
    println!(
        "  of which POST (202 with the command id): p50 {:.2} ms  p99 {:.2} ms",
        percentile(&posts, 50.0),
        percentile(&posts, 99.0)
    );
    println!(
        "  heartbeats answered during the run: {}, heartbeat errors: {}",
        counters
            .heartbeats
            .load(std::sync::atomic::Ordering::Relaxed),
        counters
            .heartbeat_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
