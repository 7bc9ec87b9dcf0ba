//! Provisioning governance over HTTP: the instance catalog
//! (`/infrastructure/catalog`), organizations' approval policies (inherited
//! from the nearest ancestor that has one) and the decisions on deployments
//! they caught (`approve`, `reject`), and the cost report of an organization
//! over a period (an estimate from deployment lifetimes and catalog prices).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::infrastructure::{visible_deployment, DeploymentView};
use crate::auth::Scope;
use crate::catalog::{ProviderCatalog, HOURS_PER_MONTH};
use crate::context::ControlPlane;
use crate::provision::credentials::Provider;
use crate::store::{ApprovalPolicy, Demand, Deployment, DeploymentStatus};

/// Longest approval comment.
const MAX_COMMENT: usize = 1000;
/// Most providers or regions a policy lists.
const MAX_POLICY_ENTRIES: usize = 100;
/// Longest cost-report period.
const MAX_REPORT_DAYS: i64 = 366;

/// Which provider's catalog to show.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CatalogQuery {
    /// One provider (`aws`, `gcp`, ...); absent: every provider.
    pub provider: Option<String>,
}

/// The instance catalog: per provider, its source and date, regions and
/// instance types with vCPUs, memory (GB) and hourly list price (USD).
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogView {
    pub providers: BTreeMap<String, ProviderCatalog>,
    /// Monthly estimates are hourly × this.
    pub hours_per_month: f64,
}

