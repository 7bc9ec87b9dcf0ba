//! Webhook events of the control plane: [`emit`] turns an event into one
//! persisted delivery per subscribed webhook (of the event's organization
//! and its ancestors) and hands the event to the alert engine; the
//! [`delivery_loop`] claims due deliveries and POSTs them, signed
//! `X-Tether-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>`, with a
//! timeout and no redirects, retrying with exponential backoff
//! ([`retry_delay`]) up to [`MAX_ATTEMPTS`]; every attempt is recorded.
//! [`check_target`] refuses URLs whose host is, or resolves to, anything
//! but a public unicast address ([`AddressClass`]; loopback and private
//! receivers only with `--allow-private-webhooks`) and URLs of this control
//! plane's own listeners (always). It runs when a webhook is created and
//! again before every attempt, and the attempt connects to the addresses
//! that check resolved ([`pinned_client`]), so a name re-pointed after the
//! check (DNS rebinding) is not followed. Secrets are sealed at rest and
//! never logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::Instrument;
use uuid::Uuid;

use crate::context::ControlPlane;
use crate::store::{
    webhook_secret_context, AttemptOutcome, Delivery, DeliveryAttempt, NewDelivery, Webhook,
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
    "infrastructure.approval.requested",
    "infrastructure.approval.approved",
    "infrastructure.approval.rejected",
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
pub async fn enqueue(
    cp: &ControlPlane,
    organization_id: Uuid,
    event: &str,
    data: serde_json::Value,
) {
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
    if cp.config.allow_private_webhooks {
        tracing::warn!(
            "webhooks may reach loopback and private addresses (--allow-private-webhooks)"
        );
    }
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
                    deliver(&cp, delivery).instrument(span)
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
async fn deliver(cp: &ControlPlane, delivery: Delivery) {
    let attempt = delivery.attempts + 1;
    let started = Instant::now();
    let at = Utc::now();
    let result = match cp.store.webhook_by_id(delivery.webhook_id).await {
        Ok(Some(webhook)) => send(cp, &webhook, &delivery, attempt).await,
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
    webhook: &Webhook,
    delivery: &Delivery,
    attempt: i64,
) -> Result<u16, (Option<u16>, String, bool)> {
    // Names can change what they resolve to: check the target again, and
    // connect to the addresses just checked (no second resolution).
    let target = check_target(&webhook.url, &TargetPolicy::of(cp))
        .await
        .map_err(|e| {
            (
                None,
                format!("refused ({}): {e}", e.code()),
                e.is_permanent(),
            )
        })?;
    let client = pinned_client(&target).map_err(|e| {
        tracing::warn!(error = %e, "cannot build the webhook HTTP client");
        (None, "cannot build the HTTP client".to_string(), false)
    })?;
    let secret = cp
        .sealer
        .open(&webhook.secret_sealed, &webhook_secret_context(webhook.id))
        .map_err(|_| (None, "cannot open the webhook secret".to_string(), true))?;
    let signature = sign(&secret, delivery.body.as_bytes());
    let response = client
        .post(target.url)
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
    /// The host is, or resolves to, an address webhooks may not reach. The
    /// text names the class only (never the address), so it can be
    /// recorded as a delivery's reason.
    #[error("url resolves to {} address, which webhooks may not reach{}", .0.described(), .0.hint())]
    ForbiddenAddress(AddressClass),
}

impl TargetError {
    /// Machine-readable reason, the `reason` of the API's 422 answer.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidUrl => "invalid_url",
            Self::Scheme => "unsupported_scheme",
            Self::NoHost => "no_host",
            Self::Credentials => "credentials_in_url",
            Self::Unresolvable => "unresolvable_host",
            Self::OwnListener => "own_listener",
            Self::ForbiddenAddress(class) => class.code(),
        }
    }

    /// Whether a delivery refused for this reason should not be retried.
    fn is_permanent(&self) -> bool {
        matches!(self, Self::OwnListener | Self::ForbiddenAddress(_))
    }
}

/// Addresses webhooks do not reach: everything that is not a public
/// unicast address. `--allow-private-webhooks` lifts the refusal of
/// [`Loopback`](Self::Loopback), [`Private`](Self::Private) and
/// [`UniqueLocal`](Self::UniqueLocal) only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// 127/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, and 100.64/10 (carrier-grade NAT).
    Private,
    /// fc00::/7.
    UniqueLocal,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// Cloud instance metadata services (169.254.169.254, 169.254.170.2,
    /// 100.100.100.200, fd00:ec2::254).
    Metadata,
    /// 0/8, ::.
    Unspecified,
    /// 224/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// Other special-purpose ranges: 192.0.0/24, documentation ranges,
    /// 198.18/15 (benchmarking), 240/4, and IPv6 ranges other than 2000::/3.
    Reserved,
}

