//! The health store behaviour, on SQLite and PostgreSQL (`store_tests!`):
//! health checks (CRUD, organization scoping, selectors), latest results
//! (upserts, replays, transitions detected once, snapshots), and the
//! connection-state changes of the gateway and its sweeper.
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_health
//! ```

#[macro_use]
mod common;

use common::*;
use tether_control_plane::store::health::{
    HealthCheck, HealthCheckKind, HealthCheckSpecFields, HealthResultRecord, HealthSelector,
};
use tether_control_plane::store::ServerSelector;

store_tests! {
    health_checks_are_created_read_updated_and_deleted_within_the_scope,
    list_health_checks_pages_by_id_and_hides_other_organizations,
    selectors_match_labels_and_server_ids,
    a_report_upserts_the_latest_result_of_each_check,
    a_transition_to_failing_and_back_is_reported_once,
    an_older_result_never_replaces_a_newer_one,
    a_check_missing_from_a_report_loses_its_result,
    rejected_checks_stay_through_reports_until_the_next_push_replaces_them,
    end_session_marks_offline_only_the_session_that_is_still_current,
    mark_stale_offline_marks_online_servers_no_replica_refreshed,
    mark_registration_timeouts_times_out_servers_that_never_connected,
}

fn http_check(organization_id: Uuid, name: &str, selector: HealthSelector) -> HealthCheck {
    let at = now();
    HealthCheck {
        id: Uuid::now_v7(),
        organization_id,
        name: name.into(),
        kind: HealthCheckKind::Http,
        spec: HealthCheckSpecFields {
            url: Some("http://127.0.0.1:8081/healthz".into()),
            expected_status: Some(200),
            body_contains: Some("ok".into()),
            ..Default::default()
        },
        interval_seconds: 30,
        timeout_seconds: 5,
        retries: 3,
        start_period_seconds: 10,
        selector,
        created_at: at,
        updated_at: at,
    }
}

fn result(
    server_id: Uuid,
    check_id: &str,
    status: &str,
    message: &str,
    checked_at: DateTime<Utc>,
    seq: i64,
) -> HealthResultRecord {
    HealthResultRecord {
        server_id,
        check_id: check_id.into(),
        name: format!("check {check_id}"),
        status: status.into(),
        message: message.into(),
        consecutive_failures: i64::from(status == "failing") * 3,
        checked_at,
        duration_ms: 12,
        seq,
        received_at: checked_at,
    }
}

async fn health_checks_are_created_read_updated_and_deleted_within_the_scope(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let other = create_org(&*store, root, "other").await;
    let mut check = http_check(
        team,
        "web",
        HealthSelector {
            labels: Some(labels(&[("role", "web")])),
            server_ids: None,
        },
    );
    store.create_health_check(&check).await.expect("create");

    let team_scope = scope_of(&*store, team).await;
    let other_scope = scope_of(&*store, other).await;
    let root_scope = scope_of(&*store, root).await;
    assert_eq!(
        store
            .health_check(&team_scope, check.id)
            .await
            .expect("get"),
        Some(check.clone()),
        "every field comes back as stored"
    );
    assert_eq!(
        store
            .health_check(&root_scope, check.id)
            .await
            .expect("get"),
        Some(check.clone()),
        "an ancestor sees its descendants' checks"
    );
    assert_eq!(
        store
            .health_check(&other_scope, check.id)
            .await
            .expect("get"),
        None,
        "a sibling does not"
    );

    check.name = "web (tcp)".into();
    check.kind = HealthCheckKind::Tcp;
    check.spec = HealthCheckSpecFields {
        address: Some("127.0.0.1:5432".into()),
        ..Default::default()
    };
    check.retries = 1;
    check.updated_at = now() + Duration::seconds(1);
    assert!(!store
        .update_health_check(&other_scope, &check)
        .await
        .expect("update"));
    assert!(store
        .update_health_check(&team_scope, &check)
        .await
        .expect("update"));
    assert_eq!(
        store
            .health_check(&team_scope, check.id)
            .await
            .expect("get"),
        Some(check.clone())
    );

    assert!(!store
        .delete_health_check(&other_scope, check.id)
        .await
        .expect("delete"));
    assert!(store
        .delete_health_check(&team_scope, check.id)
        .await
        .expect("delete"));
    assert_eq!(
        store
            .health_check(&team_scope, check.id)
            .await
            .expect("get"),
        None
    );
    assert!(!store
        .delete_health_check(&team_scope, check.id)
        .await
        .expect("delete"));
}

