//! Webhook events of the control plane: [`emit`] turns an event into one
//! persisted delivery per subscribed webhook (of the event's organization
//! and its ancestors) and hands the event to the alert engine; the
//! [`delivery_loop`] claims due deliveries and POSTs them, signed
//! `X-Tether-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>`, with a
//! timeout and no redirects, retrying with exponential backoff
//! ([`retry_delay`]) up to [`MAX_ATTEMPTS`]; every attempt is recorded.
//! [`check_target`] refuses URLs that point at this control plane's own
//! listeners. Secrets are sealed at rest and never logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::Instrument;
use uuid::Uuid;

use crate::app::ControlPlane;
use crate::store::{
    webhook_secret_context, AttemptOutcome, Delivery, DeliveryAttempt, Deployment, NewDelivery,
    Webhook,
};

/// Every event the control plane emits.
pub const EVENTS: &[&str] = &[
    "server.online",
    "server.offline",
    "health.failed",
    "health.recovered",
    "alert.firing",
    "alert.resolved",
    "infrastructure.provisioning.started",
    "infrastructure.provisioning.completed",
    "infrastructure.provisioning.failed",
    "infrastructure.destroying.started",
    "infrastructure.destroying.completed",
    "branch.healthy",
    "branch.unreachable",
];

/// Attempts of a delivery before it is `failed`.
pub const MAX_ATTEMPTS: i64 = 8;
/// How long one attempt may take.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts.
pub const MAX_RETRY_DELAY: chrono::Duration = chrono::Duration::minutes(5);
/// How long a worker holds a claimed delivery (longer than an attempt).
const LEASE: chrono::Duration = chrono::Duration::seconds(60);
/// How often the worker looks for due deliveries without being woken.
const POLL: Duration = Duration::from_millis(500);
/// Deliveries claimed (and sent concurrently) at once.
const BATCH: u32 = 16;
/// Longest error text recorded for an attempt.
const MAX_ERROR_CHARS: usize = 500;
/// How long finished deliveries (and their attempts) are kept.
pub const DELIVERY_RETENTION: chrono::Duration = chrono::Duration::days(30);
/// How often finished deliveries past retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Wait before the attempt after `attempts_made` failed ones: 1 s, 2 s,
/// 4 s... doubling, capped at [`MAX_RETRY_DELAY`].
pub fn retry_delay(attempts_made: i64) -> chrono::Duration {
    let exponent = attempts_made.clamp(1, 20) - 1;
    let seconds = 1i64 << exponent;
    chrono::Duration::seconds(seconds).min(MAX_RETRY_DELAY)
}

