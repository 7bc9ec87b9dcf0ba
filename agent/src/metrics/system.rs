//! Host metrics: CPU (total and per core), load, memory and swap through
//! `sysinfo` with targeted refreshes; disks, network interfaces, uptime and
//! the process count straight from `/proc` and `statvfs(3)`.
//!
//! Each tick reads a handful of small `/proc` files into one reused buffer:
//! `/proc/stat`, `/proc/meminfo`, `/proc/loadavg`, `/proc/uptime`,
//! `/proc/self/mountinfo` (+ one `statvfs` per real filesystem),
//! `/proc/net/dev`, and a directory listing of `/proc` to count processes.
//! No process is ever inspected: the count is the number of numeric entries
//! of `/proc`. (`sysinfo`'s `Disks` and `Networks` are not used: they
//! `statvfs` every overlay mount and open about ten sysfs files per
//! interface, where `/proc/net/dev` is one read, and they do not expose
//! inode counts.)

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;

use sysinfo::{MemoryRefreshKind, System};
use tether_protocol::{DiskMetrics, NetworkMetrics, SystemMetrics};

/// Filesystem types that never hold a real disk's data (or whose `statvfs`
/// may hang, for network filesystems).
const PSEUDO_FILESYSTEMS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "cifs",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nfs",
    "nfs4",
    "nsfs",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "smb3",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
    "udf",
];

/// Filesystems that are real even though their source is not a `/dev` node.
const DEVICELESS_FILESYSTEMS: &[&str] = &["zfs", "btrfs", "bcachefs"];

/// Interfaces left out of the report: the host side of container veth pairs,
/// whose traffic is reported per container.
const SKIPPED_INTERFACE_PREFIXES: &[&str] = &["veth"];

/// Keeps what is needed between ticks: the `sysinfo` state (CPU times of the
/// previous tick) and a read buffer.
pub struct SystemCollector {
    system: Option<System>,
    buf: String,
}

impl Default for SystemCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemCollector {
    /// Takes a first CPU sample, so the first [`collect`](Self::collect)
    /// already reports usage since this call.
    pub fn new() -> Self {
        let system = match System::new() {
            Ok(mut system) => {
                system.refresh_cpu_usage();
                Some(system)
            }
            Err(err) => {
                tracing::warn!("cannot read CPU and memory statistics: {err:?}");
                None
            }
        };
        Self {
            system,
            buf: String::with_capacity(8 * 1024),
        }
    }

    /// One sample of the host.
    pub fn collect(&mut self) -> SystemMetrics {
        let mut metrics = SystemMetrics::default();
        if let Some(system) = &mut self.system {
            system.refresh_cpu_usage();
            system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
            metrics.cpu_percent = clamp_percent(system.global_cpu_usage());
            metrics.cpu_per_core = system
                .cpus()
                .iter()
                .map(|cpu| clamp_percent(cpu.usage()))
                .collect();
            metrics.memory_total_bytes = system.total_memory();
            metrics.memory_used_bytes = system.used_memory();
            metrics.swap_total_bytes = system.total_swap();
            metrics.swap_used_bytes = system.used_swap();
        }
        if let Ok(load) = System::load_average() {
            metrics.load_1 = load.one as f32;
            metrics.load_5 = load.five as f32;
            metrics.load_15 = load.fifteen as f32;
        }
        metrics.uptime_seconds = System::uptime().unwrap_or(0);
        metrics.process_count = process_count();
        if read_into("/proc/self/mountinfo", &mut self.buf) {
            metrics.disks = disks(&self.buf);
        }
        if read_into("/proc/net/dev", &mut self.buf) {
            metrics.networks = networks(&self.buf);
        }
        metrics
    }
}

fn clamp_percent(value: f32) -> f32 {
    if value.is_finite() {
        value.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// Reads a whole (small) file into `buf`, reusing its allocation.
fn read_into(path: &str, buf: &mut String) -> bool {
    buf.clear();
    File::open(path)
        .and_then(|mut file| file.read_to_string(buf))
        .is_ok()
}

/// Processes (thread-group leaders) alive: the numeric entries of `/proc`.
pub fn process_count() -> u32 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let count = dir
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let bytes = name.as_bytes();
            !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit)
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// One line of `/proc/self/mountinfo` that names a real filesystem.
#[derive(Debug, PartialEq, Eq)]
struct Mount<'a> {
    device_id: &'a str,
    mount_point: String,
    filesystem: &'a str,
    source: &'a str,
}

