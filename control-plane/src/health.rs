//! Health of servers as the control plane runs it: storing the reports
//! agents send (and emitting `health.failed` / `health.recovered` on
//! transitions), pushing the configured checks to agents
//! (`ConfigureHealthChecks` after every `Welcome` and whenever a check
//! changes), run-now requests, and the connection-state sweep
//! (`offline` for servers no replica holds, `timeout` for servers that
//! never opened a session). See `docs/agent-health-and-commands.md`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tether_protocol::{
    AgentMessage, ControlMessage, HealthCheckKind as WireKind, HealthCheckSpec, HealthReport,
    HealthStatus,
};
use tether_transport::ControlStream;
use tracing::Instrument;
use uuid::Uuid;

use crate::app::ControlPlane;
use crate::store::health::{HealthCheck, HealthCheckKind, HealthResultRecord, ServerRef};
use crate::store::{Server, StoreResult};

/// How long an agent has to answer `ConfigureHealthChecks` or
/// `RunHealthChecksNow` (a run-now waits for every check's run).
pub const AGENT_ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

/// Errors of talking to an agent about health.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("the server has no session on this control plane")]
    NotConnected,
    #[error("{0}")]
    Transport(#[from] tether_transport::TransportError),
    #[error(
        "the agent did not answer within {}",
        humantime::format_duration(AGENT_ANSWER_TIMEOUT)
    )]
    Timeout,
    #[error("the agent answered with an unexpected message")]
    Unexpected,
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// The wire name of a status.
pub fn status_str(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Starting => "starting",
        HealthStatus::Passing => "passing",
        HealthStatus::Failing => "failing",
    }
}

fn millis(seconds: i64) -> u64 {
    u64::try_from(seconds)
        .unwrap_or_default()
        .saturating_mul(1000)
}

/// The spec an agent runs for a stored check (its id is the check's UUID).
pub fn wire_spec(check: &HealthCheck) -> HealthCheckSpec {
    let spec = &check.spec;
    let kind = match check.kind {
        HealthCheckKind::Http => WireKind::Http {
            url: spec.url.clone().unwrap_or_default(),
            expected_status: spec.expected_status,
            body_contains: spec.body_contains.clone(),
        },
        HealthCheckKind::Tcp => WireKind::Tcp {
            address: spec.address.clone().unwrap_or_default(),
        },
        HealthCheckKind::Exec => WireKind::Exec {
            argv: spec.argv.clone().unwrap_or_default(),
        },
    };
    HealthCheckSpec {
        id: check.id.to_string(),
        name: check.name.clone(),
        kind,
        interval_ms: millis(check.interval_seconds),
        timeout_ms: millis(check.timeout_seconds),
        retries: u32::try_from(check.retries).unwrap_or(u32::MAX),
        start_period_ms: millis(check.start_period_seconds),
    }
}

/// The checks that run on `server`: those of its organization and its
/// ancestors whose selector matches it.
pub async fn checks_for(cp: &ControlPlane, server: &Server) -> StoreResult<Vec<HealthCheck>> {
    let ancestors: Vec<Uuid> = cp
        .store
        .organization_ancestors(server.organization_id)
        .await?
        .into_iter()
        .map(|o| o.id)
        .collect();
    let mut checks = Vec::new();
    let mut after = None;
    loop {
        let page = cp.store.list_health_checks(&ancestors, 500, after).await?;
        let done = page.len() < 500;
        after = page.last().map(|c| c.id);
        checks.extend(
            page.into_iter()
                .filter(|check| check.selector.matches(server)),
        );
        if done {
            break;
        }
    }
    Ok(checks)
}

/// Pushes in flight, by key (a server). At most one push per key runs at a
/// time, so pushes go out in order; a push asked for while one runs is kept
/// (the newest request replaces an older one) and made once the running one
/// ends. Queuing instead let a server whose agent does not answer (each push
/// then waits [`AGENT_ANSWER_TIMEOUT`]) gather one more waiting task every
/// [`RECONCILE_INTERVAL`], for as long as its session lasted.
#[derive(Debug)]
pub struct CoalescedPushes<K, T> {
    due: HashMap<K, Option<T>>,
}

