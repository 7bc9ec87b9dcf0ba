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
use tether_control_plane::store::{
    ApprovalPolicy, ApprovalRecord, CloudCredential, CredentialDeletion, CredentialUpdate,
    CredentialUpdateOutcome, CredentialValidation, Demand, DeploymentSize, OrganizationUpdate,
    Quotas, StateWrite, ValidationStatus,
};

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
    a_rotated_credential_is_sealed_anew_unvalidated_and_a_stale_rotation_is_refused,
    validation_outcomes_are_kept_with_their_time_and_error,
    a_credential_used_by_live_deployments_is_deleted_only_when_forced,
    every_state_write_is_a_version_and_only_the_last_ten_are_kept,
    a_destroy_request_records_whether_the_server_data_goes_too,
    deleting_server_data_empties_its_reports_and_keeps_the_server_row,
    a_batch_over_a_catalog_quota_of_an_ancestor_is_refused_whole_and_creates_nothing,
    the_monthly_cost_quota_counts_only_committed_deployments,
    a_deployment_waiting_for_approval_counts_nothing_until_approved_and_is_checked_again,
    a_waiting_deployment_is_closed_once_and_leaves_the_pending_list,
    approval_policies_are_kept_per_organization_and_replaced,
    a_batch_is_listed_within_the_callers_scope_only,
    racing_requests_for_the_last_room_never_exceed_the_quota,
    a_deployments_server_counts_its_catalog_size_not_what_its_agent_reports,
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
        validation: CredentialValidation::default(),
        updated_at: None,
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

