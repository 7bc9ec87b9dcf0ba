//! End-to-end: commands relayed by the control plane to real agents over
//! QUIC — round trip, timeout and cancel (the process is gone), the agent's
//! allow list, fan-out by label, delivery to a server that connects later
//! or never, bounded output, two replicas on PostgreSQL, and destroy refused
//! while a command runs. A fan-out stores its argv, environment and stdin
//! once, the latter two sealed, and argv stays out of info logs.
//!
//! The cross-replica test needs `TETHER_TEST_DATABASE_URL` (see
//! `scripts/postgres.sh`); it fails without it, it never skips.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::{enrolled_running_agent, eventually, Agent, ControlPlane};

const TERMINAL: [&str; 6] = [
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "refused",
    "undeliverable",
];

async fn start(dir: &Path) -> ControlPlane {
    ControlPlane::start(dir, &[])
        .await
        .expect("control plane starts")
}

async fn online_agent(cp: &ControlPlane, dir: &Path, name: &str) -> (Agent, String) {
    let (agent, server_id) = enrolled_running_agent(cp, dir, name).await.expect("agent");
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .expect("online");
    (agent, server_id)
}

/// Posts a command to one server; returns its id.
async fn run(cp: &ControlPlane, server_id: &str, body: Value) -> String {
    let response = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            &format!("/api/v1/servers/{server_id}/commands"),
            Some(&body),
        )
        .await
        .expect("run command");
    assert_eq!(response.status, 202, "{}", response.body);
    response.body["command_id"]
        .as_str()
        .expect("command_id")
        .to_string()
}

/// Waits until the command ended; returns it.
async fn finished(cp: &ControlPlane, id: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let c = cp.command(id).await.unwrap();
        if TERMINAL.contains(&c["status"].as_str().unwrap_or_default()) {
            return c;
        }
        assert!(
            started.elapsed() < within,
            "command {id} still {} after {within:?}: {c:#}\n--- log ---\n{}",
            c["status"],
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Processes whose command line contains `needle` (space separated).
fn processes_mentioning(needle: &str) -> Vec<u32> {
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
            found.push(pid);
        }
    }
    found
}

/// Every file of a data dir (the SQLite database and its WAL included).
fn data_dir_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).expect("data dir").flatten() {
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            all.extend(std::fs::read(entry.path()).unwrap_or_default());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn echo_round_trips_its_output_and_exit_code_and_env_values_stay_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let (agent, server_id) = online_agent(&cp, dir.path(), "echo-1").await;

    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["echo", "hello"], "timeout_seconds": 10 }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["output"], "hello\n");
    assert_eq!(done["output_truncated"], false);
    assert_eq!(done["server_id"], server_id.as_str());
    assert!(done["started_at"].is_string() && done["finished_at"].is_string());

    // The SSE stream replays the output and ends with the status.
    let sse = cp
        .request(Method::GET, &format!("/api/v1/commands/{id}/output"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        sse.contains("event: output") && sse.contains("hello\\n"),
        "{sse}"
    );
    assert!(
        sse.contains("event: status") && sse.contains("\"succeeded\""),
        "{sse}"
    );

    // A secret environment value reaches the process but no log, response
    // or database page.
    let secret = "s3cret-env-value-7f1c9a";
    let id = run(
        &cp,
        &server_id,
        json!({
            "argv": ["sh", "-c", "case \"$TETHER_E2E_SECRET\" in s3cret-env-*) echo matched;; esac"],
            "env": { "TETHER_E2E_SECRET": secret },
            "timeout_seconds": 10,
        }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["output"], "matched\n");
    let shown = cp.command(&id).await.unwrap().to_string();
    assert!(!shown.contains(secret), "env value in the API: {shown}");
    assert!(
        !cp.log().contains(secret),
        "env value in the control plane log"
    );
    assert!(!agent.log().contains(secret), "env value in the agent log");
    assert!(
        !contains(&data_dir_bytes(&cp.data_dir), secret),
        "env value in clear in the database"
    );
}

#[tokio::test]
async fn sleep_with_a_one_second_timeout_ends_timed_out_and_its_process_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let (_agent, server_id) = online_agent(&cp, dir.path(), "timeout-1").await;
    let started = Instant::now();
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["sleep", "30.0301"], "timeout_seconds": 1 }),
    )
    .await;
    eventually(Duration::from_secs(5), "the sleep to run", || async {
        Ok((!processes_mentioning("sleep 30.0301").is_empty()).then_some(()))
    })
    .await
    .expect("the process ran on the agent");
    let done = finished(&cp, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "timed_out", "{done:#}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        processes_mentioning("sleep 30.0301").is_empty(),
        "the timed-out process is still running"
    );
}

