//! tether-certs against real rustls handshakes (in memory, no sockets) and
//! against an independent X.509 parser: pinning, client authentication,
//! expiry, key usages, and what `sign_agent_csr` keeps from a CSR.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tether_certs::authority::{chain_to_pem, pem_to_chain, pem_to_der, pem_to_private_key};
use tether_certs::{
    agent_client_config, control_plane_server_config, install_crypto_provider, AgentIdentity,
    AgentKey, CaFingerprint, CertError, CertificateAuthority, CertificateInfo, IssuedCertificate,
};
use tether_protocol::{ALPN, CONTROL_PLANE_SERVER_NAME};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: Duration = Duration::from_secs(24 * 3600);
const AGENT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

// ---------------------------------------------------------------------------
// In-memory handshake driver
// ---------------------------------------------------------------------------

/// Both ends after the handshake ran to completion or failure.
struct Handshake {
    client: ClientConnection,
    server: ServerConnection,
    client_error: Option<rustls::Error>,
    server_error: Option<rustls::Error>,
}

impl Handshake {
    fn succeeded(&self) -> bool {
        self.client_error.is_none()
            && self.server_error.is_none()
            && !self.client.is_handshaking()
            && !self.server.is_handshaking()
    }

    fn assert_succeeded(&self) {
        assert!(
            self.succeeded(),
            "handshake failed: client {:?}, server {:?}",
            self.client_error,
            self.server_error
        );
    }

    /// The client certificate chain the control plane saw.
    fn server_sees(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.server
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
    }
}

/// Moves everything `from` wants to send into `to`. Returns whether any byte
/// moved. Errors of the receiving side are recorded, not raised.
fn pump(from: &mut Connection, to: &mut Connection, to_error: &mut Option<rustls::Error>) -> bool {
    let mut wire = Vec::new();
    while from.wants_write() {
        if from.write_tls(&mut wire).unwrap() == 0 {
            break;
        }
    }
    if wire.is_empty() {
        return false;
    }
    if to_error.is_some() {
        return true;
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        match to.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Err(err) = to.process_new_packets() {
            *to_error = Some(err);
            break;
        }
    }
    true
}

/// Runs a TLS handshake between an agent (client) dialling the control
/// plane's fixed server name and a control plane (server), in memory.
fn handshake(client_config: ClientConfig, server_config: ServerConfig) -> Handshake {
    let name = ServerName::try_from(CONTROL_PLANE_SERVER_NAME).unwrap();
    let mut client =
        Connection::Client(ClientConnection::new(Arc::new(client_config), name).unwrap());
    let mut server = Connection::Server(ServerConnection::new(Arc::new(server_config)).unwrap());
    let (mut client_error, mut server_error) = (None, None);
    for _ in 0..64 {
        let sent = pump(&mut client, &mut server, &mut server_error);
        let answered = pump(&mut server, &mut client, &mut client_error);
        if !sent && !answered {
            break;
        }
    }
    let (Connection::Client(client), Connection::Server(server)) = (client, server) else {
        unreachable!()
    };
    Handshake {
        client,
        server,
        client_error,
        server_error,
    }
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn new_ca(branch: &str) -> CertificateAuthority {
    install_crypto_provider();
    CertificateAuthority::generate(branch).unwrap()
}

/// The control plane's TLS configuration as `tether serve` builds it: a fresh
/// server certificate, chain = [server certificate, CA certificate].
fn control_plane_tls(ca: &CertificateAuthority) -> ServerConfig {
    let server = ca.issue_server_certificate(&[], DAY).unwrap();
    let mut chain = pem_to_chain(&server.cert_pem).unwrap();
    chain.push(ca.cert_der().clone());
    control_plane_server_config(
        ca.cert_der(),
        chain,
        pem_to_private_key(&server.key_pem).unwrap(),
    )
    .unwrap()
}

fn enroll(
    ca: &CertificateAuthority,
    identity: &AgentIdentity,
    lifetime: Duration,
) -> (AgentKey, IssuedCertificate) {
    let key = AgentKey::generate().unwrap();
    let csr = key.csr_der("edge-01").unwrap();
    let issued = ca.sign_agent_csr(&csr, identity, lifetime).unwrap();
    (key, issued)
}

fn enrolled_agent_tls(
    ca: &CertificateAuthority,
    key: &AgentKey,
    issued: &IssuedCertificate,
) -> ClientConfig {
    let chain = vec![issued.der.clone(), ca.cert_der().clone()];
    agent_client_config(ca.fingerprint(), Some((chain, key.private_key_der()))).unwrap()
}

fn is_invalid_certificate(err: &Option<rustls::Error>) -> bool {
    matches!(err, Some(rustls::Error::InvalidCertificate(_)))
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).unwrap().1
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A certificate signed by `ca` with arbitrary parameters, bypassing the
/// profile `CertificateAuthority` enforces (to build hostile fixtures).
fn sign_raw(
    ca: &CertificateAuthority,
    params: CertificateParams,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let issuer =
        Issuer::from_ca_cert_pem(ca.cert_pem(), KeyPair::from_pem(&ca.key_pem()).unwrap()).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        cert.der().clone(),
        pem_to_private_key(&key.serialize_pem()).unwrap(),
    )
}

