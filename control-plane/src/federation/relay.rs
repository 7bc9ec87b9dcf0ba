//! The cross-branch relay.
//!
//! Callee side ([`answer`]): commands a peer asks this branch to run on one
//! of its servers, their state (at once, or as soon as it changes), their
//! cancellation, and the health of its servers (latest results, run now).
//!
//! Caller side ([`follow`]): the mirror of each command this branch relayed.
//! A follower keeps one `AwaitCommand` call open at the peer, which answers
//! as soon as the command's status or output changes; the follower stores
//! the new state and hands new output and the end to local SSE followers
//! (the mirror is registered in [`crate::commands::CommandRelay`] like a
//! command running here), so `GET /api/v1/commands/{id}` and its `/output`
//! answer here with the peer's status and output, without polling.
//!
//! The call's token must carry the scope the call needs, the invite must
//! have granted it (both checked before this module is reached), and the
//! server must belong to the peering's organization tree. A peer reads,
//! awaits and cancels only the commands it relayed itself (created by
//! `branch:<its id>`): any other command, local or another peer's, is
//! `NotFound` to it. Commands are
//! submitted through `crate::commands` like local ones, so they run under
//! this branch's delivery rules and the agent's own policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_protocol::{
    BranchCall, BranchResponse, RefusalCode, RelayedCommandState, RelayedHealthResult,
    RelayedServerHealth,
};
use tracing::Instrument;
use uuid::Uuid;

use crate::commands::{CommandSpec, Target};
use crate::context::ControlPlane;
use crate::store::health::ServerRef;
use crate::store::{
    BranchPeer, CommandRecord, CommandState, RelayedCommandRecord, RelayedCommandUpdate,
};

/// How long one `AwaitCommand` call waits at most for a change.
pub const AWAIT_WAIT: Duration = Duration::from_secs(20);
/// The caller's bound on an `AwaitCommand` call (the wait, plus slack).
const AWAIT_CALL_TIMEOUT: Duration = Duration::from_secs(25);
/// The callee re-reads a command that does not run on this replica this often.
const AWAIT_POLL: Duration = Duration::from_millis(100);
/// A change that is not the end is held this long by the callee before it
/// answers (unless the command ends meanwhile).
const CHANGE_LINGER: Duration = Duration::from_millis(50);
/// After a failed call, the follower waits this long before trying again.
const FOLLOW_RETRY: Duration = Duration::from_millis(500);
/// A peer that has not answered a follower for this long fails the mirror.
const FOLLOW_GIVE_UP: Duration = Duration::from_secs(300);

/// Output kept for a relayed command (the peer copies it).
const MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// A relayed command not delivered to its agent within this long is undeliverable.
const DELIVER_WITHIN: Duration = Duration::from_secs(60);

