//! `/api/v1/tokens`: API tokens (JWTs) for an organization, shown once,
//! revocable by id. A token can only grant scopes its creator has.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, Caller};
use crate::app::ControlPlane;
use crate::auth::Scope;
use crate::store::ApiToken;

const DEFAULT_TTL_SECONDS: i64 = 90 * 24 * 3600;
const MAX_TTL_SECONDS: i64 = 2 * 365 * 24 * 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub organization_id: Uuid,
    pub scopes: Vec<String>,
    pub ttl_seconds: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct TokenCreated {
    pub id: Uuid,
    /// The token itself: shown once, never stored.
    pub token: String,
    pub name: String,
    pub organization_id: Uuid,
    pub scopes: Vec<Scope>,
    pub expires_at: DateTime<Utc>,
}

pub async fn create(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    caller.require(Scope::Admin)?;
    if body.name.trim().is_empty() || body.name.len() > 200 {
        return Err(ApiError::validation("name must be 1-200 characters"));
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
