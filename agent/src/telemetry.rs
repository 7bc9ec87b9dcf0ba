//! Metrics reporting: a collection loop that lives as long as the process,
//! and a sender that lives as long as a session.
//!
//! The collector samples the host and Docker every interval (30 s until the
//! control plane says otherwise in `Welcome`; the last interval it asked for
//! is remembered across restarts), gives each batch the next sequence number
//! and stores it in the [`Spool`] — connected or not.
//!
//! The sender delivers spooled batches oldest first on bidirectional
//! streams (`MetricsBatch`.. -> `Ack { seq }`..): one batch per stream in
//! the steady state, up to `MAX_BATCHES_PER_STREAM` on one stream when a
//! backlog is replayed, with up to [`MAX_IN_FLIGHT`] streams waiting for
//! their acks. Batches are *sent* strictly in order; only the streams' acks
//! may come back in any order. An acked batch leaves the spool; one whose
//! stream failed stays there and is sent again after a pause.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tether_protocol::{
    Ack, AgentMessage, ControlMessage, MetricsBatch, MAX_BATCHES_PER_STREAM,
    MAX_METRICS_STREAM_BYTES,
};
use tether_transport::{AgentStream, TransportError};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::format_duration;
use crate::metrics::docker::{DockerCollector, DockerConnection};
use crate::metrics::system::SystemCollector;
use crate::spool::{self, Spool, SpoolError};

/// The interval until the control plane names one.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// When the first batch is collected after start (enough for a CPU sample
/// to mean something), unless the interval is shorter.
const FIRST_REPORT_AFTER: Duration = Duration::from_secs(2);
/// Bounds on the interval the control plane may ask for.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Streams of batches sent and waiting for their acks at the same time.
pub const MAX_IN_FLIGHT: usize = 8;
/// How long the control plane may take to store and ack a batch.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Pauses after a failed delivery, doubling from the first to the second.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

const INTERVAL_FILE: &str = "interval_ms";

/// The spool and the signal that it grew, shared by the collector and the
/// sender of the current session.
#[derive(Clone)]
pub struct Outbox {
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
}

impl Outbox {
    fn new(spool: Spool) -> Self {
        Self {
            spool: Arc::new(Mutex::new(spool)),
            spooled: Arc::new(Notify::new()),
        }
    }

    /// The spool. Its operations are short file operations; the lock is
    /// never held across an await.
    pub fn spool(&self) -> MutexGuard<'_, Spool> {
        // A panic while holding the lock leaves the spool's files consistent
        // (each operation is atomic on disk), so the guard is still usable.
        self.spool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The running collector.
pub struct Telemetry {
    outbox: Outbox,
    interval: watch::Sender<Duration>,
    task: JoinHandle<()>,
}

impl Telemetry {
    /// Opens the spool in `<state_dir>/spool` and starts collecting. The
    /// loop stops when `shutdown` is cancelled. Container metrics come
    /// through `docker` (shared with the health check) when Docker is
    /// enabled; without one, the collector connects on its own.
    pub fn start(
        state_dir: &Path,
        config: &Config,
        docker: Option<DockerConnection>,
        shutdown: CancellationToken,
    ) -> Result<Self, SpoolError> {
        let spool = Spool::open(state_dir.join("spool"), config.spool.max_bytes)?;
        let initial = stored_interval(spool.dir()).unwrap_or(DEFAULT_INTERVAL);
        if !spool.is_empty() {
            tracing::info!(
                "{} unsent metrics batches in the spool ({} bytes)",
                spool.len(),
                spool.bytes()
            );
        }
        let outbox = Outbox::new(spool);
        let (interval, interval_rx) = watch::channel(initial);
        let docker = config.docker.enabled.then(|| match docker {
            Some(connection) => DockerCollector::with_connection(connection),
            None => DockerCollector::new(config.docker.socket.clone()),
        });
        let task = tokio::spawn(collect_loop(outbox.clone(), docker, interval_rx, shutdown));
        Ok(Self {
            outbox,
            interval,
            task,
        })
    }

    /// Applies the interval a `Welcome` carried (clamped to 1 s ..= 1 h).
    pub fn set_interval_ms(&self, interval_ms: u64) {
        let interval = Duration::from_millis(interval_ms).clamp(MIN_INTERVAL, MAX_INTERVAL);
        let changed = self.interval.send_if_modified(|current| {
            let changed = *current != interval;
            *current = interval;
            changed
        });
        if changed {
            // Remembered so that a restarted agent uses it before its first
            // Welcome.
            let dir = self.outbox.spool().dir().to_path_buf();
            let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
            if let Err(err) = spool::write_atomic(&dir, INTERVAL_FILE, format!("{ms}\n").as_bytes())
            {
                tracing::warn!("cannot remember the metrics interval: {err}");
            }
        }
    }