impl AddressClass {
    pub fn code(self) -> &'static str {
        match self {
            Self::Loopback => "loopback_address",
            Self::Private => "private_address",
            Self::UniqueLocal => "unique_local_address",
            Self::LinkLocal => "link_local_address",
            Self::Metadata => "metadata_address",
            Self::Unspecified => "unspecified_address",
            Self::Multicast => "multicast_address",
            Self::Broadcast => "broadcast_address",
            Self::Reserved => "reserved_address",
        }
    }

    fn described(self) -> &'static str {
        match self {
            Self::Loopback => "a loopback",
            Self::Private => "a private",
            Self::UniqueLocal => "a unique-local",
            Self::LinkLocal => "a link-local",
            Self::Metadata => "a cloud metadata",
            Self::Unspecified => "an unspecified",
            Self::Multicast => "a multicast",
            Self::Broadcast => "a broadcast",
            Self::Reserved => "a reserved",
        }
    }

    fn hint(self) -> &'static str {
        if self.allowed_by_flag() {
            " (the operator may allow it with --allow-private-webhooks)"
        } else {
            ""
        }
    }

    /// Whether `--allow-private-webhooks` lets webhooks reach it.
    pub fn allowed_by_flag(self) -> bool {
        matches!(self, Self::Loopback | Self::Private | Self::UniqueLocal)
    }

    /// The class of `ip`, `None` for a public unicast address. IPv4 written
    /// as IPv6 (`::ffff:a.b.c.d`, `::a.b.c.d`, `64:ff9b::a.b.c.d`) is
    /// judged as the IPv4 address it carries.
    pub fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(v4) => Self::of_v4(v4),
            IpAddr::V6(v6) => Self::of_v6(v6),
        }
    }

    fn of_v4(ip: std::net::Ipv4Addr) -> Option<Self> {
        let [a, b, c, d] = ip.octets();
        Some(match (a, b, c, d) {
            (169, 254, 169, 254) | (169, 254, 170, 2) | (100, 100, 100, 200) => Self::Metadata,
            (0, ..) => Self::Unspecified,
            (127, ..) => Self::Loopback,
            (10, ..) | (192, 168, ..) => Self::Private,
            (172, b, ..) if (16..=31).contains(&b) => Self::Private,
            (100, b, ..) if (64..=127).contains(&b) => Self::Private,
            (169, 254, ..) => Self::LinkLocal,
            (255, 255, 255, 255) => Self::Broadcast,
            (224..=239, ..) => Self::Multicast,
            (192, 0, 0, _) | (192, 0, 2, _) | (198, 51, 100, _) | (203, 0, 113, _) => {
                Self::Reserved
            }
            (198, 18..=19, ..) | (240..=255, ..) => Self::Reserved,
            _ => return None,
        })
    }

    fn of_v6(ip: std::net::Ipv6Addr) -> Option<Self> {
        let segments = ip.segments();
        if let Some(v4) = ip.to_ipv4_mapped() {
            return Self::of_v4(v4);
        }
        if ip.is_unspecified() {
            return Some(Self::Unspecified);
        }
        if ip.is_loopback() {
            return Some(Self::Loopback);
        }
        let octets = ip.octets();
        let embedded_v4 = std::net::Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
        // ::a.b.c.d (IPv4-compatible) and 64:ff9b::a.b.c.d (NAT64).
        if segments[..6] == [0, 0, 0, 0, 0, 0] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
            return Some(Self::of_v4(embedded_v4).unwrap_or(Self::Reserved));
        }
        if ip == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
            return Some(Self::Metadata);
        }
        Some(match segments[0] {
            s if s & 0xfe00 == 0xfc00 => Self::UniqueLocal,
            s if s & 0xffc0 == 0xfe80 => Self::LinkLocal,
            s if s & 0xff00 == 0xff00 => Self::Multicast,
            // 2001:db8::/32 is documentation.
            0x2001 if segments[1] == 0x0db8 => Self::Reserved,
            // 2002::/16 (6to4) carries an IPv4 address in bits 16-47.
            0x2002 => {
                let [hi, lo] = [segments[1], segments[2]];
                let v4 =
                    std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
                return Self::of_v4(v4);
            }
            s if s & 0xe000 == 0x2000 => return None,
            _ => Self::Reserved,
        })
    }
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

