//! Retries of transient Terraform failures, end to end with the real
//! `terraform` binary and the `local` target. The control plane runs with
//! `--templates-dir`: a copy of `terraform-templates/local/` with one more
//! `terraform_data` whose `local-exec` fails the way a cloud API does (a
//! 429 rate limit once, a 429 every time, or a 403), counting its runs in a
//! file. A transient failure is retried and the deployment comes online; a
//! permanent one fails at once; a transient one that never clears fails
//! after `--provision-retries` retries.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::ControlPlane;

const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);

/// How the extra resource of the test template fails.
enum Flaky {
    /// A 429 on its first run only.
    RateLimitedOnce,
    /// A 429 on every run.
    AlwaysRateLimited,
    /// A 403 on every run.
    Forbidden,
    /// Created fine; its destroy answers a 503 once.
    UnavailableOnceAtDestroy,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// `<dir>/templates/local/`: the local module, whose server waits for a
/// `terraform_data.flaky` that fails as `flaky` says. Returns the templates
/// dir and the file each run of the flaky provisioner appends a line to.
fn templates_dir(dir: &Path, flaky: Flaky) -> (PathBuf, PathBuf) {
    let templates = dir.join("templates");
    let local = templates.join("local");
    copy_dir(&repo_root().join("terraform-templates/local"), &local);
    let runs = dir.join("flaky-runs");
    let marker = dir.join("flaky-failed-once");
    let (condition, message) = match flaky {
        Flaky::RateLimitedOnce => (
            format!("[ ! -e '{}' ]", marker.display()),
            "Error: creating server: POST https://api.example.com/v1/servers: 429 Too Many Requests: Rate exceeded",
        ),
        Flaky::AlwaysRateLimited => (
            "true".to_string(),
            "Error: creating server: POST https://api.example.com/v1/servers: 429 Too Many Requests: Rate exceeded",
        ),
        Flaky::Forbidden => (
            "true".to_string(),
            "Error: creating server: POST https://api.example.com/v1/servers: 403 Forbidden: the API token was refused",
        ),
        Flaky::UnavailableOnceAtDestroy => (
            format!("[ ! -e '{}' ]", marker.display()),
            "Error: deleting server: DELETE https://api.example.com/v1/servers/1: 503 Service Unavailable",
        ),
    };
    let when = match flaky {
        Flaky::UnavailableOnceAtDestroy => "\n    when        = destroy",
        _ => "",
    };
    let flaky_tf = format!(
        r#"# Test only: fails like a cloud API before the server is made.
resource "terraform_data" "flaky" {{
  provisioner "local-exec" {{{when}
    interpreter = ["/bin/sh", "-c"]
    command     = <<-EOT
      echo run >> '{runs}'
      if {condition}; then
        touch '{marker}'
        echo '{message}' >&2
        exit 1
      fi
    EOT
  }}
}}
"#,
        runs = runs.display(),
        marker = marker.display(),
    );
    std::fs::write(local.join("flaky.tf"), flaky_tf).expect("write flaky.tf");
    let main = local.join("main.tf");
    let text = std::fs::read_to_string(&main).expect("main.tf");
    let anchor = "resource \"terraform_data\" \"server\" {\n";
    assert!(text.contains(anchor), "the local module's server resource");
    std::fs::write(
        &main,
        text.replacen(
            anchor,
            &format!("{anchor}  depends_on = [terraform_data.flaky]\n\n"),
            1,
        ),
    )
    .expect("write main.tf");
    (templates, runs)
}

fn runs_of(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

async fn start(dir: &Path, templates: &Path, retries: &str) -> ControlPlane {
    start_with_delay(dir, templates, retries, "200ms").await
}

async fn start_with_delay(
    dir: &Path,
    templates: &Path,
    retries: &str,
    delay: &str,
) -> ControlPlane {
    let found = std::process::Command::new("terraform")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "the terraform binary is required (PATH); these tests never skip"
    );
    let templates = templates.display().to_string();
    ControlPlane::start(
        &dir.join("cp"),
        &[
            "--metrics-interval",
            "1s",
            "--registration-timeout",
            "60s",
            "--templates-dir",
            &templates,
            "--provision-retries",
            retries,
            "--provision-retry-delay",
            delay,
        ],
    )
    .await
    .expect("control plane starts")
}

async fn provision(cp: &ControlPlane, name: &str) -> String {
    let response = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            "/api/v1/infrastructure/provision",
            Some(&json!({
                "provider": "local",
                "region": "local",
                "instance_type": "process",
                "server_name": name,
            })),
        )
        .await
        .expect("provision call");
    assert_eq!(response.status, 202, "{}", response.body);
    response.body["deployment_id"]
        .as_str()
        .expect("deployment id")
        .to_string()
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

/// The deployment's SSE stream read to its end (it ends once the deployment
/// settled): `(event, data)` pairs.
async fn sse_events(cp: &ControlPlane, id: &str) -> Vec<(String, Value)> {
    let mut response = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/infrastructure/deployments/{id}/events",
            cp.api_url
        ))
        .bearer_auth(cp.admin_token())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("events");
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let mut events = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event:") {
            name = n.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data:") {
            let data = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
            events.push((std::mem::take(&mut name), data));
        }
    }
    events
}

