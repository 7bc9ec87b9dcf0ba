//! Connections peer branches open to this branch (ALPN `tether-branch/1`).
//!
//! Without a client certificate a connection may only redeem an invite
//! (one stream: `Join` -> `Joined`, `JoinCertificate` -> `JoinCompleted`).
//! With one, the certificate must carry a branch identity issued by this
//! branch (`tether://<this-branch>/branch/<peer>`) for a peering that still
//! exists, or the connection is closed with `Revoked`; each stream then
//! carries one call whose JWT is verified ([`super::keys`]) before anything
//! is done.

use std::sync::Arc;

use chrono::Utc;
use rustls_pki_types::CertificateDer;
use tether_certs::{BranchIdentity, CertificateInfo};
use tether_protocol::{
    classify_branch_request, BranchCall, BranchPeerKind, BranchRequest, BranchResponse, CloseCode,
    JoinAccepted, JoinRequest, PublishedServer, RefusalCode,
};
use tracing::Instrument;
use uuid::Uuid;

use super::{invite, keys, BranchServerStream, BRANCH_CERT_LIFETIME};
use crate::context::ControlPlane;
use crate::store::{branch_client_key_context, BranchPeer, BranchStatus, ServerQuery};

fn refused(code: RefusalCode, message: impl Into<String>) -> BranchResponse {
    BranchResponse::Refused {
        code,
        message: message.into(),
    }
}

/// Serves one branch connection until it closes.
pub async fn serve(
    connection: quinn::Connection,
    certificate: Option<CertificateDer<'static>>,
    cp: Arc<ControlPlane>,
) {
    match certificate {
        None => serve_join(connection, cp).await,
        Some(cert) => {
            let identity = BranchIdentity::of_certificate(&cert).ok().flatten();
            let own = cp.instance.branch_id.to_string();
            let peer_id = identity
                .filter(|id| id.issuer_branch == own)
                .and_then(|id| Uuid::parse_str(&id.peer_branch).ok());
            let Some(peer_id) = peer_id else {
                tracing::warn!(
                    "branch connection without a branch identity of this branch; closing"
                );
                tether_transport::close(&connection, CloseCode::Unauthenticated);
                return;
            };
            match cp.store.branch_peer(None, peer_id).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::warn!(branch_id = %peer_id, "connection from a branch that is no longer a peer; closing");
                    tether_transport::close(&connection, CloseCode::Revoked);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not look the peer up; closing");
                    tether_transport::close(&connection, CloseCode::ShuttingDown);
                    return;
                }
            }
            serve_peer(connection, peer_id, cp)
                .instrument(tracing::info_span!("branch_peer", branch_id = %peer_id))
                .await
        }
    }
}

async fn serve_join(connection: quinn::Connection, cp: Arc<ControlPlane>) {
    let Some((mut stream, first)) = first_request(&connection).await else {
        return;
    };
    let join = match (
        classify_branch_request(BranchPeerKind::Unauthenticated, &first),
        first,
    ) {
        (Ok(()), BranchRequest::Join(join)) => join,
        (verdict, _) => {
            let message = match verdict {
                Err(violation) => violation.to_string(),
                Ok(()) => "expected a join".to_string(),
            };
            let _ = stream
                .send(&refused(RefusalCode::Unauthorized, message.clone()))
                .await;
            tracing::warn!(%message, "unauthenticated branch connection did not join; closing");
            let _ = stream.finish();
            tether_transport::close(&connection, CloseCode::Unauthenticated);
            return;
        }
    };
    let span = tracing::info_span!("branch_join", branch_id = %join.branch_id);
    async {
        match accept_join(&cp, &mut stream, join).await {
            Ok(peer) => tracing::info!(name = %peer.name, address = %peer.address, "branch peered"),
            Err(message) => tracing::warn!(%message, "branch join refused"),
        }
        let _ = stream.finish();
        // Let the joiner read the last answer before the connection goes.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), connection.closed()).await;
    }
    .instrument(span)
    .await
}

