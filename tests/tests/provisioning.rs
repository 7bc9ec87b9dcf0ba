//! Provisioning end to end with the real `terraform` binary and the `local`
//! target: a deployment renders its working dir, runs init/plan/apply
//! against the control plane's own HTTP state backend, the bootstrap starts
//! a real agent that enrolls with the deployment's token and reports, and a
//! destroy removes the process, the server and the state. Failures (a
//! template error, a quota, a control plane killed mid-apply) leave nothing
//! running. The harness enables the host targets (`--enable-host-targets`);
//! tenant_provisioning.rs proves who may use them and with what.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::{eventually, ControlPlane};

const WEBHOOK_SECRET: &str = "whsec-provisioning-5c1e";

/// A real HTTP receiver of webhooks: keeps (event header, signature header,
/// raw body) of every delivery.
async fn webhook_receiver() -> (
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>,
    String,
) {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    type Got = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>;
    let got: Got = Default::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |State(got): State<Got>, headers: HeaderMap, body: Bytes| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    if let Ok(mut got) = got.lock() {
                        got.push((
                            header("x-tether-event"),
                            header("x-tether-signature"),
                            body.to_vec(),
                        ));
                    }
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (got, url)
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, as a receiver computes it.
fn signature_of(body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

fn terraform_is_installed() {
    let found = std::process::Command::new("terraform")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "the terraform binary is required (PATH); these tests never skip"
    );
}

async fn start(dir: &Path, extra: &[&str]) -> ControlPlane {
    terraform_is_installed();
    let mut args = vec!["--metrics-interval", "1s", "--registration-timeout", "60s"];
    args.extend_from_slice(extra);
    ControlPlane::start(dir, &args)
        .await
        .expect("control plane starts")
}

async fn provision(cp: &ControlPlane, token: &str, body: Value) -> (u16, Value) {
    let response = cp
        .call(
            token,
            Method::POST,
            "/api/v1/infrastructure/provision",
            Some(&body),
        )
        .await
        .expect("provision call");
    (response.status.as_u16(), response.body)
}

fn local_request(name: &str) -> Value {
    json!({
        "provider": "local",
        "region": "local",
        "instance_type": "process",
        "server_name": name,
        "tags": { "env": "test" },
    })
}

async fn deployment(cp: &ControlPlane, id: &str) -> Value {
    let response = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            &format!("/api/v1/infrastructure/deployments/{id}"),
            None,
        )
        .await
        .expect("get deployment");
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

/// Waits until the deployment reaches one of `statuses`.
async fn wait_for(cp: &ControlPlane, id: &str, statuses: &[&str]) -> Value {
    let started = Instant::now();
    loop {
        let d = deployment(cp, id).await;
        let status = d["status"].as_str().unwrap_or_default();
        if statuses.contains(&status) {
            return d;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "deployment {id} still {status} after {SETTLE_TIMEOUT:?}: {d:#}\n--- log ---\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn workdir(cp: &ControlPlane, id: &str) -> PathBuf {
    cp.data_dir.join("deployments").join(id)
}

/// Processes whose command line mentions `needle` (pid, command line).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Agent processes started for this deployment's local server.
fn agents_of(cp: &ControlPlane, id: &str) -> Vec<(u32, String)> {
    let root = workdir(cp, id).join("local-server");
    processes_mentioning(&root.display().to_string())
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("tether-agent"))
        .collect()
}

/// Every byte of the control plane's SQLite files.
fn database_bytes(cp: &ControlPlane) -> Vec<u8> {
    let mut bytes = Vec::new();
    for name in ["tether.db", "tether.db-wal", "tether.db-shm"] {
        if let Ok(b) = std::fs::read(cp.data_dir.join(name)) {
            bytes.extend(b);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Reads an SSE stream to its end (the server ends it once the deployment
/// settled); returns the `event:` names in order.
async fn sse_event_names(cp: &ControlPlane, id: &str) -> anyhow::Result<Vec<String>> {
    let mut response = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/infrastructure/deployments/{id}/events",
            cp.api_url
        ))
        .bearer_auth(cp.admin_token())
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    if response.status() != 200 {
        bail!("events answered {}", response.status());
    }
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !content_type.starts_with("text/event-stream") {
        bail!("content type {content_type}");
    }
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await? {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("event: ")
                .or_else(|| l.strip_prefix("event:"))
        })
        .map(|s| s.trim().to_string())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_deployment_comes_online_reports_and_destroy_removes_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The webhook receiver listens on loopback.
    let cp = start(dir.path(), &["--allow-private-webhooks"]).await;
    let admin = cp.admin_token();
    let (deliveries, hook) = webhook_receiver().await;
    let webhook = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/webhooks",
            Some(&json!({ "url": hook, "events": ["infrastructure.*"], "secret": WEBHOOK_SECRET })),
        )
        .await
        .expect("create webhook");
    assert_eq!(webhook.status, 201, "{}", webhook.body);
    let (status, accepted) = provision(&cp, &admin, local_request("web-1")).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "pending");
    let id = accepted["deployment_id"].as_str().expect("id").to_string();
    assert!(accepted["monitor_url"]
        .as_str()
        .is_some_and(|u| u.ends_with(&format!("/deployments/{id}/events"))));

    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    assert_eq!(done["progress_percent"], 100);
    let steps: Vec<&str> = done["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(steps, ["render", "init", "plan", "apply", "registration"]);
    for step in done["steps"].as_array().expect("steps") {
        assert_eq!(step["status"], "succeeded", "{step}");
        assert!(step["duration_seconds"].as_f64().is_some(), "{step}");
    }
    let stages: Vec<&str> = done["boot_stages"]
        .as_array()
        .expect("boot stages")
        .iter()
        .map(|s| s["stage"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(stages, ["downloaded", "installed", "started"]);
    assert_eq!(done["server_ip"], "127.0.0.1");
    assert!(done["state_present"].as_bool().expect("state_present"));
    assert!(done["state_lock"].is_null(), "lock released: {done}");

    // The server is online under its server_name, and metrics flow.
    let server_id = done["server_id"].as_str().expect("server id").to_string();
    let server = cp
        .call(
            &admin,
            Method::GET,
            &format!("/api/v1/servers/{server_id}"),
            None,
        )
        .await
        .expect("server");
    assert_eq!(server.body["name"], "web-1");
    assert_eq!(server.body["deployment_id"], id.as_str());
    assert_eq!(server.body["labels"]["env"], "test");
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .expect("online");
    eventually(Duration::from_secs(10), "two metrics points", || async {
        let points = tether_tests::raw_points(&cp, &server_id, "2000-01-01T00:00:00Z").await?;
        Ok((points.len() >= 2).then_some(()))
    })
    .await
    .expect("metrics flow");

    // The whole story is on SSE, and the stream ends once settled.
    let names = sse_event_names(&cp, &id).await.expect("sse");
    for kind in ["status", "step", "log", "boot_stage"] {
        assert!(
            names.iter().any(|n| n == kind),
            "no {kind} event in {names:?}"
        );
    }

    // Secrets: the bootstrap token sits in the agent's own config only.
    let root = workdir(&cp, &id).join("local-server");
    let agent_toml =
        std::fs::read_to_string(root.join("etc/tether/agent.toml")).expect("agent.toml");
    let token = agent_toml
        .lines()
        .find_map(|l| l.strip_prefix("token = "))
        .map(|t| t.trim().trim_matches('"').to_string())
        .expect("token in agent.toml");
    assert!(token.starts_with("tet_enr_"), "{token}");
    assert!(!cp.log().contains(&token), "token in the control plane log");
    let tfvars =
        std::fs::read_to_string(workdir(&cp, &id).join("terraform.tfvars.json")).expect("tfvars");
    assert!(!tfvars.contains(&token) && !tfvars.contains("user_data"));
    assert!(processes_mentioning(&token).is_empty(), "token in an argv");
    let db = database_bytes(&cp);
    assert!(!contains(&db, &token), "token in clear in the database");
    assert!(
        !contains(&db, "\"lineage\""),
        "terraform state in clear in the database"
    );
    assert!(!root.join("var/lib/tether/bootstrap.env").exists());
    assert_eq!(agents_of(&cp, &id).len(), 1, "one agent runs");

    // Signed webhooks told the story so far.
    eventually(
        Duration::from_secs(20),
        "infrastructure webhooks",
        || async {
            let got = deliveries.lock().map(|g| g.clone()).unwrap_or_default();
            let events: Vec<&str> = got.iter().map(|(event, _, _)| event.as_str()).collect();
            Ok((events.contains(&"infrastructure.provisioning.started")
                && events.contains(&"infrastructure.provisioning.completed"))
            .then_some(()))
        },
    )
    .await
    .expect("provisioning webhooks delivered");
    for (event, signature, body) in deliveries.lock().map(|g| g.clone()).unwrap_or_default() {
        assert_eq!(signature, signature_of(&body), "signature of {event}");
        let body: Value = serde_json::from_slice(&body).expect("json body");
        assert_eq!(body["event"], event.as_str());
        assert_eq!(body["data"]["deployment_id"], id.as_str());
    }

    // Destroy: process gone, server gone, state empty.
    let response = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/infrastructure/deployments/{id}"),
            None,
        )
        .await
        .expect("destroy");
    assert_eq!(response.status, 202, "{}", response.body);
    let destroyed = wait_for(&cp, &id, &["destroyed", "failed"]).await;
    assert_eq!(destroyed["status"], "destroyed", "{destroyed:#}");
    assert!(!destroyed["state_present"].as_bool().expect("state_present"));
    assert!(
        agents_of(&cp, &id).is_empty(),
        "agent process still running"
    );
    assert!(!workdir(&cp, &id).exists(), "working dir left behind");
    eventually(Duration::from_secs(20), "destroy webhooks", || async {
        let got = deliveries.lock().map(|g| g.clone()).unwrap_or_default();
        Ok(got
            .iter()
            .any(|(event, _, _)| event == "infrastructure.destroying.completed")
            .then_some(()))
    })
    .await
    .expect("destroy webhooks delivered");
    let gone = cp
        .call(
            &admin,
            Method::GET,
            &format!("/api/v1/servers/{server_id}"),
            None,
        )
        .await
        .expect("server");
    assert_eq!(gone.status, 404, "{}", gone.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_failure_fails_with_terraforms_diagnostic_and_leaves_nothing_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let mut request = local_request("broken");
    // A variable callers may set, of a type the module refuses.
    request["terraform_variables"] = json!({ "stop_timeout_seconds": { "not": "a number" } });
    let (status, accepted) = provision(&cp, &cp.admin_token(), request).await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["deployment_id"].as_str().expect("id").to_string();
    let failed = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    let error = failed["error_message"].as_str().expect("error_message");
    assert!(
        error.contains("Invalid value for input variable")
            && error.contains("stop_timeout_seconds"),
        "terraform's diagnostic expected: {error}"
    );
    assert!(failed["state_lock"].is_null());
    assert!(failed["leftover_resources"]
        .as_array()
        .is_some_and(Vec::is_empty));
    assert!(agents_of(&cp, &id).is_empty());
    let servers = cp.servers("").await.expect("servers");
    assert!(servers.is_empty(), "{servers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_quota_of_one_server_a_full_organizations_next_provision_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let admin = cp.admin_token();
    let org = cp
        .create_organization(
            &admin,
            json!({ "name": "team", "quotas": { "max_servers": 1 } }),
        )
        .await
        .expect("organization");
    let org_id = org["id"].as_str().expect("org id");
    let credential = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/cloud-providers",
            Some(&json!({
                "name": "team-hetzner",
                "provider": "hetzner",
                "credentials": { "token": "hcloud-quota-test-0123456789" },
                "organization_id": org_id,
            })),
        )
        .await
        .expect("create credential");
    assert_eq!(credential.status, 201, "{}", credential.body);
    let (_, token) = cp
        .create_token(
            &admin,
            org_id,
            &["infrastructure:provision", "servers:read"],
        )
        .await
        .expect("token");
    // The organization's one server: an agent enrolled into it.
    let enrollment = cp
        .enrollment_token(json!({ "server_name": "occupant", "organization_id": org_id }))
        .await
        .expect("enrollment token");
    let agent = tether_tests::Agent::new(&dir.path().join("occupant"));
    let (enrolled, stderr) = agent
        .enroll(&cp, enrollment["token"].as_str().expect("token"))
        .expect("enroll");
    assert!(enrolled, "{stderr}");

    let request = json!({
        "provider": "hetzner",
        "region": "fsn1",
        "instance_type": "cx22",
        "server_name": "two",
        "cloud_provider_credential_id": credential.body["id"],
    });
    let (status, refused) = provision(&cp, &token, request).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"], "quota_exceeded");
    let listed = cp
        .call(
            &admin,
            Method::GET,
            "/api/v1/infrastructure/deployments",
            None,
        )
        .await
        .expect("list");
    assert_eq!(listed.body["data"], json!([]), "no deployment queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_mid_apply_resumes_or_rolls_back_without_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cp = start(dir.path(), &[]).await;
    let (status, accepted) = provision(&cp, &cp.admin_token(), local_request("crash-1")).await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["deployment_id"].as_str().expect("id").to_string();
    let started = Instant::now();
    loop {
        let d = deployment(&cp, &id).await;
        if d["current_step"] == "apply" {
            break;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "apply never started: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cp.stop(true);
    // terraform dies with its parent: no apply goes on alone.
    eventually(Duration::from_secs(5), "terraform gone", || async {
        let left: Vec<_> = processes_mentioning(&workdir(&cp, &id).display().to_string())
            .into_iter()
            .filter(|(_, c)| c.starts_with("terraform") || c.contains("/terraform "))
            .collect();
        Ok(left.is_empty().then_some(()))
    })
    .await
    .expect("no orphaned terraform");
    cp.restart().await.expect("restart");
    let settled = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert!(
        settled["state_lock"].is_null(),
        "lock released after the restart: {settled:#}"
    );
    let agents = agents_of(&cp, &id);
    eprintln!(
        "after the restart the deployment is {} ({})",
        settled["status"], settled["error_message"]
    );
    match settled["status"].as_str() {
        Some("completed") => {
            assert_eq!(agents.len(), 1, "exactly one agent: {agents:?}");
            let server_id = settled["server_id"].as_str().expect("server id");
            cp.wait_for_status(server_id, "online", Duration::from_secs(10))
                .await
                .expect("online");
        }
        _ => {
            assert!(
                agents.is_empty(),
                "rolled back but still running: {agents:?}"
            );
            assert!(cp.servers("").await.expect("servers").is_empty());
        }
    }
    let log = cp.log();
    assert!(
        log.contains("resuming an interrupted deployment"),
        "the restarted control plane resumed the job"
    );
    // Clean up whatever the deployment made.
    if settled["status"] == "completed" {
        let response = cp
            .call(
                &cp.admin_token(),
                Method::DELETE,
                &format!("/api/v1/infrastructure/deployments/{id}"),
                None,
            )
            .await
            .expect("destroy");
        assert_eq!(response.status, 202);
        let destroyed = wait_for(&cp, &id, &["destroyed", "failed"]).await;
        assert_eq!(destroyed["status"], "destroyed", "{destroyed:#}");
    }
    assert!(agents_of(&cp, &id).is_empty(), "nothing left running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_credentials_are_sealed_never_returned_and_checked_per_provider() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &["--allowed-providers", "hetzner,local"]).await;
    let admin = cp.admin_token();
    let secret = "hcloud-SECRET-token-0123456789abcdef";
    let created = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/cloud-providers",
            Some(&json!({
                "name": "hetzner-prod",
                "provider": "hetzner",
                "credentials": { "token": secret },
                "default_region": "fsn1",
            })),
        )
        .await
        .expect("create");
    assert_eq!(created.status, 201, "{}", created.body);
    assert!(!created.body.to_string().contains(secret));
    let id = created.body["id"].as_str().expect("id").to_string();
    let listed = cp
        .call(&admin, Method::GET, "/api/v1/cloud-providers", None)
        .await
        .expect("list");
    assert_eq!(listed.status, 200);
    assert!(!listed.body.to_string().contains(secret));
    assert_eq!(listed.body["data"][0]["is_validated"], false);
    let validated = cp
        .call(
            &admin,
            Method::POST,
            &format!("/api/v1/cloud-providers/{id}/validate"),
            None,
        )
        .await
        .expect("validate");
    assert_eq!(validated.status, 200, "{}", validated.body);
    assert_eq!(validated.body["is_validated"], true);

    // Wrong fields, an unknown provider, a provider not allowed here.
    for (body, code) in [
        (
            json!({ "name": "x", "provider": "hetzner", "credentials": { "tokn": "x" } }),
            "validation_error",
        ),
        (
            json!({ "name": "x", "provider": "openstack", "credentials": {} }),
            "validation_error",
        ),
    ] {
        let response = cp
            .call(&admin, Method::POST, "/api/v1/cloud-providers", Some(&body))
            .await
            .expect("create");
        assert_eq!(response.body["error"], code, "{}", response.body);
    }
    let (status, body) = provision(
        &cp,
        &admin,
        json!({ "provider": "aws", "region": "eu-west-1", "instance_type": "t3.micro",
                "server_name": "a", "cloud_provider_credential_id": id }),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    // A credential of another provider is refused.
    let (status, body) = provision(
        &cp,
        &admin,
        json!({ "provider": "local", "region": "l", "instance_type": "p",
                "server_name": "a", "cloud_provider_credential_id": id }),
    )
    .await;
    assert_eq!(status, 422, "{body}");

    // Sealed at rest, absent from logs.
    assert!(!contains(&database_bytes(&cp), secret));
    assert!(!cp.log().contains(secret));
    let deleted = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/cloud-providers/{id}"),
            None,
        )
        .await
        .expect("delete");
    assert_eq!(deleted.status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_backend_needs_the_deployments_credentials_and_reports_the_lock_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let (_, accepted) = provision(&cp, &cp.admin_token(), local_request("lockme")).await;
    let id = accepted["deployment_id"].as_str().expect("id").to_string();
    let url = format!("{}/terraform/state/{id}", cp.api_url);
    let client = reqwest::Client::new();
    let anonymous = client.get(&url).send().await.expect("get");
    assert_eq!(anonymous.status(), 401);
    let wrong = client
        .get(&url)
        .basic_auth("deployment", Some("not-the-password"))
        .send()
        .await
        .expect("get");
    assert_eq!(wrong.status(), 401);
    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}");

    // A token without infrastructure:destroy cannot destroy.
    let root_id = done["organization_id"].as_str().expect("organization id");
    let (_, provisioner) = cp
        .create_token(
            &cp.admin_token(),
            root_id,
            &["infrastructure:provision", "servers:read"],
        )
        .await
        .expect("token");
    let response = cp
        .call(
            &provisioner,
            Method::DELETE,
            &format!("/api/v1/infrastructure/deployments/{id}"),
            None,
        )
        .await
        .expect("destroy");
    assert_eq!(response.status, 403, "{}", response.body);
    assert_eq!(deployment(&cp, &id).await["status"], "completed");

    // An admin can force-unlock; a LOCK held by a dead run is then gone.
    let unlocked = cp
        .call(
            &cp.admin_token(),
            Method::DELETE,
            &format!("/api/v1/infrastructure/deployments/{id}/lock"),
            None,
        )
        .await
        .expect("unlock");
    assert_eq!(unlocked.status, 204, "{}", unlocked.body);
    let response = cp
        .call(
            &cp.admin_token(),
            Method::DELETE,
            &format!("/api/v1/infrastructure/deployments/{id}"),
            None,
        )
        .await
        .expect("destroy");
    assert_eq!(response.status, 202);
    let destroyed = wait_for(&cp, &id, &["destroyed", "failed"]).await;
    assert_eq!(destroyed["status"], "destroyed", "{destroyed:#}");
}

/// Containers of this test, found by the label the docker target puts on them.
fn containers_named(name: &str) -> Vec<String> {
    let output = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("name=^tether-{name}$"),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .expect("docker ps");
    assert!(output.status.success(), "docker ps: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_deployment_runs_its_agent_in_a_container_and_destroy_removes_it() {
    terraform_is_installed();
    let docker = std::process::Command::new("docker").arg("info").output();
    assert!(
        docker.is_ok_and(|o| o.status.success()),
        "a running Docker engine is required; this test never skips"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // On loopback only, the containers could not reach the control plane.
    let loopback = start(dir.path(), &[]).await;
    let name = "prov-docker-1";
    let request = json!({
        "provider": "docker",
        "region": "local",
        "instance_type": "container",
        "server_name": name,
    });
    let (status, body) = provision(&loopback, &loopback.admin_token(), request.clone()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--api-listen"),
        "{body}"
    );
    drop(loopback);

    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start_on(
        dir.path(),
        "0.0.0.0:0",
        "0.0.0.0:0",
        &["--metrics-interval", "1s", "--registration-timeout", "90s"],
    )
    .await
    .expect("control plane starts");
    let admin = cp.admin_token();
    let (status, accepted) = provision(&cp, &admin, request).await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["deployment_id"].as_str().expect("id").to_string();
    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    let server_ip = done["server_ip"].as_str().expect("server_ip");
    // The module's network and subnet: callers cannot choose them.
    assert!(server_ip.starts_with("172.31.250."), "{done:#}");
    assert_eq!(containers_named(name), [format!("tether-{name}")]);
    let server_id = done["server_id"].as_str().expect("server id").to_string();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .expect("online");
    eventually(
        Duration::from_secs(10),
        "metrics from the container",
        || async {
            let points = tether_tests::raw_points(&cp, &server_id, "2000-01-01T00:00:00Z").await?;
            Ok((!points.is_empty()).then_some(()))
        },
    )
    .await
    .expect("metrics flow");

    let response = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/infrastructure/deployments/{id}"),
            None,
        )
        .await
        .expect("destroy");
    assert_eq!(response.status, 202, "{}", response.body);
    let destroyed = wait_for(&cp, &id, &["destroyed", "failed"]).await;
    assert_eq!(destroyed["status"], "destroyed", "{destroyed:#}");
    assert!(containers_named(name).is_empty(), "container left behind");
}
