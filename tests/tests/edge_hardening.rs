//! End-to-end: what an attacker at the edge of a real `tether serve` can no
//! longer do (docs/security.md, items 9, 10, 11 and 13). Each test performs the
//! attack over real sockets and asserts the refusal and that the target is
//! untouched (the process serving, the key file, the servers and
//! certificates).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_protocol::{
    AgentMessage, CloseCode, ControlMessage, EnrollRejection, EnrollRequest, Hello, HostFacts,
};
use tether_tests::{assert_closed_with, enrolled_running_agent, eventually, ControlPlane};

fn api_addr(cp: &ControlPlane) -> SocketAddr {
    cp.api_url.trim_start_matches("http://").parse().unwrap()
}

/// Reads what the server sends until it closes the connection, fails, or
/// `within` passes; returns the bytes and whether the server closed.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (received, false);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (received, false)
            }
            // Reset by the server: closed too.
            Err(_) => return (received, true),
        }
    }
}

/// An honest client's `/health`, on a connection of its own: with a short
/// header timeout the server rightly closes an idle keep-alive connection, and
/// a pooled one could be reused in the instant it closes.
async fn health_is_ok(cp: &ControlPlane) {
    let health = cp
        .anonymous(Method::GET, "/health")
        .header(reqwest::header::CONNECTION, "close")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn half_sent_requests_are_closed_within_the_header_timeout_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), &["--http-header-timeout", "1s"])
        .await
        .unwrap();
    let addr = api_addr(&cp);
    let started = Instant::now();
    let mut attackers: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            // Headers that never end.
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: tether\r\nX-Slow: ")
                .unwrap();
            stream
        })
        .collect();
    // While they hang, an honest client is served.
    health_is_ok(&cp).await;

    let closed = tokio::task::spawn_blocking(move || {
        attackers
            .iter_mut()
            .map(|stream| read_until_closed(stream, Duration::from_secs(6)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    for (i, (bytes, was_closed)) in closed.iter().enumerate() {
        assert!(
            was_closed,
            "half-sent request {i} still open after {elapsed:?}"
        );
        assert!(
            !String::from_utf8_lossy(bytes).contains("200 OK"),
            "half-sent request {i} was answered"
        );
    }
    assert!(
        elapsed < Duration::from_secs(5),
        "closing 40 half-sent requests took {elapsed:?} with a 1 s header timeout"
    );
    assert!(cp.is_running());
    health_is_ok(&cp).await;
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(
        &dir.path().join("cp"),
        &["--http-max-connections", "4", "--http-header-timeout", "3s"],
    )
    .await
    .unwrap();
    let addr = api_addr(&cp);
    // Four silent connections take every slot.
    let hogs: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (answer, waited) = tokio::task::spawn_blocking(move || {
        let mut fifth = TcpStream::connect(addr).unwrap();
        fifth
            .write_all(b"GET /health HTTP/1.1\r\nHost: tether\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (early, _) = read_until_closed(&mut fifth, Duration::from_secs(1));
        assert!(
            early.is_empty(),
            "a fifth connection was served past a cap of 4: {:?}",
            String::from_utf8_lossy(&early)
        );
        let (answer, _) = read_until_closed(&mut fifth, Duration::from_secs(8));
        (answer, started.elapsed())
    })
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the queued request got {answer:?}"
    );
    assert!(
        waited >= Duration::from_secs(2),
        "served after {waited:?}: before the silent connections timed out"
    );
    drop(hogs);
    assert!(cp.is_running());
    health_is_ok(&cp).await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), &["--http-body-timeout", "1s"])
        .await
        .unwrap();
    let addr = api_addr(&cp);
    let admin = cp.admin_token();
    let before = cp
        .call(&admin, Method::GET, "/api/v1/organizations", None)
        .await
        .unwrap();
    let (answer, elapsed) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).unwrap();
        let body = br#"{"name": "slow-drip"}"#;
        let head = format!(
            "POST /api/v1/organizations HTTP/1.1\r\nHost: tether\r\nAuthorization: Bearer {admin}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        // One byte every 300 ms: each gap is short, the whole is too long.
        // Between bytes, whatever the server answered is read.
        let mut answer = Vec::new();
        for byte in &body[..body.len() - 1] {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            let (got, closed) = read_until_closed(&mut stream, Duration::from_millis(300));
            answer.extend_from_slice(&got);
            if closed || !answer.is_empty() {
                break;
            }
        }
        let (rest, _) = read_until_closed(&mut stream, Duration::from_secs(5));
        answer.extend_from_slice(&rest);
        (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"error\":\"invalid_request\""), "{answer}");
    assert!(
        elapsed < Duration::from_secs(6),
        "answered after {elapsed:?}"
    );
    let after = cp
        .call(
            &cp.admin_token(),
            Method::GET,
            "/api/v1/organizations",
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        after.body["data"], before.body["data"],
        "an organization was created"
    );
    assert!(cp.is_running());
    health_is_ok(&cp).await;
}

