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
    /// The latest result of every health check; opens its own stream and is
    /// answered by [`ControlMessage::HealthAck`] once stored. Also the answer
    /// to [`ControlMessage::RunHealthChecksNow`] on the control plane's
    /// stream. See [`HealthReport`] for the stream rules.
    HealthReport(HealthReport),
    /// Answer to [`ControlMessage::ConfigureHealthChecks`]: which pushed
    /// checks now run and which were refused.
    HealthChecksConfigured(HealthChecksConfigured),
    /// On a command stream: the process was spawned (process id, which is
    /// also its process group id). Output chunks and then
    /// [`AgentMessage::CommandFinished`] follow.
    CommandStarted { pid: u32 },
    /// On a command stream: a chunk of the process's output, at most
    /// [`COMMAND_OUTPUT_CHUNK`] bytes. Chunks of one pipe arrive in order;
    /// the order between stdout and stderr chunks is approximate.
    CommandOutput { stream: OutputStream, data: Vec<u8> },
    /// On a command stream: the last message; the agent finishes the stream
    /// after it. Sent without [`AgentMessage::CommandStarted`] when the
    /// command was refused or could not start.
    CommandFinished(CommandOutcome),
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
    /// The [`HealthReport`] with this sequence number is stored.
    HealthAck { seq: u64 },
    /// Opens a health-config stream: replaces the whole set of pushed health
    /// checks (an empty list removes them all; built-in checks are not
    /// affected). Answered by [`AgentMessage::HealthChecksConfigured`].
    ConfigureHealthChecks(Vec<HealthCheckSpec>),
    /// Opens a health-config stream: run every check (built-in and pushed)
    /// now. Answered, once they all finished, by an
    /// [`AgentMessage::HealthReport`] holding every result, which the control
    /// plane acknowledges with [`ControlMessage::HealthAck`] like any report.
    RunHealthChecksNow,
    /// Opens a command stream: run one program. See [`CommandRequest`] for
    /// the stream rules.
    RunCommand(CommandRequest),
    /// On a command stream, after [`ControlMessage::RunCommand`]: kill the
    /// command (its whole process group). It finishes as
    /// [`CommandStatus::Cancelled`], unless it had already ended.
    CancelCommand,
}

impl AgentMessage {
    /// The variant's name, for logs and errors (never the contents, which
    /// may hold tokens, keys or command output).
    pub fn kind(&self) -> &'static str {
        match self {
            AgentMessage::Enroll(_) => "Enroll",
            AgentMessage::Hello(_) => "Hello",
            AgentMessage::Heartbeat(_) => "Heartbeat",
            AgentMessage::RenewCertificate(_) => "RenewCertificate",
            AgentMessage::MetricsBatch(_) => "MetricsBatch",
            AgentMessage::HealthReport(_) => "HealthReport",
            AgentMessage::HealthChecksConfigured(_) => "HealthChecksConfigured",
            AgentMessage::CommandStarted { .. } => "CommandStarted",
            AgentMessage::CommandOutput { .. } => "CommandOutput",
            AgentMessage::CommandFinished(_) => "CommandFinished",
        }
    }
}

impl ControlMessage {
    /// The variant's name, for logs and errors (never the contents, which
    /// may hold certificates or command arguments).
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Enrolled(_) => "Enrolled",
            ControlMessage::EnrollRejected(_) => "EnrollRejected",
            ControlMessage::Welcome(_) => "Welcome",
            ControlMessage::HelloRejected(_) => "HelloRejected",
            ControlMessage::HeartbeatAck(_) => "HeartbeatAck",
            ControlMessage::CertificateRenewed(_) => "CertificateRenewed",
            ControlMessage::RenewalRejected(_) => "RenewalRejected",
            ControlMessage::Ack(_) => "Ack",
            ControlMessage::HealthAck { .. } => "HealthAck",
            ControlMessage::ConfigureHealthChecks(_) => "ConfigureHealthChecks",
            ControlMessage::RunHealthChecksNow => "RunHealthChecksNow",
            ControlMessage::RunCommand(_) => "RunCommand",
            ControlMessage::CancelCommand => "CancelCommand",
        }
    }
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
    /// Too many failed enrollments from this source address lately: try
    /// again after this many seconds.
    RateLimited {
        retry_after_secs: u64,
    },
    /// The token's organization was deleted: its tokens no longer enroll.
    OrganizationDeleted,
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
            Self::RateLimited { retry_after_secs } => write!(
                f,
                "too many failed enrollments from this address; retry in {retry_after_secs} s"
            ),
            Self::OrganizationDeleted => {
                f.write_str("the enrollment token's organization has been deleted")
            }
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

