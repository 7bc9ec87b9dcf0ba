//! Federation state of a running control plane ([`Federation`]): signing
//! keys, token caches and the live connections to peer branches.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::keys;

/// Federation state of a running control plane.
#[derive(Default)]
pub struct Federation {
    pub keys: keys::KeyRing,
    /// Tokens signed for peers, reused while fresh.
    pub tokens: keys::TokenCache,
    /// Peers' tokens already verified.
    pub verified: keys::VerifiedTokens,
    /// Peer id -> (client endpoint, live connection).
    pub(crate) connections: Mutex<HashMap<Uuid, (quinn::Endpoint, quinn::Connection)>>,
    /// Peers with a heartbeat round in flight.
    pub(crate) in_flight: Mutex<HashSet<Uuid>>,
    /// Heartbeat rounds per peer (decides inventory pulls).
    pub(crate) rounds: Mutex<HashMap<Uuid, u64>>,
    /// Per peer, the long-poll calls (`AwaitCommand`) that may be open at
    /// once, so they never take every stream the peer allows on the
    /// connection (heartbeats and relays keep theirs).
    pub(crate) await_slots: Mutex<HashMap<Uuid, Arc<tokio::sync::Semaphore>>>,
}

/// Long-poll calls open at once per peer (QUIC allows 100 streams).
pub const MAX_AWAITS_PER_PEER: usize = 64;

impl Federation {
    pub(crate) fn cached(&self, peer: Uuid) -> Option<quinn::Connection> {
        let map = self.connections.lock().ok()?;
        let (_, connection) = map.get(&peer)?;
        connection
            .close_reason()
            .is_none()
            .then(|| connection.clone())
    }

    /// The long-poll slots of `peer`.
    pub fn await_slots(&self, peer: Uuid) -> Arc<tokio::sync::Semaphore> {
        let mut map = self
            .await_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(peer)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_AWAITS_PER_PEER)))
            .clone()
    }

    /// Closes and forgets the connection to `peer`.
    pub fn forget(&self, peer: Uuid) {
        if let Ok(mut map) = self.connections.lock() {
            if let Some((_, connection)) = map.remove(&peer) {
                tether_transport::close(&connection, tether_protocol::CloseCode::Normal);
            }
        }
    }
}
