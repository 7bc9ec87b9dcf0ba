//! `/api/v1/servers/{id}/health` (latest result of every check of a server,
//! run-now) and `/api/v1/health-checks` (checks pushed to agents), scoped to
//! the caller's organization tree.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Page};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::health::{
    HealthCheck, HealthCheckKind, HealthCheckSpecFields, HealthResultRecord, HealthSelector,
    ServerRef,
};
use crate::store::selector::{self, InputLimits, SelectorInputError};
use crate::store::{Labels, ServerStatus};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;
const MAX_NAME_BYTES: usize = 128;
/// Most `selector.server_ids` a check takes.
const MAX_SELECTOR_SERVER_IDS: usize = 10_000;
const DEFAULT_INTERVAL_SECONDS: i64 = 30;
const DEFAULT_TIMEOUT_SECONDS: i64 = 10;
const DEFAULT_RETRIES: i64 = 3;

/// The latest result of one check on a server.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResultView {
    /// The pushed check's id, or `builtin:<name>` (`builtin:docker`,
    /// `builtin:disk`, `builtin:memory`, `builtin:control_plane`, `builtin:clock_skew`).
    pub check_id: String,
    pub name: String,
    /// `starting`, `passing`, `failing`, or `rejected` (the agent refused
    /// the check, e.g. its command policy forbids it; `message` says why).
    pub status: String,
    /// What the last run said (status line, error, program output).
    pub message: String,
    pub consecutive_failures: i64,
    /// When the run ended, by the agent's clock.
    pub checked_at: DateTime<Utc>,
    pub duration_ms: i64,
    /// When the control plane stored it.
    pub received_at: DateTime<Utc>,
}

impl From<HealthResultRecord> for HealthResultView {
    fn from(r: HealthResultRecord) -> Self {
        Self {
            check_id: r.check_id,
            name: r.name,
            status: r.status,
            message: r.message,
            consecutive_failures: r.consecutive_failures,
            checked_at: r.checked_at,
            duration_ms: r.duration_ms,
            received_at: r.received_at,
        }
    }
}

/// A server's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerHealthView {
    pub server_id: Uuid,
    /// `failing` when a check fails (or was refused by the agent), `passing` when every check passes,
    /// `unknown` otherwise (no results yet, or checks still starting).
    pub status: String,
    /// The server's connection state: results of a server that is not
    /// `online` are its last known ones.
    pub server_status: ServerStatus,
    pub checks: Vec<HealthResultView>,
    /// Set when the server belongs to a peer branch (read through
    /// `GET /branches/{branch_id}/servers/{server_id}/health`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch_id: Option<Uuid>,
}

/// What a run-now request started.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthRunAccepted {
    pub server_id: Uuid,
    /// Results checked after this time come from this run.
    pub requested_at: DateTime<Utc>,
    /// Set when the server belongs to a peer branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch_id: Option<Uuid>,
}

/// A health check as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthCheckView {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub kind: HealthCheckKind,
    pub spec: HealthCheckSpecFields,
    pub interval_seconds: i64,
    pub timeout_seconds: i64,
    pub retries: i64,
    pub start_period_seconds: i64,
    pub selector: HealthSelector,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<HealthCheck> for HealthCheckView {
    fn from(c: HealthCheck) -> Self {
        Self {
            id: c.id,
            organization_id: c.organization_id,
            name: c.name,
            kind: c.kind,
            spec: c.spec,
            interval_seconds: c.interval_seconds,
            timeout_seconds: c.timeout_seconds,
            retries: c.retries,
            start_period_seconds: c.start_period_seconds,
            selector: c.selector,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// A new health check. Docker `HEALTHCHECK` semantics: it runs every
/// `interval_seconds`, each run limited to `timeout_seconds`; it is
/// `starting` until its first success, failures in the first
/// `start_period_seconds` do not count, `retries` failures in a row make it
/// `failing`, one success makes it `passing`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHealthCheck {
    /// At most 128 bytes.
    pub name: String,
    pub kind: HealthCheckKind,
    /// `http`: `url` (http:// or https://), `expected_status` (default any
    /// 2xx), `body_contains`; `tcp`: `address` (`host:port`); `exec`: `argv`.
    pub spec: HealthCheckSpecFields,
    /// 1-86400, default 30.
    pub interval_seconds: Option<i64>,
    /// 1-3600, default 10.
    pub timeout_seconds: Option<i64>,
    /// 0-100 (0 counts as 1), default 3.
    pub retries: Option<i64>,
    /// 0-86400, default 0.
    pub start_period_seconds: Option<i64>,
    /// Which servers run it (default: every server of the organization tree).
    pub selector: Option<HealthSelector>,
    /// Default: the caller's organization.
    pub organization_id: Option<Uuid>,
}

/// Changes to a health check (absent fields stay as they are).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateHealthCheck {
    pub name: Option<String>,
    pub kind: Option<HealthCheckKind>,
    pub spec: Option<HealthCheckSpecFields>,
    pub interval_seconds: Option<i64>,
    pub timeout_seconds: Option<i64>,
    pub retries: Option<i64>,
    pub start_period_seconds: Option<i64>,
    pub selector: Option<HealthSelector>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListHealthChecks {
    /// Page size, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn in_range(field: &str, value: i64, min: i64, max: i64) -> Result<i64, ApiError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ApiError::validation(format!(
            "{field} must be between {min} and {max}"
        )))
    }
}

