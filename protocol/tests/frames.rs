//! Framing and session-rule tests for tether-protocol: round trips of every
//! message variant, every way a frame can be wrong, property tests over
//! random and mutated bytes, version negotiation, first-message rules and
//! close codes.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use serde::Serialize;
use tether_protocol::codec::{decode_body, encode_frame};
use tether_protocol::*;
use tokio_util::codec::{Decoder, Encoder};

/// What the control plane reads and writes.
type ControlSide = FrameCodec<AgentMessage, ControlMessage>;
/// What an agent reads and writes.
type AgentSide = FrameCodec<ControlMessage, AgentMessage>;

// ---------------------------------------------------------------------------
// Sample messages. `AgentMessage::kind` and `ControlMessage::kind` match
// without a wildcard and the variant counts below are checked against the
// samples, so adding a variant breaks this file until the samples cover it.
// ---------------------------------------------------------------------------

fn facts() -> HostFacts {
    HostFacts {
        hostname: "edge-01.example".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        kernel_version: Some("6.8.0-45-generic".into()),
        cpu_cores: 8,
        memory_bytes: 16 * 1024 * 1024 * 1024,
        agent_version: "0.1.0".into(),
    }
}

fn chain() -> CertificateChain {
    CertificateChain {
        certificates_der: vec![vec![0x30, 0x82, 0x01, 0x0a, 0xff], vec![], vec![0x30; 300]],
    }
}

const AGENT_VARIANTS: usize = 10;
const CONTROL_VARIANTS: usize = 13;

fn agent_samples() -> Vec<AgentMessage> {
    vec![
        AgentMessage::Enroll(EnrollRequest {
            token: "tok_3f9a1c0e7b".into(),
            csr_der: (0..=255).collect(),
            facts: facts(),
        }),
        AgentMessage::Enroll(EnrollRequest {
            token: String::new(),
            csr_der: vec![],
            facts: HostFacts::default(),
        }),
        AgentMessage::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent_version: "0.1.0 (ünïcødé build)".into(),
            facts: facts(),
        }),
        AgentMessage::Heartbeat(Heartbeat {
            sent_at_unix_ms: 1_700_000_000_123,
        }),
        AgentMessage::Heartbeat(Heartbeat {
            sent_at_unix_ms: u64::MAX,
        }),
        AgentMessage::RenewCertificate(CertificateRenewalRequest {
            csr_der: vec![0x30, 0x81, 0x00],
        }),
        AgentMessage::MetricsBatch(metrics_batch()),
        AgentMessage::MetricsBatch(MetricsBatch {
            seq: u64::MAX,
            collected_at_unix_ms: 0,
            system: SystemMetrics::default(),
            containers: None,
            dropped_batches: 0,
        }),
        AgentMessage::HealthReport(health_report()),
        AgentMessage::HealthReport(HealthReport {
            seq: 0,
            results: vec![],
        }),
        AgentMessage::HealthChecksConfigured(HealthChecksConfigured {
            active: vec!["web".into(), "db".into()],
            rejected: vec![RejectedHealthCheck {
                id: "builtin:disk".into(),
                reason: "ids starting with builtin: are reserved".into(),
            }],
        }),
        AgentMessage::HealthChecksConfigured(HealthChecksConfigured {
            active: vec![],
            rejected: vec![],
        }),
        AgentMessage::CommandStarted { pid: 4242 },
        AgentMessage::CommandStarted { pid: u32::MAX },
        AgentMessage::CommandOutput {
            stream: OutputStream::Stdout,
            data: b"hello\n".to_vec(),
        },
        AgentMessage::CommandOutput {
            stream: OutputStream::Stderr,
            data: vec![0xff; COMMAND_OUTPUT_CHUNK],
        },
        AgentMessage::CommandOutput {
            stream: OutputStream::Stderr,
            data: vec![],
        },
    ]
    .into_iter()
    .chain(
        command_outcomes()
            .into_iter()
            .map(AgentMessage::CommandFinished),
    )
    .collect()
}

fn health_report() -> HealthReport {
    HealthReport {
        seq: 7,
        results: vec![
            HealthResult {
                check_id: "builtin:docker".into(),
                name: "docker".into(),
                status: HealthStatus::Passing,
                output: "Docker daemon 28.2.2 answered in 3 ms".into(),
                checked_at_unix_ms: 1_700_000_000_000,
                duration_ms: 3,
                consecutive_failures: 0,
            },
            HealthResult {
                check_id: "web".into(),
                name: "web frontend ✓".into(),
                status: HealthStatus::Failing,
                output: "x".repeat(HEALTH_OUTPUT_LIMIT),
                checked_at_unix_ms: u64::MAX,
                duration_ms: u64::MAX,
                consecutive_failures: u32::MAX,
            },
            HealthResult {
                check_id: "db".into(),
                name: String::new(),
                status: HealthStatus::Starting,
                output: String::new(),
                checked_at_unix_ms: 0,
                duration_ms: 0,
                consecutive_failures: 1,
            },
        ],
    }
}

fn command_outcomes() -> Vec<CommandOutcome> {
    [
        CommandStatus::Exited { code: 0 },
        CommandStatus::Exited { code: -1 },
        CommandStatus::Killed { signal: 9 },
        CommandStatus::TimedOut,
        CommandStatus::Cancelled,
        CommandStatus::Refused {
            reason: "commands are disabled on this server".into(),
        },
        CommandStatus::FailedToStart {
            reason: "No such file or directory (os error 2)".into(),
        },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, status)| CommandOutcome {
        status,
        output_truncated: i % 2 == 0,
        output_bytes: i as u64 * 1000,
        duration_ms: i as u64,
    })
    .collect()
}

fn health_specs() -> Vec<HealthCheckSpec> {
    vec![
        HealthCheckSpec {
            id: "web".into(),
            name: "web frontend".into(),
            kind: HealthCheckKind::Http {
                url: "http://127.0.0.1:8080/healthz".into(),
                expected_status: Some(204),
                body_contains: Some("ok".into()),
            },
            interval_ms: 30_000,
            timeout_ms: 5_000,
            retries: 3,
            start_period_ms: 60_000,
        },
        HealthCheckSpec {
            id: "db".into(),
            name: "postgres".into(),
            kind: HealthCheckKind::Tcp {
                address: "db.internal:5432".into(),
            },
            interval_ms: 10_000,
            timeout_ms: 1_000,
            retries: 0,
            start_period_ms: 0,
        },
        HealthCheckSpec {
            id: "queue".into(),
            name: String::new(),
            kind: HealthCheckKind::Exec {
                argv: vec!["/usr/local/bin/queue-ok".into(), "--quiet".into()],
            },
            interval_ms: u64::MAX,
            timeout_ms: u64::MAX,
            retries: u32::MAX,
            start_period_ms: u64::MAX,
        },
        HealthCheckSpec {
            id: "any".into(),
            name: "any 2xx".into(),
            kind: HealthCheckKind::Http {
                url: "https://example.com/".into(),
                expected_status: None,
                body_contains: None,
            },
            interval_ms: 1_000,
            timeout_ms: 1,
            retries: 1,
            start_period_ms: 0,
        },
    ]
}

fn command_request() -> CommandRequest {
    CommandRequest {
        command_id: "0192f0c4-7a9e-7c3b-9d3e-000000000001".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), "echo \"$GREETING\"".into()],
        env: vec![
            ("GREETING".into(), "hello".into()),
            ("DB_PASSWORD".into(), "hunter2".into()),
        ],
        stdin: Some(b"secret stdin".to_vec()),
        timeout_ms: 60_000,
        max_output_bytes: 1 << 20,
    }
}

