//! The commands area of the store ([`OperationsStore`]), on SQLite and on
//! PostgreSQL: exclusive claims, monotonic statuses, bounded appends, the
//! undeliverable sweep, cancels, organization scoping, requests stored once
//! per fan-out with their sealed environment and stdin cleared when the last
//! command ends, and cross-replica notifications.
//!
//! ```text
//! export TETHER_TEST_DATABASE_URL=$(scripts/postgres.sh)
//! cargo test -p tether-control-plane --test store_commands
//! ```

#[macro_use]
mod common;

use common::*;
use tether_control_plane::store::{
    CancelOutcome, CommandFinish, CommandState, NewCommand, NewCommandRequest,
};

store_tests! {
    concurrent_claims_of_a_queued_command_give_it_to_exactly_one_worker,
    a_finished_command_ignores_late_output_and_a_second_outcome,
    output_appends_in_order_byte_exact_and_truncation_sticks,
    undeliverable_sweep_takes_only_queued_commands_past_their_deadline,
    commands_are_visible_and_cancellable_only_within_the_scope,
    cancel_stops_a_queued_command_and_flags_a_running_one,
    the_sealed_environment_and_stdin_are_listed_for_rotation_until_the_command_ends,
    a_fan_out_stores_its_request_once_and_every_command_reads_it [database],
    a_requests_sealed_values_are_cleared_only_when_its_last_command_ends,
    concurrent_ends_of_a_fan_outs_commands_clear_its_sealed_values,
    active_commands_count_queued_and_running_ones_of_the_server,
    notifications_reach_listeners_on_postgres_and_are_absent_on_sqlite [database],
}

/// An instance with a child organization holding one server; returns
/// (root, child, server id).
async fn fixture(store: &dyn Store) -> (Uuid, Uuid, Uuid) {
    let instance = init(store).await;
    let root = instance.root_organization_id;
    let child = create_org(store, root, "child").await;
    let token = create_token(
        store,
        child,
        Some("box"),
        Labels::new(),
        now() + Duration::hours(1),
    )
    .await;
    let server = try_enroll(store, &enrollment(&token, "box"))
        .await
        .expect("enrolled");
    (root, child, server.id)
}

/// A request as a submission stores it (sealed values are opaque here).
fn new_request() -> NewCommandRequest {
    NewCommandRequest {
        id: Uuid::now_v7(),
        argv: vec!["echo".into(), "hi".into()],
        env_sealed: Some("v1:key:sealed-env".into()),
        stdin_sealed: Some("v1:key:sealed-stdin".into()),
        created_at: now(),
    }
}

/// A command with a request of its own (stored by [`create`]).
fn new_command(organization_id: Uuid, server_id: Uuid, claimed_by: Option<&str>) -> NewCommand {
    let at = now();
    NewCommand {
        id: Uuid::now_v7(),
        request_id: Uuid::now_v7(),
        organization_id,
        server_id,
        timeout_ms: 5_000,
        max_output_bytes: 1024,
        created_by: "token:test".into(),
        created_at: at,
        deliver_by: at + Duration::seconds(60),
        claimed_by: claimed_by.map(str::to_string),
    }
}

/// Stores each command with a request of its own (its `request_id`).
async fn create(store: &dyn Store, commands: &[NewCommand]) -> store::StoreResult<()> {
    for command in commands {
        let request = NewCommandRequest {
            id: command.request_id,
            ..new_request()
        };
        store
            .create_commands(&request, std::slice::from_ref(command))
            .await?;
    }
    Ok(())
}

fn finish(status: CommandState, tail: &[u8]) -> CommandFinish {
    CommandFinish {
        status,
        exit_code: Some(0),
        signal: None,
        reason: None,
        output_tail: tail.to_vec(),
        output_truncated: false,
        at: now(),
    }
}

async fn concurrent_claims_of_a_queued_command_give_it_to_exactly_one_worker(
    store: Arc<dyn Store>,
) {
    let (_, child, server) = fixture(&*store).await;
    let command = new_command(child, server, None);
    create(&*store, std::slice::from_ref(&command))
        .await
        .unwrap();
    let mut racers = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let store = store.clone();
        racers.spawn(async move {
            store
                .claim_command(command.id, &format!("worker-{worker}"), now())
                .await
                .unwrap()
        });
    }
    let mut winners = Vec::new();
    while let Some(claimed) = racers.join_next().await {
        winners.extend(claimed.unwrap());
    }
    assert_eq!(winners.len(), 1, "exactly one claim wins");
    assert_eq!(winners[0].argv, ["echo", "hi"]);
    assert_eq!(winners[0].request_id, command.request_id);
    assert_eq!(
        winners[0].stdin_sealed.as_deref(),
        Some("v1:key:sealed-stdin")
    );
    let record = store.command(None, command.id).await.unwrap().unwrap();
    assert_eq!(record.status, CommandState::Running);
    assert!(record.claimed_by.unwrap().starts_with("worker-"));
    assert!(record.started_at.is_some());
    assert!(store
        .claim_command(command.id, "late", now())
        .await
        .unwrap()
        .is_none());
}