impl<K: std::hash::Hash + Eq, T> Default for CoalescedPushes<K, T> {
    fn default() -> Self {
        Self {
            due: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq, T> CoalescedPushes<K, T> {
    /// Asks for a push of `item`. Returns it when the caller is to start the
    /// push now; `None` when one runs already (`item` is then made after it).
    pub fn request(&mut self, key: K, item: T) -> Option<T> {
        match self.due.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut running) => {
                *running.get_mut() = Some(item);
                None
            }
            std::collections::hash_map::Entry::Vacant(idle) => {
                idle.insert(None);
                Some(item)
            }
        }
    }

    /// The push of `key` ended. Returns the next one to make (asked for while
    /// it ran), or `None`: no push of `key` runs any more.
    pub fn finished(&mut self, key: &K) -> Option<T> {
        let next = self.due.get_mut(key).and_then(Option::take);
        if next.is_none() {
            self.due.remove(key);
        }
        next
    }

    /// Keys with a push running.
    pub fn running(&self) -> usize {
        self.due.len()
    }
}

static PUSHES: LazyLock<Mutex<CoalescedPushes<Uuid, Server>>> = LazyLock::new(Default::default);

fn pushes() -> std::sync::MutexGuard<'static, CoalescedPushes<Uuid, Server>> {
    PUSHES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fingerprint of the set of checks last pushed to each server connected
/// here (see [`reconcile`]); removed when a push fails.
static LAST_PUSHED: LazyLock<Mutex<HashMap<Uuid, u64>>> = LazyLock::new(Default::default);

fn last_pushed() -> std::sync::MutexGuard<'static, HashMap<Uuid, u64>> {
    LAST_PUSHED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fingerprint(specs: &[HealthCheckSpec]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{specs:?}").hash(&mut hasher);
    hasher.finish()
}

/// Sends the server its whole set of checks (`ConfigureHealthChecks`) over
/// its session on this replica and logs what the agent refused.
pub async fn push_checks(cp: &ControlPlane, server: &Server) -> Result<(), HealthError> {
    let outcome = push(cp, server).await;
    match &outcome {
        Ok(fingerprint) => {
            last_pushed().insert(server.id, *fingerprint);
        }
        Err(_) => {
            last_pushed().remove(&server.id);
        }
    }
    outcome.map(|_| ())
}

async fn push(cp: &ControlPlane, server: &Server) -> Result<u64, HealthError> {
    let connection = cp
        .sessions
        .connection(server.id)
        .ok_or(HealthError::NotConnected)?;
    let specs: Vec<HealthCheckSpec> = checks_for(cp, server)
        .await?
        .iter()
        .map(wire_spec)
        .collect();
    let pushed = fingerprint(&specs);
    let count = specs.len();
    let names: HashMap<String, String> = specs
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect();
    let exchange = async {
        let mut stream = ControlStream::open(&connection).await?;
        let answer = stream
            .request(&ControlMessage::ConfigureHealthChecks(specs))
            .await?;
        let _ = stream.finish();
        Ok::<_, HealthError>(answer)
    };
    match tokio::time::timeout(AGENT_ANSWER_TIMEOUT, exchange).await {
        Err(_) => Err(HealthError::Timeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok(AgentMessage::HealthChecksConfigured(answer))) => {
            let now = Utc::now();
            let refused: Vec<HealthResultRecord> = answer
                .rejected
                .iter()
                .map(|r| HealthResultRecord {
                    server_id: server.id,
                    check_id: r.id.clone(),
                    name: names.get(&r.id).cloned().unwrap_or_else(|| r.id.clone()),
                    status: "rejected".into(),
                    message: format!("the agent refused this check: {}", r.reason),
                    consecutive_failures: 0,
                    checked_at: now,
                    duration_ms: 0,
                    seq: 0,
                    received_at: now,
                })
                .collect();
            cp.store.record_rejected_checks(server.id, &refused).await?;
            for rejected in &answer.rejected {
                tracing::warn!(
                    server_id = %server.id,
                    check_id = %rejected.id,
                    reason = %rejected.reason,
                    "the agent refused a health check"
                );
            }
            tracing::info!(
                server_id = %server.id,
                pushed = count,
                active = answer.active.len(),
                rejected = answer.rejected.len(),
                "health checks configured"
            );
            Ok(pushed)
        }
        Ok(Ok(_)) => Err(HealthError::Unexpected),
    }
}

/// Pushes the checks in the background (session start, check changes,
/// reconciliation). While a push to the server runs, only remembers that
/// another is due (see [`CoalescedPushes`]).
pub fn spawn_push(cp: Arc<ControlPlane>, server: Server) {
    let id = server.id;
    let Some(server) = pushes().request(id, server) else {
        return;
    };
    let span = tracing::info_span!("health_push", server_id = %id);
    tokio::spawn(
        async move {
            let mut server = server;
            loop {
                if let Err(e) = push_checks(&cp, &server).await {
                    tracing::warn!(error = %e, "could not push health checks");
                }
                let Some(next) = pushes().finished(&id) else {
                    return;
                };
                server = next;
            }
        }
        .instrument(span),
    );
}

/// Re-pushes checks to the servers connected to this replica that `before`
/// or `after` (a check as it was and as it is now) applies to.
pub fn spawn_repush(
    cp: Arc<ControlPlane>,
    before: Option<HealthCheck>,
    after: Option<HealthCheck>,
) {
    let Some(organization_id) = after
        .as_ref()
        .or(before.as_ref())
        .map(|c| c.organization_id)
    else {
        return;
    };
    tokio::spawn(
        async move {
            let scope = match cp.store.organization_scope(organization_id).await {
                Ok(scope) => scope,
                Err(e) => {
                    tracing::warn!(error = %e, "could not re-push health checks");
                    return;
                }
            };
            for server_id in cp.sessions.server_ids() {
                let server = match cp.store.server(&scope, server_id).await {
                    Ok(Some(server)) => server,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not re-push health checks");
                        return;
                    }
                };
                let affected = [&before, &after]
                    .into_iter()
                    .flatten()
                    .any(|check| check.selector.matches(&server));
                if affected {
                    spawn_push(cp.clone(), server);
                }
            }
        }
        .in_current_span(),
    );
}