// ---------------------------------------------------------------------------
// Handshakes
// ---------------------------------------------------------------------------

#[test]
fn agent_pinning_the_ca_connects_without_a_client_certificate_and_server_sees_none() {
    let ca = new_ca("b1");
    let agent = agent_client_config(ca.fingerprint(), None).unwrap();
    let hs = handshake(agent, control_plane_tls(&ca));
    hs.assert_succeeded();
    assert_eq!(
        hs.server_sees(),
        None,
        "an enrolling agent presents no certificate"
    );
    assert_eq!(hs.client.alpn_protocol(), Some(ALPN));
    assert_eq!(hs.server.alpn_protocol(), Some(ALPN));
    assert_eq!(
        hs.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn agent_with_a_ca_signed_client_certificate_is_seen_with_its_tether_identity() {
    let ca = new_ca("b1");
    let identity = AgentIdentity::new("b1", "7f9c2b");
    let (key, issued) = enroll(&ca, &identity, AGENT_LIFETIME);
    let hs = handshake(
        enrolled_agent_tls(&ca, &key, &issued),
        control_plane_tls(&ca),
    );
    hs.assert_succeeded();
    let seen = hs
        .server_sees()
        .expect("the control plane sees the client certificate");
    // Given its whole chain, the agent presents the leaf alone: the control
    // plane holds the CA already.
    assert_eq!(seen, vec![issued.der.clone()]);
    let info = CertificateInfo::from_der(&seen[0]).unwrap();
    assert_eq!(info.require_identity().unwrap(), &identity);
    assert_eq!(
        info.require_identity().unwrap().uri(),
        "tether://b1/server/7f9c2b"
    );
}

#[test]
fn agent_presenting_only_its_leaf_certificate_is_still_authenticated() {
    let ca = new_ca("b1");
    let identity = AgentIdentity::new("b1", "s1");
    let (key, issued) = enroll(&ca, &identity, AGENT_LIFETIME);
    let agent = agent_client_config(
        ca.fingerprint(),
        Some((vec![issued.der.clone()], key.private_key_der())),
    )
    .unwrap();
    let hs = handshake(agent, control_plane_tls(&ca));
    hs.assert_succeeded();
    assert_eq!(hs.server_sees().unwrap()[0], issued.der);
}

#[test]
fn agent_pinning_a_different_fingerprint_refuses_the_control_plane() {
    let ca = new_ca("b1");
    let other = new_ca("b1");
    let agent = agent_client_config(other.fingerprint(), None).unwrap();
    let hs = handshake(agent, control_plane_tls(&ca));
    assert!(!hs.succeeded());
    assert_eq!(
        hs.client_error,
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        )),
        "server error: {:?}",
        hs.server_error
    );
    assert!(hs.server.peer_certificates().is_none());
}

