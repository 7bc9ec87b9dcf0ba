//! Telemetry the agents report as the store keeps it: raw metrics points,
//! their rollups, and each server's latest container report.
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite
//! (`control-plane/tests/store_telemetry.rs`).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::row::StoreRow;
use super::{JsonText, StoreResult};

mod postgres;
mod sqlite;

/// One raw metrics point: what one agent batch said about its host.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRecord {
    pub server_id: Uuid,
    pub seq: i64,
    pub ts: DateTime<Utc>,
    pub cpu_percent: f64,
    pub load_1: f64,
    pub load_5: f64,
    pub load_15: f64,
    pub memory_used_bytes: i64,
    pub memory_total_bytes: i64,
    pub swap_used_bytes: i64,
    pub swap_total_bytes: i64,
    /// JSON array of per-core CPU percentages.
    pub cpu_per_core: JsonText,
    /// JSON array of `{mount_point, device, filesystem, total_bytes, used_bytes, inodes_total, inodes_used}`.
    pub disks: JsonText,
    /// JSON array of `{interface, rx_bytes, tx_bytes, rx_packets, tx_packets, rx_errors, tx_errors}`.
    pub networks: JsonText,
    pub uptime_seconds: i64,
    pub process_count: i64,
    pub dropped_batches: i64,
}

impl MetricsRecord {
    /// How full the fullest disk is, in percent (0 without disks).
    pub fn disk_used_percent(&self) -> f64 {
        #[derive(Deserialize)]
        struct DiskUse {
            #[serde(default)]
            used_bytes: f64,
            #[serde(default)]
            total_bytes: f64,
        }
        serde_json::from_str::<Vec<DiskUse>>(self.disks.as_str())
            .unwrap_or_default()
            .iter()
            .filter(|d| d.total_bytes > 0.0)
            .map(|d| d.used_bytes / d.total_bytes * 100.0)
            .fold(0.0, f64::max)
    }
}

/// A rolled-up metrics bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRecord {
    pub server_id: Uuid,
    pub step_seconds: i64,
    pub bucket_start: DateTime<Utc>,
    pub samples: i64,
    pub cpu_percent_avg: f64,
    pub cpu_percent_max: f64,
    pub load_1_avg: f64,
    pub memory_used_bytes_avg: f64,
    pub memory_total_bytes: i64,
    pub swap_used_bytes_avg: f64,
}

/// One container as last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerRecord {
    pub container_id: String,
    pub name: String,
    pub image: String,
    pub state: String,
    pub health: Option<String>,
    pub restart_count: i64,
    pub started_at: Option<String>,
    pub cpu_percent: f64,
    pub memory_usage_bytes: i64,
    pub memory_limit_bytes: i64,
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
    pub block_read_bytes: i64,
    pub block_write_bytes: i64,
}

/// A server's latest container report.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSet {
    pub server_id: Uuid,
    /// Seq of the batch it came from: an older batch (a replay) never
    /// replaces a newer report.
    pub seq: i64,
    pub docker_version: Option<String>,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
    pub containers: Vec<ContainerRecord>,
}

/// Batches to store in one transaction.
#[derive(Debug, Clone, Default)]
pub struct MetricsIngest {
    pub received_at: DateTime<Utc>,
    pub metrics: Vec<MetricsRecord>,
    pub containers: Vec<ContainerSet>,
}

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait TelemetryStore: Send + Sync {
    /// Stores batches in one transaction: each `(server_id, seq)` once
    /// (a replay is a no-op), container sets only when newer than the stored one.
    async fn ingest_metrics(&self, ingest: &MetricsIngest) -> StoreResult<()>;

    /// How many [`TelemetryStore::ingest_metrics`] calls may usefully run at once:
    /// one where the database takes one writer at a time (SQLite), more
    /// where it runs transactions side by side (PostgreSQL).
    fn metrics_writers(&self) -> usize {
        1
    }

    /// Raw points of a server with `from <= ts < to`, oldest first.
    async fn metrics_points(
        &self,
        server_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<MetricsRecord>>;

    /// Rollup buckets of a server with `from <= bucket_start < to`, oldest first.
    async fn metrics_rollups(
        &self,
        server_id: Uuid,
        step_seconds: i64,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<RollupRecord>>;

    /// (Re)computes the `step_seconds` buckets touched by points received
    /// since the last call (up to `now`); returns how many buckets were written.
    async fn compute_rollups(&self, step_seconds: i64, now: DateTime<Utc>) -> StoreResult<u64>;

    /// Deletes raw points older than `raw_before` and rollups older than
    /// `rollups_before`; returns how many rows went.
    async fn prune_metrics(
        &self,
        raw_before: DateTime<Utc>,
        rollups_before: DateTime<Utc>,
    ) -> StoreResult<u64>;

    /// The latest container report of a server.
    async fn container_set(&self, server_id: Uuid) -> StoreResult<Option<ContainerSet>>;

    /// The latest raw point of every live server in `scope`, by server id.
    async fn latest_metrics(&self, scope: &[Uuid]) -> StoreResult<Vec<MetricsRecord>>;

    /// The latest container reports of every live server in `scope`, by server id.
    async fn latest_container_sets(&self, scope: &[Uuid]) -> StoreResult<Vec<ContainerSet>>;

    /// Deletes what a server reported and what was derived from it, in one
    /// transaction: raw metrics, rollups, container reports, latest health
    /// results and alert conditions (its row, certificates, commands,
    /// alerts and audit entries stay). The number of rows deleted.
    async fn delete_server_data(&self, server_id: Uuid) -> StoreResult<u64>;
}

/// The tables [`TelemetryStore::delete_server_data`] empties of a server.
pub(crate) const SERVER_DATA_TABLES: [&str; 6] = [
    "metrics",
    "metric_rollups",
    "containers",
    "container_reports",
    "health_results",
    "alert_conditions",
];

/// A `metrics` row.
pub(crate) fn metrics_from_row(row: &impl StoreRow) -> StoreResult<MetricsRecord> {
    Ok(MetricsRecord {
        server_id: row.id("server_id")?,
        seq: row.int("seq")?,
        ts: row.time("ts")?,
        cpu_percent: row.float("cpu_percent")?,
        load_1: row.float("load_1")?,
        load_5: row.float("load_5")?,
        load_15: row.float("load_15")?,
        memory_used_bytes: row.int("memory_used_bytes")?,
        memory_total_bytes: row.int("memory_total_bytes")?,
        swap_used_bytes: row.int("swap_used_bytes")?,
        swap_total_bytes: row.int("swap_total_bytes")?,
        cpu_per_core: JsonText::stored(row.text("cpu_per_core")?),
        disks: JsonText::stored(row.text("disks")?),
        networks: JsonText::stored(row.text("networks")?),
        uptime_seconds: row.int("uptime_seconds")?,
        process_count: row.int("process_count")?,
        dropped_batches: row.int("dropped_batches")?,
    })
}
