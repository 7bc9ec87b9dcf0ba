//! End-to-end: the tenant boundary holds against a sub-organization's
//! admin and a malicious peer branch (docs/security.md, items 3, 4, 5 and 7). Each
//! test performs the attack through the real API, QUIC and agents, asserts
//! the refusal (status and typed error, or the typed QUIC refusal), and
//! that the target is untouched.
//!
//! * Granting a scope needs holding it: an invite (or its acceptance) may
//!   not grant `commands:run` to a peer when the token lacks it.
//! * A known branch id is never taken over: neither a join nor an accept
//!   into another organization, nor under another CA, replaces the peering;
//!   relayed commands still reach the real peer.
//! * A peer reads, awaits and cancels only the commands it relayed itself.
//! * Organization trees are at most 16 levels below the root; the process
//!   keeps serving the hierarchy.
//! * `max_servers` is enforced when the agent enrolls, not only when its
//!   token is issued; deleting an organization revokes its tokens, closes
//!   its agents' sessions with a reason, and refuses their enrollments.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};
use tether_certs::CertificateAuthority;
use tether_protocol::{BranchCall, BranchResponse, RefusalCode};
use tether_tests::{enrolled_running_agent, eventually, Agent, ControlPlane};

mod fake_branch;
use fake_branch::{raw_join, FakePeer};

/// A sub-organization of `cp`'s root with an admin token of its own:
/// (organization id, token).
async fn tenant(cp: &ControlPlane, name: &str, quotas: Value) -> (String, String) {
    let org = cp
        .create_organization(&cp.admin_token(), json!({ "name": name, "quotas": quotas }))
        .await
        .unwrap();
    let org_id = org["id"].as_str().unwrap().to_string();
    let (_, token) = cp
        .create_token(&cp.admin_token(), &org_id, &["admin"])
        .await
        .unwrap();
    (org_id, token)
}

async fn root_organization(cp: &ControlPlane) -> String {
    let orgs = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/organizations",
            None,
        )
        .await
        .unwrap();
    orgs.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["parent_id"].is_null())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cannot_grant_a_peer_or_a_token_a_scope_it_does_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let root = root_organization(&cp).await;
    let (_, branches_only) = cp
        .create_token(
            &cp.admin_token(),
            &root,
            &["branches:write", "servers:read"],
        )
        .await
        .unwrap();

    // The attack: an invite granting `commands:run` by a token without it.
    let invite = cp
        .call(
            &branches_only,
            Method::POST,
            "/api/v1/branches/invites",
            Some(&json!({ "name": "evil", "scopes": ["servers:read", "commands:run"] })),
        )
        .await
        .unwrap();
    assert_eq!(invite.status, 403, "{:?}", invite.body);
    assert_eq!(invite.body["error"], "forbidden");
    assert_eq!(invite.body["required_scope"], "commands:run");

    // Accepting an invite while granting `commands:run` to the inviter: the
    // same rule, checked before the invite is even read.
    let accept = cp
        .call(
            &branches_only,
            Method::POST,
            "/api/v1/branches",
            Some(&json!({ "invite": "tether-invite:e30", "scopes": ["commands:run"] })),
        )
        .await
        .unwrap();
    assert_eq!(accept.status, 403, "{:?}", accept.body);
    assert_eq!(accept.body["error"], "forbidden");
    assert_eq!(accept.body["required_scope"], "commands:run");

    // What it holds, it may grant.
    let allowed = cp
        .call(
            &branches_only,
            Method::POST,
            "/api/v1/branches/invites",
            Some(&json!({ "name": "fine", "scopes": ["servers:read"] })),
        )
        .await
        .unwrap();
    assert_eq!(allowed.status, 201, "{:?}", allowed.body);
    assert_eq!(allowed.body["scopes"], json!(["servers:read"]));

    // API tokens: only `admin` mints them (and admin holds every scope), so
    // this token cannot mint one with `commands:run`.
    let minted = cp
        .call(
            &branches_only,
            Method::POST,
            "/api/v1/tokens",
            Some(&json!({ "name": "x", "organization_id": root, "scopes": ["commands:run"] })),
        )
        .await
        .unwrap();
    assert_eq!(minted.status, 403, "{:?}", minted.body);
    assert_eq!(minted.body["error"], "forbidden");
    assert!(cp.is_running());
}

