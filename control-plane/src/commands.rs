//! Commands run on agents: submission (one server or a fan-out over a
//! selector), routing to the replica holding the server's session, dispatch
//! over QUIC ([`crate::gateway::commands`]), bounded output, statuses and
//! cancellation.
//!
//! Routing. A command for a server whose session is on this replica is stored
//! already claimed (`running`) and dispatched at once. Otherwise it is stored
//! `queued`: on PostgreSQL every replica is told (`NOTIFY tether_commands`,
//! `run <id> <server>`) and the one holding the session claims it (a
//! conditional `UPDATE queued -> running`, so exactly one wins) and
//! dispatches it; a server that connects later gets its queued commands at
//! session start ([`on_session_start`]) and from the periodic sweep, which
//! also turns commands still queued past their delivery deadline into
//! `undeliverable`. Cancels of running commands go to the replica running
//! them the same way (`cancel <id>`).
//!
//! Fan-out. Targets are stored queued in one transaction, then dispatched
//! with at most `--command-concurrency` of them in flight on this replica
//! (targets connected to other replicas are handed to them at once).
//!
//! Live output. While a command runs here, its output so far and a broadcast
//! of new chunks are kept in memory ([`CommandRelay::follow`]) so SSE
//! followers see chunks as they arrive; the store receives output in batches
//! (at most every [`OUTPUT_FLUSH`]) and with the outcome.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::app::ControlPlane;
use crate::store::{
    command_env_context, CancelOutcome, ClaimedCommand, CommandState, NewCommand, StoreError,
};

/// Output stored per command unless the request asks for less.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// How long a command may wait for its server to connect, by default.
pub const DEFAULT_DELIVER_WITHIN: Duration = Duration::from_secs(60);
/// Output reaches the store at most this long after it arrived.
pub const OUTPUT_FLUSH: Duration = Duration::from_millis(250);
/// How often queued commands are looked at (delivery, deadlines).
pub const SWEEP_PERIOD: Duration = Duration::from_millis(500);
/// Targets of one fan-out, at most.
pub const MAX_FAN_OUT: usize = 10_000;

/// Errors of the command relay.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not encode the environment: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What to run, as the API received it.
#[derive(Clone)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    pub max_output_bytes: u64,
    pub deliver_within: Duration,
}

impl std::fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Environment values and stdin may be secrets.
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("CommandSpec")
            .field("argv", &self.argv)
            .field("env_names", &env_names)
            .field("stdin_len", &self.stdin.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("deliver_within", &self.deliver_within)
            .finish()
    }
}

/// A server a command goes to.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub server_id: Uuid,
    pub organization_id: Uuid,
}

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
    output: Mutex<Vec<u8>>,
    events: broadcast::Sender<LiveEvent>,
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single collection operation.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Commands running on this replica and fan-out targets waiting for a slot.
#[derive(Default)]
pub struct CommandRelay {
    live: Mutex<HashMap<Uuid, Arc<LiveCommand>>>,
    /// Queued commands a fan-out of this replica will dispatch itself.
    reserved: Mutex<HashSet<Uuid>>,
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

    fn is_reserved(&self, id: Uuid) -> bool {
        lock(&self.reserved).contains(&id)
    }
}

/// Stores a command for each target and starts delivering them; returns the
/// command ids in the order of `targets`.
pub async fn submit(
    cp: &Arc<ControlPlane>,
    targets: &[Target],
    spec: &CommandSpec,
    created_by: &str,
) -> Result<Vec<Uuid>, CommandError> {
    let now = Utc::now();
    let deliver_by = now
        + chrono::Duration::from_std(spec.deliver_within).unwrap_or(chrono::Duration::seconds(60));
    let env_plain = if spec.env.is_empty() {
        None
    } else {
        Some(serde_json::to_vec(&spec.env)?)
    };
    // One target connected here: store it claimed and dispatch at once.
    let direct = targets.len() == 1 && cp.sessions.connection(targets[0].server_id).is_some();
    let commands: Vec<NewCommand> = targets
        .iter()
        .map(|target| {
            let id = Uuid::now_v7();
            NewCommand {
                id,
                organization_id: target.organization_id,
                server_id: target.server_id,
                argv: spec.argv.clone(),
                env_sealed: env_plain
                    .as_ref()
                    .map(|env| cp.sealer.seal(env, &command_env_context(id))),
                stdin: spec.stdin.clone(),
                timeout_ms: i64::try_from(spec.timeout.as_millis()).unwrap_or(i64::MAX),
                max_output_bytes: i64::try_from(spec.max_output_bytes).unwrap_or(i64::MAX),
                created_by: created_by.to_string(),
                created_at: now,
                deliver_by,
                claimed_by: direct.then(|| cp.worker_id.clone()),
            }
        })
        .collect();
    let ids: Vec<Uuid> = commands.iter().map(|c| c.id).collect();
    if !direct {
        lock(&cp.commands.reserved).extend(
            commands
                .iter()
                .filter(|c| cp.sessions.connection(c.server_id).is_some())
                .map(|c| c.id),
        );
    }
    if let Err(e) = cp.store.create_commands(&commands).await {
        let mut reserved = lock(&cp.commands.reserved);
        for id in &ids {
            reserved.remove(id);
        }
        return Err(e.into());
    }
    if direct {
        let command = &commands[0];
        start(
            cp,
            ClaimedCommand {
                id: command.id,
                organization_id: command.organization_id,
                server_id: command.server_id,
                argv: command.argv.clone(),
                env_sealed: command.env_sealed.clone(),
                stdin: command.stdin.clone(),
                timeout_ms: command.timeout_ms,
                max_output_bytes: command.max_output_bytes,
                cancel_requested: false,
            },
            None,
        );
        return Ok(ids);
    }
    let (local, remote): (Vec<_>, Vec<_>) = commands
        .iter()
        .map(|c| (c.id, c.server_id))
        .partition(|(id, _)| cp.commands.is_reserved(*id));
    for (id, server_id) in remote {
        if let Err(e) = cp
            .store
            .notify_commands(&format!("run {id} {server_id}"))
            .await
        {
            tracing::warn!(command_id = %id, %server_id, error = %e, "could not notify replicas of a command");
        }
    }
    if !local.is_empty() {
        let cp = cp.clone();
        let slots = Arc::new(Semaphore::new(cp.config.command_concurrency as usize));
        tokio::spawn(async move {
            for (id, _server_id) in local {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                lock(&cp.commands.reserved).remove(&id);
                claim_and_start(&cp, id, Some(permit)).await;
            }
        });
    }
    Ok(ids)
}

