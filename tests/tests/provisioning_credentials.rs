//! The credential lifecycle, Terraform state versions and the destroy body,
//! end to end with the real `terraform` binary (issue 20):
//!
//! * a credential that deployments which are not destroyed use refuses
//!   `DELETE` with 409 `credential_in_use` listing them, and `force=true`
//!   deletes it, at the cost the docs state: a later destroy of a deployment
//!   with resources ends `failed` listing them, and the server keeps
//!   running;
//! * `PATCH` rotates a credential's fields and the next terraform run gets
//!   the new value. What terraform's environment received is observed by
//!   the operator's own `--terraform-bin`: a wrapper that records, per run,
//!   the deployment, the command and the SHA-256 of `HCLOUD_TOKEN` (never
//!   the value), then runs the real terraform. Hetzner deployments are used
//!   because they carry a credential; their `terraform init` fails here
//!   (no provider can be downloaded), after terraform started with the
//!   credential in its environment;
//! * every state terraform writes is a version: listed after a provision,
//!   and a restored version becomes the current state (checksum) that the
//!   next run (the destroy) works from; a rolled-back deployment's apply
//!   state, restored, is what its destroy then removes with terraform; none
//!   is restored into a destroyed deployment;
//! * a destroy with `{"delete_server_data": true}` is accepted and, once
//!   destroyed, the server's metrics are gone from the database, while a
//!   destroy without it keeps them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use sha2::Digest;
use tether_tests::{eventually, ControlPlane};

const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);
const TOKEN_BEFORE: &str = "hcloud-token-before-rotation-7f3a9c01d2e4";
const TOKEN_AFTER: &str = "hcloud-token-after-rotation-b85e1f44a6c9";

fn real_terraform() -> PathBuf {
    let output = std::process::Command::new("sh")
        .args(["-c", "command -v terraform"])
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success() && !path.is_empty(),
        "the terraform binary is required (PATH); these tests never skip"
    );
    PathBuf::from(path)
}

/// An operator's `--terraform-bin`: records `<deployment> <command>
/// <sha256 of HCLOUD_TOKEN>` for each run that has the variable, then runs
/// the real terraform.
fn recording_terraform(dir: &Path) -> (PathBuf, PathBuf) {
    let record = dir.join("terraform-runs.txt");
    let wrapper = dir.join("terraform-wrapper.sh");
    let script = format!(
        "#!/bin/sh\n\
         if [ -n \"$HCLOUD_TOKEN\" ]; then\n\
           hash=$(printf '%s' \"$HCLOUD_TOKEN\" | sha256sum | cut -d' ' -f1)\n\
           printf '%s %s %s\\n' \"$(basename \"$PWD\")\" \"$1\" \"$hash\" >> '{record}'\n\
         fi\n\
         exec '{terraform}' \"$@\"\n",
        record = record.display(),
        terraform = real_terraform().display(),
    );
    std::fs::write(&wrapper, script).expect("write wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (wrapper, record)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// (deployment id, command, token hash) of every recorded terraform run.
fn recorded_runs(record: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            Some((
                parts.next()?.to_string(),
                parts.next()?.to_string(),
                parts.next()?.to_string(),
            ))
        })
        .collect()
}

async fn start(dir: &Path, extra: &[&str]) -> ControlPlane {
    real_terraform();
    let mut args = vec!["--metrics-interval", "1s", "--registration-timeout", "60s"];
    args.extend_from_slice(extra);
    ControlPlane::start(dir, &args)
        .await
        .expect("control plane starts")
}

async fn call(cp: &ControlPlane, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let response = match cp
        .call(&cp.admin_token(), method.clone(), path, body.as_ref())
        .await
    {
        Ok(response) => response,
        Err(e) => panic!("{method} {path}: {e:#}\n--- log ---\n{}", cp.log()),
    };
    (response.status.as_u16(), response.body)
}

