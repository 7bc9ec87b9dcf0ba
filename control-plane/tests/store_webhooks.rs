//! The store behaviour of webhooks, deliveries, alert rules and alerts, on
//! SQLite and PostgreSQL (see `common/mod.rs` for how `store_tests!` runs
//! each body on both).
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_webhooks
//! ```

#[macro_use]
mod common;

use common::*;
use tether_control_plane::secrets::{MasterKey, Sealer};
use tether_control_plane::store::{
    webhook_secret_context, Alert, AlertQuery, AlertRule, AlertRuleKind, AlertSelector, AlertState,
    AttemptOutcome, DeliveryAttempt, DeliveryStatus, NewDelivery, Webhook,
};
use tether_control_plane::webhooks::{outcome_of, MAX_ATTEMPTS};

store_tests! {
    webhooks_are_scoped_to_the_organization_tree_and_deleted_softly,
    webhook_secret_is_sealed_in_the_database_and_rotates_with_the_master_key [database],
    webhooks_of_organizations_lists_live_webhooks_of_exactly_those_organizations,
    concurrent_claims_never_hand_one_delivery_to_two_workers,
    failed_attempts_are_retried_on_the_backoff_schedule_then_fail,
    a_delivery_held_by_another_worker_cannot_be_recorded_until_its_lease_expires,
    deliveries_list_newest_first_with_every_attempt,
    deleting_a_webhook_abandons_its_pending_deliveries,
    prune_deliveries_deletes_only_finished_deliveries_older_than_the_cutoff,
    alert_rules_are_scoped_and_deleting_one_forgets_its_conditions,
    a_condition_keeps_its_first_since_until_cleared,
    an_alert_fires_once_per_rule_and_server_until_resolved,
    alerts_are_listed_newest_first_by_state_within_the_scope,
}

fn sealer() -> Sealer {
    Sealer::new(MasterKey::generate())
}

fn webhook(organization_id: Uuid, sealer: &Sealer, secret: &str) -> Webhook {
    let id = Uuid::now_v7();
    Webhook {
        id,
        organization_id,
        url: "https://hooks.example.com/tether".into(),
        events: vec!["alert.*".into(), "server.offline".into()],
        secret_sealed: sealer.seal(secret.as_bytes(), &webhook_secret_context(id)),
        created_at: now(),
    }
}

async fn new_webhook(store: &dyn Store, organization_id: Uuid) -> Webhook {
    let w = webhook(organization_id, &sealer(), "a-secret-of-sixteen+");
    store.create_webhook(&w).await.expect("create_webhook");
    w
}

fn delivery(w: &Webhook, event: &str, at: DateTime<Utc>) -> NewDelivery {
    NewDelivery {
        id: Uuid::now_v7(),
        webhook_id: w.id,
        organization_id: w.organization_id,
        event: event.into(),
        body: json!({"event": event, "timestamp": at, "organization_id": w.organization_id, "data": {}})
            .to_string(),
        created_at: at,
    }
}

fn attempt(delivery_id: Uuid, n: i64, at: DateTime<Utc>, status: Option<i64>) -> DeliveryAttempt {
    DeliveryAttempt {
        delivery_id,
        attempt: n,
        at,
        status_code: status,
        error: status
            .filter(|s| !(200..300).contains(s))
            .map(|s| format!("receiver answered {s}")),
        duration_ms: 12,
    }
}

fn metric_rule(organization_id: Uuid, name: &str) -> AlertRule {
    AlertRule {
        id: Uuid::now_v7(),
        organization_id,
        name: name.into(),
        kind: AlertRuleKind::Metric,
        metric: Some("cpu_percent".into()),
        op: Some(">=".into()),
        threshold: Some(90.0),
        for_seconds: 60,
        severity: "critical".into(),
        selector: AlertSelector {
            labels: labels(&[("env", "prod")]),
            server_ids: vec![],
        },
        created_at: now(),
    }
}

fn firing(rule: &AlertRule, organization_id: Uuid, server_id: Uuid, at: DateTime<Utc>) -> Alert {
    Alert {
        id: Uuid::now_v7(),
        rule_id: rule.id,
        rule_name: rule.name.clone(),
        organization_id,
        server_id,
        severity: rule.severity.clone(),
        state: AlertState::Firing,
        value: Some(97.5),
        started_at: at,
        resolved_at: None,
    }
}

