//! Live agent sessions on this replica: server id -> connection.
//!
//! A server has at most one session; a newer one supersedes (closes) the
//! older. Each entry has a generation so that only the session that is still
//! current marks its server offline when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tether_protocol::CloseCode;
use uuid::Uuid;

#[derive(Debug)]
struct Entry {
    generation: u64,
    connection: quinn::Connection,
}

/// The registry of sessions held by this replica.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<Uuid, Entry>>,
    next_generation: AtomicU64,
}

impl SessionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every critical section is a single map operation).
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a session, closing any older session of the same server.
    /// Returns the new session's generation.
    pub fn register(&self, server_id: Uuid, connection: quinn::Connection) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let previous = self.lock().insert(
            server_id,
            Entry {
                generation,
                connection,
            },
        );
        if let Some(previous) = previous {
            tether_transport::close(&previous.connection, CloseCode::Superseded);
        }
        generation
    }

    /// Removes the session if it is still generation `generation`; true when
    /// it was (and the server is therefore no longer connected here).
    pub fn remove(&self, server_id: Uuid, generation: u64) -> bool {
        let mut sessions = self.lock();
        match sessions.get(&server_id) {
            Some(entry) if entry.generation == generation => {
                sessions.remove(&server_id);
                true
            }
            _ => false,
        }
    }

    /// Closes a server's session, if it has one here.
    pub fn disconnect(&self, server_id: Uuid, code: CloseCode) -> bool {
        let entry = self.lock().remove(&server_id);
        match entry {
            Some(entry) => {
                tether_transport::close(&entry.connection, code);
                true
            }
            None => false,
        }
    }

    /// The connection of a server's live session.
    pub fn connection(&self, server_id: Uuid) -> Option<quinn::Connection> {
        self.lock().get(&server_id).map(|e| e.connection.clone())
    }

    /// Ids of every server connected here.
    pub fn server_ids(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every session (shutdown).
    pub fn close_all(&self, code: CloseCode) -> Vec<Uuid> {
        let drained: Vec<(Uuid, Entry)> = self.lock().drain().collect();
        drained
            .into_iter()
            .map(|(id, entry)| {
                tether_transport::close(&entry.connection, code);
                id
            })
            .collect()
    }
}