fn step_names(d: &Value) -> Vec<(String, String)> {
    d["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn destroy(cp: &ControlPlane, id: &str) {
    let response = cp
        .call(
            &cp.admin_token(),
            Method::DELETE,
            &format!("/api/v1/infrastructure/deployments/{id}"),
            None,
        )
        .await
        .expect("destroy call");
    assert_eq!(response.status, 202, "{}", response.body);
    let gone = wait_for(cp, id, &["destroyed", "failed"]).await;
    assert_eq!(gone["status"], "destroyed", "{gone:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_fails_transiently_once_succeeds_on_the_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (templates, runs) = templates_dir(dir.path(), Flaky::RateLimitedOnce);
    let cp = start(dir.path(), &templates, "3").await;
    let id = provision(&cp, "flaky-once").await;

    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    assert_eq!(done["retry_count"], 1, "{done:#}");
    assert!(done["next_retry_at"].is_null(), "{done:#}");
    assert_eq!(runs_of(&runs), 2, "the flaky resource ran twice");
    assert_eq!(
        step_names(&done),
        [
            ("render", "succeeded"),
            ("init", "succeeded"),
            ("plan", "succeeded"),
            ("apply", "failed"),
            ("plan", "succeeded"),
            ("apply", "succeeded"),
            ("registration", "succeeded"),
        ]
        .map(|(n, s)| (n.to_string(), s.to_string()))
    );

    // The server is online.
    let server_id = done["server_id"].as_str().expect("server id").to_string();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(20))
        .await
        .expect("online");

    // The retry is an event on the deployment's stream, with its reason.
    let events = sse_events(&cp, &id).await;
    let retries: Vec<&Value> = events
        .iter()
        .filter(|(name, _)| name == "retry")
        .map(|(_, data)| data)
        .collect();
    assert_eq!(retries.len(), 1, "{events:?}");
    let retry = retries[0];
    assert_eq!(retry["step"], "apply");
    assert_eq!(retry["reason"], "rate_limit");
    assert_eq!(retry["retry"], 1);
    assert_eq!(retry["max_retries"], 3);
    assert!(
        retry["error"]
            .as_str()
            .is_some_and(|e| e.contains("429 Too Many Requests: Rate exceeded")),
        "{retry}"
    );
    assert!(retry["delay_seconds"]
        .as_f64()
        .is_some_and(|s| s > 0.0 && s <= 0.2));
    assert!(
        cp.log()
            .contains("operator's templates replace the embedded modules"),
        "the override is logged"
    );

    destroy(&cp, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_fails_at_once_with_terraforms_diagnostic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (templates, runs) = templates_dir(dir.path(), Flaky::Forbidden);
    let cp = start(dir.path(), &templates, "3").await;
    let id = provision(&cp, "flaky-forbidden").await;

    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "failed", "{done:#}");
    assert_eq!(done["retry_count"], 0, "{done:#}");
    assert_eq!(runs_of(&runs), 1, "never run again");
    let error = done["error_message"].as_str().expect("error message");
    assert!(
        error.contains("403 Forbidden: the API token was refused"),
        "terraform's diagnostic in the record: {error}"
    );
    assert!(!error.contains("retries"), "{error}");
    assert!(done["server_id"].is_null(), "no server: {done:#}");
    let events = sse_events(&cp, &id).await;
    assert!(
        !events.iter().any(|(name, _)| name == "retry"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_that_never_clears_fails_after_the_retry_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (templates, runs) = templates_dir(dir.path(), Flaky::AlwaysRateLimited);
    let cp = start(dir.path(), &templates, "2").await;
    let id = provision(&cp, "flaky-always").await;

    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "failed", "{done:#}");
    assert_eq!(done["retry_count"], 2, "{done:#}");
    assert_eq!(runs_of(&runs), 3, "the first run and two retries");
    let error = done["error_message"].as_str().expect("error message");
    assert!(
        error.contains("429 Too Many Requests") && error.contains("still failing after 2 retries"),
        "{error}"
    );
    let events = sse_events(&cp, &id).await;
    let retries: Vec<i64> = events
        .iter()
        .filter(|(name, _)| name == "retry")
        .filter_map(|(_, data)| data["retry"].as_i64())
        .collect();
    assert_eq!(retries, [1, 2], "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_scheduled_before_a_restart_is_kept_by_the_restarted_control_plane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (templates, runs) = templates_dir(dir.path(), Flaky::RateLimitedOnce);
    // The retry is due 20-40 s after the failure: later than the lease of
    // the job the restart interrupts.
    let mut cp = start_with_delay(dir.path(), &templates, "3", "40s").await;
    let id = provision(&cp, "flaky-restart").await;

    let started = Instant::now();
    let waiting = loop {
        let d = deployment(&cp, &id).await;
        if d["retry_count"] == 1 && !d["next_retry_at"].is_null() {
            break d;
        }
        assert!(
            started.elapsed() < SETTLE_TIMEOUT,
            "no retry scheduled: {d:#}\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let due: chrono::DateTime<chrono::Utc> = waiting["next_retry_at"]
        .as_str()
        .expect("next_retry_at")
        .parse()
        .expect("a time");
    assert_eq!(runs_of(&runs), 1);

    cp.stop(false);
    cp.restart().await.expect("restart");
    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    assert_eq!(done["retry_count"], 1, "the count survived: {done:#}");
    assert!(done["next_retry_at"].is_null(), "{done:#}");
    assert_eq!(runs_of(&runs), 2, "the flaky resource ran once more");
    // The resumed job ran nothing before the retry was due.
    let resumed_init = done["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| s["name"] == "init")
        .nth(1)
        .expect("a second init, by the resumed job");
    let resumed_at: chrono::DateTime<chrono::Utc> = resumed_init["started_at"]
        .as_str()
        .expect("started_at")
        .parse()
        .expect("a time");
    assert!(
        resumed_at >= due - chrono::Duration::milliseconds(50),
        "resumed at {resumed_at}, retry due at {due}"
    );
    let server_id = done["server_id"].as_str().expect("server id").to_string();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(20))
        .await
        .expect("online");
    destroy(&cp, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_that_fails_transiently_once_is_retried_and_removes_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (templates, runs) = templates_dir(dir.path(), Flaky::UnavailableOnceAtDestroy);
    let cp = start(dir.path(), &templates, "3").await;
    let id = provision(&cp, "flaky-destroy").await;
    let done = wait_for(&cp, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done:#}\n{}", cp.log());
    assert_eq!(done["retry_count"], 0);
    assert_eq!(runs_of(&runs), 0, "nothing ran at create");

    destroy(&cp, &id).await;
    let gone = deployment(&cp, &id).await;
    assert_eq!(gone["retry_count"], 1, "{gone:#}");
    assert_eq!(gone["leftover_resources"], json!([]), "{gone:#}");
    assert_eq!(gone["state_present"], false, "{gone:#}");
    assert_eq!(runs_of(&runs), 2, "the destroy ran twice");
    let events = sse_events(&cp, &id).await;
    let retry = events
        .iter()
        .find(|(name, _)| name == "retry")
        .map(|(_, data)| data)
        .expect("a retry event");
    assert_eq!(retry["step"], "destroy");
    assert_eq!(retry["reason"], "server_error");
}