/// A deployment of `organization_id` on `credential_id`, moved to `status`.
async fn deployment_on(
    store: &dyn Store,
    organization_id: Uuid,
    credential_id: Uuid,
    status: DeploymentStatus,
) -> Uuid {
    let at = now();
    let deployment = Deployment {
        id: Uuid::now_v7(),
        organization_id,
        provider: "hetzner".into(),
        credential_id: Some(credential_id),
        status: DeploymentStatus::Pending,
        server_id: None,
        record: DeploymentRecord {
            server_name: "web-1".into(),
            region: "fsn1".into(),
            instance_type: "cx22".into(),
            ..DeploymentRecord::default()
        },
        bootstrap_token_sealed: None,
        created_at: at,
        updated_at: at,
        completed_at: None,
    };
    let token = NewEnrollmentToken {
        id: Uuid::now_v7(),
        token_hash: format!("sha256:{}", Uuid::new_v4().simple()),
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
    if status != DeploymentStatus::Pending {
        assert!(store
            .transition_deployment(
                &[organization_id],
                deployment.id,
                &[DeploymentStatus::Pending],
                status,
                now()
            )
            .await
            .expect("transition_deployment"));
    }
    deployment.id
}

async fn a_rotated_credential_is_sealed_anew_unvalidated_and_a_stale_rotation_is_refused(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let other = create_org(&*store, root, "other").await;
    let original = credential(root, "hetzner");
    store
        .create_cloud_credential(&original)
        .await
        .expect("create_cloud_credential");
    store
        .record_cloud_credential_validation(
            original.id,
            &CredentialValidation {
                status: ValidationStatus::Valid,
                at: Some(now()),
                error: None,
            },
        )
        .await
        .expect("record validation");

    // A rename keeps the fields and the validation.
    let at = now();
    let renamed = match store
        .update_cloud_credential(
            &[root],
            original.id,
            &CredentialUpdate {
                name: Some("renamed".into()),
                default_region: Some("nbg1".into()),
                credentials_sealed: None,
                at,
            },
        )
        .await
        .expect("update")
    {
        CredentialUpdateOutcome::Updated(c) => c,
        other => panic!("rename: {other:?}"),
    };
    assert_eq!(renamed.name, "renamed");
    assert_eq!(renamed.default_region.as_deref(), Some("nbg1"));
    assert_eq!(renamed.credentials_sealed, original.credentials_sealed);
    assert_eq!(renamed.validation.status, ValidationStatus::Valid);
    assert!(renamed.is_validated);
    assert_eq!(renamed.updated_at, Some(at));

    // New fields: sealed anew, validation reset.
    let rotated = match store
        .update_cloud_credential(
            &[root],
            original.id,
            &CredentialUpdate {
                name: None,
                default_region: None,
                credentials_sealed: Some((
                    "v1:rotated".into(),
                    original.credentials_sealed.clone(),
                )),
                at: now(),
            },
        )
        .await
        .expect("update")
    {
        CredentialUpdateOutcome::Updated(c) => c,
        other => panic!("rotation: {other:?}"),
    };
    assert_eq!(rotated.credentials_sealed, "v1:rotated");
    assert_eq!(rotated.name, "renamed");
    assert_eq!(rotated.validation, CredentialValidation::default());
    assert!(!rotated.is_validated);
    let stored = store
        .cloud_credential(&[root], original.id)
        .await
        .expect("cloud_credential")
        .expect("still there");
    assert_eq!(stored.credentials_sealed, "v1:rotated");
    // What a deployment job looks up before each terraform run (provision,
    // rollback, destroy) is the rotated value.
    deployment_on(&*store, root, original.id, DeploymentStatus::Completed).await;
    let for_job = credential_for_deployment(&*store, root, original.id, &[root])
        .await
        .expect("the job's lookup");
    assert_eq!(for_job.credentials_sealed, "v1:rotated");

    // A rotation computed from the fields before the last one is refused
    // and changes nothing.
    let stale = store
        .update_cloud_credential(
            &[root],
            original.id,
            &CredentialUpdate {
                name: Some("lost".into()),
                default_region: None,
                credentials_sealed: Some(("v1:stale".into(), original.credentials_sealed.clone())),
                at: now(),
            },
        )
        .await
        .expect("update");
    assert!(
        matches!(stale, CredentialUpdateOutcome::Changed),
        "{stale:?}"
    );
    let stored = store
        .cloud_credential(&[root], original.id)
        .await
        .expect("cloud_credential")
        .expect("still there");
    assert_eq!(stored.credentials_sealed, "v1:rotated");
    assert_eq!(stored.name, "renamed");

    // Outside the caller's scope, or deleted: not found.
    let outside = store
        .update_cloud_credential(
            &[other],
            original.id,
            &CredentialUpdate {
                name: Some("x".into()),
                default_region: None,
                credentials_sealed: None,
                at: now(),
            },
        )
        .await
        .expect("update");
    assert!(
        matches!(outside, CredentialUpdateOutcome::NotFound),
        "{outside:?}"
    );
}

async fn validation_outcomes_are_kept_with_their_time_and_error(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let c = credential(root, "hetzner");
    store
        .create_cloud_credential(&c)
        .await
        .expect("create_cloud_credential");
    let fresh = store
        .cloud_credential(&[root], c.id)
        .await
        .expect("cloud_credential")
        .expect("exists");
    assert_eq!(fresh.validation.status, ValidationStatus::Unvalidated);
    assert_eq!(fresh.validation.at, None);

    let at = now();
    let invalid = CredentialValidation {
        status: ValidationStatus::Invalid,
        at: Some(at),
        error: Some("credentials for hetzner need a non-empty string field \"token\"".into()),
    };
    store
        .record_cloud_credential_validation(c.id, &invalid)
        .await
        .expect("record validation");
    let stored = store
        .cloud_credential(&[root], c.id)
        .await
        .expect("cloud_credential")
        .expect("exists");
    assert_eq!(stored.validation, invalid);
    assert!(!stored.is_validated);
    assert_eq!(stored.last_used_at, Some(at));

    let later = at + Duration::seconds(5);
    let valid = CredentialValidation {
        status: ValidationStatus::Valid,
        at: Some(later),
        error: None,
    };
    store
        .record_cloud_credential_validation(c.id, &valid)
        .await
        .expect("record validation");
    let listed = store
        .list_cloud_credentials(&[root])
        .await
        .expect("list_cloud_credentials");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].validation, valid);
    assert!(listed[0].is_validated);
}

