//! [`super::TelemetryStore`] on PostgreSQL.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::*;
use crate::store::postgres::*;

#[async_trait::async_trait]
impl TelemetryStore for PostgresStore {
    /// Two: while one transaction runs in PostgreSQL, the next one's
    /// records are encoded and sent. Both write rows in `(server_id, seq)`
    /// order, so they wait on each other's rows rather than deadlock.
    fn metrics_writers(&self) -> usize {
        2
    }

    async fn ingest_metrics(&self, ingest: &MetricsIngest) -> StoreResult<()> {
        if ingest.metrics.is_empty() && ingest.containers.is_empty() {
            return Ok(());
        }
        let mut attempt = 1;
        loop {
            match self.ingest_metrics_once(ingest).await {
                Err(e) if attempt < INGEST_ATTEMPTS && is_aborted_by_a_conflict(&e) => {
                    tracing::warn!(error = %e, attempt, batches = ingest.metrics.len(), "metrics write aborted by PostgreSQL; writing it again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn metrics_points(
        &self,
        server_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MetricsRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {METRICS_COLUMNS} FROM metrics
             WHERE server_id = $1 AND ts >= $2 AND ts < $3
             ORDER BY ts, seq
             LIMIT $4"
        ))
        .bind(server_id)
        .bind(from)
        .bind(to)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(metrics_from_row).collect()
    }

    async fn metrics_rollups(
        &self,
        server_id: Uuid,
        step_seconds: i64,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<RollupRecord>> {
        let rows = sqlx::query(
            "SELECT server_id, step_seconds, bucket_start, samples, cpu_percent_avg, cpu_percent_max,
                    load_1_avg, memory_used_bytes_avg, memory_total_bytes, swap_used_bytes_avg
             FROM metric_rollups
             WHERE server_id = $1 AND step_seconds = $2 AND bucket_start >= $3 AND bucket_start < $4
             ORDER BY bucket_start
             LIMIT $5",
        )
        .bind(server_id)
        .bind(step_seconds)
        .bind(from)
        .bind(to)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RollupRecord {
                    server_id: row.try_get("server_id")?,
                    step_seconds: row.try_get("step_seconds")?,
                    bucket_start: row.try_get("bucket_start")?,
                    samples: row.try_get("samples")?,
                    cpu_percent_avg: row.try_get("cpu_percent_avg")?,
                    cpu_percent_max: row.try_get("cpu_percent_max")?,
                    load_1_avg: row.try_get("load_1_avg")?,
                    memory_used_bytes_avg: row.try_get("memory_used_bytes_avg")?,
                    memory_total_bytes: row.try_get("memory_total_bytes")?,
                    swap_used_bytes_avg: row.try_get("swap_used_bytes_avg")?,
                })
            })
            .collect()
    }

