//! The command runner against real processes, over a channel pair (the
//! stream glue is covered by `session_streams.rs`): output, exit codes,
//! timeouts, cancellation, policy, output bounds, and that nothing the
//! command started survives it.

use std::time::{Duration, Instant};

use tether_agent::command::{CommandRunner, MAX_CONCURRENT_COMMANDS};
use tether_agent::config::CommandPolicy;
use tether_agent::process::Signal;
use tether_protocol::{
    AgentMessage, CommandOutcome, CommandRequest, CommandStatus, OutputStream, COMMAND_OUTPUT_CHUNK,
};
use tokio::sync::mpsc;

fn request(argv: &[&str], timeout_ms: u64) -> CommandRequest {
    CommandRequest {
        command_id: "test".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        stdin: None,
        timeout_ms,
        max_output_bytes: 1 << 20,
    }
}

/// A command in flight: its messages, and the control plane's signals.
struct Running {
    messages: mpsc::Receiver<AgentMessage>,
    signals: mpsc::Sender<Signal>,
    task: tokio::task::JoinHandle<CommandOutcome>,
}

fn start(runner: &CommandRunner, request: CommandRequest) -> Running {
    let (out, messages) = mpsc::channel(8);
    let (signals, signal_rx) = mpsc::channel(1);
    let runner = runner.clone();
    let task = tokio::spawn(async move { runner.run(request, out, signal_rx).await });
    Running {
        messages,
        signals,
        task,
    }
}

impl Running {
    async fn pid(&mut self) -> u32 {
        match self.messages.recv().await {
            Some(AgentMessage::CommandStarted { pid }) => pid,
            other => panic!("expected CommandStarted, got {other:?}"),
        }
    }

    /// Every remaining message, then the outcome.
    async fn finish(mut self) -> (Vec<AgentMessage>, CommandOutcome) {
        let mut messages = Vec::new();
        while let Some(message) = self.messages.recv().await {
            messages.push(message);
        }
        let outcome = self.task.await.unwrap();
        assert_eq!(
            messages.last(),
            Some(&AgentMessage::CommandFinished(outcome.clone())),
            "CommandFinished comes last"
        );
        (messages, outcome)
    }
}

async fn run(
    runner: &CommandRunner,
    request: CommandRequest,
) -> (Vec<AgentMessage>, CommandOutcome) {
    start(runner, request).finish().await
}