#[tokio::test]
async fn a_program_outside_the_agents_allow_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let token = cp
        .enrollment_token(json!({ "server_name": "strict-1" }))
        .await
        .unwrap();
    let mut agent = Agent::new(&dir.path().join("strict-1"));
    let (ok, stderr) = agent.enroll(&cp, token["token"].as_str().unwrap()).unwrap();
    assert!(ok, "{stderr}");
    std::fs::write(
        agent.state_dir.with_extension("toml"),
        "[commands]\nallow = [\"echo\"]\n",
    )
    .unwrap();
    agent.run().unwrap();
    let server_id = agent.server_id().unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();

    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["sleep", "30.0302"], "timeout_seconds": 5 }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "refused", "{done:#}");
    assert!(
        done["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("allow"),
        "{done:#}"
    );
    assert!(processes_mentioning("sleep 30.0302").is_empty());
    // The allowed program still runs.
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["echo", "ok"], "timeout_seconds": 5 }),
    )
    .await;
    assert_eq!(
        finished(&cp, &id, Duration::from_secs(10)).await["status"],
        "succeeded"
    );
}

#[tokio::test]
async fn cancel_of_a_running_sleep_ends_cancelled_and_kills_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let (_agent, server_id) = online_agent(&cp, dir.path(), "cancel-1").await;
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["sleep", "30.0303"], "timeout_seconds": 60 }),
    )
    .await;
    eventually(Duration::from_secs(5), "the sleep to run", || async {
        Ok((!processes_mentioning("sleep 30.0303").is_empty()).then_some(()))
    })
    .await
    .expect("the process ran");
    assert_eq!(cp.command(&id).await.unwrap()["status"], "running");
    let response = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            &format!("/api/v1/commands/{id}/cancel"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status, 202, "{}", response.body);
    let done = finished(&cp, &id, Duration::from_secs(5)).await;
    assert_eq!(done["status"], "cancelled", "{done:#}");
    assert!(
        processes_mentioning("sleep 30.0303").is_empty(),
        "process survived the cancel"
    );
    // Cancelling again: it already ended.
    let again = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            &format!("/api/v1/commands/{id}/cancel"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.body["error"], "conflict");
}

#[tokio::test]
async fn fan_out_by_label_runs_once_on_each_matching_server() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let mut agents = Vec::new();
    let mut web = Vec::new();
    for (name, role) in [("web-a", "web"), ("web-b", "web"), ("db-a", "db")] {
        let token = cp
            .enrollment_token(json!({ "server_name": name, "labels": { "role": role } }))
            .await
            .unwrap();
        let mut agent = Agent::new(&dir.path().join(name));
        let (ok, stderr) = agent.enroll(&cp, token["token"].as_str().unwrap()).unwrap();
        assert!(ok, "{stderr}");
        agent.run().unwrap();
        let server_id = agent.server_id().unwrap();
        cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
            .await
            .unwrap();
        if role == "web" {
            web.push(server_id);
        }
        agents.push(agent);
    }
    let response = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            "/api/v1/commands",
            Some(&json!({
                "selector": { "labels": { "role": "web" } },
                "argv": ["hostname"],
                "timeout_seconds": 10,
            })),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 202, "{}", response.body);
    let ids = response.body["command_ids"]
        .as_array()
        .expect("ids")
        .clone();
    assert_eq!(ids.len(), 2, "{}", response.body);
    let mut servers = Vec::new();
    for id in &ids {
        let done = finished(&cp, id.as_str().unwrap(), Duration::from_secs(10)).await;
        assert_eq!(done["status"], "succeeded", "{done:#}");
        assert!(!done["output"].as_str().unwrap_or_default().is_empty());
        servers.push(done["server_id"].as_str().unwrap().to_string());
    }
    servers.sort();
    web.sort();
    assert_eq!(servers, web);

    // A selector matching nothing is a validation error.
    let none = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            "/api/v1/commands",
            Some(&json!({
                "selector": { "labels": { "role": "nope" } },
                "argv": ["true"], "timeout_seconds": 5,
            })),
        )
        .await
        .unwrap();
    assert_eq!(none.status, 422, "{}", none.body);
}

