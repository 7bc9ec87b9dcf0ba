//! The authenticated caller of an API request: bearer token verified,
//! revocation checked in the store, organization scope resolved.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use chrono::Utc;
use uuid::Uuid;

use super::error::ApiError;
use crate::auth::{Scope, TokenError};
use crate::context::ControlPlane;
use crate::store::AuditEntry;

/// Who is calling, and what they may see.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: Uuid,
    pub organization_id: Uuid,
    pub scopes: Vec<Scope>,
    /// The caller's organization and its descendants.
    pub visible_organizations: Vec<Uuid>,
    pub source_ip: Option<String>,
}

impl Caller {
    /// Fails with 403 unless the token carries `scope` (or `admin`).
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(
                ApiError::forbidden(format!("this token lacks the {} scope", scope.as_str()))
                    .with_detail("required_scope", scope.as_str()),
            )
        }
    }

    /// Whether `organization_id` is the caller's or one of its descendants.
    pub fn sees(&self, organization_id: Uuid) -> bool {
        self.visible_organizations.contains(&organization_id)
    }

    /// The audit actor name.
    pub fn actor(&self) -> String {
        format!("token:{}", self.token_id)
    }

    /// Appends a successful write to the audit log.
    pub async fn audit(
        &self,
        cp: &ControlPlane,
        organization_id: Uuid,
        action: &str,
        target: String,
        detail: serde_json::Value,
    ) {
        let entry = AuditEntry {
            id: Uuid::now_v7(),
            at: Utc::now(),
            actor: self.actor(),
            organization_id: Some(organization_id),
            action: action.into(),
            target: Some(target),
            source_ip: self.source_ip.clone(),
            outcome: "success".into(),
            detail,
        };
        if let Err(e) = cp.store.append_audit(&entry).await {
            tracing::error!(error = %e, action, "could not write the audit log");
        }
    }
}

impl FromRequestParts<Arc<ControlPlane>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing Authorization: Bearer <token> header")
            })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("Authorization header must be 'Bearer <token>'")
            })?;
        let claims = cp.tokens.verify(token).map_err(|e| match e {
            TokenError::Expired => ApiError::unauthorized("token has expired"),
            TokenError::Invalid => ApiError::unauthorized("token is invalid"),
        })?;
        let record = cp
            .store
            .api_token(claims.jti)
            .await?
            .ok_or_else(|| ApiError::unauthorized("token is not known"))?;
        if record.revoked_at.is_some() {
            return Err(ApiError::unauthorized("token has been revoked"));
        }
        if record.organization_id != claims.org {
            return Err(ApiError::unauthorized("token is invalid"));
        }
        let visible_organizations = cp.store.organization_scope(claims.org).await?;
        if visible_organizations.is_empty() {
            return Err(ApiError::unauthorized(
                "the token's organization no longer exists",
            ));
        }
        let source_ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string());
        Ok(Caller {
            token_id: claims.jti,
            organization_id: claims.org,
            scopes: claims.scopes,
            visible_organizations,
            source_ip,
        })
    }
}
