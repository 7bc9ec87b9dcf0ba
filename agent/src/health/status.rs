//! The status of one check over its runs, with Docker `HEALTHCHECK`
//! semantics: `Starting` until the first success; failures during the start
//! period do not count (and a success ends the start period early); after
//! it, `retries` consecutive failures (at least one) make the check
//! `Failing`; one success makes it `Passing` and resets the count.
//! [`Probe::Pending`] leaves everything as it was.

use std::time::Duration;

use tether_protocol::HealthStatus;
use tokio::time::Instant;

use super::Probe;

/// One check's state.
#[derive(Debug, Clone)]
pub struct Tracker {
    retries: u32,
    start_period: Duration,
    created: Instant,
    started: bool,
    status: HealthStatus,
    failures: u32,
}

impl Tracker {
    /// A check created at `now`.
    pub fn new(retries: u32, start_period: Duration, now: Instant) -> Self {
        Self {
            retries: retries.max(1),
            start_period,
            created: now,
            started: false,
            status: HealthStatus::Starting,
            failures: 0,
        }
    }

    /// Takes the result of a run that ended at `now`.
    pub fn record(&mut self, probe: &Probe, now: Instant) {
        match probe {
            Probe::Pass(_) => {
                self.started = true;
                self.status = HealthStatus::Passing;
                self.failures = 0;
            }
            Probe::Fail(_) => {
                let in_start_period = !self.started
                    && now.saturating_duration_since(self.created) < self.start_period;
                if in_start_period {
                    return;
                }
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.retries {
                    self.status = HealthStatus::Failing;
                }
            }
            Probe::Pending(_) => {}
        }
    }

    pub fn status(&self) -> HealthStatus {
        self.status
    }

    /// Failed runs in a row that counted.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> Probe {
        Probe::Pass(String::new())
    }

    fn fail() -> Probe {
        Probe::Fail(String::new())
    }

    #[test]
    fn starting_until_first_success_then_failing_after_retries() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(3, Duration::ZERO, t0);
        assert_eq!(tracker.status(), HealthStatus::Starting);
        tracker.record(&fail(), t0);
        tracker.record(&fail(), t0);
        assert_eq!(tracker.status(), HealthStatus::Starting);
        assert_eq!(tracker.failures(), 2);
        tracker.record(&pass(), t0);
        assert_eq!(tracker.status(), HealthStatus::Passing);
        assert_eq!(tracker.failures(), 0);
        tracker.record(&fail(), t0);
        tracker.record(&fail(), t0);
        assert_eq!(tracker.status(), HealthStatus::Passing);
        tracker.record(&fail(), t0);
        assert_eq!(tracker.status(), HealthStatus::Failing);
        assert_eq!(tracker.failures(), 3);
        tracker.record(&pass(), t0);
        assert_eq!(tracker.status(), HealthStatus::Passing);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(1, Duration::from_secs(60), t0);
        tracker.record(&fail(), t0 + Duration::from_secs(30));
        assert_eq!(tracker.status(), HealthStatus::Starting);
        assert_eq!(tracker.failures(), 0);
        tracker.record(&fail(), t0 + Duration::from_secs(61));
        assert_eq!(tracker.status(), HealthStatus::Failing);
        assert_eq!(tracker.failures(), 1);
    }

    #[test]
    fn a_success_ends_the_start_period_early() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(0, Duration::from_secs(60), t0);
        tracker.record(&pass(), t0);
        tracker.record(&fail(), t0 + Duration::from_secs(1));
        assert_eq!(
            tracker.status(),
            HealthStatus::Failing,
            "retries 0 counts as 1"
        );
    }

    #[test]
    fn pending_changes_nothing() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(1, Duration::ZERO, t0);
        tracker.record(&Probe::Pending("no data".into()), t0);
        assert_eq!(tracker.status(), HealthStatus::Starting);
        assert_eq!(tracker.failures(), 0);
    }
}
