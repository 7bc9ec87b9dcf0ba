//! `/api/v1/servers`: the fleet inventory, scoped to the caller's
//! organization tree.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tether_protocol::CloseCode;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, ApiQuery, Page};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::{Labels, Server, ServerQuery, ServerStatus};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;

/// A server as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerView {
    pub id: Uuid,
    pub name: String,
    pub hostname: String,
    pub status: ServerStatus,
    pub status_reason: Option<String>,
    #[schema(value_type = std::collections::HashMap<String, String>)]
    pub labels: Labels,
    pub organization_id: Uuid,
    pub agent_version: Option<String>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub branch_id: Uuid,
    pub deployment_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// What the agent reported about its host at its last session start.
    #[schema(value_type = Object)]
    pub facts: serde_json::Value,
}

impl ServerView {
    /// A server a peer branch published (`branch_id` is the peer's).
    pub fn remote(r: crate::store::RemoteServer) -> Self {
        Self {
            id: r.id,
            name: r.name,
            hostname: r.hostname,
            status: ServerStatus::parse(&r.status).unwrap_or(ServerStatus::Offline),
            status_reason: None,
            labels: r.labels,
            organization_id: r.organization_id,
            agent_version: r.agent_version,
            last_seen_at: r.last_seen_at,
            branch_id: r.branch_id,
            deployment_id: None,
            created_at: r.synced_at,
            facts: serde_json::json!({
                "cpu_percent": r.cpu_percent,
                "memory_used_bytes": r.memory_used_bytes,
                "memory_total_bytes": r.memory_total_bytes,
            }),
        }
    }

    pub fn new(server: Server, branch_id: Uuid) -> Self {
        Self {
            id: server.id,
            name: server.name,
            hostname: server.hostname,
            status: server.status,
            status_reason: server.status_reason,
            labels: server.labels,
            organization_id: server.organization_id,
            agent_version: server.agent_version,
            last_seen_at: server.last_seen_at,
            branch_id,
            deployment_id: server.deployment_id,
            created_at: server.created_at,
            facts: server.facts,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListServers {
    /// Only servers with this status.
    #[param(value_type = Option<ServerStatus>)]
    pub status: Option<String>,
    /// `key=value`, several separated by commas.
    pub label: Option<String>,
    /// `local` (default), `all` (peers' published servers too, after the
    /// last page of local ones), or a branch id (this one's or a peer's).
    pub branch: Option<String>,
    /// Page size, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Lists the servers of the caller's organization tree.
#[utoipa::path(
    get,
    path = "/servers",
    operation_id = "list_servers",
    tag = "servers",
    params(ListServers),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of servers, by id.", body = Page<ServerView>,
            links(
                ("get" = (operation_id = "get_server", parameters(("id" = "$response.body#/data/0/id")), description = "The first server.")),
                ("delete" = (operation_id = "delete_server", parameters(("id" = "$response.body#/data/0/id")), description = "Remove the first server.")),
            )),
        (status = 400, description = "`invalid_request`: a malformed filter, limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListServers>,
) -> Result<Json<Page<ServerView>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            ServerStatus::parse(s).ok_or_else(|| {
                ApiError::invalid_request(
                    "status must be one of online, offline, connecting, timeout",
                )
            })
        })
        .transpose()?;
    let mut labels = Vec::new();
    for pair in params
        .label
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|p| !p.is_empty())
    {
        if super::extract::has_control_chars(pair) {
            return Err(ApiError::invalid_request(
                "label filters must not contain control characters",
            ));
        }
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            ApiError::invalid_request(format!("label filter {pair:?} must be key=value"))
        })?;
        labels.push((key.to_string(), value.to_string()));
    }
    // Which branches: `local` (default), `all` (local + every peer's
    // published servers), this branch's id, or one peer's id.
    let (want_local, want_remote): (bool, Option<Option<Uuid>>) = match params.branch.as_deref() {
        None | Some("local") => (true, None),
        Some("all") => (true, Some(None)),
        Some(other) => match Uuid::parse_str(other) {
            Ok(id) if id == cp.instance.branch_id => (true, None),
            Ok(id) => (false, Some(Some(id))),
            Err(_) => {
                return Err(ApiError::invalid_request(format!(
                    "branch must be local, all or a branch id, not {other:?}"
                )))
            }
        },
    };
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = super::extract::page_cursor(params.cursor.as_deref())?;
    let Page {
        mut data,
        next_cursor,
    } = if want_local {
        let servers = cp
            .store
            .list_servers(&ServerQuery {
                scope: caller.visible_organizations.clone(),
                status,
                labels: labels.clone(),
                limit: limit + 1,
                after,
            })
            .await?;
        Page::from_rows(
            servers,
            limit,
            |s| s.id.to_string(),
            |s| ServerView::new(s, cp.instance.branch_id),
        )
    } else {
        Page {
            data: Vec::new(),
            next_cursor: None,
        }
    };
    let has_more = next_cursor.is_some();
    // Peers' servers follow the last page of local ones (they are few and
    // already in the store, synced by the heartbeat loop).
    if let (Some(only), false) = (want_remote, has_more) {
        let remote = cp
            .store
            .list_remote_servers(&caller.visible_organizations)
            .await?;
        if let Some(peer) = only {
            if cp
                .store
                .branch_peer(Some(&caller.visible_organizations), peer)
                .await?
                .is_none()
            {
                return Err(ApiError::invalid_request(format!("unknown branch {peer}")));
            }
        }
        data.extend(
            remote
                .into_iter()
                .filter(|r| only.is_none_or(|b| b == r.branch_id))
                .filter(|r| status.is_none_or(|s| s.as_str() == r.status))
                .filter(|r| {
                    labels
                        .iter()
                        .all(|(k, v)| r.labels.get(k).is_some_and(|x| x == v))
                })
                .map(ServerView::remote),
        );
    }
    Ok(Json(Page { data, next_cursor }))
}

/// One server.
#[utoipa::path(
    get,
    path = "/servers/{id}",
    operation_id = "get_server",
    tag = "servers",
    params(("id" = Uuid, Path, description = "Server id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The server.", body = ServerView),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such server in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn get(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ServerView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let server = cp
        .store
        .server(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such server"))?;
    Ok(Json(ServerView::new(server, cp.instance.branch_id)))
}

/// Revokes the server's certificates, closes its session and removes it (soft).
#[utoipa::path(
    delete,
    path = "/servers/{id}",
    operation_id = "delete_server",
    tag = "servers",
    params(("id" = Uuid, Path, description = "Server id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed: its certificates are revoked and its session closed."),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such server in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn remove(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::ServersWrite)?;
    let server = cp
        .store
        .server(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such server"))?;
    if !cp
        .store
        .remove_server(&caller.visible_organizations, id, Utc::now())
        .await?
    {
        return Err(ApiError::not_found("no such server"));
    }
    cp.sessions.disconnect(id, CloseCode::Revoked);
    tracing::info!(server_id = %id, "server removed and its certificates revoked");
    caller
        .audit(
            &cp,
            server.organization_id,
            "server.delete",
            id.to_string(),
            serde_json::json!({ "name": server.name }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}
