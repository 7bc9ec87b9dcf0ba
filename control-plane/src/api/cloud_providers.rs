//! `/api/v1/cloud-providers`: cloud credentials. Sealed at rest under the
//! master key; never returned, logged or written to disk in clear (the only
//! way out is the environment of a terraform process).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::provision::credentials::Provider;
use crate::store::{cloud_credential_context, CloudCredential};

/// A credential to store.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCloudCredential {
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// aws, digitalocean, hetzner, gcp, azure or local.
    pub provider: String,
    /// The provider's fields: aws `{access_key_id, secret_access_key,
    /// session_token?}`, digitalocean/hetzner `{token}`, gcp
    /// `{credentials_json, project}`, azure `{client_id, client_secret,
    /// tenant_id, subscription_id}`, local `{}`. Never returned.
    #[schema(value_type = Object)]
    pub credentials: Map<String, Value>,
    pub default_region: Option<String>,
    /// Organization owning it (default: the caller's).
    pub organization_id: Option<Uuid>,
}

impl std::fmt::Debug for CreateCloudCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateCloudCredential")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("credentials", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A stored credential (its fields are never shown).
#[derive(Debug, Serialize, ToSchema)]
pub struct CloudCredentialView {
    pub id: Uuid,
    pub name: String,
    pub provider: String,
    pub default_region: Option<String>,
    pub organization_id: Uuid,
    pub is_validated: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<CloudCredential> for CloudCredentialView {
    fn from(c: CloudCredential) -> Self {
        Self {
            id: c.id,
            name: c.name,
            provider: c.provider,
            default_region: c.default_region,
            organization_id: c.organization_id,
            is_validated: c.is_validated,
            created_at: c.created_at,
            last_used_at: c.last_used_at,
        }
    }
}

/// The answer of a validation.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationResult {
    pub id: Uuid,
    pub is_validated: bool,
    /// What is wrong, when invalid.
    pub message: Option<String>,
}

/// The list of credentials.
#[derive(Debug, Serialize, ToSchema)]
pub struct CloudCredentialList {
    pub data: Vec<CloudCredentialView>,
    pub next_cursor: Option<String>,
}

/// Stores a cloud credential, sealed. Needs `infrastructure:provision`.
#[utoipa::path(
    post,
    path = "/cloud-providers",
    operation_id = "create_cloud_credential",
    tag = "provisioning",
    request_body(content = CreateCloudCredential, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored; the fields are never returned.", body = CloudCredentialView),
        (status = 400, description = "`invalid_request`: malformed JSON.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `infrastructure:provision`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: unknown provider, missing or unknown credential fields.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn create(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateCloudCredential>,
) -> Result<(StatusCode, Json<CloudCredentialView>), ApiError> {
    caller.require(Scope::InfrastructureProvision)?;
    let organization_id = body.organization_id.unwrap_or(caller.organization_id);
    if !caller.sees(organization_id) {
        return Err(ApiError::not_found("no such organization"));
    }
    if body.name.trim().is_empty()
        || body.name.len() > 100
        || super::extract::has_control_chars(&body.name)
    {
        return Err(ApiError::validation(
            "name must be 1-100 printable characters",
        ));
    }
    if let Some(region) = &body.default_region {
        if region.is_empty() || region.len() > 64 || super::extract::has_control_chars(region) {
            return Err(ApiError::validation(
                "default_region must be 1-64 printable characters",
            ));
        }
    }
    let provider =
        Provider::parse(&body.provider).map_err(|e| ApiError::validation(e.to_string()))?;
    provider
        .check(&body.credentials)
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let id = Uuid::now_v7();
    let fields = serde_json::to_vec(&body.credentials).map_err(ApiError::internal)?;
    let credential = CloudCredential {
        id,
        organization_id,
        name: body.name.clone(),
        provider: provider.as_str().into(),
        default_region: body.default_region.clone(),
        credentials_sealed: cp.sealer.seal(&fields, &cloud_credential_context(id)),
        is_validated: false,
        created_at: Utc::now(),
        last_used_at: None,
    };
    cp.store.create_cloud_credential(&credential).await?;
    caller
        .audit(
            &cp,
            organization_id,
            "cloud_credential.create",
            id.to_string(),
            serde_json::json!({ "name": credential.name, "provider": credential.provider }),
        )
        .await;
    Ok((StatusCode::CREATED, Json(credential.into())))
}

/// Lists the credentials of the caller's organization tree (never their fields).
#[utoipa::path(
    get,
    path = "/cloud-providers",
    operation_id = "list_cloud_credentials",
    tag = "provisioning",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The credentials.", body = CloudCredentialList),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `infrastructure:provision`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
) -> Result<Json<CloudCredentialList>, ApiError> {
    caller.require(Scope::InfrastructureProvision)?;
    let data = cp
        .store
        .list_cloud_credentials(&caller.visible_organizations)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(CloudCredentialList {
        data,
        next_cursor: None,
    }))
}

/// Checks a stored credential: every field the provider needs, in the shape
/// it documents (for `local`: that the terraform binary runs). Needs
/// `infrastructure:provision`.
#[utoipa::path(
    post,
    path = "/cloud-providers/{id}/validate",
    operation_id = "validate_cloud_credential",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Credential id.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The outcome; `is_validated` is stored.", body = ValidationResult),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn validate(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ValidationResult>, ApiError> {
    caller.require(Scope::InfrastructureProvision)?;
    let credential = cp
        .store
        .cloud_credential(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such cloud credential"))?;
    let fields = cp
        .sealer
        .open(
            &credential.credentials_sealed,
            &cloud_credential_context(id),
        )
        .map_err(ApiError::internal)?;
    let fields: Map<String, Value> = serde_json::from_slice(&fields).map_err(ApiError::internal)?;
    let outcome = match Provider::parse(&credential.provider) {
        Ok(provider) if provider.runs_on_this_machine() => terraform_runs(&cp).await,
        Ok(provider) => provider.check(&fields).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let is_validated = outcome.is_ok();
    cp.store
        .mark_cloud_credential(id, Some(is_validated), Utc::now())
        .await?;
    Ok(Json(ValidationResult {
        id,
        is_validated,
        message: outcome.err(),
    }))
}

async fn terraform_runs(cp: &ControlPlane) -> Result<(), String> {
    let output = tokio::process::Command::new(&cp.config.terraform_bin)
        .arg("version")
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", cp.config.terraform_bin.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} version failed",
            cp.config.terraform_bin.display()
        ))
    }
}

/// Deletes a credential (its sealed fields are erased). Needs `infrastructure:provision`.
#[utoipa::path(
    delete,
    path = "/cloud-providers/{id}",
    operation_id = "delete_cloud_credential",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Credential id.")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn delete(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::InfrastructureProvision)?;
    let credential = cp
        .store
        .cloud_credential(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such cloud credential"))?;
    if !cp
        .store
        .delete_cloud_credential(&caller.visible_organizations, id, Utc::now())
        .await?
    {
        return Err(ApiError::not_found("no such cloud credential"));
    }
    caller
        .audit(
            &cp,
            credential.organization_id,
            "cloud_credential.delete",
            id.to_string(),
            serde_json::json!({ "name": credential.name }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}
