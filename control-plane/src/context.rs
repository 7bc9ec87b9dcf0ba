//! The shared state of a running control plane ([`ControlPlane`]). Every
//! field is a state type defined in a leaf module that does not import this
//! one, so modules may take `&ControlPlane` without forming an import cycle.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::TokenAuthority;
use crate::config::ServeConfig;
use crate::gateway::registry::SessionRegistry;
use crate::pki::Pki;
use crate::secrets::Sealer;
use crate::store::{Instance, Store};

/// Shared state of a running control plane.
pub struct ControlPlane {
    pub config: ServeConfig,
    pub store: Arc<dyn Store>,
    pub sealer: Sealer,
    pub tokens: TokenAuthority,
    pub pki: Pki,
    pub instance: Instance,
    pub sessions: SessionRegistry,
    pub rate_limiter: crate::rate_limit::RateLimiter,
    /// Failed enrollments per source address (rate limit, audit rows).
    pub enroll_failures: crate::enrollment::FailureLog,
    pub ingestor: crate::gateway::ingest::Ingestor,
    /// What agents are told to dial.
    pub public_quic_addr: String,
    /// Base URL of the HTTP API.
    pub api_url: String,
    /// URL of the HTTP API from this machine (terraform's state backend).
    pub local_api_url: String,
    /// Agent binaries served to provisioned servers.
    pub agent_binaries: crate::provision::agent_binaries::AgentBinaries,
    /// Key deriving per-deployment passwords of the Terraform state backend.
    pub backend_key: Vec<u8>,
    /// Identifies this process when it claims jobs.
    pub worker_id: String,
    /// Wakes the provisioning workers when a job is queued here.
    pub provision_wakeup: tokio::sync::Notify,
    /// Branch federation: peer connections and signing keys.
    pub federation: crate::federation::state::Federation,
    /// Where this process listens (webhook URLs may not point here).
    pub addresses: BoundAddresses,
    /// Wakes the webhook delivery worker when a delivery is queued here.
    pub webhook_wakeup: tokio::sync::Notify,
    /// Commands running on this replica (see `commands`).
    pub commands: crate::commands::live::CommandRelay,
    /// Health-check pushes in flight here and what was last pushed to each
    /// server (see `health`).
    pub health_pushes: crate::health_pushes::HealthPushes,
    /// Regions, instance types and list prices per provider (`catalog`).
    pub catalog: crate::catalog::Catalog,
    pub shutdown: CancellationToken,
}

/// Addresses a started control plane listens on.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BoundAddresses {
    pub api: SocketAddr,
    pub quic: SocketAddr,
}