/// Claims a queued command and dispatches it here; nothing when another
/// replica (or an earlier call) claimed it or it is no longer queued.
pub async fn claim_and_start(
    cp: &Arc<ControlPlane>,
    id: Uuid,
    permit: Option<OwnedSemaphorePermit>,
) {
    match cp.store.claim_command(id, &cp.worker_id, Utc::now()).await {
        Ok(Some(claimed)) => start(cp, claimed, permit),
        Ok(None) => {}
        Err(e) => tracing::warn!(command_id = %id, error = %e, "could not claim a command"),
    }
}

/// Dispatches a claimed command in a task of its own.
fn start(cp: &Arc<ControlPlane>, claimed: ClaimedCommand, permit: Option<OwnedSemaphorePermit>) {
    let live = cp.commands.register(claimed.id);
    let span =
        tracing::info_span!("command", command_id = %claimed.id, server_id = %claimed.server_id);
    let cp = cp.clone();
    tokio::spawn(
        async move {
            crate::gateway::commands::run(&cp, claimed, live).await;
            drop(permit);
        }
        .instrument(span),
    );
}

/// Cancels a command: a queued one without dispatching it; a running one by
/// telling whoever runs it (here, or another replica).
pub async fn cancel(
    cp: &Arc<ControlPlane>,
    scope: &[Uuid],
    id: Uuid,
) -> Result<CancelOutcome, CommandError> {
    let outcome = cp.store.cancel_command(scope, id, Utc::now()).await?;
    if outcome == CancelOutcome::Requested && !cp.commands.cancel_local(id) {
        cp.store.notify_commands(&format!("cancel {id}")).await?;
    }
    Ok(outcome)
}

/// Dispatches the commands queued for a server whose session just started
/// here (one call from the session code).
pub fn on_session_start(cp: Arc<ControlPlane>, server_id: Uuid) {
    tokio::spawn(async move {
        match cp
            .store
            .queued_commands(Some(server_id), Utc::now(), 1000)
            .await
        {
            Ok(queued) => {
                for (id, _) in queued {
                    if !cp.commands.is_reserved(id) {
                        claim_and_start(&cp, id, None).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%server_id, error = %e, "could not look up queued commands")
            }
        }
    });
}

/// Background work for the life of the control plane: notifications from
/// other replicas, delivery of queued commands to sessions held here, and
/// delivery deadlines.
pub async fn relay_loop(cp: Arc<ControlPlane>) {
    let notifications = match cp.store.command_notifications().await {
        Ok(notifications) => notifications,
        Err(e) => {
            tracing::error!(error = %e, "could not listen for command notifications; relying on the sweep");
            None
        }
    };
    if let Some(mut notifications) = notifications {
        let cp = cp.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            loop {
                let payload = tokio::select! {
                    _ = cp.shutdown.cancelled() => return,
                    payload = notifications.next() => match payload {
                        Some(payload) => payload,
                        None => return,
                    },
                };
                handle_notification(&cp, &payload).await;
            }
        });
    }
    let mut tick = tokio::time::interval(SWEEP_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&cp).await;
    }
}

async fn handle_notification(cp: &Arc<ControlPlane>, payload: &str) {
    let mut words = payload.split(' ');
    match (
        words.next(),
        words.next().map(Uuid::parse_str),
        words.next(),
    ) {
        (Some("run"), Some(Ok(id)), Some(server)) => {
            let Ok(server_id) = Uuid::parse_str(server) else {
                return;
            };
            if cp.sessions.connection(server_id).is_some() && !cp.commands.is_reserved(id) {
                claim_and_start(cp, id, None).await;
            }
        }
        (Some("cancel"), Some(Ok(id)), None) => {
            cp.commands.cancel_local(id);
        }
        _ => tracing::debug!(%payload, "ignored a malformed command notification"),
    }
}

/// One pass: expire undeliverable commands, dispatch queued commands whose
/// server is connected here.
async fn sweep(cp: &Arc<ControlPlane>) {
    let now = Utc::now();
    match cp.store.mark_undeliverable(now).await {
        Ok(expired) => {
            for id in expired {
                tracing::info!(command_id = %id, "command undeliverable: its server did not connect in time");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not sweep undeliverable commands"),
    }
    match cp.store.queued_commands(None, now, 1000).await {
        Ok(queued) => {
            for (id, server_id) in queued {
                if cp.sessions.connection(server_id).is_some() && !cp.commands.is_reserved(id) {
                    claim_and_start(cp, id, None).await;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list queued commands"),
    }
}