#[test]
fn server_chain_without_the_pinned_ca_certificate_is_refused() {
    let ca = new_ca("b1");
    let server = ca.issue_server_certificate(&[], DAY).unwrap();
    let leaf_only = pem_to_chain(&server.cert_pem).unwrap();
    let tls = control_plane_server_config(
        ca.cert_der(),
        leaf_only,
        pem_to_private_key(&server.key_pem).unwrap(),
    )
    .unwrap();
    let hs = handshake(agent_client_config(ca.fingerprint(), None).unwrap(), tls);
    assert_eq!(
        hs.client_error,
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
}

#[test]
fn server_leaf_from_a_foreign_ca_is_refused_even_with_the_pinned_ca_in_its_chain() {
    let ca = new_ca("b1");
    // An impostor with a CA of the same name, presenting the genuine CA
    // certificate (public) after its own leaf.
    let impostor = new_ca("b1");
    let server = impostor.issue_server_certificate(&[], DAY).unwrap();
    let mut chain = pem_to_chain(&server.cert_pem).unwrap();
    chain.push(ca.cert_der().clone());
    let tls = control_plane_server_config(
        impostor.cert_der(),
        chain,
        pem_to_private_key(&server.key_pem).unwrap(),
    )
    .unwrap();
    let hs = handshake(agent_client_config(ca.fingerprint(), None).unwrap(), tls);
    assert!(!hs.succeeded());
    assert!(
        is_invalid_certificate(&hs.client_error),
        "{:?}",
        hs.client_error
    );
}

#[test]
fn client_certificate_from_a_foreign_ca_is_refused_by_the_control_plane() {
    let ca = new_ca("b1");
    for foreign_name in ["elsewhere", "b1"] {
        let foreign = new_ca(foreign_name);
        let (key, issued) = enroll(&foreign, &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME);
        // The agent pins the right CA; only its own certificate is foreign.
        let chain = vec![issued.der.clone(), foreign.cert_der().clone()];
        let agent =
            agent_client_config(ca.fingerprint(), Some((chain, key.private_key_der()))).unwrap();
        let hs = handshake(agent, control_plane_tls(&ca));
        assert!(!hs.succeeded(), "foreign CA named {foreign_name} accepted");
        assert!(
            is_invalid_certificate(&hs.server_error),
            "{foreign_name}: {:?}",
            hs.server_error
        );
        assert!(hs.client_error.is_some(), "the agent learns of the refusal");
    }
}

#[test]
fn expired_agent_certificate_is_refused_by_the_control_plane() {
    let ca = new_ca("b1");
    let (key, issued) = enroll(&ca, &AgentIdentity::new("b1", "s1"), Duration::from_secs(1));
    // Back-dating is min(5 min, lifetime): the certificate is valid for
    // [now - 1 s, now + 1 s] and expired two seconds later.
    let not_before = issued
        .info
        .not_before
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let not_after = issued
        .info
        .not_after
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(not_after - not_before <= 2, "{not_before}..{not_after}");
    std::thread::sleep(Duration::from_millis(2100));
    let hs = handshake(
        enrolled_agent_tls(&ca, &key, &issued),
        control_plane_tls(&ca),
    );
    assert!(!hs.succeeded());
    assert!(
        matches!(
            hs.server_error,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ),
        "{:?}",
        hs.server_error
    );
}

#[test]
fn agent_certificate_used_as_a_server_certificate_is_refused_by_the_agent() {
    let ca = new_ca("b1");
    let (key, issued) = enroll(&ca, &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME);
    let rogue = control_plane_server_config(
        ca.cert_der(),
        vec![issued.der.clone(), ca.cert_der().clone()],
        key.private_key_der(),
    )
    .unwrap();
    let hs = handshake(agent_client_config(ca.fingerprint(), None).unwrap(), rogue);
    assert!(!hs.succeeded());
    // Chain building checks the EKU before the name: clientAuth-only fails first.
    assert!(
        matches!(
            hs.client_error,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ))
        ),
        "{:?}",
        hs.client_error
    );
}

