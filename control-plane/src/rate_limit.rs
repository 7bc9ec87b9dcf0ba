//! Fixed-window request counters ([`RateLimiter`]): the state behind the
//! API's per-token and per-address rate limits (`api::rate_limit` holds the
//! middleware). Counters are per replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Past this many keys, expired windows are dropped.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug)]
struct Window {
    started: Instant,
    count: u32,
}

/// The outcome of counting one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window resets.
    pub reset_after: u64,
}

/// Fixed-window request counters.
#[derive(Debug, Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<String, Window>>,
}

impl RateLimiter {
    /// Counts one request of `key` against `limit` per minute.
    pub fn hit(&self, key: &str, limit: u32, now: Instant) -> Decision {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() > PRUNE_ABOVE {
            windows.retain(|_, w| now.duration_since(w.started) < WINDOW);
        }
        let window = windows.entry(key.to_string()).or_insert(Window {
            started: now,
            count: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                count: 0,
            };
        }
        let allowed = window.count < limit;
        if allowed {
            window.count += 1;
        }
        let elapsed = now.duration_since(window.started);
        Decision {
            allowed,
            limit,
            remaining: limit.saturating_sub(window.count),
            reset_after: WINDOW.saturating_sub(elapsed).as_secs().max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_allows_the_limit_then_refuses_until_it_resets() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        for i in 0..3 {
            let d = limiter.hit("k", 3, t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, 2 - i);
        }
        let refused = limiter.hit("k", 3, t0 + Duration::from_secs(10));
        assert!(!refused.allowed);
        assert_eq!(refused.reset_after, 50);
        assert!(limiter.hit("other", 3, t0).allowed, "keys are independent");
        assert!(
            limiter.hit("k", 3, t0 + WINDOW).allowed,
            "a new window starts"
        );
    }
}
