//! Enrollment: trade a one-time bootstrap token and a CSR for a certificate
//! over a QUIC connection without client certificate, the control plane
//! pinned by its CA fingerprint. Nothing is written to the state dir unless
//! the control plane granted a certificate that checks out.

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tether_certs::{agent_client_config, AgentKey, CaFingerprint, CertError, CertificateInfo};
use tether_protocol::{
    AgentMessage, CloseCode, ControlMessage, EnrollRejection, EnrollRequest, HostFacts,
};
use tether_transport::{AgentStream, TransportError};

use crate::config::{Bootstrap, BootstrapToken};
use crate::dial::{dial, DialError};
use crate::state::{CredentialError, Credentials, Identity, StateDir, StateError};

/// How long the control plane may take to answer an enrollment.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to enroll.
#[derive(Debug, Clone)]
pub struct EnrollParams {
    /// Control plane QUIC address, `host:port`.
    pub server: String,
    pub ca_fingerprint: CaFingerprint,
    pub token: BootstrapToken,
}

impl From<Bootstrap> for EnrollParams {
    fn from(b: Bootstrap) -> Self {
        Self {
            server: b.server,
            ca_fingerprint: b.ca_fingerprint,
            token: b.token,
        }
    }
}

/// The outcome of a successful enrollment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub identity: Identity,
    pub certificate: CertificateInfo,
}

/// Why enrollment failed. Each message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Dial(DialError),
    #[error("enrollment failed: {0}")]
    Transport(TransportError),
    #[error("enrollment failed: the control plane closed the connection: {0}")]
    Closed(&'static str),
    #[error("enrollment failed: the control plane did not answer within {}s", ANSWER_TIMEOUT.as_secs())]
    Timeout,
    #[error("enrollment refused: {0}")]
    Rejected(EnrollRejection),
    #[error("enrollment failed: the control plane answered with an unexpected message")]
    UnexpectedAnswer,
    #[error("enrollment failed: the control plane granted an unusable certificate: {0}")]
    InvalidGrant(String),
    #[error("enrollment failed: cannot make a key or CSR: {0}")]
    Key(CertError),
    #[error("enrollment failed: {0}")]
    State(StateError),
}

impl EnrollError {
    /// True when trying again with the same token and configuration cannot
    /// succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Rejected(reason) => !matches!(
                reason,
                EnrollRejection::Internal
                    | EnrollRejection::QuotaExceeded(_)
                    | EnrollRejection::RateLimited { .. }
            ),
            Self::Key(_) | Self::State(_) => true,
            _ => false,
        }
    }
}

/// Enrolls with the control plane and stores the identity in `state`.
pub async fn enroll(
    state: &StateDir,
    params: &EnrollParams,
    facts: HostFacts,
) -> Result<Enrolled, EnrollError> {
    // Spend the one-time token only if the result can be stored.
    state.prepare().map_err(EnrollError::State)?;
    let key = AgentKey::generate().map_err(EnrollError::Key)?;
    let csr_der = key.csr_der(&facts.hostname).map_err(EnrollError::Key)?;
    let tls = agent_client_config(params.ca_fingerprint, None).map_err(EnrollError::Key)?;
    let dialed = dial(&params.server, tls).await.map_err(EnrollError::Dial)?;
    tracing::debug!(addr = %dialed.addr, "connected to the control plane, enrolling");

    let request = AgentMessage::Enroll(EnrollRequest {
        token: params.token.expose().to_string(),
        csr_der,
        facts,
    });
    let answer = async {
        let mut stream = AgentStream::open(&dialed.connection).await?;
        let answer = stream.request(&request).await?;
        let _ = stream.finish();
        Ok::<_, TransportError>(answer)
    };
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, answer).await;
    let outcome = match answer {
        Ok(Ok(answer)) => accept_answer(state, params, key, answer),
        Ok(Err(err)) => Err(match dialed.connection.close_reason() {
            Some(reason) => match tether_transport::close_code_of(&reason) {
                Some(code) => EnrollError::Closed(code.reason()),
                None => EnrollError::Transport(err),
            },
            None => EnrollError::Transport(err),
        }),
        Err(_) => Err(EnrollError::Timeout),
    };
    dialed.close(CloseCode::Normal).await;
    outcome
}

/// Turns the control plane's answer into a stored identity, or an error that
/// leaves the state dir as it was.
fn accept_answer(
    state: &StateDir,
    params: &EnrollParams,
    key: AgentKey,
    answer: ControlMessage,
) -> Result<Enrolled, EnrollError> {
    let grant = match answer {
        ControlMessage::Enrolled(grant) => grant,
        ControlMessage::EnrollRejected(reason) => return Err(EnrollError::Rejected(reason)),
        _ => return Err(EnrollError::UnexpectedAnswer),
    };
    let credentials = verify_chain(
        key,
        grant.chain.certificates_der,
        params.ca_fingerprint,
        &grant.server_id,
        &grant.branch_id,
    )
    .map_err(|err| EnrollError::InvalidGrant(err.to_string()))?;
    let identity = Identity {
        server_id: grant.server_id,
        branch_id: grant.branch_id,
        server: params.server.clone(),
        ca_fingerprint: params.ca_fingerprint,
    };
    state
        .save_identity(&identity, &credentials)
        .map_err(EnrollError::State)?;
    Ok(Enrolled {
        identity,
        certificate: credentials.certificate,
    })
}