/// Answers a relay call from `peer` (already authenticated and authorized
/// for the call's scope); `scope` is the peering's organization tree.
pub(crate) async fn answer(
    cp: &Arc<ControlPlane>,
    peer: &BranchPeer,
    scope: &[Uuid],
    call: BranchCall,
) -> BranchResponse {
    match call {
        BranchCall::RunCommand(command) => {
            let Ok(server_id) = Uuid::parse_str(&command.server_id) else {
                return refused(RefusalCode::Invalid, "server id is not a UUID");
            };
            if command.argv.first().is_none_or(|p| p.is_empty())
                || !(1..=3600).contains(&command.timeout_seconds)
            {
                return refused(
                    RefusalCode::Invalid,
                    "argv must name a program; timeout 1-3600 s",
                );
            }
            let server = match server_in_scope(cp, scope, server_id).await {
                Ok(server) => server,
                Err(refusal) => return refusal,
            };
            let spec = CommandSpec {
                argv: command.argv,
                env: command.env,
                stdin: command.stdin,
                timeout: Duration::from_secs(command.timeout_seconds),
                max_output_bytes: MAX_OUTPUT_BYTES,
                deliver_within: DELIVER_WITHIN,
            };
            let target = Target {
                server_id,
                organization_id: server.organization_id,
            };
            match crate::commands::submit(cp, &[target], &spec, &relay_actor(peer)).await {
                Ok(ids) => match ids.first() {
                    Some(id) => {
                        tracing::info!(%server_id, command_id = %id, "relayed command accepted");
                        BranchResponse::CommandAccepted {
                            command_id: id.to_string(),
                        }
                    }
                    None => refused(RefusalCode::Unavailable, "command not created"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "could not submit a relayed command");
                    refused(RefusalCode::Unavailable, "command could not be stored")
                }
            }
        }
        BranchCall::CommandState { command_id } => {
            let Ok(id) = Uuid::parse_str(&command_id) else {
                return refused(RefusalCode::Invalid, "command id is not a UUID");
            };
            match command_in_scope(cp, peer, scope, id).await {
                Ok(record) => BranchResponse::CommandState(state_of(&record, None)),
                Err(refusal) => refusal,
            }
        }
        BranchCall::AwaitCommand {
            command_id,
            known_status,
            known_output_len,
            wait_ms,
        } => {
            let Ok(id) = Uuid::parse_str(&command_id) else {
                return refused(RefusalCode::Invalid, "command id is not a UUID");
            };
            let wait = Duration::from_millis(u64::from(wait_ms)).min(AWAIT_WAIT);
            await_change(cp, peer, scope, id, &known_status, known_output_len, wait).await
        }
        BranchCall::CancelCommand { command_id } => {
            let Ok(id) = Uuid::parse_str(&command_id) else {
                return refused(RefusalCode::Invalid, "command id is not a UUID");
            };
            // Only a command this peer relayed may be cancelled by it.
            if let Err(refusal) = command_in_scope(cp, peer, scope, id).await {
                return refusal;
            }
            match crate::commands::cancel(cp, scope, id).await {
                Ok(crate::store::CancelOutcome::NotFound) => {
                    refused(RefusalCode::NotFound, "no such command")
                }
                Ok(outcome) => {
                    tracing::info!(command_id = %id, ?outcome, "relayed command cancel");
                    match command_in_scope(cp, peer, scope, id).await {
                        Ok(record) => BranchResponse::CommandState(state_of(&record, None)),
                        Err(refusal) => refusal,
                    }
                }
                Err(e) => {
                    tracing::warn!(command_id = %id, error = %e, "could not cancel a relayed command");
                    refused(RefusalCode::Unavailable, "the cancel could not be recorded")
                }
            }
        }
        BranchCall::ServerHealth { server_id } => {
            let Ok(server_id) = Uuid::parse_str(&server_id) else {
                return refused(RefusalCode::Invalid, "server id is not a UUID");
            };
            let server = match server_in_scope(cp, scope, server_id).await {
                Ok(server) => server,
                Err(refusal) => return refusal,
            };
            match cp.store.health_results(server_id).await {
                Ok(results) => BranchResponse::ServerHealth(RelayedServerHealth {
                    server_id: server_id.to_string(),
                    status: crate::health::overall_status(&results).to_string(),
                    server_status: server.status.as_str().to_string(),
                    checks: results
                        .into_iter()
                        .map(|r| RelayedHealthResult {
                            check_id: r.check_id,
                            name: r.name,
                            status: r.status,
                            message: r.message,
                            consecutive_failures: r.consecutive_failures,
                            checked_at_ms: r.checked_at.timestamp_millis(),
                            duration_ms: r.duration_ms,
                            received_at_ms: r.received_at.timestamp_millis(),
                        })
                        .collect(),
                }),
                Err(_) => refused(RefusalCode::Unavailable, "store unavailable"),
            }
        }
        BranchCall::RunHealthChecks { server_id } => {
            let Ok(server_id) = Uuid::parse_str(&server_id) else {
                return refused(RefusalCode::Invalid, "server id is not a UUID");
            };
            let server = match server_in_scope(cp, scope, server_id).await {
                Ok(server) => server,
                Err(refusal) => return refusal,
            };
            if cp.sessions.connection(server_id).is_none() {
                return refused(
                    RefusalCode::Unavailable,
                    &format!(
                        "the server is not connected to the branch's replica that answered (it is {})",
                        server.status.as_str()
                    ),
                );
            }
            let target = ServerRef {
                id: server_id,
                organization_id: server.organization_id,
                name: server.name.clone(),
            };
            let requested_at = chrono::Utc::now();
            let task_cp = cp.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = crate::health::run_now(&task_cp, &target).await {
                        tracing::warn!(error = %e, "relayed run-now of health checks failed");
                    }
                }
                .instrument(tracing::info_span!("health_run_now", server_id = %server_id)),
            );
            tracing::info!(%server_id, "relayed health run accepted");
            BranchResponse::HealthRunAccepted {
                requested_at_ms: requested_at.timestamp_millis(),
            }
        }
        _ => refused(RefusalCode::Invalid, "not a relay call"),
    }
}

