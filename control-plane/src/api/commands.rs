//! `/api/v1/servers/{id}/commands` and `/api/v1/commands`: run a program on
//! one server or a selector-defined fleet, follow its output (SSE), cancel
//! it. Everything needs `commands:run`; commands are scoped to the caller's
//! organization tree. Environment values and stdin are never returned or
//! logged (only environment names reach the audit log).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath};
use crate::auth::Scope;
use crate::commands::lookup::{self, CancelError, FollowEvent, VisibleCommand};
use crate::commands::{
    CommandSpec, Target, DEFAULT_DELIVER_WITHIN, DEFAULT_MAX_OUTPUT_BYTES, MAX_FAN_OUT,
};
use crate::context::ControlPlane;
use crate::store::selector::{self, InputLimits, SelectorInputError};
use crate::store::{CommandRecord, CommandState, ServerQuery, ServerSelector};

/// Longest `timeout_seconds` and `deliver_within_seconds`.
const MAX_SECONDS: u64 = 86_400;
/// Stdin accepted, at most.
const MAX_STDIN_BYTES: usize = 256 * 1024;

/// `POST /servers/{id}/commands`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommand {
    /// Program and arguments (no shell). `argv[0]` is a path or a name in the agent's `PATH`.
    pub argv: Vec<String>,
    /// Variables set for the process. Values may be secrets: stored sealed, never returned.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Written to the process's standard input (UTF-8 text, at most 256 KiB).
    pub stdin: Option<String>,
    /// The agent kills the process group after this long (1-86400).
    pub timeout_seconds: u64,
    /// A command whose server is offline waits this long (1-86400, default 60)
    /// before it is `undeliverable`.
    pub deliver_within_seconds: Option<u64>,
    /// Output kept, at most (stdout and stderr together; 1-1048576, default 1 MiB).
    pub max_output_bytes: Option<u64>,
}

/// Which servers a fan-out goes to: servers carrying every label, and/or
/// servers by id (both given: the listed servers carrying every label).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub server_ids: Vec<Uuid>,
}

impl From<&Selector> for ServerSelector {
    /// An empty list is no filter.
    fn from(selector: &Selector) -> Self {
        Self {
            labels: selector.labels.clone(),
            server_ids: (!selector.server_ids.is_empty()).then(|| selector.server_ids.clone()),
        }
    }
}

/// `POST /commands`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FanOutCommand {
    pub selector: Selector,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub stdin: Option<String>,
    pub timeout_seconds: u64,
    pub deliver_within_seconds: Option<u64>,
    pub max_output_bytes: Option<u64>,
}

/// Answer of `POST /servers/{id}/commands`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandAccepted {
    pub command_id: Uuid,
}

/// One target of a fan-out.
#[derive(Debug, Serialize, ToSchema)]
pub struct FanOutTarget {
    pub server_id: Uuid,
    pub command_id: Uuid,
}

/// Answer of `POST /commands`.
#[derive(Debug, Serialize, ToSchema)]
pub struct FanOutAccepted {
    /// One command per server, follow each with `GET /commands/{id}`.
    pub command_ids: Vec<Uuid>,
    /// Which server each command went to.
    pub commands: Vec<FanOutTarget>,
}

/// A command as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandView {
    pub id: Uuid,
    pub server_id: Uuid,
    pub organization_id: Uuid,
    pub status: CommandState,
    pub argv: Vec<String>,
    /// Exit code when the process exited by itself.
    pub exit_code: Option<i32>,
    /// Signal that killed the process, when not killed by the agent.
    pub signal: Option<i32>,
    /// Why it was refused, failed, timed out or could not be delivered.
    pub reason: Option<String>,
    /// stdout and stderr as they came, up to the bound (invalid UTF-8 replaced).
    pub output: String,
    /// More output was written than kept.
    pub output_truncated: bool,
    pub timeout_seconds: f64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Still queued at this time: `undeliverable`.
    pub deliver_by: DateTime<Utc>,
    /// Set when the command runs on a peer branch's server (relayed through
    /// `POST /branches/{branch_id}/servers/{server_id}/commands`): its status
    /// and output are copied from that branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch_id: Option<Uuid>,
}

impl From<CommandRecord> for CommandView {
    fn from(r: CommandRecord) -> Self {
        Self {
            id: r.id,
            server_id: r.server_id,
            organization_id: r.organization_id,
            status: r.status,
            argv: r.argv,
            exit_code: r.exit_code,
            signal: r.signal,
            reason: r.reason,
            output: String::from_utf8_lossy(&r.output).into_owned(),
            output_truncated: r.output_truncated,
            timeout_seconds: r.timeout_ms as f64 / 1000.0,
            created_by: r.created_by,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            deliver_by: r.deliver_by,
            branch_id: None,
        }
    }
}

