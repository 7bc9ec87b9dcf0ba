//! A branch played by a test: its own CA, JWT key and client key, joining a
//! real `tether serve` over QUIC with an invite, then calling it with
//! inter-branch JWTs it signs itself. Shared by the federation and tenant
//! boundary tests (`mod fake_branch;`); each uses a part of it.
#![allow(dead_code)]

use std::time::Duration;

use tether_certs::{AgentKey, BranchIdentity, CaFingerprint, CertificateAuthority};
use tether_control_plane::federation::invite::Invite;
use tether_control_plane::federation::keys;
use tether_protocol::{BranchCall, BranchRequest, BranchResponse, JoinRequest, VerificationKey};
use tether_tests::ControlPlane;

pub type ClientStream = tether_transport::FramedStream<BranchResponse, BranchRequest>;

/// What a branch brings to a join: a CA, a JWT signing key, a client key.
pub struct Identity {
    pub ca: CertificateAuthority,
    pub key: keys::GeneratedKey,
    pub client_key: AgentKey,
}

impl Identity {
    pub fn generate(name: &str) -> Self {
        Self {
            ca: CertificateAuthority::generate(name).unwrap(),
            key: keys::generate_key().unwrap(),
            client_key: AgentKey::generate().unwrap(),
        }
    }

    /// The join request for `invite`, claiming `branch_id`, asking for
    /// `servers:read` (the inviter grants what the invite says).
    pub fn join_request(&self, invite: &Invite, branch_id: &str, name: &str) -> JoinRequest {
        JoinRequest {
            invite_id: invite.id.to_string(),
            secret: invite.secret.clone(),
            branch_id: branch_id.to_string(),
            name: name.into(),
            address: "127.0.0.1:9".into(),
            ca_cert_pem: self.ca.cert_pem().to_string(),
            keys: vec![VerificationKey {
                kid: "k1".into(),
                x: self.key.x.clone(),
                y: self.key.y.clone(),
                not_after: None,
            }],
            csr_der: self.client_key.csr_der(name).unwrap(),
            scopes: vec!["servers:read".into()],
            organization_id: uuid::Uuid::now_v7().to_string(),
        }
    }
}

/// A QUIC connection to `target` without a client certificate (a join).
pub async fn connect_unauthenticated(
    target: &ControlPlane,
    pin: CaFingerprint,
) -> (quinn::Endpoint, quinn::Connection) {
    let tls = tether_certs::branch_client_config(pin, None).unwrap();
    let endpoint = tether_transport::client_endpoint(target.quic_addr, tls).unwrap();
    let connection = tether_transport::connect_control_plane(&endpoint, target.quic_addr)
        .await
        .unwrap();
    (endpoint, connection)
}

/// A join played with a fresh identity claiming `branch_id`; returns the
/// inviter's first answer.
pub async fn raw_join(target: &ControlPlane, invite_text: &str, branch_id: &str) -> BranchResponse {
    let invite = Invite::decode(invite_text).unwrap();
    let pin: CaFingerprint = invite.ca_fingerprint.parse().unwrap();
    let identity = Identity::generate("impostor");
    let (_endpoint, connection) = connect_unauthenticated(target, pin).await;
    let mut stream = ClientStream::open(&connection).await.unwrap();
    let answer = stream
        .request(&BranchRequest::Join(
            identity.join_request(&invite, branch_id, "impostor"),
        ))
        .await
        .unwrap();
    connection.close(0u32.into(), b"done");
    answer
}

/// A peer that completed a join and holds a connection with its
/// certificate from `b`.
pub struct FakePeer {
    pub id: uuid::Uuid,
    pub key: keys::GeneratedKey,
    pub organization_id: String,
    pub connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
    pub pin: CaFingerprint,
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub client_key_pem: String,
}

impl FakePeer {
    pub async fn join(b: &ControlPlane, invite_text: &str) -> Self {
        let invite = Invite::decode(invite_text).unwrap();
        let pin: CaFingerprint = invite.ca_fingerprint.parse().unwrap();
        let id = uuid::Uuid::now_v7();
        let identity = Identity::generate("fake");
        let (_join_endpoint, connection) = connect_unauthenticated(b, pin).await;
        let mut stream = ClientStream::open(&connection).await.unwrap();
        let joined = stream
            .request(&BranchRequest::Join(identity.join_request(
                &invite,
                &id.to_string(),
                "fake",
            )))
            .await
            .unwrap();
        let BranchResponse::Joined(accepted) = joined else {
            panic!("join refused: {joined:?}");
        };
        let for_b = identity
            .ca
            .sign_branch_csr(
                &accepted.csr_der,
                &BranchIdentity::new(id.to_string(), b.branch_id.clone()),
                Duration::from_secs(3600),
            )
            .unwrap();
        let done = stream
            .request(&BranchRequest::JoinCertificate {
                certificate_chain: vec![for_b.to_vec(), identity.ca.cert_der().to_vec()],
            })
            .await
            .unwrap();
        assert_eq!(done, BranchResponse::JoinCompleted);
        connection.close(0u32.into(), b"done");
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> = accepted
            .certificate_chain
            .iter()
            .map(|der| rustls_pki_types::CertificateDer::from(der.clone()))
            .collect();
        let tls = tether_certs::branch_client_config(
            pin,
            Some((chain.clone(), identity.client_key.private_key_der())),
        )
        .unwrap();
        let endpoint = tether_transport::client_endpoint(b.quic_addr, tls).unwrap();
        let connection = tether_transport::connect_control_plane(&endpoint, b.quic_addr)
            .await
            .unwrap();
        Self {
            id,
            key: identity.key,
            organization_id: accepted.organization_id,
            connection,
            _endpoint: endpoint,
            pin,
            chain,
            client_key_pem: identity.client_key.to_pem(),
        }
    }

    /// Claims of this peer towards `b`, with `scopes`.
    pub fn claims(&self, b: &ControlPlane, scopes: &[&str]) -> keys::BranchClaims {
        keys::claims_for(
            self.id,
            b.branch_id.parse().unwrap(),
            &self.organization_id,
            &scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    /// One call with the token as given.
    pub async fn call(&self, token: String, call: BranchCall) -> BranchResponse {
        let mut stream = ClientStream::open(&self.connection).await.unwrap();
        stream
            .request(&BranchRequest::Call { token, call })
            .await
            .unwrap()
    }

    /// One call with a valid token carrying `scopes`.
    pub async fn call_with_scopes(
        &self,
        b: &ControlPlane,
        scopes: &[&str],
        call: BranchCall,
    ) -> BranchResponse {
        let token = keys::sign("k1", &self.key.pkcs8, &self.claims(b, scopes)).unwrap();
        self.call(token, call).await
    }
}
