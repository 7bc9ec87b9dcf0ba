//! [`super::TelemetryStore`] on SQLite.

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::*;
use crate::store::sqlite::*;

#[async_trait::async_trait]
impl TelemetryStore for SqliteStore {
    async fn ingest_metrics(&self, ingest: &MetricsIngest) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let received_at = ms(ingest.received_at);
        for chunk in ingest.metrics.chunks(ROWS_PER_STATEMENT) {
            let mut builder = QueryBuilder::new(
                "INSERT INTO metrics (server_id, seq, ts, received_at, cpu_percent, load_1, load_5, load_15,
                 memory_used_bytes, memory_total_bytes, swap_used_bytes, swap_total_bytes, cpu_per_core,
                 disks, networks, uptime_seconds, process_count, dropped_batches) ",
            );
            builder.push_values(chunk, |mut row, m| {
                row.push_bind(m.server_id.to_string())
                    .push_bind(m.seq)
                    .push_bind(ms(m.ts))
                    .push_bind(received_at)
                    .push_bind(m.cpu_percent)
                    .push_bind(m.load_1)
                    .push_bind(m.load_5)
                    .push_bind(m.load_15)
                    .push_bind(m.memory_used_bytes)
                    .push_bind(m.memory_total_bytes)
                    .push_bind(m.swap_used_bytes)
                    .push_bind(m.swap_total_bytes)
                    .push_bind(m.cpu_per_core.as_str())
                    .push_bind(m.disks.as_str())
                    .push_bind(m.networks.as_str())
                    .push_bind(m.uptime_seconds)
                    .push_bind(m.process_count)
                    .push_bind(m.dropped_batches);
            });
            builder.push(" ON CONFLICT (server_id, seq) DO NOTHING");
            builder
                .build()
                .persistent(cacheable(chunk))
                .execute(&mut *tx)
                .await?;
        }
        replace_container_sets(&mut tx, &ingest.containers).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn metrics_points(
        &self,
        server_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MetricsRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {METRICS_COLUMNS} FROM metrics WHERE server_id = ? AND ts >= ? AND ts < ? ORDER BY ts, seq LIMIT ?"
        ))
        .bind(server_id.to_string())
        .bind(ms(from))
        .bind(ms(to))
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
            "SELECT server_id, step_seconds, bucket_start, samples, cpu_percent_avg, cpu_percent_max, load_1_avg,
                    memory_used_bytes_avg, memory_total_bytes, swap_used_bytes_avg
             FROM metric_rollups WHERE server_id = ? AND step_seconds = ? AND bucket_start >= ? AND bucket_start < ?
             ORDER BY bucket_start LIMIT ?",
        )
        .bind(server_id.to_string())
        .bind(step_seconds)
        .bind(ms(from))
        .bind(ms(to))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RollupRecord {
                    server_id: uuid(row.try_get("server_id")?)?,
                    step_seconds: row.try_get("step_seconds")?,
                    bucket_start: from_ms(row.try_get("bucket_start")?),
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
        let step_ms = step_seconds.max(1) * 1000;
        let job = format!("rollup:{step_seconds}");
        let mut tx = self.pool.begin().await?;
        // Write first: take the write lock before reading the watermark.
        sqlx::query(
            "INSERT INTO job_state (name, value) VALUES (?, 0) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&job)
        .execute(&mut *tx)
        .await?;
        let watermark: i64 = sqlx::query_scalar("SELECT value FROM job_state WHERE name = ?")
            .bind(&job)
            .fetch_one(&mut *tx)
            .await?;
        let until = ms(now);
        let written = sqlx::query(
            "INSERT INTO metric_rollups (server_id, step_seconds, bucket_start, samples, cpu_percent_avg,
                 cpu_percent_max, load_1_avg, memory_used_bytes_avg, memory_total_bytes, swap_used_bytes_avg)
             SELECT m.server_id, ?1, (m.ts / ?2) * ?2, COUNT(*), AVG(m.cpu_percent), MAX(m.cpu_percent),
                    AVG(m.load_1), AVG(m.memory_used_bytes), MAX(m.memory_total_bytes), AVG(m.swap_used_bytes)
             FROM metrics m
             JOIN (SELECT DISTINCT server_id, (ts / ?2) * ?2 AS bucket FROM metrics
                   WHERE received_at >= ?3 AND received_at < ?4) t
               ON m.server_id = t.server_id AND m.ts >= t.bucket AND m.ts < t.bucket + ?2
             WHERE 1
             GROUP BY m.server_id, (m.ts / ?2) * ?2
             ON CONFLICT (server_id, step_seconds, bucket_start) DO UPDATE SET
                 samples = excluded.samples, cpu_percent_avg = excluded.cpu_percent_avg,
                 cpu_percent_max = excluded.cpu_percent_max, load_1_avg = excluded.load_1_avg,
                 memory_used_bytes_avg = excluded.memory_used_bytes_avg,
                 memory_total_bytes = excluded.memory_total_bytes, swap_used_bytes_avg = excluded.swap_used_bytes_avg",
        )
        .bind(step_seconds)
        .bind(step_ms)
        .bind(watermark)
        .bind(until)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE job_state SET value = MAX(value, ?) WHERE name = ?")
            .bind(until)
            .bind(&job)
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
        let raw = sqlx::query("DELETE FROM metrics WHERE ts < ?")
            .bind(ms(raw_before))
            .execute(&self.pool)
            .await?
            .rows_affected();
        let rollups = sqlx::query("DELETE FROM metric_rollups WHERE bucket_start < ?")
            .bind(ms(rollups_before))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(raw + rollups)
    }

    async fn container_set(&self, server_id: Uuid) -> StoreResult<Option<ContainerSet>> {
        let sets = self.container_sets(Some(server_id), &[]).await?;
        Ok(sets.into_iter().next())
    }

    async fn latest_metrics(&self, scope: &[Uuid]) -> StoreResult<Vec<MetricsRecord>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {METRICS_COLUMNS_QUALIFIED} FROM metrics m
             JOIN (SELECT l.server_id, MAX(l.seq) AS seq FROM metrics l
                   JOIN servers s ON s.id = l.server_id WHERE s.deleted_at IS NULL"
        ));
        push_scope(&mut builder, "s.organization_id", scope);
        builder.push(
            " GROUP BY l.server_id) latest ON m.server_id = latest.server_id AND m.seq = latest.seq ORDER BY m.server_id",
        );
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(metrics_from_row).collect()
    }

    async fn latest_container_sets(&self, scope: &[Uuid]) -> StoreResult<Vec<ContainerSet>> {
        self.container_sets(None, scope).await
    }

    async fn delete_server_data(&self, server_id: Uuid) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut deleted = 0;
        for table in SERVER_DATA_TABLES {
            deleted += sqlx::query(&format!("DELETE FROM {table} WHERE server_id = ?"))
                .bind(server_id.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }
}