async fn a_finished_command_ignores_late_output_and_a_second_outcome(store: Arc<dyn Store>) {
    let (_, child, server) = fixture(&*store).await;
    let command = new_command(child, server, Some("me"));
    create(&*store, std::slice::from_ref(&command))
        .await
        .unwrap();
    assert!(store
        .append_command_output(command.id, b"a", false)
        .await
        .unwrap());
    assert!(store
        .finish_command(command.id, &finish(CommandState::Succeeded, b"b"))
        .await
        .unwrap());
    assert!(!store
        .append_command_output(command.id, b"late", true)
        .await
        .unwrap());
    assert!(!store
        .finish_command(command.id, &finish(CommandState::Failed, b"again"))
        .await
        .unwrap());
    assert!(store
        .claim_command(command.id, "other", now())
        .await
        .unwrap()
        .is_none());
    let record = store.command(None, command.id).await.unwrap().unwrap();
    assert_eq!(record.status, CommandState::Succeeded);
    assert_eq!(record.output, b"ab");
    assert!(!record.output_truncated);
    assert_eq!(record.exit_code, Some(0));
    assert!(record.finished_at.is_some());
}

async fn output_appends_in_order_byte_exact_and_truncation_sticks(store: Arc<dyn Store>) {
    let (_, child, server) = fixture(&*store).await;
    let command = new_command(child, server, Some("me"));
    create(&*store, std::slice::from_ref(&command))
        .await
        .unwrap();
    let chunks: [&[u8]; 3] = [b"one\n", &[0, 0xff, 0xfe, b'\n'], b"three"];
    assert!(store
        .append_command_output(command.id, chunks[0], false)
        .await
        .unwrap());
    assert!(store
        .append_command_output(command.id, chunks[1], true)
        .await
        .unwrap());
    assert!(store
        .append_command_output(command.id, chunks[2], false)
        .await
        .unwrap());
    let record = store.command(None, command.id).await.unwrap().unwrap();
    assert_eq!(record.output, chunks.concat());
    assert!(
        record.output_truncated,
        "the truncation flag never goes back"
    );
    assert_eq!(record.status, CommandState::Running);
}