async fn list_health_checks_pages_by_id_and_hides_other_organizations(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let team = create_org(&*store, root, "team").await;
    let other = create_org(&*store, root, "other").await;
    let mut mine = Vec::new();
    for i in 0..5 {
        let check = http_check(team, &format!("c{i}"), HealthSelector::default());
        store.create_health_check(&check).await.expect("create");
        mine.push(check.id);
    }
    store
        .create_health_check(&http_check(other, "theirs", HealthSelector::default()))
        .await
        .expect("create");
    let scope = scope_of(&*store, team).await;
    let first = store
        .list_health_checks(&scope, 3, None)
        .await
        .expect("list");
    let second = store
        .list_health_checks(&scope, 3, first.last().map(|c| c.id))
        .await
        .expect("list");
    let listed: Vec<Uuid> = first.iter().chain(&second).map(|c| c.id).collect();
    mine.sort();
    assert_eq!(listed, mine);
    assert_eq!(
        store
            .list_health_checks(&scope_of(&*store, root).await, 100, None)
            .await
            .expect("list")
            .len(),
        6
    );
}

async fn selectors_match_labels_and_server_ids(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (web, _) = enroll_server(
        &*store,
        root,
        "web-1",
        labels(&[("role", "web"), ("env", "prod")]),
    )
    .await;
    let (db, _) = enroll_server(&*store, root, "db-1", labels(&[("role", "db")])).await;
    let everyone = HealthSelector::default();
    let prod_web = HealthSelector {
        labels: Some(labels(&[("role", "web"), ("env", "prod")])),
        server_ids: None,
    };
    let only_db = HealthSelector {
        labels: None,
        server_ids: Some(vec![db.id]),
    };
    let web_and_db_id = HealthSelector {
        labels: Some(labels(&[("role", "web")])),
        server_ids: Some(vec![db.id]),
    };
    let matches =
        |selector: &HealthSelector, server| ServerSelector::from(selector).matches(server);
    assert!(matches(&everyone, &web) && matches(&everyone, &db));
    assert!(matches(&prod_web, &web) && !matches(&prod_web, &db));
    assert!(!matches(&only_db, &web) && matches(&only_db, &db));
    assert!(
        !matches(&web_and_db_id, &web) && !matches(&web_and_db_id, &db),
        "labels and ids must both match"
    );
    let no_ids = HealthSelector {
        labels: None,
        server_ids: Some(Vec::new()),
    };
    assert!(
        !matches(&no_ids, &web) && !matches(&no_ids, &db),
        "an empty server_ids list selects no server"
    );
    let empty_labels = HealthSelector {
        labels: Some(Labels::new()),
        server_ids: None,
    };
    assert!(matches(&empty_labels, &web) && matches(&empty_labels, &db));

    // A check stored in the team applies only to the team's servers.
    let team = create_org(&*store, root, "team").await;
    let (team_server, _) = enroll_server(&*store, team, "team-1", Labels::new()).await;
    let check = http_check(team, "team check", everyone.clone());
    store.create_health_check(&check).await.expect("create");
    let stored = store
        .health_check(&[team], check.id)
        .await
        .expect("get")
        .expect("stored");
    let team_scope = scope_of(&*store, team).await;
    assert!(stored.applies_to(&team_scope, &team_server));
    assert!(!stored.applies_to(&team_scope, &web));
}

async fn a_report_upserts_the_latest_result_of_each_check(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, _) = enroll_server(&*store, root, "host", Labels::new()).await;
    let t0 = now() - Duration::minutes(1);
    let first = vec![
        result(server.id, "builtin:docker", "passing", "docker 27.0", t0, 1),
        result(server.id, "c1", "starting", "", t0, 1),
    ];
    store
        .record_health_report(server.id, &first, t0)
        .await
        .expect("record");
    assert_eq!(
        store.health_results(server.id).await.expect("results"),
        first,
        "stored as reported, by check id"
    );

    let t1 = t0 + Duration::seconds(30);
    let second = vec![
        result(server.id, "builtin:docker", "passing", "docker 27.1", t1, 2),
        result(server.id, "c1", "passing", "HTTP 200", t1, 2),
    ];
    store
        .record_health_report(server.id, &second, t1)
        .await
        .expect("record");
    let stored = store.health_results(server.id).await.expect("results");
    assert_eq!(stored, second, "one row per check, replaced");
    assert_eq!(
        server_by_id(&*store, &[root], server.id).await.last_seen_at,
        Some(t1),
        "a report is a sign of life"
    );
}