async fn a_credential_used_by_live_deployments_is_deleted_only_when_forced(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let other = create_org(&*store, root, "other").await;
    let c = credential(root, "hetzner");
    store
        .create_cloud_credential(&c)
        .await
        .expect("create_cloud_credential");
    let failed = deployment_on(&*store, root, c.id, DeploymentStatus::Failed).await;
    let destroyed = deployment_on(&*store, root, c.id, DeploymentStatus::Destroyed).await;
    let completed = deployment_on(&*store, root, c.id, DeploymentStatus::Completed).await;
    // Requests an approver rejected, or nobody decided, never ran.
    let rejected = deployment_on(&*store, root, c.id, DeploymentStatus::Rejected).await;
    let expired = deployment_on(&*store, root, c.id, DeploymentStatus::Expired).await;

    assert_eq!(
        store
            .deployments_using_credential(c.id, 10)
            .await
            .expect("deployments_using_credential"),
        (vec![failed, completed], 2),
        "every deployment but the destroyed, rejected and expired ones uses it"
    );
    let _ = (destroyed, rejected, expired);

    assert_eq!(
        store
            .delete_unused_cloud_credential(&[root], c.id, false, 1, now())
            .await
            .expect("delete"),
        CredentialDeletion::InUse {
            deployment_ids: vec![failed],
            count: 2
        },
        "the list is bounded, the count is not"
    );
    assert!(
        store
            .cloud_credential(&[root], c.id)
            .await
            .expect("cloud_credential")
            .is_some_and(|kept| kept.credentials_sealed == c.credentials_sealed),
        "a refused delete leaves the credential whole"
    );
    assert_eq!(
        store
            .delete_unused_cloud_credential(&[other], c.id, true, 10, now())
            .await
            .expect("delete"),
        CredentialDeletion::NotFound
    );
    assert_eq!(
        store
            .delete_unused_cloud_credential(&[root], c.id, true, 10, now())
            .await
            .expect("delete"),
        CredentialDeletion::Deleted {
            orphaned: vec![failed, completed],
            orphaned_count: 2
        }
    );
    assert!(store
        .cloud_credential(&[root], c.id)
        .await
        .expect("cloud_credential")
        .is_none());
    // The orphaned deployments' next run finds no credential.
    assert!(matches!(
        credential_for_deployment(&*store, root, c.id, &[root, other]).await,
        Err(CredentialUseError::Missing { .. })
    ));

    // Once nothing live uses one, no force is needed.
    let unused = credential(root, "unused");
    store
        .create_cloud_credential(&unused)
        .await
        .expect("create_cloud_credential");
    deployment_on(&*store, root, unused.id, DeploymentStatus::Destroyed).await;
    assert_eq!(
        store
            .delete_unused_cloud_credential(&[root], unused.id, false, 10, now())
            .await
            .expect("delete"),
        CredentialDeletion::Deleted {
            orphaned: vec![],
            orphaned_count: 0
        }
    );
}

fn state_write(n: i64, restored_from: Option<i64>) -> StateWrite {
    StateWrite {
        state_sealed: format!("v1:state-{n}"),
        version_id: Uuid::now_v7(),
        version_sealed: format!("v1:version-{n}"),
        sha256: format!("{n:064x}"),
        size_bytes: 100 + n,
        serial: Some(n),
        restored_from,
    }
}