/// The instance catalog provisions are checked and priced against. Needs
/// `servers:read`.
#[utoipa::path(
    get,
    path = "/infrastructure/catalog",
    operation_id = "get_instance_catalog",
    tag = "provisioning",
    params(CatalogQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The catalog (the operator's `--catalog-dir` files replace the embedded ones).", body = CatalogView),
        (status = 400, description = "`invalid_request`: an unknown query parameter.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 422, description = "`validation_error`: an unknown provider.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn catalog(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(query): ApiQuery<CatalogQuery>,
) -> Result<Json<CatalogView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let all = cp.catalog.providers();
    let providers = match query.provider {
        None => all.clone(),
        Some(name) => {
            let Some(one) = cp.catalog.provider(&name) else {
                return Err(ApiError::validation(format!(
                    "no provider {:?} in the catalog (known: {})",
                    name.chars().take(64).collect::<String>(),
                    all.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            };
            BTreeMap::from([(name, one.clone())])
        }
    };
    Ok(Json(CatalogView {
        providers,
        hours_per_month: HOURS_PER_MONTH,
    }))
}

/// An approval policy as a request sets it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalPolicyRequest {
    /// `always`: every provision waits for approval; `never`: only those
    /// the conditions below catch.
    pub require: String,
    /// Provisions whose monthly estimate (USD, hourly × 730, the whole
    /// batch) is above this wait for approval.
    #[schema(minimum = 0)]
    pub above_monthly_usd: Option<f64>,
    /// Provisions with one of these providers wait for approval.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Provisions in one of these regions wait for approval.
    #[serde(default)]
    #[schema(max_items = 100)]
    pub regions: Vec<String>,
}

/// An organization's approval policy: its own (if any) and the one that
/// applies (its own, else its nearest ancestor's).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalPolicyView {
    pub organization_id: Uuid,
    /// The organization's own policy, if it set one.
    pub policy: Option<ApprovalPolicy>,
    /// The policy provisions into this organization follow.
    pub effective: Option<ApprovalPolicy>,
    /// Whose policy `effective` is.
    pub effective_from: Option<Uuid>,
}

async fn policy_view(cp: &ControlPlane, id: Uuid) -> Result<ApprovalPolicyView, ApiError> {
    let own = cp.store.approval_policy(id).await?;
    let effective = crate::approval::effective_policy(&*cp.store, id).await?;
    Ok(ApprovalPolicyView {
        organization_id: id,
        policy: own,
        effective_from: effective.as_ref().map(|(owner, _)| *owner),
        effective: effective.map(|(_, p)| p),
    })
}

/// A live organization the caller can see, or 404.
async fn visible_organization(
    cp: &ControlPlane,
    caller: &Caller,
    id: Uuid,
) -> Result<crate::store::Organization, ApiError> {
    if !caller.sees(id) {
        return Err(ApiError::not_found("no such organization"));
    }
    cp.store
        .organization(id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such organization"))
}

/// An organization's approval policy, own and effective. Any token that
/// sees the organization.
#[utoipa::path(
    get,
    path = "/organizations/{id}/approval-policy",
    operation_id = "get_approval_policy",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The policy.", body = ApprovalPolicyView),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn get_policy(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ApprovalPolicyView>, ApiError> {
    visible_organization(&cp, &caller, id).await?;
    Ok(Json(policy_view(&cp, id).await?))
}

/// Sets an organization's approval policy. Needs `admin` over it; an
/// organization's own policy is set by its parent, except the root's.
#[utoipa::path(
    put,
    path = "/organizations/{id}/approval-policy",
    operation_id = "set_approval_policy",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    request_body(content = ApprovalPolicyRequest, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The policy as stored.", body = ApprovalPolicyView),
        (status = 400, description = "`invalid_request`: malformed JSON.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `admin`, or sets its own organization's policy (only the root organization may).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: `require` not `always`/`never`, a negative or non-finite `above_monthly_usd`, an unknown provider, an invalid region, over 100 entries, or an unknown field.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn put_policy(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<ApprovalPolicyRequest>,
) -> Result<Json<ApprovalPolicyView>, ApiError> {
    caller.require(Scope::Admin)?;
    let org = visible_organization(&cp, &caller, id).await?;
    if id == caller.organization_id && org.parent_id.is_some() {
        return Err(ApiError::forbidden(
            "an organization's own approval policy is set by its parent",
        ));
    }
    if body.require != "always" && body.require != "never" {
        return Err(ApiError::validation(
            "require must be \"always\" or \"never\"",
        ));
    }
    if let Some(above) = body.above_monthly_usd {
        if !above.is_finite() || !(0.0..=1e9).contains(&above) {
            return Err(ApiError::validation(
                "above_monthly_usd must be a number from 0 to 1000000000",
            ));
        }
    }
    if body.providers.len() > MAX_POLICY_ENTRIES || body.regions.len() > MAX_POLICY_ENTRIES {
        return Err(ApiError::validation(format!(
            "providers and regions list at most {MAX_POLICY_ENTRIES} entries each"
        )));
    }
    for provider in &body.providers {
        Provider::parse(provider).map_err(|e| ApiError::validation(e.to_string()))?;
    }
    if body
        .regions
        .iter()
        .any(|r| r.trim().is_empty() || r.len() > 64 || super::extract::has_control_chars(r))
    {
        return Err(ApiError::validation(
            "each region must be 1-64 printable characters",
        ));
    }
    let policy = ApprovalPolicy {
        require: body.require,
        above_monthly_usd: body.above_monthly_usd,
        providers: body.providers,
        regions: body.regions,
        updated_at: Utc::now(),
    };
    cp.store.set_approval_policy(id, &policy).await?;
    caller
        .audit(
            &cp,
            id,
            "organization.approval_policy.set",
            id.to_string(),
            serde_json::to_value(&policy).map_err(ApiError::internal)?,
        )
        .await;
    Ok(Json(policy_view(&cp, id).await?))
}

/// What an approver says.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Why (at most 1000 characters).
    pub comment: Option<String>,
}

/// Writes an approver's verdict (`approved` or `rejected`) into the
/// deployment's approval record.
fn record_decision(
    deployment: &mut Deployment,
    verdict: &str,
    caller: &Caller,
    decision: &Decision,
    at: DateTime<Utc>,
) {
    if let Some(approval) = deployment.record.approval.as_mut() {
        approval.decision = Some(verdict.into());
        approval.decided_by_token = Some(caller.token_id);
        approval.decided_at = Some(at);
        approval.comment = decision.comment.clone();
    }
}

/// An optional JSON body (`{}` or nothing).
fn decision_of(body: &Bytes) -> Result<Decision, ApiError> {
    let decision: Decision = if body.iter().all(u8::is_ascii_whitespace) {
        Decision::default()
    } else {
        serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::validation(format!("invalid body: {e}")),
            _ => ApiError::invalid_request(format!("invalid JSON body: {e}")),
        })?
    };
    if let Some(comment) = &decision.comment {
        if comment.chars().count() > MAX_COMMENT
            || comment
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(ApiError::validation(format!(
                "comment must be at most {MAX_COMMENT} characters without control characters"
            )));
        }
    }
    Ok(decision)
}

