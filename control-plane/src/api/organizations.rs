//! `/api/v1/organizations`: the organization tree, its quotas and usage.
//! Reads are open to any token within its tree; writes need `admin`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, ApiQuery, Caller, ErrorBody, Page};
use crate::app::ControlPlane;
use crate::auth::Scope;
use crate::store::{Organization, OrganizationDeletion, OrganizationUpdate, Quotas, Usage};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;

/// An organization as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationView {
    pub id: Uuid,
    pub name: String,
    pub parent_id: Option<Uuid>,
    pub quotas: Quotas,
    /// What the organization and its descendants use.
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
}

/// A node of `GET /organizations/{id}/hierarchy`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationNode {
    pub id: Uuid,
    pub name: String,
    pub parent_id: Option<Uuid>,
    pub quotas: Quotas,
    pub created_at: DateTime<Utc>,
    #[schema(no_recursion)]
    pub children: Vec<OrganizationNode>,
}

/// A new child organization.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    /// 1-200 printable characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// Default: the caller's organization.
    pub parent_id: Option<Uuid>,
    /// Limits; unset fields are unlimited (within the ancestors' limits).
    #[serde(default)]
    pub quotas: QuotaLimits,
}

/// Changes to an organization; absent fields stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchOrganization {
    /// 1-200 printable characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    /// Replaces all three limits (an unset field becomes unlimited).
    pub quotas: Option<QuotaLimits>,
}

/// Quotas as a request sets them: like [`Quotas`], but a misspelt field is an
/// error rather than silently unlimited.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// Most servers in the organization and its descendants; `null` or absent is unlimited.
    #[schema(minimum = 0)]
    pub max_servers: Option<i64>,
    /// Most CPU cores, likewise.
    #[schema(minimum = 0)]
    pub max_cpu_cores: Option<i64>,
    /// Most memory in GiB, likewise.
    #[schema(minimum = 0)]
    pub max_memory_gb: Option<i64>,
}

