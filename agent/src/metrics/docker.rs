//! Container metrics from the local Docker daemon, over its unix socket.
//!
//! Each tick: the daemon version (cached: re-read every [`VERSION_EVERY`]
//! and on every reconnection, since the daemon answers `/version` by asking
//! containerd and running `runc --version`), the list of all containers, one
//! one-shot stats call per running or paused container
//! (`stream=false&one-shot=true`) and an inspect only for containers whose
//! restart count or start time may have changed.
//!
//! The daemon answers a one-shot stats call at the next cycle of its stats
//! collector (once a second), so the calls are made concurrently (up to
//! [`STATS_CONCURRENCY`]): all of them are answered by the same cycle, and a
//! tick with 20 containers takes one or two seconds of waiting, no work.
//!
//! * CPU %: one-shot stats carry no previous sample, so the collector keeps
//!   each container's previous `(cpu_usage.total_usage, system_cpu_usage)`
//!   and computes `Δcontainer / Δsystem × online_cpus × 100`, as `docker
//!   stats` does. A container's first tick reports 0.
//! * Memory: `usage − inactive_file` (`total_inactive_file` on cgroup v1,
//!   `inactive_file` on v2, only when smaller than usage), as `docker stats`
//!   shows it; the limit is the cgroup limit (the host's memory when none).
//! * Network: rx/tx bytes summed over the container's interfaces.
//! * Block IO: `io_service_bytes_recursive` entries whose op starts with
//!   `r`/`R` (read) or `w`/`W` (write): the cgroup v1 (`Read`, `Write`) and
//!   v2 (`read`, `write`) shapes.
//! * Health: from the list's status text (`Up 3 minutes (healthy)`) or, on
//!   daemons that send it, the list's health field.
//! * Restart count and start time: from an inspect when the container is new,
//!   its state changed, it is restarting, its CPU counter went backwards (it
//!   restarted between two ticks), or [`REINSPECT_EVERY`] ticks passed.
//!
//! A daemon that cannot be reached gives a report with `error` set and no
//! containers; the client is dropped and a new connection is tried at the
//! next tick, so the agent picks Docker up again when it comes back.
//!
//! The client itself is a [`DockerConnection`], shared with the built-in
//! `docker` health check ([`DockerConnection::ping`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerStatsResponse, ContainerSummary};
use bollard::query_parameters::{ListContainersOptions, StatsOptions};
use bollard::{ClientVersion, Docker, API_DEFAULT_VERSION};
use futures::StreamExt;
use tether_protocol::{ContainerMetrics, ContainerReport};

/// Where Docker listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Per-request timeout of the Docker client, in seconds.
const REQUEST_TIMEOUT_SECS: u64 = 10;
/// The whole collection (list, stats, inspects) must finish within this.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Concurrent one-shot stats calls.
pub const STATS_CONCURRENCY: usize = 32;
/// Concurrent inspect calls.
const INSPECT_CONCURRENCY: usize = 4;
/// The cached daemon version is re-read this often.
pub const VERSION_EVERY: Duration = Duration::from_secs(600);
/// Restart count and start time are re-read at least this often (in ticks).
pub const REINSPECT_EVERY: u64 = 10;

