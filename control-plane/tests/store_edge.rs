//! Store behaviours of the edge hardening: the enrollment token
//! look-up made before a CSR is signed, and the revocation of certificates
//! older than the one in use. Each runs on SQLite and on PostgreSQL.

#[macro_use]
mod common;

use common::*;

store_tests! {
    enrollment_token_refusal_tells_unknown_used_and_expired_tokens_and_passes_live_ones,
    revoking_older_certificates_keeps_the_one_in_use_and_newer_ones,
}

async fn enrollment_token_refusal_tells_unknown_used_and_expired_tokens_and_passes_live_ones(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let live = create_token(
        &*store,
        root,
        None,
        Labels::new(),
        now() + Duration::hours(1),
    )
    .await;
    let expired = create_token(
        &*store,
        root,
        None,
        Labels::new(),
        now() - Duration::seconds(1),
    )
    .await;
    let used = create_token(
        &*store,
        root,
        None,
        Labels::new(),
        now() + Duration::hours(1),
    )
    .await;
    try_enroll(&*store, &enrollment(&used, "used"))
        .await
        .expect("enroll");
    for (hash, expected) in [
        (live.as_str(), None),
        ("sha256:unknown", Some(EnrollmentRefusal::UnknownToken)),
        (expired.as_str(), Some(EnrollmentRefusal::ExpiredToken)),
        (used.as_str(), Some(EnrollmentRefusal::TokenAlreadyUsed)),
    ] {
        let refusal = store
            .enrollment_token_refusal(hash, now())
            .await
            .expect("enrollment_token_refusal");
        assert_eq!(refusal, expected, "{hash}");
    }
    // A look-up redeems nothing: the live token still enrolls.
    assert!(try_enroll(&*store, &enrollment(&live, "live"))
        .await
        .is_ok());
}

async fn revoking_older_certificates_keeps_the_one_in_use_and_newer_ones(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (server, first) =
        enroll_server(&*store, instance.root_organization_id, "web", Labels::new()).await;
    let (other, other_serial) =
        enroll_server(&*store, instance.root_organization_id, "db", Labels::new()).await;
    let second = certificate(server.id, now() + Duration::seconds(10));
    let third = certificate(server.id, now() + Duration::seconds(20));
    for record in [&second, &third] {
        store.record_certificate(record).await.expect("record");
    }
    let admitted = |serial: String, server_id| {
        let store = store.clone();
        async move {
            matches!(
                store
                    .admit_session(server_id, &serial)
                    .await
                    .expect("admit"),
                SessionAdmission::Admitted(_)
            )
        }
    };
    // The second is in use: the first goes, the third (newer) stays.
    let revoked = store
        .revoke_certificates_older_than(server.id, &second.serial, now())
        .await
        .expect("revoke");
    assert_eq!(revoked, 1);
    assert!(!admitted(first.clone(), server.id).await);
    assert!(admitted(second.serial.clone(), server.id).await);
    assert!(admitted(third.serial.clone(), server.id).await);
    assert!(
        admitted(other_serial, other.id).await,
        "another server's certificate was revoked"
    );
    // Nothing left to revoke: nothing changes.
    let again = store
        .revoke_certificates_older_than(server.id, &second.serial, now())
        .await
        .expect("revoke");
    assert_eq!(again, 0);
    let last = store
        .revoke_certificates_older_than(server.id, &third.serial, now())
        .await
        .expect("revoke");
    assert_eq!(last, 1);
    assert!(!admitted(second.serial, server.id).await);
    assert!(admitted(third.serial, server.id).await);
}