fn metrics_batch() -> MetricsBatch {
    MetricsBatch {
        seq: 42,
        collected_at_unix_ms: 1_700_000_000_000,
        system: SystemMetrics {
            cpu_percent: 12.5,
            cpu_per_core: vec![10.0, 15.0],
            load_1: 0.5,
            load_5: 0.25,
            load_15: 0.125,
            memory_total_bytes: 16 << 30,
            memory_used_bytes: 4 << 30,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
            disks: vec![DiskMetrics {
                mount_point: "/".into(),
                device: "/dev/vda1".into(),
                filesystem: "ext4".into(),
                total_bytes: 100 << 30,
                used_bytes: 40 << 30,
                inodes_total: Some(6_553_600),
                inodes_used: None,
            }],
            networks: vec![NetworkMetrics {
                interface: "eth0".into(),
                rx_bytes: 1,
                tx_bytes: 2,
                rx_packets: 3,
                tx_packets: 4,
                rx_errors: 0,
                tx_errors: 0,
            }],
            uptime_seconds: 3600,
            process_count: 123,
        },
        containers: Some(ContainerReport {
            docker_version: Some("28.2.2".into()),
            error: None,
            containers: vec![ContainerMetrics {
                id: "abc".into(),
                name: "web".into(),
                image: "busybox:local".into(),
                state: "running".into(),
                health: Some("healthy".into()),
                restart_count: 2,
                started_at: Some("2026-11-22T00:00:00Z".into()),
                cpu_percent: 99.5,
                memory_usage_bytes: 1 << 20,
                memory_limit_bytes: 1 << 30,
                net_rx_bytes: 10,
                net_tx_bytes: 20,
                block_read_bytes: 30,
                block_write_bytes: 40,
            }],
        }),
        dropped_batches: 7,
    }
}

fn control_samples() -> Vec<ControlMessage> {
    let mut samples = vec![
        ControlMessage::Enrolled(EnrollmentGrant {
            server_id: "7f9c2b".into(),
            branch_id: "eu-west".into(),
            chain: chain(),
        }),
        ControlMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_id: "7f9c2b".into(),
            branch_id: "eu-west".into(),
            config: AgentConfig {
                metrics_interval_ms: 30_000,
                heartbeat_interval_ms: 10_000,
            },
        }),
        ControlMessage::HelloRejected(HelloRejection {
            supported_min: 2,
            supported_max: 9,
        }),
        ControlMessage::HeartbeatAck(HeartbeatAck {
            received_at_unix_ms: 0,
        }),
        ControlMessage::CertificateRenewed(chain()),
        ControlMessage::CertificateRenewed(CertificateChain {
            certificates_der: vec![],
        }),
    ];
    for rejection in [
        EnrollRejection::UnknownToken,
        EnrollRejection::ExpiredToken,
        EnrollRejection::TokenAlreadyUsed,
        EnrollRejection::InvalidCsr("key must be ECDSA P-256".into()),
        EnrollRejection::QuotaExceeded("org acme: 10 servers".into()),
        EnrollRejection::Internal,
        EnrollRejection::RateLimited {
            retry_after_secs: 42,
        },
        EnrollRejection::OrganizationDeleted,
    ] {
        samples.push(ControlMessage::EnrollRejected(rejection));
    }
    for rejection in [
        RenewalRejection::InvalidCsr("bad signature".into()),
        RenewalRejection::Revoked,
        RenewalRejection::Internal,
    ] {
        samples.push(ControlMessage::RenewalRejected(rejection));
    }
    samples.push(ControlMessage::Ack(Ack { seq: 42 }));
    samples.push(ControlMessage::HealthAck { seq: 7 });
    samples.push(ControlMessage::HealthAck { seq: u64::MAX });
    samples.push(ControlMessage::ConfigureHealthChecks(health_specs()));
    samples.push(ControlMessage::ConfigureHealthChecks(vec![]));
    samples.push(ControlMessage::RunHealthChecksNow);
    samples.push(ControlMessage::RunCommand(command_request()));
    samples.push(ControlMessage::RunCommand(CommandRequest {
        command_id: String::new(),
        argv: vec![],
        env: vec![],
        stdin: None,
        timeout_ms: 0,
        max_output_bytes: 0,
    }));
    samples.push(ControlMessage::CancelCommand);
    samples
}

/// A raw frame: big-endian u32 length prefix, then `body`.
fn raw_frame(body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32);
    buf.put_slice(body);
    buf
}

fn postcard_body<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).unwrap()
}

fn encode_with<In, Out: Serialize>(codec: &mut FrameCodec<In, Out>, message: &Out) -> BytesMut {
    let mut buf = BytesMut::new();
    codec.encode(message, &mut buf).unwrap();
    buf
}

/// Feeds `bytes` one at a time, collecting messages, then signals EOF.
fn decode_byte_at_a_time<In: serde::de::DeserializeOwned, Out>(
    codec: &mut FrameCodec<In, Out>,
    bytes: &[u8],
) -> Vec<In> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in bytes {
        buf.put_u8(*byte);
        while let Some(message) = codec.decode(&mut buf).unwrap() {
            out.push(message);
        }
    }
    while let Some(message) = codec.decode_eof(&mut buf).unwrap() {
        out.push(message);
    }
    out
}

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

#[test]
fn samples_cover_every_message_variant() {
    let mut agent: Vec<_> = agent_samples().iter().map(AgentMessage::kind).collect();
    agent.sort_unstable();
    agent.dedup();
    assert_eq!(agent.len(), AGENT_VARIANTS, "{agent:?}");
    let mut control: Vec<_> = control_samples().iter().map(ControlMessage::kind).collect();
    control.sort_unstable();
    control.dedup();
    assert_eq!(control.len(), CONTROL_VARIANTS, "{control:?}");
}

#[test]
fn every_agent_message_variant_round_trips_through_the_codec() {
    for message in agent_samples() {
        let mut agent = AgentSide::default();
        let mut control = ControlSide::default();
        let mut buf = encode_with(&mut agent, &message);
        let length = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(length, buf.len() - 4, "length prefix of {message:?}");
        assert_eq!(control.decode(&mut buf).unwrap(), Some(message.clone()));
        assert!(buf.is_empty());
        assert!(control.decode_eof(&mut buf).unwrap().is_none());
    }
}

#[test]
fn every_control_message_variant_round_trips_through_the_codec() {
    for message in control_samples() {
        let mut control = ControlSide::default();
        let mut agent = AgentSide::default();
        let mut buf = encode_with(&mut control, &message);
        assert_eq!(agent.decode(&mut buf).unwrap(), Some(message.clone()));
        assert!(buf.is_empty());
        assert!(agent.decode_eof(&mut buf).unwrap().is_none());
    }
}

#[test]
fn byte_at_a_time_feeding_yields_the_same_agent_messages() {
    for message in agent_samples() {
        let frame = encode_frame(&message, MAX_FRAME_LEN).unwrap();
        let mut codec = ControlSide::default();
        let mut buf = BytesMut::new();
        for (i, byte) in frame.iter().enumerate() {
            buf.put_u8(*byte);
            let decoded = codec.decode(&mut buf).unwrap();
            if i + 1 < frame.len() {
                assert!(decoded.is_none(), "{message:?} decoded early at byte {i}");
            } else {
                assert_eq!(decoded, Some(message.clone()));
            }
        }
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }
}

