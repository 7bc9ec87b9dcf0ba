//! The cross-branch relay, callee side: commands a peer asks this branch to
//! run on one of its servers.
//!
//! The call's token must carry `commands:run`, the invite must have granted
//! it (both checked before this module is reached), and the server must
//! belong to the peering's organization tree. The command is then submitted
//! through `crate::commands` like a local one, so it runs under this
//! branch's delivery rules and the agent's own policy; `CommandState`
//! answers from its record.

use std::sync::Arc;
use std::time::Duration;

use tether_protocol::{BranchCall, BranchResponse, RefusalCode, RelayedCommandState};
use uuid::Uuid;

use crate::app::ControlPlane;
use crate::commands::{CommandSpec, Target};
use crate::store::BranchPeer;

/// Output kept for a relayed command (the peer copies it).
const MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// A relayed command not delivered to its agent within this long is undeliverable.
const DELIVER_WITHIN: Duration = Duration::from_secs(60);

/// Answers a relay call from `peer` (already authenticated and authorized
/// for `commands:run`); `scope` is the peering's organization tree.
pub(crate) async fn answer(
    cp: &Arc<ControlPlane>,
    peer: &BranchPeer,
    scope: &[Uuid],
    call: BranchCall,
) -> (BranchResponse, bool) {
    match call {
        BranchCall::RunCommand(command) => {
            let Ok(server_id) = Uuid::parse_str(&command.server_id) else {
                return (
                    refused(RefusalCode::Invalid, "server id is not a UUID"),
                    false,
                );
            };
            if command.argv.first().is_none_or(|p| p.is_empty())
                || !(1..=3600).contains(&command.timeout_seconds)
            {
                return (
                    refused(
                        RefusalCode::Invalid,
                        "argv must name a program; timeout 1-3600 s",
                    ),
                    false,
                );
            }
            let server = match cp.store.server(scope, server_id).await {
                Ok(Some(server)) => server,
                Ok(None) => return (refused(RefusalCode::NotFound, "no such server"), false),
                Err(_) => {
                    return (
                        refused(RefusalCode::Unavailable, "store unavailable"),
                        false,
                    )
                }
            };
            let spec = CommandSpec {
                argv: command.argv,
                env: command.env,
                stdin: command.stdin,
                timeout: Duration::from_secs(command.timeout_seconds),
                max_output_bytes: MAX_OUTPUT_BYTES,
                deliver_within: DELIVER_WITHIN,
            };
            let target = Target {
                server_id,
                organization_id: server.organization_id,
            };
            match crate::commands::submit(cp, &[target], &spec, &format!("branch:{}", peer.id))
                .await
            {
                Ok(ids) => match ids.first() {
                    Some(id) => {
                        tracing::info!(%server_id, command_id = %id, "relayed command accepted");
                        (
                            BranchResponse::CommandAccepted {
                                command_id: id.to_string(),
                            },
                            false,
                        )
                    }
                    None => (
                        refused(RefusalCode::Unavailable, "command not created"),
                        false,
                    ),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "could not submit a relayed command");
                    (
                        refused(RefusalCode::Unavailable, "command could not be stored"),
                        false,
                    )
                }
            }
        }
        BranchCall::CommandState { command_id } => {
            let Ok(id) = Uuid::parse_str(&command_id) else {
                return (
                    refused(RefusalCode::Invalid, "command id is not a UUID"),
                    false,
                );
            };
            match cp.store.command(Some(scope), id).await {
                Ok(Some(c)) => (
                    BranchResponse::CommandState(RelayedCommandState {
                        command_id,
                        status: c.status.as_str().to_string(),
                        exit_code: c.exit_code,
                        output: c.output,
                        output_truncated: c.output_truncated,
                        started_at_ms: c.started_at.map(|t| t.timestamp_millis()),
                        finished_at_ms: c.finished_at.map(|t| t.timestamp_millis()),
                    }),
                    false,
                ),
                Ok(None) => (refused(RefusalCode::NotFound, "no such command"), false),
                Err(_) => (
                    refused(RefusalCode::Unavailable, "store unavailable"),
                    false,
                ),
            }
        }
        _ => (refused(RefusalCode::Invalid, "not a relay call"), false),
    }
}

fn refused(code: RefusalCode, message: &str) -> BranchResponse {
    BranchResponse::Refused {
        code,
        message: message.to_string(),
    }
}
