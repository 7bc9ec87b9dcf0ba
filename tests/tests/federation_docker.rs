//! End-to-end: two branches, each `tether serve` in its own container on a
//! user-defined Docker network, federate over that network.
//!
//! B advertises `<its container name>:7443` (Docker's DNS resolves it on the
//! network) and its agent runs in B's container. A peers with B; A lists B's
//! server with `?branch=all`; A relays a command and reads its output back
//! from its own mirror. `docker network disconnect` B: A shows B
//! `unreachable` within 30 s and relays to B answer 503 at once;
//! `docker network connect` B again: A shows B `healthy` without re-peering
//! and relays work again.
//!
//! The test needs a Docker engine and fails (does not skip) without one.
//! Containers and the network carry unique names and are removed by `Drop`
//! guards, also when an assertion fails.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::docker::{self, BranchContainer, Network};
use tether_tests::{eventually, ControlPlane};

async fn wait_branch_status(cp: &ControlPlane, id: &str, status: &str, within: Duration) {
    let last = std::sync::Mutex::new(Value::Null);
    let reached = eventually(within, &format!("branch {id} {status}"), || async {
        let b = cp.branch(id).await;
        let done = b["status"] == status;
        if let Ok(mut last) = last.lock() {
            *last = b;
        }
        Ok(done.then_some(()))
    })
    .await;
    if let Err(e) = reached {
        let last = last.lock().map(|v| v.clone()).unwrap_or_default();
        panic!("{e}: last seen {last}\n--- log ---\n{}", cp.log());
    }
}

