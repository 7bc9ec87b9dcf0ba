//! Health of servers as the control plane runs it: storing the reports
//! agents send (and emitting `health.failed` / `health.recovered` on
//! transitions), pushing the configured checks to agents
//! (`ConfigureHealthChecks` after every `Welcome` and whenever a check
//! changes; the push state is [`crate::health_pushes::HealthPushes`], a
//! field of [`ControlPlane`]), the periodic [`reconcile_loop`] (started
//! with the other background loops by `crate::app`) and run-now requests.
//! Connection states (`online`, `offline`, `timeout`) are the gateway's
//! (`crate::gateway::liveness`). See `docs/agent-health-and-commands.md`.

use std::collections::HashMap;
use std::sync::Arc;
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

use crate::context::ControlPlane;
use crate::store::health::{HealthCheck, HealthCheckKind, HealthResultRecord, ServerRef};
use crate::store::{Server, ServerSelector, StoreResult};

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
                .filter(|check| ServerSelector::from(&check.selector).matches(server)),
        );
        if done {
            break;
        }
    }
    Ok(checks)
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
        Ok(fingerprint) => cp.health_pushes.pushed(server.id, *fingerprint),
        Err(_) => cp.health_pushes.forget(server.id),
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
/// another is due (see [`crate::health_pushes::CoalescedPushes`]).
pub fn spawn_push(cp: Arc<ControlPlane>, server: Server) {
    let id = server.id;
    let Some(server) = cp.health_pushes.request(server) else {
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
                let Some(next) = cp.health_pushes.finished(id) else {
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
                    .any(|check| ServerSelector::from(&check.selector).matches(&server));
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
        checks.extend(page.into_iter().map(|check| {
            let selector = ServerSelector::from(&check.selector);
            (check, selector)
        }));
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
                .filter(|(c, selector)| {
                    line.contains(&c.organization_id) && selector.matches(&server)
                })
                .map(|(c, _)| wire_spec(c))
                .collect();
            let current = fingerprint(&specs);
            let pushed = cp.health_pushes.last_pushed(server.id);
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
        crate::events::emit(
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
