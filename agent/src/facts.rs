//! Host facts sent at enrollment and at every session start: hostname, OS,
//! architecture, kernel, CPU cores and memory, read from `/proc` and std.

use tether_protocol::HostFacts;

/// This build's version, as reported to the control plane.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Facts about the machine the agent runs on. Whatever cannot be read is left
/// empty rather than failing.
pub fn collect() -> HostFacts {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    HostFacts {
        hostname: hostname(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kernel_version: read("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_string())
            .filter(|text| !text.is_empty()),
        cpu_cores: read("/proc/cpuinfo")
            .and_then(|text| count_processors(&text))
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .and_then(|n| u32::try_from(n.get()).ok())
            })
            .unwrap_or(0),
        memory_bytes: read("/proc/meminfo")
            .and_then(|text| mem_total_bytes(&text))
            .unwrap_or(0),
        agent_version: AGENT_VERSION.to_string(),
    }
}

/// The host name, or `"unknown"`.
pub fn hostname() -> String {
    hostname::get()
        .map(|name| name.to_string_lossy().into_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Number of `processor` entries in `/proc/cpuinfo`.
fn count_processors(cpuinfo: &str) -> Option<u32> {
    let count = cpuinfo
        .lines()
        .filter(|line| {
            line.split(':')
                .next()
                .is_some_and(|key| key.trim() == "processor")
        })
        .count();
    u32::try_from(count).ok().filter(|n| *n > 0)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    let unit = match fields.next() {
        Some("kB") | Some("KB") | Some("kb") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let meminfo = "MemTotal:       16318412 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total_bytes(meminfo), Some(16318412 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB"), None);
        assert_eq!(mem_total_bytes("MemTotal: lots kB"), None);
    }

    #[test]
    fn cpuinfo_processors_are_counted() {
        let cpuinfo = "processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\nmodel name\t: x\n";
        assert_eq!(count_processors(cpuinfo), Some(2));
        assert_eq!(count_processors(""), None);
    }

    #[test]
    fn collected_facts_describe_this_host() {
        let facts = collect();
        assert_eq!(facts.os, "linux");
        assert_eq!(facts.arch, std::env::consts::ARCH);
        assert!(facts.cpu_cores >= 1);
        assert!(!facts.hostname.is_empty());
        assert_eq!(facts.agent_version, AGENT_VERSION);
    }
}