/// The deployment waiting for approval that `caller` may decide on.
async fn decidable(
    cp: &ControlPlane,
    caller: &Caller,
    id: Uuid,
) -> Result<crate::store::Deployment, ApiError> {
    caller.require(Scope::InfrastructureApprove)?;
    let deployment = visible_deployment(cp, caller, id).await?;
    if deployment.status != DeploymentStatus::PendingApproval {
        return Err(ApiError::conflict(format!(
            "the deployment is {}, not waiting for approval",
            deployment.status.as_str()
        ))
        .with_detail("status", deployment.status.as_str()));
    }
    let Some(approval) = &deployment.record.approval else {
        return Err(ApiError::conflict("the deployment has no approval request"));
    };
    if approval.requested_by_token == caller.token_id {
        return Err(ApiError::forbidden(
            "the token that requested a deployment cannot approve or reject it",
        )
        .with_detail("reason", "approver_is_requester"));
    }
    if approval.expires_at <= Utc::now() {
        return Err(
            ApiError::conflict("the approval request expired").with_detail("status", "expired")
        );
    }
    Ok(deployment)
}

/// Approves a deployment waiting for approval: its quotas are checked
/// again, its bootstrap token minted, and it is queued (`pending`). Needs
/// `infrastructure:approve` over its organization; the requesting token
/// cannot approve its own request.
#[utoipa::path(
    post,
    path = "/infrastructure/deployments/{id}/approve",
    operation_id = "approve_deployment",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Deployment id.")),
    request_body(content = Option<Decision>, content_type = "application/json", description = "`{comment?}`"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Approved and queued.", body = DeploymentView),
        (status = 400, description = "`invalid_request`: malformed JSON or id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `infrastructure:approve`, or requested the deployment itself (`reason: approver_is_requester`); `quota_exceeded`: the organization or an ancestor no longer has room.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`conflict`: the deployment is not waiting for approval (decided or expired).", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: a comment over 1000 characters or an unknown field.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn approve(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    body: Bytes,
) -> Result<Json<DeploymentView>, ApiError> {
    let mut deployment = decidable(&cp, &caller, id).await?;
    let decision = decision_of(&body)?;
    let now = Utc::now();
    record_decision(&mut deployment, "approved", &caller, &decision, now);
    deployment.updated_at = now;
    let demand = Demand::of(deployment.record.size.unwrap_or_default(), 1);
    let token = crate::provision::job::mint_bootstrap_token(&cp, &mut deployment);
    let approved = cp
        .store
        .approve_deployment_within_quota(&deployment, &token, &demand)
        .await??;
    if !approved {
        return Err(ApiError::conflict(
            "the deployment is no longer waiting for approval",
        ));
    }
    cp.provision_wakeup.notify_one();
    caller
        .audit(
            &cp,
            deployment.organization_id,
            "infrastructure.approval.approve",
            id.to_string(),
            serde_json::json!({ "comment": decision.comment, "batch_id": deployment.record.batch_id }),
        )
        .await;
    deployment.status = DeploymentStatus::Pending;
    crate::events::emit_deployment(&cp, &deployment, "infrastructure.approval.approved").await;
    Ok(Json(DeploymentView::from(
        visible_deployment(&cp, &caller, id).await?,
    )))
}

/// Rejects a deployment waiting for approval: it ends `rejected`, and
/// nothing ever ran for it. Needs `infrastructure:approve` over its
/// organization; the requesting token cannot reject its own request.
#[utoipa::path(
    post,
    path = "/infrastructure/deployments/{id}/reject",
    operation_id = "reject_deployment",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Deployment id.")),
    request_body(content = Option<Decision>, content_type = "application/json", description = "`{comment?}`"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rejected.", body = DeploymentView),
        (status = 400, description = "`invalid_request`: malformed JSON or id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `infrastructure:approve`, or requested the deployment itself (`reason: approver_is_requester`).", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`conflict`: the deployment is not waiting for approval (decided or expired).", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: a comment over 1000 characters or an unknown field.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn reject(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    body: Bytes,
) -> Result<Json<DeploymentView>, ApiError> {
    let mut deployment = decidable(&cp, &caller, id).await?;
    let decision = decision_of(&body)?;
    let now = Utc::now();
    record_decision(&mut deployment, "rejected", &caller, &decision, now);
    deployment.updated_at = now;
    deployment.completed_at = Some(now);
    if !cp
        .store
        .close_pending_deployment(&deployment, DeploymentStatus::Rejected)
        .await?
    {
        return Err(ApiError::conflict(
            "the deployment is no longer waiting for approval",
        ));
    }
    caller
        .audit(
            &cp,
            deployment.organization_id,
            "infrastructure.approval.reject",
            id.to_string(),
            serde_json::json!({ "comment": decision.comment, "batch_id": deployment.record.batch_id }),
        )
        .await;
    deployment.status = DeploymentStatus::Rejected;
    crate::events::emit_deployment(&cp, &deployment, "infrastructure.approval.rejected").await;
    Ok(Json(DeploymentView::from(
        visible_deployment(&cp, &caller, id).await?,
    )))
}

/// The period of a cost report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CostReportQuery {
    /// Start (RFC 3339) [default: 30 days before `to`].
    pub from: Option<DateTime<Utc>>,
    /// End (RFC 3339) [default: now]; at most 366 days after `from`.
    pub to: Option<DateTime<Utc>>,
}

/// One deployment's share of a cost report.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentCost {
    pub deployment_id: Uuid,
    pub organization_id: Uuid,
    pub server_name: String,
    pub provider: String,
    pub region: String,
    pub instance_type: String,
    pub status: DeploymentStatus,
    pub batch_id: Option<Uuid>,
    pub hourly_usd: f64,
    /// When its server started costing within the period.
    pub from: DateTime<Utc>,
    /// When it stopped (destroyed, failed) or the period's end.
    pub to: DateTime<Utc>,
    pub hours: f64,
    pub cost_usd: f64,
}

/// What an organization's deployments cost over a period: an estimate.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostReport {
    pub organization_id: Uuid,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Always `true`: lifetimes × catalog list prices, not a bill.
    pub estimate: bool,
    pub currency: String,
    pub total_usd: f64,
    /// Deployments of the organization and its descendants that ran within
    /// the period.
    pub deployments: Vec<DeploymentCost>,
}

