//! Per-token rate limits on `/api/v1` and `/metrics/fleet` (per source IP
//! for requests without a valid token): a fixed one-minute window per key,
//! with the limit chosen by tier (`--api-rate-limit`, and
//! `--api-rate-limit-admin` for admin tokens). `/agent/download` has its
//! own per-source-IP limit (`--download-rate-limit`).
//! Every response carries `X-RateLimit-Limit/Remaining/Reset`; past the limit
//! the answer is 429 `rate_limit_exceeded` with `Retry-After`.
//! Counters are per replica.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::auth::Scope;
use crate::context::ControlPlane;

pub use crate::rate_limit::{Decision, RateLimiter};

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

fn source_ip(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
        .unwrap_or_default()
}

/// The middleware of `/agent/download`: per source IP.
pub async fn enforce_download(
    State(cp): State<Arc<ControlPlane>>,
    request: Request,
    next: Next,
) -> Response {
    let key = format!("download:{}", source_ip(&request));
    limited(&cp, &key, cp.config.download_rate_limit, request, next).await
}

/// The middleware of `/api/v1` and `/metrics/fleet`.
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
        None => (
            format!("ip:{}", source_ip(&request)),
            cp.config.api_rate_limit,
        ),
    };
    limited(&cp, &key, limit, request, next).await
}

/// Counts `request` under `key` and runs it, or answers 429.
async fn limited(
    cp: &ControlPlane,
    key: &str,
    limit: u32,
    request: Request,
    next: Next,
) -> Response {
    let decision = cp.rate_limiter.hit(key, limit, Instant::now());
    let mut response = if decision.allowed {
        next.run(request).await
    } else {
        let mut response = ApiError::new(
            crate::api::error::ErrorCode::RateLimitExceeded,
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
