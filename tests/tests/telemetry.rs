//! End-to-end telemetry: real agents report system and Docker metrics to a
//! real control plane; no report is lost when the control plane dies or the
//! network is cut.

use std::time::Duration;

use serde_json::Value;
use tether_tests::docker::Container;
use tether_tests::{
    contiguous_seqs, enrolled_running_agent, eventually, raw_points, ControlPlane, UdpCut,
};

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
    let (_agent, server_id) = enrolled_running_agent(&cp, dir.path(), "survivor")
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
