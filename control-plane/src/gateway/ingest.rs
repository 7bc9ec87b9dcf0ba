//! Metrics ingestion: batches from every session go through one writer task
//! (two on PostgreSQL, [`TelemetryStore::metrics_writers`](crate::store::TelemetryStore::metrics_writers)) that stores them in as few
//! transactions as possible (all batches waiting when a writer is free go into
//! its next one), and answers each submitter once its batch is committed, so
//! the agent's `Ack` always means "durable".
//!
//! A batch is turned into the store's records by its submitter, in the
//! session's own task (so on every runtime worker at once); the writer only
//! gathers records and writes them, which keeps the one serial part short.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tether_protocol::{ContainerReport, DiskMetrics, MetricsBatch, NetworkMetrics};
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use crate::store::{
    without_nul, ContainerRecord, ContainerSet, JsonText, MetricsIngest, MetricsRecord, Store,
};

/// Most batches written in one transaction (a submission is never split,
/// so a transaction may pass this by one submission's batches).
const MAX_BATCHES_PER_WRITE: usize = 2048;
/// Submissions waiting for the writer before submitters wait for room.
const QUEUE_DEPTH: usize = 16_384;

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the metrics writer has stopped")]
    Stopped,
    #[error("the store refused the write: {0}")]
    Store(String),
}

/// The records of one submission: one batch, or the batches of one metrics
/// stream.
struct Pending {
    metrics: Vec<MetricsRecord>,
    containers: Vec<ContainerSet>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the writer task.
#[derive(Clone)]
pub struct Ingestor {
    queue: mpsc::Sender<Pending>,
}

impl Ingestor {
    /// Starts the writer tasks (as many as the store takes at once).
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..store.metrics_writers().max(1) {
            tokio::spawn(write_loop(store.clone(), receiver.clone()));
        }
        Self { queue }
    }

    /// Stores one batch of `server_id`; returns once it is committed.
    pub async fn submit(&self, server_id: Uuid, batch: MetricsBatch) -> Result<(), IngestError> {
        self.submit_all(server_id, vec![batch]).await
    }

    /// Stores `batches` of `server_id` in one transaction; returns once they
    /// are all committed.
    pub async fn submit_all(
        &self,
        server_id: Uuid,
        batches: Vec<MetricsBatch>,
    ) -> Result<(), IngestError> {
        let (done, answer) = oneshot::channel();
        let now = Utc::now();
        let mut pending = Pending {
            metrics: Vec::with_capacity(batches.len()),
            containers: Vec::new(),
            done,
        };
        for batch in batches {
            let (metrics, containers) = records(server_id, batch, now);
            pending.metrics.push(metrics);
            pending.containers.extend(containers);
        }
        self.queue
            .send(pending)
            .await
            .map_err(|_| IngestError::Stopped)?;
        answer
            .await
            .map_err(|_| IngestError::Stopped)?
            .map_err(IngestError::Store)
    }
}

/// One writer: takes everything waiting (while it gathers, other writers
/// wait for the queue), writes it in one transaction, answers. Its buffers
/// are kept from one transaction to the next.
async fn write_loop(store: Arc<dyn Store>, receiver: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    let mut ingest = MetricsIngest {
        received_at: Utc::now(),
        metrics: Vec::new(),
        containers: Vec::new(),
    };
    let mut answers = Vec::new();
    loop {
        {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            ingest.received_at = Utc::now();
            gather(&mut ingest, &mut answers, first);
            while ingest.metrics.len() < MAX_BATCHES_PER_WRITE {
                match receiver.try_recv() {
                    Ok(next) => gather(&mut ingest, &mut answers, next),
                    Err(_) => break,
                }
            }
        }
        let result = store.ingest_metrics(&ingest).await.map_err(|e| {
            tracing::error!(error = %e, batches = ingest.metrics.len(), "could not store metrics");
            e.to_string()
        });
        for done in answers.drain(..) {
            let _ = done.send(result.clone());
        }
        ingest.metrics.clear();
        ingest.containers.clear();
    }
}

