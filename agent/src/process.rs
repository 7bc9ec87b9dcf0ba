//! Process spawning, shared by relayed commands ([`crate::command`]) and
//! pushed `exec` health checks ([`crate::health`]); it knows neither streams
//! nor health.
//!
//! It owns the local policy check ([`check_policy`]: `[commands]` in
//! agent.toml, `enabled` and `allow` with argv patterns, `argv[0]` resolved
//! in the agent's own `PATH`), the refusals and their codes ([`Refusal`]:
//! the reason the control plane stores starts with the code,
//! `forbidden_env: ...`), the environment rules ([`forbidden_env`]: no
//! variable that changes how programs load or how shells start), the
//! `run_as` lookup, and the spawning and supervision of one admitted process.
//!
//! A process is spawned without a shell, in a process group of its own
//! (`process_group(0)`), as the `run_as` user when one is set
//! ([`crate::run_as`]), with the agent's environment minus its
//! `TETHER_AGENT_*` variables plus the request's `env`, and the request's
//! `stdin` (or `/dev/null`).
//!
//! stdout and stderr are read as they come and handed on in chunks of at
//! most [`COMMAND_OUTPUT_CHUNK`] bytes, each sent when full or
//! [`FLUSH_AFTER`] after its first byte. Past `max_output_bytes` output is
//! read and dropped (the child never blocks on a full pipe) and the outcome
//! says `output_truncated`.
//!
//! The whole process group is killed (SIGKILL to `-pgid`) at the timeout
//! (`TimedOut`), on [`Signal::Cancel`] (`Cancelled`), on [`Signal::Lost`] or
//! when nobody reads the output any more, and after the process itself
//! exited, so nothing it started in its group outlives it. Processes that
//! left the group (`setsid`) are out of reach; if one keeps the output pipes
//! open they are abandoned [`DRAIN_GRACE`] after the last byte.
//!
//! [`capture`] runs a program to completion and returns its output (`exec`
//! checks); `execute` streams it to a channel (commands).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tether_protocol::{
    AgentMessage, CommandOutcome, CommandRequest, CommandStatus, OutputStream, COMMAND_OUTPUT_CHUNK,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::CommandPolicy;
use crate::run_as::RunAs;

/// A chunk of output goes out at most this long after its first byte.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// After the process exited (and its group was killed), the pipes are read
/// until they close or stay silent this long.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// ... and never longer than this after the exit.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// One read from a pipe.
const READ_BUFFER: usize = 8 * 1024;
/// Messages queued between a running process and whoever forwards them.
pub(crate) const OUTBOX: usize = 8;
/// Stands in for timeouts too large to add to a clock reading.
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 86_400);
/// `PATH` when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the other end of a running process's output said (for a command:
/// the control plane's side of its stream after `RunCommand`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `CancelCommand`.
    Cancel,
    /// The stream was reset or the connection lost: nobody will read the
    /// result.
    Lost,
}

/// Why the agent refused a command or an `exec` check. The reason the
/// control plane stores and shows starts with the code (`forbidden_env: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `[commands] enabled = false`.
    #[error("commands_disabled: commands are disabled on this server ([commands] enabled = false in agent.toml)")]
    Disabled,
    /// No `[commands] allow` entry matches the argv.
    #[error("not_allowed: {0}")]
    NotAllowed(String),
    /// The request's `env` sets a variable that changes how programs load
    /// or how shells start.
    #[error("forbidden_env: {name} changes how programs load or how shells start; this agent does not let a request set it")]
    ForbiddenEnv { name: String },
    /// `[commands] run_as` names no usable user.
    #[error("run_as_unavailable: {0}")]
    RunAs(String),
    /// A malformed request (empty argv, NUL bytes, zero timeout...).
    #[error("invalid_request: {0}")]
    Invalid(String),
    /// The bound on concurrent commands (the value it holds) is reached.
    #[error("busy: {0} commands are already running on this server")]
    Busy(usize),
}

