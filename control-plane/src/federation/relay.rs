//! The cross-branch relay. Callee side: commands a peer asks this branch to
//! run on one of its servers. Caller side: the mirror of each command this
//! branch relayed, kept current by a follower that asks the peer for the
//! command's state until it ends, so `GET /api/v1/commands/{id}` answers
//! here with the peer's status and output.
//!
//! The call's token must carry `commands:run`, the invite must have granted
//! it (both checked before this module is reached), and the server must
//! belong to the peering's organization tree. The command is then submitted
//! through `crate::commands` like a local one, so it runs under this
//! branch's delivery rules and the agent's own policy; `CommandState`
//! answers from its record.

use std::sync::Arc;
use std::time::Duration;

use tether_protocol::{BranchCall, BranchResponse, RefusalCode, RelayedCommandState};
use uuid::Uuid;

use crate::app::ControlPlane;
use crate::commands::{CommandSpec, Target};
use crate::store::{BranchPeer, CommandState, RelayedCommandRecord, RelayedCommandUpdate};

/// How often a follower asks the peer for a relayed command's state.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
/// A peer that has not answered a follower for this long fails the mirror.
const FOLLOW_GIVE_UP: Duration = Duration::from_secs(300);

/// Output kept for a relayed command (the peer copies it).
const MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// A relayed command not delivered to its agent within this long is undeliverable.
const DELIVER_WITHIN: Duration = Duration::from_secs(60);

/// Answers a relay call from `peer` (already authenticated and authorized
/// for `commands:run`); `scope` is the peering's organization tree.
pub(crate) async fn answer(
    cp: &Arc<ControlPlane>,
    peer: &BranchPeer,
    scope: &[Uuid],
    call: BranchCall,
) -> (BranchResponse, bool) {
    match call {
        BranchCall::RunCommand(command) => {
            let Ok(server_id) = Uuid::parse_str(&command.server_id) else {
                return (
                    refused(RefusalCode::Invalid, "server id is not a UUID"),
                    false,
                );
            };
            if command.argv.first().is_none_or(|p| p.is_empty())
                || !(1..=3600).contains(&command.timeout_seconds)
            {
                return (
                    refused(
                        RefusalCode::Invalid,
                        "argv must name a program; timeout 1-3600 s",
                    ),
                    false,
                );
            }
            let server = match cp.store.server(scope, server_id).await {
                Ok(Some(server)) => server,
                Ok(None) => return (refused(RefusalCode::NotFound, "no such server"), false),
                Err(_) => {
                    return (
                        refused(RefusalCode::Unavailable, "store unavailable"),
                        false,
                    )
                }
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
            match crate::commands::submit(cp, &[target], &spec, &format!("branch:{}", peer.id))
                .await
            {
                Ok(ids) => match ids.first() {
                    Some(id) => {
                        tracing::info!(%server_id, command_id = %id, "relayed command accepted");
                        (
                            BranchResponse::CommandAccepted {
                                command_id: id.to_string(),
                            },
                            false,
                        )
                    }
                    None => (
                        refused(RefusalCode::Unavailable, "command not created"),
                        false,
                    ),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "could not submit a relayed command");
                    (
                        refused(RefusalCode::Unavailable, "command could not be stored"),
                        false,
                    )
                }
            }
        }
        BranchCall::CommandState { command_id } => {
            let Ok(id) = Uuid::parse_str(&command_id) else {
                return (
                    refused(RefusalCode::Invalid, "command id is not a UUID"),
                    false,
                );
            };
            match cp.store.command(Some(scope), id).await {
                Ok(Some(c)) => (
                    BranchResponse::CommandState(RelayedCommandState {
                        command_id,
                        status: c.status.as_str().to_string(),
                        exit_code: c.exit_code,
                        output: c.output,
                        output_truncated: c.output_truncated,
                        started_at_ms: c.started_at.map(|t| t.timestamp_millis()),
                        finished_at_ms: c.finished_at.map(|t| t.timestamp_millis()),
                    }),
                    false,
                ),
                Ok(None) => (refused(RefusalCode::NotFound, "no such command"), false),
                Err(_) => (
                    refused(RefusalCode::Unavailable, "store unavailable"),
                    false,
                ),
            }
        }
        _ => (refused(RefusalCode::Invalid, "not a relay call"), false),
    }
}

fn refused(code: RefusalCode, message: &str) -> BranchResponse {
    BranchResponse::Refused {
        code,
        message: message.to_string(),
    }
}

/// Follows a relayed command until it ends on the peer, copying its state
/// into the mirror. Ends with the mirror `failed` (and a reason) when the
/// peering is removed, the peer no longer knows the command, or the peer
/// stays silent for [`FOLLOW_GIVE_UP`].
pub async fn follow(cp: Arc<ControlPlane>, mirror: RelayedCommandRecord) {
    let id = mirror.command.id;
    let branch_id = mirror.branch_id;
    let mut last_answer = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let peer = match cp.store.branch_peer(None, branch_id).await {
            Ok(Some(peer)) => peer,
            Ok(None) => {
                give_up(&cp, id, "the peering with the branch was removed").await;
                return;
            }
            Err(e) => {
                tracing::warn!(%branch_id, command_id = %id, error = %e, "cannot read the peering");
                continue;
            }
        };
        let call = BranchCall::CommandState {
            command_id: mirror.remote_command_id.clone(),
        };
        match crate::federation::call(&cp, &peer, call, crate::federation::RELAY_TIMEOUT).await {
            Ok(BranchResponse::CommandState(state)) => {
                last_answer = std::time::Instant::now();
                let Some(status) = CommandState::parse(&state.status) else {
                    give_up(
                        &cp,
                        id,
                        &format!("the branch answered an unknown status {:?}", state.status),
                    )
                    .await;
                    return;
                };
                let update = RelayedCommandUpdate {
                    status,
                    exit_code: state.exit_code,
                    reason: None,
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
                    Ok(true) if status.is_terminal() => {
                        tracing::info!(%branch_id, command_id = %id, status = status.as_str(), "relayed command ended");
                        return;
                    }
                    Ok(true) => {}
                    // Already ended here (another follower, or given up).
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(%branch_id, command_id = %id, error = %e, "cannot store a relayed command's state")
                    }
                }
            }
            Ok(BranchResponse::Refused {
                code: RefusalCode::NotFound,
                ..
            }) => {
                give_up(&cp, id, "the branch no longer knows this command").await;
                return;
            }
            Ok(other) => {
                tracing::debug!(%branch_id, command_id = %id, answer = ?std::mem::discriminant(&other), "unexpected answer to a command state call");
            }
            Err(e) => {
                tracing::debug!(%branch_id, command_id = %id, error = %e, "branch did not answer a command state call");
            }
        }
        if last_answer.elapsed() > FOLLOW_GIVE_UP {
            give_up(
                &cp,
                id,
                "the branch did not answer for 5 minutes; its outcome is unknown here",
            )
            .await;
            return;
        }
    }
}

async fn give_up(cp: &ControlPlane, id: Uuid, reason: &str) {
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
    if let Err(e) = cp.store.update_relayed_command(id, &update).await {
        tracing::warn!(command_id = %id, error = %e, "cannot mark a relayed command failed");
    }
}

/// Resumes the followers of mirrors that had not ended when this control
/// plane stopped.
pub async fn resume_followers(cp: Arc<ControlPlane>) {
    match cp.store.unfinished_relayed_commands().await {
        Ok(mirrors) => {
            for mirror in mirrors {
                tokio::spawn(follow(cp.clone(), mirror));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot resume relayed command followers"),
    }
}
