//! `tether-bench branch-commands`: the cross-branch command round trip.
//!
//! Two real `tether serve` processes on loopback: branch B with N simulated
//! agents (real enrollment and mutual-TLS QUIC sessions, answering every
//! command at once, as in `commands`), and branch A peered with B through
//! the API (invite on B granting `servers:read` and `commands:run`, accepted
//! on A). A round trip is what an admin of A sees:
//! `POST /api/v1/branches/{b}/servers/{s}/commands` on A (202), then
//! `GET /api/v1/commands/{id}/output` (SSE) on A read to its end, after the
//! final `status` event. The baseline, measured in the same run against the
//! same agents, is the local round trip on B
//! (`POST /api/v1/servers/{s}/commands` and its SSE on B); the difference
//! is what federation adds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{bail, Context};

use crate::commands::{percentile, round_trip, AnsweringFleet};
use crate::control_plane::ControlPlane;

/// `tether-bench branch-commands`.
#[derive(Debug, Clone, clap::Args)]
pub struct BranchCommandsArgs {
    /// Simulated agents connected to branch B.
    #[arg(long, default_value_t = 100)]
    pub agents: u32,
    /// Round trips measured, of each kind (one after another).
    #[arg(long, default_value_t = 2000)]
    pub commands: u32,
    /// Round trips of each kind before measuring (not counted).
    #[arg(long, default_value_t = 200)]
    pub warmup: u32,
    /// Enrollments and session set-ups in flight at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Work directory [default: /var/tmp/tether-bench].
    #[arg(long, default_value = "/var/tmp/tether-bench")]
    pub work_dir: PathBuf,
}

struct Samples {
    round_trips: Vec<f64>,
    posts: Vec<f64>,
    failures: u32,
}

impl Samples {
    fn print(&mut self, what: &str) {
        self.round_trips.sort_by(f64::total_cmp);
        self.posts.sort_by(f64::total_cmp);
        let s = &self.round_trips;
        println!(
            "{what}: {} samples, {} not succeeded\n  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n  of which POST (202): p50 {:.2} ms  p99 {:.2} ms",
            s.len(),
            self.failures,
            percentile(s, 50.0),
            percentile(s, 90.0),
            percentile(s, 99.0),
            s.last().copied().unwrap_or(0.0),
            percentile(&self.posts, 50.0),
            percentile(&self.posts, 99.0),
        );
    }
}

/// Runs `warmup + commands` round trips; `urls` gives, for a server id, the
/// POST URL and the API base URL the SSE is read from.
async fn measure(
    args: &BranchCommandsArgs,
    http: &reqwest::Client,
    token: &str,
    server_ids: &[String],
    urls: impl Fn(&str) -> (String, String),
) -> crate::error::Result<Samples> {
    let mut samples = Samples {
        round_trips: Vec::with_capacity(args.commands as usize),
        posts: Vec::with_capacity(args.commands as usize),
        failures: 0,
    };
    for round in 0..(args.warmup + args.commands) {
        let server_id = &server_ids[rand::random_range(0..server_ids.len())];
        let (post_url, api_url) = urls(server_id);
        let (elapsed, posted, succeeded, sse) =
            round_trip(http, token, &post_url, &api_url).await?;
        if !succeeded {
            samples.failures += 1;
            if samples.failures <= 3 {
                eprintln!("round trip {round} did not succeed: {sse}");
            }
        }
        if round >= args.warmup {
            samples.round_trips.push(elapsed);
            samples.posts.push(posted);
        }
    }
    Ok(samples)
}

