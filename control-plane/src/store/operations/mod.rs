//! Commands sent to agents: requests, per-server status and bounded output.
//!
//! What a submission runs is stored once, in a request
//! ([`NewCommandRequest`]) every per-server command of it refers to: a
//! fan-out over 10,000 servers keeps one argv, one environment and one
//! stdin. The environment and stdin are sealed (contexts
//! [`command_env_context`] and [`command_stdin_context`] of the request id)
//! and cleared once no command of the request is queued or running.
//!
//! One row per (command, server). Status moves only forward:
//! `queued -> running -> <terminal>` or `queued -> cancelled|undeliverable`;
//! every write is a conditional `UPDATE` on the status it expects, so a late
//! output chunk or outcome never changes a finished command, and of several
//! replicas claiming a queued command exactly one wins.
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite.

mod postgres;
mod sqlite;

use std::pin::Pin;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreResult;

/// Sealing context of the environment of the command request `id`.
pub fn command_env_context(id: Uuid) -> String {
    format!("command/{id}/env")
}

/// Sealing context of the stdin of the command request `id`.
pub fn command_stdin_context(id: Uuid) -> String {
    format!("command/{id}/stdin")
}

/// The PostgreSQL channel replicas route commands on.
pub const COMMAND_CHANNEL: &str = "tether_commands";

/// Where a command is, as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// The agent's local policy refused it.
    Refused,
    /// Its server did not connect before the delivery deadline.
    Undeliverable,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Refused => "refused",
            Self::Undeliverable => "undeliverable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "timed_out" => Self::TimedOut,
            "cancelled" => Self::Cancelled,
            "refused" => Self::Refused,
            "undeliverable" => Self::Undeliverable,
            _ => return None,
        })
    }

    /// No further change will happen.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// What a submission (one server, or every target of a fan-out) runs,
/// stored once.
#[derive(Debug, Clone)]
pub struct NewCommandRequest {
    pub id: Uuid,
    pub argv: Vec<String>,
    /// The environment (JSON pairs) sealed under [`command_env_context`].
    pub env_sealed: Option<String>,
    /// stdin sealed under [`command_stdin_context`].
    pub stdin_sealed: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A command to store: one server's share of a request.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: Uuid,
    /// The [`NewCommandRequest`] it runs.
    pub request_id: Uuid,
    pub organization_id: Uuid,
    pub server_id: Uuid,
    pub timeout_ms: i64,
    pub max_output_bytes: i64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// Still queued past this: `undeliverable`.
    pub deliver_by: DateTime<Utc>,
    /// `Some(worker)`: stored already claimed (`running`) by this worker,
    /// which holds the server's session.
    pub claimed_by: Option<String>,
}

/// A command as the API shows it (no environment, no stdin).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub server_id: Uuid,
    pub argv: Vec<String>,
    pub timeout_ms: i64,
    pub max_output_bytes: i64,
    pub status: CommandState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Option<String>,
    pub output: Vec<u8>,
    pub output_truncated: bool,
    pub cancel_requested: bool,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub claimed_by: Option<String>,
    pub deliver_by: DateTime<Utc>,
}

/// What a worker needs to dispatch a command it claimed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClaimedCommand {
    pub id: Uuid,
    /// Its request: the context of the sealed values below.
    pub request_id: Uuid,
    pub organization_id: Uuid,
    pub server_id: Uuid,
    pub argv: Vec<String>,
    /// Sealed under [`command_env_context`] of `request_id`.
    pub env_sealed: Option<String>,
    /// Sealed under [`command_stdin_context`] of `request_id`.
    pub stdin_sealed: Option<String>,
    pub timeout_ms: i64,
    pub max_output_bytes: i64,
    pub cancel_requested: bool,
}

impl std::fmt::Debug for ClaimedCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedCommand")
            .field("id", &self.id)
            .field("server_id", &self.server_id)
            .field("request_id", &self.request_id)
            .field("argc", &self.argv.len())
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

/// How a running command ended.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandFinish {
    /// A terminal state.
    pub status: CommandState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: Option<String>,
    /// Output not stored yet, appended with the outcome.
    pub output_tail: Vec<u8>,
    pub output_truncated: bool,
    pub at: DateTime<Utc>,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued: cancelled without being dispatched.
    CancelledQueued,
    /// It runs: the cancel was recorded; whoever runs it kills it.
    Requested,
    /// Already ended in this state.
    AlreadyFinished(CommandState),
    NotFound,
}

/// Notifications replicas send one another about commands.
pub type CommandNotifications = Pin<Box<dyn futures::Stream<Item = String> + Send>>;

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait OperationsStore: Send + Sync {
    /// Stores a request and its commands (which all refer to it) in one
    /// transaction.
    async fn create_commands(
        &self,
        request: &NewCommandRequest,
        commands: &[NewCommand],
    ) -> StoreResult<()>;

    /// A command of an organization in `scope` (`None` scope: the control
    /// plane's own view).
    async fn command(&self, scope: Option<&[Uuid]>, id: Uuid)
        -> StoreResult<Option<CommandRecord>>;

    /// Moves a queued command to `running` for `worker`; `None` when it was
    /// not queued (claimed elsewhere, cancelled, undeliverable) or its
    /// delivery deadline passed.
    async fn claim_command(
        &self,
        id: Uuid,
        worker: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<ClaimedCommand>>;

    /// Queued commands (id, server id) still deliverable at `now`, oldest
    /// first; only those of `server_id` when given.
    async fn queued_commands(
        &self,
        server_id: Option<Uuid>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, Uuid)>>;

    /// Appends output to a running command; `false` (nothing written) when
    /// it is not running. The caller keeps the bound.
    async fn append_command_output(
        &self,
        id: Uuid,
        chunk: &[u8],
        truncated: bool,
    ) -> StoreResult<bool>;

    /// Ends a running command; `false` when it was not running. Clears the
    /// environment and stdin of its request once no command of it is
    /// queued or running (as cancelling a queued command and the
    /// undeliverable sweep do).
    async fn finish_command(&self, id: Uuid, finish: &CommandFinish) -> StoreResult<bool>;

    /// Cancels a queued command, or records a cancel request on a running one.
    async fn cancel_command(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome>;

    /// Marks commands still queued past their delivery deadline
    /// `undeliverable`; returns them.
    async fn mark_undeliverable(&self, now: DateTime<Utc>) -> StoreResult<Vec<Uuid>>;

    /// Commands queued or running on a server.
    async fn active_commands_on_server(&self, server_id: Uuid) -> StoreResult<i64>;

    /// Tells every replica `payload` (PostgreSQL `NOTIFY`); a no-op on a
    /// single-process database.
    async fn notify_commands(&self, payload: &str) -> StoreResult<()>;

    /// Notifications sent with [`OperationsStore::notify_commands`] by any
    /// replica; `None` on a single-process database.
    async fn command_notifications(&self) -> StoreResult<Option<CommandNotifications>>;
}