/// The real filesystems of a `mountinfo` text, each device once (its first
/// mount, so `/` wins over a bind mount of the same disk).
fn real_mounts(mountinfo: &str) -> Vec<Mount<'_>> {
    let mut mounts: Vec<Mount<'_>> = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let mut left = before.split(' ');
        let (Some(_id), Some(_parent), Some(device_id), Some(_root), Some(mount_point)) = (
            left.next(),
            left.next(),
            left.next(),
            left.next(),
            left.next(),
        ) else {
            continue;
        };
        let mut right = after.split(' ');
        let (Some(filesystem), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        let pseudo = PSEUDO_FILESYSTEMS.contains(&filesystem) || filesystem.starts_with("fuse");
        let backed = source.starts_with("/dev/") || DEVICELESS_FILESYSTEMS.contains(&filesystem);
        if pseudo || !backed || mounts.iter().any(|m| m.device_id == device_id) {
            continue;
        }
        mounts.push(Mount {
            device_id,
            mount_point: unescape_octal(mount_point),
            filesystem,
            source,
        });
    }
    mounts
}

/// `mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_string();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .map(|d| (d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Size and inode use of each real filesystem, read now (the built-in
/// `disk` health check).
pub fn disk_usage() -> Vec<DiskMetrics> {
    let mut buf = String::new();
    if read_into("/proc/self/mountinfo", &mut buf) {
        disks(&buf)
    } else {
        Vec::new()
    }
}

/// Size and inode use of each real filesystem.
fn disks(mountinfo: &str) -> Vec<DiskMetrics> {
    real_mounts(mountinfo)
        .into_iter()
        .filter_map(|mount| {
            let stat = statvfs(&mount.mount_point)?;
            let total = stat.blocks.saturating_mul(stat.fragment_size);
            if total == 0 {
                return None;
            }
            let used = stat
                .blocks
                .saturating_sub(stat.blocks_free)
                .saturating_mul(stat.fragment_size);
            // Filesystems without a fixed inode table (btrfs) report zero.
            let inodes = (stat.files > 0).then_some(stat.files);
            Some(DiskMetrics {
                mount_point: mount.mount_point,
                device: mount.source.to_string(),
                filesystem: mount.filesystem.to_string(),
                total_bytes: total,
                used_bytes: used,
                inodes_total: inodes,
                inodes_used: inodes.map(|files| files.saturating_sub(stat.files_free)),
            })
        })
        .collect()
}

struct FsStat {
    fragment_size: u64,
    blocks: u64,
    blocks_free: u64,
    files: u64,
    files_free: u64,
}

fn statvfs(path: &str) -> Option<FsStat> {
    let path = CString::new(path).ok()?;
    let mut stat = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `stat` points to
    // writable memory of the right type; it is read only when the call
    // succeeded, which means the kernel filled it in.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    #[allow(clippy::useless_conversion)] // the field widths differ between targets
    Some(FsStat {
        fragment_size: u64::from(stat.f_frsize),
        blocks: u64::from(stat.f_blocks),
        blocks_free: u64::from(stat.f_bfree),
        files: u64::from(stat.f_files),
        files_free: u64::from(stat.f_ffree),
    })
}

