//! Streams the control plane opens during a session.
//!
//! Each bidirectional stream's first message says what it is for
//! ([`tether_protocol::classify_control_opener`]): `RunCommand` goes to the
//! [`CommandRunner`], `ConfigureHealthChecks` and `RunHealthChecksNow` to the
//! health scheduler. A stream that opens with anything else, sends nothing
//! within [`FIRST_FRAME_TIMEOUT`] or sends an undecodable frame is reset; the
//! session goes on.
//!
//! Stream tasks belong to the session: when it ends they are dropped, which
//! kills the process groups of the commands still running (their results
//! could not be delivered anyway).

use std::time::Duration;

use futures::StreamExt;
use tether_protocol::{classify_control_opener, ControlMessage, ControlStreamKind};
use tether_transport::AgentCodec;
use tokio::task::JoinSet;
use tokio_util::codec::FramedRead;
use tracing::Instrument;

use crate::command::CommandRunner;
use crate::health::{report, Health};

/// How long the control plane has to send the first frame of a stream.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams served at once per session; more are reset. (Commands have their
/// own, lower bound: [`crate::command::MAX_CONCURRENT_COMMANDS`].)
pub const MAX_STREAMS: usize = 64;

/// QUIC application error code of a stream the agent refused.
const REFUSED_STREAM: u32 = 1;

/// What incoming streams are served with.
#[derive(Clone)]
pub struct Services {
    pub commands: CommandRunner,
    pub health: std::sync::Arc<Health>,
}

/// Accepts the control plane's streams until the connection ends; returns
/// the connection's error. Stream tasks are dropped with this future.
pub async fn accept(connection: &quinn::Connection, services: &Services) -> quinn::ConnectionError {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            incoming = connection.accept_bi() => match incoming {
                Ok((mut send, mut recv)) => {
                    if tasks.len() >= MAX_STREAMS {
                        tracing::warn!("refusing a stream: {MAX_STREAMS} streams already open");
                        let _ = send.reset(REFUSED_STREAM.into());
                        let _ = recv.stop(REFUSED_STREAM.into());
                        continue;
                    }
                    let services = services.clone();
                    tasks.spawn(serve(send, recv, services).in_current_span());
                }
                Err(err) => return err,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Reads the first frame, classifies it and serves the stream.
async fn serve(mut send: quinn::SendStream, recv: quinn::RecvStream, services: Services) {
    let mut recv = FramedRead::new(recv, AgentCodec::default());
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, recv.next()).await {
        Ok(Some(Ok(first))) => first,
        Ok(Some(Err(err))) => {
            tracing::warn!("refusing a stream opened by the control plane: {err}");
            let _ = send.reset(REFUSED_STREAM.into());
            return;
        }
        Ok(None) => return,
        Err(_) => {
            tracing::warn!(
                "refusing a stream opened by the control plane: no first frame within {} s",
                FIRST_FRAME_TIMEOUT.as_secs()
            );
            let _ = send.reset(REFUSED_STREAM.into());
            return;
        }
    };
    match classify_control_opener(&first) {
        Ok(ControlStreamKind::Command) => {
            if let ControlMessage::RunCommand(request) = first {
                services.commands.serve(request, send, recv).await;
            }
        }
        Ok(ControlStreamKind::HealthConfig) => {
            report::serve_config_stream(&services.health, first, send, recv).await;
        }
        Err(violation) => {
            tracing::warn!(
                "refusing a stream the control plane opened with {}: {violation}",
                first.kind()
            );
            let _ = send.reset(REFUSED_STREAM.into());
        }
    }
}
