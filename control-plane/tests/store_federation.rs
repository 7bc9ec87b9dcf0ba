//! The federation area of the store ([`FederationStore`]), on SQLite and
//! PostgreSQL: invites redeemed once, peerings scoped to the organization
//! tree, health transitions, remote inventory replaced and removed with its
//! peering, signing-key rotation, and the sealed keys master-key rotation
//! re-seals.
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_federation
//! ```

#[macro_use]
mod common;

use common::*;
use tether_control_plane::store::{
    BranchHealth, BranchInvite, BranchPeer, BranchStatus, CommandRecord, CommandState,
    FederationKey, RelayedCommandRecord, RelayedCommandUpdate, RemoteServer,
};

store_tests! {
    an_invite_is_redeemed_once_only_with_its_secret_and_before_it_expires,
    concurrent_redemptions_of_one_invite_let_exactly_one_branch_in,
    peerings_are_visible_only_in_their_organization_tree,
    health_rounds_report_the_previous_status_and_keep_last_seen,
    remote_inventory_is_replaced_per_peer_and_removed_with_the_peering,
    rotating_the_signing_key_retires_the_previous_one_and_both_are_resealable,
    a_relayed_command_mirror_follows_the_peer_until_it_ends_and_then_never_changes,
}

fn invite(org: Uuid, hash: &str, expires_in: Duration) -> BranchInvite {
    let at = now();
    BranchInvite {
        id: Uuid::now_v7(),
        organization_id: org,
        name: "peer".into(),
        secret_hash: hash.into(),
        scopes: vec!["servers:read".into()],
        created_at: at,
        expires_at: at + expires_in,
        used_at: None,
    }
}

fn peer(org: Uuid) -> BranchPeer {
    BranchPeer {
        id: Uuid::now_v7(),
        organization_id: org,
        name: "branch b".into(),
        address: "127.0.0.1:7443".into(),
        ca_cert_pem: "-----BEGIN CERTIFICATE-----".into(),
        client_chain: vec![vec![1, 2, 3], vec![4, 5]],
        client_key_sealed: "sealed-client-key".into(),
        peer_keys: vec![tether_protocol::VerificationKey {
            kid: "k1".into(),
            x: "x".into(),
            y: "y".into(),
            not_after: None,
        }],
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

fn remote(peer: &BranchPeer, name: &str) -> RemoteServer {
    RemoteServer {
        branch_id: peer.id,
        id: Uuid::now_v7(),
        organization_id: peer.organization_id,
        name: name.into(),
        hostname: format!("{name}.example"),
        labels: labels(&[("env", "prod")]),
        status: "online".into(),
        last_seen_at: Some(now()),
        agent_version: Some("0.1.0".into()),
        cpu_percent: Some(12.5),
        memory_used_bytes: Some(1 << 30),
        memory_total_bytes: Some(4 << 30),
        synced_at: now(),
    }
}

async fn an_invite_is_redeemed_once_only_with_its_secret_and_before_it_expires(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let org = instance.root_organization_id;
    let live = invite(org, "hash-1", Duration::minutes(10));
    let expired = invite(org, "hash-2", Duration::seconds(-1));
    store.create_branch_invite(&live).await.unwrap();
    store.create_branch_invite(&expired).await.unwrap();

    let wrong = store
        .redeem_branch_invite(live.id, "not-the-hash", "a", now())
        .await
        .unwrap();
    assert!(wrong.is_none(), "redeemed with a wrong secret");
    let late = store
        .redeem_branch_invite(expired.id, "hash-2", "a", now())
        .await
        .unwrap();
    assert!(late.is_none(), "redeemed an expired invite");

    let redeemed = store
        .redeem_branch_invite(live.id, "hash-1", "a", now())
        .await
        .unwrap()
        .expect("a valid invite is redeemed");
    assert_eq!(redeemed.id, live.id);
    assert_eq!(redeemed.scopes, live.scopes);
    assert_eq!(redeemed.organization_id, org);
    assert!(redeemed.used_at.is_some());
    let twice = store
        .redeem_branch_invite(live.id, "hash-1", "b", now())
        .await
        .unwrap();
    assert!(twice.is_none(), "an invite was redeemed twice");
}

async fn concurrent_redemptions_of_one_invite_let_exactly_one_branch_in(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let live = invite(instance.root_organization_id, "h", Duration::minutes(10));
    store.create_branch_invite(&live).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .redeem_branch_invite(live.id, "h", &format!("branch-{i}"), now())
                .await
                .unwrap()
                .is_some()
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.unwrap());
    }
    assert_eq!(wins, 1);
}

