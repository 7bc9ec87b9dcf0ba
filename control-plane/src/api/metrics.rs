//! Telemetry reads: `GET /api/v1/servers/{id}/metrics` (raw points with `seq`,
//! or 5-minute / 1-hour rollups by `step`), `GET /api/v1/servers/{id}/containers`
//! (the latest container report), and `GET /metrics/fleet` (Prometheus text
//! exposition of every visible server's latest values).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, ApiQuery};
use crate::auth::Scope;
use crate::context::ControlPlane;
use crate::store::{ContainerRecord, MetricsRecord, RollupRecord, Server, ServerQuery};

const DEFAULT_LIMIT: u32 = 1000;
const MAX_LIMIT: u32 = 10_000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Start (RFC 3339) [default: an hour before `to`].
    pub from: Option<DateTime<Utc>>,
    /// End, exclusive (RFC 3339) [default: now].
    pub to: Option<DateTime<Utc>>,
    /// `raw` (default), `5m` or `1h`.
    pub step: Option<String>,
    /// Comma-separated fields to return (`ts` and `seq` always come).
    pub fields: Option<String>,
    pub limit: Option<u32>,
}

/// Points of one server.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricsPage {
    pub server_id: Uuid,
    /// `raw`, `5m` or `1h`.
    pub step: String,
    /// Raw points `{ts, seq, cpu_percent, cpu_per_core, load_1, load_5, load_15,
    /// memory_used_bytes, memory_total_bytes, memory_used_percent, swap_used_bytes,
    /// swap_total_bytes, disk_used_percent, disks, networks, uptime_seconds,
    /// process_count, dropped_batches}`, or rollup points `{ts, samples,
    /// cpu_percent, cpu_percent_max, load_1, memory_used_bytes, memory_total_bytes,
    /// memory_used_percent, swap_used_bytes}`.
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<Value>,
    pub next_cursor: Option<String>,
}

fn percent(used: f64, total: f64) -> f64 {
    if total > 0.0 {
        used / total * 100.0
    } else {
        0.0
    }
}

