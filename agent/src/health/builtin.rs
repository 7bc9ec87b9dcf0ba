//! The built-in checks, run every `[health] interval_seconds`:
//!
//! * `builtin:docker` — the Docker daemon answers `/_ping` (through the
//!   client the metrics collector uses). Only when `[docker] enabled`.
//! * `builtin:disk` — no real filesystem has more than `disk_max_percent`
//!   of its space or inodes in use.
//! * `builtin:memory` — memory in use (`MemTotal - MemAvailable`) is at most
//!   `memory_max_percent`.
//! * `builtin:control_plane` — a heartbeat was answered within the last
//!   three heartbeat intervals (60 s start period, for the first session).
//! * `builtin:clock_skew` — the clock is within `clock_skew_max_ms` of the
//!   control plane's, as measured from the last heartbeat answer; pending
//!   until one was answered.

use std::time::Duration;

use tether_protocol::{DiskMetrics, BUILTIN_HEALTH_CHECK_PREFIX};
use tokio::time::Instant;

use super::{Probe, SessionSignals, Signals};
use crate::config::{Config, HealthConfig};
use crate::metrics::docker::DockerConnection;
use crate::metrics::system;

/// Each built-in run must end within this.
pub const BUILTIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals without an answer before `control_plane` fails.
pub const MISSED_HEARTBEATS: u32 = 3;

/// One built-in check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    Docker,
    Disk,
    Memory,
    ControlPlane,
    ClockSkew,
}

impl Builtin {
    pub const ALL: [Builtin; 5] = [
        Self::Docker,
        Self::Disk,
        Self::Memory,
        Self::ControlPlane,
        Self::ClockSkew,
    ];

    /// The name used in agent.toml (`[health] disabled`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Disk => "disk",
            Self::Memory => "memory",
            Self::ControlPlane => "control_plane",
            Self::ClockSkew => "clock_skew",
        }
    }

    /// The check id, `builtin:<name>`.
    pub fn id(self) -> String {
        format!("{BUILTIN_HEALTH_CHECK_PREFIX}{}", self.name())
    }

    /// Consecutive failures before the check fails.
    pub fn retries(self) -> u32 {
        match self {
            Self::Disk | Self::ControlPlane => 1,
            Self::Docker | Self::ClockSkew => 2,
            Self::Memory => 3,
        }
    }

    /// Failures in this first stretch of the agent's life do not count.
    pub fn start_period(self) -> Duration {
        match self {
            Self::ControlPlane => Duration::from_secs(60),
            _ => Duration::ZERO,
        }
    }

    /// The built-ins `config` runs.
    pub fn enabled(config: &Config) -> Vec<Builtin> {
        Self::ALL
            .into_iter()
            .filter(|builtin| *builtin != Self::Docker || config.docker.enabled)
            .filter(|builtin| {
                !config
                    .health
                    .disabled
                    .iter()
                    .any(|name| name == builtin.name())
            })
            .collect()
    }
}

/// What the built-ins read.
#[derive(Clone)]
pub struct BuiltinContext {
    /// `None` when Docker is disabled.
    pub docker: Option<DockerConnection>,
    pub config: HealthConfig,
    pub signals: SessionSignals,
}

/// Runs one built-in.
pub async fn run(builtin: Builtin, ctx: &BuiltinContext) -> Probe {
    match builtin {
        Builtin::Docker => match &ctx.docker {
            Some(docker) => ping_docker(docker).await,
            None => Probe::Pass("Docker is disabled in agent.toml".into()),
        },
        Builtin::Disk => {
            let disks = tokio::task::spawn_blocking(system::disk_usage)
                .await
                .unwrap_or_default();
            disk(&disks, ctx.config.disk_max_percent)
        }
        Builtin::Memory => match tokio::fs::read_to_string("/proc/meminfo").await {
            Ok(meminfo) => memory(&meminfo, ctx.config.memory_max_percent),
            Err(err) => Probe::Fail(format!("cannot read /proc/meminfo: {err}")),
        },
        Builtin::ControlPlane => control_plane(ctx.signals.get(), Instant::now()),
        Builtin::ClockSkew => clock_skew(ctx.signals.get(), ctx.config.clock_skew_max_ms),
    }
}

