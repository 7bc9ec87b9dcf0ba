//! The enrollment exchange as each side decodes it. The control plane's
//! side: frames from a connection without a client certificate, classified
//! (only `Enroll` may open such a stream), and every `Enroll`'s CSR signed
//! by a real CA the way the gateway does (the CSR is the one part of the
//! request parsed beyond the frame: x509 DER from the network). The agent's
//! side: the answer's frames, and every certificate of an `Enrolled` chain
//! parsed as the agent parses it. Nothing may panic; a CSR that is not a
//! valid P-256 request must be refused, never signed.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tether_certs::{AgentIdentity, CertificateAuthority, CertificateInfo};
use tether_protocol::{
    classify_first_message, AgentMessage, ControlMessage, PeerKind, StreamKind, Violation,
    MAX_FRAME_LEN,
};

static CA: LazyLock<CertificateAuthority> = LazyLock::new(|| {
    CertificateAuthority::generate("fuzz").unwrap_or_else(|e| panic!("fuzz CA: {e}"))
});

fuzz_target!(|data: &[u8]| {
    let identity = AgentIdentity::new("fuzz-branch", "00000000-0000-0000-0000-000000000000");
    for message in common::decode_all::<AgentMessage, ControlMessage>(data, MAX_FRAME_LEN) {
        match (
            classify_first_message(PeerKind::Unauthenticated, &message),
            &message,
        ) {
            (Ok(StreamKind::Enrollment), AgentMessage::Enroll(request)) => {
                if let Ok(issued) =
                    CA.sign_agent_csr(&request.csr_der, &identity, Duration::from_secs(60))
                {
                    // Whatever was signed carries the identity we gave it.
                    assert_eq!(issued.info.identity.as_ref(), Some(&identity));
                    let reread = CertificateInfo::from_der(&issued.der)
                        .unwrap_or_else(|e| panic!("a certificate we issued does not parse: {e}"));
                    assert_eq!(reread, issued.info);
                }
            }
            (Ok(kind), _) => panic!("an unauthenticated stream was classified as {kind:?}"),
            (Err(violation), _) => assert_eq!(violation, Violation::NotEnrolled),
        }
    }
    for message in common::decode_all::<ControlMessage, AgentMessage>(data, MAX_FRAME_LEN) {
        if let ControlMessage::Enrolled(grant) = message {
            for der in &grant.chain.certificates_der {
                let _ = CertificateInfo::from_der(der);
            }
        }
    }
});
