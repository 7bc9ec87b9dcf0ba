//! Protocol rules that need no IO: version negotiation, what each kind of
//! peer may open a stream with, and the QUIC close codes both sides use.
//!
//! Streams an agent opens are classified by [`classify_first_message`],
//! streams a control plane opens by [`classify_control_opener`].

use crate::messages::{AgentMessage, ControlMessage, MetricsBatch};

/// Application close codes carried in QUIC `CONNECTION_CLOSE` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly close (shutdown, session replaced, enrollment finished).
    Normal = 0,
    /// The peer broke a protocol rule (wrong first message, bad frame on the
    /// control stream).
    ProtocolViolation = 1,
    /// A connection without a client certificate tried something other than
    /// enrolling.
    Unauthenticated = 2,
    /// The server behind the certificate was revoked or removed.
    Revoked = 3,
    /// No protocol version in common.
    UnsupportedVersion = 4,
    /// The control plane is shutting down; reconnect soon.
    ShuttingDown = 5,
    /// The session's certificate expired before it was renewed.
    CertificateExpired = 6,
    /// A newer session of the same server took over.
    Superseded = 7,
    /// The server's organization was deleted (its certificates revoked).
    OrganizationDeleted = 8,
}

impl CloseCode {
    /// The code as sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps a wire code back; unknown codes are `None`.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::ProtocolViolation,
            2 => Self::Unauthenticated,
            3 => Self::Revoked,
            4 => Self::UnsupportedVersion,
            5 => Self::ShuttingDown,
            6 => Self::CertificateExpired,
            7 => Self::Superseded,
            8 => Self::OrganizationDeleted,
            _ => return None,
        })
    }

    /// Reason phrase sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal close",
            Self::ProtocolViolation => "protocol violation",
            Self::Unauthenticated => "unauthenticated connections may only enroll",
            Self::Revoked => "server revoked",
            Self::UnsupportedVersion => "no common protocol version",
            Self::ShuttingDown => "control plane shutting down",
            Self::CertificateExpired => "certificate expired",
            Self::Superseded => "superseded by a newer session",
            Self::OrganizationDeleted => "the server's organization was deleted",
        }
    }
}

/// No protocol version both peers speak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "peer speaks protocol versions {peer_min}..={peer_max}, this build {ours_min}..={ours_max}"
)]
pub struct VersionError {
    pub peer_min: u16,
    pub peer_max: u16,
    pub ours_min: u16,
    pub ours_max: u16,
}

/// Picks the highest version both sides speak.
pub fn negotiate_version(
    peer_min: u16,
    peer_max: u16,
    ours_min: u16,
    ours_max: u16,
) -> Result<u16, VersionError> {
    let high = peer_max.min(ours_max);
    let low = peer_min.max(ours_min);
    if peer_min <= peer_max && low <= high {
        Ok(high)
    } else {
        Err(VersionError {
            peer_min,
            peer_max,
            ours_min,
            ours_max,
        })
    }
}

/// Who is at the other end of a connection, as established by TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// No client certificate: may only enroll.
    Unauthenticated,
    /// A client certificate signed by this control plane's CA.
    Agent,
}

/// What a stream opened by an agent is for, decided by its first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Enrollment,
    Control,
    CertificateRenewal,
    Metrics,
    /// A [`crate::HealthReport`], answered by `HealthAck`.
    Health,
}

/// What a stream opened by the control plane is for, decided by its first
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlStreamKind {
    /// `RunCommand`: one command, its output and its outcome.
    Command,
    /// `ConfigureHealthChecks` or `RunHealthChecksNow`.
    HealthConfig,
}

/// A peer opened a stream with a message it may not open one with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("an unauthenticated connection may only enroll")]
    NotEnrolled,
    #[error("an enrolled agent may not enroll again")]
    AlreadyEnrolled,
    #[error("this message cannot open a stream")]
    NotAStreamOpener,
}

impl Violation {
    /// The close code the connection is closed with.
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::NotEnrolled => CloseCode::Unauthenticated,
            Self::AlreadyEnrolled | Self::NotAStreamOpener => CloseCode::ProtocolViolation,
        }
    }
}

/// Most [`MetricsBatch`]es one metrics stream may carry.
///
/// A metrics stream carries one batch, or — when an agent replays its
/// spool — up to this many, in increasing `seq` order; the agent then
/// finishes its side and the control plane answers one `Ack { seq }` per
/// batch, in the same order, each once that batch is committed. One stream
/// for many replayed batches saves a stream and its datagrams per report
/// (docs/performance-log.md, *Replays on one stream*). A control plane that reads
/// only the first batch acks only that one; the agent sends the others again.
pub const MAX_BATCHES_PER_STREAM: usize = 16;

/// Most bytes of frame bodies a metrics stream of several batches may carry
/// (one batch alone is bounded by the frame limit): what one stream can make
/// the control plane hold before it stores anything.
pub const MAX_METRICS_STREAM_BYTES: u64 = crate::codec::MAX_FRAME_LEN as u64;

