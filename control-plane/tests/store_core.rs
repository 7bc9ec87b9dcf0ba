//! The core store behaviour, on SQLite and PostgreSQL: the instance,
//! enrollment, sessions and certificates, presence, and server listings.
//!
//! Each `async fn` listed in `store_tests!` runs on SQLite and on PostgreSQL
//! (see `common/mod.rs`); the PostgreSQL half needs `TETHER_TEST_DATABASE_URL`
//! and fails without it (it never skips):
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_core
//! ```

#[macro_use]
mod common;

use common::*;

store_tests! {
    init_instance_creates_once_and_then_returns_the_existing_instance,
    enroll_creates_a_connecting_server_from_the_token_and_marks_it_used,
    enroll_names_the_server_after_its_hostname_when_the_token_has_no_name,
    enroll_refuses_used_unknown_and_expired_tokens,
    concurrent_enrollments_with_one_token_create_exactly_one_server,
    admit_session_admits_a_known_certificate_and_refuses_unknown_ones,
    removed_servers_are_refused_and_their_certificates_revoked [database],
    record_certificate_lets_the_server_connect_with_the_new_serial,
    mark_online_records_version_facts_and_hostname,
    mark_offline_only_moves_online_servers_offline,
    touch_servers_updates_last_seen_of_live_servers_only,
    server_lookup_is_limited_to_the_scope,
    list_servers_hides_servers_outside_the_scope,
    list_servers_filters_by_status_and_labels,
    list_servers_paginates_after_an_id_in_id_order,
}

// ---------------------------------------------------------------------------
// Instance.
// ---------------------------------------------------------------------------

async fn init_instance_creates_once_and_then_returns_the_existing_instance(store: Arc<dyn Store>) {
    assert!(store.instance().await.expect("instance").is_none());
    let at = now();
    let root = Organization {
        id: Uuid::now_v7(),
        name: "root".into(),
        parent_id: None,
        quotas: Quotas::default(),
        created_at: at,
    };
    let first = new_instance(root.id, at);
    let admin = admin_token(root.id, at);
    let (instance, created) = store
        .init_instance(&first, &root, &admin)
        .await
        .expect("first init_instance");
    assert!(created);
    assert_eq!(instance.branch_id, first.branch_id);

    // A second replica initialising with its own candidate gets the first.
    let other_root = Organization {
        id: Uuid::now_v7(),
        ..root.clone()
    };
    let second = new_instance(other_root.id, now());
    let (existing, created) = store
        .init_instance(&second, &other_root, &admin_token(other_root.id, now()))
        .await
        .expect("second init_instance");
    assert!(!created);
    assert_eq!(existing.branch_id, first.branch_id);
    assert_eq!(existing.branch_name, first.branch_name);
    assert_eq!(existing.root_organization_id, root.id);
    assert_eq!(existing.ca_cert_pem, first.ca_cert_pem);
    assert_eq!(existing.ca_key_sealed, first.ca_key_sealed);
    assert_eq!(existing.created_at, first.created_at);

    let stored = store
        .instance()
        .await
        .expect("instance")
        .expect("instance exists");
    assert_eq!(stored.branch_id, first.branch_id);
    assert_eq!(stored.root_organization_id, root.id);

    // The root organization and the admin token were created once.
    let stored_root = store
        .organization(root.id)
        .await
        .expect("organization")
        .expect("root organization exists");
    assert_eq!(stored_root.name, "root");
    assert_eq!(stored_root.parent_id, None);
    assert!(store
        .organization(other_root.id)
        .await
        .expect("organization")
        .is_none());
    let token = store
        .api_token(admin.id)
        .await
        .expect("api_token")
        .expect("admin token exists");
    assert_eq!(token.organization_id, root.id);
    assert_eq!(token.scopes, vec!["admin".to_string()]);
    assert_eq!(token.expires_at, admin.expires_at);
    assert_eq!(token.revoked_at, None);
}

// ---------------------------------------------------------------------------
// Enrollment.
// ---------------------------------------------------------------------------

