//! Provisioning governance end to end, with the real `terraform` binary and
//! the `local` target (root organization, `--enable-host-targets`): the
//! instance catalog (served, an unknown type refused with the nearest
//! names, an operator override giving the free local target a price or a
//! size), cost estimates, budgets and CPU quotas counted from the catalog,
//! approvals (nothing runs before one; the requester cannot approve; a
//! rejection leaves nothing behind), and batches (all online, or refused
//! whole).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::ControlPlane;

const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);

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
    let mut args = vec![
        "--metrics-interval",
        "1s",
        "--registration-timeout",
        "90s",
        "--allow-private-webhooks",
    ];
    args.extend_from_slice(extra);
    ControlPlane::start(dir, &args)
        .await
        .expect("control plane starts")
}

/// A catalog directory whose `local.toml` prices and sizes the `process`
/// type as given (the embedded one is free and nominal).
fn local_catalog(dir: &Path, vcpus: u32, hourly_usd: f64) -> PathBuf {
    let catalog = dir.join("catalog");
    std::fs::create_dir_all(&catalog).expect("catalog dir");
    std::fs::write(
        catalog.join("local.toml"),
        format!(
            "source = \"test override\"\nas_of = \"2026-12-06\"\nregions = [\"local\"]\n\n\
             [[instance_types]]\nname = \"process\"\nvcpus = {vcpus}\nmemory_gb = 1.0\n\
             hourly_usd = {hourly_usd:?}\n"
        ),
    )
    .expect("local.toml");
    catalog
}

fn local_request(name: &str) -> Value {
    json!({
        "provider": "local",
        "region": "local",
        "instance_type": "process",
        "server_name": name,
    })
}

async fn call(
    cp: &ControlPlane,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    match cp.call(token, method, path, body.as_ref()).await {
        Ok(response) => (response.status.as_u16(), response.body),
        Err(e) => {
            let log = cp.log();
            let _ = std::fs::write(
                format!("/tmp/i20flow-fail-{}.log", std::process::id()),
                &log,
            );
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("API call {path}: {e:#}\n--- log tail ---\n{tail}")
        }
    }
}

async fn provision(cp: &ControlPlane, token: &str, body: Value) -> (u16, Value) {
    call(
        cp,
        token,
        Method::POST,
        "/api/v1/infrastructure/provision",
        Some(body),
    )
    .await
}

async fn root_id(cp: &ControlPlane) -> String {
    let (_, orgs) = call(
        cp,
        &cp.admin_token(),
        Method::GET,
        "/api/v1/organizations",
        None,
    )
    .await;
    orgs["data"]
        .as_array()
        .and_then(|orgs| orgs.iter().find(|o| o["parent_id"].is_null()))
        .and_then(|o| o["id"].as_str())
        .expect("root organization")
        .to_string()
}

async fn set_root_quotas(cp: &ControlPlane, quotas: Value) {
    let root = root_id(cp).await;
    let (status, body) = call(
        cp,
        &cp.admin_token(),
        Method::PATCH,
        &format!("/api/v1/organizations/{root}"),
        Some(json!({ "quotas": quotas })),
    )
    .await;
    assert_eq!(
        status, 200,
        "the root organization sets its own quotas: {body}"
    );
}

