//! The store behaviour suite: every test is written once, against the
//! [`Store`] trait, and runs on every backend.
//!
//! `store_tests!` turns each `async fn` below into a module with two tests,
//! `<name>::sqlite` (a fresh SQLite file in a temporary directory) and
//! `<name>::postgres` (a fresh database `tether_test_<random>` created on the
//! server named by `TETHER_TEST_DATABASE_URL`, dropped afterwards). Stores are
//! opened with [`store::open`], so migrations run as in production.
//!
//! The PostgreSQL half needs a server; without `TETHER_TEST_DATABASE_URL` it
//! fails (it never skips):
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh)
//! cargo test -p tether-control-plane --test store_suite
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
    organization_scope_includes_descendants_of_any_depth_but_not_parents_or_siblings,
    list_organizations_lists_the_scope_in_id_order,
    update_organization_changes_name_and_quotas_of_live_organizations,
    organization_ancestors_lists_itself_first_and_the_root_last,
    organization_usage_sums_the_subtree_with_memory_rounded_up_per_server,
    delete_organization_without_cascade_refuses_children_and_servers,
    delete_organization_with_cascade_removes_the_subtree_and_its_servers [database],
    api_tokens_are_created_looked_up_and_revoked_within_the_scope,
    list_audit_filters_newest_first_and_paginates_by_sequence,
    audit_log_refuses_update_and_delete_in_the_database [database],
    sealed_secrets_lists_the_ca_key_and_replace_is_compare_and_swap,
    ingest_metrics_stores_a_replayed_batch_once [database],
    metrics_points_returns_the_range_oldest_first_with_every_field,
    container_sets_are_replaced_only_by_a_newer_batch,
    compute_rollups_recomputes_buckets_touched_since_the_last_run,
    concurrent_compute_rollups_write_each_bucket_once,
    prune_metrics_deletes_only_older_rows,
    latest_metrics_returns_the_newest_point_of_each_live_server_in_the_scope,
    latest_container_sets_return_reports_of_live_servers_in_the_scope,
    ingest_metrics_takes_thousands_of_points_in_one_call [database],
    ingest_metrics_survives_nul_characters_in_agent_strings,
    concurrent_replays_of_the_same_batches_store_them_once [database],
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

// ---------------------------------------------------------------------------
// Organizations.
// ---------------------------------------------------------------------------

async fn organization_scope_includes_descendants_of_any_depth_but_not_parents_or_siblings(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let b = create_org(&*store, a, "b").await;
    let c = create_org(&*store, b, "c").await;
    let d = create_org(&*store, c, "d").await;
    let a2 = create_org(&*store, a, "a2").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let nephew = create_org(&*store, sibling, "nephew").await;

    assert_eq!(set(scope_of(&*store, a).await), set([a, b, c, d, a2]));
    assert_eq!(set(scope_of(&*store, c).await), set([c, d]));
    assert_eq!(set(scope_of(&*store, d).await), set([d]));
    assert_eq!(
        set(scope_of(&*store, sibling).await),
        set([sibling, nephew])
    );
    assert_eq!(
        set(scope_of(&*store, root).await),
        set([root, a, b, c, d, a2, sibling, nephew])
    );
    assert!(scope_of(&*store, Uuid::now_v7()).await.is_empty());
}

async fn list_organizations_lists_the_scope_in_id_order(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let mut expected = vec![a];
    for name in ["b", "c", "d"] {
        expected.push(create_org(&*store, a, name).await);
    }
    let _outside = create_org(&*store, root, "outside").await;
    expected.sort();

    let scope = scope_of(&*store, a).await;
    let listed: Vec<Uuid> = store
        .list_organizations(&scope, 100, None)
        .await
        .expect("list_organizations")
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(listed, expected);

    let first = store
        .list_organizations(&scope, 2, None)
        .await
        .expect("list_organizations");
    let rest = store
        .list_organizations(&scope, 2, first.last().map(|o| o.id))
        .await
        .expect("list_organizations");
    let paged: Vec<Uuid> = first.iter().chain(rest.iter()).map(|o| o.id).collect();
    assert_eq!(paged, expected);
    assert!(store
        .list_organizations(&[], 100, None)
        .await
        .expect("list_organizations")
        .is_empty());
}

async fn update_organization_changes_name_and_quotas_of_live_organizations(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;

    let renamed = store
        .update_organization(
            a,
            &OrganizationUpdate {
                name: Some("renamed".into()),
                quotas: None,
            },
        )
        .await
        .expect("update_organization")
        .expect("live organization");
    assert_eq!(renamed.name, "renamed");
    assert_eq!(renamed.quotas, Quotas::default());
    assert_eq!(renamed.parent_id, Some(root));

    let quotas = Quotas {
        max_servers: Some(10),
        max_cpu_cores: None,
        max_memory_gb: Some(64),
    };
    let limited = store
        .update_organization(
            a,
            &OrganizationUpdate {
                name: None,
                quotas: Some(quotas.clone()),
            },
        )
        .await
        .expect("update_organization")
        .expect("live organization");
    assert_eq!(limited.name, "renamed");
    assert_eq!(limited.quotas, quotas);
    let stored = store
        .organization(a)
        .await
        .expect("organization")
        .expect("live organization");
    assert_eq!(stored.quotas, quotas);

    assert!(store
        .update_organization(Uuid::now_v7(), &OrganizationUpdate::default())
        .await
        .expect("update_organization")
        .is_none());
    assert_eq!(
        store
            .delete_organization(a, false, now())
            .await
            .expect("delete"),
        OrganizationDeletion::Deleted {
            organizations: 1,
            servers: 0
        }
    );
    assert!(store
        .update_organization(
            a,
            &OrganizationUpdate {
                name: Some("ghost".into()),
                quotas: None
            }
        )
        .await
        .expect("update_organization")
        .is_none());
}

async fn organization_ancestors_lists_itself_first_and_the_root_last(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let b = create_org(&*store, a, "b").await;
    let c = create_org(&*store, b, "c").await;
    let _sibling = create_org(&*store, a, "sibling").await;

    let ancestors = store
        .organization_ancestors(c)
        .await
        .expect("organization_ancestors");
    assert_eq!(
        ancestors.iter().map(|o| o.id).collect::<Vec<_>>(),
        vec![c, b, a, root]
    );
    assert_eq!(
        ancestors
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>(),
        vec!["c", "b", "a", "root"]
    );
    let of_root = store
        .organization_ancestors(root)
        .await
        .expect("organization_ancestors");
    assert_eq!(of_root.iter().map(|o| o.id).collect::<Vec<_>>(), vec![root]);
    assert!(store
        .organization_ancestors(Uuid::now_v7())
        .await
        .expect("organization_ancestors")
        .is_empty());
}

async fn organization_usage_sums_the_subtree_with_memory_rounded_up_per_server(
    store: Arc<dyn Store>,
) {
    const GIB: u64 = 1 << 30;
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let a_child = create_org(&*store, a, "a-child").await;
    let sibling = create_org(&*store, root, "sibling").await;

    let report = |cpu_cores: u64, memory_bytes: u64| json!({ "cpu_cores": cpu_cores, "memory_bytes": memory_bytes });
    let cases = [
        (a, report(2, GIB + GIB / 2)), // 1.5 GiB -> 2
        (a, report(4, 4 * GIB)),       // exactly 4 GiB -> 4
        (a_child, report(8, 1)),       // one byte -> 1
        (sibling, report(16, 32 * GIB)),
    ];
    for (i, (org, facts)) in cases.iter().enumerate() {
        let (server, _) = enroll_server(&*store, *org, &format!("s{i}"), Labels::new()).await;
        store
            .mark_online(server.id, "0.1.0", facts, now())
            .await
            .expect("mark_online");
    }
    // Removed servers use nothing.
    let (removed, _) = enroll_server(&*store, a_child, "removed", Labels::new()).await;
    store
        .mark_online(removed.id, "0.1.0", &report(64, 64 * GIB), now())
        .await
        .expect("mark_online");
    assert!(store
        .remove_server(&[a_child], removed.id, now())
        .await
        .expect("remove_server"));

    let usage = |id| {
        let store = store.clone();
        async move {
            store
                .organization_usage(id)
                .await
                .expect("organization_usage")
        }
    };
    assert_eq!(
        usage(a).await,
        Usage {
            servers: 3,
            cpu_cores: 14,
            memory_gb: 7
        }
    );
    assert_eq!(
        usage(a_child).await,
        Usage {
            servers: 1,
            cpu_cores: 8,
            memory_gb: 1
        }
    );
    assert_eq!(
        usage(root).await,
        Usage {
            servers: 4,
            cpu_cores: 30,
            memory_gb: 39
        }
    );
    let empty = create_org(&*store, root, "empty").await;
    assert_eq!(usage(empty).await, Usage::default());
}

