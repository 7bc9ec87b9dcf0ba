//! `tether quickstart`: everything on one machine. A control plane on the
//! embedded SQLite default and N servers provisioned through the `local`
//! Terraform target exactly as a cloud server would be: a deployment, a
//! rendered cloud-init user-data, `terraform init/plan/apply` against the
//! control plane's own state backend, a bootstrap that downloads and checks
//! the agent, an agent that enrolls with the deployment's token and reports.
//! On exit the deployments are destroyed (`terraform destroy`), so nothing
//! keeps running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::app::{self, RunningControlPlane, StartError};
use crate::config::{ConfigError, ServeArgs};
use crate::provision::credentials::Provider;
use crate::store::{DeploymentRecord, DeploymentStatus, StoreError};

/// Why quickstart stopped before its servers were online.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Quickstart provisions through terraform, and it does not run.
    #[error(
        "quickstart provisions its servers with terraform's local target, and {} does not run: install terraform (1.4 or newer) or pass --terraform-bin",
        terraform_bin.display()
    )]
    TerraformMissing { terraform_bin: PathBuf },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("queueing a local deployment")]
    Queue(#[source] StoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("deployment {0} vanished")]
    DeploymentVanished(Uuid),
    #[error("{server_name} failed: {message}")]
    DeploymentFailed {
        server_name: String,
        message: String,
    },
    #[error(
        "only {completed} of {total} servers registered within {} s; GET /api/v1/infrastructure/deployments shows where each one is",
        READY_TIMEOUT.as_secs()
    )]
    NotReady { completed: usize, total: usize },
}

/// How long quickstart waits for its servers.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// Where the control plane and the local servers keep their state.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "tether-quickstart")]
    pub data_dir: PathBuf,
    /// HTTP API listen address.
    #[arg(long, env = "TETHER_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub api_listen: SocketAddr,
    /// QUIC listen address for the agents.
    #[arg(long, env = "TETHER_QUIC_LISTEN", default_value = "127.0.0.1:7443")]
    pub quic_listen: SocketAddr,
    /// How many local servers to provision.
    #[arg(long, default_value_t = 3)]
    pub servers: u32,
    /// Directory holding the tether-agent binary the servers download
    /// [default: the directory of this binary].
    #[arg(long, env = "TETHER_AGENT_DIR")]
    pub agent_dir: Option<PathBuf>,
    /// The terraform binary [default: `terraform` on PATH].
    #[arg(long, env = "TETHER_TERRAFORM_BIN")]
    pub terraform_bin: Option<PathBuf>,
    /// Exit (destroying the servers) once every server is online instead of
    /// running until Ctrl-C.
    #[arg(long)]
    pub exit_when_ready: bool,
}

/// Runs quickstart: starts the control plane, provisions the servers, waits
/// for them, prints what to try, and on exit destroys them.
pub async fn run(args: QuickstartArgs) -> Result<(), QuickstartError> {
    let config = ServeArgs {
        data_dir: Some(args.data_dir.clone()),
        api_listen: Some(args.api_listen),
        quic_listen: Some(args.quic_listen),
        agent_dir: args.agent_dir.clone(),
        terraform_bin: args.terraform_bin.clone(),
        registration_timeout: Some(Duration::from_secs(120)),
        // Quickstart's servers are local processes on this machine.
        enable_host_targets: true,
        ..Default::default()
    }
    .resolve()?;
    let terraform = tokio::process::Command::new(&config.terraform_bin)
        .arg("version")
        .output()
        .await;
    if !terraform.is_ok_and(|o| o.status.success()) {
        return Err(QuickstartError::TerraformMissing {
            terraform_bin: config.terraform_bin.clone(),
        });
    }
    let running = app::start(config).await?;
    let deployments = match provision_servers(&running, args.servers).await {
        Ok(ids) => ids,
        Err(e) => {
            running.shutdown().await;
            return Err(e);
        }
    };
    let ready = wait_until_completed(&running, &deployments).await;
    print_summary(&running, &args, ready.as_ref().ok().copied());
    if ready.is_ok() && !args.exit_when_ready {
        app::shutdown_signal().await;
    }
    destroy_servers(&running, &deployments).await;
    running.shutdown().await;
    ready.map(|_| ())
}

