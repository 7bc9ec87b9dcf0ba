//! The health scheduler: one task for the life of the process that runs
//! every check on its own interval (runs of different checks overlap, runs
//! of one check never do), keeps each check's latest result, and serves the
//! control plane's requests (replace the pushed checks, run everything now).
//!
//! The latest results form a board shared with the reporters
//! ([`super::report`]): a change of status, or a check appearing or going
//! away, is a *change* that wakes the reporter; [`Health::report`] takes a
//! numbered snapshot and [`Health::acked`] records that the control plane
//! stored it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tether_protocol::{
    HealthCheckSpec, HealthChecksConfigured, HealthReport, HealthResult, HealthStatus,
    RejectedHealthCheck, MAX_PUSHED_HEALTH_CHECKS,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::builtin::{self, Builtin, BuiltinContext, BUILTIN_TIMEOUT};
use super::probe::{self, PushedContext};
use super::status::Tracker;
use super::{bound_output, millis, Probe, SessionSignals};
use crate::config::Config;
use crate::metrics::docker::DockerConnection;

/// A run that outlives its own timeout by this much is abandoned (its
/// probe enforces the timeout itself; this is the safety net).
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);
/// `RunHealthChecksNow` waits at most this long for the slowest check.
pub const RUN_NOW_MAX: Duration = Duration::from_secs(11 * 60);

/// The latest results, shared by the scheduler and the reporters.
pub(crate) struct Board {
    results: BTreeMap<String, HealthResult>,
    /// Changes so far (status changes, checks added or removed).
    changes: u64,
    /// Changes included in a report the control plane acknowledged.
    acked_changes: u64,
    /// The last report's sequence number.
    seq: u64,
}

struct Shared {
    board: Mutex<Board>,
    changed: Notify,
}

impl Shared {
    fn board(&self) -> MutexGuard<'_, Board> {
        self.board
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn change(&self, board: &mut Board) {
        board.changes += 1;
        self.changed.notify_one();
    }
}

enum Request {
    Configure(
        Vec<HealthCheckSpec>,
        oneshot::Sender<HealthChecksConfigured>,
    ),
    RunNow(oneshot::Sender<()>),
}

/// The running scheduler.
pub struct Health {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
    task: JoinHandle<()>,
}

/// A numbered snapshot, and the changes it covers.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub report: HealthReport,
    pub changes: u64,
}

impl Health {
    /// Starts the built-in checks `config` enables; runs until `shutdown`,
    /// logging in the current span.
    pub fn start(
        config: &Config,
        docker: Option<DockerConnection>,
        signals: SessionSignals,
        shutdown: CancellationToken,
    ) -> Self {
        let builtins = BuiltinContext {
            docker,
            config: config.health.clone(),
            signals,
        };
        let interval = Duration::from_secs(config.health.interval_seconds.max(1));
        let now = Instant::now();
        let checks = Builtin::enabled(config)
            .into_iter()
            .map(|builtin| Check {
                id: builtin.id(),
                name: builtin.name().to_string(),
                what: What::Builtin(builtin),
                interval,
                timeout: BUILTIN_TIMEOUT,
                tracker: Tracker::new(builtin.retries(), builtin.start_period(), now),
                next_due: now,
                running: false,
                generation: 0,
            })
            .collect();
        let shared = Arc::new(Shared {
            board: Mutex::new(Board {
                results: BTreeMap::new(),
                changes: 0,
                acked_changes: 0,
                seq: 0,
            }),
            changed: Notify::new(),
        });
        let context = Arc::new(Context {
            builtins,
            pushed: PushedContext::new(config.commands.clone())
                .allow_metadata_targets(config.health.allow_metadata_targets),
        });
        let (requests, requests_rx) = mpsc::channel(8);
        let task = tokio::spawn(
            schedule(checks, context, shared.clone(), requests_rx, shutdown).in_current_span(),
        );
        Self {
            shared,
            requests,
            task,
        }
    }

    /// Replaces the pushed checks (`ConfigureHealthChecks`).
    pub async fn configure(&self, specs: Vec<HealthCheckSpec>) -> HealthChecksConfigured {
        let (reply, answer) = oneshot::channel();
        let ids: Vec<String> = specs.iter().map(|spec| spec.id.clone()).collect();
        let stopped = || HealthChecksConfigured {
            active: Vec::new(),
            rejected: ids
                .iter()
                .map(|id| RejectedHealthCheck {
                    id: id.clone(),
                    reason: "the agent is shutting down".into(),
                })
                .collect(),
        };
        if self
            .requests
            .send(Request::Configure(specs, reply))
            .await
            .is_err()
        {
            return stopped();
        }
        answer.await.unwrap_or_else(|_| stopped())
    }