/// How often [`reconcile`] runs.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);

/// Re-pushes checks to this replica's sessions whose set of checks differs
/// from the one last pushed: checks changed through another replica, and
/// pushes that failed. Loads every check and the connected servers in pages
/// (no query per server).
pub async fn reconcile(cp: &Arc<ControlPlane>) -> StoreResult<()> {
    let live: std::collections::HashSet<Uuid> = cp.sessions.server_ids().into_iter().collect();
    if live.is_empty() {
        return Ok(());
    }
    let everything = cp
        .store
        .organization_scope(cp.instance.root_organization_id)
        .await?;
    let mut checks = Vec::new();
    let mut after = None;
    loop {
        let page = cp.store.list_health_checks(&everything, 500, after).await?;
        let done = page.len() < 500;
        after = page.last().map(|c| c.id);
        checks.extend(page);
        if done {
            break;
        }
    }
    let mut ancestors: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    let mut after = None;
    loop {
        let page = cp
            .store
            .list_servers(&crate::store::ServerQuery {
                scope: everything.clone(),
                limit: 500,
                after,
                ..Default::default()
            })
            .await?;
        let done = page.len() < 500;
        after = page.last().map(|s| s.id);
        for server in page.into_iter().filter(|s| live.contains(&s.id)) {
            if let std::collections::hash_map::Entry::Vacant(entry) =
                ancestors.entry(server.organization_id)
            {
                let line = cp
                    .store
                    .organization_ancestors(server.organization_id)
                    .await?
                    .into_iter()
                    .map(|o| o.id)
                    .collect();
                entry.insert(line);
            }
            let line = ancestors
                .get(&server.organization_id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let specs: Vec<HealthCheckSpec> = checks
                .iter()
                .filter(|c| line.contains(&c.organization_id) && c.selector.matches(&server))
                .map(wire_spec)
                .collect();
            let current = fingerprint(&specs);
            let pushed = last_pushed().get(&server.id).copied();
            if pushed != Some(current) {
                tracing::debug!(server_id = %server.id, "health checks out of date; pushing");
                spawn_push(cp.clone(), server);
            }
        }
        if done {
            break;
        }
    }
    Ok(())
}

/// Runs [`reconcile`] every [`RECONCILE_INTERVAL`] until shutdown.
pub async fn reconcile_loop(cp: Arc<ControlPlane>) {
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = reconcile(&cp).await {
            tracing::warn!(error = %e, "could not reconcile pushed health checks");
        }
    }
}