async fn first_request(
    connection: &quinn::Connection,
) -> Option<(BranchServerStream, BranchRequest)> {
    let first = tokio::time::timeout(crate::config::FIRST_FRAME_TIMEOUT, async {
        let (send, recv) = connection.accept_bi().await?;
        let mut stream = BranchServerStream::new(send, recv);
        let request = stream.recv_required().await?;
        Ok::<_, tether_transport::TransportError>((stream, request))
    })
    .await;
    match first {
        Ok(Ok(first)) => Some(first),
        _ => {
            tether_transport::close(connection, CloseCode::ProtocolViolation);
            None
        }
    }
}

/// Redeems the invite, exchanges CAs, keys and certificates, stores the peering.
async fn accept_join(
    cp: &ControlPlane,
    stream: &mut BranchServerStream,
    join: JoinRequest,
) -> Result<BranchPeer, String> {
    async fn refuse(
        stream: &mut BranchServerStream,
        code: RefusalCode,
        message: &str,
    ) -> Result<BranchPeer, String> {
        let _ = stream.send(&refused(code, message)).await;
        Err(message.to_string())
    }
    let (Ok(invite_id), Ok(joiner_id)) = (
        Uuid::parse_str(&join.invite_id),
        Uuid::parse_str(&join.branch_id),
    ) else {
        return refuse(
            stream,
            RefusalCode::Invalid,
            "invite or branch id is not a UUID",
        )
        .await;
    };
    if joiner_id == cp.instance.branch_id {
        return refuse(
            stream,
            RefusalCode::Invalid,
            "a branch cannot peer with itself",
        )
        .await;
    }
    let joiner_ca = match tether_certs::authority::pem_to_der(&join.ca_cert_pem) {
        Ok(der) if CertificateInfo::from_der(&der).is_ok() => der,
        _ => {
            return refuse(
                stream,
                RefusalCode::Invalid,
                "the joiner's CA certificate is not valid",
            )
            .await
        }
    };
    let for_joiner = match cp.pki.ca.sign_branch_csr(
        &join.csr_der,
        &BranchIdentity::new(cp.instance.branch_id.to_string(), joiner_id.to_string()),
        BRANCH_CERT_LIFETIME,
    ) {
        Ok(cert) => cert,
        Err(_) => {
            return refuse(
                stream,
                RefusalCode::Invalid,
                "the CSR is not a valid P-256 request",
            )
            .await
        }
    };
    let invite = match cp
        .store
        .redeem_branch_invite(
            invite_id,
            &invite::secret_hash(&join.secret),
            &join.branch_id,
            Utc::now(),
        )
        .await
    {
        Ok(Some(invite)) => invite,
        Ok(None) => {
            return refuse(
                stream,
                RefusalCode::Unauthorized,
                "the invite is unknown, used or expired",
            )
            .await
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not redeem the invite");
            return refuse(
                stream,
                RefusalCode::Unavailable,
                "the invite could not be checked",
            )
            .await;
        }
    };
    // A known branch id is only re-peered by the same CA into the same
    // organization: a join must not take over another peering.
    let joiner_fingerprint = tether_certs::CaFingerprint::of_der(&joiner_ca);
    match super::check_peering_rule(cp, joiner_id, invite.organization_id, &joiner_fingerprint)
        .await
    {
        Ok(_) => {}
        Err(super::FederationError::BranchIdTaken(_)) => return refuse(
            stream,
            RefusalCode::Forbidden,
            "this branch id is already peered here, in another organization or under another CA",
        )
        .await,
        Err(e) => {
            tracing::warn!(error = %e, "could not check the peering rule");
            return refuse(
                stream,
                RefusalCode::Unavailable,
                "the peering could not be checked",
            )
            .await;
        }
    }
    let client_key = match tether_certs::AgentKey::generate() {
        Ok(key) => key,
        Err(_) => return refuse(stream, RefusalCode::Unavailable, "key generation failed").await,
    };
    let (Ok(csr_der), Ok(keys)) = (
        client_key.csr_der(&cp.instance.branch_id.to_string()),
        cp.federation.keys.published(&*cp.store, &cp.sealer).await,
    ) else {
        return refuse(
            stream,
            RefusalCode::Unavailable,
            "keys could not be prepared",
        )
        .await;
    };
    let accepted = JoinAccepted {
        branch_id: cp.instance.branch_id.to_string(),
        name: cp.instance.branch_name.clone(),
        ca_cert_pem: cp.pki.ca.cert_pem().to_string(),
        keys,
        certificate_chain: vec![for_joiner.to_vec(), cp.pki.ca.cert_der().to_vec()],
        csr_der,
        scopes: invite.scopes.clone(),
        organization_id: invite.organization_id.to_string(),
    };
    if stream
        .send(&BranchResponse::Joined(accepted))
        .await
        .is_err()
    {
        return Err("joiner went away".into());
    }
    let chain = match stream.recv_required().await {
        Ok(BranchRequest::JoinCertificate { certificate_chain }) => certificate_chain,
        _ => {
            return refuse(
                stream,
                RefusalCode::Invalid,
                "expected the join certificate",
            )
            .await
        }
    };
    // The certificate must be issued by the joiner's CA to this branch.
    let leaf_ok = chain.len() == 2
        && chain[1] == joiner_ca.as_ref()
        && BranchIdentity::of_certificate(&chain[0]).ok().flatten()
            == Some(BranchIdentity::new(
                joiner_id.to_string(),
                cp.instance.branch_id.to_string(),
            ));
    if !leaf_ok {
        return refuse(
            stream,
            RefusalCode::Invalid,
            "the join certificate does not name this branch under the joiner's CA",
        )
        .await;
    }
    let now = Utc::now();
    let peer = BranchPeer {
        id: joiner_id,
        organization_id: invite.organization_id,
        name: join.name.clone(),
        address: join.address.clone(),
        ca_cert_pem: join.ca_cert_pem.clone(),
        client_chain: chain,
        client_key_sealed: cp.sealer.seal(
            client_key.to_pem().as_bytes(),
            &branch_client_key_context(joiner_id),
        ),
        peer_keys: join.keys.clone(),
        granted_scopes: invite.scopes.clone(),
        remote_scopes: join.scopes.clone(),
        remote_organization_id: join.organization_id.clone(),
        status: BranchStatus::Healthy,
        last_seen_at: Some(now),
        latency_ms: None,
        server_count: 0,
        created_at: now,
    };
    match cp.store.upsert_branch_peer(&peer).await {
        Ok(true) => {}
        Ok(false) => return refuse(
            stream,
            RefusalCode::Forbidden,
            "this branch id is already peered here, in another organization or under another CA",
        )
        .await,
        Err(e) => {
            tracing::warn!(error = %e, "could not store the peering");
            return refuse(
                stream,
                RefusalCode::Unavailable,
                "the peering could not be stored",
            )
            .await;
        }
    }
    let _ = stream.send(&BranchResponse::JoinCompleted).await;
    Ok(peer)
}

