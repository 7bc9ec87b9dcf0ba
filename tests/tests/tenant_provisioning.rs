//! The tenant boundary of provisioning, attacked through the real API of a
//! real `tether serve` (docs/security.md, items 1 and 14):
//!
//! * the targets that run servers on the control-plane host (`local`,
//!   `docker`) are off unless the operator passes `--enable-host-targets`,
//!   and once on only the root organization may use them, for itself;
//! * `terraform_variables` that name host paths, images, networks or
//!   binaries (`local_root`, `container_image`, `docker_network`,
//!   `busybox_path`, ...) are refused with a 422 naming the variable, and
//!   the directory an attacker pointed at stays as it was;
//! * a deployment uses only a cloud credential of its own organization: an
//!   ancestor's or a descendant's is refused with a 422 saying whose it is,
//!   and a credential of its own organization passes the job's check too.
//!
//! Each refusal is checked for its status and typed body, and for what it
//! left alone: no deployment, no working directory, no agent process, the
//! canary files, the credential, a control plane still serving.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::ControlPlane;

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

async fn provision(cp: &ControlPlane, token: &str, body: &Value) -> (u16, Value) {
    let response = cp
        .call(
            token,
            Method::POST,
            "/api/v1/infrastructure/provision",
            Some(body),
        )
        .await
        .expect("provision call");
    (response.status.as_u16(), response.body)
}

fn request(provider: &str, name: &str) -> Value {
    json!({
        "provider": provider,
        "region": "local",
        "instance_type": "process",
        "server_name": name,
    })
}

/// Deployments the admin sees.
async fn deployments(cp: &ControlPlane) -> Vec<Value> {
    let response = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/infrastructure/deployments",
            None,
        )
        .await
        .expect("list deployments");
    assert_eq!(response.status, 200, "{}", response.body);
    response.body["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
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
            found.push(cmdline);
        }
    }
    found
}

