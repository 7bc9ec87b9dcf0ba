//! Reading a process's CPU time and memory from `/proc`.

use std::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU time (user + system, all threads, dead ones included) in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": state is field 0, utime field 11, stime field 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

/// The command name of a process (`comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, field)
}

/// Proportional set size from `/proc/<pid>/smaps_rollup`, in KiB.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&rollup, "Pss")
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == field)
            .then(|| value.split_whitespace().next().and_then(|v| v.parse().ok()))?
    })
}

/// CPU seconds of every process whose `comm` is `name` (e.g. `postgres`).
pub fn cpu_seconds_by_name(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| comm(*pid).as_deref() == Some(name))
        .filter_map(cpu_seconds)
        .sum()
}

/// This process's own id.
pub fn self_pid() -> u32 {
    std::process::id()
}

/// A CPU-time reading of some processes at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    pub at: Instant,
    pub cpu: f64,
}

impl CpuMark {
    pub fn of(pid: u32) -> Self {
        Self {
            at: Instant::now(),
            cpu: cpu_seconds(pid).unwrap_or(0.0),
        }
    }

    pub fn of_name(name: &str) -> Self {
        Self {
            at: Instant::now(),
            cpu: cpu_seconds_by_name(name),
        }
    }

    /// CPU seconds used since `earlier`.
    pub fn cpu_since(&self, earlier: &CpuMark) -> f64 {
        (self.cpu - earlier.cpu).max(0.0)
    }

    /// Share of one core used since `earlier`, in percent.
    pub fn percent_since(&self, earlier: &CpuMark) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall > 0.0 {
            100.0 * self.cpu_since(earlier) / wall
        } else {
            0.0
        }
    }
}

/// Raises the soft open-files limit to the hard limit (children inherit it).
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// Busy and total CPU time of the whole machine, in seconds of one core
/// (from the first line of `/proc/stat`).
pub fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0.0);
    let ticks = ticks_per_second();
    Some(((total - idle) / ticks, total / ticks))
}

/// A reading of the whole machine's CPU at one instant.
#[derive(Debug, Clone, Copy)]
pub struct MachineMark {
    busy: f64,
}

impl MachineMark {
    pub fn now() -> Self {
        Self {
            busy: machine_cpu_seconds().map(|(busy, _)| busy).unwrap_or(0.0),
        }
    }

    /// CPU seconds the whole machine was busy since `earlier`.
    pub fn busy_since(&self, earlier: &MachineMark) -> f64 {
        (self.busy - earlier.busy).max(0.0)
    }
}

/// CPU time of the calling thread, in seconds (exact, not in ticks).
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a local timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Packets the kernel dropped at the UDP sockets bound to `port` (receive
/// buffer full), from the `drops` column of `/proc/net/udp` and `udp6`.
pub fn udp_socket_drops(port: u16) -> u64 {
    let needle = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local = fields.get(1)?;
                    if !local.ends_with(&needle) {
                        return None;
                    }
                    fields.last()?.parse::<u64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}