/// Adds one submission to the transaction being gathered.
fn gather(
    ingest: &mut MetricsIngest,
    answers: &mut Vec<oneshot::Sender<Result<(), String>>>,
    pending: Pending,
) {
    ingest.metrics.extend(pending.metrics);
    ingest.containers.extend(pending.containers);
    answers.push(pending.done);
}

fn finite(v: f32) -> f64 {
    if v.is_finite() {
        f64::from(v)
    } else {
        0.0
    }
}

/// An agent string as stored (see [`without_nul`]), moved rather than
/// copied when it has no NUL.
fn text(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

/// One element of the `disks` column (see [`MetricsRecord::disks`]).
#[derive(Serialize)]
struct DiskColumn<'a> {
    mount_point: Cow<'a, str>,
    device: Cow<'a, str>,
    filesystem: Cow<'a, str>,
    total_bytes: u64,
    used_bytes: u64,
    inodes_total: Option<u64>,
    inodes_used: Option<u64>,
}

impl<'a> From<&'a DiskMetrics> for DiskColumn<'a> {
    fn from(d: &'a DiskMetrics) -> Self {
        Self {
            mount_point: without_nul(&d.mount_point),
            device: without_nul(&d.device),
            filesystem: without_nul(&d.filesystem),
            total_bytes: d.total_bytes,
            used_bytes: d.used_bytes,
            inodes_total: d.inodes_total,
            inodes_used: d.inodes_used,
        }
    }
}

/// One element of the `networks` column (see [`MetricsRecord::networks`]).
#[derive(Serialize)]
struct NetworkColumn<'a> {
    interface: Cow<'a, str>,
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    rx_errors: u64,
    tx_errors: u64,
}

