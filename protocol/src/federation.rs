//! Branch-to-branch messages: what one control plane ("branch") says to a
//! peer it federates with, over a QUIC connection negotiated with ALPN
//! [`BRANCH_ALPN`] (never [`crate::ALPN`], so an agent connection and a
//! branch connection can never be mistaken for one another).
//!
//! * A connection without a client certificate may only open one stream with
//!   [`BranchRequest::Join`] (redeeming an invite); it is answered by
//!   [`BranchResponse::Joined`], then the joiner sends
//!   [`BranchRequest::JoinCertificate`] (the certificate it issued to the
//!   inviting branch) answered by [`BranchResponse::JoinCompleted`].
//! * A connection with a branch certificate opens one stream per call:
//!   [`BranchRequest::Call`] carrying a short-lived ES256 JWT and a
//!   [`BranchCall`], answered by one [`BranchResponse`].
//!
//! [`classify_branch_request`] decides, without IO, whether a peer of a
//! given kind may send a request.

use serde::{Deserialize, Serialize};

/// ALPN protocol id of branch-to-branch connections.
pub const BRANCH_ALPN: &[u8] = b"tether-branch/1";

/// A public JWT verification key of a branch (ECDSA P-256, JWK-like).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationKey {
    /// Key id, carried in the `kid` header of the tokens it verifies.
    pub kid: String,
    /// Affine x coordinate, base64url without padding.
    pub x: String,
    /// Affine y coordinate, base64url without padding.
    pub y: String,
    /// Unix seconds after which tokens under this key are refused
    /// (`None`: the key is current).
    pub not_after: Option<i64>,
}

/// What the joining branch sends with an invite.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The invite's id.
    pub invite_id: String,
    /// The invite's one-time secret. A secret: `Debug` hides it.
    pub secret: String,
    /// The joining branch's id and name.
    pub branch_id: String,
    pub name: String,
    /// Where the joining branch's QUIC endpoint is reached.
    pub address: String,
    /// The joining branch's CA certificate, PEM (the inviter pins it).
    pub ca_cert_pem: String,
    /// The joining branch's JWT verification keys.
    pub keys: Vec<VerificationKey>,
    /// A CSR (DER) for the branch certificate the inviter issues to the joiner.
    pub csr_der: Vec<u8>,
    /// Scopes the joiner grants the inviter on its side.
    pub scopes: Vec<String>,
    /// The joiner's organization the peering acts in.
    pub organization_id: String,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("invite_id", &self.invite_id)
            .field("secret", &"<redacted>")
            .field("branch_id", &self.branch_id)
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The inviter's answer to a valid [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAccepted {
    /// The inviting branch's id and name.
    pub branch_id: String,
    pub name: String,
    /// The inviter's CA certificate, PEM (the joiner pins it).
    pub ca_cert_pem: String,
    /// The inviter's JWT verification keys.
    pub keys: Vec<VerificationKey>,
    /// The branch certificate issued to the joiner, DER, [leaf, CA].
    pub certificate_chain: Vec<Vec<u8>>,
    /// A CSR (DER) for the branch certificate the joiner issues to the inviter.
    pub csr_der: Vec<u8>,
    /// Scopes the invite grants the joiner.
    pub scopes: Vec<String>,
    /// The inviter's organization the peering acts in.
    pub organization_id: String,
}

/// A server as a branch publishes it to its peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedServer {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub labels: Vec<(String, String)>,
    /// `online`, `offline`, `connecting` or `timeout`.
    pub status: String,
    /// Unix milliseconds.
    pub last_seen_at_ms: Option<i64>,
    pub agent_version: Option<String>,
    /// Latest summary metrics, when the server reported any.
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

/// A command to run on one of the callee's servers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedCommand {
    pub server_id: String,
    pub argv: Vec<String>,
    /// Values may be secrets: `Debug` shows only the names.
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    pub timeout_seconds: u64,
}

impl std::fmt::Debug for RelayedCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("RelayedCommand")
            .field("server_id", &self.server_id)
            .field("argv", &self.argv)
            .field("env_names", &env_names)
            .field("stdin_len", &self.stdin.as_ref().map(Vec::len))
            .field("timeout_seconds", &self.timeout_seconds)
            .finish()
    }
}

/// A relayed command's state as the callee knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedCommandState {
    pub command_id: String,
    /// The `status` of `GET /api/v1/commands/{id}` on the callee.
    pub status: String,
    pub exit_code: Option<i32>,
    /// Why it was refused, failed, timed out or could not be delivered.
    pub reason: Option<String>,
    pub output: Vec<u8>,
    pub output_truncated: bool,
    /// Unix milliseconds.
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