#[test]
fn server_certificate_with_the_right_name_but_only_client_auth_is_refused_by_the_agent() {
    let ca = new_ca("b1");
    let mut params = CertificateParams::new(vec![CONTROL_PLANE_SERVER_NAME.to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let (cert, key) = sign_raw(&ca, params);
    let tls =
        control_plane_server_config(ca.cert_der(), vec![cert, ca.cert_der().clone()], key).unwrap();
    let hs = handshake(agent_client_config(ca.fingerprint(), None).unwrap(), tls);
    assert!(
        matches!(
            hs.client_error,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ))
        ),
        "{:?}",
        hs.client_error
    );
}

#[test]
fn server_certificate_for_another_name_is_refused_by_the_agent() {
    let ca = new_ca("b1");
    let mut params =
        CertificateParams::new(vec!["not-the-control-plane.example".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (cert, key) = sign_raw(&ca, params);
    let tls =
        control_plane_server_config(ca.cert_der(), vec![cert, ca.cert_der().clone()], key).unwrap();
    let hs = handshake(agent_client_config(ca.fingerprint(), None).unwrap(), tls);
    assert!(
        matches!(
            hs.client_error,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{:?}",
        hs.client_error
    );
}

#[test]
fn control_plane_server_certificate_is_refused_as_a_client_certificate() {
    let ca = new_ca("b1");
    let server = ca.issue_server_certificate(&[], DAY).unwrap();
    let mut chain = pem_to_chain(&server.cert_pem).unwrap();
    chain.push(ca.cert_der().clone());
    let agent = agent_client_config(
        ca.fingerprint(),
        Some((chain, pem_to_private_key(&server.key_pem).unwrap())),
    )
    .unwrap();
    let hs = handshake(agent, control_plane_tls(&ca));
    assert!(!hs.succeeded());
    assert!(
        matches!(
            hs.server_error,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ))
        ),
        "{:?}",
        hs.server_error
    );
}

#[test]
fn ca_certificate_itself_is_refused_as_a_client_certificate() {
    let ca = new_ca("b1");
    let ca_key = pem_to_private_key(&ca.key_pem()).unwrap();
    let agent = agent_client_config(
        ca.fingerprint(),
        Some((vec![ca.cert_der().clone()], ca_key)),
    )
    .unwrap();
    let hs = handshake(agent, control_plane_tls(&ca));
    assert!(!hs.succeeded());
    assert!(
        is_invalid_certificate(&hs.server_error),
        "{:?}",
        hs.server_error
    );
}

// ---------------------------------------------------------------------------
// The CA: fingerprints, PEM round trip, server certificates
// ---------------------------------------------------------------------------

#[test]
fn ca_fingerprint_of_the_pem_is_what_agents_pin() {
    let ca = new_ca("b1");
    let der = pem_to_der(ca.cert_pem()).unwrap();
    assert_eq!(&der, ca.cert_der());
    let digest: [u8; 32] = Sha256::digest(&der).into();
    let expected = format!("sha256:{}", hex::encode(digest));
    assert_eq!(ca.fingerprint().to_string(), expected);
    assert_eq!(CaFingerprint::of_der(&der), ca.fingerprint());
    assert!(ca.fingerprint().matches(&der));

    // What an operator copies from `openssl x509 -fingerprint -sha256`.
    let openssl_style = format!(
        "SHA256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    let pin: CaFingerprint = openssl_style.parse().unwrap();
    assert_eq!(pin, ca.fingerprint());

    let pin: CaFingerprint = expected.parse().unwrap();
    handshake(
        agent_client_config(pin, None).unwrap(),
        control_plane_tls(&ca),
    )
    .assert_succeeded();
}

#[test]
fn ca_reloaded_from_pem_keeps_its_fingerprint_and_its_certificates_interoperate() {
    let original = new_ca("b1");
    let reloaded =
        CertificateAuthority::from_pem(original.cert_pem(), &original.key_pem()).unwrap();
    assert_eq!(reloaded.fingerprint(), original.fingerprint());
    assert_eq!(reloaded.cert_pem(), original.cert_pem());
    assert_eq!(reloaded.cert_der(), original.cert_der());
    assert_eq!(reloaded.key_pem(), original.key_pem());

    // A reloaded CA (what `tether serve` does at every start) issues server
    // and agent certificates that chain to the original CA certificate.
    let identity = AgentIdentity::new("b1", "s1");
    let (key, issued) = enroll(&reloaded, &identity, AGENT_LIFETIME);
    let hs = handshake(
        enrolled_agent_tls(&original, &key, &issued),
        control_plane_tls(&reloaded),
    );
    hs.assert_succeeded();
    assert_eq!(
        CertificateInfo::from_der(&hs.server_sees().unwrap()[0])
            .unwrap()
            .identity,
        Some(identity)
    );
    let issued_cert = parse(&issued.der);
    let ca_cert = parse(original.cert_der());
    assert_eq!(issued_cert.issuer().as_raw(), ca_cert.subject().as_raw());
    issued_cert
        .verify_signature(Some(ca_cert.public_key()))
        .unwrap();
}

#[test]
fn ca_from_pem_refuses_garbage() {
    let ca = new_ca("b1");
    assert!(matches!(
        CertificateAuthority::from_pem("not pem", &ca.key_pem()),
        Err(CertError::InvalidPem(_))
    ));
    assert!(matches!(
        CertificateAuthority::from_pem(ca.cert_pem(), "not pem"),
        Err(CertError::InvalidPem(_))
    ));
}

#[test]
fn ca_certificate_is_a_p256_ca_that_may_only_sign_leaves() {
    let ca = new_ca("branch-7");
    let cert = parse(ca.cert_der());
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basic constraints")
        .value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().expect("key usage").value;
    assert!(ku.key_cert_sign());
    assert!(
        cert.subject().to_string().contains("Tether CA branch-7"),
        "{}",
        cert.subject()
    );
    assert_eq!(
        cert.public_key()
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok()),
        Some(x509_parser::oid_registry::OID_EC_P256)
    );
}

#[test]
fn server_certificate_names_the_control_plane_plus_extra_addresses_once_each() {
    let ca = new_ca("b1");
    let names = vec![
        "cp.example.com".to_string(),
        "10.1.2.3".to_string(),
        "::1".to_string(),
        "cp.example.com".to_string(),
        CONTROL_PLANE_SERVER_NAME.to_string(),
    ];
    let server = ca.issue_server_certificate(&names, DAY).unwrap();
    let der = pem_to_der(&server.cert_pem).unwrap();
    let cert = parse(&der);
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => format!("dns:{dns}"),
            GeneralName::IPAddress(ip) => format!("ip:{}", hex::encode(ip)),
            other => format!("other:{other:?}"),
        })
        .collect();
    assert_eq!(
        sans,
        vec![
            format!("dns:{CONTROL_PLANE_SERVER_NAME}"),
            "dns:cp.example.com".to_string(),
            "ip:0a010203".to_string(),
            "ip:00000000000000000000000000000001".to_string(),
        ]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert!(!cert.is_ca());
}