#[tokio::test]
async fn terraform_state_without_credentials_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(&dir.path().join("cp"), &[])
        .await
        .unwrap();
    let addr = api_addr(&cp);
    let deployment = "0190f5d2-0000-7000-8000-0000000000aa";
    let declared = 32usize << 20;
    for authorization in ["", "Authorization: Basic ZGVwbG95bWVudDp3cm9uZw==\r\n"] {
        let answer = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut stream = TcpStream::connect(addr).unwrap();
            let head = format!(
                "POST /terraform/state/{deployment} HTTP/1.1\r\nHost: tether\r\n{authorization}\
                 Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).unwrap();
            // A sliver of the 32 MiB; the rest is never sent.
            stream.write_all(&vec![b' '; 64 << 10]).unwrap();
            let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5));
            (
                String::from_utf8_lossy(&answer).into_owned(),
                started.elapsed(),
            )
        })
        .await
        .unwrap();
        let (answer, elapsed) = answer;
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{authorization:?}: {answer:?}"
        );
        assert!(answer.contains("\"error\":\"unauthorized\""), "{answer}");
        assert!(
            elapsed < Duration::from_secs(3),
            "answered after {elapsed:?}"
        );
    }
    // The same through a client that sends the whole 32 MiB: still 401.
    let response = cp
        .anonymous(Method::POST, &format!("/terraform/state/{deployment}"))
        .body(vec![b' '; declared])
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(cp.is_running());
    health_is_ok(&cp).await;
}

#[tokio::test]
async fn fleet_metrics_and_agent_downloads_answer_429_past_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &["--api-rate-limit", "5", "--download-rate-limit", "3"],
    )
    .await
    .unwrap();
    let admin = cp.admin_token();
    let organizations = cp
        .call(&admin, Method::GET, "/api/v1/organizations", None)
        .await
        .unwrap();
    let root = organizations.body["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, reader) = cp
        .create_token(&admin, &root, &["servers:read"])
        .await
        .unwrap();

    let fleet = || cp.request_as(&reader, Method::GET, "/metrics/fleet").send();
    for i in 0..5 {
        assert_eq!(
            fleet().await.unwrap().status(),
            StatusCode::OK,
            "scrape {i}"
        );
    }
    let refused = fleet().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limit_exceeded", "{body}");

    let download = || {
        cp.anonymous(Method::GET, "/agent/download/plan9/mips")
            .send()
    };
    for i in 0..3 {
        assert_eq!(
            download().await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "download {i}"
        );
    }
    let refused = download().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limit_exceeded", "{body}");

    // Liveness probes are not limited; the API still answers its callers.
    for _ in 0..10 {
        health_is_ok(&cp).await;
    }
    let servers = cp
        .call(&admin, Method::GET, "/api/v1/servers", None)
        .await
        .unwrap();
    assert_eq!(servers.status, StatusCode::OK);
}

