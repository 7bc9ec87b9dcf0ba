//! `install_docker` on a provision request, through the API of a real
//! control plane: on by default for the cloud targets and recorded on the
//! deployment; off by default for the host targets, which refuse it. What
//! the flag makes a server do (`bootstrap.sh` installing Docker Engine,
//! the `docker_installed` boot stage, `cloud-init schema` with it on and
//! off) is proved in templates.rs.

use reqwest::Method;
use serde_json::{json, Value};
use tether_tests::ControlPlane;

async fn provision(cp: &ControlPlane, body: Value) -> (u16, Value) {
    let response = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            "/api/v1/infrastructure/provision",
            Some(&body),
        )
        .await
        .expect("provision call");
    (response.status.as_u16(), response.body)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_targets_install_docker_by_default_and_host_targets_refuse_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No retries: the cloud deployment fails at `terraform init` (providers
    // cannot be downloaded here); only what the API recorded matters.
    let cp = ControlPlane::start(dir.path(), &["--provision-retries", "0"])
        .await
        .expect("control plane starts");

    let refused = |provider: &str| {
        json!({
            "provider": provider,
            "region": "local",
            "instance_type": "process",
            "server_name": format!("{provider}-docker"),
            "install_docker": true,
        })
    };
    for provider in ["local", "docker"] {
        let (status, body) = provision(&cp, refused(provider)).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"], "validation_error", "{body}");
        assert_eq!(body["reason"], "install_docker_not_supported", "{body}");
        assert_eq!(body["provider"], provider, "{body}");
    }

    let credential = cp
        .call(
            &cp.admin_token(),
            Method::POST,
            "/api/v1/cloud-providers",
            Some(&json!({
                "name": "hetzner-docker",
                "provider": "hetzner",
                "credentials": { "token": "hcloud-docker-0123456789abcdef" },
            })),
        )
        .await
        .expect("create credential");
    assert_eq!(credential.status, 201, "{}", credential.body);
    let credential_id = credential.body["id"].as_str().expect("id").to_string();
    let cloud = |name: &str, install_docker: Option<bool>| {
        let mut body = json!({
            "provider": "hetzner",
            "region": "fsn1",
            "instance_type": "cx22",
            "server_name": name,
            "cloud_provider_credential_id": credential_id,
        });
        if let Some(on) = install_docker {
            body["install_docker"] = json!(on);
        }
        body
    };
    for (name, asked, recorded) in [
        ("cloud-default", None, true),
        ("cloud-on", Some(true), true),
        ("cloud-off", Some(false), false),
    ] {
        let (status, accepted) = provision(&cp, cloud(name, asked)).await;
        assert_eq!(status, 202, "{accepted}");
        let id = accepted["deployment_id"].as_str().expect("id");
        assert_eq!(
            deployment(&cp, id).await["install_docker"],
            recorded,
            "{name}"
        );
    }

    let (status, accepted) = provision(
        &cp,
        json!({
            "provider": "local",
            "region": "local",
            "instance_type": "process",
            "server_name": "local-no-docker",
        }),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["deployment_id"].as_str().expect("id");
    assert_eq!(deployment(&cp, id).await["install_docker"], false);
}