async fn a_transition_to_failing_and_back_is_reported_once(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, _) = enroll_server(&*store, root, "host", Labels::new()).await;
    let t = now() - Duration::minutes(5);
    let at = |s: i64| t + Duration::seconds(s);

    let passing = [result(server.id, "c1", "passing", "HTTP 200", at(0), 1)];
    assert!(store
        .record_health_report(server.id, &passing, at(0))
        .await
        .expect("record")
        .is_empty());

    let failing = [result(server.id, "c1", "failing", "HTTP 500", at(10), 2)];
    let transitions = store
        .record_health_report(server.id, &failing, at(10))
        .await
        .expect("record");
    assert_eq!(transitions.len(), 1);
    assert!(transitions[0].failed);
    assert_eq!(transitions[0].check_id, "c1");
    assert_eq!(transitions[0].check_name, "check c1");
    assert_eq!(transitions[0].message, "HTTP 500");

    // The same report again (an unacked report resent), and a later one
    // still failing: no new transition.
    assert!(store
        .record_health_report(server.id, &failing, at(11))
        .await
        .expect("record")
        .is_empty());
    let still = [result(server.id, "c1", "failing", "HTTP 503", at(20), 3)];
    assert!(store
        .record_health_report(server.id, &still, at(20))
        .await
        .expect("record")
        .is_empty());

    let recovered = [result(server.id, "c1", "passing", "HTTP 200", at(30), 4)];
    let transitions = store
        .record_health_report(server.id, &recovered, at(30))
        .await
        .expect("record");
    assert_eq!(transitions.len(), 1);
    assert!(!transitions[0].failed);
    assert!(store
        .record_health_report(server.id, &recovered, at(31))
        .await
        .expect("record")
        .is_empty());

    // A first result that is already failing (a fresh server, a new check)
    // is a transition; starting -> passing is not.
    let fresh = [
        result(server.id, "c1", "passing", "HTTP 200", at(40), 5),
        result(server.id, "c2", "failing", "connection refused", at(40), 5),
        result(server.id, "c3", "starting", "", at(40), 5),
    ];
    let transitions = store
        .record_health_report(server.id, &fresh, at(40))
        .await
        .expect("record");
    assert_eq!(
        transitions
            .iter()
            .map(|t| (t.check_id.as_str(), t.failed))
            .collect::<Vec<_>>(),
        vec![("c2", true)]
    );
    let c3_passes = [
        result(server.id, "c1", "passing", "HTTP 200", at(50), 6),
        result(server.id, "c2", "failing", "connection refused", at(50), 6),
        result(server.id, "c3", "passing", "exit 0", at(50), 6),
    ];
    assert!(store
        .record_health_report(server.id, &c3_passes, at(50))
        .await
        .expect("record")
        .is_empty());

    // Two replicas storing the same transition concurrently: one event.
    let fail_again = [
        result(server.id, "c1", "failing", "HTTP 500", at(60), 7),
        result(server.id, "c2", "failing", "connection refused", at(60), 7),
        result(server.id, "c3", "passing", "exit 0", at(60), 7),
    ];
    let (a, b) = tokio::join!(
        store.record_health_report(server.id, &fail_again, at(60)),
        store.record_health_report(server.id, &fail_again, at(60)),
    );
    let total = a.expect("record").len() + b.expect("record").len();
    assert_eq!(total, 1, "the transition of c1 is reported exactly once");
}

async fn an_older_result_never_replaces_a_newer_one(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, _) = enroll_server(&*store, root, "host", Labels::new()).await;
    let t = now() - Duration::minutes(5);
    let newer = [result(server.id, "c1", "failing", "HTTP 500", t, 9)];
    store
        .record_health_report(server.id, &newer, t)
        .await
        .expect("record");
    let older = [result(
        server.id,
        "c1",
        "passing",
        "HTTP 200",
        t - Duration::seconds(30),
        8,
    )];
    let transitions = store
        .record_health_report(server.id, &older, t + Duration::seconds(1))
        .await
        .expect("record");
    assert!(transitions.is_empty());
    assert_eq!(
        store.health_results(server.id).await.expect("results"),
        newer.to_vec()
    );
}