async fn delete_organization_without_cascade_refuses_children_and_servers(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let parent = create_org(&*store, root, "parent").await;
    let child = create_org(&*store, parent, "child").await;
    let with_server = create_org(&*store, root, "with-server").await;
    let (server, serial) = enroll_server(&*store, with_server, "web", Labels::new()).await;
    let empty = create_org(&*store, root, "empty").await;

    let delete = |id| {
        let store = store.clone();
        async move {
            store
                .delete_organization(id, false, now())
                .await
                .expect("delete_organization")
        }
    };
    assert_eq!(delete(parent).await, OrganizationDeletion::HasChildren);
    assert_eq!(delete(with_server).await, OrganizationDeletion::HasServers);
    assert_eq!(delete(Uuid::now_v7()).await, OrganizationDeletion::NotFound);
    // Refusals changed nothing.
    for id in [parent, child, with_server] {
        assert!(store
            .organization(id)
            .await
            .expect("organization")
            .is_some());
    }
    assert!(matches!(
        store
            .admit_session(server.id, &serial)
            .await
            .expect("admit"),
        SessionAdmission::Admitted(_)
    ));

    assert_eq!(
        delete(empty).await,
        OrganizationDeletion::Deleted {
            organizations: 1,
            servers: 0
        }
    );
    assert!(store
        .organization(empty)
        .await
        .expect("organization")
        .is_none());
    assert_eq!(delete(empty).await, OrganizationDeletion::NotFound);

    // Once its only child is gone, the parent can go.
    assert_eq!(
        delete(child).await,
        OrganizationDeletion::Deleted {
            organizations: 1,
            servers: 0
        }
    );
    assert_eq!(
        delete(parent).await,
        OrganizationDeletion::Deleted {
            organizations: 1,
            servers: 0
        }
    );
    assert!(!scope_of(&*store, root).await.contains(&parent));
}

async fn delete_organization_with_cascade_removes_the_subtree_and_its_servers(
    store: Arc<dyn Store>,
    database: Database,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let b = create_org(&*store, a, "b").await;
    let c = create_org(&*store, b, "c").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let (in_a, serial_a) = enroll_server(&*store, a, "in-a", Labels::new()).await;
    let (in_c, serial_c) = enroll_server(&*store, c, "in-c", Labels::new()).await;
    let (in_sibling, serial_sibling) =
        enroll_server(&*store, sibling, "in-sibling", Labels::new()).await;
    let (in_root, _) = enroll_server(&*store, root, "in-root", Labels::new()).await;

    let at = now();
    assert_eq!(
        store
            .delete_organization(a, true, at)
            .await
            .expect("delete_organization"),
        OrganizationDeletion::Deleted {
            organizations: 3,
            servers: 2
        }
    );
    for id in [a, b, c] {
        assert!(store
            .organization(id)
            .await
            .expect("organization")
            .is_none());
        assert!(scope_of(&*store, id).await.is_empty());
    }
    assert_eq!(set(scope_of(&*store, root).await), set([root, sibling]));
    assert!(store
        .organization(sibling)
        .await
        .expect("organization")
        .is_some());

    for (server, serial) in [(&in_a, &serial_a), (&in_c, &serial_c)] {
        assert!(matches!(
            store.admit_session(server.id, serial).await.expect("admit"),
            SessionAdmission::ServerRemoved
        ));
        let live_certificates = format!(
            "SELECT COUNT(*) FROM certificates WHERE CAST(server_id AS TEXT) = '{}' AND revoked_at IS NULL",
            server.id
        );
        assert_eq!(database.count(&live_certificates).await, 0);
    }
    assert!(matches!(
        store
            .admit_session(in_sibling.id, &serial_sibling)
            .await
            .expect("admit"),
        SessionAdmission::Admitted(_)
    ));
    assert_eq!(
        set(listed_ids(&*store, &query(&[root, a, b, c, sibling])).await),
        set([in_root.id, in_sibling.id])
    );
    assert_eq!(
        store.organization_usage(root).await.expect("usage").servers,
        2
    );
    assert_eq!(
        store
            .delete_organization(a, true, now())
            .await
            .expect("delete_organization"),
        OrganizationDeletion::NotFound
    );
}

// ---------------------------------------------------------------------------
// API tokens.
// ---------------------------------------------------------------------------

async fn api_tokens_are_created_looked_up_and_revoked_within_the_scope(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let at = now();
    let token = ApiToken {
        id: Uuid::now_v7(),
        organization_id: a,
        name: "ci".into(),
        scopes: vec!["servers:read".into(), "servers:write".into()],
        created_at: at,
        expires_at: Some(at + Duration::days(30)),
        revoked_at: None,
    };
    store
        .create_api_token(&token)
        .await
        .expect("create_api_token");
    let forever = ApiToken {
        id: Uuid::now_v7(),
        name: "forever".into(),
        scopes: Vec::new(),
        expires_at: None,
        ..token.clone()
    };
    store
        .create_api_token(&forever)
        .await
        .expect("create_api_token");

    let stored = store
        .api_token(token.id)
        .await
        .expect("api_token")
        .expect("token exists");
    assert_eq!(stored.organization_id, a);
    assert_eq!(stored.name, "ci");
    assert_eq!(stored.scopes, token.scopes);
    assert_eq!(stored.created_at, at);
    assert_eq!(stored.expires_at, token.expires_at);
    assert_eq!(stored.revoked_at, None);
    let stored = store
        .api_token(forever.id)
        .await
        .expect("api_token")
        .expect("token exists");
    assert!(stored.scopes.is_empty());
    assert_eq!(stored.expires_at, None);
    assert!(store
        .api_token(Uuid::now_v7())
        .await
        .expect("api_token")
        .is_none());

    // Outside the scope: not found, not revoked.
    assert!(!store
        .revoke_api_token(&[sibling], token.id, now())
        .await
        .expect("revoke_api_token"));
    assert_eq!(
        store
            .api_token(token.id)
            .await
            .expect("api_token")
            .expect("token exists")
            .revoked_at,
        None
    );

    let revoked_at = now();
    assert!(store
        .revoke_api_token(&scope_of(&*store, root).await, token.id, revoked_at)
        .await
        .expect("revoke_api_token"));
    assert_eq!(
        store
            .api_token(token.id)
            .await
            .expect("api_token")
            .expect("token exists")
            .revoked_at,
        Some(revoked_at)
    );
    assert!(!store
        .revoke_api_token(&[a], Uuid::now_v7(), now())
        .await
        .expect("revoke_api_token"));
    // The other token is untouched.
    assert_eq!(
        store
            .api_token(forever.id)
            .await
            .expect("api_token")
            .expect("token exists")
            .revoked_at,
        None
    );
}

// ---------------------------------------------------------------------------
// Audit log.
// ---------------------------------------------------------------------------

