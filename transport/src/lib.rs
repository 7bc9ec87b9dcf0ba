//! The thin runtime layer between [`tether_protocol`] (no IO) and the
//! binaries: quinn endpoint and transport configuration, and typed framed
//! streams over QUIC ([`FramedStream`], and [`AgentCodec`] for code that
//! frames a stream's halves itself).
//!
//! Both the agent and the control plane (and the fleet simulator) dial and
//! listen through this crate so that keep-alive, idle timeout, ALPN and frame
//! limits are the same on both ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tether_protocol::{AgentMessage, CloseCode, ControlMessage, FrameCodec, FrameError};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Keep-alive interval of the dialing side (agent, branch): an idle session
/// still exchanges a packet this often.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A peer silent this long is dead (docs/design.md §3: noticed within ~30 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Receive and send buffer asked of the kernel for a socket that serves many
/// connections (the control plane's, the fleet simulator's). With the
/// kernel's default (~208 KiB) a burst from thousands of agents overflows
/// the receive queue while the endpoint task is busy, and every datagram
/// dropped there costs its connection a loss-recovery delay. Linux caps the
/// size at `net.core.rmem_max` / `net.core.wmem_max` unless the process
/// holds `CAP_NET_ADMIN`.
pub const SHARED_SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("could not bind the QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration is not usable for QUIC: {0}")]
    Crypto(String),
    #[error("could not start a QUIC connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream failed: {0}")]
    Frame(#[from] FrameError),
    #[error("stream closed by the peer before it answered")]
    StreamClosed,
    #[error("stream write failed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// Bidirectional streams an agent may have open at once towards the control
/// plane: the control stream, up to `MAX_IN_FLIGHT` (8) metrics batches, a
/// health report and a certificate renewal, with room to spare. quinn keeps
/// an entry per allowed stream in two hash maps per connection, so the
/// default of 100 costs every session ~4 KiB for streams never opened.
/// Connections that need more (peer branches) raise it with
/// [`quinn::Connection::set_max_concurrent_bi_streams`].
pub const SERVER_MAX_CONCURRENT_BIDI_STREAMS: u32 = 16;

/// Connection-level flow-control window on the server side: the most a
/// connection can make the control plane buffer for it (2x the largest
/// frame). quinn's default is unbounded.
const SERVER_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// Settings both ends share.
fn base_transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    // The constant is well inside QUIC's VarInt range.
    config.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    // Tether sends no unreliable datagrams and opens no unidirectional streams.
    config.datagram_receive_buffer_size(None);
    config.max_concurrent_uni_streams(0u8.into());
    // Without segmentation offload quinn builds one datagram per transmit:
    // its per-connection transmit buffer stays one MTU (~1.5 KiB) instead of
    // growing to ten MTUs (~23 KiB) and staying that size for the
    // connection's life. Tether's traffic is a few small frames per report,
    // heartbeat or command, never a bulk transfer that GSO would speed up.
    config.enable_segmentation_offload(false);
    config
}

/// Transport of the control plane's endpoint (agents, enrollment, branches):
/// one per connected agent, so sized for 10,000 of them.
fn server_transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = base_transport_config();
    // Every peer that dials the control plane (agent, branch) sends its own
    // keep-alives, and each is answered: the control plane's would double
    // the idle packets of every connection for nothing. A peer that goes
    // silent still times out after IDLE_TIMEOUT.
    config.keep_alive_interval(None);
    config.max_concurrent_bidi_streams(SERVER_MAX_CONCURRENT_BIDI_STREAMS.into());
    config.receive_window(SERVER_RECEIVE_WINDOW.into());
    Arc::new(config)
}

/// Transport of a dialing endpoint (the agent, a branch dialing its peer):
/// the peer may open up to quinn's default 100 streams at once (commands,
/// health runs, relayed calls).
fn client_transport_config() -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport_config())
}

