//! Branch federation: peering (one-time invites, CA and key exchange over
//! QUIC, branch certificates), inter-branch JWTs ([`keys`]), heartbeats and
//! branch health with `branch.unreachable` / `branch.healthy` events,
//! inventory sync, and the calls the relay makes. See `docs/federation.md`.
//!
//! * [`invite`] — the invite text and the joining side of the handshake.
//! * [`server`] — connections peers open to this branch (ALPN
//!   `tether-branch/1`): joins, and authenticated calls.
//! * [`keys`] — signing and verifying inter-branch tokens.
//!
//! Every branch dials each of its peers itself (one cached connection per
//! peer, authenticated with the branch certificate that peer issued) and
//! heartbeats it every [`HEARTBEAT_INTERVAL`]; what it learns (health,
//! latency, keys, inventory) it stores, so every replica and the API read
//! the same picture.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tether_protocol::{BranchCall, BranchRequest, BranchResponse, RefusalCode};
use tracing::Instrument;
use uuid::Uuid;

use crate::context::ControlPlane;
use crate::store::{
    branch_client_key_context, BranchHealth, BranchPeer, BranchStatus, RemoteServer,
};

pub mod invite;
pub mod keys;
pub mod relay;
pub mod server;
pub mod state;

/// How often each peer is heartbeated.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A heartbeat not answered within this long failed.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
/// A peer whose heartbeats failed for this long is `unreachable`.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(10);
/// A heartbeat answered slower than this makes the peer `degraded`.
pub const DEGRADED_LATENCY: Duration = Duration::from_millis(500);
/// The inventory is pulled every this many heartbeats (and whenever the
/// peer's server count changes or it comes back).
const INVENTORY_EVERY: u64 = 3;
/// A relayed request waits at most this long for an unreachable peer.
pub const RELAY_TIMEOUT: Duration = Duration::from_millis(900);
/// Lifetime of branch certificates issued at peering.
pub const BRANCH_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The client side of the branch-to-branch stream.
pub type BranchClientStream = tether_transport::FramedStream<BranchResponse, BranchRequest>;
/// The server side of the branch-to-branch stream.
pub type BranchServerStream = tether_transport::FramedStream<BranchRequest, BranchResponse>;