async fn list_audit_filters_newest_first_and_paginates_by_sequence(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let t = now() - Duration::hours(1);
    let at = |minutes: i64| t + Duration::minutes(minutes);
    let entries = [
        audit_entry("alice", Some(a), "server.remove", at(0)),
        audit_entry("bob", Some(a), "token.create", at(1)),
        audit_entry("agent", None, "enroll.refused", at(2)),
        audit_entry("alice", Some(sibling), "server.remove", at(3)),
        audit_entry("alice", Some(a), "token.create", at(4)),
        audit_entry("bob", Some(a), "server.remove", at(5)),
    ];
    for entry in &entries {
        store.append_audit(entry).await.expect("append_audit");
    }
    let ids =
        |records: &[store::AuditRecord]| records.iter().map(|r| r.entry.id).collect::<Vec<_>>();
    let expect = |indices: &[usize]| indices.iter().map(|&i| entries[i].id).collect::<Vec<_>>();
    let list = |q: AuditQuery| {
        let store = store.clone();
        async move { store.list_audit(&q).await.expect("list_audit") }
    };
    let base = AuditQuery {
        scope: vec![a],
        limit: 100,
        ..AuditQuery::default()
    };

    // Scope, newest first, all fields back.
    let records = list(base.clone()).await;
    assert_eq!(ids(&records), expect(&[5, 4, 1, 0]));
    assert!(records.windows(2).all(|w| w[0].seq > w[1].seq));
    let newest = &records[0].entry;
    assert_eq!(newest.at, entries[5].at);
    assert_eq!(newest.actor, "bob");
    assert_eq!(newest.organization_id, Some(a));
    assert_eq!(newest.action, "server.remove");
    assert_eq!(newest.target.as_deref(), Some("server/1"));
    assert_eq!(newest.source_ip.as_deref(), Some("192.0.2.7"));
    assert_eq!(newest.outcome, "success");
    assert_eq!(newest.detail, json!({ "note": "server.remove" }));

    // Entries tied to no organization only on request.
    assert_eq!(
        ids(&list(AuditQuery {
            include_unscoped: true,
            ..base.clone()
        })
        .await),
        expect(&[5, 4, 2, 1, 0])
    );
    assert_eq!(
        ids(&list(AuditQuery {
            scope: Vec::new(),
            include_unscoped: true,
            ..base.clone()
        })
        .await),
        expect(&[2])
    );
    assert!(list(AuditQuery {
        scope: Vec::new(),
        ..base.clone()
    })
    .await
    .is_empty());
    assert_eq!(
        ids(&list(AuditQuery {
            scope: vec![a, sibling],
            ..base.clone()
        })
        .await),
        expect(&[5, 4, 3, 1, 0])
    );

    // Actor and action.
    assert_eq!(
        ids(&list(AuditQuery {
            actor: Some("alice".into()),
            ..base.clone()
        })
        .await),
        expect(&[4, 0])
    );
    assert_eq!(
        ids(&list(AuditQuery {
            action: Some("token.create".into()),
            ..base.clone()
        })
        .await),
        expect(&[4, 1])
    );
    assert_eq!(
        ids(&list(AuditQuery {
            actor: Some("bob".into()),
            action: Some("server.remove".into()),
            ..base.clone()
        })
        .await),
        expect(&[5])
    );

    // Time window, both ends inclusive.
    assert_eq!(
        ids(&list(AuditQuery {
            from: Some(at(1)),
            to: Some(at(4)),
            include_unscoped: true,
            ..base.clone()
        })
        .await),
        expect(&[4, 2, 1])
    );
    assert_eq!(
        ids(&list(AuditQuery {
            from: Some(at(5)),
            ..base.clone()
        })
        .await),
        expect(&[5])
    );
    assert_eq!(
        ids(&list(AuditQuery {
            to: Some(at(0)),
            ..base.clone()
        })
        .await),
        expect(&[0])
    );

    // Pages of two, each older than the last one seen.
    let mut pages = Vec::new();
    let mut before_seq = None;
    loop {
        let page = list(AuditQuery {
            limit: 2,
            before_seq,
            include_unscoped: true,
            ..base.clone()
        })
        .await;
        if page.is_empty() {
            break;
        }
        before_seq = page.last().map(|r| r.seq);
        pages.push(ids(&page));
        assert!(pages.len() <= 3, "pagination does not end");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(pages.concat(), expect(&[5, 4, 2, 1, 0]));
}

async fn audit_log_refuses_update_and_delete_in_the_database(
    store: Arc<dyn Store>,
    database: Database,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let entry = audit_entry("alice", Some(root), "server.remove", now());
    store.append_audit(&entry).await.expect("append_audit");

    let update = database
        .execute("UPDATE audit_log SET actor = 'mallory'")
        .await;
    assert!(update.is_err(), "UPDATE of audit_log succeeded: {update:?}");
    let delete = database.execute("DELETE FROM audit_log").await;
    assert!(
        delete.is_err(),
        "DELETE from audit_log succeeded: {delete:?}"
    );

    let records = store
        .list_audit(&AuditQuery {
            scope: vec![root],
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .expect("list_audit");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].entry.id, entry.id);
    assert_eq!(records[0].entry.actor, "alice");

    // Appending still works.
    store
        .append_audit(&audit_entry("bob", Some(root), "token.create", now()))
        .await
        .expect("append_audit");
}

// ---------------------------------------------------------------------------
// Sealed secrets.
// ---------------------------------------------------------------------------

async fn sealed_secrets_lists_the_ca_key_and_replace_is_compare_and_swap(store: Arc<dyn Store>) {
    assert!(store
        .sealed_secrets()
        .await
        .expect("sealed_secrets")
        .is_empty());
    let instance = init(&*store).await;

    let secrets = store.sealed_secrets().await.expect("sealed_secrets");
    assert_eq!(secrets.len(), 1);
    let ca_key = &secrets[0];
    assert_eq!(ca_key.kind, SealedKind::InstanceCaKey);
    assert_eq!(ca_key.id, "1");
    assert_eq!(ca_key.context, store::INSTANCE_CA_KEY_CONTEXT);
    assert_eq!(ca_key.sealed, instance.ca_key_sealed);

    assert!(store
        .replace_sealed_secret(ca_key, "v1:1111:resealed")
        .await
        .expect("replace_sealed_secret"));
    let stored = store
        .instance()
        .await
        .expect("instance")
        .expect("instance exists");
    assert_eq!(stored.ca_key_sealed, "v1:1111:resealed");

    // The value read before the swap is stale now.
    assert!(!store
        .replace_sealed_secret(ca_key, "v1:2222:lost-update")
        .await
        .expect("replace_sealed_secret"));
    let secrets = store.sealed_secrets().await.expect("sealed_secrets");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].sealed, "v1:1111:resealed");
    assert!(store
        .replace_sealed_secret(&secrets[0], "v1:2222:resealed")
        .await
        .expect("replace_sealed_secret"));
    assert_eq!(
        store
            .instance()
            .await
            .expect("instance")
            .expect("instance exists")
            .ca_key_sealed,
        "v1:2222:resealed"
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

// ---------------------------------------------------------------------------
// Telemetry.
// ---------------------------------------------------------------------------

/// A metrics point with every field set.
fn point(server_id: Uuid, seq: i64, ts: DateTime<Utc>) -> MetricsRecord {
    MetricsRecord {
        server_id,
        seq,
        ts,
        cpu_percent: 12.5,
        load_1: 0.5,
        load_5: 0.25,
        load_15: 0.125,
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 4 << 30,
        swap_used_bytes: 1 << 20,
        swap_total_bytes: 1 << 30,
        cpu_per_core: json!([10.0, 15.0]).into(),
        disks: json!([{
            "mount_point": "/", "device": "/dev/sda1", "filesystem": "ext4",
            "total_bytes": 100_000_000_000u64, "used_bytes": 50_000_000_000u64,
            "inodes_total": 6_000_000, "inodes_used": 300_000,
        }])
        .into(),
        networks: json!([{
            "interface": "eth0", "rx_bytes": 1_000_000, "tx_bytes": 2_000_000,
            "rx_packets": 3_000, "tx_packets": 4_000, "rx_errors": 0, "tx_errors": 1,
        }])
        .into(),
        uptime_seconds: 86_400,
        process_count: 120,
        dropped_batches: 0,
    }
}

fn container(container_id: &str, name: &str) -> ContainerRecord {
    ContainerRecord {
        container_id: container_id.into(),
        name: name.into(),
        image: format!("{name}:1.0"),
        state: "running".into(),
        health: Some("healthy".into()),
        restart_count: 2,
        started_at: Some("2026-11-22T10:00:00Z".into()),
        cpu_percent: 1.25,
        memory_usage_bytes: 64 << 20,
        memory_limit_bytes: 512 << 20,
        net_rx_bytes: 1_000,
        net_tx_bytes: 2_000,
        block_read_bytes: 3_000,
        block_write_bytes: 4_000,
    }
}

fn report(
    server_id: Uuid,
    seq: i64,
    at: DateTime<Utc>,
    containers: Vec<ContainerRecord>,
) -> ContainerSet {
    ContainerSet {
        server_id,
        seq,
        docker_version: Some("27.3.1".into()),
        error: None,
        updated_at: at,
        containers,
    }
}

async fn ingest(
    store: &dyn Store,
    received_at: DateTime<Utc>,
    metrics: Vec<MetricsRecord>,
    containers: Vec<ContainerSet>,
) {
    store
        .ingest_metrics(&MetricsIngest {
            received_at,
            metrics,
            containers,
        })
        .await
        .expect("ingest_metrics");
}

async fn points(store: &dyn Store, server_id: Uuid) -> Vec<MetricsRecord> {
    let t = now();
    store
        .metrics_points(
            server_id,
            t - Duration::days(365),
            t + Duration::days(365),
            100_000,
        )
        .await
        .expect("metrics_points")
}

async fn rollups(store: &dyn Store, server_id: Uuid, step_seconds: i64) -> Vec<RollupRecord> {
    let t = now();
    store
        .metrics_rollups(
            server_id,
            step_seconds,
            t - Duration::days(365),
            t + Duration::days(365),
            100_000,
        )
        .await
        .expect("metrics_rollups")
}

async fn compute(store: &dyn Store, step_seconds: i64, at: DateTime<Utc>) -> u64 {
    store
        .compute_rollups(step_seconds, at)
        .await
        .expect("compute_rollups")
}

/// `t` rounded down to a multiple of `seconds` since the Unix epoch.
fn aligned(t: DateTime<Utc>, seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp().div_euclid(seconds) * seconds, 0)
        .expect("aligned time is representable")
}