#[test]
fn chain_pem_round_trips_and_an_empty_pem_is_refused() {
    let ca = new_ca("b1");
    let (_, issued) = enroll(&ca, &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME);
    let chain = vec![issued.der.clone(), ca.cert_der().clone()];
    assert_eq!(pem_to_chain(&chain_to_pem(&chain)).unwrap(), chain);
    assert!(matches!(pem_to_chain(""), Err(CertError::InvalidPem(_))));
}

// ---------------------------------------------------------------------------
// Signing agent CSRs
// ---------------------------------------------------------------------------

#[test]
fn sign_agent_csr_ignores_everything_the_csr_asks_for() {
    let ca = new_ca("b1");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Evil Root CA");
    dn.push(DnType::OrganizationName, "Tether");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.subject_alt_names = vec![
        SanType::DnsName("evil.example".try_into().unwrap()),
        SanType::DnsName(CONTROL_PLANE_SERVER_NAME.try_into().unwrap()),
        SanType::URI("tether://b1/server/someone-else".try_into().unwrap()),
    ];
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::Any,
    ];
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let csr = params.serialize_request(&key).unwrap();

    let identity = AgentIdentity::new("b1", "granted-server");
    let before = unix_now();
    let issued = ca
        .sign_agent_csr(csr.der(), &identity, AGENT_LIFETIME)
        .unwrap();
    let after = unix_now();
    let cert = parse(&issued.der);

    // Not a CA, whatever was asked.
    assert!(!cert.is_ca());
    if let Some(bc) = cert.basic_constraints().unwrap() {
        assert!(!bc.value.ca);
    }
    // Only the granted identity.
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN")
        .value
        .general_names;
    assert_eq!(sans.len(), 1, "{sans:?}");
    assert!(matches!(sans[0], GeneralName::URI(uri) if uri == "tether://b1/server/granted-server"));
    assert_eq!(issued.info.identity, Some(identity));
    // Client auth only.
    let eku = cert.extended_key_usage().unwrap().expect("EKU").value;
    assert!(eku.client_auth);
    assert!(!eku.server_auth && !eku.any && !eku.code_signing && eku.other.is_empty());
    let ku = cert.key_usage().unwrap().expect("key usage").value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    // The subject is the CA's choice, not the CSR's.
    let subject = cert.subject().to_string();
    assert!(
        subject.contains("granted-server") && !subject.contains("Evil"),
        "{subject}"
    );
    // The requested lifetime, back-dated by the skew allowance.
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    let lifetime = AGENT_LIFETIME.as_secs() as i64;
    assert!(
        (before + lifetime - 1..=after + lifetime).contains(&not_after),
        "not_after {not_after}"
    );
    assert!(
        (before - 300 - 1..=after - 300).contains(&not_before),
        "not_before {not_before}"
    );
    // Same public key as the CSR, signed by the CA.
    let request = X509CertificationRequest::from_der(csr.der()).unwrap().1;
    assert_eq!(
        cert.public_key().raw,
        request.certification_request_info.subject_pki.raw
    );
    cert.verify_signature(Some(parse(ca.cert_der()).public_key()))
        .unwrap();
    assert_eq!(
        cert.issuer().as_raw(),
        parse(ca.cert_der()).subject().as_raw()
    );
}