/// Errors talking to a peer.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("branch {0} is unreachable: {1}")]
    Unreachable(Uuid, String),
    #[error("branch refused the request ({code:?}): {message}")]
    Refused { code: RefusalCode, message: String },
    #[error("branch answered out of protocol: {0}")]
    Protocol(String),
    #[error("the peering was removed by the other branch")]
    PeeringRevoked,
    #[error("invite is not valid: {0}")]
    InvalidInvite(String),
    /// A peering with this branch id exists in another organization or
    /// under another CA; a known branch id is never taken over.
    #[error("branch {0} is already a peer of another organization or under another CA")]
    BranchIdTaken(Uuid),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("keys: {0}")]
    Key(#[from] keys::KeyError),
    #[error("certificates: {0}")]
    Cert(#[from] tether_certs::CertError),
    #[error("sealed value: {0}")]
    Sealed(#[from] crate::secrets::SecretError),
    #[error("transport: {0}")]
    Transport(#[from] tether_transport::TransportError),
}

/// Whether branch `id` may be peered into `organization_id` under the CA
/// whose fingerprint is `ca`: yes when no peering with that id exists, or
/// when the one that exists is in the same organization under the same CA
/// (a re-peer). The store applies the same rule atomically when the
/// peering is written ([`crate::store::FederationStore::upsert_branch_peer`]);
/// this check answers early, before any certificate is issued. Returns
/// whether a peering existed.
pub(crate) async fn check_peering_rule(
    cp: &ControlPlane,
    id: Uuid,
    organization_id: Uuid,
    ca: &tether_certs::CaFingerprint,
) -> Result<bool, FederationError> {
    let Some(existing) = cp.store.branch_peer(None, id).await? else {
        return Ok(false);
    };
    let same_ca = tether_certs::authority::pem_to_der(&existing.ca_cert_pem)
        .map(|der| ca.matches(&der))
        .unwrap_or(false);
    if existing.organization_id != organization_id || !same_ca {
        tracing::warn!(
            branch_id = %id,
            same_organization = existing.organization_id == organization_id,
            same_ca,
            "refused a peering that would take over a known branch id"
        );
        return Err(FederationError::BranchIdTaken(id));
    }
    Ok(true)
}

pub use state::{Federation, MAX_AWAITS_PER_PEER};

/// Resolves `address` (`host:port`).
pub(crate) async fn resolve(address: &str) -> Result<std::net::SocketAddr, String> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to nothing"))
}

/// Opens (or reuses) the connection to `peer`.
async fn connection(
    cp: &ControlPlane,
    peer: &BranchPeer,
) -> Result<quinn::Connection, FederationError> {
    if let Some(connection) = cp.federation.cached(peer.id) {
        return Ok(connection);
    }
    let unreachable = |e: String| FederationError::Unreachable(peer.id, e);
    let ca_der = tether_certs::authority::pem_to_der(&peer.ca_cert_pem)?;
    let pin = tether_certs::CaFingerprint::of_der(&ca_der);
    let key_pem = cp
        .sealer
        .open(&peer.client_key_sealed, &branch_client_key_context(peer.id))?;
    let key_pem = String::from_utf8(key_pem)
        .map_err(|_| FederationError::Protocol("stored client key is not PEM".into()))?;
    let key = tether_certs::authority::pem_to_private_key(&key_pem)?;
    let chain = peer
        .client_chain
        .iter()
        .map(|der| rustls_pki_types::CertificateDer::from(der.clone()))
        .collect();
    let tls = tether_certs::branch_client_config(pin, Some((chain, key)))?;
    let remote = resolve(&peer.address).await.map_err(unreachable)?;
    let endpoint = tether_transport::client_endpoint(remote, tls)?;
    let connection = tether_transport::connect_control_plane(&endpoint, remote)
        .await
        .map_err(|e| match &e {
            tether_transport::TransportError::Connection(c)
                if tether_transport::close_code_of(c)
                    == Some(tether_protocol::CloseCode::Revoked) =>
            {
                FederationError::PeeringRevoked
            }
            _ => unreachable(e.to_string()),
        })?;
    if let Ok(mut map) = cp.federation.connections.lock() {
        map.insert(peer.id, (endpoint, connection.clone()));
    }
    Ok(connection)
}

/// Sends one authenticated call to `peer` and returns its answer. Refusals
/// are [`FederationError::Refused`]. The whole exchange is bounded by `timeout`.
pub async fn call(
    cp: &ControlPlane,
    peer: &BranchPeer,
    call: BranchCall,
    timeout: Duration,
) -> Result<BranchResponse, FederationError> {
    let exchange = async {
        let connection = connection(cp, peer).await?;
        let token = cp
            .federation
            .tokens
            .token_for(
                &cp.federation.keys,
                &*cp.store,
                &cp.sealer,
                peer.id,
                keys::claims_for(
                    cp.instance.branch_id,
                    peer.id,
                    &peer.remote_organization_id,
                    &peer.remote_scopes,
                ),
            )
            .await?;
        let answer = async {
            let mut stream = BranchClientStream::open(&connection).await?;
            let answer = stream.request(&BranchRequest::Call { token, call }).await?;
            let _ = stream.finish();
            Ok::<_, tether_transport::TransportError>(answer)
        }
        .await;
        match answer {
            Ok(BranchResponse::Refused { code, message }) => {
                Err(FederationError::Refused { code, message })
            }
            Ok(answer) => Ok(answer),
            Err(e) => {
                let revoked = connection
                    .close_reason()
                    .as_ref()
                    .and_then(tether_transport::close_code_of)
                    == Some(tether_protocol::CloseCode::Revoked);
                cp.federation.forget(peer.id);
                if revoked {
                    Err(FederationError::PeeringRevoked)
                } else {
                    Err(FederationError::Unreachable(peer.id, e.to_string()))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => {
            cp.federation.forget(peer.id);
            Err(FederationError::Unreachable(
                peer.id,
                format!("no answer within {} ms", timeout.as_millis()),
            ))
        }
    }
}

/// Heartbeats every peer until shutdown.
pub async fn heartbeat_loop(cp: Arc<ControlPlane>) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let peers = match cp.store.list_branch_peers(None).await {
            Ok(peers) => peers,
            Err(e) => {
                tracing::warn!(error = %e, "could not list branch peers");
                continue;
            }
        };
        for peer in peers {
            let fresh = cp
                .federation
                .in_flight
                .lock()
                .map(|mut set| set.insert(peer.id))
                .unwrap_or(false);
            if !fresh {
                continue;
            }
            let cp = cp.clone();
            let span = tracing::info_span!("branch_heartbeat", branch_id = %peer.id);
            tokio::spawn(
                async move {
                    let id = peer.id;
                    heartbeat_round(&cp, peer).await;
                    if let Ok(mut set) = cp.federation.in_flight.lock() {
                        set.remove(&id);
                    }
                }
                .instrument(span),
            );
        }
    }
}

/// One heartbeat of one peer: health, keys, and the inventory when due.
async fn heartbeat_round(cp: &ControlPlane, peer: BranchPeer) {
    let round = cp
        .federation
        .rounds
        .lock()
        .map(|mut rounds| {
            let n = rounds.entry(peer.id).or_insert(0);
            *n += 1;
            *n
        })
        .unwrap_or(1);
    let started = Instant::now();
    let now = Utc::now();
    let sent_at_ms = now.timestamp_millis();
    let result = call(
        cp,
        &peer,
        BranchCall::Heartbeat { sent_at_ms },
        HEARTBEAT_TIMEOUT,
    )
    .await;
    let health = match &result {
        Ok(BranchResponse::HeartbeatAck {
            keys, server_count, ..
        }) => {
            let latency = started.elapsed();
            if *keys != peer.peer_keys {
                if let Err(e) = cp.store.set_branch_peer_keys(peer.id, keys).await {
                    tracing::warn!(error = %e, "could not store the peer's keys");
                }
            }
            BranchHealth {
                status: if latency > DEGRADED_LATENCY {
                    BranchStatus::Degraded
                } else {
                    BranchStatus::Healthy
                },
                last_seen_at: Some(Utc::now()),
                latency_ms: Some(latency.as_millis() as i64),
                server_count: Some(i64::from(*server_count)),
            }
        }
        Err(FederationError::PeeringRevoked) => {
            tracing::warn!("peer removed the peering; removing it here too");
            cp.federation.forget(peer.id);
            if let Err(e) = cp.store.delete_branch_peer(None, peer.id).await {
                tracing::warn!(error = %e, "could not remove the peering");
            }
            return;
        }
        other => {
            if let Err(e) = other {
                tracing::debug!(error = %e, "heartbeat failed");
            }
            let silent_for = peer
                .last_seen_at
                .map(|seen| (now - seen).to_std().unwrap_or_default())
                .unwrap_or(Duration::MAX);
            BranchHealth {
                status: if silent_for >= UNREACHABLE_AFTER {
                    BranchStatus::Unreachable
                } else {
                    BranchStatus::Degraded
                },
                last_seen_at: None,
                latency_ms: None,
                server_count: None,
            }
        }
    };
    let before = match cp.store.record_branch_health(peer.id, &health).await {
        Ok(Some(before)) => before,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "could not record branch health");
            return;
        }
    };
    let root = cp.instance.root_organization_id;
    let event_data = serde_json::json!({
        "branch_id": peer.id,
        "name": peer.name,
        "address": peer.address,
        "status": health.status,
        "last_seen_at": health.last_seen_at.or(peer.last_seen_at),
    });
    if health.status == BranchStatus::Unreachable && before != BranchStatus::Unreachable {
        tracing::warn!(name = %peer.name, "branch unreachable");
        crate::events::emit(cp, root, "branch.unreachable", event_data).await;
    } else if health.status == BranchStatus::Healthy && before == BranchStatus::Unreachable {
        tracing::info!(name = %peer.name, "branch healthy again");
        crate::events::emit(cp, root, "branch.healthy", event_data).await;
    }
    let answered = health.last_seen_at.is_some();
    let count_changed = health
        .server_count
        .is_some_and(|count| count != peer.server_count);
    if answered && (round % INVENTORY_EVERY == 1 || count_changed || before != health.status) {
        sync_inventory(cp, &peer).await;
    }
}

/// Pulls the peer's published servers into the store.
async fn sync_inventory(cp: &ControlPlane, peer: &BranchPeer) {
    let servers = match call(cp, peer, BranchCall::Inventory, HEARTBEAT_TIMEOUT).await {
        Ok(BranchResponse::Inventory(servers)) => servers,
        Ok(_) => {
            tracing::warn!("peer answered the inventory out of protocol");
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "inventory pull failed");
            return;
        }
    };
    let now = Utc::now();
    let remote: Vec<RemoteServer> = servers
        .into_iter()
        .filter_map(|s| {
            Some(RemoteServer {
                branch_id: peer.id,
                id: Uuid::parse_str(&s.id).ok()?,
                organization_id: peer.organization_id,
                name: s.name,
                hostname: s.hostname,
                labels: s.labels.into_iter().collect(),
                status: s.status,
                last_seen_at: s
                    .last_seen_at_ms
                    .and_then(chrono::DateTime::from_timestamp_millis),
                agent_version: s.agent_version,
                cpu_percent: s.cpu_percent,
                memory_used_bytes: s.memory_used_bytes.and_then(|v| i64::try_from(v).ok()),
                memory_total_bytes: s.memory_total_bytes.and_then(|v| i64::try_from(v).ok()),
                synced_at: now,
            })
        })
        .collect();
    if let Err(e) = cp.store.replace_remote_servers(peer.id, &remote).await {
        tracing::warn!(error = %e, "could not store the peer's inventory");
    }
}
