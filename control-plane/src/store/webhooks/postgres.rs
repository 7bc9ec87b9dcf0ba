//! [`super::WebhookStore`] on PostgreSQL. Deliveries are claimed with
//! `FOR UPDATE SKIP LOCKED` under a lease, so replicas sharing the database
//! never send one delivery twice; a firing alert is unique per rule and
//! server (partial unique index), so racing replicas page once.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::*;
use crate::store::postgres::PostgresStore;
use crate::store::StoreError;

const WEBHOOK_COLUMNS: &str = "id, organization_id, url, events, secret_sealed, created_at";
const DELIVERY_COLUMNS: &str = "id, webhook_id, organization_id, event, body, status, attempts, \
     next_attempt_at, last_status_code, last_error, created_at, completed_at";
const RULE_COLUMNS: &str = "id, organization_id, name, kind, metric, op, threshold, for_seconds, \
     severity, selector, created_at";
const ALERT_COLUMNS: &str = "id, rule_id, rule_name, organization_id, server_id, severity, state, \
     value, started_at, resolved_at";

fn webhook_from_row(row: &PgRow) -> StoreResult<Webhook> {
    let Json(events): Json<Vec<String>> = row.try_get("events")?;
    Ok(Webhook {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        url: row.try_get("url")?,
        events,
        secret_sealed: row.try_get("secret_sealed")?,
        created_at: row.try_get("created_at")?,
    })
}

fn delivery_from_row(row: &PgRow) -> StoreResult<Delivery> {
    let status: String = row.try_get("status")?;
    Ok(Delivery {
        id: row.try_get("id")?,
        webhook_id: row.try_get("webhook_id")?,
        organization_id: row.try_get("organization_id")?,
        event: row.try_get("event")?,
        body: row.try_get("body")?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery status {status:?}")))?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}

fn rule_from_row(row: &PgRow) -> StoreResult<AlertRule> {
    let kind: String = row.try_get("kind")?;
    let Json(selector): Json<AlertSelector> = row.try_get("selector")?;
    Ok(AlertRule {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        kind: AlertRuleKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("alert rule kind {kind:?}")))?,
        metric: row.try_get("metric")?,
        op: row.try_get("op")?,
        threshold: row.try_get("threshold")?,
        for_seconds: row.try_get("for_seconds")?,
        severity: row.try_get("severity")?,
        selector,
        created_at: row.try_get("created_at")?,
    })
}

fn alert_from_row(row: &PgRow) -> StoreResult<Alert> {
    let state: String = row.try_get("state")?;
    Ok(Alert {
        id: row.try_get("id")?,
        rule_id: row.try_get("rule_id")?,
        rule_name: row.try_get("rule_name")?,
        organization_id: row.try_get("organization_id")?,
        server_id: row.try_get("server_id")?,
        severity: row.try_get("severity")?,
        state: AlertState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("alert state {state:?}")))?,
        value: row.try_get("value")?,
        started_at: row.try_get("started_at")?,
        resolved_at: row.try_get("resolved_at")?,
    })
}

fn attempt_from_row(row: &PgRow) -> StoreResult<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        delivery_id: row.try_get("delivery_id")?,
        attempt: row.try_get("attempt")?,
        at: row.try_get("at")?,
        status_code: row.try_get("status_code")?,
        error: row.try_get("error")?,
        duration_ms: row.try_get("duration_ms")?,
    })
}

