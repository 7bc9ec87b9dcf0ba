//! [`super::WebhookStore`] on SQLite (one process: a delivery is claimed by
//! one `UPDATE ... RETURNING`, which SQLite runs under its write lock).

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::*;
use crate::store::sqlite::{from_ms, ms, opt_ms, push_scope, uuid, SqliteStore};
use crate::store::StoreError;

const WEBHOOK_COLUMNS: &str = "id, organization_id, url, events, secret_sealed, created_at";
const DELIVERY_COLUMNS: &str = "id, webhook_id, organization_id, event, body, status, attempts, \
     next_attempt_at, last_status_code, last_error, created_at, completed_at";
const RULE_COLUMNS: &str = "id, organization_id, name, kind, metric, op, threshold, for_seconds, \
     severity, selector, created_at";
const ALERT_COLUMNS: &str = "id, rule_id, rule_name, organization_id, server_id, severity, state, \
     value, started_at, resolved_at";

fn json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("invalid json: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn webhook_from_row(row: &SqliteRow) -> StoreResult<Webhook> {
    Ok(Webhook {
        id: uuid(row.try_get("id")?)?,
        organization_id: uuid(row.try_get("organization_id")?)?,
        url: row.try_get("url")?,
        events: json(row.try_get("events")?)?,
        secret_sealed: row.try_get("secret_sealed")?,
        created_at: from_ms(row.try_get("created_at")?),
    })
}

fn delivery_from_row(row: &SqliteRow) -> StoreResult<Delivery> {
    let status: String = row.try_get("status")?;
    Ok(Delivery {
        id: uuid(row.try_get("id")?)?,
        webhook_id: uuid(row.try_get("webhook_id")?)?,
        organization_id: uuid(row.try_get("organization_id")?)?,
        event: row.try_get("event")?,
        body: row.try_get("body")?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery status {status:?}")))?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: opt_ms(row.try_get("next_attempt_at")?),
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: from_ms(row.try_get("created_at")?),
        completed_at: opt_ms(row.try_get("completed_at")?),
    })
}

fn rule_from_row(row: &SqliteRow) -> StoreResult<AlertRule> {
    let kind: String = row.try_get("kind")?;
    Ok(AlertRule {
        id: uuid(row.try_get("id")?)?,
        organization_id: uuid(row.try_get("organization_id")?)?,
        name: row.try_get("name")?,
        kind: AlertRuleKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("alert rule kind {kind:?}")))?,
        metric: row.try_get("metric")?,
        op: row.try_get("op")?,
        threshold: row.try_get("threshold")?,
        for_seconds: row.try_get("for_seconds")?,
        severity: row.try_get("severity")?,
        selector: json(row.try_get("selector")?)?,
        created_at: from_ms(row.try_get("created_at")?),
    })
}

fn alert_from_row(row: &SqliteRow) -> StoreResult<Alert> {
    let state: String = row.try_get("state")?;
    Ok(Alert {
        id: uuid(row.try_get("id")?)?,
        rule_id: uuid(row.try_get("rule_id")?)?,
        rule_name: row.try_get("rule_name")?,
        organization_id: uuid(row.try_get("organization_id")?)?,
        server_id: uuid(row.try_get("server_id")?)?,
        severity: row.try_get("severity")?,
        state: AlertState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("alert state {state:?}")))?,
        value: row.try_get("value")?,
        started_at: from_ms(row.try_get("started_at")?),
        resolved_at: opt_ms(row.try_get("resolved_at")?),
    })
}

fn attempt_from_row(row: &SqliteRow) -> StoreResult<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        delivery_id: uuid(row.try_get("delivery_id")?)?,
        attempt: row.try_get("attempt")?,
        at: from_ms(row.try_get("at")?),
        status_code: row.try_get("status_code")?,
        error: row.try_get("error")?,
        duration_ms: row.try_get("duration_ms")?,
    })
}

