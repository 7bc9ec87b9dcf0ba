//! Reaching the control plane: `host:port` resolution and the QUIC handshake,
//! shared by enrollment, the session and `check`.

use std::net::SocketAddr;
use std::time::Duration;

use tether_protocol::CloseCode;
use tether_transport::{client_endpoint, connect_control_plane, TransportError};

/// How long one handshake may take before the next address is tried.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a closing connection may take to tell the peer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A live connection and the endpoint that carries it.
pub struct Dialed {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub addr: SocketAddr,
}

impl Dialed {
    /// Closes the connection with `code` and waits briefly for the peer to
    /// hear it.
    pub async fn close(self, code: CloseCode) {
        close_with(&self.connection, code, code.reason());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.endpoint.wait_idle()).await;
    }
}

/// Closes `connection` with a Tether close code and a reason of our own.
pub fn close_with(connection: &quinn::Connection, code: CloseCode, reason: &str) {
    connection.close(code.code().into(), reason.as_bytes());
}

/// Why the control plane could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve control plane address {server:?}: {source}")]
    Resolve {
        server: String,
        source: std::io::Error,
    },
    #[error("control plane address {server:?} resolves to no address")]
    NoAddress { server: String },
    #[error("cannot connect to the control plane at {server} ({addr}): {source}")]
    Connect {
        server: String,
        addr: SocketAddr,
        source: TransportError,
    },
    #[error("control plane at {server} ({addr}) did not complete the handshake within {}s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout { server: String, addr: SocketAddr },
}

/// Resolves `server` (`host:port`, names allowed) and completes a QUIC
/// handshake with the first address that answers.
pub async fn dial(server: &str, tls: rustls::ClientConfig) -> Result<Dialed, DialError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .map_err(|source| DialError::Resolve {
            server: server.to_string(),
            source,
        })?
        .collect();
    let mut last_error = DialError::NoAddress {
        server: server.to_string(),
    };
    for addr in addrs {
        let connect_error = |source| DialError::Connect {
            server: server.to_string(),
            addr,
            source,
        };
        let endpoint = match client_endpoint(addr, tls.clone()) {
            Ok(endpoint) => endpoint,
            Err(err) => {
                last_error = connect_error(err);
                continue;
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_control_plane(&endpoint, addr)).await
        {
            Ok(Ok(connection)) => {
                return Ok(Dialed {
                    endpoint,
                    connection,
                    addr,
                })
            }
            Ok(Err(err)) => last_error = connect_error(err),
            Err(_) => {
                last_error = DialError::Timeout {
                    server: server.to_string(),
                    addr,
                }
            }
        }
        tracing::debug!(%addr, error = %last_error, "control plane address did not answer");
    }
    Err(last_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn address_without_port_is_a_resolve_error_naming_it() {
        tether_certs::install_crypto_provider();
        let pin = tether_certs::CaFingerprint::of_der(b"ca");
        let tls = tether_certs::agent_client_config(pin, None).unwrap();
        let err = dial("no-port-here", tls).await.err().unwrap();
        assert!(matches!(err, DialError::Resolve { .. }), "{err}");
        assert!(err.to_string().contains("no-port-here"));
    }
}
