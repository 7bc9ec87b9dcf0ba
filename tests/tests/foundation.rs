//! End-to-end: enrollment and the mutual-TLS QUIC session, with the real
//! `tether` and `tether-agent` binaries on loopback.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use tether_protocol::{AgentMessage, CloseCode, Heartbeat, Hello, HostFacts};
use tether_tests::{assert_closed_with, enrolled_running_agent, eventually, Agent, ControlPlane};

#[tokio::test]
async fn enrolled_agent_comes_online_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let token = cp
        .enrollment_token(json!({ "server_name": "web-1", "labels": { "env": "prod" } }))
        .await
        .unwrap();
    for key in [
        "token",
        "expires_at",
        "ca_fingerprint",
        "quic_address",
        "install_command",
    ] {
        assert!(
            token.get(key).is_some(),
            "enrollment token response lacks {key}: {token}"
        );
    }
    assert_eq!(token["ca_fingerprint"], cp.ca_fingerprint.as_str());

    let mut agent = Agent::new(&dir.path().join("agent"));
    let (ok, stderr) = agent.enroll(&cp, token["token"].as_str().unwrap()).unwrap();
    assert!(ok, "enroll failed: {stderr}");
    let key_mode = std::fs::metadata(agent.state_dir.join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "agent.key must be 0600");
    let server_id = agent.server_id().unwrap();

    let started = Instant::now();
    agent.run().unwrap();
    let server = cp
        .wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "online after {took:?}");
    assert_eq!(server["name"], "web-1");
    assert_eq!(server["labels"]["env"], "prod");
    assert_eq!(server["branch_id"], cp.branch_id.as_str());
    assert!(server["last_seen_at"].is_string());

    // Filters of the contract.
    assert_eq!(
        cp.servers("?status=online&label=env=prod")
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(cp.servers("?label=env=dev").await.unwrap().len(), 0);

    agent.stop(false);
    let server = cp
        .wait_for_status(&server_id, "offline", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        server["status_reason"].is_string(),
        "offline server says why: {server}"
    );
}

#[tokio::test]
async fn agent_reconnects_after_control_plane_restart_without_reenrolling() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let (agent, server_id) = enrolled_running_agent(&cp, dir.path(), "restart-me")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();
    let serial = agent.certificate().unwrap().serial_hex;

    // Orderly restart: the agent is told, and comes back at once.
    cp.stop(false);
    cp.restart().await.unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();

    // Crash: the restarted control plane's stateless reset ends the old
    // connection, so the agent does not wait out the idle timeout.
    cp.stop(true);
    cp.restart().await.unwrap();
    let started = Instant::now();
    eventually(Duration::from_secs(20), "session after crash", || async {
        Ok(cp
            .log()
            .matches("session established")
            .count()
            .ge(&3)
            .then_some(()))
    })
    .await
    .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "reconnect after crash took {:?}",
        started.elapsed()
    );

    assert_eq!(
        agent.certificate().unwrap().serial_hex,
        serial,
        "the agent must not re-enroll"
    );
    assert_eq!(
        cp.servers("").await.unwrap().len(),
        1,
        "still exactly one server"
    );
}

#[tokio::test]
async fn reused_unknown_and_malformed_tokens_are_refused_and_leave_no_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let token = cp.enrollment_token(json!({})).await.unwrap();
    let token = token["token"].as_str().unwrap();

    let (ok, stderr) = Agent::new(&dir.path().join("first"))
        .enroll(&cp, token)
        .unwrap();
    assert!(ok, "first enrollment failed: {stderr}");

    for (name, attempt, expected) in [
        ("reused", token, "already been used"),
        ("unknown", "tet_enr_not-a-real-token", "not known"),
    ] {
        let agent = Agent::new(&dir.path().join(name));
        let (ok, stderr) = agent.enroll(&cp, attempt).unwrap();
        assert!(!ok, "{name} token accepted");
        assert!(
            stderr.contains(expected),
            "{name}: stderr {stderr:?} lacks {expected:?}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: one-line reason expected, got {stderr:?}"
        );
        for file in ["agent.crt", "agent.key", "identity.toml"] {
            assert!(
                !agent.state_dir.join(file).exists(),
                "{name}: {file} left behind"
            );
        }
    }
    assert_eq!(cp.servers("").await.unwrap().len(), 1);
    assert!(
        !cp.log().contains(token),
        "the token reached the control plane's log"
    );
}

