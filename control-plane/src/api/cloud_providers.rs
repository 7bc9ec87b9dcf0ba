//! `/api/v1/cloud-providers`: cloud credentials and their lifecycle. Sealed
//! at rest under the master key; never returned, logged or written to disk
//! in clear (the only way out is the environment of a terraform process).
//! `PATCH` rotates fields (merged, checked like a new credential, sealed
//! again; every later terraform run reads them); `validate` stores its
//! outcome (status, time, error); `DELETE` refuses while live deployments
//! use the credential (`credential_in_use`) unless `force`.

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
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::provision::credentials::Provider;
use crate::store::{
    cloud_credential_context, CloudCredential, CredentialDeletion, CredentialUpdate,
    CredentialUpdateOutcome, CredentialValidation, ValidationStatus, MAX_VALIDATION_ERROR,
};

/// Most deployment ids a `credential_in_use` answer (or a forced delete's
/// audit entry) lists; `deployment_count` says how many there are.
pub const MAX_LISTED_DEPLOYMENTS: u32 = 50;

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
    /// `validation_status == valid` (kept for older clients).
    pub is_validated: bool,
    /// The last validation's outcome since the fields last changed.
    pub validation_status: ValidationStatus,
    /// When it was last validated (`null` while unvalidated).
    pub validated_at: Option<DateTime<Utc>>,
    /// What the last validation found wrong (never a credential value).
    pub validation_error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When it was last changed with `PATCH`.
    pub updated_at: Option<DateTime<Utc>>,
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
            validation_status: c.validation.status,
            validated_at: c.validation.at,
            validation_error: c.validation.error,
            created_at: c.created_at,
            updated_at: c.updated_at,
            last_used_at: c.last_used_at,
        }
    }
}

/// The answer of a validation.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationResult {
    pub id: Uuid,
    pub is_validated: bool,
    /// `valid` or `invalid` (stored with the time and the message).
    pub validation_status: ValidationStatus,
    pub validated_at: DateTime<Utc>,
    /// What is wrong, when invalid.
    pub message: Option<String>,
}

/// A change of a credential: any of its fields (merged into the stored ones;
/// `null` removes an optional field), its name, its default region.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCloudCredential {
    #[schema(min_length = 1, max_length = 100)]
    pub name: Option<String>,
    #[schema(min_length = 1, max_length = 64)]
    pub default_region: Option<String>,
    /// Fields to replace, with the provider's names (see create). Never
    /// returned.
    #[schema(value_type = Option<Object>)]
    pub credentials: Option<Map<String, Value>>,
}

impl std::fmt::Debug for UpdateCloudCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateCloudCredential")
            .field("name", &self.name)
            .field("default_region", &self.default_region)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|c| c.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// Options of a delete.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteCloudCredentialQuery {
    /// Delete even while live deployments use it: they can no longer run
    /// terraform (a destroy ends `failed`, their cloud resources stay).
    #[serde(default)]
    pub force: bool,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > 100 || super::extract::has_control_chars(name) {
        return Err(ApiError::validation(
            "name must be 1-100 printable characters",
        ));
    }
    Ok(())
}

fn check_region(region: &str) -> Result<(), ApiError> {
    if region.is_empty() || region.len() > 64 || super::extract::has_control_chars(region) {
        return Err(ApiError::validation(
            "default_region must be 1-64 printable characters",
        ));
    }
    Ok(())
}