/// What is remembered about a container between ticks.
#[derive(Debug, Default)]
struct Known {
    state: String,
    restart_count: u64,
    started_at: Option<String>,
    inspected_tick: Option<u64>,
    cpu: Option<CpuSample>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuSample {
    container_ns: u64,
    system_ns: u64,
}

/// A lazily connected client of one Docker socket. Clones share the client:
/// the metrics collector and the health check use one connection, and a
/// failure seen by either makes the next use reconnect.
#[derive(Clone)]
pub struct DockerConnection {
    socket: Arc<str>,
    client: Arc<Mutex<Option<Docker>>>,
}

impl DockerConnection {
    /// A connection to the daemon at `socket` (a path, or `unix://` + path).
    /// Nothing is connected until first used.
    pub fn new(socket: impl Into<String>) -> Self {
        let socket = socket.into();
        let socket = socket
            .strip_prefix("unix://")
            .map(str::to_string)
            .unwrap_or(socket);
        Self {
            socket: socket.into(),
            client: Arc::new(Mutex::new(None)),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    fn cached(&self) -> Option<Docker> {
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The client, connecting (and negotiating the API version) if needed;
    /// `true` when the connection is new.
    async fn client(&self) -> Result<(Docker, bool), DockerError> {
        if let Some(docker) = self.cached() {
            return Ok((docker, false));
        }
        let docker = connect(&self.socket).await?;
        *self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(docker.clone());
        Ok((docker, true))
    }

    /// Forgets the client: the next use connects again.
    fn reset(&self) {
        *self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    /// Whether the daemon answers `/_ping`; the error says why not, in one
    /// line naming the socket.
    pub async fn ping(&self) -> Result<(), String> {
        let result = match self.client().await {
            Ok((docker, _)) => docker.ping().await.map(|_| ()),
            Err(err) => Err(err),
        };
        result.map_err(|err| {
            self.reset();
            format!(
                "cannot reach the Docker daemon at {}: {}",
                self.socket,
                describe(&err)
            )
        })
    }
}

/// Collects [`ContainerReport`]s from one Docker socket.
pub struct DockerCollector {
    connection: DockerConnection,
    version: Option<String>,
    version_read_at: Option<Instant>,
    tick: u64,
    known: HashMap<String, Known>,
    last_error: Option<String>,
}

impl DockerCollector {
    /// A collector for the daemon at `socket` (a path, or `unix://` + path).
    /// Nothing is connected until the first [`collect`](Self::collect).
    pub fn new(socket: impl Into<String>) -> Self {
        Self::with_connection(DockerConnection::new(socket))
    }

    /// A collector using (and sharing) `connection`.
    pub fn with_connection(connection: DockerConnection) -> Self {
        Self {
            connection,
            version: None,
            version_read_at: None,
            tick: 0,
            known: HashMap::new(),
            last_error: None,
        }
    }

    /// One report. Never fails: a daemon that cannot be read is reported
    /// in [`ContainerReport::error`].
    pub async fn collect(&mut self) -> ContainerReport {
        self.tick += 1;
        let result = match tokio::time::timeout(COLLECT_TIMEOUT, self.try_collect()).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the Docker daemon at {} did not answer within {} s",
                self.connection.socket(),
                COLLECT_TIMEOUT.as_secs()
            )),
        };
        match result {
            Ok(containers) => {
                if self.last_error.take().is_some() {
                    tracing::info!(
                        version = self.version.as_deref().unwrap_or("?"),
                        "Docker daemon reachable again at {}",
                        self.connection.socket()
                    );
                }
                ContainerReport {
                    docker_version: self.version.clone(),
                    error: None,
                    containers,
                }
            }
            Err(reason) => {
                if self.last_error.as_deref() != Some(reason.as_str()) {
                    tracing::warn!("{reason}; container metrics are empty until it answers");
                }
                self.last_error = Some(reason.clone());
                self.connection.reset();
                self.version = None;
                self.known.clear();
                ContainerReport {
                    docker_version: None,
                    error: Some(reason),
                    containers: Vec::new(),
                }
            }
        }
    }

    fn unreachable(&self, err: &DockerError) -> String {
        format!(
            "cannot read the Docker daemon at {}: {}",
            self.connection.socket(),
            describe(err)
        )
    }

    /// The client, connecting (and negotiating the API version) if needed;
    /// refreshes the cached daemon version when due.
    async fn client(&mut self) -> Result<Docker, String> {
        let (docker, fresh) = self
            .connection
            .client()
            .await
            .map_err(|err| self.unreachable(&err))?;
        if fresh {
            self.version = None;
        }
        let stale = self
            .version_read_at
            .is_none_or(|at| at.elapsed() >= VERSION_EVERY);
        if self.version.is_none() || stale {
            let version = docker
                .version()
                .await
                .map_err(|err| self.unreachable(&err))?;
            self.version = Some(version.version.unwrap_or_else(|| "unknown".into()));
            self.version_read_at = Some(Instant::now());
        }
        Ok(docker)
    }

    async fn try_collect(&mut self) -> Result<Vec<ContainerMetrics>, String> {
        let docker = self.client().await?;
        let listed = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                ..Default::default()
            }))
            .await
            .map_err(|err| self.unreachable(&err))?;