async fn every_state_write_is_a_version_and_only_the_last_ten_are_kept(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let (deployment, _) = create_deployment(&*store, instance.root_organization_id).await;
    let id = deployment.id;
    let mut writes = Vec::new();
    for n in 1..=12 {
        let write = state_write(n, None);
        assert_eq!(
            store
                .write_terraform_state_version(id, &write, None, now())
                .await
                .expect("write"),
            LockOutcome::Done
        );
        writes.push(write);
    }
    let versions = store
        .terraform_state_versions(id)
        .await
        .expect("terraform_state_versions");
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        (3..=12).rev().collect::<Vec<i64>>(),
        "newest first, the last ten"
    );
    let newest = &versions[0];
    assert_eq!(newest.id, writes[11].version_id);
    assert_eq!(newest.sha256, writes[11].sha256);
    assert_eq!(newest.size_bytes, 112);
    assert_eq!(newest.serial, Some(12));
    assert_eq!(newest.restored_from, None);
    let current = store
        .terraform_state(id)
        .await
        .expect("terraform_state")
        .expect("exists");
    assert_eq!(current.state_sealed.as_deref(), Some("v1:state-12"));

    let (kept, sealed) = store
        .terraform_state_version(id, 3)
        .await
        .expect("terraform_state_version")
        .expect("version 3 is kept");
    assert_eq!(kept.id, writes[2].version_id);
    assert_eq!(sealed, "v1:version-3");
    assert!(store
        .terraform_state_version(id, 2)
        .await
        .expect("terraform_state_version")
        .is_none());

    // While another run holds the lock, nothing is written or kept.
    let info = json!({ "ID": "lock-a" });
    store
        .lock_terraform_state(id, "lock-a", &info, now())
        .await
        .expect("lock");
    assert_eq!(
        store
            .write_terraform_state_version(id, &state_write(13, Some(3)), None, now())
            .await
            .expect("write"),
        LockOutcome::HeldBy(info)
    );
    assert_eq!(
        store
            .terraform_state_versions(id)
            .await
            .expect("versions")
            .len(),
        10
    );
    store
        .unlock_terraform_state(id, None, now())
        .await
        .expect("unlock");
    let restore = state_write(3, Some(3));
    store
        .write_terraform_state_version(id, &restore, None, now())
        .await
        .expect("write");
    let versions = store.terraform_state_versions(id).await.expect("versions");
    assert_eq!(versions[0].version, 13);
    assert_eq!(versions[0].restored_from, Some(3));
    assert_eq!(versions.last().map(|v| v.version), Some(4));

    // Versions are sealed values the key rotation re-seals.
    let secrets = store.sealed_secrets().await.expect("sealed_secrets");
    let listed = secrets
        .iter()
        .find(|s| {
            s.kind == SealedKind::TerraformStateVersion && s.id == restore.version_id.to_string()
        })
        .expect("the version is listed");
    assert_eq!(
        listed.context,
        store::terraform_state_version_context(restore.version_id)
    );
    assert!(store
        .replace_sealed_secret(listed, "v1:resealed")
        .await
        .expect("replace_sealed_secret"));
    let (_, sealed) = store
        .terraform_state_version(id, 13)
        .await
        .expect("version")
        .expect("kept");
    assert_eq!(sealed, "v1:resealed");
}

async fn a_destroy_request_records_whether_the_server_data_goes_too(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let c = credential(root, "hetzner");
    store
        .create_cloud_credential(&c)
        .await
        .expect("create_cloud_credential");
    let pending = deployment_on(&*store, root, c.id, DeploymentStatus::Pending).await;
    let completed = deployment_on(&*store, root, c.id, DeploymentStatus::Completed).await;
    let from = [DeploymentStatus::Completed, DeploymentStatus::Failed];
    assert!(!store
        .request_destroy(&[root], pending, &from, true, now())
        .await
        .expect("request_destroy"));
    assert!(store
        .request_destroy(&[root], completed, &from, true, now())
        .await
        .expect("request_destroy"));
    let d = store
        .deployment(None, completed)
        .await
        .expect("deployment")
        .expect("exists");
    assert_eq!(d.status, DeploymentStatus::Destroying);
    assert!(d.record.delete_server_data);
    assert_eq!(
        d.record.server_name, "web-1",
        "the rest of the record is kept"
    );
    let p = store
        .deployment(None, pending)
        .await
        .expect("deployment")
        .expect("exists");
    assert_eq!(p.status, DeploymentStatus::Pending);
    assert!(!p.record.delete_server_data);
}

async fn deleting_server_data_empties_its_reports_and_keeps_the_server_row(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (gone, _) = enroll_server(&*store, root, "gone", Labels::new()).await;
    let (kept, _) = enroll_server(&*store, root, "kept", Labels::new()).await;
    let t0 = now() - Duration::minutes(5);
    ingest(
        &*store,
        now(),
        (1..=3)
            .flat_map(|seq| {
                [
                    point(gone.id, seq, t0 + Duration::seconds(seq)),
                    point(kept.id, seq, t0 + Duration::seconds(seq)),
                ]
            })
            .collect(),
        vec![],
    )
    .await;
    let deleted = store
        .delete_server_data(gone.id)
        .await
        .expect("delete_server_data");
    assert!(deleted >= 3, "{deleted} rows deleted");
    let window = (t0 - Duration::hours(1), now() + Duration::hours(1));
    assert!(store
        .metrics_points(gone.id, window.0, window.1, 100)
        .await
        .expect("metrics_points")
        .is_empty());
    assert_eq!(
        store
            .metrics_points(kept.id, window.0, window.1, 100)
            .await
            .expect("metrics_points")
            .len(),
        3,
        "another server's data stays"
    );
    assert_eq!(server_by_id(&*store, &[root], gone.id).await.id, gone.id);
}

