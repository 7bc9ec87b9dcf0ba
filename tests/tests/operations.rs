//! End-to-end: operating a control plane (`tether migrate`, `tether
//! rotate-master-key`) with the real binary.

use std::process::Command;
use std::time::Duration;

use tether_tests::{binary, enrolled_running_agent, ControlPlane};

fn tether(args: &[&str]) -> (bool, String) {
    let output = Command::new(binary("tether")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn rotating_the_master_key_reseals_the_ca_key_and_the_control_plane_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let mut cp = ControlPlane::start(&data, &[]).await.unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "before-rotation")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();
    // A cloud credential is sealed too: rotation re-seals it.
    let credential = cp
        .call(
            &cp.admin_token(),
            reqwest::Method::POST,
            "/api/v1/cloud-providers",
            Some(&serde_json::json!({
                "name": "hetzner", "provider": "hetzner", "credentials": { "token": "hc-secret" }
            })),
        )
        .await
        .unwrap();
    assert_eq!(credential.status, 201, "{}", credential.body);
    let credential_id = credential.body["id"].as_str().unwrap().to_string();
    let fingerprint = cp.ca_fingerprint.clone();
    let old_key = std::fs::read_to_string(data.join("master.key")).unwrap();
    cp.stop(false);

    let (ok, out) = tether(&["rotate-master-key", "--data-dir", data.to_str().unwrap()]);
    assert!(ok, "rotation failed: {out}");
    // CA key, three instance secrets (token signing, QUIC keys, state
    // backend) and the credential.
    assert!(out.contains("5 secrets re-sealed"), "{out}");
    let new_key = std::fs::read_to_string(data.join("master.key")).unwrap();
    assert_ne!(old_key, new_key);
    assert_eq!(
        std::fs::read_to_string(data.join("master.key.previous")).unwrap(),
        old_key
    );
    assert!(
        !out.contains(old_key.trim()) && !out.contains(new_key.trim()),
        "a key reached the output"
    );

    // The old key alone no longer opens the CA key: move it away and start.
    std::fs::remove_file(data.join("master.key.previous")).unwrap();
    cp.restart().await.unwrap();
    assert_eq!(cp.ca_fingerprint, fingerprint, "same CA after rotation");
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await
        .unwrap();
    let validated = cp
        .call(
            &cp.admin_token(),
            reqwest::Method::POST,
            &format!("/api/v1/cloud-providers/{credential_id}/validate"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(validated.status, 200, "{}", validated.body);
    assert_eq!(
        validated.body["is_validated"], true,
        "the credential opens under the new key"
    );
}

#[tokio::test]
async fn migrate_applies_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh");
    for _ in 0..2 {
        let (ok, out) = tether(&["migrate", "--data-dir", data.to_str().unwrap()]);
        assert!(ok, "{out}");
        assert!(out.contains("migrations applied"), "{out}");
    }
    let (ok, out) = tether(&["migrate", "--database-url", "mysql://nope"]);
    assert!(!ok);
    assert!(out.contains("unsupported database URL"), "{out}");
}