fn no_nul(text: &str) -> bool {
    !text.contains('\0')
}

/// Checks a request and turns it into what the relay runs.
fn spec(
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    stdin: Option<String>,
    timeout_seconds: u64,
    deliver_within_seconds: Option<u64>,
    max_output_bytes: Option<u64>,
) -> Result<CommandSpec, ApiError> {
    if argv.first().is_none_or(|program| program.is_empty()) {
        return Err(ApiError::validation("argv must name a program"));
    }
    if !argv.iter().all(|a| no_nul(a)) {
        return Err(ApiError::validation("argv must not contain NUL characters"));
    }
    for (name, value) in &env {
        if name.is_empty() || name.contains('=') || !no_nul(name) || !no_nul(value) {
            return Err(ApiError::validation(format!(
                "environment variable names must be non-empty without '=' or NUL, values without NUL ({name:?})"
            )));
        }
    }
    if !(1..=MAX_SECONDS).contains(&timeout_seconds) {
        return Err(ApiError::validation(format!(
            "timeout_seconds must be between 1 and {MAX_SECONDS}"
        )));
    }
    let deliver_within = match deliver_within_seconds {
        None => DEFAULT_DELIVER_WITHIN,
        Some(s) if (1..=MAX_SECONDS).contains(&s) => Duration::from_secs(s),
        Some(_) => {
            return Err(ApiError::validation(format!(
                "deliver_within_seconds must be between 1 and {MAX_SECONDS}"
            )))
        }
    };
    let max_output_bytes = match max_output_bytes {
        None => DEFAULT_MAX_OUTPUT_BYTES,
        Some(n) if (1..=DEFAULT_MAX_OUTPUT_BYTES).contains(&n) => n,
        Some(_) => {
            return Err(ApiError::validation(format!(
                "max_output_bytes must be between 1 and {DEFAULT_MAX_OUTPUT_BYTES}"
            )))
        }
    };
    let stdin = stdin.map(String::into_bytes);
    if stdin.as_ref().is_some_and(|s| s.len() > MAX_STDIN_BYTES) {
        return Err(ApiError::validation(format!(
            "stdin must be at most {MAX_STDIN_BYTES} bytes"
        )));
    }
    Ok(CommandSpec {
        argv,
        env: env.into_iter().collect(),
        stdin,
        timeout: Duration::from_secs(timeout_seconds),
        max_output_bytes,
        deliver_within,
    })
}

fn relay_error(e: crate::commands::CommandError) -> ApiError {
    match e {
        crate::commands::CommandError::Store(e) => e.into(),
        other => ApiError::internal(other),
    }
}