async fn webhooks_are_scoped_to_the_organization_tree_and_deleted_softly(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let w = new_webhook(&*store, team).await;

    let team_scope = scope_of(&*store, team).await;
    let root_scope = scope_of(&*store, root).await;
    let sibling_scope = scope_of(&*store, sibling).await;
    assert_eq!(
        store.webhook(&team_scope, w.id).await.unwrap(),
        Some(w.clone())
    );
    assert_eq!(
        store.webhook(&root_scope, w.id).await.unwrap(),
        Some(w.clone())
    );
    assert_eq!(store.webhook(&sibling_scope, w.id).await.unwrap(), None);
    let listed = store.list_webhooks(&root_scope, 10, None).await.unwrap();
    assert_eq!(listed, vec![w.clone()]);
    assert!(store
        .list_webhooks(&sibling_scope, 10, None)
        .await
        .unwrap()
        .is_empty());

    // A sibling cannot delete it; its own tree can.
    assert!(!store
        .delete_webhook(&sibling_scope, w.id, now())
        .await
        .unwrap());
    assert!(store
        .delete_webhook(&team_scope, w.id, now())
        .await
        .unwrap());
    assert!(!store
        .delete_webhook(&team_scope, w.id, now())
        .await
        .unwrap());
    assert_eq!(store.webhook(&team_scope, w.id).await.unwrap(), None);
    assert_eq!(store.webhook_by_id(w.id).await.unwrap(), None);
    assert!(store
        .list_webhooks(&root_scope, 10, None)
        .await
        .unwrap()
        .is_empty());
}

async fn webhook_secret_is_sealed_in_the_database_and_rotates_with_the_master_key(
    store: Arc<dyn Store>,
    database: Database,
) {
    let instance = init(&*store).await;
    let sealer = sealer();
    let secret = "plain-text-secret-4711";
    let w = webhook(instance.root_organization_id, &sealer, secret);
    store.create_webhook(&w).await.unwrap();

    assert_eq!(
        database
            .count(&format!(
                "SELECT COUNT(*) FROM webhooks WHERE secret_sealed LIKE '%{secret}%' \
                 OR url LIKE '%{secret}%'"
            ))
            .await,
        0,
        "the secret is stored in clear"
    );
    let stored = store.webhook_by_id(w.id).await.unwrap().unwrap();
    assert_eq!(
        sealer
            .open(&stored.secret_sealed, &webhook_secret_context(w.id))
            .unwrap(),
        secret.as_bytes()
    );

    // Master key rotation sees it and can re-seal it (compare and swap).
    let listed = store.sealed_secrets().await.unwrap();
    let entry = listed
        .iter()
        .find(|s| s.kind == SealedKind::WebhookSecret)
        .expect("the webhook secret is listed for rotation");
    assert_eq!(entry.id, w.id.to_string());
    assert_eq!(entry.context, webhook_secret_context(w.id));
    let next = Sealer::new(MasterKey::generate());
    let resealed = next.seal(secret.as_bytes(), &entry.context);
    assert!(store.replace_sealed_secret(entry, &resealed).await.unwrap());
    assert!(!store.replace_sealed_secret(entry, &resealed).await.unwrap());
    let stored = store.webhook_by_id(w.id).await.unwrap().unwrap();
    assert_eq!(
        next.open(&stored.secret_sealed, &webhook_secret_context(w.id))
            .unwrap(),
        secret.as_bytes()
    );

    // Deleting erases the sealed secret too.
    let scope = scope_of(&*store, instance.root_organization_id).await;
    assert!(store.delete_webhook(&scope, w.id, now()).await.unwrap());
    assert_eq!(
        database
            .count("SELECT COUNT(*) FROM webhooks WHERE secret_sealed <> ''")
            .await,
        0
    );
    assert!(!store
        .sealed_secrets()
        .await
        .unwrap()
        .iter()
        .any(|s| s.kind == SealedKind::WebhookSecret));
}