#[test]
fn byte_at_a_time_feeding_yields_the_same_control_messages() {
    for message in control_samples() {
        let frame = encode_frame(&message, MAX_FRAME_LEN).unwrap();
        let mut codec = AgentSide::default();
        assert_eq!(decode_byte_at_a_time(&mut codec, &frame), vec![message]);
    }
}

#[test]
fn back_to_back_frames_decode_in_order_whole_or_byte_at_a_time() {
    let samples = control_samples();
    let mut stream = BytesMut::new();
    let mut encoder = ControlSide::default();
    for message in &samples {
        encoder.encode(message, &mut stream).unwrap();
    }
    assert_eq!(
        decode_byte_at_a_time(&mut AgentSide::default(), &stream),
        samples
    );

    let mut whole = stream.clone();
    let mut codec = AgentSide::default();
    let mut decoded = Vec::new();
    while let Some(message) = codec.decode_eof(&mut whole).unwrap() {
        decoded.push(message);
    }
    assert_eq!(decoded, samples);
}

#[test]
fn encoding_by_value_and_by_reference_and_encode_frame_agree() {
    for message in agent_samples() {
        let mut by_ref = BytesMut::new();
        let mut by_value = BytesMut::new();
        let mut codec = AgentSide::default();
        codec.encode(&message, &mut by_ref).unwrap();
        codec.encode(message.clone(), &mut by_value).unwrap();
        assert_eq!(by_ref, by_value);
        assert_eq!(
            &by_ref[..],
            &encode_frame(&message, MAX_FRAME_LEN).unwrap()[..]
        );
    }
}

#[test]
fn enroll_request_debug_output_redacts_the_token() {
    let request = EnrollRequest {
        token: "tok_super_secret_value".into(),
        csr_der: vec![1, 2, 3],
        facts: facts(),
    };
    let debug = format!("{:?}", AgentMessage::Enroll(request));
    assert!(!debug.contains("tok_super_secret_value"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[test]
fn command_request_debug_output_shows_env_names_but_not_values_or_stdin() {
    let debug = format!("{:?}", ControlMessage::RunCommand(command_request()));
    assert!(
        debug.contains("GREETING") && debug.contains("DB_PASSWORD"),
        "{debug}"
    );
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(!debug.contains("secret stdin"), "{debug}");
    assert!(debug.contains("stdin_len: Some(12)"), "{debug}");
    assert!(debug.contains("$GREETING"), "argv is shown: {debug}");
}

// ---------------------------------------------------------------------------
// Oversized frames
// ---------------------------------------------------------------------------

#[test]
fn default_codec_limit_is_one_mebibyte() {
    assert_eq!(MAX_FRAME_LEN, 1 << 20);
    assert_eq!(ControlSide::default().max_frame_len(), MAX_FRAME_LEN);
    assert_eq!(ControlSide::new(77).clone().max_frame_len(), 77);
}

#[test]
fn length_prefix_above_the_max_is_oversized() {
    let mut buf = BytesMut::new();
    buf.put_u32(MAX_FRAME_LEN as u32 + 1);
    let err = ControlSide::default().decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::Oversized { max } if max == MAX_FRAME_LEN),
        "{err:?}"
    );

    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    buf.put_slice(b"whatever follows");
    let err = AgentSide::default().decode_eof(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::Oversized { max } if max == MAX_FRAME_LEN),
        "{err:?}"
    );
}

#[test]
fn oversized_is_reported_from_the_prefix_alone_without_waiting_for_the_body() {
    let mut codec = ControlSide::new(16);
    let mut buf = BytesMut::new();
    buf.put_u32(17);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::Oversized { max: 16 }), "{err:?}");
}

#[test]
fn frame_exactly_at_the_limit_is_accepted_and_one_byte_over_is_not() {
    let message = AgentMessage::Heartbeat(Heartbeat {
        sent_at_unix_ms: 42,
    });
    let body_len = postcard_body(&message).len();

    let frame = encode_frame(&message, body_len).unwrap();
    assert_eq!(
        ControlSide::new(body_len)
            .decode(&mut BytesMut::from(&frame[..]))
            .unwrap(),
        Some(message.clone())
    );

    let err = encode_frame(&message, body_len - 1).unwrap_err();
    assert!(
        matches!(err, FrameError::Oversized { max } if max == body_len - 1),
        "{err:?}"
    );
    let err = ControlSide::new(body_len - 1)
        .decode(&mut BytesMut::from(&frame[..]))
        .unwrap_err();
    assert!(
        matches!(err, FrameError::Oversized { max } if max == body_len - 1),
        "{err:?}"
    );
}

#[test]
fn encoding_a_two_mebibyte_csr_is_oversized_and_writes_nothing() {
    let message = AgentMessage::Enroll(EnrollRequest {
        token: "t".into(),
        csr_der: vec![0xab; 2 << 20],
        facts: HostFacts::default(),
    });
    let mut codec = AgentSide::default();
    let mut dst = BytesMut::from(&b"earlier frame"[..]);
    let err = codec.encode(&message, &mut dst).unwrap_err();
    assert!(
        matches!(err, FrameError::Oversized { max } if max == MAX_FRAME_LEN),
        "{err:?}"
    );
    assert_eq!(
        &dst[..],
        b"earlier frame",
        "a refused frame must not leave partial bytes"
    );

    let err = encode_frame(&message, MAX_FRAME_LEN).unwrap_err();
    assert!(matches!(err, FrameError::Oversized { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------
// Truncated frames
// ---------------------------------------------------------------------------

#[test]
fn empty_input_at_eof_is_a_clean_end() {
    assert!(ControlSide::default()
        .decode_eof(&mut BytesMut::new())
        .unwrap()
        .is_none());
}

#[test]
fn partial_length_prefix_at_eof_is_truncated() {
    let mut buf = BytesMut::from(&[0u8, 0][..]);
    let mut codec = ControlSide::default();
    assert!(codec.decode(&mut buf).unwrap().is_none());
    let err = codec.decode_eof(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::Truncated { buffered: 2 }),
        "{err:?}"
    );
}

#[test]
fn partial_body_at_eof_is_truncated() {
    let frame = encode_frame(
        &AgentMessage::Heartbeat(Heartbeat { sent_at_unix_ms: 9 }),
        MAX_FRAME_LEN,
    )
    .unwrap();
    for cut in 1..frame.len() {
        let mut codec = ControlSide::default();
        let mut buf = BytesMut::from(&frame[..cut]);
        assert!(codec.decode(&mut buf).unwrap().is_none(), "cut at {cut}");
        let err = codec.decode_eof(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { buffered } if buffered == cut),
            "cut at {cut}: {err:?}"
        );
    }
}

#[test]
fn length_prefix_alone_at_eof_is_truncated_even_after_decode_consumed_it() {
    // The inner length-delimited codec consumes the 4-byte prefix as soon as
    // it has it, leaving an empty buffer while it waits for the body. EOF
    // there is still the middle of a frame, not a clean end of stream.
    let mut buf = BytesMut::new();
    buf.put_u32(10);
    let mut codec = ControlSide::default();
    assert!(codec.decode(&mut buf).unwrap().is_none());
    let err = codec.decode_eof(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::Truncated { buffered: 4 }),
        "{err:?}"
    );

    // Same thing when decode_eof is the first call (FramedRead at EOF).
    let mut buf = BytesMut::new();
    buf.put_u32(10);
    let err = ControlSide::default().decode_eof(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::Truncated { buffered: 4 }),
        "{err:?}"
    );
}

