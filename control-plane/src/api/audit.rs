//! `GET /api/v1/audit-log`: the append-only record of every write, newest
//! first, filtered and paginated. Needs `admin`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, ApiQuery, Caller, Page};
use crate::app::ControlPlane;
use crate::auth::Scope;
use crate::store::AuditQuery;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListAudit {
    pub organization_id: Option<Uuid>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AuditView {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub organization_id: Option<Uuid>,
    pub action: String,
    pub target: Option<String>,
    pub source_ip: Option<String>,
    pub outcome: String,
    pub detail: serde_json::Value,
}

pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListAudit>,
) -> Result<Json<Page<AuditView>>, ApiError> {
    caller.require(Scope::Admin)?;
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let before_seq = params
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid_request("cursor is not valid"))
        })
        .transpose()?;
    let (scope, include_unscoped) = match params.organization_id {
        Some(org) if caller.sees(org) => (cp.store.organization_scope(org).await?, false),
        Some(_) => return Err(ApiError::not_found("no such organization")),
        None => (
            caller.visible_organizations.clone(),
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