/// One enrollment attempt over QUIC from `source` (an address of this
/// machine); returns the control plane's answer.
async fn enroll_from(
    cp: &ControlPlane,
    source: &str,
    token: &str,
    csr_der: Vec<u8>,
) -> ControlMessage {
    tether_certs::install_crypto_provider();
    let tls = tether_certs::agent_client_config(cp.ca_fingerprint.parse().unwrap(), None).unwrap();
    let endpoint = tether_transport::client_endpoint(cp.quic_addr, tls).unwrap();
    endpoint
        .rebind(std::net::UdpSocket::bind(source).unwrap())
        .unwrap();
    let connection = tether_transport::connect_control_plane(&endpoint, cp.quic_addr)
        .await
        .unwrap();
    let mut stream = tether_transport::AgentStream::open(&connection)
        .await
        .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        stream.request(&AgentMessage::Enroll(EnrollRequest {
            token: token.into(),
            csr_der,
            facts: HostFacts {
                hostname: "edge-test".into(),
                ..HostFacts::default()
            },
        })),
    )
    .await
    .unwrap()
    .unwrap();
    connection.close(0u32.into(), b"done");
    answer
}

fn csr() -> Vec<u8> {
    tether_certs::AgentKey::generate()
        .unwrap()
        .csr_der("edge-test")
        .unwrap()
}

#[tokio::test]
async fn bogus_enrollments_are_rate_limited_per_source_and_audited_once_per_window() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        &[
            "--enroll-failure-limit",
            "3",
            "--enroll-failure-window",
            "4s",
        ],
    )
    .await
    .unwrap();
    let attacker = "127.0.0.1:0";
    let window_start = Instant::now();
    // The token is checked before the CSR: garbage CSR, unknown token.
    let first = enroll_from(&cp, attacker, "tet_enr_bogus-0", b"not a CSR".to_vec()).await;
    assert_eq!(
        first,
        ControlMessage::EnrollRejected(EnrollRejection::UnknownToken)
    );
    for i in 1..3 {
        let answer = enroll_from(&cp, attacker, &format!("tet_enr_bogus-{i}"), csr()).await;
        assert_eq!(
            answer,
            ControlMessage::EnrollRejected(EnrollRejection::UnknownToken),
            "attempt {i}"
        );
    }
    // Past the limit, even a valid token from this address waits.
    let valid = cp
        .enrollment_token(json!({ "server_name": "late" }))
        .await
        .unwrap();
    let valid = valid["token"].as_str().unwrap().to_string();
    for token in ["tet_enr_bogus-3", valid.as_str()] {
        match enroll_from(&cp, attacker, token, csr()).await {
            ControlMessage::EnrollRejected(EnrollRejection::RateLimited { retry_after_secs }) => {
                assert!((1..=4).contains(&retry_after_secs), "{retry_after_secs}")
            }
            other => panic!("not rate limited: {other:?}"),
        }
    }
    assert!(
        window_start.elapsed() < Duration::from_secs(4),
        "the attempts outlasted the window; the test proves nothing"
    );
    assert!(
        cp.servers("").await.unwrap().is_empty(),
        "a server was created"
    );

    // Another address of this machine is not limited.
    let other = cp
        .enrollment_token(json!({ "server_name": "other" }))
        .await
        .unwrap();
    let answer = enroll_from(&cp, "127.0.0.2:0", other["token"].as_str().unwrap(), csr()).await;
    assert!(
        matches!(answer, ControlMessage::Enrolled(_)),
        "from another address: {answer:?}"
    );
    // After the window, the first address may enroll again.
    // (The control plane's window began at the first failure, a little later.)
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(window_start.elapsed())).await;
    let answer = enroll_from(&cp, attacker, &valid, csr()).await;
    assert!(
        matches!(answer, ControlMessage::Enrolled(_)),
        "after the window: {answer:?}"
    );
    assert_eq!(cp.servers("").await.unwrap().len(), 2);

    // The five failures of 127.0.0.1 are one audit row, with their count.
    let admin = cp.admin_token();
    let refused = eventually(Duration::from_secs(10), "the aggregated audit row", || {
        let admin = admin.clone();
        let cp = &cp;
        async move {
            let log = cp
                .call(
                    &admin,
                    Method::GET,
                    "/api/v1/audit-log?action=server.enroll&limit=100",
                    None,
                )
                .await?;
            let rows: Vec<Value> = log.body["data"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r["outcome"] == "refused")
                .collect();
            Ok((!rows.is_empty()).then_some(rows))
        }
    })
    .await
    .unwrap();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    let row = &refused[0];
    assert_eq!(row["source_ip"], "127.0.0.1", "{row}");
    assert_eq!(row["detail"]["failures"], 5, "{row}");
    assert_eq!(row["detail"]["reasons"]["unknown_token"], 3, "{row}");
    assert_eq!(row["detail"]["reasons"]["rate_limited"], 2, "{row}");
}