/// Checks a check's fields; the error says which one is wrong.
pub fn validate(check: &HealthCheck) -> Result<(), ApiError> {
    let name = check.name.trim();
    if name.is_empty()
        || check.name.len() > MAX_NAME_BYTES
        || super::extract::has_control_chars(name)
    {
        return Err(ApiError::validation(
            "name must be 1-128 bytes without control characters",
        ));
    }
    in_range("interval_seconds", check.interval_seconds, 1, 86_400)?;
    in_range("timeout_seconds", check.timeout_seconds, 1, 3_600)?;
    in_range("retries", check.retries, 0, 100)?;
    in_range(
        "start_period_seconds",
        check.start_period_seconds,
        0,
        86_400,
    )?;
    let spec = &check.spec;
    let text_ok = |s: &str| !s.is_empty() && !s.contains('\0');
    match check.kind {
        HealthCheckKind::Http => {
            let url = spec.url.as_deref().unwrap_or_default();
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || !text_ok(url)
                || url.len() > 2048
            {
                return Err(ApiError::validation(
                    "an http check needs spec.url starting with http:// or https:// (at most 2048 bytes)",
                ));
            }
            if spec
                .expected_status
                .is_some_and(|s| !(100..=599).contains(&s))
            {
                return Err(ApiError::validation(
                    "spec.expected_status must be between 100 and 599",
                ));
            }
            if spec.body_contains.as_deref().is_some_and(|b| !text_ok(b)) {
                return Err(ApiError::validation("spec.body_contains must not be empty"));
            }
            if spec.address.is_some() || spec.argv.is_some() {
                return Err(ApiError::validation(
                    "an http check takes spec.url, spec.expected_status and spec.body_contains only",
                ));
            }
        }
        HealthCheckKind::Tcp => {
            let address = spec.address.as_deref().unwrap_or_default();
            let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            }) && text_ok(address)
                && address.len() <= 512;
            if !valid {
                return Err(ApiError::validation(
                    "a tcp check needs spec.address as host:port",
                ));
            }
            if spec.url.is_some()
                || spec.expected_status.is_some()
                || spec.body_contains.is_some()
                || spec.argv.is_some()
            {
                return Err(ApiError::validation("a tcp check takes spec.address only"));
            }
        }
        HealthCheckKind::Exec => {
            let argv = spec.argv.as_deref().unwrap_or_default();
            if argv.first().is_none_or(|program| !text_ok(program))
                || argv.iter().any(|a| a.contains('\0'))
                || argv.len() > 256
            {
                return Err(ApiError::validation(
                    "an exec check needs spec.argv: the program, then its arguments",
                ));
            }
            if spec.url.is_some()
                || spec.expected_status.is_some()
                || spec.body_contains.is_some()
                || spec.address.is_some()
            {
                return Err(ApiError::validation("an exec check takes spec.argv only"));
            }
        }
    }
    let no_labels = Labels::new();
    selector::check_input(
        check.selector.labels.as_ref().unwrap_or(&no_labels),
        check.selector.server_ids.as_deref().unwrap_or_default(),
        InputLimits {
            max_labels: usize::MAX,
            max_server_ids: MAX_SELECTOR_SERVER_IDS,
        },
    )
    .map_err(|e| match e {
        SelectorInputError::TooManyServerIds { .. } => ApiError::validation(format!(
            "selector.server_ids holds at most {MAX_SELECTOR_SERVER_IDS} ids"
        )),
        SelectorInputError::TooManyLabels { .. }
        | SelectorInputError::ControlCharacters
        | SelectorInputError::EmptyLabelKey => ApiError::validation(
            "selector.labels keys must not be empty; keys and values must not contain control characters",
        ),
    })?;
    Ok(())
}

/// What the audit log records of a created or changed check: its name,
/// kind and, for an exec check, the argv it runs.
fn audit_details(check: &HealthCheck) -> serde_json::Value {
    let mut details = serde_json::json!({ "name": check.name, "kind": check.kind });
    if let Some(argv) = check.spec.argv.as_ref() {
        details["argv"] = serde_json::json!(argv);
    }
    details
}

