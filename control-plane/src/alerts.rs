//! The alert engine: evaluates alert rules against the latest metrics point
//! of each server ([`engine_loop`], every [`EVALUATION_INTERVAL`]) and
//! against connection and health events ([`on_event`], fed by
//! `crate::events::emit`), and turns conditions that held for a rule's
//! `for_seconds` into firing alerts, and cleared conditions into resolved
//! ones (`alert.firing` / `alert.resolved` webhooks).
//!
//! Debounce: a condition's clock starts at the first sample (or event) that
//! meets it and is stored per (rule, server); a sample that clears it resets
//! the clock, so one noisy sample never pages. Firing alerts are stored with
//! a unique (rule, server) index: a restart, or a second replica evaluating
//! the same rules, never pages twice for one alert.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tracing::Instrument;
use uuid::Uuid;

use crate::context::ControlPlane;
use crate::store::{
    Alert, AlertRule, AlertRuleKind, AlertState, MetricsRecord, Server, ServerQuery,
    ServerSelector, ServerStatus, StoreResult,
};

/// How often rules are evaluated.
pub const EVALUATION_INTERVAL: Duration = Duration::from_secs(2);

/// Metric names a rule may watch, as the metrics points name them.
pub const METRICS: &[&str] = &[
    "cpu_percent",
    "load_1",
    "load_5",
    "load_15",
    "memory_used_percent",
    "memory_used_bytes",
    "swap_used_percent",
    "swap_used_bytes",
    "disk_used_percent",
    "process_count",
    "uptime_seconds",
    "dropped_batches",
];

/// Severities of a rule.
pub const SEVERITIES: &[&str] = &["info", "warning", "critical"];

/// A rule's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            ">" => Self::Gt,
            ">=" => Self::Ge,
            "<" => Self::Lt,
            "<=" => Self::Le,
            _ => return None,
        })
    }

    /// Whether `value <op> threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::Gt => value > threshold,
            Self::Ge => value >= threshold,
            Self::Lt => value < threshold,
            Self::Le => value <= threshold,
        }
    }
}

fn percent(used: f64, total: f64) -> f64 {
    if total > 0.0 {
        used / total * 100.0
    } else {
        0.0
    }
}

/// The value of metric `name` in a point (`None` for an unknown name).
pub fn metric_value(name: &str, m: &MetricsRecord) -> Option<f64> {
    Some(match name {
        "cpu_percent" => m.cpu_percent,
        "load_1" => m.load_1,
        "load_5" => m.load_5,
        "load_15" => m.load_15,
        "memory_used_percent" => percent(m.memory_used_bytes as f64, m.memory_total_bytes as f64),
        "memory_used_bytes" => m.memory_used_bytes as f64,
        "swap_used_percent" => percent(m.swap_used_bytes as f64, m.swap_total_bytes as f64),
        "swap_used_bytes" => m.swap_used_bytes as f64,
        "disk_used_percent" => m.disk_used_percent(),
        "process_count" => m.process_count as f64,
        "uptime_seconds" => m.uptime_seconds as f64,
        "dropped_batches" => m.dropped_batches as f64,
        _ => return None,
    })
}

/// The `data` of an `alert.*` event.
pub fn alert_data(alert: &Alert, rule: Option<&AlertRule>) -> Value {
    json!({
        "alert_id": alert.id,
        "rule_id": alert.rule_id,
        "rule_name": alert.rule_name,
        "server_id": alert.server_id,
        "severity": alert.severity,
        "state": alert.state.as_str(),
        "value": alert.value,
        "started_at": alert.started_at,
        "resolved_at": alert.resolved_at,
        "kind": rule.map(|r| r.kind.as_str()),
        "metric": rule.and_then(|r| r.metric.clone()),
        "op": rule.and_then(|r| r.op.clone()),
        "threshold": rule.and_then(|r| r.threshold),
        "for_seconds": rule.map(|r| r.for_seconds),
    })
}

/// Evaluates the rules every [`EVALUATION_INTERVAL`] until shutdown.
pub async fn engine_loop(cp: Arc<ControlPlane>) {
    let mut tick = tokio::time::interval(EVALUATION_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = evaluate(&cp, Utc::now()).await {
            tracing::warn!(error = %e, "alert evaluation failed; retrying next round");
        }
    }
}

/// What one evaluation looks at per organization tree.
struct TreeView {
    servers: Vec<Server>,
    latest: HashMap<Uuid, MetricsRecord>,
}

/// One round: every live rule of every organization.
pub async fn evaluate(cp: &ControlPlane, now: DateTime<Utc>) -> StoreResult<()> {
    let rules = cp.store.all_alert_rules().await?;
    let mut trees: BTreeMap<Uuid, TreeView> = BTreeMap::new();
    for rule in rules {
        let view = match trees.entry(rule.organization_id) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(tree_view(cp, rule.organization_id).await?)
            }
        };
        let span = tracing::debug_span!("alert_rule", rule_id = %rule.id);
        let result = evaluate_rule(cp, &rule, view, now).instrument(span).await;
        if let Err(e) = result {
            tracing::warn!(rule_id = %rule.id, error = %e, "could not evaluate an alert rule");
        }
    }
    Ok(())
}

