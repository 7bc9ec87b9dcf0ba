//! Sessions of enrolled agents: admission (certificate known and not
//! revoked), the control stream (`Hello` -> `Welcome`, heartbeats), streams
//! the agent opens (metrics batches, health reports, certificate renewal),
//! and the end of the session.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use rustls_pki_types::CertificateDer;
use tether_certs::CertificateInfo;
use tether_protocol::{
    classify_first_message, negotiate_version, Ack, AgentConfig, AgentMessage,
    CertificateRenewalRequest, CloseCode, ControlMessage, HeartbeatAck, HelloRejection,
    MetricsBatch, MetricsStreamRules, PeerKind, RenewalRejection, StreamKind, Welcome,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tether_transport::ControlStream;
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use super::enrollment::FactsView;
use super::FIRST_FRAME_TIMEOUT;
use crate::context::ControlPlane;
use crate::store::health::ServerRef;
use crate::store::{ServerStatus, SessionAdmission};

/// Serves a connection that presented a client certificate of this CA.
pub async fn serve(
    connection: quinn::Connection,
    cert: CertificateDer<'static>,
    cp: Arc<ControlPlane>,
) {
    let Some((server_id, info)) = certificate_server(&connection, &cert, &cp) else {
        return;
    };
    // Held for the session's life otherwise, for every connected agent.
    drop(cert);
    run(connection, server_id, Box::new(info), cp)
        .instrument(tracing::info_span!("session", %server_id))
        .await;
}

/// The server a client certificate names, or `None` (the connection is
/// closed) when it names none of this branch's. Not async, so that nothing it
/// looks at takes room in the future every connected agent keeps.
fn certificate_server(
    connection: &quinn::Connection,
    cert: &CertificateDer<'static>,
    cp: &ControlPlane,
) -> Option<(Uuid, CertificateInfo)> {
    let refuse = || {
        tether_transport::close(connection, CloseCode::Revoked);
        None
    };
    let info = match CertificateInfo::from_der(cert) {
        Ok(info) => info,
        Err(e) => {
            tracing::warn!(error = %e, "session refused: unreadable client certificate");
            return refuse();
        }
    };
    let identity = match info.require_identity() {
        Ok(identity) if identity.branch_id == cp.instance.branch_id.to_string() => identity,
        Ok(identity) => {
            tracing::warn!(%identity, "session refused: certificate names another branch");
            return refuse();
        }
        Err(e) => {
            tracing::warn!(error = %e, "session refused");
            return refuse();
        }
    };
    let Ok(server_id) = Uuid::parse_str(&identity.server_id) else {
        tracing::warn!(%identity, "session refused: server id is not a UUID");
        return refuse();
    };
    Some((server_id, info))
}

/// The future every connected agent keeps is this one: the set-up (store
/// calls, the Hello, the server row) and the end are boxed, so their state
/// is allocated only while they run, and what the running session holds is
/// passed in boxes, because an async fn keeps its own copy of every argument
/// passed by value (`CertificateInfo`, [`Running`]).
async fn run(
    connection: quinn::Connection,
    server_id: Uuid,
    cert: Box<CertificateInfo>,
    cp: Arc<ControlPlane>,
) {
    let Some(Established {
        generation,
        online_since,
        running,
    }) = Box::pin(establish(&connection, server_id, cert, &cp)).await
    else {
        return;
    };
    let reason = match running {
        Ok(running) => drive(&connection, running, cp.config.offline_after, &cp).await,
        Err(reason) => reason,
    };
    Box::pin(end(&cp, server_id, generation, online_since, reason)).await;
}

/// A session past its set-up: registered on this replica, `Welcome` sent.
struct Established {
    generation: u64,
    online_since: DateTime<Utc>,
    /// What the running session needs, or why it ends at once (the
    /// `Welcome` could not be sent).
    running: Result<Box<Running>, String>,
}

/// What a running session holds.
struct Running {
    control: ControlStream,
    /// When the session's certificate expires (moved by renewals).
    expiry: watch::Receiver<SystemTime>,
    renewal: Arc<RenewalContext>,
}

/// Admission, `Hello` -> `Welcome`, the server marked online; `None` when
/// the session was refused (the connection is closed).
async fn establish(
    connection: &quinn::Connection,
    server_id: Uuid,
    cert: Box<CertificateInfo>,
    cp: &Arc<ControlPlane>,
) -> Option<Established> {
    let server = match cp.store.admit_session(server_id, &cert.serial_hex).await {
        Ok(SessionAdmission::Admitted(server)) => {
            // This certificate is in use: the ones issued before it are done.
            revoke_older(cp, server_id, &cert.serial_hex).await;
            *server
        }
        Ok(refusal) => {
            tracing::warn!(reason = ?refusal, serial = %cert.serial_hex, "session refused");
            tether_transport::close(connection, CloseCode::Revoked);
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "session admission failed in the store");
            tether_transport::close(connection, CloseCode::ShuttingDown);
            return None;
        }
    };
    let server_ref = ServerRef {
        id: server.id,
        organization_id: server.organization_id,
        name: server.name.clone(),
    };

    let first = super::first_stream(connection, "session refused: the agent").await?;
    let (mut control, hello) = match first {
        (stream, AgentMessage::Hello(hello)) => (stream, hello),
        (_, other) => {
            let violation = classify_first_message(PeerKind::Agent, &other).err();
            tracing::warn!(
                ?violation,
                "session refused: the first stream must open with Hello"
            );
            tether_transport::close(connection, CloseCode::ProtocolViolation);
            return None;
        }
    };
    let version = match negotiate_version(
        hello.min_version,
        hello.max_version,
        MIN_PROTOCOL_VERSION,
        PROTOCOL_VERSION,
    ) {
        Ok(version) => version,
        Err(e) => {
            tracing::warn!(error = %e, "session refused");
            let _ = control
                .send(&ControlMessage::HelloRejected(HelloRejection {
                    supported_min: MIN_PROTOCOL_VERSION,
                    supported_max: PROTOCOL_VERSION,
                }))
                .await;
            let _ = control.finish();
            tokio::time::sleep(Duration::from_millis(200)).await;
            tether_transport::close(connection, CloseCode::UnsupportedVersion);
            return None;
        }
    };

    let generation = cp.sessions.register(server_id, connection.clone());
    let facts = serde_json::to_value(FactsView::from(&hello.facts)).unwrap_or_default();
    // Millisecond precision, as both databases keep it: the session's end
    // compares it with the stored value.
    let online_since =
        DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_else(Utc::now);
    let marked_online = match cp
        .store
        .mark_online(server_id, &hello.agent_version, &facts, online_since)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "could not mark the server online");
            false
        }
    };
    let offline_after = cp.config.offline_after;
    let heartbeat_interval = (offline_after / 3).min(Duration::from_secs(15));
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: version,
        server_id: server_id.to_string(),
        branch_id: cp.instance.branch_id.to_string(),
        config: AgentConfig {
            metrics_interval_ms: millis(cp.config.metrics_interval),
            heartbeat_interval_ms: millis(heartbeat_interval),
        },
    });
    let sent = control.send(&welcome).await;
    // What follows lasts as long as the session: keep only what it uses.
    drop(welcome);
    drop(facts);
    let running = match sent {
        Err(e) => Err(format!("could not send Welcome: {e}")),
        Ok(()) => {
            tracing::info!(version, agent_version = %hello.agent_version, "session established");
            drop(hello);
            if marked_online && server.status != ServerStatus::Online {
                super::liveness::emit_state(cp, &server_ref, "server.online", "online", None).await;
            }
            // The agent keeps pushed checks only for its process's life: push
            // them after every Welcome.
            crate::health::spawn_push(cp.clone(), server);
            crate::commands::on_session_start(cp.clone(), server_id);
            let (expiry_tx, expiry_rx) = watch::channel(cert.not_after);
            let renewal = Arc::new(RenewalContext {
                cp: cp.clone(),
                server_id,
                server: server_ref,
                serial: std::sync::Mutex::new(cert.serial_hex),
                expiry: expiry_tx,
            });
            Ok(Box::new(Running {
                control,
                expiry: expiry_rx,
                renewal,
            }))
        }
    };
    Some(Established {
        generation,
        online_since,
        running,
    })
}

