//! The persisted job that drives a deployment: claimed from the store with a
//! lease (so a replica that dies hands it over, and a restarted control plane
//! resumes it), it renders the working directory, runs `terraform init`,
//! `plan -json -out`, `apply -json` on the saved plan, waits for the agent to
//! enroll with the deployment's bootstrap token and report, and on any
//! failure rolls back with `terraform destroy`, recording what it could not
//! remove. `DELETE` requests are driven the same way.
//!
//! A step that fails transiently (`provision::failure`: rate limits,
//! timeouts, connection resets, 5xx, a held state lock) is run again after
//! an exponential backoff with jitter, at most `--provision-retries` times:
//! `init`, `plan` with `apply` (a failed apply leaves its saved plan stale,
//! so both run again), and `destroy` (rollback and `DELETE`). Each retry is
//! a `retry` event; the counts and the time of the next retry are in the
//! deployment's record, so a restarted control plane waits for the same
//! retry and keeps the step's budget.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use tether_protocol::CloseCode;
use tokio::sync::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use super::bootstrap::{render_user_data, AgentChecksum, BootstrapParams};
use super::credentials::Provider;
use super::failure::FailureKind;
use super::runner::{Terraform, TerraformError, TerraformEvent};
use crate::context::ControlPlane;
use crate::store::{
    bootstrap_token_context, cloud_credential_context, Deployment, DeploymentStatus,
    DeploymentStep, StepStatus, StoreError,
};

/// How long a claimed job is ours without renewal.
const LEASE: Duration = Duration::from_secs(15);
/// How often a running job renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often an idle worker looks for jobs (it is also woken at once when
/// this replica queues one).
const POLL: Duration = Duration::from_secs(1);
/// How often registration is checked.
const REGISTRATION_POLL: Duration = Duration::from_millis(250);

/// Module inputs every target takes; `terraform_variables` may not set them.
pub const FIXED_VARIABLES: [&str; 5] = [
    "server_name",
    "region",
    "instance_type",
    "tags",
    "user_data",
];

/// Why a step of a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Terraform(#[from] TerraformError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("preparing the working directory: {0}")]
    Workdir(std::io::Error),
    #[error("{0}")]
    Bootstrap(String),
    #[error("cloud credential: {0}")]
    Credential(String),
    #[error("{0}")]
    Registration(String),
    /// A transient failure that was still there after every retry.
    #[error("{source} (still failing after {retries} retries)")]
    RetriesExhausted {
        retries: u32,
        source: TerraformError,
    },
    /// Another worker took the job over (this one lost its lease).
    #[error("lease lost")]
    LeaseLost,
}

