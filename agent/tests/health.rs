//! Pushed health checks against real sockets and processes, through the
//! real scheduler: Docker `HEALTHCHECK` semantics (start period, retries),
//! HTTP, TCP and exec probes, configuration and run-now.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_agent::config::{CommandPolicy, Config, BUILTIN_CHECKS};
use tether_agent::health::probe::{self, PushedContext};
use tether_agent::health::{Health, Probe, SessionSignals};
use tether_protocol::{HealthCheckKind, HealthCheckSpec, HealthResult, HealthStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A scheduler running only pushed checks.
fn scheduler(shutdown: &CancellationToken) -> Health {
    let mut config = Config::default();
    config.docker.enabled = false;
    config.health.disabled = BUILTIN_CHECKS.iter().map(|name| name.to_string()).collect();
    Health::start(&config, None, SessionSignals::default(), shutdown.clone())
}

fn spec(id: &str, kind: HealthCheckKind) -> HealthCheckSpec {
    HealthCheckSpec {
        id: id.into(),
        name: format!("{id} check"),
        kind,
        interval_ms: 1_000,
        timeout_ms: 1_000,
        retries: 1,
        start_period_ms: 0,
    }
}

fn exec(args: &[&str]) -> HealthCheckKind {
    HealthCheckKind::Exec {
        argv: args.iter().map(|s| s.to_string()).collect(),
    }
}

/// An HTTP/1.1 server answering every request with the current status.
async fn http_server(status: Arc<AtomicU16>, hits: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let status = status.load(Ordering::SeqCst);
            hits.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let body = if status == 200 { "all good" } else { "broken" };
                let answer = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

fn result(health: &Health, id: &str) -> Option<HealthResult> {
    health.results().into_iter().find(|r| r.check_id == id)
}

/// Polls until `check` holds for the result of `id`; returns every distinct
/// result seen on the way.
async fn wait_for(
    health: &Health,
    id: &str,
    within: Duration,
    check: impl Fn(&HealthResult) -> bool,
) -> Vec<HealthResult> {
    let deadline = Instant::now() + within;
    let mut seen: Vec<HealthResult> = Vec::new();
    loop {
        if let Some(result) = result(health, id) {
            if seen.last() != Some(&result) {
                seen.push(result.clone());
            }
            if check(&result) {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id}: condition not reached; seen {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn http_check_turns_passing_then_failing_after_its_retries() {
    let status = Arc::new(AtomicU16::new(200));
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = http_server(status.clone(), hits.clone()).await;
    let shutdown = CancellationToken::new();
    let health = scheduler(&shutdown);
    let mut web = spec(
        "web",
        HealthCheckKind::Http {
            url: format!("http://{addr}/healthz"),
            expected_status: None,
            body_contains: Some("good".into()),
        },
    );
    web.retries = 2;
    let configured = health.configure(vec![web]).await;
    assert_eq!(configured.active, vec!["web"]);
    assert!(configured.rejected.is_empty());

    let seen = wait_for(&health, "web", Duration::from_secs(5), |r| {
        r.status == HealthStatus::Passing
    })
    .await;
    let passing = seen.last().unwrap();
    assert!(passing.output.contains("HTTP 200"), "{passing:?}");
    assert_eq!(passing.name, "web check");

    status.store(500, Ordering::SeqCst);
    let seen = wait_for(&health, "web", Duration::from_secs(6), |r| {
        r.status == HealthStatus::Failing
    })
    .await;
    let failing = seen.last().unwrap();
    assert_eq!(failing.consecutive_failures, 2);
    assert!(failing.output.contains("HTTP 500"), "{failing:?}");
    assert!(
        !failing.output.contains("broken"),
        "nothing the target sent is quoted: {failing:?}"
    );
    // One failure was not enough: the check still passed in between.
    assert!(
        seen.iter()
            .any(|r| r.status == HealthStatus::Passing && r.consecutive_failures == 1),
        "{seen:#?}"
    );
    assert!(hits.load(Ordering::SeqCst) >= 3);

    status.store(200, Ordering::SeqCst);
    wait_for(&health, "web", Duration::from_secs(5), |r| {
        r.status == HealthStatus::Passing && r.consecutive_failures == 0
    })
    .await;
    shutdown.cancel();
    health.stopped().await;
}

#[tokio::test]
async fn http_probe_checks_the_expected_status_and_the_body() {
    let status = Arc::new(AtomicU16::new(200));
    let addr = http_server(status.clone(), Arc::new(AtomicUsize::new(0))).await;
    let context = PushedContext::new(CommandPolicy::default());
    let http = |expected_status, body_contains: Option<&str>| HealthCheckKind::Http {
        url: format!("http://{addr}/"),
        expected_status,
        body_contains: body_contains.map(str::to_string),
    };
    let timeout = Duration::from_secs(2);
    assert!(matches!(
        probe::run(&http(None, Some("all good")), timeout, &context).await,
        Probe::Pass(_)
    ));
    let probe = probe::run(&http(None, Some("missing")), timeout, &context).await;
    assert!(
        matches!(&probe, Probe::Fail(why) if why.contains("do not contain the expected text") && !why.contains("all good")),
        "{probe:?}"
    );
    assert!(matches!(
        probe::run(&http(Some(204), None), timeout, &context).await,
        Probe::Fail(why) if why.contains("expected 204")
    ));
    status.store(503, Ordering::SeqCst);
    assert!(matches!(
        probe::run(&http(Some(503), None), timeout, &context).await,
        Probe::Pass(_)
    ));
    assert!(matches!(
        probe::run(&http(None, None), timeout, &context).await,
        Probe::Fail(why) if why.contains("expected 2xx")
    ));
}

#[tokio::test]
async fn http_probe_against_a_silent_server_times_out() {
    // Accepts connections but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let context = PushedContext::new(CommandPolicy::default());
    let started = Instant::now();
    let kind = HealthCheckKind::Http {
        url: format!("http://{addr}/"),
        expected_status: None,
        body_contains: None,
    };
    let probe = probe::run(&kind, Duration::from_millis(300), &context).await;
    assert!(
        matches!(&probe, Probe::Fail(why) if why.contains("within 300 ms")),
        "{probe:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn tcp_check_passes_on_a_listener_and_fails_on_a_closed_port() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap();
    let closed = {
        let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
        other.local_addr().unwrap()
    };
    let context = PushedContext::new(CommandPolicy::default());
    let timeout = Duration::from_secs(2);
    let tcp = |addr: SocketAddr| HealthCheckKind::Tcp {
        address: addr.to_string(),
    };
    assert!(
        matches!(probe::run(&tcp(open), timeout, &context).await, Probe::Pass(text) if text.contains("connected"))
    );
    let probe = probe::run(&tcp(closed), timeout, &context).await;
    assert!(
        matches!(&probe, Probe::Fail(why) if why.contains(&closed.to_string())),
        "{probe:?}"
    );

    // Through the scheduler, with retries 1: failing at the first run.
    let shutdown = CancellationToken::new();
    let health = scheduler(&shutdown);
    health.configure(vec![spec("db", tcp(closed))]).await;
    let seen = wait_for(&health, "db", Duration::from_secs(5), |r| {
        r.status == HealthStatus::Failing
    })
    .await;
    assert_eq!(seen.len(), 1, "failing from the first run: {seen:#?}");
    shutdown.cancel();
}

#[tokio::test]
async fn start_period_failures_do_not_count() {
    let shutdown = CancellationToken::new();
    let health = scheduler(&shutdown);
    let mut check = spec("slow", exec(&["false"]));
    check.start_period_ms = 2_500;
    let created = Instant::now();
    health.configure(vec![check]).await;
    let seen = wait_for(&health, "slow", Duration::from_secs(6), |r| {
        r.status == HealthStatus::Failing
    })
    .await;
    let starting: Vec<_> = seen
        .iter()
        .filter(|r| r.status == HealthStatus::Starting)
        .collect();
    assert!(!starting.is_empty(), "{seen:#?}");
    assert!(
        starting.iter().all(|r| r.consecutive_failures == 0),
        "{seen:#?}"
    );
    assert!(created.elapsed() >= Duration::from_millis(2_500));
    assert_eq!(seen.last().unwrap().consecutive_failures, 1);
    shutdown.cancel();
}

#[tokio::test]
async fn exec_check_passes_on_exit_zero_and_fails_with_the_exit_code_and_output() {
    let context = PushedContext::new(CommandPolicy::default());
    let timeout = Duration::from_secs(5);
    assert_eq!(
        probe::run(&exec(&["sh", "-c", "echo fine"]), timeout, &context).await,
        Probe::Pass("fine\n".into())
    );
    assert_eq!(
        probe::run(&exec(&["sh", "-c", "echo bad; exit 3"]), timeout, &context).await,
        Probe::Fail("exited with 3\nbad\n".into())
    );
    let started = Instant::now();
    let probe = probe::run(
        &exec(&["sleep", "30"]),
        Duration::from_millis(300),
        &context,
    )
    .await;
    assert!(
        matches!(&probe, Probe::Fail(why) if why.contains("timed out")),
        "{probe:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let locked = PushedContext::new(CommandPolicy {
        enabled: true,
        allow: Some(vec!["true".into()]),
        ..CommandPolicy::default()
    });
    assert!(matches!(
        probe::run(&exec(&["false"]), timeout, &locked).await,
        Probe::Fail(why) if why.contains("allow list")
    ));
}

#[tokio::test]
async fn configuration_refuses_bad_specs_keeps_unchanged_checks_and_drops_removed_ones() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = HealthCheckKind::Tcp {
        address: listener.local_addr().unwrap().to_string(),
    };
    let shutdown = CancellationToken::new();
    let health = scheduler(&shutdown);
    let mut slow = spec("a", tcp.clone());
    slow.interval_ms = 60_000;
    let mut reserved = spec("builtin:disk", tcp.clone());
    reserved.name = "impostor".into();
    let configured = health
        .configure(vec![
            slow.clone(),
            slow.clone(),
            reserved,
            spec("", tcp.clone()),
        ])
        .await;
    assert_eq!(configured.active, vec!["a"]);
    let reasons: Vec<_> = configured.rejected.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(reasons, vec!["a", "builtin:disk", ""]);
    assert!(configured.rejected[0].reason.contains("duplicate"));

    let first = wait_for(&health, "a", Duration::from_secs(5), |r| {
        r.status == HealthStatus::Passing
    })
    .await
    .pop()
    .unwrap();
    let before = health.report().unwrap();
    health.acked(before.changes);
    assert!(!health.unreported());

    // Same spec again, plus another: "a" keeps its state (its 60 s interval
    // has not elapsed, so it does not run again).
    let configured = health
        .configure(vec![slow.clone(), spec("b", tcp.clone())])
        .await;
    assert_eq!(configured.active, vec!["a", "b"]);
    wait_for(&health, "b", Duration::from_secs(5), |r| {
        r.status == HealthStatus::Passing
    })
    .await;
    assert_eq!(result(&health, "a"), Some(first));

    // Removing checks removes their results and is a change to report.
    health.acked(health.report().unwrap().changes);
    health.configure(vec![]).await;
    assert!(health.results().is_empty());
    assert!(health.unreported());
    shutdown.cancel();
}

#[tokio::test]
async fn run_now_runs_every_check_and_reports_all_results() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let health = scheduler(&shutdown);
    let mut tcp = spec(
        "tcp",
        HealthCheckKind::Tcp {
            address: listener.local_addr().unwrap().to_string(),
        },
    );
    tcp.interval_ms = 3_600_000;
    let mut slow_exec = spec("exec", exec(&["sh", "-c", "sleep 0.3; echo ran"]));
    slow_exec.interval_ms = 3_600_000;
    health.configure(vec![tcp, slow_exec]).await;
    let first = wait_for(&health, "exec", Duration::from_secs(5), |_| true)
        .await
        .pop()
        .unwrap();
    let started = Instant::now();
    let snapshot = health.run_now().await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the slow check"
    );
    let ids: Vec<_> = snapshot
        .report
        .results
        .iter()
        .map(|r| r.check_id.as_str())
        .collect();
    assert_eq!(ids, vec!["exec", "tcp"]);
    let exec_result = &snapshot.report.results[0];
    assert!(exec_result.checked_at_unix_ms > first.checked_at_unix_ms);
    assert_eq!(exec_result.output, "ran\n");
    assert_eq!(exec_result.status, HealthStatus::Passing);
    let next = health.report().unwrap();
    assert_eq!(next.report.seq, snapshot.report.seq + 1);
    shutdown.cancel();
}