// ---------------------------------------------------------------------------
// Governance: catalog quotas checked where deployments are created, approval
// requests, policies, batches.
// ---------------------------------------------------------------------------

/// A `local` deployment of `organization_id` with a catalog size, `pending`
/// with its bootstrap token or `pending_approval` without one.
fn sized(
    organization_id: Uuid,
    name: &str,
    size: DeploymentSize,
    waiting: bool,
    batch_id: Option<Uuid>,
) -> (Deployment, Option<NewEnrollmentToken>) {
    let at = now();
    let id = Uuid::now_v7();
    let deployment = Deployment {
        id,
        organization_id,
        provider: "local".into(),
        credential_id: None,
        status: if waiting {
            DeploymentStatus::PendingApproval
        } else {
            DeploymentStatus::Pending
        },
        server_id: None,
        record: DeploymentRecord {
            server_name: name.into(),
            region: "local".into(),
            instance_type: "process".into(),
            size: Some(size),
            batch_id,
            approval: waiting.then(|| ApprovalRecord {
                requested_by_token: Uuid::now_v7(),
                requested_by: "token:x".into(),
                requested_at: at,
                expires_at: at + Duration::hours(1),
                reason: "always".into(),
                decision: None,
                decided_by_token: None,
                decided_at: None,
                comment: None,
            }),
            ..DeploymentRecord::default()
        },
        bootstrap_token_sealed: (!waiting).then(|| format!("v1:0000:{}", Uuid::new_v4().simple())),
        created_at: at,
        updated_at: at,
        completed_at: None,
    };
    let token = (!waiting).then(|| bootstrap_token(organization_id, id));
    (deployment, token)
}

fn bootstrap_token(organization_id: Uuid, deployment_id: Uuid) -> NewEnrollmentToken {
    NewEnrollmentToken {
        id: Uuid::now_v7(),
        token_hash: format!("sha256:{}", Uuid::new_v4().simple()),
        organization_id,
        server_name: None,
        labels: Labels::new(),
        deployment_id: Some(deployment_id),
        created_at: now(),
        expires_at: now() + Duration::hours(1),
    }
}

fn demand_of(size: DeploymentSize, n: i64) -> Demand {
    Demand {
        servers: n,
        cpu_cores: size.vcpus * n,
        memory_gb: size.quota_memory_gb() * n,
        monthly_cost_usd: size.hourly_usd * 730.0 * n as f64,
    }
}

async fn set_quotas(store: &dyn Store, organization_id: Uuid, quotas: Quotas) {
    store
        .update_organization(
            organization_id,
            &OrganizationUpdate {
                name: None,
                quotas: Some(quotas),
            },
        )
        .await
        .expect("update_organization")
        .expect("organization");
}

const TWO_CPUS: DeploymentSize = DeploymentSize {
    vcpus: 2,
    memory_gb: 1.5,
    hourly_usd: 0.0,
};

async fn a_batch_over_a_catalog_quota_of_an_ancestor_is_refused_whole_and_creates_nothing(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let parent = create_org(&*store, instance.root_organization_id, "parent").await;
    let child = create_org(&*store, parent, "child").await;
    set_quotas(
        &*store,
        parent,
        Quotas {
            max_cpu_cores: Some(5),
            ..Quotas::default()
        },
    )
    .await;
    let batch = Uuid::now_v7();
    let first: Vec<_> = (1..=2)
        .map(|i| sized(child, &format!("a-{i}"), TWO_CPUS, false, Some(batch)))
        .collect();
    store
        .create_deployments_within_quota(&first, &demand_of(TWO_CPUS, 2))
        .await
        .expect("store")
        .expect("4 of 5 cores fit");
    let second: Vec<_> = (1..=2)
        .map(|i| {
            sized(
                child,
                &format!("b-{i}"),
                TWO_CPUS,
                false,
                Some(Uuid::now_v7()),
            )
        })
        .collect();
    let refused = store
        .create_deployments_within_quota(&second, &demand_of(TWO_CPUS, 2))
        .await
        .expect("store")
        .expect_err("4 more cores do not fit in the parent's 5");
    assert_eq!(refused.resource, "max_cpu_cores");
    assert_eq!(refused.organization_id, parent, "the ancestor's limit");
    assert_eq!((refused.limit, refused.usage, refused.requested), (5, 4, 4));
    let listed = store
        .list_deployments(&[child], 100, None)
        .await
        .expect("list_deployments");
    assert_eq!(listed.len(), 2, "nothing of the refused batch was created");
    for (d, _) in &second {
        assert!(store
            .deployment(None, d.id)
            .await
            .expect("deployment")
            .is_none());
    }
    // Memory is counted in whole GiB rounded up per server: 2 × 2.
    set_quotas(
        &*store,
        parent,
        Quotas {
            max_memory_gb: Some(4),
            ..Quotas::default()
        },
    )
    .await;
    let one_more = [sized(child, "c-1", TWO_CPUS, false, None)];
    let refused = store
        .create_deployments_within_quota(&one_more, &demand_of(TWO_CPUS, 1))
        .await
        .expect("store")
        .expect_err("a fifth and sixth GiB do not fit");
    assert_eq!((refused.resource, refused.usage), ("max_memory_gb", 4));
}

