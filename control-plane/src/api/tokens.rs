//! `/api/v1/tokens`: API tokens (JWTs) for an organization, shown once,
//! revocable by id. A token can only grant scopes its creator has.

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
use super::extract::{ApiJson, ApiPath};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::ApiToken;

const DEFAULT_TTL_SECONDS: i64 = 90 * 24 * 3600;
const MAX_TTL_SECONDS: i64 = 2 * 365 * 24 * 3600;

/// A new API token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// 1-200 characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// The organization the token acts for (the caller's or a descendant).
    pub organization_id: Uuid,
    /// At least one; only scopes the caller has.
    #[schema(value_type = Vec<Scope>, min_items = 1)]
    pub scopes: Vec<String>,
    /// Lifetime, 60 s to 2 years (default 90 days).
    #[schema(minimum = 60, maximum = 63072000)]
    pub ttl_seconds: Option<i64>,
}

/// A token just created.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    pub id: Uuid,
    /// The token itself: shown once, never stored.
    pub token: String,
    pub name: String,
    pub organization_id: Uuid,
    pub scopes: Vec<Scope>,
    pub expires_at: DateTime<Utc>,
}

/// Creates an API token for an organization in the caller's tree, with scopes the caller has. Needs `admin`.
#[utoipa::path(
    post,
    path = "/tokens",
    operation_id = "create_token",
    tag = "tokens",
    request_body(content = CreateToken, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The token, shown this once.", body = TokenCreated,
            links(
                ("revoke" = (operation_id = "revoke_token", parameters(("id" = "$response.body#/id")), description = "Revoke it.")),
            )),
        (status = 400, description = "`invalid_request`: malformed JSON or not `Content-Type: application/json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `admin` (or a scope it tries to grant).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body is larger than 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: wrong types, unknown fields, an empty name, unknown or no scopes, or a ttl out of range.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn create(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    caller.require(Scope::Admin)?;
    if body.name.trim().is_empty()
        || body.name.len() > 200
        || super::extract::has_control_chars(&body.name)
    {
        return Err(ApiError::validation(
            "name must be 1-200 printable characters",
        ));
    }
    if !caller.sees(body.organization_id)
        || cp.store.organization(body.organization_id).await?.is_none()
    {
        return Err(ApiError::not_found("no such organization"));
    }
    let mut scopes = Vec::new();
    for name in &body.scopes {
        let scope = Scope::parse(name)
            .ok_or_else(|| ApiError::validation(format!("unknown scope {name:?}")))?;
        caller.require(scope)?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(ApiError::validation("scopes must name at least one scope"));
    }
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
    if !(60..=MAX_TTL_SECONDS).contains(&ttl) {
        return Err(ApiError::validation(format!(
            "ttl_seconds must be between 60 and {MAX_TTL_SECONDS}"
        )));
    }
    let now = Utc::now();
    let record = ApiToken {
        id: Uuid::now_v7(),
        organization_id: body.organization_id,
        name: body.name.trim().to_string(),
        scopes: scopes.iter().map(|s| s.as_str().to_string()).collect(),
        created_at: now,
        expires_at: Some(now + chrono::Duration::seconds(ttl)),
        revoked_at: None,
    };
    cp.store.create_api_token(&record).await?;
    let expires_at = now + chrono::Duration::seconds(ttl);
    let token = cp.tokens.issue(
        record.id,
        record.organization_id,
        scopes.clone(),
        now,
        expires_at,
    );
    caller
        .audit(
            &cp,
            record.organization_id,
            "token.create",
            record.id.to_string(),
            serde_json::json!({ "name": record.name, "scopes": record.scopes }),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            id: record.id,
            token,
            name: record.name,
            organization_id: record.organization_id,
            scopes,
            expires_at,
        }),
    ))
}

/// Revokes an API token; it is refused from the next request on. Needs `admin`.
#[utoipa::path(
    delete,
    path = "/tokens/{id}",
    operation_id = "revoke_token",
    tag = "tokens",
    params(("id" = Uuid, Path, description = "Token id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked."),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `admin`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such (unrevoked) token in the caller's tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn revoke(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    let record = cp
        .store
        .api_token(id)
        .await?
        .filter(|t| caller.sees(t.organization_id));
    let Some(record) = record else {
        return Err(ApiError::not_found("no such token"));
    };
    if !cp
        .store
        .revoke_api_token(&caller.visible_organizations, id, Utc::now())
        .await?
    {
        return Err(ApiError::not_found("no such token (or already revoked)"));
    }
    caller
        .audit(
            &cp,
            record.organization_id,
            "token.revoke",
            id.to_string(),
            serde_json::json!({ "name": record.name }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}
