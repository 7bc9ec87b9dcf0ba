//! `/api/v1/infrastructure`: provisioning requests, deployments and their
//! progress (JSON and SSE), destroy, force-unlock of a stale state lock, and
//! the boot-stage reports of servers being bootstrapped.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Page};
use crate::auth::Scope;
use crate::catalog::{CostEstimate, LookupError};
use crate::context::ControlPlane;
use crate::enrollment::token_hash;
use crate::provision::bootstrap::BootStageReport;
use crate::provision::credentials::Provider;
use crate::provision::job::valid_variable_name;
use crate::store::{
    ApprovalRecord, BootStage, Demand, Deployment, DeploymentRecord, DeploymentSize,
    DeploymentStatus, DeploymentStep,
};

/// A provisioning request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    /// The stored credential to use (not needed for `local` and `docker`);
    /// one of the deployment's own organization.
    pub cloud_provider_credential_id: Option<Uuid>,
    /// aws, digitalocean, hetzner, gcp, azure, local or docker (`local` and
    /// `docker` only when the operator enabled host targets, and only for
    /// the root organization).
    pub provider: String,
    #[schema(min_length = 1, max_length = 64)]
    pub region: String,
    #[schema(min_length = 1, max_length = 64)]
    pub instance_type: String,
    /// Becomes the server's name (letters, digits, `-` and `.`, 1-63).
    #[schema(min_length = 1, max_length = 63)]
    pub server_name: String,
    /// Tags on the cloud resources; also the server's labels.
    #[serde(default)]
    #[schema(value_type = std::collections::HashMap<String, String>)]
    pub tags: crate::store::Labels,
    /// Extra (non-secret) inputs of the target's module that callers may
    /// set, e.g. `image`, `disk_size_gb`, `ssh_public_keys`; each target
    /// declares its own list (docs/provisioning-templates.md).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub terraform_variables: Map<String, Value>,
    /// Organization the server joins (default: the caller's).
    pub organization_id: Option<Uuid>,
    /// Install Docker Engine from the distribution's packages before the
    /// agent starts (boot stage `docker_installed`). Default: on for the
    /// cloud targets; `local` and `docker` run on the control-plane host
    /// and refuse it (422, `reason: install_docker_not_supported`).
    pub install_docker: Option<bool>,
    /// Servers to create, 1-20: `server_name-1` … `server_name-N`, each
    /// its own deployment of one batch, checked against quotas together
    /// (all or none). Absent: one server named `server_name`.
    #[schema(minimum = 1, maximum = 20)]
    pub count: Option<u32>,
}

/// Most servers one request creates (`count`).
pub const MAX_BATCH: u32 = 20;

/// A queued deployment.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProvisionAccepted {
    pub deployment_id: Uuid,
    /// `pending`, or `pending_approval` when the approval policy caught it.
    pub status: DeploymentStatus,
    /// SSE stream of the deployment's steps and log lines.
    pub monitor_url: String,
    /// List price of the server (catalog; monthly = hourly × 730).
    pub cost_estimate: CostEstimate,
}

/// A queued batch (`count` on the request).
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAccepted {
    pub batch_id: Uuid,
    /// One deployment per server, `server_name-1` first.
    pub deployment_ids: Vec<Uuid>,
    /// `pending`, or `pending_approval` when the approval policy caught it.
    pub status: DeploymentStatus,
    /// List price of the whole batch (catalog; monthly = hourly × 730).
    pub cost_estimate: CostEstimate,
}

/// The answer to a provision: one deployment, or a batch when `count` was
/// given.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ProvisionAnswer {
    One(ProvisionAccepted),
    Batch(BatchAccepted),
}

/// A step of a deployment as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    pub name: String,
    pub status: crate::store::StepStatus,
    pub started_at: DateTime<Utc>,
    pub duration_seconds: Option<f64>,
}

impl From<DeploymentStep> for StepView {
    fn from(s: DeploymentStep) -> Self {
        Self {
            name: s.name,
            status: s.status,
            started_at: s.started_at,
            duration_seconds: s.duration_seconds,
        }
    }
}

