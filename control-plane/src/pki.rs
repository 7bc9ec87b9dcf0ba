//! The branch's CA as the gateway uses it: signs agent CSRs for an identity
//! and turns the result into what the wire and the store carry.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tether_certs::{AgentIdentity, CertError, CertificateAuthority, IssuedCertificate};
use tether_protocol::CertificateChain;
use uuid::Uuid;

use crate::store::CertificateRecord;

/// The branch's CA plus the policy it signs agent certificates with.
#[derive(Debug)]
pub struct Pki {
    pub ca: CertificateAuthority,
    pub branch_id: Uuid,
    pub agent_cert_ttl: Duration,
}

/// An agent certificate ready to be sent and recorded.
#[derive(Debug)]
pub struct SignedAgentCertificate {
    pub issued: IssuedCertificate,
    pub record: CertificateRecord,
    pub chain: CertificateChain,
}

fn utc(t: std::time::SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

impl Pki {
    pub fn identity(&self, server_id: Uuid) -> AgentIdentity {
        AgentIdentity::new(self.branch_id.to_string(), server_id.to_string())
    }

    /// Signs `csr_der` for `server_id` (everything but the public key is
    /// decided here).
    pub fn sign_agent(
        &self,
        csr_der: &[u8],
        server_id: Uuid,
    ) -> Result<SignedAgentCertificate, CertError> {
        let issued =
            self.ca
                .sign_agent_csr(csr_der, &self.identity(server_id), self.agent_cert_ttl)?;
        let record = CertificateRecord {
            serial: issued.info.serial_hex.clone(),
            server_id,
            not_before: utc(issued.info.not_before),
            not_after: utc(issued.info.not_after),
            issued_at: Utc::now(),
        };
        let chain = CertificateChain {
            certificates_der: vec![issued.der.to_vec(), self.ca.cert_der().to_vec()],
        };
        Ok(SignedAgentCertificate {
            issued,
            record,
            chain,
        })
    }
}
