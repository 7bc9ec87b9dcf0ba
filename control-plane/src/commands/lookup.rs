//! Where a command lives, and what reading, cancelling and following it
//! means wherever that is: on this replica (its live record), on another
//! replica (its row, and a notice through the store), or on a peer branch
//! (the mirror of a relayed command, cancelled through the federation).
//! The API calls [`find`], [`cancel`] and [`follow`] and only maps their
//! errors and events to HTTP.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::{CommandError, LiveEvent};
use crate::context::ControlPlane;
use crate::federation::FederationError;
use crate::store::{BranchStatus, CancelOutcome, CommandRecord, CommandState, StoreError};

/// How often a follower of a command running elsewhere reads its row.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// A command as a caller sees it: a local command, or the mirror of one
/// relayed to a peer branch.
#[derive(Debug)]
pub struct VisibleCommand {
    pub record: CommandRecord,
    /// The peer the command runs on, for a mirror.
    pub branch_id: Option<Uuid>,
}

/// Why a command could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No command (and no mirror) with this id in the caller's scope.
    #[error("no such command")]
    NotFound,
    /// The command had already ended, as the given state says.
    #[error("the command already ended: {}", .0.as_str())]
    AlreadyEnded(CommandState),
    /// The mirror's peering is gone, so its branch cannot be asked.
    #[error("the peering with the command's branch was removed")]
    PeeringRemoved,
    /// The mirror's branch is known to be unreachable.
    #[error("branch {0} is unreachable, so the command cannot be cancelled now")]
    BranchUnreachable(Uuid),
    /// The peer branch refused or did not answer.
    #[error(transparent)]
    Federation(#[from] FederationError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cancel that was made or sent: the command as it is now, and what its
/// audit entry records.
#[derive(Debug)]
pub struct Cancelled {
    pub command: VisibleCommand,
    pub audit_details: serde_json::Value,
}

/// What a follower receives: output in order, then the ended command once.
#[derive(Debug)]
pub enum FollowEvent {
    Output(Arc<[u8]>),
    Finished(Box<VisibleCommand>),
}

/// The command `id`, or the mirror `id`, within `scope` (`None`: any
/// organization).
pub async fn find(
    cp: &ControlPlane,
    scope: Option<&[Uuid]>,
    id: Uuid,
) -> Result<Option<VisibleCommand>, StoreError> {
    if let Some(record) = cp.store.command(scope, id).await? {
        return Ok(Some(VisibleCommand {
            record,
            branch_id: None,
        }));
    }
    Ok(cp
        .store
        .relayed_command(scope, id)
        .await?
        .map(|mirror| VisibleCommand {
            record: mirror.command,
            branch_id: Some(mirror.branch_id),
        }))
}

/// Cancels the command `id` wherever it runs: a queued one is never sent,
/// a running one here or on another replica has its process group killed
/// by the agent, a relayed one is cancelled by its branch.
pub async fn cancel(
    cp: &Arc<ControlPlane>,
    scope: &[Uuid],
    id: Uuid,
) -> Result<Cancelled, CancelError> {
    match super::cancel(cp, scope, id).await? {
        CancelOutcome::NotFound => return cancel_relayed(cp, scope, id).await,
        CancelOutcome::AlreadyFinished(state) => return Err(CancelError::AlreadyEnded(state)),
        CancelOutcome::CancelledQueued | CancelOutcome::Requested => {}
    }
    let command = find(cp, Some(scope), id)
        .await?
        .ok_or(CancelError::NotFound)?;
    let audit_details = serde_json::json!({ "server_id": command.record.server_id });
    Ok(Cancelled {
        command,
        audit_details,
    })
}

/// Cancels a command relayed to a peer branch: the peer cancels it there,
/// and the mirror follows.
async fn cancel_relayed(
    cp: &Arc<ControlPlane>,
    scope: &[Uuid],
    id: Uuid,
) -> Result<Cancelled, CancelError> {
    let mirror = cp
        .store
        .relayed_command(Some(scope), id)
        .await?
        .ok_or(CancelError::NotFound)?;
    if mirror.command.status.is_terminal() {
        return Err(CancelError::AlreadyEnded(mirror.command.status));
    }
    let peer = cp
        .store
        .branch_peer(Some(scope), mirror.branch_id)
        .await?
        .ok_or(CancelError::PeeringRemoved)?;
    if peer.status == BranchStatus::Unreachable {
        return Err(CancelError::BranchUnreachable(peer.id));
    }
    let state = crate::federation::relay::cancel(cp, &peer, &mirror).await?;
    match CommandState::parse(&state.status) {
        Some(status) if status.is_terminal() && status != CommandState::Cancelled => {
            return Err(CancelError::AlreadyEnded(status));
        }
        _ => {}
    }
    let audit_details = serde_json::json!({
        "server_id": mirror.command.server_id,
        "branch_id": mirror.branch_id,
        "remote_command_id": mirror.remote_command_id,
    });
    let command = find(cp, Some(scope), id)
        .await?
        .ok_or(CancelError::NotFound)?;
    Ok(Cancelled {
        command,
        audit_details,
    })
}

/// Feeds a follower until the command ends or the follower leaves. Live
/// output comes from the command's live record when it runs (or, for a
/// relayed command, is followed) on this replica; otherwise the store is
/// read every [`FOLLOW_POLL`].
pub async fn follow(
    cp: Arc<ControlPlane>,
    mut command: VisibleCommand,
    tx: mpsc::Sender<FollowEvent>,
) {
    // Bytes of output already sent.
    let mut sent = 0usize;
    let id = command.record.id;
    let tail = |bytes: &[u8]| FollowEvent::Output(Arc::from(bytes));
    loop {
        let record = &command.record;
        if record.status.is_terminal() {
            if record.output.len() > sent && tx.send(tail(&record.output[sent..])).await.is_err() {
                return;
            }
            let _ = tx.send(FollowEvent::Finished(Box::new(command))).await;
            return;
        }
        if let Some((snapshot, mut events)) = cp.commands.follow(id) {
            if snapshot.len() > sent {
                if tx.send(tail(&snapshot[sent..])).await.is_err() {
                    return;
                }
                sent = snapshot.len();
            }
            loop {
                match events.recv().await {
                    Ok(LiveEvent::Output(chunk)) => {
                        sent += chunk.len();
                        if tx.send(FollowEvent::Output(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Ok(LiveEvent::Finished(_)) | Err(broadcast::error::RecvError::Closed) => break,
                    // Fell behind: catch up from the store below.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                }
            }
        } else {
            // Not running here: it may have ended a moment ago (or run on
            // another replica); read it again before waiting.
            command = match reload(&cp, id).await {
                Some(fresh) => fresh,
                None => return,
            };
            if command.record.status.is_terminal() {
                continue;
            }
            let output = &command.record.output;
            if output.len() > sent {
                if tx.send(tail(&output[sent..])).await.is_err() {
                    return;
                }
                sent = output.len();
            }
            tokio::select! {
                _ = cp.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
        command = match reload(&cp, id).await {
            Some(fresh) => fresh,
            None => return,
        };
    }
}

/// The followed command as stored now (`None`: gone or unreadable).
async fn reload(cp: &ControlPlane, id: Uuid) -> Option<VisibleCommand> {
    match find(cp, None, id).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(command_id = %id, error = %e, "could not read a followed command");
            None
        }
    }
}
