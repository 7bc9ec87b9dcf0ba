//! `GET /api/v1/audit-log`: the append-only record of every write, newest
//! first, filtered and paginated. Needs `admin`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, Page};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::AuditQuery;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListAudit {
    /// Entries of this organization and its descendants.
    pub organization_id: Option<Uuid>,
    /// Exact actor, e.g. `token:<id>`.
    pub actor: Option<String>,
    /// Exact action, e.g. `token.create`.
    pub action: Option<String>,
    /// Entries at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Entries at or before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Page size, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One audit log entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub organization_id: Option<Uuid>,
    pub action: String,
    pub target: Option<String>,
    pub source_ip: Option<String>,
    pub outcome: String,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Lists audit log entries, newest first. Needs `admin`.
#[utoipa::path(
    get,
    path = "/audit-log",
    operation_id = "list_audit_log",
    tag = "audit",
    params(ListAudit),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of entries, newest first.", body = Page<AuditView>),
        (status = 400, description = "`invalid_request`: a malformed filter, limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `admin`.", body = ErrorBody),
        (status = 404, description = "`not_found`: `organization_id` is not in the caller's tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListAudit>,
) -> Result<Json<Page<AuditView>>, ApiError> {
    caller.require(Scope::Admin)?;
    for (name, filter) in [("actor", &params.actor), ("action", &params.action)] {
        if filter
            .as_deref()
            .is_some_and(super::extract::has_control_chars)
        {
            return Err(ApiError::invalid_request(format!(
                "{name} must not contain control characters"
            )));
        }
    }
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let before_seq = super::extract::page_cursor(params.cursor.as_deref())?;
    // The log outlives what it records: entries of deleted organizations
    // stay visible to whoever could see those organizations.
    let history = cp
        .store
        .organization_history_scope(caller.organization_id)
        .await?;
    let (scope, include_unscoped) = match params.organization_id {
        Some(org) if history.contains(&org) => {
            (cp.store.organization_history_scope(org).await?, false)
        }
        Some(_) => return Err(ApiError::not_found("no such organization")),
        None => (
            history,
            caller.organization_id == cp.instance.root_organization_id,
        ),
    };
    let records = cp
        .store
        .list_audit(&AuditQuery {
            scope,
            include_unscoped,
            actor: params.actor,
            action: params.action,
            from: params.from,
            to: params.to,
            limit: limit + 1,
            before_seq,
        })
        .await?;
    let has_more = records.len() > limit as usize;
    let records: Vec<_> = records.into_iter().take(limit as usize).collect();
    let next_cursor = has_more
        .then(|| records.last().map(|r| r.seq.to_string()))
        .flatten();
    let data = records
        .into_iter()
        .map(|r| AuditView {
            id: r.entry.id,
            at: r.entry.at,
            actor: r.entry.actor,
            organization_id: r.entry.organization_id,
            action: r.entry.action,
            target: r.entry.target,
            source_ip: r.entry.source_ip,
            outcome: r.entry.outcome,
            detail: r.entry.detail,
        })
        .collect();
    Ok(Json(Page { data, next_cursor }))
}
