//! Enrollment: the only thing a connection without a client certificate may
//! do. One bidirectional stream, one `Enroll` frame, one answer; anything
//! else closes the connection.
//!
//! What a bogus attempt costs is bounded: the token is looked up before the
//! CSR is signed; a source address with `--enroll-failure-limit` failures in
//! the current `--enroll-failure-window` is refused (`RateLimited`) before
//! anything else; and failures are written to the audit log once per source
//! and window, with their count ([`FailureLog`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tether_protocol::{
    classify_first_message, AgentMessage, CloseCode, ControlMessage, EnrollRejection,
    EnrollRequest, EnrollmentGrant, PeerKind,
};
use uuid::Uuid;

use crate::context::ControlPlane;
use crate::enrollment::token_hash;
use crate::store::{AuditEntry, Enrollment, EnrollmentRefusal};

/// Serves an unauthenticated connection.
pub async fn serve(connection: quinn::Connection, cp: Arc<ControlPlane>) {
    let Some((mut stream, message)) =
        super::first_stream(&connection, "unauthenticated connection").await
    else {
        return;
    };
    if let Err(violation) = classify_first_message(PeerKind::Unauthenticated, &message) {
        tracing::warn!(%violation, "closing unauthenticated connection");
        tether_transport::close(&connection, violation.close_code());
        return;
    }
    let AgentMessage::Enroll(request) = message else {
        tether_transport::close(&connection, CloseCode::ProtocolViolation);
        return;
    };
    let answer = match enroll(&cp, &request, connection.remote_address()).await {
        Ok(grant) => ControlMessage::Enrolled(grant),
        Err(rejection) => ControlMessage::EnrollRejected(rejection),
    };
    if let Err(e) = stream.send(&answer).await {
        tracing::warn!(error = %e, "could not deliver the enrollment answer");
    }
    let _ = stream.finish();
    // Let the agent read the answer and close; then close anyway.
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    tether_transport::close(&connection, CloseCode::Normal);
}

async fn enroll(
    cp: &ControlPlane,
    request: &EnrollRequest,
    remote: std::net::SocketAddr,
) -> Result<EnrollmentGrant, EnrollRejection> {
    let source = remote.ip();
    if let Some(retry_after_secs) = cp.enroll_failures.refusal(source, Instant::now()) {
        let rejection = EnrollRejection::RateLimited { retry_after_secs };
        tracing::debug!(%source, "enrollment refused: too many failures from this address");
        cp.enroll_failures
            .record(source, &rejection, Instant::now());
        return Err(rejection);
    }
    let result = enroll_checked(cp, request, remote).await;
    if let Err(rejection) = &result {
        if *rejection != EnrollRejection::Internal {
            cp.enroll_failures.record(source, rejection, Instant::now());
        }
    }
    result
}

/// The enrollment proper: token first, then the CSR, then the transaction
/// that redeems the token.
async fn enroll_checked(
    cp: &ControlPlane,
    request: &EnrollRequest,
    remote: std::net::SocketAddr,
) -> Result<EnrollmentGrant, EnrollRejection> {
    let server_id = Uuid::now_v7();
    let span = tracing::info_span!("enroll", %server_id, hostname = %request.facts.hostname);
    let token_hash = token_hash(&request.token);
    let precheck = cp
        .store
        .enrollment_token_refusal(&token_hash, Utc::now())
        .await
        .map_err(|e| {
            tracing::error!(parent: &span, error = %e, "enrollment token lookup failed in the store");
            EnrollRejection::Internal
        })?;
    if let Some(refusal) = precheck {
        let rejection = rejection_of(refusal);
        tracing::warn!(parent: &span, reason = %rejection, "enrollment refused");
        return Err(rejection);
    }
    let _guard = span.enter();
    let signed = cp
        .pki
        .sign_agent(&request.csr_der, server_id)
        .map_err(|e| EnrollRejection::InvalidCsr(e.to_string()))?;
    let now = Utc::now();
    let enrollment = Enrollment {
        token_hash,
        server_id,
        hostname: request.facts.hostname.clone(),
        agent_version: request.facts.agent_version.clone(),
        facts: serde_json::to_value(FactsView::from(&request.facts)).unwrap_or_default(),
        certificate: signed.record,
        at: now,
    };
    drop(_guard);
    let outcome = cp.store.enroll(&enrollment).await.map_err(|e| {
        tracing::error!(%server_id, error = %e, "enrollment failed in the store");
        EnrollRejection::Internal
    })?;
    match outcome {
        Ok(server) => {
            tracing::info!(%server_id, name = %server.name, "agent enrolled");
            audit(
                cp,
                &format!("agent:{server_id}"),
                Some(server.organization_id),
                Some(server_id.to_string()),
                remote,
                "success",
            )
            .await;
            Ok(EnrollmentGrant {
                server_id: server_id.to_string(),
                branch_id: cp.instance.branch_id.to_string(),
                chain: signed.chain,
            })
        }
        Err(refusal) => {
            // The token was redeemed (or expired) since the look-up.
            let rejection = rejection_of(refusal);
            tracing::warn!(reason = %rejection, "enrollment refused");
            Err(rejection)
        }
    }
}

