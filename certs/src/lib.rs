//! Tether PKI: each control plane's certificate authority, agent identities,
//! CSR signing and the rustls configurations both ends of a QUIC connection use.
//!
//! This crate owns certificates and keys as values. It never touches a
//! database or a socket: callers store what it produces (the CA key sealed,
//! agent keys in the state dir) and feed the configurations to quinn.
//!
//! * [`authority`] — the CA: generate, load, issue the control plane's server
//!   certificate, sign agent CSRs (overwriting everything the CSR asked for).
//! * [`identity`] — `tether://<branch>/server/<id>` agent identities,
//!   `tether://<issuer>/branch/<peer>` branch identities, fingerprints,
//!   and what a certificate says about itself.
//! * [`agent_key`] — the agent's P-256 key and its CSRs.
//! * [`tls`] — rustls server and client configurations, including the
//!   verifier that pins the CA by its SHA-256 fingerprint.

pub mod agent_key;
pub mod authority;
pub mod identity;
pub mod tls;

pub use agent_key::AgentKey;
pub use authority::{CertificateAuthority, IssuedCertificate, ServerCertificate};
pub use identity::{AgentIdentity, BranchIdentity, CaFingerprint, CertificateInfo};
pub use tls::{
    agent_client_config, branch_client_config, control_plane_server_config, crypto_provider,
    install_crypto_provider,
};

/// Everything that can go wrong handling certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
    #[error("certificate signing request is invalid: {0}")]
    InvalidCsr(String),
    #[error("certificate is not valid X.509: {0}")]
    InvalidCertificate(String),
    #[error("PEM input is invalid: {0}")]
    InvalidPem(String),
    #[error("CA fingerprint {0:?} is not of the form sha256:<64 hex digits>")]
    InvalidFingerprint(String),
    #[error("identity {0:?} is not of the form tether://<branch-id>/server/<server-id>")]
    InvalidIdentity(String),
    #[error("certificate carries no tether identity")]
    MissingIdentity,
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier could not be built: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}
