//! Webhooks, their deliveries, alert rules and alert events.
//!
//! Owns the storage side of `crate::webhooks` and `crate::alerts`: webhook
//! subscriptions (secret sealed), delivery jobs claimed under a lease (on
//! PostgreSQL with `FOR UPDATE SKIP LOCKED`, so replicas never send one
//! delivery twice) and their attempt log; alert rules, the debounce clock of
//! each (rule, server) condition, and firing/resolved alerts (at most one
//! firing alert per rule and server, enforced by a unique index so racing
//! replicas page once).
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite
//! (`control-plane/tests/store_webhooks.rs`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Labels, StoreResult};

mod postgres;
mod sqlite;

/// Sealing context of a webhook's secret.
pub fn webhook_secret_context(webhook_id: Uuid) -> String {
    format!("webhook/{webhook_id}/secret")
}

/// A webhook subscription of an organization.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub url: String,
    /// Event names or patterns (`*`, `infrastructure.*`); empty is all.
    pub events: Vec<String>,
    /// The signing secret sealed under the master key (see
    /// [`webhook_secret_context`]).
    pub secret_sealed: String,
    pub created_at: DateTime<Utc>,
}

/// State of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its (next) attempt.
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Every attempt failed (or the webhook went away).
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "delivered" => Self::Delivered,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// A delivery to queue: one event for one webhook.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    /// The webhook's organization.
    pub organization_id: Uuid,
    pub event: String,
    /// The exact body to sign and send.
    pub body: String,
    pub created_at: DateTime<Utc>,
}

/// A delivery as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub organization_id: Uuid,
    pub event: String,
    pub body: String,
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: i64,
    /// When the next attempt is due (`None` once delivered or failed).
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// One HTTP attempt of a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    pub delivery_id: Uuid,
    /// 1 for the first attempt.
    pub attempt: i64,
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, when it answered.
    pub status_code: Option<i64>,
    /// Why the attempt failed (connection refused, timeout, non-2xx...).
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// What an attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Try again at this time.
    RetryAt(DateTime<Utc>),
    /// Give up.
    Failed,
}

/// What an alert rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertRuleKind {
    /// A metric of the latest point compared with a threshold.
    Metric,
    /// A server whose health checks fail (`health.failed` .. `health.recovered`).
    HealthFailing,
    /// A server that is offline (`server.offline` .. `server.online`).
    Offline,
}

impl AlertRuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Metric => "metric",
            Self::HealthFailing => "health_failing",
            Self::Offline => "offline",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "metric" => Self::Metric,
            "health_failing" => Self::HealthFailing,
            "offline" => Self::Offline,
            _ => return None,
        })
    }
}

// The API's and the database's JSON shape of a rule's selector (an empty
// list is no filter); what it selects is `ServerSelector`'s (the conversion
// is in `store/selector.rs`).
/// Which servers a rule applies to (all of the rule's organization tree
/// when empty; both filters must match when both are given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertSelector {
    /// Every label must be on the server.
    #[serde(default)]
    pub labels: Labels,
    /// The server must be one of these.
    #[serde(default)]
    pub server_ids: Vec<Uuid>,
}

/// An alert rule of an organization (applies to its whole tree).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub kind: AlertRuleKind,
    /// Metric rules: the metric name, comparison (`>`, `>=`, `<`, `<=`) and threshold.
    pub metric: Option<String>,
    pub op: Option<String>,
    pub threshold: Option<f64>,
    /// How long the condition must hold before the alert fires.
    pub for_seconds: i64,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    pub selector: AlertSelector,
    pub created_at: DateTime<Utc>,
}

/// State of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "firing" => Self::Firing,
            "resolved" => Self::Resolved,
            _ => return None,
        })
    }
}