async fn tree_view(cp: &ControlPlane, organization_id: Uuid) -> StoreResult<TreeView> {
    let scope = cp.store.organization_scope(organization_id).await?;
    let mut servers = Vec::new();
    let mut after = None;
    loop {
        let page = cp
            .store
            .list_servers(&ServerQuery {
                scope: scope.clone(),
                limit: 1000,
                after,
                ..ServerQuery::default()
            })
            .await?;
        let done = page.len() < 1000;
        after = page.last().map(|s| s.id);
        servers.extend(page);
        if done || after.is_none() {
            break;
        }
    }
    let latest = cp
        .store
        .latest_metrics(&scope)
        .await?
        .into_iter()
        .map(|m| (m.server_id, m))
        .collect();
    Ok(TreeView { servers, latest })
}

async fn evaluate_rule(
    cp: &ControlPlane,
    rule: &AlertRule,
    view: &TreeView,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let firing: HashMap<Uuid, Alert> = cp
        .store
        .firing_alerts_of_rule(rule.id)
        .await?
        .into_iter()
        .map(|a| (a.server_id, a))
        .collect();
    // One read of the clocks; writes only when a condition starts or stops.
    let conditions: HashMap<Uuid, DateTime<Utc>> = cp
        .store
        .conditions_of_rule(rule.id)
        .await?
        .into_iter()
        .collect();
    let selector = ServerSelector::from(&rule.selector);
    let selected: Vec<&Server> = view
        .servers
        .iter()
        .filter(|s| selector.matches(s))
        .collect();
    let for_duration = chrono::Duration::seconds(rule.for_seconds.max(0));
    match rule.kind {
        AlertRuleKind::Metric => {
            let (Some(metric), Some(op), Some(threshold)) = (
                rule.metric.as_deref(),
                rule.op.as_deref().and_then(Op::parse),
                rule.threshold,
            ) else {
                return Ok(());
            };
            for server in &selected {
                let Some(point) = view.latest.get(&server.id) else {
                    continue;
                };
                let Some(value) = metric_value(metric, point) else {
                    continue;
                };
                if op.holds(value, threshold) {
                    let since = match conditions.get(&server.id) {
                        Some(since) => *since,
                        None => {
                            cp.store
                                .condition_holds(rule.id, server.id, point.ts)
                                .await?
                        }
                    };
                    if point.ts - since >= for_duration && !firing.contains_key(&server.id) {
                        fire(cp, rule, server, Some(value), now).await?;
                    }
                } else {
                    if conditions.contains_key(&server.id) {
                        cp.store.clear_condition(rule.id, server.id).await?;
                    }
                    if firing.contains_key(&server.id) {
                        resolve(cp, rule, server.id, now).await?;
                    }
                }
            }
        }
        AlertRuleKind::Offline => {
            for server in &selected {
                match server.status {
                    ServerStatus::Offline | ServerStatus::Timeout => {
                        let since = match conditions.get(&server.id) {
                            Some(since) => *since,
                            None => cp.store.condition_holds(rule.id, server.id, now).await?,
                        };
                        if now - since >= for_duration && !firing.contains_key(&server.id) {
                            fire(cp, rule, server, None, now).await?;
                        }
                    }
                    ServerStatus::Online | ServerStatus::Connecting => {
                        if conditions.contains_key(&server.id) {
                            cp.store.clear_condition(rule.id, server.id).await?;
                        }
                        if firing.contains_key(&server.id) {
                            resolve(cp, rule, server.id, now).await?;
                        }
                    }
                }
            }
        }
        AlertRuleKind::HealthFailing => {
            // Conditions come from `health.failed` events (see `on_event`).
            for (&server_id, &since) in &conditions {
                let Some(server) = selected.iter().find(|s| s.id == server_id) else {
                    cp.store.clear_condition(rule.id, server_id).await?;
                    continue;
                };
                if now - since >= for_duration && !firing.contains_key(&server_id) {
                    fire(cp, rule, server, None, now).await?;
                }
            }
        }
    }
    // Alerts of servers the rule no longer selects (removed, relabelled).
    for server_id in firing.keys() {
        if !selected.iter().any(|s| s.id == *server_id) {
            if conditions.contains_key(server_id) {
                cp.store.clear_condition(rule.id, *server_id).await?;
            }
            resolve(cp, rule, *server_id, now).await?;
        }
    }
    Ok(())
}

async fn fire(
    cp: &ControlPlane,
    rule: &AlertRule,
    server: &Server,
    value: Option<f64>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let alert = Alert {
        id: Uuid::now_v7(),
        rule_id: rule.id,
        rule_name: rule.name.clone(),
        organization_id: server.organization_id,
        server_id: server.id,
        severity: rule.severity.clone(),
        state: AlertState::Firing,
        value,
        started_at: now,
        resolved_at: None,
    };
    if cp.store.fire_alert(&alert).await? {
        tracing::info!(server_id = %server.id, rule_id = %rule.id, severity = %rule.severity, ?value, "alert firing");
        crate::webhooks::enqueue(
            cp,
            alert.organization_id,
            "alert.firing",
            alert_data(&alert, Some(rule)),
        )
        .await;
    }
    Ok(())
}