/// What webhook URLs may reach: never this control plane's own listeners;
/// loopback and private addresses only when `allow_private`.
#[derive(Debug, Clone)]
pub struct TargetPolicy {
    pub own: OwnListeners,
    /// `--allow-private-webhooks`.
    pub allow_private: bool,
}

impl TargetPolicy {
    pub fn of(cp: &ControlPlane) -> Self {
        Self {
            own: OwnListeners::of(cp),
            allow_private: cp.config.allow_private_webhooks,
        }
    }

    /// Refuses `ip` when its class is not allowed.
    fn admit(&self, ip: IpAddr) -> Result<(), TargetError> {
        match AddressClass::of(ip) {
            Some(class) if !(self.allow_private && class.allowed_by_flag()) => {
                Err(TargetError::ForbiddenAddress(class))
            }
            _ => Ok(()),
        }
    }
}

/// A webhook URL that passed [`check_target`], with the addresses its host
/// resolved to then: deliveries connect to exactly these.
#[derive(Debug, Clone)]
pub struct CheckedTarget {
    pub url: reqwest::Url,
    pub addrs: Vec<SocketAddr>,
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
    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
    ips.dedup();
    if ips.is_empty() {
        Err(TargetError::Unresolvable)
    } else {
        Ok(ips)
    }
}

/// Checks a webhook URL: absolute http(s), a host that resolves, no
/// credentials; every address the host resolves to is public unicast (or,
/// with `allow_private`, loopback or private), and none is this control
/// plane's own API or QUIC listener (same port on a loopback, unspecified
/// or local address, or on one of the configured public addresses).
/// One refused address refuses the URL.
pub async fn check_target(url: &str, policy: &TargetPolicy) -> Result<CheckedTarget, TargetError> {
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
    let own = &policy.own;
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
    for ip in &ips {
        policy.admit(*ip)?;
    }
    Ok(CheckedTarget {
        url: parsed,
        addrs: ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
    })
}

/// A resolver that answers only `host`, with the addresses checked for it,
/// and refuses every other name: a client using it connects where the
/// check said, whatever DNS says by then.
#[derive(Debug, Clone)]
pub struct PinnedResolver {
    host: String,
    addrs: Vec<SocketAddr>,
}

impl PinnedResolver {
    pub fn new(target: &CheckedTarget) -> Self {
        Self {
            host: target
                .url
                .host_str()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            addrs: target.addrs.clone(),
        }
    }
}

/// A name [`PinnedResolver`] was not pinned to.
#[derive(Debug, thiserror::Error)]
#[error("the webhook client resolves only the checked host")]
struct NotPinned;

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let answer: Result<reqwest::dns::Addrs, Box<dyn std::error::Error + Send + Sync>> =
            if name.as_str().eq_ignore_ascii_case(&self.host) {
                Ok(Box::new(self.addrs.clone().into_iter()))
            } else {
                Err(Box::new(NotPinned))
            };
        Box::pin(std::future::ready(answer))
    }
}