/// The latest result of every check of a server.
#[utoipa::path(
    get,
    path = "/servers/{id}/health",
    operation_id = "get_server_health",
    tag = "health",
    params(("id" = Uuid, Path, description = "Server id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The server's health and the latest result of each check, by check id.", body = ServerHealthView),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such server in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn server_health(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ServerHealthView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let server = cp
        .store
        .server(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such server"))?;
    let results = cp.store.health_results(id).await?;
    let status = crate::health::overall_status(&results);
    Ok(Json(ServerHealthView {
        server_id: id,
        status: status.into(),
        server_status: server.status,
        checks: results.into_iter().map(HealthResultView::from).collect(),
        branch_id: None,
    }))
}

/// Runs every check of the server now; the results replace the latest ones
/// within seconds (`GET /servers/{id}/health`).
#[utoipa::path(
    post,
    path = "/servers/{id}/health/run",
    operation_id = "run_server_health_checks",
    tag = "health",
    params(("id" = Uuid, Path, description = "Server id")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The agent was asked to run every check now.", body = HealthRunAccepted),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such server in the caller's organization tree.", body = ErrorBody),
        (status = 409, description = "`conflict`: the server is not connected (details: `server_status`), or its session is held by another control-plane replica.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn run_now(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(StatusCode, Json<HealthRunAccepted>), ApiError> {
    caller.require(Scope::ServersWrite)?;
    let server = cp
        .store
        .server(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such server"))?;
    if cp.sessions.connection(id).is_none() {
        let error = if server.status == ServerStatus::Online {
            ApiError::conflict(
                "the server's session is held by another control-plane replica; \
                 send this request to that replica",
            )
        } else {
            ApiError::conflict(format!(
                "the server is {}, so its checks cannot run now{}",
                server.status.as_str(),
                server
                    .status_reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ))
        };
        return Err(error.with_detail("server_status", server.status.as_str()));
    }
    let requested_at = Utc::now();
    let target = ServerRef {
        id,
        organization_id: server.organization_id,
        name: server.name.clone(),
    };
    let task_cp = cp.clone();
    tokio::spawn(
        async move {
            if let Err(e) = crate::health::run_now(&task_cp, &target).await {
                tracing::warn!(error = %e, "run-now of health checks failed");
            }
        }
        .instrument(tracing::info_span!("health_run_now", server_id = %id)),
    );
    caller
        .audit(
            &cp,
            server.organization_id,
            "server.health.run",
            id.to_string(),
            serde_json::json!({ "name": server.name }),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(HealthRunAccepted {
            server_id: id,
            requested_at,
            branch_id: None,
        }),
    ))
}

/// Lists the health checks of the caller's organization tree.
#[utoipa::path(
    get,
    path = "/health-checks",
    operation_id = "list_health_checks",
    tag = "health",
    params(ListHealthChecks),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of health checks, by id.", body = Page<HealthCheckView>),
        (status = 400, description = "`invalid_request`: a malformed limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn list_checks(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListHealthChecks>,
) -> Result<Json<Page<HealthCheckView>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = super::extract::page_cursor(params.cursor.as_deref())?;
    let checks = cp
        .store
        .list_health_checks(&caller.visible_organizations, limit + 1, after)
        .await?;
    Ok(Json(Page::from_rows(
        checks,
        limit,
        |c| c.id.to_string(),
        HealthCheckView::from,
    )))
}

/// Creates a health check; the servers it selects that are connected to
/// this control plane get it at once, the others at their next session.
/// An exec check also needs `commands:run`; the audit entry records its argv.
#[utoipa::path(
    post,
    path = "/health-checks",
    operation_id = "create_health_check",
    tag = "health",
    request_body(content = CreateHealthCheck, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The check.", body = HealthCheckView),
        (status = 400, description = "`invalid_request`: malformed JSON or not `Content-Type: application/json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`, or `commands:run` for an exec check (details: `required_scope`).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body is larger than 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: wrong types, unknown fields, or an invalid name, spec, timing or selector.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn create_check(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateHealthCheck>,
) -> Result<(StatusCode, Json<HealthCheckView>), ApiError> {
    caller.require(Scope::ServersWrite)?;
    if body.kind == HealthCheckKind::Exec {
        // An exec check runs a program on every server it selects.
        caller.require(Scope::CommandsRun)?;
    }
    let organization_id = body.organization_id.unwrap_or(caller.organization_id);
    if !caller.sees(organization_id) {
        return Err(ApiError::not_found("no such organization"));
    }
    let now = Utc::now();
    let check = HealthCheck {
        id: Uuid::now_v7(),
        organization_id,
        name: body.name.trim().to_string(),
        kind: body.kind,
        spec: body.spec,
        interval_seconds: body.interval_seconds.unwrap_or(DEFAULT_INTERVAL_SECONDS),
        timeout_seconds: body.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS),
        retries: body.retries.unwrap_or(DEFAULT_RETRIES),
        start_period_seconds: body.start_period_seconds.unwrap_or(0),
        selector: body.selector.unwrap_or_default(),
        created_at: now,
        updated_at: now,
    };
    validate(&check)?;
    cp.store.create_health_check(&check).await?;
    tracing::info!(check_id = %check.id, kind = check.kind.as_str(), "health check created");
    caller
        .audit(
            &cp,
            organization_id,
            "health_check.create",
            check.id.to_string(),
            audit_details(&check),
        )
        .await;
    crate::health::spawn_repush(cp.clone(), None, Some(check.clone()));
    Ok((StatusCode::CREATED, Json(check.into())))
}

/// One health check.
#[utoipa::path(
    get,
    path = "/health-checks/{id}",
    operation_id = "get_health_check",
    tag = "health",
    params(("id" = Uuid, Path, description = "Health check id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The check.", body = HealthCheckView),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such check in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn get_check(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<HealthCheckView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let check = cp
        .store
        .health_check(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such health check"))?;
    Ok(Json(check.into()))
}

/// Changes a health check and re-pushes it to the connected servers it
/// applied or applies to. A check that is or becomes an exec check also
/// needs `commands:run`.
#[utoipa::path(
    patch,
    path = "/health-checks/{id}",
    operation_id = "update_health_check",
    tag = "health",
    params(("id" = Uuid, Path, description = "Health check id")),
    request_body(content = UpdateHealthCheck, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The changed check.", body = HealthCheckView),
        (status = 400, description = "`invalid_request`: malformed JSON or not `Content-Type: application/json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`, or `commands:run` when the check is or becomes an exec check (details: `required_scope`).", body = ErrorBody),
        (status = 404, description = "`not_found`: no such check in the caller's organization tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: the body is larger than 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: wrong types, unknown fields, or an invalid name, spec, timing or selector.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn update_check(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateHealthCheck>,
) -> Result<Json<HealthCheckView>, ApiError> {
    caller.require(Scope::ServersWrite)?;
    let before = cp
        .store
        .health_check(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such health check"))?;
    let mut check = before.clone();
    if let Some(name) = body.name {
        check.name = name.trim().to_string();
    }
    if let Some(kind) = body.kind {
        check.kind = kind;
    }
    if let Some(spec) = body.spec {
        check.spec = spec;
    }
    check.interval_seconds = body.interval_seconds.unwrap_or(check.interval_seconds);
    check.timeout_seconds = body.timeout_seconds.unwrap_or(check.timeout_seconds);
    check.retries = body.retries.unwrap_or(check.retries);
    check.start_period_seconds = body
        .start_period_seconds
        .unwrap_or(check.start_period_seconds);
    if let Some(selector) = body.selector {
        check.selector = selector;
    }
    check.updated_at = Utc::now();
    if before.kind == HealthCheckKind::Exec || check.kind == HealthCheckKind::Exec {
        // Changing an exec check (its argv, or which servers run it), or
        // turning a check into one, is running a program.
        caller.require(Scope::CommandsRun)?;
    }
    validate(&check)?;
    if !cp
        .store
        .update_health_check(&caller.visible_organizations, &check)
        .await?
    {
        return Err(ApiError::not_found("no such health check"));
    }
    caller
        .audit(
            &cp,
            check.organization_id,
            "health_check.update",
            id.to_string(),
            audit_details(&check),
        )
        .await;
    crate::health::spawn_repush(cp.clone(), Some(before), Some(check.clone()));
    Ok(Json(check.into()))
}

/// Deletes a health check; the connected servers that ran it stop at once.
#[utoipa::path(
    delete,
    path = "/health-checks/{id}",
    operation_id = "delete_health_check",
    tag = "health",
    params(("id" = Uuid, Path, description = "Health check id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such check in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn delete_check(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::ServersWrite)?;
    let check = cp
        .store
        .health_check(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such health check"))?;
    if !cp
        .store
        .delete_health_check(&caller.visible_organizations, id)
        .await?
    {
        return Err(ApiError::not_found("no such health check"));
    }
    caller
        .audit(
            &cp,
            check.organization_id,
            "health_check.delete",
            id.to_string(),
            serde_json::json!({ "name": check.name }),
        )
        .await;
    crate::health::spawn_repush(cp.clone(), Some(check), None);
    Ok(StatusCode::NO_CONTENT)
}
