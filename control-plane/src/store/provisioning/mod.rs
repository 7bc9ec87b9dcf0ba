//! Domain types of provisioning as the store keeps them: cloud credentials
//! (sealed), deployments (each one a persisted job with a lease), their
//! event log, and Terraform state behind the HTTP backend with its lock.
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite
//! (`control-plane/tests/store_provisioning.rs`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::row::StoreRow;
use super::{NewEnrollmentToken, Server, StoreError, StoreResult};

mod postgres;
mod sqlite;

/// A cloud account's credentials; the secret part is sealed and never leaves
/// the control plane except as environment variables of a terraform process.
#[derive(Debug, Clone)]
pub struct CloudCredential {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub provider: String,
    pub default_region: Option<String>,
    /// The credential fields (JSON object) sealed under the master key with
    /// [`cloud_credential_context`].
    pub credentials_sealed: String,
    pub is_validated: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// The outcome of the last validation since the fields last changed.
    pub validation: CredentialValidation,
    /// When the credential was last changed (`PATCH`), if ever.
    pub updated_at: Option<DateTime<Utc>>,
}

/// What the last validation of a credential found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ValidationStatus {
    /// Never validated since created or since its fields last changed.
    #[default]
    Unvalidated,
    Valid,
    Invalid,
}

impl ValidationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unvalidated => "unvalidated",
            Self::Valid => "valid",
            Self::Invalid => "invalid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Unvalidated, Self::Valid, Self::Invalid]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// The stored outcome of a credential's validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialValidation {
    pub status: ValidationStatus,
    /// When it was validated (`None` while unvalidated).
    pub at: Option<DateTime<Utc>>,
    /// What was wrong (at most [`MAX_VALIDATION_ERROR`] characters, never a
    /// credential value).
    pub error: Option<String>,
}

/// Longest `validation_error` kept.
pub const MAX_VALIDATION_ERROR: usize = 500;

/// A change of a credential (`PATCH`): what is `Some` is replaced. New
/// fields reset the validation to unvalidated.
#[derive(Debug, Clone)]
pub struct CredentialUpdate {
    pub name: Option<String>,
    pub default_region: Option<String>,
    /// The merged fields sealed again, and the sealed value they replace
    /// (the update is refused when the stored value changed meanwhile).
    pub credentials_sealed: Option<(String, String)>,
    pub at: DateTime<Utc>,
}

/// The outcome of an update.
#[derive(Debug, Clone)]
pub enum CredentialUpdateOutcome {
    Updated(Box<CloudCredential>),
    /// No live credential with that id in scope.
    NotFound,
    /// Its fields changed since they were read.
    Changed,
}

/// The outcome of a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialDeletion {
    /// Deleted (its sealed fields erased); the live deployments that used it
    /// (only when forced), at most `limit` ids, and how many there were.
    Deleted {
        orphaned: Vec<Uuid>,
        orphaned_count: u64,
    },
    /// No live credential with that id in scope.
    NotFound,
    /// Not forced and live deployments use it: at most `limit` of their ids
    /// (oldest first) and how many there are.
    InUse {
        deployment_ids: Vec<Uuid>,
        count: u64,
    },
}

/// A state to write, with what is kept about it as a version.
#[derive(Debug, Clone)]
pub struct StateWrite {
    /// The state sealed with [`terraform_state_context`] (the current state).
    pub state_sealed: String,
    /// Id of the version row, and the state sealed with
    /// [`terraform_state_version_context`] of that id.
    pub version_id: Uuid,
    pub version_sealed: String,
    /// Lowercase hex SHA-256 of the plaintext.
    pub sha256: String,
    pub size_bytes: i64,
    /// Terraform's `serial` in the state, when it has one.
    pub serial: Option<i64>,
    /// Set when the write restores that version.
    pub restored_from: Option<i64>,
}