        let mut containers: Vec<ContainerMetrics> = listed.iter().map(from_summary).collect();
        self.known
            .retain(|id, _| containers.iter().any(|c| &c.id == id));

        // One-shot stats of the containers that have processes.
        let sampled: Vec<usize> = (0..containers.len())
            .filter(|&i| matches!(containers[i].state.as_str(), "running" | "paused"))
            .collect();
        // The futures are built first: a stream of closures over borrowed
        // ids would not be `Send` (higher-ranked lifetimes).
        let requests: Vec<_> = sampled
            .iter()
            .map(|&i| one_shot_stats(&docker, &containers[i].id))
            .collect();
        let stats: Vec<Option<ContainerStatsResponse>> = futures::stream::iter(requests)
            .buffered(STATS_CONCURRENCY)
            .collect()
            .await;
        let mut restarted = Vec::new();
        for (&i, stats) in sampled.iter().zip(stats) {
            let Some(stats) = stats else { continue };
            let container = &mut containers[i];
            let known = self.known.entry(container.id.clone()).or_default();
            let sample = cpu_sample(&stats);
            if let (Some(previous), Some(current)) = (known.cpu, sample) {
                if current.container_ns < previous.container_ns {
                    restarted.push(container.id.clone());
                }
                container.cpu_percent = cpu_percent(previous, current, online_cpus(&stats));
            }
            known.cpu = sample;
            apply_stats(container, &stats);
        }

        // Inspect only what may have changed.
        let tick = self.tick;
        let to_inspect: Vec<usize> = (0..containers.len())
            .filter(|&i| {
                let container = &containers[i];
                match self.known.get(&container.id) {
                    Some(known) => {
                        known
                            .inspected_tick
                            .is_none_or(|at| tick >= at + REINSPECT_EVERY)
                            || known.state != container.state
                            || container.state == "restarting"
                            || restarted.contains(&container.id)
                    }
                    None => true,
                }
            })
            .collect();
        let requests: Vec<_> = to_inspect
            .iter()
            .map(|&i| restart_info(&docker, &containers[i].id))
            .collect();
        let inspected: Vec<Option<(u64, Option<String>)>> = futures::stream::iter(requests)
            .buffered(INSPECT_CONCURRENCY)
            .collect()
            .await;
        for (&i, info) in to_inspect.iter().zip(inspected) {
            let known = self.known.entry(containers[i].id.clone()).or_default();
            if let Some((restart_count, started_at)) = info {
                known.restart_count = restart_count;
                known.started_at = started_at;
                known.inspected_tick = Some(tick);
            }
        }
        for container in &mut containers {
            let known = self.known.entry(container.id.clone()).or_default();
            known.state.clone_from(&container.state);
            container.restart_count = known.restart_count;
            container.started_at.clone_from(&known.started_at);
        }
        Ok(containers)
    }
}

/// Connects to the socket and settles on an API version both sides speak:
/// bollard's default when the daemon is recent enough, else the daemon's own
/// maximum (Docker 20.10 speaks 1.41), read from its refusal.
async fn connect(socket: &str) -> Result<Docker, DockerError> {
    let docker = Docker::connect_with_socket(socket, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)?;
    match docker.negotiate_version().await {
        Ok(docker) => Ok(docker),
        Err(DockerError::DockerResponseServerError {
            status_code,
            message,
        }) => match supported_version(&message) {
            Some(version) => {
                Docker::connect_with_socket(socket, REQUEST_TIMEOUT_SECS, &version)?
                    .negotiate_version()
                    .await
            }
            None => Err(DockerError::DockerResponseServerError {
                status_code,
                message,
            }),
        },
        Err(err) => Err(err),
    }
}