#[tokio::test]
async fn a_queued_command_reaches_a_server_that_connects_later_or_becomes_undeliverable() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let token = cp
        .enrollment_token(json!({ "server_name": "late-1" }))
        .await
        .unwrap();
    let mut agent = Agent::new(&dir.path().join("late-1"));
    let (ok, stderr) = agent.enroll(&cp, token["token"].as_str().unwrap()).unwrap();
    assert!(ok, "{stderr}");
    let server_id = agent.server_id().unwrap();

    // Offline with a 1 s deadline: undeliverable.
    let lost = run(
        &cp,
        &server_id,
        json!({ "argv": ["echo", "never"], "timeout_seconds": 5, "deliver_within_seconds": 1 }),
    )
    .await;
    assert_eq!(cp.command(&lost).await.unwrap()["status"], "queued");
    let done = finished(&cp, &lost, Duration::from_secs(5)).await;
    assert_eq!(done["status"], "undeliverable", "{done:#}");

    // Offline with a longer deadline: delivered when the agent connects.
    let later = run(
        &cp,
        &server_id,
        json!({ "argv": ["echo", "later"], "timeout_seconds": 5, "deliver_within_seconds": 60 }),
    )
    .await;
    agent.run().unwrap();
    let done = finished(&cp, &later, Duration::from_secs(15)).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["output"], "later\n");
    // The undeliverable one stayed undeliverable.
    assert_eq!(cp.command(&lost).await.unwrap()["status"], "undeliverable");
}

#[tokio::test]
async fn output_over_the_bound_is_cut_at_the_bound_and_flagged_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let (_agent, server_id) = online_agent(&cp, dir.path(), "big-1").await;
    // About 2.7 MB of output against the default 1 MiB bound.
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["seq", "1", "400000"], "timeout_seconds": 30 }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{}", done["status"]);
    assert_eq!(done["output_truncated"], true);
    let output = done["output"].as_str().unwrap();
    assert_eq!(output.len(), 1 << 20);
    assert!(output.starts_with("1\n2\n3\n"));
    // A smaller bound asked for.
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["seq", "1", "1000"], "timeout_seconds": 30, "max_output_bytes": 10 }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(30)).await;
    assert_eq!(done["output"], "1\n2\n3\n4\n5\n");
    assert_eq!(done["output_truncated"], true);
}