/// One alert: a rule firing for a server, until it resolves.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub id: Uuid,
    pub rule_id: Uuid,
    pub rule_name: String,
    /// The server's organization.
    pub organization_id: Uuid,
    pub server_id: Uuid,
    pub severity: String,
    pub state: AlertState,
    /// The metric value that fired it (metric rules).
    pub value: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// A filtered alert listing, newest first.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    /// Organizations whose servers' alerts may be listed.
    pub scope: Vec<Uuid>,
    pub state: Option<AlertState>,
    pub limit: u32,
    /// List alerts with ids smaller than this one.
    pub before: Option<Uuid>,
}

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait WebhookStore: Send + Sync {
    // --- webhooks -------------------------------------------------------

    async fn create_webhook(&self, webhook: &Webhook) -> StoreResult<()>;

    /// A live webhook of an organization in `scope`.
    async fn webhook(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<Webhook>>;

    /// A live webhook, whatever its organization (the delivery worker's view).
    async fn webhook_by_id(&self, id: Uuid) -> StoreResult<Option<Webhook>>;

    /// Live webhooks of `scope`, in id order, after `after`.
    async fn list_webhooks(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<Webhook>>;

    /// Live webhooks of exactly these organizations (an event's organization
    /// and its ancestors).
    async fn webhooks_of_organizations(&self, organizations: &[Uuid]) -> StoreResult<Vec<Webhook>>;

    /// Soft-deletes a webhook (its secret is erased, its pending deliveries
    /// fail); `false` when there was none in `scope`.
    async fn delete_webhook(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    // --- deliveries -----------------------------------------------------

    /// Queues deliveries, due at once, in one transaction.
    async fn enqueue_deliveries(&self, deliveries: &[NewDelivery]) -> StoreResult<()>;

    /// Claims up to `limit` pending deliveries due at `now` whose lease is
    /// free or expired, for `worker` until `lease_until`; oldest due first.
    /// Two workers never hold one delivery at once.
    async fn claim_deliveries(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>>;

    /// Records an attempt of a delivery `worker` holds and applies its
    /// outcome (lease released). `false` when `worker` no longer holds it.
    async fn record_delivery_attempt(
        &self,
        worker: &str,
        attempt: &DeliveryAttempt,
        outcome: AttemptOutcome,
    ) -> StoreResult<bool>;

    /// A delivery of a webhook.
    async fn delivery(&self, webhook_id: Uuid, id: Uuid) -> StoreResult<Option<Delivery>>;

    /// Deliveries of a webhook, newest first, with ids smaller than `before`.
    async fn list_deliveries(
        &self,
        webhook_id: Uuid,
        limit: u32,
        before: Option<Uuid>,
    ) -> StoreResult<Vec<Delivery>>;

    /// The attempts of these deliveries, by delivery then attempt number.
    async fn delivery_attempts(&self, delivery_ids: &[Uuid]) -> StoreResult<Vec<DeliveryAttempt>>;

    /// Deletes delivered and failed deliveries (and their attempts)
    /// completed before `before`; returns how many deliveries went.
    async fn prune_deliveries(&self, before: DateTime<Utc>) -> StoreResult<u64>;

    // --- alert rules ----------------------------------------------------

    async fn create_alert_rule(&self, rule: &AlertRule) -> StoreResult<()>;

    /// A live rule of an organization in `scope`.
    async fn alert_rule(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<AlertRule>>;

    /// Live rules of `scope`, in id order, after `after`.
    async fn list_alert_rules(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<AlertRule>>;

    /// Every live rule of every organization (the alert engine's view).
    async fn all_alert_rules(&self) -> StoreResult<Vec<AlertRule>>;

    /// Soft-deletes a rule and forgets its conditions; `false` when there
    /// was none in `scope`. Its firing alerts stay until resolved
    /// ([`WebhookStore::resolve_alerts_of_rule`]).
    async fn delete_alert_rule(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    // --- conditions and alerts -------------------------------------------

    /// Records that the rule's condition holds for the server since `since`
    /// unless it already does; returns since when it holds (the stored value).
    async fn condition_holds(
        &self,
        rule_id: Uuid,
        server_id: Uuid,
        since: DateTime<Utc>,
    ) -> StoreResult<DateTime<Utc>>;

    /// Forgets the condition (it stopped holding).
    async fn clear_condition(&self, rule_id: Uuid, server_id: Uuid) -> StoreResult<()>;

    /// The servers for which the rule's condition holds, with since when.
    async fn conditions_of_rule(&self, rule_id: Uuid) -> StoreResult<Vec<(Uuid, DateTime<Utc>)>>;

    /// Stores a firing alert unless one is firing for the same rule and
    /// server; `true` when this call stored it (so it is paged once).
    async fn fire_alert(&self, alert: &Alert) -> StoreResult<bool>;

    /// Resolves the firing alert of a rule and server; returns it when this
    /// call resolved it.
    async fn resolve_alert(
        &self,
        rule_id: Uuid,
        server_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<Alert>>;

    /// Resolves every firing alert of a rule; returns those this call resolved.
    async fn resolve_alerts_of_rule(
        &self,
        rule_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<Vec<Alert>>;

    /// The firing alerts of a rule.
    async fn firing_alerts_of_rule(&self, rule_id: Uuid) -> StoreResult<Vec<Alert>>;

    /// Alerts matching `query`, newest first.
    async fn list_alerts(&self, query: &AlertQuery) -> StoreResult<Vec<Alert>>;
}