async fn provision_servers(
    running: &RunningControlPlane,
    count: u32,
) -> Result<Vec<Uuid>, QuickstartError> {
    let cp = &running.state;
    let mut ids = Vec::new();
    for i in 1..=count {
        let record = DeploymentRecord {
            region: "local".into(),
            instance_type: "process".into(),
            server_name: format!("quickstart-{i}"),
            tags: [("quickstart".to_string(), "true".to_string())]
                .into_iter()
                .collect(),
            ..DeploymentRecord::default()
        };
        let id = crate::provision::job::queue(
            cp,
            cp.instance.root_organization_id,
            Provider::Local,
            None,
            record,
        )
        .await
        .map_err(QuickstartError::Queue)?;
        println!("provisioning quickstart-{i} (deployment {id}) through terraform's local target");
        ids.push(id);
    }
    Ok(ids)
}

async fn wait_until_completed(
    running: &RunningControlPlane,
    deployments: &[Uuid],
) -> Result<Duration, QuickstartError> {
    let cp = &running.state;
    let started = Instant::now();
    loop {
        let mut completed = 0;
        for id in deployments {
            let Some(d) = cp.store.deployment(None, *id).await? else {
                return Err(QuickstartError::DeploymentVanished(*id));
            };
            match d.status {
                DeploymentStatus::Completed => completed += 1,
                DeploymentStatus::Failed | DeploymentStatus::RollingBack => {
                    return Err(QuickstartError::DeploymentFailed {
                        server_name: d.record.server_name,
                        message: d.record.error_message.unwrap_or_default(),
                    })
                }
                _ => {}
            }
        }
        if completed == deployments.len() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(QuickstartError::NotReady {
                completed,
                total: deployments.len(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Destroys the deployments (stops the local agents) and waits for it.
async fn destroy_servers(running: &RunningControlPlane, deployments: &[Uuid]) {
    let cp = &running.state;
    let scope = vec![cp.instance.root_organization_id];
    println!("destroying the local servers (terraform destroy)...");
    for id in deployments {
        let moved = cp
            .store
            .transition_deployment(
                &scope,
                *id,
                &[DeploymentStatus::Completed, DeploymentStatus::Failed],
                DeploymentStatus::Destroying,
                chrono::Utc::now(),
            )
            .await;
        if let Err(e) = moved {
            eprintln!("could not destroy deployment {id}: {e}");
        }
    }
    cp.provision_wakeup.notify_one();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let mut pending = 0;
        for id in deployments {
            if let Ok(Some(d)) = cp.store.deployment(None, *id).await {
                if d.status.is_active() {
                    pending += 1;
                }
            }
        }
        if pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("some deployments are still being destroyed; `tether serve --data-dir` on this directory finishes the job");
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
        "  servers        {}/deployments/<id>/local-server (agent logs in var/log)",
        args.data_dir.display()
    );
    println!();
    println!("Try:");
    println!("  export TETHER_TOKEN=$(cat {})", token_path.display());
    println!("  curl -s -H \"Authorization: Bearer $TETHER_TOKEN\" {api}/api/v1/servers");
    println!("  curl -s -H \"Authorization: Bearer $TETHER_TOKEN\" '{api}/api/v1/servers?status=online&label=quickstart=true'");
    println!("  curl -s -H \"Authorization: Bearer $TETHER_TOKEN\" {api}/api/v1/infrastructure/deployments");
    println!("  curl -s -X POST -H \"Authorization: Bearer $TETHER_TOKEN\" -H 'Content-Type: application/json' -d '{{\"provider\":\"local\",\"region\":\"local\",\"instance_type\":\"process\",\"server_name\":\"one-more\"}}' {api}/api/v1/infrastructure/provision");
    println!();
    if !args.exit_when_ready {
        println!("Press Ctrl-C to destroy the local servers and stop the control plane.");
    }
}
