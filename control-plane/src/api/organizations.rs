//! `/api/v1/organizations`: the organization tree, its quotas and usage.
//! Reads are open to any token within its tree; writes need `admin`.
//!
//! A tree is at most [`MAX_ORGANIZATION_DEPTH`] levels below the root
//! (organizations have no move; creating is the only way to deepen a tree),
//! and every walk over it is iterative, so no tree, however it came to be,
//! can exhaust the stack.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Page};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::{Organization, OrganizationDeletion, OrganizationUpdate, Quotas, Usage};

/// Most levels below the root organization (the root is at depth 0).
pub const MAX_ORGANIZATION_DEPTH: usize = 16;

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
    /// Most committed monthly cost in whole USD (catalog list prices of
    /// running deployments, hourly × 730), likewise.
    #[schema(minimum = 0)]
    pub max_monthly_cost_usd: Option<i64>,
}

impl From<QuotaLimits> for Quotas {
    fn from(q: QuotaLimits) -> Self {
        Quotas {
            max_servers: q.max_servers,
            max_cpu_cores: q.max_cpu_cores,
            max_memory_gb: q.max_memory_gb,
            max_monthly_cost_usd: q.max_monthly_cost_usd,
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
        ("max_monthly_cost_usd", quotas.max_monthly_cost_usd),
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
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = super::extract::page_cursor(params.cursor.as_deref())?;
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
        (status = 422, description = "`validation_error`: wrong types, unknown fields, an invalid name, negative quotas or quotas above an ancestor's; `organization_depth_exceeded`: the new organization would be more than 16 levels below the root (details: `max_depth`, `depth`).", body = ErrorBody),
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
    // The parent's ancestors (itself included) are the new organization's depth.
    let depth = cp.store.organization_ancestors(parent_id).await?.len();
    if depth > MAX_ORGANIZATION_DEPTH {
        return Err(ApiError::new(
            crate::api::error::ErrorCode::OrganizationDepthExceeded,
            format!(
                "an organization may be at most {MAX_ORGANIZATION_DEPTH} levels below the root; \
                 this one would be {depth}"
            ),
        )
        .with_detail("max_depth", MAX_ORGANIZATION_DEPTH)
        .with_detail("depth", depth));
    }
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
        (status = 403, description = "`forbidden`: the token lacks `admin`, or tries to change its own organization's quotas (the root organization may set its own).", body = ErrorBody),
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
        // The root organization has no parent to set them: it sets its own.
        if id == caller.organization_id && org.parent_id.is_some() {
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

/// Deletes an organization (soft); with `cascade=true` also its descendants and their servers.
/// Its API tokens are revoked, its unused enrollment tokens expire (an enrollment with one is
/// refused as `OrganizationDeleted`), its servers' certificates are revoked and their sessions
/// closed (QUIC close code 8, "the server's organization was deleted"). Needs `admin`.
#[utoipa::path(
    delete,
    path = "/organizations/{id}",
    operation_id = "delete_organization",
    tag = "organizations",
    params(("id" = Uuid, Path, description = "Organization id"), DeleteOrganization),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted: its tokens revoked, its servers' sessions closed."),
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
            server_ids,
        } => {
            // Its servers' sessions end now, with the reason, rather than
            // at their next reconnect.
            for server_id in &server_ids {
                cp.sessions
                    .disconnect(*server_id, tether_protocol::CloseCode::OrganizationDeleted);
            }
            tracing::info!(organization_id = %id, organizations, servers, "organization deleted; its tokens revoked and sessions closed");
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
    Ok(Json(build_tree(root, orgs)))
}

/// Builds the subtree of `root` from `orgs` (its descendants, in any
/// order) without recursion: nodes are laid out breadth first, then
/// assembled from the deepest up. Nodes more than [`MAX_ORGANIZATION_DEPTH`]
/// levels below `root` (possible only in trees made before the cap) are
/// left out, so the answer's nesting, and serializing and dropping it, stay
/// bounded.
pub fn build_tree(root: Organization, orgs: Vec<Organization>) -> OrganizationNode {
    let mut children: HashMap<Uuid, Vec<Organization>> = HashMap::new();
    for org in orgs {
        if let Some(parent) = org.parent_id {
            children.entry(parent).or_default().push(org);
        }
    }
    fn node(org: Organization) -> OrganizationNode {
        OrganizationNode {
            id: org.id,
            name: org.name,
            parent_id: org.parent_id,
            quotas: org.quotas,
            created_at: org.created_at,
            children: Vec::new(),
        }
    }
    let mut root = node(root);
    // Descendants breadth first, with the index of each one's parent in
    // `flat` (`None`: the root) and its depth below the root.
    let mut flat: Vec<OrganizationNode> = Vec::new();
    let mut parents: Vec<Option<usize>> = Vec::new();
    let mut depths: Vec<usize> = Vec::new();
    for kid in children.remove(&root.id).unwrap_or_default() {
        flat.push(node(kid));
        parents.push(None);
        depths.push(1);
    }
    let mut next = 0;
    while next < flat.len() {
        let depth = depths[next];
        if depth < MAX_ORGANIZATION_DEPTH {
            for kid in children.remove(&flat[next].id).unwrap_or_default() {
                flat.push(node(kid));
                parents.push(Some(next));
                depths.push(depth + 1);
            }
        }
        next += 1;
    }
    // A parent comes before its children in `flat`: attach from the end.
    while let Some(child) = flat.pop() {
        match parents[flat.len()] {
            Some(parent) => flat[parent].children.push(child),
            None => root.children.push(child),
        }
    }
    // Children were attached last first: restore their order.
    let mut stack = vec![&mut root];
    while let Some(n) = stack.pop() {
        n.children.reverse();
        stack.extend(n.children.iter_mut());
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn org(id: Uuid, parent_id: Option<Uuid>) -> Organization {
        Organization {
            id,
            name: id.to_string(),
            parent_id,
            quotas: Quotas::default(),
            created_at: Utc::now(),
        }
    }

    /// A tree from `parents`: node `i + 1`'s parent is node `parents[i] % (i + 1)`
    /// (node 0 is the root), with depths capped at `MAX_ORGANIZATION_DEPTH`
    /// by re-attaching a node that would be deeper to its parent's parent.
    fn tree(parents: &[usize], chain: usize) -> (Vec<Organization>, Vec<usize>) {
        let mut ids = vec![Uuid::now_v7()];
        let mut depth = vec![0usize];
        let mut orgs = vec![org(ids[0], None)];
        // A chain at the limit first, so every tree reaches it.
        for i in 0..chain {
            let id = Uuid::now_v7();
            orgs.push(org(id, Some(ids[i])));
            ids.push(id);
            depth.push(i + 1);
        }
        for &p in parents {
            let mut parent = p % ids.len();
            while depth[parent] >= MAX_ORGANIZATION_DEPTH {
                parent = ids
                    .iter()
                    .position(|id| Some(*id) == orgs[parent].parent_id)
                    .unwrap_or(0);
            }
            let id = Uuid::now_v7();
            orgs.push(org(id, Some(ids[parent])));
            ids.push(id);
            depth.push(depth[parent] + 1);
        }
        (orgs, depth)
    }

    fn walk(root: &OrganizationNode) -> Vec<(Uuid, Option<Uuid>, usize)> {
        let mut out = Vec::new();
        let mut stack = vec![(root, 0usize)];
        while let Some((n, d)) = stack.pop() {
            out.push((n.id, n.parent_id, d));
            for c in &n.children {
                assert_eq!(c.parent_id, Some(n.id));
                stack.push((c, d + 1));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Trees built up to the depth limit come back whole: every
        /// organization once, under its parent, at its depth, children in
        /// the order given.
        #[test]
        fn trees_at_the_depth_limit_are_built_whole(
            parents in proptest::collection::vec(0usize..1000, 0..200),
            chain in 0usize..=MAX_ORGANIZATION_DEPTH,
        ) {
            let (mut orgs, depth) = tree(&parents, chain);
            let root = orgs.remove(0);
            let expected: Vec<(Uuid, usize)> = std::iter::once((root.id, 0))
                .chain(orgs.iter().zip(depth.iter().skip(1)).map(|(o, d)| (o.id, *d)))
                .collect();
            prop_assert!(depth.iter().all(|d| *d <= MAX_ORGANIZATION_DEPTH));
            let order: Vec<Uuid> = orgs.iter().map(|o| o.id).collect();
            let built = build_tree(root, orgs);
            let mut seen = walk(&built);
            prop_assert_eq!(seen.len(), expected.len());
            seen.sort();
            let mut want = expected.clone();
            want.sort();
            prop_assert_eq!(
                seen.iter().map(|(id, _, d)| (*id, *d)).collect::<Vec<_>>(),
                want
            );
            // Siblings keep the order they were listed in.
            let mut stack = vec![&built];
            while let Some(n) = stack.pop() {
                let positions: Vec<usize> = n
                    .children
                    .iter()
                    .map(|c| order.iter().position(|id| *id == c.id).unwrap_or(usize::MAX))
                    .collect();
                prop_assert!(positions.windows(2).all(|w| w[0] < w[1]));
                stack.extend(n.children.iter());
            }
        }
    }

    /// A chain far deeper than the limit (made before the cap existed) is
    /// built without recursion and answered down to the limit only.
    #[test]
    fn a_chain_thousands_deep_is_cut_at_the_limit_without_exhausting_the_stack() {
        let mut orgs = vec![org(Uuid::now_v7(), None)];
        for i in 0..5000 {
            let parent = orgs[i].id;
            orgs.push(org(Uuid::now_v7(), Some(parent)));
        }
        let root = orgs.remove(0);
        let built = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let built = build_tree(root, orgs);
                walk(&built).iter().map(|(_, _, d)| *d).max()
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(built, Some(MAX_ORGANIZATION_DEPTH));
    }
}
