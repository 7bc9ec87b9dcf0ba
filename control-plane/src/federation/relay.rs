//! The cross-branch relay, callee side: commands a peer asks this branch to
//! run on one of its servers.
//!
//! The transport and authorization are in place (the call's token must
//! carry `commands:run`, the invite must have granted it, and the server
//! must belong to the peering's organization tree). Running the command
//! goes through `crate::commands`, which is being written in parallel: until
//! it lands, such calls are answered `Unavailable`.

use tether_protocol::{BranchCall, BranchResponse, RefusalCode};
use uuid::Uuid;

use crate::app::ControlPlane;
use crate::store::BranchPeer;

/// Answers a relay call from `peer` (already authenticated and authorized
/// for `commands:run`); `scope` is the peering's organization tree.
pub(crate) async fn answer(
    cp: &ControlPlane,
    peer: &BranchPeer,
    scope: &[Uuid],
    call: BranchCall,
) -> (BranchResponse, bool) {
    let _ = peer;
    let server_id = match &call {
        BranchCall::RunCommand(command) => Some(command.server_id.clone()),
        _ => None,
    };
    if let Some(server_id) = server_id {
        let Ok(server_id) = Uuid::parse_str(&server_id) else {
            return (
                refused(RefusalCode::Invalid, "server id is not a UUID"),
                false,
            );
        };
        match cp.store.server(scope, server_id).await {
            Ok(Some(_)) => {}
            Ok(None) => return (refused(RefusalCode::NotFound, "no such server"), false),
            Err(_) => {
                return (
                    refused(RefusalCode::Unavailable, "store unavailable"),
                    false,
                )
            }
        }
    }
    (
        refused(
            RefusalCode::Unavailable,
            "this branch does not run relayed commands yet",
        ),
        false,
    )
}

fn refused(code: RefusalCode, message: &str) -> BranchResponse {
    BranchResponse::Refused {
        code,
        message: message.to_string(),
    }
}