/// A deployment.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentView {
    pub deployment_id: Uuid,
    pub organization_id: Uuid,
    pub provider: String,
    pub region: String,
    pub instance_type: String,
    pub server_name: String,
    pub status: DeploymentStatus,
    pub progress_percent: u8,
    pub current_step: Option<String>,
    pub steps: Vec<StepView>,
    pub server_id: Option<Uuid>,
    pub server_ip: Option<String>,
    pub instance_id: Option<String>,
    /// Non-sensitive outputs of the module.
    #[schema(value_type = Object)]
    pub outputs: Map<String, Value>,
    /// What went wrong (terraform's diagnostic, a boot failure, a timeout).
    pub error_message: Option<String>,
    /// Stages the server's bootstrap reported.
    pub boot_stages: Vec<BootStage>,
    /// Resources a rollback or destroy could not remove.
    pub leftover_resources: Vec<String>,
    /// Retries of transient Terraform failures (rate limits, timeouts,
    /// connection errors, 5xx from the provider's API, a held state lock)
    /// so far; each is also a `retry` event.
    pub retry_count: u32,
    /// When the next retry is due, while the job waits for one.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Whether the server's user-data installs Docker Engine.
    pub install_docker: bool,
    /// Whether the control plane holds a Terraform state for it.
    pub state_present: bool,
    /// Who holds the state lock (terraform's LockInfo), if anyone.
    #[schema(value_type = Option<Object>)]
    pub state_lock: Option<Value>,
    /// The newest kept version of the Terraform state (the current state
    /// while `state_present`): its number and checksum, never its content.
    pub state_version: Option<StateVersionView>,
    /// The cloud credential its terraform runs use (read at each run).
    pub cloud_provider_credential_id: Option<Uuid>,
    /// Whether the destroy asked for deletes the server's data once done.
    pub delete_server_data: bool,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// List price of the server from the catalog when it was requested
    /// (monthly = hourly × 730); absent for deployments from before the
    /// catalog.
    pub cost_estimate: Option<CostEstimate>,
    /// vCPUs and memory (GB) from the catalog: what quotas count.
    pub vcpus: Option<i64>,
    pub memory_gb: Option<f64>,
    /// The batch it belongs to (`count` on the request).
    pub batch_id: Option<Uuid>,
    /// Who asked and what was decided, when the approval policy caught it.
    pub approval: Option<ApprovalRecord>,
}

/// A kept version of a deployment's Terraform state (never its content).
#[derive(Debug, Serialize, ToSchema)]
pub struct StateVersionView {
    /// 1, 2, ... per deployment.
    pub version: i64,
    /// Terraform's `serial` in that state.
    pub serial: Option<i64>,
    /// Lowercase hex SHA-256 of the state document.
    pub sha256: String,
    pub size_bytes: i64,
    /// The version this one restored, when it was made by a restore.
    pub restored_from: Option<i64>,
    pub created_at: DateTime<Utc>,
}

impl From<crate::store::TerraformStateVersion> for StateVersionView {
    fn from(v: crate::store::TerraformStateVersion) -> Self {
        Self {
            version: v.version,
            serial: v.serial,
            sha256: v.sha256,
            size_bytes: v.size_bytes,
            restored_from: v.restored_from,
            created_at: v.created_at,
        }
    }
}

impl From<Deployment> for DeploymentView {
    fn from(d: Deployment) -> Self {
        let DeploymentRecord {
            region,
            instance_type,
            server_name,
            steps,
            current_step,
            progress_percent,
            instance_id,
            server_ip,
            outputs,
            error_message,
            leftover_resources,
            boot_stages,
            retry_count,
            next_retry_at,
            install_docker,
            delete_server_data,
            size,
            batch_id,
            approval,
            ..
        } = d.record;
        Self {
            deployment_id: d.id,
            organization_id: d.organization_id,
            provider: d.provider,
            region,
            instance_type,
            server_name,
            status: d.status,
            progress_percent,
            current_step,
            steps: steps.into_iter().map(Into::into).collect(),
            server_id: d.server_id,
            server_ip,
            instance_id,
            outputs,
            error_message,
            boot_stages,
            leftover_resources,
            retry_count,
            next_retry_at,
            install_docker,
            state_present: false,
            state_lock: None,
            state_version: None,
            cloud_provider_credential_id: d.credential_id,
            delete_server_data,
            created_at: d.created_at,
            completed_at: d.completed_at,
            cost_estimate: size.map(|s| CostEstimate::of(s.hourly_usd, 1)),
            vcpus: size.map(|s| s.vcpus),
            memory_gb: size.map(|s| s.memory_gb),
            batch_id,
            approval,
        }
    }
}

