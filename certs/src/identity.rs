//! Identities and fingerprints: what a certificate says about who holds it.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::CertError;

/// SHA-256 of a CA certificate's DER encoding, written `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint([u8; 32]);

impl CaFingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// True when `der` is the certificate this fingerprint names.
    pub fn matches(&self, der: &[u8]) -> bool {
        Self::of_der(der) == *self
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for CaFingerprint {
    type Err = CertError;

    /// Accepts `sha256:<hex>`, case-insensitive, with optional `:` between bytes.
    fn from_str(s: &str) -> Result<Self, CertError> {
        let invalid = || CertError::InvalidFingerprint(s.to_string());
        let trimmed = s.trim();
        let hex_part = trimmed
            .strip_prefix("sha256:")
            .or_else(|| trimmed.strip_prefix("SHA256:"))
            .ok_or_else(invalid)?;
        let digits: String = hex_part.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(digits).map_err(|_| invalid())?;
        let array: [u8; 32] = bytes.try_into().map_err(|_| invalid())?;
        Ok(Self(array))
    }
}

/// The identity carried by an agent certificate:
/// `tether://<branch-id>/server/<server-id>` in a SAN URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    pub branch_id: String,
    pub server_id: String,
}

impl AgentIdentity {
    pub(crate) const SCHEME: &'static str = "tether://";

    pub fn new(branch_id: impl Into<String>, server_id: impl Into<String>) -> Self {
        Self {
            branch_id: branch_id.into(),
            server_id: server_id.into(),
        }
    }

    /// The SAN URI form.
    pub fn uri(&self) -> String {
        format!(
            "{}{}/server/{}",
            Self::SCHEME,
            self.branch_id,
            self.server_id
        )
    }

    /// Parses the SAN URI form.
    pub fn from_uri(uri: &str) -> Result<Self, CertError> {
        let invalid = || CertError::InvalidIdentity(uri.to_string());
        let rest = uri.strip_prefix(Self::SCHEME).ok_or_else(invalid)?;
        let (branch, server) = rest.split_once("/server/").ok_or_else(invalid)?;
        let well_formed = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        };
        if !well_formed(branch) || !well_formed(server) {
            return Err(invalid());
        }
        Ok(Self::new(branch, server))
    }
}

impl fmt::Display for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// The identity carried by a branch certificate:
/// `tether://<issuer-branch>/branch/<peer-branch>` in a SAN URI. The issuer
/// is the branch whose CA signed it (the one the holder connects to), the
/// peer the branch holding it. It never parses as an [`AgentIdentity`], so a
/// branch certificate can never open an agent session (and vice versa).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BranchIdentity {
    pub issuer_branch: String,
    pub peer_branch: String,
}

impl BranchIdentity {
    pub fn new(issuer_branch: impl Into<String>, peer_branch: impl Into<String>) -> Self {
        Self {
            issuer_branch: issuer_branch.into(),
            peer_branch: peer_branch.into(),
        }
    }

    /// The SAN URI form.
    pub fn uri(&self) -> String {
        format!(
            "{}{}/branch/{}",
            AgentIdentity::SCHEME,
            self.issuer_branch,
            self.peer_branch
        )
    }

    /// Parses the SAN URI form.
    pub fn from_uri(uri: &str) -> Result<Self, CertError> {
        let invalid = || CertError::InvalidIdentity(uri.to_string());
        let rest = uri
            .strip_prefix(AgentIdentity::SCHEME)
            .ok_or_else(invalid)?;
        let (issuer, peer) = rest.split_once("/branch/").ok_or_else(invalid)?;
        let well_formed = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        };
        if !well_formed(issuer) || !well_formed(peer) {
            return Err(invalid());
        }
        Ok(Self::new(issuer, peer))
    }

    /// The branch identity in a DER certificate's SAN URIs, if any.
    pub fn of_certificate(der: &[u8]) -> Result<Option<Self>, CertError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
        Ok(cert
            .subject_alternative_name()
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))?
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    GeneralName::URI(uri) => Self::from_uri(uri).ok(),
                    _ => None,
                })
            }))
    }
}

impl fmt::Display for BranchIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The tether identity in its SAN URIs, if any.
    pub identity: Option<AgentIdentity>,
}

impl CertificateInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
        let to_system_time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        let identity = cert
            .subject_alternative_name()
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))?
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    GeneralName::URI(uri) => AgentIdentity::from_uri(uri).ok(),
                    _ => None,
                })
            });
        Ok(Self {
            serial_hex: hex::encode(cert.raw_serial()),
            not_before: to_system_time(cert.validity().not_before),
            not_after: to_system_time(cert.validity().not_after),
            identity,
        })
    }

    /// The identity, or [`CertError::MissingIdentity`].
    pub fn require_identity(&self) -> Result<&AgentIdentity, CertError> {
        self.identity.as_ref().ok_or(CertError::MissingIdentity)
    }

    /// When the certificate should be renewed: at 2/3 of its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime * 2 / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_through_text() {
        let fp = CaFingerprint::of_der(b"certificate");
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.parse::<CaFingerprint>().unwrap(), fp);
        assert_eq!(
            text.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<CaFingerprint>()
                .unwrap(),
            fp
        );
    }

    #[test]
    fn malformed_fingerprints_are_refused() {
        for bad in ["", "sha256:", "md5:abcd", "sha256:zz", "sha256:abcd"] {
            assert!(bad.parse::<CaFingerprint>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn branch_and_agent_identities_never_parse_as_each_other() {
        let branch = BranchIdentity::new("b1", "b2");
        assert_eq!(branch.uri(), "tether://b1/branch/b2");
        assert_eq!(BranchIdentity::from_uri(&branch.uri()).unwrap(), branch);
        assert!(AgentIdentity::from_uri(&branch.uri()).is_err());
        let agent = AgentIdentity::new("b1", "s1");
        assert!(BranchIdentity::from_uri(&agent.uri()).is_err());
        for bad in [
            "tether://b1/branch/",
            "tether:///branch/x",
            "tether://a/branch/b/c",
        ] {
            assert!(BranchIdentity::from_uri(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn identity_uri_round_trips_and_rejects_garbage() {
        let id = AgentIdentity::new("b1", "7f9c");
        assert_eq!(id.uri(), "tether://b1/server/7f9c");
        assert_eq!(AgentIdentity::from_uri(&id.uri()).unwrap(), id);
        for bad in [
            "tether://b1/server/",
            "https://b1/server/x",
            "tether://b1/x/y",
            "tether://b/1/server/x/../y",
        ] {
            assert!(AgentIdentity::from_uri(bad).is_err(), "{bad} accepted");
        }
    }
}