fn output(messages: &[AgentMessage], which: OutputStream) -> Vec<u8> {
    messages
        .iter()
        .filter_map(|message| match message {
            AgentMessage::CommandOutput { stream, data } if *stream == which => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn stdout_text(messages: &[AgentMessage]) -> String {
    String::from_utf8(output(messages, OutputStream::Stdout)).unwrap()
}

/// Gone, or a zombie nobody reaped yet (its memory and processes are gone).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

async fn assert_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn runner() -> CommandRunner {
    CommandRunner::new(CommandPolicy::default())
}

#[tokio::test]
async fn echo_round_trips_with_exit_zero_and_its_output() {
    let (messages, outcome) = run(&runner(), request(&["echo", "hello", "world"], 10_000)).await;
    assert!(matches!(messages[0], AgentMessage::CommandStarted { pid } if pid > 0));
    assert_eq!(stdout_text(&messages), "hello world\n");
    assert_eq!(outcome.status, CommandStatus::Exited { code: 0 });
    assert!(!outcome.output_truncated);
    assert_eq!(outcome.output_bytes, 12);
}

#[tokio::test]
async fn stdin_and_env_reach_the_process_and_stderr_is_kept_apart() {
    let mut request = request(
        &[
            "sh",
            "-c",
            "read line; echo \"$line $GREETING\"; echo oops >&2; exit 7",
        ],
        10_000,
    );
    request.env = vec![("GREETING".into(), "from env".into())];
    request.stdin = Some(b"from stdin\n".to_vec());
    let (messages, outcome) = run(&runner(), request).await;
    assert_eq!(stdout_text(&messages), "from stdin from env\n");
    assert_eq!(output(&messages, OutputStream::Stderr), b"oops\n");
    assert_eq!(outcome.status, CommandStatus::Exited { code: 7 });
}

#[tokio::test]
async fn sleep_30_with_a_one_second_timeout_times_out_in_about_a_second_with_its_children_gone() {
    let started = Instant::now();
    let mut running = start(
        &runner(),
        request(&["sh", "-c", "sleep 30 & echo $!; sleep 30"], 1_000),
    );
    let pid = running.pid().await;
    let (messages, outcome) = running.finish().await;
    let elapsed = started.elapsed();
    assert_eq!(outcome.status, CommandStatus::TimedOut);
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert!((950..3000).contains(&outcome.duration_ms), "{outcome:?}");
    let child: u32 = stdout_text(&messages).trim().parse().unwrap();
    assert_gone(pid).await;
    assert_gone(child).await;
}

#[tokio::test]
async fn cancel_kills_the_command_and_its_children_and_reports_cancelled() {
    let mut running = start(
        &runner(),
        request(&["sh", "-c", "sleep 30 & echo $!; sleep 30"], 60_000),
    );
    let pid = running.pid().await;
    // The child's pid comes as output.
    let child: u32 = match running.messages.recv().await {
        Some(AgentMessage::CommandOutput { data, .. }) => {
            String::from_utf8(data).unwrap().trim().parse().unwrap()
        }
        other => panic!("unexpected {other:?}"),
    };
    assert!(!process_gone(child));
    let cancelled_at = Instant::now();
    running.signals.send(Signal::Cancel).await.unwrap();
    let (_, outcome) = running.finish().await;
    assert_eq!(outcome.status, CommandStatus::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_secs(2));
    assert_gone(pid).await;
    assert_gone(child).await;
}

#[tokio::test]
async fn a_lost_stream_kills_the_command() {
    let mut running = start(&runner(), request(&["sleep", "30"], 60_000));
    let pid = running.pid().await;
    running.signals.send(Signal::Lost).await.unwrap();
    let (_, outcome) = running.finish().await;
    assert_eq!(outcome.status, CommandStatus::Cancelled);
    assert_gone(pid).await;
}

#[tokio::test]
async fn a_reader_that_went_away_kills_the_command() {
    let mut running = start(
        &runner(),
        request(
            &["sh", "-c", "while :; do echo y; sleep 0.01; done"],
            60_000,
        ),
    );
    let pid = running.pid().await;
    drop(running.messages);
    let outcome = tokio::time::timeout(Duration::from_secs(5), running.task)
        .await
        .expect("the command ends once nobody reads it")
        .unwrap();
    assert_eq!(outcome.status, CommandStatus::Cancelled);
    assert_gone(pid).await;
}

#[tokio::test]
async fn background_children_are_killed_when_the_command_exits() {
    let started = Instant::now();
    let (messages, outcome) = run(
        &runner(),
        request(&["sh", "-c", "sleep 30 & echo $!"], 60_000),
    )
    .await;
    assert_eq!(outcome.status, CommandStatus::Exited { code: 0 });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "did not wait for the background child"
    );
    let child: u32 = stdout_text(&messages).trim().parse().unwrap();
    assert_gone(child).await;
}

#[tokio::test]
async fn disallowed_program_is_refused_and_nothing_is_spawned() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("spawned");
    let runner = CommandRunner::new(CommandPolicy {
        enabled: true,
        allow: Some(vec!["true".into(), "/usr/bin/uptime".into()]),
        ..CommandPolicy::default()
    });
    let (messages, outcome) = run(
        &runner,
        request(&["touch", marker.to_str().unwrap()], 10_000),
    )
    .await;
    assert_eq!(messages.len(), 1, "only CommandFinished: {messages:?}");
    assert!(
        matches!(&outcome.status, CommandStatus::Refused { reason } if reason.contains("allow list")),
        "{outcome:?}"
    );
    assert_eq!(outcome.duration_ms, 0);
    assert!(!marker.exists());
    // The allowed one runs.
    let (_, outcome) = run(&runner, request(&["true"], 10_000)).await;
    assert_eq!(outcome.status, CommandStatus::Exited { code: 0 });
}

#[tokio::test]
async fn disabled_commands_are_refused() {
    let runner = CommandRunner::new(CommandPolicy {
        enabled: false,
        ..CommandPolicy::default()
    });
    let (messages, outcome) = run(&runner, request(&["true"], 10_000)).await;
    assert_eq!(messages.len(), 1);
    assert!(
        matches!(outcome.status, CommandStatus::Refused { reason } if reason.contains("disabled"))
    );
}

#[tokio::test]
async fn invalid_requests_are_refused_without_spawning() {
    let (_, outcome) = run(&runner(), request(&[], 10_000)).await;
    assert!(matches!(outcome.status, CommandStatus::Refused { .. }));
    let (_, outcome) = run(&runner(), request(&["true"], 0)).await;
    assert!(
        matches!(outcome.status, CommandStatus::Refused { reason } if reason.contains("timeout"))
    );
    let mut bad_env = request(&["true"], 10_000);
    bad_env.env = vec![("A=B".into(), "x".into())];
    let (_, outcome) = run(&runner(), bad_env).await;
    assert!(matches!(outcome.status, CommandStatus::Refused { .. }));
}

#[tokio::test]
async fn missing_program_fails_to_start() {
    let (messages, outcome) = run(
        &runner(),
        request(&["/nonexistent/tether-test-program"], 10_000),
    )
    .await;
    assert_eq!(messages.len(), 1);
    assert!(
        matches!(&outcome.status, CommandStatus::FailedToStart { reason } if reason.contains("/nonexistent")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn death_by_a_signal_is_reported_as_killed() {
    let (_, outcome) = run(&runner(), request(&["sh", "-c", "kill -TERM $$"], 10_000)).await;
    assert_eq!(outcome.status, CommandStatus::Killed { signal: 15 });
}

#[tokio::test]
async fn output_beyond_the_bound_is_truncated_and_the_process_still_completes() {
    let mut request = request(
        &[
            "sh",
            "-c",
            "head -c 1000000 /dev/zero; echo done >&2; exit 3",
        ],
        30_000,
    );
    request.max_output_bytes = 1000;
    let (messages, outcome) = run(&runner(), request).await;
    assert_eq!(outcome.status, CommandStatus::Exited { code: 3 });
    assert!(outcome.output_truncated);
    assert_eq!(outcome.output_bytes, 1_000_005);
    let forwarded = output(&messages, OutputStream::Stdout).len()
        + output(&messages, OutputStream::Stderr).len();
    assert_eq!(forwarded, 1000);
}

#[tokio::test]
async fn output_is_forwarded_in_bounded_chunks() {
    let (messages, outcome) = run(
        &runner(),
        request(&["head", "-c", "200000", "/dev/zero"], 30_000),
    )
    .await;
    assert_eq!(outcome.status, CommandStatus::Exited { code: 0 });
    assert!(!outcome.output_truncated);
    let chunks: Vec<usize> = messages
        .iter()
        .filter_map(|message| match message {
            AgentMessage::CommandOutput { data, .. } => Some(data.len()),
            _ => None,
        })
        .collect();
    assert_eq!(chunks.iter().sum::<usize>(), 200_000);
    assert!(
        chunks
            .iter()
            .all(|len| (1..=COMMAND_OUTPUT_CHUNK).contains(len)),
        "{chunks:?}"
    );
    assert!(chunks.len() >= 200_000 / COMMAND_OUTPUT_CHUNK);
}

#[tokio::test]
async fn a_reader_that_does_not_keep_up_does_not_stop_the_timeout() {
    let mut running = start(&runner(), request(&["yes"], 1_000));
    let pid = running.pid().await;
    // Nobody reads for a while: the outbox fills up.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (_, outcome) = running.finish().await;
    assert_eq!(outcome.status, CommandStatus::TimedOut);
    assert!(outcome.duration_ms < 2_400, "{outcome:?}");
    assert_gone(pid).await;
}

#[tokio::test]
async fn more_than_the_concurrent_limit_is_refused() {
    let runner = runner();
    let mut running = Vec::new();
    for _ in 0..MAX_CONCURRENT_COMMANDS {
        let mut command = start(&runner, request(&["sleep", "30"], 60_000));
        command.pid().await;
        running.push(command);
    }
    let (_, outcome) = run(&runner, request(&["true"], 10_000)).await;
    assert!(
        matches!(&outcome.status, CommandStatus::Refused { reason } if reason.contains("already running")),
        "{outcome:?}"
    );
    for command in running {
        command.signals.send(Signal::Cancel).await.unwrap();
        let (_, outcome) = command.finish().await;
        assert_eq!(outcome.status, CommandStatus::Cancelled);
    }
    let (_, outcome) = run(&runner, request(&["true"], 10_000)).await;
    assert_eq!(outcome.status, CommandStatus::Exited { code: 0 });
}

#[tokio::test]
async fn a_request_setting_ld_preload_or_bash_env_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    for name in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "BASH_ENV",
        "BASH_FUNC_id%%",
        "PATH",
    ] {
        let mut request = request(&["touch", marker.to_str().unwrap()], 10_000);
        request.env = vec![("LANG".into(), "C".into()), (name.into(), "/tmp/x".into())];
        let (messages, outcome) = run(&runner(), request).await;
        assert_eq!(messages.len(), 1, "only CommandFinished: {messages:?}");
        let CommandStatus::Refused { reason } = &outcome.status else {
            panic!("{name}: {outcome:?}");
        };
        assert!(
            reason.starts_with(&format!("forbidden_env: {name} ")),
            "{reason}"
        );
        assert!(!marker.exists(), "{name}: the program ran");
    }
}

#[tokio::test]
async fn run_as_runs_the_command_as_that_user_with_its_groups_and_home() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let nobody = tether_agent::run_as::RunAs::lookup("nobody").unwrap();
    let runner = CommandRunner::new(CommandPolicy {
        run_as: Some("nobody".into()),
        ..CommandPolicy::default()
    });
    let (messages, outcome) = run(
        &runner,
        request(&["sh", "-c", "id -u; id -g; echo $HOME $USER"], 10_000),
    )
    .await;
    assert_eq!(
        outcome.status,
        CommandStatus::Exited { code: 0 },
        "{messages:?}"
    );
    assert_eq!(
        stdout_text(&messages),
        format!(
            "{}\n{}\n{} nobody\n",
            nobody.uid,
            nobody.gid,
            nobody.home.display()
        )
    );
    // An unknown user refuses the command.
    let runner = CommandRunner::new(CommandPolicy {
        run_as: Some("no-such-user-tether".into()),
        ..CommandPolicy::default()
    });
    let (_, outcome) = run(&runner, request(&["true"], 10_000)).await;
    assert!(
        matches!(&outcome.status, CommandStatus::Refused { reason } if reason.starts_with("run_as_unavailable: ")),
        "{outcome:?}"
    );
}