async fn enroll_creates_a_connecting_server_from_the_token_and_marks_it_used(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let org = create_org(&*store, instance.root_organization_id, "team").await;
    let deployment_id = Uuid::now_v7();
    let token_hash = format!("sha256:{}", Uuid::new_v4().simple());
    store
        .create_enrollment_token(&NewEnrollmentToken {
            id: Uuid::now_v7(),
            token_hash: token_hash.clone(),
            organization_id: org,
            server_name: Some("web-1".into()),
            labels: labels(&[("env", "prod"), ("role", "web")]),
            deployment_id: Some(deployment_id),
            created_at: now(),
            expires_at: now() + Duration::hours(1),
        })
        .await
        .expect("create_enrollment_token");

    let e = enrollment(&token_hash, "ip-10-0-0-1");
    let server = try_enroll(&*store, &e).await.expect("enrollment accepted");
    assert_eq!(server.id, e.server_id);
    assert_eq!(server.organization_id, org);
    assert_eq!(server.name, "web-1");
    assert_eq!(server.hostname, "ip-10-0-0-1");
    assert_eq!(server.labels, labels(&[("env", "prod"), ("role", "web")]));
    assert_eq!(server.status, ServerStatus::Connecting);
    assert_eq!(server.agent_version.as_deref(), Some("0.1.0"));
    assert_eq!(server.facts, e.facts);
    assert_eq!(server.deployment_id, Some(deployment_id));
    assert_eq!(server.created_at, e.at);
    assert_eq!(server.last_seen_at, None);

    let stored = server_by_id(&*store, &[org], server.id).await;
    assert_eq!(stored.name, "web-1");
    assert_eq!(stored.status, ServerStatus::Connecting);

    // The token is spent.
    let again = enrollment(&token_hash, "ip-10-0-0-2");
    assert_eq!(
        try_enroll(&*store, &again).await.map(|s| s.id),
        Err(EnrollmentRefusal::TokenAlreadyUsed)
    );
    assert_eq!(listed_ids(&*store, &query(&[org])).await, vec![server.id]);
}

async fn enroll_names_the_server_after_its_hostname_when_the_token_has_no_name(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let token = create_token(
        &*store,
        root,
        None,
        Labels::new(),
        now() + Duration::hours(1),
    )
    .await;
    let server = try_enroll(&*store, &enrollment(&token, "db-7.example"))
        .await
        .expect("enrollment accepted");
    assert_eq!(server.name, "db-7.example");
    assert_eq!(server.hostname, "db-7.example");
    assert!(server.labels.is_empty());
}

async fn enroll_refuses_used_unknown_and_expired_tokens(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;

    let unknown = enrollment("sha256:never-issued", "a");
    assert_eq!(
        try_enroll(&*store, &unknown).await.map(|s| s.id),
        Err(EnrollmentRefusal::UnknownToken)
    );

    let expired = create_token(
        &*store,
        root,
        None,
        Labels::new(),
        now() - Duration::minutes(1),
    )
    .await;
    assert_eq!(
        try_enroll(&*store, &enrollment(&expired, "b"))
            .await
            .map(|s| s.id),
        Err(EnrollmentRefusal::ExpiredToken)
    );

    let token = create_token(
        &*store,
        root,
        None,
        Labels::new(),
        now() + Duration::hours(1),
    )
    .await;
    try_enroll(&*store, &enrollment(&token, "c"))
        .await
        .expect("first use accepted");
    assert_eq!(
        try_enroll(&*store, &enrollment(&token, "d"))
            .await
            .map(|s| s.id),
        Err(EnrollmentRefusal::TokenAlreadyUsed)
    );

    // Refused enrollments created nothing.
    assert_eq!(listed_ids(&*store, &query(&[root])).await.len(), 1);
}

