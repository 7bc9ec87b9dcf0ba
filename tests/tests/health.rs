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
    // The agent's local policy forbids commands, so exec checks too.
    let (_agent, server_id) = tether_tests::online_agent_with_config(
        &cp,
        dir.path(),
        "locked-down",
        "[commands]\nenabled = false\n",
    )
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

/// The root organization's id, as the admin token sees it.
async fn root_organization(cp: &ControlPlane) -> String {
    let list = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/organizations",
            None,
        )
        .await
        .unwrap();
    assert_eq!(list.status, 200, "{list:?}");
    list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["parent_id"].is_null())
        .expect("root organization")["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Ids of every health check the admin sees.
async fn check_ids(cp: &ControlPlane) -> Vec<String> {
    let listed = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/health-checks",
            None,
        )
        .await
        .unwrap();
    assert_eq!(listed.status, 200, "{listed:?}");
    listed.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

fn assert_needs_commands_run(response: &tether_tests::ApiResponse, what: &str) {
    assert_eq!(response.status, 403, "{what}: {response:?}");
    assert_eq!(response.body["error"], "forbidden", "{what}: {response:?}");
    assert_eq!(
        response.body["required_scope"], "commands:run",
        "{what}: {response:?}"
    );
}

#[tokio::test]
async fn an_exec_check_needs_commands_run_and_its_audit_entry_records_its_argv() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "exec-host")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();
    let root = root_organization(&cp).await;
    let (_, writer) = cp
        .create_token(&cp.admin_token(), &root, &["servers:read", "servers:write"])
        .await
        .unwrap();
    let marker = dir.path().join("exec-check-ran");
    let exec = json!({
        "name": "who am i",
        "kind": "exec",
        "spec": { "argv": ["touch", marker.to_str().unwrap()] },
        "interval_seconds": 1,
    });

    // servers:write alone cannot create an exec check: nothing is stored,
    // nothing runs on the agent.
    let created = cp
        .call(&writer, Method::POST, "/api/v1/health-checks", Some(&exec))
        .await
        .unwrap();
    assert_needs_commands_run(&created, "servers:write creating an exec check");
    assert!(check_ids(&cp).await.is_empty());

    // Nor turn a tcp check into one, nor change an existing exec check.
    let tcp = create_check(
        &cp,
        json!({ "name": "tcp", "kind": "tcp", "spec": { "address": "127.0.0.1:9" } }),
    )
    .await;
    let tcp_id = tcp["id"].as_str().unwrap();
    let turned = cp
        .call(
            &writer,
            Method::PATCH,
            &format!("/api/v1/health-checks/{tcp_id}"),
            Some(&json!({ "kind": "exec", "spec": exec["spec"] })),
        )
        .await
        .unwrap();
    assert_needs_commands_run(&turned, "servers:write turning a check into exec");
    let harmless = create_check(
        &cp,
        json!({ "name": "true", "kind": "exec", "spec": { "argv": ["true"] }, "interval_seconds": 1 }),
    )
    .await;
    let harmless_id = harmless["id"].as_str().unwrap();
    let changed = cp
        .call(
            &writer,
            Method::PATCH,
            &format!("/api/v1/health-checks/{harmless_id}"),
            Some(&json!({ "spec": exec["spec"] })),
        )
        .await
        .unwrap();
    assert_needs_commands_run(&changed, "servers:write changing an exec check's argv");
    let stored = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            &format!("/api/v1/health-checks/{harmless_id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(stored.body["spec"]["argv"], json!(["true"]), "{stored:?}");
    let stored = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            &format!("/api/v1/health-checks/{tcp_id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(stored.body["kind"], "tcp", "{stored:?}");
    // The harmless check runs (so the agent is taking checks), the other
    // argv never ran.
    wait_for_check(
        &cp,
        &server_id,
        harmless_id,
        "passing",
        Duration::from_secs(20),
    )
    .await;
    assert!(!marker.exists(), "the refused exec check ran");

    // The audit entries of the checks that were created record the argv.
    let audit = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/audit-log?action=health_check.create",
            None,
        )
        .await
        .unwrap();
    assert_eq!(audit.status, 200, "{audit:?}");
    let entry = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"] == harmless_id)
        .unwrap_or_else(|| panic!("no audit entry for {harmless_id}: {audit:?}"));
    assert_eq!(entry["detail"]["argv"], json!(["true"]), "{entry}");
    assert_eq!(entry["detail"]["kind"], "exec", "{entry}");
}

