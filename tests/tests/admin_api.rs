//! End-to-end: the admin API of a real `tether serve` on SQLite — organization
//! isolation, quota inheritance, scopes, revocation, rate limits, the audit
//! log, JSON errors for malformed input, cascading deletes and secrets at rest.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_tests::{Agent, ApiResponse, ControlPlane};

/// The root organization's id, as the admin token sees it.
async fn root_organization(cp: &ControlPlane, admin: &str) -> String {
    let list = cp
        .call(admin, Method::GET, "/api/v1/organizations", None)
        .await
        .unwrap();
    assert_eq!(list.status, 200, "{list:?}");
    list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["parent_id"].is_null())
        .expect("root organization")["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Enrolls a server (`tether-agent enroll`) into `organization_id`; returns its id.
async fn enroll_into(
    cp: &ControlPlane,
    admin: &str,
    dir: &std::path::Path,
    name: &str,
    organization_id: &str,
) -> String {
    let token = cp
        .call(
            admin,
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&json!({ "organization_id": organization_id, "server_name": name })),
        )
        .await
        .unwrap();
    assert_eq!(token.status, 201, "{token:?}");
    let agent = Agent::new(&dir.join(name));
    let (ok, stderr) = agent
        .enroll(cp, token.body["token"].as_str().unwrap())
        .unwrap();
    assert!(ok, "enroll {name} failed: {stderr}");
    agent.server_id().unwrap()
}

fn ids(page: &ApiResponse) -> HashSet<String> {
    page.body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {page:?}"))
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_string())
        .collect()
}

fn assert_error(response: &ApiResponse, status: u16, code: &str, what: &str) {
    assert_eq!(response.status.as_u16(), status, "{what}: {response:?}");
    assert_eq!(response.body["error"], code, "{what}: {response:?}");
    assert!(
        response.body["message"].is_string(),
        "{what}: no message: {response:?}"
    );
}

