//! `/api/v1/alert-rules` and `/api/v1/alerts`: alert rules of the caller's
//! organization tree (metric thresholds, failing health, offline servers)
//! and the alerts they raised. Reading needs `servers:read`, writing
//! `servers:write` (or `admin`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Page};
use crate::alerts::{Op, METRICS, SEVERITIES};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::selector::{self, InputLimits, SelectorInputError};
use crate::store::{Alert, AlertQuery, AlertRule, AlertRuleKind, AlertSelector, AlertState};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;
/// Longest `for_seconds` (one week).
const MAX_FOR_SECONDS: i64 = 7 * 24 * 3600;
const MAX_SELECTOR_ITEMS: usize = 100;

/// A rule to create. Metric rules (`kind` `metric`, the default) need
/// `metric`, `op` and `threshold`; `health_failing` and `offline` rules
/// take none of them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAlertRule {
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// `metric` (default), `health_failing` or `offline`.
    #[serde(default)]
    pub kind: Option<AlertRuleKind>,
    /// A metric of the metrics points: `cpu_percent`, `memory_used_percent`,
    /// `disk_used_percent`, `load_1`, `load_5`, `load_15`, `swap_used_percent`,
    /// `memory_used_bytes`, `swap_used_bytes`, `process_count`,
    /// `uptime_seconds`, `dropped_batches`.
    pub metric: Option<String>,
    /// `>`, `>=`, `<` or `<=`.
    pub op: Option<String>,
    pub threshold: Option<f64>,
    /// How long the condition must hold (over consecutive samples, or since
    /// the event) before the alert fires; 0-604800.
    #[serde(default)]
    pub for_seconds: i64,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// Which servers of the organization tree (default: all).
    #[serde(default)]
    pub selector: Option<AlertSelector>,
    /// Organization owning it (default: the caller's); it applies to that
    /// organization's servers and its descendants'.
    pub organization_id: Option<Uuid>,
}

/// An alert rule as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertRuleView {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub kind: AlertRuleKind,
    pub metric: Option<String>,
    pub op: Option<String>,
    pub threshold: Option<f64>,
    pub for_seconds: i64,
    pub severity: String,
    pub selector: AlertSelector,
    pub created_at: DateTime<Utc>,
}

impl From<AlertRule> for AlertRuleView {
    fn from(r: AlertRule) -> Self {
        Self {
            id: r.id,
            organization_id: r.organization_id,
            name: r.name,
            kind: r.kind,
            metric: r.metric,
            op: r.op,
            threshold: r.threshold,
            for_seconds: r.for_seconds,
            severity: r.severity,
            selector: r.selector,
            created_at: r.created_at,
        }
    }
}

/// An alert: a rule firing for a server, until it resolves.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertView {
    pub id: Uuid,
    pub rule_id: Uuid,
    pub rule_name: String,
    pub organization_id: Uuid,
    pub server_id: Uuid,
    pub severity: String,
    pub state: AlertState,
    /// The metric value that fired it (metric rules).
    pub value: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

impl From<Alert> for AlertView {
    fn from(a: Alert) -> Self {
        Self {
            id: a.id,
            rule_id: a.rule_id,
            rule_name: a.rule_name,
            organization_id: a.organization_id,
            server_id: a.server_id,
            severity: a.severity,
            state: a.state,
            value: a.value,
            started_at: a.started_at,
            resolved_at: a.resolved_at,
        }
    }
}

/// Paging of the rule list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListRules {
    /// Page size, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Filters of the alert list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListAlerts {
    /// `firing` or `resolved` (default: both).
    #[param(value_type = Option<AlertState>)]
    pub state: Option<String>,
    /// Page size, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn validate(body: &CreateAlertRule) -> Result<AlertRuleKind, ApiError> {
    if body.name.trim().is_empty()
        || body.name.len() > 100
        || super::extract::has_control_chars(&body.name)
    {
        return Err(ApiError::validation(
            "name must be 1-100 printable characters",
        ));
    }
    if !SEVERITIES.contains(&body.severity.as_str()) {
        return Err(ApiError::validation(
            "severity must be info, warning or critical",
        ));
    }
    if !(0..=MAX_FOR_SECONDS).contains(&body.for_seconds) {
        return Err(ApiError::validation(format!(
            "for_seconds must be between 0 and {MAX_FOR_SECONDS}"
        )));
    }
    if let Some(selector) = &body.selector {
        selector::check_input(
            &selector.labels,
            &selector.server_ids,
            InputLimits {
                max_labels: MAX_SELECTOR_ITEMS,
                max_server_ids: MAX_SELECTOR_ITEMS,
            },
        )
        .map_err(|e| match e {
            SelectorInputError::TooManyLabels { .. } | SelectorInputError::TooManyServerIds { .. } => {
                ApiError::validation(format!(
                    "a selector takes at most {MAX_SELECTOR_ITEMS} labels and {MAX_SELECTOR_ITEMS} server ids"
                ))
            }
            SelectorInputError::ControlCharacters | SelectorInputError::EmptyLabelKey => {
                ApiError::validation("selector labels must be printable, with non-empty keys")
            }
        })?;
    }
    let kind = body.kind.unwrap_or(AlertRuleKind::Metric);
    match kind {
        AlertRuleKind::Metric => {
            let metric = body.metric.as_deref().ok_or_else(|| {
                ApiError::validation("a metric rule needs metric, op and threshold")
            })?;
            if !METRICS.contains(&metric) {
                return Err(ApiError::validation(format!(
                    "unknown metric {:?}: use one of {}",
                    metric.chars().take(100).collect::<String>(),
                    METRICS.join(", ")
                ))
                .with_detail("field", "metric"));
            }
            if body.op.as_deref().and_then(Op::parse).is_none() {
                return Err(ApiError::validation("op must be one of >, >=, <, <=")
                    .with_detail("field", "op"));
            }
            match body.threshold {
                Some(t) if t.is_finite() => {}
                _ => {
                    return Err(ApiError::validation("threshold must be a finite number")
                        .with_detail("field", "threshold"))
                }
            }
        }
        AlertRuleKind::HealthFailing | AlertRuleKind::Offline => {
            if body.metric.is_some() || body.op.is_some() || body.threshold.is_some() {
                return Err(ApiError::validation(format!(
                    "a {} rule takes no metric, op or threshold",
                    kind.as_str()
                )));
            }
        }
    }
    Ok(kind)
}

