//! Tether wire protocol: the messages agents, control planes and branches
//! exchange, and the framing that carries them on a QUIC stream.
//!
//! This crate owns *what* is said, never *how* bytes move: it has no sockets,
//! no async runtime and no storage. Everything here is deterministic and is
//! tested in memory (round trips, property tests over random bytes, a fuzz
//! target under `fuzz/`).
//!
//! * [`messages`] — the typed messages, one enum per direction.
//! * [`federation`] — branch-to-branch messages (ALPN `tether-branch/1`).
//! * [`codec`] — `u32` length prefix + postcard body, with a maximum frame size.
//! * [`session`] — protocol rules that do not need IO: version negotiation,
//!   what an unauthenticated peer may do, what opens which stream (both
//!   directions), connection close codes.

pub mod codec;
pub mod federation;
pub mod messages;
pub mod session;

pub use codec::{FrameCodec, FrameError, MAX_FRAME_LEN};
pub use federation::{
    classify_branch_request, BranchCall, BranchPeerKind, BranchRequest, BranchResponse,
    BranchViolation, JoinAccepted, JoinRequest, PublishedServer, RefusalCode, RelayedCommand,
    RelayedCommandState, RelayedHealthResult, RelayedServerHealth, VerificationKey, BRANCH_ALPN,
};
pub use messages::*;
pub use session::{
    classify_control_opener, classify_first_message, negotiate_version, CloseCode,
    ControlStreamKind, MetricsStreamRules, MetricsStreamViolation, PeerKind, StreamKind,
    VersionError, Violation, MAX_BATCHES_PER_STREAM, MAX_METRICS_STREAM_BYTES,
};

/// ALPN protocol id spoken on every Tether QUIC connection.
pub const ALPN: &[u8] = b"tether/1";

/// Highest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Lowest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Server name agents verify in the control plane's certificate. The control
/// plane's certificate always carries it, whatever address agents dial, so an
/// agent can reach its control plane by IP, DNS name or tunnel alike; trust
/// comes from the pinned CA, not from the dialled name.
pub const CONTROL_PLANE_SERVER_NAME: &str = "control-plane.tether.internal";
