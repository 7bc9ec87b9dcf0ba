//! The alert engine and `events::emit` inside a running control plane
//! (`app::start` on its embedded SQLite): which webhooks an event reaches,
//! health-failing rules driven by events, and the debounce of metric rules
//! over consecutive samples. Evaluation rounds are run with chosen clocks
//! (`alerts::evaluate`) so `for_seconds` is checked without waiting.

#[macro_use]
mod common;

use common::*;
use tether_control_plane::alerts::evaluate;
use tether_control_plane::app::RunningControlPlane;
use tether_control_plane::config::ServeArgs;
use tether_control_plane::events::emit;
use tether_control_plane::secrets::{MasterKey, Sealer};
use tether_control_plane::store::{
    webhook_secret_context, AlertQuery, AlertRule, AlertRuleKind, AlertSelector, AlertState,
    Delivery, Webhook,
};

async fn start(dir: &std::path::Path) -> RunningControlPlane {
    let config = ServeArgs {
        data_dir: Some(dir.to_path_buf()),
        api_listen: Some("127.0.0.1:0".parse().unwrap()),
        quic_listen: Some("127.0.0.1:0".parse().unwrap()),
        branch_name: Some("alerts-test".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    tether_control_plane::app::start(config).await.unwrap()
}

/// A webhook (to a closed local port: deliveries stay queued for retry).
async fn hook(store: &dyn Store, organization_id: Uuid, events: &[&str]) -> Webhook {
    let id = Uuid::now_v7();
    let w = Webhook {
        id,
        organization_id,
        url: "http://127.0.0.1:9/hook".into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        secret_sealed: Sealer::new(MasterKey::generate())
            .seal(b"0123456789abcdef", &webhook_secret_context(id)),
        created_at: now(),
    };
    store.create_webhook(&w).await.unwrap();
    w
}

async fn deliveries(store: &dyn Store, w: &Webhook) -> Vec<Delivery> {
    store.list_deliveries(w.id, 100, None).await.unwrap()
}

fn events(list: &[Delivery]) -> Vec<String> {
    let mut names: Vec<String> = list.iter().map(|d| d.event.clone()).collect();
    names.sort();
    names
}

fn rule(organization_id: Uuid, kind: AlertRuleKind, for_seconds: i64) -> AlertRule {
    AlertRule {
        id: Uuid::now_v7(),
        organization_id,
        name: format!("{} rule", kind.as_str()),
        kind,
        metric: None,
        op: None,
        threshold: None,
        for_seconds,
        severity: "critical".into(),
        selector: AlertSelector::default(),
        created_at: now(),
    }
}

fn point(server_id: Uuid, seq: i64, ts: DateTime<Utc>, cpu: f64) -> MetricsRecord {
    MetricsRecord {
        server_id,
        seq,
        ts,
        cpu_percent: cpu,
        load_1: 0.1,
        load_5: 0.1,
        load_15: 0.1,
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 2 << 30,
        swap_used_bytes: 0,
        swap_total_bytes: 0,
        cpu_per_core: json!([cpu]).into(),
        disks: json!([]).into(),
        networks: json!([]).into(),
        uptime_seconds: 100,
        process_count: 10,
        dropped_batches: 0,
    }
}

async fn report(store: &dyn Store, p: MetricsRecord) {
    store
        .ingest_metrics(&MetricsIngest {
            received_at: Utc::now(),
            metrics: vec![p],
            containers: vec![],
        })
        .await
        .unwrap();
}

async fn alerts(store: &dyn Store, scope: Vec<Uuid>, state: AlertState) -> Vec<Uuid> {
    store
        .list_alerts(&AlertQuery {
            scope,
            state: Some(state),
            limit: 100,
            before: None,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.server_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_reaches_matching_webhooks_of_the_organization_and_its_ancestors_only() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let cp = running.state.clone();
    let store = &*cp.store;
    let root = cp.instance.root_organization_id;
    let team = create_org(store, root, "team").await;
    let child = create_org(store, team, "child").await;
    let sibling = create_org(store, root, "sibling").await;
    let on_root = hook(store, root, &[]).await;
    let team_alerts = hook(store, team, &["alert.*"]).await;
    let team_health = hook(store, team, &["health.failed", "server.offline"]).await;
    let on_child = hook(store, child, &["*"]).await;
    let on_sibling = hook(store, sibling, &["*"]).await;

    let data = json!({ "server_id": Uuid::now_v7(), "check": "disk" });
    emit(&cp, team, "health.failed", data.clone()).await;

    assert_eq!(
        events(&deliveries(store, &on_root).await),
        ["health.failed"]
    );
    assert_eq!(
        events(&deliveries(store, &team_health).await),
        ["health.failed"]
    );
    assert!(deliveries(store, &team_alerts).await.is_empty());
    assert!(deliveries(store, &on_child).await.is_empty());
    assert!(deliveries(store, &on_sibling).await.is_empty());

    let delivered = &deliveries(store, &team_health).await[0];
    let body: serde_json::Value = serde_json::from_str(&delivered.body).unwrap();
    assert_eq!(body["event"], "health.failed");
    assert_eq!(body["organization_id"], team.to_string());
    assert_eq!(body["data"], data);
    let stamp: DateTime<Utc> = body["timestamp"].as_str().unwrap().parse().unwrap();
    assert!((Utc::now() - stamp).num_seconds().abs() < 60);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_failing_rule_fires_after_for_seconds_and_resolves_on_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let cp = running.state.clone();
    let store = &*cp.store;
    let root = cp.instance.root_organization_id;
    let team = create_org(store, root, "team").await;
    let (server, _) = enroll_server(store, team, "db-1", labels(&[])).await;
    let (healthy, _) = enroll_server(store, team, "db-2", labels(&[])).await;
    let audit = hook(store, root, &["alert.*"]).await;
    let health = rule(root, AlertRuleKind::HealthFailing, 30);
    store.create_alert_rule(&health).await.unwrap();
    let scope = scope_of(store, root).await;

    let t0 = Utc::now();
    emit(
        &cp,
        team,
        "health.failed",
        json!({ "server_id": server.id }),
    )
    .await;
    evaluate(&cp, t0 + Duration::seconds(5)).await.unwrap();
    assert!(
        alerts(store, scope.clone(), AlertState::Firing)
            .await
            .is_empty(),
        "fired before for_seconds"
    );
    evaluate(&cp, t0 + Duration::seconds(31)).await.unwrap();
    assert_eq!(
        alerts(store, scope.clone(), AlertState::Firing).await,
        [server.id]
    );
    assert!(!alerts(store, scope.clone(), AlertState::Firing)
        .await
        .contains(&healthy.id));
    // Evaluated again: still one alert, one page.
    evaluate(&cp, t0 + Duration::seconds(60)).await.unwrap();
    assert_eq!(events(&deliveries(store, &audit).await), ["alert.firing"]);

    emit(
        &cp,
        team,
        "health.recovered",
        json!({ "server_id": server.id }),
    )
    .await;
    assert!(alerts(store, scope.clone(), AlertState::Firing)
        .await
        .is_empty());
    assert_eq!(
        alerts(store, scope.clone(), AlertState::Resolved).await,
        [server.id]
    );
    assert_eq!(
        events(&deliveries(store, &audit).await),
        ["alert.firing", "alert.resolved"]
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_noisy_sample_never_pages_and_a_clearing_sample_resets_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let cp = running.state.clone();
    let store = &*cp.store;
    let root = cp.instance.root_organization_id;
    let (prod, _) = enroll_server(store, root, "web-1", labels(&[("env", "prod")])).await;
    let (dev, _) = enroll_server(store, root, "web-2", labels(&[("env", "dev")])).await;
    let cpu = AlertRule {
        metric: Some("cpu_percent".into()),
        op: Some(">".into()),
        threshold: Some(90.0),
        selector: AlertSelector {
            labels: labels(&[("env", "prod")]),
            server_ids: vec![],
        },
        ..rule(root, AlertRuleKind::Metric, 60)
    };
    store.create_alert_rule(&cpu).await.unwrap();
    let scope = scope_of(store, root).await;
    let t0 = now() - Duration::minutes(10);
    let firing = || alerts(store, scope.clone(), AlertState::Firing);

    // A spike, then a normal sample: the clock resets.
    report(store, point(prod.id, 1, t0, 99.0)).await;
    report(store, point(dev.id, 1, t0, 99.0)).await;
    evaluate(&cp, Utc::now()).await.unwrap();
    report(store, point(prod.id, 2, t0 + Duration::seconds(30), 20.0)).await;
    evaluate(&cp, Utc::now()).await.unwrap();
    report(store, point(prod.id, 3, t0 + Duration::seconds(70), 99.0)).await;
    evaluate(&cp, Utc::now()).await.unwrap();
    assert!(firing().await.is_empty(), "paged on a noisy sample");

    // Over the threshold for less than 60 s of samples: still quiet.
    report(store, point(prod.id, 4, t0 + Duration::seconds(100), 95.0)).await;
    evaluate(&cp, Utc::now()).await.unwrap();
    assert!(firing().await.is_empty());
    // 60 s of consecutive samples: it fires, for the prod server only.
    report(store, point(prod.id, 5, t0 + Duration::seconds(130), 97.0)).await;
    report(store, point(dev.id, 5, t0 + Duration::seconds(130), 97.0)).await;
    evaluate(&cp, Utc::now()).await.unwrap();
    assert_eq!(firing().await, [prod.id]);
    let listed = store
        .list_alerts(&AlertQuery {
            scope: scope.clone(),
            state: None,
            limit: 10,
            before: None,
        })
        .await
        .unwrap();
    assert_eq!(listed[0].value, Some(97.0));
    assert_eq!(listed[0].rule_name, cpu.name);

    // A sample under the threshold resolves it.
    report(store, point(prod.id, 6, t0 + Duration::seconds(160), 40.0)).await;
    evaluate(&cp, Utc::now()).await.unwrap();
    assert!(firing().await.is_empty());
    assert_eq!(alerts(store, scope, AlertState::Resolved).await, [prod.id]);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_master_key_reseals_webhook_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let config = running.state.config.clone();
    let id = Uuid::now_v7();
    let secret = b"rotation-secret-0123456789";
    let w = Webhook {
        id,
        organization_id: running.state.instance.root_organization_id,
        url: "http://127.0.0.1:9/hook".into(),
        events: vec![],
        secret_sealed: running
            .state
            .sealer
            .seal(secret, &webhook_secret_context(id)),
        created_at: now(),
    };
    running.state.store.create_webhook(&w).await.unwrap();
    let old_key = running.state.sealer.current().id().to_string();
    running.shutdown().await;

    let rotation = tether_control_plane::rotate::rotate(&config).await.unwrap();
    assert_eq!(rotation.old_key_id, old_key);
    assert!(rotation.resealed >= 1);

    let running = start(dir.path()).await;
    let stored = running
        .state
        .store
        .webhook_by_id(id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        Sealer::key_id_of(&stored.secret_sealed),
        Some(rotation.new_key_id.as_str())
    );
    assert_eq!(
        running
            .state
            .sealer
            .open(&stored.secret_sealed, &webhook_secret_context(id))
            .unwrap(),
        secret
    );
    running.shutdown().await;
}
