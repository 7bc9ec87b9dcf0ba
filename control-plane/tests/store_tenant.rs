//! The tenant boundary as the store holds it, on SQLite and PostgreSQL: a
//! known branch id is only re-peered by the same CA into the same
//! organization; quotas are checked inside the enrollment transaction
//! (racing enrollments with tokens issued beforehand cannot exceed them);
//! deleting an organization revokes its API tokens, expires its enrollment
//! tokens, refuses its enrollments and names the servers whose sessions end.
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_tenant
//! ```

#[macro_use]
mod common;

use std::sync::Arc;

use common::*;
use tether_control_plane::store::{BranchPeer, BranchStatus};

store_tests! {
    a_known_branch_id_is_only_re_peered_by_the_same_ca_into_the_same_organization,
    racing_enrollments_with_tokens_issued_beforehand_stay_within_an_ancestors_max_servers,
    a_deleted_organization_refuses_enrollments_and_its_tokens_are_revoked,
}

fn peer(org: Uuid, ca: &str) -> BranchPeer {
    BranchPeer {
        id: Uuid::now_v7(),
        organization_id: org,
        name: "branch b".into(),
        address: "127.0.0.1:7443".into(),
        ca_cert_pem: ca.into(),
        client_chain: vec![vec![1, 2, 3], vec![4, 5]],
        client_key_sealed: "sealed-client-key".into(),
        peer_keys: vec![],
        granted_scopes: vec!["servers:read".into(), "commands:run".into()],
        remote_scopes: vec!["servers:read".into()],
        remote_organization_id: Uuid::now_v7().to_string(),
        status: BranchStatus::Healthy,
        last_seen_at: Some(now()),
        latency_ms: None,
        server_count: 0,
        created_at: now(),
    }
}

async fn a_known_branch_id_is_only_re_peered_by_the_same_ca_into_the_same_organization(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let tenant = create_org(&*store, root, "tenant").await;
    let original = peer(root, "CA OF B");
    assert!(store.upsert_branch_peer(&original).await.unwrap());

    // Another organization, same CA: refused.
    let mut other_org = original.clone();
    other_org.organization_id = tenant;
    other_org.address = "10.0.0.66:7443".into();
    assert!(!store.upsert_branch_peer(&other_org).await.unwrap());
    // Same organization, another CA: refused.
    let mut other_ca = original.clone();
    other_ca.ca_cert_pem = "CA OF AN IMPOSTOR".into();
    other_ca.address = "10.0.0.66:7443".into();
    other_ca.granted_scopes = vec!["servers:read".into()];
    assert!(!store.upsert_branch_peer(&other_ca).await.unwrap());
    let stored = store.branch_peer(None, original.id).await.unwrap().unwrap();
    assert_eq!(stored, original);
    assert!(store
        .branch_peer(Some(&[tenant]), original.id)
        .await
        .unwrap()
        .is_none());

    // The same branch re-peering into the same organization replaces it
    // (new address, keys, certificates), keeping when it was first peered.
    let mut repeer = original.clone();
    repeer.address = "127.0.0.1:8443".into();
    repeer.client_key_sealed = "new-sealed-key".into();
    repeer.created_at = now() + chrono::Duration::seconds(5);
    assert!(store.upsert_branch_peer(&repeer).await.unwrap());
    let stored = store.branch_peer(None, original.id).await.unwrap().unwrap();
    assert_eq!(stored.address, "127.0.0.1:8443");
    assert_eq!(stored.client_key_sealed, "new-sealed-key");
    assert_eq!(stored.created_at, original.created_at);
    assert_eq!(stored.organization_id, root);
}

