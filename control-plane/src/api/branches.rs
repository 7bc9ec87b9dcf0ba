//! `/api/v1/branches`: peering with other branches (invites, accepting
//! them, listing and removing peers) and relaying commands to a peer's
//! servers. The machinery is in `crate::federation`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tether_protocol::{BranchCall, BranchResponse, RefusalCode, RelayedCommand};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, Page};
use super::health::{HealthResultView, HealthRunAccepted, ServerHealthView};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::federation::invite::{self, Invite};
use crate::federation::FederationError;
use crate::store::{BranchInvite, BranchPeer, BranchStatus, ServerStatus};

/// Scopes an invite may grant a peer.
pub const GRANTABLE_SCOPES: [&str; 2] = ["servers:read", "commands:run"];
const DEFAULT_INVITE_TTL: i64 = 3600;
const MAX_INVITE_TTL: i64 = 7 * 24 * 3600;

/// A peer branch as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BranchView {
    /// The peer's branch id.
    pub id: Uuid,
    pub name: String,
    /// The peer's QUIC address.
    pub address: String,
    pub status: BranchStatus,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Round trip of the last answered heartbeat.
    pub latency_ms: Option<i64>,
    /// Servers the peer publishes to this branch.
    pub server_count: i64,
    /// Scopes this branch granted the peer.
    pub granted_scopes: Vec<String>,
    /// Scopes the peer granted this branch.
    pub remote_scopes: Vec<String>,
    pub organization_id: Uuid,
    pub created_at: DateTime<Utc>,
}