/// One kept version of a deployment's state (its content stays sealed).
#[derive(Debug, Clone, PartialEq)]
pub struct TerraformStateVersion {
    pub id: Uuid,
    pub deployment_id: Uuid,
    /// 1, 2, ... per deployment.
    pub version: i64,
    pub sha256: String,
    pub size_bytes: i64,
    pub serial: Option<i64>,
    pub restored_from: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// How many versions of a state are kept.
pub const STATE_VERSIONS_KEPT: i64 = 10;

/// Sealing context of a kept version of a Terraform state.
pub fn terraform_state_version_context(version_id: Uuid) -> String {
    format!("terraform-state-version/{version_id}")
}

/// Sealing context of a cloud credential.
pub fn cloud_credential_context(id: Uuid) -> String {
    format!("cloud-credential/{id}")
}

/// Sealing context of a deployment's Terraform state.
pub fn terraform_state_context(deployment_id: Uuid) -> String {
    format!("terraform-state/{deployment_id}")
}

/// Sealing context of a deployment's bootstrap token.
pub fn bootstrap_token_context(deployment_id: Uuid) -> String {
    format!("deployment/{deployment_id}/bootstrap-token")
}

/// Where a deployment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    /// Queued; no worker has claimed it yet.
    Pending,
    /// `terraform init/plan/apply` is running.
    Provisioning,
    /// Applied; waiting for the agent to enroll and report.
    Registering,
    /// The agent enrolled and reported.
    Completed,
    /// A failed apply or registration is being destroyed.
    RollingBack,
    /// Failed (and rolled back); `error_message` says why.
    Failed,
    /// `DELETE` asked for: `terraform destroy` is running (or queued).
    Destroying,
    /// Destroyed; the server is removed.
    Destroyed,
    /// The organization's approval policy caught it: nothing runs until a
    /// holder of `infrastructure:approve` approves it (then `pending`).
    PendingApproval,
    /// An approver rejected it; nothing ran.
    Rejected,
    /// Nobody decided within `--approval-ttl`; nothing ran.
    Expired,
}

impl DeploymentStatus {
    pub const ALL: [Self; 11] = [
        Self::Pending,
        Self::Provisioning,
        Self::Registering,
        Self::Completed,
        Self::RollingBack,
        Self::Failed,
        Self::Destroying,
        Self::Destroyed,
        Self::PendingApproval,
        Self::Rejected,
        Self::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Provisioning => "provisioning",
            Self::Registering => "registering",
            Self::Completed => "completed",
            Self::RollingBack => "rolling_back",
            Self::Failed => "failed",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::PendingApproval => "pending_approval",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// Statuses a worker drives (a job exists for them).
    pub const ACTIVE: [Self; 5] = [
        Self::Pending,
        Self::Provisioning,
        Self::Registering,
        Self::RollingBack,
        Self::Destroying,
    ];

    /// Whether a worker still has something to do.
    pub fn is_active(self) -> bool {
        Self::ACTIVE.contains(&self)
    }

    /// Whether the deployment may still hold cloud resources, or will once
    /// approved, and so needs its credential (every status but `destroyed`,
    /// and `rejected` and `expired`, which never ran).
    pub fn uses_credential(self) -> bool {
        !matches!(self, Self::Destroyed | Self::Rejected | Self::Expired)
    }
    /// Statuses whose server runs (or is on its way, or still being
    /// removed): what quotas and the committed cost count.
    pub const COMMITTED: [Self; 6] = [
        Self::Pending,
        Self::Provisioning,
        Self::Registering,
        Self::Completed,
        Self::RollingBack,
        Self::Destroying,
    ];

    /// Whether the deployment's size counts against quotas.
    pub fn is_committed(self) -> bool {
        Self::COMMITTED.contains(&self)
    }
}

/// A deployment's size and list price, from the instance catalog when it
/// was requested.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DeploymentSize {
    pub vcpus: i64,
    /// Memory in GB as the catalog states it.
    pub memory_gb: f64,
    pub hourly_usd: f64,
}

impl DeploymentSize {
    /// Memory as quotas count it: whole GiB, rounded up per server.
    pub fn quota_memory_gb(&self) -> i64 {
        // A catalog's memory is at most 65536 GB: the cast cannot overflow.
        self.memory_gb.ceil().max(0.0) as i64
    }
}