    /// Runs every check now and returns a report once they all finished
    /// (or [`RUN_NOW_MAX`] passed).
    pub async fn run_now(&self) -> Snapshot {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::RunNow(reply)).await.is_ok() {
            let _ = tokio::time::timeout(RUN_NOW_MAX, done).await;
        }
        self.report_always()
    }

    /// A numbered snapshot of the latest results; `None` while no check has
    /// finished a run.
    pub fn report(&self) -> Option<Snapshot> {
        let snapshot = self.report_always();
        (!snapshot.report.results.is_empty()).then_some(snapshot)
    }

    fn report_always(&self) -> Snapshot {
        let mut board = self.shared.board();
        board.seq += 1;
        Snapshot {
            report: HealthReport {
                seq: board.seq,
                results: board.results.values().cloned().collect(),
            },
            changes: board.changes,
        }
    }

    /// The control plane stored a report covering `changes`.
    pub fn acked(&self, changes: u64) {
        let mut board = self.shared.board();
        board.acked_changes = board.acked_changes.max(changes);
    }

    /// Whether a change is not covered by an acknowledged report yet.
    pub fn unreported(&self) -> bool {
        let board = self.shared.board();
        board.changes > board.acked_changes
    }

    /// Resolves at the next change (or at once if one happened since the
    /// last call).
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// The latest result of each check, by id.
    pub fn results(&self) -> Vec<HealthResult> {
        self.shared.board().results.values().cloned().collect()
    }

    /// Waits for the scheduler to end (after shutdown was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// What a check runs.
#[derive(Clone, PartialEq)]
enum What {
    Builtin(Builtin),
    Pushed(HealthCheckSpec),
}

struct Check {
    id: String,
    name: String,
    what: What,
    interval: Duration,
    timeout: Duration,
    tracker: Tracker,
    next_due: Instant,
    running: bool,
    /// Tells a replaced check's late result from the current one's.
    generation: u64,
}

struct Context {
    builtins: BuiltinContext,
    pushed: PushedContext,
}

/// A finished run: which check, which generation, what it found, when it
/// started and how long it took.
struct Finished {
    id: String,
    generation: u64,
    probe: Probe,
    started: Instant,
    duration: Duration,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn launch(check: &mut Check, context: &Arc<Context>) -> BoxFuture<'static, Finished> {
    check.running = true;
    let id = check.id.clone();
    let generation = check.generation;
    let what = check.what.clone();
    let timeout = check.timeout;
    let context = context.clone();
    async move {
        let started = Instant::now();
        let run = async {
            match &what {
                What::Builtin(builtin) => builtin::run(*builtin, &context.builtins).await,
                What::Pushed(spec) => probe::run(&spec.kind, timeout, &context.pushed).await,
            }
        };
        let probe = match tokio::time::timeout(timeout + TIMEOUT_GRACE, run).await {
            Ok(probe) => probe,
            Err(_) => Probe::Fail(format!(
                "the check did not finish within {} ms",
                timeout.as_millis()
            )),
        };
        Finished {
            id,
            generation,
            probe,
            started,
            duration: started.elapsed(),
        }
    }
    .boxed()
}

/// A pushed check from its (valid) spec.
fn pushed(spec: HealthCheckSpec, generation: u64, now: Instant) -> Check {
    Check {
        id: spec.id.clone(),
        name: spec.name.clone(),
        interval: Duration::from_millis(spec.interval_ms),
        timeout: Duration::from_millis(spec.timeout_ms),
        tracker: Tracker::new(
            spec.retries,
            Duration::from_millis(spec.start_period_ms),
            now,
        ),
        next_due: now,
        running: false,
        generation,
        what: What::Pushed(spec),
    }
}

async fn schedule(
    mut checks: Vec<Check>,
    context: Arc<Context>,
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let mut running = FuturesUnordered::new();
    let mut waiters: Vec<(HashSet<String>, oneshot::Sender<()>)> = Vec::new();
    let mut generation = 0u64;
    loop {
        let now = Instant::now();
        for check in checks
            .iter_mut()
            .filter(|check| !check.running && check.next_due <= now)
        {
            running.push(launch(check, &context));
        }
        let next = checks
            .iter()
            .filter(|check| !check.running)
            .map(|check| check.next_due)
            .min();
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(finished) = running.next(), if !running.is_empty() => {
                record(&mut checks, &shared, &finished);
                for (ids, _) in &mut waiters {
                    ids.remove(&finished.id);
                }
                answer_waiters(&mut waiters);
            }
            request = requests.recv() => match request {
                Some(Request::Configure(specs, reply)) => {
                    generation += 1;
                    let answer = configure(&mut checks, specs, &context, &shared, generation);
                    let current: HashSet<&str> = checks.iter().map(|check| check.id.as_str()).collect();
                    for (ids, _) in &mut waiters {
                        ids.retain(|id| current.contains(id.as_str()));
                    }
                    answer_waiters(&mut waiters);
                    let _ = reply.send(answer);
                }
                Some(Request::RunNow(reply)) => {
                    let now = Instant::now();
                    for check in checks.iter_mut().filter(|check| !check.running) {
                        check.next_due = now;
                    }
                    let ids = checks.iter().map(|check| check.id.clone()).collect();
                    waiters.push((ids, reply));
                    answer_waiters(&mut waiters);
                }
                None => return,
            },
            () = sleep_until_some(next) => {}
        }
    }
}