async fn undeliverable_sweep_takes_only_queued_commands_past_their_deadline(store: Arc<dyn Store>) {
    let (_, child, server) = fixture(&*store).await;
    let mut expired = new_command(child, server, None);
    expired.deliver_by = now() - Duration::seconds(1);
    let fresh = new_command(child, server, None);
    let mut running = new_command(child, server, Some("me"));
    running.deliver_by = now() - Duration::seconds(1);
    create(&*store, &[expired.clone(), fresh.clone(), running.clone()])
        .await
        .unwrap();
    let queued = store.queued_commands(None, now(), 100).await.unwrap();
    assert_eq!(
        queued,
        vec![(fresh.id, server)],
        "expired commands are not offered"
    );
    assert!(store
        .claim_command(expired.id, "w", now())
        .await
        .unwrap()
        .is_none());

    let swept = store.mark_undeliverable(now()).await.unwrap();
    assert_eq!(swept, vec![expired.id]);
    let record = store.command(None, expired.id).await.unwrap().unwrap();
    assert_eq!(record.status, CommandState::Undeliverable);
    assert!(record.reason.unwrap().contains("deadline"));
    assert_eq!(
        store.command(None, fresh.id).await.unwrap().unwrap().status,
        CommandState::Queued
    );
    assert_eq!(
        store
            .command(None, running.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        CommandState::Running
    );
    assert!(store.mark_undeliverable(now()).await.unwrap().is_empty());
}

async fn commands_are_visible_and_cancellable_only_within_the_scope(store: Arc<dyn Store>) {
    let (root, child, server) = fixture(&*store).await;
    let sibling = create_org(&*store, root, "sibling").await;
    let command = new_command(child, server, None);
    create(&*store, std::slice::from_ref(&command))
        .await
        .unwrap();
    let root_scope = store.organization_scope(root).await.unwrap();
    let sibling_scope = store.organization_scope(sibling).await.unwrap();
    assert!(store
        .command(Some(&root_scope), command.id)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .command(Some(&[child]), command.id)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .command(Some(&sibling_scope), command.id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .cancel_command(&sibling_scope, command.id, now())
            .await
            .unwrap(),
        CancelOutcome::NotFound
    );
    assert_eq!(
        store
            .command(None, command.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        CommandState::Queued,
        "a cancel outside the scope changes nothing"
    );
}

async fn cancel_stops_a_queued_command_and_flags_a_running_one(store: Arc<dyn Store>) {
    let (_, child, server) = fixture(&*store).await;
    let queued = new_command(child, server, None);
    let running = new_command(child, server, Some("me"));
    create(&*store, &[queued.clone(), running.clone()])
        .await
        .unwrap();
    assert_eq!(
        store
            .cancel_command(&[child], queued.id, now())
            .await
            .unwrap(),
        CancelOutcome::CancelledQueued
    );
    assert!(store
        .claim_command(queued.id, "w", now())
        .await
        .unwrap()
        .is_none());
    let record = store.command(None, queued.id).await.unwrap().unwrap();
    assert_eq!(record.status, CommandState::Cancelled);
    assert!(record.finished_at.is_some());

    assert_eq!(
        store
            .cancel_command(&[child], running.id, now())
            .await
            .unwrap(),
        CancelOutcome::Requested
    );
    let record = store.command(None, running.id).await.unwrap().unwrap();
    assert_eq!(record.status, CommandState::Running);
    assert!(record.cancel_requested);
    store
        .finish_command(running.id, &finish(CommandState::Cancelled, b""))
        .await
        .unwrap();
    assert_eq!(
        store
            .cancel_command(&[child], running.id, now())
            .await
            .unwrap(),
        CancelOutcome::AlreadyFinished(CommandState::Cancelled)
    );
}

/// The sealed values of `request` that [`Store::sealed_secrets`] lists.
async fn sealed_of(store: &dyn Store, request: Uuid) -> Vec<store::SealedSecret> {
    store
        .sealed_secrets()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| {
            matches!(s.kind, SealedKind::CommandEnv | SealedKind::CommandStdin)
                && s.id == request.to_string()
        })
        .collect()
}

async fn the_sealed_environment_and_stdin_are_listed_for_rotation_until_the_command_ends(
    store: Arc<dyn Store>,
) {
    let (_, child, server) = fixture(&*store).await;
    let command = new_command(child, server, None);
    create(&*store, std::slice::from_ref(&command))
        .await
        .unwrap();
    let mut listed = sealed_of(&*store, command.request_id).await;
    listed.sort_by_key(|s| s.context.clone());
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].kind, SealedKind::CommandEnv);
    assert_eq!(
        listed[0].context,
        store::command_env_context(command.request_id)
    );
    assert_eq!(listed[1].kind, SealedKind::CommandStdin);
    assert_eq!(
        listed[1].context,
        store::command_stdin_context(command.request_id)
    );
    assert!(store
        .replace_sealed_secret(&listed[0], "v1:key2:resealed-env")
        .await
        .unwrap());
    assert!(store
        .replace_sealed_secret(&listed[1], "v1:key2:resealed-stdin")
        .await
        .unwrap());
    let claimed = store
        .claim_command(command.id, "w", now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.env_sealed.as_deref(), Some("v1:key2:resealed-env"));
    assert_eq!(
        claimed.stdin_sealed.as_deref(),
        Some("v1:key2:resealed-stdin")
    );
    store
        .finish_command(command.id, &finish(CommandState::Succeeded, b""))
        .await
        .unwrap();
    assert!(
        sealed_of(&*store, command.request_id).await.is_empty(),
        "the environment and stdin are cleared when the command ends"
    );
}

/// `n` queued commands of `request` on the fixture's server.
fn fan_out(child: Uuid, server: Uuid, request: &NewCommandRequest, n: usize) -> Vec<NewCommand> {
    (0..n)
        .map(|_| NewCommand {
            request_id: request.id,
            ..new_command(child, server, None)
        })
        .collect()
}

