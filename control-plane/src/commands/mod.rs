//! Commands run on agents: submission (one server or a fan-out over a
//! selector), routing to the replica holding the server's session, dispatch
//! over QUIC ([`dispatch`]), bounded output, statuses and
//! cancellation.
//!
//! Routing. A command for a server whose session is on this replica is stored
//! already claimed (`running`) and dispatched at once. Otherwise it is stored
//! `queued`: on PostgreSQL every replica is told (`NOTIFY tether_commands`
//! with a [`ReplicaNotice`], `run <id> <server>` on the wire; received by
//! [`notice_loop`]) and the one holding the session claims it (a
//! conditional `UPDATE queued -> running`, so exactly one wins) and
//! dispatches it; a server that connects later gets its queued commands at
//! session start ([`on_session_start`]) and from the periodic sweep
//! ([`sweep_loop`]), which also turns commands still queued past their
//! delivery deadline into `undeliverable`. Cancels of running commands go to the replica running
//! them the same way ([`ReplicaNotice::Cancel`], `cancel <id>`). Both loops
//! are started with the others by `crate::app`.
//!
//! Fan-out. What runs (argv, the sealed environment and the sealed stdin)
//! is stored once, as the request every target's command refers to. Targets
//! are stored queued in the same transaction, then dispatched
//! with at most `--command-concurrency` of them in flight on this replica
//! (targets connected to other replicas are handed to them at once).
//!
//! Live output. While a command runs here, its output so far and a broadcast
//! of new chunks are kept in memory ([`CommandRelay::follow`]) so SSE
//! followers see chunks as they arrive; the store receives output in batches
//! (at most every [`OUTPUT_FLUSH`]) and with the outcome.
//!
//! Where a command lives. [`lookup`] reads, cancels and follows a command
//! wherever it is (this replica, another one, or a peer branch for the
//! mirror of a relayed command); the API only maps its errors and events.

pub mod dispatch;
pub mod live;
pub mod lookup;
pub mod notice;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use uuid::Uuid;

use crate::context::ControlPlane;
use crate::store::{
    command_env_context, command_stdin_context, CancelOutcome, ClaimedCommand, NewCommand,
    NewCommandRequest, StoreError,
};
pub use notice::{NoticeError, ReplicaNotice};

/// Output stored per command unless the request asks for less.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// How long a command may wait for its server to connect, by default.
pub const DEFAULT_DELIVER_WITHIN: Duration = Duration::from_secs(60);
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

use live::lock;
pub(crate) use live::LiveCommand;
pub use live::{CommandRelay, LiveEvent, OUTPUT_FLUSH};

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
    let request_id = Uuid::now_v7();
    let request = NewCommandRequest {
        id: request_id,
        argv: spec.argv.clone(),
        env_sealed: if spec.env.is_empty() {
            None
        } else {
            let plain = serde_json::to_vec(&spec.env)?;
            Some(cp.sealer.seal(&plain, &command_env_context(request_id)))
        },
        stdin_sealed: spec
            .stdin
            .as_ref()
            .map(|stdin| cp.sealer.seal(stdin, &command_stdin_context(request_id))),
        created_at: now,
    };
    // One target connected here: store it claimed and dispatch at once.
    let direct = targets.len() == 1 && cp.sessions.connection(targets[0].server_id).is_some();
    let commands: Vec<NewCommand> = targets
        .iter()
        .map(|target| NewCommand {
            id: Uuid::now_v7(),
            request_id,
            organization_id: target.organization_id,
            server_id: target.server_id,
            timeout_ms: i64::try_from(spec.timeout.as_millis()).unwrap_or(i64::MAX),
            max_output_bytes: i64::try_from(spec.max_output_bytes).unwrap_or(i64::MAX),
            created_by: created_by.to_string(),
            created_at: now,
            deliver_by,
            claimed_by: direct.then(|| cp.worker_id.clone()),
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
    if let Err(e) = cp.store.create_commands(&request, &commands).await {
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
                request_id,
                organization_id: command.organization_id,
                server_id: command.server_id,
                argv: request.argv,
                env_sealed: request.env_sealed,
                stdin_sealed: request.stdin_sealed,
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
            .notify_commands(
                &ReplicaNotice::Run {
                    command_id: id,
                    server_id,
                }
                .to_payload(),
            )
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
            dispatch::run(&cp, claimed, live).await;
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
        cp.store
            .notify_commands(&ReplicaNotice::Cancel { command_id: id }.to_payload())
            .await?;
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

/// Receives the notices other replicas send ([`ReplicaNotice`]) for the
/// life of the control plane; returns at once on a single-process database
/// (no notices) or when it cannot listen (the sweep then finds the work).
pub async fn notice_loop(cp: Arc<ControlPlane>) {
    let notifications = match cp.store.command_notifications().await {
        Ok(notifications) => notifications,
        Err(e) => {
            tracing::error!(error = %e, "could not listen for command notifications; relying on the sweep");
            None
        }
    };
    let Some(mut notifications) = notifications else {
        return;
    };
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
}

/// Delivers queued commands to sessions held here and turns commands queued
/// past their delivery deadline `undeliverable`, every [`SWEEP_PERIOD`]
/// until shutdown.
pub async fn sweep_loop(cp: Arc<ControlPlane>) {
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
    match ReplicaNotice::parse(payload) {
        Ok(ReplicaNotice::Run {
            command_id,
            server_id,
        }) => {
            if cp.sessions.connection(server_id).is_some() && !cp.commands.is_reserved(command_id) {
                claim_and_start(cp, command_id, None).await;
            }
        }
        Ok(ReplicaNotice::Cancel { command_id }) => {
            cp.commands.cancel_local(command_id);
        }
        Err(e) => {
            tracing::debug!(%payload, error = %e, "ignored a malformed command notification")
        }
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