/// A server endpoint. `reset_secret` keys QUIC stateless resets and the
/// connection-id validation: a control plane restarted with the same secret
/// recognises connection ids it issued before the restart and answers them
/// with a stateless reset, so agents learn at once that their old connection
/// is gone instead of waiting out the idle timeout.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    reset_secret: &[u8],
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(server_transport_config());
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_secret,
    )));
    let cid_key = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret),
        b"tether/quic-connection-id/v1",
    );
    let mut cid_key_bytes = [0u8; 8];
    cid_key_bytes.copy_from_slice(&cid_key.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key_bytes);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = shared_udp_socket(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TransportError::Crypto("no async runtime found".into()))?;
    quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime)
        .map_err(|source| TransportError::Bind { addr, source })
}

/// Binds a UDP socket meant to carry many connections, with its kernel
/// buffers enlarged to [`SHARED_SOCKET_BUFFER_BYTES`] (or as far as the
/// kernel allows: a smaller effective size is logged, not an error).
pub fn shared_udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    let sock = socket2::SockRef::from(&socket);
    // Linux reports twice what it grants (the other half is its bookkeeping).
    let receive = enlarge_buffer(&socket, BufferKind::Receive)
        .or_else(|_| sock.set_recv_buffer_size(SHARED_SOCKET_BUFFER_BYTES))
        .and_then(|()| sock.recv_buffer_size())
        .map(|granted| granted / 2);
    let send = enlarge_buffer(&socket, BufferKind::Send)
        .or_else(|_| sock.set_send_buffer_size(SHARED_SOCKET_BUFFER_BYTES))
        .and_then(|()| sock.send_buffer_size())
        .map(|granted| granted / 2);
    match (receive, send) {
        (Ok(receive), Ok(send)) if receive.min(send) >= SHARED_SOCKET_BUFFER_BYTES => {}
        (Ok(receive), Ok(send)) => tracing::warn!(
            %addr,
            receive_bytes = receive,
            send_bytes = send,
            wanted_bytes = SHARED_SOCKET_BUFFER_BYTES,
            "UDP socket buffers capped by the kernel: raise net.core.rmem_max and \
             net.core.wmem_max, or grant CAP_NET_ADMIN, or bursts from many agents will be dropped"
        ),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(%addr, error = %e, "could not enlarge the UDP socket's buffers")
        }
    }
    Ok(socket)
}

#[derive(Clone, Copy)]
enum BufferKind {
    Receive,
    Send,
}

/// Sets a socket buffer past the `net.core.[rw]mem_max` cap, which Linux
/// allows a process holding `CAP_NET_ADMIN` (`SO_RCVBUFFORCE` /
/// `SO_SNDBUFFORCE`); fails with `EPERM` otherwise.
#[cfg(target_os = "linux")]
fn enlarge_buffer(socket: &std::net::UdpSocket, kind: BufferKind) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let option = match kind {
        BufferKind::Receive => libc::SO_RCVBUFFORCE,
        BufferKind::Send => libc::SO_SNDBUFFORCE,
    };
    let size = libc::c_int::try_from(SHARED_SOCKET_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the lifetime of `socket`, and the
    // option value is a c_int whose address and size are passed together.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn enlarge_buffer(_socket: &std::net::UdpSocket, _kind: BufferKind) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// A client endpoint bound to an ephemeral port of the right address family.
pub fn client_endpoint(
    remote: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<quinn::Endpoint, TransportError> {
    let bind: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(client_transport_config());
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Dials the control plane, verifying it under [`tether_protocol::CONTROL_PLANE_SERVER_NAME`].
pub async fn connect_control_plane(
    endpoint: &quinn::Endpoint,
    remote: SocketAddr,
) -> Result<quinn::Connection, TransportError> {
    let connecting = endpoint.connect(remote, tether_protocol::CONTROL_PLANE_SERVER_NAME)?;
    Ok(connecting.await?)
}

/// Closes a connection with a Tether close code.
pub fn close(connection: &quinn::Connection, code: CloseCode) {
    connection.close(code.code().into(), code.reason().as_bytes());
}

/// The close code a connection ended with, when the peer closed it with one.
pub fn close_code_of(err: &quinn::ConnectionError) -> Option<CloseCode> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            CloseCode::from_code(close.error_code.into_inner())
        }
        _ => None,
    }
}

