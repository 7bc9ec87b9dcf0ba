//! Dispatch of one claimed command over its server's QUIC connection: a
//! bidirectional stream per command (`RunCommand` -> `CommandStarted`,
//! `CommandOutput`..., `CommandFinished`; `CancelCommand` on the same
//! stream), output kept within the command's bound, and the outcome mapped to
//! the status users see and written once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tether_protocol::{
    AgentMessage, CommandOutcome, CommandRequest, CommandStatus, ControlMessage,
};
use tether_transport::ControlStream;

use super::live::{LiveCommand, OUTPUT_FLUSH};
use crate::context::ControlPlane;
use crate::store::{
    command_env_context, command_stdin_context, ClaimedCommand, CommandFinish, CommandState,
};

/// After the command's own timeout, how long the agent has to report the
/// outcome before the command is failed here.
const OUTCOME_GRACE: Duration = Duration::from_secs(30);

/// How a command ended, before it is written.
struct Ending {
    status: CommandState,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: Option<String>,
}

impl Ending {
    fn failed(reason: impl Into<String>) -> Self {
        Self {
            status: CommandState::Failed,
            exit_code: None,
            signal: None,
            reason: Some(reason.into()),
        }
    }
}

/// Maps the agent's outcome to the status users see.
fn ending_of(outcome: &CommandOutcome, cancel_asked: bool) -> Ending {
    let mut ending = Ending {
        status: CommandState::Failed,
        exit_code: None,
        signal: None,
        reason: None,
    };
    match &outcome.status {
        CommandStatus::Exited { code } => {
            ending.exit_code = Some(*code);
            if *code == 0 {
                ending.status = CommandState::Succeeded;
            }
        }
        CommandStatus::Killed { signal } => {
            ending.signal = Some(*signal);
            if cancel_asked {
                ending.status = CommandState::Cancelled;
            } else {
                ending.reason = Some(format!("killed by signal {signal}"));
            }
        }
        CommandStatus::TimedOut => {
            ending.status = CommandState::TimedOut;
            ending.reason = Some("killed at its timeout".into());
        }
        CommandStatus::Cancelled => ending.status = CommandState::Cancelled,
        CommandStatus::Refused { reason } => {
            ending.status = CommandState::Refused;
            ending.reason = Some(reason.clone());
        }
        CommandStatus::FailedToStart { reason } => {
            ending.reason = Some(format!("could not start: {reason}"));
        }
    }
    ending
}

/// Output of one command within its bound: what is kept, what still has to
/// reach the store.
struct OutputBound {
    max: usize,
    kept: usize,
    pending: Vec<u8>,
    truncated: bool,
}

impl OutputBound {
    /// Keeps what fits of `data`; returns the kept part.
    fn take<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let room = self.max.saturating_sub(self.kept);
        let kept = &data[..data.len().min(room)];
        if kept.len() < data.len() {
            self.truncated = true;
        }
        self.kept += kept.len();
        self.pending.extend_from_slice(kept);
        kept
    }
}

/// Runs a claimed command on its server and records how it ended.
pub(crate) async fn run(cp: &Arc<ControlPlane>, claimed: ClaimedCommand, live: Arc<LiveCommand>) {
    let id = claimed.id;
    let mut bound = OutputBound {
        max: usize::try_from(claimed.max_output_bytes).unwrap_or(usize::MAX),
        kept: 0,
        pending: Vec::new(),
        truncated: false,
    };
    let mut cancel_asked = claimed.cancel_requested;
    let ending = drive(cp, &claimed, &live, &mut bound, &mut cancel_asked).await;
    let finish = CommandFinish {
        status: ending.status,
        exit_code: ending.exit_code,
        signal: ending.signal,
        reason: ending.reason,
        output_tail: std::mem::take(&mut bound.pending),
        output_truncated: bound.truncated,
        at: Utc::now(),
    };
    match cp.store.finish_command(id, &finish).await {
        Ok(true) => {
            tracing::info!(status = finish.status.as_str(), exit_code = ?finish.exit_code, "command ended")
        }
        Ok(false) => tracing::warn!("command outcome not recorded: it had already ended"),
        Err(e) => tracing::error!(error = %e, "could not record the command's outcome"),
    }
    live.finished(finish.status);
    cp.commands.unregister(id);
}