/// The version in "client version 1.53 is too new. Maximum supported API
/// version is 1.41" (or "... too old. Minimum supported API version is 1.44").
fn supported_version(message: &str) -> Option<ClientVersion> {
    let (_, rest) = message.rsplit_once("API version is ")?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(rest.len());
    let version = rest[..end].trim_end_matches('.');
    let (major, minor) = version.split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

/// An error and its causes on one line, without repeats.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn from_summary(summary: &ContainerSummary) -> ContainerMetrics {
    let name = summary
        .names
        .as_ref()
        .and_then(|names| names.first())
        .map(|name| name.trim_start_matches('/').to_string())
        .unwrap_or_default();
    let health = summary
        .health
        .as_ref()
        .and_then(|health| health.status)
        .map(|status| status.to_string())
        .filter(|status| !status.is_empty() && status != "none")
        .or_else(|| summary.status.as_deref().and_then(health_from_status));
    ContainerMetrics {
        id: summary.id.clone().unwrap_or_default(),
        name,
        image: summary.image.clone().unwrap_or_default(),
        state: summary
            .state
            .map(|state| state.to_string())
            .unwrap_or_default(),
        health,
        ..Default::default()
    }
}

/// The health in a status text such as `Up 3 minutes (healthy)`.
fn health_from_status(status: &str) -> Option<String> {
    let health = if status.ends_with("(healthy)") {
        "healthy"
    } else if status.ends_with("(unhealthy)") {
        "unhealthy"
    } else if status.ends_with("(health: starting)") {
        "starting"
    } else {
        return None;
    };
    Some(health.to_string())
}

async fn one_shot_stats(docker: &Docker, id: &str) -> Option<ContainerStatsResponse> {
    let options = StatsOptions {
        stream: false,
        one_shot: true,
    };
    let stream = docker.stats(id, Some(options));
    let mut stream = std::pin::pin!(stream);
    match stream.next().await {
        Some(Ok(stats)) => Some(stats),
        Some(Err(err)) => {
            tracing::debug!(container = id, "no stats: {}", describe(&err));
            None
        }
        None => None,
    }
}

/// Restart count and start time, from an inspect.
async fn restart_info(docker: &Docker, id: &str) -> Option<(u64, Option<String>)> {
    match docker.inspect_container(id, None).await {
        Ok(inspect) => {
            let restart_count = inspect
                .restart_count
                .and_then(|count| u64::try_from(count).ok())
                .unwrap_or(0);
            let started_at = inspect
                .state
                .and_then(|state| state.started_at)
                // A container that never ran carries Go's zero time.
                .filter(|at| !at.is_empty() && !at.starts_with("0001-"));
            Some((restart_count, started_at))
        }
        Err(err) => {
            tracing::debug!(container = id, "cannot inspect: {}", describe(&err));
            None
        }
    }
}

fn cpu_sample(stats: &ContainerStatsResponse) -> Option<CpuSample> {
    let cpu = stats.cpu_stats.as_ref()?;
    Some(CpuSample {
        container_ns: cpu.cpu_usage.as_ref()?.total_usage?,
        system_ns: cpu.system_cpu_usage?,
    })
}

fn online_cpus(stats: &ContainerStatsResponse) -> u32 {
    let cpu = stats.cpu_stats.as_ref();
    cpu.and_then(|cpu| cpu.online_cpus)
        .filter(|n| *n > 0)
        .or_else(|| {
            cpu.and_then(|cpu| cpu.cpu_usage.as_ref())
                .and_then(|usage| usage.percpu_usage.as_ref())
                .and_then(|per_cpu| u32::try_from(per_cpu.len()).ok())
                .filter(|n| *n > 0)
        })
        .unwrap_or(1)
}

/// `Δcontainer / Δsystem × cpus × 100`; 0 when either counter did not move
/// forward (first sample, restart).
fn cpu_percent(previous: CpuSample, current: CpuSample, cpus: u32) -> f32 {
    let container = current.container_ns.checked_sub(previous.container_ns);
    let system = current.system_ns.checked_sub(previous.system_ns);
    match (container, system) {
        (Some(container), Some(system)) if system > 0 => {
            let percent = container as f64 / system as f64 * f64::from(cpus) * 100.0;
            percent.clamp(0.0, f64::from(cpus) * 100.0) as f32
        }
        _ => 0.0,
    }
}