/// A bidirectional stream that reads `In` frames and writes `Out` frames.
///
/// Its read and write buffers hold bytes only while a frame is on its way:
/// they are given back once a frame is written or read and nothing else is
/// buffered, so an idle stream (a connected agent's control stream, waiting
/// for the next heartbeat) holds no buffer at all. A frame then costs two
/// small allocations, its length prefix and its body (the codec reserves a
/// frame's whole body once it has read the prefix).
pub struct FramedStream<In, Out> {
    send: FramedWrite<quinn::SendStream, FrameCodec<In, Out>>,
    recv: FramedRead<quinn::RecvStream, FrameCodec<In, Out>>,
}

/// The agent's side of a stream's framing: reads [`ControlMessage`]s,
/// writes [`AgentMessage`]s. For code that frames the two halves of a stream
/// itself (the agent's stream dispatch, which reads the first message before
/// it knows who serves the stream).
pub type AgentCodec = FrameCodec<ControlMessage, AgentMessage>;

/// The agent's side of a stream.
pub type AgentStream = FramedStream<ControlMessage, AgentMessage>;
/// The control plane's side of a stream.
pub type ControlStream = FramedStream<AgentMessage, ControlMessage>;

/// Gives `buffer`'s memory back if it holds nothing.
fn release_if_empty(buffer: &mut BytesMut) {
    if buffer.is_empty() && buffer.capacity() > 0 {
        *buffer = BytesMut::new();
    }
}

impl<In: DeserializeOwned, Out: Serialize> FramedStream<In, Out> {
    /// Wraps the two halves of a bidirectional stream.
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            send: FramedWrite::with_capacity(send, FrameCodec::default(), 0),
            recv: FramedRead::with_capacity(recv, FrameCodec::default(), 0),
        }
    }

    /// Opens a new bidirectional stream on `connection`.
    pub async fn open(connection: &quinn::Connection) -> Result<Self, TransportError> {
        let (send, recv) = connection.open_bi().await?;
        Ok(Self::new(send, recv))
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &Out) -> Result<(), TransportError> {
        let sent = self.send.send(message).await;
        release_if_empty(self.send.write_buffer_mut());
        sent?;
        Ok(())
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly.
    pub async fn recv(&mut self) -> Result<Option<In>, TransportError> {
        match self.recv.next().await {
            Some(Ok(message)) => {
                release_if_empty(self.recv.read_buffer_mut());
                Ok(Some(message))
            }
            Some(Err(err)) => Err(err.into()),
            None => Ok(None),
        }
    }

    /// Bytes of frame bodies read from the stream so far.
    pub fn bytes_received(&self) -> u64 {
        self.recv.decoder().decoded_bytes()
    }

    /// The next message, treating a finished stream as an error.
    pub async fn recv_required(&mut self) -> Result<In, TransportError> {
        self.recv().await?.ok_or(TransportError::StreamClosed)
    }

    /// Sends one message and waits for the answer.
    pub async fn request(&mut self, message: &Out) -> Result<In, TransportError> {
        self.send(message).await?;
        self.recv_required().await
    }

    /// Finishes the sending half (the peer reads end-of-stream).
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.send.get_mut().finish()?;
        Ok(())
    }

    /// Abandons the sending half (the peer reads an error, never a clean
    /// end-of-stream).
    pub fn reset(&mut self) {
        let _ = self.send.get_mut().reset(quinn::VarInt::from_u32(0));
    }
}