/// The end of a session: unregistered, and marked offline unless a newer
/// session (here or on another replica) holds the server.
async fn end(
    cp: &ControlPlane,
    server_id: Uuid,
    generation: u64,
    online_since: DateTime<Utc>,
    reason: String,
) {
    if cp.sessions.remove(server_id, generation) {
        tracing::info!(%reason, "session ended");
        let status_reason = super::liveness::session_end_reason(&reason);
        match cp
            .store
            .end_session(server_id, online_since, &status_reason, Utc::now())
            .await
        {
            Ok(Some(server)) => {
                super::liveness::emit_state(
                    cp,
                    &server,
                    "server.offline",
                    "offline",
                    Some(&status_reason),
                )
                .await;
            }
            // Already offline, removed, or a newer session (on another
            // replica) holds it.
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "could not mark the server offline"),
        }
    } else {
        tracing::info!(%reason, "session ended (superseded or removed)");
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Runs an established session until it ends; returns why it ended.
async fn drive(
    connection: &quinn::Connection,
    mut running: Box<Running>,
    offline_after: Duration,
    cp: &ControlPlane,
) -> String {
    let Running {
        control,
        expiry,
        renewal,
    } = &mut *running;
    loop {
        let expires_in = until(*expiry.borrow());
        tokio::select! {
            message = tokio::time::timeout(offline_after, control.recv()) => match message {
                Err(_) => {
                    tether_transport::close(connection, CloseCode::ProtocolViolation);
                    return format!("no heartbeat for {}", humantime::format_duration(offline_after));
                }
                Ok(Ok(Some(AgentMessage::Heartbeat(_)))) => {
                    let ack = ControlMessage::HeartbeatAck(HeartbeatAck {
                        received_at_unix_ms: u64::try_from(Utc::now().timestamp_millis()).unwrap_or_default(),
                    });
                    if let Err(e) = control.send(&ack).await {
                        return format!("control stream failed: {e}");
                    }
                }
                Ok(Ok(Some(other))) => {
                    tracing::warn!(message = ?std::mem::discriminant(&other), "unexpected message on the control stream");
                    tether_transport::close(connection, CloseCode::ProtocolViolation);
                    return "protocol violation on the control stream".into();
                }
                Ok(Ok(None)) => return "agent closed its control stream".into(),
                Ok(Err(e)) => return connection
                    .close_reason()
                    .map(|r| format!("connection lost: {r}"))
                    .unwrap_or_else(|| format!("control stream failed: {e}")),
            },
            incoming = connection.accept_bi() => match incoming {
                Ok((send, recv)) => {
                    let renewal = Arc::clone(renewal);
                    let connection = connection.clone();
                    tokio::spawn(
                        async move { agent_stream(connection, ControlStream::new(send, recv), renewal).await }
                            .in_current_span(),
                    );
                }
                Err(e) => return format!("connection lost: {e}"),
            },
            _ = tokio::time::sleep(expires_in) => {
                tether_transport::close(connection, CloseCode::CertificateExpired);
                return "certificate expired before it was renewed".into();
            }
            _ = expiry.changed() => {}
            _ = cp.shutdown.cancelled() => return "control plane shut down".into(),
        }
    }
}

struct RenewalContext {
    cp: Arc<ControlPlane>,
    server_id: Uuid,
    server: ServerRef,
    /// Serial of the certificate the session was opened with, or of the
    /// renewed one once the agent acknowledged storing it (the older is
    /// then revoked).
    serial: std::sync::Mutex<String>,
    expiry: watch::Sender<SystemTime>,
}

/// A stream the agent opened after the control stream.
async fn agent_stream(
    connection: quinn::Connection,
    mut stream: ControlStream,
    renewal: Arc<RenewalContext>,
) {
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, stream.recv_required()).await {
        Ok(Ok(message)) => message,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "agent stream ended without a valid first frame");
            return;
        }
        Err(_) => {
            tracing::warn!("agent stream sent nothing in time");
            return;
        }
    };
    match (classify_first_message(PeerKind::Agent, &first), first) {
        (Ok(StreamKind::Metrics), AgentMessage::MetricsBatch(batch)) => {
            metrics_stream(&connection, stream, batch, &renewal).await;
        }
        (Ok(StreamKind::CertificateRenewal), AgentMessage::RenewCertificate(request)) => {
            let (answer, renewed) = renew(&renewal, &request).await;
            if let Err(e) = stream.send(&answer).await {
                tracing::warn!(error = %e, "could not deliver the renewed certificate");
                return;
            }
            let _ = stream.finish();
            if let Some(serial) = renewed {
                await_renewal_ack(&mut stream, &renewal, serial).await;
            }
        }
        (Ok(StreamKind::Health), AgentMessage::HealthReport(report)) => {
            let seq = report.seq;
            match crate::health::store_report(&renewal.cp, &renewal.server, &report).await {
                Ok(()) => {
                    if let Err(e) = stream.send(&ControlMessage::HealthAck { seq }).await {
                        tracing::debug!(seq, error = %e, "could not deliver a health ack; the agent will report again");
                    }
                    let _ = stream.finish();
                }
                Err(e) => {
                    // No ack: the agent reports again.
                    tracing::warn!(seq, error = %e, "health report not stored");
                }
            }
        }
        (classified, _) => {
            tracing::warn!(
                ?classified,
                "agent opened a stream it may not open; closing the connection"
            );
            tether_transport::close(&connection, CloseCode::ProtocolViolation);
        }
    }
}

