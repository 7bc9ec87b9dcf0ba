//! `tether-bench footprint`: the idle footprint of a real `tether-agent`
//! reporting every 30 s with 20 containers running, next to
//! prometheus-node-exporter (Debian package) scraped every 30 s, measured
//! in the same window on the same host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::control_plane::{binary, stop_child, ControlPlane};
use crate::procfs::{self, CpuMark};

/// The local image the containers run (built from busybox-static).
pub const IMAGE: &str = "tether-test-busybox:local";
const NODE_EXPORTER: &str = "prometheus-node-exporter";

/// `tether-bench footprint`.
#[derive(Debug, Clone, clap::Args)]
pub struct FootprintArgs {
    /// Containers kept running during the measurement.
    #[arg(long, default_value_t = 20)]
    pub containers: u32,
    /// Seconds after the agent's start before measuring (two 30 s reports).
    #[arg(long, default_value_t = 65)]
    pub warmup: u64,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 120)]
    pub window: u64,
    /// Scrape interval for node-exporter, and the agent's metrics interval.
    #[arg(long, default_value_t = 30)]
    pub interval: u64,
    /// Agent builds to measure side by side, as LABEL=PATH (repeatable)
    /// [default: release=<this binary's directory>/tether-agent].
    #[arg(long = "agent-binary", value_name = "LABEL=PATH")]
    pub agent_binaries: Vec<String>,
    /// Work directory [default: /var/tmp/tether-bench].
    #[arg(long, default_value = "/var/tmp/tether-bench")]
    pub work_dir: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// Footprint of one process over the window.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ProcessFootprint {
    pub name: String,
    pub pid: u32,
    pub rss_kib_mean: f64,
    pub rss_kib_max: u64,
    pub rss_kib_end: u64,
    pub pss_kib_end: Option<u64>,
    pub peak_rss_kib: u64,
    /// VmRSS split at the end: anonymous (heap, stacks) and file-backed
    /// (the binary and shared libraries).
    pub rss_anon_kib_end: u64,
    pub rss_file_kib_end: u64,
    /// Size of the executable on disk.
    pub binary_bytes: u64,
    pub cpu_seconds: f64,
    pub cpu_percent_of_core: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct FootprintResult {
    pub containers: u32,
    pub interval_seconds: u64,
    pub warmup_seconds: u64,
    pub window_seconds: f64,
    /// One per agent build measured.
    pub agents: Vec<ProcessFootprint>,
    pub node_exporter: Option<ProcessFootprint>,
    pub node_exporter_scrapes_in_window: u64,
    /// Size of one /metrics answer.
    pub node_exporter_scrape_bytes: u64,
    /// Reports each agent stored during the window (same order as `agents`).
    pub agent_reports_stored_in_window: Vec<Option<u64>>,
    pub sentinel: String,
}

fn docker(args: &[&str]) -> crate::error::Result<String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .context("running docker")?;
    if !output.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Builds [`IMAGE`] from /bin/busybox with `docker import` unless it exists.
pub fn ensure_image(work_dir: &Path) -> crate::error::Result<()> {
    if docker(&["image", "inspect", IMAGE]).is_ok() {
        return Ok(());
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("busybox-static is not installed (apt-get install busybox-static)")?;
    let root = work_dir.join(format!("busybox-root-{}", std::process::id()));
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(busybox, bin.join("busybox"))?;
    for applet in ["sh", "sleep", "yes", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -c . | docker import - {IMAGE}",
            root.display()
        ))
        .status()?;
    let _ = std::fs::remove_dir_all(&root);
    if !status.success() {
        bail!("docker import of {IMAGE} failed");
    }
    Ok(())
}

/// Containers removed when dropped.
struct Containers(Vec<String>);

impl Containers {
    fn start(count: u32, lifetime: Duration) -> crate::error::Result<Self> {
        let mut started = Containers(Vec::new());
        let sleep = lifetime.as_secs().to_string();
        for i in 0..count {
            let name = format!("tether-bench-fp-{i:02}");
            let _ = docker(&["rm", "-f", &name]);
            docker(&[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                "tether-bench=footprint",
                IMAGE,
                "sleep",
                &sleep,
            ])?;
            started.0.push(name);
        }
        Ok(started)
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let mut args = vec!["rm", "-f"];
        args.extend(self.0.iter().map(String::as_str));
        if let Err(e) = docker(&args) {
            eprintln!("warning: could not remove the bench containers: {e}");
        }
    }
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(10));
    }
}