fn seqs(records: &[MetricsRecord]) -> Vec<i64> {
    records.iter().map(|r| r.seq).collect()
}

async fn ingest_metrics_stores_a_replayed_batch_once(store: Arc<dyn Store>, database: Database) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let (b, _) = enroll_server(&*store, root, "b", Labels::new()).await;
    let t = now() - Duration::minutes(10);
    let first = point(a.id, 1, t);
    let mut replayed = first.clone();
    replayed.cpu_percent = 99.0;

    // The same (server, seq) twice in one ingest: stored once, the first.
    ingest(
        &*store,
        now(),
        vec![
            first.clone(),
            replayed.clone(),
            point(a.id, 2, t + Duration::seconds(10)),
            point(b.id, 1, t),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(database.count("SELECT COUNT(*) FROM metrics").await, 3);
    let stored = points(&*store, a.id).await;
    assert_eq!(seqs(&stored), vec![1, 2]);
    assert_eq!(stored[0], first);

    // Across ingests: the replay is a no-op, new points still go in.
    ingest(
        &*store,
        now(),
        vec![
            replayed,
            point(a.id, 2, t + Duration::seconds(10)),
            point(a.id, 3, t + Duration::seconds(20)),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(database.count("SELECT COUNT(*) FROM metrics").await, 4);
    let stored = points(&*store, a.id).await;
    assert_eq!(seqs(&stored), vec![1, 2, 3]);
    assert_eq!(stored[0], first);
    assert_eq!(seqs(&points(&*store, b.id).await), vec![1]);

    // An empty ingest is fine.
    ingest(&*store, now(), Vec::new(), Vec::new()).await;
    assert_eq!(database.count("SELECT COUNT(*) FROM metrics").await, 4);
}

async fn metrics_points_returns_the_range_oldest_first_with_every_field(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let (other, _) = enroll_server(&*store, root, "other", Labels::new()).await;
    let t0 = now() - Duration::hours(1);
    let at = |minutes: i64| t0 + Duration::minutes(minutes);

    // Every field distinct, floats that are not round in binary, nested
    // JSON with large integers.
    let mut detailed = point(a.id, 7, at(2));
    detailed.cpu_percent = 0.1 + 0.2;
    detailed.load_1 = 1.0 / 3.0;
    detailed.load_5 = f64::from(12.3f32);
    detailed.load_15 = 1e-9;
    detailed.memory_used_bytes = 123_456_789_012;
    detailed.memory_total_bytes = i64::MAX;
    detailed.swap_used_bytes = 0;
    detailed.swap_total_bytes = 7;
    detailed.cpu_per_core = json!([0.1, 99.9, f64::from(33.3f32), 0.0, 100.0]).into();
    detailed.disks = json!([
        {
            "mount_point": "/", "device": "/dev/nvme0n1p2", "filesystem": "ext4",
            "total_bytes": u64::MAX, "used_bytes": 1, "inodes_total": 0, "inodes_used": 0,
        },
        {
            "mount_point": "/srv/data ü", "device": "tank/data", "filesystem": "zfs",
            "total_bytes": 42, "used_bytes": 41, "inodes_total": 3, "inodes_used": 2,
        },
    ])
    .into();
    detailed.networks = json!([]).into();
    detailed.uptime_seconds = 1;
    detailed.process_count = 2;
    detailed.dropped_batches = 3;

    // Ingested out of order; seq order is not ts order.
    let written = vec![
        point(a.id, 9, at(4)),
        point(a.id, 5, at(0)),
        detailed.clone(),
        point(a.id, 8, at(3)),
        point(a.id, 6, at(1)),
        point(other.id, 1, at(2)),
    ];
    ingest(&*store, now(), written, Vec::new()).await;

    // [from, to): from inclusive, to exclusive; oldest first.
    let range = store
        .metrics_points(a.id, at(1), at(4), 100)
        .await
        .expect("metrics_points");
    assert_eq!(seqs(&range), vec![6, 7, 8]);
    assert_eq!(range[1], detailed);
    assert_eq!(range[0], point(a.id, 6, at(1)));

    assert_eq!(
        seqs(&points(&*store, a.id).await),
        vec![5, 6, 7, 8, 9],
        "all points, by ts"
    );
    let limited = store
        .metrics_points(a.id, at(0), at(10), 2)
        .await
        .expect("metrics_points");
    assert_eq!(seqs(&limited), vec![5, 6]);
    assert!(store
        .metrics_points(a.id, at(5), at(10), 100)
        .await
        .expect("metrics_points")
        .is_empty());
    assert!(store
        .metrics_points(Uuid::now_v7(), at(0), at(10), 100)
        .await
        .expect("metrics_points")
        .is_empty());
}

async fn container_sets_are_replaced_only_by_a_newer_batch(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let (b, _) = enroll_server(&*store, root, "b", Labels::new()).await;
    let t = now();
    let current = |id: Uuid| {
        let store = store.clone();
        async move { store.container_set(id).await.expect("container_set") }
    };
    assert_eq!(current(a.id).await, None);

    let mut db = container("c2", "db");
    db.health = None;
    db.started_at = None;
    db.cpu_percent = 0.1 + 0.2;
    let first = report(a.id, 5, t, vec![container("c1", "web"), db.clone()]);
    ingest(&*store, now(), Vec::new(), vec![first.clone()]).await;
    let stored = current(a.id).await.expect("a has a report");
    assert_eq!(stored.seq, 5);
    assert_eq!(stored.docker_version.as_deref(), Some("27.3.1"));
    assert_eq!(stored.error, None);
    assert_eq!(stored.updated_at, t);
    // Containers come back by name.
    assert_eq!(stored.containers, vec![db.clone(), container("c1", "web")]);

    // An older batch and a replay of the same batch change nothing.
    let older = report(
        a.id,
        3,
        t + Duration::seconds(1),
        vec![container("c9", "old")],
    );
    let mut replay = report(
        a.id,
        5,
        t + Duration::seconds(2),
        vec![container("c8", "replayed")],
    );
    replay.docker_version = Some("1.0".into());
    ingest(&*store, now(), Vec::new(), vec![older, replay]).await;
    assert_eq!(current(a.id).await, Some(stored.clone()));

    // A newer batch replaces the whole set: db is gone, web changed.
    let mut web = container("c1", "web");
    web.state = "restarting".into();
    web.restart_count = 3;
    let mut newer = report(a.id, 7, t + Duration::seconds(3), vec![web]);
    newer.docker_version = None;
    newer.error = Some("permission denied on /var/run/docker.sock".into());
    ingest(&*store, now(), Vec::new(), vec![newer.clone()]).await;
    assert_eq!(current(a.id).await, Some(newer));

    // Several sets of one server in one ingest: the newest wins whatever
    // the order; other servers' sets go in alongside.
    let nine = report(
        a.id,
        9,
        t + Duration::seconds(4),
        vec![container("c3", "cache")],
    );
    let eight = report(
        a.id,
        8,
        t + Duration::seconds(5),
        vec![container("c4", "queue")],
    );
    let for_b = report(b.id, 1, t, vec![container("c1", "web")]);
    ingest(
        &*store,
        now(),
        Vec::new(),
        vec![nine.clone(), for_b.clone(), eight],
    )
    .await;
    assert_eq!(current(a.id).await, Some(nine));
    assert_eq!(current(b.id).await, Some(for_b));

    // A newer empty set empties the list.
    let empty = report(a.id, 10, t + Duration::seconds(6), Vec::new());
    ingest(&*store, now(), Vec::new(), vec![empty.clone()]).await;
    assert_eq!(current(a.id).await, Some(empty));
    assert_eq!(current(Uuid::now_v7()).await, None);
}

async fn compute_rollups_recomputes_buckets_touched_since_the_last_run(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let (b, _) = enroll_server(&*store, root, "b", Labels::new()).await;
    let hour = aligned(now(), 3600) - Duration::hours(2);
    let at = |seconds: i64| hour + Duration::seconds(seconds);
    let sample = |server_id: Uuid, seq: i64, ts: DateTime<Utc>, cpu: f64, memory: i64| {
        let mut p = point(server_id, seq, ts);
        p.cpu_percent = cpu;
        p.load_1 = cpu / 10.0;
        p.memory_used_bytes = memory;
        p.memory_total_bytes = 8_000 + seq;
        p.swap_used_bytes = memory / 2;
        p
    };
    let received = now();
    ingest(
        &*store,
        received,
        vec![
            sample(a.id, 1, at(10), 10.0, 1_000),
            sample(a.id, 2, at(70), 20.0, 2_000),
            sample(a.id, 3, at(299), 30.0, 3_000),
            sample(a.id, 4, at(300), 50.0, 5_000),
            sample(b.id, 1, at(20), 80.0, 8_000),
        ],
        Vec::new(),
    )
    .await;

    // Nothing received before the first run: a run "before" the ingest
    // writes nothing.
    assert_eq!(
        compute(&*store, 300, received - Duration::seconds(1)).await,
        0
    );
    // Three buckets: a's first two, b's first.
    let run1 = received + Duration::seconds(1);
    assert_eq!(compute(&*store, 300, run1).await, 3);
    let bucket =
        |server_id: Uuid, start: i64, samples: i64, cpu: (f64, f64), memory: f64, total| {
            RollupRecord {
                server_id,
                step_seconds: 300,
                bucket_start: at(start),
                samples,
                cpu_percent_avg: cpu.0,
                cpu_percent_max: cpu.1,
                load_1_avg: cpu.0 / 10.0,
                memory_used_bytes_avg: memory,
                memory_total_bytes: total,
                swap_used_bytes_avg: memory / 2.0,
            }
        };
    assert_eq!(
        rollups(&*store, a.id, 300).await,
        vec![
            bucket(a.id, 0, 3, (20.0, 30.0), 2_000.0, 8_003),
            bucket(a.id, 300, 1, (50.0, 50.0), 5_000.0, 8_004),
        ]
    );
    assert_eq!(
        rollups(&*store, b.id, 300).await,
        vec![bucket(b.id, 0, 1, (80.0, 80.0), 8_000.0, 8_001)]
    );
    // Nothing new: nothing written, and the query range is [from, to).
    assert_eq!(compute(&*store, 300, run1 + Duration::seconds(5)).await, 0);
    let window = store
        .metrics_rollups(a.id, 300, at(300), at(600), 10)
        .await
        .expect("metrics_rollups");
    assert_eq!(window.len(), 1);
    assert_eq!(window[0].bucket_start, at(300));
    assert!(store
        .metrics_rollups(a.id, 300, at(0), at(300), 10)
        .await
        .expect("metrics_rollups")
        .iter()
        .all(|r| r.bucket_start == at(0)));

    // A late point for the first bucket, received after the watermark:
    // that bucket (only) is recomputed from all its points.
    let late_received = run1 + Duration::seconds(10);
    ingest(
        &*store,
        late_received,
        vec![sample(a.id, 5, at(150), 40.0, 4_000)],
        Vec::new(),
    )
    .await;
    let run2 = late_received + Duration::seconds(1);
    assert_eq!(compute(&*store, 300, run2).await, 1);
    assert_eq!(
        rollups(&*store, a.id, 300).await,
        vec![
            bucket(a.id, 0, 4, (25.0, 40.0), 2_500.0, 8_005),
            bucket(a.id, 300, 1, (50.0, 50.0), 5_000.0, 8_004),
        ]
    );
    assert_eq!(compute(&*store, 300, run2 + Duration::seconds(1)).await, 0);

    // A point stamped as received after `now` waits for a later run.
    let future = run2 + Duration::minutes(30);
    ingest(
        &*store,
        future,
        vec![sample(a.id, 6, at(900), 60.0, 6_000)],
        Vec::new(),
    )
    .await;
    assert_eq!(compute(&*store, 300, run2 + Duration::seconds(2)).await, 0);
    assert_eq!(
        compute(&*store, 300, future + Duration::seconds(1)).await,
        1
    );
    assert_eq!(rollups(&*store, a.id, 300).await.len(), 3);

    // Each step keeps its own watermark: hourly buckets start from scratch.
    assert_eq!(
        compute(&*store, 3600, future + Duration::seconds(1)).await,
        2
    );
    let hourly = rollups(&*store, a.id, 3600).await;
    assert_eq!(hourly.len(), 1);
    assert_eq!(hourly[0].bucket_start, hour);
    assert_eq!(hourly[0].step_seconds, 3600);
    assert_eq!(hourly[0].samples, 6);
    assert_eq!(hourly[0].cpu_percent_max, 60.0);
    assert_eq!(hourly[0].cpu_percent_avg, 35.0);
    assert_eq!(rollups(&*store, a.id, 300).await.len(), 3);
}

async fn concurrent_compute_rollups_write_each_bucket_once(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let base = aligned(now(), 300) - Duration::hours(3);
    let mut metrics = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let (server, _) = enroll_server(&*store, root, name, Labels::new()).await;
        for seq in 0..30 {
            metrics.push(point(server.id, seq, base + Duration::minutes(seq)));
        }
    }
    let received = now();
    ingest(&*store, received, metrics, Vec::new()).await;

    // Four servers, 30 minutes each: 6 five-minute buckets per server.
    let run = received + Duration::seconds(1);
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { compute(&*store, 300, run).await })
        })
        .collect();
    let mut written = 0;
    for r in runs {
        written += r.await.expect("compute task");
    }
    assert_eq!(written, 24);
    assert_eq!(compute(&*store, 300, run + Duration::seconds(1)).await, 0);
}

