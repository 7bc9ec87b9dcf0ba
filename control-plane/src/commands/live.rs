//! Commands running on this replica ([`CommandRelay`]): their live output
//! and end, which followers on this replica subscribe to, and the fan-out
//! targets this replica reserved.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::CommandState;

/// Output reaches the store at most this long after it arrived.
pub const OUTPUT_FLUSH: Duration = Duration::from_millis(250);

/// Something a follower of a running command sees.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// Output kept (within the bound).
    Output(Arc<[u8]>),
    /// The command ended (and its row says so).
    Finished(CommandState),
}

/// A command running on this replica.
pub(crate) struct LiveCommand {
    pub(crate) cancel: CancellationToken,
    pub(crate) output: Mutex<Vec<u8>>,
    pub(crate) events: broadcast::Sender<LiveEvent>,
}

impl LiveCommand {
    /// Records kept output and tells followers.
    pub(crate) fn push_output(&self, chunk: &[u8]) {
        let mut output = lock(&self.output);
        output.extend_from_slice(chunk);
        let _ = self.events.send(LiveEvent::Output(Arc::from(chunk)));
    }

    pub(crate) fn finished(&self, state: CommandState) {
        let _output = lock(&self.output);
        let _ = self.events.send(LiveEvent::Finished(state));
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single collection operation.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Commands running on this replica and fan-out targets waiting for a slot.
#[derive(Default)]
pub struct CommandRelay {
    pub(crate) live: Mutex<HashMap<Uuid, Arc<LiveCommand>>>,
    /// Queued commands a fan-out of this replica will dispatch itself.
    pub(crate) reserved: Mutex<HashSet<Uuid>>,
}

impl CommandRelay {
    /// Makes `id` followable here (live output and the end); the caller
    /// [`unregister`](Self::unregister)s it once the outcome is stored.
    pub(crate) fn register(&self, id: Uuid) -> Arc<LiveCommand> {
        let (events, _) = broadcast::channel(256);
        let live = Arc::new(LiveCommand {
            cancel: CancellationToken::new(),
            output: Mutex::new(Vec::new()),
            events,
        });
        lock(&self.live).insert(id, live.clone());
        live
    }

    pub(crate) fn unregister(&self, id: Uuid) {
        lock(&self.live).remove(&id);
    }

    /// Output so far and the live events after it, if the command runs here.
    pub fn follow(&self, id: Uuid) -> Option<(Vec<u8>, broadcast::Receiver<LiveEvent>)> {
        let live = lock(&self.live).get(&id).cloned()?;
        let output = lock(&live.output);
        Some((output.clone(), live.events.subscribe()))
    }

    /// Asks a command running here to stop; `false` when it does not run here.
    pub fn cancel_local(&self, id: Uuid) -> bool {
        match lock(&self.live).get(&id) {
            Some(live) => {
                live.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Commands running on this replica.
    pub fn running_here(&self) -> usize {
        lock(&self.live).len()
    }

    pub(crate) fn is_reserved(&self, id: Uuid) -> bool {
        lock(&self.reserved).contains(&id)
    }
}