#[test]
fn issued_certificate_info_matches_the_certificate() {
    let ca = new_ca("b1");
    let (_, issued) = enroll(&ca, &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME);
    assert_eq!(CertificateInfo::from_der(&issued.der).unwrap(), issued.info);
    let cert = parse(&issued.der);
    assert_eq!(issued.info.serial_hex, hex::encode(cert.raw_serial()));
    let lifetime = issued
        .info
        .not_after
        .duration_since(issued.info.not_before)
        .unwrap();
    let renew_in = issued
        .info
        .renew_at()
        .duration_since(issued.info.not_before)
        .unwrap();
    assert_eq!(renew_in, lifetime * 2 / 3);
}

#[test]
fn serial_numbers_of_signed_certificates_differ_and_are_positive_128_bit() {
    let ca = new_ca("b1");
    let key = AgentKey::generate().unwrap();
    let csr = key.csr_der("edge-01").unwrap();
    let identity = AgentIdentity::new("b1", "s1");
    let serials: Vec<Vec<u8>> = (0..8)
        .map(|_| {
            let issued = ca.sign_agent_csr(&csr, &identity, AGENT_LIFETIME).unwrap();
            parse(&issued.der).raw_serial().to_vec()
        })
        .collect();
    for (i, serial) in serials.iter().enumerate() {
        assert_eq!(serial.len(), 16, "{serial:02x?}");
        assert_eq!(
            serial[0] & 0x80,
            0,
            "serial must be positive: {serial:02x?}"
        );
        assert!(
            serials[i + 1..].iter().all(|other| other != serial),
            "duplicate serial"
        );
    }
    let server_serial =
        parse(&pem_to_der(&ca.issue_server_certificate(&[], DAY).unwrap().cert_pem).unwrap())
            .raw_serial()
            .to_vec();
    assert!(!serials.contains(&server_serial));
}

fn assert_invalid_csr(result: Result<IssuedCertificate, CertError>, what: &str) {
    assert!(
        matches!(result, Err(CertError::InvalidCsr(_))),
        "{what}: {result:?}"
    );
}