impl From<QuotaLimits> for Quotas {
    fn from(q: QuotaLimits) -> Self {
        Quotas {
            max_servers: q.max_servers,
            max_cpu_cores: q.max_cpu_cores,
            max_memory_gb: q.max_memory_gb,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListOrganizations {
    /// Page size, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteOrganization {
    /// Also delete descendants and every server in them (default false).
    #[serde(default)]
    pub cascade: bool,
}

async fn view(cp: &ControlPlane, org: Organization) -> Result<OrganizationView, ApiError> {
    let usage = cp.store.organization_usage(org.id).await?;
    Ok(OrganizationView {
        id: org.id,
        name: org.name,
        parent_id: org.parent_id,
        quotas: org.quotas,
        usage,
        created_at: org.created_at,
    })
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::validation(
            "name must be 1-200 printable characters",
        ));
    }
    Ok(())
}

fn validate_quotas(quotas: &Quotas) -> Result<(), ApiError> {
    for (field, value) in [
        ("max_servers", quotas.max_servers),
        ("max_cpu_cores", quotas.max_cpu_cores),
        ("max_memory_gb", quotas.max_memory_gb),
    ] {
        if value.is_some_and(|v| v < 0) {
            return Err(ApiError::validation(format!(
                "quotas.{field} must not be negative"
            )));
        }
    }
    Ok(())
}

/// A live organization the caller can see, or 404.
async fn visible(cp: &ControlPlane, caller: &Caller, id: Uuid) -> Result<Organization, ApiError> {
    if !caller.sees(id) {
        return Err(ApiError::not_found("no such organization"));
    }
    cp.store
        .organization(id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such organization"))
}

/// Lists the caller's organization and its descendants.
#[utoipa::path(
    get,
    path = "/organizations",
    operation_id = "list_organizations",
    tag = "organizations",
    params(ListOrganizations),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of organizations, by id.", body = Page<OrganizationView>,
            links(
                ("get" = (operation_id = "get_organization", parameters(("id" = "$response.body#/data/0/id")), description = "The organization.")),
                ("hierarchy" = (operation_id = "get_organization_hierarchy", parameters(("id" = "$response.body#/data/0/id")), description = "Its subtree.")),
            )),
        (status = 400, description = "`invalid_request`: a malformed limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListOrganizations>,
) -> Result<Json<Page<OrganizationView>>, ApiError> {
    let limit = super::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = super::page_cursor(params.cursor.as_deref())?;
    let orgs = cp
        .store
        .list_organizations(&caller.visible_organizations, limit + 1, after)
        .await?;
    let has_more = orgs.len() > limit as usize;
    let mut data = Vec::new();
    for org in orgs.into_iter().take(limit as usize) {
        data.push(view(&cp, org).await?);
    }
    let next_cursor = has_more
        .then(|| data.last().map(|o| o.id.to_string()))
        .flatten();
    Ok(Json(Page { data, next_cursor }))
}

/// Creates a child organization (default parent: the caller's). Needs `admin`.
#[utoipa::path(
    post,
    path = "/organizations",
    operation_id = "create_organization",
    tag = "organizations",
    request_body(content = CreateOrganization, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The new organization.", body = OrganizationView,
            links(
                ("get" = (operation_id = "get_organization", parameters(("id" = "$response.body#/id")), description = "The organization.")),
                ("update" = (operation_id = "update_organization", parameters(("id" = "$response.body#/id")), description = "Change it.")),
                ("delete" = (operation_id = "delete_organization", parameters(("id" = "$response.body#/id")), description = "Delete it.")),
                ("hierarchy" = (operation_id = "get_organization_hierarchy", parameters(("id" = "$response.body#/id")), description = "Its subtree.")),
            )),
        (status = 400, description = "`invalid_request`: malformed JSON or not `Content-Type: application/json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `admin`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such parent organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body is larger than 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: wrong types, unknown fields, an invalid name, negative quotas or quotas above an ancestor's.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn create(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateOrganization>,
) -> Result<(StatusCode, Json<OrganizationView>), ApiError> {
    caller.require(Scope::Admin)?;
    validate_name(&body.name)?;
    let quotas = Quotas::from(body.quotas);
    validate_quotas(&quotas)?;
    let parent_id = body.parent_id.unwrap_or(caller.organization_id);
    visible(&cp, &caller, parent_id).await?;
    crate::quota::check_child_limits(&*cp.store, parent_id, &quotas)
        .await?
        .map_err(ApiError::validation)?;
    let org = Organization {
        id: Uuid::now_v7(),
        name: body.name.trim().to_string(),
        parent_id: Some(parent_id),
        quotas,
        created_at: Utc::now(),
    };
    cp.store.create_organization(&org).await?;
    caller
        .audit(
            &cp,
            org.id,
            "organization.create",
            org.id.to_string(),
            serde_json::json!({ "name": org.name, "parent_id": parent_id }),
        )
        .await;
    Ok((StatusCode::CREATED, Json(view(&cp, org).await?)))
}

/// One organization with its quotas and usage.
#[utoipa::path(
    get,
    path = "/organizations/{id}",
    operation_id = "get_organization",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The organization.", body = OrganizationView),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn get(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<OrganizationView>, ApiError> {
    let org = visible(&cp, &caller, id).await?;
    Ok(Json(view(&cp, org).await?))
}