impl DeploymentView {
    /// The view with what the state backend holds.
    pub(crate) async fn with_state(mut self, cp: &ControlPlane) -> Result<Self, ApiError> {
        if let Some(state) = cp.store.terraform_state(self.deployment_id).await? {
            self.state_present = state.state_sealed.is_some();
            self.state_lock = state.lock_id.map(|_| state.lock_info.unwrap_or_default());
        }
        self.state_version = cp
            .store
            .terraform_state_versions(self.deployment_id)
            .await?
            .into_iter()
            .next()
            .map(Into::into);
        Ok(self)
    }
}

fn valid_server_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn valid_short_text(text: &str) -> bool {
    !text.trim().is_empty() && text.len() <= 64 && !super::extract::has_control_chars(text)
}

/// Whether `caller` may provision a target that runs on the control-plane
/// host (`local`, `docker`) into `organization_id`: only when the operator
/// enabled them (`--enable-host-targets`), and only the root organization,
/// for itself (a server on this host is as good as a shell on it for
/// whoever may run commands there).
fn host_target_allowed(
    cp: &ControlPlane,
    caller: &Caller,
    provider: Provider,
    organization_id: Uuid,
) -> Result<(), ApiError> {
    if !cp.config.enable_host_targets {
        return Err(ApiError::forbidden(format!(
            "the {} target runs servers on the control-plane host and is off; the operator enables it with tether serve --enable-host-targets",
            provider.as_str()
        ))
        .with_detail("reason", "host_targets_disabled")
        .with_detail("provider", provider.as_str()));
    }
    let root = cp.instance.root_organization_id;
    if caller.organization_id != root || organization_id != root {
        return Err(ApiError::forbidden(format!(
            "the {} target runs servers on the control-plane host: only the root organization may use it, for itself",
            provider.as_str()
        ))
        .with_detail("reason", "host_targets_root_only")
        .with_detail("provider", provider.as_str()));
    }
    Ok(())
}