#[test]
fn csr_with_a_broken_signature_is_refused() {
    let ca = new_ca("b1");
    let identity = AgentIdentity::new("b1", "s1");
    let csr = AgentKey::generate().unwrap().csr_der("edge-01").unwrap();
    // Last byte is in the signature; a byte near the start in the subject.
    for at in [csr.len() - 1, csr.len() - 10, 20] {
        let mut broken = csr.clone();
        broken[at] ^= 0x01;
        assert_invalid_csr(
            ca.sign_agent_csr(&broken, &identity, AGENT_LIFETIME),
            &format!("flip at {at}"),
        );
    }
    // The CSR of one key with the signature of another.
    let other = AgentKey::generate().unwrap().csr_der("edge-01").unwrap();
    let request = X509CertificationRequest::from_der(&csr).unwrap().1;
    let other_request = X509CertificationRequest::from_der(&other).unwrap().1;
    let spliced = build_csr(
        request.certification_request_info.raw,
        ECDSA_WITH_SHA256,
        &other_request.signature_value.data,
    );
    assert_invalid_csr(
        ca.sign_agent_csr(&spliced, &identity, AGENT_LIFETIME),
        "spliced signature",
    );
}

#[test]
fn csr_that_is_not_a_csr_is_refused() {
    let ca = new_ca("b1");
    let identity = AgentIdentity::new("b1", "s1");
    assert_invalid_csr(ca.sign_agent_csr(&[], &identity, AGENT_LIFETIME), "empty");
    assert_invalid_csr(
        ca.sign_agent_csr(b"garbage", &identity, AGENT_LIFETIME),
        "garbage",
    );
    assert_invalid_csr(
        ca.sign_agent_csr(ca.cert_der(), &identity, AGENT_LIFETIME),
        "a certificate",
    );
    let csr = AgentKey::generate().unwrap().csr_der("edge-01").unwrap();
    assert_invalid_csr(
        ca.sign_agent_csr(&csr[..csr.len() - 1], &identity, AGENT_LIFETIME),
        "truncated",
    );
    let mut trailing = csr.clone();
    trailing.push(0);
    assert_invalid_csr(
        ca.sign_agent_csr(&trailing, &identity, AGENT_LIFETIME),
        "trailing byte",
    );
    // The untouched request is fine.
    ca.sign_agent_csr(&csr, &identity, AGENT_LIFETIME).unwrap();
}

fn csr_from_key(key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "edge-01");
    params.serialize_request(key).unwrap().der().to_vec()
}

#[test]
fn csr_with_an_rsa_key_is_refused() {
    let ca = new_ca("b1");
    let rsa = KeyPair::from_pem(include_str!("fixtures/rsa2048-test-key.pk8.pem")).unwrap();
    let csr = csr_from_key(&rsa);
    assert_invalid_csr(
        ca.sign_agent_csr(&csr, &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME),
        "RSA",
    );
}

#[test]
fn csr_with_a_p384_key_is_refused() {
    let ca = new_ca("b1");
    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = csr_from_key(&p384);
    assert_invalid_csr(
        ca.sign_agent_csr(&csr, &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME),
        "P-384",
    );
}

#[test]
fn csr_with_an_ed25519_key_is_refused() {
    let ca = new_ca("b1");
    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let csr = csr_from_key(&ed);
    assert_invalid_csr(
        ca.sign_agent_csr(&csr, &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME),
        "Ed25519",
    );
}

/// ecdsa-with-SHA256 AlgorithmIdentifier.
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// CertificationRequest ::= SEQUENCE { info, signatureAlgorithm, signature BIT STRING }
fn build_csr(info: &[u8], algorithm: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8];
    bits.extend_from_slice(signature);
    let mut body = info.to_vec();
    body.extend_from_slice(algorithm);
    body.extend_from_slice(&der_tlv(0x03, &bits));
    der_tlv(0x30, &body)
}

// Made with `openssl req -new -sha256` on a secp384r1 key and `-sha384` on a
// prime256v1 key: OpenSSL signs CSRs with SHA-256 whatever the curve, so an
// ecdsa-with-SHA256 signature does not mean a P-256 key.
const P384_KEY_SHA256_SIGNATURE: &[u8] =
    include_bytes!("fixtures/p384-key-sha256-signature.csr.der");
