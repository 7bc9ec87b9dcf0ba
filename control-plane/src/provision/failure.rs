//! Whether a failed terraform run is worth retrying.
//!
//! Owns [`FailureKind`] and [`classify`]: from the error diagnostics
//! terraform printed (`-json` lines with `"type":"diagnostic"`, their
//! `summary` and `detail`; or its plain stderr for commands without
//! `-json`), a failure is [`FailureKind::Transient`] (rate limits,
//! timeouts, connection resets and refusals, 5xx answers of a provider's
//! API, a held state lock) or [`FailureKind::Permanent`] (everything else:
//! authentication, invalid arguments, quotas at the provider, unsupported
//! requests...). A failure is transient only when every error diagnostic
//! is: one permanent error makes a retry pointless. The job
//! (`provision::job`) retries transient failures with backoff.

use std::fmt;

use serde::Serialize;

/// Why a failure is transient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransientReason {
    /// 429, `Rate exceeded`, `RequestLimitExceeded`, `Throttling`, ...
    RateLimit,
    /// `timeout`, `i/o timeout`, `context deadline exceeded`, ...
    Timeout,
    /// `connection reset`, `connection refused`, `broken pipe`, DNS
    /// resolution failing for now.
    Connection,
    /// 500/502/503/504 from a provider's API, `Service Unavailable`,
    /// `InternalError`.
    ServerError,
    /// `Error acquiring the state lock`: another run holds it.
    StateLock,
}

impl TransientReason {
    /// The name used in deployment events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::ServerError => "server_error",
            Self::StateLock => "state_lock",
        }
    }
}

impl fmt::Display for TransientReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of failure a terraform run ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// May succeed if run again later.
    Transient(TransientReason),
    /// Will fail again: fail the deployment at once.
    Permanent,
}