fn refused(code: RefusalCode, message: &str) -> BranchResponse {
    BranchResponse::Refused {
        code,
        message: message.to_string(),
    }
}

async fn server_in_scope(
    cp: &ControlPlane,
    scope: &[Uuid],
    server_id: Uuid,
) -> Result<crate::store::Server, BranchResponse> {
    match cp.store.server(scope, server_id).await {
        Ok(Some(server)) => Ok(server),
        Ok(None) => Err(refused(RefusalCode::NotFound, "no such server")),
        Err(_) => Err(refused(RefusalCode::Unavailable, "store unavailable")),
    }
}

/// The actor a peer's relayed commands are created by.
fn relay_actor(peer: &BranchPeer) -> String {
    format!("branch:{}", peer.id)
}

/// A command of the peering's organization tree that `peer` relayed itself;
/// any other is `NotFound` (the same answer as a command that does not exist).
async fn command_in_scope(
    cp: &ControlPlane,
    peer: &BranchPeer,
    scope: &[Uuid],
    id: Uuid,
) -> Result<CommandRecord, BranchResponse> {
    match cp.store.command(Some(scope), id).await {
        Ok(Some(record)) if record.created_by == relay_actor(peer) => Ok(record),
        Ok(_) => Err(refused(RefusalCode::NotFound, "no such command")),
        Err(_) => Err(refused(RefusalCode::Unavailable, "store unavailable")),
    }
}

/// A command's state for the wire; `live_output` (what a command running
/// here holds in memory) replaces the stored output when it is ahead.
fn state_of(record: &CommandRecord, live_output: Option<Vec<u8>>) -> RelayedCommandState {
    let output = match live_output {
        Some(live) if !record.status.is_terminal() && live.len() > record.output.len() => live,
        _ => record.output.clone(),
    };
    RelayedCommandState {
        command_id: record.id.to_string(),
        status: record.status.as_str().to_string(),
        exit_code: record.exit_code,
        reason: record.reason.clone(),
        output,
        output_truncated: record.output_truncated,
        started_at_ms: record.started_at.map(|t| t.timestamp_millis()),
        finished_at_ms: record.finished_at.map(|t| t.timestamp_millis()),
    }
}

/// Answers once the command's status or output differs from what the
/// caller knows (`known_status`, `known_output_len`), or after `wait`. A
/// change that is not the end (`running`, new output) is held for
/// [`CHANGE_LINGER`] or until the command ends, so a short command is
/// answered once, with its end, and chatty output travels in batches.
async fn await_change(
    cp: &ControlPlane,
    peer: &BranchPeer,
    scope: &[Uuid],
    id: Uuid,
    known_status: &str,
    known_output_len: u64,
    wait: Duration,
) -> BranchResponse {
    let deadline = tokio::time::Instant::now() + wait;
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        // Subscribe before reading the row, so a change in between is seen.
        let (live_output, events) = match cp.commands.follow(id) {
            Some((output, events)) => (Some(output), Some(events)),
            None => (None, None),
        };
        let record = match command_in_scope(cp, peer, scope, id).await {
            Ok(record) => record,
            Err(refusal) => return refusal,
        };
        let ended = record.status.is_terminal();
        let state = state_of(&record, live_output);
        let now = tokio::time::Instant::now();
        if ended || now >= deadline || linger_until.is_some_and(|until| now >= until) {
            return BranchResponse::CommandState(state);
        }
        let changed = state.status != known_status || state.output.len() as u64 > known_output_len;
        if changed && linger_until.is_none() {
            linger_until = Some(now + CHANGE_LINGER);
        }
        let wake = linger_until.map_or(deadline, |until| until.min(deadline));
        match events {
            Some(mut events) => {
                tokio::select! {
                    _ = cp.shutdown.cancelled() => return BranchResponse::CommandState(state),
                    _ = tokio::time::sleep_until(wake) => {}
                    // Output or the end (or the command left this replica):
                    // read it again above.
                    _ = events.recv() => {}
                }
            }
            None => {
                tokio::select! {
                    _ = cp.shutdown.cancelled() => return BranchResponse::CommandState(state),
                    _ = tokio::time::sleep_until((now + AWAIT_POLL).min(wake)) => {}
                }
            }
        }
    }
}