// ---------------------------------------------------------------------------
// Health checks
// ---------------------------------------------------------------------------

/// Longest [`HealthResult::output`] an agent sends, in bytes (longer output
/// is cut at a character boundary and ends with `…`).
pub const HEALTH_OUTPUT_LIMIT: usize = 4 * 1024;

/// Most pushed checks an agent runs; checks past it are refused.
pub const MAX_PUSHED_HEALTH_CHECKS: usize = 64;

/// Id prefix of the agent's built-in checks (`builtin:docker`,
/// `builtin:disk`, `builtin:memory`, `builtin:control_plane`,
/// `builtin:clock_skew`). Pushed checks may not use it.
pub const BUILTIN_HEALTH_CHECK_PREFIX: &str = "builtin:";

/// A health check pushed by the control plane
/// ([`ControlMessage::ConfigureHealthChecks`]).
///
/// Semantics are Docker's `HEALTHCHECK`: the check runs every
/// `interval_ms`, each run limited to `timeout_ms`. It is
/// [`HealthStatus::Starting`] until its first success; failures during the
/// first `start_period_ms` do not count; `retries` consecutive failures
/// (at least 1) make it [`HealthStatus::Failing`]; one success makes it
/// [`HealthStatus::Passing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckSpec {
    /// Unique among the server's checks, at most 128 bytes, not starting with
    /// [`BUILTIN_HEALTH_CHECK_PREFIX`]. A spec with the id of a running check
    /// and the same content keeps that check's state; a changed spec restarts it.
    pub id: String,
    /// For people, at most 128 bytes.
    pub name: String,
    pub kind: HealthCheckKind,
    /// At least 1000.
    pub interval_ms: u64,
    /// At least 1; a run taking longer fails.
    pub timeout_ms: u64,
    /// Consecutive failures before the check is failing; 0 counts as 1.
    pub retries: u32,
    pub start_period_ms: u64,
}

/// What a pushed check does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthCheckKind {
    /// `GET url` (`http://` or `https://`, verified against the system's
    /// roots; redirects are not followed). Passes on `expected_status`
    /// (`None`: any 2xx) and, when `body_contains` is set, when the first
    /// 64 KiB of the body contain it.
    Http {
        url: String,
        expected_status: Option<u16>,
        body_contains: Option<String>,
    },
    /// A TCP connection to `address` (`host:port`) is established.
    Tcp { address: String },
    /// Runs `argv` (no shell; `argv[0]` is looked up in the agent's `PATH`)
    /// in its own process group, subject to the agent's `[commands]` policy;
    /// passes when it exits with 0. On timeout the whole process group is
    /// killed.
    Exec { argv: Vec<String> },
}

/// Where a check stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Not passed yet, and not failed `retries` times after its start period.
    Starting,
    Passing,
    Failing,
}

/// The latest run of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResult {
    /// The spec's id, or `builtin:<name>`.
    pub check_id: String,
    pub name: String,
    pub status: HealthStatus,
    /// What the run said (status line, error, the program's output), at most
    /// [`HEALTH_OUTPUT_LIMIT`] bytes.
    pub output: String,
    /// When the run ended, by the agent's clock.
    pub checked_at_unix_ms: u64,
    pub duration_ms: u64,
    /// Failed runs in a row that counted (not those in the start period).
    pub consecutive_failures: u32,
}

/// Every health result an agent holds.
///
/// Stream rules: the agent opens a bidirectional stream, sends one
/// `HealthReport` and finishes its side; the control plane stores it and
/// answers [`ControlMessage::HealthAck`] with the same `seq`, then finishes.
/// One report is in flight at a time. The agent reports when a check's
/// status changes (or a check appears or goes away) and at least every
/// metrics interval; a report that was not acknowledged is superseded by the
/// next one, which carries the then latest results.
///
/// `results` is a snapshot: the latest result of every check the agent runs
/// that has run at least once. A check missing from it was removed (or has
/// not finished its first run). `seq` counts the reports of one agent
/// process from 1 (it restarts with the agent) and only pairs a report with
/// its ack: to order results, keep per check the one with the greatest
/// `checked_at_unix_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub seq: u64,
    pub results: Vec<HealthResult>,
}