#[async_trait::async_trait]
impl WebhookStore for SqliteStore {
    async fn create_webhook(&self, w: &Webhook) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhooks (id, organization_id, url, events, secret_sealed, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(w.id.to_string())
        .bind(w.organization_id.to_string())
        .bind(&w.url)
        .bind(to_json(&w.events))
        .bind(&w.secret_sealed)
        .bind(ms(w.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn webhook(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<Webhook>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE deleted_at IS NULL AND id = "
        ));
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(webhook_from_row).transpose()
    }

    async fn webhook_by_id(&self, id: Uuid) -> StoreResult<Option<Webhook>> {
        let row = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE deleted_at IS NULL AND id = ?"
        ))
        .bind(id.to_string())
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
        let mut builder = QueryBuilder::new(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE deleted_at IS NULL"
        ));
        push_scope(&mut builder, "organization_id", scope);
        if let Some(after) = after {
            builder.push(" AND id > ").push_bind(after.to_string());
        }
        builder
            .push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn webhooks_of_organizations(&self, organizations: &[Uuid]) -> StoreResult<Vec<Webhook>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE deleted_at IS NULL"
        ));
        push_scope(&mut builder, "organization_id", organizations);
        builder.push(" ORDER BY id");
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn delete_webhook(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let mut builder = QueryBuilder::new("UPDATE webhooks SET deleted_at = ");
        builder
            .push_bind(ms(at))
            .push(", secret_sealed = '' WHERE deleted_at IS NULL AND id = ")
            .push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let deleted = builder.build().execute(&mut *tx).await?.rows_affected() == 1;
        if deleted {
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL,
                   claimed_by = NULL, lease_until = NULL, completed_at = ?,
                   last_error = 'webhook deleted'
                 WHERE webhook_id = ? AND status = 'pending'",
            )
            .bind(ms(at))
            .bind(id.to_string())
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
        let mut tx = self.pool.begin().await?;
        for d in deliveries {
            sqlx::query(
                "INSERT INTO webhook_deliveries (id, webhook_id, organization_id, event, body,
                   status, attempts, next_attempt_at, created_at)
                 VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
            )
            .bind(d.id.to_string())
            .bind(d.webhook_id.to_string())
            .bind(d.organization_id.to_string())
            .bind(&d.event)
            .bind(&d.body)
            .bind(ms(d.created_at))
            .bind(ms(d.created_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
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
            "UPDATE webhook_deliveries SET claimed_by = ?, lease_until = ?
             WHERE id IN (
                 SELECT id FROM webhook_deliveries
                 WHERE status = 'pending' AND next_attempt_at <= ?
                   AND (lease_until IS NULL OR lease_until < ?)
                 ORDER BY next_attempt_at, id LIMIT ?)
             RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(worker)
        .bind(ms(lease_until))
        .bind(ms(now))
        .bind(ms(now))
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
            AttemptOutcome::Delivered => ("delivered", None, Some(ms(a.at))),
            AttemptOutcome::RetryAt(at) => ("pending", Some(ms(at)), None),
            AttemptOutcome::Failed => ("failed", None, Some(ms(a.at))),
        };
        let updated = sqlx::query(
            "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = ?,
               completed_at = ?, last_status_code = ?, last_error = ?,
               claimed_by = NULL, lease_until = NULL
             WHERE id = ? AND claimed_by = ? AND status = 'pending'",
        )
        .bind(status)
        .bind(a.attempt)
        .bind(next)
        .bind(completed)
        .bind(a.status_code)
        .bind(&a.error)
        .bind(a.delivery_id.to_string())
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
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(a.delivery_id.to_string())
        .bind(a.attempt)
        .bind(ms(a.at))
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
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = ? AND id = ?"
        ))
        .bind(webhook_id.to_string())
        .bind(id.to_string())
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
        let mut builder = QueryBuilder::new(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = "
        ));
        builder.push_bind(webhook_id.to_string());
        if let Some(before) = before {
            builder.push(" AND id < ").push_bind(before.to_string());
        }
        builder
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn delivery_attempts(&self, delivery_ids: &[Uuid]) -> StoreResult<Vec<DeliveryAttempt>> {
        if delivery_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut builder = QueryBuilder::new(
            "SELECT delivery_id, attempt, at, status_code, error, duration_ms
             FROM webhook_delivery_attempts WHERE 1",
        );
        push_scope(&mut builder, "delivery_id", delivery_ids);
        builder.push(" ORDER BY delivery_id, attempt");
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn prune_deliveries(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM webhook_delivery_attempts WHERE delivery_id IN (
                 SELECT id FROM webhook_deliveries
                 WHERE status <> 'pending' AND completed_at < ?)",
        )
        .bind(ms(before))
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND completed_at < ?",
        )
        .bind(ms(before))
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(r.id.to_string())
        .bind(r.organization_id.to_string())
        .bind(&r.name)
        .bind(r.kind.as_str())
        .bind(&r.metric)
        .bind(&r.op)
        .bind(r.threshold)
        .bind(r.for_seconds)
        .bind(&r.severity)
        .bind(to_json(&r.selector))
        .bind(ms(r.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn alert_rule(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<AlertRule>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {RULE_COLUMNS} FROM alert_rules WHERE deleted_at IS NULL AND id = "
        ));
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(rule_from_row).transpose()
    }

    async fn list_alert_rules(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<AlertRule>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {RULE_COLUMNS} FROM alert_rules WHERE deleted_at IS NULL"
        ));
        push_scope(&mut builder, "organization_id", scope);
        if let Some(after) = after {
            builder.push(" AND id > ").push_bind(after.to_string());
        }
        builder
            .push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
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
        let mut builder = QueryBuilder::new("UPDATE alert_rules SET deleted_at = ");
        builder
            .push_bind(ms(at))
            .push(" WHERE deleted_at IS NULL AND id = ")
            .push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let deleted = builder.build().execute(&mut *tx).await?.rows_affected() == 1;
        if deleted {
            sqlx::query("DELETE FROM alert_conditions WHERE rule_id = ?")
                .bind(id.to_string())
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
        sqlx::query(
            "INSERT INTO alert_conditions (rule_id, server_id, since) VALUES (?, ?, ?)
             ON CONFLICT (rule_id, server_id) DO NOTHING",
        )
        .bind(rule_id.to_string())
        .bind(server_id.to_string())
        .bind(ms(since))
        .execute(&self.pool)
        .await?;
        let stored: Option<i64> = sqlx::query_scalar(
            "SELECT since FROM alert_conditions WHERE rule_id = ? AND server_id = ?",
        )
        .bind(rule_id.to_string())
        .bind(server_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(stored.map(from_ms).unwrap_or(since))
    }

    async fn clear_condition(&self, rule_id: Uuid, server_id: Uuid) -> StoreResult<()> {
        sqlx::query("DELETE FROM alert_conditions WHERE rule_id = ? AND server_id = ?")
            .bind(rule_id.to_string())
            .bind(server_id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn conditions_of_rule(&self, rule_id: Uuid) -> StoreResult<Vec<(Uuid, DateTime<Utc>)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT server_id, since FROM alert_conditions WHERE rule_id = ? ORDER BY server_id",
        )
        .bind(rule_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(server, since)| Ok((uuid(&server)?, from_ms(since))))
            .collect()
    }

    async fn fire_alert(&self, a: &Alert) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO alerts (id, rule_id, rule_name, organization_id, server_id, severity,
               state, value, started_at, resolved_at)
             VALUES (?, ?, ?, ?, ?, ?, 'firing', ?, ?, NULL)
             ON CONFLICT DO NOTHING",
        )
        .bind(a.id.to_string())
        .bind(a.rule_id.to_string())
        .bind(&a.rule_name)
        .bind(a.organization_id.to_string())
        .bind(a.server_id.to_string())
        .bind(&a.severity)
        .bind(a.value)
        .bind(ms(a.started_at))
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
            "UPDATE alerts SET state = 'resolved', resolved_at = ?
             WHERE rule_id = ? AND server_id = ? AND state = 'firing'
             RETURNING {ALERT_COLUMNS}"
        ))
        .bind(ms(at))
        .bind(rule_id.to_string())
        .bind(server_id.to_string())
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
            "UPDATE alerts SET state = 'resolved', resolved_at = ?
             WHERE rule_id = ? AND state = 'firing'
             RETURNING {ALERT_COLUMNS}"
        ))
        .bind(ms(at))
        .bind(rule_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }

    async fn firing_alerts_of_rule(&self, rule_id: Uuid) -> StoreResult<Vec<Alert>> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE rule_id = ? AND state = 'firing' ORDER BY id"
        ))
        .bind(rule_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }

    async fn list_alerts(&self, q: &AlertQuery) -> StoreResult<Vec<Alert>> {
        let mut builder = QueryBuilder::new(format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1"));
        push_scope(&mut builder, "organization_id", &q.scope);
        if let Some(state) = q.state {
            builder.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(before) = q.before {
            builder.push(" AND id < ").push_bind(before.to_string());
        }
        builder
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(q.limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(alert_from_row).collect()
    }
}