#[async_trait::async_trait]
impl WebhookStore for PostgresStore {
    async fn create_webhook(&self, w: &Webhook) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhooks (id, organization_id, url, events, secret_sealed, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(w.id)
        .bind(w.organization_id)
        .bind(&w.url)
        .bind(Json(&w.events))
        .bind(&w.secret_sealed)
        .bind(w.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn webhook(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<Webhook>> {
        let row = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks
             WHERE deleted_at IS NULL AND id = $1 AND organization_id = ANY($2)"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    async fn webhook_by_id(&self, id: Uuid) -> StoreResult<Option<Webhook>> {
        let row = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE deleted_at IS NULL AND id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    async fn list_webhooks(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<Webhook>> {
        let rows = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks
             WHERE deleted_at IS NULL AND organization_id = ANY($1)
               AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id LIMIT $3"
        ))
        .bind(scope)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn webhooks_of_organizations(&self, organizations: &[Uuid]) -> StoreResult<Vec<Webhook>> {
        let rows = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks
             WHERE deleted_at IS NULL AND organization_id = ANY($1) ORDER BY id"
        ))
        .bind(organizations)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn delete_webhook(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query(
            "UPDATE webhooks SET deleted_at = $1, secret_sealed = ''
             WHERE deleted_at IS NULL AND id = $2 AND organization_id = ANY($3)",
        )
        .bind(at)
        .bind(id)
        .bind(scope)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if deleted {
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL,
                   claimed_by = NULL, lease_until = NULL, completed_at = $1,
                   last_error = 'webhook deleted'
                 WHERE webhook_id = $2 AND status = 'pending'",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn enqueue_deliveries(&self, deliveries: &[NewDelivery]) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
        let webhooks: Vec<Uuid> = deliveries.iter().map(|d| d.webhook_id).collect();
        let orgs: Vec<Uuid> = deliveries.iter().map(|d| d.organization_id).collect();
        let events: Vec<&str> = deliveries.iter().map(|d| d.event.as_str()).collect();
        let bodies: Vec<&str> = deliveries.iter().map(|d| d.body.as_str()).collect();
        let created: Vec<DateTime<Utc>> = deliveries.iter().map(|d| d.created_at).collect();
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, organization_id, event, body,
               status, attempts, next_attempt_at, created_at)
             SELECT id, webhook_id, organization_id, event, body, 'pending', 0, created_at, created_at
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
               AS d (id, webhook_id, organization_id, event, body, created_at)",
        )
        .bind(&ids)
        .bind(&webhooks)
        .bind(&orgs)
        .bind(&events)
        .bind(&bodies)
        .bind(&created)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn claim_deliveries(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>> {
        let rows = sqlx::query(&format!(
            "UPDATE webhook_deliveries SET claimed_by = $1, lease_until = $2
             WHERE id IN (
                 SELECT id FROM webhook_deliveries
                 WHERE status = 'pending' AND next_attempt_at <= $3
                   AND (lease_until IS NULL OR lease_until < $3)
                 ORDER BY next_attempt_at, id
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED)
             RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(worker)
        .bind(lease_until)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = rows
            .iter()
            .map(delivery_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        claimed.sort_by_key(|d| (d.next_attempt_at, d.id));
        Ok(claimed)
    }

    async fn record_delivery_attempt(
        &self,
        worker: &str,
        a: &DeliveryAttempt,
        outcome: AttemptOutcome,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let (status, next, completed) = match outcome {
            AttemptOutcome::Delivered => ("delivered", None, Some(a.at)),
            AttemptOutcome::RetryAt(at) => ("pending", Some(at), None),
            AttemptOutcome::Failed => ("failed", None, Some(a.at)),
        };
        let updated = sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = $2, next_attempt_at = $3,
               completed_at = $4, last_status_code = $5, last_error = $6,
               claimed_by = NULL, lease_until = NULL
             WHERE id = $7 AND claimed_by = $8 AND status = 'pending'",
        )
        .bind(status)
        .bind(a.attempt)
        .bind(next)
        .bind(completed)
        .bind(a.status_code)
        .bind(&a.error)
        .bind(a.delivery_id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO webhook_delivery_attempts
               (delivery_id, attempt, at, status_code, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(a.delivery_id)
        .bind(a.attempt)
        .bind(a.at)
        .bind(a.status_code)
        .bind(&a.error)
        .bind(a.duration_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn delivery(&self, webhook_id: Uuid, id: Uuid) -> StoreResult<Option<Delivery>> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1 AND id = $2"
        ))
        .bind(webhook_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(delivery_from_row).transpose()
    }

    async fn list_deliveries(
        &self,
        webhook_id: Uuid,
        limit: u32,
        before: Option<Uuid>,
    ) -> StoreResult<Vec<Delivery>> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
             WHERE webhook_id = $1 AND ($2::uuid IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(webhook_id)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn delivery_attempts(&self, delivery_ids: &[Uuid]) -> StoreResult<Vec<DeliveryAttempt>> {
        let rows = sqlx::query(
            "SELECT delivery_id, attempt, at, status_code, error, duration_ms
             FROM webhook_delivery_attempts WHERE delivery_id = ANY($1)
             ORDER BY delivery_id, attempt",
        )
        .bind(delivery_ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn prune_deliveries(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM webhook_delivery_attempts WHERE delivery_id IN (
                 SELECT id FROM webhook_deliveries
                 WHERE status <> 'pending' AND completed_at < $1)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND completed_at < $1",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    async fn create_alert_rule(&self, r: &AlertRule) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO alert_rules (id, organization_id, name, kind, metric, op, threshold,
               for_seconds, severity, selector, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(r.id)
        .bind(r.organization_id)
        .bind(&r.name)
        .bind(r.kind.as_str())
        .bind(&r.metric)
        .bind(&r.op)
        .bind(r.threshold)
        .bind(r.for_seconds)
        .bind(&r.severity)
        .bind(Json(&r.selector))
        .bind(r.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn alert_rule(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<AlertRule>> {
        let row = sqlx::query(&format!(
            "SELECT {RULE_COLUMNS} FROM alert_rules
             WHERE deleted_at IS NULL AND id = $1 AND organization_id = ANY($2)"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rule_from_row).transpose()
    }

    async fn list_alert_rules(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<AlertRule>> {
        let rows = sqlx::query(&format!(
            "SELECT {RULE_COLUMNS} FROM alert_rules
             WHERE deleted_at IS NULL AND organization_id = ANY($1)
               AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id LIMIT $3"
        ))
        .bind(scope)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rule_from_row).collect()
    }

    async fn all_alert_rules(&self) -> StoreResult<Vec<AlertRule>> {
        let rows = sqlx::query(&format!(
            "SELECT {RULE_COLUMNS} FROM alert_rules r WHERE deleted_at IS NULL
               AND EXISTS (SELECT 1 FROM organizations o
                           WHERE o.id = r.organization_id AND o.deleted_at IS NULL)
             ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rule_from_row).collect()
    }

    async fn delete_alert_rule(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query(
            "UPDATE alert_rules SET deleted_at = $1
             WHERE deleted_at IS NULL AND id = $2 AND organization_id = ANY($3)",
        )
        .bind(at)
        .bind(id)
        .bind(scope)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if deleted {
            sqlx::query("DELETE FROM alert_conditions WHERE rule_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn condition_holds(
        &self,
        rule_id: Uuid,
        server_id: Uuid,
        since: DateTime<Utc>,
    ) -> StoreResult<DateTime<Utc>> {
        // The no-op update makes RETURNING yield the stored row too.
        let stored: DateTime<Utc> = sqlx::query_scalar(
            "INSERT INTO alert_conditions (rule_id, server_id, since) VALUES ($1, $2, $3)
             ON CONFLICT (rule_id, server_id) DO UPDATE SET since = alert_conditions.since
             RETURNING since",
        )
        .bind(rule_id)
        .bind(server_id)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(stored)
    }

    async fn clear_condition(&self, rule_id: Uuid, server_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM alert_conditions WHERE rule_id = $1 AND server_id = $2")
            .bind(rule_id)
            .bind(server_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn conditions_of_rule(&self, rule_id: Uuid) -> StoreResult<Vec<(Uuid, DateTime<Utc>)>> {
        Ok(sqlx::query_as(
            "SELECT server_id, since FROM alert_conditions WHERE rule_id = $1 ORDER BY server_id",
        )
        .bind(rule_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn fire_alert(&self, a: &Alert) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO alerts (id, rule_id, rule_name, organization_id, server_id, severity,
               state, value, started_at, resolved_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'firing', $7, $8, NULL)
             ON CONFLICT DO NOTHING",
        )
        .bind(a.id)
        .bind(a.rule_id)
        .bind(&a.rule_name)
        .bind(a.organization_id)
        .bind(a.server_id)
        .bind(&a.severity)
        .bind(a.value)
        .bind(a.started_at)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn resolve_alert(
        &self,
        rule_id: Uuid,
        server_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<Alert>> {
        let row = sqlx::query(&format!(
            "UPDATE alerts SET state = 'resolved', resolved_at = $1
             WHERE rule_id = $2 AND server_id = $3 AND state = 'firing'
             RETURNING {ALERT_COLUMNS}"
        ))
        .bind(at)
        .bind(rule_id)
        .bind(server_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(alert_from_row).transpose()
    }

    async fn resolve_alerts_of_rule(
        &self,
        rule_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<Vec<Alert>> {
        let rows = sqlx::query(&format!(
            "UPDATE alerts SET state = 'resolved', resolved_at = $1
             WHERE rule_id = $2 AND state = 'firing'
             RETURNING {ALERT_COLUMNS}"
        ))
        .bind(at)
        .bind(rule_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }

    async fn firing_alerts_of_rule(&self, rule_id: Uuid) -> StoreResult<Vec<Alert>> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE rule_id = $1 AND state = 'firing' ORDER BY id"
        ))
        .bind(rule_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }

    async fn list_alerts(&self, q: &AlertQuery) -> StoreResult<Vec<Alert>> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts
             WHERE organization_id = ANY($1)
               AND ($2::text IS NULL OR state = $2)
               AND ($3::uuid IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4"
        ))
        .bind(&q.scope)
        .bind(q.state.map(AlertState::as_str))
        .bind(q.before)
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }
}
