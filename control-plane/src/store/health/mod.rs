//! Health results reported by agents, health checks pushed to them, and the
//! connection-state transitions the gateway and its sweeper make.
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite
//! (`control-plane/tests/store_health.rs`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::row::StoreRow;
use super::{Labels, Server, ServerSelector, StoreResult};

mod postgres;
mod sqlite;

/// What a pushed check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// `GET url`; passes on `expected_status` (default: any 2xx) and, with
    /// `body_contains`, when the body contains it.
    Http,
    /// A TCP connection to `address` (`host:port`) is established.
    Tcp,
    /// `argv` (no shell) exits with 0.
    Exec,
}

impl HealthCheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
            Self::Exec => "exec",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "http" => Self::Http,
            "tcp" => Self::Tcp,
            "exec" => Self::Exec,
            _ => return None,
        })
    }
}

/// The fields of a check's `spec`; which ones apply depends on its kind
/// (`http`: `url`, `expected_status`, `body_contains`; `tcp`: `address`;
/// `exec`: `argv`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpecFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    /// `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
}

// The API's and the database's JSON shape of a check's selector (absent
// fields stay absent; `"server_ids": []` selects none); what it selects is
// `ServerSelector`'s.
/// Which servers of the check's organization tree run a check: all of them
/// when empty; otherwise those having every label and (when given) being
/// one of `server_ids`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    pub labels: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_ids: Option<Vec<Uuid>>,
}

impl From<&HealthSelector> for ServerSelector {
    fn from(selector: &HealthSelector) -> Self {
        Self {
            labels: selector.labels.clone().unwrap_or_default(),
            server_ids: selector.server_ids.clone(),
        }
    }
}

/// A health check pushed to the selected servers of an organization tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub kind: HealthCheckKind,
    pub spec: HealthCheckSpecFields,
    pub interval_seconds: i64,
    pub timeout_seconds: i64,
    pub retries: i64,
    pub start_period_seconds: i64,
    pub selector: HealthSelector,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl HealthCheck {
    /// Whether this check runs on `server`, given the organizations the
    /// check's organization covers (`scope`: it and its descendants).
    pub fn applies_to(&self, scope: &[Uuid], server: &Server) -> bool {
        scope.contains(&server.organization_id)
            && ServerSelector::from(&self.selector).matches(server)
    }
}

/// The latest result of one check on one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthResultRecord {
    pub server_id: Uuid,
    /// The pushed check's id (a UUID) or `builtin:<name>`.
    pub check_id: String,
    pub name: String,
    /// `starting`, `passing`, `failing`, or `rejected` (the agent refused
    /// the check; `message` says why).
    pub status: String,
    pub message: String,
    pub consecutive_failures: i64,
    /// When the run ended, by the agent's clock.
    pub checked_at: DateTime<Utc>,
    pub duration_ms: i64,
    /// The report it came in (per agent process).
    pub seq: i64,
    pub received_at: DateTime<Utc>,
}

/// A check that moved between passing and failing with a stored report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTransition {
    pub check_id: String,
    pub check_name: String,
    /// `true`: it is failing now (`health.failed`); `false`: it recovered.
    pub failed: bool,
    pub message: String,
}

/// A server whose connection state a call changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRef {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
}

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait HealthStore: Send + Sync {
    async fn create_health_check(&self, check: &HealthCheck) -> StoreResult<()>;

    /// A check of an organization in `scope`.
    async fn health_check(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<HealthCheck>>;

    /// Checks of the organizations in `scope`, by id, after `after`.
    async fn list_health_checks(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<HealthCheck>>;

    /// Replaces a check's fields (not its id, organization or creation
    /// time); `false` when it is not in `scope`.
    async fn update_health_check(&self, scope: &[Uuid], check: &HealthCheck) -> StoreResult<bool>;

    /// Deletes a check; `false` when it is not in `scope`.
    async fn delete_health_check(&self, scope: &[Uuid], id: Uuid) -> StoreResult<bool>;

    /// Stores a report's results in one transaction and returns the checks
    /// that moved to failing (from anything else) or from failing to
    /// passing. A result older than the stored one of its check is ignored,
    /// so a replayed report changes nothing and yields no transition.
    /// Stored results of checks missing from `results` (a snapshot) are
    /// deleted, except `rejected` ones (see [`Self::record_rejected_checks`]). Also refreshes the server's `last_seen_at`.
    async fn record_health_report(
        &self,
        server_id: Uuid,
        results: &[HealthResultRecord],
        received_at: DateTime<Utc>,
    ) -> StoreResult<Vec<HealthTransition>>;

    /// Replaces the server's `rejected` rows (checks its agent refused at
    /// the last push) with `rejected` (their status is `rejected`). Reports
    /// never delete these rows; the next push's answer does.
    async fn record_rejected_checks(
        &self,
        server_id: Uuid,
        rejected: &[HealthResultRecord],
    ) -> StoreResult<()>;

    /// The latest result of every check of a server, by check id.
    async fn health_results(&self, server_id: Uuid) -> StoreResult<Vec<HealthResultRecord>>;

    /// Marks a server offline with `reason` at the end of the session that
    /// made it online at `online_since` (see [`super::Store::mark_online`]);
    /// `None` (nothing changed) when it is not online or a newer session
    /// holds it.
    async fn end_session(
        &self,
        server_id: Uuid,
        online_since: DateTime<Utc>,
        reason: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<ServerRef>>;

    /// Marks offline, with `reason`, the online servers not seen since
    /// `cutoff` (no replica refreshed them); returns them.
    async fn mark_stale_offline(
        &self,
        cutoff: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<Vec<ServerRef>>;

    /// Marks `timeout`, with `reason`, the servers still `connecting` that
    /// were created before `created_before`; returns them.
    async fn mark_registration_timeouts(
        &self,
        created_before: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<Vec<ServerRef>>;
}

/// Which transition, if any, a check makes from `previous` to `current`.
pub(crate) fn transition(previous: Option<&str>, current: &str) -> Option<bool> {
    match (previous, current) {
        (Some("failing"), "failing") => None,
        (_, "failing") => Some(true),
        (Some("failing"), "passing") => Some(false),
        _ => None,
    }
}

/// A `health_results` row.
pub(crate) fn result_from_row(row: &impl StoreRow) -> StoreResult<HealthResultRecord> {
    Ok(HealthResultRecord {
        server_id: row.id("server_id")?,
        check_id: row.text("check_id")?,
        name: row.text("name")?,
        status: row.text("status")?,
        message: row.text("message")?,
        consecutive_failures: row.int("consecutive_failures")?,
        checked_at: row.time("checked_at")?,
        duration_ms: row.int("duration_ms")?,
        seq: row.int("seq")?,
        received_at: row.time("received_at")?,
    })
}

/// The servers (`id, organization_id, name`) a connection-state change hit.
pub(crate) fn server_refs(rows: &[impl StoreRow]) -> StoreResult<Vec<ServerRef>> {
    rows.iter()
        .map(|row| {
            Ok(ServerRef {
                id: row.id("id")?,
                organization_id: row.id("organization_id")?,
                name: row.text("name")?,
            })
        })
        .collect()
}
