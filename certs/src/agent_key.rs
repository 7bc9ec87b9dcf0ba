//! The agent's private key (ECDSA P-256) and the CSRs made from it.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::CertError;

/// An agent's key pair. The private half never leaves the agent's state dir.
pub struct AgentKey {
    key: KeyPair,
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(<private>)")
    }
}

impl AgentKey {
    /// A fresh P-256 key.
    pub fn generate() -> Result<Self, CertError> {
        Ok(Self {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// Loads a key stored with [`AgentKey::to_pem`].
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        Ok(Self {
            key: KeyPair::from_pem(pem).map_err(|e| CertError::InvalidPem(e.to_string()))?,
        })
    }

    /// PKCS#8 PEM of the private key (a secret: store it 0600).
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The key in the form rustls takes.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// A DER CSR for this key. The control plane ignores everything in it but
    /// the public key, so it names only the hostname, for operators' eyes.
    pub fn csr_der(&self, hostname: &str) -> Result<Vec<u8>, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, hostname);
        params.distinguished_name = dn;
        Ok(params.serialize_request(&self.key)?.der().to_vec())
    }
}