async fn racing_enrollments_with_tokens_issued_beforehand_stay_within_an_ancestors_max_servers(
    store: Arc<dyn Store>,
) {
    const RACERS: usize = 6;
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let limited = Organization {
        id: Uuid::now_v7(),
        name: "limited".into(),
        parent_id: Some(root),
        quotas: Quotas {
            max_servers: Some(2),
            ..Quotas::default()
        },
        created_at: now(),
    };
    store.create_organization(&limited).await.unwrap();
    let child = create_org(&*store, limited.id, "child").await;
    let mut tokens = Vec::new();
    for _ in 0..RACERS {
        tokens.push(
            create_token(
                &*store,
                child,
                None,
                Labels::new(),
                now() + chrono::Duration::hours(1),
            )
            .await,
        );
    }
    let mut racers = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let store = store.clone();
        let e = enrollment(token, &format!("racer-{i}"));
        racers.push(tokio::spawn(async move { store.enroll(&e).await }));
    }
    let mut enrolled = 0;
    let mut refused = Vec::new();
    for racer in racers {
        match racer.await.unwrap().unwrap() {
            Ok(_) => enrolled += 1,
            Err(refusal) => refused.push(refusal),
        }
    }
    assert_eq!(enrolled, 2, "{refused:?}");
    assert_eq!(refused.len(), RACERS - 2);
    for refusal in &refused {
        assert_eq!(
            *refusal,
            EnrollmentRefusal::QuotaExceeded {
                organization_id: limited.id,
                resource: "max_servers",
                limit: 2,
                usage: 2,
            }
        );
    }
    assert_eq!(
        store.organization_usage(limited.id).await.unwrap().servers,
        2
    );
    assert_eq!(
        listed_ids(&*store, &query(&scope_of(&*store, root).await))
            .await
            .len(),
        2
    );

    // A refused token was not spent: once there is room, it enrolls.
    let first = listed_ids(&*store, &query(&[child])).await[0];
    assert!(store.remove_server(&[child], first, now()).await.unwrap());
    let mut retried = 0;
    for token in &tokens {
        if try_enroll(&*store, &enrollment(token, "retry"))
            .await
            .is_ok()
        {
            retried += 1;
        }
    }
    assert_eq!(retried, 1);
}

async fn a_deleted_organization_refuses_enrollments_and_its_tokens_are_revoked(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let doomed = create_org(&*store, root, "doomed").await;
    let below = create_org(&*store, doomed, "below").await;
    let kept = create_org(&*store, root, "kept").await;
    let at = now();
    let doomed_token = admin_token(doomed, at);
    let below_token = admin_token(below, at);
    let kept_token = admin_token(kept, at);
    for t in [&doomed_token, &below_token, &kept_token] {
        store.create_api_token(t).await.unwrap();
    }
    let (server, _) = enroll_server(&*store, below, "in-below", Labels::new()).await;
    let unused = create_token(
        &*store,
        doomed,
        None,
        Labels::new(),
        at + chrono::Duration::hours(1),
    )
    .await;
    let unused_below = create_token(
        &*store,
        below,
        None,
        Labels::new(),
        at + chrono::Duration::hours(1),
    )
    .await;
    let unused_kept = create_token(
        &*store,
        kept,
        None,
        Labels::new(),
        at + chrono::Duration::hours(1),
    )
    .await;

    let deletion = store
        .delete_organization(doomed, true, now())
        .await
        .unwrap();
    assert_eq!(
        deletion,
        OrganizationDeletion::Deleted {
            organizations: 2,
            servers: 1,
            server_ids: vec![server.id],
        }
    );
    for t in [&doomed_token, &below_token] {
        let stored = store.api_token(t.id).await.unwrap().unwrap();
        assert!(stored.revoked_at.is_some(), "{stored:?}");
    }
    for token in [&unused, &unused_below] {
        assert_eq!(
            try_enroll(&*store, &enrollment(token, "late"))
                .await
                .unwrap_err(),
            EnrollmentRefusal::OrganizationDeleted
        );
        // The gateway's look-up before the CSR is signed says the same.
        assert_eq!(
            store.enrollment_token_refusal(token, now()).await.unwrap(),
            Some(EnrollmentRefusal::OrganizationDeleted)
        );
    }
    // Another organization's tokens are untouched.
    assert!(store
        .api_token(kept_token.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_none());
    let kept_server = try_enroll(&*store, &enrollment(&unused_kept, "kept"))
        .await
        .unwrap();
    assert_eq!(kept_server.organization_id, kept);
}