/// A metrics stream broke [`MAX_BATCHES_PER_STREAM`]'s rules after its
/// first batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MetricsStreamViolation {
    #[error("a metrics stream carries only metrics batches")]
    NotABatch,
    #[error("a metrics stream carries at most {MAX_BATCHES_PER_STREAM} batches")]
    TooManyBatches,
    #[error(
        "a metrics stream of several batches carries at most {MAX_METRICS_STREAM_BYTES} bytes"
    )]
    TooManyBytes,
    #[error("batch {next} follows batch {previous} on a metrics stream; seq must increase")]
    OutOfOrder { previous: u64, next: u64 },
}

/// The rules a metrics stream's frames follow after the first one: only
/// batches, at most [`MAX_BATCHES_PER_STREAM`] of them and
/// [`MAX_METRICS_STREAM_BYTES`] in all, `seq` strictly increasing.
#[derive(Debug, Clone)]
pub struct MetricsStreamRules {
    batches: usize,
    last_seq: u64,
}

impl MetricsStreamRules {
    /// The rules of a stream whose first batch had `first_seq`.
    pub fn new(first_seq: u64) -> Self {
        Self {
            batches: 1,
            last_seq: first_seq,
        }
    }

    /// Checks the next frame of the stream, `stream_bytes` being the frame
    /// bodies read on the stream so far, this one's included; a batch that
    /// keeps the rules is counted in and handed back.
    pub fn accept(
        &mut self,
        next: AgentMessage,
        stream_bytes: u64,
    ) -> Result<MetricsBatch, MetricsStreamViolation> {
        let AgentMessage::MetricsBatch(batch) = next else {
            return Err(MetricsStreamViolation::NotABatch);
        };
        if self.batches >= MAX_BATCHES_PER_STREAM {
            return Err(MetricsStreamViolation::TooManyBatches);
        }
        if stream_bytes > MAX_METRICS_STREAM_BYTES {
            return Err(MetricsStreamViolation::TooManyBytes);
        }
        if batch.seq <= self.last_seq {
            return Err(MetricsStreamViolation::OutOfOrder {
                previous: self.last_seq,
                next: batch.seq,
            });
        }
        self.batches += 1;
        self.last_seq = batch.seq;
        Ok(batch)
    }
}

/// Decides what a stream opened by `peer` with `first` is for.
pub fn classify_first_message(
    peer: PeerKind,
    first: &AgentMessage,
) -> Result<StreamKind, Violation> {
    match (peer, first) {
        (PeerKind::Unauthenticated, AgentMessage::Enroll(_)) => Ok(StreamKind::Enrollment),
        (PeerKind::Unauthenticated, _) => Err(Violation::NotEnrolled),
        (PeerKind::Agent, AgentMessage::Enroll(_)) => Err(Violation::AlreadyEnrolled),
        (PeerKind::Agent, AgentMessage::Hello(_)) => Ok(StreamKind::Control),
        (PeerKind::Agent, AgentMessage::RenewCertificate(_)) => Ok(StreamKind::CertificateRenewal),
        (PeerKind::Agent, AgentMessage::MetricsBatch(_)) => Ok(StreamKind::Metrics),
        (PeerKind::Agent, AgentMessage::HealthReport(_)) => Ok(StreamKind::Health),
        (
            PeerKind::Agent,
            AgentMessage::Heartbeat(_)
            | AgentMessage::HealthChecksConfigured(_)
            | AgentMessage::CommandStarted { .. }
            | AgentMessage::CommandOutput { .. }
            | AgentMessage::CommandFinished(_),
        ) => Err(Violation::NotAStreamOpener),
    }
}

/// Decides what a stream the control plane opened with `first` is for. Only
/// `RunCommand`, `ConfigureHealthChecks` and `RunHealthChecksNow` open
/// streams; anything else is [`Violation::NotAStreamOpener`].
pub fn classify_control_opener(first: &ControlMessage) -> Result<ControlStreamKind, Violation> {
    match first {
        ControlMessage::RunCommand(_) => Ok(ControlStreamKind::Command),
        ControlMessage::ConfigureHealthChecks(_) | ControlMessage::RunHealthChecksNow => {
            Ok(ControlStreamKind::HealthConfig)
        }
        ControlMessage::Enrolled(_)
        | ControlMessage::EnrollRejected(_)
        | ControlMessage::Welcome(_)
        | ControlMessage::HelloRejected(_)
        | ControlMessage::HeartbeatAck(_)
        | ControlMessage::CertificateRenewed(_)
        | ControlMessage::RenewalRejected(_)
        | ControlMessage::Ack(_)
        | ControlMessage::HealthAck { .. }
        | ControlMessage::CancelCommand => Err(Violation::NotAStreamOpener),
    }
}