/// Follows a relayed command until it ends on the peer, copying its state
/// into the mirror and handing new output and the end to local followers.
/// Ends with the mirror `failed` (and a reason) when the peering is removed,
/// the peer no longer knows the command, or the peer stays silent for
/// [`FOLLOW_GIVE_UP`].
///
/// `peer` is the peering as the caller just read it (`None`: read it).
pub async fn follow(cp: Arc<ControlPlane>, mirror: RelayedCommandRecord, peer: Option<BranchPeer>) {
    let id = mirror.command.id;
    let branch_id = mirror.branch_id;
    let span = tracing::info_span!("relayed_command", %branch_id, command_id = %id);
    async move {
        let live = cp.commands.register(id);
        let end = follow_until_end(&cp, &mirror, peer, &live).await;
        if let Some(status) = end {
            live.finished(status);
        }
        cp.commands.unregister(id);
    }
    .instrument(span)
    .await
}

/// The follower's loop; the final status once the mirror says so (`None`
/// at shutdown).
async fn follow_until_end(
    cp: &Arc<ControlPlane>,
    mirror: &RelayedCommandRecord,
    mut fresh_peer: Option<BranchPeer>,
    live: &crate::commands::LiveCommand,
) -> Option<CommandState> {
    let id = mirror.command.id;
    let branch_id = mirror.branch_id;
    let mut known_status = mirror.command.status;
    let mut known_output = mirror.command.output.len();
    let mut last_answer = Instant::now();
    let mut pause = Duration::ZERO;
    loop {
        if !pause.is_zero() {
            tokio::select! {
                _ = cp.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let read = match fresh_peer.take() {
            Some(peer) => Ok(Some(peer)),
            None => cp.store.branch_peer(None, branch_id).await,
        };
        let peer = match read {
            Ok(Some(peer)) => peer,
            Ok(None) => {
                return give_up(cp, id, "the peering with the branch was removed").await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peering");
                pause = FOLLOW_RETRY;
                continue;
            }
        };
        let call = BranchCall::AwaitCommand {
            command_id: mirror.remote_command_id.clone(),
            known_status: known_status.as_str().to_string(),
            known_output_len: known_output as u64,
            wait_ms: u32::try_from(AWAIT_WAIT.as_millis()).unwrap_or(u32::MAX),
        };
        let slots = cp.federation.await_slots(branch_id);
        let answer = tokio::select! {
            _ = cp.shutdown.cancelled() => return None,
            answer = async {
                let _slot = slots.acquire().await;
                crate::federation::call(cp, &peer, call, AWAIT_CALL_TIMEOUT).await
            } => answer,
        };
        match answer {
            Ok(BranchResponse::CommandState(state)) => {
                last_answer = Instant::now();
                let Some(status) = CommandState::parse(&state.status) else {
                    let reason =
                        format!("the branch answered an unknown status {:?}", state.status);
                    return give_up(cp, id, &reason).await;
                };
                if status == known_status && state.output.len() <= known_output {
                    // The wait ended without a change.
                    pause = Duration::ZERO;
                    continue;
                }
                let new_output = state.output.get(known_output..).map(<[u8]>::to_vec);
                let update = RelayedCommandUpdate {
                    status,
                    exit_code: state.exit_code,
                    reason: state.reason,
                    output: state.output,
                    output_truncated: state.output_truncated,
                    started_at: state
                        .started_at_ms
                        .and_then(chrono::DateTime::from_timestamp_millis),
                    finished_at: state
                        .finished_at_ms
                        .and_then(chrono::DateTime::from_timestamp_millis),
                };
                match cp.store.update_relayed_command(id, &update).await {
                    Ok(true) => {
                        if let Some(chunk) = new_output.filter(|c| !c.is_empty()) {
                            live.push_output(&chunk);
                        }
                        known_status = status;
                        known_output = update.output.len();
                        if status.is_terminal() {
                            tracing::info!(status = status.as_str(), "relayed command ended");
                            return Some(status);
                        }
                        pause = Duration::ZERO;
                    }
                    // Already ended here (another follower, or given up).
                    Ok(false) => return current_status(cp, id).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot store a relayed command's state");
                        pause = FOLLOW_RETRY;
                    }
                }
            }
            Ok(BranchResponse::Refused {
                code: RefusalCode::NotFound,
                ..
            }) => {
                return give_up(cp, id, "the branch no longer knows this command").await;
            }
            Ok(other) => {
                tracing::debug!(answer = ?std::mem::discriminant(&other), "unexpected answer to an await call");
                pause = FOLLOW_RETRY;
            }
            Err(e) => {
                tracing::debug!(error = %e, "branch did not answer an await call");
                pause = FOLLOW_RETRY;
            }
        }
        if last_answer.elapsed() > FOLLOW_GIVE_UP {
            return give_up(
                cp,
                id,
                "the branch did not answer for 5 minutes; its outcome is unknown here",
            )
            .await;
        }
    }
}

async fn current_status(cp: &ControlPlane, id: Uuid) -> Option<CommandState> {
    match cp.store.relayed_command(None, id).await {
        Ok(Some(mirror)) => Some(mirror.command.status),
        _ => None,
    }
}

/// Marks the mirror failed with `reason`; its final status.
async fn give_up(cp: &ControlPlane, id: Uuid, reason: &str) -> Option<CommandState> {
    tracing::warn!(command_id = %id, reason, "relayed command given up");
    let current = cp.store.relayed_command(None, id).await.ok().flatten();
    let update = RelayedCommandUpdate {
        status: CommandState::Failed,
        exit_code: None,
        reason: Some(reason.to_string()),
        output: current
            .as_ref()
            .map(|m| m.command.output.clone())
            .unwrap_or_default(),
        output_truncated: current.as_ref().is_some_and(|m| m.command.output_truncated),
        started_at: current.as_ref().and_then(|m| m.command.started_at),
        finished_at: Some(chrono::Utc::now()),
    };
    match cp.store.update_relayed_command(id, &update).await {
        Ok(true) => Some(CommandState::Failed),
        Ok(false) => current_status(cp, id).await,
        Err(e) => {
            tracing::warn!(command_id = %id, error = %e, "cannot mark a relayed command failed");
            None
        }
    }
}

/// Resumes the followers of mirrors that had not ended when this control
/// plane stopped.
pub async fn resume_followers(cp: Arc<ControlPlane>) {
    match cp.store.unfinished_relayed_commands().await {
        Ok(mirrors) => {
            for mirror in mirrors {
                tokio::spawn(follow(cp.clone(), mirror, None));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot resume relayed command followers"),
    }
}

/// Asks the peer to cancel a relayed command and stores the state it
/// answers with; the mirror as it is now.
pub async fn cancel(
    cp: &ControlPlane,
    peer: &BranchPeer,
    mirror: &RelayedCommandRecord,
) -> Result<RelayedCommandState, crate::federation::FederationError> {
    let call = BranchCall::CancelCommand {
        command_id: mirror.remote_command_id.clone(),
    };
    match crate::federation::call(cp, peer, call, crate::federation::RELAY_TIMEOUT).await? {
        BranchResponse::CommandState(state) => Ok(state),
        _ => Err(crate::federation::FederationError::Protocol(
            "the branch answered a cancel out of protocol".into(),
        )),
    }
}