#[test]
fn complete_frame_then_partial_frame_at_eof_yields_the_message_then_truncated() {
    let message = ControlMessage::HeartbeatAck(HeartbeatAck {
        received_at_unix_ms: 5,
    });
    let frame = encode_frame(&message, MAX_FRAME_LEN).unwrap();
    let mut buf = BytesMut::from(&frame[..]);
    buf.put_slice(&frame[..frame.len() - 1]);
    let mut codec = AgentSide::default();
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(message));
    let err = codec.decode_eof(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::Truncated { buffered } if buffered == frame.len() - 1),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// Bodies that are not messages
// ---------------------------------------------------------------------------

/// What a newer agent could send: the same variants plus an appended one.
#[derive(Serialize)]
enum NewerAgentMessage {
    #[allow(dead_code)]
    Enroll(EnrollRequest),
    #[allow(dead_code)]
    Hello(Hello),
    Heartbeat(Heartbeat),
    #[allow(dead_code)]
    RenewCertificate(CertificateRenewalRequest),
    #[allow(dead_code)]
    MetricsBatch(MetricsBatch),
    #[allow(dead_code)]
    HealthReport(HealthReport),
    #[allow(dead_code)]
    HealthChecksConfigured(HealthChecksConfigured),
    #[allow(dead_code)]
    CommandStarted {
        pid: u32,
    },
    #[allow(dead_code)]
    CommandOutput {
        stream: OutputStream,
        data: Vec<u8>,
    },
    #[allow(dead_code)]
    CommandFinished(CommandOutcome),
    FeatureOfTheFuture {
        seq: u64,
        samples: Vec<u8>,
    },
}

#[test]
fn unknown_top_level_discriminant_is_unknown_variant() {
    for discriminant in [AGENT_VARIANTS as u8, AGENT_VARIANTS as u8 + 1, 0x7f] {
        let mut buf = raw_frame(&[discriminant, 0, 0, 0]);
        let err = ControlSide::default().decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::UnknownVariant),
            "discriminant {discriminant}: {err:?}"
        );
    }
    let mut buf = raw_frame(&[CONTROL_VARIANTS as u8]);
    let err = AgentSide::default().decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
    // A multi-byte varint discriminant (300).
    let err = decode_body::<AgentMessage>(&[0xac, 0x02]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
}

#[test]
fn unknown_nested_discriminant_is_unknown_variant() {
    // EnrollRejected(<rejection #8>): EnrollRejection has 8 variants.
    let err = decode_body::<ControlMessage>(&[1, 8]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
    // RenewalRejected(<rejection #3>).
    let err = decode_body::<ControlMessage>(&[6, 3]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
    // CommandOutput { stream: <#2>, .. }: OutputStream has 2 variants.
    let err = decode_body::<AgentMessage>(&[8, 2, 0]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
    // CommandFinished(<status #6>): CommandStatus has 6 variants.
    let err = decode_body::<AgentMessage>(&[9, 6, 0, 0, 0]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
    // ConfigureHealthChecks([{ id "", name "", kind <#3> }]): 3 kinds.
    let err = decode_body::<ControlMessage>(&[9, 1, 0, 0, 3]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
    // HealthReport { seq 0, [{ "", "", status <#3> }] }: 3 statuses.
    let err = decode_body::<AgentMessage>(&[5, 0, 1, 0, 0, 3]).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");
}

#[test]
fn variant_appended_by_a_newer_peer_is_unknown_variant_and_older_variants_still_decode() {
    let newer = NewerAgentMessage::FeatureOfTheFuture {
        seq: 1,
        samples: vec![1, 2, 3],
    };
    let mut buf = raw_frame(&postcard_body(&newer));
    let err = ControlSide::default().decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::UnknownVariant), "{err:?}");

    let old = NewerAgentMessage::Heartbeat(Heartbeat {
        sent_at_unix_ms: 77,
    });
    let mut buf = raw_frame(&postcard_body(&old));
    assert_eq!(
        ControlSide::default().decode(&mut buf).unwrap(),
        Some(AgentMessage::Heartbeat(Heartbeat {
            sent_at_unix_ms: 77
        }))
    );
}

#[test]
fn discriminant_beyond_u32_is_a_typed_error() {
    // A varint that does not fit a u32 where the discriminant should be.
    let err = decode_body::<AgentMessage>(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap_err();
    assert!(
        matches!(err, FrameError::UnknownVariant | FrameError::Undecodable(_)),
        "{err:?}"
    );
}

#[test]
fn trailing_bytes_after_the_message_are_refused() {
    let mut body = postcard_body(&AgentMessage::Heartbeat(Heartbeat { sent_at_unix_ms: 3 }));
    body.extend_from_slice(&[0xde, 0xad, 0xbe]);
    let mut buf = raw_frame(&body);
    let err = ControlSide::default().decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::TrailingBytes(3)), "{err:?}");
}

#[test]
fn body_cut_short_or_empty_is_undecodable() {
    let body = postcard_body(&ControlMessage::Welcome(Welcome {
        protocol_version: 1,
        server_id: "server".into(),
        branch_id: "branch".into(),
        config: AgentConfig {
            metrics_interval_ms: 1,
            heartbeat_interval_ms: 2,
        },
    }));
    for cut in 0..body.len() {
        let mut buf = raw_frame(&body[..cut]);
        let err = AgentSide::default().decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::Undecodable(_)),
            "cut at {cut}: {err:?}"
        );
    }
}

#[test]
fn invalid_utf8_in_a_string_field_is_undecodable() {
    // Hello { min 1, max 1, agent_version: <2 bytes, invalid UTF-8>, ... }
    let err = decode_body::<AgentMessage>(&[1, 1, 1, 2, 0xc3, 0x28]).unwrap_err();
    assert!(matches!(err, FrameError::Undecodable(_)), "{err:?}");
}

#[test]
fn bad_frame_body_consumes_only_its_own_frame() {
    let good = AgentMessage::Heartbeat(Heartbeat {
        sent_at_unix_ms: 11,
    });
    let mut buf = raw_frame(&[0x42]);
    buf.extend_from_slice(&encode_frame(&good, MAX_FRAME_LEN).unwrap());
    let mut codec = ControlSide::default();
    assert!(matches!(
        codec.decode(&mut buf),
        Err(FrameError::UnknownVariant)
    ));
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(good));
    assert!(codec.decode_eof(&mut buf).unwrap().is_none());
}

// ---------------------------------------------------------------------------
// Property tests: random and mutated input never panics and is always typed
// ---------------------------------------------------------------------------

/// One observable step of decoding a stream.
#[derive(Debug, PartialEq)]
enum Outcome<M> {
    Message(M),
    Error(String),
    End,
}

fn check_error(err: &FrameError) {
    // In memory there is no IO and nothing is encoded: those variants would
    // mean an error was mis-classified.
    assert!(
        !matches!(err, FrameError::Io(_) | FrameError::Unencodable(_)),
        "decoding produced {err:?}"
    );
    // Display never panics either.
    let _ = err.to_string();
}