async fn drive(
    cp: &Arc<ControlPlane>,
    claimed: &ClaimedCommand,
    live: &LiveCommand,
    bound: &mut OutputBound,
    cancel_asked: &mut bool,
) -> Ending {
    let Some(connection) = cp.sessions.connection(claimed.server_id) else {
        return Ending::failed("the server's session ended before the command was sent");
    };
    let env: Vec<(String, String)> = match &claimed.env_sealed {
        None => Vec::new(),
        Some(sealed) => {
            let opened = cp
                .sealer
                .open(sealed, &command_env_context(claimed.request_id))
                .ok()
                .and_then(|plain| serde_json::from_slice(&plain).ok());
            match opened {
                Some(env) => env,
                None => return Ending::failed("the command's environment could not be opened"),
            }
        }
    };
    let stdin = match &claimed.stdin_sealed {
        None => None,
        Some(sealed) => match cp
            .sealer
            .open(sealed, &command_stdin_context(claimed.request_id))
        {
            Ok(stdin) => Some(stdin),
            Err(_) => return Ending::failed("the command's stdin could not be opened"),
        },
    };
    let timeout_ms = u64::try_from(claimed.timeout_ms).unwrap_or(1).max(1);
    let request = CommandRequest {
        command_id: claimed.id.to_string(),
        argv: claimed.argv.clone(),
        env,
        stdin,
        timeout_ms,
        max_output_bytes: u64::try_from(claimed.max_output_bytes).unwrap_or(0),
    };
    let mut stream = match ControlStream::open(&connection).await {
        Ok(stream) => stream,
        Err(e) => return Ending::failed(format!("could not open a stream to the agent: {e}")),
    };
    if let Err(e) = stream.send(&ControlMessage::RunCommand(request)).await {
        return Ending::failed(format!("could not send the command to the agent: {e}"));
    }
    let mut cancel_sent = false;
    if *cancel_asked {
        cancel_sent = stream.send(&ControlMessage::CancelCommand).await.is_ok();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms) + OUTCOME_GRACE;
    let mut flush = tokio::time::interval(OUTPUT_FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = stream.recv() => match message {
                Ok(Some(AgentMessage::CommandStarted { pid })) => {
                    tracing::info!(pid, "command started on the agent");
                }
                Ok(Some(AgentMessage::CommandOutput { data, .. })) => {
                    let kept = bound.take(&data);
                    if !kept.is_empty() {
                        live.push_output(kept);
                    }
                }
                Ok(Some(AgentMessage::CommandFinished(outcome))) => {
                    bound.truncated |= outcome.output_truncated;
                    let _ = stream.finish();
                    return ending_of(&outcome, *cancel_asked);
                }
                Ok(Some(other)) => {
                    tracing::warn!(message = ?std::mem::discriminant(&other), "unexpected message on a command stream");
                    return Ending::failed("the agent sent an unexpected message on the command stream");
                }
                Ok(None) => return Ending::failed("the agent closed the command stream without an outcome"),
                Err(e) => return Ending::failed(format!("connection to the agent lost: {e}")),
            },
            _ = live.cancel.cancelled(), if !cancel_sent => {
                *cancel_asked = true;
                cancel_sent = true;
                if let Err(e) = stream.send(&ControlMessage::CancelCommand).await {
                    return Ending::failed(format!("connection to the agent lost: {e}"));
                }
            }
            _ = flush.tick() => {
                if !bound.pending.is_empty() {
                    let chunk = std::mem::take(&mut bound.pending);
                    if let Err(e) = cp.store.append_command_output(claimed.id, &chunk, bound.truncated).await {
                        tracing::warn!(error = %e, "could not store command output; keeping it for the outcome");
                        bound.pending.splice(0..0, chunk);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Ending::failed("the agent did not report an outcome in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: CommandStatus) -> CommandOutcome {
        CommandOutcome {
            status,
            output_truncated: false,
            output_bytes: 0,
            duration_ms: 0,
        }
    }

    #[test]
    fn exit_codes_killed_and_refusals_map_to_user_statuses() {
        let ok = ending_of(&outcome(CommandStatus::Exited { code: 0 }), false);
        assert_eq!(
            (ok.status, ok.exit_code),
            (CommandState::Succeeded, Some(0))
        );
        let bad = ending_of(&outcome(CommandStatus::Exited { code: 3 }), false);
        assert_eq!((bad.status, bad.exit_code), (CommandState::Failed, Some(3)));
        let killed = ending_of(&outcome(CommandStatus::Killed { signal: 9 }), false);
        assert_eq!(
            (killed.status, killed.signal),
            (CommandState::Failed, Some(9))
        );
        let killed_after_cancel = ending_of(&outcome(CommandStatus::Killed { signal: 9 }), true);
        assert_eq!(killed_after_cancel.status, CommandState::Cancelled);
        assert_eq!(
            ending_of(&outcome(CommandStatus::TimedOut), false).status,
            CommandState::TimedOut
        );
        let refused = ending_of(
            &outcome(CommandStatus::Refused {
                reason: "not allowed".into(),
            }),
            false,
        );
        assert_eq!(refused.status, CommandState::Refused);
        assert_eq!(refused.reason.as_deref(), Some("not allowed"));
        let no_start = ending_of(
            &outcome(CommandStatus::FailedToStart {
                reason: "not found".into(),
            }),
            false,
        );
        assert_eq!(no_start.status, CommandState::Failed);
    }

    #[test]
    fn output_past_the_bound_is_dropped_and_flagged() {
        let mut bound = OutputBound {
            max: 5,
            kept: 0,
            pending: Vec::new(),
            truncated: false,
        };
        assert_eq!(bound.take(b"abc"), b"abc");
        assert!(!bound.truncated);
        assert_eq!(bound.take(b"defg"), b"de");
        assert!(bound.truncated);
        assert_eq!(bound.take(b"h"), b"");
        assert_eq!(bound.pending, b"abcde");
    }
}