async fn prune_metrics_deletes_only_older_rows(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let base = aligned(now(), 300);
    let three_days = base - Duration::days(3);
    let two_days = base - Duration::days(2);
    let one_hour = base - Duration::hours(1);
    ingest(
        &*store,
        now(),
        vec![
            point(a.id, 1, three_days),
            point(a.id, 2, two_days),
            point(a.id, 3, one_hour),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(compute(&*store, 300, now() + Duration::seconds(1)).await, 3);

    // Raw points before two days ago (strictly), rollups before the
    // two-days-ago bucket.
    let pruned = store
        .prune_metrics(two_days, two_days)
        .await
        .expect("prune_metrics");
    assert_eq!(pruned, 2);
    assert_eq!(seqs(&points(&*store, a.id).await), vec![2, 3]);
    let kept: Vec<_> = rollups(&*store, a.id, 300)
        .await
        .into_iter()
        .map(|r| r.bucket_start)
        .collect();
    assert_eq!(kept, vec![two_days, one_hour]);

    // Nothing older left.
    assert_eq!(
        store
            .prune_metrics(two_days, two_days)
            .await
            .expect("prune_metrics"),
        0
    );
    // Raw and rollup cutoffs are independent.
    let pruned = store
        .prune_metrics(one_hour, base - Duration::days(30))
        .await
        .expect("prune_metrics");
    assert_eq!(pruned, 1);
    assert_eq!(seqs(&points(&*store, a.id).await), vec![3]);
    assert_eq!(rollups(&*store, a.id, 300).await.len(), 2);
}

async fn latest_metrics_returns_the_newest_point_of_each_live_server_in_the_scope(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let a_child = create_org(&*store, a, "a-child").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let (busy, _) = enroll_server(&*store, a, "busy", Labels::new()).await;
    let (_silent, _) = enroll_server(&*store, a, "silent", Labels::new()).await;
    let (child, _) = enroll_server(&*store, a_child, "child", Labels::new()).await;
    let (elsewhere, _) = enroll_server(&*store, sibling, "elsewhere", Labels::new()).await;
    let (removed, _) = enroll_server(&*store, a, "removed", Labels::new()).await;
    let t = now() - Duration::minutes(5);
    // The newest point is the highest seq, even with an older ts.
    let newest = point(busy.id, 3, t + Duration::seconds(5));
    ingest(
        &*store,
        now(),
        vec![
            point(busy.id, 1, t),
            point(busy.id, 2, t + Duration::seconds(10)),
            newest.clone(),
            point(child.id, 1, t),
            point(elsewhere.id, 4, t),
            point(removed.id, 1, t),
        ],
        Vec::new(),
    )
    .await;
    assert!(store
        .remove_server(&[a], removed.id, now())
        .await
        .expect("remove_server"));

    let latest = store
        .latest_metrics(&scope_of(&*store, a).await)
        .await
        .expect("latest_metrics");
    assert_eq!(latest.len(), 2, "one point per server: {latest:?}");
    let by_server = |id: Uuid| latest.iter().find(|m| m.server_id == id).cloned();
    assert_eq!(by_server(busy.id), Some(newest));
    assert_eq!(by_server(child.id), Some(point(child.id, 1, t)));

    let all = store
        .latest_metrics(&scope_of(&*store, root).await)
        .await
        .expect("latest_metrics");
    assert_eq!(
        set(all.iter().map(|m| m.server_id)),
        set([busy.id, child.id, elsewhere.id])
    );
    assert!(store
        .latest_metrics(&[])
        .await
        .expect("latest_metrics")
        .is_empty());
}

async fn latest_container_sets_return_reports_of_live_servers_in_the_scope(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let a = create_org(&*store, root, "a").await;
    let a_child = create_org(&*store, a, "a-child").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let (web, _) = enroll_server(&*store, a, "web", Labels::new()).await;
    let (_silent, _) = enroll_server(&*store, a, "silent", Labels::new()).await;
    let (child, _) = enroll_server(&*store, a_child, "child", Labels::new()).await;
    let (elsewhere, _) = enroll_server(&*store, sibling, "elsewhere", Labels::new()).await;
    let (removed, _) = enroll_server(&*store, a, "removed", Labels::new()).await;
    let t = now();
    let web_set = report(
        web.id,
        2,
        t,
        vec![container("c1", "api"), container("c2", "worker")],
    );
    let mut child_set = report(child.id, 1, t, Vec::new());
    child_set.docker_version = None;
    child_set.error = Some("docker is not installed".into());
    ingest(
        &*store,
        now(),
        Vec::new(),
        vec![
            report(web.id, 1, t, vec![container("c0", "stale")]),
            web_set.clone(),
            child_set.clone(),
            report(elsewhere.id, 1, t, vec![container("c1", "api")]),
            report(removed.id, 1, t, vec![container("c1", "api")]),
        ],
    )
    .await;
    assert!(store
        .remove_server(&[a], removed.id, now())
        .await
        .expect("remove_server"));

    let mut sets = store
        .latest_container_sets(&scope_of(&*store, a).await)
        .await
        .expect("latest_container_sets");
    sets.sort_by_key(|s| s.server_id);
    let mut expected = vec![web_set, child_set];
    expected.sort_by_key(|s| s.server_id);
    assert_eq!(sets, expected);

    let all = store
        .latest_container_sets(&scope_of(&*store, root).await)
        .await
        .expect("latest_container_sets");
    assert_eq!(
        set(all.iter().map(|s| s.server_id)),
        set([web.id, child.id, elsewhere.id])
    );
    assert!(store
        .latest_container_sets(&[])
        .await
        .expect("latest_container_sets")
        .is_empty());
    // A removed server's report is gone from lookups too.
    assert_eq!(
        store
            .container_set(removed.id)
            .await
            .expect("container_set"),
        None
    );
}

async fn ingest_metrics_takes_thousands_of_points_in_one_call(
    store: Arc<dyn Store>,
    database: Database,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let mut servers = Vec::new();
    for i in 0..5 {
        let (server, _) = enroll_server(&*store, root, &format!("s{i}"), Labels::new()).await;
        servers.push(server.id);
    }
    let t = now() - Duration::hours(2);
    let mut metrics = Vec::new();
    for (i, id) in servers.iter().enumerate() {
        for seq in 0..1_000 {
            let mut p = point(*id, seq, t + Duration::seconds(seq));
            p.cpu_percent = f64::from(u32::try_from(i).expect("small")) + 0.5;
            metrics.push(p);
        }
    }
    // Container sets with thousands of rows too.
    let containers: Vec<ContainerSet> = servers
        .iter()
        .map(|id| {
            let list = (0..1_000)
                .map(|n| container(&format!("c{n:04}"), &format!("app-{n:04}")))
                .collect();
            report(*id, 1, t, list)
        })
        .collect();
    ingest(&*store, now(), metrics.clone(), containers).await;
    assert_eq!(database.count("SELECT COUNT(*) FROM metrics").await, 5_000);
    assert_eq!(
        database.count("SELECT COUNT(*) FROM containers").await,
        5_000
    );

    // Replaying all of it changes nothing.
    ingest(&*store, now(), metrics, Vec::new()).await;
    assert_eq!(database.count("SELECT COUNT(*) FROM metrics").await, 5_000);

    for id in &servers {
        let stored = points(&*store, *id).await;
        assert_eq!(stored.len(), 1_000);
        assert_eq!(seqs(&stored), (0..1_000).collect::<Vec<_>>());
        let set = store
            .container_set(*id)
            .await
            .expect("container_set")
            .expect("report stored");
        assert_eq!(set.containers.len(), 1_000);
        assert_eq!(set.containers[0].name, "app-0000");
    }
    let latest = store.latest_metrics(&[root]).await.expect("latest_metrics");
    assert_eq!(latest.len(), 5);
    assert!(latest.iter().all(|m| m.seq == 999));
}

async fn ingest_metrics_survives_nul_characters_in_agent_strings(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let (b, _) = enroll_server(&*store, root, "b", Labels::new()).await;
    let t = now() - Duration::minutes(1);
    let mut odd = point(a.id, 1, t);
    odd.disks = json!([{ "mount_point": "/mnt/\u{0}x", "device": "dev\u{0}", "filesystem": "ext4",
        "total_bytes": 1, "used_bytes": 0, "inodes_total": 0, "inodes_used": 0 }])
    .into();
    odd.networks = json!([{ "interface": "eth\u{0}0", "rx_bytes": 0, "tx_bytes": 0,
        "rx_packets": 0, "tx_packets": 0, "rx_errors": 0, "tx_errors": 0 }])
    .into();
    let mut odd_container = container("c\u{0}1", "we\u{0}b");
    odd_container.health = Some("\u{0}".into());
    let mut odd_set = report(a.id, 1, t, vec![odd_container]);
    odd_set.error = Some("bad\u{0}".into());

    // Other servers' batches in the same write are stored too.
    ingest(
        &*store,
        now(),
        vec![odd, point(b.id, 1, t)],
        vec![odd_set, report(b.id, 1, t, vec![container("c1", "web")])],
    )
    .await;
    assert_eq!(seqs(&points(&*store, b.id).await), vec![1]);
    let stored = points(&*store, a.id).await;
    assert_eq!(stored.len(), 1);
    // The NUL may be kept or replaced by U+FFFD, nothing else.
    let disks = stored[0].disks.parse();
    let device = disks[0]["device"].as_str().expect("device");
    assert_eq!(device.replace('\u{FFFD}', "\u{0}"), "dev\u{0}");
    let set = store
        .container_set(a.id)
        .await
        .expect("container_set")
        .expect("a's report");
    assert_eq!(set.containers.len(), 1);
    assert_eq!(
        set.containers[0].name.replace('\u{FFFD}', "\u{0}"),
        "we\u{0}b"
    );
    assert_eq!(
        set.error.as_deref().map(|e| e.replace('\u{FFFD}', "\u{0}")),
        Some("bad\u{0}".to_string())
    );
    assert!(store
        .container_set(b.id)
        .await
        .expect("container_set")
        .is_some());
}

/// Replicas replaying the same batches at once (an agent reconnecting to
/// another replica while the first still writes) neither deadlock nor store
/// anything twice, whatever order each write lists the batches in.
async fn concurrent_replays_of_the_same_batches_store_them_once(
    store: Arc<dyn Store>,
    database: Database,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let mut servers = Vec::new();
    for i in 0..8 {
        let (server, _) = enroll_server(&*store, root, &format!("s{i}"), Labels::new()).await;
        servers.push(server.id);
    }
    let t = now() - Duration::minutes(30);
    let mut metrics = Vec::new();
    let mut containers = Vec::new();
    for id in &servers {
        for seq in 0..50 {
            metrics.push(point(*id, seq, t + Duration::seconds(seq)));
        }
        containers.push(report(
            *id,
            49,
            t,
            vec![container("c2", "db"), container("c1", "web")],
        ));
    }
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let store = store.clone();
            let mut metrics = metrics.clone();
            let mut containers = containers.clone();
            if i % 2 == 1 {
                metrics.reverse();
                containers.reverse();
            }
            tokio::spawn(async move { ingest(&*store, now(), metrics, containers).await })
        })
        .collect();
    for writer in writers {
        writer.await.expect("ingest task");
    }
    assert_eq!(database.count("SELECT COUNT(*) FROM metrics").await, 400);
    assert_eq!(database.count("SELECT COUNT(*) FROM containers").await, 16);
    for (id, expected) in servers.iter().zip(&containers) {
        let set = store.container_set(*id).await.expect("container_set");
        assert_eq!(
            set.as_ref().map(|s| &s.containers),
            Some(&expected.containers)
        );
    }
}