impl Refusal {
    /// The code the reason starts with.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Disabled => "commands_disabled",
            Self::NotAllowed(_) => "not_allowed",
            Self::ForbiddenEnv { .. } => "forbidden_env",
            Self::RunAs(_) => "run_as_unavailable",
            Self::Invalid(_) => "invalid_request",
            Self::Busy(_) => "busy",
        }
    }
}

impl From<Refusal> for CommandStatus {
    fn from(refusal: Refusal) -> Self {
        CommandStatus::Refused {
            reason: refusal.to_string(),
        }
    }
}

/// At most 64 characters of a name from a request, for a reason.
pub(crate) fn shorten(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_string(),
    }
}

/// Environment variables a request may not set: they change how programs
/// load (the dynamic loader, libc, interpreters' module paths and startup
/// hooks) or how shells start. `PATH` is among them: `argv[0]` is resolved
/// in the agent's own `PATH`, and a request's `PATH` would let an allowed
/// script or shell run programs from anywhere; use absolute paths instead.
pub const FORBIDDEN_ENV_NAMES: &[&str] = &[
    "PATH",
    "BASH_ENV",
    "ENV",
    "ZDOTDIR",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "IFS",
    "PS4",
    "GLOBIGNORE",
    "CDPATH",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONWARNINGS",
    "PYTHONBREAKPOINT",
    "PYTHONINSPECT",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "PERL5DB",
    "NODE_OPTIONS",
    "NODE_PATH",
    "RUBYOPT",
    "RUBYLIB",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
    "LESSOPEN",
    "LESSCLOSE",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_EXEC_PATH",
    "GIT_PROXY_COMMAND",
    "GIT_ASKPASS",
    "SSH_ASKPASS",
];

/// Prefixes of forbidden names: the loader's `LD_*` (`LD_PRELOAD`,
/// `LD_LIBRARY_PATH`, `LD_AUDIT`, ...), `DYLD_*`, exported bash functions
/// (`BASH_FUNC_*`), glibc's `MALLOC_*`, git's `GIT_CONFIG_*`.
pub const FORBIDDEN_ENV_PREFIXES: &[&str] =
    &["LD_", "DYLD_", "BASH_FUNC_", "MALLOC_", "GIT_CONFIG_"];