/// The latest result of one health check on a callee's server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedHealthResult {
    /// The check's id on the callee, or `builtin:<name>`.
    pub check_id: String,
    pub name: String,
    /// `starting`, `passing`, `failing` or `rejected`.
    pub status: String,
    pub message: String,
    pub consecutive_failures: i64,
    /// Unix milliseconds, by the agent's clock.
    pub checked_at_ms: i64,
    pub duration_ms: i64,
    /// Unix milliseconds, when the callee stored it.
    pub received_at_ms: i64,
}

/// A callee's server's health: what `GET /api/v1/servers/{id}/health`
/// answers on the callee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedServerHealth {
    pub server_id: String,
    /// `passing`, `failing` or `unknown`.
    pub status: String,
    /// The server's connection state (`online`, `offline`, ...).
    pub server_status: String,
    pub checks: Vec<RelayedHealthResult>,
}

/// One authenticated call. The scope each needs is [`BranchCall::required_scope`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchCall {
    /// Liveness and round-trip time. The answer carries the callee's
    /// current verification keys: the caller learns them over its own
    /// connection, whose server certificate it verified against the CA it
    /// pinned, so key rotation needs no extra trust.
    Heartbeat { sent_at_ms: i64 },
    /// The callee's published servers.
    Inventory,
    /// Run a command on one of the callee's servers.
    RunCommand(RelayedCommand),
    /// The state of a command started with [`BranchCall::RunCommand`].
    CommandState { command_id: String },
    /// The caller removed the peering: the callee removes it too.
    Unpeer,
    /// The state of a relayed command once it differs from what the caller
    /// knows (another status, or more output than `known_output_len`
    /// bytes), or after `wait_ms` at most: the callee answers as soon as
    /// something changed, so the caller learns the outcome without polling.
    AwaitCommand {
        command_id: String,
        known_status: String,
        known_output_len: u64,
        wait_ms: u32,
    },
    /// Cancel a relayed command; answered with its state after the request.
    CancelCommand { command_id: String },
    /// The latest health results of one of the callee's servers.
    ServerHealth { server_id: String },
    /// Run every health check of one of the callee's servers now; the
    /// results are read with [`BranchCall::ServerHealth`].
    RunHealthChecks { server_id: String },
}

impl BranchCall {
    /// The scope a token must carry (and the invite must have granted) for
    /// this call; `None`: any valid token of the peer.
    pub fn required_scope(&self) -> Option<&'static str> {
        match self {
            Self::Heartbeat { .. } | Self::Unpeer => None,
            Self::Inventory => Some("servers:read"),
            Self::ServerHealth { .. } => Some("servers:read"),
            Self::RunCommand(_)
            | Self::CommandState { .. }
            | Self::AwaitCommand { .. }
            | Self::CancelCommand { .. }
            | Self::RunHealthChecks { .. } => Some("commands:run"),
        }
    }
}

/// What a branch sends to a peer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchRequest {
    /// Redeem an invite (only on a connection without a client certificate).
    Join(JoinRequest),
    /// The certificate the joiner issued to the inviter, DER, [leaf, CA].
    JoinCertificate { certificate_chain: Vec<Vec<u8>> },
    /// An authenticated call. `token` is a secret: `Debug` hides it.
    Call { token: String, call: BranchCall },
}

impl std::fmt::Debug for BranchRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Join(join) => f.debug_tuple("Join").field(join).finish(),
            Self::JoinCertificate { .. } => f.write_str("JoinCertificate"),
            Self::Call { call, .. } => f
                .debug_struct("Call")
                .field("token", &"<redacted>")
                .field("call", call)
                .finish(),
        }
    }
}

/// Why a branch refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// The token is missing, malformed, signed by an unknown key or with
    /// another algorithm, expired, or not meant for this branch.
    Unauthorized,
    /// The token or the peering lacks the scope the call needs.
    Forbidden,
    /// The invite, peering, server or command does not exist.
    NotFound,
    /// The request is malformed (bad CSR, bad ids).
    Invalid,
    /// The callee could not do it now (server not connected, store failure).
    Unavailable,
}

/// What a branch answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BranchResponse {
    Joined(JoinAccepted),
    JoinCompleted,
    Refused {
        code: RefusalCode,
        message: String,
    },
    HeartbeatAck {
        sent_at_ms: i64,
        keys: Vec<VerificationKey>,
        server_count: u32,
    },
    Inventory(Vec<PublishedServer>),
    CommandAccepted {
        command_id: String,
    },
    CommandState(RelayedCommandState),
    Unpeered,
    ServerHealth(RelayedServerHealth),
    /// The callee's agent was asked to run its checks (Unix milliseconds).
    HealthRunAccepted {
        requested_at_ms: i64,
    },
}

