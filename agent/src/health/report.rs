//! Health on the wire, per session.
//!
//! [`deliver`] sends a `HealthReport` on a new stream when a check's status
//! changed (after [`DEBOUNCE`], so that a burst of changes makes one report)
//! and at least every metrics interval, one report at a time, and waits for
//! its `HealthAck`. A report that is not acknowledged is not resent as such:
//! the next one (after a pause) carries the latest results.
//!
//! [`serve_config_stream`] answers the streams the control plane opens:
//! `ConfigureHealthChecks` -> `HealthChecksConfigured`;
//! `RunHealthChecksNow` -> (every check runs) `HealthReport` -> `HealthAck`.

use std::convert::Infallible;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tether_protocol::{AgentMessage, ControlMessage};
use tether_transport::{AgentCodec, AgentStream, TransportError};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::scheduler::{Health, Snapshot};
use crate::format_duration;

/// Changes closer together than this make one report.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// How long the control plane may take to store and ack a report.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Pauses after a failed report, doubling from the first to the second.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a report was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("no ack within {}", format_duration(ACK_TIMEOUT))]
    Timeout,
    #[error("the control plane acked report {0} instead")]
    WrongAck(u64),
    #[error("unexpected answer ({0})")]
    Unexpected(&'static str),
}

/// Sends one report on a new stream and waits for its ack.
async fn send_report(
    connection: &quinn::Connection,
    snapshot: &Snapshot,
) -> Result<(), ReportError> {
    let seq = snapshot.report.seq;
    let exchange = async {
        let mut stream = AgentStream::open(connection).await?;
        stream
            .send(&AgentMessage::HealthReport(snapshot.report.clone()))
            .await?;
        stream.finish()?;
        Ok::<_, ReportError>(stream.recv_required().await?)
    };
    match tokio::time::timeout(ACK_TIMEOUT, exchange).await {
        Err(_) => Err(ReportError::Timeout),
        Ok(Err(err)) => Err(err),
        Ok(Ok(ControlMessage::HealthAck { seq: acked })) if acked == seq => Ok(()),
        Ok(Ok(ControlMessage::HealthAck { seq: other })) => Err(ReportError::WrongAck(other)),
        Ok(Ok(other)) => Err(ReportError::Unexpected(other.kind())),
    }
}

/// Reports over `connection` until the session ends (the caller drops this
/// future); `interval` is read before each wait (the metrics interval).
pub async fn deliver(
    health: &Health,
    connection: &quinn::Connection,
    interval: impl Fn() -> Duration,
) -> Infallible {
    // The first report goes out as soon as there is something to say.
    let mut last_ok: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut pause = RETRY_MIN;
    loop {
        let now = Instant::now();
        let wake = match retry_at {
            Some(at) => at,
            None if health.unreported() => now,
            None => last_ok.map_or(now, |at| at + interval()),
        };
        if wake > now {
            tokio::select! {
                () = health.changed() => {
                    if retry_at.is_none() {
                        tokio::time::sleep(DEBOUNCE).await;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        retry_at = None;
        let Some(snapshot) = health.report() else {
            // Nothing ran yet: wait for the first result.
            last_ok = Some(Instant::now());
            continue;
        };
        match send_report(connection, &snapshot).await {
            Ok(()) => {
                health.acked(snapshot.changes);
                last_ok = Some(Instant::now());
                pause = RETRY_MIN;
                tracing::debug!(
                    seq = snapshot.report.seq,
                    results = snapshot.report.results.len(),
                    "health report acknowledged"
                );
            }
            Err(err) => {
                tracing::warn!(
                    seq = snapshot.report.seq,
                    "health report not delivered: {err}; reporting again in {}",
                    format_duration(pause)
                );
                retry_at = Some(Instant::now() + pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Answers a health-config stream the control plane opened with `first`
/// (`ConfigureHealthChecks` or `RunHealthChecksNow`).
pub async fn serve_config_stream(
    health: &Health,
    first: ControlMessage,
    send: quinn::SendStream,
    mut recv: FramedRead<quinn::RecvStream, AgentCodec>,
) {
    let mut framed = FramedWrite::new(send, AgentCodec::default());
    match first {
        ControlMessage::ConfigureHealthChecks(specs) => {
            let answer = health.configure(specs).await;
            if let Err(err) = framed
                .send(&AgentMessage::HealthChecksConfigured(answer))
                .await
            {
                tracing::debug!("cannot answer ConfigureHealthChecks: {err}");
            }
            let _ = framed.get_mut().finish();
        }
        ControlMessage::RunHealthChecksNow => {
            tracing::info!("running every health check now, as asked");
            let snapshot = health.run_now().await;
            let seq = snapshot.report.seq;
            if let Err(err) = framed
                .send(&AgentMessage::HealthReport(snapshot.report))
                .await
            {
                tracing::debug!("cannot answer RunHealthChecksNow: {err}");
                return;
            }
            let _ = framed.get_mut().finish();
            match tokio::time::timeout(ACK_TIMEOUT, recv.next()).await {
                Ok(Some(Ok(ControlMessage::HealthAck { seq: acked }))) if acked == seq => {
                    health.acked(snapshot.changes);
                }
                Ok(other) => tracing::debug!(
                    seq,
                    answered = other.is_some(),
                    "health report of a run-now request not acknowledged; the next report carries it"
                ),
                Err(_) => tracing::debug!(seq, "no ack for the run-now health report"),
            }
        }
        other => {
            tracing::warn!("{} does not open a health-config stream", other.kind());
        }
    }
}