// ---------------------------------------------------------------------------
// Provisioning: credentials, deployments as leased jobs, events, Terraform
// state and its lock.
// ---------------------------------------------------------------------------

store_tests! {
    cloud_credentials_are_scoped_marked_and_soft_deleted,
    claim_deployment_hands_each_job_to_one_worker_until_its_lease_expires,
    save_deployment_needs_the_lease_and_releases_it_once_settled,
    transition_deployment_moves_only_from_the_given_statuses,
    deployment_events_are_listed_in_order_after_a_sequence,
    deployment_server_tells_whether_the_enrolled_server_reported,
    organization_usage_counts_deployments_still_waiting_for_their_server,
    terraform_state_lock_is_exclusive_and_writes_need_the_holder,
    sealed_secrets_include_credentials_states_and_bootstrap_tokens,
}

fn credential(organization_id: Uuid, name: &str) -> CloudCredential {
    CloudCredential {
        id: Uuid::now_v7(),
        organization_id,
        name: name.into(),
        provider: "hetzner".into(),
        default_region: Some("fsn1".into()),
        credentials_sealed: format!("v1:0000:{}", Uuid::new_v4().simple()),
        is_validated: false,
        created_at: now(),
        last_used_at: None,
    }
}

/// A pending `local` deployment of `organization_id` and its bootstrap token.
async fn create_deployment(store: &dyn Store, organization_id: Uuid) -> (Deployment, String) {
    let at = now();
    let deployment = Deployment {
        id: Uuid::now_v7(),
        organization_id,
        provider: "local".into(),
        credential_id: None,
        status: DeploymentStatus::Pending,
        server_id: None,
        record: DeploymentRecord {
            server_name: "web-1".into(),
            region: "local".into(),
            instance_type: "process".into(),
            ..DeploymentRecord::default()
        },
        bootstrap_token_sealed: Some(format!("v1:0000:{}", Uuid::new_v4().simple())),
        created_at: at,
        updated_at: at,
        completed_at: None,
    };
    let token_hash = format!("sha256:{}", Uuid::new_v4().simple());
    let token = NewEnrollmentToken {
        id: Uuid::now_v7(),
        token_hash: token_hash.clone(),
        organization_id,
        server_name: Some("web-1".into()),
        labels: Labels::new(),
        deployment_id: Some(deployment.id),
        created_at: at,
        expires_at: at + Duration::hours(1),
    };
    store
        .create_deployment(&deployment, &token)
        .await
        .expect("create_deployment");
    (deployment, token_hash)
}