/// How long the rest of a metrics stream may take to arrive after its first
/// batch: the agent's own wait for its acks (a replay storm after an outage
/// can hold a stream's later datagrams in loss recovery for seconds).
const METRICS_STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// A metrics stream: its batches (one, or up to `MAX_BATCHES_PER_STREAM`
/// when the agent replays its spool) are read to the end of the stream,
/// stored in one submission, then acked one by one in the order they came.
/// A stream that fails or breaks the rules before its end gets no ack at
/// all: its batches stay in the agent's spool and come back.
async fn metrics_stream(
    connection: &quinn::Connection,
    mut stream: ControlStream,
    first: MetricsBatch,
    renewal: &RenewalContext,
) {
    let mut rules = MetricsStreamRules::new(first.seq);
    let mut batches = vec![first];
    let deadline = tokio::time::Instant::now() + METRICS_STREAM_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.recv()).await {
            Ok(Ok(None)) => break,
            Ok(Ok(Some(next))) => match rules.accept(next, stream.bytes_received()) {
                Ok(batch) => batches.push(batch),
                Err(violation) => {
                    tracing::warn!(%violation, "metrics stream broke the protocol; closing the connection");
                    tether_transport::close(connection, CloseCode::ProtocolViolation);
                    return;
                }
            },
            Ok(Err(e)) => {
                tracing::warn!(batches = batches.len(), error = %e, "metrics stream failed before its end; nothing acked");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    batches = batches.len(),
                    "metrics stream not finished in time; nothing acked"
                );
                return;
            }
        }
    }
    let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
    if let Err(e) = renewal
        .cp
        .ingestor
        .submit_all(renewal.server_id, batches)
        .await
    {
        // No ack: the batches stay in the agent's spool and come back.
        tracing::warn!(first_seq = ?seqs.first(), batches = seqs.len(), error = %e, "metrics batches not stored");
        return;
    }
    for seq in seqs {
        if let Err(e) = stream.send(&ControlMessage::Ack(Ack { seq })).await {
            tracing::debug!(seq, error = %e, "could not deliver an ack; the agent will resend");
            return;
        }
    }
    let _ = stream.finish();
}

