//! The health-check push state of a running control plane
//! ([`HealthPushes`], a field of [`ControlPlane`](crate::context::ControlPlane)):
//! which servers have a push of their checks in flight on this replica
//! (coalesced, see [`CoalescedPushes`]) and the fingerprint of the set of
//! checks last pushed to each. The pushes themselves are made by
//! `crate::health`; this leaf module only keeps their state.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use uuid::Uuid;

use crate::store::Server;

/// Pushes in flight, by key (a server). At most one push per key runs at a
/// time, so pushes go out in order; a push asked for while one runs is kept
/// (the newest request replaces an older one) and made once the running one
/// ends. Queuing instead let a server whose agent does not answer (each push
/// then waits `crate::health::AGENT_ANSWER_TIMEOUT`) gather one more waiting
/// task every `crate::health::RECONCILE_INTERVAL`, for as long as its session
/// lasted.
#[derive(Debug)]
pub struct CoalescedPushes<K, T> {
    due: HashMap<K, Option<T>>,
}

impl<K: std::hash::Hash + Eq, T> Default for CoalescedPushes<K, T> {
    fn default() -> Self {
        Self {
            due: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq, T> CoalescedPushes<K, T> {
    /// Asks for a push of `item`. Returns it when the caller is to start the
    /// push now; `None` when one runs already (`item` is then made after it).
    pub fn request(&mut self, key: K, item: T) -> Option<T> {
        match self.due.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut running) => {
                *running.get_mut() = Some(item);
                None
            }
            std::collections::hash_map::Entry::Vacant(idle) => {
                idle.insert(None);
                Some(item)
            }
        }
    }

    /// The push of `key` ended. Returns the next one to make (asked for while
    /// it ran), or `None`: no push of `key` runs any more.
    pub fn finished(&mut self, key: &K) -> Option<T> {
        let next = self.due.get_mut(key).and_then(Option::take);
        if next.is_none() {
            self.due.remove(key);
        }
        next
    }

    /// Keys with a push running.
    pub fn running(&self) -> usize {
        self.due.len()
    }
}

/// The health-check push state of this replica.
#[derive(Debug, Default)]
pub struct HealthPushes {
    /// Pushes in flight, by server.
    in_flight: Mutex<CoalescedPushes<Uuid, Server>>,
    /// Fingerprint of the set of checks last pushed to each server connected
    /// here; removed when a push fails.
    last_pushed: Mutex<HashMap<Uuid, u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl HealthPushes {
    /// Asks for a push to `server` (see [`CoalescedPushes::request`]): the
    /// server when the caller is to start the push now, `None` when one
    /// runs already.
    pub fn request(&self, server: Server) -> Option<Server> {
        lock(&self.in_flight).request(server.id, server)
    }

    /// The push to `server_id` ended (see [`CoalescedPushes::finished`]):
    /// the next one to make, or `None`.
    pub fn finished(&self, server_id: Uuid) -> Option<Server> {
        lock(&self.in_flight).finished(&server_id)
    }

    /// Servers with a push running.
    pub fn running(&self) -> usize {
        lock(&self.in_flight).running()
    }

    /// Records that the set of checks with `fingerprint` reached `server_id`.
    pub fn pushed(&self, server_id: Uuid, fingerprint: u64) {
        lock(&self.last_pushed).insert(server_id, fingerprint);
    }

    /// Forgets what was pushed to `server_id` (its last push failed): the
    /// next reconcile pushes again.
    pub fn forget(&self, server_id: Uuid) {
        lock(&self.last_pushed).remove(&server_id);
    }

    /// Fingerprint of the set of checks last pushed to `server_id`.
    pub fn last_pushed(&self, server_id: Uuid) -> Option<u64> {
        lock(&self.last_pushed).get(&server_id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::{CoalescedPushes, HealthPushes};

    #[test]
    fn pushes_asked_for_while_one_runs_become_one_push_of_the_newest_request() {
        let mut pushes = CoalescedPushes::default();
        assert_eq!(pushes.request("web-1", 1), Some(1), "idle: push at once");
        // An agent that does not answer: every reconcile tick asks again.
        for tick in 2..=10 {
            assert_eq!(pushes.request("web-1", tick), None, "one push runs already");
        }
        assert_eq!(pushes.running(), 1);
        // Once the running push ends, exactly one more, with the newest row.
        assert_eq!(pushes.finished(&"web-1"), Some(10));
        assert_eq!(pushes.finished(&"web-1"), None);
        assert_eq!(pushes.running(), 0, "nothing is kept for an idle server");
        assert_eq!(
            pushes.request("web-1", 11),
            Some(11),
            "idle again: push at once"
        );
    }

    #[test]
    fn pushes_of_different_servers_do_not_wait_for_each_other() {
        let mut pushes = CoalescedPushes::default();
        assert_eq!(pushes.request("web-1", "a"), Some("a"));
        assert_eq!(pushes.request("web-2", "b"), Some("b"));
        assert_eq!(pushes.request("web-1", "c"), None);
        assert_eq!(pushes.finished(&"web-2"), None);
        assert_eq!(pushes.running(), 1);
        assert_eq!(pushes.finished(&"web-1"), Some("c"));
    }

    #[test]
    fn last_pushed_fingerprints_are_kept_per_server_until_forgotten() {
        let pushes = HealthPushes::default();
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        assert_eq!(pushes.last_pushed(a), None);
        pushes.pushed(a, 1);
        pushes.pushed(b, 2);
        pushes.pushed(a, 3);
        assert_eq!(pushes.last_pushed(a), Some(3));
        pushes.forget(a);
        assert_eq!(pushes.last_pushed(a), None);
        assert_eq!(pushes.last_pushed(b), Some(2));
        assert_eq!(pushes.running(), 0);
    }
}
