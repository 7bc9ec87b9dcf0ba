//! End-to-end health: checks pushed by a real control plane to real agents
//! run against real listeners in the test, their results reach
//! `GET /api/v1/servers/{id}/health`, run-now gives a fresh result, and
//! connection states follow the agent (killed -> `offline` with a reason,
//! restarted -> `online`).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::{enrolled_running_agent, eventually, ControlPlane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FAST: &[&str] = &["--metrics-interval", "1s"];

/// A real HTTP listener answering every request with the status it is set
/// to (body `status <code>`).
struct StatusServer {
    port: u16,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    async fn start(status: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(status));
        let current = status.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let code = current.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let body = format!("status {code}");
                    let reply = format!(
                        "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { port, status, task }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn create_check(cp: &ControlPlane, body: Value) -> Value {
    let response = cp
        .request(Method::POST, "/api/v1/health-checks")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    response.json().await.unwrap()
}

async fn health(cp: &ControlPlane, server_id: &str) -> anyhow::Result<Value> {
    Ok(cp
        .request(Method::GET, &format!("/api/v1/servers/{server_id}/health"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

fn check_of<'a>(health: &'a Value, check_id: &str) -> Option<&'a Value> {
    health["checks"]
        .as_array()?
        .iter()
        .find(|c| c["check_id"] == check_id)
}

/// Waits until the check has `status` on the server; returns the whole health.
async fn wait_for_check(
    cp: &ControlPlane,
    server_id: &str,
    check_id: &str,
    status: &str,
    timeout: Duration,
) -> Value {
    eventually(
        timeout,
        &format!("check {check_id} to be {status}"),
        || async {
            let body = health(cp, server_id).await?;
            Ok(check_of(&body, check_id)
                .is_some_and(|c| c["status"] == status)
                .then_some(body))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\ncontrol plane log:\n{}", cp.log()))
}

#[tokio::test]
async fn a_pushed_http_check_fails_on_500_with_its_message_and_passes_again_on_200() {
    let web = StatusServer::start(500).await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "web-host")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();

    let check = create_check(
        &cp,
        json!({
            "name": "web answers",
            "kind": "http",
            "spec": { "url": format!("http://127.0.0.1:{}/healthz", web.port), "expected_status": 200 },
            "interval_seconds": 1,
            "timeout_seconds": 2,
            "retries": 1,
        }),
    )
    .await;
    let check_id = check["id"].as_str().unwrap();
    assert_eq!(check["kind"], "http");
    assert_eq!(check["retries"], 1);

    let failing = wait_for_check(
        &cp,
        &server_id,
        check_id,
        "failing",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(failing["server_id"], server_id.as_str());
    assert_eq!(failing["status"], "failing", "{failing}");
    assert_eq!(failing["server_status"], "online");
    let result = check_of(&failing, check_id).unwrap();
    assert_eq!(result["name"], "web answers");
    assert!(
        result["message"].as_str().unwrap().contains("500"),
        "the message says what the check saw: {result}"
    );
    assert!(result["consecutive_failures"].as_i64().unwrap() >= 1);
    // The agent's built-in checks are reported alongside.
    assert!(
        failing["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check_id"].as_str().unwrap().starts_with("builtin:")),
        "{failing}"
    );

    web.set(200);
    let passing = wait_for_check(
        &cp,
        &server_id,
        check_id,
        "passing",
        Duration::from_secs(20),
    )
    .await;
    let result = check_of(&passing, check_id).unwrap();
    assert_eq!(result["consecutive_failures"], 0);

    // The check is listed, and deleting it stops it on the agent: its
    // result goes away.
    let listed: Value = cp
        .request(Method::GET, "/api/v1/health-checks")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == check_id));
    let deleted = cp
        .request(Method::DELETE, &format!("/api/v1/health-checks/{check_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    eventually(
        Duration::from_secs(20),
        "the deleted check's result to go",
        || async {
            Ok(check_of(&health(&cp, &server_id).await?, check_id)
                .is_none()
                .then_some(()))
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_tcp_check_to_a_closed_port_fails_and_run_now_gives_a_fresh_result() {
    // A port that was just free: nothing listens on it.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "db-host")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();

    // A check that would otherwise run only once an hour.
    let check = create_check(
        &cp,
        json!({
            "name": "database port",
            "kind": "tcp",
            "spec": { "address": format!("127.0.0.1:{closed_port}") },
            "interval_seconds": 3600,
            "timeout_seconds": 2,
            "retries": 1,
            "selector": { "server_ids": [server_id] },
        }),
    )
    .await;
    let check_id = check["id"].as_str().unwrap();
    let failing = wait_for_check(
        &cp,
        &server_id,
        check_id,
        "failing",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(failing["status"], "failing");
    let first = check_of(&failing, check_id).unwrap().clone();
    assert!(!first["message"].as_str().unwrap().is_empty(), "{first}");

    let started = Instant::now();
    let accepted = cp
        .request(
            Method::POST,
            &format!("/api/v1/servers/{server_id}/health/run"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    assert_eq!(accepted["server_id"], server_id.as_str());
    let fresh = eventually(Duration::from_secs(10), "a fresh result", || async {
        let body = health(&cp, &server_id).await?;
        Ok(check_of(&body, check_id)
            .filter(|c| c["checked_at"] != first["checked_at"])
            .cloned())
    })
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(fresh["status"], "failing");
    assert!(
        fresh["consecutive_failures"].as_i64().unwrap() >= 2,
        "{fresh}"
    );
}

#[tokio::test]
async fn a_killed_agent_goes_offline_within_offline_after_with_a_reason_and_comes_back_online() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &["--metrics-interval", "1s", "--offline-after", "3s"],
    )
    .await
    .unwrap();
    let (mut agent, server_id) = enrolled_running_agent(&cp, dir.path(), "flaky")
        .await
        .unwrap();
    let online = cp
        .wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(online["status_reason"], Value::Null);

    agent.stop(true);
    let killed = Instant::now();
    let offline = cp
        .wait_for_status(&server_id, "offline", Duration::from_secs(15))
        .await
        .unwrap();
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "offline after {took:?}, --offline-after is 3s"
    );
    let reason = offline["status_reason"].as_str().unwrap();
    assert!(reason.contains("no heartbeat for 3s"), "{reason}");
    assert!(
        reason.contains("tether-agent"),
        "says what to check: {reason}"
    );

    // Run-now on an offline server says so.
    let refused = cp
        .request(
            Method::POST,
            &format!("/api/v1/servers/{server_id}/health/run"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "conflict");
    assert_eq!(body["server_status"], "offline");
    assert!(
        body["message"].as_str().unwrap().contains("offline"),
        "{body}"
    );

    agent.run().unwrap();
    let back = cp
        .wait_for_status(&server_id, "online", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(back["status_reason"], Value::Null);
}

#[tokio::test]
async fn an_enrolled_agent_that_never_connects_times_out_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &["--registration-timeout", "2s", "--offline-after", "3s"],
    )
    .await
    .unwrap();
    let token = cp
        .enrollment_token(json!({ "server_name": "never-runs" }))
        .await
        .unwrap();
    let agent = tether_tests::Agent::new(&dir.path().join("never-runs"));
    let (ok, stderr) = agent.enroll(&cp, token["token"].as_str().unwrap()).unwrap();
    assert!(ok, "{stderr}");
    let server_id = agent.server_id().unwrap();
    let timed_out = cp
        .wait_for_status(&server_id, "timeout", Duration::from_secs(15))
        .await
        .unwrap();
    let reason = timed_out["status_reason"].as_str().unwrap();
    assert!(reason.contains("opened no session within 2s"), "{reason}");
    assert!(
        reason.contains("tether-agent"),
        "says what to check: {reason}"
    );
}

/// A fresh, empty database on the test PostgreSQL server; returns its URL.
fn fresh_database() -> String {
    let admin = std::env::var("TETHER_TEST_DATABASE_URL").expect(
        "TETHER_TEST_DATABASE_URL is not set: run scripts/postgres.sh and export the URL it prints",
    );
    let name = format!("tether_health_{}", uuid_like());
    let status = std::process::Command::new("psql")
        .arg(&admin)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .status()
        .expect("psql must be installed");
    assert!(status.success(), "could not create database {name}");
    let (base, _) = admin
        .rsplit_once('/')
        .expect("database URL ends in /DBNAME");
    format!("{base}/{name}")
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}_{nanos}", std::process::id())
}

#[tokio::test]
async fn a_replica_never_flaps_a_server_another_replica_holds_and_sweeps_it_when_that_replica_dies()
{
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database();
    let mut a = ControlPlane::start(
        &dir.path().join("a"),
        &["--database-url", &url, "--offline-after", "3s"],
    )
    .await
    .unwrap();
    let token = a.admin_token();
    let key = dir.path().join("a").join("master.key");
    let b = ControlPlane::start(
        &dir.path().join("b"),
        &[
            "--database-url",
            &url,
            "--master-key-file",
            key.to_str().unwrap(),
            "--offline-after",
            "3s",
        ],
    )
    .await
    .unwrap();
    let status_via_b = |server_id: String| {
        let b = &b;
        let token = token.clone();
        async move {
            let body: Value = b
                .request_as(&token, Method::GET, &format!("/api/v1/servers/{server_id}"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(body)
        }
    };
    // The agent's session is on replica A.
    let (_agent, server_id) = enrolled_running_agent(&a, dir.path(), "held-by-a")
        .await
        .unwrap();
    a.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();

    // Replica B sweeps every second; for three offline windows it must
    // leave the server alone.
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        let server = status_via_b(server_id.clone()).await.unwrap();
        assert_eq!(server["status"], "online", "flapped: {server}\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A check created through replica B reaches the agent connected to A
    // (A reconciles what it pushed with the database).
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let created = b
        .request_as(&token, Method::POST, "/api/v1/health-checks")
        .json(&json!({
            "name": "made on b",
            "kind": "tcp",
            "spec": { "address": format!("127.0.0.1:{closed_port}") },
            "interval_seconds": 1,
            "retries": 1,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let check_id = created["id"].as_str().unwrap().to_string();
    eventually(
        Duration::from_secs(25),
        "the check made on B to run on A's agent",
        || async {
            let body: Value = b
                .request_as(
                    &token,
                    Method::GET,
                    &format!("/api/v1/servers/{server_id}/health"),
                )
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok(check_of(&body, &check_id).is_some().then_some(()))
        },
    )
    .await
    .unwrap();

    // Replica A dies: nobody ends the session, B's sweep notices.
    a.stop(true);
    let killed = Instant::now();
    let offline = eventually(
        Duration::from_secs(20),
        "B to mark the server offline",
        || async {
            let server = status_via_b(server_id.clone()).await?;
            Ok((server["status"] == "offline").then_some(server))
        },
    )
    .await
    .unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    let reason = offline["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("no control-plane replica holds its session"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_check_the_agent_refuses_shows_as_rejected_with_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let token = cp
        .enrollment_token(json!({ "server_name": "locked-down" }))
        .await
        .unwrap();
    let state_dir = dir.path().join("locked-down");
    // The agent's local policy forbids commands, so exec checks too.
    std::fs::write(
        state_dir.with_extension("toml"),
        "[commands]\nenabled = false\n",
    )
    .unwrap();
    let mut agent = tether_tests::Agent::new(&state_dir);
    let (ok, stderr) = agent.enroll(&cp, token["token"].as_str().unwrap()).unwrap();
    assert!(ok, "{stderr}");
    let server_id = agent.server_id().unwrap();
    agent.run().unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();

    let check = create_check(
        &cp,
        json!({ "name": "true", "kind": "exec", "spec": { "argv": ["true"] }, "interval_seconds": 1 }),
    )
    .await;
    let check_id = check["id"].as_str().unwrap();
    let body = wait_for_check(
        &cp,
        &server_id,
        check_id,
        "rejected",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(body["status"], "failing", "{body}");
    let refused = check_of(&body, check_id).unwrap();
    assert_eq!(refused["name"], "true");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("the agent refused this check: "),
        "{refused}"
    );
}
