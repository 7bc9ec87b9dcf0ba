//! `tether quickstart`: everything on one machine. A control plane on the
//! embedded SQLite default, N local servers whose agents enroll and report,
//! and a summary of what to try next.
//!
//! The agents run as local `tether-agent` processes, each with its own state
//! dir under `DATA_DIR/agents/`; their bootstrap token travels in a 0600
//! `agent.toml`, never in argv. Re-running quickstart on the same data dir
//! reuses the enrolled agents.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::api::enrollment_tokens;
use crate::app::{self, RunningControlPlane};
use crate::config::ServeArgs;
use crate::store::{ServerQuery, ServerStatus};

#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// Where the control plane and the local agents keep their state.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "tether-quickstart")]
    pub data_dir: PathBuf,
    /// HTTP API listen address.
    #[arg(long, env = "TETHER_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub api_listen: SocketAddr,
    /// QUIC listen address for the agents.
    #[arg(long, env = "TETHER_QUIC_LISTEN", default_value = "127.0.0.1:7443")]
    pub quic_listen: SocketAddr,
    /// How many local servers to start.
    #[arg(long, default_value_t = 3)]
    pub servers: u32,
    /// The tether-agent binary [default: next to this binary, else on PATH].
    #[arg(long, env = "TETHER_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// Exit once every server is online instead of running until Ctrl-C.
    #[arg(long)]
    pub exit_when_ready: bool,
}

/// The local agent processes.
struct LocalAgents {
    children: Vec<tokio::process::Child>,
}

impl LocalAgents {
    async fn stop(mut self) {
        for child in &self.children {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) with a pid we spawned and a valid signal number.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

pub async fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let config = ServeArgs {
        data_dir: Some(args.data_dir.clone()),
        api_listen: Some(args.api_listen),
        quic_listen: Some(args.quic_listen),
        ..Default::default()
    }
    .resolve()?;
    let running = app::start(config).await?;
    let agent_bin = agent_binary(args.agent_bin.as_deref())?;
    let agents = match start_agents(&running, &args, &agent_bin).await {
        Ok(agents) => agents,
        Err(e) => {
            running.shutdown().await;
            return Err(e);
        }
    };
    let ready = wait_until_online(&running, args.servers).await;
    print_summary(&running, &args, ready.as_ref().ok().copied());
    if let Err(e) = ready {
        agents.stop().await;
        running.shutdown().await;
        return Err(e);
    }
    if !args.exit_when_ready {
        app::shutdown_signal().await;
    }
    agents.stop().await;
    running.shutdown().await;
    Ok(())
}

fn agent_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("tether-agent")));
    if let Some(path) = sibling.filter(|p| p.is_file()) {
        return Ok(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tether-agent"))
            .find(|p| p.is_file())
    });
    on_path.context("tether-agent not found next to tether or on PATH (build it with `cargo build --release`, or pass --agent-bin)")
}

async fn start_agents(
    running: &RunningControlPlane,
    args: &QuickstartArgs,
    agent_bin: &Path,
) -> anyhow::Result<LocalAgents> {
    let cp = &running.state;
    let mut children = Vec::new();
    for i in 1..=args.servers {
        let name = format!("quickstart-{i}");
        let state_dir = args.data_dir.join("agents").join(&name);
        crate::fsutil::create_private_dir(&state_dir)?;
        let config_path = state_dir.join("agent.toml");
        if !state_dir.join("identity.toml").exists() {
            let labels = [("quickstart".to_string(), "true".to_string())]
                .into_iter()
                .collect();
            let (token, _) = enrollment_tokens::issue(
                cp,
                cp.instance.root_organization_id,
                labels,
                Some(name.clone()),
                3600,
            )
            .await?;
            let agent_toml = format!(
                "# Written by tether quickstart.\nserver = \"{}\"\nca_fingerprint = \"{}\"\ntoken = \"{}\"\n",
                cp.public_quic_addr,
                cp.pki.ca.fingerprint(),
                token
            );
            crate::fsutil::write_private(&config_path, agent_toml.as_bytes())?;
        }
        let log = std::fs::File::create(state_dir.join("agent.log"))?;
        let child = tokio::process::Command::new(agent_bin)
            .arg("run")
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--config")
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", agent_bin.display()))?;
        children.push(child);
    }
    Ok(LocalAgents { children })
}

async fn wait_until_online(
    running: &RunningControlPlane,
    expected: u32,
) -> anyhow::Result<Duration> {
    let cp = &running.state;
    let started = Instant::now();
    let scope = vec![cp.instance.root_organization_id];
    loop {
        let online = cp
            .store
            .list_servers(&ServerQuery {
                scope: scope.clone(),
                status: Some(ServerStatus::Online),
                labels: vec![("quickstart".into(), "true".into())],
                limit: expected + 1,
                after: None,
            })
            .await?
            .len();
        if online as u32 >= expected {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("only {online} of {expected} servers came online within 60 s; see the agent logs under agents/*/agent.log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_summary(running: &RunningControlPlane, args: &QuickstartArgs, ready_in: Option<Duration>) {
    let cp = &running.state;
    let token_path = args.data_dir.join("admin.token");
    let api = &cp.api_url;
    println!();
    match ready_in {
        Some(d) => println!(
            "Tether is running: {} servers online in {:.1} s.",
            args.servers,
            d.as_secs_f64()
        ),
        None => println!("Tether is running, but not every server came online."),
    }
    println!();
    println!("  API            {api}");
    println!("  QUIC gateway   {}", cp.public_quic_addr);
    println!("  CA fingerprint {}", cp.pki.ca.fingerprint());
    println!("  admin token    {}", token_path.display());
    println!(
        "  agent logs     {}",
        args.data_dir.join("agents").display()
    );
    println!();
    println!("Try:");
    println!("  export TETHER_TOKEN=$(cat {})", token_path.display());
    println!("  curl -s -H \"Authorization: Bearer $TETHER_TOKEN\" {api}/api/v1/servers");
    println!("  curl -s -H \"Authorization: Bearer $TETHER_TOKEN\" '{api}/api/v1/servers?status=online&label=quickstart=true'");
    println!("  curl -s -X POST -H \"Authorization: Bearer $TETHER_TOKEN\" -H 'Content-Type: application/json' -d '{{}}' {api}/api/v1/enrollment-tokens");
    println!();
    if !args.exit_when_ready {
        println!("Press Ctrl-C to stop the control plane and the local servers.");
    }
}