/// Feeds `bytes` in the given chunk sizes, then signals EOF. Decoding stops
/// at the first error (the stream would be closed there).
fn run_decoder<In: serde::de::DeserializeOwned, Out>(
    codec: &mut FrameCodec<In, Out>,
    bytes: &[u8],
    chunks: &[usize],
) -> Vec<Outcome<In>> {
    let mut outcomes = Vec::new();
    let mut buf = BytesMut::new();
    let mut rest = bytes;
    let mut chunk_sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = chunk_sizes
            .next()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        buf.put_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(message)) => outcomes.push(Outcome::Message(message)),
                Ok(None) => break,
                Err(err) => {
                    check_error(&err);
                    outcomes.push(Outcome::Error(format!("{err:?}")));
                    return outcomes;
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(message)) => outcomes.push(Outcome::Message(message)),
            Ok(None) => {
                assert!(buf.is_empty(), "clean end with {} bytes left", buf.len());
                outcomes.push(Outcome::End);
                return outcomes;
            }
            Err(err) => {
                check_error(&err);
                outcomes.push(Outcome::Error(format!("{err:?}")));
                return outcomes;
            }
        }
    }
}

/// Decodes `bytes` with both codec directions and with both the default and
/// a small limit, whole and in chunks; chunking never changes the outcome.
/// A clean end of stream is only ever reported when the bytes are exactly a
/// sequence of complete frames, one message per frame.
fn decode_everything(bytes: &[u8], chunks: &[usize]) {
    for max in [MAX_FRAME_LEN, 64] {
        let whole = run_decoder(&mut ControlSide::new(max), bytes, &[]);
        let chunked = run_decoder(&mut ControlSide::new(max), bytes, chunks);
        assert_eq!(whole, chunked, "control side, max {max}");
        check_clean_end(bytes, &whole);
        let whole = run_decoder(&mut AgentSide::new(max), bytes, &[]);
        let chunked = run_decoder(&mut AgentSide::new(max), bytes, chunks);
        assert_eq!(whole, chunked, "agent side, max {max}");
        check_clean_end(bytes, &whole);
    }
}

fn check_clean_end<M>(bytes: &[u8], outcomes: &[Outcome<M>]) {
    if outcomes.last().is_some_and(|o| matches!(o, Outcome::End)) {
        let boundaries = frame_boundaries(bytes);
        assert_eq!(
            boundaries.last(),
            Some(&bytes.len()),
            "clean end inside a frame"
        );
        assert_eq!(
            outcomes.len(),
            boundaries.len(),
            "one message per frame, then End"
        );
    }
}

fn small_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9._ -]{0,12}|.{0,4}").unwrap()
}

fn small_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..48)
}

fn host_facts() -> impl Strategy<Value = HostFacts> {
    (
        small_string(),
        small_string(),
        small_string(),
        proptest::option::of(small_string()),
        any::<u32>(),
        any::<u64>(),
        small_string(),
    )
        .prop_map(
            |(hostname, os, arch, kernel_version, cpu_cores, memory_bytes, agent_version)| {
                HostFacts {
                    hostname,
                    os,
                    arch,
                    kernel_version,
                    cpu_cores,
                    memory_bytes,
                    agent_version,
                }
            },
        )
}

fn certificate_chain() -> impl Strategy<Value = CertificateChain> {
    proptest::collection::vec(small_bytes(), 0..4)
        .prop_map(|certificates_der| CertificateChain { certificates_der })
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        (small_string(), small_bytes(), host_facts()).prop_map(|(token, csr_der, facts)| {
            AgentMessage::Enroll(EnrollRequest {
                token,
                csr_der,
                facts,
            })
        }),
        (any::<u16>(), any::<u16>(), small_string(), host_facts()).prop_map(
            |(min_version, max_version, agent_version, facts)| AgentMessage::Hello(Hello {
                min_version,
                max_version,
                agent_version,
                facts
            })
        ),
        any::<u64>()
            .prop_map(|sent_at_unix_ms| AgentMessage::Heartbeat(Heartbeat { sent_at_unix_ms })),
        small_bytes().prop_map(|csr_der| AgentMessage::RenewCertificate(
            CertificateRenewalRequest { csr_der }
        )),
        (
            any::<u64>(),
            any::<u64>(),
            -1.0e6f32..1.0e6f32,
            proptest::option::of(small_string())
        )
            .prop_map(|(seq, dropped_batches, cpu, version)| {
                let mut batch = metrics_batch();
                batch.seq = seq;
                batch.dropped_batches = dropped_batches;
                batch.system.cpu_percent = cpu;
                if let Some(report) = batch.containers.as_mut() {
                    report.docker_version = version;
                }
                AgentMessage::MetricsBatch(batch)
            }),
        (
            any::<u64>(),
            proptest::collection::vec(health_result(), 0..4)
        )
            .prop_map(|(seq, results)| AgentMessage::HealthReport(HealthReport { seq, results })),
        (
            proptest::collection::vec(small_string(), 0..4),
            proptest::collection::vec((small_string(), small_string()), 0..3)
        )
            .prop_map(|(active, rejected)| {
                AgentMessage::HealthChecksConfigured(HealthChecksConfigured {
                    active,
                    rejected: rejected
                        .into_iter()
                        .map(|(id, reason)| RejectedHealthCheck { id, reason })
                        .collect(),
                })
            }),
        any::<u32>().prop_map(|pid| AgentMessage::CommandStarted { pid }),
        (output_stream(), small_bytes())
            .prop_map(|(stream, data)| AgentMessage::CommandOutput { stream, data }),
        (command_status(), any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
            |(status, output_truncated, output_bytes, duration_ms)| {
                AgentMessage::CommandFinished(CommandOutcome {
                    status,
                    output_truncated,
                    output_bytes,
                    duration_ms,
                })
            }
        ),
    ]
}

fn health_status() -> impl Strategy<Value = HealthStatus> {
    prop_oneof![
        Just(HealthStatus::Starting),
        Just(HealthStatus::Passing),
        Just(HealthStatus::Failing),
    ]
}