fn unix_ms(ms: u64, fallback: DateTime<Utc>) -> DateTime<Utc> {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or(fallback)
}

/// Stores a report (the caller acks it only when this succeeded) and emits
/// `health.failed` / `health.recovered` for the checks that moved.
pub async fn store_report(
    cp: &ControlPlane,
    server: &ServerRef,
    report: &HealthReport,
) -> StoreResult<()> {
    let received_at = Utc::now();
    let seq = i64::try_from(report.seq).unwrap_or(i64::MAX);
    let records: Vec<HealthResultRecord> = report
        .results
        .iter()
        .map(|r| HealthResultRecord {
            server_id: server.id,
            check_id: r.check_id.clone(),
            name: r.name.clone(),
            status: status_str(r.status).into(),
            message: r.output.clone(),
            consecutive_failures: i64::from(r.consecutive_failures),
            checked_at: unix_ms(r.checked_at_unix_ms, received_at),
            duration_ms: i64::try_from(r.duration_ms).unwrap_or(i64::MAX),
            seq,
            received_at,
        })
        .collect();
    let transitions = cp
        .store
        .record_health_report(server.id, &records, received_at)
        .await?;
    for t in transitions {
        let event = if t.failed {
            "health.failed"
        } else {
            "health.recovered"
        };
        tracing::info!(server_id = %server.id, check_id = %t.check_id, event, "health check transition");
        crate::webhooks::emit(
            cp,
            server.organization_id,
            event,
            json!({
                "server_id": server.id,
                "server_name": server.name,
                "check_id": t.check_id,
                "check_name": t.check_name,
                "message": t.message,
            }),
        )
        .await;
    }
    Ok(())
}

/// A server's health from the latest result of each check: `failing` when
/// one fails (or was refused by the agent), `passing` when every one passes,
/// `unknown` otherwise (no results yet, or checks still starting).
pub fn overall_status(results: &[crate::store::health::HealthResultRecord]) -> &'static str {
    if results
        .iter()
        .any(|r| r.status == "failing" || r.status == "rejected")
    {
        "failing"
    } else if !results.is_empty() && results.iter().all(|r| r.status == "passing") {
        "passing"
    } else {
        "unknown"
    }
}

/// Asks the agent to run every check now and stores the report it answers
/// with (acknowledged once stored).
pub async fn run_now(cp: &ControlPlane, server: &ServerRef) -> Result<(), HealthError> {
    let connection = cp
        .sessions
        .connection(server.id)
        .ok_or(HealthError::NotConnected)?;
    let exchange = async {
        let mut stream = ControlStream::open(&connection).await?;
        let answer = stream.request(&ControlMessage::RunHealthChecksNow).await?;
        let AgentMessage::HealthReport(report) = answer else {
            return Err(HealthError::Unexpected);
        };
        store_report(cp, server, &report).await?;
        stream
            .send(&ControlMessage::HealthAck { seq: report.seq })
            .await?;
        let _ = stream.finish();
        Ok(())
    };
    tokio::time::timeout(AGENT_ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| HealthError::Timeout)?
}

/// Emits a connection-state event (`server.online`, `server.offline`,
/// `server.timeout`).
pub async fn emit_state(
    cp: &ControlPlane,
    server: &ServerRef,
    event: &str,
    status: &str,
    reason: Option<&str>,
) {
    crate::webhooks::emit(
        cp,
        server.organization_id,
        event,
        json!({
            "server_id": server.id,
            "server_name": server.name,
            "status": status,
            "status_reason": reason,
        }),
    )
    .await;
}

