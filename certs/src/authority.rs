//! A control plane's certificate authority.
//!
//! It issues two kinds of certificates: the control plane's own QUIC server
//! certificate (server auth, fixed name [`tether_protocol::CONTROL_PLANE_SERVER_NAME`]
//! plus whatever addresses it is reached at) and agent certificates
//! (client auth only, identity in a SAN URI). Signing an agent CSR keeps only
//! its public key: names, CA flag, key usages and validity are the CA's choice.

use std::net::IpAddr;
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;

use crate::identity::{AgentIdentity, BranchIdentity, CaFingerprint, CertificateInfo};
use crate::CertError;

/// How long a CA certificate lasts.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Back-dating of issued certificates, to absorb clock skew between hosts.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// A CA certificate and its signing key.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A certificate issued to an agent.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub der: CertificateDer<'static>,
    pub info: CertificateInfo,
}

/// The control plane's QUIC server certificate and key.
pub struct ServerCertificate {
    pub cert_pem: String,
    /// PKCS#8 PEM. A secret.
    pub key_pem: String,
}

impl CertificateAuthority {
    /// A new P-256 CA named after the branch it belongs to.
    pub fn generate(branch_name: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Tether CA {branch_name}"));
        dn.push(DnType::OrganizationName, "Tether");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(Self {
            cert_der,
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::InvalidPem(e.to_string()))?;
        let cert_der = pem_to_der(cert_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            cert_der,
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM. A secret: seal it before storing.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// What agents pin.
    pub fn fingerprint(&self) -> CaFingerprint {
        CaFingerprint::of_der(&self.cert_der)
    }

    /// Issues the control plane's QUIC server certificate. `names` are extra
    /// DNS names or IP addresses it is reached at.
    pub fn issue_server_certificate(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<ServerCertificate, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            tether_protocol::CONTROL_PLANE_SERVER_NAME,
        );
        params.distinguished_name = dn;
        let mut sans = vec![dns_san(tether_protocol::CONTROL_PLANE_SERVER_NAME)?];
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => dns_san(name)?,
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + lifetime;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs an agent's CSR for `identity`. Only the CSR's public key is kept;
    /// the CSR's signature must verify and its key must be ECDSA P-256.
    pub fn sign_agent_csr(
        &self,
        csr_der: &[u8],
        identity: &AgentIdentity,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, CertError> {
        // The identity must read back from the certificate as given, or the
        // agent would hold a certificate no control plane can attribute.
        let uri = identity.uri();
        if AgentIdentity::from_uri(&uri).ok().as_ref() != Some(identity) {
            return Err(CertError::InvalidIdentity(uri));
        }
        self.sign_client_csr(
            csr_der,
            uri,
            &identity.server_id,
            &identity.branch_id,
            lifetime,
        )
    }

    /// Signs a peer branch's CSR: a client-auth certificate whose SAN URI is
    /// the [`BranchIdentity`] (`tether://<this-branch>/branch/<peer>`).
    /// Like agent CSRs, only the public key of the CSR is used.
    pub fn sign_branch_csr(
        &self,
        csr_der: &[u8],
        identity: &BranchIdentity,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, CertError> {
        let uri = identity.uri();
        if BranchIdentity::from_uri(&uri).ok().as_ref() != Some(identity) {
            return Err(CertError::InvalidIdentity(uri));
        }
        Ok(self
            .sign_client_csr(
                csr_der,
                uri,
                &identity.peer_branch,
                &identity.issuer_branch,
                lifetime,
            )?
            .der)
    }

    fn sign_client_csr(
        &self,
        csr_der: &[u8],
        uri: String,
        common_name: &str,
        unit: &str,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, CertError> {
        let public_key = csr_public_key(csr_der)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name.to_string());
        dn.push(DnType::OrganizationalUnitName, unit.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| CertError::InvalidIdentity(uri))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE.min(lifetime);
        params.not_after = now + lifetime;
        let cert = params.signed_by(&public_key, &self.issuer)?;
        let der = cert.der().clone();
        let info = CertificateInfo::from_der(&der)?;
        Ok(IssuedCertificate { der, info })
    }
}

/// The public key of a CSR whose self-signature verifies, if it is ECDSA P-256.
/// Nothing else in the CSR is read.
///
/// The key type comes from the CSR's SubjectPublicKeyInfo. rcgen's
/// `CertificateSigningRequestParams` infers it from the *signature* algorithm
/// instead, so a P-384 key signed with ecdsa-with-SHA256 (OpenSSL's default)
/// passed for P-256 and was certified under the P-256 curve OID; its parser
/// also refused CSRs carrying extensions it does not model, which are ignored
/// here anyway.
fn csr_public_key(csr_der: &[u8]) -> Result<SubjectPublicKeyInfo, CertError> {
    use x509_parser::prelude::FromDer;
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CertError::InvalidCsr(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CertError::InvalidCsr(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    csr.verify_signature()
        .map_err(|e| CertError::InvalidCsr(format!("signature does not verify: {e}")))?;
    let not_p256 = || CertError::InvalidCsr("key must be ECDSA P-256".into());
    let key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| not_p256())?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(not_p256());
    }
    Ok(key)
}

/// Parses the first certificate of a PEM document.
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, CertError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::InvalidPem(e.to_string()))
}

/// Parses every certificate of a PEM document, in order.
pub fn pem_to_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    use rustls_pki_types::pem::PemObject;
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::InvalidPem(e.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::InvalidPem("no certificate found".into()));
    }
    Ok(chain)
}

/// Encodes DER certificates as one PEM document.
pub fn chain_to_pem(chain: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = chain
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.to_vec()))
        .collect();
    pem::encode_many(&blocks)
}

/// Parses a PKCS#8 PEM private key.
pub fn pem_to_private_key(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    use rustls_pki_types::pem::PemObject;
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map(PrivateKeyDer::Pkcs8)
        .map_err(|e| CertError::InvalidPem(e.to_string()))
}

fn dns_san(name: &str) -> Result<SanType, CertError> {
    Ok(SanType::DnsName(name.to_string().try_into().map_err(
        |_| CertError::InvalidIdentity(name.to_string()),
    )?))
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}