    async fn compute_rollups(&self, step_seconds: i64, now: DateTime<Utc>) -> StoreResult<u64> {
        let job = format!("rollup:{step_seconds}");
        // Buckets are `step_seconds` wide (at least one second), aligned on
        // the Unix epoch like SQLite's `(ts / step) * step`.
        let step = chrono::Duration::seconds(step_seconds.max(1));
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO job_state (name, watermark) VALUES ($1, 'epoch')
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&job)
        .execute(&mut *tx)
        .await?;
        // Replicas running the same job queue here; the next one reads the
        // watermark the previous one committed.
        let watermark: DateTime<Utc> =
            sqlx::query_scalar("SELECT watermark FROM job_state WHERE name = $1 FOR UPDATE")
                .bind(&job)
                .fetch_one(&mut *tx)
                .await?;
        // Every bucket holding a point received in [watermark, now) is
        // recomputed from all of its points, late ones included.
        let written = sqlx::query(
            "WITH touched AS (
                 SELECT DISTINCT server_id, date_bin($2, ts, timestamptz 'epoch') AS bucket_start
                 FROM metrics
                 WHERE received_at >= $3 AND received_at < $4)
             INSERT INTO metric_rollups (server_id, step_seconds, bucket_start, samples, cpu_percent_avg,
                 cpu_percent_max, load_1_avg, memory_used_bytes_avg, memory_total_bytes, swap_used_bytes_avg)
             SELECT t.server_id, $1, t.bucket_start, COUNT(*), AVG(m.cpu_percent), MAX(m.cpu_percent),
                    AVG(m.load_1), AVG(m.memory_used_bytes)::double precision, MAX(m.memory_total_bytes),
                    AVG(m.swap_used_bytes)::double precision
             FROM touched t
             JOIN metrics m
               ON m.server_id = t.server_id AND m.ts >= t.bucket_start AND m.ts < t.bucket_start + $2
             GROUP BY t.server_id, t.bucket_start
             ORDER BY t.server_id, t.bucket_start
             ON CONFLICT (server_id, step_seconds, bucket_start) DO UPDATE SET
                 samples = excluded.samples,
                 cpu_percent_avg = excluded.cpu_percent_avg,
                 cpu_percent_max = excluded.cpu_percent_max,
                 load_1_avg = excluded.load_1_avg,
                 memory_used_bytes_avg = excluded.memory_used_bytes_avg,
                 memory_total_bytes = excluded.memory_total_bytes,
                 swap_used_bytes_avg = excluded.swap_used_bytes_avg",
        )
        .bind(step_seconds)
        .bind(step)
        .bind(watermark)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // Never backwards: a replica whose clock lags must not make the next
        // run recompute buckets that are already up to date.
        sqlx::query("UPDATE job_state SET watermark = GREATEST(watermark, $2) WHERE name = $1")
            .bind(&job)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(written)
    }

    async fn prune_metrics(
        &self,
        raw_before: DateTime<Utc>,
        rollups_before: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let raw = sqlx::query("DELETE FROM metrics WHERE ts < $1")
            .bind(raw_before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let rollups = sqlx::query("DELETE FROM metric_rollups WHERE bucket_start < $1")
            .bind(rollups_before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(raw + rollups)
    }

    async fn container_set(&self, server_id: Uuid) -> StoreResult<Option<ContainerSet>> {
        let rows = sqlx::query(&format!(
            "{CONTAINER_SETS_SELECT} WHERE s.deleted_at IS NULL AND r.server_id = $1
             ORDER BY r.server_id, c.name, c.container_id"
        ))
        .bind(server_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(container_sets_from_rows(&rows)?.into_iter().next())
    }

    async fn latest_metrics(&self, scope: &[Uuid]) -> StoreResult<Vec<MetricsRecord>> {
        // One index probe per live server: the newest entry of its
        // (server_id, seq) primary key.
        let rows = sqlx::query(&format!(
            "SELECT latest.* FROM servers s
             CROSS JOIN LATERAL (
                 SELECT {METRICS_COLUMNS} FROM metrics
                 WHERE server_id = s.id
                 ORDER BY seq DESC
                 LIMIT 1) latest
             WHERE s.deleted_at IS NULL AND s.organization_id = ANY($1)
             ORDER BY s.id"
        ))
        .bind(scope)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(metrics_from_row).collect()
    }

    async fn latest_container_sets(&self, scope: &[Uuid]) -> StoreResult<Vec<ContainerSet>> {
        let rows = sqlx::query(&format!(
            "{CONTAINER_SETS_SELECT} WHERE s.deleted_at IS NULL AND s.organization_id = ANY($1)
             ORDER BY r.server_id, c.name, c.container_id"
        ))
        .bind(scope)
        .fetch_all(&self.pool)
        .await?;
        container_sets_from_rows(&rows)
    }

    async fn delete_server_data(&self, server_id: Uuid) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut deleted = 0;
        for table in SERVER_DATA_TABLES {
            deleted += sqlx::query(&format!("DELETE FROM {table} WHERE server_id = $1"))
                .bind(server_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }
}
