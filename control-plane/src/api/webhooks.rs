//! `/api/v1/webhooks`: webhook subscriptions of the caller's organization
//! tree and their delivery log. The signing secret is sealed at rest and
//! never returned; a URL pointing at this control plane's own listeners, or
//! at a non-public address (unless `--allow-private-webhooks` allows
//! loopback and private ones), is refused with a `reason`. All calls need
//! `webhooks:write` (or `admin`).

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
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::{webhook_secret_context, Delivery, DeliveryAttempt, DeliveryStatus, Webhook};
use crate::webhooks::{check_target, valid_event_pattern, TargetError, TargetPolicy};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;
/// Shortest and longest secret accepted.
const SECRET_CHARS: std::ops::RangeInclusive<usize> = 16..=256;
const MAX_URL_CHARS: usize = 2048;
const MAX_EVENTS: usize = 64;

/// A webhook to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// `http://` or `https://` URL receiving `POST`s; may not point at this
    /// control plane's own API or QUIC listener, nor resolve to a loopback,
    /// private, link-local, metadata or other non-public address.
    #[schema(example = "https://hooks.example.com/tether")]
    pub url: String,
    /// Event names (`alert.firing`), `<prefix>.*` (`infrastructure.*`) or
    /// `*`; empty or omitted means every event.
    #[serde(default)]
    pub events: Vec<String>,
    /// Key of the `X-Tether-Signature` HMAC (16-256 characters). Never returned.
    #[schema(min_length = 16, max_length = 256)]
    pub secret: String,
    /// Organization owning it (default: the caller's). It receives the
    /// events of this organization and of its descendants.
    pub organization_id: Option<Uuid>,
}

impl std::fmt::Debug for CreateWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateWebhook")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A webhook as the API shows it (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}

impl From<Webhook> for WebhookView {
    fn from(w: Webhook) -> Self {
        Self {
            id: w.id,
            organization_id: w.organization_id,
            url: w.url,
            events: w.events,
            created_at: w.created_at,
        }
    }
}

/// One HTTP attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    /// 1 for the first attempt.
    pub attempt: i64,
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, when it answered.
    pub status_code: Option<i64>,
    /// Why the attempt failed.
    pub error: Option<String>,
    pub duration_ms: i64,
}

impl From<DeliveryAttempt> for AttemptView {
    fn from(a: DeliveryAttempt) -> Self {
        Self {
            attempt: a.attempt,
            at: a.at,
            status_code: a.status_code,
            error: a.error,
            duration_ms: a.duration_ms,
        }
    }
}

/// A delivery of one event to one webhook.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event: String,
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempt_count: i64,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The body as sent (`{event, timestamp, organization_id, data}`).
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptView>,
}

impl DeliveryView {
    fn new(d: Delivery, attempts: Vec<AttemptView>) -> Self {
        Self {
            id: d.id,
            webhook_id: d.webhook_id,
            event: d.event,
            status: d.status,
            attempt_count: d.attempts,
            next_attempt_at: d.next_attempt_at,
            last_status_code: d.last_status_code,
            last_error: d.last_error,
            created_at: d.created_at,
            completed_at: d.completed_at,
            payload: serde_json::from_str(&d.body).unwrap_or(serde_json::Value::Null),
            attempts,
        }
    }
}