/// Relays `sh -c "echo <word>"` from A to B's server, waits for A's mirror to
/// finish and checks it; returns B's id of the command.
async fn relay_and_follow(
    a: &ControlPlane,
    b: &BranchContainer,
    server: &str,
    word: &str,
) -> String {
    let relayed = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!("/api/v1/branches/{}/servers/{server}/commands", b.branch_id),
            // The container's image is busybox: `echo` is a builtin of its `sh`.
            Some(&json!({
                "argv": ["sh", "-c", format!("echo {word}")], "timeout_seconds": 10
            })),
        )
        .await
        .unwrap();
    assert_eq!(
        relayed.status,
        202,
        "{:?}\n--- A ---\n{}\n--- B ---\n{}",
        relayed.body,
        a.log(),
        b.log()
    );
    let command_id = relayed.body["command_id"].as_str().unwrap().to_string();
    let remote_command_id = relayed.body["remote_command_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mirrored = eventually(
        Duration::from_secs(20),
        "relayed command finished, seen on A",
        || async {
            let c = a
                .call(
                    &a.admin_token(),
                    Method::GET,
                    &format!("/api/v1/commands/{command_id}"),
                    None,
                )
                .await?;
            let status = c.body["status"].as_str().unwrap_or_default();
            Ok((!matches!(status, "" | "queued" | "running")).then_some(c.body))
        },
    )
    .await
    .unwrap();
    assert_eq!(mirrored["status"], "succeeded", "{mirrored}");
    assert_eq!(mirrored["output"], format!("{word}\n"), "{mirrored}");
    assert_eq!(mirrored["exit_code"], 0, "{mirrored}");
    assert_eq!(mirrored["server_id"], server);
    assert_eq!(mirrored["branch_id"], b.branch_id.as_str());
    remote_command_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_in_containers_peer_over_a_docker_network_relay_commands_and_survive_a_network_disconnect(
) {
    let engine = docker::require_engine().unwrap();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // Dropped last: removes whatever is still attached, then itself.
    let network = Network::create(&docker::unique_name("tether-fed-net")).unwrap();
    let a = BranchContainer::start(
        &network,
        &docker::unique_name("tether-fed-a"),
        &dir.path().join("a"),
    )
    .await
    .unwrap();
    let mut b = BranchContainer::start(
        &network,
        &docker::unique_name("tether-fed-b"),
        &dir.path().join("b"),
    )
    .await
    .unwrap();
    assert_ne!(a.branch_id, b.branch_id);

    // An agent on B (in B's container, over its loopback) is online there.
    let server_id = b.start_agent("edge-b").await.unwrap();
    if let Err(e) = b
        .wait_for_status(&server_id, "online", Duration::from_secs(20))
        .await
    {
        panic!(
            "{e}\n--- agent ---\n{}\n--- B ---\n{}",
            b.agent_log("edge-b"),
            b.log()
        );
    }

    // B's invite carries the address B advertises on the Docker network.
    let text = b
        .branch_invite(&["servers:read", "commands:run"])
        .await
        .unwrap();

    // A peers with B: A dials B by container name over the network.
    let peered = a.join_branch(&text).await.unwrap();
    assert_eq!(
        peered.status,
        201,
        "{:?}\n--- A ---\n{}\n--- B ---\n{}",
        peered.body,
        a.log(),
        b.log()
    );
    assert_eq!(peered.body["id"], b.branch_id.as_str());
    assert_eq!(peered.body["address"], b.public_quic_addr());
    assert_eq!(peered.body["status"], "healthy");
    // B learned A's advertised address and reaches it too.
    wait_branch_status(&b, &a.branch_id, "healthy", Duration::from_secs(10)).await;
    assert_eq!(
        b.branch(&a.branch_id).await["address"],
        a.public_quic_addr()
    );

    // A lists B's server, online, with B's branch id.
    let remote = a
        .remote_server_online(&server_id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(remote["branch_id"], b.branch_id.as_str());
    assert_eq!(remote["name"], "edge-b", "{remote}");
    assert!(a.servers("").await.unwrap().is_empty());

    // A relays a command to B's agent and reads its output on A.
    let remote_id = relay_and_follow(&a, &b, &server_id, "over-the-docker-network").await;
    // B ran it under its own id.
    let on_b = b
        .call(
            &b.admin_token(),
            Method::GET,
            &format!("/api/v1/commands/{remote_id}"),
            None,
        )
        .await
        .unwrap()
        .body;
    assert_eq!(on_b["status"], "succeeded", "{on_b}");
    assert_eq!(on_b["server_id"], server_id.as_str());
    assert!(
        on_b.to_string().contains("over-the-docker-network"),
        "{on_b}"
    );

    // B loses the network: unreachable on A within 30 s.
    network.disconnect(&b.container).unwrap();
    let cut = Instant::now();
    wait_branch_status(&a, &b.branch_id, "unreachable", Duration::from_secs(30)).await;
    let noticed = cut.elapsed();
    assert!(noticed < Duration::from_secs(30), "{noticed:?}");
    // A relay to B answers 503 branch_unreachable at once.
    let asked = Instant::now();
    let refused = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!(
                "/api/v1/branches/{}/servers/{server_id}/commands",
                b.branch_id
            ),
            Some(&json!({ "argv": ["echo", "lost"], "timeout_seconds": 5 })),
        )
        .await
        .unwrap();
    let answered = asked.elapsed();
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(refused.body["error"], "branch_unreachable");
    assert!(answered < Duration::from_millis(1500), "{answered:?}");
    // The peering is still there on A (only its status changed).
    let listed = a
        .call(&a.admin_token(), Method::GET, "/api/v1/branches", None)
        .await
        .unwrap();
    assert_eq!(listed.body["data"].as_array().map(Vec::len), Some(1));

    // B back on the network: healthy on A again, without re-peering.
    network.connect(&b.container).unwrap();
    let healed = Instant::now();
    b.refresh_address().await.unwrap();
    wait_branch_status(&a, &b.branch_id, "healthy", Duration::from_secs(30)).await;
    let recovered = healed.elapsed();
    wait_branch_status(&b, &a.branch_id, "healthy", Duration::from_secs(30)).await;
    let listed = a
        .call(&a.admin_token(), Method::GET, "/api/v1/branches", None)
        .await
        .unwrap();
    let peers = listed.body["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers.len(), 1, "{:?}", listed.body);
    assert_eq!(peers[0]["id"], b.branch_id.as_str());
    // And a relayed command works again.
    relay_and_follow(&a, &b, &server_id, "after-reconnect").await;

    eprintln!(
        "docker {engine}: B unreachable on A {noticed:?} after the disconnect, relay refused in \
         {answered:?}, healthy again {recovered:?} after the reconnect; whole test {:?}",
        started.elapsed()
    );
}
