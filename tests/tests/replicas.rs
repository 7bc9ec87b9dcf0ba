//! End-to-end: two `tether serve` replicas on one PostgreSQL database and one
//! master key act as one control plane.
//!
//! Needs `TETHER_TEST_DATABASE_URL` (an admin URL of a PostgreSQL server;
//! `scripts/postgres.sh` starts one and prints it). Without it these tests
//! fail: they never skip.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tether_tests::{enrolled_running_agent, ControlPlane};

/// A fresh, empty database on the test PostgreSQL server; returns its URL.
fn fresh_database() -> String {
    let admin = std::env::var("TETHER_TEST_DATABASE_URL").expect(
        "TETHER_TEST_DATABASE_URL is not set: run scripts/postgres.sh and export the URL it prints",
    );
    let name = format!(
        "tether_replicas_{}",
        std::process::id() as u64 * 1000 + rand_suffix()
    );
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

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos() % 1000))
        .unwrap_or_default()
}

async fn two_replicas(dir: &std::path::Path) -> (ControlPlane, ControlPlane) {
    let url = fresh_database();
    let a = ControlPlane::start(&dir.join("a"), &["--database-url", &url])
        .await
        .unwrap();
    let key = dir.join("a").join("master.key");
    let key = key.to_str().unwrap();
    let b = ControlPlane::start(
        &dir.join("b"),
        &["--database-url", &url, "--master-key-file", key],
    )
    .await
    .unwrap();
    (a, b)
}

#[tokio::test]
async fn replicas_share_one_ca_and_only_the_first_writes_an_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(dir.path()).await;
    assert_eq!(a.ca_fingerprint, b.ca_fingerprint);
    assert_eq!(a.branch_id, b.branch_id);
    assert!(a.data_dir.join("admin.token").exists());
    assert!(
        !b.data_dir.join("admin.token").exists(),
        "a joining replica must not write an admin token"
    );
}

#[tokio::test]
async fn server_registered_through_one_replica_is_listed_by_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(dir.path()).await;
    let (_agent, server_id) = enrolled_running_agent(&a, dir.path(), "shared-1")
        .await
        .unwrap();
    a.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();
    // B answers with A's admin token: tokens are signed with a key derived
    // from the shared master key and checked against the shared database.
    let listed = b
        .anonymous(Method::GET, "/api/v1/servers")
        .bearer_auth(a.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let body: serde_json::Value = listed.json().await.unwrap();
    let server = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == server_id.as_str())
        .cloned();
    let server = server.expect("replica B lists the server registered through A");
    assert_eq!(server["status"], "online");
    assert_eq!(server["name"], "shared-1");
}

#[tokio::test]
async fn token_revoked_through_one_replica_is_refused_by_the_other_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(dir.path()).await;
    let root: serde_json::Value = a
        .request(Method::GET, "/api/v1/organizations")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let org = root["data"][0]["id"].as_str().unwrap().to_string();
    let created: serde_json::Value = a
        .request(Method::POST, "/api/v1/tokens")
        .json(&json!({ "name": "reader", "organization_id": org, "scopes": ["servers:read"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    let before = b
        .anonymous(Method::GET, "/api/v1/servers")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(before.status(), 200);

    let revoked = a
        .request(Method::DELETE, &format!("/api/v1/tokens/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let after = b
        .anonymous(Method::GET, "/api/v1/servers")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        after.status(),
        401,
        "replica B still accepts a token revoked through A"
    );
}