/// Paging of a list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Creates a webhook. Needs `webhooks:write`.
#[utoipa::path(
    post,
    path = "/webhooks",
    operation_id = "create_webhook",
    tag = "webhooks",
    request_body(content = CreateWebhook, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created; the secret is never returned.", body = WebhookView),
        (status = 400, description = "`invalid_request`: malformed JSON.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `webhooks:write`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such organization in the caller's tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: not an http(s) URL, a host that does not resolve, a URL of this control plane's own listeners, a host that is or resolves to a non-public address (`reason`: `loopback_address`, `private_address`, `unique_local_address`, `link_local_address`, `metadata_address`, `unspecified_address`, `multicast_address`, `broadcast_address`, `reserved_address`; the first three are allowed with `--allow-private-webhooks`), an unknown event or a secret of the wrong length. URL refusals carry `field: url` and a `reason`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn create(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateWebhook>,
) -> Result<(StatusCode, Json<WebhookView>), ApiError> {
    caller.require(Scope::WebhooksWrite)?;
    let organization_id = body.organization_id.unwrap_or(caller.organization_id);
    if !caller.sees(organization_id) {
        return Err(ApiError::not_found("no such organization"));
    }
    if body.url.len() > MAX_URL_CHARS || super::extract::has_control_chars(&body.url) {
        return Err(ApiError::validation(format!(
            "url must be at most {MAX_URL_CHARS} printable characters"
        )));
    }
    if !SECRET_CHARS.contains(&body.secret.chars().count()) || body.secret.contains('\0') {
        return Err(ApiError::validation(format!(
            "secret must be {}-{} characters",
            SECRET_CHARS.start(),
            SECRET_CHARS.end()
        )));
    }
    if body.events.len() > MAX_EVENTS {
        return Err(ApiError::validation(format!("at most {MAX_EVENTS} events")));
    }
    for event in &body.events {
        if !valid_event_pattern(event) {
            return Err(ApiError::validation(format!(
                "unknown event {:?}: use one of {}, a prefix such as infrastructure.*, or *",
                event.chars().take(100).collect::<String>(),
                crate::webhooks::EVENTS.join(", ")
            ))
            .with_detail("field", "events"));
        }
    }
    let url = check_target(&body.url, &TargetPolicy::of(&cp))
        .await
        .map_err(|e: TargetError| {
            ApiError::validation(e.to_string())
                .with_detail("field", "url")
                .with_detail("reason", e.code())
        })?
        .url;
    let mut events = body.events.clone();
    events.sort();
    events.dedup();
    let id = Uuid::now_v7();
    let webhook = Webhook {
        id,
        organization_id,
        url: url.to_string(),
        events,
        secret_sealed: cp
            .sealer
            .seal(body.secret.as_bytes(), &webhook_secret_context(id)),
        created_at: Utc::now(),
    };
    cp.store.create_webhook(&webhook).await?;
    caller
        .audit(
            &cp,
            organization_id,
            "webhook.create",
            id.to_string(),
            serde_json::json!({ "url": webhook.url, "events": webhook.events }),
        )
        .await;
    Ok((StatusCode::CREATED, Json(webhook.into())))
}

/// Lists the webhooks of the caller's organization tree. Needs `webhooks:write`.
#[utoipa::path(
    get,
    path = "/webhooks",
    operation_id = "list_webhooks",
    tag = "webhooks",
    params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of webhooks, by id.", body = Page<WebhookView>),
        (status = 400, description = "`invalid_request`: a malformed limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `webhooks:write`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn list(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<WebhookView>>, ApiError> {
    caller.require(Scope::WebhooksWrite)?;
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = super::extract::page_cursor(params.cursor.as_deref())?;
    let webhooks = cp
        .store
        .list_webhooks(&caller.visible_organizations, limit + 1, after)
        .await?;
    Ok(Json(Page::from_rows(
        webhooks,
        limit,
        |w| w.id.to_string(),
        Into::into,
    )))
}

/// One webhook. Needs `webhooks:write`.
#[utoipa::path(
    get,
    path = "/webhooks/{id}",
    operation_id = "get_webhook",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "Webhook id.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The webhook.", body = WebhookView),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn get(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<WebhookView>, ApiError> {
    caller.require(Scope::WebhooksWrite)?;
    let webhook = cp
        .store
        .webhook(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such webhook"))?;
    Ok(Json(webhook.into()))
}

/// Deletes a webhook: its secret is erased and its pending deliveries are
/// abandoned. Needs `webhooks:write`.
#[utoipa::path(
    delete,
    path = "/webhooks/{id}",
    operation_id = "delete_webhook",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "Webhook id.")),
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
pub async fn delete(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::WebhooksWrite)?;
    let webhook = cp
        .store
        .webhook(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such webhook"))?;
    if !cp
        .store
        .delete_webhook(&caller.visible_organizations, id, Utc::now())
        .await?
    {
        return Err(ApiError::not_found("no such webhook"));
    }
    caller
        .audit(
            &cp,
            webhook.organization_id,
            "webhook.delete",
            id.to_string(),
            serde_json::json!({ "url": webhook.url }),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// The deliveries of a webhook, newest first, each with every attempt.
/// Needs `webhooks:write`.
#[utoipa::path(
    get,
    path = "/webhooks/{id}/deliveries",
    operation_id = "list_webhook_deliveries",
    tag = "webhooks",
    params(("id" = Uuid, Path, description = "Webhook id."), ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of deliveries, newest first.", body = Page<DeliveryView>),
        (status = 400, description = "`invalid_request`: a malformed limit or cursor.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such webhook.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn deliveries(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Page<DeliveryView>>, ApiError> {
    caller.require(Scope::WebhooksWrite)?;
    cp.store
        .webhook(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such webhook"))?;
    let limit = super::extract::page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let before = super::extract::page_cursor(params.cursor.as_deref())?;
    let mut deliveries = cp.store.list_deliveries(id, limit + 1, before).await?;
    let has_more = deliveries.len() > limit as usize;
    deliveries.truncate(limit as usize);
    let next_cursor = has_more
        .then(|| deliveries.last().map(|d| d.id.to_string()))
        .flatten();
    let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
    let mut attempts = cp.store.delivery_attempts(&ids).await?;
    let data = deliveries
        .into_iter()
        .map(|d| {
            let (mine, rest): (Vec<_>, Vec<_>) =
                attempts.drain(..).partition(|a| a.delivery_id == d.id);
            attempts = rest;
            DeliveryView::new(d, mine.into_iter().map(Into::into).collect())
        })
        .collect();
    Ok(Json(Page { data, next_cursor }))
}