/// Who asked for a deployment the approval policy caught, and what was
/// decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalRecord {
    /// The API token that asked.
    pub requested_by_token: Uuid,
    /// The audit actor of that token (`token:<id>`).
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    /// When it expires unless decided.
    pub expires_at: DateTime<Utc>,
    /// Why the policy caught it.
    pub reason: String,
    /// `approved`, `rejected` or `expired` once decided.
    pub decision: Option<String>,
    pub decided_by_token: Option<Uuid>,
    pub decided_at: Option<DateTime<Utc>>,
    pub comment: Option<String>,
}

/// Resources a request adds, checked against every limited ancestor.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Demand {
    pub servers: i64,
    pub cpu_cores: i64,
    pub memory_gb: i64,
    pub monthly_cost_usd: f64,
}

impl Demand {
    /// What `servers` servers of catalog size `size` add: its vCPUs, its
    /// memory in whole GB (rounded up per server) and its list price over a
    /// month (`catalog::HOURS_PER_MONTH`).
    pub fn of(size: DeploymentSize, servers: i64) -> Self {
        Self {
            servers,
            cpu_cores: size.vcpus.saturating_mul(servers),
            memory_gb: size.quota_memory_gb().saturating_mul(servers),
            monthly_cost_usd: size.hourly_usd * crate::catalog::HOURS_PER_MONTH * servers as f64,
        }
    }
}

/// What an organization's approval policy asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalPolicy {
    /// `always` or `never` (then only the conditions below apply).
    pub require: String,
    /// Provisions whose monthly estimate is above this need approval.
    pub above_monthly_usd: Option<f64>,
    /// Provisions with one of these providers need approval.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Provisions in one of these regions need approval.
    #[serde(default)]
    pub regions: Vec<String>,
    pub updated_at: DateTime<Utc>,
}

/// The state of one step of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Running,
    Succeeded,
    Failed,
}

/// One step (`init`, `plan`, `apply`, `registration`, `destroy`...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentStep {
    pub name: String,
    pub status: StepStatus,
    pub started_at: DateTime<Utc>,
    /// Set once the step ended.
    pub duration_seconds: Option<f64>,
}

/// A boot stage the server's bootstrap reported (`downloaded`, `installed`,
/// `docker_installed`, `started`, or `failed` with the failing step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BootStage {
    pub stage: String,
    pub step: Option<String>,
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

/// What a deployment's job knows, kept as one document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub region: String,
    pub instance_type: String,
    pub server_name: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Extra (non-secret) module inputs from the request.
    #[serde(default)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub steps: Vec<DeploymentStep>,
    pub current_step: Option<String>,
    #[serde(default)]
    pub progress_percent: u8,
    pub instance_id: Option<String>,
    pub server_ip: Option<String>,
    /// Non-sensitive module outputs.
    #[serde(default)]
    pub outputs: serde_json::Map<String, serde_json::Value>,
    pub error_message: Option<String>,
    /// Resources a destroy could not remove (ids or addresses).
    #[serde(default)]
    pub leftover_resources: Vec<String>,
    #[serde(default)]
    pub boot_stages: Vec<BootStage>,
    pub registration_deadline: Option<DateTime<Utc>>,
    /// How many times a worker started on this deployment (resumes count).
    #[serde(default)]
    pub attempts: u32,
    /// Retries of transient Terraform failures over the deployment's life
    /// (provisioning, rollback and destroy).
    #[serde(default)]
    pub retry_count: u32,
    /// Retries of the step failing now (reset when it succeeds); kept so a
    /// resumed job does not start its budget again.
    #[serde(default)]
    pub step_retries: u32,
    /// When the next retry is due, while the job waits for it (a resumed job
    /// waits until then).
    #[serde(default)]
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Whether the server's user-data installs Docker Engine.
    #[serde(default)]
    pub install_docker: bool,
    /// Set by a destroy asked with `delete_server_data`: once destroyed, the
    /// server's metrics, rollups, container reports, health results and alert
    /// conditions are deleted.
    #[serde(default)]
    pub delete_server_data: bool,
    /// Catalog size and list price when it was requested.
    #[serde(default)]
    pub size: Option<DeploymentSize>,
    /// The batch (`count` on the request) it belongs to.
    #[serde(default)]
    pub batch_id: Option<Uuid>,
    /// Set when the approval policy caught it.
    #[serde(default)]
    pub approval: Option<ApprovalRecord>,
}