async fn webhooks_of_organizations_lists_live_webhooks_of_exactly_those_organizations(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let child = create_org(&*store, team, "child").await;
    let on_root = new_webhook(&*store, root).await;
    let on_team = new_webhook(&*store, team).await;
    let on_child = new_webhook(&*store, child).await;
    let gone = new_webhook(&*store, team).await;
    let scope = scope_of(&*store, root).await;
    assert!(store.delete_webhook(&scope, gone.id, now()).await.unwrap());

    let found: BTreeSet<Uuid> = store
        .webhooks_of_organizations(&[team, root])
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(found, set([on_root.id, on_team.id]));
    assert!(!found.contains(&on_child.id));
    assert!(store
        .webhooks_of_organizations(&[])
        .await
        .unwrap()
        .is_empty());
}

async fn concurrent_claims_never_hand_one_delivery_to_two_workers(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let w = new_webhook(&*store, instance.root_organization_id).await;
    let at = now();
    let queued: Vec<NewDelivery> = (0..60).map(|_| delivery(&w, "alert.firing", at)).collect();
    store.enqueue_deliveries(&queued).await.unwrap();

    let mut workers = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            let worker = format!("worker-{n}");
            let mut mine = Vec::new();
            loop {
                let t = Utc::now();
                let batch = store
                    .claim_deliveries(&worker, t, t + Duration::seconds(60), 4)
                    .await
                    .expect("claim_deliveries");
                if batch.is_empty() {
                    break;
                }
                mine.extend(batch.into_iter().map(|d| d.id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    let unique: BTreeSet<Uuid> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "a delivery was claimed twice");
    assert_eq!(unique, set(queued.iter().map(|d| d.id)));
}

async fn failed_attempts_are_retried_on_the_backoff_schedule_then_fail(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let w = new_webhook(&*store, instance.root_organization_id).await;
    let start = now();
    let d = delivery(&w, "server.offline", start);
    store
        .enqueue_deliveries(std::slice::from_ref(&d))
        .await
        .unwrap();

    let mut t = start;
    let mut expected_delays = Vec::new();
    for n in 1..=MAX_ATTEMPTS {
        let claimed = store
            .claim_deliveries("w", t, t + Duration::seconds(60), 10)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "attempt {n} is due at {t}");
        assert_eq!(claimed[0].attempts, n - 1);
        let outcome = outcome_of(n, false, t);
        assert!(store
            .record_delivery_attempt("w", &attempt(d.id, n, t, Some(500)), outcome)
            .await
            .unwrap());
        match outcome {
            AttemptOutcome::RetryAt(next) => {
                // Not due a millisecond early.
                let early = next - Duration::milliseconds(1);
                assert!(store
                    .claim_deliveries("w", early, early + Duration::seconds(60), 10)
                    .await
                    .unwrap()
                    .is_empty());
                expected_delays.push((next - t).num_seconds());
                t = next;
            }
            AttemptOutcome::Failed => assert_eq!(n, MAX_ATTEMPTS),
            AttemptOutcome::Delivered => unreachable!(),
        }
    }
    assert_eq!(expected_delays, vec![1, 2, 4, 8, 16, 32, 64]);
    let stored = store.delivery(w.id, d.id).await.unwrap().unwrap();
    assert_eq!(stored.status, DeliveryStatus::Failed);
    assert_eq!(stored.attempts, MAX_ATTEMPTS);
    assert_eq!(stored.last_status_code, Some(500));
    assert_eq!(stored.next_attempt_at, None);
    assert!(stored.completed_at.is_some());
    let far = t + Duration::days(1);
    assert!(store
        .claim_deliveries("w", far, far + Duration::seconds(60), 10)
        .await
        .unwrap()
        .is_empty());
    let attempts = store.delivery_attempts(&[d.id]).await.unwrap();
    assert_eq!(
        attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        (1..=MAX_ATTEMPTS).collect::<Vec<_>>()
    );
}

async fn a_delivery_held_by_another_worker_cannot_be_recorded_until_its_lease_expires(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let w = new_webhook(&*store, instance.root_organization_id).await;
    let t = now();
    let d = delivery(&w, "alert.firing", t);
    store
        .enqueue_deliveries(std::slice::from_ref(&d))
        .await
        .unwrap();
    let lease = t + Duration::seconds(60);
    assert_eq!(
        store
            .claim_deliveries("a", t, lease, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // Held: nobody else gets it, nor may record for it.
    assert!(store
        .claim_deliveries("b", t, lease, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(!store
        .record_delivery_attempt(
            "b",
            &attempt(d.id, 1, t, Some(200)),
            AttemptOutcome::Delivered
        )
        .await
        .unwrap());
    // After the lease, another worker takes it over; the first lost it.
    let later = lease + Duration::seconds(1);
    let taken = store
        .claim_deliveries("b", later, later + Duration::seconds(60), 10)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert!(!store
        .record_delivery_attempt(
            "a",
            &attempt(d.id, 1, t, Some(200)),
            AttemptOutcome::Delivered
        )
        .await
        .unwrap());
    assert!(store
        .record_delivery_attempt(
            "b",
            &attempt(d.id, 1, later, Some(204)),
            AttemptOutcome::Delivered
        )
        .await
        .unwrap());
    let stored = store.delivery(w.id, d.id).await.unwrap().unwrap();
    assert_eq!(stored.status, DeliveryStatus::Delivered);
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.last_status_code, Some(204));
    assert_eq!(stored.last_error, None);
}

async fn deliveries_list_newest_first_with_every_attempt(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let w = new_webhook(&*store, instance.root_organization_id).await;
    let other = new_webhook(&*store, instance.root_organization_id).await;
    let t = now();
    let first = delivery(&w, "alert.firing", t);
    let second = delivery(&w, "alert.resolved", t + Duration::milliseconds(5));
    let elsewhere = delivery(&other, "alert.firing", t);
    store
        .enqueue_deliveries(&[first.clone(), second.clone(), elsewhere])
        .await
        .unwrap();
    let claimed = store
        .claim_deliveries("w", t + Duration::seconds(1), t + Duration::seconds(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    assert!(store
        .record_delivery_attempt(
            "w",
            &attempt(first.id, 1, t, Some(500)),
            AttemptOutcome::RetryAt(t)
        )
        .await
        .unwrap());
    let claimed = store
        .claim_deliveries("w", t + Duration::seconds(1), t + Duration::seconds(60), 10)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![first.id]
    );
    assert!(store
        .record_delivery_attempt(
            "w",
            &attempt(first.id, 2, t + Duration::seconds(1), Some(200)),
            AttemptOutcome::Delivered
        )
        .await
        .unwrap());

    let listed = store.list_deliveries(w.id, 10, None).await.unwrap();
    assert_eq!(
        listed.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![second.id, first.id]
    );
    assert_eq!(listed[1].status, DeliveryStatus::Delivered);
    assert_eq!(listed[1].attempts, 2);
    assert_eq!(listed[0].status, DeliveryStatus::Pending);
    assert_eq!(listed[0].body, second.body);
    let page = store
        .list_deliveries(w.id, 1, Some(second.id))
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![first.id]
    );

    let attempts = store
        .delivery_attempts(&[first.id, second.id])
        .await
        .unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].status_code, Some(500));
    assert_eq!(attempts[0].error.as_deref(), Some("receiver answered 500"));
    assert_eq!(attempts[1].status_code, Some(200));
    assert_eq!(attempts[1].duration_ms, 12);
}

async fn deleting_a_webhook_abandons_its_pending_deliveries(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let w = new_webhook(&*store, instance.root_organization_id).await;
    let t = now();
    let d = delivery(&w, "alert.firing", t);
    store
        .enqueue_deliveries(std::slice::from_ref(&d))
        .await
        .unwrap();
    let scope = scope_of(&*store, instance.root_organization_id).await;
    assert!(store.delete_webhook(&scope, w.id, t).await.unwrap());
    assert!(store
        .claim_deliveries("w", t + Duration::seconds(5), t + Duration::seconds(60), 10)
        .await
        .unwrap()
        .is_empty());
    let stored = store.delivery(w.id, d.id).await.unwrap().unwrap();
    assert_eq!(stored.status, DeliveryStatus::Failed);
    assert_eq!(stored.last_error.as_deref(), Some("webhook deleted"));
}

async fn alert_rules_are_scoped_and_deleting_one_forgets_its_conditions(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let rule = metric_rule(team, "cpu hot");
    store.create_alert_rule(&rule).await.unwrap();
    let offline = AlertRule {
        id: Uuid::now_v7(),
        kind: AlertRuleKind::Offline,
        metric: None,
        op: None,
        threshold: None,
        selector: AlertSelector::default(),
        ..metric_rule(root, "offline")
    };
    store.create_alert_rule(&offline).await.unwrap();

    let team_scope = scope_of(&*store, team).await;
    let sibling_scope = scope_of(&*store, sibling).await;
    let root_scope = scope_of(&*store, root).await;
    assert_eq!(
        store.alert_rule(&team_scope, rule.id).await.unwrap(),
        Some(rule.clone())
    );
    assert_eq!(
        store.alert_rule(&sibling_scope, rule.id).await.unwrap(),
        None
    );
    assert_eq!(
        store.list_alert_rules(&team_scope, 10, None).await.unwrap(),
        vec![rule.clone()]
    );
    assert_eq!(
        store.list_alert_rules(&root_scope, 10, None).await.unwrap(),
        vec![rule.clone(), offline.clone()]
    );
    assert_eq!(
        store
            .list_alert_rules(&root_scope, 10, Some(rule.id))
            .await
            .unwrap(),
        vec![offline.clone()]
    );
    assert_eq!(
        store.all_alert_rules().await.unwrap(),
        vec![rule.clone(), offline.clone()]
    );

    let server = Uuid::now_v7();
    store.condition_holds(rule.id, server, now()).await.unwrap();
    assert!(!store
        .delete_alert_rule(&sibling_scope, rule.id, now())
        .await
        .unwrap());
    assert!(store
        .delete_alert_rule(&team_scope, rule.id, now())
        .await
        .unwrap());
    assert!(store.conditions_of_rule(rule.id).await.unwrap().is_empty());
    assert_eq!(store.alert_rule(&team_scope, rule.id).await.unwrap(), None);
    assert_eq!(store.all_alert_rules().await.unwrap(), vec![offline]);
}

async fn a_condition_keeps_its_first_since_until_cleared(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let rule = metric_rule(instance.root_organization_id, "cpu");
    store.create_alert_rule(&rule).await.unwrap();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let t0 = now();
    assert_eq!(store.condition_holds(rule.id, a, t0).await.unwrap(), t0);
    let t1 = t0 + Duration::seconds(30);
    assert_eq!(store.condition_holds(rule.id, a, t1).await.unwrap(), t0);
    assert_eq!(store.condition_holds(rule.id, b, t1).await.unwrap(), t1);
    let mut conditions = store.conditions_of_rule(rule.id).await.unwrap();
    conditions.sort();
    let mut expected = vec![(a, t0), (b, t1)];
    expected.sort();
    assert_eq!(conditions, expected);
    // A clearing sample resets the clock.
    store.clear_condition(rule.id, a).await.unwrap();
    let t2 = t1 + Duration::seconds(5);
    assert_eq!(store.condition_holds(rule.id, a, t2).await.unwrap(), t2);
}

async fn an_alert_fires_once_per_rule_and_server_until_resolved(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let rule = metric_rule(root, "cpu");
    store.create_alert_rule(&rule).await.unwrap();
    let server = Uuid::now_v7();
    let t = now();
    let alert = firing(&rule, root, server, t);
    assert!(store.fire_alert(&alert).await.unwrap());
    // A second evaluation (a restart, another replica) does not page again.
    assert!(!store
        .fire_alert(&firing(&rule, root, server, t))
        .await
        .unwrap());
    assert_eq!(
        store.firing_alerts_of_rule(rule.id).await.unwrap(),
        vec![alert.clone()]
    );

    let resolved_at = t + Duration::seconds(90);
    let resolved = store
        .resolve_alert(rule.id, server, resolved_at)
        .await
        .unwrap()
        .expect("resolved by this call");
    assert_eq!(resolved.id, alert.id);
    assert_eq!(resolved.state, AlertState::Resolved);
    assert_eq!(resolved.resolved_at, Some(resolved_at));
    assert_eq!(resolved.value, Some(97.5));
    assert_eq!(
        store
            .resolve_alert(rule.id, server, resolved_at)
            .await
            .unwrap(),
        None
    );
    assert!(store
        .firing_alerts_of_rule(rule.id)
        .await
        .unwrap()
        .is_empty());

    // It may fire again afterwards: a new alert.
    let again = firing(&rule, root, server, resolved_at);
    assert!(store.fire_alert(&again).await.unwrap());
    let other_server = firing(&rule, root, Uuid::now_v7(), resolved_at);
    assert!(store.fire_alert(&other_server).await.unwrap());
    let resolved = store
        .resolve_alerts_of_rule(rule.id, resolved_at + Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(
        resolved.iter().map(|a| a.id).collect::<BTreeSet<_>>(),
        set([again.id, other_server.id])
    );
}

async fn alerts_are_listed_newest_first_by_state_within_the_scope(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let sibling = create_org(&*store, root, "sibling").await;
    let rule = metric_rule(root, "cpu");
    store.create_alert_rule(&rule).await.unwrap();
    let t = now();
    let old = firing(&rule, team, Uuid::now_v7(), t);
    let new = firing(&rule, team, Uuid::now_v7(), t);
    let theirs = firing(&rule, sibling, Uuid::now_v7(), t);
    for a in [&old, &new, &theirs] {
        assert!(store.fire_alert(a).await.unwrap());
    }
    store
        .resolve_alert(rule.id, old.server_id, t)
        .await
        .unwrap();

    let team_scope = scope_of(&*store, team).await;
    let query = |state: Option<AlertState>| AlertQuery {
        scope: team_scope.clone(),
        state,
        limit: 10,
        before: None,
    };
    let ids = |alerts: Vec<Alert>| alerts.into_iter().map(|a| a.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_alerts(&query(None)).await.unwrap()),
        vec![new.id, old.id]
    );
    assert_eq!(
        ids(store
            .list_alerts(&query(Some(AlertState::Firing)))
            .await
            .unwrap()),
        vec![new.id]
    );
    assert_eq!(
        ids(store
            .list_alerts(&query(Some(AlertState::Resolved)))
            .await
            .unwrap()),
        vec![old.id]
    );
    let page = AlertQuery {
        before: Some(new.id),
        ..query(None)
    };
    assert_eq!(ids(store.list_alerts(&page).await.unwrap()), vec![old.id]);
    let root_scope = scope_of(&*store, root).await;
    let all = store
        .list_alerts(&AlertQuery {
            scope: root_scope,
            state: None,
            limit: 10,
            before: None,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
}

async fn prune_deliveries_deletes_only_finished_deliveries_older_than_the_cutoff(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let w = new_webhook(&*store, instance.root_organization_id).await;
    let t = now() - Duration::days(40);
    let old_done = delivery(&w, "alert.firing", t);
    let old_pending = delivery(&w, "alert.firing", t);
    let recent_done = delivery(&w, "alert.resolved", now());
    store
        .enqueue_deliveries(&[old_done.clone(), old_pending.clone(), recent_done.clone()])
        .await
        .unwrap();
    let claimed = store
        .claim_deliveries("w", now(), now() + Duration::seconds(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    for (d, at, outcome) in [
        (&old_done, t, AttemptOutcome::Delivered),
        (
            &old_pending,
            t,
            AttemptOutcome::RetryAt(now() + Duration::hours(1)),
        ),
        (&recent_done, now(), AttemptOutcome::Failed),
    ] {
        assert!(store
            .record_delivery_attempt("w", &attempt(d.id, 1, at, Some(500)), outcome)
            .await
            .unwrap());
    }
    let cutoff = now() - Duration::days(30);
    assert_eq!(store.prune_deliveries(cutoff).await.unwrap(), 1);
    assert_eq!(store.delivery(w.id, old_done.id).await.unwrap(), None);
    assert!(store
        .delivery_attempts(&[old_done.id])
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .delivery(w.id, old_pending.id)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .delivery(w.id, recent_done.id)
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.prune_deliveries(cutoff).await.unwrap(), 0);
}