    /// The current collection interval.
    pub fn interval(&self) -> Duration {
        *self.interval.borrow()
    }

    /// What the session's sender delivers from.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Waits for the collection loop to end (after shutdown was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

fn stored_interval(dir: &Path) -> Option<Duration> {
    match spool::read_counter(dir, INTERVAL_FILE) {
        Ok(Some(ms)) => Some(Duration::from_millis(ms).clamp(MIN_INTERVAL, MAX_INTERVAL)),
        Ok(None) => None,
        Err(why) => {
            tracing::debug!("ignoring {}: {why}", dir.join(INTERVAL_FILE).display());
            None
        }
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Every interval: collect, number, spool, wake the sender.
async fn collect_loop(
    outbox: Outbox,
    mut docker: Option<DockerCollector>,
    mut interval_rx: watch::Receiver<Duration>,
    shutdown: CancellationToken,
) {
    let mut system = SystemCollector::new();
    let mut interval = *interval_rx.borrow_and_update();
    let mut last = Instant::now();
    // The first report goes out soon after start (a new server is
    // registered once it has reported), then every interval.
    let mut due = last + interval.min(FIRST_REPORT_AFTER);
    let mut watching = true;
    tracing::debug!("collecting metrics every {}", format_duration(interval));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = interval_rx.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let new = *interval_rx.borrow_and_update();
                if new != interval {
                    tracing::info!("metrics interval is now {}", format_duration(new));
                    interval = new;
                    due = (last + interval).max(Instant::now());
                }
                continue;
            }
            _ = tokio::time::sleep_until(due) => {}
        }
        last = Instant::now();
        let collected_at_unix_ms = unix_ms(SystemTime::now());
        let system_metrics = system.collect();
        let containers = match &mut docker {
            Some(docker) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    report = docker.collect() => Some(report),
                }
            }
            None => None,
        };
        let stored = {
            let mut spool = outbox.spool();
            spool.allocate_seq().and_then(|seq| {
                let batch = MetricsBatch {
                    seq,
                    collected_at_unix_ms,
                    system: system_metrics,
                    containers,
                    dropped_batches: spool.dropped(),
                };
                spool.push(&batch).map(|_| (seq, spool.len()))
            })
        };
        match stored {
            Ok((seq, waiting)) => {
                tracing::debug!(seq, waiting, "metrics batch spooled");
                outbox.spooled.notify_one();
            }
            Err(err) => {
                tracing::warn!("metrics batch lost: {err}");
                outbox.spool().record_lost();
            }
        }
        // A slow tick (Docker timing out) shifts the schedule instead of
        // firing the missed ticks in a burst.
        due = (due + interval).max(Instant::now());
    }
}

/// Why one batch was not acknowledged.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("no ack within {}", format_duration(ACK_TIMEOUT))]
    Timeout,
    #[error("the control plane acked sequence number {0} instead")]
    WrongAck(u64),
    #[error("unexpected answer ({0})")]
    Unexpected(&'static str),
}

/// Opens a stream and writes `batches` on it, in order.
async fn send(
    connection: &quinn::Connection,
    batches: Vec<MetricsBatch>,
) -> Result<AgentStream, DeliveryError> {
    let mut stream = AgentStream::open(connection).await?;
    for batch in batches {
        stream.send(&AgentMessage::MetricsBatch(batch)).await?;
    }
    stream.finish()?;
    Ok(stream)
}

/// Waits on `stream` for the acks of `seqs`, which come in their order.
/// Returns the acked ones, and why the others were not.
async fn acked(mut stream: AgentStream, seqs: &[u64]) -> (Vec<u64>, Result<(), DeliveryError>) {
    let deadline = Instant::now() + ACK_TIMEOUT;
    let mut acked = Vec::with_capacity(seqs.len());
    for &seq in seqs {
        let answer = match tokio::time::timeout_at(deadline, stream.recv_required()).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => return (acked, Err(err.into())),
            Err(_) => return (acked, Err(DeliveryError::Timeout)),
        };
        match answer {
            ControlMessage::Ack(Ack { seq: got }) if got == seq => acked.push(seq),
            ControlMessage::Ack(Ack { seq: other }) => {
                return (acked, Err(DeliveryError::WrongAck(other)))
            }
            other => return (acked, Err(DeliveryError::Unexpected(other.kind()))),
        }
    }
    (acked, Ok(()))
}