async fn resolve(
    cp: &ControlPlane,
    rule: &AlertRule,
    server_id: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    if let Some(alert) = cp.store.resolve_alert(rule.id, server_id, now).await? {
        tracing::info!(%server_id, rule_id = %rule.id, "alert resolved");
        crate::webhooks::enqueue(
            cp,
            alert.organization_id,
            "alert.resolved",
            alert_data(&alert, Some(rule)),
        )
        .await;
    }
    Ok(())
}

/// Events to emit after an event: `(organization, event, data)`.
pub type FollowUp = (Uuid, &'static str, Value);

/// Applies a connection or health event to the offline and health rules of
/// the server's organization and its ancestors: `server.offline` and
/// `health.failed` start the rule's clock (the engine fires once it ran
/// `for_seconds`); `server.online` and `health.recovered` clear it and
/// resolve firing alerts. Returns the `alert.resolved` events to emit.
/// Errors are logged, never returned.
pub async fn on_event(
    cp: &ControlPlane,
    organization_id: Uuid,
    event: &str,
    data: &Value,
) -> Vec<FollowUp> {
    let (kind, holds) = match event {
        "server.offline" => (AlertRuleKind::Offline, true),
        "server.online" => (AlertRuleKind::Offline, false),
        "health.failed" => (AlertRuleKind::HealthFailing, true),
        "health.recovered" => (AlertRuleKind::HealthFailing, false),
        _ => return Vec::new(),
    };
    let Some(server_id) = data["server_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
    else {
        return Vec::new();
    };
    let span = tracing::debug_span!("alert_event", %server_id, event);
    match apply_event(cp, organization_id, server_id, kind, holds)
        .instrument(span)
        .await
    {
        Ok(follow_ups) => follow_ups,
        Err(e) => {
            tracing::warn!(%server_id, event, error = %e, "could not apply an event to alert rules");
            Vec::new()
        }
    }
}

async fn apply_event(
    cp: &ControlPlane,
    organization_id: Uuid,
    server_id: Uuid,
    kind: AlertRuleKind,
    holds: bool,
) -> StoreResult<Vec<FollowUp>> {
    let ancestors: Vec<Uuid> = cp
        .store
        .organization_ancestors(organization_id)
        .await?
        .into_iter()
        .map(|o| o.id)
        .collect();
    let rules: Vec<AlertRule> = cp
        .store
        .all_alert_rules()
        .await?
        .into_iter()
        .filter(|r| r.kind == kind && ancestors.contains(&r.organization_id))
        .collect();
    if rules.is_empty() {
        return Ok(Vec::new());
    }
    let Some(server) = cp.store.server(&[organization_id], server_id).await? else {
        return Ok(Vec::new());
    };
    let now = Utc::now();
    let mut follow_ups = Vec::new();
    for rule in rules
        .iter()
        .filter(|r| ServerSelector::from(&r.selector).matches(&server))
    {
        if holds {
            cp.store.condition_holds(rule.id, server_id, now).await?;
        } else {
            cp.store.clear_condition(rule.id, server_id).await?;
            if let Some(alert) = cp.store.resolve_alert(rule.id, server_id, now).await? {
                tracing::info!(%server_id, rule_id = %rule.id, "alert resolved");
                follow_ups.push((
                    alert.organization_id,
                    "alert.resolved",
                    alert_data(&alert, Some(rule)),
                ));
            }
        }
    }
    Ok(follow_ups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_follow_their_operator() {
        assert!(Op::parse(">").unwrap().holds(2.0, 1.0));
        assert!(!Op::parse(">").unwrap().holds(1.0, 1.0));
        assert!(Op::parse(">=").unwrap().holds(1.0, 1.0));
        assert!(Op::parse("<").unwrap().holds(0.5, 1.0));
        assert!(Op::parse("<=").unwrap().holds(1.0, 1.0));
        assert!(Op::parse("==").is_none());
    }

    #[test]
    fn every_listed_metric_has_a_value() {
        let m = MetricsRecord {
            server_id: Uuid::now_v7(),
            seq: 1,
            ts: Utc::now(),
            cpu_percent: 12.5,
            load_1: 0.5,
            load_5: 0.4,
            load_15: 0.3,
            memory_used_bytes: 512,
            memory_total_bytes: 1024,
            swap_used_bytes: 0,
            swap_total_bytes: 0,
            cpu_per_core: json!([]).into(),
            disks: json!([{"used_bytes": 30, "total_bytes": 100}, {"used_bytes": 90, "total_bytes": 100}]).into(),
            networks: json!([]).into(),
            uptime_seconds: 10,
            process_count: 42,
            dropped_batches: 0,
        };
        for name in METRICS {
            assert!(metric_value(name, &m).is_some(), "{name}");
        }
        assert_eq!(metric_value("memory_used_percent", &m), Some(50.0));
        assert_eq!(metric_value("disk_used_percent", &m), Some(90.0));
        assert_eq!(metric_value("no_such_metric", &m), None);
    }
}
