//! rustls configurations for both ends of a Tether QUIC connection.
//!
//! One crypto provider (ring) is used everywhere and installed explicitly:
//! with both ring and aws-lc-rs linked, rustls cannot pick a default and
//! panics at start.
//!
//! * The control plane asks for a client certificate but accepts connections
//!   without one ([`control_plane_server_config`]); such a connection may only
//!   enroll, which the gateway enforces.
//! * Agents trust exactly one CA, named by its SHA-256 fingerprint
//!   ([`agent_client_config`]): before enrollment they do not have the CA
//!   certificate yet, so the verifier finds it in the chain the control plane
//!   presents, checks its fingerprint, and verifies the chain against it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::identity::CaFingerprint;
use crate::CertError;

/// The crypto provider every Tether TLS configuration uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`crypto_provider`] as the process default. Call once at start;
/// calling again is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn alpn() -> Vec<Vec<u8>> {
    vec![tether_protocol::ALPN.to_vec()]
}

/// The control plane serves agents (`tether/1`) and peer branches
/// (`tether-branch/1`) on one endpoint; the negotiated ALPN says which.
fn server_alpn() -> Vec<Vec<u8>> {
    vec![
        tether_protocol::ALPN.to_vec(),
        tether_protocol::BRANCH_ALPN.to_vec(),
    ]
}

/// A branch's client configuration for dialing a peer branch: ALPN
/// `tether-branch/1`, the peer's CA pinned by fingerprint, and the branch
/// certificate the peer issued (`None` while joining with an invite).
pub fn branch_client_config(
    pin: CaFingerprint,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, CertError> {
    let mut config = agent_client_config(pin, client_auth)?;
    config.alpn_protocols = vec![tether_protocol::BRANCH_ALPN.to_vec()];
    Ok(config)
}

/// The control plane's server configuration: TLS 1.3, ALPN `tether/1`,
/// optional client certificates issued by `ca`.
pub fn control_plane_server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, CertError> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = server_alpn();
    Ok(config)
}

/// An agent's client configuration: the control plane must present a chain
/// ending in the CA named by `pin`; `client_auth` is the agent's certificate
/// chain and key once enrolled, `None` while enrolling.
///
/// Of the chain only the leaf is presented: the CA signs every certificate
/// it issues directly and the side that verifies it (the control plane, or
/// the peer branch that issued a branch certificate) already holds that CA,
/// so sending the CA too would only add ~500 bytes to every handshake and to
/// what the control plane keeps for every connected agent (rustls holds the
/// peer's certificates for the life of a connection).
pub fn agent_client_config(
    pin: CaFingerprint,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, CertError> {
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_auth {
        Some((mut chain, key)) => {
            chain.truncate(1);
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn();
    Ok(config)
}

/// Verifies a server chain against the CA whose fingerprint is pinned. The CA
/// certificate is taken from the presented chain; nothing else is trusted.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|der| self.pin.matches(der))
            .ok_or_else(|| {
                tracing::warn!(pin = %self.pin, "control plane presented no certificate from the pinned CA");
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
