//! The organization tree in the store, on SQLite and PostgreSQL:
//! organizations (scope, quotas, usage, deletion), API tokens, the audit log
//! and sealed secrets.
//!
//! Each `async fn` listed in `store_tests!` runs on SQLite and on PostgreSQL
//! (see `common/mod.rs`); the PostgreSQL half needs `TETHER_TEST_DATABASE_URL`
//! and fails without it (it never skips):
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_organizations
//! ```

#[macro_use]
mod common;

use common::*;

store_tests! {
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
        max_monthly_cost_usd: Some(500),
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
            servers: 0,
            server_ids: vec![],
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
            memory_gb: 7,
            committed_monthly_cost_usd: 0.0
        }
    );
    assert_eq!(
        usage(a_child).await,
        Usage {
            servers: 1,
            cpu_cores: 8,
            memory_gb: 1,
            committed_monthly_cost_usd: 0.0
        }
    );
    assert_eq!(
        usage(root).await,
        Usage {
            servers: 4,
            cpu_cores: 30,
            memory_gb: 39,
            committed_monthly_cost_usd: 0.0
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
            servers: 0,
            server_ids: vec![],
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
            servers: 0,
            server_ids: vec![],
        }
    );
    assert_eq!(
        delete(parent).await,
        OrganizationDeletion::Deleted {
            organizations: 1,
            servers: 0,
            server_ids: vec![],
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
            servers: 2,
            server_ids: {
                let mut ids = vec![in_a.id, in_c.id];
                ids.sort();
                ids
            },
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
