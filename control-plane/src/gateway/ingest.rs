//! Metrics ingestion: batches from every session go through one writer task
//! (two on PostgreSQL, [`Store::metrics_writers`]) that stores them in as few
//! transactions as possible (all batches waiting when a writer is free go into
//! its next one), and answers each submitter once its batch is committed, so
//! the agent's `Ack` always means "durable".
//!
//! A batch is turned into the store's records by its submitter, in the
//! session's own task (so on every runtime worker at once); the writer only
//! gathers records and writes them, which keeps the one serial part short.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tether_protocol::{ContainerReport, MetricsBatch};
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use crate::store::{ContainerRecord, ContainerSet, MetricsIngest, MetricsRecord, Store};

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
            let (metrics, containers) = records(server_id, &batch, now);
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
/// wait for the queue), writes it in one transaction, answers.
async fn write_loop(store: Arc<dyn Store>, receiver: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let (ingest, answers) = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut ingest = MetricsIngest {
                received_at: Utc::now(),
                metrics: first.metrics,
                containers: first.containers,
            };
            let mut answers = vec![first.done];
            while ingest.metrics.len() < MAX_BATCHES_PER_WRITE {
                match receiver.try_recv() {
                    Ok(next) => {
                        ingest.metrics.extend(next.metrics);
                        ingest.containers.extend(next.containers);
                        answers.push(next.done);
                    }
                    Err(_) => break,
                }
            }
            (ingest, answers)
        };
        let result = store.ingest_metrics(&ingest).await.map_err(|e| {
            tracing::error!(error = %e, batches = ingest.metrics.len(), "could not store metrics");
            e.to_string()
        });
        for done in answers {
            let _ = done.send(result.clone());
        }
    }
}

fn finite(v: f32) -> f64 {
    if v.is_finite() {
        f64::from(v)
    } else {
        0.0
    }
}

/// Agent strings as stored: NUL (which PostgreSQL cannot hold) becomes U+FFFD
/// on every backend alike.
fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
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

/// The store's records of one batch.
pub fn records(
    server_id: Uuid,
    batch: &MetricsBatch,
    now: DateTime<Utc>,
) -> (MetricsRecord, Option<ContainerSet>) {
    let s = &batch.system;
    let ts = collected_at(batch, now);
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
        cpu_per_core: serde_json::Value::from(s.cpu_per_core.iter().map(|c| finite(*c)).collect::<Vec<_>>()),
        disks: serde_json::Value::Array(
            s.disks
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "mount_point": text(&d.mount_point), "device": text(&d.device), "filesystem": text(&d.filesystem),
                        "total_bytes": d.total_bytes, "used_bytes": d.used_bytes,
                        "inodes_total": d.inodes_total, "inodes_used": d.inodes_used,
                    })
                })
                .collect(),
        ),
        networks: serde_json::Value::Array(
            s.networks
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "interface": text(&n.interface), "rx_bytes": n.rx_bytes, "tx_bytes": n.tx_bytes,
                        "rx_packets": n.rx_packets, "tx_packets": n.tx_packets,
                        "rx_errors": n.rx_errors, "tx_errors": n.tx_errors,
                    })
                })
                .collect(),
        ),
        uptime_seconds: int(s.uptime_seconds),
        process_count: i64::from(s.process_count),
        dropped_batches: int(batch.dropped_batches),
    };
    let containers = batch
        .containers
        .as_ref()
        .map(|report| container_set(server_id, batch.seq, report, ts));
    (metrics, containers)
}

fn container_set(
    server_id: Uuid,
    seq: u64,
    report: &ContainerReport,
    ts: DateTime<Utc>,
) -> ContainerSet {
    ContainerSet {
        server_id,
        seq: int(seq),
        docker_version: report.docker_version.as_deref().map(text),
        error: report.error.as_deref().map(text),
        updated_at: ts,
        containers: report
            .containers
            .iter()
            .map(|c| ContainerRecord {
                container_id: text(&c.id),
                name: text(&c.name),
                image: text(&c.image),
                state: text(&c.state),
                health: c.health.as_deref().map(text),
                restart_count: int(c.restart_count),
                started_at: c.started_at.as_deref().map(text),
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
