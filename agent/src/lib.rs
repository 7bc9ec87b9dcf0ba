//! The Tether agent: enrolls with a control plane, then holds a mutual-TLS
//! QUIC session with it (heartbeats, certificate renewal, streams opened by
//! the control plane), reconnecting with backoff.
//!
//! * [`config`] — `agent.toml` and `TETHER_AGENT_*` overrides.
//! * [`state`] — the state dir: key, certificate chain, identity, written atomically.
//! * [`facts`] — host facts reported at enrollment and session start.
//! * [`dial`] — address resolution and the QUIC handshake.
//! * [`enroll`] — token + CSR for a certificate.
//! * [`session`] — the run loop.
//! * [`metrics`] — host ([`metrics::system`]) and Docker ([`metrics::docker`]) collectors.
//! * [`spool`] — unacknowledged metrics batches on disk, bounded.
//! * [`telemetry`] — the collection loop and the per-session sender.
//! * [`reconnect`] — the reconnect backoff policy.
//! * [`process`] — spawning a program under the local policy: the policy
//!   check, refusals, process groups, bounded output, timeout and kill;
//!   used by commands and by `exec` health checks.
//! * [`command`] — commands relayed by the control plane: admission (a
//!   bound on concurrent commands) and the command stream.
//! * [`health`] — built-in and pushed health checks, their scheduler and
//!   their reports.
//! * [`incoming`] — streams the control plane opens (commands, health
//!   configuration), classified and dispatched.
//! * [`check`] — `tether-agent check`.
//!
//! The binary (`main.rs`) only parses the command line and wires these up.

pub mod check;
pub mod command;
pub mod config;
pub mod dial;
pub mod enroll;
pub mod facts;
pub mod health;
pub mod incoming;
pub mod metrics;
pub mod process;
pub mod reconnect;
pub mod run_as;
pub mod session;
pub mod spool;
pub mod state;
pub mod telemetry;

use std::time::{Duration, SystemTime};

/// RFC 3339 UTC, e.g. `2026-05-01T12:00:00Z`.
pub fn format_time(time: SystemTime) -> String {
    let secs = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} seconds after the Unix epoch"))
}

/// Gives the heap's free pages back to the kernel.
///
/// glibc returns freed heap memory to the kernel only from the top of the
/// heap (`M_TRIM_THRESHOLD`): the pages of blocks freed below a live one stay
/// resident. Each report (Docker responses, serialisation, QUIC streams)
/// leaves such holes, about half of an idle agent's heap
/// (docs/performance-log.md §5). `malloc_trim(0)` releases every free page of
/// the heap (`MADV_DONTNEED`); a pass over a 1 MiB heap takes microseconds.
/// Called after each acknowledged report and every few seconds by `run`.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives free pages of the allocator back to the
    // kernel; it takes the allocator's locks like any malloc call.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Seconds with one decimal, e.g. `1.5s`.
pub fn format_duration(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_are_formatted_for_operators() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        assert_eq!(format_time(t), "2026-01-01T00:00:00Z");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }
}