/// Runs a program on one server.
#[utoipa::path(
    post,
    path = "/servers/{id}/commands",
    operation_id = "run_command",
    tag = "commands",
    params(("id" = Uuid, Path, description = "Server id")),
    request_body = RunCommand,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted: dispatched now, or queued until the server connects (up to `deliver_within_seconds`).", body = CommandAccepted,
            links(("get" = (operation_id = "get_command", parameters(("id" = "$response.body#/command_id")), description = "The command.")))),
        (status = 400, description = "`invalid_request`: malformed JSON or id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `commands:run`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such server in the caller's organization tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: empty argv, bad timeout, bound or environment, unknown field.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn run_on_server(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(server_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<RunCommand>,
) -> Result<(StatusCode, Json<CommandAccepted>), ApiError> {
    caller.require(Scope::CommandsRun)?;
    let env_names: Vec<String> = body.env.keys().cloned().collect();
    let spec = spec(
        body.argv,
        body.env,
        body.stdin,
        body.timeout_seconds,
        body.deliver_within_seconds,
        body.max_output_bytes,
    )?;
    let server = cp
        .store
        .server(&caller.visible_organizations, server_id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such server"))?;
    let target = Target {
        server_id,
        organization_id: server.organization_id,
    };
    let ids = crate::commands::submit(&cp, &[target], &spec, &caller.actor())
        .await
        .map_err(relay_error)?;
    let command_id = ids
        .first()
        .copied()
        .ok_or_else(|| ApiError::internal("no command was created"))?;
    tracing::info!(%command_id, %server_id, "command submitted");
    tracing::debug!(%command_id, argv = ?spec.argv, "command argv");
    caller
        .audit(
            &cp,
            server.organization_id,
            "command.run",
            command_id.to_string(),
            serde_json::json!({ "server_id": server_id, "argv": spec.argv, "env_names": env_names }),
        )
        .await;
    Ok((StatusCode::ACCEPTED, Json(CommandAccepted { command_id })))
}

/// The servers a selector names, within the caller's tree.
async fn resolve(
    cp: &ControlPlane,
    caller: &Caller,
    selector: &Selector,
) -> Result<Vec<Target>, ApiError> {
    if selector.labels.is_empty() && selector.server_ids.is_empty() {
        return Err(ApiError::validation("selector needs labels or server_ids"));
    }
    let input = selector::check_input(
        &selector.labels,
        &selector.server_ids,
        InputLimits {
            max_labels: usize::MAX,
            max_server_ids: MAX_FAN_OUT,
        },
    );
    match input {
        Err(
            SelectorInputError::TooManyLabels { .. } | SelectorInputError::TooManyServerIds { .. },
        ) => {
            return Err(ApiError::validation(format!(
                "a fan-out reaches at most {MAX_FAN_OUT} servers"
            )));
        }
        // Listed servers are matched here, not in a query, so only a label
        // query refuses control characters (PostgreSQL cannot compare NUL).
        // An empty key is no error: it matches no server.
        Err(SelectorInputError::ControlCharacters) if selector.server_ids.is_empty() => {
            return Err(ApiError::validation(
                "labels must not contain control characters",
            ));
        }
        Err(SelectorInputError::ControlCharacters | SelectorInputError::EmptyLabelKey) | Ok(()) => {
        }
    }
    let wanted = ServerSelector::from(selector);
    let mut targets = Vec::new();
    if !selector.server_ids.is_empty() {
        let mut seen = std::collections::HashSet::new();
        for id in &selector.server_ids {
            if !seen.insert(*id) {
                continue;
            }
            let server = cp
                .store
                .server(&caller.visible_organizations, *id)
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(format!("no such server {id}"))
                        .with_detail("server_id", id.to_string())
                })?;
            if wanted.matches(&server) {
                targets.push(Target {
                    server_id: server.id,
                    organization_id: server.organization_id,
                });
            }
        }
        return Ok(targets);
    }
    let labels: Vec<(String, String)> = selector
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut after = None;
    loop {
        let page = cp
            .store
            .list_servers(&ServerQuery {
                scope: caller.visible_organizations.clone(),
                status: None,
                labels: labels.clone(),
                limit: 500,
                after,
            })
            .await?;
        let done = page.len() < 500;
        after = page.last().map(|s| s.id);
        // The query narrows by label; the selector decides.
        targets.extend(
            page.into_iter()
                .filter(|s| wanted.matches(s))
                .map(|s| Target {
                    server_id: s.id,
                    organization_id: s.organization_id,
                }),
        );
        if targets.len() > MAX_FAN_OUT {
            return Err(ApiError::validation(format!(
                "the selector matches more than {MAX_FAN_OUT} servers"
            )));
        }
        if done {
            return Ok(targets);
        }
    }
}

/// Runs a program on every server a selector matches (per-server commands).
#[utoipa::path(
    post,
    path = "/commands",
    operation_id = "fan_out_command",
    tag = "commands",
    request_body = FanOutCommand,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "One command per matched server, dispatched with at most `--command-concurrency` at a time.", body = FanOutAccepted),
        (status = 400, description = "`invalid_request`: malformed JSON.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `commands:run`.", body = ErrorBody),
        (status = 404, description = "`not_found`: a listed server is not in the caller's organization tree.", body = ErrorBody),
        (status = 413, description = "`invalid_request`: body over 1 MiB.", body = ErrorBody),
        (status = 422, description = "`validation_error`: empty selector, selector matching no server (or more than 10000), bad argv, timeout, bound or environment.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn fan_out(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiJson(body): ApiJson<FanOutCommand>,
) -> Result<(StatusCode, Json<FanOutAccepted>), ApiError> {
    caller.require(Scope::CommandsRun)?;
    let env_names: Vec<String> = body.env.keys().cloned().collect();
    let spec = spec(
        body.argv,
        body.env,
        body.stdin,
        body.timeout_seconds,
        body.deliver_within_seconds,
        body.max_output_bytes,
    )?;
    let targets = resolve(&cp, &caller, &body.selector).await?;
    if targets.is_empty() {
        return Err(ApiError::validation("the selector matches no server"));
    }
    let ids = crate::commands::submit(&cp, &targets, &spec, &caller.actor())
        .await
        .map_err(relay_error)?;
    tracing::info!(targets = ids.len(), "fan-out command submitted");
    tracing::debug!(argv = ?spec.argv, "fan-out command argv");
    let commands: Vec<FanOutTarget> = targets
        .iter()
        .zip(&ids)
        .map(|(t, id)| FanOutTarget {
            server_id: t.server_id,
            command_id: *id,
        })
        .collect();
    caller
        .audit(
            &cp,
            caller.organization_id,
            "command.fan_out",
            format!("{} servers", ids.len()),
            serde_json::json!({
                "argv": spec.argv,
                "env_names": env_names,
                "labels": body.selector.labels,
                "commands": commands.iter().map(|c| serde_json::json!({"server_id": c.server_id, "command_id": c.command_id})).collect::<Vec<_>>(),
            }),
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(FanOutAccepted {
            command_ids: ids,
            commands,
        }),
    ))
}