/// What a failed or successful attempt (number `attempt`, from 1) leads to.
pub fn outcome_of(attempt: i64, delivered: bool, at: DateTime<Utc>) -> AttemptOutcome {
    if delivered {
        AttemptOutcome::Delivered
    } else if attempt >= MAX_ATTEMPTS {
        AttemptOutcome::Failed
    } else {
        AttemptOutcome::RetryAt(at + retry_delay(attempt))
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`: the `X-Tether-Signature` header.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether a filter entry is an event name, `*`, or `<prefix>.*` naming
/// at least one event.
pub fn valid_event_pattern(pattern: &str) -> bool {
    if pattern == "*" || EVENTS.contains(&pattern) {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => EVENTS
            .iter()
            .any(|e| e.strip_prefix(prefix).is_some_and(|r| r.starts_with('.'))),
        None => false,
    }
}

/// Whether a webhook subscribed with `filter` wants `event` (empty is all).
pub fn event_matches(filter: &[String], event: &str) -> bool {
    filter.is_empty()
        || filter.iter().any(|pattern| {
            pattern == "*"
                || pattern == event
                || pattern
                    .strip_suffix(".*")
                    .and_then(|prefix| event.strip_prefix(prefix))
                    .is_some_and(|rest| rest.starts_with('.'))
        })
}

/// Emits `event` (e.g. `server.offline`) of `organization_id` with `data`
/// to the webhooks subscribed to it, and to the alert engine (offline and
/// health rules). Never blocks on HTTP and never fails the caller: errors
/// are logged.
pub async fn emit(cp: &ControlPlane, organization_id: Uuid, event: &str, data: serde_json::Value) {
    let follow_ups = crate::alerts::on_event(cp, organization_id, event, &data).await;
    enqueue(cp, organization_id, event, data).await;
    for (organization_id, event, data) in follow_ups {
        enqueue(cp, organization_id, event, data).await;
    }
}

/// Emits a deployment event (`infrastructure.*`) with the deployment's view.
pub async fn emit_deployment(cp: &ControlPlane, deployment: &Deployment, event: &str) {
    let data = serde_json::json!({
        "deployment_id": deployment.id,
        "status": deployment.status,
        "provider": deployment.provider,
        "server_name": deployment.record.server_name,
        "server_id": deployment.server_id,
        "error_message": deployment.record.error_message,
    });
    emit(cp, deployment.organization_id, event, data).await;
}

/// The body of a delivery: `{event, timestamp, organization_id, data}`.
pub fn delivery_body(
    event: &str,
    at: DateTime<Utc>,
    organization_id: Uuid,
    data: &serde_json::Value,
) -> String {
    serde_json::json!({
        "event": event,
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "organization_id": organization_id,
        "data": data,
    })
    .to_string()
}

/// Queues one delivery per webhook that wants `event`, then wakes the worker.
async fn enqueue(cp: &ControlPlane, organization_id: Uuid, event: &str, data: serde_json::Value) {
    tracing::info!(%organization_id, event, "event");
    let organizations = match cp.store.organization_ancestors(organization_id).await {
        Ok(orgs) => orgs.into_iter().map(|o| o.id).collect::<Vec<_>>(),
        Err(e) => {
            tracing::error!(%organization_id, event, error = %e, "could not look up the organization of an event; no webhook delivered");
            return;
        }
    };
    if organizations.is_empty() {
        return;
    }
    let webhooks = match cp.store.webhooks_of_organizations(&organizations).await {
        Ok(webhooks) => webhooks,
        Err(e) => {
            tracing::error!(%organization_id, event, error = %e, "could not list webhooks; event not delivered");
            return;
        }
    };
    let now = Utc::now();
    let body = delivery_body(event, now, organization_id, &data);
    let deliveries: Vec<NewDelivery> = webhooks
        .iter()
        .filter(|w| event_matches(&w.events, event))
        .map(|w| NewDelivery {
            id: Uuid::now_v7(),
            webhook_id: w.id,
            organization_id: w.organization_id,
            event: event.to_string(),
            body: body.clone(),
            created_at: now,
        })
        .collect();
    if deliveries.is_empty() {
        return;
    }
    match cp.store.enqueue_deliveries(&deliveries).await {
        Ok(()) => {
            tracing::debug!(
                event,
                deliveries = deliveries.len(),
                "webhook deliveries queued"
            );
            cp.webhook_wakeup.notify_one();
        }
        Err(e) => {
            tracing::error!(%organization_id, event, error = %e, "could not queue webhook deliveries")
        }
    }
}

/// Claims and sends due deliveries until shutdown.
pub async fn delivery_loop(cp: Arc<ControlPlane>) {
    let client = match reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tether-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks will not be delivered");
            return;
        }
    };
    let mut last_prune: Option<Instant> = None;
    loop {
        let now = Utc::now();
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(Instant::now());
            match cp.store.prune_deliveries(now - DELIVERY_RETENTION).await {
                Ok(0) => {}
                Ok(pruned) => {
                    tracing::info!(pruned, "finished webhook deliveries past retention removed")
                }
                Err(e) => tracing::warn!(error = %e, "could not prune webhook deliveries"),
            }
        }
        let claimed = cp
            .store
            .claim_deliveries(&cp.worker_id, now, now + LEASE, BATCH)
            .await;
        match claimed {
            Ok(batch) if !batch.is_empty() => {
                let full = batch.len() as u32 == BATCH;
                let sends = batch.into_iter().map(|delivery| {
                    let span = tracing::info_span!(
                        "webhook_delivery",
                        delivery_id = %delivery.id,
                        webhook_id = %delivery.webhook_id,
                        event = %delivery.event,
                        attempt = delivery.attempts + 1,
                    );
                    deliver(&cp, &client, delivery).instrument(span)
                });
                tokio::select! {
                    _ = cp.shutdown.cancelled() => return,
                    _ = futures::future::join_all(sends) => {}
                }
                if full {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not claim webhook deliveries"),
        }
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = cp.webhook_wakeup.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Makes one attempt of a claimed delivery and records it.
async fn deliver(cp: &ControlPlane, client: &reqwest::Client, delivery: Delivery) {
    let attempt = delivery.attempts + 1;
    let started = Instant::now();
    let at = Utc::now();
    let result = match cp.store.webhook_by_id(delivery.webhook_id).await {
        Ok(Some(webhook)) => send(cp, client, &webhook, &delivery, attempt).await,
        Ok(None) => Err((None, "the webhook was deleted".to_string(), true)),
        Err(e) => {
            tracing::warn!(error = %e, "could not load the webhook of a delivery");
            Err((
                None,
                "internal error loading the webhook".to_string(),
                false,
            ))
        }
    };
    let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let (status_code, error, outcome) = match result {
        Ok(status) => (Some(status), None, outcome_of(attempt, true, at)),
        Err((status, error, permanent)) => {
            let outcome = if permanent {
                AttemptOutcome::Failed
            } else {
                outcome_of(attempt, false, at)
            };
            (status, Some(error), outcome)
        }
    };
    match &outcome {
        AttemptOutcome::Delivered => {
            tracing::info!(status = ?status_code, duration_ms, "webhook delivered")
        }
        AttemptOutcome::RetryAt(next) => {
            tracing::info!(status = ?status_code, error = ?error, %next, "webhook attempt failed; will retry")
        }
        AttemptOutcome::Failed => {
            tracing::warn!(status = ?status_code, error = ?error, "webhook delivery failed for good")
        }
    }
    let record = DeliveryAttempt {
        delivery_id: delivery.id,
        attempt,
        at,
        status_code: status_code.map(i64::from),
        error,
        duration_ms,
    };
    match cp
        .store
        .record_delivery_attempt(&cp.worker_id, &record, outcome)
        .await
    {
        Ok(true) => {}
        Ok(false) => tracing::warn!("lost the lease of a delivery before recording its attempt"),
        Err(e) => tracing::error!(error = %e, "could not record a webhook attempt"),
    }
}

/// POSTs a delivery. `Ok(status)` on 2xx; otherwise the status (if any),
/// an error text and whether retrying is pointless.
async fn send(
    cp: &ControlPlane,
    client: &reqwest::Client,
    webhook: &Webhook,
    delivery: &Delivery,
    attempt: i64,
) -> Result<u16, (Option<u16>, String, bool)> {
    // Names can change what they resolve to: check the target again.
    let url = check_target(&webhook.url, &OwnListeners::of(cp))
        .await
        .map_err(|e| (None, e.to_string(), matches!(e, TargetError::OwnListener)))?;
    let secret = cp
        .sealer
        .open(&webhook.secret_sealed, &webhook_secret_context(webhook.id))
        .map_err(|_| (None, "cannot open the webhook secret".to_string(), true))?;
    let signature = sign(&secret, delivery.body.as_bytes());
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Tether-Signature", signature)
        .header("X-Tether-Event", &delivery.event)
        .header("X-Tether-Delivery", delivery.id.to_string())
        .header("X-Tether-Attempt", attempt.to_string())
        .body(delivery.body.clone())
        .send()
        .await
        .map_err(|e| (None, describe(&e), false))?;
    let status = response.status();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        Err((
            Some(status.as_u16()),
            format!("receiver answered {status}"),
            false,
        ))
    }
}

/// An HTTP error without its URL (which may carry credentials), bounded.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {}", error_chain(e));
    if text.chars().count() > MAX_ERROR_CHARS {
        text = text.chars().take(MAX_ERROR_CHARS).collect();
    }
    text
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    if parts.is_empty() {
        "no detail".into()
    } else {
        parts.join(": ")
    }
}

/// Why a webhook URL is refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("url is not a valid absolute URL")]
    InvalidUrl,
    #[error("url must use http or https")]
    Scheme,
    #[error("url must name a host")]
    NoHost,
    #[error("url must not carry a user name or password (sign with the secret instead)")]
    Credentials,
    #[error("the host of the url does not resolve")]
    Unresolvable,
    #[error("url points at this control plane's own API or QUIC listener")]
    OwnListener,
}

/// This control plane's listeners and public addresses, as webhook URLs
/// may not reach them.
#[derive(Debug, Clone)]
pub struct OwnListeners {
    /// Bound sockets (API, QUIC); an unspecified address means every local one.
    pub bound: Vec<SocketAddr>,
    /// Public `host:port`s (agents' QUIC address, public API URL).
    pub public: Vec<(String, u16)>,
}

impl OwnListeners {
    pub fn of(cp: &ControlPlane) -> Self {
        let mut public = Vec::new();
        if let Some((host, port)) = cp.public_quic_addr.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                public.push((
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    port,
                ));
            }
        }
        for url in [&cp.api_url, &cp.local_api_url] {
            if let Ok(url) = reqwest::Url::parse(url) {
                if let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) {
                    public.push((
                        host.trim_start_matches('[')
                            .trim_end_matches(']')
                            .to_string(),
                        port,
                    ));
                }
            }
        }
        Self {
            bound: vec![cp.addresses.api, cp.addresses.quic],
            public,
        }
    }
}

/// Whether `ip` belongs to this machine (binding to it succeeds only then).
fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

async fn resolve(host: &str, port: u16) -> Result<Vec<IpAddr>, TargetError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| TargetError::Unresolvable)?;
    let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
    if ips.is_empty() {
        Err(TargetError::Unresolvable)
    } else {
        Ok(ips)
    }
}

/// Checks a webhook URL: absolute http(s), a host that resolves, no
/// credentials, and not this control plane's own API or QUIC listener
/// (same port on a loopback, unspecified or local address, or on one of
/// the configured public addresses).
pub async fn check_target(url: &str, own: &OwnListeners) -> Result<reqwest::Url, TargetError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| TargetError::InvalidUrl)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(TargetError::Scheme);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(TargetError::Credentials);
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(TargetError::NoHost)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port_or_known_default().ok_or(TargetError::Scheme)?;
    if own
        .public
        .iter()
        .any(|(h, p)| *p == port && h.eq_ignore_ascii_case(&host))
    {
        return Err(TargetError::OwnListener);
    }
    let ips = resolve(&host, port).await?;
    for bound in &own.bound {
        if bound.port() != port {
            continue;
        }
        if ips
            .iter()
            .any(|ip| *ip == bound.ip() || is_local_address(*ip))
        {
            return Err(TargetError::OwnListener);
        }
    }
    for (public_host, public_port) in &own.public {
        if *public_port != port {
            continue;
        }
        if let Ok(public_ips) = resolve(public_host, *public_port).await {
            if ips.iter().any(|ip| public_ips.contains(ip)) {
                return Err(TargetError::OwnListener);
            }
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_from_one_second_and_are_capped() {
        let delays: Vec<i64> = (1..=10).map(|n| retry_delay(n).num_seconds()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
    }

    #[test]
    fn the_last_attempt_fails_the_delivery() {
        let at = Utc::now();
        assert_eq!(
            outcome_of(1, false, at),
            AttemptOutcome::RetryAt(at + chrono::Duration::seconds(1))
        );
        assert_eq!(outcome_of(MAX_ATTEMPTS, false, at), AttemptOutcome::Failed);
        assert_eq!(
            outcome_of(MAX_ATTEMPTS, true, at),
            AttemptOutcome::Delivered
        );
    }

    #[test]
    fn signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn event_filters_match_names_wildcards_and_prefixes() {
        let f = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(event_matches(&[], "server.online"));
        assert!(event_matches(&f(&["*"]), "alert.firing"));
        assert!(event_matches(&f(&["alert.firing"]), "alert.firing"));
        assert!(!event_matches(&f(&["alert.firing"]), "alert.resolved"));
        assert!(event_matches(
            &f(&["infrastructure.*"]),
            "infrastructure.provisioning.failed"
        ));
        assert!(!event_matches(
            &f(&["infra.*"]),
            "infrastructure.provisioning.failed"
        ));
        assert!(valid_event_pattern("infrastructure.provisioning.*"));
        assert!(!valid_event_pattern("server.exploded"));
        assert!(!valid_event_pattern("serv.*"));
    }

    #[tokio::test]
    async fn targets_on_own_ports_of_local_addresses_are_refused() {
        let own = OwnListeners {
            bound: vec![
                "127.0.0.1:8080".parse().unwrap(),
                "0.0.0.0:7443".parse().unwrap(),
            ],
            public: vec![("cp.example.invalid".into(), 443)],
        };
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://localhost:8080/",
            "http://[::1]:8080/",
            "https://127.0.0.2:7443/",
            "http://0.0.0.0:8080/",
            "https://cp.example.invalid/x",
        ] {
            assert!(
                matches!(check_target(url, &own).await, Err(TargetError::OwnListener)),
                "{url} was accepted"
            );
        }
        assert!(check_target("http://127.0.0.1:9999/hook", &own)
            .await
            .is_ok());
        assert!(matches!(
            check_target("ftp://127.0.0.1/x", &own).await,
            Err(TargetError::Scheme)
        ));
        assert!(matches!(
            check_target("http://user:pw@127.0.0.1:9999/", &own).await,
            Err(TargetError::Credentials)
        ));
        assert!(matches!(
            check_target("not a url", &own).await,
            Err(TargetError::InvalidUrl)
        ));
    }
}
