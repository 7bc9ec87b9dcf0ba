//! The QUIC gateway: accepts agent connections, sorts them into enrollment
//! (no client certificate) and sessions (certificate from this branch's CA),
//! and keeps server liveness and connection states in the store
//! ([`liveness`]). Connections negotiating ALPN `tether-branch/1` are peer
//! branches and go to `crate::federation::server`.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tracing::Instrument;

use crate::context::ControlPlane;

pub mod enrollment;
pub mod ingest;
pub mod liveness;
pub mod registry;
pub mod session;

pub(crate) use crate::config::FIRST_FRAME_TIMEOUT;

/// Concurrent bidirectional streams a peer branch may open (quinn's default).
const BRANCH_MAX_CONCURRENT_BIDI_STREAMS: u32 = 100;

/// The first stream a peer opens and its first message. On failure (no
/// stream, no valid frame, nothing in time) the connection is closed with
/// `ProtocolViolation`, the reason logged with `who`, and `None` returned.
pub(crate) async fn first_stream(
    connection: &quinn::Connection,
    who: &str,
) -> Option<(
    tether_transport::ControlStream,
    tether_protocol::AgentMessage,
)> {
    let first = tokio::time::timeout(FIRST_FRAME_TIMEOUT, async {
        let (send, recv) = connection.accept_bi().await?;
        let mut stream = tether_transport::ControlStream::new(send, recv);
        let message = stream.recv_required().await?;
        Ok::<_, tether_transport::TransportError>((stream, message))
    })
    .await;
    let reason = match first {
        Ok(Ok(first)) => return Some(first),
        Ok(Err(e)) => format!("sent no valid first frame: {e}"),
        Err(_) => "sent nothing in time".to_string(),
    };
    tracing::warn!("{who} {reason}; closing");
    tether_transport::close(connection, tether_protocol::CloseCode::ProtocolViolation);
    None
}

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(endpoint: quinn::Endpoint, cp: Arc<ControlPlane>) {
    while let Some(incoming) = endpoint.accept().await {
        let cp = cp.clone();
        let remote = incoming.remote_address();
        tokio::spawn(
            async move {
                let connection = match incoming.await {
                    Ok(connection) => connection,
                    Err(e) => {
                        tracing::warn!(error = %e, "QUIC handshake refused");
                        return;
                    }
                };
                // Branches negotiate their own ALPN: their connections go to
                // federation and can never become agent sessions.
                if negotiated_alpn(&connection).as_deref() == Some(tether_protocol::BRANCH_ALPN) {
                    // The endpoint allows agents few concurrent streams (see
                    // tether_transport::SERVER_MAX_CONCURRENT_BIDI_STREAMS);
                    // a peer branch runs many calls at once.
                    connection
                        .set_max_concurrent_bi_streams(BRANCH_MAX_CONCURRENT_BIDI_STREAMS.into());
                    let cert = peer_certificate(&connection);
                    return Box::pin(crate::federation::server::serve(connection, cert, cp)).await;
                }
                // Each kind's future is boxed: this task's own state is then
                // only as large as the handshake's, not as the largest of the
                // three, for every connection an agent holds open.
                match peer_certificate(&connection) {
                    None => Box::pin(enrollment::serve(connection, cp)).await,
                    Some(cert) => Box::pin(session::serve(connection, cert, cp)).await,
                }
            }
            .instrument(tracing::info_span!("connection", %remote)),
        );
    }
}

/// The ALPN protocol the handshake settled on.
fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The client certificate the peer authenticated with, if any.
fn peer_certificate(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}
