//! End-to-end telemetry: real agents report system and Docker metrics to a
//! real control plane; no report is lost when the control plane dies or the
//! network is cut; a replayed backlog travels on few streams.

use std::time::Duration;

use serde_json::Value;
use tether_protocol::{
    Ack, AgentMessage, CloseCode, ControlMessage, Hello, HostFacts, MetricsBatch, SystemMetrics,
    MAX_BATCHES_PER_STREAM,
};
use tether_tests::docker::Container;
use tether_tests::{
    assert_closed_with, contiguous_seqs, enrolled_agent, enrolled_running_agent, eventually,
    raw_points, Agent, ControlPlane, UdpCut,
};
use tether_transport::AgentStream;

const FAST: &[&str] = &["--metrics-interval", "1s"];

fn since_epoch() -> &'static str {
    "2000-01-01T00:00:00Z"
}

#[tokio::test]
async fn docker_containers_appear_with_cpu_for_a_busy_one() {
    let suffix = std::process::id();
    let busy = Container::run(
        &format!("tether-e2e-busy-{suffix}"),
        &["/bin/sh", "-c", "while :; do :; done"],
    )
    .unwrap();
    let idle = Container::run(
        &format!("tether-e2e-idle-{suffix}"),
        &["/bin/sleep", "3600"],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "docker-host")
        .await
        .unwrap();

    let containers = eventually(
        Duration::from_secs(30),
        "containers with CPU for the busy one",
        || async {
            let body: Value = cp
                .request(
                    reqwest::Method::GET,
                    &format!("/api/v1/servers/{server_id}/containers"),
                )
                .send()
                .await?
                .json()
                .await?;
            let list = body["data"].as_array().cloned().unwrap_or_default();
            let busy_cpu = list
                .iter()
                .find(|c| c["name"] == busy.name.as_str())
                .and_then(|c| c["cpu_percent"].as_f64())
                .unwrap_or_default();
            let idle_seen = list.iter().any(|c| c["name"] == idle.name.as_str());
            Ok((busy_cpu > 1.0 && idle_seen).then_some(body))
        },
    )
    .await
    .unwrap();
    assert!(containers["docker_version"].is_string(), "{containers}");
    let list = containers["data"].as_array().unwrap();
    let busy_view = list
        .iter()
        .find(|c| c["name"] == busy.name.as_str())
        .unwrap();
    assert_eq!(busy_view["id"], busy.id.as_str());
    assert_eq!(busy_view["state"], "running");
    assert_eq!(busy_view["image"], tether_tests::docker::IMAGE);
    assert!(
        busy_view["memory_usage_bytes"].as_i64().unwrap() > 0,
        "{busy_view}"
    );

    // The host metrics of the same agent.
    let points = raw_points(&cp, &server_id, since_epoch()).await.unwrap();
    let last = points.last().expect("raw points");
    assert!(last["memory_total_bytes"].as_i64().unwrap() > 0);
    assert!(!last["disks"].as_array().unwrap().is_empty());
    assert!(!last["networks"].as_array().unwrap().is_empty());

    // And in the Prometheus exposition.
    let text = cp
        .request(reqwest::Method::GET, "/metrics/fleet")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!(
            "tether_container_cpu_percent{{server_id=\"{server_id}\""
        )),
        "{text}"
    );
    assert!(text.contains("tether_server_memory_total_bytes{"), "{text}");
}

#[tokio::test]
async fn no_report_is_lost_when_the_control_plane_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (agent, server_id) = enrolled_running_agent(&cp, dir.path(), "survivor")
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "first reports", || async {
        Ok((raw_points(&cp, &server_id, since_epoch()).await?.len() >= 3).then_some(()))
    })
    .await
    .unwrap();

    cp.stop(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    cp.restart().await.unwrap();

    let points = eventually(
        Duration::from_secs(30),
        "reports from before, during and after the outage",
        || async {
            let points = raw_points(&cp, &server_id, since_epoch()).await?;
            Ok((points.len() >= 12).then_some(points))
        },
    )
    .await
    .unwrap();
    let seqs = contiguous_seqs(&points).unwrap_or_else(|e| panic!("{e}: {points:?}"));
    assert!(seqs.len() >= 12);
    // The backlog of the outage went out several batches to a stream.
    let log = agent.log();
    assert!(
        largest_stream_sent(&log) > 1,
        "no stream carried more than one batch:\n{log}"
    );
}

/// The most batches the agent's log shows on one stream.
fn largest_stream_sent(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("metrics batches sent on one stream"))
        .filter_map(|line| {
            let (_, after) = line.split_once("batches=")?;
            after.split_whitespace().next()?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn no_report_is_lost_when_the_network_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), FAST)
        .await
        .unwrap();
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "cut-off")
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "first reports", || async {
        Ok((raw_points(&cp, &server_id, since_epoch()).await?.len() >= 3).then_some(()))
    })
    .await
    .unwrap();

    let before = raw_points(&cp, &server_id, since_epoch())
        .await
        .unwrap()
        .len();
    {
        let _cut = UdpCut::new(cp.quic_addr.port()).unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let during = raw_points(&cp, &server_id, since_epoch())
            .await
            .unwrap()
            .len();
        assert!(
            during <= before + 2,
            "reports got through the cut: {before} -> {during}"
        );
    }
    let points = eventually(
        Duration::from_secs(45),
        "reports from the cut delivered",
        || async {
            let points = raw_points(&cp, &server_id, since_epoch()).await?;
            Ok((points.len() >= before + 8).then_some(points))
        },
    )
    .await
    .unwrap();
    contiguous_seqs(&points).unwrap_or_else(|e| panic!("{e}: {points:?}"));
}

