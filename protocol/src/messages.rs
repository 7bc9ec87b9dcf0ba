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
    /// One metrics report; opens its own stream and is answered by
    /// [`ControlMessage::Ack`] once durably stored.
    MetricsBatch(MetricsBatch),
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
    /// The batch with this sequence number is durably stored (or was
    /// already): the agent may forget it.
    Ack(Ack),
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

/// One report of what a server and its containers are doing.
///
/// `seq` increases by one per batch for the agent's lifetime (it survives
/// restarts): delivery is at-least-once, and the control plane stores each
/// `(server, seq)` once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsBatch {
    pub seq: u64,
    pub collected_at_unix_ms: u64,
    pub system: SystemMetrics,
    /// `None` when the agent does not collect container metrics.
    pub containers: Option<ContainerReport>,
    /// Batches the agent dropped from its spool so far (cumulative).
    pub dropped_batches: u64,
}

/// Host-level metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SystemMetrics {
    pub cpu_percent: f32,
    pub cpu_per_core: Vec<f32>,
    pub load_1: f32,
    pub load_5: f32,
    pub load_15: f32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
    pub disks: Vec<DiskMetrics>,
    pub networks: Vec<NetworkMetrics>,
    pub uptime_seconds: u64,
    pub process_count: u32,
}

/// One mounted filesystem backed by a real disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DiskMetrics {
    pub mount_point: String,
    pub device: String,
    pub filesystem: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub inodes_total: Option<u64>,
    pub inodes_used: Option<u64>,
}

/// Counters of one network interface (cumulative since boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkMetrics {
    pub interface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

/// What the local Docker daemon said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ContainerReport {
    /// Daemon version; `None` when the daemon did not answer.
    pub docker_version: Option<String>,
    /// Why the daemon could not be read (not running, permission denied...).
    pub error: Option<String>,
    pub containers: Vec<ContainerMetrics>,
}

/// One container and its resource use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ContainerMetrics {
    pub id: String,
    pub name: String,
    pub image: String,
    /// created, running, paused, restarting, removing, exited, dead.
    pub state: String,
    /// starting, healthy, unhealthy; `None` without a healthcheck.
    pub health: Option<String>,
    pub restart_count: u64,
    pub started_at: Option<String>,
    pub cpu_percent: f32,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
}

/// Acknowledges a stored [`MetricsBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub seq: u64,
}