fn refusal(answer: &BranchResponse) -> (RefusalCode, String) {
    match answer {
        BranchResponse::Refused { code, message } => (*code, message.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn relay_echo(a: &ControlPlane, b_id: &str, server_id: &str, word: &str) -> Value {
    let relayed = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!("/api/v1/branches/{b_id}/servers/{server_id}/commands"),
            Some(&json!({ "argv": ["echo", word], "timeout_seconds": 10 })),
        )
        .await
        .unwrap();
    assert_eq!(relayed.status, 202, "{:?}", relayed.body);
    let command_id = relayed.body["command_id"].as_str().unwrap().to_string();
    eventually(
        Duration::from_secs(20),
        "relayed echo done on A",
        || async {
            let c = a
                .call(
                    &a.admin_token(),
                    Method::GET,
                    &format!("/api/v1/commands/{command_id}"),
                    None,
                )
                .await?;
            Ok((c.body["status"] == "succeeded").then_some(c.body))
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_branch_id_is_not_taken_over_and_a_peer_sees_only_the_commands_it_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let a = ControlPlane::start(&dir.path().join("a"), &[])
        .await
        .unwrap();
    let b = ControlPlane::start(&dir.path().join("b"), &[])
        .await
        .unwrap();
    let a_root = root_organization(&a).await;
    let b_root = root_organization(&b).await;

    // A's root organization peers with B; B's agent runs relayed commands.
    let text = b
        .branch_invite(&["servers:read", "commands:run"])
        .await
        .unwrap();
    let peered = a.join_branch(&text).await.unwrap();
    assert_eq!(peered.status, 201, "{:?}", peered.body);
    let (_agent, server_id) = enrolled_running_agent(&b, dir.path(), "edge-b")
        .await
        .unwrap();
    a.remote_server_online(&server_id, Duration::from_secs(20))
        .await
        .unwrap();
    let before = relay_echo(&a, &b.branch_id, &server_id, "before").await;
    assert_eq!(before["output"], "before\n", "{before}");

    // A sub-organization of A, with its own admin.
    let (tenant_id, tenant_token) = tenant(&a, "tenant", json!({})).await;

    // 1. The tenant accepts a genuine invite of B: same CA, but the peering
    //    belongs to A's root organization. Refused before B is dialed.
    let again = b.branch_invite(&["servers:read"]).await.unwrap();
    let hijack = a
        .call(
            &tenant_token,
            Method::POST,
            "/api/v1/branches",
            Some(&json!({ "invite": again })),
        )
        .await
        .unwrap();
    assert_eq!(hijack.status, 409, "{:?}", hijack.body);
    assert_eq!(hijack.body["error"], "conflict");
    assert_eq!(hijack.body["branch_id"], b.branch_id.as_str());

    // 2. An invite forged with B's branch id and another CA (an impostor's
    //    address and fingerprint), accepted by the tenant: refused too.
    let mut forged: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(again.trim_start_matches("tether-invite:"))
            .unwrap(),
    )
    .unwrap();
    let impostor = CertificateAuthority::generate("impostor").unwrap();
    forged["ca_fingerprint"] = json!(impostor.fingerprint().to_string());
    forged["address"] = json!("127.0.0.1:9");
    let forged = format!(
        "tether-invite:{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap())
    );
    let hijack = a
        .call(
            &tenant_token,
            Method::POST,
            "/api/v1/branches",
            Some(&json!({ "invite": forged })),
        )
        .await
        .unwrap();
    assert_eq!(hijack.status, 409, "{:?}", hijack.body);
    assert_eq!(hijack.body["error"], "conflict");

    // 3. The tenant invites; an impostor joins claiming B's branch id under
    //    its own CA: A refuses the join.
    let tenant_invite = a
        .call(
            &tenant_token,
            Method::POST,
            "/api/v1/branches/invites",
            Some(&json!({ "name": "impostor", "scopes": ["servers:read"] })),
        )
        .await
        .unwrap();
    assert_eq!(tenant_invite.status, 201, "{:?}", tenant_invite.body);
    let answer = raw_join(
        &a,
        tenant_invite.body["invite"].as_str().unwrap(),
        &b.branch_id,
    )
    .await;
    let (code, message) = refusal(&answer);
    assert_eq!(code, RefusalCode::Forbidden, "{message}");
    assert!(message.contains("already peered"), "{message}");

    // 4. B itself (same CA) joins the tenant's invite: a re-peer into
    //    another organization is refused by A; B's API says so.
    let tenant_invite = a
        .call(
            &tenant_token,
            Method::POST,
            "/api/v1/branches/invites",
            Some(&json!({ "name": "b-again", "scopes": ["servers:read"] })),
        )
        .await
        .unwrap();
    assert_eq!(tenant_invite.status, 201, "{:?}", tenant_invite.body);
    let rejoin = b
        .join_branch(tenant_invite.body["invite"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(rejoin.status, 403, "{:?}", rejoin.body);
    assert_eq!(rejoin.body["error"], "forbidden");

    // Untouched: A's peering is B's, in A's root organization, at B's
    // address; B's peering with A likewise; nothing in the tenant.
    let peer = a.branch(&b.branch_id).await;
    assert_eq!(peer["organization_id"], a_root.as_str(), "{peer}");
    assert_eq!(peer["address"], b.quic_addr.to_string(), "{peer}");
    assert_eq!(peer["granted_scopes"], json!(["servers:read"]), "{peer}");
    let back = b.branch(&a.branch_id).await;
    assert_eq!(back["organization_id"], b_root.as_str(), "{back}");
    let tenant_peers = a
        .call(&tenant_token, Method::GET, "/api/v1/branches", None)
        .await
        .unwrap();
    assert_eq!(
        tenant_peers.body["data"],
        json!([]),
        "{:?}",
        tenant_peers.body
    );
    assert_ne!(tenant_id, a_root);
    // Relayed commands still reach B's agent.
    let after = relay_echo(&a, &b.branch_id, &server_id, "after").await;
    assert_eq!(after["output"], "after\n", "{after}");

    // A second peer of B (played by the test, granted `commands:run` by
    // B's root) cannot read, await or cancel the commands A relayed, nor
    // B's own commands.
    let long = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!(
                "/api/v1/branches/{}/servers/{server_id}/commands",
                b.branch_id
            ),
            Some(&json!({ "argv": ["sh", "-c", "sleep 3; echo survived"], "timeout_seconds": 20 })),
        )
        .await
        .unwrap();
    assert_eq!(long.status, 202, "{:?}", long.body);
    let a_command = long.body["command_id"].as_str().unwrap().to_string();
    let remote_command = long.body["remote_command_id"].as_str().unwrap().to_string();
    let local = b
        .call(
            &b.admin_token(),
            Method::POST,
            &format!("/api/v1/servers/{server_id}/commands"),
            Some(&json!({ "argv": ["echo", "b-secret"], "timeout_seconds": 10 })),
        )
        .await
        .unwrap();
    assert_eq!(local.status, 202, "{:?}", local.body);
    let local_command = local.body["command_id"].as_str().unwrap().to_string();
    let spy = FakePeer::join(
        &b,
        &b.branch_invite(&["servers:read", "commands:run"])
            .await
            .unwrap(),
    )
    .await;
    for command_id in [&remote_command, &local_command] {
        for call in [
            BranchCall::CommandState {
                command_id: command_id.clone(),
            },
            BranchCall::AwaitCommand {
                command_id: command_id.clone(),
                known_status: "queued".into(),
                known_output_len: 0,
                wait_ms: 100,
            },
            BranchCall::CancelCommand {
                command_id: command_id.clone(),
            },
        ] {
            let (code, message) = refusal(
                &spy.call_with_scopes(&b, &["servers:read", "commands:run"], call)
                    .await,
            );
            assert_eq!(code, RefusalCode::NotFound, "{message}");
        }
    }
    // Untouched: A's relayed command was not cancelled and ends on A.
    let done = eventually(Duration::from_secs(30), "A's long command done", || async {
        let c = a
            .call(
                &a.admin_token(),
                Method::GET,
                &format!("/api/v1/commands/{a_command}"),
                None,
            )
            .await?;
        Ok(c.body["status"]
            .as_str()
            .is_some_and(|s| !matches!(s, "queued" | "running"))
            .then_some(c.body))
    })
    .await
    .unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"], "survived\n", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organization_trees_stop_at_sixteen_levels_and_the_hierarchy_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let root = root_organization(&cp).await;
    // The attack: a sub-organization's admin builds a chain under itself.
    let (tenant_id, token) = tenant(&cp, "level-1", json!({})).await;
    let mut parent = tenant_id.clone();
    for level in 2..=16 {
        let org = cp
            .create_organization(
                &token,
                json!({ "name": format!("level-{level}"), "parent_id": parent }),
            )
            .await
            .unwrap();
        parent = org["id"].as_str().unwrap().to_string();
    }
    let too_deep = cp
        .call(
            &token,
            Method::POST,
            "/api/v1/organizations",
            Some(&json!({ "name": "level-17", "parent_id": parent })),
        )
        .await
        .unwrap();
    assert_eq!(too_deep.status, 422, "{:?}", too_deep.body);
    assert_eq!(too_deep.body["error"], "organization_depth_exceeded");
    assert_eq!(too_deep.body["max_depth"], 16);
    assert_eq!(too_deep.body["depth"], 17);

    // The process still serves the whole tree, 16 levels deep.
    let tree = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            &format!("/api/v1/organizations/{root}/hierarchy"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(tree.status, 200, "{:?}", tree.body);
    let mut depth = 0;
    let mut node = &tree.body;
    while let Some(child) = node["children"].as_array().and_then(|c| c.first()) {
        depth += 1;
        node = child;
    }
    assert_eq!(depth, 16);
    assert_eq!(node["id"], parent.as_str());
    let listed = cp
        .call(&token, Method::GET, "/api/v1/organizations?limit=500", None)
        .await
        .unwrap();
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_quota_holds_at_enrollment_and_a_deleted_organization_loses_its_agents_and_tokens(
) {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let (org_id, org_token) = tenant(&cp, "one-server", json!({ "max_servers": 1 })).await;

    // Three tokens while the organization is empty: issuing them is allowed.
    let mut tokens = Vec::new();
    for name in ["first", "second", "third"] {
        let created = cp
            .call(
                &org_token,
                Method::POST,
                "/api/v1/enrollment-tokens",
                Some(&json!({ "server_name": name })),
            )
            .await
            .unwrap();
        assert_eq!(created.status, 201, "{:?}", created.body);
        tokens.push(created.body["token"].as_str().unwrap().to_string());
    }
    let mut first = Agent::new(&dir.path().join("first"));
    let (ok, stderr) = first.enroll(&cp, &tokens[0]).unwrap();
    assert!(ok, "{stderr}");
    let first_id = first.server_id().unwrap();
    first.run().unwrap();
    cp.wait_for_status(&first_id, "online", Duration::from_secs(20))
        .await
        .unwrap();

    // The attack: a second agent with another token of the same issue.
    let second = Agent::new(&dir.path().join("second"));
    let (ok, stderr) = second.enroll(&cp, &tokens[1]).unwrap();
    assert!(!ok, "the second agent enrolled past max_servers=1");
    assert!(stderr.contains("quota"), "{stderr}");
    let servers = cp.servers("").await.unwrap();
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0]["id"], first_id.as_str());
    assert!(cp.log().contains("enrollment refused"));

    // A second tenant with an unused token, to show deletion refuses it.
    let (other_id, other_token) = tenant(&cp, "doomed", json!({})).await;
    let spare = cp
        .call(
            &other_token,
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&json!({ "server_name": "spare" })),
        )
        .await
        .unwrap();
    assert_eq!(spare.status, 201, "{:?}", spare.body);
    let spare = spare.body["token"].as_str().unwrap().to_string();
    let deleted = cp
        .call(
            &cp.admin_token(),
            Method::DELETE,
            &format!("/api/v1/organizations/{other_id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let late = Agent::new(&dir.path().join("late"));
    let (ok, stderr) = late.enroll(&cp, &spare).unwrap();
    assert!(!ok, "an agent enrolled into a deleted organization");
    assert!(stderr.contains("organization has been deleted"), "{stderr}");

    // Deleting the first tenant (cascade: it has a server) closes its
    // agent's session with the reason, and revokes its tokens.
    let deleted = cp
        .call(
            &cp.admin_token(),
            Method::DELETE,
            &format!("/api/v1/organizations/{org_id}?cascade=true"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    eventually(
        Duration::from_secs(10),
        "the agent told its organization was deleted",
        || async {
            Ok(first
                .log()
                .contains("the server's organization was deleted")
                .then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", first.log()));
    for token in [&org_token, &other_token] {
        let refused = cp
            .call(token, Method::GET, "/api/v1/servers", None)
            .await
            .unwrap();
        assert_eq!(refused.status, 401, "{:?}", refused.body);
        assert_eq!(refused.body["error"], "unauthorized");
    }
    // Its remaining enrollment token is refused, and so is the agent when
    // it tries to come back.
    let third = Agent::new(&dir.path().join("third"));
    let (ok, stderr) = third.enroll(&cp, &tokens[2]).unwrap();
    assert!(!ok);
    assert!(stderr.contains("organization has been deleted"), "{stderr}");
    assert!(cp.servers("").await.unwrap().is_empty());
    // The control plane still serves the root.
    let root = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/organizations",
            None,
        )
        .await
        .unwrap();
    assert_eq!(root.status, 200);
    assert_eq!(
        root.body["data"].as_array().unwrap().len(),
        1,
        "{:?}",
        root.body
    );
}