/// Renames an organization or changes its quotas. Needs `admin`.
#[utoipa::path(
    patch,
    path = "/organizations/{id}",
    operation_id = "update_organization",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    request_body(content = PatchOrganization, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The updated organization.", body = OrganizationView),
        (status = 400, description = "`invalid_request`: malformed JSON or not `Content-Type: application/json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `admin`, or tries to change its own organization's quotas.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body is larger than 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: wrong types, unknown fields, an invalid name, negative quotas or quotas above an ancestor's.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn patch(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<PatchOrganization>,
) -> Result<Json<OrganizationView>, ApiError> {
    caller.require(Scope::Admin)?;
    let org = visible(&cp, &caller, id).await?;
    if let Some(name) = &body.name {
        validate_name(name)?;
    }
    let quotas = body.quotas.map(Quotas::from);
    if let Some(quotas) = &quotas {
        validate_quotas(quotas)?;
        if id == caller.organization_id {
            return Err(ApiError::forbidden(
                "an organization's own quotas are set by its parent",
            ));
        }
        if let Some(parent_id) = org.parent_id {
            crate::quota::check_child_limits(&*cp.store, parent_id, quotas)
                .await?
                .map_err(ApiError::validation)?;
        }
    }
    let update = OrganizationUpdate {
        name: body.name.map(|n| n.trim().to_string()),
        quotas,
    };
    let org = cp
        .store
        .update_organization(id, &update)
        .await?
        .ok_or_else(|| ApiError::not_found("no such organization"))?;
    caller
        .audit(
            &cp,
            id,
            "organization.update",
            id.to_string(),
            serde_json::json!({ "name": org.name, "quotas": org.quotas }),
        )
        .await;
    Ok(Json(view(&cp, org).await?))
}

/// Deletes an organization (soft); with `cascade=true` also its descendants and their servers. Needs `admin`.
#[utoipa::path(
    delete,
    path = "/organizations/{id}",
    operation_id = "delete_organization",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id"), DeleteOrganization),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "`invalid_request`: a malformed query.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `admin`, or targets its own organization.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 409, description = "`conflict`: it is the root, or has children or servers and `cascade` is not set.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn delete(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<DeleteOrganization>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    let org = visible(&cp, &caller, id).await?;
    if org.parent_id.is_none() {
        return Err(ApiError::conflict(
            "the root organization cannot be deleted",
        ));
    }
    if id == caller.organization_id {
        return Err(ApiError::forbidden(
            "a token cannot delete its own organization",
        ));
    }
    match cp
        .store
        .delete_organization(id, params.cascade, Utc::now())
        .await?
    {
        OrganizationDeletion::Deleted {
            organizations,
            servers,
        } => {
            caller
                .audit(&cp, id, "organization.delete", id.to_string(), serde_json::json!({ "cascade": params.cascade, "organizations": organizations, "servers": servers }))
                .await;
            Ok(StatusCode::NO_CONTENT)
        }
        OrganizationDeletion::HasChildren => Err(ApiError::conflict(
            "the organization has child organizations; delete them first or pass ?cascade=true",
        )),
        OrganizationDeletion::HasServers => Err(ApiError::conflict(
            "the organization has servers; remove them first or pass ?cascade=true",
        )),
        OrganizationDeletion::NotFound => Err(ApiError::not_found("no such organization")),
    }
}

/// The organization and its descendants as a tree.
#[utoipa::path(
    get,
    path = "/organizations/{id}/hierarchy",
    operation_id = "get_organization_hierarchy",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The subtree rooted at the organization.", body = OrganizationNode),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn hierarchy(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<OrganizationNode>, ApiError> {
    let root = visible(&cp, &caller, id).await?;
    let scope = cp.store.organization_scope(id).await?;
    let orgs = cp.store.list_organizations(&scope, u32::MAX, None).await?;
    let mut children: HashMap<Uuid, Vec<Organization>> = HashMap::new();
    for org in orgs {
        if let Some(parent) = org.parent_id {
            children.entry(parent).or_default().push(org);
        }
    }
    fn build(
        org: Organization,
        children: &mut HashMap<Uuid, Vec<Organization>>,
    ) -> OrganizationNode {
        let kids = children.remove(&org.id).unwrap_or_default();
        OrganizationNode {
            id: org.id,
            name: org.name,
            parent_id: org.parent_id,
            quotas: org.quotas,
            created_at: org.created_at,
            children: kids.into_iter().map(|k| build(k, children)).collect(),
        }
    }
    Ok(Json(build(root, &mut children)))
}
