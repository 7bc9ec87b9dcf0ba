//! Commands relayed by the control plane (`RunCommand` streams): admission
//! and the stream. Spawning, the policy check and the refusals are
//! [`crate::process`]'s.
//!
//! A command is admitted by the local policy
//! ([`crate::process::check_policy`]), the environment rules
//! ([`crate::process::forbidden_env`]) and a bound on concurrent commands
//! ([`MAX_CONCURRENT_COMMANDS`]); a refusal spawns nothing and its reason
//! starts with a [`Refusal`] code (`forbidden_env: ...`). An admitted
//! command runs as [`crate::process`] describes; its output is forwarded on
//! the stream, `CancelCommand` kills it, and so does losing the stream
//! (reset by the control plane, connection gone).
//!
//! [`CommandRunner::run`] works over channels (tests use it directly);
//! [`CommandRunner::serve`] puts it on a QUIC stream.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tether_protocol::{
    AgentMessage, CommandOutcome, CommandRequest, CommandStatus, ControlMessage,
};
use tether_transport::AgentCodec;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::Instrument;

use crate::config::CommandPolicy;
use crate::process::{
    check_policy, execute, forbidden_env, not_run, run_as, shorten, Refusal, Signal, OUTBOX,
};
use crate::run_as::RunAs;

/// Commands running at the same time; more are refused.
pub const MAX_CONCURRENT_COMMANDS: usize = 32;

/// Runs commands under the local policy, at most
/// [`MAX_CONCURRENT_COMMANDS`] at a time. Clones share the bound.
#[derive(Clone)]
pub struct CommandRunner {
    policy: Arc<CommandPolicy>,
    slots: Arc<Semaphore>,
}

impl CommandRunner {
    pub fn new(policy: CommandPolicy) -> Self {
        if policy.enabled && policy.allow.as_ref().is_some_and(Vec::is_empty) {
            tracing::warn!(
                "[commands] allow is an empty list: every program may run; set enabled = false to refuse all"
            );
        }
        Self {
            policy: Arc::new(policy),
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_COMMANDS)),
        }
    }

    pub fn policy(&self) -> &CommandPolicy {
        &self.policy
    }

    /// Runs `request`: sends `CommandStarted`, `CommandOutput` chunks and
    /// `CommandFinished` (only the latter when refused or not started) to
    /// `out`, obeys `signals` (closing it means no more signals will come;
    /// the command runs on), and returns the outcome it sent. A closed `out`
    /// counts as [`Signal::Lost`].
    pub async fn run(
        &self,
        request: CommandRequest,
        out: mpsc::Sender<AgentMessage>,
        signals: mpsc::Receiver<Signal>,
    ) -> CommandOutcome {
        let outcome = match self.admit(&request) {
            Err(status) => {
                // The reason may quote argv[0]: argv stays out of info logs.
                tracing::info!(command_id = %request.command_id, status = status_kind(&status), "command not run");
                tracing::debug!(command_id = %request.command_id, ?status, "command not run");
                not_run(status)
            }
            Ok(admitted) => {
                execute(
                    &request,
                    &admitted.program,
                    admitted.run_as.as_ref(),
                    &out,
                    signals,
                )
                .await
            }
        };
        let _ = out
            .send(AgentMessage::CommandFinished(outcome.clone()))
            .await;
        outcome
    }

    /// Serves a command stream whose first message was `RunCommand(request)`:
    /// answers on `send`, listens for `CancelCommand` on `recv`, finishes
    /// the stream after `CommandFinished`.
    pub async fn serve(
        &self,
        request: CommandRequest,
        send: quinn::SendStream,
        mut recv: FramedRead<quinn::RecvStream, AgentCodec>,
    ) {
        let span = tracing::info_span!("command", command_id = %request.command_id);
        let (out_tx, mut out_rx) = mpsc::channel(OUTBOX);
        let (signal_tx, signal_rx) = mpsc::channel(1);
        let writer = async move {
            let mut framed = FramedWrite::new(send, AgentCodec::default());
            while let Some(message) = out_rx.recv().await {
                if let Err(err) = framed.send(&message).await {
                    tracing::debug!("command stream write failed: {err}");
                    return;
                }
            }
            let _ = framed.get_mut().finish();
        };
        let reader = async move {
            loop {
                match recv.next().await {
                    Some(Ok(ControlMessage::CancelCommand)) => {
                        tracing::info!("cancel requested");
                        let _ = signal_tx.send(Signal::Cancel).await;
                    }
                    Some(Ok(other)) => {
                        tracing::warn!("ignoring {} on a command stream", other.kind());
                    }
                    // Finished: nothing more will be said, the command runs on.
                    None => break,
                    Some(Err(err)) => {
                        tracing::debug!("command stream read failed: {err}");
                        let _ = signal_tx.send(Signal::Lost).await;
                        break;
                    }
                }
            }
            drop(signal_tx);
            std::future::pending::<Infallible>().await
        };
        let run = async {
            tokio::select! {
                outcome = self.run(request, out_tx, signal_rx) => outcome,
                never = reader => match never {},
            }
        };
        let (outcome, ()) = async { tokio::join!(run, writer) }
            .instrument(span.clone())
            .await;
        span.in_scope(|| {
            tracing::info!(
                status = status_kind(&outcome.status),
                duration_ms = outcome.duration_ms,
                output_bytes = outcome.output_bytes,
                "command finished"
            );
            tracing::debug!(status = ?outcome.status, "command outcome")
        });
    }

    /// Checks the request and the policy, resolves the program and the
    /// user and takes a slot; the error is the status to report instead of
    /// running.
    fn admit(&self, request: &CommandRequest) -> Result<Admitted, CommandStatus> {
        let program = check_policy(&self.policy, &request.argv)?;
        if request.timeout_ms == 0 {
            return Err(Refusal::Invalid("timeout_ms must be at least 1".into()).into());
        }
        for (name, value) in &request.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(Refusal::Invalid(format!(
                    "invalid environment variable name or value ({:?})",
                    shorten(name)
                ))
                .into());
            }
            if forbidden_env(name) {
                return Err(Refusal::ForbiddenEnv {
                    name: shorten(name),
                }
                .into());
            }
        }
        let run_as = run_as(&self.policy)?;
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy(MAX_CONCURRENT_COMMANDS))?;
        Ok(Admitted {
            program,
            run_as,
            _permit: permit,
        })
    }
}

/// What an admitted command needs to start, and its slot.
struct Admitted {
    program: PathBuf,
    run_as: Option<RunAs>,
    _permit: OwnedSemaphorePermit,
}

/// The kind of `status`, without the reason (which may quote argv[0]).
fn status_kind(status: &CommandStatus) -> &'static str {
    match status {
        CommandStatus::Exited { .. } => "exited",
        CommandStatus::Killed { .. } => "killed",
        CommandStatus::TimedOut => "timed_out",
        CommandStatus::Cancelled => "cancelled",
        CommandStatus::Refused { .. } => "refused",
        CommandStatus::FailedToStart { .. } => "failed_to_start",
    }
}