async fn a_check_missing_from_a_report_loses_its_result(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, _) = enroll_server(&*store, root, "host", Labels::new()).await;
    let (other, _) = enroll_server(&*store, root, "other", Labels::new()).await;
    let t = now() - Duration::minutes(5);
    let both = [
        result(server.id, "c1", "passing", "ok", t, 1),
        result(server.id, "c2", "passing", "ok", t, 1),
    ];
    store
        .record_health_report(server.id, &both, t)
        .await
        .expect("record");
    let theirs = [result(other.id, "c2", "passing", "ok", t, 1)];
    store
        .record_health_report(other.id, &theirs, t)
        .await
        .expect("record");

    let later = t + Duration::seconds(5);
    let only_c1 = [result(server.id, "c1", "passing", "ok", later, 2)];
    store
        .record_health_report(server.id, &only_c1, later)
        .await
        .expect("record");
    assert_eq!(
        store.health_results(server.id).await.expect("results"),
        only_c1.to_vec()
    );
    assert_eq!(
        store.health_results(other.id).await.expect("results"),
        theirs.to_vec(),
        "another server's results stay"
    );
    store
        .record_health_report(server.id, &[], later)
        .await
        .expect("record");
    assert!(store
        .health_results(server.id)
        .await
        .expect("results")
        .is_empty());
}

async fn end_session_marks_offline_only_the_session_that_is_still_current(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, _) = enroll_server(&*store, root, "host", Labels::new()).await;
    let first = now() - Duration::minutes(2);
    store
        .mark_online(server.id, "0.1.0", &json!({}), first)
        .await
        .expect("online");
    // The agent reconnected (to another replica) before the first session's
    // end was recorded.
    let second = first + Duration::seconds(30);
    store
        .mark_online(server.id, "0.1.0", &json!({}), second)
        .await
        .expect("online");
    let ended = store
        .end_session(server.id, first, "connection lost: timed out", now())
        .await
        .expect("end_session");
    assert_eq!(ended, None, "the newer session keeps the server online");
    let s = server_by_id(&*store, &[root], server.id).await;
    assert_eq!(s.status, ServerStatus::Online);

    let at = second + Duration::seconds(10);
    let ended = store
        .end_session(server.id, second, "agent closed its connection", at)
        .await
        .expect("end_session")
        .expect("the current session's end marks it offline");
    assert_eq!(ended.id, server.id);
    assert_eq!(ended.organization_id, root);
    assert_eq!(ended.name, server.name);
    let s = server_by_id(&*store, &[root], server.id).await;
    assert_eq!(s.status, ServerStatus::Offline);
    assert_eq!(
        s.status_reason.as_deref(),
        Some("agent closed its connection")
    );
    assert_eq!(s.last_seen_at, Some(at));
    assert_eq!(
        store
            .end_session(server.id, second, "again", at)
            .await
            .expect("end_session"),
        None,
        "an offline server is not reported twice"
    );
}