async fn cloud_credentials_are_scoped_marked_and_soft_deleted(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let other = create_org(&*store, root, "other").await;
    let mine = credential(team, "hetzner-prod");
    store
        .create_cloud_credential(&mine)
        .await
        .expect("create_cloud_credential");
    store
        .create_cloud_credential(&credential(other, "theirs"))
        .await
        .expect("create_cloud_credential");

    let found = store
        .cloud_credential(&[team], mine.id)
        .await
        .expect("cloud_credential")
        .expect("visible in its own scope");
    assert_eq!(found.name, "hetzner-prod");
    assert_eq!(found.credentials_sealed, mine.credentials_sealed);
    assert!(store
        .cloud_credential(&[other], mine.id)
        .await
        .expect("cloud_credential")
        .is_none());
    let listed = store
        .list_cloud_credentials(&[team])
        .await
        .expect("list_cloud_credentials");
    assert_eq!(
        listed.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![mine.id]
    );

    let at = now();
    store
        .mark_cloud_credential(mine.id, Some(true), at)
        .await
        .expect("mark_cloud_credential");
    let marked = store
        .cloud_credential(&[team], mine.id)
        .await
        .expect("cloud_credential")
        .expect("still there");
    assert!(marked.is_validated);
    assert_eq!(marked.last_used_at, Some(at));

    assert!(!store
        .delete_cloud_credential(&[other], mine.id, now())
        .await
        .expect("delete_cloud_credential"));
    assert!(store
        .delete_cloud_credential(&[team], mine.id, now())
        .await
        .expect("delete_cloud_credential"));
    assert!(store
        .cloud_credential(&[team], mine.id)
        .await
        .expect("cloud_credential")
        .is_none());
}

async fn claim_deployment_hands_each_job_to_one_worker_until_its_lease_expires(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let mut created = BTreeSet::new();
    for _ in 0..6 {
        created.insert(create_deployment(&*store, root).await.0.id);
    }
    let at = now();
    let lease = at + Duration::seconds(30);
    let mut claims = tokio::task::JoinSet::new();
    for worker in 0..12 {
        let store = store.clone();
        claims.spawn(async move {
            store
                .claim_deployment(&format!("worker-{worker}"), at, lease)
                .await
                .expect("claim_deployment")
                .map(|d| d.id)
        });
    }
    let mut claimed = Vec::new();
    while let Some(result) = claims.join_next().await {
        claimed.extend(result.expect("claim task"));
    }
    claimed.sort();
    let unique: BTreeSet<Uuid> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "a job was claimed twice");
    assert_eq!(unique, created, "every job is claimed once");

    // Leases hold until they expire; then another worker takes the job over.
    assert!(store
        .claim_deployment("late", at, lease)
        .await
        .expect("claim_deployment")
        .is_none());
    let taken_over = store
        .claim_deployment(
            "after-expiry",
            lease + Duration::seconds(1),
            lease + Duration::seconds(31),
        )
        .await
        .expect("claim_deployment")
        .expect("an expired lease is free");
    assert!(created.contains(&taken_over.id));
}

async fn save_deployment_needs_the_lease_and_releases_it_once_settled(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (created, _) = create_deployment(&*store, instance.root_organization_id).await;
    let at = now();
    let mut job = store
        .claim_deployment("a", at, at + Duration::seconds(30))
        .await
        .expect("claim_deployment")
        .expect("pending job");
    assert_eq!(job.id, created.id);
    job.status = DeploymentStatus::Provisioning;
    job.record.steps.push(DeploymentStep {
        name: "init".into(),
        status: StepStatus::Succeeded,
        started_at: at,
        duration_seconds: Some(1.5),
    });
    job.record.progress_percent = 30;
    assert!(store
        .save_deployment(&job, "a", at + Duration::seconds(30))
        .await
        .expect("save_deployment"));
    assert!(
        !store
            .save_deployment(&job, "b", at + Duration::seconds(30))
            .await
            .expect("save_deployment"),
        "a worker without the lease cannot write"
    );
    let stored = store
        .deployment(None, job.id)
        .await
        .expect("deployment")
        .expect("exists");
    assert_eq!(stored.status, DeploymentStatus::Provisioning);
    assert_eq!(stored.record, job.record);

    job.status = DeploymentStatus::Completed;
    job.completed_at = Some(at);
    job.bootstrap_token_sealed = None;
    assert!(store
        .save_deployment(&job, "a", at + Duration::seconds(30))
        .await
        .expect("save_deployment"));
    assert!(
        store
            .claim_deployment("b", at, at + Duration::seconds(30))
            .await
            .expect("claim_deployment")
            .is_none(),
        "a settled deployment is no job"
    );
    let stored = store
        .deployment(Some(&[instance.root_organization_id]), job.id)
        .await
        .expect("deployment")
        .expect("exists");
    assert_eq!(stored.status, DeploymentStatus::Completed);
    assert_eq!(stored.completed_at, Some(at));
    assert!(stored.bootstrap_token_sealed.is_none());
    assert!(store
        .deployment(Some(&[Uuid::now_v7()]), job.id)
        .await
        .expect("deployment")
        .is_none());
}

async fn transition_deployment_moves_only_from_the_given_statuses(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (deployment, _) = create_deployment(&*store, root).await;
    let settled = [DeploymentStatus::Completed, DeploymentStatus::Failed];
    assert!(!store
        .transition_deployment(
            &[root],
            deployment.id,
            &settled,
            DeploymentStatus::Destroying,
            now()
        )
        .await
        .expect("transition_deployment"));
    assert!(store
        .transition_deployment(
            &[root],
            deployment.id,
            &[DeploymentStatus::Pending],
            DeploymentStatus::Failed,
            now()
        )
        .await
        .expect("transition_deployment"));
    assert!(store
        .transition_deployment(
            &[root],
            deployment.id,
            &settled,
            DeploymentStatus::Destroying,
            now()
        )
        .await
        .expect("transition_deployment"));
    let listed = store
        .list_deployments(&[root], 10, None)
        .await
        .expect("list_deployments");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, DeploymentStatus::Destroying);
}

async fn deployment_events_are_listed_in_order_after_a_sequence(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (deployment, _) = create_deployment(&*store, instance.root_organization_id).await;
    let (other, _) = create_deployment(&*store, instance.root_organization_id).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(
            store
                .append_deployment_event(deployment.id, now(), "log", &json!({ "line": i }))
                .await
                .expect("append_deployment_event"),
        );
        store
            .append_deployment_event(other.id, now(), "log", &json!({ "line": -1 }))
            .await
            .expect("append_deployment_event");
    }
    let all = store
        .deployment_events(deployment.id, 0, 100)
        .await
        .expect("deployment_events");
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
    assert_eq!(all[4].body, json!({ "line": 4 }));
    let after = store
        .deployment_events(deployment.id, seqs[2], 1)
        .await
        .expect("deployment_events");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].seq, seqs[3]);
}