/// Cumulative counters of each interface, from `/proc/net/dev`.
fn networks(net_dev: &str) -> Vec<NetworkMetrics> {
    net_dev
        .lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let interface = name.trim();
            if interface.is_empty()
                || SKIPPED_INTERFACE_PREFIXES
                    .iter()
                    .any(|prefix| interface.starts_with(prefix))
            {
                return None;
            }
            // rx: bytes packets errs drop fifo frame compressed multicast
            // tx: bytes packets errs drop fifo colls carrier compressed
            let mut fields = [0u64; 11];
            let mut values = counters.split_ascii_whitespace();
            for field in &mut fields {
                *field = values.next()?.parse().ok()?;
            }
            Some(NetworkMetrics {
                interface: interface.to_string(),
                rx_bytes: fields[0],
                rx_packets: fields[1],
                rx_errors: fields[2],
                tx_bytes: fields[8],
                tx_packets: fields[9],
                tx_errors: fields[10],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334460k
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
42 27 254:0 /var/lib/docker /var/lib/docker rw,relatime shared:1 - ext4 /dev/vda rw
50 27 259:1 / /mnt/my\\040data rw,relatime shared:7 - xfs /dev/nvme0n1p1 rw
51 27 7:3 / /snap/core/1 ro,relatime - squashfs /dev/loop3 ro
52 42 0:55 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=x
53 27 0:60 / /tank rw - zfs tank/data rw
54 27 0:61 / /run/user/1000/doc rw - fuse.portal portal rw
";

    #[test]
    fn only_real_filesystems_are_kept_once_per_device() {
        let mounts = real_mounts(MOUNTINFO);
        let points: Vec<&str> = mounts.iter().map(|m| m.mount_point.as_str()).collect();
        assert_eq!(points, ["/", "/mnt/my data", "/tank"]);
        assert_eq!(mounts[0].source, "/dev/vda");
        assert_eq!(mounts[0].filesystem, "ext4");
        assert_eq!(mounts[1].filesystem, "xfs");
    }

    #[test]
    fn octal_escapes_are_decoded_and_bad_ones_left_alone() {
        assert_eq!(unescape_octal("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_octal("/a\\9x\\04"), "/a\\9x\\04");
        assert_eq!(unescape_octal("/plain"), "/plain");
    }

    #[test]
    fn proc_net_dev_counters_are_parsed_and_veths_skipped() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 36502066  132551    0    0    0     0          0         0 36502066  132551    0    0    0     0       0          0
  eth0: 335453827   15915    3    0    0     0          0         0   939630    8645    1    0    0     0       0          0
docker0:       1       2    0    0    0     0          0         0        4       5    0    2    0     0       0          0
vethab12: 10 1 0 0 0 0 0 0 10 1 0 0 0 0 0 0
  bad0: 1 2 3
";
        let nets = networks(text);
        let names: Vec<&str> = nets.iter().map(|n| n.interface.as_str()).collect();
        assert_eq!(names, ["lo", "eth0", "docker0"]);
        assert_eq!(
            nets[1],
            NetworkMetrics {
                interface: "eth0".into(),
                rx_bytes: 335453827,
                rx_packets: 15915,
                rx_errors: 3,
                tx_bytes: 939630,
                tx_packets: 8645,
                tx_errors: 1,
            }
        );
        assert_eq!(nets[2].tx_bytes, 4);
    }

    #[test]
    fn this_host_reports_plausible_values() {
        let mut collector = SystemCollector::new();
        std::thread::sleep(std::time::Duration::from_millis(250));
        let metrics = collector.collect();
        assert!(metrics.memory_total_bytes > 0);
        assert!(metrics.memory_used_bytes <= metrics.memory_total_bytes);
        assert!(metrics.swap_used_bytes <= metrics.swap_total_bytes);
        assert!((0.0..=100.0).contains(&metrics.cpu_percent));
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(metrics.cpu_per_core.len(), cores);
        assert!(metrics.load_1 >= 0.0);
        assert!(metrics.uptime_seconds > 0);
        assert!(metrics.process_count > 0);
        assert!(!metrics.disks.is_empty(), "no disk found");
        for disk in &metrics.disks {
            assert!(disk.total_bytes > 0 && disk.used_bytes <= disk.total_bytes);
            if let (Some(total), Some(used)) = (disk.inodes_total, disk.inodes_used) {
                assert!(used <= total);
            }
        }
        assert!(!metrics.networks.is_empty(), "no network interface found");
        // A second tick keeps working off the first one.
        let again = collector.collect();
        assert_eq!(again.cpu_per_core.len(), cores);
    }
}
