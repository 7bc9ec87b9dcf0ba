//! When to dial again after a session ends: exponential backoff with jitter,
//! reset only by a healthy session, with a quick retry for orderly handovers.
//!
//! The base delay starts at 1 s and doubles up to 30 s; jitter adds 0-100 %
//! of it, so a delay is never above [`MAX_DELAY`] (60 s). A control plane that
//! accepts and immediately refuses (a revoked certificate) sees about six
//! attempts in the first minute and one a minute after that.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tether_protocol::CloseCode;

/// A session that got `Welcome` and lasted this long resets the backoff.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// No reconnect delay is longer than this.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

fn builder() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_max_delay(MAX_DELAY / 2)
        .with_jitter()
        .without_max_times()
}

/// How a connection attempt ended, as far as the backoff cares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// How long the session lasted after `Welcome`; `None` when it never got
    /// that far.
    pub established_for: Option<Duration>,
    /// The close code the control plane closed the connection with.
    pub close_code: Option<CloseCode>,
}

/// Decides the delay before each reconnection.
#[derive(Debug)]
pub struct ReconnectPolicy {
    backoff: <ExponentialBuilder as BackoffBuilder>::Backoff,
    /// A quick retry was granted since the last healthy session.
    quick_used: bool,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl ReconnectPolicy {
    pub fn new() -> Self {
        Self {
            backoff: builder().build(),
            quick_used: false,
        }
    }

    /// The delay before the next attempt, after an attempt that ended so.
    ///
    /// * A healthy session (welcomed, at least [`HEALTHY_SESSION`]) resets the
    ///   backoff, so losing it is retried after ~1 s.
    /// * A close with [`CloseCode::ShuttingDown`] or [`CloseCode::Superseded`]
    ///   is retried after ~1 s, once until the next healthy session: a peer
    ///   that keeps doing it gets the normal backoff.
    /// * Everything else (resolve, handshake, `HelloRejected`, revoked, a
    ///   short session) takes the next, longer, backoff step.
    pub fn next_delay(&mut self, outcome: Outcome) -> Duration {
        if outcome
            .established_for
            .is_some_and(|d| d >= HEALTHY_SESSION)
        {
            self.backoff = builder().build();
            self.quick_used = false;
        }
        let handover = matches!(
            outcome.close_code,
            Some(CloseCode::ShuttingDown | CloseCode::Superseded)
        );
        if handover && !self.quick_used {
            self.quick_used = true;
            return quick_delay();
        }
        self.backoff.next().unwrap_or(MAX_DELAY).min(MAX_DELAY)
    }
}

/// ~1 s plus jitter.
fn quick_delay() -> Duration {
    builder().build().next().unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn failure() -> Outcome {
        Outcome::default()
    }

    fn closed(code: CloseCode, after: Duration) -> Outcome {
        Outcome {
            established_for: Some(after),
            close_code: Some(code),
        }
    }

    #[test]
    fn delays_double_with_jitter_and_are_capped_at_a_minute() {
        let mut policy = ReconnectPolicy::new();
        let delays: Vec<Duration> = (0..12).map(|_| policy.next_delay(failure())).collect();
        for (step, delay) in delays.iter().enumerate() {
            let base = (SECOND * 2u32.pow(step as u32)).min(MAX_DELAY / 2);
            assert!(
                *delay >= base && *delay <= base * 2,
                "step {step}: {delay:?}"
            );
            assert!(*delay <= MAX_DELAY);
        }
        assert!(delays[5] >= Duration::from_secs(30));
    }

    #[test]
    fn revoked_server_gets_only_a_handful_of_attempts_per_minute() {
        let mut policy = ReconnectPolicy::new();
        let (mut elapsed, mut attempts) = (Duration::ZERO, 1);
        while elapsed < Duration::from_secs(60) {
            elapsed += policy.next_delay(closed(CloseCode::Revoked, Duration::ZERO));
            attempts += 1;
        }
        assert!(attempts <= 7, "{attempts} attempts in the first minute");
    }

    #[test]
    fn only_a_welcomed_session_of_ten_seconds_resets_the_backoff() {
        let mut policy = ReconnectPolicy::new();
        for _ in 0..6 {
            policy.next_delay(failure());
        }
        let short = policy.next_delay(Outcome {
            established_for: Some(Duration::from_secs(9)),
            close_code: None,
        });
        assert!(short >= Duration::from_secs(30), "{short:?}");
        let after_healthy = policy.next_delay(Outcome {
            established_for: Some(HEALTHY_SESSION),
            close_code: None,
        });
        assert!(after_healthy < 2 * SECOND, "{after_healthy:?}");
        assert!(policy.next_delay(failure()) >= 2 * SECOND);
    }

    #[test]
    fn shutting_down_or_superseded_retries_quickly_but_not_in_a_loop() {
        for code in [CloseCode::ShuttingDown, CloseCode::Superseded] {
            let mut policy = ReconnectPolicy::new();
            for _ in 0..6 {
                policy.next_delay(failure());
            }
            let quick = policy.next_delay(closed(code, Duration::ZERO));
            assert!(quick < 2 * SECOND, "{code:?}: {quick:?}");
            let again = policy.next_delay(closed(code, Duration::ZERO));
            assert!(again >= Duration::from_secs(30), "{code:?}: {again:?}");
            let after_healthy = policy.next_delay(closed(code, Duration::from_secs(600)));
            assert!(after_healthy < 2 * SECOND, "{code:?}: {after_healthy:?}");
        }
    }

    #[test]
    fn revoked_close_never_gets_the_quick_retry() {
        let mut policy = ReconnectPolicy::new();
        policy.next_delay(failure());
        let delay = policy.next_delay(closed(CloseCode::Revoked, Duration::from_secs(1)));
        assert!(delay >= 2 * SECOND, "{delay:?}");
    }
}