/// The next batches to send on one stream: the oldest spooled ones from
/// `cursor` on that are not in flight, one or — when the spool is being
/// replayed — up to [`MAX_BATCHES_PER_STREAM`] and
/// [`MAX_METRICS_STREAM_BYTES`]. Moves `cursor` past them.
fn next_stream_batches(
    spool: &mut Spool,
    cursor: &mut u64,
    in_flight: &BTreeSet<u64>,
) -> Vec<MetricsBatch> {
    /// Frame body of a batch beyond its spooled encoding (the message tag).
    const FRAME_OVERHEAD: u64 = 16;
    let mut batches = Vec::new();
    let mut bytes = 0;
    while batches.len() < MAX_BATCHES_PER_STREAM {
        let Some(seq) = spool.first_pending_from(*cursor) else {
            break;
        };
        if in_flight.contains(&seq) {
            *cursor = seq + 1;
            continue;
        }
        let size = spool.batch_bytes(seq).unwrap_or(0) + FRAME_OVERHEAD;
        if !batches.is_empty() && bytes + size > MAX_METRICS_STREAM_BYTES {
            break;
        }
        *cursor = seq + 1;
        match spool.load(seq) {
            Ok(Some(batch)) => {
                bytes += size;
                batches.push(batch);
            }
            Ok(None) => {}
            Err(err) => tracing::warn!("{err}"),
        }
    }
    batches
}

/// Delivers the spool over `connection` until the session ends (the caller
/// drops this future); it never returns on its own.
pub async fn deliver(outbox: &Outbox, connection: &quinn::Connection) -> Infallible {
    let waiting = outbox.spool().len();
    if waiting > 0 {
        tracing::info!("replaying {waiting} spooled metrics batches");
    }
    let mut in_flight = FuturesUnordered::new();
    let mut in_flight_seqs = BTreeSet::new();
    // The next sequence number to consider in this pass over the spool.
    let mut cursor = 0;
    let mut retry_at: Option<Instant> = None;
    let mut pause = RETRY_MIN;
    loop {
        // Send, in order, as many streams as the in-flight limit allows.
        while retry_at.is_none() && in_flight.len() < MAX_IN_FLIGHT {
            let batches = next_stream_batches(&mut outbox.spool(), &mut cursor, &in_flight_seqs);
            let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
            let Some(&first) = seqs.first() else { break };
            match tokio::time::timeout(ACK_TIMEOUT, send(connection, batches)).await {
                Ok(Ok(stream)) => {
                    if seqs.len() > 1 {
                        // Only while a backlog is replayed.
                        tracing::info!(
                            first,
                            batches = seqs.len(),
                            "spooled metrics batches sent on one stream"
                        );
                    } else {
                        tracing::debug!(seq = first, "metrics batch sent");
                    }
                    in_flight_seqs.extend(seqs.iter().copied());
                    in_flight.push(async move {
                        let (acked, result) = acked(stream, &seqs).await;
                        (seqs, acked, result)
                    });
                }
                Ok(Err(err)) => {
                    retry_at = Some(failed(first, &err, &mut pause));
                }
                Err(_) => {
                    retry_at = Some(failed(first, &DeliveryError::Timeout, &mut pause));
                }
            }
        }
        tokio::select! {
            Some((seqs, acked, result)) = in_flight.next(), if !in_flight.is_empty() => {
                for seq in &seqs {
                    in_flight_seqs.remove(seq);
                }
                {
                    let mut spool = outbox.spool();
                    for &seq in &acked {
                        spool.ack(seq);
                    }
                }
                if let Some(first) = acked.first() {
                    pause = RETRY_MIN;
                    tracing::debug!(first, batches = acked.len(), "metrics batches acknowledged");
                }
                match result {
                    Ok(()) => {
                        if in_flight.is_empty() {
                            // The reports' buffers are free now.
                            crate::release_free_heap();
                        }
                    }
                    Err(err) => {
                        let unacked = seqs.get(acked.len()).copied().unwrap_or_default();
                        let at = failed(unacked, &err, &mut pause);
                        retry_at = Some(retry_at.map_or(at, |current| current.max(at)));
                    }
                }
            }
            _ = outbox.spooled.notified() => {}
            _ = sleep_until_some(retry_at) => {
                retry_at = None;
                cursor = 0;
            }
        }
    }
}