async fn deployment_server_tells_whether_the_enrolled_server_reported(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (deployment, token_hash) = create_deployment(&*store, instance.root_organization_id).await;
    assert_eq!(
        store
            .deployment_token_hash(deployment.id)
            .await
            .expect("deployment_token_hash"),
        Some(token_hash.clone())
    );
    assert!(store
        .deployment_server(deployment.id)
        .await
        .expect("deployment_server")
        .is_none());
    let server = try_enroll(&*store, &enrollment(&token_hash, "web-1"))
        .await
        .expect("the bootstrap token enrolls");
    assert_eq!(server.name, "web-1");
    assert_eq!(server.deployment_id, Some(deployment.id));
    let (found, reported) = store
        .deployment_server(deployment.id)
        .await
        .expect("deployment_server")
        .expect("enrolled");
    assert_eq!(found.id, server.id);
    assert!(!reported);
    ingest(&*store, now(), vec![point(server.id, 1, now())], vec![]).await;
    let (_, reported) = store
        .deployment_server(deployment.id)
        .await
        .expect("deployment_server")
        .expect("enrolled");
    assert!(reported);

    // An expired bootstrap token no longer enrolls anything.
    let (late, late_hash) = create_deployment(&*store, instance.root_organization_id).await;
    store
        .expire_deployment_token(late.id, now() - Duration::seconds(1))
        .await
        .expect("expire_deployment_token");
    assert_eq!(
        try_enroll(&*store, &enrollment(&late_hash, "late"))
            .await
            .err(),
        Some(EnrollmentRefusal::ExpiredToken)
    );
}

async fn organization_usage_counts_deployments_still_waiting_for_their_server(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let team = create_org(&*store, instance.root_organization_id, "team").await;
    let (first, token_hash) = create_deployment(&*store, team).await;
    let (second, _) = create_deployment(&*store, team).await;
    let usage = store.organization_usage(team).await.expect("usage");
    assert_eq!(usage.servers, 2, "two deployments on their way");
    try_enroll(&*store, &enrollment(&token_hash, "web-1"))
        .await
        .expect("enrolls");
    let usage = store.organization_usage(team).await.expect("usage");
    assert_eq!(
        usage.servers, 2,
        "a server and a deployment, never counted twice"
    );
    assert!(store
        .transition_deployment(
            &[team],
            second.id,
            &[DeploymentStatus::Pending],
            DeploymentStatus::Failed,
            now()
        )
        .await
        .expect("transition_deployment"));
    let usage = store.organization_usage(team).await.expect("usage");
    assert_eq!(usage.servers, 1, "a failed deployment holds no quota");
    let _ = first;
}

async fn terraform_state_lock_is_exclusive_and_writes_need_the_holder(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (deployment, _) = create_deployment(&*store, instance.root_organization_id).await;
    let id = deployment.id;
    assert!(store
        .terraform_state(id)
        .await
        .expect("terraform_state")
        .is_none());
    let info = json!({ "ID": "lock-a", "Operation": "OperationTypeApply", "Who": "tether@a" });
    assert_eq!(
        store
            .lock_terraform_state(id, "lock-a", &info, now())
            .await
            .expect("lock"),
        LockOutcome::Done
    );
    assert_eq!(
        store
            .lock_terraform_state(id, "lock-b", &json!({ "ID": "lock-b" }), now())
            .await
            .expect("lock"),
        LockOutcome::HeldBy(info.clone()),
        "a second locker learns who holds it"
    );
    assert_eq!(
        store
            .write_terraform_state(id, Some("v1:sealed-b"), Some("lock-b"), now())
            .await
            .expect("write"),
        LockOutcome::HeldBy(info.clone())
    );
    assert_eq!(
        store
            .write_terraform_state(id, Some("v1:sealed-a"), Some("lock-a"), now())
            .await
            .expect("write"),
        LockOutcome::Done
    );
    assert_eq!(
        store
            .unlock_terraform_state(id, Some("lock-b"), now())
            .await
            .expect("unlock"),
        LockOutcome::HeldBy(info.clone())
    );
    let state = store
        .terraform_state(id)
        .await
        .expect("terraform_state")
        .expect("exists");
    assert_eq!(state.state_sealed.as_deref(), Some("v1:sealed-a"));
    assert_eq!(state.lock_id.as_deref(), Some("lock-a"));
    assert_eq!(state.lock_info, Some(info));

    // Force-unlock (no id) releases whatever holds it.
    assert_eq!(
        store
            .unlock_terraform_state(id, None, now())
            .await
            .expect("unlock"),
        LockOutcome::Done
    );
    assert_eq!(
        store
            .write_terraform_state(id, None, None, now())
            .await
            .expect("write"),
        LockOutcome::Done
    );
    let state = store
        .terraform_state(id)
        .await
        .expect("terraform_state")
        .expect("exists");
    assert!(state.state_sealed.is_none());
    assert!(state.lock_id.is_none());
}

async fn sealed_secrets_include_credentials_states_and_bootstrap_tokens(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let cred = credential(root, "aws");
    store
        .create_cloud_credential(&cred)
        .await
        .expect("create_cloud_credential");
    let (deployment, _) = create_deployment(&*store, root).await;
    store
        .write_terraform_state(deployment.id, Some("v1:state"), None, now())
        .await
        .expect("write");
    let secrets = store.sealed_secrets().await.expect("sealed_secrets");
    let find = |kind: SealedKind| {
        secrets
            .iter()
            .find(|s| s.kind == kind)
            .unwrap_or_else(|| panic!("{kind:?} listed"))
            .clone()
    };
    let sealed_cred = find(SealedKind::CloudCredential);
    assert_eq!(sealed_cred.id, cred.id.to_string());
    assert_eq!(sealed_cred.sealed, cred.credentials_sealed);
    assert_eq!(
        sealed_cred.context,
        store::cloud_credential_context(cred.id)
    );
    let state = find(SealedKind::TerraformState);
    assert_eq!(state.context, store::terraform_state_context(deployment.id));
    let token = find(SealedKind::BootstrapToken);
    assert_eq!(
        Some(token.sealed.clone()),
        deployment.bootstrap_token_sealed
    );
    for secret in [&sealed_cred, &state, &token] {
        assert!(store
            .replace_sealed_secret(secret, "v1:resealed")
            .await
            .expect("replace_sealed_secret"));
        assert!(!store
            .replace_sealed_secret(secret, "v1:stale")
            .await
            .expect("replace_sealed_secret"));
    }
    let stored = store
        .cloud_credential(&[root], cred.id)
        .await
        .expect("cloud_credential")
        .expect("exists");
    assert_eq!(stored.credentials_sealed, "v1:resealed");
}

// ---------------------------------------------------------------------------
// PostgreSQL only: row locks between concurrent writers (SQLite has one
// writer at a time, so there every write waits its turn by design).
// ---------------------------------------------------------------------------

mod liveness_is_recorded_while_a_metrics_write_holds_its_servers_rows {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        super::on_postgres(
            super::liveness_is_recorded_while_a_metrics_write_holds_its_servers_rows,
        )
        .await;
    }
}

/// A metrics write that inserts containers holds `KEY SHARE` locks on its
/// servers' rows until it commits (the containers' foreign key). Recording
/// session liveness must not wait for it: it once locked the same rows
/// `FOR UPDATE`, and under load the two deadlocked, PostgreSQL aborting one.
async fn liveness_is_recorded_while_a_metrics_write_holds_its_servers_rows(
    store: Arc<dyn Store>,
    database: Database,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (a, _) = enroll_server(&*store, root, "a", Labels::new()).await;
    let Database::Postgres(url) = database else {
        panic!("this test runs on PostgreSQL only");
    };
    let mut writer = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut write = writer.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO containers (server_id, container_id, name, image, state, restart_count,
             cpu_percent, memory_usage_bytes, memory_limit_bytes, net_rx_bytes, net_tx_bytes,
             block_read_bytes, block_write_bytes)
         VALUES ($1, 'c1', 'web', 'img', 'running', 0, 0, 0, 0, 0, 0, 0, 0)",
    )
    .bind(a.id)
    .execute(&mut *write)
    .await
    .expect("insert a container in the open transaction");

    let seen = now();
    let touched = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.touch_servers(&[a.id], seen),
    )
    .await;
    assert!(
        matches!(touched, Ok(Ok(()))),
        "liveness waited for the metrics write's locks: {touched:?}"
    );
    write.rollback().await.expect("rollback");
    let server = store
        .server(&[root], a.id)
        .await
        .expect("server")
        .expect("a");
    assert_eq!(server.last_seen_at, Some(seen));
}
