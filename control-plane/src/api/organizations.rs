//! `/api/v1/organizations`: the organization tree, its quotas and usage.
//! Reads are open to any token within its tree; writes need `admin`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, ApiQuery, Caller, Page};
use crate::app::ControlPlane;
use crate::auth::Scope;
use crate::store::{Organization, OrganizationDeletion, OrganizationUpdate, Quotas, Usage};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;

/// An organization as the API shows it.
#[derive(Debug, Serialize)]
pub struct OrganizationView {
    pub id: Uuid,
    pub name: String,
    pub parent_id: Option<Uuid>,
    pub quotas: Quotas,
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
}

/// A node of `GET /organizations/{id}/hierarchy`.
#[derive(Debug, Serialize)]
pub struct OrganizationNode {
    pub id: Uuid,
    pub name: String,
    pub parent_id: Option<Uuid>,
    pub quotas: Quotas,
    pub created_at: DateTime<Utc>,
    pub children: Vec<OrganizationNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    pub name: String,
    /// Default: the caller's organization.
    pub parent_id: Option<Uuid>,
    #[serde(default)]
    pub quotas: Quotas,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchOrganization {
    pub name: Option<String>,
    pub quotas: Option<Quotas>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOrganizations {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteOrganization {
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

pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListOrganizations>,
) -> Result<Json<Page<OrganizationView>>, ApiError> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let after = params
        .cursor
        .as_deref()
        .map(|c| Uuid::parse_str(c).map_err(|_| ApiError::invalid_request("cursor is not valid")))
        .transpose()?;
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

pub async fn create(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateOrganization>,
) -> Result<(StatusCode, Json<OrganizationView>), ApiError> {
    caller.require(Scope::Admin)?;
    validate_name(&body.name)?;
    validate_quotas(&body.quotas)?;
    let parent_id = body.parent_id.unwrap_or(caller.organization_id);
    visible(&cp, &caller, parent_id).await?;
    crate::quota::check_child_limits(&*cp.store, parent_id, &body.quotas)
        .await?
        .map_err(ApiError::validation)?;
    let org = Organization {
        id: Uuid::now_v7(),
        name: body.name.trim().to_string(),
        parent_id: Some(parent_id),
        quotas: body.quotas,
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

pub async fn get(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<OrganizationView>, ApiError> {
    let org = visible(&cp, &caller, id).await?;
    Ok(Json(view(&cp, org).await?))
}

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
    if let Some(quotas) = &body.quotas {
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
        quotas: body.quotas,
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