impl<'a> From<&'a NetworkMetrics> for NetworkColumn<'a> {
    fn from(n: &'a NetworkMetrics) -> Self {
        Self {
            interface: without_nul(&n.interface),
            rx_bytes: n.rx_bytes,
            tx_bytes: n.tx_bytes,
            rx_packets: n.rx_packets,
            tx_packets: n.tx_packets,
            rx_errors: n.rx_errors,
            tx_errors: n.tx_errors,
        }
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// When the batch was collected, trusting the agent's clock only within
/// reason (a month back, five minutes ahead).
fn collected_at(batch: &MetricsBatch, now: DateTime<Utc>) -> DateTime<Utc> {
    i64::try_from(batch.collected_at_unix_ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .filter(|t| {
            *t > now - chrono::Duration::days(30) && *t < now + chrono::Duration::minutes(5)
        })
        .unwrap_or(now)
}

/// The store's records of one batch. Takes the batch so that its strings
/// move into the records, and serializes the JSON columns here, in the
/// submitter's task: the metrics writer only binds text.
pub fn records(
    server_id: Uuid,
    batch: MetricsBatch,
    now: DateTime<Utc>,
) -> (MetricsRecord, Option<ContainerSet>) {
    let ts = collected_at(&batch, now);
    let s = &batch.system;
    let cpu_per_core: Vec<f64> = s.cpu_per_core.iter().map(|c| finite(*c)).collect();
    let disks: Vec<DiskColumn<'_>> = s.disks.iter().map(DiskColumn::from).collect();
    let networks: Vec<NetworkColumn<'_>> = s.networks.iter().map(NetworkColumn::from).collect();
    let metrics = MetricsRecord {
        server_id,
        seq: int(batch.seq),
        ts,
        cpu_percent: finite(s.cpu_percent),
        load_1: finite(s.load_1),
        load_5: finite(s.load_5),
        load_15: finite(s.load_15),
        memory_used_bytes: int(s.memory_used_bytes),
        memory_total_bytes: int(s.memory_total_bytes),
        swap_used_bytes: int(s.swap_used_bytes),
        swap_total_bytes: int(s.swap_total_bytes),
        cpu_per_core: JsonText::of(&cpu_per_core),
        disks: JsonText::of(&disks),
        networks: JsonText::of(&networks),
        uptime_seconds: int(s.uptime_seconds),
        process_count: i64::from(s.process_count),
        dropped_batches: int(batch.dropped_batches),
    };
    let seq = batch.seq;
    let containers = batch
        .containers
        .map(|report| container_set(server_id, seq, report, ts));
    (metrics, containers)
}

fn container_set(
    server_id: Uuid,
    seq: u64,
    report: ContainerReport,
    ts: DateTime<Utc>,
) -> ContainerSet {
    ContainerSet {
        server_id,
        seq: int(seq),
        docker_version: report.docker_version.map(text),
        error: report.error.map(text),
        updated_at: ts,
        containers: report
            .containers
            .into_iter()
            .map(|c| ContainerRecord {
                container_id: text(c.id),
                name: text(c.name),
                image: text(c.image),
                state: text(c.state),
                health: c.health.map(text),
                restart_count: int(c.restart_count),
                started_at: c.started_at.map(text),
                cpu_percent: finite(c.cpu_percent),
                memory_usage_bytes: int(c.memory_usage_bytes),
                memory_limit_bytes: int(c.memory_limit_bytes),
                net_rx_bytes: int(c.net_rx_bytes),
                net_tx_bytes: int(c.net_tx_bytes),
                block_read_bytes: int(c.block_read_bytes),
                block_write_bytes: int(c.block_write_bytes),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::{ContainerMetrics, SystemMetrics};

    fn batch_with(mount_point: &str, container_name: &str) -> MetricsBatch {
        MetricsBatch {
            seq: 7,
            collected_at_unix_ms: 0,
            system: SystemMetrics {
                cpu_per_core: vec![12.5, f32::NAN],
                disks: vec![DiskMetrics {
                    mount_point: mount_point.into(),
                    device: "/dev/sda1".into(),
                    filesystem: "ext4".into(),
                    total_bytes: 200,
                    used_bytes: 50,
                    inodes_total: Some(10),
                    inodes_used: None,
                }],
                networks: vec![NetworkMetrics {
                    interface: "eth0".into(),
                    rx_bytes: 1,
                    tx_bytes: 2,
                    rx_packets: 3,
                    tx_packets: 4,
                    rx_errors: 5,
                    tx_errors: 6,
                }],
                ..SystemMetrics::default()
            },
            containers: Some(ContainerReport {
                docker_version: Some("28.2.2".into()),
                error: None,
                containers: vec![ContainerMetrics {
                    id: "c1".into(),
                    name: container_name.into(),
                    ..ContainerMetrics::default()
                }],
            }),
            dropped_batches: 0,
        }
    }

    #[test]
    fn records_hold_the_lists_as_the_documented_json() {
        let server = Uuid::now_v7();
        let (point, set) = records(server, batch_with("/", "web"), Utc::now());
        assert_eq!(point.seq, 7);
        assert_eq!(point.cpu_per_core.parse(), serde_json::json!([12.5, 0.0]));
        assert_eq!(
            point.disks.parse(),
            serde_json::json!([{
                "mount_point": "/", "device": "/dev/sda1", "filesystem": "ext4",
                "total_bytes": 200, "used_bytes": 50, "inodes_total": 10, "inodes_used": null,
            }])
        );
        assert_eq!(
            point.networks.parse(),
            serde_json::json!([{
                "interface": "eth0", "rx_bytes": 1, "tx_bytes": 2, "rx_packets": 3,
                "tx_packets": 4, "rx_errors": 5, "tx_errors": 6,
            }])
        );
        assert_eq!(point.disk_used_percent(), 25.0);
        let set = set.expect("a container report");
        assert_eq!(set.server_id, server);
        assert_eq!(set.containers[0].name, "web");
    }

    #[test]
    fn records_replace_nul_in_agent_strings_inside_and_outside_the_json() {
        let (point, set) = records(Uuid::now_v7(), batch_with("/mnt/\0x", "we\0b"), Utc::now());
        assert_eq!(point.disks.parse()[0]["mount_point"], "/mnt/\u{FFFD}x");
        assert!(!point.disks.as_str().contains("\\u0000"));
        assert_eq!(
            set.expect("a container report").containers[0].name,
            "we\u{FFFD}b"
        );
    }
}