/// How long the agent may take to store a renewed certificate and
/// acknowledge it.
const RENEWAL_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Revokes the server's certificates older than `serial`, now in use.
async fn revoke_older(cp: &ControlPlane, server_id: Uuid, serial: &str) {
    match cp
        .store
        .revoke_certificates_older_than(server_id, serial, Utc::now())
        .await
    {
        Ok(0) => {}
        Ok(revoked) => {
            tracing::info!(%serial, revoked, "older certificates revoked: a newer one is in use")
        }
        Err(e) => tracing::warn!(error = %e, "could not revoke older certificates"),
    }
}

/// Waits for the agent to finish its side of a renewal stream, which it
/// does once the renewed certificate (`serial`) is stored; then the session
/// goes on under that serial and the older certificates are revoked. An
/// agent that resets the stream, or says nothing in time, keeps them (they
/// are revoked when a session opens with the new one).
async fn await_renewal_ack(stream: &mut ControlStream, ctx: &RenewalContext, serial: String) {
    match tokio::time::timeout(RENEWAL_ACK_TIMEOUT, stream.recv()).await {
        Ok(Ok(None)) => {
            revoke_older(&ctx.cp, ctx.server_id, &serial).await;
            *ctx.serial.lock().unwrap_or_else(|p| p.into_inner()) = serial;
        }
        Ok(Ok(Some(_))) => {
            tracing::warn!("unexpected message after a renewal; older certificates kept")
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "renewal not acknowledged; older certificates kept")
        }
        Err(_) => tracing::info!("renewal not acknowledged in time; older certificates kept"),
    }
}

/// The answer to a renewal request, and the new certificate's serial when
/// one was issued.
async fn renew(
    ctx: &RenewalContext,
    request: &CertificateRenewalRequest,
) -> (ControlMessage, Option<String>) {
    let serial = ctx.serial.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let refused = |reason| (ControlMessage::RenewalRejected(reason), None);
    match ctx.cp.store.admit_session(ctx.server_id, &serial).await {
        Ok(SessionAdmission::Admitted(_)) => {}
        Ok(_) => return refused(RenewalRejection::Revoked),
        Err(e) => {
            tracing::error!(error = %e, "renewal failed in the store");
            return refused(RenewalRejection::Internal);
        }
    }
    let signed = match ctx.cp.pki.sign_agent(&request.csr_der, ctx.server_id) {
        Ok(signed) => signed,
        Err(e) => return refused(RenewalRejection::InvalidCsr(e.to_string())),
    };
    if let Err(e) = ctx.cp.store.record_certificate(&signed.record).await {
        tracing::error!(error = %e, "could not record the renewed certificate");
        return refused(RenewalRejection::Internal);
    }
    tracing::info!(serial = %signed.record.serial, not_after = %signed.record.not_after, "certificate renewed");
    let _ = ctx.expiry.send(signed.issued.info.not_after);
    (
        ControlMessage::CertificateRenewed(signed.chain),
        Some(signed.record.serial),
    )
}