/// A session of our own, with the key and certificate `tether-agent enroll`
/// left in `agent`'s state dir: what a spool replay looks like on the wire,
/// frame by frame.
async fn raw_session(
    cp: &ControlPlane,
    agent: &Agent,
) -> (quinn::Endpoint, quinn::Connection, AgentStream) {
    tether_certs::install_crypto_provider();
    let key_pem = std::fs::read_to_string(agent.state_dir.join("agent.key")).unwrap();
    let key = tether_certs::AgentKey::from_pem(&key_pem).unwrap();
    let chain_pem = std::fs::read_to_string(agent.state_dir.join("agent.crt")).unwrap();
    let chain = tether_certs::authority::pem_to_chain(&chain_pem).unwrap();
    let tls = tether_certs::agent_client_config(
        cp.ca_fingerprint.parse().unwrap(),
        Some((chain, key.private_key_der())),
    )
    .unwrap();
    let endpoint = tether_transport::client_endpoint(cp.quic_addr, tls).unwrap();
    let connection = tether_transport::connect_control_plane(&endpoint, cp.quic_addr)
        .await
        .unwrap();
    let mut control = AgentStream::open(&connection).await.unwrap();
    let welcome = control
        .request(&AgentMessage::Hello(Hello {
            min_version: 1,
            max_version: 1,
            agent_version: "test".into(),
            facts: HostFacts::default(),
        }))
        .await
        .unwrap();
    assert!(matches!(welcome, ControlMessage::Welcome(_)), "{welcome:?}");
    (endpoint, connection, control)
}

fn batch(seq: u64) -> AgentMessage {
    AgentMessage::MetricsBatch(MetricsBatch {
        seq,
        collected_at_unix_ms: 0,
        system: SystemMetrics {
            memory_total_bytes: 1 << 30,
            ..SystemMetrics::default()
        },
        containers: None,
        dropped_batches: 0,
    })
}

#[tokio::test]
async fn one_stream_carries_a_replayed_backlog_acked_batch_by_batch_once_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let (agent, server_id) = enrolled_agent(&cp, dir.path(), "replayer").await.unwrap();
    let (_endpoint, connection, _control) = raw_session(&cp, &agent).await;

    // A backlog of the most batches one stream may carry, with a gap (a
    // batch the spool dropped), and one already stored before.
    let mut stream = AgentStream::open(&connection).await.unwrap();
    stream.send(&batch(1)).await.unwrap();
    stream.finish().unwrap();
    assert!(matches!(
        stream.recv_required().await.unwrap(),
        ControlMessage::Ack(Ack { seq: 1 })
    ));
    let seqs: Vec<u64> = (1..=MAX_BATCHES_PER_STREAM as u64 + 1)
        .filter(|seq| *seq != 5)
        .collect();
    let mut stream = AgentStream::open(&connection).await.unwrap();
    for seq in &seqs {
        stream.send(&batch(*seq)).await.unwrap();
    }
    stream.finish().unwrap();
    for seq in &seqs {
        let answer = tokio::time::timeout(Duration::from_secs(10), stream.recv_required())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, ControlMessage::Ack(Ack { seq: *seq }));
    }
    assert!(stream.recv().await.unwrap().is_none(), "one ack per batch");
    let stored: Vec<i64> = raw_points(&cp, &server_id, since_epoch())
        .await
        .unwrap()
        .iter()
        .filter_map(|p| p["seq"].as_i64())
        .collect();
    let mut expected: Vec<i64> = seqs.iter().map(|s| *s as i64).collect();
    expected.sort_unstable();
    let mut got = stored.clone();
    got.sort_unstable();
    assert_eq!(
        got, expected,
        "each batch stored once, the replayed one too"
    );

    // A batch repeated on one stream breaks the rules: nothing of that
    // stream is acked or stored, and the connection is closed.
    let mut stream = AgentStream::open(&connection).await.unwrap();
    stream.send(&batch(40)).await.unwrap();
    stream.send(&batch(40)).await.unwrap();
    stream.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await;
    assert!(
        !matches!(answer, Ok(Ok(Some(_)))),
        "a stream with a repeated batch was answered: {answer:?}"
    );
    assert_closed_with(
        &connection,
        Duration::from_secs(10),
        CloseCode::ProtocolViolation,
    )
    .await;
    let stored = raw_points(&cp, &server_id, since_epoch()).await.unwrap();
    assert!(
        stored.iter().all(|p| p["seq"].as_i64() != Some(40)),
        "{stored:?}"
    );
}