fn rejection_of(refusal: EnrollmentRefusal) -> EnrollRejection {
    match refusal {
        EnrollmentRefusal::UnknownToken => EnrollRejection::UnknownToken,
        EnrollmentRefusal::ExpiredToken => EnrollRejection::ExpiredToken,
        EnrollmentRefusal::TokenAlreadyUsed => EnrollRejection::TokenAlreadyUsed,
        EnrollmentRefusal::OrganizationDeleted => EnrollRejection::OrganizationDeleted,
        EnrollmentRefusal::QuotaExceeded {
            organization_id,
            resource,
            limit,
            usage,
        } => EnrollRejection::QuotaExceeded(format!(
            "{resource} quota of organization {organization_id} is {limit} and {usage} are in use"
        )),
    }
}

/// A rejection's name in the audit log.
/// Writes one audit row per source whose failure window ended, until
/// shutdown, then the rows of every open window.
pub async fn failure_audit_loop(cp: Arc<ControlPlane>) {
    let period =
        (cp.enroll_failures.window / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let all = tokio::select! {
            _ = cp.shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        for (source, window) in cp.enroll_failures.take_ended(Instant::now(), all) {
            let entry = AuditEntry {
                id: Uuid::now_v7(),
                at: Utc::now(),
                actor: "agent:unenrolled".into(),
                organization_id: None,
                action: "server.enroll".into(),
                target: None,
                source_ip: source.map(|ip| ip.to_string()),
                outcome: "refused".into(),
                detail: serde_json::json!({
                    "failures": window.failures,
                    "reasons": window.reasons,
                    "window_started_at": window.started_at,
                    "window_seconds": cp.enroll_failures.window.as_secs_f64(),
                }),
            };
            if let Err(e) = cp.store.append_audit(&entry).await {
                tracing::warn!(error = %e, "could not write the audit log");
            }
        }
        if all {
            return;
        }
    }
}

async fn audit(
    cp: &ControlPlane,
    actor: &str,
    organization_id: Option<Uuid>,
    target: Option<String>,
    remote: std::net::SocketAddr,
    outcome: &str,
) {
    let entry = AuditEntry {
        id: Uuid::now_v7(),
        at: Utc::now(),
        actor: actor.into(),
        organization_id,
        action: "server.enroll".into(),
        target,
        source_ip: Some(remote.ip().to_string()),
        outcome: outcome.into(),
        detail: serde_json::json!({}),
    };
    if let Err(e) = cp.store.append_audit(&entry).await {
        tracing::warn!(error = %e, "could not write the audit log");
    }
}

/// Host facts as stored and served.
#[derive(serde::Serialize)]
pub struct FactsView<'a> {
    pub hostname: &'a str,
    pub os: &'a str,
    pub arch: &'a str,
    pub kernel_version: Option<&'a str>,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub agent_version: &'a str,
}

impl<'a> From<&'a tether_protocol::HostFacts> for FactsView<'a> {
    fn from(f: &'a tether_protocol::HostFacts) -> Self {
        Self {
            hostname: &f.hostname,
            os: &f.os,
            arch: &f.arch,
            kernel_version: f.kernel_version.as_deref(),
            cpu_cores: f.cpu_cores,
            memory_bytes: f.memory_bytes,
            agent_version: &f.agent_version,
        }
    }
}