/// Answer to [`ControlMessage::ConfigureHealthChecks`].
///
/// Stream rules: the control plane opens a bidirectional stream and sends
/// one `ConfigureHealthChecks`; the agent validates every spec, starts the
/// accepted ones (new or changed checks run at once), answers with this and
/// finishes. Pushed checks live as long as the agent process (across
/// reconnections) and are not stored on disk: the control plane pushes them
/// after every `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChecksConfigured {
    /// Ids of the pushed checks now running, in the order given.
    pub active: Vec<String>,
    /// Specs that were refused, and why.
    pub rejected: Vec<RejectedHealthCheck>,
}

/// A pushed check the agent refused (invalid spec, forbidden by its local
/// command policy, duplicate id, too many checks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedHealthCheck {
    pub id: String,
    pub reason: String,
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// Largest [`AgentMessage::CommandOutput`] chunk an agent sends, in bytes.
/// Output is coalesced: a chunk goes out when it is full or about 50 ms
/// after its first byte.
pub const COMMAND_OUTPUT_CHUNK: usize = 16 * 1024;

/// One program to run on the agent's host.
///
/// Stream rules: the control plane opens a bidirectional stream per command
/// and sends `RunCommand`. The agent answers on that stream with
/// [`AgentMessage::CommandStarted`], any number of
/// [`AgentMessage::CommandOutput`] chunks and one
/// [`AgentMessage::CommandFinished`] — or only `CommandFinished` when it
/// refused the command ([`CommandStatus::Refused`]) or could not spawn it
/// ([`CommandStatus::FailedToStart`]) — then finishes the stream. The
/// control plane may send [`ControlMessage::CancelCommand`] on the stream
/// while the command runs, and finishes its side when it has nothing more
/// to say (that does not cancel). If the control plane resets the stream or
/// the connection is lost, the agent kills the command: its result could not
/// be delivered. When the stream ends the process and everything it spawned
/// in its process group are gone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRequest {
    /// Chosen by the control plane; the agent only logs it.
    pub command_id: String,
    /// Program and arguments, no shell. `argv[0]` is a path or a name looked
    /// up in the agent's own `PATH` (never the request's, so that the
    /// agent's allow list means what it says).
    pub argv: Vec<String>,
    /// Set on top of the agent's environment (minus its `TETHER_AGENT_*`
    /// variables). Values may be secrets: `Debug` shows only the names.
    pub env: Vec<(String, String)>,
    /// Written to the process's standard input, which is then closed
    /// (`None`: standard input is `/dev/null`). `Debug` shows only the length.
    pub stdin: Option<Vec<u8>>,
    /// The process group is killed after this long ([`CommandStatus::TimedOut`]).
    /// Must be at least 1.
    pub timeout_ms: u64,
    /// Output bytes (stdout and stderr together) forwarded at most; the rest
    /// is read and dropped, and the outcome says `output_truncated`.
    pub max_output_bytes: u64,
}

impl std::fmt::Debug for CommandRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Environment values and standard input may hold secrets.
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("CommandRequest")
            .field("command_id", &self.command_id)
            .field("argv", &self.argv)
            .field("env_names", &env_names)
            .field("stdin_len", &self.stdin.as_ref().map(Vec::len))
            .field("timeout_ms", &self.timeout_ms)
            .field("max_output_bytes", &self.max_output_bytes)
            .finish()
    }
}

/// Which pipe a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub status: CommandStatus,
    /// Output was dropped past [`CommandRequest::max_output_bytes`].
    pub output_truncated: bool,
    /// Output bytes the process wrote (stdout and stderr), forwarded or not.
    pub output_bytes: u64,
    /// From spawn to the process's exit (0 when not started).
    pub duration_ms: u64,
}

/// Why a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandStatus {
    /// The process exited by itself with this code.
    Exited { code: i32 },
    /// The process died of this signal (not sent by the agent).
    Killed { signal: i32 },
    /// Killed by the agent at [`CommandRequest::timeout_ms`].
    TimedOut,
    /// Killed by the agent on [`ControlMessage::CancelCommand`].
    Cancelled,
    /// The agent's policy or limits refused it; nothing was spawned.
    Refused { reason: String },
    /// The program could not be spawned (not found, not executable...).
    FailedToStart { reason: String },
}