fn raw_point(m: &MetricsRecord) -> Map<String, Value> {
    let value = serde_json::json!({
        "ts": m.ts,
        "seq": m.seq,
        "cpu_percent": m.cpu_percent,
        "cpu_per_core": m.cpu_per_core.parse(),
        "load_1": m.load_1,
        "load_5": m.load_5,
        "load_15": m.load_15,
        "memory_used_bytes": m.memory_used_bytes,
        "memory_total_bytes": m.memory_total_bytes,
        "memory_used_percent": percent(m.memory_used_bytes as f64, m.memory_total_bytes as f64),
        "swap_used_bytes": m.swap_used_bytes,
        "swap_total_bytes": m.swap_total_bytes,
        "disk_used_percent": m.disk_used_percent(),
        "disks": m.disks.parse(),
        "networks": m.networks.parse(),
        "uptime_seconds": m.uptime_seconds,
        "process_count": m.process_count,
        "dropped_batches": m.dropped_batches,
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn rollup_point(r: &RollupRecord) -> Map<String, Value> {
    let value = serde_json::json!({
        "ts": r.bucket_start,
        "samples": r.samples,
        "cpu_percent": r.cpu_percent_avg,
        "cpu_percent_max": r.cpu_percent_max,
        "load_1": r.load_1_avg,
        "memory_used_bytes": r.memory_used_bytes_avg.round() as i64,
        "memory_total_bytes": r.memory_total_bytes,
        "memory_used_percent": percent(r.memory_used_bytes_avg, r.memory_total_bytes as f64),
        "swap_used_bytes": r.swap_used_bytes_avg.round() as i64,
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn select(mut point: Map<String, Value>, fields: &Option<Vec<String>>) -> Value {
    if let Some(fields) = fields {
        point.retain(|k, _| k == "ts" || k == "seq" || fields.iter().any(|f| f == k));
    }
    Value::Object(point)
}

/// A server the caller may read, or 404.
async fn readable_server(cp: &ControlPlane, caller: &Caller, id: Uuid) -> Result<Server, ApiError> {
    caller.require(Scope::ServersRead)?;
    cp.store
        .server(&caller.visible_organizations, id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such server"))
}

#[utoipa::path(
    get,
    path = "/servers/{id}/metrics",
    operation_id = "get_server_metrics",
    tag = "servers",
    params(("id" = Uuid, Path, description = "Server id"), MetricsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Raw points (with `seq`) or rollups, oldest first.", body = MetricsPage),
        (status = 400, description = "`invalid_request`: a malformed time, step, limit or range.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such server in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn server_metrics(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<MetricsQuery>,
) -> Result<Json<MetricsPage>, ApiError> {
    readable_server(&cp, &caller, id).await?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or(to - chrono::Duration::hours(1));
    if from >= to {
        return Err(ApiError::invalid_request("from must be before to"));
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let fields = q.fields.as_deref().map(|f| {
        f.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let step = q.step.as_deref().unwrap_or("raw");
    let step_seconds = match step {
        "raw" | "" => None,
        "5m" | "300" | "300s" => Some(300),
        "1h" | "3600" | "3600s" | "60m" => Some(3600),
        other => {
            return Err(ApiError::invalid_request(format!(
                "step {other:?} is not available: use raw, 5m or 1h"
            )))
        }
    };
    let (step_name, data) = match step_seconds {
        None => {
            let points = cp.store.metrics_points(id, from, to, limit).await?;
            (
                "raw",
                points
                    .iter()
                    .map(|p| select(raw_point(p), &fields))
                    .collect(),
            )
        }
        Some(step) => {
            let points = cp.store.metrics_rollups(id, step, from, to, limit).await?;
            (
                if step == 300 { "5m" } else { "1h" },
                points
                    .iter()
                    .map(|p| select(rollup_point(p), &fields))
                    .collect(),
            )
        }
    };
    Ok(Json(MetricsPage {
        server_id: id,
        step: step_name.into(),
        data,
        next_cursor: None,
    }))
}

/// One container as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContainerView {
    pub id: String,
    pub name: String,
    pub image: String,
    pub state: String,
    pub health: Option<String>,
    pub restart_count: i64,
    pub started_at: Option<String>,
    pub cpu_percent: f64,
    pub memory_usage_bytes: i64,
    pub memory_limit_bytes: i64,
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
    pub block_read_bytes: i64,
    pub block_write_bytes: i64,
}

impl From<ContainerRecord> for ContainerView {
    fn from(c: ContainerRecord) -> Self {
        Self {
            id: c.container_id,
            name: c.name,
            image: c.image,
            state: c.state,
            health: c.health,
            restart_count: c.restart_count,
            started_at: c.started_at,
            cpu_percent: c.cpu_percent,
            memory_usage_bytes: c.memory_usage_bytes,
            memory_limit_bytes: c.memory_limit_bytes,
            net_rx_bytes: c.net_rx_bytes,
            net_tx_bytes: c.net_tx_bytes,
            block_read_bytes: c.block_read_bytes,
            block_write_bytes: c.block_write_bytes,
        }
    }
}

/// The latest containers of a server.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContainerPage {
    pub data: Vec<ContainerView>,
    pub next_cursor: Option<String>,
    /// Docker daemon version; `null` when the daemon did not answer.
    pub docker_version: Option<String>,
    /// Why the agent could not read its Docker daemon.
    pub error: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

#[utoipa::path(
    get,
    path = "/servers/{id}/containers",
    operation_id = "get_server_containers",
    tag = "servers",
    params(("id" = Uuid, Path, description = "Server id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The containers of the latest report.", body = ContainerPage),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such server in the caller's organization tree.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn server_containers(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ContainerPage>, ApiError> {
    readable_server(&cp, &caller, id).await?;
    let page = match cp.store.container_set(id).await? {
        Some(set) => ContainerPage {
            data: set
                .containers
                .into_iter()
                .map(ContainerView::from)
                .collect(),
            next_cursor: None,
            docker_version: set.docker_version,
            error: set.error,
            updated_at: Some(set.updated_at),
        },
        None => ContainerPage {
            data: Vec::new(),
            next_cursor: None,
            docker_version: None,
            error: None,
            updated_at: None,
        },
    };
    Ok(Json(page))
}

/// Prometheus text exposition, grouped by metric family.
#[derive(Default)]
struct Exposition {
    families: BTreeMap<&'static str, (&'static str, &'static str, Vec<String>)>,
}

/// Escapes a label value for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let line = format!("{name}{{{}}} {value}", labels.join(","));
        self.families
            .entry(name)
            .or_insert((kind, help, Vec::new()))
            .2
            .push(line);
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (name, (kind, help, lines)) in &self.families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }
}

#[utoipa::path(
    get,
    path = "/metrics/fleet",
    operation_id = "get_fleet_metrics",
    tag = "metrics",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition (version 0.0.4) of every visible server's latest values.", body = String, content_type = "text/plain"),
        (status = 401, description = "`unauthorized`: missing, malformed, expired, unknown or revoked token.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `servers:read`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: too many requests this minute; retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the rate-limit window resets."))),
        (status = 500, description = "`internal_error`: a failure of the control plane.", body = ErrorBody),
    )
)]
pub async fn fleet(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Scope::ServersRead)?;
    let scope = caller.visible_organizations.clone();
    let mut servers = Vec::new();
    let mut after = None;
    loop {
        let page = cp
            .store
            .list_servers(&ServerQuery {
                scope: scope.clone(),
                limit: 500,
                after,
                ..Default::default()
            })
            .await?;
        let done = page.len() < 500;
        after = page.last().map(|s| s.id);
        servers.extend(page);
        if done {
            break;
        }
    }
    let latest: HashMap<Uuid, MetricsRecord> = cp
        .store
        .latest_metrics(&scope)
        .await?
        .into_iter()
        .map(|m| (m.server_id, m))
        .collect();
    let containers: HashMap<Uuid, Vec<ContainerRecord>> = cp
        .store
        .latest_container_sets(&scope)
        .await?
        .into_iter()
        .map(|s| (s.server_id, s.containers))
        .collect();
    let mut out = Exposition::default();
    for server in &servers {
        let id = server.id.to_string();
        let org = server.organization_id.to_string();
        let base = [
            ("server_id", id.as_str()),
            ("server_name", server.name.as_str()),
            ("organization_id", org.as_str()),
        ];
        let online = if server.status == crate::store::ServerStatus::Online {
            1.0
        } else {
            0.0
        };
        out.add(
            "tether_server_online",
            "gauge",
            "1 while the server's agent holds a session.",
            &base,
            online,
        );
        if let Some(m) = latest.get(&server.id) {
            let gauges: [(&'static str, &'static str, f64); 10] = [
                (
                    "tether_server_cpu_percent",
                    "CPU use of the whole host, percent.",
                    m.cpu_percent,
                ),
                ("tether_server_load1", "1-minute load average.", m.load_1),
                ("tether_server_load5", "5-minute load average.", m.load_5),
                ("tether_server_load15", "15-minute load average.", m.load_15),
                (
                    "tether_server_memory_used_bytes",
                    "Memory in use.",
                    m.memory_used_bytes as f64,
                ),
                (
                    "tether_server_memory_total_bytes",
                    "Memory installed.",
                    m.memory_total_bytes as f64,
                ),
                (
                    "tether_server_swap_used_bytes",
                    "Swap in use.",
                    m.swap_used_bytes as f64,
                ),
                (
                    "tether_server_uptime_seconds",
                    "Seconds since boot.",
                    m.uptime_seconds as f64,
                ),
                (
                    "tether_server_processes",
                    "Processes running.",
                    m.process_count as f64,
                ),
                (
                    "tether_server_last_report_timestamp_seconds",
                    "When the latest report was collected.",
                    m.ts.timestamp() as f64,
                ),
            ];
            for (name, help, value) in gauges {
                out.add(name, "gauge", help, &base, value);
            }
            out.add(
                "tether_server_spool_dropped_batches_total",
                "counter",
                "Reports the agent dropped from its full spool.",
                &base,
                m.dropped_batches as f64,
            );
            let disks = m.disks.parse();
            for disk in disks.as_array().into_iter().flatten() {
                let mount = disk["mount_point"].as_str().unwrap_or_default();
                let device = disk["device"].as_str().unwrap_or_default();
                let labels = [
                    base[0],
                    base[1],
                    base[2],
                    ("mount_point", mount),
                    ("device", device),
                ];
                out.add(
                    "tether_server_disk_used_bytes",
                    "gauge",
                    "Bytes used on a filesystem.",
                    &labels,
                    disk["used_bytes"].as_f64().unwrap_or_default(),
                );
                out.add(
                    "tether_server_disk_total_bytes",
                    "gauge",
                    "Size of a filesystem.",
                    &labels,
                    disk["total_bytes"].as_f64().unwrap_or_default(),
                );
            }
            let networks = m.networks.parse();
            for net in networks.as_array().into_iter().flatten() {
                let interface = net["interface"].as_str().unwrap_or_default();
                let labels = [base[0], base[1], base[2], ("interface", interface)];
                out.add(
                    "tether_server_network_receive_bytes_total",
                    "counter",
                    "Bytes received on an interface.",
                    &labels,
                    net["rx_bytes"].as_f64().unwrap_or_default(),
                );
                out.add(
                    "tether_server_network_transmit_bytes_total",
                    "counter",
                    "Bytes sent on an interface.",
                    &labels,
                    net["tx_bytes"].as_f64().unwrap_or_default(),
                );
            }
        }
        for c in containers.get(&server.id).into_iter().flatten() {
            let labels = [
                base[0],
                base[1],
                base[2],
                ("container", c.name.as_str()),
                ("container_id", c.container_id.as_str()),
                ("image", c.image.as_str()),
            ];
            let running = if c.state == "running" { 1.0 } else { 0.0 };
            out.add(
                "tether_container_running",
                "gauge",
                "1 while the container runs.",
                &labels,
                running,
            );
            out.add(
                "tether_container_cpu_percent",
                "gauge",
                "CPU use of a container, percent of one core.",
                &labels,
                c.cpu_percent,
            );
            out.add(
                "tether_container_memory_usage_bytes",
                "gauge",
                "Memory used by a container.",
                &labels,
                c.memory_usage_bytes as f64,
            );
            out.add(
                "tether_container_memory_limit_bytes",
                "gauge",
                "Memory limit of a container.",
                &labels,
                c.memory_limit_bytes as f64,
            );
            out.add(
                "tether_container_network_receive_bytes_total",
                "counter",
                "Bytes a container received.",
                &labels,
                c.net_rx_bytes as f64,
            );
            out.add(
                "tether_container_network_transmit_bytes_total",
                "counter",
                "Bytes a container sent.",
                &labels,
                c.net_tx_bytes as f64,
            );
            out.add(
                "tether_container_block_read_bytes_total",
                "counter",
                "Bytes a container read from block devices.",
                &labels,
                c.block_read_bytes as f64,
            );
            out.add(
                "tether_container_block_write_bytes_total",
                "counter",
                "Bytes a container wrote to block devices.",
                &labels,
                c.block_write_bytes as f64,
            );
            out.add(
                "tether_container_restarts_total",
                "counter",
                "Times the container was restarted.",
                &labels,
                c.restart_count as f64,
            );
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.render(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_groups_families_and_escapes_label_values() {
        let mut out = Exposition::default();
        out.add(
            "b_metric",
            "gauge",
            "B.",
            &[("name", "a \"quoted\"\nname\\")],
            1.0,
        );
        out.add("a_metric", "counter", "A.", &[("x", "1")], 2.5);
        out.add("b_metric", "gauge", "B.", &[("name", "other")], 3.0);
        let text = out.render();
        assert_eq!(
            text,
            "# HELP a_metric A.\n# TYPE a_metric counter\na_metric{x=\"1\"} 2.5\n\
             # HELP b_metric B.\n# TYPE b_metric gauge\nb_metric{name=\"a \\\"quoted\\\"\\nname\\\\\"} 1\nb_metric{name=\"other\"} 3\n"
        );
    }
}