impl From<VisibleCommand> for CommandView {
    fn from(c: VisibleCommand) -> Self {
        let mut view = CommandView::from(c.record);
        view.branch_id = c.branch_id;
        view
    }
}

/// The command `id` (or the mirror `id`) if the caller may see it.
async fn visible_command(
    cp: &ControlPlane,
    caller: &Caller,
    id: Uuid,
) -> Result<VisibleCommand, ApiError> {
    lookup::find(cp, Some(&caller.visible_organizations), id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such command"))
}

/// Maps a failed cancel to the answer the caller sees.
fn cancel_error(e: CancelError) -> ApiError {
    match e {
        CancelError::NotFound => ApiError::not_found("no such command"),
        CancelError::AlreadyEnded(state) => {
            ApiError::conflict(e.to_string()).with_detail("status", state.as_str())
        }
        CancelError::PeeringRemoved => ApiError::not_found(e.to_string()),
        CancelError::BranchUnreachable(_) => ApiError::branch_unreachable(e.to_string()),
        CancelError::Federation(e) => super::branches::federation_error(e),
        CancelError::Command(e) => relay_error(e),
        CancelError::Store(e) => e.into(),
    }
}

/// One command: status, exit code, output so far.
#[utoipa::path(
    get,
    path = "/commands/{id}",
    operation_id = "get_command",
    tag = "commands",
    params(("id" = Uuid, Path, description = "Command id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The command.", body = CommandView),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `commands:run`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn get(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<CommandView>, ApiError> {
    caller.require(Scope::CommandsRun)?;
    Ok(Json(visible_command(&cp, &caller, id).await?.into()))
}

/// Cancels a command: a queued one is never sent; a running one has its
/// process group killed by the agent (`cancelled`).
#[utoipa::path(
    post,
    path = "/commands/{id}/cancel",
    operation_id = "cancel_command",
    tag = "commands",
    params(("id" = Uuid, Path, description = "Command id")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Cancelled (queued) or cancel sent (running); the command as it is now.", body = CommandView),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `commands:run`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`conflict`: the command already ended (`status` says how).", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(StatusCode, Json<CommandView>), ApiError> {
    caller.require(Scope::CommandsRun)?;
    let cancelled = lookup::cancel(&cp, &caller.visible_organizations, id)
        .await
        .map_err(cancel_error)?;
    caller
        .audit(
            &cp,
            cancelled.command.record.organization_id,
            "command.cancel",
            id.to_string(),
            cancelled.audit_details,
        )
        .await;
    Ok((StatusCode::ACCEPTED, Json(cancelled.command.into())))
}

/// Output of a command as SSE: what is stored, then live chunks, then one
/// `status` event with the finished command.
#[utoipa::path(
    get,
    path = "/commands/{id}/output",
    operation_id = "command_output",
    tag = "commands",
    params(("id" = Uuid, Path, description = "Command id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "An SSE stream (`text/event-stream`): `output` events `{\"data\": text}` in order, then one `status` event (the command, as `GET /commands/{id}`), then the stream ends.", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_request`: the id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks `commands:run`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`.", body = ErrorBody),
        (status = 500, description = "`internal_error`.", body = ErrorBody),
    )
)]
pub async fn output(
    State(cp): State<Arc<ControlPlane>>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Scope::CommandsRun)?;
    let command = visible_command(&cp, &caller, id).await?;
    let (tx, rx) = mpsc::channel::<FollowEvent>(64);
    tokio::spawn(lookup::follow(cp, command, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await? {
            FollowEvent::Output(bytes) => output_event(&bytes),
            FollowEvent::Finished(command) => status_event(*command),
        };
        Some((Ok(event), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn output_event(bytes: &[u8]) -> Event {
    Event::default()
        .event("output")
        .json_data(serde_json::json!({ "data": String::from_utf8_lossy(bytes) }))
        .unwrap_or_default()
}

fn status_event(command: VisibleCommand) -> Event {
    Event::default()
        .event("status")
        .json_data(CommandView::from(command))
        .unwrap_or_default()
}