/// Whether a request may not set `name` ([`FORBIDDEN_ENV_NAMES`],
/// [`FORBIDDEN_ENV_PREFIXES`]; names are case-sensitive, as the loader's are).
pub fn forbidden_env(name: &str) -> bool {
    FORBIDDEN_ENV_NAMES.contains(&name)
        || FORBIDDEN_ENV_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// The `run_as` user of `policy`, looked up now.
pub(crate) fn run_as(policy: &CommandPolicy) -> Result<Option<RunAs>, CommandStatus> {
    match policy.run_as.as_deref() {
        None => Ok(None),
        Some(spec) => RunAs::lookup(spec)
            .map(Some)
            .map_err(|err| Refusal::RunAs(err.to_string()).into()),
    }
}

fn refused(reason: Refusal) -> CommandStatus {
    reason.into()
}

pub(crate) fn not_run(status: CommandStatus) -> CommandOutcome {
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
    let (program, run_as) = match check_policy(policy, argv).and_then(|program| {
        let run_as = run_as(policy)?;
        Ok((program, run_as))
    }) {
        Ok(admitted) => admitted,
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
    let run = async move { execute(&request, &program, run_as.as_ref(), &out, signal_rx).await };
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
        return Err(refused(Refusal::Disabled));
    }
    let Some(argv0) = argv.first().filter(|argv0| !argv0.is_empty()) else {
        return Err(refused(Refusal::Invalid("argv is empty".into())));
    };
    if argv.iter().any(|arg| arg.contains('\0')) {
        return Err(refused(Refusal::Invalid("argv contains a NUL byte".into())));
    }
    let resolved = resolve_program(argv0);
    if let Some(allow) = policy.allow.as_ref().filter(|allow| !allow.is_empty()) {
        let program_matches = |entry: &str| {
            if entry.contains('/') {
                entry == argv0
                    || resolved
                        .as_deref()
                        .is_ok_and(|path| path == Path::new(entry))
            } else {
                entry == argv0
            }
        };
        let permitted = allow
            .iter()
            .any(|entry| program_matches(entry.program()) && entry.matches_args(&argv[1..]));
        if !permitted {
            return Err(refused(Refusal::NotAllowed(format!(
                "{} with these arguments is not in this server's [commands] allow list",
                shorten(argv0)
            ))));
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
pub(crate) async fn execute(
    request: &CommandRequest,
    program: &Path,
    run_as: Option<&RunAs>,
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
    if let Some(user) = run_as {
        command
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name)
            .current_dir(user.working_dir());
        if !user.is_current() {
            let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
            // SAFETY: the closure runs in the forked child before exec and
            // only makes async-signal-safe system calls on data allocated
            // before the fork.
            unsafe {
                command.pre_exec(move || {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let user = run_as.map_or(String::new(), |user| format!(" as {}", user.name));
            return not_run(CommandStatus::FailedToStart {
                reason: format!("cannot start {}{user}: {err}", program.display()),
            });
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut group = ProcessGroup {
        pgid: libc::pid_t::try_from(pid).unwrap_or(0),
        done: false,
    };
    tracing::info!(pid, "command started");
    tracing::debug!(pid, program = %program.display(), "command program");
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
            allow: allow.map(|list| list.iter().map(|s| (*s).into()).collect()),
            run_as: None,
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
    fn argv_patterns_pin_a_shell_to_its_arguments() {
        use crate::config::AllowEntry;
        let pinned = CommandPolicy {
            allow: Some(vec![
                AllowEntry::Argv(argv(&["/bin/sh", "-c", "echo hi"])),
                AllowEntry::Argv(argv(&["echo", "*"])),
            ]),
            ..CommandPolicy::default()
        };
        assert!(check_policy(&pinned, &argv(&["/bin/sh", "-c", "echo hi"])).is_ok());
        for denied in [
            &["/bin/sh", "-c", "id"][..],
            &["/bin/sh", "-c", "echo hi", "x"],
            &["/bin/sh"],
            &["echo", "a", "b"],
        ] {
            let err = check_policy(&pinned, &argv(denied)).unwrap_err();
            assert!(
                matches!(&err, CommandStatus::Refused { reason } if reason.starts_with("not_allowed: ")),
                "{denied:?}: {err:?}"
            );
        }
        assert!(check_policy(&pinned, &argv(&["echo", "anything"])).is_ok());
    }

    #[test]
    fn loader_and_shell_startup_variables_are_forbidden() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "BASH_ENV",
            "ENV",
            "BASH_FUNC_ls%%",
            "PROMPT_COMMAND",
            "SHELLOPTS",
            "BASHOPTS",
            "IFS",
            "PATH",
            "GCONV_PATH",
            "MALLOC_CHECK_",
            "PYTHONSTARTUP",
            "PYTHONPATH",
            "PERL5LIB",
            "PERL5OPT",
            "NODE_OPTIONS",
            "GLIBC_TUNABLES",
        ] {
            assert!(forbidden_env(name), "{name}");
        }
        for name in [
            "LANG",
            "TZ",
            "HOME",
            "MY_SECRET",
            "ld_preload",
            "PYTHONUNBUFFERED",
        ] {
            assert!(!forbidden_env(name), "{name}");
        }
        assert_eq!(
            Refusal::ForbiddenEnv {
                name: "LD_PRELOAD".into()
            }
            .code(),
            "forbidden_env"
        );
        assert!(Refusal::ForbiddenEnv {
            name: "LD_PRELOAD".into()
        }
        .to_string()
        .starts_with("forbidden_env: LD_PRELOAD "));
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
