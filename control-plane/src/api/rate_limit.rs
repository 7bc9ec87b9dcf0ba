//! Per-token rate limits on `/api/v1` (per source IP for requests without a
//! valid token): a fixed one-minute window per key, with the limit chosen by
//! tier (`--api-rate-limit`, and `--api-rate-limit-admin` for admin tokens).
//! Every response carries `X-RateLimit-Limit/Remaining/Reset`; past the limit
//! the answer is 429 `rate_limit_exceeded` with `Retry-After`.
//! Counters are per replica.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::app::ControlPlane;
use crate::auth::Scope;

const WINDOW: Duration = Duration::from_secs(60);
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

fn header(value: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&value.to_string()).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn add_headers(response: &mut Response, decision: Decision) {
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-ratelimit-limit"),
        header(decision.limit),
    );
    headers.insert(
        HeaderName::from_static("x-ratelimit-remaining"),
        header(decision.remaining),
    );
    headers.insert(
        HeaderName::from_static("x-ratelimit-reset"),
        header(decision.reset_after),
    );
}

/// The middleware.
pub async fn enforce(
    State(cp): State<Arc<ControlPlane>>,
    request: Request,
    next: Next,
) -> Response {
    let claims = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .and_then(|token| cp.tokens.verify(token.trim()).ok());
    let (key, limit) = match claims {
        Some(claims) if claims.scopes.contains(&Scope::Admin) => (
            format!("token:{}", claims.jti),
            cp.config.api_rate_limit_admin,
        ),
        Some(claims) => (format!("token:{}", claims.jti), cp.config.api_rate_limit),
        None => {
            let ip = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip().to_string())
                .unwrap_or_default();
            (format!("ip:{ip}"), cp.config.api_rate_limit)
        }
    };
    let decision = cp.rate_limiter.hit(&key, limit, Instant::now());
    let mut response = if decision.allowed {
        next.run(request).await
    } else {
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!(
                "more than {limit} requests in a minute; retry in {} s",
                decision.reset_after
            ),
        )
        .with_detail("retry_after_seconds", decision.reset_after)
        .into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            header(decision.reset_after),
        );
        response
    };
    add_headers(&mut response, decision);
    response
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
