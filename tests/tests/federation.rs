//! End-to-end: two `tether serve` processes on loopback federate over QUIC.
//!
//! * Peering with a one-time invite; both sides list the peer; an agent on
//!   B shows up in A's `GET /servers?branch=all`; B stopped is
//!   `unreachable` on A within 30 s and requests to it answer 503 within a
//!   second; B restarted is `healthy` again without re-peering; deleting the
//!   peering on A removes it on B too.
//! * A relayed command streams its output and final status on A (SSE), can
//!   be cancelled from A (B kills it), and B's health results and run-now
//!   are reachable from A.
//! * B refuses inter-branch JWTs with a missing scope, a wrong key,
//!   `alg: none`, or past their expiry (the test plays the peer itself, with
//!   its own CA and keys, over real QUIC).

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};
use tether_certs::AgentKey;
use tether_control_plane::federation::keys;
use tether_protocol::{BranchCall, BranchResponse, RefusalCode, RelayedCommand};
use tether_tests::{enrolled_running_agent, eventually, ControlPlane};

mod fake_branch;
use fake_branch::FakePeer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_branches_peer_share_inventory_relay_a_command_survive_a_restart_and_unpeer_on_both_sides(
) {
    let dir = tempfile::tempdir().unwrap();
    let a = ControlPlane::start(&dir.path().join("a"), &[])
        .await
        .unwrap();
    let mut b = ControlPlane::start(&dir.path().join("b"), &[])
        .await
        .unwrap();

    let text = b
        .branch_invite(&["servers:read", "commands:run"])
        .await
        .unwrap();
    assert!(!b.log().contains(&text), "the invite was logged");
    let peered = a.join_branch(&text).await.unwrap();
    assert_eq!(peered.status, 201, "{:?}\n{}", peered.body, b.log());
    assert_eq!(peered.body["id"], b.branch_id.as_str());
    assert_eq!(peered.body["status"], "healthy");
    assert_eq!(peered.body["address"], b.quic_addr.to_string());

    // The invite is one-time.
    let again = a.join_branch(&text).await.unwrap();
    assert_eq!(again.status, 403, "{:?}", again.body);

    // B lists A.
    let on_b = b
        .call(&b.admin_token(), Method::GET, "/api/v1/branches", None)
        .await
        .unwrap();
    let data = on_b.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{:?}", on_b.body);
    assert_eq!(data[0]["id"], a.branch_id.as_str());

    // An agent on B appears on A with B's branch id.
    let (_agent, server_id) = enrolled_running_agent(&b, dir.path(), "edge-b")
        .await
        .unwrap();
    b.wait_for_status(&server_id, "online", Duration::from_secs(20))
        .await
        .unwrap();
    let remote = a
        .remote_server_online(&server_id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(remote["branch_id"], b.branch_id.as_str());
    assert!(
        a.servers("").await.unwrap().is_empty(),
        "local list shows remote servers"
    );
    let healthy = a.branch(&b.branch_id).await;
    assert_eq!(healthy["status"], "healthy", "{healthy}");
    assert!(healthy["latency_ms"].as_i64().is_some(), "{healthy}");
    assert_eq!(healthy["server_count"], 1, "{healthy}");

    // A relays a command to B's server: B runs it on its agent.
    let relayed = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!(
                "/api/v1/branches/{}/servers/{server_id}/commands",
                b.branch_id
            ),
            Some(&json!({ "argv": ["echo", "relayed-hello"], "timeout_seconds": 10 })),
        )
        .await
        .unwrap();
    assert_eq!(relayed.status, 202, "{:?}\n{}", relayed.body, b.log());
    let command_id = relayed.body["command_id"].as_str().unwrap().to_string();
    let remote_command_id = relayed.body["remote_command_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(command_id, remote_command_id);
    // Followed on A (the branch it was posted to): status and output come back.
    let mirrored = eventually(
        Duration::from_secs(20),
        "relayed command done, seen on A",
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
    .unwrap();
    assert_eq!(mirrored["output"], "relayed-hello\n", "{mirrored}");
    assert_eq!(mirrored["exit_code"], 0, "{mirrored}");
    assert_eq!(mirrored["server_id"], server_id.as_str());
    assert_eq!(mirrored["branch_id"], b.branch_id.as_str());
    assert!(mirrored["finished_at"].is_string(), "{mirrored}");
    // And on B, under B's own id.
    let done = b
        .call(
            &b.admin_token(),
            Method::GET,
            &format!("/api/v1/commands/{remote_command_id}"),
            None,
        )
        .await
        .unwrap()
        .body;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(done.to_string().contains("relayed-hello"), "{done}");
    assert_eq!(done["server_id"], server_id.as_str());

    // B stopped: unreachable on A within 30 s; relays answer 503 fast.
    b.stop(false);
    let stopped = Instant::now();
    eventually(Duration::from_secs(30), "B unreachable on A", || async {
        Ok((a.branch(&b.branch_id).await["status"] == "unreachable").then_some(()))
    })
    .await
    .unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(30));
    let asked = Instant::now();
    let relayed = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!(
                "/api/v1/branches/{}/servers/{server_id}/commands",
                b.branch_id
            ),
            Some(&json!({ "argv": ["echo", "hi"], "timeout_seconds": 5 })),
        )
        .await
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(relayed.status, 503, "{:?}", relayed.body);
    assert_eq!(relayed.body["error"], "branch_unreachable");

    // B back: healthy again, no re-peering.
    b.restart().await.unwrap();
    eventually(Duration::from_secs(30), "B healthy on A again", || async {
        Ok((a.branch(&b.branch_id).await["status"] == "healthy").then_some(()))
    })
    .await
    .unwrap();

    // Unpeering on A removes the peering on B at once.
    let deleted = a
        .call(
            &a.admin_token(),
            Method::DELETE,
            &format!("/api/v1/branches/{}", b.branch_id),
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let on_b = b
        .call(&b.admin_token(), Method::GET, "/api/v1/branches", None)
        .await
        .unwrap();
    assert_eq!(on_b.body["data"], json!([]), "{:?}", on_b.body);
    assert_eq!(a.branch(&b.branch_id).await["error"], "not_found");
    assert!(
        !a.servers("?branch=all")
            .await
            .unwrap()
            .iter()
            .any(|s| s["id"] == server_id.as_str()),
        "remote servers outlived the peering"
    );
}

fn refusal(answer: &BranchResponse) -> (RefusalCode, String) {
    match answer {
        BranchResponse::Refused { code, message } => (*code, message.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_refuses_tokens_with_a_missing_scope_a_wrong_key_alg_none_or_past_expiry_and_its_certificate_as_an_agent(
) {
    let dir = tempfile::tempdir().unwrap();
    let b = ControlPlane::start(&dir.path().join("b"), &[])
        .await
        .unwrap();
    let text = b.branch_invite(&["servers:read"]).await.unwrap();
    let peer = FakePeer::join(&b, &text).await;

    // A valid token works: the refusals below are about the token alone.
    let token = keys::sign("k1", &peer.key.pkcs8, &peer.claims(&b, &["servers:read"])).unwrap();
    let answer = peer.call(token, BranchCall::Inventory).await;
    assert!(matches!(answer, BranchResponse::Inventory(_)), "{answer:?}");

    // Missing scope in the token.
    let token = keys::sign("k1", &peer.key.pkcs8, &peer.claims(&b, &[])).unwrap();
    let (code, message) = refusal(&peer.call(token, BranchCall::Inventory).await);
    assert_eq!(code, RefusalCode::Forbidden);
    assert!(message.contains("servers:read"), "{message}");

    // A scope in the token that the invite did not grant.
    let token = keys::sign(
        "k1",
        &peer.key.pkcs8,
        &peer.claims(&b, &["servers:read", "commands:run"]),
    )
    .unwrap();
    let run = BranchCall::RunCommand(RelayedCommand {
        server_id: uuid::Uuid::now_v7().to_string(),
        argv: vec!["id".into()],
        env: vec![],
        stdin: None,
        timeout_seconds: 5,
    });
    let (code, message) = refusal(&peer.call(token, run).await);
    assert_eq!(code, RefusalCode::Forbidden);
    assert!(message.contains("does not grant"), "{message}");

    // Signed by another key under the published kid.
    let wrong = keys::generate_key().unwrap();
    let token = keys::sign("k1", &wrong.pkcs8, &peer.claims(&b, &["servers:read"])).unwrap();
    let (code, message) = refusal(&peer.call(token, BranchCall::Inventory).await);
    assert_eq!(code, RefusalCode::Unauthorized);
    assert!(message.contains("signature"), "{message}");

    // alg: none.
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
    let body =
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&peer.claims(&b, &["servers:read"])).unwrap());
    let (code, message) = refusal(
        &peer
            .call(format!("{header}.{body}."), BranchCall::Inventory)
            .await,
    );
    assert_eq!(code, RefusalCode::Unauthorized);
    assert!(message.contains("ES256"), "{message}");

    // Expired.
    let mut expired = peer.claims(&b, &["servers:read"]);
    expired.iat -= 600;
    expired.exp = expired.iat + 60;
    let token = keys::sign("k1", &peer.key.pkcs8, &expired).unwrap();
    let (code, message) = refusal(&peer.call(token, BranchCall::Inventory).await);
    assert_eq!(code, RefusalCode::Unauthorized);
    assert!(message.contains("expired"), "{message}");

    // The branch certificate never opens an agent session.
    let key = AgentKey::from_pem(&peer.client_key_pem).unwrap();
    let tls = tether_certs::agent_client_config(
        peer.pin,
        Some((peer.chain.clone(), key.private_key_der())),
    )
    .unwrap();
    let endpoint = tether_transport::client_endpoint(b.quic_addr, tls).unwrap();
    let connection = tether_transport::connect_control_plane(&endpoint, b.quic_addr)
        .await
        .unwrap();
    // B does not keep a branch certificate's agent connection open.
    tether_tests::assert_closed_with(
        &connection,
        Duration::from_secs(10),
        tether_protocol::CloseCode::Revoked,
    )
    .await;

    // No token (base64url JSON, `eyJ...`) reached B's log.
    assert!(!b.log().contains("eyJ"), "a token reached the log");
}

async fn sse(cp: &ControlPlane, path: &str) -> String {
    cp.request(Method::GET, path)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn relay(cp: &ControlPlane, branch_id: &str, server_id: &str, body: Value) -> Value {
    let relayed = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            &format!("/api/v1/branches/{branch_id}/servers/{server_id}/commands"),
            Some(&body),
        )
        .await
        .unwrap();
    assert_eq!(relayed.status, 202, "{:?}", relayed.body);
    relayed.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_command_streams_on_a_cancels_from_a_and_health_runs_across_branches() {
    let dir = tempfile::tempdir().unwrap();
    let a = ControlPlane::start(&dir.path().join("a"), &[])
        .await
        .unwrap();
    let b = ControlPlane::start(&dir.path().join("b"), &[])
        .await
        .unwrap();
    let text = b
        .branch_invite(&["servers:read", "commands:run"])
        .await
        .unwrap();
    let peered = a.join_branch(&text).await.unwrap();
    assert_eq!(peered.status, 201, "{:?}", peered.body);
    let (_agent, server_id) = enrolled_running_agent(&b, dir.path(), "edge-b")
        .await
        .unwrap();
    b.wait_for_status(&server_id, "online", Duration::from_secs(20))
        .await
        .unwrap();
    let branch_id = b.branch_id.clone();

    // SSE on A: output as it comes, then the final status with B's branch id.
    let accepted = relay(
        &a,
        &branch_id,
        &server_id,
        json!({ "argv": ["sh", "-c", "echo first; sleep 1; echo second"], "timeout_seconds": 10 }),
    )
    .await;
    let id = accepted["command_id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let stream = sse(&a, &format!("/api/v1/commands/{id}/output")).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let first = stream.find("first").expect(&stream);
    let second = stream.find("second").expect(&stream);
    let status = stream.rfind("event: status").expect(&stream);
    assert!(first < second && second < status, "{stream}");
    let last = stream[status..]
        .lines()
        .find(|l| l.starts_with("data:"))
        .unwrap();
    let last: Value = serde_json::from_str(last.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(last["status"], "succeeded", "{last}");
    assert_eq!(last["branch_id"], branch_id.as_str(), "{last}");
    assert_eq!(last["output"], "first\nsecond\n", "{last}");

    // A failure comes back with B's reason.
    let accepted = relay(
        &a,
        &branch_id,
        &server_id,
        json!({ "argv": ["/nonexistent/tether-e2e-program"], "timeout_seconds": 5 }),
    )
    .await;
    let id = accepted["command_id"].as_str().unwrap().to_string();
    let remote_id = accepted["remote_command_id"].as_str().unwrap().to_string();
    let failed = eventually(Duration::from_secs(10), "relayed failure on A", || async {
        let c = a.command(&id).await.unwrap();
        Ok((c["status"] != "queued" && c["status"] != "running").then_some(c))
    })
    .await
    .unwrap();
    let on_b = b.command(&remote_id).await.unwrap();
    assert_ne!(failed["status"], "succeeded", "{failed}");
    assert_eq!(failed["status"], on_b["status"], "{failed}\n{on_b}");
    assert!(failed["reason"].is_string(), "{failed}");
    assert_eq!(failed["reason"], on_b["reason"], "{failed}\n{on_b}");

    // Cancel from A: B kills the process; both sides say cancelled.
    let accepted = relay(
        &a,
        &branch_id,
        &server_id,
        json!({ "argv": ["sleep", "30.0701"], "timeout_seconds": 60 }),
    )
    .await;
    let id = accepted["command_id"].as_str().unwrap().to_string();
    let remote_id = accepted["remote_command_id"].as_str().unwrap().to_string();
    eventually(
        Duration::from_secs(10),
        "relayed sleep running on A",
        || async { Ok((a.command(&id).await.unwrap()["status"] == "running").then_some(())) },
    )
    .await
    .unwrap();
    let cancelled = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!("/api/v1/commands/{id}/cancel"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.status, 202, "{:?}", cancelled.body);
    assert_eq!(cancelled.body["branch_id"], branch_id.as_str());
    let done = eventually(
        Duration::from_secs(10),
        "relayed sleep cancelled on A",
        || async {
            let c = a.command(&id).await.unwrap();
            Ok((c["status"] == "cancelled").then_some(c))
        },
    )
    .await
    .unwrap();
    assert!(done["finished_at"].is_string(), "{done}");
    assert_eq!(b.command(&remote_id).await.unwrap()["status"], "cancelled");
    let again = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!("/api/v1/commands/{id}/cancel"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(again.status, 409, "{:?}", again.body);
    assert_eq!(again.body["status"], "cancelled", "{:?}", again.body);

    // Health: A reads B's results for the server, and runs its checks now.
    let health_path = format!("/api/v1/branches/{branch_id}/servers/{server_id}/health");
    let before = eventually(
        Duration::from_secs(30),
        "B's health results on A",
        || async {
            let h = a
                .call(&a.admin_token(), Method::GET, &health_path, None)
                .await?;
            anyhow::ensure!(h.status == 200, "{:?}", h.body);
            Ok((!h.body["checks"].as_array().is_none_or(Vec::is_empty)).then_some(h.body))
        },
    )
    .await
    .unwrap();
    assert_eq!(before["branch_id"], branch_id.as_str(), "{before}");
    assert_eq!(before["server_id"], server_id.as_str(), "{before}");
    assert_eq!(before["server_status"], "online", "{before}");
    let on_b = b
        .call(
            &b.admin_token(),
            Method::GET,
            &format!("/api/v1/servers/{server_id}/health"),
            None,
        )
        .await
        .unwrap()
        .body;
    let names = |v: &Value| {
        let mut names: Vec<String> = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["check_id"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&before), names(&on_b));
    let run = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!("{health_path}/run"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(run.status, 202, "{:?}", run.body);
    let requested_at: chrono::DateTime<chrono::Utc> =
        run.body["requested_at"].as_str().unwrap().parse().unwrap();
    // Run-now runs every check at once: all results are fresh within seconds.
    eventually(
        Duration::from_secs(5),
        "a fresh run's results on A",
        || async {
            let h = a
                .call(&a.admin_token(), Method::GET, &health_path, None)
                .await?;
            let fresh = h.body["checks"].as_array().is_some_and(|checks| {
                checks.iter().all(|c| {
                    c["received_at"]
                        .as_str()
                        .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                        .is_some_and(|t| t >= requested_at)
                })
            });
            Ok(fresh.then_some(()))
        },
    )
    .await
    .unwrap();

    // A server B does not have: 404 from A.
    let missing = a
        .call(
            &a.admin_token(),
            Method::GET,
            &format!(
                "/api/v1/branches/{branch_id}/servers/{}/health",
                uuid::Uuid::new_v4()
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(missing.status, 404, "{:?}", missing.body);
}