/// Who opened a branch connection, as established by TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchPeerKind {
    /// No client certificate: may only join.
    Unauthenticated,
    /// A branch certificate issued by this branch's CA.
    Peer,
}

/// A request a peer of that kind may not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BranchViolation {
    #[error("a connection without a branch certificate may only join")]
    NotPeered,
    #[error("a peered branch may not join again on its peering connection")]
    AlreadyPeered,
    #[error("a join certificate may only follow a join on the same stream")]
    UnexpectedJoinCertificate,
}

/// Decides whether a stream opened by `peer` with `first` is allowed.
pub fn classify_branch_request(
    peer: BranchPeerKind,
    first: &BranchRequest,
) -> Result<(), BranchViolation> {
    match (peer, first) {
        (BranchPeerKind::Unauthenticated, BranchRequest::Join(_)) => Ok(()),
        (BranchPeerKind::Unauthenticated, BranchRequest::Call { .. }) => {
            Err(BranchViolation::NotPeered)
        }
        (BranchPeerKind::Peer, BranchRequest::Call { .. }) => Ok(()),
        (BranchPeerKind::Peer, BranchRequest::Join(_)) => Err(BranchViolation::AlreadyPeered),
        (_, BranchRequest::JoinCertificate { .. }) => {
            Err(BranchViolation::UnexpectedJoinCertificate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_body, encode_frame, FrameCodec};
    use crate::MAX_FRAME_LEN;
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    fn join() -> JoinRequest {
        JoinRequest {
            invite_id: "inv".into(),
            secret: "s3cret-value".into(),
            branch_id: "a".into(),
            name: "branch a".into(),
            address: "127.0.0.1:7443".into(),
            ca_cert_pem: "-----BEGIN CERTIFICATE-----".into(),
            keys: vec![VerificationKey {
                kid: "k1".into(),
                x: "xx".into(),
                y: "yy".into(),
                not_after: None,
            }],
            csr_der: vec![1, 2, 3],
            scopes: vec!["servers:read".into()],
            organization_id: "o".into(),
        }
    }

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let frame = encode_frame(value, MAX_FRAME_LEN).unwrap();
        let mut codec: FrameCodec<T, T> = FrameCodec::default();
        let mut buf = BytesMut::from(&frame[..]);
        codec.decode(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn every_branch_request_survives_a_frame_round_trip() {
        let requests = vec![
            BranchRequest::Join(join()),
            BranchRequest::JoinCertificate {
                certificate_chain: vec![vec![9; 300], vec![8; 200]],
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::Heartbeat { sent_at_ms: 17 },
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::Inventory,
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::RunCommand(RelayedCommand {
                    server_id: "s".into(),
                    argv: vec!["echo".into(), "hi".into()],
                    env: vec![("K".into(), "V".into())],
                    stdin: Some(b"in".to_vec()),
                    timeout_seconds: 5,
                }),
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::CommandState {
                    command_id: "c".into(),
                },
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::Unpeer,
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::AwaitCommand {
                    command_id: "c".into(),
                    known_status: "running".into(),
                    known_output_len: 3,
                    wait_ms: 20_000,
                },
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::CancelCommand {
                    command_id: "c".into(),
                },
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::ServerHealth {
                    server_id: "s".into(),
                },
            },
            BranchRequest::Call {
                token: "t".into(),
                call: BranchCall::RunHealthChecks {
                    server_id: "s".into(),
                },
            },
        ];
        for request in requests {
            assert_eq!(round_trip(&request), request);
        }
    }

    #[test]
    fn every_branch_response_survives_a_frame_round_trip() {
        let responses = vec![
            BranchResponse::Joined(JoinAccepted {
                branch_id: "b".into(),
                name: "b".into(),
                ca_cert_pem: "pem".into(),
                keys: join().keys,
                certificate_chain: vec![vec![1], vec![2]],
                csr_der: vec![3],
                scopes: vec!["servers:read".into()],
                organization_id: "o".into(),
            }),
            BranchResponse::JoinCompleted,
            BranchResponse::Refused {
                code: RefusalCode::Forbidden,
                message: "no".into(),
            },
            BranchResponse::HeartbeatAck {
                sent_at_ms: 5,
                keys: vec![],
                server_count: 3,
            },
            BranchResponse::Inventory(vec![PublishedServer {
                id: "s".into(),
                name: "n".into(),
                hostname: "h".into(),
                labels: vec![("env".into(), "prod".into())],
                status: "online".into(),
                last_seen_at_ms: Some(1),
                agent_version: Some("0.1".into()),
                cpu_percent: Some(12.5),
                memory_used_bytes: Some(1),
                memory_total_bytes: None,
            }]),
            BranchResponse::CommandAccepted {
                command_id: "c".into(),
            },
            BranchResponse::CommandState(RelayedCommandState {
                command_id: "c".into(),
                status: "succeeded".into(),
                exit_code: Some(0),
                reason: None,
                output: b"hi\n".to_vec(),
                output_truncated: false,
                started_at_ms: Some(1),
                finished_at_ms: Some(2),
            }),
            BranchResponse::Unpeered,
            BranchResponse::ServerHealth(RelayedServerHealth {
                server_id: "s".into(),
                status: "failing".into(),
                server_status: "online".into(),
                checks: vec![RelayedHealthResult {
                    check_id: "builtin:docker".into(),
                    name: "docker".into(),
                    status: "failing".into(),
                    message: "daemon down".into(),
                    consecutive_failures: 2,
                    checked_at_ms: 1,
                    duration_ms: 4,
                    received_at_ms: 2,
                }],
            }),
            BranchResponse::HealthRunAccepted { requested_at_ms: 9 },
        ];
        for response in responses {
            assert_eq!(round_trip(&response), response);
        }
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let text = format!("{:?}", BranchRequest::Join(join()));
        assert!(!text.contains("s3cret-value"), "{text}");
        let call = BranchRequest::Call {
            token: "eyJ-secret-token".into(),
            call: BranchCall::RunCommand(RelayedCommand {
                server_id: "s".into(),
                argv: vec!["env".into()],
                env: vec![("PASSWORD".into(), "hunter2".into())],
                stdin: None,
                timeout_seconds: 1,
            }),
        };
        let text = format!("{call:?}");
        assert!(!text.contains("eyJ-secret-token"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("PASSWORD"), "{text}");
    }

    #[test]
    fn unauthenticated_branch_connections_may_only_join() {
        let call = BranchRequest::Call {
            token: "t".into(),
            call: BranchCall::Inventory,
        };
        let join = BranchRequest::Join(join());
        let cert = BranchRequest::JoinCertificate {
            certificate_chain: vec![],
        };
        assert_eq!(
            classify_branch_request(BranchPeerKind::Unauthenticated, &join),
            Ok(())
        );
        assert_eq!(
            classify_branch_request(BranchPeerKind::Unauthenticated, &call),
            Err(BranchViolation::NotPeered)
        );
        assert_eq!(classify_branch_request(BranchPeerKind::Peer, &call), Ok(()));
        assert_eq!(
            classify_branch_request(BranchPeerKind::Peer, &join),
            Err(BranchViolation::AlreadyPeered)
        );
        for kind in [BranchPeerKind::Peer, BranchPeerKind::Unauthenticated] {
            assert_eq!(
                classify_branch_request(kind, &cert),
                Err(BranchViolation::UnexpectedJoinCertificate)
            );
        }
    }

    #[test]
    fn calls_name_the_scope_they_need() {
        assert_eq!(BranchCall::Inventory.required_scope(), Some("servers:read"));
        assert_eq!(
            BranchCall::CommandState {
                command_id: "c".into()
            }
            .required_scope(),
            Some("commands:run")
        );
        assert_eq!(BranchCall::Unpeer.required_scope(), None);
        assert_eq!(
            BranchCall::ServerHealth {
                server_id: "s".into()
            }
            .required_scope(),
            Some("servers:read")
        );
        for call in [
            BranchCall::AwaitCommand {
                command_id: "c".into(),
                known_status: "queued".into(),
                known_output_len: 0,
                wait_ms: 1,
            },
            BranchCall::CancelCommand {
                command_id: "c".into(),
            },
            BranchCall::RunHealthChecks {
                server_id: "s".into(),
            },
        ] {
            assert_eq!(call.required_scope(), Some("commands:run"), "{call:?}");
        }
    }

    #[test]
    fn an_unknown_branch_request_variant_is_a_typed_error() {
        // Variant index 200 does not exist.
        let body = [200u8, 1];
        let err = decode_body::<BranchRequest>(&body).unwrap_err();
        assert!(
            matches!(
                err,
                crate::FrameError::UnknownVariant | crate::FrameError::Undecodable(_)
            ),
            "{err:?}"
        );
    }
}
