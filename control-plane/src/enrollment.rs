//! Enrollment tokens and failures: minting a token ([`new_token`]),
//! hashing it for storage ([`token_hash`]), issuing one into the store
//! ([`issue`]), and the per-source failure log that rate-limits and audits
//! failed redemptions ([`FailureLog`]). The gateway redeems tokens
//! (`gateway::enrollment`); the API and provisioning mint them here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tether_protocol::EnrollRejection;
use uuid::Uuid;

use crate::store::{Labels, NewEnrollmentToken, Store, StoreError};

/// Hash under which an enrollment token is stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh enrollment token (256 random bits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "tet_enr_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Creates and stores a token; returns it in clear (the only time it exists
/// in clear on the control plane) with its record.
pub async fn issue(
    store: &dyn Store,
    organization_id: Uuid,
    labels: Labels,
    server_name: Option<String>,
    ttl_seconds: i64,
) -> Result<(String, NewEnrollmentToken), StoreError> {
    let token = new_token();
    let now = Utc::now();
    let record = NewEnrollmentToken {
        id: Uuid::now_v7(),
        token_hash: token_hash(&token),
        organization_id,
        server_name,
        labels,
        deployment_id: None,
        created_at: now,
        expires_at: now + chrono::Duration::seconds(ttl_seconds),
    };
    store.create_enrollment_token(&record).await?;
    Ok((token, record))
}

pub(crate) fn reason_code(rejection: &EnrollRejection) -> &'static str {
    match rejection {
        EnrollRejection::UnknownToken => "unknown_token",
        EnrollRejection::ExpiredToken => "expired_token",
        EnrollRejection::TokenAlreadyUsed => "token_already_used",
        EnrollRejection::InvalidCsr(_) => "invalid_csr",
        EnrollRejection::QuotaExceeded(_) => "quota_exceeded",
        EnrollRejection::Internal => "internal",
        EnrollRejection::RateLimited { .. } => "rate_limited",
        EnrollRejection::OrganizationDeleted => "organization_deleted",
    }
}

/// Sources tracked at most; past it, new sources share one window (their
/// failures are still counted and audited, under no address).
const MAX_SOURCES: usize = 65_536;

/// One source's failures in its current window.
#[derive(Debug)]
pub struct FailureWindow {
    pub started: Instant,
    pub started_at: chrono::DateTime<Utc>,
    pub failures: u32,
    pub reasons: BTreeMap<&'static str, u32>,
}

/// Failed enrollments per source address: what rate-limits them, and what
/// the audit log gets (one row per source and window, written when the
/// window ends, or at shutdown). Per replica.
#[derive(Debug)]
pub struct FailureLog {
    limit: u32,
    pub window: Duration,
    sources: Mutex<Sources>,
}

#[derive(Debug, Default)]
struct Sources {
    open: HashMap<Option<IpAddr>, FailureWindow>,
    /// Windows that ended, waiting for their audit row.
    ended: Vec<(Option<IpAddr>, FailureWindow)>,
}

impl FailureLog {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit: limit.max(1),
            window,
            sources: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds `source` must wait when it has used up its failures in its
    /// current window; `None` when it may try.
    pub fn refusal(&self, source: IpAddr, now: Instant) -> Option<u64> {
        let sources = self.lock();
        let window = sources.open.get(&Some(source))?;
        let elapsed = now.saturating_duration_since(window.started);
        (window.failures >= self.limit && elapsed < self.window)
            .then(|| self.window.saturating_sub(elapsed).as_secs().max(1))
    }

    /// Counts one failure of `source`.
    pub fn record(&self, source: IpAddr, rejection: &EnrollRejection, now: Instant) {
        let mut sources = self.lock();
        let key = if sources.open.len() < MAX_SOURCES || sources.open.contains_key(&Some(source)) {
            Some(source)
        } else {
            None
        };
        let expired = sources
            .open
            .get(&key)
            .is_some_and(|w| now.saturating_duration_since(w.started) >= self.window);
        if expired {
            if let Some(ended) = sources.open.remove(&key) {
                sources.ended.push((key, ended));
            }
        }
        let window = sources.open.entry(key).or_insert_with(|| FailureWindow {
            started: now,
            started_at: Utc::now(),
            failures: 0,
            reasons: BTreeMap::new(),
        });
        window.failures = window.failures.saturating_add(1);
        *window.reasons.entry(reason_code(rejection)).or_default() += 1;
    }

    /// Removes the windows that ended by `now` (all of them when `all`).
    pub fn take_ended(&self, now: Instant, all: bool) -> Vec<(Option<IpAddr>, FailureWindow)> {
        let mut sources = self.lock();
        let expired: Vec<Option<IpAddr>> = sources
            .open
            .iter()
            .filter(|(_, w)| all || now.saturating_duration_since(w.started) >= self.window)
            .map(|(source, _)| *source)
            .collect();
        let mut ended = std::mem::take(&mut sources.ended);
        for source in expired {
            if let Some(window) = sources.open.remove(&source) {
                ended.push((source, window));
            }
        }
        ended
    }
}