/// Asserts the control plane made nothing: no deployment, no working
/// directory, no server, no agent process or container of `names`, and that
/// it still answers.
async fn assert_nothing_provisioned(cp: &ControlPlane, names: &[&str]) {
    assert_eq!(deployments(cp).await, Vec::<Value>::new(), "deployments");
    let workdirs = std::fs::read_dir(cp.data_dir.join("deployments"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(workdirs, 0, "a deployment working directory was made");
    assert!(cp.servers("").await.expect("servers").is_empty());
    let agents: Vec<String> = processes_mentioning(&cp.data_dir.display().to_string())
        .into_iter()
        .filter(|c| c.contains("tether-agent"))
        .collect();
    assert!(agents.is_empty(), "agents on the host: {agents:?}");
    for name in names {
        assert!(
            processes_mentioning(&format!("tether-{name}")).is_empty(),
            "a process for {name}"
        );
    }
    let health = cp
        .anonymous(Method::GET, "/health")
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200, "the control plane still serves");
}

/// A directory with a canary file, as an attacker's `local_root` target.
struct Canary {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

const CANARY_TEXT: &str = "the operator's file, not the tenant's\n";

impl Canary {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("precious");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(root.join("canary.txt"), CANARY_TEXT).expect("canary");
        Self { _dir: dir, root }
    }

    fn assert_untouched(&self) {
        let entries: Vec<String> = std::fs::read_dir(&self.root)
            .expect("the directory is still there")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(entries, ["canary.txt"], "files of {}", self.root.display());
        assert_eq!(
            std::fs::read_to_string(self.root.join("canary.txt")).expect("canary"),
            CANARY_TEXT
        );
    }
}

fn assert_refused(status: u16, body: &Value, expected: u16, error: &str, reason: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
}

/// The deployment once it is `completed` or `failed` (panics after `within`).
async fn settled_deployment(cp: &ControlPlane, token: &str, id: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let d = cp
            .call(
                token,
                Method::GET,
                &format!("/api/v1/infrastructure/deployments/{id}"),
                None,
            )
            .await
            .expect("deployment")
            .body;
        if matches!(d["status"].as_str(), Some("completed" | "failed")) {
            return d;
        }
        assert!(started.elapsed() < within, "not settled: {d:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enable_host_targets_local_and_docker_are_refused_and_nothing_is_created() {
    terraform_is_installed();
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start_without_host_targets(dir.path(), &[])
        .await
        .expect("control plane starts");
    let canary = Canary::new();
    let admin = cp.admin_token();
    for provider in ["local", "docker"] {
        let (status, body) = provision(&cp, &admin, &request(provider, "off-1")).await;
        assert_refused(status, &body, 403, "forbidden", "host_targets_disabled");
        assert_eq!(body["provider"], provider, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("--enable-host-targets"),
            "{body}"
        );
        // Even the root organization, with a host path: off is off.
        let mut attack = request(provider, "off-2");
        attack["terraform_variables"] = json!({ "local_root": canary.root });
        let (status, body) = provision(&cp, &admin, &attack).await;
        assert_refused(status, &body, 403, "forbidden", "host_targets_disabled");
    }
    assert_nothing_provisioned(&cp, &["off-1", "off-2"]).await;
    canary.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_host_targets_on_only_the_root_organization_may_use_them_for_itself() {
    terraform_is_installed();
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[])
        .await
        .expect("control plane starts");
    let canary = Canary::new();
    let admin = cp.admin_token();
    let team = cp
        .create_organization(&admin, json!({ "name": "tenant" }))
        .await
        .expect("organization");
    let team_id = team["id"].as_str().expect("id").to_string();
    let (_, tenant) = cp
        .create_token(
            &admin,
            &team_id,
            &[
                "infrastructure:provision",
                "servers:read",
                "commands:run",
                "admin",
            ],
        )
        .await
        .expect("tenant token");
    for provider in ["local", "docker"] {
        // The reported attack: a tenant's local server rooted where it likes.
        let mut attack = request(provider, "tenant-1");
        attack["terraform_variables"] = json!({ "local_root": canary.root });
        let (status, body) = provision(&cp, &tenant, &attack).await;
        assert_refused(status, &body, 403, "forbidden", "host_targets_root_only");
        let (status, body) = provision(&cp, &tenant, &request(provider, "tenant-2")).await;
        assert_refused(status, &body, 403, "forbidden", "host_targets_root_only");
        // The root organization may not place one in a tenant either: the
        // tenant's commands:run would then reach this host.
        let mut for_tenant = request(provider, "tenant-3");
        for_tenant["organization_id"] = json!(team_id);
        let (status, body) = provision(&cp, &admin, &for_tenant).await;
        assert_refused(status, &body, 403, "forbidden", "host_targets_root_only");
    }
    assert_nothing_provisioned(&cp, &["tenant-1", "tenant-2", "tenant-3"]).await;
    canary.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_images_networks_and_binaries_are_refused_naming_the_variable() {
    terraform_is_installed();
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &[])
        .await
        .expect("control plane starts");
    let canary = Canary::new();
    let admin = cp.admin_token();
    let root = canary.root.display().to_string();
    let cases = [
        ("local", "local_root", json!(root)),
        ("docker", "container_image", json!("attacker/image:latest")),
        ("docker", "docker_network", json!("host")),
        (
            "docker",
            "busybox_path",
            json!(format!("{root}/canary.txt")),
        ),
        ("docker", "docker_subnet", json!("10.0.0.0/8")),
        ("docker", "container_ip", json!("172.31.250.1")),
        ("local", "image", json!("anything")),
        ("local", "no_such_input", json!(1)),
        ("aws", "busybox_path", json!("/bin/sh")),
    ];
    for (provider, variable, value) in cases {
        let mut attack = request(provider, "vars-1");
        if provider == "aws" {
            // Refused before any credential is looked at.
            attack["cloud_provider_credential_id"] = json!(uuid_like());
        }
        attack["terraform_variables"] = json!({ variable: value });
        let (status, body) = provision(&cp, &admin, &attack).await;
        assert_refused(
            status,
            &body,
            422,
            "validation_error",
            "variable_not_settable",
        );
        assert_eq!(body["variable"], variable, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains(variable),
            "{body}"
        );
    }
    // A variable the target does let callers set passes validation (the
    // deployment is queued), so the refusals above are about the names.
    let mut allowed = request("local", "vars-ok");
    allowed["terraform_variables"] = json!({ "stop_timeout_seconds": 2 });
    let (status, body) = provision(&cp, &admin, &allowed).await;
    assert_eq!(status, 202, "{body}");
    let id = body["deployment_id"].as_str().expect("id").to_string();
    let done = settled_deployment(&cp, &admin, &id, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    let destroy = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/infrastructure/deployments/{id}"),
            None,
        )
        .await
        .expect("destroy");
    assert_eq!(destroy.status, 202, "{}", destroy.body);
    let started = Instant::now();
    loop {
        let d = cp
            .call(
                &admin,
                Method::GET,
                &format!("/api/v1/infrastructure/deployments/{id}"),
                None,
            )
            .await
            .expect("deployment")
            .body;
        if matches!(d["status"].as_str(), Some("destroyed" | "failed")) {
            assert_eq!(d["status"], "destroyed", "{d:#}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not destroyed: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Only the one allowed deployment was ever queued.
    let all = deployments(&cp).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["server_name"], "vars-ok");
    canary.assert_untouched();
}

fn uuid_like() -> String {
    "00000000-0000-7000-8000-000000000001".into()
}

async fn create_credential(cp: &ControlPlane, organization_id: &str, name: &str) -> String {
    let created = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            "/api/v1/cloud-providers",
            Some(&json!({
                "name": name,
                "provider": "hetzner",
                "credentials": { "token": format!("hcloud-{name}-0123456789abcdef") },
                "organization_id": organization_id,
            })),
        )
        .await
        .expect("create credential");
    assert_eq!(created.status, 201, "{}", created.body);
    created.body["id"].as_str().expect("id").to_string()
}

async fn credentials(cp: &ControlPlane) -> Vec<Value> {
    let listed = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/cloud-providers",
            None,
        )
        .await
        .expect("list credentials");
    assert_eq!(listed.status, 200, "{}", listed.body);
    listed.body["data"].as_array().cloned().unwrap_or_default()
}

fn hetzner(name: &str, credential: &str, organization: &str) -> Value {
    json!({
        "provider": "hetzner",
        "region": "fsn1",
        "instance_type": "cx22",
        "server_name": name,
        "cloud_provider_credential_id": credential,
        "organization_id": organization,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_uses_only_a_credential_of_its_own_organization() {
    terraform_is_installed();
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path(), &["--registration-timeout", "30s"])
        .await
        .expect("control plane starts");
    let admin = cp.admin_token();
    let root_id = cp
        .call(&admin, Method::GET, "/api/v1/organizations", None)
        .await
        .expect("organizations")
        .body["data"]
        .as_array()
        .and_then(|orgs| orgs.iter().find(|o| o["parent_id"].is_null()))
        .and_then(|o| o["id"].as_str())
        .expect("root organization")
        .to_string();
    let team = cp
        .create_organization(&admin, json!({ "name": "child" }))
        .await
        .expect("organization");
    let team_id = team["id"].as_str().expect("id").to_string();
    let parents = create_credential(&cp, &root_id, "parents").await;
    let childs = create_credential(&cp, &team_id, "childs").await;
    let before = credentials(&cp).await;

    // An ancestor's credential for a child's deployment.
    let (status, body) = provision(&cp, &admin, &hetzner("child-1", &parents, &team_id)).await;
    assert_refused(
        status,
        &body,
        422,
        "validation_error",
        "credential_of_another_organization",
    );
    assert_eq!(body["credential_organization_id"], root_id.as_str());
    assert_eq!(
        body["message"],
        format!(
            "the cloud credential {parents} belongs to organization {root_id}, not to the \
             deployment's organization {team_id}: a deployment uses only a credential of its \
             own organization"
        )
    );
    // A descendant's credential for the parent's deployment.
    let (status, body) = provision(&cp, &admin, &hetzner("root-1", &childs, &root_id)).await;
    assert_refused(
        status,
        &body,
        422,
        "validation_error",
        "credential_of_another_organization",
    );
    assert_eq!(body["credential_organization_id"], team_id.as_str());
    // The child's own token cannot even see the parent's credential.
    let (_, tenant) = cp
        .create_token(
            &admin,
            &team_id,
            &["infrastructure:provision", "servers:read"],
        )
        .await
        .expect("tenant token");
    let mut from_tenant = hetzner("child-2", &parents, &team_id);
    from_tenant
        .as_object_mut()
        .expect("object")
        .remove("organization_id");
    let (status, body) = provision(&cp, &tenant, &from_tenant).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    assert_eq!(deployments(&cp).await, Vec::<Value>::new());
    // Both credentials are as they were: still there, never used.
    assert_eq!(credentials(&cp).await, before);

    // The child's own credential passes, and the job agrees: whatever
    // terraform then makes of the fake token, the credential rule is not
    // what fails it.
    let (status, body) = provision(&cp, &admin, &hetzner("child-3", &childs, &team_id)).await;
    assert_eq!(status, 202, "{body}");
    let id = body["deployment_id"].as_str().expect("id").to_string();
    let settled = settled_deployment(&cp, &admin, &id, Duration::from_secs(180)).await;
    let error = settled["error_message"].as_str().unwrap_or_default();
    assert!(
        !error.contains("cloud credential"),
        "the job refused the credential the API accepted: {settled:#}"
    );
    assert!(
        settled["steps"]
            .as_array()
            .is_some_and(|steps| steps.iter().any(|s| s["name"] == "init")),
        "terraform ran with the credential: {settled:#}"
    );
}
