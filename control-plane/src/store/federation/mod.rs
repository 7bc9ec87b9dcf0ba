//! Branch peerings, invites, federation keys and remote inventory.
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite
//! (`control-plane/tests/store_federation.rs`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Labels, StoreResult};

mod postgres;
mod sqlite;

/// A one-time invite this branch made. Only the secret's hash is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchInvite {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    /// SHA-256 of the invite secret, hex.
    pub secret_hash: String,
    /// Scopes granted to the branch that redeems it.
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// How a peer answers this branch's heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BranchStatus {
    /// Heartbeats answered in time.
    Healthy,
    /// Some recent heartbeats failed, or answered slowly.
    Degraded,
    /// No heartbeat answered for the unreachable threshold.
    Unreachable,
}

impl BranchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unreachable => "unreachable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "healthy" => Some(Self::Healthy),
            "degraded" => Some(Self::Degraded),
            "unreachable" => Some(Self::Unreachable),
            _ => None,
        }
    }
}

/// A peering with another branch, as this branch keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchPeer {
    /// The peer's branch id.
    pub id: Uuid,
    /// The organization of this branch the peering belongs to (and acts in).
    pub organization_id: Uuid,
    pub name: String,
    /// The peer's QUIC address.
    pub address: String,
    /// The peer's CA certificate (pinned), PEM.
    pub ca_cert_pem: String,
    /// The branch certificate the peer issued to this branch, DER, [leaf, CA].
    pub client_chain: Vec<Vec<u8>>,
    /// Its private key, sealed (context [`branch_client_key_context`]).
    pub client_key_sealed: String,
    /// The peer's JWT verification keys.
    pub peer_keys: Vec<tether_protocol::VerificationKey>,
    /// Scopes this branch granted the peer (enforced on its calls).
    pub granted_scopes: Vec<String>,
    /// Scopes the peer granted this branch (put in the tokens it sends).
    pub remote_scopes: Vec<String>,
    /// The peer's organization the peering acts in (token `org`).
    pub remote_organization_id: String,
    pub status: BranchStatus,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub latency_ms: Option<i64>,
    pub server_count: i64,
    pub created_at: DateTime<Utc>,
}

/// Sealing context of a peering's client key.
pub fn branch_client_key_context(peer_id: Uuid) -> String {
    format!("branch-client-key/{peer_id}")
}

/// Sealing context of a federation signing key.
pub fn federation_key_context(kid: Uuid) -> String {
    format!("federation-signing-key/{kid}")
}

/// One of this branch's ES256 keys signing inter-branch JWTs.
#[derive(Debug, Clone, PartialEq)]
pub struct FederationKey {
    pub kid: Uuid,
    /// PKCS#8 DER of the private key, sealed (context [`federation_key_context`]).
    pub private_key_sealed: String,
    /// Public point, base64url coordinates.
    pub x: String,
    pub y: String,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
}

/// A server a peer published.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteServer {
    pub branch_id: Uuid,
    pub id: Uuid,
    /// The organization of this branch the peering belongs to.
    pub organization_id: Uuid,
    pub name: String,
    pub hostname: String,
    pub labels: Labels,
    pub status: String,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub agent_version: Option<String>,
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<i64>,
    pub memory_total_bytes: Option<i64>,
    pub synced_at: DateTime<Utc>,
}

/// Health fields a heartbeat round updates.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchHealth {
    pub status: BranchStatus,
    /// Set when the peer answered.
    pub last_seen_at: Option<DateTime<Utc>>,
    pub latency_ms: Option<i64>,
    pub server_count: Option<i64>,
}

/// A command relayed to a peer branch, as this branch mirrors it. The
/// mirror is shown like a local command whose server is the peer's.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayedCommandRecord {
    /// The peer's branch id.
    pub branch_id: Uuid,
    /// The command's id on the peer.
    pub remote_command_id: String,
    /// The mirror: its own id, the peer's server id as `server_id`, and
    /// status, exit code and output as last copied from the peer.
    pub command: super::CommandRecord,
}