/// Queues a deployment: checks scopes, the provider, the credential, the
/// organization's quota, then stores the deployment with a one-time bootstrap
/// token bound to it. Needs `infrastructure:provision`.
#[utoipa::path(
    post,
    path = "/infrastructure/provision",
    operation_id = "provision_server",
    tag = "provisioning",
    request_body(content = ProvisionRequest, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Queued (`pending`) or waiting for approval (`pending_approval`), with `cost_estimate`: one deployment, or `{batch_id, deployment_ids, status, cost_estimate}` when `count` was given.", body = ProvisionAnswer),
        (status = 400, description = "`invalid_request`: malformed JSON.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: missing scope or provider not allowed, or a host target (`local`, `docker`) that is off (`reason: host_targets_disabled`) or asked for by or for an organization other than the root (`reason: host_targets_root_only`); `quota_exceeded`: the organization or an ancestor has no room for the server(s): `max_servers`, or `max_cpu_cores`, `max_memory_gb`, `max_monthly_cost_usd` counted from the catalog (`resource` names it; a batch is refused whole).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization or credential.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: unknown provider, credential of another provider or of another organization (`reason: credential_of_another_organization`), invalid name or tags, a variable the target does not let callers set (`reason: variable_not_settable`, `variable` names it) or an invalid one, a region or instance type the catalog does not list (`reason: unknown_region` / `unknown_instance_type`, `nearest` lists the closest names), `count` outside 1-20, `install_docker` for `local` or `docker` (`reason: install_docker_not_supported`).", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn provision(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<ProvisionRequest>,
) -> Result<(StatusCode, Json<ProvisionAnswer>), ApiError> {
    caller.require(Scope::InfrastructureProvision)?;
    let organization_id = body.organization_id.unwrap_or(caller.organization_id);
    if !caller.sees(organization_id) {
        return Err(ApiError::not_found("no such organization"));
    }
    let provider =
        Provider::parse(&body.provider).map_err(|e| ApiError::validation(e.to_string()))?;
    if let Some(allowed) = &cp.config.allowed_providers {
        if !allowed.iter().any(|p| p == provider.as_str()) {
            return Err(ApiError::forbidden(format!(
                "provider {} is not allowed on this control plane (allowed: {})",
                provider.as_str(),
                allowed.join(", ")
            )));
        }
    }
    if provider.runs_on_this_machine() {
        host_target_allowed(&cp, &caller, provider, organization_id)?;
    }
    if !valid_server_name(&body.server_name) {
        return Err(ApiError::validation(
            "server_name must be 1-63 letters, digits, '-' or '.', starting with a letter or digit",
        ));
    }
    if !valid_short_text(&body.region) || !valid_short_text(&body.instance_type) {
        return Err(ApiError::validation(
            "region and instance_type must be 1-64 printable characters",
        ));
    }
    let count = body.count.unwrap_or(1);
    if !(1..=MAX_BATCH).contains(&count) {
        return Err(ApiError::validation(format!("count must be 1-{MAX_BATCH}"))
            .with_detail("max_count", MAX_BATCH));
    }
    let names: Vec<String> = match body.count {
        None => vec![body.server_name.clone()],
        Some(n) => (1..=n)
            .map(|i| format!("{}-{i}", body.server_name))
            .collect(),
    };
    if names.iter().any(|n| !valid_server_name(n)) {
        return Err(ApiError::validation(format!(
            "server_name with its batch suffix (-1 … -{count}) must be at most 63 characters"
        )));
    }
    super::enrollment_tokens::validate_labels(&body.tags)?;
    let settable = crate::provision::templates::api_variables(provider.as_str());
    for (name, value) in &body.terraform_variables {
        if !valid_variable_name(name) {
            return Err(ApiError::validation(format!(
                "terraform_variables: {:?} is not a module input name (lowercase identifier, not server_name/region/instance_type/tags/user_data)",
                name.chars().take(64).collect::<String>()
            ))
            .with_detail("variable", name.chars().take(64).collect::<String>()));
        }
        if !settable.contains(&name.as_str()) {
            return Err(ApiError::validation(format!(
                "terraform_variables: {name} cannot be set through the API for the {} target (settable: {})",
                provider.as_str(),
                settable.join(", ")
            ))
            .with_detail("reason", "variable_not_settable")
            .with_detail("variable", name.as_str()));
        }
        if value.is_null() || value.to_string().len() > 16 * 1024 {
            return Err(ApiError::validation(format!(
                "terraform_variables: {name} must be a non-null value under 16 KiB"
            ))
            .with_detail("variable", name.as_str()));
        }
        if value.to_string().contains('\0') {
            return Err(ApiError::validation(format!(
                "terraform_variables: {name} contains a NUL character"
            ))
            .with_detail("variable", name.as_str()));
        }
    }
    let install_docker = body
        .install_docker
        .unwrap_or(!provider.runs_on_this_machine());
    if install_docker && provider.runs_on_this_machine() {
        return Err(ApiError::validation(format!(
            "install_docker is not available for the {} target: its servers run on the control-plane host, whose software the operator manages",
            provider.as_str()
        ))
        .with_detail("reason", "install_docker_not_supported")
        .with_detail("provider", provider.as_str()));
    }
    if provider == Provider::Docker
        && (cp.config.api_listen.ip().is_loopback() || cp.config.quic_listen.ip().is_loopback())
    {
        return Err(ApiError::validation(
            "the docker target's containers reach the control plane through their bridge network's gateway: start tether serve with --api-listen and --quic-listen on 0.0.0.0 (or the gateway address)",
        ));
    }
    let credential_id = match (
        provider.needs_credential(),
        body.cloud_provider_credential_id,
    ) {
        (true, None) => {
            return Err(ApiError::validation(format!(
                "provider {} needs cloud_provider_credential_id",
                provider.as_str()
            )))
        }
        (_, Some(id)) => {
            use crate::provision::credentials::{credential_for_deployment, CredentialUseError};
            let credential = credential_for_deployment(
                &*cp.store,
                organization_id,
                id,
                &caller.visible_organizations,
            )
            .await
            .map_err(|e| match e {
                CredentialUseError::Missing { .. } => {
                    ApiError::not_found("no such cloud credential")
                }
                CredentialUseError::OtherOrganization { owner, .. } => {
                    ApiError::validation(e.to_string())
                        .with_detail("reason", "credential_of_another_organization")
                        .with_detail("credential_organization_id", owner.to_string())
                }
                CredentialUseError::Store(e) => ApiError::from(e),
            })?;
            if credential.provider != provider.as_str() {
                return Err(ApiError::validation(format!(
                    "cloud credential {id} is for {}, not {}",
                    credential.provider,
                    provider.as_str()
                )));
            }
            Some(id)
        }
        (false, None) => None,
    };
    let size = cp
        .catalog
        .lookup(provider.as_str(), &body.region, &body.instance_type)
        .map_err(catalog_refusal)?;
    let size = DeploymentSize {
        vcpus: i64::from(size.vcpus),
        memory_gb: size.memory_gb,
        hourly_usd: size.hourly_usd,
    };
    let cost_estimate = CostEstimate::of(size.hourly_usd, count);
    let demand = Demand::of(size, i64::from(count));
    let approval_reason = crate::approval::reason(
        &*cp.store,
        organization_id,
        provider.as_str(),
        &body.region,
        cost_estimate.monthly_usd,
    )
    .await?;
    let now = Utc::now();
    let approval = approval_reason.as_ref().map(|reason| ApprovalRecord {
        requested_by_token: caller.token_id,
        requested_by: caller.actor(),
        requested_at: now,
        expires_at: now
            + chrono::Duration::from_std(cp.config.approval_ttl)
                .unwrap_or_else(|_| chrono::Duration::hours(72)),
        reason: reason.clone(),
        decision: None,
        decided_by_token: None,
        decided_at: None,
        comment: None,
    });
    let batch_id = body.count.map(|_| Uuid::now_v7());
    let deployments: Vec<_> = names
        .iter()
        .map(|name| {
            crate::provision::job::new_deployment(
                &cp,
                organization_id,
                provider,
                credential_id,
                DeploymentRecord {
                    region: body.region.clone(),
                    instance_type: body.instance_type.clone(),
                    server_name: name.clone(),
                    tags: body.tags.clone(),
                    variables: body.terraform_variables.clone(),
                    size: Some(size),
                    batch_id,
                    approval: approval.clone(),
                    install_docker,
                    ..DeploymentRecord::default()
                },
                approval.is_some(),
            )
        })
        .collect();
    // Quotas (servers, and CPU, memory and monthly cost from the catalog) of
    // the organization and every ancestor, checked in the transaction that
    // stores the whole batch: all or nothing. A request that waits for
    // approval is checked now and again when approved.
    cp.store
        .create_deployments_within_quota(&deployments, &demand)
        .await??;
    let status = deployments
        .first()
        .map_or(DeploymentStatus::Pending, |(d, _)| d.status);
    let ids: Vec<Uuid> = deployments.iter().map(|(d, _)| d.id).collect();
    if approval.is_none() {
        cp.provision_wakeup.notify_one();
    }
    for (d, _) in &deployments {
        tracing::info!(deployment_id = %d.id, provider = provider.as_str(), server_name = %d.record.server_name, status = d.status.as_str(), "deployment queued");
        caller
            .audit(
                &cp,
                organization_id,
                "infrastructure.provision",
                d.id.to_string(),
                serde_json::json!({
                    "provider": provider.as_str(),
                    "region": body.region,
                    "instance_type": body.instance_type,
                    "server_name": d.record.server_name,
                    "batch_id": batch_id,
                    "status": d.status,
                    "approval_reason": approval_reason,
                    "cost_estimate": CostEstimate::of(size.hourly_usd, 1),
                    "install_docker": install_docker,
                }),
            )
            .await;
        if approval.is_some() {
            crate::events::emit_deployment(&cp, d, "infrastructure.approval.requested").await;
        }
    }
    let answer = match (batch_id, ids.first()) {
        (Some(batch_id), _) => ProvisionAnswer::Batch(BatchAccepted {
            batch_id,
            deployment_ids: ids,
            status,
            cost_estimate,
        }),
        (None, Some(&id)) => ProvisionAnswer::One(ProvisionAccepted {
            deployment_id: id,
            status,
            monitor_url: format!(
                "{}/api/v1/infrastructure/deployments/{id}/events",
                cp.api_url
            ),
            cost_estimate,
        }),
        (None, None) => return Err(ApiError::internal("a provision created no deployment")),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// A catalog miss as the API answers it: 422 with the nearest names.
fn catalog_refusal(e: LookupError) -> ApiError {
    let message = e.to_string();
    match e {
        LookupError::Provider(_) => ApiError::validation(message),
        LookupError::Region { nearest, .. } => ApiError::validation(message)
            .with_detail("reason", "unknown_region")
            .with_detail("nearest", nearest),
        LookupError::InstanceType { nearest, .. } => ApiError::validation(message)
            .with_detail("reason", "unknown_instance_type")
            .with_detail("nearest", nearest),
    }
}

/// Paging of the deployment list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeploymentListQuery {
    /// Page size, 1-500 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only the deployments of this batch (all of them, in one page).
    pub batch_id: Option<Uuid>,
}

/// Lists deployments of the caller's organization tree, newest first (with
/// `batch_id`: that batch's, first server first).
#[utoipa::path(
    get,
    path = "/infrastructure/deployments",
    operation_id = "list_deployments",
    tag = "provisioning",
    params(DeploymentListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of deployments.", body = Page<DeploymentView>),
        (status = 400, description = "`invalid_request`: bad limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(query): ApiQuery<DeploymentListQuery>,
) -> Result<Json<Page<DeploymentView>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    if let Some(batch_id) = query.batch_id {
        let batch = cp
            .store
            .batch_deployments(&caller.visible_organizations, batch_id)
            .await?;
        return Ok(Json(Page {
            data: batch.into_iter().map(Into::into).collect(),
            next_cursor: None,
        }));
    }
    let limit = super::extract::page_limit(query.limit, 100, 500)?;
    let cursor = super::extract::page_cursor::<Uuid>(query.cursor.as_deref())?;
    let page = cp
        .store
        .list_deployments(&caller.visible_organizations, limit, cursor)
        .await?;
    let next_cursor = (page.len() == limit as usize)
        .then(|| page.last().map(|d| d.id.to_string()))
        .flatten();
    Ok(Json(Page {
        data: page.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

pub(crate) async fn visible_deployment(
    cp: &ControlPlane,
    caller: &Caller,
    id: Uuid,
) -> Result<Deployment, ApiError> {
    cp.store
        .deployment(Some(&caller.visible_organizations), id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such deployment"))
}

/// One deployment: status, steps with durations, outputs, errors.
#[utoipa::path(
    get,
    path = "/infrastructure/deployments/{id}",
    operation_id = "get_deployment",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Deployment id.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The deployment.", body = DeploymentView),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn get(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let view = DeploymentView::from(visible_deployment(&cp, &caller, id).await?);
    Ok(Json(view.with_state(&cp).await?))
}

/// Options of a destroy.
#[derive(Debug, Default, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DestroyOptions {
    /// Destroy even while commands run on the server.
    #[serde(default)]
    pub force: bool,
    /// Once destroyed, also delete what the server reported: its metrics,
    /// rollups, container reports, health results and alert conditions
    /// (default: kept, readable as history of a removed server).
    #[serde(default)]
    pub delete_server_data: bool,
}

/// Destroys a deployment's server: `terraform destroy`, certificate revoked,
/// session closed, server removed (soft); with `delete_server_data`, the
/// server's reported data is deleted once the destroy succeeded. Needs
/// `infrastructure:destroy`.
#[utoipa::path(
    delete,
    path = "/infrastructure/deployments/{id}",
    operation_id = "destroy_deployment",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Deployment id."), DestroyOptions),
    request_body(content = Option<DestroyOptions>, content_type = "application/json", description = "`{force?, delete_server_data?}` (also accepted as query parameters)."),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Destroy queued (or already under way / done).", body = DeploymentView),
        (status = 400, description = "`invalid_request`: malformed body or id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `infrastructure:destroy`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`conflict`: the deployment is still being provisioned or rolled back, or commands are queued or running on its server (without `force`).", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: `force` or `delete_server_data` is not a boolean, or an unknown field.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn destroy(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<DestroyOptions>,
    body: Bytes,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    caller.require(Scope::InfrastructureDestroy)?;
    let options: DestroyOptions = if body.iter().all(u8::is_ascii_whitespace) {
        DestroyOptions::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::validation(format!("invalid body: {e}")),
            _ => ApiError::invalid_request(format!("invalid JSON body: {e}")),
        })?
    };
    let force = options.force || query.force;
    let delete_server_data = options.delete_server_data || query.delete_server_data;
    let deployment = visible_deployment(&cp, &caller, id).await?;
    match deployment.status {
        DeploymentStatus::Destroying | DeploymentStatus::Destroyed => {
            let view = DeploymentView::from(deployment).with_state(&cp).await?;
            return Ok((StatusCode::ACCEPTED, Json(view)));
        }
        DeploymentStatus::Completed | DeploymentStatus::Failed => {}
        other => {
            return Err(ApiError::conflict(format!(
                "the deployment is {}; destroy it once it completed or failed",
                other.as_str()
            ))
            .with_detail("status", other.as_str()))
        }
    }
    if let (false, Some(server_id)) = (force, deployment.server_id) {
        let active = cp.store.active_commands_on_server(server_id).await?;
        if active > 0 {
            return Err(ApiError::conflict(format!(
                "{active} command(s) are queued or running on the deployment's server; \
                 cancel them or pass force"
            ))
            .with_detail("active_commands", active)
            .with_detail("server_id", server_id.to_string()));
        }
    }
    let moved = cp
        .store
        .request_destroy(
            &caller.visible_organizations,
            id,
            &[DeploymentStatus::Completed, DeploymentStatus::Failed],
            delete_server_data,
            Utc::now(),
        )
        .await?;
    if !moved {
        return Err(ApiError::conflict(
            "the deployment changed status; try again",
        ));
    }
    cp.provision_wakeup.notify_one();
    caller
        .audit(
            &cp,
            deployment.organization_id,
            "infrastructure.destroy",
            id.to_string(),
            serde_json::json!({
                "force": force,
                "delete_server_data": delete_server_data,
                "server_id": deployment.server_id,
            }),
        )
        .await;
    let view = DeploymentView::from(visible_deployment(&cp, &caller, id).await?);
    Ok((StatusCode::ACCEPTED, Json(view.with_state(&cp).await?)))
}

/// Releases the Terraform state lock of a deployment whatever holds it (a
/// run that died). Needs `infrastructure:destroy`.
#[utoipa::path(
    delete,
    path = "/infrastructure/deployments/{id}/lock",
    operation_id = "force_unlock_deployment_state",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Deployment id.")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "The state is unlocked."),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn force_unlock(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::InfrastructureDestroy)?;
    let deployment = visible_deployment(&cp, &caller, id).await?;
    let holder = cp
        .store
        .terraform_state(id)
        .await?
        .and_then(|s| s.lock_info);
    cp.store
        .unlock_terraform_state(id, None, Utc::now())
        .await?;
    caller
        .audit(
            &cp,
            deployment.organization_id,
            "infrastructure.force_unlock",
            id.to_string(),
            serde_json::json!({ "holder": holder }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// How long an SSE watcher waits between looks at the event log.
const SSE_POLL: Duration = Duration::from_millis(200);

/// The deployment's steps, log lines, boot stages and status changes as
/// server-sent events (`event:` the kind, `id:` the sequence number, `data:`
/// JSON). Resumes after `Last-Event-ID`; ends once the deployment settled.
#[utoipa::path(
    get,
    path = "/infrastructure/deployments/{id}/events",
    operation_id = "deployment_events",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Deployment id.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "An SSE stream (`text/event-stream`) of `status`, `step`, `log`, `boot_stage` and `retry` (`{step, retry, max_retries, reason, error, delay_seconds}`) events.", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn events(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    visible_deployment(&cp, &caller, id).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    struct Cursor {
        cp: Arc<ControlPlane>,
        id: Uuid,
        after: i64,
        finished: bool,
    }
    let stream = futures::stream::unfold(
        Cursor {
            cp,
            id,
            after,
            finished: false,
        },
        |mut cursor| async move {
            loop {
                if cursor.finished {
                    return None;
                }
                let batch = cursor
                    .cp
                    .store
                    .deployment_events(cursor.id, cursor.after, 200)
                    .await
                    .ok()?;
                if let Some(last) = batch.last() {
                    cursor.after = last.seq;
                    return Some((sse_events(batch), cursor));
                }
                let settled = cursor
                    .cp
                    .store
                    .deployment(None, cursor.id)
                    .await
                    .ok()
                    .flatten()
                    .is_none_or(|d| !d.status.is_active());
                if settled {
                    // One more look: events written just before settling.
                    cursor.finished = true;
                    let tail = cursor
                        .cp
                        .store
                        .deployment_events(cursor.id, cursor.after, 200)
                        .await
                        .ok()?;
                    if tail.is_empty() {
                        return None;
                    }
                    cursor.after = tail.last().map_or(cursor.after, |e| e.seq);
                    return Some((sse_events(tail), cursor));
                }
                tokio::select! {
                    _ = cursor.cp.shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(SSE_POLL) => {}
                }
            }
        },
    );
    use futures::StreamExt;
    Ok(Sse::new(stream.flatten()).keep_alive(KeepAlive::default()))
}

/// Deployment events as SSE events.
fn sse_events(
    batch: Vec<crate::store::DeploymentEvent>,
) -> futures::stream::Iter<std::vec::IntoIter<Result<Event, Infallible>>> {
    futures::stream::iter(
        batch
            .into_iter()
            .map(|e| {
                Ok(Event::default()
                    .event(e.kind)
                    .id(e.seq.to_string())
                    .data(e.body.to_string()))
            })
            .collect::<Vec<_>>(),
    )
}

/// Records a boot stage a server's bootstrap reached (`downloaded`,
/// `installed`, `docker_installed`, `started`) or where it failed. Authenticated by the
/// deployment's bootstrap token in the body (never in a URL or header a
/// proxy might log).
#[utoipa::path(
    post,
    path = "/infrastructure/boot-stages",
    operation_id = "report_boot_stage",
    tag = "provisioning",
    request_body(content = Object, content_type = "application/json", description = "`{deployment_id, token, stage: downloaded|installed|docker_installed|started|failed, step?, detail?}`"),
    responses(
        (status = 204, description = "Recorded."),
        (status = 400, description = "`invalid_request`: malformed JSON.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: unknown deployment or wrong token.", body = ErrorBody),
        (status = 409, description = "`conflict`: the deployment is no longer being provisioned.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: wrong types or unknown stage.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn boot_stage(
    State(cp): State<Arc<ControlPlane>>,
    ApiJson(report): ApiJson<BootStageReport>,
) -> Result<StatusCode, ApiError> {
    let refused = || ApiError::unauthorized("unknown deployment or wrong bootstrap token");
    let id = Uuid::parse_str(&report.deployment_id).map_err(|_| refused())?;
    let expected = cp
        .store
        .deployment_token_hash(id)
        .await?
        .ok_or_else(refused)?;
    if !subtle_eq(expected.as_bytes(), token_hash(&report.token).as_bytes()) {
        return Err(refused());
    }
    let deployment = cp.store.deployment(None, id).await?.ok_or_else(refused)?;
    if !matches!(
        deployment.status,
        DeploymentStatus::Pending | DeploymentStatus::Provisioning | DeploymentStatus::Registering
    ) {
        return Err(ApiError::conflict(format!(
            "deployment is {}",
            deployment.status.as_str()
        )));
    }
    let clean = |text: Option<String>, max: usize| {
        text.map(|t| {
            t.chars()
                .filter(|c| !c.is_control())
                .take(max)
                .collect::<String>()
        })
    };
    let stage = BootStage {
        stage: report.stage.as_str().into(),
        step: clean(report.step, 32),
        detail: clean(report.detail, 500),
        at: Utc::now(),
    };
    tracing::info!(deployment_id = %id, stage = %stage.stage, step = ?stage.step, detail = ?stage.detail, "boot stage");
    cp.store
        .append_deployment_event(
            id,
            stage.at,
            "boot_stage",
            &serde_json::to_value(&stage).map_err(ApiError::internal)?,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Equality of two byte strings in time independent of where they differ.
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