/// Creates an alert rule. Needs `servers:write`.
#[utoipa::path(
    post,
    path = "/alert-rules",
    operation_id = "create_alert_rule",
    tag = "alerts",
    request_body(content = CreateAlertRule, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created.", body = AlertRuleView),
        (status = 400, description = "`invalid_request`: malformed JSON.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:write`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: unknown metric, operator or severity, a missing threshold, or fields of another kind.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn create_rule(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateAlertRule>,
) -> Result<(StatusCode, Json<AlertRuleView>), ApiError> {
    caller.require(Scope::ServersWrite)?;
    let organization_id = body.organization_id.unwrap_or(caller.organization_id);
    if !caller.sees(organization_id) {
        return Err(ApiError::not_found("no such organization"));
    }
    let kind = validate(&body)?;
    let rule = AlertRule {
        id: Uuid::now_v7(),
        organization_id,
        name: body.name.trim().to_string(),
        kind,
        metric: body.metric,
        op: body.op,
        threshold: body.threshold,
        for_seconds: body.for_seconds,
        severity: body.severity,
        selector: body.selector.unwrap_or_default(),
        created_at: Utc::now(),
    };
    cp.store.create_alert_rule(&rule).await?;
    caller
        .audit(
            &cp,
            organization_id,
            "alert_rule.create",
            rule.id.to_string(),
            serde_json::json!({ "name": rule.name, "kind": rule.kind.as_str() }),
        )
        .await;
    Ok((StatusCode::CREATED, Json(rule.into())))
}

/// Lists the alert rules of the caller's organization tree. Needs `servers:read`.
#[utoipa::path(
    get,
    path = "/alert-rules",
    operation_id = "list_alert_rules",
    tag = "alerts",
    params(ListRules),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of rules, by id.", body = Page<AlertRuleView>),
        (status = 400, description = "`invalid_request`: a malformed limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn list_rules(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListRules>,
) -> Result<Json<Page<AlertRuleView>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = super::extract::page_cursor(params.cursor.as_deref())?;
    let rules = cp
        .store
        .list_alert_rules(&caller.visible_organizations, limit + 1, after)
        .await?;
    Ok(Json(Page::from_rows(
        rules,
        limit,
        |r| r.id.to_string(),
        Into::into,
    )))
}

/// One alert rule. Needs `servers:read`.
#[utoipa::path(
    get,
    path = "/alert-rules/{id}",
    operation_id = "get_alert_rule",
    tag = "alerts",
    params(("id" = Uuid, Path, description = "Rule id.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The rule.", body = AlertRuleView),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn get_rule(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<AlertRuleView>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let rule = cp
        .store
        .alert_rule(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such alert rule"))?;
    Ok(Json(rule.into()))
}

/// Deletes an alert rule; its firing alerts resolve (`alert.resolved` is
/// sent). Needs `servers:write`.
#[utoipa::path(
    delete,
    path = "/alert-rules/{id}",
    operation_id = "delete_alert_rule",
    tag = "alerts",
    params(("id" = Uuid, Path, description = "Rule id.")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn delete_rule(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::ServersWrite)?;
    let rule = cp
        .store
        .alert_rule(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such alert rule"))?;
    let now = Utc::now();
    if !cp
        .store
        .delete_alert_rule(&caller.visible_organizations, id, now)
        .await?
    {
        return Err(ApiError::not_found("no such alert rule"));
    }
    for alert in cp.store.resolve_alerts_of_rule(id, now).await? {
        crate::events::emit(
            &cp,
            alert.organization_id,
            "alert.resolved",
            crate::alerts::alert_data(&alert, Some(&rule)),
        )
        .await;
    }
    caller
        .audit(
            &cp,
            rule.organization_id,
            "alert_rule.delete",
            id.to_string(),
            serde_json::json!({ "name": rule.name }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Alerts of the servers of the caller's organization tree, newest first.
/// Needs `servers:read`.
#[utoipa::path(
    get,
    path = "/alerts",
    operation_id = "list_alerts",
    tag = "alerts",
    params(ListAlerts),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of alerts, newest first.", body = Page<AlertView>),
        (status = 400, description = "`invalid_request`: an unknown state, a malformed limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn list_alerts(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListAlerts>,
) -> Result<Json<Page<AlertView>>, ApiError> {
    caller.require(Scope::ServersRead)?;
    let state = params
        .state
        .as_deref()
        .map(|s| {
            AlertState::parse(s)
                .ok_or_else(|| ApiError::invalid_request("state must be firing or resolved"))
        })
        .transpose()?;
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let before = super::extract::page_cursor(params.cursor.as_deref())?;
    let alerts = cp
        .store
        .list_alerts(&AlertQuery {
            scope: caller.visible_organizations.clone(),
            state,
            limit: limit + 1,
            before,
        })
        .await?;
    Ok(Json(Page::from_rows(
        alerts,
        limit,
        |a| a.id.to_string(),
        Into::into,
    )))
}