#[tokio::test]
async fn agents_racing_with_one_token_yield_exactly_one_server() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let token = cp.enrollment_token(json!({})).await.unwrap();
    let token = token["token"].as_str().unwrap();
    let children: Vec<_> = (0..5)
        .map(|i| {
            Agent::new(&dir.path().join(format!("racer-{i}")))
                .enroll_command(&cp, token)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let successes = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .filter(|o| o.status.success())
        .count();
    assert_eq!(successes, 1);
    assert_eq!(cp.servers("").await.unwrap().len(), 1);
}

/// Client TLS config pinned on `cp`'s CA, with an optional client identity.
fn client_endpoint(
    cp: &ControlPlane,
    client_auth: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> quinn::Endpoint {
    tether_certs::install_crypto_provider();
    let pin = cp.ca_fingerprint.parse().unwrap();
    let tls = tether_certs::agent_client_config(pin, client_auth).unwrap();
    tether_transport::client_endpoint(cp.quic_addr, tls).unwrap()
}

fn hello() -> AgentMessage {
    AgentMessage::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "test".into(),
        facts: HostFacts::default(),
    })
}

#[tokio::test]
async fn certificate_from_a_foreign_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    // A CA of our own signs a certificate claiming a server of this branch.
    let foreign = tether_certs::CertificateAuthority::generate("impostor").unwrap();
    let key = tether_certs::AgentKey::generate().unwrap();
    let identity = tether_certs::AgentIdentity::new(cp.branch_id.clone(), uuid_like());
    let cert = foreign
        .sign_agent_csr(
            &key.csr_der("impostor").unwrap(),
            &identity,
            Duration::from_secs(3600),
        )
        .unwrap();
    let endpoint = client_endpoint(&cp, Some((vec![cert.der.clone()], key.private_key_der())));

    let welcomed = async {
        let connection = tether_transport::connect_control_plane(&endpoint, cp.quic_addr).await?;
        let mut stream = tether_transport::AgentStream::open(&connection).await?;
        stream.request(&hello()).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), welcomed)
        .await
        .unwrap();
    assert!(
        outcome.is_err(),
        "a foreign-CA certificate got an answer: {outcome:?}"
    );
    eventually(Duration::from_secs(5), "refusal in the log", || async {
        Ok(cp.log().contains("QUIC handshake refused").then_some(()))
    })
    .await
    .unwrap();
    assert!(cp.servers("").await.unwrap().is_empty());
}

fn uuid_like() -> String {
    "0190f5d2-0000-7000-8000-000000000001".into()
}

