//! Commands relayed by the control plane (`RunCommand` streams), and the
//! process handling that pushed `exec` health checks share.
//!
//! A command is admitted by the local policy (`[commands]` in agent.toml:
//! `enabled`, `allow`) and a bound on concurrent commands
//! ([`MAX_CONCURRENT_COMMANDS`]); a refusal spawns nothing. An admitted
//! command is spawned without a shell, `argv[0]` resolved in the agent's own
//! `PATH`, in a process group of its own (`process_group(0)`), with the
//! agent's environment minus its `TETHER_AGENT_*` variables plus the
//! request's `env`, and the request's `stdin` (or `/dev/null`).
//!
//! stdout and stderr are read as they come and forwarded in chunks of at most
//! [`COMMAND_OUTPUT_CHUNK`] bytes, each sent when full or [`FLUSH_AFTER`]
//! after its first byte. Past `max_output_bytes` output is read and dropped
//! (the child never blocks on a full pipe) and the outcome says
//! `output_truncated`.
//!
//! The whole process group is killed (SIGKILL to `-pgid`) at the timeout
//! (`TimedOut`), on `CancelCommand` (`Cancelled`), when the stream is lost
//! (reset by the control plane, connection gone), and after the command's
//! own process exited, so nothing it started in its group outlives the
//! stream. Processes that left the group (`setsid`) are out of reach; if one
//! keeps the output pipes open they are abandoned [`DRAIN_GRACE`] after the
//! last byte.
//!
//! [`CommandRunner::run`] works over channels (tests and `exec` checks use it
//! directly); [`CommandRunner::serve`] puts it on a QUIC stream.

use std::convert::Infallible;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tether_protocol::{
    AgentMessage, CommandOutcome, CommandRequest, CommandStatus, ControlMessage, FrameCodec,
    OutputStream, COMMAND_OUTPUT_CHUNK,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::Instrument;

use crate::config::CommandPolicy;

/// Commands running at the same time; more are refused.
pub const MAX_CONCURRENT_COMMANDS: usize = 32;
/// A chunk of output goes out at most this long after its first byte.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// After the process exited (and its group was killed), the pipes are read
/// until they close or stay silent this long.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// ... and never longer than this after the exit.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// One read from a pipe.
const READ_BUFFER: usize = 8 * 1024;
/// Messages queued for the stream writer.
const OUTBOX: usize = 8;
/// Stands in for timeouts too large to add to a clock reading.
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 86_400);
/// `PATH` when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The agent's side of a stream's framing.
pub type AgentCodec = FrameCodec<ControlMessage, AgentMessage>;

/// What the control plane's side of a command stream said after `RunCommand`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `CancelCommand`.
    Cancel,
    /// The stream was reset or the connection lost: nobody will read the
    /// result.
    Lost,
}

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
                tracing::info!(command_id = %request.command_id, ?status, "command not run");
                not_run(status)
            }
            Ok((program, permit)) => {
                let outcome = execute(&request, &program, &out, signals).await;
                drop(permit);
                outcome
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
                        tracing::warn!(
                            "ignoring {} on a command stream",
                            crate::session::kind(&other)
                        );
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
                status = ?outcome.status,
                duration_ms = outcome.duration_ms,
                output_bytes = outcome.output_bytes,
                "command finished"
            )
        });
    }

    /// Checks the request and the policy, resolves the program and takes a
    /// slot; the error is the status to report instead of running.
    fn admit(
        &self,
        request: &CommandRequest,
    ) -> Result<(PathBuf, OwnedSemaphorePermit), CommandStatus> {
        let program = check_policy(&self.policy, &request.argv)?;
        if request.timeout_ms == 0 {
            return Err(refused("timeout_ms must be at least 1"));
        }
        for (name, value) in &request.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(refused(format!(
                    "invalid environment variable name or value ({name:?})"
                )));
            }
        }
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            refused(format!(
                "{MAX_CONCURRENT_COMMANDS} commands are already running on this server"
            ))
        })?;
        Ok((program, permit))
    }
}

fn refused(reason: impl Into<String>) -> CommandStatus {
    CommandStatus::Refused {
        reason: reason.into(),
    }
}