#[tokio::test]
async fn token_sees_its_organization_subtree_and_nothing_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let root = root_organization(&cp, &admin).await;
    let a = cp
        .create_organization(&admin, json!({ "name": "A" }))
        .await
        .unwrap();
    let a = a["id"].as_str().unwrap().to_string();
    assert_eq!(
        cp.call(
            &admin,
            Method::GET,
            &format!("/api/v1/organizations/{a}"),
            None
        )
        .await
        .unwrap()
        .body["parent_id"],
        root.as_str()
    );
    let b = cp
        .create_organization(&admin, json!({ "name": "B" }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a1 = cp
        .create_organization(&admin, json!({ "name": "A1", "parent_id": a }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let root_server = enroll_into(&cp, &admin, dir.path(), "in-root", &root).await;
    let b_server = enroll_into(&cp, &admin, dir.path(), "in-b", &b).await;
    let a1_server = enroll_into(&cp, &admin, dir.path(), "in-a1", &a1).await;
    let (_, token_a) = cp.create_token(&admin, &a, &["admin"]).await.unwrap();
    let (_, token_a1) = cp.create_token(&admin, &a1, &["admin"]).await.unwrap();

    // A sees A and A1, nothing else.
    let orgs = cp
        .call(&token_a, Method::GET, "/api/v1/organizations", None)
        .await
        .unwrap();
    assert_eq!(ids(&orgs), HashSet::from([a.clone(), a1.clone()]));
    for visible in [&a, &a1] {
        let got = cp
            .call(
                &token_a,
                Method::GET,
                &format!("/api/v1/organizations/{visible}"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
    }
    let tree = cp
        .call(
            &token_a,
            Method::GET,
            &format!("/api/v1/organizations/{a}/hierarchy"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(tree.status, 200);
    assert_eq!(tree.body["children"][0]["id"], a1.as_str());
    let servers = cp
        .call(&token_a, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(ids(&servers), HashSet::from([a1_server.clone()]));

    // Root and the sibling B, and their servers, do not exist for A.
    for hidden in [&root, &b] {
        for path in [
            format!("/api/v1/organizations/{hidden}"),
            format!("/api/v1/organizations/{hidden}/hierarchy"),
            format!("/api/v1/audit-log?organization_id={hidden}"),
        ] {
            let got = cp.call(&token_a, Method::GET, &path, None).await.unwrap();
            assert_error(&got, 404, "not_found", &path);
        }
    }
    for hidden in [&root_server, &b_server] {
        let path = format!("/api/v1/servers/{hidden}");
        let got = cp.call(&token_a, Method::GET, &path, None).await.unwrap();
        assert_error(&got, 404, "not_found", &path);
    }

    // Writes there are refused, and change nothing.
    let writes: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::PATCH,
            format!("/api/v1/organizations/{b}"),
            Some(json!({ "name": "mine" })),
        ),
        (
            Method::DELETE,
            format!("/api/v1/organizations/{b}?cascade=true"),
            None,
        ),
        (
            Method::PATCH,
            format!("/api/v1/organizations/{root}"),
            Some(json!({ "name": "mine" })),
        ),
        (
            Method::DELETE,
            format!("/api/v1/organizations/{root}"),
            None,
        ),
        (Method::DELETE, format!("/api/v1/servers/{b_server}"), None),
        (
            Method::DELETE,
            format!("/api/v1/servers/{root_server}"),
            None,
        ),
        (
            Method::POST,
            "/api/v1/organizations".into(),
            Some(json!({ "name": "x", "parent_id": b })),
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            Some(json!({ "name": "x", "organization_id": b, "scopes": ["admin"] })),
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            Some(json!({ "name": "x", "organization_id": root, "scopes": ["servers:read"] })),
        ),
        (
            Method::POST,
            "/api/v1/enrollment-tokens".into(),
            Some(json!({ "organization_id": b })),
        ),
        (
            Method::POST,
            "/api/v1/enrollment-tokens".into(),
            Some(json!({ "organization_id": root })),
        ),
    ];
    for (method, path, body) in writes {
        let got = cp
            .call(&token_a, method.clone(), &path, body.as_ref())
            .await
            .unwrap();
        assert!(
            matches!(got.status.as_u16(), 403 | 404),
            "{method} {path} by A: {got:?}"
        );
        assert!(got.body["error"].is_string(), "{got:?}");
    }
    for (path, name) in [
        (format!("/api/v1/organizations/{b}"), "B"),
        (format!("/api/v1/organizations/{root}"), "root"),
    ] {
        let still = cp.call(&admin, Method::GET, &path, None).await.unwrap();
        assert_eq!(still.status, 200);
        assert_eq!(still.body["name"], name);
    }
    let all = cp
        .call(&admin, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(
        ids(&all),
        HashSet::from([root_server.clone(), b_server.clone(), a1_server.clone()])
    );

    // A1 sees itself only: its parent and its parent's sibling are invisible.
    let orgs = cp
        .call(&token_a1, Method::GET, "/api/v1/organizations", None)
        .await
        .unwrap();
    assert_eq!(ids(&orgs), HashSet::from([a1.clone()]));
    for hidden in [&a, &b, &root] {
        let got = cp
            .call(
                &token_a1,
                Method::GET,
                &format!("/api/v1/organizations/{hidden}"),
                None,
            )
            .await
            .unwrap();
        assert_error(&got, 404, "not_found", "A1 looking up");
    }
}

#[tokio::test]
async fn quotas_inherit_down_the_tree_and_children_cannot_exceed_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let a = cp
        .create_organization(
            &admin,
            json!({ "name": "A", "quotas": { "max_servers": 1 } }),
        )
        .await
        .unwrap();
    assert_eq!(a["quotas"]["max_servers"], 1);
    let a = a["id"].as_str().unwrap().to_string();
    let a1 = cp
        .create_organization(&admin, json!({ "name": "A1", "parent_id": a }))
        .await
        .unwrap();
    assert!(
        a1["quotas"]["max_servers"].is_null(),
        "A1 is unlimited itself: {a1}"
    );
    let a1 = a1["id"].as_str().unwrap().to_string();

    let server = enroll_into(&cp, &admin, dir.path(), "only-one", &a1).await;
    let usage = cp
        .call(
            &admin,
            Method::GET,
            &format!("/api/v1/organizations/{a}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(usage.body["usage"]["servers"], 1, "{usage:?}");

    // A1 has no limit of its own, but A's limit of one server is used up.
    for org in [&a1, &a] {
        let refused = cp
            .call(
                &admin,
                Method::POST,
                "/api/v1/enrollment-tokens",
                Some(&json!({ "organization_id": org })),
            )
            .await
            .unwrap();
        assert_error(&refused, 403, "quota_exceeded", "second server");
        assert_eq!(refused.body["limit"], 1, "{refused:?}");
        assert_eq!(refused.body["usage"], 1, "{refused:?}");
        assert_eq!(refused.body["organization_id"], a.as_str());
        assert_eq!(refused.body["resource"], "max_servers");
    }
    // A sibling tree is not affected.
    let b = cp
        .create_organization(&admin, json!({ "name": "B" }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let allowed = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&json!({ "organization_id": b })),
        )
        .await
        .unwrap();
    assert_eq!(allowed.status, 201, "{allowed:?}");

    // Children cannot be given more than their ancestors allow.
    let too_big = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/organizations",
            Some(&json!({ "name": "A2", "parent_id": a, "quotas": { "max_servers": 2 } })),
        )
        .await
        .unwrap();
    assert_error(&too_big, 422, "validation_error", "child above parent");
    let grandchild = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/organizations",
            Some(&json!({ "name": "A1x", "parent_id": a1, "quotas": { "max_servers": 5 } })),
        )
        .await
        .unwrap();
    assert_error(
        &grandchild,
        422,
        "validation_error",
        "grandchild above grandparent",
    );
    let patched = cp
        .call(
            &admin,
            Method::PATCH,
            &format!("/api/v1/organizations/{a1}"),
            Some(&json!({ "quotas": { "max_servers": 5 } })),
        )
        .await
        .unwrap();
    assert_error(&patched, 422, "validation_error", "patch above parent");
    let negative = cp
        .call(
            &admin,
            Method::PATCH,
            &format!("/api/v1/organizations/{a1}"),
            Some(&json!({ "quotas": { "max_servers": -1 } })),
        )
        .await
        .unwrap();
    assert_error(&negative, 422, "validation_error", "negative quota");
    let misspelt = cp
        .call(
            &admin,
            Method::PATCH,
            &format!("/api/v1/organizations/{a1}"),
            Some(&json!({ "quotas": { "max_server": 1 } })),
        )
        .await
        .unwrap();
    assert_error(&misspelt, 422, "validation_error", "misspelt quota field");
    let within = cp
        .call(
            &admin,
            Method::PATCH,
            &format!("/api/v1/organizations/{a1}"),
            Some(&json!({ "quotas": { "max_servers": 1 } })),
        )
        .await
        .unwrap();
    assert_eq!(within.status, 200, "{within:?}");
    assert_eq!(within.body["quotas"]["max_servers"], 1);

    // Removing the server frees the quota again.
    let removed = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/servers/{server}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(removed.status, 204);
    let again = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&json!({ "organization_id": a1 })),
        )
        .await
        .unwrap();
    assert_eq!(again.status, 201, "{again:?}");
}

#[tokio::test]
async fn token_scopes_limit_what_it_can_do_and_cannot_be_exceeded_when_granting() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let root = root_organization(&cp, &admin).await;
    let (read_id, reader) = cp
        .create_token(&admin, &root, &["servers:read"])
        .await
        .unwrap();

    let list = cp
        .call(&reader, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(list.status, 200, "{list:?}");

    let enroll = cp
        .call(
            &reader,
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&json!({})),
        )
        .await
        .unwrap();
    assert_error(
        &enroll,
        403,
        "forbidden",
        "servers:read making an enrollment token",
    );
    assert_eq!(enroll.body["required_scope"], "servers:write");

    for scopes in [
        json!(["servers:read"]),
        json!(["admin"]),
        json!(["servers:write"]),
    ] {
        let grant = cp
            .call(
                &reader,
                Method::POST,
                "/api/v1/tokens",
                Some(&json!({ "name": "escalate", "organization_id": root, "scopes": scopes })),
            )
            .await
            .unwrap();
        assert_error(
            &grant,
            403,
            "forbidden",
            &format!("servers:read granting {scopes}"),
        );
    }
    let audit = cp
        .call(&reader, Method::GET, "/api/v1/audit-log", None)
        .await
        .unwrap();
    assert_error(
        &audit,
        403,
        "forbidden",
        "servers:read reading the audit log",
    );
    let org = cp
        .call(
            &reader,
            Method::POST,
            "/api/v1/organizations",
            Some(&json!({ "name": "x" })),
        )
        .await
        .unwrap();
    assert_error(
        &org,
        403,
        "forbidden",
        "servers:read creating an organization",
    );
    let revoke = cp
        .call(
            &reader,
            Method::DELETE,
            &format!("/api/v1/tokens/{read_id}"),
            None,
        )
        .await
        .unwrap();
    assert_error(&revoke, 403, "forbidden", "servers:read revoking a token");

    // A servers:write token may add servers but neither read the audit log
    // nor hand out tokens (with scopes it has or lacks).
    let (_, writer) = cp
        .create_token(&admin, &root, &["servers:write"])
        .await
        .unwrap();
    let enroll = cp
        .call(
            &writer,
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&json!({})),
        )
        .await
        .unwrap();
    assert_eq!(enroll.status, 201, "{enroll:?}");
    for scopes in [
        json!(["servers:write"]),
        json!(["servers:read"]),
        json!(["admin"]),
    ] {
        let grant = cp
            .call(
                &writer,
                Method::POST,
                "/api/v1/tokens",
                Some(&json!({ "name": "escalate", "organization_id": root, "scopes": scopes })),
            )
            .await
            .unwrap();
        assert_error(
            &grant,
            403,
            "forbidden",
            &format!("servers:write granting {scopes}"),
        );
    }

    // Unknown scopes are refused even to admin; no token was made by the refusals.
    let unknown = cp
        .call(
            &admin,
            Method::POST,
            "/api/v1/tokens",
            Some(&json!({ "name": "x", "organization_id": root, "scopes": ["root"] })),
        )
        .await
        .unwrap();
    assert_error(&unknown, 422, "validation_error", "unknown scope");
    let made = cp
        .call(
            &admin,
            Method::GET,
            "/api/v1/audit-log?action=token.create",
            None,
        )
        .await
        .unwrap();
    assert_eq!(made.body["data"].as_array().unwrap().len(), 2, "{made:?}");
}

#[tokio::test]
async fn revoked_token_is_refused_on_the_very_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let root = root_organization(&cp, &admin).await;
    let (id, token) = cp.create_token(&admin, &root, &["admin"]).await.unwrap();
    let used = cp
        .call(&token, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(used.status, 200, "{used:?}");

    let revoked = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(revoked.status, 204, "{revoked:?}");
    assert_eq!(revoked.body, Value::Null);

    let refused = cp
        .call(&token, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_error(&refused, 401, "unauthorized", "revoked token");
    let again = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            None,
        )
        .await
        .unwrap();
    assert_error(&again, 404, "not_found", "revoking twice");
    let admin_still = cp
        .call(&admin, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(admin_still.status, 200);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_past_the_limit_and_counts_in_headers() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--api-rate-limit", "5"])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let root = root_organization(&cp, &admin).await;
    let (_, reader) = cp
        .create_token(&admin, &root, &["servers:read"])
        .await
        .unwrap();

    for i in 0..5u32 {
        let ok = cp
            .call(&reader, Method::GET, "/api/v1/servers", None)
            .await
            .unwrap();
        assert_eq!(ok.status, 200, "request {}: {ok:?}", i + 1);
        assert_eq!(ok.header("x-ratelimit-limit"), Some("5"));
        assert_eq!(
            ok.header("x-ratelimit-remaining"),
            Some((4 - i).to_string().as_str()),
            "request {}",
            i + 1
        );
        let reset: u64 = ok.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!((1..=60).contains(&reset), "reset {reset}");
    }
    let limited = cp
        .call(&reader, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_error(&limited, 429, "rate_limit_exceeded", "6th request");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(limited.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
    assert!(limited.header("x-ratelimit-reset").is_some());

    // Errors count and carry the headers too; the admin token has its own tier.
    for _ in 0..10 {
        let ok = cp
            .call(&admin, Method::GET, "/api/v1/servers", None)
            .await
            .unwrap();
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("x-ratelimit-limit"), Some("3000"));
    }
    let unknown = cp
        .call(&admin, Method::GET, "/api/v1/servers/not-a-uuid", None)
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.header("x-ratelimit-remaining").is_some(),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn every_write_is_in_the_audit_log_with_actor_organization_target_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let x = cp
        .create_organization(&admin, json!({ "name": "audited" }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (t_id, t) = cp.create_token(&admin, &x, &["admin"]).await.unwrap();
    let y = cp
        .create_organization(&t, json!({ "name": "made by t" }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let server = enroll_into(&cp, &admin, dir.path(), "audited-server", &x).await;
    let revoked = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/tokens/{t_id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(revoked.status, 204);
    let deleted = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/servers/{server}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);

    let log = cp
        .call(&admin, Method::GET, "/api/v1/audit-log", None)
        .await
        .unwrap();
    assert_eq!(log.status, 200, "{log:?}");
    let entries = log.body["data"].as_array().unwrap().clone();
    let find = |action: &str, target: &str| -> Value {
        entries
            .iter()
            .find(|e| e["action"] == action && e["target"] == target)
            .unwrap_or_else(|| panic!("no {action} of {target} in {entries:#?}"))
            .clone()
    };
    let t_actor = format!("token:{t_id}");
    let expected = [
        ("organization.create", x.clone(), x.clone(), None),
        ("token.create", t_id.clone(), x.clone(), None),
        (
            "organization.create",
            y.clone(),
            y.clone(),
            Some(t_actor.clone()),
        ),
        ("token.revoke", t_id.clone(), x.clone(), None),
        ("server.delete", server.clone(), x.clone(), None),
    ];
    let mut admin_actor = None;
    for (action, target, org, actor) in &expected {
        let entry = find(action, target);
        assert_eq!(entry["organization_id"], org.as_str(), "{entry}");
        assert_eq!(entry["source_ip"], "127.0.0.1", "{entry}");
        assert_eq!(entry["outcome"], "success", "{entry}");
        assert!(
            entry["at"].is_string() && entry["id"].is_string(),
            "{entry}"
        );
        let who = entry["actor"].as_str().unwrap().to_string();
        assert!(who.starts_with("token:"), "{entry}");
        match actor {
            Some(actor) => assert_eq!(&who, actor),
            None => {
                assert_ne!(who, t_actor, "{entry}");
                assert_eq!(admin_actor.get_or_insert(who.clone()), &who, "{entry}");
            }
        }
    }
    let enrollment = entries
        .iter()
        .find(|e| e["action"] == "enrollment_token.create")
        .unwrap_or_else(|| panic!("no enrollment_token.create in {entries:#?}"));
    assert_eq!(enrollment["organization_id"], x.as_str());
    assert_eq!(enrollment["source_ip"], "127.0.0.1");
    assert!(enrollment["target"].is_string());
    let no_secret = serde_json::to_string(&entries).unwrap();
    assert!(!no_secret.contains(&t), "a token in the audit log");

    // Newest first.
    let times: Vec<&str> = entries.iter().map(|e| e["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted);

    // Filters.
    let revokes = cp
        .call(
            &admin,
            Method::GET,
            "/api/v1/audit-log?action=token.revoke",
            None,
        )
        .await
        .unwrap();
    let revokes = revokes.body["data"].as_array().unwrap();
    assert_eq!(revokes.len(), 1, "{revokes:?}");
    assert_eq!(revokes[0]["target"], t_id.as_str());
    let by_t = cp
        .call(
            &admin,
            Method::GET,
            &format!("/api/v1/audit-log?actor={t_actor}"),
            None,
        )
        .await
        .unwrap();
    let by_t = by_t.body["data"].as_array().unwrap();
    assert_eq!(by_t.len(), 1, "{by_t:?}");
    assert_eq!(by_t[0]["action"], "organization.create");
    let admin_actor = admin_actor.unwrap();
    let by_admin = cp
        .call(
            &admin,
            Method::GET,
            &format!("/api/v1/audit-log?actor={admin_actor}"),
            None,
        )
        .await
        .unwrap();
    let by_admin = by_admin.body["data"].as_array().unwrap();
    assert!(by_admin.len() >= 5, "{by_admin:?}");
    assert!(by_admin.iter().all(|e| e["actor"] == admin_actor.as_str()));

    // Pagination walks the same entries, each once, in the same order.
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/audit-log?limit=2&cursor={c}"),
            None => "/api/v1/audit-log?limit=2".to_string(),
        };
        let page = cp.call(&admin, Method::GET, &path, None).await.unwrap();
        assert_eq!(page.status, 200, "{page:?}");
        let data = page.body["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        walked.extend(data.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        pages += 1;
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
        assert!(pages < 100, "pagination does not end");
    }
    let all: Vec<String> = entries
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(pages >= 3, "{pages} pages of 2 for {} entries", all.len());
    assert_eq!(walked, all);
    let bad_cursor = cp
        .call(&admin, Method::GET, "/api/v1/audit-log?cursor=nope", None)
        .await
        .unwrap();
    assert_error(&bad_cursor, 400, "invalid_request", "bad cursor");
}

#[tokio::test]
async fn audit_log_keeps_the_entries_of_deleted_organizations() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let x = cp
        .create_organization(&admin, json!({ "name": "short-lived" }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let y = cp
        .create_organization(&admin, json!({ "name": "child", "parent_id": x }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (t_id, _) = cp
        .create_token(&admin, &x, &["servers:read"])
        .await
        .unwrap();
    let deleted = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/organizations/{y}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let deleted = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/organizations/{x}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{deleted:?}");

    // What happened in an organization stays on record after it is gone.
    let log = cp
        .call(&admin, Method::GET, "/api/v1/audit-log", None)
        .await
        .unwrap();
    assert_eq!(log.status, 200, "{log:?}");
    let entries = log.body["data"].as_array().unwrap();
    for (action, target, org) in [
        ("organization.create", &x, &x),
        ("organization.create", &y, &y),
        ("token.create", &t_id, &x),
        ("organization.delete", &y, &y),
        ("organization.delete", &x, &x),
    ] {
        let entry = entries
            .iter()
            .find(|e| e["action"] == action && e["target"] == target.as_str())
            .unwrap_or_else(|| {
                panic!("{action} of {target} is missing from the audit log: {entries:#?}")
            });
        assert_eq!(entry["organization_id"], org.as_str(), "{entry}");
        assert_eq!(entry["source_ip"], "127.0.0.1", "{entry}");
        assert_eq!(entry["outcome"], "success", "{entry}");
        assert!(
            entry["actor"].as_str().unwrap().starts_with("token:"),
            "{entry}"
        );
    }
    let deletions = cp
        .call(
            &admin,
            Method::GET,
            "/api/v1/audit-log?action=organization.delete",
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        deletions.body["data"].as_array().unwrap().len(),
        2,
        "{deletions:?}"
    );
}

#[tokio::test]
async fn malformed_input_on_every_write_route_answers_a_json_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let root = root_organization(&cp, &admin).await;
    let org = cp
        .create_organization(&admin, json!({ "name": "target" }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // (method, path, a body with a wrong type, a valid body plus an unknown field)
    let routes: Vec<(Method, String, Value, Value)> = vec![
        (
            Method::POST,
            "/api/v1/enrollment-tokens".into(),
            json!({ "ttl_seconds": "soon" }),
            json!({ "ttl_seconds": 600, "surprise": 1 }),
        ),
        (
            Method::POST,
            "/api/v1/organizations".into(),
            json!({ "name": 5 }),
            json!({ "name": "x", "surprise": 1 }),
        ),
        (
            Method::PATCH,
            format!("/api/v1/organizations/{org}"),
            json!({ "quotas": { "max_servers": "lots" } }),
            json!({ "name": "y", "colour": "red" }),
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            json!({ "name": "t", "organization_id": root, "scopes": "admin" }),
            json!({ "name": "t", "organization_id": root, "scopes": ["admin"], "admin": true }),
        ),
    ];
    let oversized = format!(r#"{{"name": "{}"}}"#, "a".repeat((1 << 20) + 1024));
    for (method, path, wrong_type, unknown_field) in &routes {
        let what = |case: &str| format!("{method} {path}: {case}");
        let send = |content_type: Option<&'static str>, body: String| {
            let mut request = cp.request_as(&admin, method.clone(), path);
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            async move { ApiResponse::read(request.body(body).send().await.unwrap()).await }
        };
        let json_type = Some("application/json");

        let got = send(json_type, "{".into()).await.unwrap();
        assert_error(&got, 400, "invalid_request", &what("truncated JSON"));
        let got = send(json_type, "{not json".into()).await.unwrap();
        assert_error(&got, 400, "invalid_request", &what("malformed JSON"));
        let got = send(json_type, wrong_type.to_string()).await.unwrap();
        assert_error(&got, 422, "validation_error", &what("wrong type"));
        let got = send(json_type, unknown_field.to_string()).await.unwrap();
        assert_error(&got, 422, "validation_error", &what("unknown field"));
        let got = send(json_type, "[]".into()).await.unwrap();
        assert_error(&got, 422, "validation_error", &what("an array"));
        let got = send(Some("text/plain"), unknown_field.to_string())
            .await
            .unwrap();
        assert_error(&got, 400, "invalid_request", &what("text/plain"));
        let got = send(None, unknown_field.to_string()).await.unwrap();
        assert_error(&got, 400, "invalid_request", &what("no content type"));
        let got = send(json_type, oversized.clone()).await.unwrap();
        assert_eq!(
            got.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{}: {got:?}",
            what("oversized")
        );
        assert!(
            got.body["error"].is_string() && got.body["message"].is_string(),
            "{got:?}"
        );
    }

    // Routes that take no body: malformed ids and queries.
    for (method, path, status) in [
        (
            Method::DELETE,
            "/api/v1/servers/not-a-uuid".to_string(),
            404,
        ),
        (Method::DELETE, "/api/v1/tokens/not-a-uuid".to_string(), 404),
        (
            Method::DELETE,
            "/api/v1/organizations/not-a-uuid".to_string(),
            404,
        ),
        (
            Method::DELETE,
            format!("/api/v1/organizations/{org}?cascade=maybe"),
            400,
        ),
        (
            Method::DELETE,
            format!("/api/v1/organizations/{org}?surprise=1"),
            400,
        ),
        (
            Method::PATCH,
            "/api/v1/organizations/not-a-uuid".to_string(),
            404,
        ),
        (Method::GET, "/api/v1/servers?limit=-1".to_string(), 400),
        (
            Method::GET,
            "/api/v1/audit-log?from=yesterday".to_string(),
            400,
        ),
    ] {
        let got = cp.call(&admin, method.clone(), &path, None).await.unwrap();
        assert_eq!(got.status.as_u16(), status, "{method} {path}: {got:?}");
        assert!(got.body["error"].is_string(), "{method} {path}: {got:?}");
    }
    // NUL and other control characters are refused in names and filters
    // (PostgreSQL cannot even store NUL in text).
    for (method, path, body, status) in [
        (
            Method::POST,
            "/api/v1/tokens".to_string(),
            Some(json!({ "name": "a\u{0}b", "organization_id": root, "scopes": ["servers:read"] })),
            422,
        ),
        (
            Method::POST,
            "/api/v1/enrollment-tokens".to_string(),
            Some(json!({ "server_name": "a\u{0}b" })),
            422,
        ),
        (
            Method::POST,
            "/api/v1/organizations".to_string(),
            Some(json!({ "name": "a\u{7}b" })),
            422,
        ),
        (
            Method::PATCH,
            format!("/api/v1/organizations/{org}"),
            Some(json!({ "name": "a\nb" })),
            422,
        ),
        (
            Method::GET,
            "/api/v1/audit-log?actor=a%00b".to_string(),
            None,
            400,
        ),
        (
            Method::GET,
            "/api/v1/audit-log?action=a%00b".to_string(),
            None,
            400,
        ),
        (
            Method::GET,
            "/api/v1/servers?label=a%3Db%00".to_string(),
            None,
            400,
        ),
    ] {
        let got = cp
            .call(&admin, method.clone(), &path, body.as_ref())
            .await
            .unwrap();
        assert_eq!(
            got.status.as_u16(),
            status,
            "{method} {path} {body:?}: {got:?}"
        );
        assert!(got.body["error"].is_string(), "{got:?}");
    }

    // Nothing above changed the organization.
    let still = cp
        .call(
            &admin,
            Method::GET,
            &format!("/api/v1/organizations/{org}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(still.body["name"], "target");
}

#[tokio::test]
async fn deleting_an_organization_with_children_or_servers_needs_cascade() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let admin = cp.admin_token();
    let parent = cp
        .create_organization(&admin, json!({ "name": "parent" }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let child = cp
        .create_organization(&admin, json!({ "name": "child", "parent_id": parent }))
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let server = enroll_into(&cp, &admin, dir.path(), "in-child", &child).await;
    let keeper = enroll_into(
        &cp,
        &admin,
        dir.path(),
        "in-root",
        &root_organization(&cp, &admin).await,
    )
    .await;

    let refused = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/organizations/{parent}"),
            None,
        )
        .await
        .unwrap();
    assert_error(&refused, 409, "conflict", "parent with a child");
    let refused = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/organizations/{child}"),
            None,
        )
        .await
        .unwrap();
    assert_error(&refused, 409, "conflict", "child with a server");
    let listed = cp
        .call(&admin, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(
        ids(&listed),
        HashSet::from([server.clone(), keeper.clone()])
    );

    let cascaded = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/organizations/{parent}?cascade=true"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(cascaded.status, 204, "{cascaded:?}");
    let listed = cp
        .call(&admin, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(ids(&listed), HashSet::from([keeper.clone()]));
    for path in [
        format!("/api/v1/servers/{server}"),
        format!("/api/v1/organizations/{parent}"),
        format!("/api/v1/organizations/{child}"),
    ] {
        let gone = cp.call(&admin, Method::GET, &path, None).await.unwrap();
        assert_error(&gone, 404, "not_found", &path);
    }
    let root = root_organization(&cp, &admin).await;
    let root_delete = cp
        .call(
            &admin,
            Method::DELETE,
            &format!("/api/v1/organizations/{root}?cascade=true"),
            None,
        )
        .await
        .unwrap();
    assert!(
        matches!(root_delete.status.as_u16(), 403 | 409),
        "the root organization cannot be deleted: {root_delete:?}"
    );
}

/// Every occurrence-worthy form of a PEM private key: each base64 line of its
/// body, the body as one line, and its DER bytes.
fn pem_needles(pem: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let lines: Vec<&str> = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let joined = lines.concat();
    let mut needles: Vec<Vec<u8>> = lines
        .iter()
        .filter(|l| l.len() >= 16)
        .map(|l| l.as_bytes().to_vec())
        .collect();
    needles.push(joined.as_bytes().to_vec());
    let der = base64::engine::general_purpose::STANDARD
        .decode(&joined)
        .expect("PEM body is base64");
    needles.push(der);
    needles
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_secret_is_readable_in_the_raw_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("cp");
    let mut cp = ControlPlane::start(&data_dir, &[]).await.unwrap();
    let admin = cp.admin_token();
    let root = root_organization(&cp, &admin).await;
    let enrollment = cp.enrollment_token(json!({})).await.unwrap();
    let enrollment = enrollment["token"].as_str().unwrap().to_string();
    let (_, api_token) = cp
        .create_token(&admin, &root, &["servers:read"])
        .await
        .unwrap();
    // Use both, so the database has seen them at work.
    let used = cp
        .call(&api_token, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(used.status, 200);
    let (ok, stderr) = Agent::new(&dir.path().join("agent"))
        .enroll(&cp, &enrollment)
        .unwrap();
    assert!(ok, "{stderr}");

    // The database as an attacker copying the files of the running instance would get it.
    let mut raw = Vec::new();
    for file in ["tether.db", "tether.db-wal"] {
        if let Ok(bytes) = std::fs::read(data_dir.join(file)) {
            raw.extend_from_slice(&bytes);
        }
    }
    assert!(
        raw.len() > 4096,
        "database files not found in {}",
        data_dir.display()
    );
    cp.stop(false);

    // The CA key in clear, read the way the control plane itself does.
    let ca_key_pem = {
        let store = tether_control_plane::store::open(&format!(
            "sqlite://{}",
            data_dir.join("tether.db").display()
        ))
        .await
        .unwrap();
        let instance = store.instance().await.unwrap().expect("instance");
        let sealer =
            tether_control_plane::rotate::load_sealer(&data_dir.join("master.key")).unwrap();
        let pem = sealer
            .open(
                &instance.ca_key_sealed,
                tether_control_plane::store::INSTANCE_CA_KEY_CONTEXT,
            )
            .unwrap();
        String::from_utf8(pem).unwrap()
    };
    assert!(ca_key_pem.contains("PRIVATE KEY"), "not a PEM key");
    let master_key = std::fs::read_to_string(data_dir.join("master.key")).unwrap();

    let mut secrets: Vec<(String, Vec<u8>)> = pem_needles(&ca_key_pem)
        .into_iter()
        .map(|n| ("the CA private key".to_string(), n))
        .collect();
    // Each token whole, and the part that makes it secret on its own: the
    // random part of the enrollment token, the signature of a JWT.
    let random_part = enrollment
        .strip_prefix("tet_enr_")
        .expect("tet_enr_ prefix");
    let signature = |jwt: &str| jwt.rsplit('.').next().unwrap().to_string();
    for (name, secret) in [
        ("the enrollment token", enrollment.clone()),
        (
            "the enrollment token's random part",
            random_part.to_string(),
        ),
        ("the API token", api_token.clone()),
        ("the API token's signature", signature(&api_token)),
        ("the admin token", admin.clone()),
        ("the admin token's signature", signature(&admin)),
        ("the master key", master_key.trim().to_string()),
    ] {
        assert!(
            secret.len() >= 32,
            "{name}: too short to search for: {secret:?}"
        );
        secrets.push((name.into(), secret.into_bytes()));
    }
    let master_key = master_key.trim();
    if master_key.len() == 64 && master_key.bytes().all(|b| b.is_ascii_hexdigit()) {
        let raw_key: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&master_key[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        secrets.push(("the master key's bytes".into(), raw_key));
    }
    secrets.push(("a PEM private key".into(), b"PRIVATE KEY".to_vec()));
    for (name, needle) in &secrets {
        assert!(
            !contains(&raw, needle),
            "{name} is readable in the database file"
        );
    }
}