impl From<BranchPeer> for BranchView {
    fn from(p: BranchPeer) -> Self {
        Self {
            id: p.id,
            name: p.name,
            address: p.address,
            status: p.status,
            last_seen_at: p.last_seen_at,
            latency_ms: p.latency_ms,
            server_count: p.server_count,
            granted_scopes: p.granted_scopes,
            remote_scopes: p.remote_scopes,
            organization_id: p.organization_id,
            created_at: p.created_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInvite {
    /// What the invited branch will be known as here until it joins.
    pub name: String,
    /// Scopes granted to the branch that redeems it: `servers:read`, `commands:run`.
    pub scopes: Vec<String>,
    /// Validity, 60 s to 7 days (default 3600).
    pub ttl_seconds: Option<i64>,
}

/// A new invite. `invite` holds a one-time secret and is shown only here.
#[derive(Debug, Serialize, ToSchema)]
pub struct InviteCreated {
    /// Pass to `POST /api/v1/branches` on the other branch.
    pub invite: String,
    pub id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub scopes: Vec<String>,
}

/// Checks that `scopes` are grantable to a branch and that the caller holds
/// each of them: a token cannot grant a peer more than it has itself.
fn check_scopes(caller: &Caller, scopes: &[String]) -> Result<(), ApiError> {
    if scopes.is_empty() {
        return Err(ApiError::validation("scopes must name at least one scope"));
    }
    if let Some(bad) = scopes
        .iter()
        .find(|s| !GRANTABLE_SCOPES.contains(&s.as_str()))
    {
        return Err(ApiError::validation(format!(
            "scope {bad:?} cannot be granted to a branch (allowed: servers:read, commands:run)"
        )));
    }
    for name in scopes {
        if let Some(scope) = Scope::parse(name) {
            caller.require(scope)?;
        }
    }
    Ok(())
}

/// Creates a one-time invite for another branch. Needs `branches:write`.
#[utoipa::path(
    post,
    path = "/branches/invites",
    operation_id = "create_branch_invite",
    tag = "branches",
    request_body = CreateInvite,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The invite (shown once).", body = InviteCreated),
        (status = 400, description = "`invalid_request`: the body is not JSON of this shape.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body exceeds 1 MiB.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `branches:write`, or a scope it tries to grant (`required_scope`).", body = ErrorBody),
        (status = 422, description = "`validation_error`: empty name, unknown scope, ttl out of range.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn create_invite(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateInvite>,
) -> Result<(StatusCode, Json<InviteCreated>), ApiError> {
    caller.require(Scope::BranchesWrite)?;
    let name = body.name.trim().to_string();
    if name.is_empty() || name.len() > 200 || super::extract::has_control_chars(&name) {
        return Err(ApiError::validation(
            "name must be 1-200 characters without control characters",
        ));
    }
    check_scopes(&caller, &body.scopes)?;
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_INVITE_TTL);
    if !(60..=MAX_INVITE_TTL).contains(&ttl) {
        return Err(ApiError::validation(format!(
            "ttl_seconds must be between 60 and {MAX_INVITE_TTL}"
        )));
    }
    let now = Utc::now();
    let secret = invite::new_secret();
    let record = BranchInvite {
        id: Uuid::now_v7(),
        organization_id: caller.organization_id,
        name: name.clone(),
        secret_hash: invite::secret_hash(&secret),
        scopes: body.scopes.clone(),
        created_at: now,
        expires_at: now + chrono::Duration::seconds(ttl),
        used_at: None,
    };
    cp.store.create_branch_invite(&record).await?;
    let text = Invite {
        id: record.id,
        secret,
        branch_id: cp.instance.branch_id,
        name: cp.instance.branch_name.clone(),
        address: cp.public_quic_addr.clone(),
        ca_fingerprint: cp.pki.ca.fingerprint().to_string(),
        scopes: record.scopes.clone(),
        expires_at: record.expires_at,
    }
    .encode();
    caller
        .audit(
            &cp,
            record.organization_id,
            "branch.invite.create",
            record.id.to_string(),
            serde_json::json!({ "name": record.name, "scopes": record.scopes }),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(InviteCreated {
            invite: text,
            id: record.id,
            expires_at: record.expires_at,
            scopes: record.scopes,
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvite {
    /// The `invite` text another branch created.
    pub invite: String,
    /// Scopes granted to the inviting branch here (default `servers:read`).
    pub scopes: Option<Vec<String>>,
}

/// Maps a federation failure to the API error the caller sees.
pub(super) fn federation_error(e: FederationError) -> ApiError {
    match e {
        FederationError::Unreachable(id, why) => {
            ApiError::branch_unreachable(format!("branch {id} is unreachable: {why}"))
        }
        FederationError::InvalidInvite(why) => {
            ApiError::validation(format!("invite is not valid: {why}"))
        }
        FederationError::Refused { code, message } => match code {
            RefusalCode::Unauthorized | RefusalCode::Forbidden => {
                ApiError::forbidden(format!("the branch refused: {message}"))
            }
            RefusalCode::NotFound => ApiError::not_found(format!("the branch answered: {message}")),
            RefusalCode::Invalid => ApiError::validation(format!("the branch refused: {message}")),
            RefusalCode::Unavailable => {
                ApiError::branch_unreachable(format!("the branch cannot do it now: {message}"))
            }
        },
        FederationError::PeeringRevoked => {
            ApiError::not_found("the other branch removed the peering")
        }
        FederationError::BranchIdTaken(id) => ApiError::conflict(format!(
            "branch {id} is already a peer here, of another organization or under another CA; \
             only the same branch may re-peer, into the same organization"
        ))
        .with_detail("branch_id", id.to_string()),
        other => ApiError::internal(other),
    }
}

/// Accepts another branch's invite: peers with it over QUIC. Needs `branches:write`.
#[utoipa::path(
    post,
    path = "/branches",
    operation_id = "accept_branch_invite",
    tag = "branches",
    request_body = AcceptInvite,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Peered; the new peer.", body = BranchView),
        (status = 400, description = "`invalid_request`: the body is not JSON of this shape.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body exceeds 1 MiB.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `branches:write` or a scope it tries to grant (`required_scope`), or the inviting branch refused the invite (used, expired, unknown).", body = ErrorBody),
        (status = 409, description = "`conflict`: the inviting branch is already a peer here, of another organization or under another CA (`branch_id`).", body = ErrorBody),
        (status = 422, description = "`validation_error`: the invite is malformed or expired, or a scope cannot be granted.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
        (status = 503, description = "`branch_unreachable`: the inviting branch did not answer.", body = ErrorBody),
    )
)]
pub async fn accept(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<AcceptInvite>,
) -> Result<(StatusCode, Json<BranchView>), ApiError> {
    caller.require(Scope::BranchesWrite)?;
    let grant = body.scopes.unwrap_or_else(|| vec!["servers:read".into()]);
    check_scopes(&caller, &grant)?;
    let invite = Invite::decode(&body.invite).map_err(federation_error)?;
    let peer = crate::federation::invite::join(&cp, &invite, caller.organization_id, grant)
        .await
        .map_err(federation_error)?;
    caller
        .audit(
            &cp,
            peer.organization_id,
            "branch.peer",
            peer.id.to_string(),
            serde_json::json!({ "name": peer.name, "address": peer.address, "granted_scopes": peer.granted_scopes }),
        )
        .await;
    Ok((StatusCode::CREATED, Json(peer.into())))
}

/// Lists the peer branches of the caller's organization tree. Needs `servers:read`.
#[utoipa::path(
    get,
    path = "/branches",
    operation_id = "list_branches",
    tag = "branches",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The peers, by id (one page).", body = Page<BranchView>),
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
) -> Result<Json<Page<BranchView>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let peers = cp
        .store
        .list_branch_peers(Some(&caller.visible_organizations))
        .await?;
    Ok(Json(Page {
        data: peers.into_iter().map(BranchView::from).collect(),
        next_cursor: None,
    }))
}

async fn visible_peer(
    cp: &ControlPlane,
    caller: &Caller,
    id: Uuid,
) -> Result<BranchPeer, ApiError> {
    cp.store
        .branch_peer(Some(&caller.visible_organizations), id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such branch"))
}

/// A visible peer that is not known to be unreachable (503 at once if it is).
async fn reachable_peer(
    cp: &ControlPlane,
    caller: &Caller,
    id: Uuid,
) -> Result<BranchPeer, ApiError> {
    let peer = visible_peer(cp, caller, id).await?;
    if peer.status == BranchStatus::Unreachable {
        return Err(ApiError::branch_unreachable(format!(
            "branch {} is unreachable (last seen {})",
            peer.id,
            peer.last_seen_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "never".into())
        )));
    }
    Ok(peer)
}

/// One call to a peer on behalf of an API request: answered within
/// [`crate::federation::RELAY_TIMEOUT`] or 503 `branch_unreachable`.
async fn relay_call(
    cp: &ControlPlane,
    peer: &BranchPeer,
    call: BranchCall,
) -> Result<BranchResponse, ApiError> {
    crate::federation::call(cp, peer, call, crate::federation::RELAY_TIMEOUT)
        .await
        .map_err(federation_error)
}

/// One peer branch. Needs `servers:read`.
#[utoipa::path(
    get,
    path = "/branches/{id}",
    operation_id = "get_branch",
    tag = "branches",
    params(("id" = Uuid, Path, description = "The peer's branch id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The peer.", body = BranchView),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such peer in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn get(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<BranchView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    Ok(Json(visible_peer(&cp, &caller, id).await?.into()))
}

/// Removes a peering here and on the peer (told over QUIC; if it is
/// unreachable it learns at its next heartbeat). Needs `branches:write`.
#[utoipa::path(
    delete,
    path = "/branches/{id}",
    operation_id = "delete_branch",
    tag = "branches",
    params(("id" = Uuid, Path, description = "The peer's branch id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed on both sides (or here, and the peer is told when it next calls)."),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `branches:write`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such peer in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn delete(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::BranchesWrite)?;
    let peer = visible_peer(&cp, &caller, id).await?;
    let told = crate::federation::call(
        &cp,
        &peer,
        BranchCall::Unpeer,
        crate::federation::RELAY_TIMEOUT,
    )
    .await;
    if let Err(e) = &told {
        tracing::warn!(branch_id = %peer.id, error = %e, "could not tell the peer; removing here");
    }
    cp.federation.forget(peer.id);
    if !cp
        .store
        .delete_branch_peer(Some(&caller.visible_organizations), id)
        .await?
    {
        return Err(ApiError::not_found("no such branch"));
    }
    caller
        .audit(
            &cp,
            peer.organization_id,
            "branch.unpeer",
            peer.id.to_string(),
            serde_json::json!({ "name": peer.name, "peer_told": told.is_ok() }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RelayCommand {
    /// Program and arguments, no shell.
    pub argv: Vec<String>,
    /// Environment set on top of the agent's; values are never logged.
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    /// Written to the program's standard input.
    pub stdin: Option<String>,
    /// 1-3600 seconds (default 60).
    pub timeout_seconds: Option<u64>,
}

/// The relayed command: follow it here with `GET /api/v1/commands/{command_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RelayAccepted {
    /// Id of the command on this branch (a mirror of the peer's).
    pub command_id: String,
    /// Id of the command on the peer.
    pub remote_command_id: String,
}

/// Runs a command on a peer branch's server: forwarded to the peer, run by
/// its agent under its policy. Needs `commands:run`; the peer must have
/// granted `commands:run` to this branch.
#[utoipa::path(
    post,
    path = "/branches/{branch_id}/servers/{server_id}/commands",
    operation_id = "relay_branch_command",
    tag = "branches",
    params(
        ("branch_id" = Uuid, Path, description = "The peer's branch id"),
        ("server_id" = Uuid, Path, description = "A server of that branch"),
    ),
    request_body = RelayCommand,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted by the peer.", body = RelayAccepted),
        (status = 400, description = "`invalid_request`: the body is not JSON of this shape.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body exceeds 1 MiB.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `commands:run`, or the peer refused (scope not granted).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such peer here, or no such server on it.", body = ErrorBody),
        (status = 422, description = "`validation_error`: empty argv, timeout out of range.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
        (status = 503, description = "`branch_unreachable`: the peer did not answer within a second.", body = ErrorBody),
    )
)]
pub async fn relay_command(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath((branch_id, server_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<RelayCommand>,
) -> Result<(StatusCode, Json<RelayAccepted>), ApiError> {
    caller.require(Scope::CommandsRun)?;
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(ApiError::validation("argv must name a program"));
    }
    let timeout_seconds = body.timeout_seconds.unwrap_or(60);
    if !(1..=3600).contains(&timeout_seconds) {
        return Err(ApiError::validation(
            "timeout_seconds must be between 1 and 3600",
        ));
    }
    let peer = reachable_peer(&cp, &caller, branch_id).await?;
    let call = BranchCall::RunCommand(RelayedCommand {
        server_id: server_id.to_string(),
        argv: body.argv.clone(),
        env: body.env.unwrap_or_default().into_iter().collect(),
        stdin: body.stdin.map(String::into_bytes),
        timeout_seconds,
    });
    let answer = relay_call(&cp, &peer, call).await?;
    let BranchResponse::CommandAccepted { command_id } = answer else {
        return Err(ApiError::internal(
            "the peer answered a relayed command out of protocol",
        ));
    };
    let now = chrono::Utc::now();
    let mirror = crate::store::RelayedCommandRecord {
        branch_id,
        remote_command_id: command_id.clone(),
        command: crate::store::CommandRecord {
            id: Uuid::now_v7(),
            organization_id: peer.organization_id,
            server_id,
            argv: body.argv.clone(),
            timeout_ms: i64::try_from(timeout_seconds * 1000).unwrap_or(i64::MAX),
            max_output_bytes: crate::store::federation::RELAYED_MAX_OUTPUT_BYTES,
            status: crate::store::CommandState::Queued,
            exit_code: None,
            signal: None,
            reason: None,
            output: Vec::new(),
            output_truncated: false,
            cancel_requested: false,
            created_by: caller.actor(),
            created_at: now,
            started_at: None,
            finished_at: None,
            claimed_by: None,
            deliver_by: now + crate::store::federation::RELAYED_DELIVER_WITHIN,
        },
    };
    cp.store.create_relayed_command(&mirror).await?;
    let id = mirror.command.id;
    tokio::spawn(crate::federation::relay::follow(
        cp.clone(),
        mirror,
        Some(peer.clone()),
    ));
    caller
        .audit(
            &cp,
            peer.organization_id,
            "branch.command.relay",
            format!("{branch_id}/{server_id}"),
            serde_json::json!({ "argv": body.argv, "command_id": id, "remote_command_id": command_id }),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(RelayAccepted {
            command_id: id.to_string(),
            remote_command_id: command_id,
        }),
    ))
}

/// The latest health results of a peer branch's server, as that branch
/// knows them. Needs `servers:read`; the peer must have granted
/// `servers:read` to this branch.
#[utoipa::path(
    get,
    path = "/branches/{branch_id}/servers/{server_id}/health",
    operation_id = "get_branch_server_health",
    tag = "branches",
    params(
        ("branch_id" = Uuid, Path, description = "The peer's branch id"),
        ("server_id" = Uuid, Path, description = "A server of that branch"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The server's health on the peer (`branch_id` set).", body = ServerHealthView),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`, or the peer refused (scope not granted).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such peer here, or no such server on it.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
        (status = 503, description = "`branch_unreachable`: the peer did not answer within a second.", body = ErrorBody),
    )
)]
pub async fn server_health(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath((branch_id, server_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Json<ServerHealthView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let peer = reachable_peer(&cp, &caller, branch_id).await?;
    let call = BranchCall::ServerHealth {
        server_id: server_id.to_string(),
    };
    let answer = relay_call(&cp, &peer, call).await?;
    let BranchResponse::ServerHealth(health) = answer else {
        return Err(ApiError::internal(
            "the peer answered a health request out of protocol",
        ));
    };
    let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
    Ok(Json(ServerHealthView {
        server_id,
        status: health.status,
        server_status: ServerStatus::parse(&health.server_status).unwrap_or(ServerStatus::Offline),
        checks: health
            .checks
            .into_iter()
            .map(|c| HealthResultView {
                check_id: c.check_id,
                name: c.name,
                status: c.status,
                message: c.message,
                consecutive_failures: c.consecutive_failures,
                checked_at: at(c.checked_at_ms),
                duration_ms: c.duration_ms,
                received_at: at(c.received_at_ms),
            })
            .collect(),
        branch_id: Some(branch_id),
    }))
}

/// Runs every health check of a peer branch's server now, on that branch;
/// read the results with `GET /branches/{branch_id}/servers/{server_id}/health`.
/// Needs `servers:write`; the peer must have granted `commands:run`.
#[utoipa::path(
    post,
    path = "/branches/{branch_id}/servers/{server_id}/health/run",
    operation_id = "run_branch_server_health_checks",
    tag = "branches",
    params(
        ("branch_id" = Uuid, Path, description = "The peer's branch id"),
        ("server_id" = Uuid, Path, description = "A server of that branch"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The peer asked its agent to run every check now.", body = HealthRunAccepted),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`, or the peer refused (`commands:run` not granted).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such peer here, or no such server on it.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
        (status = 503, description = "`branch_unreachable`: the peer did not answer within a second, or its server is not connected.", body = ErrorBody),
    )
)]
pub async fn run_server_health(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath((branch_id, server_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<(StatusCode, Json<HealthRunAccepted>), ApiError> {
    caller.require(Scope::ServersWrite)?;
    let peer = reachable_peer(&cp, &caller, branch_id).await?;
    let call = BranchCall::RunHealthChecks {
        server_id: server_id.to_string(),
    };
    let answer = relay_call(&cp, &peer, call).await?;
    let BranchResponse::HealthRunAccepted { requested_at_ms } = answer else {
        return Err(ApiError::internal(
            "the peer answered a health run out of protocol",
        ));
    };
    caller
        .audit(
            &cp,
            peer.organization_id,
            "branch.server.health.run",
            format!("{branch_id}/{server_id}"),
            serde_json::json!({}),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(HealthRunAccepted {
            server_id,
            requested_at: DateTime::<Utc>::from_timestamp_millis(requested_at_ms)
                .unwrap_or_else(Utc::now),
            branch_id: Some(branch_id),
        }),
    ))
}