/// The cost of an organization's (and its descendants') deployments over a
/// period, from their lifetimes (started, or approved → destroyed, failed or
/// now) × the catalog's hourly list price at request time. Needs
/// `servers:read`.
#[utoipa::path(
    get,
    path = "/organizations/{id}/cost-report",
    operation_id = "get_cost_report",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id"), CostReportQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The report (`estimate: true`).", body = CostReport),
        (status = 400, description = "`invalid_request`: a malformed id or time, or an unknown parameter.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 422, description = "`validation_error`: `from` not before `to`, or a period over 366 days.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn cost_report(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<CostReportQuery>,
) -> Result<Json<CostReport>, ApiError> {
    caller.require(Scope::ServersRead)?;
    visible_organization(&cp, &caller, id).await?;
    let now = Utc::now();
    let to = query.to.unwrap_or(now);
    let from = match query.from {
        Some(from) => from,
        None => to
            .checked_sub_signed(chrono::Duration::days(30))
            .ok_or_else(|| ApiError::validation("to is too early to report on"))?,
    };
    if from >= to {
        return Err(ApiError::validation("from must be before to"));
    }
    if to - from > chrono::Duration::days(MAX_REPORT_DAYS) {
        return Err(ApiError::validation(format!(
            "the period is at most {MAX_REPORT_DAYS} days"
        )));
    }
    let scope: Vec<Uuid> = cp
        .store
        .organization_scope(id)
        .await?
        .into_iter()
        .filter(|org| caller.sees(*org))
        .collect();
    let mut deployments = Vec::new();
    let mut total = 0.0;
    for d in cp.store.deployments_created_before(&scope, to).await? {
        let Some(size) = d.record.size else { continue };
        let never_ran = matches!(
            d.status,
            DeploymentStatus::PendingApproval
                | DeploymentStatus::Rejected
                | DeploymentStatus::Expired
        );
        if never_ran {
            continue;
        }
        let started = d
            .record
            .approval
            .as_ref()
            .and_then(|a| a.decided_at)
            .unwrap_or(d.created_at);
        let ended = match d.status {
            DeploymentStatus::Destroyed | DeploymentStatus::Failed => d.updated_at,
            _ => now,
        };
        let start = started.max(from);
        let end = ended.min(to);
        if end <= start {
            continue;
        }
        let hours = (end - start).num_milliseconds() as f64 / 3_600_000.0;
        let cost = hours * size.hourly_usd;
        total += cost;
        deployments.push(DeploymentCost {
            deployment_id: d.id,
            organization_id: d.organization_id,
            server_name: d.record.server_name,
            provider: d.provider,
            region: d.record.region,
            instance_type: d.record.instance_type,
            status: d.status,
            batch_id: d.record.batch_id,
            hourly_usd: size.hourly_usd,
            from: start,
            to: end,
            hours: (hours * 1e4).round() / 1e4,
            cost_usd: (cost * 1e4).round() / 1e4,
        });
    }
    Ok(Json(CostReport {
        organization_id: id,
        from,
        to,
        estimate: true,
        currency: "USD".into(),
        total_usd: (total * 100.0).round() / 100.0,
        deployments,
    }))
}