/// A deployment row.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub provider: String,
    pub credential_id: Option<Uuid>,
    pub status: DeploymentStatus,
    pub server_id: Option<Uuid>,
    pub record: DeploymentRecord,
    /// Sealed with [`bootstrap_token_context`] while the job may render its
    /// user-data again; `None` once the deployment settled.
    pub bootstrap_token_sealed: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// One entry of a deployment's event log (served over SSE).
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentEvent {
    pub seq: i64,
    pub deployment_id: Uuid,
    pub at: DateTime<Utc>,
    /// `status`, `step`, `log`, `boot_stage` or `retry`.
    pub kind: String,
    pub body: serde_json::Value,
}

/// A deployment's Terraform state as the HTTP backend stores it.
#[derive(Debug, Clone, Default)]
pub struct TerraformStateRecord {
    /// Sealed with [`terraform_state_context`]; `None` when empty.
    pub state_sealed: Option<String>,
    pub lock_id: Option<String>,
    /// The holder's LockInfo as terraform sent it.
    pub lock_info: Option<serde_json::Value>,
}

/// Outcome of a state write or a lock request.
#[derive(Debug, Clone, PartialEq)]
pub enum LockOutcome {
    Done,
    /// Someone else holds the lock: here is their LockInfo.
    HeldBy(serde_json::Value),
}

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait ProvisioningStore: Send + Sync {
    async fn create_cloud_credential(&self, credential: &CloudCredential) -> StoreResult<()>;

    /// A live credential of an organization in `scope`.
    async fn cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
    ) -> StoreResult<Option<CloudCredential>>;

    /// Live credentials of the organizations in `scope`, oldest first.
    async fn list_cloud_credentials(&self, scope: &[Uuid]) -> StoreResult<Vec<CloudCredential>>;

    /// Records the outcome of a validation (and `at` as last use).
    async fn mark_cloud_credential(
        &self,
        id: Uuid,
        validated: Option<bool>,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Soft-deletes a credential; `false` when there was none in `scope`.
    async fn delete_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Changes a live credential of `scope` (see [`CredentialUpdate`]).
    async fn update_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        update: &CredentialUpdate,
    ) -> StoreResult<CredentialUpdateOutcome>;

    /// Stores the outcome of a validation (and `validation.at` as last use).
    async fn record_cloud_credential_validation(
        &self,
        id: Uuid,
        validation: &CredentialValidation,
    ) -> StoreResult<()>;

    /// Live deployments (every status but `destroyed`) that use a
    /// credential: at most `limit` ids, oldest first, and their count.
    async fn deployments_using_credential(
        &self,
        credential_id: Uuid,
        limit: u32,
    ) -> StoreResult<(Vec<Uuid>, u64)>;

    /// Soft-deletes a credential of `scope` unless live deployments use it
    /// (checked in the same statement), or whatever uses it when `force`.
    /// Listed ids are at most `limit`.
    async fn delete_unused_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        force: bool,
        limit: u32,
        at: DateTime<Utc>,
    ) -> StoreResult<CredentialDeletion>;

    /// Moves a deployment of `scope` from one of `from` to `destroying`,
    /// recording whether the server's data goes too. `false` when it was not
    /// in one of `from`.
    async fn request_destroy(
        &self,
        scope: &[Uuid],
        id: Uuid,
        from: &[DeploymentStatus],
        delete_server_data: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Stores a new deployment and its bootstrap token in one transaction.
    async fn create_deployment(
        &self,
        deployment: &Deployment,
        token: &NewEnrollmentToken,
    ) -> StoreResult<()>;

    /// A deployment; `scope` `None` is the control plane's own view.
    async fn deployment(&self, scope: Option<&[Uuid]>, id: Uuid)
        -> StoreResult<Option<Deployment>>;

    /// Deployments of `scope`, newest first, after `cursor` (an id).
    async fn list_deployments(
        &self,
        scope: &[Uuid],
        limit: u32,
        cursor: Option<Uuid>,
    ) -> StoreResult<Vec<Deployment>>;

    /// Claims one active deployment whose lease is free or expired: the
    /// worker holds it until `lease_until` (renewed by
    /// [`ProvisioningStore::save_deployment`]). Oldest first.
    async fn claim_deployment(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Deployment>>;

    /// Writes a claimed deployment back and extends the lease (released when
    /// the status is no longer active). `false` when `worker` lost the lease.
    async fn save_deployment(
        &self,
        deployment: &Deployment,
        worker: &str,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Moves a deployment in `scope` from one of `from` to `to` (API
    /// transitions such as a destroy request). `false` when it was not in
    /// one of `from`.
    async fn transition_deployment(
        &self,
        scope: &[Uuid],
        id: Uuid,
        from: &[DeploymentStatus],
        to: DeploymentStatus,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    async fn append_deployment_event(
        &self,
        deployment_id: Uuid,
        at: DateTime<Utc>,
        kind: &str,
        body: &serde_json::Value,
    ) -> StoreResult<i64>;

    /// Events of a deployment after `after_seq`, oldest first.
    async fn deployment_events(
        &self,
        deployment_id: Uuid,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<DeploymentEvent>>;

    /// The hash of a deployment's bootstrap token.
    async fn deployment_token_hash(&self, deployment_id: Uuid) -> StoreResult<Option<String>>;

    /// Stores new deployments (a batch: all or none) with their bootstrap
    /// tokens (`None` for one waiting for approval) in one transaction, after
    /// checking, under locks of the limited ancestors, that the organization
    /// and every ancestor can take `demand` on top of what their committed
    /// deployments (catalog sizes) and servers use.
    async fn create_deployments_within_quota(
        &self,
        deployments: &[(Deployment, Option<NewEnrollmentToken>)],
        demand: &Demand,
    ) -> StoreResult<Result<(), super::quota::QuotaExceeded>>;

    /// Moves a deployment from `pending_approval` to `pending` with its new
    /// record and sealed bootstrap token, and stores the token, after the
    /// same quota check as [`Self::create_deployments_within_quota`].
    /// `Ok(false)`: it was not waiting for approval (any more).
    async fn approve_deployment_within_quota(
        &self,
        approved: &Deployment,
        token: &NewEnrollmentToken,
        demand: &Demand,
    ) -> StoreResult<Result<bool, super::quota::QuotaExceeded>>;

    /// Ends a deployment waiting for approval in `to` (`rejected` or
    /// `expired`) with its new record; `false` when it was no longer waiting.
    async fn close_pending_deployment(
        &self,
        closed: &Deployment,
        to: DeploymentStatus,
    ) -> StoreResult<bool>;

    /// Every deployment waiting for approval, oldest first.
    async fn pending_approvals(&self) -> StoreResult<Vec<Deployment>>;

    /// Deployments of a batch in `scope`, by server name order of creation.
    async fn batch_deployments(
        &self,
        scope: &[Uuid],
        batch_id: Uuid,
    ) -> StoreResult<Vec<Deployment>>;

    /// Every deployment (live or not) of the organizations in `scope`
    /// created before `before`, oldest first (cost reports).
    async fn deployments_created_before(
        &self,
        scope: &[Uuid],
        before: DateTime<Utc>,
    ) -> StoreResult<Vec<Deployment>>;

    /// An organization's own approval policy.
    async fn approval_policy(&self, organization_id: Uuid) -> StoreResult<Option<ApprovalPolicy>>;

    /// Sets (replaces) an organization's approval policy.
    async fn set_approval_policy(
        &self,
        organization_id: Uuid,
        policy: &ApprovalPolicy,
    ) -> StoreResult<()>;

    /// Makes a deployment's unused bootstrap token unusable.
    async fn expire_deployment_token(
        &self,
        deployment_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// The live server that enrolled with a deployment's token, and whether
    /// it has reported metrics.
    async fn deployment_server(&self, deployment_id: Uuid) -> StoreResult<Option<(Server, bool)>>;

    async fn terraform_state(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Option<TerraformStateRecord>>;

    /// Writes (`Some`) or empties (`None`) a state, refused while another
    /// holder's lock is on it (`lock_id` is the writer's lock, if any).
    async fn write_terraform_state(
        &self,
        deployment_id: Uuid,
        state_sealed: Option<&str>,
        lock_id: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome>;

    /// Writes a state terraform sent and keeps it as the deployment's next
    /// version (the last [`STATE_VERSIONS_KEPT`] are kept), refused while
    /// another holder's lock is on it.
    async fn write_terraform_state_version(
        &self,
        deployment_id: Uuid,
        state: &StateWrite,
        lock_id: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome>;

    /// The kept versions of a deployment's state, newest first.
    async fn terraform_state_versions(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Vec<TerraformStateVersion>>;

    /// One kept version and its content, sealed with
    /// [`terraform_state_version_context`] of its id.
    async fn terraform_state_version(
        &self,
        deployment_id: Uuid,
        version: i64,
    ) -> StoreResult<Option<(TerraformStateVersion, String)>>;

    /// Takes the state lock unless someone holds it.
    async fn lock_terraform_state(
        &self,
        deployment_id: Uuid,
        lock_id: &str,
        info: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome>;

    /// Releases the lock if `lock_id` holds it (`None`: whoever holds it).
    async fn unlock_terraform_state(
        &self,
        deployment_id: Uuid,
        lock_id: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome>;
}

/// A `cloud_credentials` row.
pub(crate) fn credential_from_row(row: &impl StoreRow) -> StoreResult<CloudCredential> {
    Ok(CloudCredential {
        id: row.id("id")?,
        organization_id: row.id("organization_id")?,
        name: row.text("name")?,
        provider: row.text("provider")?,
        default_region: row.opt_text("default_region")?,
        credentials_sealed: row.text("credentials_sealed")?,
        is_validated: row.flag("is_validated")?,
        created_at: row.time("created_at")?,
        last_used_at: row.opt_time("last_used_at")?,
        validation: CredentialValidation {
            status: ValidationStatus::parse(&row.text("validation_status")?).ok_or_else(|| {
                StoreError::Corrupt("invalid credential validation status".into())
            })?,
            at: row.opt_time("validated_at")?,
            error: row.opt_text("validation_error")?,
        },
        updated_at: row.opt_time("updated_at")?,
    })
}

/// A `terraform_state_versions` row (without its content).
pub(crate) fn state_version_from_row(row: &impl StoreRow) -> StoreResult<TerraformStateVersion> {
    Ok(TerraformStateVersion {
        id: row.id("id")?,
        deployment_id: row.id("deployment_id")?,
        version: row.int("version")?,
        sha256: row.text("sha256")?,
        size_bytes: row.int("size_bytes")?,
        serial: row.opt_int("serial")?,
        restored_from: row.opt_int("restored_from")?,
        created_at: row.time("created_at")?,
    })
}

/// A `deployments` row.
pub(crate) fn deployment_from_row(row: &impl StoreRow) -> StoreResult<Deployment> {
    let status = row.text("status")?;
    Ok(Deployment {
        id: row.id("id")?,
        organization_id: row.id("organization_id")?,
        provider: row.text("provider")?,
        credential_id: row.opt_id("credential_id")?,
        status: DeploymentStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("invalid deployment status {status:?}")))?,
        server_id: row.opt_id("server_id")?,
        record: row.json("record")?,
        bootstrap_token_sealed: row.opt_text("bootstrap_token_sealed")?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
        completed_at: row.opt_time("completed_at")?,
    })
}