/// The client of one attempt: it connects only to `target`'s checked
/// addresses (no DNS, no proxy), follows no redirect and gives up after
/// [`DELIVERY_TIMEOUT`].
pub fn pinned_client(target: &CheckedTarget) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(PinnedResolver::new(target)))
        .user_agent(concat!("tether-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
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

    fn policy(allow_private: bool) -> TargetPolicy {
        TargetPolicy {
            own: OwnListeners {
                bound: vec![
                    "127.0.0.1:8080".parse().unwrap(),
                    "0.0.0.0:7443".parse().unwrap(),
                ],
                public: vec![("cp.example.invalid".into(), 443)],
            },
            allow_private,
        }
    }

    #[tokio::test]
    async fn targets_on_own_ports_of_local_addresses_are_refused_even_when_private_ones_are_allowed(
    ) {
        let own = policy(true);
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

    #[test]
    fn addresses_are_classified_including_ipv4_written_as_ipv6() {
        use AddressClass::*;
        let cases: &[(&str, Option<AddressClass>)] = &[
            ("127.0.0.1", Some(Loopback)),
            ("127.9.9.9", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(Private)),
            ("100.127.255.254", Some(Private)),
            ("169.254.169.254", Some(Metadata)),
            ("169.254.170.2", Some(Metadata)),
            ("100.100.100.200", Some(Metadata)),
            ("fd00:ec2::254", Some(Metadata)),
            ("169.254.1.1", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("fc00::1", Some(UniqueLocal)),
            ("fdff::1", Some(UniqueLocal)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("224.0.0.1", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            ("192.0.2.1", Some(Reserved)),
            ("2001:db8::1", Some(Reserved)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(Metadata)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::127.0.0.1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(Metadata)),
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:0a00:1::", Some(Private)),
            ("8.8.8.8", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("::ffff:8.8.8.8", None),
            ("2606:4700::1111", None),
        ];
        for (ip, class) in cases {
            assert_eq!(AddressClass::of(ip.parse().unwrap()), *class, "{ip}");
        }
    }

    #[tokio::test]
    async fn loopback_private_and_metadata_targets_are_refused_with_their_reason() {
        let strict = policy(false);
        for (url, code) in [
            ("http://127.0.0.1:9999/hook", "loopback_address"),
            ("http://localhost:9999/hook", "loopback_address"),
            ("http://[::ffff:127.0.0.1]:9999/", "loopback_address"),
            (
                "http://169.254.169.254/latest/meta-data/",
                "metadata_address",
            ),
            ("http://[fd00:ec2::254]/", "metadata_address"),
            ("http://10.0.0.1/", "private_address"),
            ("http://100.64.1.1/", "private_address"),
            ("http://[fc00::1]/", "unique_local_address"),
            ("http://169.254.1.1/", "link_local_address"),
            ("http://0.0.0.0:9999/", "unspecified_address"),
            ("http://224.0.0.1/", "multicast_address"),
            ("http://255.255.255.255/", "broadcast_address"),
        ] {
            match check_target(url, &strict).await {
                Err(e) => assert_eq!(e.code(), code, "{url}: {e}"),
                Ok(_) => panic!("{url} was accepted"),
            }
        }
        // The operator's flag lets loopback and private receivers in, not
        // metadata or link-local ones.
        let lenient = policy(true);
        for url in [
            "http://127.0.0.1:9999/hook",
            "http://10.0.0.1/",
            "http://[fc00::1]/",
        ] {
            assert!(check_target(url, &lenient).await.is_ok(), "{url}");
        }
        for url in [
            "http://169.254.169.254/",
            "http://169.254.1.1/",
            "http://[ff02::1]/",
        ] {
            assert!(check_target(url, &lenient).await.is_err(), "{url}");
        }
        // Public addresses pass, and the check records what it resolved.
        let public = check_target("https://8.8.8.8:8443/hook", &strict)
            .await
            .unwrap();
        assert_eq!(public.addrs, vec!["8.8.8.8:8443".parse().unwrap()]);
    }

    /// Serves one HTTP request on `listener` with 204; returns what it read.
    async fn answer_once(listener: tokio::net::TcpListener) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&request).into_owned()
    }

    #[tokio::test]
    async fn an_attempt_connects_to_the_checked_address_not_to_what_dns_says_now() {
        // The receiver listens on 127.0.0.2 only; `localhost` resolves to
        // 127.0.0.1 (and ::1), where nothing listens on that port. A client
        // that resolved the name again would be refused a connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(answer_once(listener));
        let target = CheckedTarget {
            url: reqwest::Url::parse(&format!("http://localhost:{port}/hook")).unwrap(),
            addrs: vec![SocketAddr::from(([127, 0, 0, 2], port))],
        };
        let client = pinned_client(&target).unwrap();
        let response = client
            .post(target.url.clone())
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 204);
        let request = served.await.unwrap();
        assert!(request.starts_with("POST /hook "), "{request}");

        // Any other name is not resolved at all.
        let other = client
            .post(format!("http://127-0-0-2.example.invalid:{port}/hook"))
            .send()
            .await
            .unwrap_err();
        assert!(other.is_connect() || other.is_request(), "{other:?}");
    }
}