fn health_result() -> impl Strategy<Value = HealthResult> {
    (
        small_string(),
        small_string(),
        health_status(),
        small_string(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(
                check_id,
                name,
                status,
                output,
                checked_at_unix_ms,
                duration_ms,
                consecutive_failures,
            )| HealthResult {
                check_id,
                name,
                status,
                output,
                checked_at_unix_ms,
                duration_ms,
                consecutive_failures,
            },
        )
}

fn output_stream() -> impl Strategy<Value = OutputStream> {
    prop_oneof![Just(OutputStream::Stdout), Just(OutputStream::Stderr)]
}

fn command_status() -> impl Strategy<Value = CommandStatus> {
    prop_oneof![
        any::<i32>().prop_map(|code| CommandStatus::Exited { code }),
        any::<i32>().prop_map(|signal| CommandStatus::Killed { signal }),
        Just(CommandStatus::TimedOut),
        Just(CommandStatus::Cancelled),
        small_string().prop_map(|reason| CommandStatus::Refused { reason }),
        small_string().prop_map(|reason| CommandStatus::FailedToStart { reason }),
    ]
}

fn health_check_kind() -> impl Strategy<Value = HealthCheckKind> {
    prop_oneof![
        (
            small_string(),
            proptest::option::of(any::<u16>()),
            proptest::option::of(small_string())
        )
            .prop_map(
                |(url, expected_status, body_contains)| HealthCheckKind::Http {
                    url,
                    expected_status,
                    body_contains
                }
            ),
        small_string().prop_map(|address| HealthCheckKind::Tcp { address }),
        proptest::collection::vec(small_string(), 0..4)
            .prop_map(|argv| HealthCheckKind::Exec { argv }),
    ]
}

fn health_check_spec() -> impl Strategy<Value = HealthCheckSpec> {
    (
        small_string(),
        small_string(),
        health_check_kind(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(id, name, kind, interval_ms, timeout_ms, retries, start_period_ms)| HealthCheckSpec {
                id,
                name,
                kind,
                interval_ms,
                timeout_ms,
                retries,
                start_period_ms,
            },
        )
}

fn command_request_strategy() -> impl Strategy<Value = CommandRequest> {
    (
        small_string(),
        proptest::collection::vec(small_string(), 0..4),
        proptest::collection::vec((small_string(), small_string()), 0..3),
        proptest::option::of(small_bytes()),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(command_id, argv, env, stdin, timeout_ms, max_output_bytes)| CommandRequest {
                command_id,
                argv,
                env,
                stdin,
                timeout_ms,
                max_output_bytes,
            },
        )
}

fn control_message() -> impl Strategy<Value = ControlMessage> {
    let enroll_rejection = prop_oneof![
        Just(EnrollRejection::UnknownToken),
        Just(EnrollRejection::ExpiredToken),
        Just(EnrollRejection::TokenAlreadyUsed),
        small_string().prop_map(EnrollRejection::InvalidCsr),
        small_string().prop_map(EnrollRejection::QuotaExceeded),
        Just(EnrollRejection::Internal),
        any::<u64>().prop_map(|retry_after_secs| EnrollRejection::RateLimited { retry_after_secs }),
        Just(EnrollRejection::OrganizationDeleted),
    ];
    let renewal_rejection = prop_oneof![
        small_string().prop_map(RenewalRejection::InvalidCsr),
        Just(RenewalRejection::Revoked),
        Just(RenewalRejection::Internal),
    ];
    prop_oneof![
        any::<u64>().prop_map(|seq| ControlMessage::Ack(Ack { seq })),
        (small_string(), small_string(), certificate_chain()).prop_map(
            |(server_id, branch_id, chain)| {
                ControlMessage::Enrolled(EnrollmentGrant {
                    server_id,
                    branch_id,
                    chain,
                })
            }
        ),
        enroll_rejection.prop_map(ControlMessage::EnrollRejected),
        (
            any::<u16>(),
            small_string(),
            small_string(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(
                    protocol_version,
                    server_id,
                    branch_id,
                    metrics_interval_ms,
                    heartbeat_interval_ms,
                )| {
                    ControlMessage::Welcome(Welcome {
                        protocol_version,
                        server_id,
                        branch_id,
                        config: AgentConfig {
                            metrics_interval_ms,
                            heartbeat_interval_ms,
                        },
                    })
                }
            ),
        (any::<u16>(), any::<u16>()).prop_map(|(supported_min, supported_max)| {
            ControlMessage::HelloRejected(HelloRejection {
                supported_min,
                supported_max,
            })
        }),
        any::<u64>().prop_map(
            |received_at_unix_ms| ControlMessage::HeartbeatAck(HeartbeatAck {
                received_at_unix_ms
            })
        ),
        certificate_chain().prop_map(ControlMessage::CertificateRenewed),
        renewal_rejection.prop_map(ControlMessage::RenewalRejected),
        any::<u64>().prop_map(|seq| ControlMessage::HealthAck { seq }),
        proptest::collection::vec(health_check_spec(), 0..4)
            .prop_map(ControlMessage::ConfigureHealthChecks),
        Just(ControlMessage::RunHealthChecksNow),
        command_request_strategy().prop_map(ControlMessage::RunCommand),
        Just(ControlMessage::CancelCommand),
    ]
}

/// A stream of valid frames from either direction, and whether it is the
/// agent's (`true`) or the control plane's (`false`).
fn valid_stream() -> impl Strategy<Value = (Vec<u8>, bool)> {
    prop_oneof![
        proptest::collection::vec(agent_message(), 1..4).prop_map(|messages| {
            let mut codec = AgentSide::default();
            let mut buf = BytesMut::new();
            for message in &messages {
                codec.encode(message, &mut buf).unwrap();
            }
            (buf.to_vec(), true)
        }),
        proptest::collection::vec(control_message(), 1..4).prop_map(|messages| {
            let mut codec = ControlSide::default();
            let mut buf = BytesMut::new();
            for message in &messages {
                codec.encode(message, &mut buf).unwrap();
            }
            (buf.to_vec(), false)
        }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Set { at: usize, value: u8 },
    Insert { at: usize, value: u8 },
    Remove { at: usize },
    Truncate { at: usize },
    SetLength { frame_start: usize, len: u32 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=u8::MAX).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Insert { at, value }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop_oneof![0..64u32, any::<u32>()])
            .prop_map(|(frame_start, len)| Mutation::SetLength { frame_start, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match *mutation {
        Mutation::Flip { at, mask } => bytes[at % n] ^= mask,
        Mutation::Set { at, value } => bytes[at % n] = value,
        Mutation::Insert { at, value } => bytes.insert(at % (n + 1), value),
        Mutation::Remove { at } => {
            bytes.remove(at % n);
        }
        Mutation::Truncate { at } => bytes.truncate(at % n),
        Mutation::SetLength { frame_start, len } => {
            let at = frame_start % n;
            for (i, byte) in len.to_be_bytes().into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + i) {
                    *slot = byte;
                }
            }
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic_and_always_give_typed_results(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        chunks in proptest::collection::vec(1..32usize, 0..8),
    ) {
        decode_everything(&bytes, &chunks);
    }

    #[test]
    fn random_bodies_behind_valid_length_prefixes_never_panic(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 1..5),
        cut in proptest::option::of(any::<usize>()),
        chunks in proptest::collection::vec(1..32usize, 0..8),
    ) {
        let mut bytes = Vec::new();
        for body in &bodies {
            bytes.extend_from_slice(&raw_frame(body));
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        decode_everything(&bytes, &chunks);
    }

    #[test]
    fn mutated_valid_frames_never_panic_and_always_give_typed_results(
        (stream, _) in valid_stream(),
        mutations in proptest::collection::vec(mutation(), 1..4),
        chunks in proptest::collection::vec(1..32usize, 0..8),
    ) {
        let mut bytes = stream;
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decode_everything(&bytes, &chunks);
    }

    #[test]
    fn arbitrary_agent_messages_round_trip(message in agent_message(), chunks in proptest::collection::vec(1..16usize, 0..4)) {
        let frame = encode_frame(&message, MAX_FRAME_LEN).unwrap();
        let outcomes = run_decoder(&mut ControlSide::default(), &frame, &chunks);
        prop_assert_eq!(outcomes, vec![Outcome::Message(message), Outcome::End]);
    }

    #[test]
    fn arbitrary_control_messages_round_trip(message in control_message(), chunks in proptest::collection::vec(1..16usize, 0..4)) {
        let frame = encode_frame(&message, MAX_FRAME_LEN).unwrap();
        let outcomes = run_decoder(&mut AgentSide::default(), &frame, &chunks);
        prop_assert_eq!(outcomes, vec![Outcome::Message(message), Outcome::End]);
    }

    #[test]
    fn cutting_a_valid_stream_inside_a_frame_is_truncated_and_on_a_boundary_is_a_clean_end(
        (stream, from_agent) in valid_stream(),
        cut in any::<usize>(),
    ) {
        let cut = cut % (stream.len() + 1);
        let outcomes: Vec<String> = if from_agent {
            run_decoder(&mut ControlSide::default(), &stream[..cut], &[]).iter().map(describe).collect()
        } else {
            run_decoder(&mut AgentSide::default(), &stream[..cut], &[]).iter().map(describe).collect()
        };
        let complete = frame_boundaries(&stream).iter().filter(|b| **b != 0 && **b <= cut).count();
        let mut expected = vec!["Message".to_string(); complete];
        if frame_boundaries(&stream).contains(&cut) {
            expected.push("End".into());
        } else {
            expected.push("Truncated".into());
        }
        prop_assert_eq!(outcomes, expected);
    }
}

fn describe<M>(outcome: &Outcome<M>) -> String {
    match outcome {
        Outcome::Message(_) => "Message".into(),
        Outcome::End => "End".into(),
        Outcome::Error(e) => e
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

/// Offsets at which a frame starts (and the stream's end).
fn frame_boundaries(stream: &[u8]) -> Vec<usize> {
    let mut at = 0;
    let mut boundaries = vec![0];
    while at + 4 <= stream.len() {
        let len = u32::from_be_bytes(stream[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
        boundaries.push(at);
    }
    boundaries
}

// ---------------------------------------------------------------------------
// Version negotiation
// ---------------------------------------------------------------------------

/// (peer_min, peer_max, ours_min, ours_max)
type Ranges = (u16, u16, u16, u16);

#[test]
fn negotiate_version_picks_the_highest_common_version() {
    let cases: &[(Ranges, Option<u16>)] = &[
        ((1, 1, 1, 1), Some(1)),
        ((1, 3, 1, 1), Some(1)),
        ((1, 1, 1, 3), Some(1)),
        ((2, 5, 1, 3), Some(3)),
        ((1, 3, 2, 5), Some(3)),
        ((3, 3, 1, 5), Some(3)),
        ((0, u16::MAX, 4, 7), Some(7)),
        ((u16::MAX, u16::MAX, 0, u16::MAX), Some(u16::MAX)),
        ((2, 2, 1, 1), None),
        ((0, 0, 1, 1), None),
        ((5, 9, 1, 4), None),
        ((1, 4, 5, 9), None),
        // A peer announcing an empty range never negotiates.
        ((3, 1, 1, 5), None),
        ((2, 1, 1, 5), None),
    ];
    for &((peer_min, peer_max, ours_min, ours_max), expected) in cases {
        let got = negotiate_version(peer_min, peer_max, ours_min, ours_max);
        match expected {
            Some(version) => assert_eq!(
                got,
                Ok(version),
                "{peer_min}..={peer_max} vs {ours_min}..={ours_max}"
            ),
            None => assert_eq!(
                got,
                Err(VersionError {
                    peer_min,
                    peer_max,
                    ours_min,
                    ours_max
                }),
                "{peer_min}..={peer_max} vs {ours_min}..={ours_max}"
            ),
        }
    }
}

#[test]
fn this_build_negotiates_with_itself() {
    const { assert!(MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION) };
    assert_eq!(
        negotiate_version(
            MIN_PROTOCOL_VERSION,
            PROTOCOL_VERSION,
            MIN_PROTOCOL_VERSION,
            PROTOCOL_VERSION
        ),
        Ok(PROTOCOL_VERSION)
    );
    let err = negotiate_version(
        PROTOCOL_VERSION + 1,
        PROTOCOL_VERSION + 2,
        MIN_PROTOCOL_VERSION,
        PROTOCOL_VERSION,
    )
    .unwrap_err();
    assert!(err.to_string().contains(&format!(
        "{}..={}",
        PROTOCOL_VERSION + 1,
        PROTOCOL_VERSION + 2
    )));
}

proptest! {
    #[test]
    fn negotiated_version_is_the_maximum_of_the_intersection(
        peer_min in 0u16..20, peer_max in 0u16..20, ours_min in 0u16..20, ours_max in 0u16..20,
    ) {
        let common: Vec<u16> = (0u16..20)
            .filter(|v| (peer_min..=peer_max).contains(v) && (ours_min..=ours_max).contains(v))
            .collect();
        let got = negotiate_version(peer_min, peer_max, ours_min, ours_max).ok();
        prop_assert_eq!(got, common.last().copied());
    }
}

// ---------------------------------------------------------------------------
// First-message rules
// ---------------------------------------------------------------------------

#[test]
fn first_message_decides_the_stream_kind_or_the_violation_for_every_peer_and_variant() {
    use AgentMessage as M;
    let enroll = M::Enroll(EnrollRequest {
        token: "t".into(),
        csr_der: vec![],
        facts: HostFacts::default(),
    });
    let hello = M::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "0.1.0".into(),
        facts: HostFacts::default(),
    });
    let heartbeat = M::Heartbeat(Heartbeat { sent_at_unix_ms: 1 });
    let renew = M::RenewCertificate(CertificateRenewalRequest { csr_der: vec![] });
    let metrics = M::MetricsBatch(metrics_batch());
    let health = M::HealthReport(health_report());
    let configured = M::HealthChecksConfigured(HealthChecksConfigured {
        active: vec![],
        rejected: vec![],
    });
    let started = M::CommandStarted { pid: 1 };
    let output = M::CommandOutput {
        stream: OutputStream::Stdout,
        data: vec![1],
    };
    let finished = M::CommandFinished(command_outcomes().remove(0));

    let table: &[(PeerKind, &AgentMessage, Result<StreamKind, Violation>)] = &[
        (
            PeerKind::Unauthenticated,
            &enroll,
            Ok(StreamKind::Enrollment),
        ),
        (
            PeerKind::Unauthenticated,
            &hello,
            Err(Violation::NotEnrolled),
        ),
        (
            PeerKind::Unauthenticated,
            &heartbeat,
            Err(Violation::NotEnrolled),
        ),
        (
            PeerKind::Unauthenticated,
            &renew,
            Err(Violation::NotEnrolled),
        ),
        (PeerKind::Agent, &enroll, Err(Violation::AlreadyEnrolled)),
        (PeerKind::Agent, &hello, Ok(StreamKind::Control)),
        (
            PeerKind::Agent,
            &heartbeat,
            Err(Violation::NotAStreamOpener),
        ),
        (PeerKind::Agent, &renew, Ok(StreamKind::CertificateRenewal)),
        (
            PeerKind::Unauthenticated,
            &metrics,
            Err(Violation::NotEnrolled),
        ),
        (PeerKind::Agent, &metrics, Ok(StreamKind::Metrics)),
        (
            PeerKind::Unauthenticated,
            &health,
            Err(Violation::NotEnrolled),
        ),
        (PeerKind::Agent, &health, Ok(StreamKind::Health)),
        (
            PeerKind::Unauthenticated,
            &configured,
            Err(Violation::NotEnrolled),
        ),
        (
            PeerKind::Agent,
            &configured,
            Err(Violation::NotAStreamOpener),
        ),
        (
            PeerKind::Unauthenticated,
            &started,
            Err(Violation::NotEnrolled),
        ),
        (PeerKind::Agent, &started, Err(Violation::NotAStreamOpener)),
        (
            PeerKind::Unauthenticated,
            &output,
            Err(Violation::NotEnrolled),
        ),
        (PeerKind::Agent, &output, Err(Violation::NotAStreamOpener)),
        (
            PeerKind::Unauthenticated,
            &finished,
            Err(Violation::NotEnrolled),
        ),
        (PeerKind::Agent, &finished, Err(Violation::NotAStreamOpener)),
    ];
    for (peer, first, expected) in table {
        assert_eq!(
            classify_first_message(*peer, first),
            *expected,
            "{peer:?} opening with {}",
            first.kind()
        );
    }
    // The table covers every variant for both peer kinds.
    let mut covered: Vec<_> = table.iter().map(|(_, m, _)| m.kind()).collect();
    covered.sort_unstable();
    covered.dedup();
    assert_eq!(covered.len(), AGENT_VARIANTS);
}

#[test]
fn control_plane_opens_streams_only_with_commands_and_health_configuration() {
    let mut covered = Vec::new();
    for message in control_samples() {
        let expected = match &message {
            ControlMessage::RunCommand(_) => Ok(ControlStreamKind::Command),
            ControlMessage::ConfigureHealthChecks(_) | ControlMessage::RunHealthChecksNow => {
                Ok(ControlStreamKind::HealthConfig)
            }
            _ => Err(Violation::NotAStreamOpener),
        };
        assert_eq!(
            classify_control_opener(&message),
            expected,
            "control plane opening with {}",
            message.kind()
        );
        covered.push(message.kind());
    }
    covered.sort_unstable();
    covered.dedup();
    assert_eq!(covered.len(), CONTROL_VARIANTS);
}

#[test]
fn every_agent_stream_opener_is_answered_on_its_stream_not_a_new_one() {
    // Messages that only answer a control-plane stream never open one.
    for message in agent_samples() {
        if matches!(
            message,
            AgentMessage::HealthChecksConfigured(_)
                | AgentMessage::CommandStarted { .. }
                | AgentMessage::CommandOutput { .. }
                | AgentMessage::CommandFinished(_)
        ) {
            assert_eq!(
                classify_first_message(PeerKind::Agent, &message),
                Err(Violation::NotAStreamOpener)
            );
        }
    }
}

#[test]
fn unauthenticated_peer_may_only_enroll_whatever_the_message() {
    for message in agent_samples() {
        let result = classify_first_message(PeerKind::Unauthenticated, &message);
        match message {
            AgentMessage::Enroll(_) => assert_eq!(result, Ok(StreamKind::Enrollment)),
            _ => assert_eq!(result, Err(Violation::NotEnrolled)),
        }
    }
}

#[test]
fn violations_map_to_their_close_codes() {
    assert_eq!(
        Violation::NotEnrolled.close_code(),
        CloseCode::Unauthenticated
    );
    assert_eq!(
        Violation::AlreadyEnrolled.close_code(),
        CloseCode::ProtocolViolation
    );
    assert_eq!(
        Violation::NotAStreamOpener.close_code(),
        CloseCode::ProtocolViolation
    );
}

// ---------------------------------------------------------------------------
// Close codes
// ---------------------------------------------------------------------------

fn all_close_codes() -> Vec<CloseCode> {
    let all = vec![
        CloseCode::Normal,
        CloseCode::ProtocolViolation,
        CloseCode::Unauthenticated,
        CloseCode::Revoked,
        CloseCode::UnsupportedVersion,
        CloseCode::ShuttingDown,
        CloseCode::CertificateExpired,
        CloseCode::Superseded,
        CloseCode::OrganizationDeleted,
    ];
    // Exhaustive: a new variant must be added to the list above.
    for code in &all {
        match code {
            CloseCode::Normal
            | CloseCode::ProtocolViolation
            | CloseCode::Unauthenticated
            | CloseCode::Revoked
            | CloseCode::UnsupportedVersion
            | CloseCode::ShuttingDown
            | CloseCode::CertificateExpired
            | CloseCode::Superseded
            | CloseCode::OrganizationDeleted => {}
        }
    }
    all
}

#[test]
fn close_code_from_code_round_trips() {
    for code in all_close_codes() {
        assert_eq!(
            CloseCode::from_code(u64::from(code.code())),
            Some(code),
            "{code:?}"
        );
    }
}

#[test]
fn close_codes_keep_their_wire_values() {
    let wire: Vec<u32> = all_close_codes().into_iter().map(CloseCode::code).collect();
    assert_eq!(wire, (0..9).collect::<Vec<u32>>());
}

#[test]
fn unknown_close_codes_map_to_none() {
    for code in [
        9,
        10,
        255,
        0x100,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        u64::MAX,
    ] {
        assert_eq!(CloseCode::from_code(code), None, "{code}");
    }
    let known = (0..1024)
        .filter(|c| CloseCode::from_code(*c).is_some())
        .count();
    assert_eq!(known, all_close_codes().len());
}

#[test]
fn close_code_reasons_are_distinct_and_non_empty() {
    let mut reasons: Vec<_> = all_close_codes()
        .into_iter()
        .map(CloseCode::reason)
        .collect();
    assert!(reasons.iter().all(|r| !r.is_empty()));
    reasons.sort_unstable();
    reasons.dedup();
    assert_eq!(reasons.len(), all_close_codes().len());
}

fn batch_frame(seq: u64) -> AgentMessage {
    AgentMessage::MetricsBatch(MetricsBatch {
        seq,
        ..metrics_batch()
    })
}

#[test]
fn metrics_stream_takes_up_to_its_limit_of_batches_in_increasing_seq() {
    let mut rules = MetricsStreamRules::new(10);
    for seq in 11..10 + MAX_BATCHES_PER_STREAM as u64 {
        assert_eq!(
            rules.accept(batch_frame(seq), 1_000).map(|b| b.seq),
            Ok(seq),
            "batch {seq}"
        );
    }
    assert_eq!(
        rules
            .accept(batch_frame(10 + MAX_BATCHES_PER_STREAM as u64), 1_000)
            .map(|b| b.seq),
        Err(MetricsStreamViolation::TooManyBatches)
    );
}

#[test]
fn metrics_stream_refuses_repeated_or_earlier_seqs_and_other_messages() {
    let mut rules = MetricsStreamRules::new(5);
    assert_eq!(
        rules.accept(batch_frame(5), 1_000).map(|b| b.seq),
        Err(MetricsStreamViolation::OutOfOrder {
            previous: 5,
            next: 5
        })
    );
    assert_eq!(
        rules.accept(batch_frame(3), 1_000).map(|b| b.seq),
        Err(MetricsStreamViolation::OutOfOrder {
            previous: 5,
            next: 3
        })
    );
    // Gaps are fine: batches dropped from a full spool leave them.
    assert_eq!(rules.accept(batch_frame(9), 1_000).map(|b| b.seq), Ok(9));
    for message in agent_samples() {
        if !matches!(message, AgentMessage::MetricsBatch(_)) {
            let name = message.kind();
            assert_eq!(
                rules.accept(message, 1_000),
                Err(MetricsStreamViolation::NotABatch),
                "{name}"
            );
        }
    }
}

#[test]
fn metrics_stream_of_several_batches_stays_within_its_byte_bound() {
    let mut rules = MetricsStreamRules::new(1);
    assert_eq!(
        rules
            .accept(batch_frame(2), MAX_METRICS_STREAM_BYTES)
            .map(|b| b.seq),
        Ok(2)
    );
    assert_eq!(
        rules
            .accept(batch_frame(3), MAX_METRICS_STREAM_BYTES + 1)
            .map(|b| b.seq),
        Err(MetricsStreamViolation::TooManyBytes)
    );
}

#[test]
fn codec_counts_the_body_bytes_it_decoded() {
    let mut codec = ControlSide::default();
    let mut buf = BytesMut::new();
    let mut bodies = 0;
    for seq in [1, 2] {
        let frame = encode_frame(&batch_frame(seq), MAX_FRAME_LEN).unwrap();
        bodies += frame.len() as u64 - 4;
        buf.extend_from_slice(&frame);
    }
    assert_eq!(codec.decoded_bytes(), 0);
    assert!(codec.decode(&mut buf).unwrap().is_some());
    assert!(codec.decode(&mut buf).unwrap().is_some());
    assert_eq!(codec.decoded_bytes(), bodies);
}