async fn peerings_are_visible_only_in_their_organization_tree(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let other = create_org(&*store, root, "other").await;
    let theirs = peer(team);
    store.upsert_branch_peer(&theirs).await.unwrap();

    let back = store
        .branch_peer(Some(&scope_of(&*store, team).await), theirs.id)
        .await
        .unwrap()
        .expect("visible in its own organization");
    assert_eq!(back, theirs);
    assert!(store
        .branch_peer(Some(&scope_of(&*store, root).await), theirs.id)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .branch_peer(Some(&scope_of(&*store, other).await), theirs.id)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .list_branch_peers(Some(&scope_of(&*store, other).await))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.list_branch_peers(None).await.unwrap().len(), 1);

    // Deleting from outside the tree does nothing; from inside removes it.
    assert!(!store
        .delete_branch_peer(Some(&scope_of(&*store, other).await), theirs.id)
        .await
        .unwrap());
    assert!(store
        .delete_branch_peer(Some(&scope_of(&*store, team).await), theirs.id)
        .await
        .unwrap());
    assert!(store.branch_peer(None, theirs.id).await.unwrap().is_none());
}

async fn health_rounds_report_the_previous_status_and_keep_last_seen(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let p = peer(instance.root_organization_id);
    store.upsert_branch_peer(&p).await.unwrap();
    let seen = now();
    let before = store
        .record_branch_health(
            p.id,
            &BranchHealth {
                status: BranchStatus::Healthy,
                last_seen_at: Some(seen),
                latency_ms: Some(3),
                server_count: Some(2),
            },
        )
        .await
        .unwrap();
    assert_eq!(before, Some(BranchStatus::Healthy));
    let before = store
        .record_branch_health(
            p.id,
            &BranchHealth {
                status: BranchStatus::Unreachable,
                last_seen_at: None,
                latency_ms: None,
                server_count: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(before, Some(BranchStatus::Healthy));
    let stored = store.branch_peer(None, p.id).await.unwrap().unwrap();
    assert_eq!(stored.status, BranchStatus::Unreachable);
    assert_eq!(
        stored.last_seen_at,
        Some(seen),
        "a failed round erased last_seen_at"
    );
    assert_eq!(stored.latency_ms, Some(3));
    assert_eq!(stored.server_count, 2);

    let keys = vec![tether_protocol::VerificationKey {
        kid: "k2".into(),
        x: "x2".into(),
        y: "y2".into(),
        not_after: Some(123),
    }];
    store.set_branch_peer_keys(p.id, &keys).await.unwrap();
    assert_eq!(
        store
            .branch_peer(None, p.id)
            .await
            .unwrap()
            .unwrap()
            .peer_keys,
        keys
    );
    let missing = store
        .record_branch_health(
            Uuid::now_v7(),
            &BranchHealth {
                status: BranchStatus::Healthy,
                last_seen_at: None,
                latency_ms: None,
                server_count: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(missing, None);
}

async fn remote_inventory_is_replaced_per_peer_and_removed_with_the_peering(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let b = peer(root);
    let c = peer(team);
    store.upsert_branch_peer(&b).await.unwrap();
    store.upsert_branch_peer(&c).await.unwrap();
    let first = vec![remote(&b, "one"), remote(&b, "two")];
    store.replace_remote_servers(b.id, &first).await.unwrap();
    store
        .replace_remote_servers(c.id, &[remote(&c, "three")])
        .await
        .unwrap();
    let all = store
        .list_remote_servers(&scope_of(&*store, root).await)
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let got = all.iter().find(|r| r.id == first[0].id).unwrap();
    assert_eq!(got, &first[0]);
    // The team sees only its peering's servers.
    let team_view = store
        .list_remote_servers(&scope_of(&*store, team).await)
        .await
        .unwrap();
    assert_eq!(team_view.len(), 1);
    assert_eq!(team_view[0].name, "three");

    // A new sync replaces the old list.
    store
        .replace_remote_servers(b.id, &[remote(&b, "four")])
        .await
        .unwrap();
    let names: BTreeSet<String> = store
        .list_remote_servers(&scope_of(&*store, root).await)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["four".to_string(), "three".to_string()])
    );

    // Removing the peering removes its servers; syncing a gone peer stores nothing.
    assert!(store.delete_branch_peer(None, b.id).await.unwrap());
    store
        .replace_remote_servers(b.id, &[remote(&b, "late")])
        .await
        .unwrap();
    let left = store
        .list_remote_servers(&scope_of(&*store, root).await)
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].name, "three");
}