/// The `status_reason` of a server whose session on this replica ended for
/// `why` (what the gateway observed): what happened, then what to check.
pub fn session_end_reason(why: &str) -> String {
    format!(
        "{why}; the agent reconnects by itself, so if the server stays offline check that the \
         host is up, that tether-agent is running on it (systemctl status tether-agent; \
         journalctl -u tether-agent) and that it reaches the control plane over UDP"
    )
}

/// The `status_reason` of a server the sweeper marks offline.
pub fn stale_reason(offline_after: Duration) -> String {
    format!(
        "no heartbeat recorded for {} and no control-plane replica holds its session (the \
         replica that held it may have stopped); the agent reconnects by itself, so if the \
         server stays offline check the host and journalctl -u tether-agent",
        humantime::format_duration(offline_after)
    )
}

/// The `status_reason` of a server that never opened a session.
pub fn timeout_reason(registration_timeout: Duration, quic_addr: &str) -> String {
    format!(
        "the agent enrolled but opened no session within {}; check that tether-agent is \
         running on the host (systemctl status tether-agent; journalctl -u tether-agent) and \
         that it can reach {quic_addr} over UDP",
        humantime::format_duration(registration_timeout)
    )
}

/// One sweep (run by the gateway's liveness loop right after it refreshed
/// `last_seen_at` of this replica's sessions, so none of them is stale):
/// servers still `online` that no replica refreshed within `--offline-after`
/// go `offline`; servers still `connecting` past the registration timeout
/// go `timeout`. Each change is an event.
pub async fn sweep(cp: &ControlPlane, now: DateTime<Utc>) {
    let offline_after = cp.config.offline_after;
    if let Ok(window) = chrono::Duration::from_std(offline_after) {
        let reason = stale_reason(offline_after);
        match cp.store.mark_stale_offline(now - window, &reason).await {
            Ok(servers) => {
                for server in servers {
                    tracing::info!(server_id = %server.id, %reason, "server offline");
                    emit_state(cp, &server, "server.offline", "offline", Some(&reason)).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not sweep silent servers"),
        }
    }
    let registration = cp.config.registration_timeout;
    if let Ok(window) = chrono::Duration::from_std(registration) {
        let reason = timeout_reason(registration, &cp.public_quic_addr);
        match cp
            .store
            .mark_registration_timeouts(now - window, &reason)
            .await
        {
            Ok(servers) => {
                for server in servers {
                    tracing::info!(server_id = %server.id, %reason, "server timed out");
                    emit_state(cp, &server, "server.timeout", "timeout", Some(&reason)).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not sweep servers that never connected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CoalescedPushes;

    #[test]
    fn pushes_asked_for_while_one_runs_become_one_push_of_the_newest_request() {
        let mut pushes = CoalescedPushes::default();
        assert_eq!(pushes.request("web-1", 1), Some(1), "idle: push at once");
        // An agent that does not answer: every reconcile tick asks again.
        for tick in 2..=10 {
            assert_eq!(pushes.request("web-1", tick), None, "one push runs already");
        }
        assert_eq!(pushes.running(), 1);
        // Once the running push ends, exactly one more, with the newest row.
        assert_eq!(pushes.finished(&"web-1"), Some(10));
        assert_eq!(pushes.finished(&"web-1"), None);
        assert_eq!(pushes.running(), 0, "nothing is kept for an idle server");
        assert_eq!(
            pushes.request("web-1", 11),
            Some(11),
            "idle again: push at once"
        );
    }

    #[test]
    fn pushes_of_different_servers_do_not_wait_for_each_other() {
        let mut pushes = CoalescedPushes::default();
        assert_eq!(pushes.request("web-1", "a"), Some("a"));
        assert_eq!(pushes.request("web-2", "b"), Some("b"));
        assert_eq!(pushes.request("web-1", "c"), None);
        assert_eq!(pushes.finished(&"web-2"), None);
        assert_eq!(pushes.running(), 1);
        assert_eq!(pushes.finished(&"web-1"), Some("c"));
    }
}