async fn the_monthly_cost_quota_counts_only_committed_deployments(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let team = create_org(&*store, instance.root_organization_id, "team").await;
    set_quotas(
        &*store,
        team,
        Quotas {
            max_monthly_cost_usd: Some(10),
            ..Quotas::default()
        },
    )
    .await;
    // 0.01 USD/h is 7.30 USD a month.
    let priced = DeploymentSize {
        vcpus: 1,
        memory_gb: 1.0,
        hourly_usd: 0.01,
    };
    let first = [sized(team, "one", priced, false, None)];
    store
        .create_deployments_within_quota(&first, &demand_of(priced, 1))
        .await
        .expect("store")
        .expect("7.30 of 10 USD");
    let usage = store.organization_usage(team).await.expect("usage");
    assert!(
        (usage.committed_monthly_cost_usd - 7.3).abs() < 1e-9,
        "{usage:?}"
    );
    let second = [sized(team, "two", priced, false, None)];
    let refused = store
        .create_deployments_within_quota(&second, &demand_of(priced, 1))
        .await
        .expect("store")
        .expect_err("14.60 USD is over 10");
    assert_eq!(refused.resource, "max_monthly_cost_usd");
    assert_eq!(
        (refused.limit, refused.usage, refused.requested),
        (10, 8, 8)
    );
    // A failed deployment commits nothing: the second fits now.
    assert!(store
        .transition_deployment(
            &[team],
            first[0].0.id,
            &[DeploymentStatus::Pending],
            DeploymentStatus::Failed,
            now()
        )
        .await
        .expect("transition_deployment"));
    assert_eq!(
        store
            .organization_usage(team)
            .await
            .expect("usage")
            .committed_monthly_cost_usd,
        0.0
    );
    store
        .create_deployments_within_quota(&second, &demand_of(priced, 1))
        .await
        .expect("store")
        .expect("fits once the first failed");
}

async fn a_deployment_waiting_for_approval_counts_nothing_until_approved_and_is_checked_again(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let team = create_org(&*store, instance.root_organization_id, "team").await;
    set_quotas(
        &*store,
        team,
        Quotas {
            max_servers: Some(1),
            ..Quotas::default()
        },
    )
    .await;
    let waiting: Vec<_> = (1..=2)
        .map(|i| sized(team, &format!("w-{i}"), TWO_CPUS, true, None))
        .collect();
    for one in &waiting {
        store
            .create_deployments_within_quota(std::slice::from_ref(one), &demand_of(TWO_CPUS, 1))
            .await
            .expect("store")
            .expect("one server fits");
    }
    assert_eq!(
        store.organization_usage(team).await.expect("usage").servers,
        0,
        "requests waiting for approval hold no quota"
    );
    assert!(
        store
            .deployment_token_hash(waiting[0].0.id)
            .await
            .expect("token hash")
            .is_none(),
        "no bootstrap token exists before approval"
    );
    let mut approved = waiting[0].0.clone();
    approved.bootstrap_token_sealed = Some("v1:0000:sealed".into());
    let token = bootstrap_token(team, approved.id);
    assert!(store
        .approve_deployment_within_quota(&approved, &token, &demand_of(TWO_CPUS, 1))
        .await
        .expect("store")
        .expect("fits"));
    let stored = store
        .deployment(None, approved.id)
        .await
        .expect("deployment")
        .expect("exists");
    assert_eq!(stored.status, DeploymentStatus::Pending);
    assert_eq!(
        store
            .deployment_token_hash(approved.id)
            .await
            .expect("token hash"),
        Some(token.token_hash.clone())
    );
    assert!(
        !store
            .approve_deployment_within_quota(
                &approved,
                &bootstrap_token(team, approved.id),
                &demand_of(TWO_CPUS, 1)
            )
            .await
            .expect("store")
            .expect("no quota question"),
        "approved once only"
    );
    // The second request fitted when asked, but not any more.
    let mut second = waiting[1].0.clone();
    second.bootstrap_token_sealed = Some("v1:0000:sealed".into());
    let refused = store
        .approve_deployment_within_quota(
            &second,
            &bootstrap_token(team, second.id),
            &demand_of(TWO_CPUS, 1),
        )
        .await
        .expect("store")
        .expect_err("the server quota is full now");
    assert_eq!((refused.resource, refused.usage), ("max_servers", 1));
    let still = store
        .deployment(None, second.id)
        .await
        .expect("deployment")
        .expect("exists");
    assert_eq!(still.status, DeploymentStatus::PendingApproval);
    assert!(store
        .deployment_token_hash(second.id)
        .await
        .expect("token hash")
        .is_none());
}