/// A fresh, empty database on the test PostgreSQL server; returns its URL.
fn fresh_database() -> String {
    let admin = std::env::var("TETHER_TEST_DATABASE_URL").expect(
        "TETHER_TEST_DATABASE_URL is not set: run scripts/postgres.sh and export the URL it prints",
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let name = format!("tether_commands_{}_{nanos}", std::process::id());
    let status = std::process::Command::new("psql")
        .arg(&admin)
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .status()
        .expect("psql must be installed");
    assert!(status.success(), "could not create database {name}");
    let (base, _) = admin
        .rsplit_once('/')
        .expect("database URL ends in /DBNAME");
    format!("{base}/{name}")
}

#[tokio::test]
async fn a_command_posted_to_replica_a_runs_on_an_agent_connected_to_replica_b() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database();
    let a = ControlPlane::start(&dir.path().join("a"), &["--database-url", &url])
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
        ],
    )
    .await
    .unwrap();
    // B uses A's admin token (one instance, one token signing key).
    std::fs::copy(
        a.data_dir.join("admin.token"),
        b.data_dir.join("admin.token"),
    )
    .unwrap();
    // The agent dials B.
    let (_agent, server_id) = online_agent(&b, dir.path(), "remote-1").await;

    let started = Instant::now();
    let id = run(
        &a,
        &server_id,
        json!({ "argv": ["echo", "across"], "env": { "X": "1" }, "timeout_seconds": 10 }),
    )
    .await;
    let done = finished(&a, &id, Duration::from_secs(10)).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done:#}\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(done["output"], "across\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    // Cancel through A of a command running through B.
    let id = run(
        &a,
        &server_id,
        json!({ "argv": ["sleep", "30.0304"], "timeout_seconds": 60 }),
    )
    .await;
    eventually(Duration::from_secs(5), "the sleep to run", || async {
        Ok((!processes_mentioning("sleep 30.0304").is_empty()).then_some(()))
    })
    .await
    .expect("the process ran");
    let response = a
        .call(
            &a.admin_token(),
            Method::POST,
            &format!("/api/v1/commands/{id}/cancel"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(response.status, 202, "{}", response.body);
    let done = finished(&a, &id, Duration::from_secs(5)).await;
    assert_eq!(done["status"], "cancelled", "{done:#}");
    assert!(processes_mentioning("sleep 30.0304").is_empty());

    // A follower on A sees B's live output through the store.
    let id = run(
        &a,
        &server_id,
        json!({ "argv": ["sh", "-c", "echo first; sleep 1; echo second"], "timeout_seconds": 10 }),
    )
    .await;
    let sse = a
        .request(Method::GET, &format!("/api/v1/commands/{id}/output"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(sse.contains("first") && sse.contains("second"), "{sse}");
    assert!(
        sse.trim_end()
            .rsplit("event: ")
            .next()
            .unwrap_or_default()
            .starts_with("status"),
        "{sse}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_deployment_is_refused_while_a_command_runs_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &["--metrics-interval", "1s", "--registration-timeout", "60s"],
    )
    .await
    .unwrap();
    let admin = cp.admin_token();
    let accepted = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/infrastructure/provision",
            Some(&json!({
                "provider": "local", "region": "local", "instance_type": "process",
                "server_name": "busy-1",
            })),
        )
        .await
        .unwrap();
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let deployment_id = accepted.body["deployment_id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/infrastructure/deployments/{deployment_id}");
    let done = eventually(
        Duration::from_secs(120),
        "the deployment to complete",
        || async {
            let d = cp.call(&admin, Method::GET, &path, None).await?.body;
            Ok(["completed", "failed"]
                .contains(&d["status"].as_str().unwrap_or_default())
                .then_some(d))
        },
    )
    .await
    .unwrap();
    assert_eq!(done["status"], "completed", "{done:#}");
    let server_id = done["server_id"].as_str().unwrap().to_string();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();

    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["sleep", "30.0305"], "timeout_seconds": 60 }),
    )
    .await;
    eventually(Duration::from_secs(5), "the command to run", || async {
        Ok((cp.command(&id).await.unwrap()["status"] == "running").then_some(()))
    })
    .await
    .unwrap();
    let refused = cp.call(&admin, Method::DELETE, &path, None).await.unwrap();
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.body["error"], "conflict");
    assert_eq!(refused.body["active_commands"], 1);
    assert_eq!(
        cp.call(&admin, Method::GET, &path, None)
            .await
            .unwrap()
            .body["status"],
        "completed"
    );

    let forced = cp
        .call(
            &admin,
            Method::DELETE,
            &path,
            Some(&json!({ "force": true })),
        )
        .await
        .unwrap();
    assert_eq!(forced.status, 202, "{}", forced.body);
    let destroyed = eventually(
        Duration::from_secs(120),
        "the destroy to finish",
        || async {
            let d = cp.call(&admin, Method::GET, &path, None).await?.body;
            Ok(["destroyed", "failed"]
                .contains(&d["status"].as_str().unwrap_or_default())
                .then_some(d))
        },
    )
    .await
    .unwrap();
    assert_eq!(destroyed["status"], "destroyed", "{destroyed:#}");
    let ended = finished(&cp, &id, Duration::from_secs(40)).await;
    assert_ne!(ended["status"], "succeeded", "{ended:#}");
    assert!(processes_mentioning("sleep 30.0305").is_empty());
}

/// Enrolls an agent whose agent.toml is `config`, starts it, waits until online.
async fn configured_agent(
    cp: &ControlPlane,
    dir: &Path,
    name: &str,
    config: &str,
) -> (Agent, String) {
    let token = cp
        .enrollment_token(json!({ "server_name": name }))
        .await
        .unwrap();
    let mut agent = Agent::new(&dir.join(name));
    let (ok, stderr) = agent.enroll(cp, token["token"].as_str().unwrap()).unwrap();
    assert!(ok, "{stderr}");
    std::fs::write(agent.state_dir.with_extension("toml"), config).unwrap();
    agent.run().unwrap();
    let server_id = agent.server_id().unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();
    (agent, server_id)
}