fn not_run(status: CommandStatus) -> CommandOutcome {
    CommandOutcome {
        status,
        output_truncated: false,
        output_bytes: 0,
        duration_ms: 0,
    }
}

/// Runs `argv` under `policy` with `timeout` and no stream (pushed `exec`
/// health checks): the outcome and the first `max_output` bytes of output
/// (stdout and stderr interleaved as read). Takes no command slot.
pub async fn capture(
    policy: &CommandPolicy,
    argv: &[String],
    timeout: Duration,
    max_output: usize,
) -> (CommandOutcome, Vec<u8>) {
    let program = match check_policy(policy, argv) {
        Ok(program) => program,
        Err(status) => return (not_run(status), Vec::new()),
    };
    let request = CommandRequest {
        command_id: String::new(),
        argv: argv.to_vec(),
        env: Vec::new(),
        stdin: None,
        timeout_ms: millis(timeout).max(1),
        max_output_bytes: max_output as u64,
    };
    let (out, mut chunks) = mpsc::channel(OUTBOX);
    let (_signals, signal_rx) = mpsc::channel(1);
    let run = async move { execute(&request, &program, &out, signal_rx).await };
    let collect = async {
        let mut output = Vec::new();
        while let Some(message) = chunks.recv().await {
            if let AgentMessage::CommandOutput { data, .. } = message {
                output.extend_from_slice(&data);
            }
        }
        output
    };
    tokio::join!(run, collect)
}

/// Whether `policy` lets `argv` run: the program it resolves to, or the
/// status to report (`Refused` by the policy, `FailedToStart` when the
/// program is not found).
pub fn check_policy(policy: &CommandPolicy, argv: &[String]) -> Result<PathBuf, CommandStatus> {
    if !policy.enabled {
        return Err(refused(
            "commands are disabled on this server ([commands] enabled = false in agent.toml)",
        ));
    }
    let Some(argv0) = argv.first().filter(|argv0| !argv0.is_empty()) else {
        return Err(refused("argv is empty"));
    };
    if argv.iter().any(|arg| arg.contains('\0')) {
        return Err(refused("argv contains a NUL byte"));
    }
    let resolved = resolve_program(argv0);
    if let Some(allow) = policy.allow.as_ref().filter(|allow| !allow.is_empty()) {
        let permitted = allow.iter().any(|entry| {
            if entry.contains('/') {
                entry == argv0
                    || resolved
                        .as_deref()
                        .is_ok_and(|path| path == Path::new(entry))
            } else {
                entry == argv0
            }
        });
        if !permitted {
            return Err(refused(format!(
                "{argv0} is not in this server's [commands] allow list"
            )));
        }
    }
    resolved.map_err(|reason| CommandStatus::FailedToStart { reason })
}

/// `argv0` itself when it holds a `/`, else the first executable file of
/// that name in the agent's `PATH` (absolute directories only).
fn resolve_program(argv0: &str) -> Result<PathBuf, String> {
    if argv0.contains('/') {
        return Ok(PathBuf::from(argv0));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from(DEFAULT_PATH));
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(argv0))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("{argv0} was not found in the agent's PATH"))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The agent's environment without its own `TETHER_AGENT_*` settings.
fn inherited_env() -> impl Iterator<Item = (OsString, OsString)> {
    std::env::vars_os().filter(|(name, _)| !name.to_string_lossy().starts_with("TETHER_AGENT_"))
}

/// A process group to kill. Dropping it kills the group unless the group
/// was already killed after its leader was reaped.
struct ProcessGroup {
    pgid: libc::pid_t,
    done: bool,
}

impl ProcessGroup {
    fn kill(&self) {
        if self.pgid > 0 {
            // SAFETY: kill(2) with a negative pid signals the process group
            // this agent created for the command; it has no memory effects.
            unsafe {
                libc::kill(-self.pgid, libc::SIGKILL);
            }
        }
    }

