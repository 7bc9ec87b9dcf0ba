//! [`super::HealthStore`] on SQLite.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::{
    result_from_row, server_refs, transition, HealthCheck, HealthCheckKind, HealthResultRecord,
    HealthStore, HealthTransition, ServerRef,
};
use crate::store::sqlite::{from_ms, ms, push_scope, uuid, SqliteStore};
use crate::store::{StoreError, StoreResult};

const CHECK_COLUMNS: &str = "id, organization_id, name, kind, spec, interval_seconds, \
     timeout_seconds, retries, start_period_seconds, selector, created_at, updated_at";

const RESULT_COLUMNS: &str = "server_id, check_id, name, status, message, consecutive_failures, \
     checked_at, duration_ms, seq, received_at";

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn check_from_row(row: &SqliteRow) -> StoreResult<HealthCheck> {
    let id: String = row.try_get("id")?;
    let organization_id: String = row.try_get("organization_id")?;
    let kind: String = row.try_get("kind")?;
    let spec: String = row.try_get("spec")?;
    let selector: String = row.try_get("selector")?;
    Ok(HealthCheck {
        id: uuid(&id)?,
        organization_id: uuid(&organization_id)?,
        name: row.try_get("name")?,
        kind: HealthCheckKind::parse(&kind).ok_or_else(|| corrupt("health check kind", &kind))?,
        spec: serde_json::from_str(&spec).map_err(|e| corrupt("health check spec", e))?,
        interval_seconds: row.try_get("interval_seconds")?,
        timeout_seconds: row.try_get("timeout_seconds")?,
        retries: row.try_get("retries")?,
        start_period_seconds: row.try_get("start_period_seconds")?,
        selector: serde_json::from_str(&selector)
            .map_err(|e| corrupt("health check selector", e))?,
        created_at: from_ms(row.try_get("created_at")?),
        updated_at: from_ms(row.try_get("updated_at")?),
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

#[async_trait::async_trait]
impl HealthStore for SqliteStore {
    async fn create_health_check(&self, check: &HealthCheck) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO health_checks ({CHECK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(check.id.to_string())
        .bind(check.organization_id.to_string())
        .bind(&check.name)
        .bind(check.kind.as_str())
        .bind(to_json(&check.spec))
        .bind(check.interval_seconds)
        .bind(check.timeout_seconds)
        .bind(check.retries)
        .bind(check.start_period_seconds)
        .bind(to_json(&check.selector))
        .bind(ms(check.created_at))
        .bind(ms(check.updated_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn health_check(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<HealthCheck>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {CHECK_COLUMNS} FROM health_checks WHERE id = "
        ));
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(check_from_row).transpose()
    }

    async fn list_health_checks(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<HealthCheck>> {
        let mut builder =
            QueryBuilder::new(format!("SELECT {CHECK_COLUMNS} FROM health_checks WHERE 1"));
        push_scope(&mut builder, "organization_id", scope);
        if let Some(after) = after {
            builder.push(" AND id > ").push_bind(after.to_string());
        }
        builder
            .push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(check_from_row).collect()
    }

    async fn update_health_check(&self, scope: &[Uuid], check: &HealthCheck) -> StoreResult<bool> {
        let mut builder = QueryBuilder::new("UPDATE health_checks SET name = ");
        builder
            .push_bind(&check.name)
            .push(", kind = ")
            .push_bind(check.kind.as_str())
            .push(", spec = ")
            .push_bind(to_json(&check.spec))
            .push(", interval_seconds = ")
            .push_bind(check.interval_seconds)
            .push(", timeout_seconds = ")
            .push_bind(check.timeout_seconds)
            .push(", retries = ")
            .push_bind(check.retries)
            .push(", start_period_seconds = ")
            .push_bind(check.start_period_seconds)
            .push(", selector = ")
            .push_bind(to_json(&check.selector))
            .push(", updated_at = ")
            .push_bind(ms(check.updated_at))
            .push(" WHERE id = ")
            .push_bind(check.id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let done = builder.build().execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_health_check(&self, scope: &[Uuid], id: Uuid) -> StoreResult<bool> {
        let mut builder = QueryBuilder::new("DELETE FROM health_checks WHERE id = ");
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let done = builder.build().execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn record_health_report(
        &self,
        server_id: Uuid,
        results: &[HealthResultRecord],
        received_at: DateTime<Utc>,
    ) -> StoreResult<Vec<HealthTransition>> {
        let mut tx = self.pool.begin().await?;
        // A write first: takes the write lock for the whole transaction.
        sqlx::query(
            "UPDATE servers SET last_seen_at = MAX(COALESCE(last_seen_at, 0), ?) WHERE id = ?",
        )
        .bind(ms(received_at))
        .bind(server_id.to_string())
        .execute(&mut *tx)
        .await?;
        let mut transitions = Vec::new();
        for result in results {
            let previous: Option<(String, i64)> = sqlx::query_as(
                "SELECT status, checked_at FROM health_results WHERE server_id = ? AND check_id = ?",
            )
            .bind(server_id.to_string())
            .bind(&result.check_id)
            .fetch_optional(&mut *tx)
            .await?;
            if previous
                .as_ref()
                .is_some_and(|(_, checked_at)| *checked_at > ms(result.checked_at))
            {
                continue;
            }
            sqlx::query(&format!(
                "INSERT INTO health_results ({RESULT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (server_id, check_id) DO UPDATE SET name = excluded.name,
                     status = excluded.status, message = excluded.message,
                     consecutive_failures = excluded.consecutive_failures,
                     checked_at = excluded.checked_at, duration_ms = excluded.duration_ms,
                     seq = excluded.seq, received_at = excluded.received_at"
            ))
            .bind(server_id.to_string())
            .bind(&result.check_id)
            .bind(&result.name)
            .bind(&result.status)
            .bind(&result.message)
            .bind(result.consecutive_failures)
            .bind(ms(result.checked_at))
            .bind(result.duration_ms)
            .bind(result.seq)
            .bind(ms(received_at))
            .execute(&mut *tx)
            .await?;
            if let Some(failed) =
                transition(previous.as_ref().map(|p| p.0.as_str()), &result.status)
            {
                transitions.push(HealthTransition {
                    check_id: result.check_id.clone(),
                    check_name: result.name.clone(),
                    failed,
                    message: result.message.clone(),
                });
            }
        }
        let mut builder = QueryBuilder::new(
            "DELETE FROM health_results WHERE status <> 'rejected' AND server_id = ",
        );
        builder.push_bind(server_id.to_string());
        if !results.is_empty() {
            builder.push(" AND check_id NOT IN (");
            let mut list = builder.separated(", ");
            for result in results {
                list.push_bind(result.check_id.clone());
            }
            list.push_unseparated(")");
        }
        builder.build().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(transitions)
    }

    async fn record_rejected_checks(
        &self,
        server_id: Uuid,
        rejected: &[HealthResultRecord],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM health_results WHERE server_id = ? AND status = 'rejected'")
            .bind(server_id.to_string())
            .execute(&mut *tx)
            .await?;
        for r in rejected {
            sqlx::query(&format!(
                "INSERT INTO health_results ({RESULT_COLUMNS}) VALUES (?, ?, ?, 'rejected', ?, 0, ?, 0, 0, ?)
                 ON CONFLICT (server_id, check_id) DO UPDATE SET name = excluded.name,
                     status = 'rejected', message = excluded.message, consecutive_failures = 0,
                     checked_at = excluded.checked_at, duration_ms = 0, seq = 0,
                     received_at = excluded.received_at"
            ))
            .bind(server_id.to_string())
            .bind(&r.check_id)
            .bind(&r.name)
            .bind(&r.message)
            .bind(ms(r.checked_at))
            .bind(ms(r.received_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn health_results(&self, server_id: Uuid) -> StoreResult<Vec<HealthResultRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RESULT_COLUMNS} FROM health_results WHERE server_id = ? ORDER BY check_id"
        ))
        .bind(server_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(result_from_row).collect()
    }

    async fn end_session(
        &self,
        server_id: Uuid,
        online_since: DateTime<Utc>,
        reason: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<ServerRef>> {
        let rows = sqlx::query(
            "UPDATE servers SET status = 'offline', status_reason = ?, last_seen_at = ?,
                    online_since = NULL
             WHERE id = ? AND deleted_at IS NULL AND status = 'online' AND online_since = ?
             RETURNING id, organization_id, name",
        )
        .bind(reason)
        .bind(ms(at))
        .bind(server_id.to_string())
        .bind(ms(online_since))
        .fetch_all(&self.pool)
        .await?;
        Ok(server_refs(&rows)?.into_iter().next())
    }

    async fn mark_stale_offline(
        &self,
        cutoff: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<Vec<ServerRef>> {
        let rows = sqlx::query(
            "UPDATE servers SET status = 'offline', status_reason = ?, online_since = NULL
             WHERE status = 'online' AND deleted_at IS NULL
               AND (last_seen_at IS NULL OR last_seen_at < ?)
             RETURNING id, organization_id, name",
        )
        .bind(reason)
        .bind(ms(cutoff))
        .fetch_all(&self.pool)
        .await?;
        server_refs(&rows)
    }

    async fn mark_registration_timeouts(
        &self,
        created_before: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<Vec<ServerRef>> {
        let rows = sqlx::query(
            "UPDATE servers SET status = 'timeout', status_reason = ?
             WHERE status = 'connecting' AND deleted_at IS NULL AND created_at < ?
             RETURNING id, organization_id, name",
        )
        .bind(reason)
        .bind(ms(created_before))
        .fetch_all(&self.pool)
        .await?;
        server_refs(&rows)
    }
}