/// A loopback HTTP server answering 500 with `body`.
async fn secret_server(body: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 500 {body}\r\nX-Secret: {body}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn an_http_check_result_never_carries_the_targets_body() {
    const SECRET: &str = "AKIA-TETHER-SECRET-9f1c";
    let (port, server) = secret_server(SECRET).await;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "reader")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();
    let status_check = create_check(
        &cp,
        json!({
            "name": "status", "kind": "http",
            "spec": { "url": format!("http://127.0.0.1:{port}/latest/meta-data/iam") },
            "interval_seconds": 1, "retries": 1,
        }),
    )
    .await;
    let body_check = create_check(
        &cp,
        json!({
            "name": "body", "kind": "http",
            "spec": { "url": format!("http://127.0.0.1:{port}/"), "expected_status": 500, "body_contains": "nope" },
            "interval_seconds": 1, "retries": 1,
        }),
    )
    .await;
    let status_id = status_check["id"].as_str().unwrap();
    let body_id = body_check["id"].as_str().unwrap();
    wait_for_check(
        &cp,
        &server_id,
        status_id,
        "failing",
        Duration::from_secs(20),
    )
    .await;
    let body = wait_for_check(&cp, &server_id, body_id, "failing", Duration::from_secs(20)).await;
    let message = check_of(&body, status_id).unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("HTTP 500 in ") && message.contains(" ms (expected 2xx)"),
        "status, latency and a fixed reason: {message}"
    );
    let message = check_of(&body, body_id).unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("do not contain the expected text"),
        "{message}"
    );
    // Nothing the target sent reaches the API answer.
    let raw = cp
        .request(Method::GET, &format!("/api/v1/servers/{server_id}/health"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!raw.contains(SECRET), "the secret leaked: {raw}");
    assert!(!raw.contains("AKIA"), "part of the secret leaked: {raw}");
    server.abort();
}

#[tokio::test]
async fn checks_aimed_at_cloud_metadata_are_refused_by_the_agent_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "cloud-vm")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (kind, spec) in [
        (
            "http",
            json!({ "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/" }),
        ),
        (
            "http",
            json!({ "url": "http://metadata.google.internal/computeMetadata/v1/" }),
        ),
        (
            "http",
            json!({ "url": "http://[fd00:ec2::254]/latest/meta-data/" }),
        ),
        ("tcp", json!({ "address": "169.254.169.254:80" })),
        ("tcp", json!({ "address": "[fe80::1]:22" })),
    ] {
        let check = create_check(
            &cp,
            json!({ "name": format!("{kind} metadata"), "kind": kind, "spec": spec, "interval_seconds": 1 }),
        )
        .await;
        ids.push(check["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let body = wait_for_check(&cp, &server_id, id, "rejected", Duration::from_secs(20)).await;
        let message = check_of(&body, id).unwrap()["message"].as_str().unwrap();
        assert!(
            message.starts_with("the agent refused this check: refused_target: "),
            "{message}"
        );
        assert!(message.contains("allow_metadata_targets"), "{message}");
    }
}

#[tokio::test]
async fn an_exec_check_runs_as_the_agents_run_as_user() {
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test switches users: run it as root (CI does)");
    }
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = tether_tests::online_agent_with_config(
        &cp,
        dir.path(),
        "unprivileged",
        "[commands]\nrun_as = \"nobody\"\n",
    )
    .await
    .unwrap();
    let check = create_check(
        &cp,
        json!({ "name": "uid", "kind": "exec", "spec": { "argv": ["id", "-u"] }, "interval_seconds": 1 }),
    )
    .await;
    let id = check["id"].as_str().unwrap();
    let body = wait_for_check(&cp, &server_id, id, "passing", Duration::from_secs(20)).await;
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap();
    let nobody = String::from_utf8_lossy(&nobody.stdout).trim().to_string();
    assert_ne!(nobody, "0");
    assert_eq!(
        check_of(&body, id).unwrap()["message"]
            .as_str()
            .unwrap()
            .trim(),
        nobody
    );
}
