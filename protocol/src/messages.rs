//! Message types, one enum per direction.
//!
//! [`AgentMessage`] flows from an agent to its control plane, [`ControlMessage`]
//! the other way. The first message on a stream says what the stream is for
//! (see [`crate::session::classify_first_message`]). New variants are only ever
//! appended, so an older peer decoding a newer variant gets a typed
//! [`crate::FrameError::UnknownVariant`], never a wrong message.

use serde::{Deserialize, Serialize};

/// What an agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First and only message of an unauthenticated connection.
    Enroll(EnrollRequest),
    /// Opens the control stream of an authenticated connection.
    Hello(Hello),
    /// Periodic liveness message on the control stream.
    Heartbeat(Heartbeat),
    /// Asks for a fresh certificate over the live session.
    RenewCertificate(CertificateRenewalRequest),
}

/// What a control plane sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// The enrollment succeeded: here is the agent's identity.
    Enrolled(EnrollmentGrant),
    /// The enrollment was refused; the agent keeps no certificate.
    EnrollRejected(EnrollRejection),
    /// Answer to [`Hello`]: the session is established.
    Welcome(Welcome),
    /// Answer to [`Hello`] when no common protocol version exists.
    HelloRejected(HelloRejection),
    /// Answer to [`Heartbeat`].
    HeartbeatAck(HeartbeatAck),
    /// Answer to [`CertificateRenewalRequest`].
    CertificateRenewed(CertificateChain),
    /// The renewal was refused (bad CSR, revoked server).
    RenewalRejected(RenewalRejection),
}

/// Facts about the host an agent runs on, sent at enrollment and at every
/// session start so the inventory stays current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub kernel_version: Option<String>,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub agent_version: String,
}

/// A one-time bootstrap token and a certificate signing request.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The enrollment token, in clear (only its hash is stored server side).
    pub token: String,
    /// PKCS#10 CSR, DER encoded. Only its public key is used.
    pub csr_der: Vec<u8>,
    pub facts: HostFacts,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: it never reaches a log line through Debug.
        f.debug_struct("EnrollRequest")
            .field("token", &"<redacted>")
            .field("csr_der_len", &self.csr_der.len())
            .field("facts", &self.facts)
            .finish()
    }
}

/// A certificate chain, leaf first, CA last, each DER encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateChain {
    pub certificates_der: Vec<Vec<u8>>,
}

/// The identity a control plane grants an enrolling agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentGrant {
    pub server_id: String,
    pub branch_id: String,
    pub chain: CertificateChain,
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollRejection {
    UnknownToken,
    ExpiredToken,
    TokenAlreadyUsed,
    InvalidCsr(String),
    QuotaExceeded(String),
    Internal,
}

impl std::fmt::Display for EnrollRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownToken => {
                f.write_str("enrollment token is not known to this control plane")
            }
            Self::ExpiredToken => f.write_str("enrollment token has expired"),
            Self::TokenAlreadyUsed => f.write_str("enrollment token has already been used"),
            Self::InvalidCsr(why) => write!(f, "certificate signing request is invalid: {why}"),
            Self::QuotaExceeded(why) => write!(f, "organization quota exceeded: {why}"),
            Self::Internal => f.write_str("control plane failed to process the enrollment"),
        }
    }
}

/// Opens a session. Carries the range of protocol versions the agent speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub agent_version: String,
    pub facts: HostFacts,
}

/// Session parameters pushed by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// How often the agent reports metrics, in milliseconds.
    pub metrics_interval_ms: u64,
    /// How often the agent sends a heartbeat on the control stream.
    pub heartbeat_interval_ms: u64,
}

/// The session is established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    pub server_id: String,
    pub branch_id: String,
    pub config: AgentConfig,
}

/// No protocol version in common.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloRejection {
    pub supported_min: u16,
    pub supported_max: u16,
}

/// Liveness, with the agent's clock for skew estimation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub sent_at_unix_ms: u64,
}

/// Answer to a heartbeat, with the control plane's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub received_at_unix_ms: u64,
}

/// A new CSR for the same identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRenewalRequest {
    pub csr_der: Vec<u8>,
}

/// Why a renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenewalRejection {
    InvalidCsr(String),
    Revoked,
    Internal,
}

impl std::fmt::Display for RenewalRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidCsr(why) => write!(f, "certificate signing request is invalid: {why}"),
            Self::Revoked => f.write_str("server has been revoked"),
            Self::Internal => f.write_str("control plane failed to renew the certificate"),
        }
    }
}