fn apply_stats(container: &mut ContainerMetrics, stats: &ContainerStatsResponse) {
    if let Some(memory) = &stats.memory_stats {
        let usage = memory.usage.unwrap_or(0);
        let inactive = memory.stats.as_ref().and_then(|fields| {
            fields
                .get("total_inactive_file")
                .or_else(|| fields.get("inactive_file"))
                .copied()
        });
        container.memory_usage_bytes = match inactive {
            Some(inactive) if inactive < usage => usage - inactive,
            _ => usage,
        };
        container.memory_limit_bytes = memory.limit.unwrap_or(0);
    }
    if let Some(networks) = &stats.networks {
        for network in networks.values() {
            container.net_rx_bytes = container
                .net_rx_bytes
                .saturating_add(network.rx_bytes.unwrap_or(0));
            container.net_tx_bytes = container
                .net_tx_bytes
                .saturating_add(network.tx_bytes.unwrap_or(0));
        }
    }
    let entries = stats
        .blkio_stats
        .as_ref()
        .and_then(|blkio| blkio.io_service_bytes_recursive.as_ref());
    for entry in entries.into_iter().flatten() {
        let value = entry.value.unwrap_or(0);
        match entry.op.as_deref().and_then(|op| op.bytes().next()) {
            Some(b'r' | b'R') => {
                container.block_read_bytes = container.block_read_bytes.saturating_add(value)
            }
            Some(b'w' | b'W') => {
                container.block_write_bytes = container.block_write_bytes.saturating_add(value)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        ContainerBlkioStatEntry, ContainerBlkioStats, ContainerCpuStats, ContainerCpuUsage,
        ContainerMemoryStats, ContainerNetworkStats,
    };

    #[test]
    fn api_version_is_read_from_the_daemons_refusal() {
        let too_new = "client version 1.53 is too new. Maximum supported API version is 1.41";
        let version = supported_version(too_new).unwrap();
        assert_eq!((version.major_version, version.minor_version), (1, 41));
        let too_old =
            "client version 1.41 is too old. Minimum supported API version is 1.44, please upgrade";
        let version = supported_version(too_old).unwrap();
        assert_eq!((version.major_version, version.minor_version), (1, 44));
        let too_old = "client version 1.41 is too old. Minimum supported API version is 1.44.";
        let version = supported_version(too_old).unwrap();
        assert_eq!((version.major_version, version.minor_version), (1, 44));
        assert!(supported_version("page not found").is_none());
    }

    #[test]
    fn cpu_percent_is_the_share_of_the_system_delta_times_cpus() {
        let a = CpuSample {
            container_ns: 1_000,
            system_ns: 10_000,
        };
        let b = CpuSample {
            container_ns: 2_000,
            system_ns: 20_000,
        };
        assert!((cpu_percent(a, b, 2) - 20.0).abs() < 1e-4);
        assert_eq!(cpu_percent(b, a, 2), 0.0, "counters went backwards");
        assert_eq!(cpu_percent(a, a, 2), 0.0, "no system time passed");
    }

    #[test]
    fn health_is_read_from_the_status_text() {
        assert_eq!(
            health_from_status("Up 3 minutes (healthy)").as_deref(),
            Some("healthy")
        );
        assert_eq!(
            health_from_status("Up 1 second (health: starting)").as_deref(),
            Some("starting")
        );
        assert_eq!(
            health_from_status("Up 2 hours (unhealthy)").as_deref(),
            Some("unhealthy")
        );
        assert_eq!(health_from_status("Up 3 minutes"), None);
        assert_eq!(health_from_status("Exited (0) 2 minutes ago"), None);
    }

    fn entry(op: &str, value: u64) -> ContainerBlkioStatEntry {
        ContainerBlkioStatEntry {
            major: Some(8),
            minor: Some(0),
            op: Some(op.into()),
            value: Some(value),
        }
    }

    #[test]
    fn stats_give_memory_without_inactive_file_network_sums_and_block_io() {
        let mut v1_memory = HashMap::new();
        v1_memory.insert("total_inactive_file".to_string(), 100);
        v1_memory.insert("inactive_file".to_string(), 7);
        let mut networks = HashMap::new();
        for (name, rx, tx) in [("eth0", 10, 20), ("eth1", 1, 2)] {
            networks.insert(
                name.to_string(),
                ContainerNetworkStats {
                    rx_bytes: Some(rx),
                    tx_bytes: Some(tx),
                    ..Default::default()
                },
            );
        }
        let stats = ContainerStatsResponse {
            memory_stats: Some(ContainerMemoryStats {
                usage: Some(1_000),
                limit: Some(4_000),
                stats: Some(v1_memory),
                ..Default::default()
            }),
            networks: Some(networks),
            blkio_stats: Some(ContainerBlkioStats {
                io_service_bytes_recursive: Some(vec![
                    entry("Read", 5),
                    entry("Write", 6),
                    entry("Sync", 11),
                    entry("Total", 11),
                    entry("read", 1),
                    entry("write", 2),
                ]),
                ..Default::default()
            }),
            cpu_stats: Some(ContainerCpuStats {
                cpu_usage: Some(ContainerCpuUsage {
                    total_usage: Some(5),
                    percpu_usage: Some(vec![1, 2, 2]),
                    ..Default::default()
                }),
                system_cpu_usage: Some(50),
                online_cpus: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut container = ContainerMetrics::default();
        apply_stats(&mut container, &stats);
        assert_eq!(container.memory_usage_bytes, 900);
        assert_eq!(container.memory_limit_bytes, 4_000);
        assert_eq!((container.net_rx_bytes, container.net_tx_bytes), (11, 22));
        assert_eq!(
            (container.block_read_bytes, container.block_write_bytes),
            (6, 8)
        );
        assert_eq!(online_cpus(&stats), 3);
        assert_eq!(
            cpu_sample(&stats),
            Some(CpuSample {
                container_ns: 5,
                system_ns: 50
            })
        );

        // cgroup v2 shape: inactive_file only; never below zero.
        let mut v2_memory = HashMap::new();
        v2_memory.insert("inactive_file".to_string(), 5_000);
        let stats = ContainerStatsResponse {
            memory_stats: Some(ContainerMemoryStats {
                usage: Some(1_000),
                stats: Some(v2_memory),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut container = ContainerMetrics::default();
        apply_stats(&mut container, &stats);
        assert_eq!(container.memory_usage_bytes, 1_000);
    }

    #[tokio::test]
    async fn missing_socket_is_an_error_with_no_containers() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let mut collector = DockerCollector::new(socket.to_string_lossy());
        for _ in 0..2 {
            let report = collector.collect().await;
            assert_eq!(report.docker_version, None);
            assert!(report.containers.is_empty());
            let error = report.error.expect("an error is reported");
            assert!(error.contains("docker.sock"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(listener);
        let mut collector = DockerCollector::new(format!("unix://{}", path.display()));
        let report = collector.collect().await;
        assert!(report.error.is_some());
        assert!(report.containers.is_empty());
    }

    #[tokio::test]
    async fn docker_is_picked_up_when_its_socket_appears() {
        if !std::path::Path::new(DEFAULT_SOCKET).exists() {
            eprintln!("no Docker daemon at {DEFAULT_SOCKET}; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("docker.sock");
        let mut collector = DockerCollector::new(link.to_string_lossy());
        let missing = collector.collect().await;
        assert!(missing.error.is_some() && missing.docker_version.is_none());
        std::os::unix::fs::symlink(DEFAULT_SOCKET, &link).unwrap();
        let back = collector.collect().await;
        assert_eq!(back.error, None);
        assert!(back.docker_version.is_some());
        std::fs::remove_file(&link).unwrap();
        let gone = collector.collect().await;
        assert!(gone.error.is_some() && gone.containers.is_empty());
    }

    #[tokio::test]
    async fn the_local_daemon_reports_its_version_and_containers() {
        if !std::path::Path::new(DEFAULT_SOCKET).exists() {
            eprintln!("no Docker daemon at {DEFAULT_SOCKET}; skipped");
            return;
        }
        let mut collector = DockerCollector::new(DEFAULT_SOCKET);
        let first = collector.collect().await;
        assert_eq!(first.error, None);
        let version = first.docker_version.expect("the daemon version");
        assert!(!version.is_empty());
        let second = collector.collect().await;
        assert_eq!(second.error, None);
        assert_eq!(second.docker_version.as_deref(), Some(version.as_str()));
        for container in &second.containers {
            assert!(!container.id.is_empty());
            assert!(!container.state.is_empty());
            assert!(container.cpu_percent >= 0.0);
        }
    }
}