    /// Kills what is left of the group after its leader was reaped, once.
    fn finish(&mut self) {
        if !self.done {
            self.kill();
            self.done = true;
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.done {
            self.kill();
        }
    }
}

/// Output read so far and not yet sent, and what was dropped.
struct Output {
    /// Bytes that may still be forwarded.
    budget: u64,
    truncated: bool,
    total: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// When the oldest unsent byte was read.
    first_at: Option<Instant>,
    /// Nobody reads the stream any more: drop everything.
    discard: bool,
}

impl Output {
    fn new(budget: u64) -> Self {
        Self {
            budget,
            truncated: false,
            total: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            first_at: None,
            discard: false,
        }
    }

    fn buffer(&mut self, stream: OutputStream) -> &mut Vec<u8> {
        match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        }
    }

    fn take(&mut self, stream: OutputStream, data: &[u8]) {
        let len = data.len() as u64;
        self.total = self.total.saturating_add(len);
        let keep = len.min(self.budget);
        if keep < len {
            self.truncated = true;
        }
        self.budget -= keep;
        if keep == 0 || self.discard {
            return;
        }
        // `keep` <= data.len(), so it fits a usize.
        let keep = usize::try_from(keep).unwrap_or(data.len());
        self.buffer(stream).extend_from_slice(&data[..keep]);
        self.first_at.get_or_insert_with(Instant::now);
    }

    /// Whether a pipe may be read: its buffer is not a full chunk yet.
    fn has_room(&self, stream: OutputStream) -> bool {
        match stream {
            OutputStream::Stdout => self.stdout.len() < COMMAND_OUTPUT_CHUNK,
            OutputStream::Stderr => self.stderr.len() < COMMAND_OUTPUT_CHUNK,
        }
    }

    fn pending(&self) -> bool {
        !self.stdout.is_empty() || !self.stderr.is_empty()
    }

    fn full(&self) -> bool {
        !self.has_room(OutputStream::Stdout) || !self.has_room(OutputStream::Stderr)
    }

    /// Whether a chunk should go out now.
    fn due(&self, now: Instant) -> bool {
        self.full() || self.first_at.is_some_and(|at| now >= at + FLUSH_AFTER)
    }

    /// The next chunk to send (the fuller buffer first).
    fn next_chunk(&mut self) -> Option<AgentMessage> {
        let stream = if self.stdout.len() >= self.stderr.len() {
            OutputStream::Stdout
        } else {
            OutputStream::Stderr
        };
        let buffer = self.buffer(stream);
        if buffer.is_empty() {
            return None;
        }
        let n = buffer.len().min(COMMAND_OUTPUT_CHUNK);
        let data: Vec<u8> = buffer.drain(..n).collect();
        if !self.pending() {
            self.first_at = None;
        }
        Some(AgentMessage::CommandOutput { stream, data })
    }

    fn clear(&mut self) {
        self.discard = true;
        self.stdout = Vec::new();
        self.stderr = Vec::new();
        self.first_at = None;
    }
}