/// Checks a chain the control plane granted (at enrollment or renewal) for
/// `key`: pinned CA last, leaf naming `server_id` in `branch_id`, matching the
/// key. Validity dates are the control plane's business: refusing a fresh
/// grant over a skewed local clock would only waste a one-time token.
pub fn verify_chain(
    key: AgentKey,
    chain: Vec<Vec<u8>>,
    pin: CaFingerprint,
    server_id: &str,
    branch_id: &str,
) -> Result<Credentials, CredentialError> {
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    Credentials::new(key, chain, pin, server_id, branch_id)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tether_certs::{AgentIdentity, CertificateAuthority};
    use tether_protocol::{CertificateChain, EnrollmentGrant};

    use super::*;

    fn params(ca: &CertificateAuthority) -> EnrollParams {
        EnrollParams {
            server: "cp.example.com:7443".into(),
            ca_fingerprint: ca.fingerprint(),
            token: "t0ken".parse().unwrap(),
        }
    }

    fn grant(ca: &CertificateAuthority, key: &AgentKey, server_id: &str) -> ControlMessage {
        let cert = ca
            .sign_agent_csr(
                &key.csr_der("host").unwrap(),
                &AgentIdentity::new("b1", server_id),
                Duration::from_secs(3600),
            )
            .unwrap();
        ControlMessage::Enrolled(EnrollmentGrant {
            server_id: "s1".into(),
            branch_id: "b1".into(),
            chain: CertificateChain {
                certificates_der: vec![cert.der.to_vec(), ca.cert_der().to_vec()],
            },
        })
    }

    fn is_empty(dir: &std::path::Path) -> bool {
        std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    }

    #[test]
    fn rejected_enrollment_leaves_no_files_and_says_why_in_one_line() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path().join("state"));
        state.prepare().unwrap();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let answer = ControlMessage::EnrollRejected(EnrollRejection::TokenAlreadyUsed);
        let err =
            accept_answer(&state, &params(&ca), AgentKey::generate().unwrap(), answer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "enrollment refused: enrollment token has already been used"
        );
        assert!(err.is_permanent());
        assert!(is_empty(state.path()));
        assert!(state.load().unwrap().is_none());
    }

    #[test]
    fn grant_from_another_ca_or_for_another_server_leaves_no_files() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path());
        let ca = CertificateAuthority::generate("b1").unwrap();
        let rogue = CertificateAuthority::generate("b1").unwrap();

        let key = AgentKey::generate().unwrap();
        let answer = grant(&rogue, &key, "s1");
        let err = accept_answer(&state, &params(&ca), key, answer).unwrap_err();
        assert!(matches!(err, EnrollError::InvalidGrant(_)), "{err}");

        let key = AgentKey::generate().unwrap();
        let answer = grant(&ca, &key, "someone-else");
        let err = accept_answer(&state, &params(&ca), key, answer).unwrap_err();
        assert!(err.to_string().contains("someone-else"), "{err}");

        let key = AgentKey::generate().unwrap();
        let answer = grant(&ca, &AgentKey::generate().unwrap(), "s1");
        let err = accept_answer(&state, &params(&ca), key, answer).unwrap_err();
        assert!(
            err.to_string().contains("does not match the agent key"),
            "{err}"
        );
        assert!(is_empty(state.path()));
    }

    #[test]
    fn valid_grant_is_stored_and_loads_back() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path());
        let ca = CertificateAuthority::generate("b1").unwrap();
        let key = AgentKey::generate().unwrap();
        let answer = grant(&ca, &key, "s1");
        let enrolled = accept_answer(&state, &params(&ca), key, answer).unwrap();
        assert_eq!(enrolled.identity.server_id, "s1");
        let loaded = state.load().unwrap().unwrap();
        assert_eq!(loaded.identity, enrolled.identity);
        assert_eq!(loaded.identity.server, "cp.example.com:7443");
    }

    #[test]
    fn transient_refusals_are_retryable() {
        assert!(!EnrollError::Rejected(EnrollRejection::Internal).is_permanent());
        assert!(!EnrollError::Timeout.is_permanent());
        assert!(EnrollError::Rejected(EnrollRejection::ExpiredToken).is_permanent());
    }

    #[tokio::test]
    async fn unwritable_state_dir_fails_before_contacting_anyone() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let mut p = params(&ca);
        p.server = "unresolvable.invalid:7443".into();
        let err = enroll(&StateDir::new(file.join("state")), &p, HostFacts::default())
            .await
            .unwrap_err();
        assert!(matches!(err, EnrollError::State(_)), "{err}");
    }
}