fn answer_waiters(waiters: &mut Vec<(HashSet<String>, oneshot::Sender<()>)>) {
    let mut i = 0;
    while i < waiters.len() {
        if waiters[i].0.is_empty() {
            let (_, reply) = waiters.swap_remove(i);
            let _ = reply.send(());
        } else {
            i += 1;
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Takes a finished run into its check's state and the board.
fn record(checks: &mut [Check], shared: &Shared, finished: &Finished) {
    let Some(check) = checks
        .iter_mut()
        .find(|check| check.id == finished.id && check.generation == finished.generation)
    else {
        // Removed or replaced while it ran.
        return;
    };
    let (probe, duration) = (&finished.probe, finished.duration);
    let now = Instant::now();
    check.running = false;
    check.next_due = (finished.started + check.interval).max(now);
    check.tracker.record(probe, now);
    let result = HealthResult {
        check_id: check.id.clone(),
        name: check.name.clone(),
        status: check.tracker.status(),
        output: bound_output(probe.output().to_string()),
        checked_at_unix_ms: unix_ms(SystemTime::now()),
        duration_ms: millis(duration),
        consecutive_failures: check.tracker.failures(),
    };
    let mut board = shared.board();
    let previous = board.results.get(&result.check_id).map(|r| r.status);
    if previous != Some(result.status) {
        log_transition(&result, previous);
        shared.change(&mut board);
    }
    board.results.insert(result.check_id.clone(), result);
}

fn log_transition(result: &HealthResult, previous: Option<HealthStatus>) {
    let output = result.output.lines().next().unwrap_or_default();
    match (previous, result.status) {
        (_, HealthStatus::Failing) => {
            tracing::warn!(check_id = %result.check_id, "health check failing: {output}")
        }
        (Some(HealthStatus::Failing), HealthStatus::Passing) => {
            tracing::info!(check_id = %result.check_id, "health check recovered: {output}")
        }
        (_, status) => {
            tracing::debug!(check_id = %result.check_id, ?status, "health check: {output}")
        }
    }
}

/// Replaces the pushed checks with `specs`: identical specs keep their
/// state, new and changed ones start at once, missing ones go away.
fn configure(
    checks: &mut Vec<Check>,
    specs: Vec<HealthCheckSpec>,
    context: &Context,
    shared: &Shared,
    generation: u64,
) -> HealthChecksConfigured {
    let mut active = Vec::new();
    let mut rejected = Vec::new();
    let mut accepted: Vec<HealthCheckSpec> = Vec::new();
    for spec in specs {
        let verdict = if accepted.iter().any(|other| other.id == spec.id) {
            Err("duplicate id".to_string())
        } else if accepted.len() >= MAX_PUSHED_HEALTH_CHECKS {
            Err(format!(
                "at most {MAX_PUSHED_HEALTH_CHECKS} pushed checks per server"
            ))
        } else {
            probe::validate(&spec, &context.pushed)
        };
        match verdict {
            Ok(()) => {
                active.push(spec.id.clone());
                accepted.push(spec);
            }
            Err(reason) => {
                tracing::warn!(check_id = %spec.id, "health check refused: {reason}");
                rejected.push(RejectedHealthCheck {
                    id: spec.id,
                    reason,
                });
            }
        }
    }
    let now = Instant::now();
    let (builtins, mut previous): (Vec<Check>, Vec<Check>) = std::mem::take(checks)
        .into_iter()
        .partition(|check| matches!(check.what, What::Builtin(_)));
    *checks = builtins;
    let mut board = shared.board();
    let mut changed = false;
    for old in &previous {
        let kept = accepted
            .iter()
            .any(|spec| spec.id == old.id && old.what == What::Pushed(spec.clone()));
        if !kept && board.results.remove(&old.id).is_some() {
            changed = true;
        }
    }
    for spec in accepted {
        let kept = previous
            .iter()
            .position(|old| old.id == spec.id && old.what == What::Pushed(spec.clone()));
        match kept {
            Some(index) => checks.push(previous.swap_remove(index)),
            None => checks.push(pushed(spec, generation, now)),
        }
    }
    if changed {
        shared.change(&mut board);
    }
    drop(board);
    tracing::info!(
        active = active.len(),
        rejected = rejected.len(),
        "pushed health checks configured"
    );
    HealthChecksConfigured { active, rejected }
}
