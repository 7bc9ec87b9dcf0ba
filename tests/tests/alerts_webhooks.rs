//! End-to-end alerts and webhooks: a real control plane and a real agent
//! reporting every second; an alert rule fires after its `for_seconds` and
//! reaches a real HTTP receiver, signed with the webhook's secret; a
//! receiver that fails once gets a second attempt; webhook URLs of the
//! control plane's own listeners are refused; the secret never leaves the
//! control plane. Webhooks reach no loopback, private or metadata address
//! unless the operator passes `--allow-private-webhooks`, neither when the
//! webhook is created nor when it is delivered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use tether_tests::{enrolled_running_agent, eventually, raw_points, ControlPlane};

/// Receivers here listen on loopback: the operator's flag allows them.
const FAST: &[&str] = &["--metrics-interval", "1s", "--allow-private-webhooks"];
const SECRET: &str = "whsec-e2e-7f3a9c1d5b2e8f40";

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Answer 500 to this many requests first.
    fail_first: Arc<AtomicUsize>,
}

impl Receiver {
    /// Serves `POST /hook` on a loopback port; returns the URL.
    async fn start(fail_first: usize) -> (Self, String) {
        let receiver = Self::default();
        receiver.fail_first.store(fail_first, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(Self::hook))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (receiver, url)
    }