async fn a_waiting_deployment_is_closed_once_and_leaves_the_pending_list(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let team = create_org(&*store, instance.root_organization_id, "team").await;
    let (waiting, none) = sized(team, "w", TWO_CPUS, true, None);
    let running = sized(team, "r", TWO_CPUS, false, None);
    store
        .create_deployments_within_quota(
            &[(waiting.clone(), none), running.clone()],
            &demand_of(TWO_CPUS, 2),
        )
        .await
        .expect("store")
        .expect("no limits");
    let pending: Vec<Uuid> = store
        .pending_approvals()
        .await
        .expect("pending_approvals")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(pending, vec![waiting.id]);
    let mut rejected = waiting.clone();
    rejected.completed_at = Some(now());
    if let Some(a) = rejected.record.approval.as_mut() {
        a.decision = Some("rejected".into());
        a.comment = Some("too big".into());
    }
    assert!(store
        .close_pending_deployment(&rejected, DeploymentStatus::Rejected)
        .await
        .expect("close"));
    assert!(
        !store
            .close_pending_deployment(&rejected, DeploymentStatus::Expired)
            .await
            .expect("close"),
        "decided once"
    );
    assert!(
        !store
            .close_pending_deployment(&running.0, DeploymentStatus::Rejected)
            .await
            .expect("close"),
        "a queued deployment is not waiting"
    );
    let stored = store
        .deployment(None, waiting.id)
        .await
        .expect("deployment")
        .expect("exists");
    assert_eq!(stored.status, DeploymentStatus::Rejected);
    assert_eq!(
        stored.record.approval.and_then(|a| a.comment).as_deref(),
        Some("too big")
    );
    assert!(store
        .pending_approvals()
        .await
        .expect("pending_approvals")
        .is_empty());
}

async fn approval_policies_are_kept_per_organization_and_replaced(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    assert!(store.approval_policy(team).await.expect("policy").is_none());
    let at = now();
    let policy = ApprovalPolicy {
        require: "never".into(),
        above_monthly_usd: Some(12.5),
        providers: vec!["aws".into()],
        regions: vec!["eu-west-1".into(), "fsn1".into()],
        updated_at: at,
    };
    store
        .set_approval_policy(team, &policy)
        .await
        .expect("set_approval_policy");
    assert_eq!(
        store.approval_policy(team).await.expect("policy"),
        Some(policy)
    );
    assert!(store.approval_policy(root).await.expect("policy").is_none());
    let always = ApprovalPolicy {
        require: "always".into(),
        above_monthly_usd: None,
        providers: vec![],
        regions: vec![],
        updated_at: at,
    };
    store
        .set_approval_policy(team, &always)
        .await
        .expect("set_approval_policy");
    assert_eq!(
        store.approval_policy(team).await.expect("policy"),
        Some(always)
    );
}

