//! `/api/v1/infrastructure/deployments/{id}/state/versions`: the kept
//! versions of a deployment's Terraform state (the last 10 writes, each
//! sealed, with checksum, size and serial; `api/terraform_state` keeps them)
//! and restoring one as the current state. A listing never carries state
//! content; a restore is itself recorded as a new version, made only into a
//! completed or failed deployment whose state is not locked, and audited.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use sha2::Digest;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, Page};
use super::infrastructure::{visible_deployment, StateVersionView};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::{terraform_state_version_context, DeploymentStatus, LockOutcome};

/// Lists the kept versions of a deployment's state, newest first (never
/// their content). Needs `servers:read`.
#[utoipa::path(
    get,
    path = "/infrastructure/deployments/{id}/state/versions",
    operation_id = "list_state_versions",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Deployment id.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The kept versions, newest first (at most 10, one page).", body = Page<StateVersionView>),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such deployment in the caller's tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Page<StateVersionView>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    visible_deployment(&cp, &caller, id).await?;
    let versions = cp.store.terraform_state_versions(id).await?;
    Ok(Json(Page {
        data: versions.into_iter().map(Into::into).collect(),
        next_cursor: None,
    }))
}

/// Makes a kept version the deployment's current state (recorded as a new
/// version with `restored_from`). Only for a completed or failed deployment
/// whose state is not locked. Needs `infrastructure:destroy`.
#[utoipa::path(
    post,
    path = "/infrastructure/deployments/{id}/state/versions/{version}/restore",
    operation_id = "restore_state_version",
    tag = "provisioning",
    params(
        ("id" = Uuid, Path, description = "Deployment id."),
        ("version" = i64, Path, description = "Version number (see the list)."),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Restored: the new current version.", body = StateVersionView),
        (status = 400, description = "`invalid_request`: the id or version is malformed.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `infrastructure:destroy`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such deployment, or no such kept version.", body = ErrorBody),
        (status = 409, description = "`conflict`: the state is locked (`state_lock`: the holder's LockInfo), or the deployment is neither completed nor failed (`status`).", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn restore(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath((id, version)): ApiPath<(Uuid, i64)>,
) -> Result<Json<StateVersionView>, ApiError> {
    caller.require(Scope::InfrastructureDestroy)?;
    let deployment = visible_deployment(&cp, &caller, id).await?;
    // A job reads and writes the state while it drives the deployment, and
    // a destroyed deployment is not destroyed again: a state restored into
    // it would name resources nothing removes.
    if !matches!(
        deployment.status,
        DeploymentStatus::Completed | DeploymentStatus::Failed
    ) {
        return Err(ApiError::conflict(format!(
            "the deployment is {}: a state is restored only into a completed or failed deployment",
            deployment.status.as_str()
        ))
        .with_detail("status", deployment.status.as_str()));
    }
    let (kept, sealed) = cp
        .store
        .terraform_state_version(id, version)
        .await?
        .ok_or_else(|| ApiError::not_found("no such state version"))?;
    let plain = cp
        .sealer
        .open(&sealed, &terraform_state_version_context(kept.id))
        .map_err(ApiError::internal)?;
    if hex::encode(sha2::Sha256::digest(&plain)) != kept.sha256 {
        return Err(ApiError::internal(format!(
            "state version {version} of deployment {id} does not match its checksum"
        )));
    }
    let write = super::terraform_state::state_write(&cp, id, &plain, kept.serial, Some(version));
    match cp
        .store
        .write_terraform_state_version(id, &write, None, Utc::now())
        .await?
    {
        LockOutcome::Done => {}
        LockOutcome::HeldBy(holder) => {
            return Err(ApiError::conflict(
                "the state is locked by a terraform run; restore once it is released",
            )
            .with_detail("state_lock", holder))
        }
    }
    let current = cp
        .store
        .terraform_state_versions(id)
        .await?
        .into_iter()
        .find(|v| v.id == write.version_id)
        .ok_or_else(|| ApiError::internal("the restored version was not kept"))?;
    caller
        .audit(
            &cp,
            deployment.organization_id,
            "infrastructure.state_restore",
            id.to_string(),
            serde_json::json!({
                "restored_version": version,
                "new_version": current.version,
                "sha256": current.sha256,
            }),
        )
        .await;
    Ok(Json(current.into()))
}