async fn create_credential(cp: &ControlPlane, token: &str) -> String {
    let (status, body) = call(
        cp,
        Method::POST,
        "/api/v1/cloud-providers",
        Some(json!({
            "name": "hetzner-main",
            "provider": "hetzner",
            "credentials": { "token": token },
        })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["validation_status"], "unvalidated", "{body}");
    body["id"].as_str().expect("credential id").to_string()
}

async fn credential(cp: &ControlPlane, id: &str) -> Option<Value> {
    let (status, body) = call(cp, Method::GET, "/api/v1/cloud-providers", None).await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
}

async fn provision(cp: &ControlPlane, body: Value) -> String {
    let (status, accepted) = call(
        cp,
        Method::POST,
        "/api/v1/infrastructure/provision",
        Some(body),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    accepted["deployment_id"]
        .as_str()
        .expect("deployment id")
        .to_string()
}

fn hetzner(name: &str, credential: &str) -> Value {
    json!({
        "provider": "hetzner",
        "region": "fsn1",
        "instance_type": "cx22",
        "server_name": name,
        "cloud_provider_credential_id": credential,
    })
}

fn local(name: &str) -> Value {
    json!({
        "provider": "local",
        "region": "local",
        "instance_type": "process",
        "server_name": name,
    })
}

async fn deployment(cp: &ControlPlane, id: &str) -> Value {
    let (status, body) = call(
        cp,
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
        if statuses.contains(&d["status"].as_str().unwrap_or_default()) {
            return d;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "deployment {id} still {} after {SETTLE_TIMEOUT:?}: {d:#}\n--- log ---\n{}",
            d["status"],
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn destroy(cp: &ControlPlane, id: &str, body: Option<Value>) -> (u16, Value) {
    call(
        cp,
        Method::DELETE,
        &format!("/api/v1/infrastructure/deployments/{id}"),
        body,
    )
    .await
}

async fn audit(cp: &ControlPlane, action: &str) -> Vec<Value> {
    let (status, body) = call(
        cp,
        Method::GET,
        &format!("/api/v1/audit-log?action={action}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().cloned().unwrap_or_default()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_credential_reaches_the_next_terraform_run_and_its_values_are_never_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wrapper, record) = recording_terraform(dir.path());
    let wrapper = wrapper.display().to_string();
    let cp = start(&dir.path().join("cp"), &["--terraform-bin", &wrapper]).await;
    let id = create_credential(&cp, TOKEN_BEFORE).await;

    // Validation is stored and shown.
    let (status, validated) = call(
        &cp,
        Method::POST,
        &format!("/api/v1/cloud-providers/{id}/validate"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{validated}");
    assert_eq!(validated["validation_status"], "valid", "{validated}");
    let shown = credential(&cp, &id).await.expect("listed");
    assert_eq!(shown["validation_status"], "valid", "{shown}");
    assert!(shown["validated_at"].is_string(), "{shown}");
    assert!(shown["validation_error"].is_null(), "{shown}");

    // A run with the first token.
    let first = provision(&cp, hetzner("web-1", &id)).await;
    let settled = wait_for(&cp, &first, &["failed"]).await;
    assert!(
        !settled["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("cloud credential"),
        "the credential was usable: {settled:#}"
    );

    // Rotation: checked like create, nothing to change is refused, and the
    // answer carries no value.
    for (body, what) in [
        (json!({ "credentials": { "tokn": "x" } }), "unknown field"),
        (json!({ "credentials": { "token": "" } }), "empty token"),
        (json!({}), "nothing to change"),
        (
            json!({ "credentials": { "token": "x" }, "provider": "aws" }),
            "unknown body field",
        ),
    ] {
        let (status, refused) = call(
            &cp,
            Method::PATCH,
            &format!("/api/v1/cloud-providers/{id}"),
            Some(body),
        )
        .await;
        assert_eq!(status, 422, "{what}: {refused}");
        assert_eq!(refused["error"], "validation_error", "{what}: {refused}");
    }
    let (status, rotated) = call(
        &cp,
        Method::PATCH,
        &format!("/api/v1/cloud-providers/{id}"),
        Some(json!({ "credentials": { "token": TOKEN_AFTER }, "name": "hetzner-rotated" })),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["id"], id.as_str());
    assert_eq!(rotated["name"], "hetzner-rotated");
    assert_eq!(
        rotated["validation_status"], "unvalidated",
        "new fields are not validated yet: {rotated}"
    );
    assert!(rotated["validated_at"].is_null(), "{rotated}");
    assert!(rotated["updated_at"].is_string(), "{rotated}");
    assert!(!rotated.to_string().contains(TOKEN_AFTER), "{rotated}");

    // The next run gets the new token.
    let second = provision(&cp, hetzner("web-2", &id)).await;
    wait_for(&cp, &second, &["failed"]).await;
    let runs = recorded_runs(&record);
    let hashes_of = |deployment: &str| -> Vec<String> {
        runs.iter()
            .filter(|(d, _, _)| d == deployment)
            .map(|(_, _, hash)| hash.clone())
            .collect()
    };
    let (before, after) = (sha256_hex(TOKEN_BEFORE), sha256_hex(TOKEN_AFTER));
    assert!(
        !hashes_of(&first).is_empty() && hashes_of(&first).iter().all(|h| *h == before),
        "the first run had the first token: {runs:?}"
    );
    assert!(
        !hashes_of(&second).is_empty() && hashes_of(&second).iter().all(|h| *h == after),
        "the run after the rotation had the new token: {runs:?}"
    );

    // The rotation is audited by field name, never by value.
    let entries = audit(&cp, "cloud_credential.update").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["target"], id.as_str());
    assert_eq!(entries[0]["detail"]["fields_changed"], json!(["token"]));
    // No value in a log line, an answer, or the database in clear.
    let log = cp.log();
    for token in [TOKEN_BEFORE, TOKEN_AFTER] {
        assert!(!log.contains(token), "a token in the control plane log");
        assert!(!entries[0].to_string().contains(token));
        assert!(!contains(&database_bytes(&cp), token), "a token in clear");
    }
    let shown = credential(&cp, &id).await.expect("listed");
    assert!(!shown.to_string().contains(TOKEN_AFTER), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_in_use_refuses_delete_with_409_listing_its_deployments_until_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let id = create_credential(&cp, TOKEN_BEFORE).await;
    let first = provision(&cp, hetzner("web-1", &id)).await;
    let second = provision(&cp, hetzner("web-2", &id)).await;
    wait_for(&cp, &first, &["failed"]).await;
    wait_for(&cp, &second, &["failed"]).await;
    assert_eq!(
        deployment(&cp, &first).await["cloud_provider_credential_id"],
        id.as_str()
    );

    // Both are not destroyed: both are listed.
    let (status, refused) = call(
        &cp,
        Method::DELETE,
        &format!("/api/v1/cloud-providers/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"], "credential_in_use", "{refused}");
    assert_eq!(
        refused["deployment_ids"],
        json!([first, second]),
        "{refused}"
    );
    assert_eq!(refused["deployment_count"], 2, "{refused}");
    assert!(credential(&cp, &id).await.is_some(), "refused: still there");

    // A destroyed deployment no longer holds it.
    let (status, body) = destroy(&cp, &first, None).await;
    assert_eq!(status, 202, "{body}");
    wait_for(&cp, &first, &["destroyed"]).await;
    let (status, refused) = call(
        &cp,
        Method::DELETE,
        &format!("/api/v1/cloud-providers/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["deployment_ids"], json!([second]), "{refused}");
    assert_eq!(refused["deployment_count"], 1, "{refused}");
    let (status, refused) = call(
        &cp,
        Method::DELETE,
        &format!("/api/v1/cloud-providers/{id}?force=maybe"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(credential(&cp, &id).await.is_some(), "refused: still there");

    // Forced: deleted, and the audit entry names the orphaned deployment.
    let (status, body) = call(
        &cp,
        Method::DELETE,
        &format!("/api/v1/cloud-providers/{id}?force=true"),
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert!(credential(&cp, &id).await.is_none(), "deleted");
    let entries = audit(&cp, "cloud_credential.delete").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["detail"]["force"], true);
    assert_eq!(
        entries[0]["detail"]["orphaned_deployment_ids"],
        json!([second])
    );
    // The orphan made nothing (its init failed), so it is still destroyed.
    let (status, body) = destroy(&cp, &second, None).await;
    assert_eq!(status, 202, "{body}");
    wait_for(&cp, &second, &["destroyed"]).await;
}

async fn state_versions(cp: &ControlPlane, id: &str) -> Vec<Value> {
    let (status, body) = call(
        cp,
        Method::GET,
        &format!("/api/v1/infrastructure/deployments/{id}/state/versions"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().cloned().expect("data")
}

/// Raw metrics rows of a server in the SQLite database, read directly (the
/// API hides removed servers).
async fn metrics_rows(cp: &ControlPlane, server_id: &str) -> usize {
    let url = format!("sqlite://{}", cp.data_dir.join("tether.db").display());
    let store = tether_control_plane::store::open(&url)
        .await
        .expect("open the database");
    let id = uuid::Uuid::parse_str(server_id).expect("uuid");
    let from = chrono::Utc::now() - chrono::Duration::days(1);
    let to = chrono::Utc::now() + chrono::Duration::days(1);
    store
        .metrics_points(id, from, to, 10_000)
        .await
        .expect("metrics points")
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_versions_are_listed_a_restored_one_becomes_current_and_delete_server_data_removes_metrics(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    let kept = provision(&cp, local("keeps-data")).await;
    let purged = provision(&cp, local("purges-data")).await;
    let mut servers = Vec::new();
    for id in [&kept, &purged] {
        let done = wait_for(&cp, id, &["completed", "failed"]).await;
        assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
        let server_id = done["server_id"].as_str().expect("server").to_string();
        eventually(Duration::from_secs(20), "metrics points", || async {
            let points = tether_tests::raw_points(&cp, &server_id, "2000-01-01T00:00:00Z").await?;
            Ok((points.len() >= 2).then_some(()))
        })
        .await
        .expect("metrics flow");
        servers.push(server_id);
    }

    // Versions: each with checksum, size and serial, never the content.
    let versions = state_versions(&cp, &purged).await;
    assert!(!versions.is_empty(), "the apply wrote the state");
    for v in &versions {
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "created_at",
                "restored_from",
                "serial",
                "sha256",
                "size_bytes",
                "version"
            ],
            "{v}"
        );
        assert_eq!(v["sha256"].as_str().map(str::len), Some(64), "{v}");
        assert!(v["size_bytes"].as_i64().is_some_and(|n| n > 0), "{v}");
        assert!(v["serial"].as_i64().is_some(), "{v}");
    }
    let d = deployment(&cp, &purged).await;
    assert_eq!(d["state_version"], versions[0], "{d:#}");
    let db = database_bytes(&cp);
    assert!(
        !contains(&db, "\"lineage\""),
        "no state version in clear in the database"
    );

    // Restore the oldest kept version: it becomes the current state, as a
    // new version.
    let oldest = versions.last().expect("a version").clone();
    let (status, restored) = call(
        &cp,
        Method::POST,
        &format!(
            "/api/v1/infrastructure/deployments/{purged}/state/versions/{}/restore",
            oldest["version"]
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["restored_from"], oldest["version"], "{restored}");
    assert_eq!(restored["sha256"], oldest["sha256"], "{restored}");
    assert_eq!(
        restored["version"].as_i64(),
        versions[0]["version"].as_i64().map(|v| v + 1)
    );
    let d = deployment(&cp, &purged).await;
    assert!(d["state_present"].as_bool().expect("state_present"));
    assert_eq!(d["state_version"], restored, "{d:#}");
    assert_eq!(state_versions(&cp, &purged).await[0], restored);
    let (status, missing) = call(
        &cp,
        Method::POST,
        &format!("/api/v1/infrastructure/deployments/{purged}/state/versions/999/restore"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(audit(&cp, "infrastructure.state_restore").await.len(), 1);

    // Destroys: the body's delete_server_data is accepted; the restored state
    // drives the destroy (its agent stops).
    let (status, body) = destroy(&cp, &purged, Some(json!({ "delete_server_data": true }))).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delete_server_data"], true, "{body}");
    let (status, body) = destroy(&cp, &kept, Some(json!({ "force": false }))).await;
    assert_eq!(status, 202, "{body}");
    for id in [&kept, &purged] {
        let done = wait_for(&cp, id, &["destroyed", "failed"]).await;
        assert_eq!(done["status"], "destroyed", "{done:#}\n{}", cp.log());
    }
    let agents = std::process::Command::new("sh")
        .args(["-c", "ps -eo args"])
        .output()
        .expect("ps");
    let agents = String::from_utf8_lossy(&agents.stdout).to_string();
    let purged_root = cp.data_dir.join("deployments").join(&purged);
    assert!(
        !agents.contains(&purged_root.display().to_string()),
        "the agent of the restored deployment still runs"
    );

    // A destroyed deployment keeps its versions, but none is restored into it.
    let (status, refused) = call(
        &cp,
        Method::POST,
        &format!(
            "/api/v1/infrastructure/deployments/{purged}/state/versions/{}/restore",
            oldest["version"]
        ),
        None,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["status"], "destroyed", "{refused}");
    assert!(!state_versions(&cp, &purged).await.is_empty());

    // The purged server's metrics are gone; the other's stay.
    assert_eq!(metrics_rows(&cp, &servers[1]).await, 0, "purged");
    assert!(metrics_rows(&cp, &servers[0]).await >= 2, "kept");
    let (_, events) = call(
        &cp,
        Method::GET,
        &format!("/api/v1/infrastructure/deployments/{purged}"),
        None,
    )
    .await;
    assert_eq!(events["delete_server_data"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_state_version_is_what_the_next_destroy_removes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Agents are told a QUIC address nobody listens on: the server boots
    // (apply succeeds) but never enrolls, so the deployment rolls back.
    real_terraform();
    let cp = ControlPlane::start(
        dir.path(),
        &[
            "--metrics-interval",
            "1s",
            "--public-quic-addr",
            "127.0.0.1:9",
            "--registration-timeout",
            "3s",
        ],
    )
    .await
    .expect("control plane starts");
    let id = provision(&cp, local("never-enrolls")).await;
    let failed = wait_for(&cp, &id, &["failed"]).await;
    assert!(
        failed["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("never enrolled"),
        "{failed:#}"
    );
    assert!(!failed["state_present"].as_bool().expect("state_present"));

    // The apply's state (with the server) and the rollback's (empty) are kept.
    let versions = state_versions(&cp, &id).await;
    assert!(versions.len() >= 2, "{versions:#?}");
    let applied = versions.last().expect("oldest").clone();
    assert_ne!(applied["sha256"], versions[0]["sha256"], "{versions:#?}");
    assert!(
        applied["size_bytes"].as_i64() > versions[0]["size_bytes"].as_i64(),
        "the apply's state holds the resource: {versions:#?}"
    );

    let (status, restored) = call(
        &cp,
        Method::POST,
        &format!(
            "/api/v1/infrastructure/deployments/{id}/state/versions/{}/restore",
            applied["version"]
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{restored}");
    let d = deployment(&cp, &id).await;
    assert!(
        d["state_present"].as_bool().expect("state_present"),
        "{d:#}"
    );
    assert_eq!(d["state_version"]["sha256"], applied["sha256"], "{d:#}");

    // The destroy now has a state: terraform runs and removes its resource.
    let (status, body) = destroy(&cp, &id, None).await;
    assert_eq!(status, 202, "{body}");
    let destroyed = wait_for(&cp, &id, &["destroyed", "failed"]).await;
    assert_eq!(
        destroyed["status"],
        "destroyed",
        "{destroyed:#}\n{}",
        cp.log()
    );
    let steps: Vec<(&str, &str)> = destroyed["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default(),
                s["status"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        steps.last(),
        Some(&("destroy", "succeeded")),
        "terraform destroy ran on the restored state: {steps:?}"
    );
    assert!(!destroyed["state_present"].as_bool().expect("state_present"));
    let after = state_versions(&cp, &id).await;
    assert_eq!(
        after[0]["version"].as_i64(),
        restored["version"].as_i64().map(|v| v + 1),
        "the destroy wrote the state after the restore: {after:#?}"
    );
    assert!(after[0]["restored_from"].is_null());
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) && cmdline.contains("tether-agent") {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_deleting_a_credential_in_use_leaves_its_server_running_and_its_destroy_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = start(dir.path(), &[]).await;
    // The local target takes a credential of its own provider (no fields).
    let (status, created) = call(
        &cp,
        Method::POST,
        "/api/v1/cloud-providers",
        Some(json!({ "name": "local", "provider": "local", "credentials": {} })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let credential_id = created["id"].as_str().expect("id").to_string();
    let mut request = local("orphan");
    request["cloud_provider_credential_id"] = json!(credential_id);
    let id = provision(&cp, request).await;
    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    let root = cp
        .data_dir
        .join("deployments")
        .join(&id)
        .join("local-server")
        .display()
        .to_string();
    assert_eq!(processes_mentioning(&root).len(), 1, "its agent runs");

    let (status, refused) = call(
        &cp,
        Method::DELETE,
        &format!("/api/v1/cloud-providers/{credential_id}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["deployment_ids"], json!([id]), "{refused}");
    let (status, body) = call(
        &cp,
        Method::DELETE,
        &format!("/api/v1/cloud-providers/{credential_id}?force=true"),
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");

    // What force costs: terraform cannot run for it any more. The destroy
    // ends failed, lists what the state still holds, keeps the state, and
    // the server keeps running.
    let (status, body) = destroy(&cp, &id, None).await;
    assert_eq!(status, 202, "{body}");
    let failed = wait_for(&cp, &id, &["failed", "destroyed"]).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(
        failed["error_message"],
        format!(
            "destroy failed: cloud credential: the cloud credential {credential_id} does not \
             exist or was deleted"
        ),
        "{failed:#}"
    );
    assert_eq!(
        failed["leftover_resources"],
        json!(["module.server.terraform_data.server"]),
        "{failed:#}"
    );
    assert!(failed["state_present"].as_bool().expect("state_present"));
    let server_id = done["server_id"].as_str().expect("server id");
    let (status, gone) = call(
        &cp,
        Method::GET,
        &format!("/api/v1/servers/{server_id}"),
        None,
    )
    .await;
    assert_eq!(status, 404, "its server is revoked and removed: {gone}");
    let running = processes_mentioning(&root);
    assert_eq!(running.len(), 1, "the server was left running");
    // Removed by hand, as the docs say.
    for pid in running {
        // SAFETY: kill(2) on a pid this test found; no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
