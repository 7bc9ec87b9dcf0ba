//! Health checks: the agent's built-in checks and the checks the control
//! plane pushes, run on their own schedules with Docker `HEALTHCHECK`
//! semantics, and reported to the control plane.
//!
//! * [`status`] — the per-check state machine (start period, retries).
//! * [`builtin`] — `builtin:docker`, `builtin:disk`, `builtin:memory`,
//!   `builtin:control_plane`, `builtin:clock_skew`.
//! * [`probe`] — pushed checks (HTTP, TCP, exec) and their validation.
//! * [`target`] — the link-local and metadata targets HTTP and TCP checks
//!   refuse.
//! * [`scheduler`] — the task that runs every check on its interval, the
//!   latest results, and the requests of the control plane (replace the
//!   pushed checks, run everything now).
//! * [`report`] — per session: `HealthReport` streams (on a status change
//!   and at least every metrics interval) and the health-config streams the
//!   control plane opens.
//!
//! Results live in memory only: a restarted agent starts again from
//! `Starting`, report sequence numbers start again from 1, and pushed
//! checks come back with the control plane's next `ConfigureHealthChecks`.

pub mod builtin;
pub mod probe;
pub mod report;
pub mod scheduler;
pub mod status;
pub mod target;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tether_protocol::HEALTH_OUTPUT_LIMIT;
use tokio::time::Instant;

pub use scheduler::Health;

/// What one run of a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The check passed; the text says what was seen.
    Pass(String),
    /// The check failed; the text says why.
    Fail(String),
    /// Nothing could be measured yet (no heartbeat answered): the check's
    /// status does not move.
    Pending(String),
}

impl Probe {
    /// The text, for people.
    pub fn output(&self) -> &str {
        match self {
            Self::Pass(text) | Self::Fail(text) | Self::Pending(text) => text,
        }
    }
}

/// What the session loop learns about the control plane, for the
/// `control_plane` and `clock_skew` checks. Clones share the same record.
#[derive(Debug, Clone, Default)]
pub struct SessionSignals {
    inner: Arc<Mutex<Signals>>,
}

/// A copy of what [`SessionSignals`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    /// The heartbeat interval of the current (or last) session.
    pub heartbeat_interval: Option<Duration>,
    /// When the last heartbeat was answered.
    pub last_ack: Option<Instant>,
    /// The control plane's clock minus ours at the last answer, estimated
    /// at the midpoint of the round trip, in milliseconds.
    pub skew_ms: Option<i64>,
    /// The round trip of that heartbeat: the estimate is good to half of it.
    pub round_trip_ms: u64,
}

impl SessionSignals {
    fn lock(&self) -> MutexGuard<'_, Signals> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A session was established with this heartbeat interval.
    pub fn session_started(&self, heartbeat_interval: Duration) {
        self.lock().heartbeat_interval = Some(heartbeat_interval);
    }

    /// A heartbeat was answered now.
    pub fn heartbeat_acked(&self, skew_ms: i64, round_trip_ms: u64) {
        let mut signals = self.lock();
        signals.last_ack = Some(Instant::now());
        signals.skew_ms = Some(skew_ms);
        signals.round_trip_ms = round_trip_ms;
    }

    pub fn get(&self) -> Signals {
        *self.lock()
    }
}

/// `text` cut to [`HEALTH_OUTPUT_LIMIT`] bytes at a character boundary,
/// ending with `…` when cut.
pub fn bound_output(mut text: String) -> String {
    if text.len() <= HEALTH_OUTPUT_LIMIT {
        return text;
    }
    let ellipsis = '…';
    let mut end = HEALTH_OUTPUT_LIMIT - ellipsis.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(ellipsis);
    text
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_output_is_cut_at_a_character_boundary() {
        assert_eq!(bound_output("short".into()), "short");
        let long = "é".repeat(HEALTH_OUTPUT_LIMIT);
        let bounded = bound_output(long);
        assert!(bounded.len() <= HEALTH_OUTPUT_LIMIT);
        assert!(bounded.ends_with('…'));
    }

    #[test]
    fn signals_record_the_last_heartbeat() {
        let signals = SessionSignals::default();
        assert_eq!(signals.get(), Signals::default());
        signals.session_started(Duration::from_secs(10));
        signals.clone().heartbeat_acked(-1500, 20);
        let got = signals.get();
        assert_eq!(got.heartbeat_interval, Some(Duration::from_secs(10)));
        assert_eq!(got.skew_ms, Some(-1500));
        assert!(got.last_ack.is_some());
    }
}