async fn serve_peer(connection: quinn::Connection, peer_id: Uuid, cp: Arc<ControlPlane>) {
    loop {
        let (send, recv) = tokio::select! {
            _ = cp.shutdown.cancelled() => {
                tether_transport::close(&connection, CloseCode::ShuttingDown);
                return;
            }
            accepted = connection.accept_bi() => match accepted {
                Ok(pair) => pair,
                Err(_) => return,
            },
        };
        let cp = cp.clone();
        let connection = connection.clone();
        tokio::spawn(
            async move {
                let mut stream = BranchServerStream::new(send, recv);
                let Ok(request) = stream.recv_required().await else {
                    return;
                };
                let (answer, close) = answer_call(&cp, peer_id, request).await;
                let _ = stream.send(&answer).await;
                let _ = stream.finish();
                if close {
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_millis(500), stream.recv())
                            .await;
                    tether_transport::close(&connection, CloseCode::Revoked);
                }
            }
            .in_current_span(),
        );
    }
}

/// Verifies the call's token against the peering and answers it. The
/// boolean says the connection must close afterwards (peering removed).
async fn answer_call(
    cp: &Arc<ControlPlane>,
    peer_id: Uuid,
    request: BranchRequest,
) -> (BranchResponse, bool) {
    let (token, call) = match (
        classify_branch_request(BranchPeerKind::Peer, &request),
        request,
    ) {
        (Ok(()), BranchRequest::Call { token, call }) => (token, call),
        (Err(violation), _) => {
            return (refused(RefusalCode::Invalid, violation.to_string()), false)
        }
        (Ok(()), _) => return (refused(RefusalCode::Invalid, "not a call"), false),
    };
    let peer = match cp.store.branch_peer(None, peer_id).await {
        Ok(Some(peer)) => peer,
        Ok(None) => return (refused(RefusalCode::NotFound, "no such peering"), true),
        Err(e) => {
            tracing::warn!(error = %e, "could not load the peering");
            return (
                refused(RefusalCode::Unavailable, "store unavailable"),
                false,
            );
        }
    };
    let claims = match cp.federation.verified.verify(
        &token,
        &peer.peer_keys,
        peer.id,
        cp.instance.branch_id,
        Utc::now(),
    ) {
        Ok(claims) => claims,
        Err(e) => {
            tracing::warn!(reason = %e, "refused a branch token");
            return (refused(RefusalCode::Unauthorized, e.to_string()), false);
        }
    };
    if let Err(e) = keys::authorize(
        &claims,
        peer.organization_id,
        &peer.granted_scopes,
        call.required_scope(),
    ) {
        tracing::warn!(reason = %e, "refused a branch call");
        return (refused(RefusalCode::Forbidden, e.to_string()), false);
    }
    let scope = match cp.store.organization_scope(peer.organization_id).await {
        Ok(scope) => scope,
        Err(_) => {
            return (
                refused(RefusalCode::Unavailable, "store unavailable"),
                false,
            )
        }
    };
    match call {
        BranchCall::Heartbeat { sent_at_ms } => {
            let keys = match cp.federation.keys.published(&*cp.store, &cp.sealer).await {
                Ok(keys) => keys,
                Err(_) => return (refused(RefusalCode::Unavailable, "keys unavailable"), false),
            };
            let servers = published_servers(cp, &scope).await.unwrap_or_default();
            (
                BranchResponse::HeartbeatAck {
                    sent_at_ms,
                    keys,
                    server_count: servers.len() as u32,
                },
                false,
            )
        }
        BranchCall::Inventory => match published_servers(cp, &scope).await {
            Ok(servers) => (BranchResponse::Inventory(servers), false),
            Err(_) => (
                refused(RefusalCode::Unavailable, "store unavailable"),
                false,
            ),
        },
        BranchCall::Unpeer => {
            cp.federation.forget(peer.id);
            match cp.store.delete_branch_peer(None, peer.id).await {
                Ok(_) => {
                    tracing::info!("peer removed the peering; removed here too");
                    (BranchResponse::Unpeered, true)
                }
                Err(_) => (
                    refused(RefusalCode::Unavailable, "store unavailable"),
                    false,
                ),
            }
        }
        call @ (BranchCall::RunCommand(_)
        | BranchCall::CommandState { .. }
        | BranchCall::AwaitCommand { .. }
        | BranchCall::CancelCommand { .. }
        | BranchCall::ServerHealth { .. }
        | BranchCall::RunHealthChecks { .. }) => {
            (super::relay::answer(cp, &peer, &scope, call).await, false)
        }
    }
}