/// Longest wait between two retries.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The wait before retry number `retry` (1 for the first): `base` doubled
/// for each earlier retry, at most [`MAX_RETRY_DELAY`], times a random
/// factor in [0.5, 1) so deployments failing together do not retry
/// together.
pub fn retry_delay(base: Duration, retry: u32, jitter: f64) -> Duration {
    let exponent = retry.saturating_sub(1).min(16);
    let full = base.saturating_mul(1u32 << exponent).min(MAX_RETRY_DELAY);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// The per-deployment password of the Terraform HTTP backend, derived from
/// an instance secret so nothing needs storing and a resumed job gets the
/// same one.
pub fn backend_password(key: &[u8], deployment_id: Uuid) -> String {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(b"terraform-backend/");
    mac.update(deployment_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The working directory of a deployment.
pub fn workdir(cp: &ControlPlane, deployment_id: Uuid) -> PathBuf {
    cp.config
        .data_dir
        .join("deployments")
        .join(deployment_id.to_string())
}

/// A new deployment of `organization_id`: `pending` with a one-time
/// bootstrap token bound to it, or, when `awaiting_approval`,
/// `pending_approval` without one (minted by [`mint_bootstrap_token`] once
/// approved: nothing a server could enroll with exists before).
pub fn new_deployment(
    cp: &ControlPlane,
    organization_id: Uuid,
    provider: Provider,
    credential_id: Option<Uuid>,
    mut record: crate::store::DeploymentRecord,
    awaiting_approval: bool,
) -> (Deployment, Option<crate::store::NewEnrollmentToken>) {
    let now = Utc::now();
    if record.size.is_none() {
        record.size = cp
            .catalog
            .lookup(provider.as_str(), &record.region, &record.instance_type)
            .ok()
            .map(|t| crate::store::DeploymentSize {
                vcpus: i64::from(t.vcpus),
                memory_gb: t.memory_gb,
                hourly_usd: t.hourly_usd,
            });
    }
    let mut deployment = Deployment {
        id: Uuid::now_v7(),
        organization_id,
        provider: provider.as_str().into(),
        credential_id,
        status: if awaiting_approval {
            DeploymentStatus::PendingApproval
        } else {
            DeploymentStatus::Pending
        },
        server_id: None,
        record,
        bootstrap_token_sealed: None,
        created_at: now,
        updated_at: now,
        completed_at: None,
    };
    let token = (!awaiting_approval).then(|| mint_bootstrap_token(cp, &mut deployment));
    (deployment, token)
}

/// Mints a deployment's one-time bootstrap token: its sealed copy goes on
/// the deployment, the returned record (only the hash) into the store.
pub fn mint_bootstrap_token(
    cp: &ControlPlane,
    deployment: &mut Deployment,
) -> crate::store::NewEnrollmentToken {
    let now = Utc::now();
    let token = crate::enrollment::new_token();
    let registration = chrono::Duration::from_std(cp.config.registration_timeout)
        .unwrap_or_else(|_| chrono::Duration::minutes(10));
    deployment.bootstrap_token_sealed = Some(
        cp.sealer
            .seal(token.as_bytes(), &bootstrap_token_context(deployment.id)),
    );
    crate::store::NewEnrollmentToken {
        id: Uuid::now_v7(),
        token_hash: crate::enrollment::token_hash(&token),
        organization_id: deployment.organization_id,
        server_name: Some(deployment.record.server_name.clone()),
        labels: deployment.record.tags.clone(),
        deployment_id: Some(deployment.id),
        created_at: now,
        // Long enough for a slow apply plus the registration window; the
        // job expires it as soon as the deployment settles.
        expires_at: now + registration + chrono::Duration::hours(2),
    }
}

/// Stores a new deployment (`pending`) with a one-time bootstrap token bound
/// to it, and wakes this replica's workers. Callers checked scopes, the
/// provider, the credential and the quota.
pub async fn queue(
    cp: &ControlPlane,
    organization_id: Uuid,
    provider: Provider,
    credential_id: Option<Uuid>,
    record: crate::store::DeploymentRecord,
) -> Result<Uuid, StoreError> {
    let (deployment, token) =
        new_deployment(cp, organization_id, provider, credential_id, record, false);
    let Some(token) = token else {
        return Err(StoreError::Corrupt(
            "a queued deployment has a bootstrap token".into(),
        ));
    };
    cp.store.create_deployment(&deployment, &token).await?;
    cp.provision_wakeup.notify_one();
    Ok(deployment.id)
}

/// Ends every deployment that waited for approval longer than
/// `--approval-ttl` in `expired` (audited as the control plane's).
pub async fn expire_pending_approvals(cp: &ControlPlane) -> Result<(), StoreError> {
    let now = Utc::now();
    for mut d in cp.store.pending_approvals().await? {
        let Some(approval) = d.record.approval.as_mut() else {
            continue;
        };
        if approval.expires_at > now {
            continue;
        }
        approval.decision = Some("expired".into());
        approval.decided_at = Some(now);
        d.updated_at = now;
        d.completed_at = Some(now);
        if cp
            .store
            .close_pending_deployment(&d, DeploymentStatus::Expired)
            .await?
        {
            tracing::info!(deployment_id = %d.id, "approval request expired");
            let entry = crate::store::AuditEntry {
                id: Uuid::now_v7(),
                at: now,
                actor: "control-plane".into(),
                organization_id: Some(d.organization_id),
                action: "infrastructure.approval.expire".into(),
                target: Some(d.id.to_string()),
                source_ip: None,
                outcome: "success".into(),
                detail: json!({ "batch_id": d.record.batch_id }),
            };
            cp.store.append_audit(&entry).await?;
        }
    }
    Ok(())
}

/// Runs jobs until shutdown: claims up to `--provision-workers` deployments
/// at a time.
pub async fn worker_loop(cp: Arc<ControlPlane>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(
        cp.config.provision_workers as usize,
    ));
    loop {
        let permit = tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        if let Err(e) = expire_pending_approvals(&cp).await {
            tracing::warn!(error = %e, "could not expire approval requests");
        }
        let now = Utc::now();
        let claimed = cp
            .store
            .claim_deployment(&cp.worker_id, now, now + lease())
            .await;
        match claimed {
            Ok(Some(deployment)) => {
                let cp = cp.clone();
                let span = tracing::info_span!("deployment", deployment_id = %deployment.id);
                tokio::spawn(
                    async move {
                        let _permit = permit;
                        Job::new(cp, deployment).run().await;
                    }
                    .instrument(span),
                );
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not claim a deployment"),
        }
        drop(permit);
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = cp.provision_wakeup.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

fn lease() -> chrono::Duration {
    chrono::Duration::from_std(LEASE).unwrap_or_else(|_| chrono::Duration::seconds(15))
}

/// One claimed deployment.
struct Job {
    cp: Arc<ControlPlane>,
    deployment: Mutex<Deployment>,
    id: Uuid,
}

impl Job {
    fn new(cp: Arc<ControlPlane>, deployment: Deployment) -> Arc<Self> {
        Arc::new(Self {
            id: deployment.id,
            cp,
            deployment: Mutex::new(deployment),
        })
    }

    /// Writes the deployment back (renewing the lease).
    async fn save(&self) -> Result<(), JobError> {
        let mut d = self.deployment.lock().await;
        d.updated_at = Utc::now();
        if self
            .cp
            .store
            .save_deployment(&d, &self.cp.worker_id, Utc::now() + lease())
            .await?
        {
            Ok(())
        } else {
            Err(JobError::LeaseLost)
        }
    }

    async fn event(&self, kind: &str, body: Value) {
        if let Err(e) = self
            .cp
            .store
            .append_deployment_event(self.id, Utc::now(), kind, &body)
            .await
        {
            tracing::warn!(error = %e, "could not record a deployment event");
        }
    }

    async fn set_status(&self, status: DeploymentStatus) -> Result<(), JobError> {
        {
            let mut d = self.deployment.lock().await;
            d.status = status;
            if !status.is_active() {
                d.completed_at = Some(Utc::now());
                d.record.current_step = None;
            }
        }
        self.save().await?;
        self.event("status", json!({ "status": status })).await;
        tracing::info!(status = status.as_str(), "deployment status");
        Ok(())
    }

    async fn step_started(&self, name: &str, progress: u8) -> Result<Instant, JobError> {
        {
            let mut d = self.deployment.lock().await;
            d.record.steps.push(DeploymentStep {
                name: name.into(),
                status: StepStatus::Running,
                started_at: Utc::now(),
                duration_seconds: None,
            });
            d.record.current_step = Some(name.into());
            d.record.progress_percent = d.record.progress_percent.max(progress);
        }
        self.save().await?;
        self.event("step", json!({ "name": name, "status": "running" }))
            .await;
        Ok(Instant::now())
    }

    async fn step_ended(
        &self,
        name: &str,
        started: Instant,
        ok: bool,
        progress: u8,
    ) -> Result<(), JobError> {
        let duration = started.elapsed().as_secs_f64();
        let status = if ok {
            StepStatus::Succeeded
        } else {
            StepStatus::Failed
        };
        {
            let mut d = self.deployment.lock().await;
            if let Some(step) = d
                .record
                .steps
                .iter_mut()
                .rev()
                .find(|s| s.name == name && s.status == StepStatus::Running)
            {
                step.status = status;
                step.duration_seconds = Some((duration * 1000.0).round() / 1000.0);
            }
            if ok {
                d.record.progress_percent = d.record.progress_percent.max(progress);
            }
        }
        self.save().await?;
        self.event(
            "step",
            json!({ "name": name, "status": status, "duration_seconds": duration }),
        )
        .await;
        Ok(())
    }

    /// Runs one named step around `work`.
    async fn step<T>(
        &self,
        name: &str,
        start_progress: u8,
        end_progress: u8,
        work: impl std::future::Future<Output = Result<T, JobError>>,
    ) -> Result<T, JobError> {
        let started = self.step_started(name, start_progress).await?;
        let result = work.await;
        self.step_ended(name, started, result.is_ok(), end_progress)
            .await?;
        result
    }

    async fn run(self: Arc<Self>) {
        let renewer = {
            let job = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    if let Err(e) = job.save().await {
                        tracing::warn!(error = %e, "could not renew the deployment lease");
                    }
                }
            })
        };
        let result = self.drive().await;
        renewer.abort();
        match result {
            Ok(()) | Err(JobError::LeaseLost) => {}
            Err(e) => tracing::error!(error = %e, "deployment job failed"),
        }
    }

    async fn drive(&self) -> Result<(), JobError> {
        let (status, attempts) = {
            let mut d = self.deployment.lock().await;
            d.record.attempts += 1;
            (d.status, d.record.attempts)
        };
        if attempts > 1 && status != DeploymentStatus::Pending {
            // The previous worker died (its lease ran out): whatever lock
            // its terraform held is stale.
            self.cp
                .store
                .unlock_terraform_state(self.id, None, Utc::now())
                .await?;
            self.event(
                "log",
                json!({ "level": "warn", "message": format!("resuming after an interrupted run ({status:?}); stale state lock released") }),
            )
            .await;
            tracing::warn!(?status, "resuming an interrupted deployment");
        }
        match status {
            DeploymentStatus::Pending | DeploymentStatus::Provisioning => {
                if status == DeploymentStatus::Pending {
                    crate::events::emit_deployment(
                        &self.cp,
                        &*self.deployment.lock().await,
                        "infrastructure.provisioning.started",
                    )
                    .await;
                }
                self.set_status(DeploymentStatus::Provisioning).await?;
                match self.provision().await {
                    Ok(()) => self.register().await,
                    Err(JobError::LeaseLost) => Err(JobError::LeaseLost),
                    Err(e) => self.fail(e.to_string()).await,
                }
            }
            DeploymentStatus::Registering => self.register().await,
            DeploymentStatus::RollingBack => self.roll_back().await,
            DeploymentStatus::Destroying => self.destroy_requested().await,
            DeploymentStatus::Completed
            | DeploymentStatus::Failed
            | DeploymentStatus::Destroyed
            | DeploymentStatus::PendingApproval
            | DeploymentStatus::Rejected
            | DeploymentStatus::Expired => Ok(()),
        }
    }

    /// The terraform process for this deployment, with its environment.
    async fn terraform(&self, for_destroy: bool) -> Result<Terraform, JobError> {
        let d = self.deployment.lock().await.clone();
        let mut env: Vec<(String, String)> = Vec::new();
        let address = format!("{}/terraform/state/{}", self.cp.local_api_url, d.id);
        for key in [
            "TF_HTTP_ADDRESS",
            "TF_HTTP_LOCK_ADDRESS",
            "TF_HTTP_UNLOCK_ADDRESS",
        ] {
            env.push((key.into(), address.clone()));
        }
        env.push(("TF_HTTP_USERNAME".into(), "deployment".into()));
        env.push((
            "TF_HTTP_PASSWORD".into(),
            backend_password(&self.cp.backend_key, d.id),
        ));
        let agent_checksums = if for_destroy {
            Vec::new()
        } else {
            self.agent_checksums().await?
        };
        env.push((
            "TF_VAR_user_data".into(),
            self.user_data(&d, for_destroy, agent_checksums)?,
        ));
        if let Some(credential_id) = d.credential_id {
            // The API's rule, checked again: the credential may have been
            // deleted since, or the deployment predates the rule.
            let everywhere = self
                .cp
                .store
                .organization_scope(self.cp.instance.root_organization_id)
                .await?;
            let credential = super::credentials::credential_for_deployment(
                &*self.cp.store,
                d.organization_id,
                credential_id,
                &everywhere,
            )
            .await
            .map_err(|e| match e {
                super::credentials::CredentialUseError::Store(e) => JobError::Store(e),
                other => JobError::Credential(other.to_string()),
            })?;
            let fields = self
                .cp
                .sealer
                .open(
                    &credential.credentials_sealed,
                    &cloud_credential_context(credential.id),
                )
                .map_err(|e| JobError::Credential(e.to_string()))?;
            let fields: Map<String, Value> = serde_json::from_slice(&fields)
                .map_err(|_| JobError::Credential("stored credential is not JSON".into()))?;
            let provider =
                Provider::parse(&d.provider).map_err(|e| JobError::Credential(e.to_string()))?;
            for (key, value) in provider
                .environment(&fields)
                .map_err(|e| JobError::Credential(e.to_string()))?
            {
                env.push((key.into(), value));
            }
            if let Err(e) = self
                .cp
                .store
                .mark_cloud_credential(credential.id, None, Utc::now())
                .await
            {
                tracing::warn!(error = %e, "could not record the credential's use");
            }
        }
        Ok(Terraform::new(
            &self.cp.config.terraform_bin,
            &workdir(&self.cp, d.id),
            env,
        ))
    }

    /// The cloud-init user-data of this deployment. A destroy needs the
    /// variable set, not the token (spent or expired by then).
    /// The checksums of the served agent binaries. The first look hashes
    /// each binary (a debug build is over 100 MiB): on a blocking thread, so
    /// jobs starting together never hold the runtime's workers (and with
    /// them the API) while it runs.
    async fn agent_checksums(&self) -> Result<Vec<AgentChecksum>, JobError> {
        let cp = self.cp.clone();
        let binaries = tokio::task::spawn_blocking(move || cp.agent_binaries.all())
            .await
            .map_err(|e| JobError::Bootstrap(format!("reading the agent binaries: {e}")))?
            .map_err(|e| JobError::Bootstrap(format!("reading the agent binaries: {e}")))?;
        Ok(binaries
            .into_iter()
            .map(|b| AgentChecksum {
                os: b.os,
                arch: b.arch,
                sha256_hex: b.sha256_hex,
            })
            .collect())
    }

    fn user_data(
        &self,
        d: &Deployment,
        for_destroy: bool,
        agent_checksums: Vec<AgentChecksum>,
    ) -> Result<String, JobError> {
        if for_destroy {
            return Ok(super::bootstrap::DESTROY_USER_DATA.to_string());
        }
        let token = match &d.bootstrap_token_sealed {
            Some(sealed) => {
                let token = self
                    .cp
                    .sealer
                    .open(sealed, &bootstrap_token_context(d.id))
                    .map_err(|e| {
                        JobError::Bootstrap(format!("opening the bootstrap token: {e}"))
                    })?;
                String::from_utf8(token)
                    .map_err(|_| JobError::Bootstrap("bootstrap token is not text".into()))?
            }
            None => {
                return Err(JobError::Bootstrap(
                    "the bootstrap token is gone; provision a new deployment".into(),
                ))
            }
        };
        if agent_checksums.is_empty() {
            return Err(JobError::Bootstrap(
                "no agent binary to serve: put tether-agent next to the tether executable or set --agent-dir".into(),
            ));
        }
        let (api_url, quic_address) = control_plane_endpoints(&self.cp, d)?;
        render_user_data(&BootstrapParams {
            api_url,
            quic_address,
            ca_fingerprint: self.cp.pki.ca.fingerprint().to_string(),
            token,
            deployment_id: d.id.to_string(),
            agent_checksums,
            agent_user: self.cp.config.provision_agent_user.clone(),
            install_docker: d.record.install_docker,
        })
        .map_err(|e| JobError::Bootstrap(e.to_string()))
    }

    /// Writes the working directory: the target's module, a root module that
    /// calls it with the `http` backend, and the non-secret variables.
    async fn render(&self) -> Result<(), JobError> {
        let d = self.deployment.lock().await.clone();
        let dir = workdir(&self.cp, d.id);
        write_workdir(&dir, &d, self.cp.config.templates_dir.as_deref()).map_err(JobError::Workdir)
    }

    async fn terraform_step(
        &self,
        terraform: &Terraform,
        name: &str,
        args: &[&str],
        progress: (u8, u8),
    ) -> Result<(), JobError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = terraform.run(args, move |event| {
            let _ = tx.send(event);
        });
        let forward = async {
            while let Some(event) = rx.recv().await {
                self.record_terraform_event(event).await;
            }
        };
        self.step(name, progress.0, progress.1, async {
            let (result, ()) = tokio::join!(run, forward);
            result.map_err(JobError::from)
        })
        .await
    }

    async fn record_terraform_event(&self, event: TerraformEvent) {
        let body = match event {
            TerraformEvent::Log { level, message } => {
                if message.is_empty() {
                    return;
                }
                json!({ "level": level, "message": message })
            }
            TerraformEvent::Diagnostic {
                severity,
                summary,
                detail,
            } => json!({ "level": severity, "message": summary, "detail": detail }),
            TerraformEvent::ResourceStarted { address, action } => {
                json!({ "level": "info", "message": format!("{address}: {action} started"), "resource": address })
            }
            TerraformEvent::ResourceDone {
                address,
                action,
                id,
                elapsed_seconds,
            } => {
                if action == "create" {
                    if let Some(id) = &id {
                        self.deployment
                            .lock()
                            .await
                            .record
                            .instance_id
                            .get_or_insert(id.clone());
                    }
                }
                json!({ "level": "info", "message": format!("{address}: {action} complete after {elapsed_seconds}s"), "resource": address, "id": id })
            }
            TerraformEvent::ResourceFailed { address, action } => {
                json!({ "level": "error", "message": format!("{address}: {action} failed"), "resource": address })
            }
        };
        self.event("log", body).await;
    }

    /// Runs `work` (one or more terraform steps) until it succeeds, fails
    /// permanently, or fails transiently more than `--provision-retries`
    /// times in a row; waits first for a retry scheduled before a restart.
    async fn retrying<F, Fut>(&self, mut work: F) -> Result<(), JobError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), JobError>>,
    {
        let scheduled = self.deployment.lock().await.record.next_retry_at;
        if let Some(at) = scheduled {
            if let Ok(wait) = (at - Utc::now()).to_std() {
                tracing::info!(?wait, "waiting for a retry scheduled before a restart");
                self.sleep(wait).await?;
            }
        }
        loop {
            let error = match work().await {
                Ok(()) => {
                    let reset = {
                        let mut d = self.deployment.lock().await;
                        let reset = d.record.step_retries != 0 || d.record.next_retry_at.is_some();
                        d.record.step_retries = 0;
                        d.record.next_retry_at = None;
                        reset
                    };
                    if reset {
                        self.save().await?;
                    }
                    return Ok(());
                }
                Err(JobError::Terraform(error)) if error.failure_kind().is_transient() => error,
                Err(JobError::LeaseLost) => return Err(JobError::LeaseLost),
                Err(other) => {
                    // A permanent failure ends this step's retries: the
                    // next step (a rollback's destroy) gets its own budget.
                    let mut d = self.deployment.lock().await;
                    d.record.step_retries = 0;
                    d.record.next_retry_at = None;
                    return Err(other);
                }
            };
            let FailureKind::Transient(reason) = error.failure_kind() else {
                return Err(JobError::Terraform(error));
            };
            let limit = self.cp.config.provision_retries;
            let retry = {
                let mut d = self.deployment.lock().await;
                if d.record.step_retries >= limit {
                    let retries = d.record.step_retries;
                    d.record.step_retries = 0;
                    d.record.next_retry_at = None;
                    drop(d);
                    return Err(if retries == 0 {
                        JobError::Terraform(error)
                    } else {
                        JobError::RetriesExhausted {
                            retries,
                            source: error,
                        }
                    });
                }
                d.record.step_retries += 1;
                d.record.retry_count += 1;
                d.record.step_retries
            };
            let delay = retry_delay(
                self.cp.config.provision_retry_delay,
                retry,
                rand::random::<f64>(),
            );
            let step = match &error {
                TerraformError::Failed { command, .. } => command.clone(),
                _ => "terraform".into(),
            };
            self.deployment.lock().await.record.next_retry_at =
                Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default());
            self.save().await?;
            tracing::warn!(%step, retry, limit, reason = reason.as_str(), ?delay, "transient terraform failure; retrying");
            self.event(
                "retry",
                json!({
                    "step": step,
                    "retry": retry,
                    "max_retries": limit,
                    "reason": reason,
                    "error": error.to_string(),
                    "delay_seconds": delay.as_secs_f64(),
                }),
            )
            .await;
            self.sleep(delay).await?;
        }
    }

    /// Sleeps, or ends the job (to be resumed) when the control plane stops.
    async fn sleep(&self, duration: Duration) -> Result<(), JobError> {
        tokio::select! {
            _ = self.cp.shutdown.cancelled() => Err(JobError::LeaseLost),
            _ = tokio::time::sleep(duration) => Ok(()),
        }
    }

    async fn provision(&self) -> Result<(), JobError> {
        self.step("render", 5, 10, self.render()).await?;
        let terraform = self.terraform(false).await?;
        let terraform = &terraform;
        self.retrying(|| {
            self.terraform_step(
                terraform,
                "init",
                &["init", "-input=false", "-no-color"],
                (10, 25),
            )
        })
        .await?;
        // A failed apply leaves its saved plan stale: plan again, then apply.
        self.retrying(|| async move {
            self.terraform_step(
                terraform,
                "plan",
                &["plan", "-json", "-input=false", "-out=tfplan"],
                (25, 40),
            )
            .await?;
            self.terraform_step(
                terraform,
                "apply",
                &["apply", "-json", "-input=false", "-auto-approve", "tfplan"],
                (40, 80),
            )
            .await
        })
        .await?;
        let outputs = terraform.outputs().await?;
        {
            let mut d = self.deployment.lock().await;
            if let Some(id) = outputs.get("instance_id").and_then(Value::as_str) {
                d.record.instance_id = Some(id.to_string());
            }
            d.record.server_ip = outputs
                .get("public_ip")
                .or_else(|| outputs.get("private_ip"))
                .and_then(Value::as_str)
                .filter(|ip| !ip.is_empty())
                .map(str::to_string);
            d.record.outputs = outputs;
            d.record.registration_deadline = Some(
                Utc::now()
                    + chrono::Duration::from_std(self.cp.config.registration_timeout)
                        .unwrap_or_else(|_| chrono::Duration::minutes(10)),
            );
            d.status = DeploymentStatus::Registering;
        }
        self.save().await?;
        self.event("status", json!({ "status": DeploymentStatus::Registering }))
            .await;
        Ok(())
    }

    /// Waits for the agent to enroll with the bootstrap token and report.
    async fn register(&self) -> Result<(), JobError> {
        let result = self
            .step("registration", 80, 100, self.await_registration())
            .await;
        match result {
            Ok(()) => {
                {
                    let mut d = self.deployment.lock().await;
                    d.bootstrap_token_sealed = None;
                }
                self.set_status(DeploymentStatus::Completed).await?;
                crate::events::emit_deployment(
                    &self.cp,
                    &*self.deployment.lock().await,
                    "infrastructure.provisioning.completed",
                )
                .await;
                Ok(())
            }
            Err(JobError::LeaseLost) => Err(JobError::LeaseLost),
            Err(e) => self.fail(e.to_string()).await,
        }
    }

    async fn await_registration(&self) -> Result<(), JobError> {
        let deadline = self
            .deployment
            .lock()
            .await
            .record
            .registration_deadline
            .unwrap_or_else(Utc::now);
        let mut seen_events = 0i64;
        loop {
            for event in self
                .cp
                .store
                .deployment_events(self.id, seen_events, 500)
                .await?
            {
                seen_events = event.seq;
                if event.kind != "boot_stage" {
                    continue;
                }
                if let Ok(stage) = serde_json::from_value::<crate::store::BootStage>(event.body) {
                    let failed = stage.stage == "failed";
                    let why = format!(
                        "the server's bootstrap failed at step {}: {}",
                        stage.step.as_deref().unwrap_or("unknown"),
                        stage.detail.as_deref().unwrap_or("no detail")
                    );
                    self.deployment.lock().await.record.boot_stages.push(stage);
                    if failed {
                        return Err(JobError::Registration(why));
                    }
                }
            }
            if let Some((server, reported)) = self.cp.store.deployment_server(self.id).await? {
                let newly = {
                    let mut d = self.deployment.lock().await;
                    let newly = d.server_id.is_none();
                    d.server_id = Some(server.id);
                    newly
                };
                if newly {
                    self.save().await?;
                    self.event(
                        "log",
                        json!({ "level": "info", "message": format!("agent enrolled as server {} ({})", server.id, server.name) }),
                    )
                    .await;
                }
                if reported {
                    return Ok(());
                }
            }
            if Utc::now() >= deadline {
                let d = self.deployment.lock().await;
                let last_stage = d
                    .record
                    .boot_stages
                    .last()
                    .map(|s| s.stage.clone())
                    .unwrap_or_else(|| "none reported".into());
                return Err(JobError::Registration(match d.server_id {
                    Some(_) => format!(
                        "registration timed out after {}: the agent enrolled but never reported metrics",
                        humantime::format_duration(self.cp.config.registration_timeout)
                    ),
                    None => format!(
                        "registration timed out after {}: the agent never enrolled (last boot stage: {last_stage})",
                        humantime::format_duration(self.cp.config.registration_timeout)
                    ),
                }));
            }
            tokio::select! {
                _ = self.cp.shutdown.cancelled() => return Err(JobError::LeaseLost),
                _ = tokio::time::sleep(REGISTRATION_POLL) => {}
            }
        }
    }

    /// Records the failure and rolls back.
    async fn fail(&self, error: String) -> Result<(), JobError> {
        tracing::warn!(error = %error, "deployment failed; rolling back");
        {
            let mut d = self.deployment.lock().await;
            d.record.error_message = Some(error.clone());
            d.bootstrap_token_sealed = None;
        }
        self.event("log", json!({ "level": "error", "message": error }))
            .await;
        self.set_status(DeploymentStatus::RollingBack).await?;
        self.roll_back().await
    }

    /// Destroys what a failed deployment made (its token expired first, so
    /// a late agent cannot enroll); the deployment ends `failed`.
    async fn roll_back(&self) -> Result<(), JobError> {
        self.cp
            .store
            .expire_deployment_token(self.id, Utc::now())
            .await?;
        self.tear_down("rollback").await?;
        self.set_status(DeploymentStatus::Failed).await?;
        crate::events::emit_deployment(
            &self.cp,
            &*self.deployment.lock().await,
            "infrastructure.provisioning.failed",
        )
        .await;
        Ok(())
    }

    /// `DELETE`: destroys the server; the deployment ends `destroyed`.
    async fn destroy_requested(&self) -> Result<(), JobError> {
        crate::events::emit_deployment(
            &self.cp,
            &*self.deployment.lock().await,
            "infrastructure.destroying.started",
        )
        .await;
        self.tear_down("destroy").await?;
        let leftovers = !self
            .deployment
            .lock()
            .await
            .record
            .leftover_resources
            .is_empty();
        if leftovers {
            // Stay destroyable: an admin can retry once the cause is fixed.
            self.set_status(DeploymentStatus::Failed).await?;
            return Ok(());
        }
        self.delete_server_data().await?;
        self.set_status(DeploymentStatus::Destroyed).await?;
        crate::events::emit_deployment(
            &self.cp,
            &*self.deployment.lock().await,
            "infrastructure.destroying.completed",
        )
        .await;
        Ok(())
    }

    /// After a successful destroy asked with `delete_server_data`: the
    /// server's metrics, rollups, container reports, health results and
    /// alert conditions are deleted (idempotent, so a resumed job does it
    /// again harmlessly).
    async fn delete_server_data(&self) -> Result<(), JobError> {
        let (wanted, server_id) = {
            let d = self.deployment.lock().await;
            (d.record.delete_server_data, d.server_id)
        };
        let Some(server_id) = server_id.filter(|_| wanted) else {
            return Ok(());
        };
        let rows = self.cp.store.delete_server_data(server_id).await?;
        self.event(
            "log",
            json!({ "level": "info", "message": format!("server data deleted: {rows} rows of server {server_id} (metrics, rollups, containers, health results, alert conditions)") }),
        )
        .await;
        tracing::info!(%server_id, rows, "server data deleted after destroy");
        Ok(())
    }

    /// `terraform destroy`, then the server is revoked and removed and the
    /// state emptied; what destroy could not remove is recorded.
    async fn tear_down(&self, step_name: &str) -> Result<(), JobError> {
        let dir = workdir(&self.cp, self.id);
        let has_state = self
            .cp
            .store
            .terraform_state(self.id)
            .await?
            .and_then(|s| s.state_sealed)
            .is_some();
        let mut destroyed = true;
        if has_state {
            // A fresh working dir if the old one is gone (another replica).
            self.render().await?;
            let terraform = match self.terraform(true).await {
                Ok(terraform) => terraform,
                Err(JobError::Credential(why)) => {
                    // The credential was deleted (forced) or cannot be read:
                    // terraform cannot run. What the state still holds stays
                    // in the cloud and is listed; the state is kept.
                    return self.tear_down_impossible(step_name, &why).await;
                }
                Err(e) => return Err(e),
            };
            let terraform_ref = &terraform;
            let init = self
                .retrying(|| {
                    self.terraform_step(
                        terraform_ref,
                        "init",
                        &["init", "-input=false", "-no-color"],
                        (0, 0),
                    )
                })
                .await;
            let result = match init {
                Ok(()) => {
                    self.retrying(|| {
                        self.terraform_step(
                            terraform_ref,
                            step_name,
                            &["destroy", "-json", "-input=false", "-auto-approve"],
                            (0, 0),
                        )
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                if matches!(e, JobError::LeaseLost) {
                    return Err(e);
                }
                destroyed = false;
                let leftovers = terraform.state_list().await.unwrap_or_default();
                let mut d = self.deployment.lock().await;
                d.record.leftover_resources = leftovers;
                let message = format!("{step_name} failed: {e}");
                d.record.error_message = Some(match d.record.error_message.take() {
                    Some(first) if step_name == "rollback" => format!("{first}; {message}"),
                    _ => message,
                });
            }
        }
        if destroyed {
            self.deployment
                .lock()
                .await
                .record
                .leftover_resources
                .clear();
            self.cp
                .store
                .write_terraform_state(self.id, None, None, Utc::now())
                .await?;
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, dir = %dir.display(), "could not remove the working directory");
                }
            }
        }
        self.remove_server().await?;
        self.save().await
    }

    /// A teardown terraform cannot run for (no usable credential): the
    /// resources the state holds are recorded as left over (the state is
    /// kept so a later destroy can still remove them), the server removed.
    async fn tear_down_impossible(&self, step_name: &str, why: &str) -> Result<(), JobError> {
        let leftovers = self.state_resources().await?;
        let message = format!("{step_name} failed: cloud credential: {why}");
        self.event("log", json!({ "level": "error", "message": message }))
            .await;
        if leftovers.is_empty() {
            // Nothing was created: there is nothing to destroy.
            self.cp
                .store
                .write_terraform_state(self.id, None, None, Utc::now())
                .await?;
        } else {
            let mut d = self.deployment.lock().await;
            d.record.error_message = Some(match d.record.error_message.take() {
                Some(first) if step_name == "rollback" => format!("{first}; {message}"),
                _ => message,
            });
            d.record.leftover_resources = leftovers;
        }
        self.remove_server().await?;
        self.save().await
    }

    /// The addresses of the resources in the deployment's current state,
    /// read from the state the control plane holds.
    async fn state_resources(&self) -> Result<Vec<String>, JobError> {
        let Some(sealed) = self
            .cp
            .store
            .terraform_state(self.id)
            .await?
            .and_then(|s| s.state_sealed)
        else {
            return Ok(Vec::new());
        };
        let plain = self
            .cp
            .sealer
            .open(&sealed, &crate::store::terraform_state_context(self.id))
            .map_err(|e| JobError::Bootstrap(format!("opening the state: {e}")))?;
        Ok(resource_addresses(&plain))
    }

    /// Revokes and removes the server the deployment made, if it enrolled.
    async fn remove_server(&self) -> Result<(), JobError> {
        let (organization_id, server_id) = {
            let d = self.deployment.lock().await;
            (d.organization_id, d.server_id)
        };
        let server_id = match server_id {
            Some(id) => Some(id),
            None => self
                .cp
                .store
                .deployment_server(self.id)
                .await?
                .map(|(s, _)| s.id),
        };
        if let Some(server_id) = server_id {
            let scope = self.cp.store.organization_scope(organization_id).await?;
            if self
                .cp
                .store
                .remove_server(&scope, server_id, Utc::now())
                .await?
            {
                self.cp.sessions.disconnect(server_id, CloseCode::Revoked);
                tracing::info!(%server_id, "server of the deployment removed and revoked");
            }
        }
        Ok(())
    }
}