pub async fn run(args: BranchCommandsArgs) -> crate::error::Result<()> {
    crate::procfs::raise_nofile_limit();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let run_dir = args
        .work_dir
        .join(format!("branch-commands-{}-{stamp}", args.agents));
    std::fs::create_dir_all(&run_dir)?;
    println!(
        "== branch-commands: {} agents on branch B, {} round trips of each kind; work dir {}",
        args.agents,
        args.commands,
        run_dir.display()
    );
    let b = ControlPlane::start(&run_dir.join("branch-b"), None, &[]).await?;
    let a = ControlPlane::start(&run_dir.join("branch-a"), None, &[]).await?;

    let started = Instant::now();
    let fleet = AnsweringFleet::connect(&b, args.agents, args.concurrency, 500).await?;
    println!(
        "{} agents enrolled at B and connected in {:.1} s",
        fleet.server_ids.len(),
        started.elapsed().as_secs_f64()
    );

    let (status, invite) = b
        .post(
            "/api/v1/branches/invites",
            &serde_json::json!({ "name": "a", "scopes": ["servers:read", "commands:run"] }),
        )
        .await?;
    if status != reqwest::StatusCode::CREATED {
        bail!("invite on B: {status} {invite}");
    }
    let (status, peer) = a
        .post(
            "/api/v1/branches",
            &serde_json::json!({ "invite": invite["invite"], "scopes": ["servers:read"] }),
        )
        .await?;
    if !status.is_success() {
        bail!("accepting the invite on A: {status} {peer}");
    }
    let branch_id = peer["id"].as_str().context("branch id")?.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peer = a.get(&format!("/api/v1/branches/{branch_id}")).await?;
        if peer["status"] == "healthy" {
            break;
        }
        if Instant::now() > deadline {
            bail!("B is not healthy on A after 30 s: {peer}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("A peered with B (branch {branch_id})");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let ids = &fleet.server_ids;
    let mut local = measure(&args, &http, &b.admin_token, ids, |s| {
        (
            format!("{}/api/v1/servers/{s}/commands", b.api_url),
            b.api_url.clone(),
        )
    })
    .await?;
    let mut relayed = measure(&args, &http, &a.admin_token, ids, |s| {
        (
            format!(
                "{}/api/v1/branches/{branch_id}/servers/{s}/commands",
                a.api_url
            ),
            a.api_url.clone(),
        )
    })
    .await?;
    // One relayed call without the agent: B's health results read from A.
    let mut calls = Vec::with_capacity(args.commands as usize);
    for round in 0..(args.warmup + args.commands) {
        let server_id = &ids[rand::random_range(0..ids.len())];
        let t0 = Instant::now();
        let response = http
            .get(format!(
                "{}/api/v1/branches/{branch_id}/servers/{server_id}/health",
                a.api_url
            ))
            .bearer_auth(&a.admin_token)
            .send()
            .await?;
        let status = response.status();
        let _ = response.bytes().await?;
        if status != reqwest::StatusCode::OK {
            bail!("GET health on A: {status}");
        }
        if round >= args.warmup {
            calls.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    calls.sort_by(f64::total_cmp);
    let heartbeats = fleet
        .counters
        .heartbeats
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(fleet);

    local.print("baseline: local round trip on B (POST on B -> SSE final status on B)");
    relayed.print(
        "cross-branch round trip (POST on A -> relayed to B -> agent -> SSE final status on A)",
    );
    let ratio = |p: f64| {
        percentile(&relayed.round_trips, p) / percentile(&local.round_trips, p).max(f64::EPSILON)
    };
    println!(
        "ratio cross-branch / local: p50 {:.2}x  p99 {:.2}x; added by federation: p50 {:.2} ms  p99 {:.2} ms",
        ratio(50.0),
        ratio(99.0),
        percentile(&relayed.round_trips, 50.0) - percentile(&local.round_trips, 50.0),
        percentile(&relayed.round_trips, 99.0) - percentile(&local.round_trips, 99.0),
    );
    println!(
        "one relayed call (GET /branches/{{b}}/servers/{{s}}/health on A, answered by B's store): p50 {:.2} ms  p99 {:.2} ms",
        percentile(&calls, 50.0),
        percentile(&calls, 99.0)
    );
    println!("heartbeats answered during the run: {heartbeats}");
    if local.failures + relayed.failures > 0 {
        bail!(
            "{} round trips did not succeed",
            local.failures + relayed.failures
        );
    }
    Ok(())
}