/// `builtin:docker`.
pub async fn ping_docker(docker: &DockerConnection) -> Probe {
    let started = Instant::now();
    match tokio::time::timeout(BUILTIN_TIMEOUT, docker.ping()).await {
        Ok(Ok(())) => Probe::Pass(format!(
            "Docker daemon at {} answered in {} ms",
            docker.socket(),
            started.elapsed().as_millis()
        )),
        Ok(Err(why)) => Probe::Fail(why),
        Err(_) => Probe::Fail(format!(
            "the Docker daemon at {} did not answer within {} s",
            docker.socket(),
            BUILTIN_TIMEOUT.as_secs()
        )),
    }
}

fn percent(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 * 100.0 / total as f64
    }
}

/// `builtin:disk` over a reading of the real filesystems.
pub fn disk(disks: &[DiskMetrics], max_percent: f64) -> Probe {
    let mut over = Vec::new();
    let mut fullest: Option<(&str, f64)> = None;
    for disk in disks {
        let space = percent(disk.used_bytes, disk.total_bytes);
        if space > max_percent {
            over.push(format!(
                "{} is {space:.1} % full ({} of {} bytes)",
                disk.mount_point, disk.used_bytes, disk.total_bytes
            ));
        }
        if let (Some(total), Some(used)) = (disk.inodes_total, disk.inodes_used) {
            let inodes = percent(used, total);
            if inodes > max_percent {
                over.push(format!(
                    "{} has {inodes:.1} % of its inodes in use",
                    disk.mount_point
                ));
            }
        }
        if fullest.is_none_or(|(_, most)| space > most) {
            fullest = Some((&disk.mount_point, space));
        }
    }
    match fullest {
        _ if !over.is_empty() => {
            Probe::Fail(format!("{} (threshold {max_percent} %)", over.join("; ")))
        }
        Some((mount, space)) => Probe::Pass(format!(
            "{} filesystem(s) below {max_percent} %; fullest: {mount} at {space:.1} %",
            disks.len()
        )),
        None => Probe::Pass("no real filesystem found".into()),
    }
}

/// `builtin:memory` over the text of `/proc/meminfo`.
pub fn memory(meminfo: &str, max_percent: f64) -> Probe {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let (Some(total_kib), Some(available_kib)) = (field("MemTotal"), field("MemAvailable")) else {
        return Probe::Fail("/proc/meminfo has no MemTotal or MemAvailable".into());
    };
    let used = percent(total_kib.saturating_sub(available_kib), total_kib);
    let text = format!(
        "{used:.1} % of {} MiB in use ({} MiB available; threshold {max_percent} %)",
        total_kib / 1024,
        available_kib / 1024
    );
    if used > max_percent {
        Probe::Fail(text)
    } else {
        Probe::Pass(text)
    }
}

/// `builtin:control_plane`.
pub fn control_plane(signals: Signals, now: Instant) -> Probe {
    match (signals.last_ack, signals.heartbeat_interval) {
        (Some(at), Some(interval)) => {
            let age = now.saturating_duration_since(at);
            let patience = interval * MISSED_HEARTBEATS;
            if age <= patience {
                Probe::Pass(format!(
                    "last heartbeat answered {:.1} s ago",
                    age.as_secs_f64()
                ))
            } else {
                Probe::Fail(format!(
                    "no heartbeat answered for {:.0} s (more than {MISSED_HEARTBEATS} heartbeat intervals of {} s)",
                    age.as_secs_f64(),
                    interval.as_secs()
                ))
            }
        }
        _ => Probe::Fail("no heartbeat answered since the agent started".into()),
    }
}

