//! Invites and the joining side of the peering handshake.
//!
//! An invite is `tether-invite:` + base64url(JSON) holding the inviting
//! branch's id, name, QUIC address, CA fingerprint, the scopes it grants,
//! its expiry, and a one-time secret (only its hash is stored). The joiner
//! dials the address pinning the fingerprint, sends its CA, keys and a CSR
//! with the secret, and gets back the inviter's CA (checked against the
//! fingerprint), keys, its branch certificate and a CSR it signs in turn.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_certs::{AgentKey, BranchIdentity, CaFingerprint};
use tether_protocol::{BranchRequest, BranchResponse, JoinRequest};
use uuid::Uuid;

use super::{BranchClientStream, FederationError, BRANCH_CERT_LIFETIME};
use crate::context::ControlPlane;
use crate::store::{branch_client_key_context, BranchPeer, BranchStatus};

const PREFIX: &str = "tether-invite:";

/// What an invite carries.
#[derive(Clone, Serialize, Deserialize)]
pub struct Invite {
    pub id: Uuid,
    /// One-time secret. Never logged.
    pub secret: String,
    pub branch_id: Uuid,
    pub name: String,
    pub address: String,
    pub ca_fingerprint: String,
    pub scopes: Vec<String>,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invite")
            .field("id", &self.id)
            .field("branch_id", &self.branch_id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Invite {
    /// The text handed to the other branch's admin.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses [`Invite::encode`]'s text.
    pub fn decode(text: &str) -> Result<Self, FederationError> {
        let invalid = |why: &str| FederationError::InvalidInvite(why.to_string());
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| invalid("it does not start with tether-invite:"))?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| invalid("it is not base64url"))?;
        serde_json::from_slice(&json).map_err(|_| invalid("its content is not an invite"))
    }
}