async fn set_root_policy(cp: &ControlPlane, policy: Value) {
    let root = root_id(cp).await;
    let (status, body) = call(
        cp,
        &cp.admin_token(),
        Method::PUT,
        &format!("/api/v1/organizations/{root}/approval-policy"),
        Some(policy),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

async fn deployment(cp: &ControlPlane, id: &str) -> Value {
    let (status, body) = call(
        cp,
        &cp.admin_token(),
        Method::GET,
        &format!("/api/v1/infrastructure/deployments/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

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
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Destroys a completed deployment and waits until it is gone.
async fn destroy(cp: &ControlPlane, id: &str) {
    let (status, body) = call(
        cp,
        &cp.admin_token(),
        Method::DELETE,
        &format!("/api/v1/infrastructure/deployments/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let done = wait_for(cp, id, &["destroyed", "failed"]).await;
    assert_eq!(done["status"], "destroyed", "{done:#}");
}

fn workdir(cp: &ControlPlane, id: &str) -> PathBuf {
    cp.data_dir.join("deployments").join(id)
}

/// Agent processes started for this deployment's local server.
fn agents_of(cp: &ControlPlane, id: &str) -> usize {
    let needle = workdir(cp, id).join("local-server").display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle) && cmdline.contains("tether-agent"))
        .count()
}

/// A real HTTP receiver of webhooks: the event header of every delivery.
async fn webhook_receiver() -> (std::sync::Arc<std::sync::Mutex<Vec<String>>>, String) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    type Got = std::sync::Arc<std::sync::Mutex<Vec<String>>>;
    let got: Got = Default::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|State(got): State<Got>, headers: HeaderMap| async move {
                let event = headers
                    .get("x-tether-event")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if let Ok(mut got) = got.lock() {
                    got.push(event);
                }
                StatusCode::NO_CONTENT
            }),
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

async fn audit_actions(cp: &ControlPlane) -> Vec<String> {
    let (status, body) = call(
        cp,
        &cp.admin_token(),
        Method::GET,
        "/api/v1/audit-log?limit=500",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .expect("audit entries")
        .iter()
        .filter_map(|e| e["action"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_the_policy_catches_runs_only_after_another_token_approves_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let admin = cp.admin_token();
    let root = root_id(&cp).await;
    let (events, hook) = webhook_receiver().await;
    let (status, body) = call(
        &cp,
        &admin,
        Method::POST,
        "/api/v1/webhooks",
        Some(json!({ "url": hook, "events": ["infrastructure.approval.*"], "secret": "whsec-governance-1" })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    set_root_policy(&cp, json!({ "require": "always" })).await;
    // The requester may approve in general, but not its own request.
    let (requester_id, requester) = cp
        .create_token(
            &admin,
            &root,
            &[
                "infrastructure:provision",
                "infrastructure:approve",
                "servers:read",
            ],
        )
        .await
        .expect("requester token");
    let (_, approver) = cp
        .create_token(&admin, &root, &["infrastructure:approve", "servers:read"])
        .await
        .expect("approver token");

    let (status, accepted) = provision(&cp, &requester, local_request("approved-1")).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "pending_approval");
    assert_eq!(
        accepted["cost_estimate"],
        json!({ "hourly_usd": 0.0, "monthly_usd": 0.0 })
    );
    let id = accepted["deployment_id"].as_str().expect("id").to_string();

    // Nothing runs while it waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = deployment(&cp, &id).await;
    assert_eq!(waiting["status"], "pending_approval", "{waiting:#}");
    assert_eq!(waiting["steps"], json!([]));
    assert_eq!(
        waiting["approval"]["requested_by_token"],
        requester_id.as_str()
    );
    assert!(
        !workdir(&cp, &id).exists(),
        "no terraform working dir before approval"
    );
    assert_eq!(agents_of(&cp, &id), 0);

    let path = format!("/api/v1/infrastructure/deployments/{id}/approve");
    let (status, refused) = call(&cp, &requester, Method::POST, &path, Some(json!({}))).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"], "forbidden");
    assert_eq!(refused["reason"], "approver_is_requester");
    let (status, approved) = call(
        &cp,
        &approver,
        Method::POST,
        &path,
        Some(json!({ "comment": "within budget" })),
    )
    .await;
    assert_eq!(status, 200, "{approved}");
    assert_ne!(approved["status"], "pending_approval", "queued: {approved}");
    assert_eq!(approved["approval"]["decision"], "approved");
    assert_eq!(approved["approval"]["comment"], "within budget");

    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    let server_id = done["server_id"].as_str().expect("server id");
    cp.wait_for_status(server_id, "online", Duration::from_secs(15))
        .await
        .expect("online");
    // A decision is final.
    let (status, again) = call(&cp, &approver, Method::POST, &path, None).await;
    assert_eq!(status, 409, "{again}");

    let actions = audit_actions(&cp).await;
    for action in [
        "organization.approval_policy.set",
        "infrastructure.provision",
        "infrastructure.approval.approve",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} not audited: {actions:?}"
        );
    }
    tether_tests::eventually(Duration::from_secs(20), "approval webhooks", || async {
        let got = events.lock().map(|g| g.clone()).unwrap_or_default();
        Ok(
            (got.contains(&"infrastructure.approval.requested".to_string())
                && got.contains(&"infrastructure.approval.approved".to_string()))
            .then_some(()),
        )
    })
    .await
    .expect("requested and approved delivered");
    destroy(&cp, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_provision_never_runs_terraform_and_starts_no_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let admin = cp.admin_token();
    let root = root_id(&cp).await;
    set_root_policy(&cp, json!({ "require": "never", "providers": ["local"] })).await;
    let (_, approver) = cp
        .create_token(&admin, &root, &["infrastructure:approve", "servers:read"])
        .await
        .expect("approver token");
    let (status, accepted) = provision(&cp, &admin, local_request("rejected-1")).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "pending_approval");
    let id = accepted["deployment_id"].as_str().expect("id").to_string();
    let (status, rejected) = call(
        &cp,
        &approver,
        Method::POST,
        &format!("/api/v1/infrastructure/deployments/{id}/reject"),
        Some(json!({ "comment": "not this one" })),
    )
    .await;
    assert_eq!(status, 200, "{rejected}");
    assert_eq!(rejected["status"], "rejected");
    assert!(rejected["approval"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("provider local")));

    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = deployment(&cp, &id).await;
    assert_eq!(after["status"], "rejected");
    assert_eq!(after["steps"], json!([]), "no step ever ran");
    assert!(after["server_id"].is_null());
    assert!(!workdir(&cp, &id).exists(), "terraform never ran");
    assert_eq!(agents_of(&cp, &id), 0, "no agent started");
    let (status, late) = call(
        &cp,
        &approver,
        Method::POST,
        &format!("/api/v1/infrastructure/deployments/{id}/approve"),
        None,
    )
    .await;
    assert_eq!(status, 409, "a rejected request cannot be approved: {late}");
    assert!(audit_actions(&cp)
        .await
        .iter()
        .any(|a| a == "infrastructure.approval.reject"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_past_the_budget_is_refused_and_one_above_the_policys_cost_waits_for_approval()
{
    let dir = tempfile::tempdir().expect("tempdir");
    // The local server at 0.01 USD/h: 7.30 USD a month.
    let catalog = local_catalog(dir.path(), 1, 0.01);
    let catalog = catalog.display().to_string();
    let cp = start(&dir.path().join("cp"), &["--catalog-dir", &catalog]).await;
    let admin = cp.admin_token();
    let root = root_id(&cp).await;
    set_root_quotas(&cp, json!({ "max_monthly_cost_usd": 20 })).await;
    set_root_policy(&cp, json!({ "require": "never", "above_monthly_usd": 8.0 })).await;

    // Two servers (14.60 USD) are above the policy's 8: they wait.
    let mut pair = local_request("pair");
    pair["count"] = json!(2);
    let (status, waiting) = provision(&cp, &admin, pair.clone()).await;
    assert_eq!(status, 202, "{waiting}");
    assert_eq!(waiting["status"], "pending_approval");
    assert_eq!(waiting["cost_estimate"]["monthly_usd"], 14.6);
    assert_eq!(waiting["cost_estimate"]["hourly_usd"], 0.02);

    // One (7.30 USD) runs at once and commits its cost.
    let (status, solo) = provision(&cp, &admin, local_request("solo")).await;
    assert_eq!(status, 202, "{solo}");
    assert_eq!(solo["status"], "pending");
    assert_eq!(
        solo["cost_estimate"],
        json!({ "hourly_usd": 0.01, "monthly_usd": 7.3 })
    );
    let solo_id = solo["deployment_id"].as_str().expect("id").to_string();
    let (_, org) = call(
        &cp,
        &admin,
        Method::GET,
        &format!("/api/v1/organizations/{root}"),
        None,
    )
    .await;
    assert_eq!(org["usage"]["committed_monthly_cost_usd"], 7.3, "{org}");
    assert_eq!(org["quotas"]["max_monthly_cost_usd"], 20);

    // 7.30 + 14.60 is past the 20 USD budget: refused, and nothing created.
    let (status, refused) = provision(&cp, &admin, pair).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"], "quota_exceeded");
    assert_eq!(refused["resource"], "max_monthly_cost_usd");
    assert_eq!(refused["limit"], 20);
    assert_eq!(refused["organization_id"], root.as_str());
    let (_, listed) = call(
        &cp,
        &admin,
        Method::GET,
        "/api/v1/infrastructure/deployments",
        None,
    )
    .await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(3), "{listed}");

    // Approving the waiting pair is checked again: the first fits (14.60),
    // the second would make 21.90.
    let (_, approver) = cp
        .create_token(&admin, &root, &["infrastructure:approve", "servers:read"])
        .await
        .expect("approver token");
    let ids: Vec<String> = waiting["deployment_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let (status, first) = call(
        &cp,
        &approver,
        Method::POST,
        &format!("/api/v1/infrastructure/deployments/{}/approve", ids[0]),
        None,
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = call(
        &cp,
        &approver,
        Method::POST,
        &format!("/api/v1/infrastructure/deployments/{}/approve", ids[1]),
        None,
    )
    .await;
    assert_eq!(status, 403, "{second}");
    assert_eq!(second["error"], "quota_exceeded");
    assert_eq!(second["resource"], "max_monthly_cost_usd");
    assert_eq!(deployment(&cp, &ids[1]).await["status"], "pending_approval");

    for id in [&solo_id, &ids[0]] {
        let done = wait_for(&cp, id, &["completed", "failed"]).await;
        assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    }
    // The cost report: lifetimes × price, labelled an estimate.
    let (status, report) = call(
        &cp,
        &admin,
        Method::GET,
        &format!("/api/v1/organizations/{root}/cost-report"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["estimate"], true);
    assert_eq!(report["currency"], "USD");
    let reported: Vec<&str> = report["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .filter_map(|d| d["server_name"].as_str())
        .collect();
    assert!(
        reported.contains(&"solo") && reported.contains(&"pair-1"),
        "{report:#}"
    );
    assert!(
        !reported.contains(&"pair-2"),
        "a request still waiting costs nothing: {report:#}"
    );
    assert!(report["total_usd"].as_f64().is_some_and(|t| t >= 0.0));
    for id in [&solo_id, &ids[0]] {
        destroy(&cp, id).await;
    }
    let (_, org) = call(
        &cp,
        &admin,
        Method::GET,
        &format!("/api/v1/organizations/{root}"),
        None,
    )
    .await;
    assert_eq!(org["usage"]["committed_monthly_cost_usd"], 0.0, "{org}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_over_the_cpu_quota_is_refused_from_catalog_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The catalog says a local server has 4 vCPUs (whatever this machine
    // reports as the agent's facts).
    let catalog = local_catalog(dir.path(), 4, 0.0);
    let catalog = catalog.display().to_string();
    let cp = start(&dir.path().join("cp"), &["--catalog-dir", &catalog]).await;
    let admin = cp.admin_token();
    let root = root_id(&cp).await;
    set_root_quotas(&cp, json!({ "max_cpu_cores": 6 })).await;
    let (status, first) = provision(&cp, &admin, local_request("cpu-1")).await;
    assert_eq!(status, 202, "{first}");
    let id = first["deployment_id"].as_str().expect("id").to_string();
    let (status, refused) = provision(&cp, &admin, local_request("cpu-2")).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"], "quota_exceeded");
    assert_eq!(refused["resource"], "max_cpu_cores");
    assert_eq!(refused["organization_id"], root.as_str());
    assert_eq!(
        (
            refused["limit"].as_i64(),
            refused["usage"].as_i64(),
            refused["requested"].as_i64()
        ),
        (Some(6), Some(4), Some(4))
    );
    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    assert_eq!(done["vcpus"], 4);
    // Still refused once the server runs: the catalog counts, not the facts.
    let (status, refused) = provision(&cp, &admin, local_request("cpu-3")).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["resource"], "max_cpu_cores");
    destroy(&cp, &id).await;
    let (status, fits) = provision(&cp, &admin, local_request("cpu-4")).await;
    assert_eq!(status, 202, "a destroyed server frees its cores: {fits}");
    let id = fits["deployment_id"].as_str().expect("id").to_string();
    wait_for(&cp, &id, &["completed", "failed"]).await;
    destroy(&cp, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_three_comes_online_and_a_batch_over_quota_is_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let admin = cp.admin_token();
    set_root_quotas(&cp, json!({ "max_servers": 4 })).await;
    let mut batch = local_request("fleet");
    batch["count"] = json!(3);
    let (status, accepted) = provision(&cp, &admin, batch).await;
    assert_eq!(status, 202, "{accepted}");
    let batch_id = accepted["batch_id"].as_str().expect("batch_id").to_string();
    let ids: Vec<String> = accepted["deployment_ids"]
        .as_array()
        .expect("deployment_ids")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        accepted["cost_estimate"],
        json!({ "hourly_usd": 0.0, "monthly_usd": 0.0 })
    );

    let (status, listed) = call(
        &cp,
        &admin,
        Method::GET,
        &format!("/api/v1/infrastructure/deployments?batch_id={batch_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|d| d["server_name"].as_str())
        .collect();
    assert_eq!(names, ["fleet-1", "fleet-2", "fleet-3"]);

    for id in &ids {
        let done = wait_for(&cp, id, &["completed", "failed"]).await;
        assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
        assert_eq!(done["batch_id"], batch_id.as_str());
        let server_id = done["server_id"].as_str().expect("server id");
        cp.wait_for_status(server_id, "online", Duration::from_secs(15))
            .await
            .expect("online");
    }

    // Two more would make five of four: neither is created.
    let mut over = local_request("extra");
    over["count"] = json!(2);
    let (status, refused) = provision(&cp, &admin, over).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"], "quota_exceeded");
    assert_eq!(refused["resource"], "max_servers");
    assert_eq!(refused["requested"], 2);
    let (_, all) = call(
        &cp,
        &admin,
        Method::GET,
        "/api/v1/infrastructure/deployments",
        None,
    )
    .await;
    assert_eq!(all["data"].as_array().map(Vec::len), Some(3), "{all}");
    let (status, too_many) = provision(
        &cp,
        &admin,
        json!({
            "provider": "local", "region": "local", "instance_type": "process",
            "server_name": "big", "count": 21,
        }),
    )
    .await;
    assert_eq!(status, 422, "{too_many}");
    for id in &ids {
        destroy(&cp, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_instance_type_is_refused_with_the_nearest_matches_and_the_catalog_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let admin = cp.admin_token();
    let (status, all) = call(
        &cp,
        &admin,
        Method::GET,
        "/api/v1/infrastructure/catalog",
        None,
    )
    .await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["hours_per_month"], 730.0);
    for provider in [
        "aws",
        "gcp",
        "azure",
        "hetzner",
        "digitalocean",
        "local",
        "docker",
    ] {
        let p = &all["providers"][provider];
        assert!(
            p["source"].as_str().is_some_and(|s| !s.is_empty()),
            "{provider}: {p}"
        );
        assert!(
            p["as_of"].as_str().is_some_and(|s| s.len() == 10),
            "{provider}: {p}"
        );
        assert!(p["instance_types"]
            .as_array()
            .is_some_and(|t| !t.is_empty()));
    }
    let (status, aws) = call(
        &cp,
        &admin,
        Method::GET,
        "/api/v1/infrastructure/catalog?provider=aws",
        None,
    )
    .await;
    assert_eq!(status, 200, "{aws}");
    assert_eq!(aws["providers"].as_object().map(|p| p.len()), Some(1));
    let micro = aws["providers"]["aws"]["instance_types"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "t3.micro"))
        .cloned()
        .expect("t3.micro listed");
    assert_eq!(micro["vcpus"], 2);
    assert!(micro["hourly_usd"].as_f64().is_some_and(|p| p > 0.0));
    let (status, _) = call(
        &cp,
        &admin,
        Method::GET,
        "/api/v1/infrastructure/catalog?provider=nimbus",
        None,
    )
    .await;
    assert_eq!(status, 422);
    // A token without servers:read does not read it.
    let root = root_id(&cp).await;
    let (_, approver_only) = cp
        .create_token(&admin, &root, &["infrastructure:approve"])
        .await
        .expect("token");
    let (status, _) = call(
        &cp,
        &approver_only,
        Method::GET,
        "/api/v1/infrastructure/catalog",
        None,
    )
    .await;
    assert_eq!(status, 403);

    let mut typo = local_request("typo");
    typo["instance_type"] = json!("proces");
    let (status, refused) = provision(&cp, &admin, typo).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"], "validation_error");
    assert_eq!(refused["reason"], "unknown_instance_type");
    assert_eq!(refused["nearest"], json!(["process"]));
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("nearest: process")),
        "{refused}"
    );
    let mut region = local_request("region");
    region["region"] = json!("locale");
    let (status, refused) = provision(&cp, &admin, region).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["reason"], "unknown_region");
    assert_eq!(refused["nearest"], json!(["local"]));
    let (_, listed) = call(
        &cp,
        &admin,
        Method::GET,
        "/api/v1/infrastructure/deployments",
        None,
    )
    .await;
    assert_eq!(listed["data"], json!([]), "nothing was queued");

    // A malformed override stops the start, naming the file.
    let bad = dir.path().join("bad-catalog");
    std::fs::create_dir_all(&bad).expect("dir");
    std::fs::write(
        bad.join("aws.toml"),
        "source = \"x\"\nas_of = \"yesterday\"\n",
    )
    .expect("write");
    let bad = bad.display().to_string();
    let failed = ControlPlane::start(&dir.path().join("cp2"), &["--catalog-dir", &bad]).await;
    let error = failed
        .err()
        .expect("a malformed catalog stops the start")
        .to_string();
    assert!(error.contains("aws.toml"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_decides_expires_after_the_approval_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &["--approval-ttl", "2s"]).await;
    let admin = cp.admin_token();
    let root = root_id(&cp).await;
    set_root_policy(&cp, json!({ "require": "always" })).await;
    let (status, accepted) = provision(&cp, &admin, local_request("late-1")).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "pending_approval");
    let id = accepted["deployment_id"].as_str().expect("id").to_string();
    let expired = wait_for(&cp, &id, &["expired"]).await;
    assert_eq!(expired["approval"]["decision"], "expired");
    assert_eq!(expired["steps"], json!([]));
    assert!(!workdir(&cp, &id).exists(), "terraform never ran");
    let (_, approver) = cp
        .create_token(&admin, &root, &["infrastructure:approve", "servers:read"])
        .await
        .expect("approver token");
    let (status, late) = call(
        &cp,
        &approver,
        Method::POST,
        &format!("/api/v1/infrastructure/deployments/{id}/approve"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{late}");
    assert!(audit_actions(&cp)
        .await
        .iter()
        .any(|a| a == "infrastructure.approval.expire"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_policy_is_inherited_and_set_by_the_parent_or_by_the_root_for_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let admin = cp.admin_token();
    let root = root_id(&cp).await;
    let team = cp
        .create_organization(&admin, json!({ "name": "team" }))
        .await
        .expect("team");
    let team = team["id"].as_str().expect("id").to_string();
    let policy_path = |org: &str| format!("/api/v1/organizations/{org}/approval-policy");

    set_root_policy(&cp, json!({ "require": "always" })).await;
    let (status, inherited) = call(&cp, &admin, Method::GET, &policy_path(&team), None).await;
    assert_eq!(status, 200, "{inherited}");
    assert!(inherited["policy"].is_null());
    assert_eq!(inherited["effective"]["require"], "always");
    assert_eq!(inherited["effective_from"], root.as_str());

    // The team's own admin cannot loosen its own policy; its parent can.
    let (_, team_admin) = cp
        .create_token(&admin, &team, &["admin"])
        .await
        .expect("team admin");
    let (status, refused) = call(
        &cp,
        &team_admin,
        Method::PUT,
        &policy_path(&team),
        Some(json!({ "require": "never" })),
    )
    .await;
    assert_eq!(status, 403, "{refused}");
    let (status, own) = call(
        &cp,
        &admin,
        Method::PUT,
        &policy_path(&team),
        Some(json!({ "require": "never", "regions": ["fsn1"] })),
    )
    .await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(own["effective_from"], team.as_str());
    assert_eq!(own["effective"]["regions"], json!(["fsn1"]));
    // A token that may read but not administer cannot set it.
    let (_, reader) = cp
        .create_token(&admin, &root, &["servers:read"])
        .await
        .expect("reader");
    let (status, _) = call(
        &cp,
        &reader,
        Method::PUT,
        &policy_path(&team),
        Some(json!({ "require": "always" })),
    )
    .await;
    assert_eq!(status, 403);
    for invalid in [
        json!({ "require": "sometimes" }),
        json!({ "require": "never", "above_monthly_usd": -1.0 }),
        json!({ "require": "never", "providers": ["nimbus"] }),
        json!({ "require": "never", "unknown": true }),
    ] {
        let (status, body) = call(
            &cp,
            &admin,
            Method::PUT,
            &policy_path(&team),
            Some(invalid.clone()),
        )
        .await;
        assert_eq!(status, 422, "{invalid}: {body}");
    }
    // The team's admin sees it but not its siblings' (none) or the root's
    // settings beyond its tree.
    let (status, _) = call(&cp, &team_admin, Method::GET, &policy_path(&root), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_sub_organizations_token_cannot_decide_restore_rotate_or_read_the_costs_of_anothers_deployments(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let admin = cp.admin_token();
    let root = root_id(&cp).await;
    set_root_policy(&cp, json!({ "require": "always" })).await;
    // The root's request waits for approval; the root's credential exists.
    let (status, waiting) = call(
        &cp,
        &admin,
        Method::POST,
        "/api/v1/infrastructure/provision",
        Some(local_request("root-web")),
    )
    .await;
    assert_eq!(status, 202, "{waiting}");
    assert_eq!(waiting["status"], "pending_approval");
    let deployment = waiting["deployment_id"].as_str().expect("id").to_string();
    let (status, credential) = call(
        &cp,
        &admin,
        Method::POST,
        "/api/v1/cloud-providers",
        Some(json!({ "name": "root-hcloud", "provider": "hetzner", "credentials": { "token": "root-secret" } })),
    )
    .await;
    assert_eq!(status, 201, "{credential}");
    let credential = credential["id"].as_str().expect("id").to_string();

    // A team with every scope over its own subtree.
    let team = cp
        .create_organization(&admin, json!({ "name": "team" }))
        .await
        .expect("team");
    let team = team["id"].as_str().expect("id").to_string();
    let (_, intruder) = cp
        .create_token(
            &admin,
            &team,
            &[
                "admin",
                "servers:read",
                "infrastructure:provision",
                "infrastructure:destroy",
                "infrastructure:approve",
            ],
        )
        .await
        .expect("team token");

    let attempts = [
        (
            Method::POST,
            format!("/api/v1/infrastructure/deployments/{deployment}/approve"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/api/v1/infrastructure/deployments/{deployment}/reject"),
            Some(json!({})),
        ),
        (
            Method::GET,
            format!("/api/v1/infrastructure/deployments/{deployment}/state/versions"),
            None,
        ),
        (
            Method::POST,
            format!("/api/v1/infrastructure/deployments/{deployment}/state/versions/1/restore"),
            None,
        ),
        (
            Method::PATCH,
            format!("/api/v1/cloud-providers/{credential}"),
            Some(json!({ "credentials": { "token": "stolen" } })),
        ),
        (
            Method::GET,
            format!("/api/v1/organizations/{root}/cost-report"),
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/organizations/{root}/approval-policy"),
            None,
        ),
        (
            Method::PUT,
            format!("/api/v1/organizations/{root}/approval-policy"),
            Some(json!({ "require": "never" })),
        ),
    ];
    for (method, path, body) in attempts {
        let (status, answer) = call(&cp, &intruder, method.clone(), &path, body).await;
        assert!(
            status == 404 || status == 403,
            "{method} {path} by another organization's token: {status} {answer}"
        );
    }

    // Nothing moved: the request still waits, the policy still holds, the
    // credential was not rotated.
    let (_, still) = call(
        &cp,
        &admin,
        Method::GET,
        &format!("/api/v1/infrastructure/deployments/{deployment}"),
        None,
    )
    .await;
    assert_eq!(still["status"], "pending_approval", "{still}");
    assert!(still["approval"]["decision"].is_null(), "{still}");
    let (_, policy) = call(
        &cp,
        &admin,
        Method::GET,
        &format!("/api/v1/organizations/{root}/approval-policy"),
        None,
    )
    .await;
    assert_eq!(policy["policy"]["require"], "always", "{policy}");
    let (_, kept) = call(
        &cp,
        &admin,
        Method::GET,
        &format!("/api/v1/cloud-providers/{credential}"),
        None,
    )
    .await;
    assert!(
        kept["updated_at"].is_null() || kept["updated_at"] == kept["created_at"],
        "{kept}"
    );
    // Its batch listing is scoped too: the team sees none of the root's.
    let (status, listed) = call(
        &cp,
        &intruder,
        Method::GET,
        "/api/v1/infrastructure/deployments",
        None,
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    assert!(
        listed["data"].as_array().is_some_and(|d| d.is_empty()),
        "{listed}"
    );
}