/// The fields of a stored credential, unsealed.
fn open_fields(
    cp: &ControlPlane,
    credential: &CloudCredential,
) -> Result<Map<String, Value>, ApiError> {
    let fields = cp
        .sealer
        .open(
            &credential.credentials_sealed,
            &cloud_credential_context(credential.id),
        )
        .map_err(ApiError::internal)?;
    serde_json::from_slice(&fields).map_err(ApiError::internal)
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
    check_name(&body.name)?;
    if let Some(region) = &body.default_region {
        check_region(region)?;
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
        validation: CredentialValidation::default(),
        updated_at: None,
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
        (status = 200, description = "The outcome; `validation_status`, `validated_at` and the message are stored and shown by GET.", body = ValidationResult),
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
    let fields = open_fields(&cp, &credential)?;
    let outcome = match Provider::parse(&credential.provider) {
        Ok(provider) if provider.runs_on_this_machine() => terraform_runs(&cp).await,
        Ok(provider) => provider.check(&fields).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let at = Utc::now();
    // The messages name fields and shapes, never values (CredentialError).
    let message = outcome
        .err()
        .map(|m| m.chars().take(MAX_VALIDATION_ERROR).collect::<String>());
    let status = if message.is_none() {
        ValidationStatus::Valid
    } else {
        ValidationStatus::Invalid
    };
    cp.store
        .record_cloud_credential_validation(
            id,
            &CredentialValidation {
                status,
                at: Some(at),
                error: message.clone(),
            },
        )
        .await?;
    Ok(Json(ValidationResult {
        id,
        is_validated: status == ValidationStatus::Valid,
        validation_status: status,
        validated_at: at,
        message,
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

/// Rotates a credential: the given fields are merged into the stored ones
/// (`null` removes an optional one), checked with the rules of create and
/// sealed again; every later terraform run of its deployments (destroys
/// included) reads the new values. New fields reset the validation to
/// `unvalidated`. Needs `infrastructure:provision`.
#[utoipa::path(
    patch,
    path = "/cloud-providers/{id}",
    operation_id = "update_cloud_credential",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Credential id.")),
    request_body(content = UpdateCloudCredential, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Updated; the fields are never returned.", body = CloudCredentialView),
        (status = 400, description = "`invalid_request`: malformed JSON or id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `infrastructure:provision`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such credential in the caller's tree.", body = ErrorBody),
        (status = 409, description = "`conflict`: the fields changed meanwhile (another rotation); try again.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: nothing to change, invalid name or region, missing, unknown or malformed credential fields.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn update(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateCloudCredential>,
) -> Result<Json<CloudCredentialView>, ApiError> {
    caller.require(Scope::InfrastructureProvision)?;
    if body.name.is_none() && body.default_region.is_none() && body.credentials.is_none() {
        return Err(ApiError::validation(
            "nothing to change: give credentials, name or default_region",
        ));
    }
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    if let Some(region) = &body.default_region {
        check_region(region)?;
    }
    let credential = cp
        .store
        .cloud_credential(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such cloud credential"))?;
    let mut changed_fields: Vec<String> = Vec::new();
    let sealed = match &body.credentials {
        None => None,
        Some(given) => {
            let provider = Provider::parse(&credential.provider)
                .map_err(|e| ApiError::validation(e.to_string()))?;
            let mut fields = open_fields(&cp, &credential)?;
            for (name, value) in given {
                changed_fields.push(name.chars().take(64).collect());
                if value.is_null() {
                    fields.remove(name);
                } else {
                    fields.insert(name.clone(), value.clone());
                }
            }
            provider
                .check(&fields)
                .map_err(|e| ApiError::validation(e.to_string()))?;
            let plain = serde_json::to_vec(&fields).map_err(ApiError::internal)?;
            Some((
                cp.sealer.seal(&plain, &cloud_credential_context(id)),
                credential.credentials_sealed.clone(),
            ))
        }
    };
    let outcome = cp
        .store
        .update_cloud_credential(
            &caller.visible_organizations,
            id,
            &CredentialUpdate {
                name: body.name.clone(),
                default_region: body.default_region.clone(),
                credentials_sealed: sealed,
                at: Utc::now(),
            },
        )
        .await?;
    let updated =
        match outcome {
            CredentialUpdateOutcome::Updated(updated) => *updated,
            CredentialUpdateOutcome::NotFound => {
                return Err(ApiError::not_found("no such cloud credential"))
            }
            CredentialUpdateOutcome::Changed => return Err(ApiError::conflict(
                "the credential's fields changed while this update was made; read it and try again",
            )),
        };
    tracing::info!(credential_id = %id, fields = ?changed_fields, "cloud credential updated");
    caller
        .audit(
            &cp,
            updated.organization_id,
            "cloud_credential.update",
            id.to_string(),
            serde_json::json!({
                "name": updated.name,
                "default_region": updated.default_region,
                "fields_changed": changed_fields,
            }),
        )
        .await;
    Ok(Json(updated.into()))
}

/// Deletes a credential (its sealed fields are erased), refused with 409
/// `credential_in_use` while live deployments (any status but `destroyed`)
/// use it, unless `force`. Needs `infrastructure:provision`.
#[utoipa::path(
    delete,
    path = "/cloud-providers/{id}",
    operation_id = "delete_cloud_credential",
    tag = "provisioning",
    params(("id" = Uuid, Path, description = "Credential id."), DeleteCloudCredentialQuery),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "`invalid_request`: the id or the query is malformed.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`credential_in_use`: live deployments use it (`deployment_ids`: at most 50, oldest first; `deployment_count`); destroy them first or pass `force=true`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn delete(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<DeleteCloudCredentialQuery>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::InfrastructureProvision)?;
    let credential = cp
        .store
        .cloud_credential(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such cloud credential"))?;
    let outcome = cp
        .store
        .delete_unused_cloud_credential(
            &caller.visible_organizations,
            id,
            query.force,
            MAX_LISTED_DEPLOYMENTS,
            Utc::now(),
        )
        .await?;
    let (orphaned, orphaned_count) = match outcome {
        CredentialDeletion::Deleted {
            orphaned,
            orphaned_count,
        } => (orphaned, orphaned_count),
        CredentialDeletion::NotFound => {
            return Err(ApiError::not_found("no such cloud credential"))
        }
        CredentialDeletion::InUse {
            deployment_ids,
            count,
        } => {
            return Err(ApiError::new(
                ErrorCode::CredentialInUse,
                format!(
                "{count} deployment(s) that are not destroyed use this credential: destroy them \
                     first, or pass force=true (they then cannot run terraform any more: a destroy \
                     ends failed and their cloud resources stay)"
            ),
            )
            .with_detail(
                "deployment_ids",
                deployment_ids
                    .iter()
                    .map(|d| Value::String(d.to_string()))
                    .collect::<Vec<_>>(),
            )
            .with_detail("deployment_count", count))
        }
    };
    caller
        .audit(
            &cp,
            credential.organization_id,
            "cloud_credential.delete",
            id.to_string(),
            serde_json::json!({
                "name": credential.name,
                "force": query.force,
                "orphaned_deployment_ids": orphaned,
                "orphaned_deployment_count": orphaned_count,
            }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}