async fn a_batch_is_listed_within_the_callers_scope_only(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let other = create_org(&*store, root, "other").await;
    let batch = Uuid::now_v7();
    let members: Vec<_> = (1..=3)
        .map(|i| sized(team, &format!("web-{i}"), TWO_CPUS, false, Some(batch)))
        .collect();
    store
        .create_deployments_within_quota(&members, &demand_of(TWO_CPUS, 3))
        .await
        .expect("store")
        .expect("no limits");
    let outsider = [sized(team, "solo", TWO_CPUS, false, None)];
    store
        .create_deployments_within_quota(&outsider, &demand_of(TWO_CPUS, 1))
        .await
        .expect("store")
        .expect("no limits");
    let listed: Vec<String> = store
        .batch_deployments(&[team], batch)
        .await
        .expect("batch_deployments")
        .into_iter()
        .map(|d| d.record.server_name)
        .collect();
    assert_eq!(listed, vec!["web-1", "web-2", "web-3"]);
    assert!(store
        .batch_deployments(&[other], batch)
        .await
        .expect("batch_deployments")
        .is_empty());
    let before = store
        .deployments_created_before(&[team], now() + Duration::seconds(1))
        .await
        .expect("deployments_created_before");
    assert_eq!(before.len(), 4);
    assert!(store
        .deployments_created_before(&[team], now() - Duration::hours(1))
        .await
        .expect("deployments_created_before")
        .is_empty());
}

async fn racing_requests_for_the_last_room_never_exceed_the_quota(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let parent = create_org(&*store, instance.root_organization_id, "parent").await;
    let children = [
        create_org(&*store, parent, "left").await,
        create_org(&*store, parent, "right").await,
    ];
    set_quotas(
        &*store,
        parent,
        Quotas {
            max_servers: Some(3),
            max_cpu_cores: Some(6),
            ..Quotas::default()
        },
    )
    .await;
    // Ten requests at once, from two sibling organizations under the
    // limited parent: exactly three fit.
    let mut racing = Vec::new();
    let start = Arc::new(tokio::sync::Barrier::new(10));
    for i in 0..10 {
        let store = store.clone();
        let org = children[i % 2];
        let start = start.clone();
        racing.push(tokio::spawn(async move {
            let one = [sized(org, &format!("race-{i}"), TWO_CPUS, false, None)];
            start.wait().await;
            store
                .create_deployments_within_quota(&one, &demand_of(TWO_CPUS, 1))
                .await
                .expect("store")
                .is_ok()
        }));
    }
    let mut fitted = 0;
    for handle in racing {
        if handle.await.expect("task") {
            fitted += 1;
        }
    }
    assert_eq!(fitted, 3, "three of ten fit");
    let usage = store.organization_usage(parent).await.expect("usage");
    assert_eq!(usage.servers, 3);
}

async fn a_deployments_server_counts_its_catalog_size_not_what_its_agent_reports(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let team = create_org(&*store, instance.root_organization_id, "team").await;
    set_quotas(
        &*store,
        team,
        Quotas {
            max_cpu_cores: Some(3),
            ..Quotas::default()
        },
    )
    .await;
    let one_cpu = DeploymentSize {
        vcpus: 1,
        memory_gb: 1.0,
        hourly_usd: 0.0,
    };
    let (deployment, token) = sized(team, "web-1", one_cpu, false, None);
    let token_hash = token.as_ref().map(|t| t.token_hash.clone()).expect("token");
    store
        .create_deployments_within_quota(&[(deployment, token)], &demand_of(one_cpu, 1))
        .await
        .expect("store")
        .expect("fits");
    // Its agent reports 16 cores: the enrollment is not refused by them,
    // and the usage stays the catalog's.
    let mut e = enrollment(&token_hash, "web-1");
    e.facts = json!({ "hostname": "web-1", "cpu_cores": 16, "memory_bytes": 68_719_476_736u64 });
    try_enroll(&*store, &e).await.expect("enrolls within quota");
    let usage = store.organization_usage(team).await.expect("usage");
    assert_eq!((usage.servers, usage.cpu_cores, usage.memory_gb), (1, 1, 1));
    // A server enrolled by hand counts what it reports.
    enroll_server(&*store, team, "by-hand", Labels::new()).await;
    let usage = store.organization_usage(team).await.expect("usage");
    assert_eq!((usage.servers, usage.cpu_cores, usage.memory_gb), (2, 3, 3));
}