impl FailureKind {
    /// Whether a retry may help.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// Words that make an error permanent even when it also looks transient
/// (lowercase). `limitexceeded` and `limit exceeded` are quotas at the
/// provider (`InstanceLimitExceeded`, `VcpuLimitExceeded`, Hetzner's
/// `resource_limit_exceeded`), except AWS's `RequestLimitExceeded`, a rate
/// limit, which is taken out first ([`RATE_LIMIT_PHRASES`]).
const PERMANENT: &[&str] = &[
    "quota",
    "limitexceeded",
    "limit exceeded",
    "limit_exceeded",
    "authfailure",
    "unauthorized",
    "unauthenticated",
    "forbidden",
    "access denied",
    "accessdenied",
    "permission denied",
    "invalid credentials",
    "invalid token",
    "unable to authenticate",
    "invalidparameter",
    "invalid value",
    "invalid argument",
    "unsupported",
    "not supported",
];

/// Rate limits worded like quotas, taken out before [`PERMANENT`] is
/// looked for.
const RATE_LIMIT_PHRASES: &[&str] = &[
    "requestlimitexceeded",
    "request limit exceeded",
    "rate limit exceeded",
    "rate_limit_exceeded",
];

/// Transient markers (lowercase), with their reason.
const TRANSIENT: &[(&str, TransientReason)] = &[
    ("requestlimitexceeded", TransientReason::RateLimit),
    ("rate exceeded", TransientReason::RateLimit),
    ("rate limit", TransientReason::RateLimit),
    ("ratelimit", TransientReason::RateLimit),
    ("throttl", TransientReason::RateLimit),
    ("too many requests", TransientReason::RateLimit),
    ("toomanyrequests", TransientReason::RateLimit),
    ("slowdown", TransientReason::RateLimit),
    ("error acquiring the state lock", TransientReason::StateLock),
    ("state lock", TransientReason::StateLock),
    ("context deadline exceeded", TransientReason::Timeout),
    ("timeout", TransientReason::Timeout),
    ("timed out", TransientReason::Timeout),
    ("connection reset", TransientReason::Connection),
    ("connection refused", TransientReason::Connection),
    ("broken pipe", TransientReason::Connection),
    (
        "temporary failure in name resolution",
        TransientReason::Connection,
    ),
    ("unexpected eof", TransientReason::Connection),
    ("service unavailable", TransientReason::ServerError),
    ("serviceunavailable", TransientReason::ServerError),
    ("bad gateway", TransientReason::ServerError),
    ("internal server error", TransientReason::ServerError),
    ("internalerror", TransientReason::ServerError),
    ("internal error", TransientReason::ServerError),
    ("try again later", TransientReason::ServerError),
];

/// HTTP status codes that are transient when they stand alone (not inside
/// a longer number or identifier).
const TRANSIENT_STATUSES: &[(&str, TransientReason)] = &[
    ("429", TransientReason::RateLimit),
    ("500", TransientReason::ServerError),
    ("502", TransientReason::ServerError),
    ("503", TransientReason::ServerError),
    ("504", TransientReason::ServerError),
];

/// Whether `needle` occurs in `haystack` with no letter or digit right
/// before or after it.
fn standalone(haystack: &str, needle: &str) -> bool {
    let bytes = haystack.as_bytes();
    let mut from = 0;
    while let Some(at) = haystack[from..].find(needle) {
        let start = from + at;
        let end = start + needle.len();
        let before = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        let after = end == bytes.len() || !bytes[end].is_ascii_alphanumeric();
        if before && after {
            return true;
        }
        from = end;
    }
    false
}

/// The kind of one error diagnostic (its summary and detail, or one block
/// of plain error output).
pub fn classify_text(text: &str) -> FailureKind {
    // Terraform wraps plain output at 78 columns: a phrase may span lines.
    let lower = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let mut without_rate_limit = lower.clone();
    for phrase in RATE_LIMIT_PHRASES {
        without_rate_limit = without_rate_limit.replace(phrase, "");
    }
    if PERMANENT
        .iter()
        .any(|word| without_rate_limit.contains(word))
    {
        return FailureKind::Permanent;
    }
    if let Some((_, reason)) = TRANSIENT.iter().find(|(word, _)| lower.contains(word)) {
        return FailureKind::Transient(*reason);
    }
    if let Some((_, reason)) = TRANSIENT_STATUSES
        .iter()
        .find(|(status, _)| standalone(&lower, status))
    {
        return FailureKind::Transient(*reason);
    }
    FailureKind::Permanent
}

/// The kind of a failed run from its error diagnostics: transient only when
/// there is at least one and every one is transient (the reason is the
/// first one's).
pub fn classify<'a>(diagnostics: impl IntoIterator<Item = &'a str>) -> FailureKind {
    let mut first = None;
    for diagnostic in diagnostics {
        match classify_text(diagnostic) {
            FailureKind::Permanent => return FailureKind::Permanent,
            FailureKind::Transient(reason) => {
                first.get_or_insert(reason);
            }
        }
    }
    first.map_or(FailureKind::Permanent, FailureKind::Transient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::runner::TerraformEvent;

    /// The "summary: detail" text of an error diagnostic line, as the runner
    /// keeps it.
    fn diagnostic(line: &str) -> String {
        match TerraformEvent::from_json_line(line) {
            Some(TerraformEvent::Diagnostic {
                severity,
                summary,
                detail,
            }) => {
                assert_eq!(severity, "error");
                format!("{summary}: {detail}")
            }
            other => panic!("not a diagnostic: {other:?}"),
        }
    }

    fn kind(line: &str) -> FailureKind {
        classify([diagnostic(line).as_str()])
    }

    #[test]
    fn rate_limits_from_provider_apis_are_transient() {
        for line in [
            r#"{"@level":"error","@message":"Error: creating EC2 Instance: operation error EC2: RunInstances, https response error StatusCode: 503, RequestID: 1f2e, api error RequestLimitExceeded: Request limit exceeded.","@module":"terraform.ui","type":"diagnostic","diagnostic":{"severity":"error","summary":"creating EC2 Instance: operation error EC2: RunInstances, https response error StatusCode: 503, RequestID: 1f2e, api error RequestLimitExceeded: Request limit exceeded.","detail":"","address":"module.server.aws_instance.server"}}"#,
            r#"{"@level":"error","@message":"Error: Error creating droplet: POST https://api.digitalocean.com/v2/droplets: 429 Too Many Requests","type":"diagnostic","diagnostic":{"severity":"error","summary":"Error creating droplet: POST https://api.digitalocean.com/v2/droplets: 429 Too Many Requests","detail":""}}"#,
            r#"{"@level":"error","@message":"Error: local-exec provisioner error","type":"diagnostic","diagnostic":{"severity":"error","summary":"local-exec provisioner error","detail":"Error running command '/bin/sh x': exit status 1. Output: Error: creating server: 429 Too Many Requests: Rate exceeded\n"}}"#,
            r#"{"@level":"error","@message":"Error: ThrottlingException","type":"diagnostic","diagnostic":{"severity":"error","summary":"describing security groups","detail":"ThrottlingException: Rate exceeded, status code: 400"}}"#,
            r#"{"@level":"error","@message":"Error: hcloud","type":"diagnostic","diagnostic":{"severity":"error","summary":"rate limit exceeded (rate_limit_exceeded)","detail":""}}"#,
        ] {
            assert_eq!(
                kind(line),
                FailureKind::Transient(TransientReason::RateLimit),
                "{line}"
            );
        }
    }

    #[test]
    fn timeouts_connection_errors_and_server_errors_are_transient() {
        let cases = [
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Error creating instance","detail":"Post \"https://compute.googleapis.com/compute/v1/projects/p/zones/z/instances\": dial tcp 142.250.1.95:443: i/o timeout"}}"#,
                TransientReason::Timeout,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"waiting for droplet","detail":"context deadline exceeded"}}"#,
                TransientReason::Timeout,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Failed to query available provider packages","detail":"net/http: TLS handshake timeout"}}"#,
                TransientReason::Timeout,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"reading firewall","detail":"read tcp 10.0.0.2:51234->1.2.3.4:443: read: connection reset by peer"}}"#,
                TransientReason::Connection,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Error retrieving state","detail":"Post \"http://127.0.0.1:8080/terraform/state/x\": dial tcp 127.0.0.1:8080: connect: connection refused"}}"#,
                TransientReason::Connection,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Error creating server","detail":"hcloud: 503 Service Unavailable"}}"#,
                TransientReason::ServerError,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"creating VM","detail":"Code=\"InternalError\" Message=\"An internal execution error occurred.\""}}"#,
                TransientReason::ServerError,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"creating droplet","detail":"POST https://api.digitalocean.com/v2/droplets: 502"}}"#,
                TransientReason::ServerError,
            ),
            (
                r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Error acquiring the state lock","detail":"Error message: HTTP remote state already locked: ID=8d1b"}}"#,
                TransientReason::StateLock,
            ),
        ];
        for (line, reason) in cases {
            assert_eq!(kind(line), FailureKind::Transient(reason), "{line}");
        }
    }

    #[test]
    fn auth_errors_invalid_arguments_quotas_and_the_rest_are_permanent() {
        for line in [
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"creating EC2 Instance: AuthFailure: AWS was not able to validate the provided access credentials","detail":"status code: 401"}}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Error creating droplet","detail":"POST https://api.digitalocean.com/v2/droplets: 401 Unable to authenticate you"}}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Invalid value for input variable","detail":"The given value is not suitable for var.disk_size_gb declared at module/variables.tf:21,1-24: a number is required."}}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"creating EC2 Instance","detail":"VcpuLimitExceeded: You have requested more vCPU capacity than your current vCPU limit of 32 allows"}}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Error creating instance","detail":"googleapi: Error 403: Quota 'CPUS' exceeded. Limit: 24.0 in region europe-west1., quotaExceeded"}}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"server limit exceeded (resource_limit_exceeded)","detail":""}}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"Unsupported argument","detail":"An argument named \"nope\" is not expected here."}}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"local-exec provisioner error","detail":"Error running command 'boot.sh': exit status 1. Output: tether-bootstrap: checksum mismatch"}}"#,
            // A timeout next to an authentication error: retrying cannot help.
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"403 Forbidden","detail":"after a timeout"}}"#,
            // A number that merely contains 503.
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"image ami-05031234 not found","detail":""}}"#,
        ] {
            assert_eq!(kind(line), FailureKind::Permanent, "{line}");
        }
    }

    #[test]
    fn one_permanent_error_makes_the_whole_failure_permanent() {
        assert_eq!(
            classify(["429 Too Many Requests", "Unsupported argument"]),
            FailureKind::Permanent
        );
        assert_eq!(
            classify(["i/o timeout", "503 Service Unavailable"]),
            FailureKind::Transient(TransientReason::Timeout)
        );
        assert_eq!(classify([]), FailureKind::Permanent);
    }

    #[test]
    fn plain_error_output_of_commands_without_json_is_classified_too() {
        let init_output = "Error: Failed to query available provider packages\n\nCould not retrieve the list of available versions for provider hashicorp/aws: could not connect to registry.terraform.io: Failed to request discovery document: Get \"https://registry.terraform.io/.well-known/terraform.json\": net/http: TLS handshake timeout";
        assert_eq!(
            classify_text(init_output),
            FailureKind::Transient(TransientReason::Timeout)
        );
        assert_eq!(
            classify_text("Error: Module not installed"),
            FailureKind::Permanent
        );
        // Wrapped at 78 columns, as terraform prints without -json.
        assert_eq!(
            classify_text("Error: Failed to install provider\n\nread tcp 10.0.0.2:40112->1.2.3.4:443: read: connection\nreset by peer"),
            FailureKind::Transient(TransientReason::Connection)
        );
        // What an offline init says: not worth retrying.
        assert_eq!(
            classify_text("could not connect to registry.terraform.io: failed to\nrequest discovery document: Get\n\"https://registry.terraform.io/.well-known/terraform.json\": dial tcp: lookup\nregistry.terraform.io on 10.255.255.53:53: no such host"),
            FailureKind::Permanent
        );
    }
}
