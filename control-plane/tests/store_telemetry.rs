//! The telemetry store behaviour, on SQLite and PostgreSQL: metrics batches
//! (replays, NUL characters, bulk), rollups, pruning, container reports and
//! latest values; and, on PostgreSQL only, liveness writes beside a metrics
//! write.
//!
//! Each `async fn` listed in `store_tests!` runs on SQLite and on PostgreSQL
//! (see `common/mod.rs`); the PostgreSQL half needs `TETHER_TEST_DATABASE_URL`
//! and fails without it (it never skips):
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh | tail -n 1)
//! cargo test -p tether-control-plane --test store_telemetry
//! ```

#[macro_use]
mod common;

use common::*;

store_tests! {
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
// Telemetry.
// ---------------------------------------------------------------------------

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