#[tokio::test]
async fn a_command_setting_ld_preload_or_bash_env_is_refused_with_its_reason_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let (_agent, server_id) = online_agent(&cp, dir.path(), "preload-target").await;
    let marker = dir.path().join("preloaded-program-ran");
    for (name, argv) in [
        ("LD_PRELOAD", json!(["touch", marker.to_str().unwrap()])),
        (
            "LD_LIBRARY_PATH",
            json!(["touch", marker.to_str().unwrap()]),
        ),
        (
            "BASH_ENV",
            json!(["bash", "-c", format!("touch {}", marker.display())]),
        ),
    ] {
        let id = run(
            &cp,
            &server_id,
            json!({ "argv": argv, "env": { name: "/tmp/evil.so", "LANG": "C" }, "timeout_seconds": 5 }),
        )
        .await;
        let done = finished(&cp, &id, Duration::from_secs(10)).await;
        assert_eq!(done["status"], "refused", "{name}: {done:#}");
        let reason = done["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with(&format!("forbidden_env: {name} ")),
            "{name}: {done:#}"
        );
        assert_eq!(done["output"], "", "{done:#}");
        assert!(!marker.exists(), "{name}: the program ran");
    }
    // The same command without the variable runs.
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["touch", marker.to_str().unwrap()], "env": { "LANG": "C" }, "timeout_seconds": 5 }),
    )
    .await;
    assert_eq!(
        finished(&cp, &id, Duration::from_secs(10)).await["status"],
        "succeeded"
    );
    assert!(marker.exists());
}

#[tokio::test]
async fn an_argv_pattern_allows_exactly_that_shell_command_and_refuses_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let (_agent, server_id) = configured_agent(
        &cp,
        dir.path(),
        "pinned",
        "[commands]\nallow = [[\"/bin/sh\", \"-c\", \"echo hi\"]]\n",
    )
    .await;
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["/bin/sh", "-c", "echo hi"], "timeout_seconds": 5 }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["output"], "hi\n");

    let marker = dir.path().join("shell-escaped");
    for argv in [
        json!(["/bin/sh", "-c", "id"]),
        json!(["/bin/sh", "-c", format!("touch {}", marker.display())]),
        json!(["/bin/sh", "-c", "echo hi", format!("{}", marker.display())]),
        json!(["/bin/sh"]),
    ] {
        let id = run(
            &cp,
            &server_id,
            json!({ "argv": argv, "timeout_seconds": 5 }),
        )
        .await;
        let done = finished(&cp, &id, Duration::from_secs(10)).await;
        assert_eq!(done["status"], "refused", "{argv}: {done:#}");
        assert!(
            done["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("not_allowed: "),
            "{argv}: {done:#}"
        );
        assert_eq!(done["output"], "", "{done:#}");
    }
    assert!(!marker.exists());
}

#[tokio::test]
async fn commands_run_as_the_configured_user() {
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test switches users: run it as root (CI does)");
    }
    let user = format!("tt{}", std::process::id());
    let created = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg(&user)
        .status()
        .expect("useradd");
    assert!(created.success(), "useradd {user}");
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel").arg(&self.0).status();
        }
    }
    let _remove = Remove(user.clone());
    let uid = std::process::Command::new("id")
        .args(["-u", &user])
        .output()
        .unwrap();
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    assert_ne!(uid, "0");

    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let (_agent, server_id) = configured_agent(
        &cp,
        dir.path(),
        "dropped",
        &format!("[commands]\nrun_as = \"{user}\"\n"),
    )
    .await;
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["sh", "-c", "id -u; echo $USER"], "timeout_seconds": 5 }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["output"], format!("{uid}\n{user}\n"), "{done:#}");
    // Root's files are out of its reach.
    let secret = dir.path().join("root-only");
    std::fs::write(&secret, "root secret").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let id = run(
        &cp,
        &server_id,
        json!({ "argv": ["cat", secret.to_str().unwrap()], "timeout_seconds": 5 }),
    )
    .await;
    let done = finished(&cp, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "failed", "{done:#}");
    assert!(
        !done["output"]
            .as_str()
            .unwrap_or_default()
            .contains("root secret"),
        "{done:#}"
    );
}