/// The root module: the `http` backend (configured through `TF_HTTP_*`
/// environment variables) and one call of the target's module.
fn root_module(variables: &Map<String, Value>) -> String {
    let mut out = String::from(
        "# Written by tether for one deployment; regenerated on every run.\n\
         terraform {\n  backend \"http\" {}\n}\n\n",
    );
    for name in FIXED_VARIABLES {
        let sensitive = if name == "user_data" {
            "\n  sensitive = true"
        } else {
            ""
        };
        out.push_str(&format!("variable \"{name}\" {{{sensitive}\n}}\n\n"));
    }
    for name in variables.keys() {
        out.push_str(&format!("variable \"{name}\" {{\n}}\n\n"));
    }
    out.push_str("module \"server\" {\n  source = \"./module\"\n");
    for name in FIXED_VARIABLES
        .iter()
        .copied()
        .chain(variables.keys().map(String::as_str))
    {
        out.push_str(&format!("  {name} = var.{name}\n"));
    }
    out.push_str("}\n");
    for output in ["instance_id", "public_ip", "private_ip"] {
        out.push_str(&format!(
            "\noutput \"{output}\" {{\n  value = module.server.{output}\n}}\n"
        ));
    }
    out
}

/// The addresses (`module.server.terraform_data.server`, `data.x.y`, ...) of
/// the resources in a Terraform state document; none when it does not parse.
pub fn resource_addresses(state: &[u8]) -> Vec<String> {
    let Ok(state) = serde_json::from_slice::<Value>(state) else {
        return Vec::new();
    };
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    state
        .get("resources")
        .and_then(Value::as_array)
        .map(|resources| {
            resources
                .iter()
                .filter_map(|r| {
                    let (kind, name) = (text(r, "type")?, text(r, "name")?);
                    let mut address = text(r, "module").map(|m| m + ".").unwrap_or_default();
                    if text(r, "mode").as_deref() == Some("data") {
                        address.push_str("data.");
                    }
                    Some(format!("{address}{kind}.{name}"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a `terraform_variables` name can be a module input.
pub fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !FIXED_VARIABLES.contains(&name)
}

/// Subnet of the `docker` target's bridge network unless the deployment's
/// `docker_subnet` variable says otherwise (the module's default).
pub const DOCKER_DEFAULT_SUBNET: &str = "172.31.250.0/24";

/// The API URL and QUIC address a deployment's server reaches this control
/// plane at. Containers of the `docker` target see this machine as their
/// bridge network's gateway (the module's `host_address` output: the first
/// address of `docker_subnet`), on the ports the control plane listens on.
fn control_plane_endpoints(
    cp: &ControlPlane,
    d: &Deployment,
) -> Result<(String, String), JobError> {
    if d.provider != Provider::Docker.as_str() {
        return Ok((cp.api_url.clone(), cp.public_quic_addr.clone()));
    }
    let subnet = match d.record.variables.get("docker_subnet") {
        None => DOCKER_DEFAULT_SUBNET,
        Some(Value::String(subnet)) => subnet.as_str(),
        Some(_) => {
            return Err(JobError::Bootstrap(
                "docker_subnet must be a string like 172.31.250.0/24".into(),
            ))
        }
    };
    let gateway = bridge_gateway(subnet).ok_or_else(|| {
        JobError::Bootstrap(format!(
            "docker_subnet {subnet:?} is not an IPv4 network like 172.31.250.0/24"
        ))
    })?;
    let port = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
    };
    let (Some(api_port), Some(quic_port)) = (port(&cp.local_api_url), port(&cp.public_quic_addr))
    else {
        return Err(JobError::Bootstrap(
            "cannot tell the API and QUIC ports for the docker target".into(),
        ));
    };
    Ok((
        format!("http://{gateway}:{api_port}"),
        format!("{gateway}:{quic_port}"),
    ))
}

/// The first address of an IPv4 network `a.b.c.d/n` (what Docker gives the
/// host on a bridge network), or `None` when it is not one.
pub fn bridge_gateway(subnet: &str) -> Option<std::net::Ipv4Addr> {
    let (address, prefix) = subnet.split_once('/')?;
    let address: std::net::Ipv4Addr = address.parse().ok()?;
    let prefix: u32 = prefix.parse().ok()?;
    if !(1..=30).contains(&prefix) {
        return None;
    }
    let mask = u32::MAX << (32 - prefix);
    Some(std::net::Ipv4Addr::from((u32::from(address) & mask) + 1))
}

fn write_workdir(dir: &Path, d: &Deployment, templates_dir: Option<&Path>) -> std::io::Result<()> {
    crate::fsutil::create_private_dir(dir)?;
    super::templates::write_module_for(&d.provider, &dir.join("module"), templates_dir)?;
    std::fs::write(dir.join("main.tf"), root_module(&d.record.variables))?;
    let mut vars = d.record.variables.clone();
    vars.insert("server_name".into(), json!(d.record.server_name));
    vars.insert("region".into(), json!(d.record.region));
    vars.insert("instance_type".into(), json!(d.record.instance_type));
    vars.insert("tags".into(), json!(d.record.tags));
    let text = serde_json::to_string_pretty(&vars).map_err(std::io::Error::other)?;
    crate::fsutil::write_private(&dir.join("terraform.tfvars.json"), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_module_passes_fixed_and_extra_variables_to_the_module() {
        let mut extra = Map::new();
        extra.insert("disk_size_gb".into(), json!(20));
        let text = root_module(&extra);
        assert!(text.contains("backend \"http\" {}"));
        assert!(text.contains("  disk_size_gb = var.disk_size_gb\n"));
        assert!(text.contains("  user_data = var.user_data\n"));
        assert!(text.contains("variable \"user_data\" {\n  sensitive = true\n}"));
    }

    #[test]
    fn variable_names_are_identifiers_and_not_fixed_inputs() {
        assert!(valid_variable_name("disk_size_gb"));
        assert!(!valid_variable_name("user_data"));
        assert!(!valid_variable_name("a\"}\nresource"));
        assert!(!valid_variable_name("1abc"));
    }

    #[test]
    fn the_docker_bridge_gateway_is_the_first_address_of_the_subnet() {
        assert_eq!(
            bridge_gateway(DOCKER_DEFAULT_SUBNET),
            Some(std::net::Ipv4Addr::new(172, 31, 250, 1))
        );
        assert_eq!(
            bridge_gateway("10.9.8.77/16"),
            Some(std::net::Ipv4Addr::new(10, 9, 0, 1))
        );
        assert_eq!(bridge_gateway("10.9.8.0"), None);
        assert_eq!(bridge_gateway("10.9.8.0/33"), None);
        assert_eq!(bridge_gateway("fd00::/64"), None);
    }

    #[test]
    fn the_docker_default_subnet_is_the_modules_default() {
        let files = crate::provision::templates::module_files("docker").expect("docker module");
        let variables = files
            .iter()
            .find(|(name, _)| *name == "variables.tf")
            .map(|(_, text)| *text)
            .expect("variables.tf");
        assert!(variables.contains(&format!("default     = \"{DOCKER_DEFAULT_SUBNET}\"")));
    }

    #[test]
    fn retry_delays_double_with_jitter_and_stop_at_five_minutes() {
        let base = Duration::from_secs(10);
        assert_eq!(retry_delay(base, 1, 1.0), Duration::from_secs(10));
        assert_eq!(retry_delay(base, 1, 0.0), Duration::from_secs(5));
        assert_eq!(retry_delay(base, 2, 1.0), Duration::from_secs(20));
        assert_eq!(retry_delay(base, 3, 1.0), Duration::from_secs(40));
        assert_eq!(retry_delay(base, 30, 1.0), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(base, 30, 0.0), MAX_RETRY_DELAY / 2);
        let jittered = retry_delay(base, 2, 0.3);
        assert!(jittered > Duration::from_secs(10) && jittered < Duration::from_secs(20));
    }

    #[test]
    fn resource_addresses_name_module_data_and_managed_resources() {
        let state = json!({
            "version": 4,
            "resources": [
                { "module": "module.server", "mode": "managed", "type": "terraform_data", "name": "server" },
                { "mode": "data", "type": "hcloud_image", "name": "debian" },
            ]
        });
        assert_eq!(
            resource_addresses(state.to_string().as_bytes()),
            vec![
                "module.server.terraform_data.server".to_string(),
                "data.hcloud_image.debian".to_string()
            ]
        );
        assert!(resource_addresses(b"not json").is_empty());
    }

    #[test]
    fn backend_passwords_differ_per_deployment_and_key() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        assert_eq!(backend_password(b"k", a), backend_password(b"k", a));
        assert_ne!(backend_password(b"k", a), backend_password(b"k", b));
        assert_ne!(backend_password(b"k", a), backend_password(b"j", a));
    }
}