/// The servers of the peering's organization tree, as published to peers.
async fn published_servers(
    cp: &ControlPlane,
    scope: &[Uuid],
) -> Result<Vec<PublishedServer>, crate::store::StoreError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = cp
            .store
            .list_servers(&ServerQuery {
                scope: scope.to_vec(),
                status: None,
                labels: Vec::new(),
                limit: 500,
                after,
            })
            .await?;
        let done = page.len() < 500;
        after = page.last().map(|s| s.id);
        out.extend(page);
        if done {
            break;
        }
    }
    let latest: std::collections::HashMap<Uuid, crate::store::MetricsRecord> = cp
        .store
        .latest_metrics(scope)
        .await?
        .into_iter()
        .map(|m| (m.server_id, m))
        .collect();
    Ok(out
        .into_iter()
        .map(|s| {
            let metrics = latest.get(&s.id);
            PublishedServer {
                id: s.id.to_string(),
                name: s.name,
                hostname: s.hostname,
                labels: s.labels.into_iter().collect(),
                status: s.status.as_str().to_string(),
                last_seen_at_ms: s.last_seen_at.map(|t| t.timestamp_millis()),
                agent_version: s.agent_version,
                cpu_percent: metrics.map(|m| m.cpu_percent),
                memory_used_bytes: metrics.and_then(|m| u64::try_from(m.memory_used_bytes).ok()),
                memory_total_bytes: metrics.and_then(|m| u64::try_from(m.memory_total_bytes).ok()),
            }
        })
        .collect())
}