#[tokio::test]
async fn a_renewed_certificate_revokes_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&dir.path().join("cp"), &["--agent-cert-ttl", "18s"])
        .await
        .unwrap();
    let (agent, server_id) = enrolled_running_agent(&cp, dir.path(), "renewing")
        .await
        .unwrap();
    cp.wait_for_status(&server_id, "online", Duration::from_secs(10))
        .await
        .unwrap();
    // What a thief copies from the state dir before the renewal.
    let old_cert_pem = std::fs::read_to_string(agent.state_dir.join("agent.crt")).unwrap();
    let old_key_pem = std::fs::read_to_string(agent.state_dir.join("agent.key")).unwrap();
    let old = agent.certificate().unwrap();

    eventually(Duration::from_secs(20), "a renewed certificate", || async {
        Ok(agent
            .certificate()
            .ok()
            .filter(|c| c.serial_hex != old.serial_hex))
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "the old certificate revoked",
        || async {
            Ok(cp
                .log()
                .contains("older certificates revoked")
                .then_some(()))
        },
    )
    .await
    .unwrap();
    assert!(
        std::time::SystemTime::now() < old.not_after,
        "the old certificate expired before the test could use it"
    );

    let chain = tether_certs::authority::pem_to_chain(&old_cert_pem).unwrap();
    let key = tether_certs::authority::pem_to_private_key(&old_key_pem).unwrap();
    tether_certs::install_crypto_provider();
    let tls =
        tether_certs::agent_client_config(cp.ca_fingerprint.parse().unwrap(), Some((chain, key)))
            .unwrap();
    let endpoint = tether_transport::client_endpoint(cp.quic_addr, tls).unwrap();
    let connection = tether_transport::connect_control_plane(&endpoint, cp.quic_addr)
        .await
        .unwrap();
    let hello = AgentMessage::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "thief".into(),
        facts: HostFacts::default(),
    });
    let answer = async {
        let mut stream = tether_transport::AgentStream::open(&connection).await?;
        stream.request(&hello).await
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap();
    assert!(
        !matches!(answer, Ok(ControlMessage::Welcome(_))),
        "the old certificate was welcomed: {answer:?}"
    );
    assert_closed_with(&connection, Duration::from_secs(5), CloseCode::Revoked).await;
    // The agent, on its renewed certificate, stays online.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cp.wait_for_status(&server_id, "online", Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test]
async fn master_key_open_to_the_group_stops_the_control_plane_with_a_chmod_hint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let mut cp = ControlPlane::start(&data, &[]).await.unwrap();
    cp.stop(false);
    let key = data.join("master.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "created with {mode:o}");
    let before = std::fs::read(&key).unwrap();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let refused = ControlPlane::start(&data, &[]).await;
    let error = match refused {
        Ok(_) => panic!("tether serve started with a master key readable by its group"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("exited early"), "{error}");
    assert!(
        error.contains(&format!("chmod 600 {}", key.display())),
        "{error}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), before, "the key file changed");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o640
    );

    // Fixed as told, it starts again with the same key.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cp = ControlPlane::start(&data, &[]).await.unwrap();
    health_is_ok(&cp).await;
    assert_eq!(std::fs::read(&key).unwrap(), before);
}