async fn mark_stale_offline_marks_online_servers_no_replica_refreshed(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (stale, _) = enroll_server(&*store, root, "stale", Labels::new()).await;
    let (held, _) = enroll_server(&*store, root, "held-elsewhere", Labels::new()).await;
    let (reporting, _) = enroll_server(&*store, root, "reporting", Labels::new()).await;
    let (connecting, _) = enroll_server(&*store, root, "connecting", Labels::new()).await;
    let t0 = now() - Duration::minutes(10);
    for id in [stale.id, held.id, reporting.id] {
        store
            .mark_online(id, "0.1.0", &json!({}), t0)
            .await
            .expect("online");
    }
    let cutoff = t0 + Duration::minutes(5);
    // Another replica refreshes the servers it holds.
    store
        .touch_servers(&[held.id], cutoff + Duration::seconds(1))
        .await
        .expect("touch");
    // A health report counts as a sign of life too.
    store
        .record_health_report(
            reporting.id,
            &[result(reporting.id, "c1", "passing", "ok", cutoff, 1)],
            cutoff + Duration::seconds(1),
        )
        .await
        .expect("record");

    let reason = "no heartbeat recorded for 5m and no control-plane replica holds its session";
    let marked = store
        .mark_stale_offline(cutoff, reason)
        .await
        .expect("sweep");
    assert_eq!(
        marked.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![stale.id]
    );
    assert_eq!(marked[0].name, stale.name);
    assert_eq!(marked[0].organization_id, root);
    let s = server_by_id(&*store, &[root], stale.id).await;
    assert_eq!(s.status, ServerStatus::Offline);
    assert_eq!(s.status_reason.as_deref(), Some(reason));
    for id in [held.id, reporting.id] {
        assert_eq!(
            server_by_id(&*store, &[root], id).await.status,
            ServerStatus::Online
        );
    }
    assert_eq!(
        server_by_id(&*store, &[root], connecting.id).await.status,
        ServerStatus::Connecting
    );
    assert!(
        store
            .mark_stale_offline(cutoff, reason)
            .await
            .expect("sweep")
            .is_empty(),
        "a second sweep reports nothing again"
    );
    // And its session, ended later by the replica that held it, changes nothing.
    assert_eq!(
        store
            .end_session(stale.id, t0, "connection lost", now())
            .await
            .expect("end_session"),
        None
    );
}

async fn mark_registration_timeouts_times_out_servers_that_never_connected(store: Arc<dyn Store>) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (never, _) = enroll_server(&*store, root, "never", Labels::new()).await;
    let (came_up, _) = enroll_server(&*store, root, "came-up", Labels::new()).await;
    store
        .mark_online(came_up.id, "0.1.0", &json!({}), now())
        .await
        .expect("online");
    let reason = "the agent enrolled but opened no session within 10m; check tether-agent";

    // Not yet past the timeout.
    assert!(store
        .mark_registration_timeouts(never.created_at - Duration::seconds(1), reason)
        .await
        .expect("sweep")
        .is_empty());

    let marked = store
        .mark_registration_timeouts(now() + Duration::seconds(1), reason)
        .await
        .expect("sweep");
    assert_eq!(
        marked.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![never.id]
    );
    let s = server_by_id(&*store, &[root], never.id).await;
    assert_eq!(s.status, ServerStatus::Timeout);
    assert_eq!(s.status_reason.as_deref(), Some(reason));
    assert_eq!(
        server_by_id(&*store, &[root], came_up.id).await.status,
        ServerStatus::Online
    );
    assert!(store
        .mark_registration_timeouts(now() + Duration::seconds(1), reason)
        .await
        .expect("sweep")
        .is_empty());

    // A late agent still comes online.
    store
        .mark_online(never.id, "0.1.0", &json!({}), now())
        .await
        .expect("online");
    let s = server_by_id(&*store, &[root], never.id).await;
    assert_eq!(s.status, ServerStatus::Online);
    assert_eq!(s.status_reason, None);
}

async fn rejected_checks_stay_through_reports_until_the_next_push_replaces_them(
    store: Arc<dyn Store>,
) {
    let instance = init(&*store).await;
    let root = instance.root_organization_id;
    let (server, _) = enroll_server(&*store, root, "host", Labels::new()).await;
    let t = now() - Duration::minutes(5);
    let refused = HealthResultRecord {
        status: "rejected".into(),
        message: "the agent refused this check: commands are disabled".into(),
        consecutive_failures: 0,
        duration_ms: 0,
        seq: 0,
        ..result(server.id, "exec-1", "rejected", "", t, 0)
    };
    store
        .record_rejected_checks(server.id, std::slice::from_ref(&refused))
        .await
        .expect("record rejected");
    let report = [result(server.id, "builtin:disk", "passing", "ok", t, 1)];
    store
        .record_health_report(server.id, &report, t)
        .await
        .expect("record");
    assert_eq!(
        store.health_results(server.id).await.expect("results"),
        vec![report[0].clone(), refused.clone()],
        "a report (which cannot hold a refused check) keeps the refusal"
    );
    store
        .record_rejected_checks(server.id, &[])
        .await
        .expect("record rejected");
    assert_eq!(
        store.health_results(server.id).await.expect("results"),
        report.to_vec(),
        "a push the agent fully accepted clears it"
    );
}