/// SHA-256 of an invite secret, hex.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh random invite secret.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Redeems `invite` for `organization_id` of this branch, granting the
/// inviter `grant` here. On success the peering is stored on both sides.
pub async fn join(
    cp: &ControlPlane,
    invite: &Invite,
    organization_id: Uuid,
    grant: Vec<String>,
) -> Result<BranchPeer, FederationError> {
    if invite.branch_id == cp.instance.branch_id {
        return Err(FederationError::InvalidInvite(
            "a branch cannot peer with itself".into(),
        ));
    }
    if invite.expires_at <= Utc::now() {
        return Err(FederationError::InvalidInvite("it has expired".into()));
    }
    let pin: CaFingerprint = invite
        .ca_fingerprint
        .parse()
        .map_err(|_| FederationError::InvalidInvite("its CA fingerprint is malformed".into()))?;
    // A known branch id is only re-peered by the same CA into the same
    // organization; anything else is refused before the inviter is dialed.
    let existed = super::check_peering_rule(cp, invite.branch_id, organization_id, &pin).await?;
    let unreachable = |e: String| FederationError::Unreachable(invite.branch_id, e);
    let client_key = AgentKey::generate()?;
    let keys = cp.federation.keys.published(&*cp.store, &cp.sealer).await?;
    let request = JoinRequest {
        invite_id: invite.id.to_string(),
        secret: invite.secret.clone(),
        branch_id: cp.instance.branch_id.to_string(),
        name: cp.instance.branch_name.clone(),
        address: cp.public_quic_addr.clone(),
        ca_cert_pem: cp.pki.ca.cert_pem().to_string(),
        keys,
        csr_der: client_key.csr_der(&cp.instance.branch_id.to_string())?,
        scopes: grant.clone(),
        organization_id: organization_id.to_string(),
    };
    let remote = super::resolve(&invite.address).await.map_err(unreachable)?;
    let tls = tether_certs::branch_client_config(pin, None)?;
    let endpoint = tether_transport::client_endpoint(remote, tls)?;
    let exchange = async {
        let connection = tether_transport::connect_control_plane(&endpoint, remote)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut stream = BranchClientStream::open(&connection).await?;
        let accepted = match stream.request(&BranchRequest::Join(request)).await? {
            BranchResponse::Joined(accepted) => accepted,
            BranchResponse::Refused { code, message } => {
                return Err(FederationError::Refused { code, message })
            }
            other => return Err(FederationError::Protocol(format!("{other:?}"))),
        };
        // The CA the inviter sends must be the one the invite pinned.
        let ca_der = tether_certs::authority::pem_to_der(&accepted.ca_cert_pem)?;
        if !pin.matches(&ca_der) || accepted.branch_id != invite.branch_id.to_string() {
            return Err(FederationError::Protocol(
                "the inviting branch presented another CA or id than its invite".into(),
            ));
        }
        let issued = tether_certs::BranchIdentity::of_certificate(
            accepted
                .certificate_chain
                .first()
                .map(Vec::as_slice)
                .unwrap_or_default(),
        )?;
        if issued
            != Some(BranchIdentity::new(
                invite.branch_id.to_string(),
                cp.instance.branch_id.to_string(),
            ))
        {
            return Err(FederationError::Protocol(
                "the branch certificate issued does not name this branch".into(),
            ));
        }
        let for_inviter = cp.pki.ca.sign_branch_csr(
            &accepted.csr_der,
            &BranchIdentity::new(
                cp.instance.branch_id.to_string(),
                invite.branch_id.to_string(),
            ),
            BRANCH_CERT_LIFETIME,
        )?;
        // Stored before the inviter completes, so its first heartbeat finds it.
        let peer = BranchPeer {
            id: invite.branch_id,
            organization_id,
            name: accepted.name.clone(),
            address: invite.address.clone(),
            ca_cert_pem: accepted.ca_cert_pem.clone(),
            client_chain: accepted.certificate_chain.clone(),
            client_key_sealed: cp.sealer.seal(
                client_key.to_pem().as_bytes(),
                &branch_client_key_context(invite.branch_id),
            ),
            peer_keys: accepted.keys.clone(),
            granted_scopes: grant.clone(),
            remote_scopes: accepted.scopes.clone(),
            remote_organization_id: accepted.organization_id.clone(),
            status: BranchStatus::Healthy,
            last_seen_at: Some(Utc::now()),
            latency_ms: None,
            server_count: 0,
            created_at: Utc::now(),
        };
        if !cp.store.upsert_branch_peer(&peer).await? {
            return Err(FederationError::BranchIdTaken(peer.id));
        }
        let answer = stream
            .request(&BranchRequest::JoinCertificate {
                certificate_chain: vec![for_inviter.to_vec(), cp.pki.ca.cert_der().to_vec()],
            })
            .await;
        match answer {
            Ok(BranchResponse::JoinCompleted) => {}
            other => {
                if !existed {
                    let _ = cp.store.delete_branch_peer(None, peer.id).await;
                }
                return Err(match other {
                    Ok(BranchResponse::Refused { code, message }) => {
                        FederationError::Refused { code, message }
                    }
                    Ok(other) => FederationError::Protocol(format!("{other:?}")),
                    Err(e) => e.into(),
                });
            }
        }
        let _ = stream.finish();
        tether_transport::close(&connection, tether_protocol::CloseCode::Normal);
        Ok(peer)
    };
    let result = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(unreachable("no answer within 10 s".into())));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invites_round_trip_and_garbage_is_refused() {
        let invite = Invite {
            id: Uuid::now_v7(),
            secret: new_secret(),
            branch_id: Uuid::now_v7(),
            name: "b".into(),
            address: "127.0.0.1:7443".into(),
            ca_fingerprint: "sha256:00".into(),
            scopes: vec!["servers:read".into()],
            expires_at: Utc::now(),
        };
        let text = invite.encode();
        let back = Invite::decode(&text).unwrap();
        assert_eq!(back.id, invite.id);
        assert_eq!(back.secret, invite.secret);
        assert!(!format!("{invite:?}").contains(&invite.secret));
        for bad in ["", "tether-invite:", "tether-invite:!!", "xyz"] {
            assert!(Invite::decode(bad).is_err(), "{bad} accepted");
        }
    }
}