/// Reads from a pipe that may be gone (then never ready).
async fn read_pipe<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Spawns and supervises one admitted command until its process group is
/// gone and its output read.
async fn execute(
    request: &CommandRequest,
    program: &Path,
    out: &mpsc::Sender<AgentMessage>,
    mut signals: mpsc::Receiver<Signal>,
) -> CommandOutcome {
    let started = Instant::now();
    let mut command = Command::new(program);
    command
        .arg0(&request.argv[0])
        .args(&request.argv[1..])
        .env_clear()
        .envs(inherited_env())
        .envs(request.env.iter().map(|(name, value)| (name, value)))
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return not_run(CommandStatus::FailedToStart {
                reason: format!("cannot start {}: {err}", program.display()),
            })
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut group = ProcessGroup {
        pgid: libc::pid_t::try_from(pid).unwrap_or(0),
        done: false,
    };
    tracing::info!(pid, program = %program.display(), "command started");
    let mut lost = out
        .send(AgentMessage::CommandStarted { pid })
        .await
        .is_err();
    let stdin_writer = match (request.stdin.clone(), child.stdin.take()) {
        (Some(data), Some(mut stdin)) => Some(tokio::spawn(async move {
            // A child that exits without reading makes this fail: fine.
            let _ = stdin.write_all(&data).await;
        })),
        _ => None,
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut stdout_buf = vec![0u8; READ_BUFFER];
    let mut stderr_buf = vec![0u8; READ_BUFFER];
    let mut output = Output::new(request.max_output_bytes);
    let deadline = started
        .checked_add(Duration::from_millis(request.timeout_ms))
        .unwrap_or_else(|| started + FAR_FUTURE);
    let mut ending: Option<CommandStatus> = None;
    let mut exit: Option<std::io::Result<ExitStatus>> = None;
    let mut signals_open = true;
    let mut drain_at: Option<Instant> = None;
    let mut drain_cap: Option<Instant> = None;
    let mut exited_at = None;

    if lost {
        ending = Some(CommandStatus::Cancelled);
        group.kill();
        output.clear();
    }

    while exit.is_none() || stdout.is_some() || stderr.is_some() {
        let running = exit.is_none() && ending.is_none();
        let flush = !lost && output.pending() && output.due(Instant::now());
        let flush_timer = output
            .first_at
            .filter(|_| !lost && !flush)
            .map(|at| at + FLUSH_AFTER);
        tokio::select! {
            read = read_pipe(&mut stdout, &mut stdout_buf), if output.has_room(OutputStream::Stdout) => {
                match read {
                    Ok(n) if n > 0 => output.take(OutputStream::Stdout, &stdout_buf[..n]),
                    _ => stdout = None,
                }
                drain_at = drain_at.map(|_| Instant::now() + DRAIN_GRACE);
            }
            read = read_pipe(&mut stderr, &mut stderr_buf), if output.has_room(OutputStream::Stderr) => {
                match read {
                    Ok(n) if n > 0 => output.take(OutputStream::Stderr, &stderr_buf[..n]),
                    _ => stderr = None,
                }
                drain_at = drain_at.map(|_| Instant::now() + DRAIN_GRACE);
            }
            status = child.wait(), if exit.is_none() => {
                // Whatever the command left behind in its group goes with it.
                group.finish();
                exit = Some(status);
                let now = Instant::now();
                exited_at = Some(now);
                drain_at = Some(now + DRAIN_GRACE);
                drain_cap = Some(now + DRAIN_MAX);
            }
            () = tokio::time::sleep_until(deadline), if running => {
                tracing::info!("command timed out after {} ms, killing its process group", request.timeout_ms);
                ending = Some(CommandStatus::TimedOut);
                group.kill();
            }
            signal = signals.recv(), if running && signals_open => match signal {
                Some(Signal::Cancel) => {
                    ending = Some(CommandStatus::Cancelled);
                    group.kill();
                }
                Some(Signal::Lost) => {
                    tracing::info!("command stream lost, killing the command's process group");
                    lost = true;
                    ending = Some(CommandStatus::Cancelled);
                    group.kill();
                    output.clear();
                }
                None => signals_open = false,
            },
            permit = out.reserve(), if flush => match permit {
                Ok(permit) => {
                    if let Some(chunk) = output.next_chunk() {
                        permit.send(chunk);
                    }
                    drain_at = drain_at.map(|_| Instant::now() + DRAIN_GRACE);
                }
                Err(_) => {
                    lost = true;
                    output.clear();
                    if exit.is_none() && ending.is_none() {
                        tracing::info!("command stream lost, killing the command's process group");
                        ending = Some(CommandStatus::Cancelled);
                        group.kill();
                    }
                }
            },
            () = sleep_until_some(flush_timer) => {}
            () = sleep_until_some(drain_at.min(drain_cap)) => {
                tracing::warn!("the command's output pipes stay open after it exited (a process left its group?); not reading them any further");
                stdout = None;
                stderr = None;
            }
        }
    }
    if let Some(writer) = stdin_writer {
        writer.abort();
    }
    if !lost {
        while let Some(chunk) = output.next_chunk() {
            if out.send(chunk).await.is_err() {
                break;
            }
        }
    }
    let status = match (ending, exit) {
        (Some(ending), _) => ending,
        (None, Some(Ok(status))) => match (status.code(), status.signal()) {
            (Some(code), _) => CommandStatus::Exited { code },
            (None, Some(signal)) => CommandStatus::Killed { signal },
            (None, None) => CommandStatus::Exited { code: -1 },
        },
        (None, Some(Err(err))) => {
            tracing::warn!("cannot read the command's exit status: {err}");
            CommandStatus::Exited { code: -1 }
        }
        (None, None) => CommandStatus::Exited { code: -1 },
    };
    CommandOutcome {
        status,
        output_truncated: output.truncated,
        output_bytes: output.total,
        duration_ms: millis(exited_at.unwrap_or_else(Instant::now) - started),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(enabled: bool, allow: Option<&[&str]>) -> CommandPolicy {
        CommandPolicy {
            enabled,
            allow: allow.map(|list| list.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn disabled_policy_and_empty_argv_are_refused() {
        let err = check_policy(&policy(false, None), &argv(&["true"])).unwrap_err();
        assert!(matches!(err, CommandStatus::Refused { reason } if reason.contains("disabled")));
        let err = check_policy(&CommandPolicy::default(), &[]).unwrap_err();
        assert!(matches!(err, CommandStatus::Refused { .. }));
        let err = check_policy(&CommandPolicy::default(), &argv(&["a\0b"])).unwrap_err();
        assert!(matches!(err, CommandStatus::Refused { .. }));
    }

    #[test]
    fn allow_list_matches_bare_names_and_absolute_paths_it_resolves_to() {
        let sh = resolve_program("sh").unwrap();
        let sh_path = sh.to_string_lossy().to_string();
        let by_name = policy(true, Some(&["sh"]));
        assert_eq!(check_policy(&by_name, &argv(&["sh"])).unwrap(), sh);
        // A bare name never allows another file of the same name.
        assert!(matches!(
            check_policy(&by_name, &argv(&["/tmp/sh"])),
            Err(CommandStatus::Refused { .. })
        ));
        let by_path = policy(true, Some(&[sh_path.as_str()]));
        assert_eq!(check_policy(&by_path, &argv(&["sh"])).unwrap(), sh);
        assert_eq!(
            check_policy(&by_path, &argv(&[sh_path.as_str()])).unwrap(),
            sh
        );
        assert!(matches!(
            check_policy(&by_path, &argv(&["true"])),
            Err(CommandStatus::Refused { .. })
        ));
        // Empty list: everything.
        let empty = policy(true, Some(&[]));
        assert!(check_policy(&empty, &argv(&["true"])).is_ok());
    }

    #[test]
    fn unknown_program_fails_to_start_when_allowed() {
        let err = check_policy(
            &CommandPolicy::default(),
            &argv(&["no-such-program-tether"]),
        )
        .unwrap_err();
        assert!(
            matches!(&err, CommandStatus::FailedToStart { reason } if reason.contains("PATH")),
            "{err:?}"
        );
    }

    #[test]
    fn output_is_bounded_and_chunked() {
        let mut output = Output::new(10);
        output.take(OutputStream::Stdout, b"hello ");
        output.take(OutputStream::Stderr, b"world!!");
        assert!(output.truncated);
        assert_eq!(output.total, 13);
        assert_eq!(
            output.next_chunk(),
            Some(AgentMessage::CommandOutput {
                stream: OutputStream::Stdout,
                data: b"hello ".to_vec()
            })
        );
        assert_eq!(
            output.next_chunk(),
            Some(AgentMessage::CommandOutput {
                stream: OutputStream::Stderr,
                data: b"worl".to_vec()
            })
        );
        assert_eq!(output.next_chunk(), None);
        assert!(output.first_at.is_none());

        let mut output = Output::new(u64::MAX);
        output.take(OutputStream::Stdout, &vec![b'x'; COMMAND_OUTPUT_CHUNK + 5]);
        assert!(output.full() && output.due(Instant::now()));
        let Some(AgentMessage::CommandOutput { data, .. }) = output.next_chunk() else {
            panic!("no chunk")
        };
        assert_eq!(data.len(), COMMAND_OUTPUT_CHUNK);
        assert!(output.pending() && !output.full());
    }
}