fn free_tcp_port() -> crate::error::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_node_exporter() -> Option<PathBuf> {
    [
        "/usr/bin/prometheus-node-exporter",
        "/usr/sbin/prometheus-node-exporter",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Runs `tether-bench footprint`.
pub async fn run(args: FootprintArgs) -> crate::error::Result<FootprintResult> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let dir = args.work_dir.join(format!("footprint-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    println!(
        "== footprint: tether-agent (reporting every {} s) and {NODE_EXPORTER} (scraped every {} s), {} containers running, {} s warm-up, {} s window; work dir {}",
        args.interval,
        args.interval,
        args.containers,
        args.warmup,
        args.window,
        dir.display()
    );
    ensure_image(&args.work_dir)?;
    let lifetime = Duration::from_secs(args.warmup + args.window + 600);
    let containers = Containers::start(args.containers, lifetime)?;
    let running = docker(&["ps", "-q", "--filter", "label=tether-bench=footprint"])?
        .lines()
        .count();
    println!("{running} containers running ({IMAGE}, sleep)");

    let interval = format!("{}s", args.interval);
    let mut cp = ControlPlane::start(
        &dir.join("control-plane"),
        None,
        &["--metrics-interval", &interval],
    )
    .await?;
    let builds: Vec<(String, PathBuf)> = if args.agent_binaries.is_empty() {
        vec![("release".to_string(), binary("tether-agent")?)]
    } else {
        args.agent_binaries
            .iter()
            .map(|spec| match spec.split_once('=') {
                Some((label, path)) => Ok((label.to_string(), PathBuf::from(path))),
                None => bail!("--agent-binary takes LABEL=PATH, not {spec:?}"),
            })
            .collect::<crate::error::Result<_>>()?
    };
    let config = dir.join("agent.toml");
    std::fs::write(&config, "# agent.toml of the footprint bench\n")?;
    let mut agents = Vec::new();
    for (label, agent_bin) in &builds {
        if !agent_bin.is_file() {
            bail!("agent binary {} ({label}) is missing", agent_bin.display());
        }
        let token = cp.enrollment_token(&format!("footprint-{label}")).await?;
        let state_dir = dir.join(format!("agent-state-{label}"));
        let enrolled = Command::new(agent_bin)
            .arg("enroll")
            .args(["--server", &cp.quic_addr.to_string()])
            .args(["--ca-fingerprint", &cp.ca_fingerprint])
            .arg("--state-dir")
            .arg(&state_dir)
            .env("TETHER_AGENT_TOKEN", &token)
            .stdin(Stdio::null())
            .output()
            .context("running tether-agent enroll")?;
        if !enrolled.status.success() {
            bail!(
                "tether-agent enroll ({label}) failed: {}",
                String::from_utf8_lossy(&enrolled.stderr)
            );
        }
        let agent_log = std::fs::File::create(dir.join(format!("agent-{label}.log")))?;
        let agent = Guard(
            Command::new(agent_bin)
                .arg("run")
                .arg("--state-dir")
                .arg(&state_dir)
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(agent_log.try_clone()?)
                .stderr(agent_log)
                .spawn()
                .context("spawning tether-agent run")?,
        );
        agents.push((
            format!("tether-agent ({label})"),
            format!("footprint-{label}"),
            agent,
        ));
    }
    let agent_started = Instant::now();

    let node_exporter = match find_node_exporter() {
        Some(path) => {
            let port = free_tcp_port()?;
            let log = std::fs::File::create(dir.join("node-exporter.log"))?;
            let child = Command::new(&path)
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning {}", path.display()))?;
            Some((Guard(child), port))
        }
        None => {
            println!("{NODE_EXPORTER} is not installed (apt-get install -y prometheus-node-exporter); measuring the agent alone");
            None
        }
    };
    // The scraper: GET /metrics every interval, like a Prometheus server.
    let scrapes = Arc::new(AtomicU64::new(0));
    let scrape_bytes = Arc::new(AtomicU64::new(0));
    let scraper = node_exporter.as_ref().map(|(_, port)| {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let every = Duration::from_secs(args.interval);
        let (scrapes, scrape_bytes) = (scrapes.clone(), scrape_bytes.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            // Give the exporter a moment to bind.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Ok(response) = client.get(&url).send().await {
                    if let Ok(body) = response.bytes().await {
                        scrapes.fetch_add(1, Ordering::Relaxed);
                        scrape_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        })
    });
    println!("warming up for {} s", args.warmup);
    tokio::time::sleep(Duration::from_secs(args.warmup).saturating_sub(agent_started.elapsed()))
        .await;
    let ne_pid = node_exporter.as_ref().map(|(g, _)| g.0.id());
    let pids: Vec<(String, u32)> = agents
        .iter()
        .map(|(name, _, guard)| (name.clone(), guard.0.id()))
        .chain(ne_pid.map(|p| (NODE_EXPORTER.to_string(), p)))
        .collect();
    for (name, pid) in &pids {
        if procfs::cpu_seconds(*pid).is_none() {
            bail!(
                "{name} (pid {pid}) is not running after the warm-up; see the logs in {}",
                dir.display()
            );
        }
    }
    let window_start_utc = chrono::Utc::now();
    let window_scrapes_start = scrapes.load(Ordering::Relaxed);
    let starts: Vec<CpuMark> = pids.iter().map(|(_, pid)| CpuMark::of(*pid)).collect();
    let mut rss: Vec<Vec<u64>> = vec![Vec::new(); pids.len()];
    let window_end = Instant::now() + Duration::from_secs(args.window);
    while Instant::now() < window_end {
        for (i, (_, pid)) in pids.iter().enumerate() {
            if let Some(kib) = procfs::status_kib(*pid, "VmRSS") {
                rss[i].push(kib);
            }
        }
        tokio::time::sleep(
            Duration::from_secs(1).min(window_end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    let mut measured: Vec<ProcessFootprint> = pids
        .iter()
        .zip(starts)
        .zip(rss)
        .map(|(((name, pid), start), rss)| {
            let end = CpuMark::of(*pid);
            ProcessFootprint {
                name: name.clone(),
                pid: *pid,
                rss_kib_mean: rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64,
                rss_kib_max: rss.iter().copied().max().unwrap_or(0),
                rss_kib_end: procfs::status_kib(*pid, "VmRSS").unwrap_or(0),
                pss_kib_end: procfs::pss_kib(*pid),
                peak_rss_kib: procfs::status_kib(*pid, "VmHWM").unwrap_or(0),
                rss_anon_kib_end: procfs::status_kib(*pid, "RssAnon").unwrap_or(0),
                rss_file_kib_end: procfs::status_kib(*pid, "RssFile").unwrap_or(0)
                    + procfs::status_kib(*pid, "RssShmem").unwrap_or(0),
                binary_bytes: std::fs::metadata(format!("/proc/{pid}/exe"))
                    .map(|m| m.len())
                    .unwrap_or(0),
                cpu_seconds: end.cpu_since(&start),
                cpu_percent_of_core: end.percent_since(&start),
            }
        })
        .collect();
    let window_seconds = args.window as f64;

    // What each agent delivered during the window.
    let servers = cp.get("/api/v1/servers").await.unwrap_or_default();
    let from = window_start_utc.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut reports_in_window = Vec::new();
    for (_, server_name, _) in &agents {
        let id = servers["data"]
            .as_array()
            .and_then(|list| list.iter().find(|s| s["name"] == server_name.as_str()))
            .and_then(|s| s["id"].as_str())
            .map(str::to_string);
        let mut stored = None;
        if let Some(id) = id {
            if let Ok(points) = cp
                .get(&format!(
                    "/api/v1/servers/{id}/metrics?from={from}&limit=1000"
                ))
                .await
            {
                stored = points["data"].as_array().map(|a| a.len() as u64);
            }
        }
        reports_in_window.push(stored);
    }

    if let Some(task) = scraper {
        task.abort();
    }
    let window_scrapes = scrapes.load(Ordering::Relaxed) - window_scrapes_start;
    drop(agents);
    drop(node_exporter);
    cp.stop();
    drop(containers);

    let node_exporter_fp = if ne_pid.is_some() {
        measured.pop()
    } else {
        None
    };
    let result = FootprintResult {
        containers: args.containers,
        interval_seconds: args.interval,
        warmup_seconds: args.warmup,
        window_seconds,
        agents: measured,
        node_exporter: node_exporter_fp,
        node_exporter_scrapes_in_window: window_scrapes,
        node_exporter_scrape_bytes: scrape_bytes.load(Ordering::Relaxed)
            / scrapes.load(Ordering::Relaxed).max(1),
        agent_reports_stored_in_window: reports_in_window,
        sentinel: "not measured: Coolify's Sentinel agent is written in Go (github.com/coollabsio/sentinel) and is not published on crates.io, so it cannot be built here from crates.io alone".into(),
    };
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
        println!("results written to {}", path.display());
    }
    Ok(result)
}
