//! [`super::HealthStore`] on PostgreSQL.
//!
//! A report's transaction starts by updating its server's row, which locks
//! it: two reports of one server (a periodic one and a run-now answer) are
//! stored one after the other, so each transition is detected once.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::{
    result_from_row, server_refs, transition, HealthCheck, HealthCheckKind, HealthCheckSpecFields,
    HealthResultRecord, HealthSelector, HealthStore, HealthTransition, ServerRef,
};
use crate::store::postgres::PostgresStore;
use crate::store::{StoreError, StoreResult};

const CHECK_COLUMNS: &str = "id, organization_id, name, kind, spec, interval_seconds, \
     timeout_seconds, retries, start_period_seconds, selector, created_at, updated_at";

const RESULT_COLUMNS: &str = "server_id, check_id, name, status, message, consecutive_failures, \
     checked_at, duration_ms, seq, received_at";

/// `s` without NUL characters, which PostgreSQL text refuses (agents' output
/// may hold them).
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn check_from_row(row: &PgRow) -> StoreResult<HealthCheck> {
    let kind: String = row.try_get("kind")?;
    let Json(spec): Json<HealthCheckSpecFields> = row.try_get("spec")?;
    let Json(selector): Json<HealthSelector> = row.try_get("selector")?;
    Ok(HealthCheck {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        kind: HealthCheckKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("health check kind {kind:?}")))?,
        spec,
        interval_seconds: row.try_get("interval_seconds")?,
        timeout_seconds: row.try_get("timeout_seconds")?,
        retries: row.try_get("retries")?,
        start_period_seconds: row.try_get("start_period_seconds")?,
        selector,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

#[async_trait::async_trait]
impl HealthStore for PostgresStore {
    async fn create_health_check(&self, check: &HealthCheck) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO health_checks ({CHECK_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(check.id)
        .bind(check.organization_id)
        .bind(text(&check.name))
        .bind(check.kind.as_str())
        .bind(Json(&check.spec))
        .bind(check.interval_seconds)
        .bind(check.timeout_seconds)
        .bind(check.retries)
        .bind(check.start_period_seconds)
        .bind(Json(&check.selector))
        .bind(check.created_at)
        .bind(check.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn health_check(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<HealthCheck>> {
        let row = sqlx::query(&format!(
            "SELECT {CHECK_COLUMNS} FROM health_checks WHERE id = $1 AND organization_id = ANY($2)"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(check_from_row).transpose()
    }

    async fn list_health_checks(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<HealthCheck>> {
        let rows = sqlx::query(&format!(
            "SELECT {CHECK_COLUMNS} FROM health_checks
             WHERE organization_id = ANY($1) AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id LIMIT $3"
        ))
        .bind(scope)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(check_from_row).collect()
    }

    async fn update_health_check(&self, scope: &[Uuid], check: &HealthCheck) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE health_checks SET name = $1, kind = $2, spec = $3, interval_seconds = $4,
                    timeout_seconds = $5, retries = $6, start_period_seconds = $7,
                    selector = $8, updated_at = $9
             WHERE id = $10 AND organization_id = ANY($11)",
        )
        .bind(text(&check.name))
        .bind(check.kind.as_str())
        .bind(Json(&check.spec))
        .bind(check.interval_seconds)
        .bind(check.timeout_seconds)
        .bind(check.retries)
        .bind(check.start_period_seconds)
        .bind(Json(&check.selector))
        .bind(check.updated_at)
        .bind(check.id)
        .bind(scope)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_health_check(&self, scope: &[Uuid], id: Uuid) -> StoreResult<bool> {
        let done =
            sqlx::query("DELETE FROM health_checks WHERE id = $1 AND organization_id = ANY($2)")
                .bind(id)
                .bind(scope)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn record_health_report(
        &self,
        server_id: Uuid,
        results: &[HealthResultRecord],
        received_at: DateTime<Utc>,
    ) -> StoreResult<Vec<HealthTransition>> {
        let mut tx = self.pool.begin().await?;
        // Locks the server's row: reports of one server are stored in turn.
        sqlx::query("UPDATE servers SET last_seen_at = GREATEST(last_seen_at, $1) WHERE id = $2")
            .bind(received_at)
            .bind(server_id)
            .execute(&mut *tx)
            .await?;
        let mut transitions = Vec::new();
        for result in results {
            let check_id = text(&result.check_id);
            let previous: Option<(String, DateTime<Utc>)> = sqlx::query_as(
                "SELECT status, checked_at FROM health_results
                 WHERE server_id = $1 AND check_id = $2",
            )
            .bind(server_id)
            .bind(&*check_id)
            .fetch_optional(&mut *tx)
            .await?;
            if previous
                .as_ref()
                .is_some_and(|(_, checked_at)| *checked_at > result.checked_at)
            {
                continue;
            }
            sqlx::query(&format!(
                "INSERT INTO health_results ({RESULT_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (server_id, check_id) DO UPDATE SET name = EXCLUDED.name,
                     status = EXCLUDED.status, message = EXCLUDED.message,
                     consecutive_failures = EXCLUDED.consecutive_failures,
                     checked_at = EXCLUDED.checked_at, duration_ms = EXCLUDED.duration_ms,
                     seq = EXCLUDED.seq, received_at = EXCLUDED.received_at"
            ))
            .bind(server_id)
            .bind(&*check_id)
            .bind(&*text(&result.name))
            .bind(&*text(&result.status))
            .bind(&*text(&result.message))
            .bind(result.consecutive_failures)
            .bind(result.checked_at)
            .bind(result.duration_ms)
            .bind(result.seq)
            .bind(received_at)
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
        let keep: Vec<String> = results
            .iter()
            .map(|r| text(&r.check_id).into_owned())
            .collect();
        sqlx::query(
            "DELETE FROM health_results
             WHERE server_id = $1 AND check_id <> ALL($2) AND status <> 'rejected'",
        )
        .bind(server_id)
        .bind(&keep)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(transitions)
    }

    async fn record_rejected_checks(
        &self,
        server_id: Uuid,
        rejected: &[HealthResultRecord],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM health_results WHERE server_id = $1 AND status = 'rejected'")
            .bind(server_id)
            .execute(&mut *tx)
            .await?;
        for r in rejected {
            sqlx::query(&format!(
                "INSERT INTO health_results ({RESULT_COLUMNS})
                 VALUES ($1, $2, $3, 'rejected', $4, 0, $5, 0, 0, $6)
                 ON CONFLICT (server_id, check_id) DO UPDATE SET name = EXCLUDED.name,
                     status = 'rejected', message = EXCLUDED.message, consecutive_failures = 0,
                     checked_at = EXCLUDED.checked_at, duration_ms = 0, seq = 0,
                     received_at = EXCLUDED.received_at"
            ))
            .bind(server_id)
            .bind(&*text(&r.check_id))
            .bind(&*text(&r.name))
            .bind(&*text(&r.message))
            .bind(r.checked_at)
            .bind(r.received_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn health_results(&self, server_id: Uuid) -> StoreResult<Vec<HealthResultRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RESULT_COLUMNS} FROM health_results WHERE server_id = $1 ORDER BY check_id"
        ))
        .bind(server_id)
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
            "UPDATE servers SET status = 'offline', status_reason = $1, last_seen_at = $2,
                    online_since = NULL
             WHERE id = $3 AND deleted_at IS NULL AND status = 'online' AND online_since = $4
             RETURNING id, organization_id, name",
        )
        .bind(&*text(reason))
        .bind(at)
        .bind(server_id)
        .bind(online_since)
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
            "UPDATE servers SET status = 'offline', status_reason = $1, online_since = NULL
             WHERE id IN (
                 SELECT id FROM servers
                 WHERE status = 'online' AND deleted_at IS NULL
                   AND (last_seen_at IS NULL OR last_seen_at < $2)
                 ORDER BY id FOR UPDATE SKIP LOCKED)
               AND status = 'online'
             RETURNING id, organization_id, name",
        )
        .bind(&*text(reason))
        .bind(cutoff)
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
            "UPDATE servers SET status = 'timeout', status_reason = $1
             WHERE id IN (
                 SELECT id FROM servers
                 WHERE status = 'connecting' AND deleted_at IS NULL AND created_at < $2
                 ORDER BY id FOR UPDATE SKIP LOCKED)
               AND status = 'connecting'
             RETURNING id, organization_id, name",
        )
        .bind(&*text(reason))
        .bind(created_before)
        .fetch_all(&self.pool)
        .await?;
        server_refs(&rows)
    }
}