/// What a follower copied from the peer.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayedCommandUpdate {
    pub status: super::CommandState,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub output: Vec<u8>,
    pub output_truncated: bool,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Output bound and delivery window a mirror reports (the peer's relay
/// applies them).
pub const RELAYED_MAX_OUTPUT_BYTES: i64 = 1 << 20;
pub const RELAYED_DELIVER_WITHIN: chrono::Duration = chrono::Duration::seconds(60);

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait FederationStore: Send + Sync {
    /// Records a new invite.
    async fn create_branch_invite(&self, invite: &BranchInvite) -> StoreResult<()>;

    /// Marks the invite used if `secret_hash` matches and it is unused and
    /// unexpired at `now`, in one statement: of several redeemers exactly one
    /// wins. Returns the invite when this call redeemed it.
    async fn redeem_branch_invite(
        &self,
        id: Uuid,
        secret_hash: &str,
        used_by: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<BranchInvite>>;

    /// Creates the peering, or replaces it when a peering with the same
    /// branch id exists in the same organization under the same CA (a
    /// re-peer); its `created_at` and remote inventory stay. In one
    /// statement. False (and nothing changed) when a peering with that id
    /// belongs to another organization or has another CA: a branch id that
    /// is known here cannot be taken over.
    async fn upsert_branch_peer(&self, peer: &BranchPeer) -> StoreResult<bool>;

    /// One peering; `scope` limits it to those organizations (`None`: any,
    /// for the federation machinery itself).
    async fn branch_peer(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<BranchPeer>>;

    /// Peerings, by id; `scope` as in [`FederationStore::branch_peer`].
    async fn list_branch_peers(&self, scope: Option<&[Uuid]>) -> StoreResult<Vec<BranchPeer>>;

    /// Removes a peering and its remote inventory. True when it existed.
    async fn delete_branch_peer(&self, scope: Option<&[Uuid]>, id: Uuid) -> StoreResult<bool>;

    /// Records a heartbeat round; returns the status before it (`None`: no
    /// such peering).
    async fn record_branch_health(
        &self,
        id: Uuid,
        health: &BranchHealth,
    ) -> StoreResult<Option<BranchStatus>>;

    /// Replaces the peer's verification keys.
    async fn set_branch_peer_keys(
        &self,
        id: Uuid,
        keys: &[tether_protocol::VerificationKey],
    ) -> StoreResult<()>;

    /// Replaces the peer's published inventory with `servers`.
    async fn replace_remote_servers(
        &self,
        branch_id: Uuid,
        servers: &[RemoteServer],
    ) -> StoreResult<()>;

    /// Remote servers of peerings belonging to `scope`, by (branch, id).
    async fn list_remote_servers(&self, scope: &[Uuid]) -> StoreResult<Vec<RemoteServer>>;

    /// This branch's signing keys, oldest first.
    async fn federation_keys(&self) -> StoreResult<Vec<FederationKey>>;

    /// Adds a signing key and retires every other unretired key at its
    /// creation time, in one transaction.
    async fn rotate_federation_key(&self, key: &FederationKey) -> StoreResult<()>;

    /// Records the mirror of a command a peer accepted.
    async fn create_relayed_command(&self, relayed: &RelayedCommandRecord) -> StoreResult<()>;

    /// Copies the peer's view into a mirror that has not ended yet; false
    /// when it had (a terminal status is never changed).
    async fn update_relayed_command(
        &self,
        id: Uuid,
        update: &RelayedCommandUpdate,
    ) -> StoreResult<bool>;

    /// A mirror, within `scope` when given.
    async fn relayed_command(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<RelayedCommandRecord>>;

    /// Mirrors whose command has not ended (followers to resume).
    async fn unfinished_relayed_commands(&self) -> StoreResult<Vec<RelayedCommandRecord>>;
}