/// The answer of the `sqlite3` shell to `sql` on the control plane's database.
fn sqlite(cp: &ControlPlane, sql: &str) -> String {
    let output = std::process::Command::new("sqlite3")
        .arg(cp.data_dir.join("tether.db"))
        .arg(sql)
        .output()
        .expect("the sqlite3 shell must be installed");
    assert!(
        output.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Lines of a log that mention `needle` at a level above debug.
fn logged_above_debug(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains(needle))
        .filter(|line| {
            let level = line.split_whitespace().nth(1).unwrap_or_default();
            !matches!(level, "DEBUG" | "TRACE")
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_fan_out_stores_its_request_once_sealed_and_keeps_argv_out_of_info_logs() {
    let argv_marker = "argv-marker-5d1e9";
    let stdin_marker = "stdin-marker-8c2f4";
    let env_marker = "env-marker-3b7a0";
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&dir.path().join("cp")).await;
    let mut agents = Vec::new();
    for name in ["fan-a", "fan-b", "fan-c"] {
        let token = cp
            .enrollment_token(json!({ "server_name": name, "labels": { "role": "fan" } }))
            .await
            .unwrap();
        let mut agent = Agent::new(&dir.path().join(name));
        let (ok, stderr) = agent.enroll(&cp, token["token"].as_str().unwrap()).unwrap();
        assert!(ok, "{stderr}");
        agent.run().unwrap();
        cp.wait_for_status(
            &agent.server_id().unwrap(),
            "online",
            Duration::from_secs(15),
        )
        .await
        .unwrap();
        agents.push(agent);
    }
    // The program upper-cases stdin (so the output holds no stdin marker),
    // proves it saw the environment value without printing it, then waits
    // a little so the database can be read while every target runs.
    let script = "tr a-z A-Z; case \"$FAN_SECRET\" in env-marker-*) echo env-ok;; esac; sleep 2";
    let response = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            "/api/v1/commands",
            Some(&json!({
                "selector": { "labels": { "role": "fan" } },
                "argv": ["sh", "-c", script, argv_marker],
                "env": { "FAN_SECRET": env_marker },
                "stdin": format!("{stdin_marker}\n"),
                "timeout_seconds": 20,
            })),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 202, "{}", response.body);
    let ids: Vec<String> = response.body["command_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{}", response.body);

    let check_database = |when: &str| {
        assert_eq!(
            sqlite(&cp, "SELECT COUNT(*) FROM command_requests"),
            "1",
            "{when}: one request for the fan-out"
        );
        assert_eq!(
            sqlite(
                &cp,
                "SELECT COUNT(*) || ' ' || COUNT(DISTINCT request_id) FROM commands"
            ),
            "3 1",
            "{when}: three commands, all of the one request"
        );
        let columns = sqlite(
            &cp,
            "SELECT group_concat(name, ' ') FROM pragma_table_info('commands')",
        );
        for copy in ["argv", "stdin", "env_sealed"] {
            assert!(
                !columns.split(' ').any(|c| c == copy),
                "{when}: commands keep a copy ({columns})"
            );
        }
        let bytes = data_dir_bytes(&cp.data_dir);
        assert!(
            !contains(&bytes, stdin_marker),
            "{when}: stdin in clear in the database"
        );
        assert!(
            !contains(&bytes, env_marker),
            "{when}: env in clear in the database"
        );
        assert!(
            contains(&bytes, argv_marker),
            "{when}: argv is kept (the API shows it)"
        );
    };
    eventually(Duration::from_secs(15), "every target running", || async {
        let mut running = 0;
        for id in &ids {
            if cp.command(id).await?["status"] == "running" {
                running += 1;
            }
        }
        Ok((running == ids.len()).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(
        sqlite(
            &cp,
            "SELECT (env_sealed IS NOT NULL) || (stdin_sealed IS NOT NULL) FROM command_requests"
        ),
        "11",
        "sealed while the targets run"
    );
    check_database("while running");

    for id in &ids {
        let done = finished(&cp, id, Duration::from_secs(20)).await;
        assert_eq!(done["status"], "succeeded", "{done:#}");
        assert_eq!(done["output"], "STDIN-MARKER-8C2F4\nenv-ok\n", "{done:#}");
        assert_eq!(
            done["argv"],
            json!(["sh", "-c", script, argv_marker]),
            "{done:#}"
        );
    }
    assert_eq!(
        sqlite(
            &cp,
            "SELECT (env_sealed IS NULL) || (stdin_sealed IS NULL) FROM command_requests"
        ),
        "11",
        "cleared once every target ended"
    );
    check_database("after the end");

    let log = cp.log();
    assert!(
        log.lines()
            .any(|l| l.contains(argv_marker) && l.contains("DEBUG")),
        "argv is logged at debug (the check below reads the right log)"
    );
    let leaked = logged_above_debug(&log, argv_marker);
    assert!(
        leaked.is_empty(),
        "argv at info in the control plane log: {leaked:#?}"
    );
    for agent in &agents {
        let leaked = logged_above_debug(&agent.log(), argv_marker);
        assert!(
            leaked.is_empty(),
            "argv at info in an agent log: {leaked:#?}"
        );
    }
    for secret in [stdin_marker, env_marker] {
        assert!(!log.contains(secret), "{secret} in the control plane log");
    }
}
