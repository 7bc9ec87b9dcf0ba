//! The provisioning store behaviour, on SQLite and PostgreSQL (see
//! `common/mod.rs` for how `store_tests!` runs each body on both): cloud
//! credentials, deployments as leased jobs, their events, Terraform state and
//! its lock; and the credential rule of provisioning
//! (`credential_for_deployment`, shared by the API and the deployment job)
//! over a real store: a deployment uses only a live credential of its own
//! organization, and the refusal says what really happened.
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_provisioning
//! ```

#[macro_use]
mod common;

use common::*;
use tether_control_plane::provision::credentials::{credential_for_deployment, CredentialUseError};
use tether_control_plane::store::CloudCredential;

store_tests! {
    a_deployment_may_use_only_a_live_credential_of_its_own_organization,
    cloud_credentials_are_scoped_marked_and_soft_deleted,
    claim_deployment_hands_each_job_to_one_worker_until_its_lease_expires,
    save_deployment_needs_the_lease_and_releases_it_once_settled,
    transition_deployment_moves_only_from_the_given_statuses,
    deployment_events_are_listed_in_order_after_a_sequence,
    deployment_server_tells_whether_the_enrolled_server_reported,
    organization_usage_counts_deployments_still_waiting_for_their_server,
    terraform_state_lock_is_exclusive_and_writes_need_the_holder,
    sealed_secrets_include_credentials_states_and_bootstrap_tokens,
    a_scheduled_retry_is_kept_with_the_deployment_and_handed_to_the_next_worker,
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

async fn a_deployment_may_use_only_a_live_credential_of_its_own_organization(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let child = create_org(&*store, root, "child").await;
    let grandchild = create_org(&*store, child, "grandchild").await;
    let everywhere = store.organization_scope(root).await.expect("scope");
    let parents = credential(root, "parents");
    let childs = credential(child, "childs");
    for c in [&parents, &childs] {
        store
            .create_cloud_credential(c)
            .await
            .expect("create_cloud_credential");
    }

    let own = credential_for_deployment(&*store, child, childs.id, &everywhere)
        .await
        .expect("its own organization's credential");
    assert_eq!(own.id, childs.id);

    // An ancestor's, for a child's or a grandchild's deployment.
    for organization in [child, grandchild] {
        match credential_for_deployment(&*store, organization, parents.id, &everywhere).await {
            Err(e @ CredentialUseError::OtherOrganization { .. }) => {
                assert_eq!(
                    e.to_string(),
                    format!(
                        "the cloud credential {} belongs to organization {root}, not to the \
                         deployment's organization {organization}: a deployment uses only a \
                         credential of its own organization",
                        parents.id
                    )
                );
            }
            other => panic!("an ancestor's credential for {organization}: {other:?}"),
        }
    }
    // A descendant's, for the parent's deployment.
    assert!(matches!(
        credential_for_deployment(&*store, root, childs.id, &everywhere).await,
        Err(CredentialUseError::OtherOrganization { owner, .. }) if owner == child
    ));
    // Where the asker may not look, another organization's credential is
    // simply not there (the API does not reveal it).
    assert!(matches!(
        credential_for_deployment(&*store, child, parents.id, &[child, grandchild]).await,
        Err(CredentialUseError::Missing { id }) if id == parents.id
    ));
    // Deleted: said so, not blamed on the organization.
    assert!(store
        .delete_cloud_credential(&[child], childs.id, now())
        .await
        .expect("delete"));
    match credential_for_deployment(&*store, child, childs.id, &everywhere).await {
        Err(e @ CredentialUseError::Missing { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "the cloud credential {} does not exist or was deleted",
                childs.id
            )
        ),
        other => panic!("a deleted credential: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Provisioning: credentials, deployments as leased jobs, events, Terraform
// state and its lock.
// ---------------------------------------------------------------------------

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

async fn a_scheduled_retry_is_kept_with_the_deployment_and_handed_to_the_next_worker(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let (created, _) = create_deployment(&*store, instance.root_organization_id).await;
    assert_eq!(created.record.retry_count, 0);
    assert!(!created.record.install_docker);
    let at = now();
    let mut job = store
        .claim_deployment("a", at, at + Duration::seconds(15))
        .await
        .expect("claim_deployment")
        .expect("pending job");
    job.status = DeploymentStatus::Provisioning;
    job.record.retry_count = 2;
    job.record.step_retries = 1;
    job.record.next_retry_at = Some(at + Duration::seconds(40));
    job.record.install_docker = true;
    assert!(store
        .save_deployment(&job, "a", at + Duration::seconds(15))
        .await
        .expect("save_deployment"));

    // Worker a dies; once its lease ran out, b takes the job over with the
    // retry as a scheduled it.
    let later = at + Duration::seconds(16);
    let resumed = store
        .claim_deployment("b", later, later + Duration::seconds(15))
        .await
        .expect("claim_deployment")
        .expect("the interrupted job");
    assert_eq!(resumed.id, created.id);
    assert_eq!(resumed.status, DeploymentStatus::Provisioning);
    assert_eq!(resumed.record.retry_count, 2);
    assert_eq!(resumed.record.step_retries, 1);
    assert_eq!(
        resumed.record.next_retry_at,
        Some(at + Duration::seconds(40))
    );
    assert!(resumed.record.install_docker);
}
