//! `POST /api/v1/enrollment-tokens`: one-time tokens for adding a server by
//! hand (the same tokens provisioning injects through cloud-init).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::ApiJson;
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::enrollment::issue;
use crate::store::Labels;

const DEFAULT_TTL_SECONDS: i64 = 3600;
const MAX_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// A new enrollment token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    /// Labels the server gets (keys: 1-63 of letters, digits, `._/-`).
    #[serde(default)]
    #[schema(value_type = std::collections::HashMap<String, String>)]
    pub labels: Labels,
    /// Lifetime, 60 s to 7 days (default 1 hour).
    #[schema(minimum = 60, maximum = 604800)]
    pub ttl_seconds: Option<i64>,
    /// Organization the server joins (default: the caller's).
    pub organization_id: Option<Uuid>,
    /// Name the server gets (default: its hostname).
    #[schema(min_length = 1, max_length = 253)]
    pub server_name: Option<String>,
}

/// An enrollment token just created.
#[derive(Serialize, ToSchema)]
pub struct EnrollmentTokenCreated {
    pub id: Uuid,
    /// Shown once; only its hash is stored.
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub ca_fingerprint: String,
    pub quic_address: String,
    pub install_command: String,
}

/// Checks label keys and values.
pub fn validate_labels(labels: &Labels) -> Result<(), ApiError> {
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= 63
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
        if !key_ok {
            return Err(ApiError::validation(format!(
                "label key {key:?} must be 1-63 characters of letters, digits, '.', '_', '/' or '-'"
            )));
        }
        if value.len() > 255 || value.chars().any(char::is_control) {
            return Err(ApiError::validation(format!(
                "label {key:?} has an invalid value"
            )));
        }
    }
    Ok(())
}

/// Creates a one-time enrollment token for adding a server by hand. Needs `servers:write`.
#[utoipa::path(
    post,
    path = "/enrollment-tokens",
    operation_id = "create_enrollment_token",
    tag = "enrollment",
    request_body(content = CreateEnrollmentToken, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The token, shown this once, and how to use it.", body = EnrollmentTokenCreated),
        (status = 400, description = "`invalid_request`: malformed JSON or not `Content-Type: application/json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`; or `quota_exceeded`: the organization (or an ancestor) has no room for another server (details: `organization_id`, `resource`, `limit`, `usage`, `requested`).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body is larger than 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: wrong types, unknown fields, invalid labels, server name or ttl.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn create(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateEnrollmentToken>,
) -> Result<(StatusCode, Json<EnrollmentTokenCreated>), ApiError> {
    caller.require(Scope::ServersWrite)?;
    let organization_id = body.organization_id.unwrap_or(caller.organization_id);
    if !caller.sees(organization_id) {
        return Err(ApiError::not_found("no such organization"));
    }
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
    if !(60..=MAX_TTL_SECONDS).contains(&ttl) {
        return Err(ApiError::validation(format!(
            "ttl_seconds must be between 60 and {MAX_TTL_SECONDS}"
        )));
    }
    validate_labels(&body.labels)?;
    let one_server = crate::store::Usage {
        servers: 1,
        ..Default::default()
    };
    crate::quota::check(&*cp.store, organization_id, one_server).await??;
    if let Some(name) = &body.server_name {
        if name.trim().is_empty() || name.len() > 253 || super::extract::has_control_chars(name) {
            return Err(ApiError::validation(
                "server_name must be 1-253 printable characters",
            ));
        }
    }
    let (token, record) = issue(
        &*cp.store,
        organization_id,
        body.labels.clone(),
        body.server_name.clone(),
        ttl,
    )
    .await?;
    caller
        .audit(
            &cp,
            organization_id,
            "enrollment_token.create",
            record.id.to_string(),
            serde_json::json!({ "ttl_seconds": ttl, "labels": body.labels }),
        )
        .await;
    let ca_fingerprint = cp.pki.ca.fingerprint().to_string();
    let install_command = format!(
        "TETHER_AGENT_TOKEN='{token}' tether-agent enroll --server {} --ca-fingerprint {ca_fingerprint} && tether-agent run",
        cp.public_quic_addr
    );
    Ok((
        StatusCode::CREATED,
        Json(EnrollmentTokenCreated {
            id: record.id,
            token,
            expires_at: record.expires_at,
            ca_fingerprint,
            quic_address: cp.public_quic_addr.clone(),
            install_command,
        }),
    ))
}
