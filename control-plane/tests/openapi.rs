//! The OpenAPI document and the router are one: every documented operation is
//! served (no `no such route` 404, no 405), every other method on a documented
//! path is a 405, and the document is OpenAPI 3.1 with the error model on
//! every operation.

use std::collections::HashSet;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::Value;
use tether_control_plane::config::ServeArgs;
use tower::ServiceExt;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn document() -> Value {
    tether_control_plane::api::openapi_document()
}

/// (path, method) of every operation in the document.
fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                ops.push((path.clone(), method.to_string()));
            }
        }
    }
    ops
}

#[test]
fn document_is_openapi_3_1_with_the_error_model_on_every_operation() {
    let doc = document();
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "openapi {version}");

    let schemas = &doc["components"]["schemas"];
    let error_required: HashSet<&str> = schemas["ErrorBody"]["required"]
        .as_array()
        .expect("ErrorBody schema")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(error_required, HashSet::from(["error", "message"]));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["bearerFormat"],
        "JWT"
    );

    let ops = operations(&doc);
    assert!(ops.len() >= 13, "only {} operations: {ops:?}", ops.len());
    for path in [
        "/health",
        "/api/v1/openapi.json",
        "/api/v1/servers",
        "/api/v1/organizations/{id}/hierarchy",
        "/api/v1/audit-log",
    ] {
        assert!(ops.iter().any(|(p, _)| p == path), "{path} not documented");
    }

    let mut operation_ids = HashSet::new();
    for (path, method) in &ops {
        let op = &doc["paths"][path][method];
        let id = op["operationId"].as_str().expect("operationId");
        assert!(operation_ids.insert(id.to_string()), "duplicate {id}");
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path}: no success response"
        );
        // `/health` is the unauthenticated liveness probe: no input, no
        // token, no rate limit, so no client error it could answer.
        if path != "/health" {
            let client_errors: Vec<&String> =
                responses.keys().filter(|s| s.starts_with('4')).collect();
            assert!(
                !client_errors.is_empty(),
                "{method} {path}: no 4xx response documented"
            );
            for status in client_errors {
                assert_eq!(
                    responses[status]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {status}: error body is not ErrorBody"
                );
            }
        }
        // Public by design: the probe, this document, the agent binary new
        // servers download (checked by the SHA-256 in their user-data), and
        // boot-stage reports (authenticated by the bootstrap token in the body).
        let public = [
            "/health",
            "/api/v1/openapi.json",
            "/agent/download/{os}/{arch}",
            "/api/v1/infrastructure/boot-stages",
        ]
        .contains(&path.as_str());
        if !public {
            assert_eq!(
                op["security"],
                serde_json::json!([{ "bearer": [] }]),
                "{method} {path}: bearer security requirement"
            );
            assert!(
                responses.contains_key("401"),
                "{method} {path}: no 401 documented"
            );
        }
        if path.starts_with("/api/v1/") {
            assert!(
                responses.contains_key("429"),
                "{method} {path}: no 429 documented"
            );
        }
        for (status, response) in responses {
            for (name, link) in response["links"].as_object().into_iter().flatten() {
                let target = link["operationId"].as_str().unwrap_or_else(|| {
                    panic!("{method} {path} {status}: link {name} has no operationId: {link}")
                });
                assert!(
                    ops.iter()
                        .any(|(p, m)| doc["paths"][p][m]["operationId"] == target),
                    "{method} {path} {status}: link {name} to unknown {target}"
                );
            }
        }
        if op.get("requestBody").is_some() {
            for status in ["400", "413", "422"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path}: body route without {status}"
                );
            }
        }
        for param in op["parameters"].as_array().into_iter().flatten() {
            if param["in"] == "path" {
                let name = param["name"].as_str().unwrap();
                assert!(path.contains(&format!("{{{name}}}")), "{path} {name}");
            }
        }
    }
}

async fn body_json(response: axum::response::Response) -> (StatusCode, Value) {
    let status = response.status();
    let is_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    let bytes = axum::body::to_bytes(response.into_body(), 4 << 20)
        .await
        .unwrap();
    if status.is_success() && is_text {
        // The Prometheus exposition: text by contract.
        return (
            status,
            Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        );
    }
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{status}: body is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, value)
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_no_other_method_is() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeArgs {
        data_dir: Some(dir.path().to_path_buf()),
        api_listen: Some("127.0.0.1:0".parse().unwrap()),
        quic_listen: Some("127.0.0.1:0".parse().unwrap()),
        branch_name: Some("openapi-test".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let running = tether_control_plane::app::start(config).await.unwrap();
    let token = std::fs::read_to_string(running.admin_token_file.as_ref().unwrap())
        .unwrap()
        .trim()
        .to_string();
    let router = tether_control_plane::api::router(running.state.clone());
    let send = |method: Method, uri: String, body: Option<&str>| {
        let router = router.clone();
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
            .unwrap();
        async move { body_json(router.oneshot(request).await.unwrap()).await }
    };

    // The fallbacks this test tells apart from a routed answer.
    let (status, body) = send(Method::GET, "/api/v1/no-such-thing".into(), None).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("no such route"))
    );

    let doc = document();
    for (path, method) in operations(&doc) {
        let uri = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let has_body = doc["paths"][&path][&method].get("requestBody").is_some();
        let (status, body) = send(m, uri.clone(), has_body.then_some("{}")).await;
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: {body}"
        );
        assert!(
            !(status == StatusCode::NOT_FOUND && body["message"] == "no such route"),
            "{method} {uri} is documented but not routed"
        );
        assert!(status.as_u16() < 500, "{method} {uri}: {status} {body}");
        if status.is_client_error() {
            assert!(
                body["error"].is_string() && body["message"].is_string(),
                "{body}"
            );
        }
    }
    // Router ⇒ document, on the documented paths: any other method is a 405.
    for (path, item) in doc["paths"].as_object().unwrap() {
        let uri = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        for method in METHODS.iter().filter(|m| item.get(**m).is_none()) {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = send(m, uri.clone(), None).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {uri} is routed but not documented: {body}"
            );
        }
    }

    // The served document is the generated one.
    let (status, served) = send(Method::GET, "/api/v1/openapi.json".into(), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, doc);
    running.shutdown().await;
}