#[cfg(test)]
impl<In, Out> FramedStream<In, Out> {
    /// Bytes allocated for the (read, write) buffers.
    fn buffer_capacities(&self) -> (usize, usize) {
        (
            self.recv.read_buffer().capacity(),
            self.send.write_buffer().capacity(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tether_certs::authority::{pem_to_chain, pem_to_private_key};
    use tether_certs::{agent_client_config, control_plane_server_config, CertificateAuthority};

    /// A connection between an agent and a control plane on loopback: the
    /// endpoints (kept open) and both ends (agent, control plane).
    async fn connected_pair() -> ([quinn::Endpoint; 2], quinn::Connection, quinn::Connection) {
        tether_certs::install_crypto_provider();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let issued = ca
            .issue_server_certificate(&[], Duration::from_secs(3600))
            .unwrap();
        let mut chain = pem_to_chain(&issued.cert_pem).unwrap();
        chain.push(ca.cert_der().clone());
        let key = pem_to_private_key(&issued.key_pem).unwrap();
        let tls = control_plane_server_config(ca.cert_der(), chain, key).unwrap();
        let server =
            server_endpoint((std::net::Ipv4Addr::LOCALHOST, 0).into(), tls, b"reset").unwrap();
        let addr = server.local_addr().unwrap();
        let client =
            client_endpoint(addr, agent_client_config(ca.fingerprint(), None).unwrap()).unwrap();
        let accepting = server.clone();
        let accepted = tokio::spawn(async move {
            let incoming = accepting.accept().await.unwrap();
            incoming.await.unwrap()
        });
        let connection = connect_control_plane(&client, addr).await.unwrap();
        let accepted = accepted.await.unwrap();
        ([server, client], connection, accepted)
    }

    #[tokio::test]
    async fn framed_streams_carry_frames_of_any_size_and_keep_no_buffer_once_idle() {
        let (_endpoints, connection, accepted) = connected_pair().await;
        let messages = vec!["x".repeat(10), "y".repeat(100_000), "z".to_string()];

        let mut agent = FramedStream::<String, String>::open(&connection)
            .await
            .unwrap();
        for message in &messages {
            agent.send(message).await.unwrap();
            assert_eq!(agent.buffer_capacities().1, 0, "write buffer after a send");
        }
        let (send, recv) = accepted.accept_bi().await.unwrap();
        let mut control_plane = FramedStream::<String, String>::new(send, recv);
        for message in &messages {
            assert_eq!(&control_plane.recv_required().await.unwrap(), message);
        }
        assert_eq!(
            control_plane.buffer_capacities(),
            (0, 0),
            "an idle stream holds no buffer"
        );

        // Back the other way, and again once the buffers were released.
        for message in messages.iter().rev() {
            control_plane.send(message).await.unwrap();
            assert_eq!(&agent.recv_required().await.unwrap(), message);
            assert_eq!(agent.buffer_capacities(), (0, 0));
        }
    }

    /// The kernel's cap for an unprivileged process, or `None` off Linux.
    fn kernel_cap(name: &str) -> Option<usize> {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn sockets_shared_by_many_connections_get_large_kernel_buffers() {
        let addr: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 0).into();
        let plain = std::net::UdpSocket::bind(addr).unwrap();
        let shared = shared_udp_socket(addr).unwrap();
        let sock = socket2::SockRef::from(&shared);
        let (receive, send) = (
            sock.recv_buffer_size().unwrap() / 2,
            sock.send_buffer_size().unwrap() / 2,
        );
        // With CAP_NET_ADMIN (CI runs as root) the full size, else what
        // net.core.[rw]mem_max allows.
        let wanted = |cap: Option<usize>| {
            if enlarge_buffer(&plain, BufferKind::Receive).is_ok() {
                SHARED_SOCKET_BUFFER_BYTES
            } else {
                cap.unwrap_or(0).min(SHARED_SOCKET_BUFFER_BYTES)
            }
        };
        assert!(
            receive >= wanted(kernel_cap("rmem_max")),
            "receive buffer {receive} B"
        );
        assert!(
            send >= wanted(kernel_cap("wmem_max")),
            "send buffer {send} B"
        );
    }
}
