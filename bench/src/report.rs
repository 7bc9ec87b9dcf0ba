//! Realistic metrics reports: a 4-core host with 2 disks, 3 network
//! interfaces and 5 containers, the values of the magnitude a real server
//! reports (counters in the billions, ids of 64 hex digits), so that the
//! encoded sizes are those of a real agent's report.

use tether_protocol::{
    ContainerMetrics, ContainerReport, DiskMetrics, MetricsBatch, NetworkMetrics, SystemMetrics,
};

const GIB: u64 = 1 << 30;

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A small deterministic jitter in `0..span` from the agent and sequence.
fn jitter(agent: u32, seq: u64, salt: u64, span: u64) -> u64 {
    let mut x = (u64::from(agent) << 32) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % span.max(1)
}

fn percent(agent: u32, seq: u64, salt: u64) -> f32 {
    // 5.00 .. 85.00 %, two decimals like sysinfo gives.
    (500 + jitter(agent, seq, salt, 8000)) as f32 / 100.0
}

const CONTAINERS: [(&str, &str, Option<&str>); 5] = [
    ("coolify-proxy", "traefik:v3.1.6", Some("healthy")),
    (
        "app-web-1",
        "ghcr.io/acme/storefront-web:2.14.3",
        Some("healthy"),
    ),
    (
        "app-worker-1",
        "ghcr.io/acme/storefront-worker:2.14.3",
        None,
    ),
    ("postgres-main", "postgres:16.4-bookworm", Some("healthy")),
    ("redis-cache", "redis:7.4.1-alpine", None),
];

/// The `seq`-th report of simulated agent `agent`.
pub fn realistic_batch(agent: u32, seq: u64) -> MetricsBatch {
    let uptime = 1_814_400 + seq * 30;
    let disks = vec![
        DiskMetrics {
            mount_point: "/".into(),
            device: "/dev/nvme0n1p1".into(),
            filesystem: "ext4".into(),
            total_bytes: 160 * GIB,
            used_bytes: 48 * GIB + jitter(agent, seq, 1, GIB),
            inodes_total: Some(10_485_760),
            inodes_used: Some(1_204_331 + jitter(agent, seq, 2, 10_000)),
        },
        DiskMetrics {
            mount_point: "/var/lib/docker".into(),
            device: "/dev/nvme1n1".into(),
            filesystem: "xfs".into(),
            total_bytes: 500 * GIB,
            used_bytes: 212 * GIB + jitter(agent, seq, 3, GIB),
            inodes_total: Some(262_144_000),
            inodes_used: Some(3_981_220 + jitter(agent, seq, 4, 10_000)),
        },
    ];
    let networks = ["eth0", "docker0", "veth4f1c2a9"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let base = 48_000_000_000 / (i as u64 + 1);
            NetworkMetrics {
                interface: (*name).into(),
                rx_bytes: base + seq * 1_250_000 + jitter(agent, seq, 10 + i as u64, 1_000_000),
                tx_bytes: base / 3 + seq * 420_000 + jitter(agent, seq, 20 + i as u64, 1_000_000),
                rx_packets: base / 900 + seq * 1_100,
                tx_packets: base / 1_400 + seq * 700,
                rx_errors: 0,
                tx_errors: jitter(agent, seq, 30 + i as u64, 3),
            }
        })
        .collect();
    let containers = CONTAINERS
        .iter()
        .enumerate()
        .map(|(i, (name, image, health))| {
            let salt = 100 + i as u64 * 10;
            ContainerMetrics {
                id: format!(
                    "{:016x}{:016x}{:016x}{:016x}",
                    u64::from(agent) * 7919 + i as u64,
                    0x5eed_0000_0000_0000u64 + i as u64,
                    0x0123_4567_89ab_cdefu64 ^ u64::from(agent),
                    0xfedc_ba98_7654_3210u64 ^ i as u64
                ),
                name: (*name).into(),
                image: (*image).into(),
                state: "running".into(),
                health: health.map(Into::into),
                restart_count: i as u64 % 2,
                started_at: Some("2026-10-30T08:41:17.482915301Z".into()),
                cpu_percent: percent(agent, seq, salt) / 4.0,
                memory_usage_bytes: 180_000_000 + jitter(agent, seq, salt + 1, 400_000_000),
                memory_limit_bytes: 8 * GIB,
                net_rx_bytes: 9_000_000_000 + seq * 150_000 + jitter(agent, seq, salt + 2, 1 << 20),
                net_tx_bytes: 3_000_000_000 + seq * 90_000 + jitter(agent, seq, salt + 3, 1 << 20),
                block_read_bytes: 2_400_000_000 + jitter(agent, seq, salt + 4, 1 << 20),
                block_write_bytes: 11_000_000_000
                    + seq * 40_000
                    + jitter(agent, seq, salt + 5, 1 << 20),
            }
        })
        .collect();
    MetricsBatch {
        seq,
        collected_at_unix_ms: now_unix_ms(),
        system: SystemMetrics {
            cpu_percent: percent(agent, seq, 40),
            cpu_per_core: (0..4).map(|c| percent(agent, seq, 50 + c)).collect(),
            load_1: 1.0 + jitter(agent, seq, 60, 300) as f32 / 100.0,
            load_5: 1.2 + jitter(agent, seq, 61, 200) as f32 / 100.0,
            load_15: 1.1 + jitter(agent, seq, 62, 100) as f32 / 100.0,
            memory_total_bytes: 16 * GIB,
            memory_used_bytes: 7 * GIB + jitter(agent, seq, 63, GIB),
            swap_total_bytes: 4 * GIB,
            swap_used_bytes: 120_000_000 + jitter(agent, seq, 64, 50_000_000),
            disks,
            networks,
            uptime_seconds: uptime,
            process_count: 212 + jitter(agent, seq, 65, 40) as u32,
        },
        containers: Some(ContainerReport {
            docker_version: Some("28.2.2".into()),
            error: None,
            containers,
        }),
        dropped_batches: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_the_promised_shape_and_a_stable_size() {
        let batch = realistic_batch(7, 1);
        assert_eq!(batch.system.cpu_per_core.len(), 4);
        assert_eq!(batch.system.disks.len(), 2);
        assert_eq!(batch.system.networks.len(), 3);
        assert_eq!(
            batch.containers.as_ref().map(|c| c.containers.len()),
            Some(5)
        );
        let sizes: Vec<usize> = (1..50)
            .map(|seq| {
                tether_protocol::codec::encode_frame(
                    &tether_protocol::AgentMessage::MetricsBatch(realistic_batch(9999, seq)),
                    tether_protocol::MAX_FRAME_LEN,
                )
                .map(|frame| frame.len())
            })
            .collect::<Result<_, _>>()
            .expect("encodes");
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(
            max - min <= 8,
            "postcard size varies too much: {min}..{max}"
        );
    }
}
