//! The branch-to-branch exchange as each side decodes it. The callee's
//! side: `BranchRequest` frames, classified for a connection without a
//! branch certificate and for a peered one; a `Join`'s CSR signed by a real
//! CA as the inviter does, its CA certificate and a `JoinCertificate`'s
//! chain parsed. The caller's side: `BranchResponse` frames, and a
//! `Joined`'s chain parsed for its branch identity. Nothing may panic.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tether_certs::authority::pem_to_der;
use tether_certs::{BranchIdentity, CertificateAuthority, CertificateInfo};
use tether_protocol::{
    classify_branch_request, BranchPeerKind, BranchRequest, BranchResponse, MAX_FRAME_LEN,
};

static CA: LazyLock<CertificateAuthority> = LazyLock::new(|| {
    CertificateAuthority::generate("fuzz").unwrap_or_else(|e| panic!("fuzz CA: {e}"))
});

fuzz_target!(|data: &[u8]| {
    for request in common::decode_all::<BranchRequest, BranchResponse>(data, MAX_FRAME_LEN) {
        let unauthenticated = classify_branch_request(BranchPeerKind::Unauthenticated, &request);
        let peered = classify_branch_request(BranchPeerKind::Peer, &request);
        // No request is allowed on both kinds of connection.
        assert!(unauthenticated.is_err() || peered.is_err(), "{request:?}");
        match &request {
            BranchRequest::Join(join) => {
                assert!(unauthenticated.is_ok());
                let identity = BranchIdentity::new("fuzz-branch", "peer");
                let _ = CA.sign_branch_csr(&join.csr_der, &identity, Duration::from_secs(60));
                if let Ok(der) = pem_to_der(&join.ca_cert_pem) {
                    let _ = CertificateInfo::from_der(&der);
                }
            }
            BranchRequest::JoinCertificate { certificate_chain } => {
                for der in certificate_chain {
                    let _ = BranchIdentity::of_certificate(der);
                }
            }
            BranchRequest::Call { .. } => assert!(peered.is_ok()),
        }
    }
    for response in common::decode_all::<BranchResponse, BranchRequest>(data, MAX_FRAME_LEN) {
        if let BranchResponse::Joined(accepted) = response {
            for der in &accepted.certificate_chain {
                let _ = BranchIdentity::of_certificate(der);
            }
        }
    }
});