async fn rotating_the_signing_key_retires_the_previous_one_and_both_are_resealable(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let key = |at: DateTime<Utc>| FederationKey {
        kid: Uuid::now_v7(),
        private_key_sealed: format!("sealed-{}", Uuid::now_v7()),
        x: "x".into(),
        y: "y".into(),
        created_at: at,
        retired_at: None,
    };
    let first = key(now() - Duration::hours(25));
    let second = key(now());
    store.rotate_federation_key(&first).await.unwrap();
    store.rotate_federation_key(&second).await.unwrap();
    let keys = store.federation_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].kid, first.kid);
    assert_eq!(keys[0].retired_at, Some(second.created_at));
    assert_eq!(keys[1], second);

    // Master-key rotation finds the signing keys and peerings' client keys.
    let p = peer(instance.root_organization_id);
    store.upsert_branch_peer(&p).await.unwrap();
    let sealed = store.sealed_secrets().await.unwrap();
    let signing: Vec<_> = sealed
        .iter()
        .filter(|s| s.kind == SealedKind::FederationSigningKey)
        .collect();
    assert_eq!(signing.len(), 2);
    let client = sealed
        .iter()
        .find(|s| s.kind == SealedKind::BranchClientKey)
        .expect("the peering's client key is listed for re-sealing");
    assert_eq!(client.id, p.id.to_string());
    assert!(store
        .replace_sealed_secret(client, "resealed-client-key")
        .await
        .unwrap());
    assert_eq!(
        store
            .branch_peer(None, p.id)
            .await
            .unwrap()
            .unwrap()
            .client_key_sealed,
        "resealed-client-key"
    );
    let one = signing[0];
    assert!(store.replace_sealed_secret(one, "resealed").await.unwrap());
    assert!(store
        .federation_keys()
        .await
        .unwrap()
        .iter()
        .any(|k| k.private_key_sealed == "resealed"));
}

fn mirror(org: Uuid, branch_id: Uuid) -> RelayedCommandRecord {
    let at = now();
    RelayedCommandRecord {
        branch_id,
        remote_command_id: Uuid::now_v7().to_string(),
        command: CommandRecord {
            id: Uuid::now_v7(),
            organization_id: org,
            server_id: Uuid::now_v7(),
            argv: vec!["echo".into(), "hi".into()],
            timeout_ms: 10_000,
            max_output_bytes: 1 << 20,
            status: CommandState::Queued,
            exit_code: None,
            signal: None,
            reason: None,
            output: Vec::new(),
            output_truncated: false,
            cancel_requested: false,
            created_by: "token:test".into(),
            created_at: at,
            started_at: None,
            finished_at: None,
            claimed_by: None,
            deliver_by: at + Duration::seconds(60),
        },
    }
}

fn update(status: CommandState, output: &[u8]) -> RelayedCommandUpdate {
    RelayedCommandUpdate {
        status,
        exit_code: status.is_terminal().then_some(0),
        reason: None,
        output: output.to_vec(),
        output_truncated: false,
        started_at: Some(now()),
        finished_at: status.is_terminal().then(now),
    }
}

async fn a_relayed_command_mirror_follows_the_peer_until_it_ends_and_then_never_changes(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let other = create_org(&*store, root, "other").await;
    let relayed = mirror(team, Uuid::now_v7());
    let id = relayed.command.id;
    store.create_relayed_command(&relayed).await.unwrap();

    let back = store
        .relayed_command(Some(&scope_of(&*store, team).await), id)
        .await
        .unwrap()
        .expect("visible in its organization");
    assert_eq!(back.command.status, CommandState::Queued);
    assert_eq!(back.command.argv, relayed.command.argv);
    assert_eq!(back.remote_command_id, relayed.remote_command_id);
    assert!(store
        .relayed_command(Some(&scope_of(&*store, other).await), id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.unfinished_relayed_commands().await.unwrap().len(), 1);

    assert!(store
        .update_relayed_command(id, &update(CommandState::Running, b"h"))
        .await
        .unwrap());
    assert!(store
        .update_relayed_command(id, &update(CommandState::Succeeded, b"hi\n"))
        .await
        .unwrap());
    // A late or replayed answer cannot move an ended command.
    assert!(!store
        .update_relayed_command(id, &update(CommandState::Running, b"late"))
        .await
        .unwrap());
    let done = store
        .relayed_command(None, id)
        .await
        .unwrap()
        .expect("mirror");
    assert_eq!(done.command.status, CommandState::Succeeded);
    assert_eq!(done.command.output, b"hi\n");
    assert_eq!(done.command.exit_code, Some(0));
    assert!(done.command.finished_at.is_some());
    assert!(store
        .unfinished_relayed_commands()
        .await
        .unwrap()
        .is_empty());
}