    async fn hook(State(me): State<Self>, headers: HeaderMap, body: Bytes) -> StatusCode {
        me.got.lock().unwrap().push(Received { headers, body });
        let failing = me
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::NO_CONTENT
        }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, computed as a receiver would.
fn expected_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn post(cp: &ControlPlane, path: &str, body: Value) -> (StatusCode, Value) {
    let response = cp
        .call(&cp.admin_token(), Method::POST, path, Some(&body))
        .await
        .unwrap();
    (
        StatusCode::from_u16(response.status.as_u16()).unwrap(),
        response.body,
    )
}

async fn get(cp: &ControlPlane, path: &str) -> Value {
    let response = cp
        .call(&cp.admin_token(), Method::GET, path, None)
        .await
        .unwrap();
    assert_eq!(
        response.status,
        reqwest::StatusCode::OK,
        "{path}: {response:?}"
    );
    response.body
}

async fn create_webhook(cp: &ControlPlane, url: &str) -> Value {
    let (status, body) = post(
        cp,
        "/api/v1/webhooks",
        json!({ "url": url, "events": ["alert.firing"], "secret": SECRET }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        !body.to_string().contains(SECRET),
        "secret returned: {body}"
    );
    body
}

async fn create_cpu_rule(cp: &ControlPlane) -> Value {
    let (status, rule) = post(
        cp,
        "/api/v1/alert-rules",
        json!({
            "name": "cpu is measured",
            "metric": "cpu_percent",
            "op": ">=",
            "threshold": 0,
            "for_seconds": 2,
            "severity": "warning",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    assert_eq!(rule["kind"], "metric");
    rule
}

#[tokio::test]
async fn an_alert_firing_reaches_the_receiver_signed_and_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (receiver, url) = Receiver::start(0).await;
    let webhook = create_webhook(&cp, &url).await;
    let rule = create_cpu_rule(&cp).await;
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "alerting-host")
        .await
        .unwrap();

    let delivery = eventually(
        Duration::from_secs(60),
        "alert.firing at the receiver",
        || async {
            Ok(receiver
                .received()
                .into_iter()
                .find(|r| header(r, "x-tether-event") == "alert.firing"))
        },
    )
    .await
    .unwrap();

    // The signature verifies with the secret, over the raw body.
    assert_eq!(
        header(&delivery, "x-tether-signature"),
        expected_signature(SECRET, &delivery.body)
    );
    assert_ne!(
        header(&delivery, "x-tether-signature"),
        expected_signature("some-other-secret-value", &delivery.body)
    );
    assert!(!header(&delivery, "x-tether-delivery").is_empty());
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["event"], "alert.firing");
    assert!(body["timestamp"].is_string(), "{body}");
    assert_eq!(body["organization_id"], webhook["organization_id"]);
    let data = &body["data"];
    assert_eq!(data["server_id"], server_id.as_str());
    assert_eq!(data["rule_id"], rule["id"]);
    assert_eq!(data["rule_name"], "cpu is measured");
    assert_eq!(data["severity"], "warning");
    assert_eq!(data["state"], "firing");
    assert!(data["value"].as_f64().unwrap() >= 0.0, "{data}");

    // Not before the condition held for 2 s of samples.
    let points = raw_points(&cp, &server_id, "2000-01-01T00:00:00Z")
        .await
        .unwrap();
    let first: chrono::DateTime<chrono::Utc> = points[0]["ts"].as_str().unwrap().parse().unwrap();
    let started: chrono::DateTime<chrono::Utc> =
        data["started_at"].as_str().unwrap().parse().unwrap();
    assert!(
        started - first >= chrono::Duration::seconds(2),
        "fired at {started}, first sample at {first}"
    );

    let firing = get(&cp, "/api/v1/alerts?state=firing").await;
    let listed = firing["data"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{firing}");
    assert_eq!(listed[0]["id"], data["alert_id"]);
    assert_eq!(listed[0]["rule_id"], rule["id"]);
    assert_eq!(listed[0]["server_id"], server_id.as_str());
    assert_eq!(listed[0]["state"], "firing");
    assert!(get(&cp, "/api/v1/alerts?state=resolved").await["data"]
        .as_array()
        .unwrap()
        .is_empty());
    // Still firing, paged once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let firing_events = receiver
        .received()
        .iter()
        .filter(|r| header(r, "x-tether-event") == "alert.firing")
        .count();
    assert_eq!(firing_events, 1);

    // The delivery log: delivered at the first attempt.
    let webhook_id = webhook["id"].as_str().unwrap();
    let deliveries = get(&cp, &format!("/api/v1/webhooks/{webhook_id}/deliveries")).await;
    let first_delivery = &deliveries["data"][0];
    assert_eq!(first_delivery["status"], "delivered", "{deliveries}");
    assert_eq!(first_delivery["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(first_delivery["attempts"][0]["status_code"], 204);
    assert_eq!(
        first_delivery["id"].as_str().unwrap(),
        header(&delivery, "x-tether-delivery")
    );

    // Webhook URLs of the control plane's own listeners are refused.
    let api_port = cp.api_url.rsplit(':').next().unwrap().to_string();
    for own in [
        format!("{}/hook", cp.api_url),
        format!("http://localhost:{api_port}/"),
        format!("http://127.0.0.1:{}/", cp.quic_addr.port()),
    ] {
        let (status, body) = post(
            &cp,
            "/api/v1/webhooks",
            json!({ "url": own, "events": ["*"], "secret": SECRET }),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{own}: {body}");
        assert_eq!(body["error"], "validation_error");
        assert!(!body.to_string().contains(SECRET));
    }

    // The secret is in no answer and no log line.
    for path in [
        "/api/v1/webhooks".to_string(),
        format!("/api/v1/webhooks/{webhook_id}"),
        format!("/api/v1/webhooks/{webhook_id}/deliveries"),
        "/api/v1/audit-log".to_string(),
    ] {
        let body = get(&cp, &path).await;
        assert!(!body.to_string().contains(SECRET), "{path}: {body}");
    }
    let log = cp.log();
    assert!(log.contains("webhook delivered"), "{log}");
    assert!(
        !log.contains(SECRET),
        "the secret is in the control plane's log"
    );
}

#[tokio::test]
async fn a_receiver_that_fails_once_gets_a_second_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (receiver, url) = Receiver::start(1).await;
    let webhook = create_webhook(&cp, &url).await;
    create_cpu_rule(&cp).await;
    let (_agent, _server_id) = enrolled_running_agent(&cp, dir.path(), "flaky-receiver")
        .await
        .unwrap();
    let webhook_id = webhook["id"].as_str().unwrap();

    let delivery = eventually(Duration::from_secs(60), "a delivered delivery", || async {
        let page = get(&cp, &format!("/api/v1/webhooks/{webhook_id}/deliveries")).await;
        Ok(page["data"]
            .as_array()
            .and_then(|d| d.first())
            .filter(|d| d["status"] == "delivered")
            .cloned())
    })
    .await
    .unwrap();
    let attempts = delivery["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{delivery}");
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["status_code"], 500);
    assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
    assert_eq!(attempts[1]["attempt"], 2);
    assert_eq!(attempts[1]["status_code"], 204);
    assert_eq!(delivery["attempt_count"], 2);
    // About a second apart (the first backoff step).
    let at =
        |a: &Value| -> chrono::DateTime<chrono::Utc> { a["at"].as_str().unwrap().parse().unwrap() };
    let gap = at(&attempts[1]) - at(&attempts[0]);
    assert!(
        gap >= chrono::Duration::milliseconds(900),
        "retried after {gap}"
    );

    // The receiver saw the same signed body twice.
    let got = receiver.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].body, got[1].body);
    assert_eq!(
        header(&got[0], "x-tether-delivery"),
        header(&got[1], "x-tether-delivery")
    );
    for r in &got {
        assert_eq!(
            header(r, "x-tether-signature"),
            expected_signature(SECRET, &r.body)
        );
    }
    assert!(!cp.log().contains(SECRET));
}

/// Events of `kind` the receiver got, as parsed bodies.
fn events_of(receiver: &Receiver, kind: &str) -> Vec<Value> {
    receiver
        .received()
        .iter()
        .filter(|r| header(r, "x-tether-event") == kind)
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

#[tokio::test]
async fn an_offline_rule_fires_when_the_agent_stops_and_resolves_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (receiver, url) = Receiver::start(0).await;
    let (status, body) = post(
        &cp,
        "/api/v1/webhooks",
        json!({ "url": url, "events": ["alert.*"], "secret": SECRET }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, rule) = post(
        &cp,
        "/api/v1/alert-rules",
        json!({ "name": "host down", "kind": "offline", "for_seconds": 1, "severity": "critical" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    assert_eq!(rule["kind"], "offline");
    assert_eq!(rule["metric"], Value::Null);
    let (mut agent, server_id) = enrolled_running_agent(&cp, dir.path(), "goes-away")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        events_of(&receiver, "alert.firing").is_empty(),
        "fired while online"
    );

    agent.stop(false);
    cp.wait_for_status(&server_id, "offline", Duration::from_secs(60))
        .await
        .unwrap();
    let fired = eventually(Duration::from_secs(30), "alert.firing", || async {
        Ok(events_of(&receiver, "alert.firing").into_iter().next())
    })
    .await
    .unwrap();
    assert_eq!(fired["data"]["server_id"], server_id.as_str());
    assert_eq!(fired["data"]["kind"], "offline");
    assert_eq!(fired["data"]["severity"], "critical");

    agent.run().unwrap();
    let resolved = eventually(Duration::from_secs(60), "alert.resolved", || async {
        Ok(events_of(&receiver, "alert.resolved").into_iter().next())
    })
    .await
    .unwrap();
    assert_eq!(resolved["data"]["alert_id"], fired["data"]["alert_id"]);
    assert_eq!(resolved["data"]["state"], "resolved");
    assert!(resolved["data"]["resolved_at"].is_string());
    let alerts = get(&cp, "/api/v1/alerts?state=resolved").await;
    assert_eq!(alerts["data"][0]["id"], fired["data"]["alert_id"]);
    assert!(get(&cp, "/api/v1/alerts?state=firing").await["data"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_restarted_control_plane_does_not_page_again_for_a_firing_alert() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (receiver, url) = Receiver::start(0).await;
    create_webhook(&cp, &url).await;
    create_cpu_rule(&cp).await;
    let (_agent, _server_id) = enrolled_running_agent(&cp, dir.path(), "steady")
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "alert.firing", || async {
        Ok(events_of(&receiver, "alert.firing").into_iter().next())
    })
    .await
    .unwrap();

    cp.stop(false);
    cp.restart().await.unwrap();
    // The agent reconnects and keeps reporting; the rule keeps matching.
    let before = get(&cp, "/api/v1/alerts").await["data"]
        .as_array()
        .unwrap()
        .len();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(events_of(&receiver, "alert.firing").len(), 1);
    let alerts = get(&cp, "/api/v1/alerts").await;
    assert_eq!(alerts["data"].as_array().unwrap().len(), before);
    assert_eq!(before, 1, "{alerts}");
    assert_eq!(alerts["data"][0]["state"], "firing");
}

#[tokio::test]
async fn webhook_and_rule_input_is_validated_and_needs_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--allow-private-webhooks"])
        .await
        .unwrap();
    let (_receiver, url) = Receiver::start(0).await;
    for (body, field) in [
        (
            json!({ "url": "ftp://example.com/x", "secret": SECRET }),
            "url",
        ),
        (json!({ "url": url, "secret": "short" }), "secret"),
        (
            json!({ "url": url, "secret": SECRET, "events": ["server.exploded"] }),
            "event",
        ),
        (
            json!({ "url": "http://no-such-host.invalid/x", "secret": SECRET }),
            "resolve",
        ),
    ] {
        let (status, answer) = post(&cp, "/api/v1/webhooks", body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["error"], "validation_error");
        assert!(
            answer["message"].as_str().unwrap().contains(field),
            "{field}: {answer}"
        );
    }
    for body in [
        json!({ "name": "x", "metric": "cpu_temperature", "op": ">", "threshold": 1, "severity": "info" }),
        json!({ "name": "x", "metric": "cpu_percent", "op": "==", "threshold": 1, "severity": "info" }),
        json!({ "name": "x", "metric": "cpu_percent", "op": ">", "severity": "info" }),
        json!({ "name": "x", "metric": "cpu_percent", "op": ">", "threshold": 1, "severity": "page-me" }),
        json!({ "name": "x", "kind": "offline", "metric": "cpu_percent", "severity": "info" }),
        json!({ "name": "x", "kind": "on_fire", "severity": "info" }),
        json!({ "name": "x", "kind": "offline", "severity": "info", "for_seconds": -1 }),
    ] {
        let (status, answer) = post(&cp, "/api/v1/alert-rules", body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["error"], "validation_error");
    }
    let (status, answer) = post(
        &cp,
        "/api/v1/alert-rules",
        json!({ "name": "disk", "metric": "disk_used_percent", "op": ">", "threshold": 90,
                "for_seconds": 60, "severity": "warning",
                "selector": { "labels": { "env": "prod" } } }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["selector"]["labels"]["env"], "prod");

    // A token without the scopes is refused; `servers:read` may read rules.
    let root = get(&cp, "/api/v1/organizations").await["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, reader) = cp
        .create_token(&cp.admin_token(), &root, &["servers:read"])
        .await
        .unwrap();
    let webhook_post = cp
        .call(
            &reader,
            Method::POST,
            "/api/v1/webhooks",
            Some(&json!({ "url": url, "secret": SECRET })),
        )
        .await
        .unwrap();
    assert_eq!(webhook_post.status, reqwest::StatusCode::FORBIDDEN);
    assert_eq!(webhook_post.body["required_scope"], "webhooks:write");
    let rules = cp
        .call(&reader, Method::GET, "/api/v1/alert-rules", None)
        .await
        .unwrap();
    assert_eq!(rules.status, reqwest::StatusCode::OK);
    assert_eq!(rules.body["data"].as_array().unwrap().len(), 1);
    let rule_post = cp
        .call(
            &reader,
            Method::POST,
            "/api/v1/alert-rules",
            Some(&json!({ "name": "x", "kind": "offline", "severity": "info" })),
        )
        .await
        .unwrap();
    assert_eq!(rule_post.status, reqwest::StatusCode::FORBIDDEN);
}

/// A fresh, empty database on the test PostgreSQL server; returns its URL.
fn fresh_database() -> String {
    let admin = std::env::var("TETHER_TEST_DATABASE_URL").expect(
        "TETHER_TEST_DATABASE_URL is not set: run scripts/postgres.sh and export the URL it prints",
    );
    let name = format!(
        "tether_alerts_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
    );
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

#[tokio::test]
async fn two_replicas_page_once_and_send_each_delivery_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database();
    let a = ControlPlane::start(
        &dir.path().join("a"),
        &[
            "--database-url",
            &url,
            "--metrics-interval",
            "1s",
            "--allow-private-webhooks",
        ],
    )
    .await
    .unwrap();
    let key = dir.path().join("a").join("master.key");
    let b = ControlPlane::start(
        &dir.path().join("b"),
        &[
            "--database-url",
            &url,
            "--master-key-file",
            key.to_str().unwrap(),
            "--metrics-interval",
            "1s",
            "--allow-private-webhooks",
        ],
    )
    .await
    .unwrap();
    let (receiver, hook_url) = Receiver::start(0).await;
    create_webhook(&a, &hook_url).await;
    for metric in ["cpu_percent", "load_1", "memory_used_percent"] {
        let (status, rule) = post(
            &a,
            "/api/v1/alert-rules",
            json!({ "name": metric, "metric": metric, "op": ">=", "threshold": 0,
                    "for_seconds": 1, "severity": "info" }),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{rule}");
    }
    let (_agent, server_id) = enrolled_running_agent(&a, dir.path(), "replicated")
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "three alert.firing", || async {
        Ok((events_of(&receiver, "alert.firing").len() >= 3).then_some(()))
    })
    .await
    .unwrap();
    // Both replicas keep evaluating and delivering for a while.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let fired = events_of(&receiver, "alert.firing");
    assert_eq!(fired.len(), 3, "{fired:?}");
    let rules: std::collections::BTreeSet<String> = fired
        .iter()
        .map(|f| f["data"]["rule_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rules.len(), 3);
    assert!(fired
        .iter()
        .all(|f| f["data"]["server_id"] == server_id.as_str()));
    let ids: std::collections::BTreeSet<String> = receiver
        .received()
        .iter()
        .map(|r| header(r, "x-tether-delivery").to_string())
        .collect();
    assert_eq!(
        ids.len(),
        receiver.received().len(),
        "a delivery was sent twice"
    );
    let firing = get(&a, "/api/v1/alerts?state=firing").await;
    assert_eq!(firing["data"].as_array().unwrap().len(), 3, "{firing}");
    assert!(b.log().contains("control plane started"));
}

/// A web service a health check probes: answers `status` to every request.
async fn probed_service(status: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(|State(status): State<Arc<AtomicUsize>>| async move {
                let code = u16::try_from(status.load(Ordering::SeqCst)).unwrap_or(500);
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }),
        )
        .with_state(status);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/healthz", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    url
}

/// The one delivery of `kind` the receiver got, checked as a receiver
/// would: signature over the raw body, the four documented fields.
async fn signed_event(receiver: &Receiver, kind: &str, within: Duration) -> Value {
    let delivery = eventually(within, kind, || async {
        Ok(receiver
            .received()
            .into_iter()
            .find(|r| header(r, "x-tether-event") == kind))
    })
    .await
    .unwrap();
    assert_eq!(
        header(&delivery, "x-tether-signature"),
        expected_signature(SECRET, &delivery.body),
        "signature of {kind} does not verify"
    );
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["event"], kind);
    for field in ["timestamp", "organization_id", "data"] {
        assert!(!body[field].is_null(), "{field} missing in {body}");
    }
    body
}

#[tokio::test]
async fn a_failing_http_check_fires_health_failed_at_a_listener_and_the_signature_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (receiver, hook) = Receiver::start(0).await;
    let (status, body) = post(
        &cp,
        "/api/v1/webhooks",
        json!({ "url": hook, "events": ["health.*"], "secret": SECRET }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "web-1")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(30))
        .await
        .unwrap();

    let answer = Arc::new(AtomicUsize::new(503));
    let url = probed_service(answer.clone()).await;
    let (status, check) = post(
        &cp,
        "/api/v1/health-checks",
        json!({
            "name": "site answers",
            "kind": "http",
            "spec": { "url": url, "expected_status": 200 },
            "interval_seconds": 1,
            "timeout_seconds": 2,
            "retries": 1,
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{check}");

    let failed = signed_event(&receiver, "health.failed", Duration::from_secs(30)).await;
    assert_eq!(failed["data"]["server_id"], server_id.as_str());
    assert_eq!(failed["data"]["check_id"], check["id"]);
    assert_eq!(failed["data"]["check_name"], "site answers");
    let health = get(&cp, &format!("/api/v1/servers/{server_id}/health")).await;
    assert_eq!(health["status"], "failing", "{health}");

    answer.store(200, Ordering::SeqCst);
    let recovered = signed_event(&receiver, "health.recovered", Duration::from_secs(30)).await;
    assert_eq!(recovered["data"]["check_id"], check["id"]);
    let health = get(&cp, &format!("/api/v1/servers/{server_id}/health")).await;
    let site = health["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["check_id"] == check["id"]))
        .cloned()
        .unwrap_or_default();
    assert_eq!(site["status"], "passing", "{health}");
    assert_ne!(health["status"], "failing", "{health}");
    assert_eq!(
        events_of(&receiver, "health.failed").len(),
        1,
        "one failure, one event"
    );
}

#[tokio::test]
async fn a_sigkilled_agent_goes_offline_within_offline_after_and_fires_server_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &[
            "--metrics-interval",
            "1s",
            "--offline-after",
            "3s",
            "--allow-private-webhooks",
        ],
    )
    .await
    .unwrap();
    let (receiver, hook) = Receiver::start(0).await;
    let (status, body) = post(
        &cp,
        "/api/v1/webhooks",
        json!({ "url": hook, "events": ["server.online", "server.offline"], "secret": SECRET }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (mut agent, server_id) = enrolled_running_agent(&cp, dir.path(), "db-1")
        .await
        .unwrap();
    let online = signed_event(&receiver, "server.online", Duration::from_secs(30)).await;
    assert_eq!(online["data"]["server_id"], server_id.as_str());

    agent.stop(true);
    let killed_at = std::time::Instant::now();
    let offline = signed_event(&receiver, "server.offline", Duration::from_secs(20)).await;
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "server.offline after {took:?} with --offline-after 3s"
    );
    assert_eq!(offline["data"]["server_id"], server_id.as_str());
    let server = get(&cp, &format!("/api/v1/servers/{server_id}")).await;
    assert_eq!(server["status"], "offline", "{server}");
    assert!(
        server["status_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{server}"
    );
}

/// `POST /webhooks` for `url` subscribed to `server.online`.
async fn try_webhook(cp: &ControlPlane, url: &str) -> (StatusCode, Value) {
    post(
        cp,
        "/api/v1/webhooks",
        json!({ "url": url, "events": ["server.online"], "secret": SECRET }),
    )
    .await
}

#[tokio::test]
async fn webhooks_to_loopback_private_and_metadata_addresses_are_refused_and_reach_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--metrics-interval", "1s"])
        .await
        .unwrap();
    let (receiver, url) = Receiver::start(0).await;
    let port = url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/hook")
        .to_string();
    // None of these is ever connected to: the refusal comes from the
    // address itself (literal, or what `localhost` resolves to).
    for (target, reason) in [
        (url.clone(), "loopback_address"),
        (format!("http://localhost:{port}/hook"), "loopback_address"),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/hook"),
            "loopback_address",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "metadata_address",
        ),
        ("http://[fd00:ec2::254]/".to_string(), "metadata_address"),
        ("http://10.0.0.1/".to_string(), "private_address"),
        ("http://192.168.1.1:8080/".to_string(), "private_address"),
        ("http://100.64.0.1/".to_string(), "private_address"),
        ("http://169.254.1.1/".to_string(), "link_local_address"),
    ] {
        let (status, answer) = try_webhook(&cp, &target).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{target}: {answer}"
        );
        assert_eq!(answer["error"], "validation_error", "{target}: {answer}");
        assert_eq!(answer["field"], "url", "{target}: {answer}");
        assert_eq!(answer["reason"], reason, "{target}: {answer}");
    }
    assert_eq!(
        get(&cp, "/api/v1/webhooks").await["data"],
        json!([]),
        "no webhook was stored"
    );

    // An event happens; the loopback receiver hears nothing of it.
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "quiet")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(receiver.received().is_empty(), "the receiver got a request");
    assert!(cp.log().contains("server.online"), "the event was emitted");
}

#[tokio::test]
async fn a_receiver_accepted_at_creation_is_refused_at_delivery_once_its_address_is_not_allowed() {
    // Created while private receivers were allowed; delivered after a
    // restart without the flag: the name (`localhost`) is checked again at
    // delivery, as a re-pointed DNS name would be, and nothing is sent.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let mut lenient = ControlPlane::start(&data, FAST).await.unwrap();
    let (receiver, url) = Receiver::start(0).await;
    let name_url = url.replace("127.0.0.1", "localhost");
    let (status, webhook) = try_webhook(&lenient, &name_url).await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");
    let webhook_id = webhook["id"].as_str().unwrap().to_string();
    lenient.stop(false);

    let strict = ControlPlane::start(&data, &["--metrics-interval", "1s"])
        .await
        .unwrap();
    let (_agent, _server_id) = enrolled_running_agent(&strict, dir.path(), "rebound")
        .await
        .unwrap();
    let path = format!("/api/v1/webhooks/{webhook_id}/deliveries");
    let delivery = eventually(Duration::from_secs(20), "a failed delivery", || async {
        let page = get(&strict, &path).await;
        Ok(page["data"]
            .as_array()
            .and_then(|d| d.first().cloned())
            .filter(|d| d["status"] == "failed"))
    })
    .await
    .unwrap();
    assert_eq!(delivery["event"], "server.online", "{delivery:#}");
    let attempts = delivery["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "refused for good: {delivery:#}");
    assert!(attempts[0]["status_code"].is_null(), "{delivery:#}");
    assert!(delivery["last_status_code"].is_null(), "{delivery:#}");
    let error = attempts[0]["error"].as_str().unwrap();
    assert!(error.contains("loopback_address"), "{error}");
    assert!(!error.contains("127.0.0.1"), "the reason is fixed: {error}");
    assert!(receiver.received().is_empty(), "the receiver got a request");
}

#[tokio::test]
async fn with_allow_private_webhooks_loopback_receivers_get_events_but_the_own_api_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (receiver, url) = Receiver::start(0).await;
    let (status, answer) = try_webhook(&cp, &url).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    for (target, reason) in [
        (
            format!("{}/api/v1/organizations", cp.api_url),
            "own_listener",
        ),
        (
            format!("http://localhost:{}/x", cp.quic_addr.port()),
            "own_listener",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "metadata_address",
        ),
    ] {
        let (status, answer) = try_webhook(&cp, &target).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{target}: {answer}"
        );
        assert_eq!(answer["reason"], reason, "{target}: {answer}");
    }
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "heard")
        .await
        .unwrap();
    let event = signed_event(&receiver, "server.online", Duration::from_secs(20)).await;
    assert_eq!(event["data"]["server_id"], server_id.as_str(), "{event:#}");
}