/// `builtin:clock_skew`.
pub fn clock_skew(signals: Signals, max_ms: u64) -> Probe {
    let Some(skew_ms) = signals.skew_ms else {
        return Probe::Pending("no heartbeat answered yet".into());
    };
    let direction = if skew_ms > 0 { "behind" } else { "ahead of" };
    let text = format!(
        "this clock is {:.3} s {direction} the control plane's (±{} ms; threshold {:.3} s)",
        skew_ms.unsigned_abs() as f64 / 1000.0,
        signals.round_trip_ms / 2,
        max_ms as f64 / 1000.0
    );
    if skew_ms.unsigned_abs() > max_ms {
        Probe::Fail(text)
    } else {
        Probe::Pass(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_at(mount: &str, used: u64, total: u64, inodes: Option<(u64, u64)>) -> DiskMetrics {
        DiskMetrics {
            mount_point: mount.into(),
            device: "/dev/vda1".into(),
            filesystem: "ext4".into(),
            total_bytes: total,
            used_bytes: used,
            inodes_total: inodes.map(|(_, total)| total),
            inodes_used: inodes.map(|(used, _)| used),
        }
    }

    #[test]
    fn disk_fails_when_any_filesystem_is_above_the_threshold() {
        let disks = [
            disk_at("/", 40, 100, Some((1, 100))),
            disk_at("/data", 95, 100, None),
        ];
        let Probe::Fail(why) = disk(&disks, 90.0) else {
            panic!("should fail")
        };
        assert!(why.contains("/data is 95.0 % full"), "{why}");
        assert!(matches!(disk(&disks, 96.0), Probe::Pass(text) if text.contains("fullest: /data")));
        let inodes = [disk_at("/", 1, 100, Some((99, 100)))];
        assert!(matches!(disk(&inodes, 90.0), Probe::Fail(text) if text.contains("inodes")));
        assert!(matches!(disk(&[], 90.0), Probe::Pass(_)));
    }

    #[test]
    fn disk_check_reads_this_host() {
        assert!(!matches!(
            disk(&system::disk_usage(), 100.0),
            Probe::Fail(_)
        ));
    }

    #[test]
    fn memory_uses_total_minus_available() {
        let meminfo = "MemTotal:       16000000 kB\nMemFree:          100000 kB\nMemAvailable:    1000000 kB\n";
        assert!(matches!(memory(meminfo, 95.0), Probe::Pass(text) if text.starts_with("93.8 %")));
        assert!(matches!(memory(meminfo, 90.0), Probe::Fail(_)));
        assert!(matches!(memory("garbage", 90.0), Probe::Fail(_)));
    }

    #[test]
    fn control_plane_passes_within_three_heartbeats() {
        let now = Instant::now();
        let mut signals = Signals::default();
        assert!(matches!(control_plane(signals, now), Probe::Fail(_)));
        signals.heartbeat_interval = Some(Duration::from_secs(10));
        signals.last_ack = Some(now);
        assert!(matches!(
            control_plane(signals, now + Duration::from_secs(29)),
            Probe::Pass(_)
        ));
        assert!(matches!(
            control_plane(signals, now + Duration::from_secs(31)),
            Probe::Fail(text) if text.contains("31 s")
        ));
    }

    #[test]
    fn clock_skew_is_pending_until_measured_then_thresholded() {
        let mut signals = Signals::default();
        assert!(matches!(clock_skew(signals, 5000), Probe::Pending(_)));
        signals.skew_ms = Some(4_999);
        assert!(matches!(clock_skew(signals, 5000), Probe::Pass(text) if text.contains("behind")));
        signals.skew_ms = Some(-6_000);
        assert!(
            matches!(clock_skew(signals, 5000), Probe::Fail(text) if text.contains("6.000 s ahead"))
        );
    }

    #[test]
    fn docker_is_off_with_docker_metrics_or_by_name() {
        let mut config = Config::default();
        assert_eq!(Builtin::enabled(&config).len(), 5);
        config.docker.enabled = false;
        assert!(!Builtin::enabled(&config).contains(&Builtin::Docker));
        config.docker.enabled = true;
        config.health.disabled = vec!["clock_skew".into()];
        assert_eq!(
            Builtin::enabled(&config),
            vec![
                Builtin::Docker,
                Builtin::Disk,
                Builtin::Memory,
                Builtin::ControlPlane
            ]
        );
        assert_eq!(Builtin::ClockSkew.id(), "builtin:clock_skew");
        assert_eq!(
            Builtin::ALL.map(Builtin::name),
            crate::config::BUILTIN_CHECKS
        );
    }
}