/// Logs a failed delivery and returns when to try again.
fn failed(seq: u64, err: &DeliveryError, pause: &mut Duration) -> Instant {
    let delay = *pause;
    tracing::warn!(
        seq,
        "metrics batch not delivered: {err}; it stays spooled, retrying in {}",
        format_duration(delay)
    );
    *pause = (*pause * 2).min(RETRY_MAX);
    Instant::now() + delay
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(docker: bool) -> Config {
        let mut config = Config::default();
        config.docker.enabled = docker;
        config
    }

    fn spooled(dir: &Path, seqs: std::ops::RangeInclusive<u64>, filler: usize) -> Spool {
        let mut spool = Spool::open(dir, u64::MAX).unwrap();
        for seq in seqs {
            let batch = MetricsBatch {
                seq,
                collected_at_unix_ms: 0,
                system: tether_protocol::SystemMetrics {
                    cpu_per_core: vec![0.5; filler],
                    ..Default::default()
                },
                containers: None,
                dropped_batches: 0,
            };
            spool.push(&batch).unwrap();
        }
        spool
    }

    fn seqs(batches: &[MetricsBatch]) -> Vec<u64> {
        batches.iter().map(|b| b.seq).collect()
    }

    #[test]
    fn a_backlog_goes_out_sixteen_batches_to_a_stream_oldest_first() {
        let root = tempfile::tempdir().unwrap();
        let mut spool = spooled(root.path(), 1..=20, 4);
        let mut cursor = 0;
        let none = BTreeSet::new();
        let first = next_stream_batches(&mut spool, &mut cursor, &none);
        assert_eq!(seqs(&first), (1..=16).collect::<Vec<_>>());
        let second = next_stream_batches(&mut spool, &mut cursor, &none);
        assert_eq!(seqs(&second), (17..=20).collect::<Vec<_>>());
        assert!(next_stream_batches(&mut spool, &mut cursor, &none).is_empty());
        // After a failure the pass starts over and skips what is in flight.
        let in_flight: BTreeSet<u64> = (1..=16).collect();
        let mut cursor = 0;
        let retry = next_stream_batches(&mut spool, &mut cursor, &in_flight);
        assert_eq!(seqs(&retry), (17..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_stream_of_several_batches_stays_within_the_byte_bound() {
        let root = tempfile::tempdir().unwrap();
        // ~400 KB each: two fit a stream, three do not.
        let mut spool = spooled(root.path(), 1..=3, 100_000);
        let mut cursor = 0;
        let none = BTreeSet::new();
        let first = next_stream_batches(&mut spool, &mut cursor, &none);
        assert_eq!(seqs(&first), vec![1, 2]);
        let bytes: u64 = first
            .iter()
            .map(|b| {
                tether_protocol::codec::encode_frame(
                    &AgentMessage::MetricsBatch(b.clone()),
                    usize::MAX,
                )
                .unwrap()
                .len() as u64
            })
            .sum();
        assert!(bytes <= MAX_METRICS_STREAM_BYTES, "{bytes}");
        assert_eq!(
            seqs(&next_stream_batches(&mut spool, &mut cursor, &none)),
            vec![3]
        );
    }

    #[tokio::test]
    async fn batches_are_spooled_every_interval_while_disconnected() {
        let root = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let telemetry =
            Telemetry::start(root.path(), &config(false), None, shutdown.clone()).unwrap();
        telemetry.set_interval_ms(1_000);
        let deadline = Instant::now() + Duration::from_secs(10);
        while telemetry.outbox().spool().len() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pending = telemetry.outbox().spool().pending();
        assert!(pending.len() >= 2, "{pending:?}");
        assert_eq!(pending[0], 1);
        let batch = telemetry
            .outbox()
            .spool()
            .load(pending[1])
            .unwrap()
            .unwrap();
        assert_eq!(batch.seq, 2);
        assert_eq!(batch.containers, None, "Docker disabled");
        assert!(batch.system.memory_total_bytes > 0);
        shutdown.cancel();
        telemetry.stopped().await;
        // The interval is remembered for the next start.
        assert_eq!(
            stored_interval(&root.path().join("spool")),
            Some(Duration::from_secs(1))
        );
    }

    #[tokio::test]
    async fn intervals_from_the_control_plane_are_clamped_and_remembered() {
        let root = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let telemetry =
            Telemetry::start(root.path(), &config(false), None, shutdown.clone()).unwrap();
        assert_eq!(*telemetry.interval.borrow(), DEFAULT_INTERVAL);
        telemetry.set_interval_ms(10);
        assert_eq!(*telemetry.interval.borrow(), MIN_INTERVAL);
        telemetry.set_interval_ms(u64::MAX);
        assert_eq!(*telemetry.interval.borrow(), MAX_INTERVAL);
        telemetry.set_interval_ms(5_000);
        shutdown.cancel();
        telemetry.stopped().await;
        let telemetry =
            Telemetry::start(root.path(), &config(false), None, CancellationToken::new()).unwrap();
        assert_eq!(*telemetry.interval.borrow(), Duration::from_secs(5));
    }
}