const P256_KEY_SHA384_SIGNATURE: &[u8] =
    include_bytes!("fixtures/p256-key-sha384-signature.csr.der");

#[test]
fn csr_with_a_p384_key_signed_with_sha256_is_refused() {
    let ca = new_ca("b1");
    // The fixture is well formed and its signature verifies.
    X509CertificationRequest::from_der(P384_KEY_SHA256_SIGNATURE)
        .unwrap()
        .1
        .verify_signature()
        .unwrap();
    assert_invalid_csr(
        ca.sign_agent_csr(
            P384_KEY_SHA256_SIGNATURE,
            &AgentIdentity::new("b1", "s1"),
            AGENT_LIFETIME,
        ),
        "P-384 key, ecdsa-with-SHA256 signature",
    );
}

#[test]
fn csr_with_a_p256_key_signed_with_sha384_is_signed_with_that_key() {
    let ca = new_ca("b1");
    let request = X509CertificationRequest::from_der(P256_KEY_SHA384_SIGNATURE)
        .unwrap()
        .1;
    request.verify_signature().unwrap();
    let issued = ca
        .sign_agent_csr(
            P256_KEY_SHA384_SIGNATURE,
            &AgentIdentity::new("b1", "s1"),
            AGENT_LIFETIME,
        )
        .unwrap();
    assert_eq!(
        parse(&issued.der).public_key().raw,
        request.certification_request_info.subject_pki.raw
    );
}

#[test]
fn csr_requesting_an_unknown_extension_is_signed_without_it() {
    let ca = new_ca("b1");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    // A private-arc OID with an arbitrary DER value (NULL), marked critical.
    let mut ext =
        CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 1], vec![0x05, 0x00]);
    ext.set_criticality(true);
    params.custom_extensions = vec![ext];
    let csr = params.serialize_request(&key).unwrap();
    let issued = ca
        .sign_agent_csr(csr.der(), &AgentIdentity::new("b1", "s1"), AGENT_LIFETIME)
        .unwrap();
    let cert = parse(&issued.der);
    assert!(
        cert.extensions()
            .iter()
            .all(|e| e.oid.to_id_string() != "1.3.6.1.4.1.55555.1"),
        "requested extension copied into the certificate"
    );
    assert_eq!(cert.public_key().raw, &key.subject_public_key_info()[..]);
}

#[test]
fn identities_that_do_not_survive_their_uri_form_are_refused() {
    let ca = new_ca("b1");
    let csr = AgentKey::generate().unwrap().csr_der("edge-01").unwrap();
    for (branch, server) in [
        ("b1", ""),
        ("", "s1"),
        ("b1/server/x", "s1"),
        ("b1", "s 1"),
        ("b1", "ü"),
    ] {
        let result = ca.sign_agent_csr(&csr, &AgentIdentity::new(branch, server), AGENT_LIFETIME);
        assert!(
            matches!(result, Err(CertError::InvalidIdentity(_))),
            "{branch:?}/{server:?}: {result:?}"
        );
    }
}

#[test]
fn agent_key_survives_a_pem_round_trip() {
    let key = AgentKey::generate().unwrap();
    let reloaded = AgentKey::from_pem(&key.to_pem()).unwrap();
    assert_eq!(reloaded.to_pem(), key.to_pem());
    assert!(!format!("{key:?}").contains("PRIVATE"));
    // A CSR from the reloaded key certifies the same public key.
    let ca = new_ca("b1");
    let a = ca
        .sign_agent_csr(
            &key.csr_der("h").unwrap(),
            &AgentIdentity::new("b1", "s1"),
            DAY,
        )
        .unwrap();
    let b = ca
        .sign_agent_csr(
            &reloaded.csr_der("h").unwrap(),
            &AgentIdentity::new("b1", "s1"),
            DAY,
        )
        .unwrap();
    assert_eq!(
        parse(&a.der).public_key().raw,
        parse(&b.der).public_key().raw
    );
    assert!(matches!(
        AgentKey::from_pem("nope"),
        Err(CertError::InvalidPem(_))
    ));
}