async fn a_fan_out_stores_its_request_once_and_every_command_reads_it(
    store: Arc<dyn Store>,
    database: Database,
) {
    let (_, child, server) = fixture(&*store).await;
    let request = NewCommandRequest {
        argv: vec!["sh".into(), "-c".into(), "echo fan-out-marker".into()],
        ..new_request()
    };
    let commands = fan_out(child, server, &request, 3);
    store.create_commands(&request, &commands).await.unwrap();
    assert_eq!(
        database
            .count("SELECT COUNT(*) FROM command_requests")
            .await,
        1,
        "one request for the whole fan-out"
    );
    assert_eq!(
        database
            .count(&format!(
                "SELECT COUNT(*) FROM commands WHERE request_id = '{}'",
                request.id
            ))
            .await,
        3
    );
    for command in &commands {
        let record = store.command(None, command.id).await.unwrap().unwrap();
        assert_eq!(record.argv, request.argv);
        let claimed = store
            .claim_command(command.id, "w", now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.request_id, request.id);
        assert_eq!(claimed.argv, request.argv);
        assert_eq!(claimed.env_sealed, request.env_sealed);
        assert_eq!(claimed.stdin_sealed, request.stdin_sealed);
    }
}

async fn a_requests_sealed_values_are_cleared_only_when_its_last_command_ends(
    store: Arc<dyn Store>,
) {
    let (_, child, server) = fixture(&*store).await;
    let request = new_request();
    let mut commands = fan_out(child, server, &request, 3);
    commands[2].deliver_by = now() + Duration::milliseconds(50);
    store.create_commands(&request, &commands).await.unwrap();

    // One runs and ends, one is cancelled while queued: the third still
    // needs the environment and stdin.
    store
        .claim_command(commands[0].id, "w", now())
        .await
        .unwrap()
        .unwrap();
    store
        .finish_command(commands[0].id, &finish(CommandState::Succeeded, b""))
        .await
        .unwrap();
    assert_eq!(
        store
            .cancel_command(&[child], commands[1].id, now())
            .await
            .unwrap(),
        CancelOutcome::CancelledQueued
    );
    assert_eq!(sealed_of(&*store, request.id).await.len(), 2);

    // The last one misses its deadline: nothing of the request is needed.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        store.mark_undeliverable(now()).await.unwrap(),
        vec![commands[2].id]
    );
    assert!(sealed_of(&*store, request.id).await.is_empty());
    // argv stays readable for the API.
    assert_eq!(
        store
            .command(None, commands[2].id)
            .await
            .unwrap()
            .unwrap()
            .argv,
        request.argv
    );
}

async fn concurrent_ends_of_a_fan_outs_commands_clear_its_sealed_values(store: Arc<dyn Store>) {
    let (_, child, server) = fixture(&*store).await;
    let request = new_request();
    let commands = fan_out(child, server, &request, 8);
    store.create_commands(&request, &commands).await.unwrap();
    for command in &commands {
        store
            .claim_command(command.id, "w", now())
            .await
            .unwrap()
            .unwrap();
    }
    let mut enders = tokio::task::JoinSet::new();
    for command in &commands {
        let store = store.clone();
        let id = command.id;
        enders.spawn(async move {
            store
                .finish_command(id, &finish(CommandState::Succeeded, b""))
                .await
                .unwrap()
        });
    }
    while let Some(ended) = enders.join_next().await {
        assert!(ended.unwrap());
    }
    assert!(
        sealed_of(&*store, request.id).await.is_empty(),
        "whichever command ends last clears the request"
    );
}

async fn active_commands_count_queued_and_running_ones_of_the_server(store: Arc<dyn Store>) {
    let (_, child, server) = fixture(&*store).await;
    assert_eq!(store.active_commands_on_server(server).await.unwrap(), 0);
    let queued = new_command(child, server, None);
    let running = new_command(child, server, Some("me"));
    let done = new_command(child, server, Some("me"));
    create(&*store, &[queued, running, done.clone()])
        .await
        .unwrap();
    store
        .finish_command(done.id, &finish(CommandState::Succeeded, b""))
        .await
        .unwrap();
    assert_eq!(store.active_commands_on_server(server).await.unwrap(), 2);
}

async fn notifications_reach_listeners_on_postgres_and_are_absent_on_sqlite(
    store: Arc<dyn Store>,
    database: Database,
) {
    let listener = store.command_notifications().await.unwrap();
    match database {
        Database::Sqlite(_) => {
            assert!(listener.is_none());
            store.notify_commands("run x y").await.unwrap();
        }
        Database::Postgres(_) => {
            use futures::StreamExt;
            let mut listener = listener.expect("a listener on PostgreSQL");
            store.notify_commands("cancel 123").await.unwrap();
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), listener.next())
                .await
                .expect("a notification in time");
            assert_eq!(got.as_deref(), Some("cancel 123"));
        }
    }
}