#[tokio::test]
async fn unauthenticated_connection_sending_anything_but_enroll_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let endpoint = client_endpoint(&cp, None);

    for opener in [
        hello(),
        AgentMessage::Heartbeat(Heartbeat { sent_at_unix_ms: 0 }),
    ] {
        let connection = tether_transport::connect_control_plane(&endpoint, cp.quic_addr)
            .await
            .unwrap();
        let mut stream = tether_transport::AgentStream::open(&connection)
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), stream.request(&opener))
            .await
            .unwrap();
        assert!(
            answer.is_err(),
            "an unauthenticated {opener:?} was answered: {answer:?}"
        );
        assert_closed_with(
            &connection,
            Duration::from_secs(5),
            CloseCode::Unauthenticated,
        )
        .await;
    }

    // Garbage instead of a frame: the connection is closed, the process lives.
    let connection = tether_transport::connect_control_plane(&endpoint, cp.quic_addr)
        .await
        .unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    assert_closed_with(
        &connection,
        Duration::from_secs(15),
        CloseCode::ProtocolViolation,
    )
    .await;
    assert!(cp.is_running());
    let health = cp.anonymous(Method::GET, "/health").send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn certificate_is_renewed_over_the_session_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--agent-cert-ttl", "6s"])
        .await
        .unwrap();
    let (agent, server_id) = enrolled_running_agent(&cp, dir.path(), "short-lived")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();
    let first = agent.certificate().unwrap();

    let renewed = eventually(Duration::from_secs(8), "a renewed certificate", || async {
        Ok(agent
            .certificate()
            .ok()
            .filter(|c| c.serial_hex != first.serial_hex))
    })
    .await
    .unwrap();
    assert!(
        std::time::SystemTime::now() < first.not_after,
        "renewed only after expiry"
    );
    assert!(renewed.not_after > first.not_after);
    assert_eq!(renewed.require_identity().unwrap().server_id, server_id);

    // Past the first certificate's expiry the server is still online, on
    // the same session (never cut for an expired certificate).
    let wait = first
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(1)).await;
    cp.wait_for_status(&server_id, "online", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        !cp.log().contains("certificate expired"),
        "session was cut: {}",
        cp.log()
    );
}

#[tokio::test]
async fn revoked_agent_is_refused_and_retries_only_a_handful_of_times_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "to-revoke")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();

    let deleted = cp
        .request(Method::DELETE, &format!("/api/v1/servers/{server_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = cp
        .request(Method::GET, &format!("/api/v1/servers/{server_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    let attempts = cp.log().matches("session refused").count();
    assert!(attempts >= 1, "the agent never retried");
    assert!(
        attempts <= 6,
        "{attempts} attempts in {window:?}: backoff is not working"
    );
}

#[tokio::test]
async fn api_requires_a_valid_token_and_answers_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let mode = std::fs::metadata(cp.data_dir.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token must be 0600");

    let health = cp.anonymous(Method::GET, "/health").send().await.unwrap();
    assert_eq!(health.status(), 200);

    let anonymous = cp
        .anonymous(Method::GET, "/api/v1/servers")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: serde_json::Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");

    let forged = cp
        .anonymous(Method::GET, "/api/v1/servers")
        .bearer_auth("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);

    let malformed = cp
        .request(Method::POST, "/api/v1/enrollment-tokens")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(
        malformed.json::<serde_json::Value>().await.unwrap()["error"],
        "invalid_request"
    );

    for body in [
        json!({ "ttl_seconds": "soon" }),
        json!({ "surprise": 1 }),
        json!({ "ttl_seconds": 5 }),
    ] {
        let response = cp
            .request(Method::POST, "/api/v1/enrollment-tokens")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(
            response.json::<serde_json::Value>().await.unwrap()["error"],
            "validation_error"
        );
    }
    let unknown = cp
        .request(Method::GET, "/api/v1/servers/not-a-uuid")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<serde_json::Value>().await.unwrap()["error"],
        "not_found"
    );
}

#[tokio::test]
async fn quickstart_brings_local_servers_online() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(tether_tests::binary("tether"))
            .arg("quickstart")
            .arg("--data-dir")
            .arg(dir.path().join("qs"))
            .args([
                "--api-listen",
                "127.0.0.1:0",
                "--quic-listen",
                "127.0.0.1:0",
                "--servers",
                "2",
                "--exit-when-ready",
            ])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "quickstart failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("2 servers online"), "{stdout}");
    assert!(stdout.contains("admin.token"), "{stdout}");
    assert!(
        stdout.contains("through terraform's local target"),
        "{stdout}"
    );
    // The servers were terraform deployments, destroyed on exit: no agent
    // of this data dir is left running.
    let data_dir = dir.path().join("qs").display().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|c| c.contains("tether-agent") && c.contains(&data_dir))
        .collect();
    assert!(left.is_empty(), "agents left running: {left:?}");
    let _ = Arc::new(());
}