async fn concurrent_enrollments_with_one_token_create_exactly_one_server(store: Arc<dyn Store>) {
    const RACERS: usize = 8;
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let token = create_token(
        &*store,
        root,
        None,
        Labels::new(),
        now() + Duration::hours(1),
    )
    .await;

    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let racers: Vec<_> = (0..RACERS)
        .map(|i| {
            let store = store.clone();
            let start = start.clone();
            let e = enrollment(&token, &format!("racer-{i}"));
            tokio::spawn(async move {
                start.wait().await;
                store.enroll(&e).await.map(|r| r.map(|s| s.id))
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut refused = Vec::new();
    for racer in racers {
        match racer.await.expect("racer task").expect("enroll") {
            Ok(id) => won.push(id),
            Err(refusal) => refused.push(refusal),
        }
    }
    assert_eq!(won.len(), 1, "exactly one enrollment wins: {won:?}");
    assert_eq!(
        refused,
        vec![EnrollmentRefusal::TokenAlreadyUsed; RACERS - 1]
    );
    assert_eq!(listed_ids(&*store, &query(&[root])).await, won);
}

// ---------------------------------------------------------------------------
// Sessions and certificates.
// ---------------------------------------------------------------------------

async fn admit_session_admits_a_known_certificate_and_refuses_unknown_ones(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (server, serial) =
        enroll_server(&*store, instance.root_organization_id, "web", Labels::new()).await;

    match store
        .admit_session(server.id, &serial)
        .await
        .expect("admit")
    {
        SessionAdmission::Admitted(admitted) => {
            assert_eq!(admitted.id, server.id);
            assert_eq!(admitted.hostname, "web");
        }
        other => panic!("expected Admitted, got {other:?}"),
    }
    assert!(matches!(
        store
            .admit_session(server.id, "not-a-serial")
            .await
            .expect("admit"),
        SessionAdmission::UnknownCertificate
    ));
    assert!(matches!(
        store
            .admit_session(Uuid::now_v7(), &serial)
            .await
            .expect("admit"),
        SessionAdmission::UnknownServer
    ));

    // A certificate of another server does not admit this one.
    let (other, other_serial) =
        enroll_server(&*store, instance.root_organization_id, "db", Labels::new()).await;
    assert!(matches!(
        store
            .admit_session(server.id, &other_serial)
            .await
            .expect("admit"),
        SessionAdmission::UnknownCertificate
    ));
    assert!(matches!(
        store
            .admit_session(other.id, &other_serial)
            .await
            .expect("admit"),
        SessionAdmission::Admitted(_)
    ));
}

async fn removed_servers_are_refused_and_their_certificates_revoked(
    store: Arc<dyn Store>,
    database: Database,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, serial) = enroll_server(&*store, root, "web", Labels::new()).await;
    let renewed = certificate(server.id, now());
    store
        .record_certificate(&renewed)
        .await
        .expect("record_certificate");

    // Outside the scope: not found, nothing changes.
    let elsewhere = create_org(&*store, root, "elsewhere").await;
    assert!(!store
        .remove_server(&[elsewhere], server.id, now())
        .await
        .expect("remove_server"));
    assert!(matches!(
        store
            .admit_session(server.id, &serial)
            .await
            .expect("admit"),
        SessionAdmission::Admitted(_)
    ));

    assert!(store
        .remove_server(&[root], server.id, now())
        .await
        .expect("remove_server"));
    assert!(!store
        .remove_server(&[root], server.id, now())
        .await
        .expect("second remove_server"));
    for serial in [&serial, &renewed.serial] {
        assert!(matches!(
            store.admit_session(server.id, serial).await.expect("admit"),
            SessionAdmission::ServerRemoved
        ));
    }
    assert!(store
        .server(&[root], server.id)
        .await
        .expect("server")
        .is_none());
    assert!(listed_ids(&*store, &query(&[root])).await.is_empty());

    // Every certificate of the server is revoked, not only the removal flag set:
    // even if the row were brought back, its certificates stay refused.
    let live_certificates = format!(
        "SELECT COUNT(*) FROM certificates WHERE CAST(server_id AS TEXT) = '{}' AND revoked_at IS NULL",
        server.id
    );
    assert_eq!(database.count(&live_certificates).await, 0);
    database
        .execute(&format!(
            "UPDATE servers SET deleted_at = NULL WHERE CAST(id AS TEXT) = '{}'",
            server.id
        ))
        .await
        .expect("bring the server row back");
    for serial in [&serial, &renewed.serial] {
        assert!(matches!(
            store.admit_session(server.id, serial).await.expect("admit"),
            SessionAdmission::CertificateRevoked
        ));
    }
}

async fn record_certificate_lets_the_server_connect_with_the_new_serial(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (server, old_serial) =
        enroll_server(&*store, instance.root_organization_id, "web", Labels::new()).await;
    let renewed = certificate(server.id, now() + Duration::days(60));
    assert!(matches!(
        store
            .admit_session(server.id, &renewed.serial)
            .await
            .expect("admit"),
        SessionAdmission::UnknownCertificate
    ));
    store
        .record_certificate(&renewed)
        .await
        .expect("record_certificate");
    match store
        .admit_session(server.id, &renewed.serial)
        .await
        .expect("admit")
    {
        SessionAdmission::Admitted(admitted) => assert_eq!(admitted.id, server.id),
        other => panic!("expected Admitted with the new serial, got {other:?}"),
    }
    // The old certificate stays valid until it is revoked or expires.
    assert!(matches!(
        store
            .admit_session(server.id, &old_serial)
            .await
            .expect("admit"),
        SessionAdmission::Admitted(_)
    ));
}

// ---------------------------------------------------------------------------
// Presence.
// ---------------------------------------------------------------------------

async fn mark_online_records_version_facts_and_hostname(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, _) = enroll_server(&*store, root, "old-name", Labels::new()).await;

    let at = now() + Duration::seconds(5);
    let facts = json!({ "hostname": "new-name", "os": "linux", "cpu_cores": 4 });
    store
        .mark_online(server.id, "0.2.0", &facts, at)
        .await
        .expect("mark_online");
    let online = server_by_id(&*store, &[root], server.id).await;
    assert_eq!(online.status, ServerStatus::Online);
    assert_eq!(online.status_reason, None);
    assert_eq!(online.agent_version.as_deref(), Some("0.2.0"));
    assert_eq!(online.facts, facts);
    assert_eq!(online.hostname, "new-name");
    assert_eq!(online.name, "old-name", "the name is not the hostname");
    assert_eq!(online.last_seen_at, Some(at));

    // Facts without a hostname keep the known one.
    let facts = json!({ "os": "linux" });
    store
        .mark_online(server.id, "0.2.1", &facts, at + Duration::seconds(1))
        .await
        .expect("mark_online");
    let online = server_by_id(&*store, &[root], server.id).await;
    assert_eq!(online.hostname, "new-name");
    assert_eq!(online.agent_version.as_deref(), Some("0.2.1"));
    assert_eq!(online.facts, facts);
}

async fn mark_offline_only_moves_online_servers_offline(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (connecting, _) = enroll_server(&*store, root, "connecting", Labels::new()).await;
    let (server, _) = enroll_server(&*store, root, "web", Labels::new()).await;

    // A server that never came online stays connecting.
    store
        .mark_offline(connecting.id, "session closed", now())
        .await
        .expect("mark_offline");
    let still = server_by_id(&*store, &[root], connecting.id).await;
    assert_eq!(still.status, ServerStatus::Connecting);

    let t0 = now();
    store
        .mark_online(server.id, "0.1.0", &json!({}), t0)
        .await
        .expect("mark_online");
    let t1 = t0 + Duration::seconds(30);
    store
        .mark_offline(server.id, "connection lost", t1)
        .await
        .expect("mark_offline");
    let offline = server_by_id(&*store, &[root], server.id).await;
    assert_eq!(offline.status, ServerStatus::Offline);
    assert_eq!(offline.status_reason.as_deref(), Some("connection lost"));
    assert_eq!(offline.last_seen_at, Some(t1));

    // Already offline: the first reason stays.
    store
        .mark_offline(server.id, "another reason", t1 + Duration::seconds(1))
        .await
        .expect("mark_offline");
    let offline = server_by_id(&*store, &[root], server.id).await;
    assert_eq!(offline.status_reason.as_deref(), Some("connection lost"));
    assert_eq!(offline.last_seen_at, Some(t1));

    // Back online clears the reason.
    store
        .mark_online(server.id, "0.1.0", &json!({}), t1 + Duration::seconds(2))
        .await
        .expect("mark_online");
    let online = server_by_id(&*store, &[root], server.id).await;
    assert_eq!(online.status, ServerStatus::Online);
    assert_eq!(online.status_reason, None);
}

async fn touch_servers_updates_last_seen_of_live_servers_only(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let (b, _) = enroll_server(&*store, root, "b", Labels::new()).await;
    let (c, _) = enroll_server(&*store, root, "c", Labels::new()).await;
    let (removed, _) = enroll_server(&*store, root, "removed", Labels::new()).await;
    let t0 = now();
    for id in [a.id, b.id, c.id, removed.id] {
        store
            .mark_online(id, "0.1.0", &json!({}), t0)
            .await
            .expect("mark_online");
    }
    assert!(store
        .remove_server(&[root], removed.id, t0)
        .await
        .expect("remove_server"));

    store.touch_servers(&[], t0).await.expect("empty touch");
    let t1 = t0 + Duration::seconds(20);
    store
        .touch_servers(&[b.id, a.id, Uuid::now_v7(), removed.id], t1)
        .await
        .expect("touch_servers");
    assert_eq!(
        server_by_id(&*store, &[root], a.id).await.last_seen_at,
        Some(t1)
    );
    assert_eq!(
        server_by_id(&*store, &[root], b.id).await.last_seen_at,
        Some(t1)
    );
    assert_eq!(
        server_by_id(&*store, &[root], c.id).await.last_seen_at,
        Some(t0)
    );
    for id in [a.id, b.id, c.id] {
        assert_eq!(
            server_by_id(&*store, &[root], id).await.status,
            ServerStatus::Online
        );
    }
    // The removed server is not brought back.
    assert!(store
        .server(&[root], removed.id)
        .await
        .expect("server")
        .is_none());
}

// ---------------------------------------------------------------------------
// Listing servers.
// ---------------------------------------------------------------------------

async fn server_lookup_is_limited_to_the_scope(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let b = create_org(&*store, root, "b").await;
    let (server, _) = enroll_server(&*store, a, "web", Labels::new()).await;

    assert_eq!(server_by_id(&*store, &[a], server.id).await.id, server.id);
    assert_eq!(
        server_by_id(&*store, &scope_of(&*store, root).await, server.id)
            .await
            .id,
        server.id
    );
    assert!(store
        .server(&[b], server.id)
        .await
        .expect("server")
        .is_none());
    assert!(store
        .server(&[], server.id)
        .await
        .expect("server")
        .is_none());
}

async fn list_servers_hides_servers_outside_the_scope(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let a_child = create_org(&*store, a, "a-child").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let (in_a, _) = enroll_server(&*store, a, "in-a", Labels::new()).await;
    let (in_child, _) = enroll_server(&*store, a_child, "in-child", Labels::new()).await;
    let (in_sibling, _) = enroll_server(&*store, sibling, "in-sibling", Labels::new()).await;
    let (in_root, _) = enroll_server(&*store, root, "in-root", Labels::new()).await;

    let a_scope = scope_of(&*store, a).await;
    assert_eq!(
        set(listed_ids(&*store, &query(&a_scope)).await),
        set([in_a.id, in_child.id])
    );
    assert_eq!(
        set(listed_ids(&*store, &query(&[sibling])).await),
        set([in_sibling.id])
    );
    assert_eq!(
        set(listed_ids(&*store, &query(&scope_of(&*store, root).await)).await),
        set([in_a.id, in_child.id, in_sibling.id, in_root.id])
    );
    assert!(listed_ids(&*store, &query(&[])).await.is_empty());
}

async fn list_servers_filters_by_status_and_labels(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (prod_web, _) = enroll_server(
        &*store,
        root,
        "prod-web",
        labels(&[("env", "prod"), ("role", "web")]),
    )
    .await;
    let (prod_db, _) = enroll_server(
        &*store,
        root,
        "prod-db",
        labels(&[("env", "prod"), ("role", "db")]),
    )
    .await;
    let (staging_web, _) = enroll_server(
        &*store,
        root,
        "staging-web",
        labels(&[("env", "staging"), ("role", "web")]),
    )
    .await;
    let (unlabelled, _) = enroll_server(&*store, root, "bare", Labels::new()).await;
    for id in [prod_web.id, staging_web.id] {
        store
            .mark_online(id, "0.1.0", &json!({}), now())
            .await
            .expect("mark_online");
    }

    let with = |status: Option<ServerStatus>, pairs: &[(&str, &str)]| ServerQuery {
        status,
        labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..query(&[root])
    };
    assert_eq!(
        set(listed_ids(&*store, &with(Some(ServerStatus::Online), &[])).await),
        set([prod_web.id, staging_web.id])
    );
    assert_eq!(
        set(listed_ids(&*store, &with(Some(ServerStatus::Connecting), &[])).await),
        set([prod_db.id, unlabelled.id])
    );
    assert!(listed_ids(&*store, &with(Some(ServerStatus::Timeout), &[]))
        .await
        .is_empty());
    assert_eq!(
        set(listed_ids(&*store, &with(None, &[("env", "prod")])).await),
        set([prod_web.id, prod_db.id])
    );
    assert_eq!(
        set(listed_ids(&*store, &with(None, &[("env", "prod"), ("role", "web")])).await),
        set([prod_web.id])
    );
    assert_eq!(
        set(listed_ids(
            &*store,
            &with(Some(ServerStatus::Online), &[("role", "web")])
        )
        .await),
        set([prod_web.id, staging_web.id])
    );
    assert!(listed_ids(&*store, &with(None, &[("env", "dev")]))
        .await
        .is_empty());
    assert!(listed_ids(&*store, &with(None, &[("owner", "prod")]))
        .await
        .is_empty());
    // A key must match as a whole key, not as a path or a prefix.
    assert!(listed_ids(&*store, &with(None, &[("en", "prod")]))
        .await
        .is_empty());
}

async fn list_servers_paginates_after_an_id_in_id_order(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let mut all = Vec::new();
    for i in 0..7 {
        // Random (v4) ids: id order is not creation order.
        let token = create_token(
            &*store,
            root,
            None,
            Labels::new(),
            now() + Duration::hours(1),
        )
        .await;
        let mut e = enrollment(&token, &format!("s{i}"));
        e.server_id = Uuid::new_v4();
        e.certificate.server_id = e.server_id;
        all.push(try_enroll(&*store, &e).await.expect("enroll").id);
    }
    all.sort();

    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = listed_ids(
            &*store,
            &ServerQuery {
                limit: 3,
                after,
                ..query(&[root])
            },
        )
        .await;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        after = page.last().copied();
        pages.push(page);
        assert!(pages.len() <= 3, "pagination does not end: {pages:?}");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    assert_eq!(
        pages.concat(),
        all,
        "pages are in id order without gaps or repeats"
    );
}

#[test]
fn with_database_replaces_only_the_database_name() {
    assert_eq!(
        with_database("postgres://u:p@127.0.0.1:5432/postgres", "t1"),
        "postgres://u:p@127.0.0.1:5432/t1"
    );
    assert_eq!(
        with_database("postgresql://u:p@host/postgres?sslmode=disable", "t1"),
        "postgresql://u:p@host/t1?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://host:5432", "t1"),
        "postgres://host:5432/t1"
    );
}
