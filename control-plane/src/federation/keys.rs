//! Inter-branch JWTs: this branch's ES256 signing keys (sealed in the store,
//! rotated on a schedule, published to peers with a lead time) and the
//! verification of a peer's tokens against the keys it published.
//!
//! Rules a token must pass (anything else is a [`BranchTokenError`]):
//! header `alg` exactly `ES256` (so `none` and HMAC are refused) with a
//! `kid` the peer published and has not expired; signature valid; `iss` the
//! peer's branch id (the one its certificate names), `aud` this branch's id,
//! `exp` in the future (5 s leeway); `org` the organization the peering acts
//! in; the call's scope both in the token and in what the invite granted.

use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use tether_protocol::VerificationKey;
use uuid::Uuid;

use crate::secrets::Sealer;
use crate::store::{federation_key_context, FederationKey, Store, StoreError};

/// Lifetime of one inter-branch token.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A signing key is replaced after this long.
pub const ROTATION_PERIOD: Duration = Duration::from_secs(24 * 3600);
/// A new key is published this long before it signs anything, so peers
/// learn it (from heartbeat answers) before they meet a token under it.
pub const PUBLISH_LEAD: Duration = Duration::from_secs(60);
/// Clock skew tolerated on `exp`.
const LEEWAY_SECONDS: u64 = 5;

/// Claims of an inter-branch token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BranchClaims {
    /// Calling branch id.
    pub iss: String,
    /// Called branch id.
    pub aud: String,
    /// The callee's organization the call acts in.
    pub org: String,
    pub scopes: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// Why a peer's token was refused. Messages never echo the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BranchTokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm must be ES256")]
    WrongAlgorithm,
    #[error("token names no key id")]
    MissingKeyId,
    #[error("token is signed with a key this branch does not know")]
    UnknownKey,
    #[error("token is signed with a retired key past its validity")]
    RetiredKey,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not meant for this branch or not from this peer")]
    WrongParty,
    #[error("token acts for another organization than the peering's")]
    WrongOrganization,
    #[error("token lacks the {0} scope")]
    MissingScope(&'static str),
    #[error("the peering does not grant the {0} scope")]
    NotGranted(&'static str),
}

/// Errors handling this branch's keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("signing key could not be generated or loaded")]
    Crypto,
    #[error("signing key could not be opened: {0}")]
    Sealed(#[from] crate::secrets::SecretError),
}

/// A generated key: PKCS#8 DER of the private key and the public coordinates.
pub struct GeneratedKey {
    pub pkcs8: Vec<u8>,
    pub x: String,
    pub y: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("x", &self.x)
            .finish_non_exhaustive()
    }
}

/// A fresh ES256 key.
pub fn generate_key() -> Result<GeneratedKey, KeyError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| KeyError::Crypto)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| KeyError::Crypto)?;
    let point = pair.public_key().as_ref();
    // Uncompressed point: 0x04 || x (32) || y (32).
    if point.len() != 65 {
        return Err(KeyError::Crypto);
    }
    Ok(GeneratedKey {
        pkcs8: pkcs8.as_ref().to_vec(),
        x: URL_SAFE_NO_PAD.encode(&point[1..33]),
        y: URL_SAFE_NO_PAD.encode(&point[33..65]),
    })
}

/// Signs `claims` with `pkcs8` under `kid`.
pub fn sign(kid: &str, pkcs8: &[u8], claims: &BranchClaims) -> Result<String, KeyError> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(pkcs8))
        .map_err(|_| KeyError::Crypto)
}

/// Verifies a peer's token. `keys` are the keys the peer published;
/// `peer` its branch id (from its certificate), `own` this branch's id.
pub fn verify(
    token: &str,
    keys: &[VerificationKey],
    peer: Uuid,
    own: Uuid,
    now: DateTime<Utc>,
) -> Result<BranchClaims, BranchTokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        // `alg: none` and unknown algorithms do not even parse as a header.
        jsonwebtoken::errors::ErrorKind::Json(_) => BranchTokenError::WrongAlgorithm,
        _ => BranchTokenError::Malformed,
    })?;
    if header.alg != Algorithm::ES256 {
        return Err(BranchTokenError::WrongAlgorithm);
    }
    let kid = header.kid.ok_or(BranchTokenError::MissingKeyId)?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or(BranchTokenError::UnknownKey)?;
    if key.not_after.is_some_and(|t| now.timestamp() > t) {
        return Err(BranchTokenError::RetiredKey);
    }
    let decoding = DecodingKey::from_ec_components(&key.x, &key.y)
        .map_err(|_| BranchTokenError::UnknownKey)?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.leeway = LEEWAY_SECONDS;
    validation.set_audience(&[own.to_string()]);
    validation.set_issuer(&[peer.to_string()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data =
        jsonwebtoken::decode::<BranchClaims>(token, &decoding, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => BranchTokenError::Expired,
            jsonwebtoken::errors::ErrorKind::InvalidSignature => BranchTokenError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAudience
            | jsonwebtoken::errors::ErrorKind::InvalidIssuer => BranchTokenError::WrongParty,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => BranchTokenError::WrongAlgorithm,
            _ => BranchTokenError::Malformed,
        })?;
    Ok(data.claims)
}

/// Tokens this branch verified, by SHA-256 of their text, so a peer that
/// reuses a token (see [`TokenCache`]) pays the signature check once. A hit
/// still checks the token's expiry and that the key that signed it is one
/// the peer publishes now and not past its `not_after`.
#[derive(Default)]
pub struct VerifiedTokens {
    map: Mutex<std::collections::HashMap<[u8; 32], VerifiedToken>>,
}

struct VerifiedToken {
    peer: Uuid,
    kid: String,
    x: String,
    claims: BranchClaims,
}

/// Verified tokens remembered at most (expired ones are dropped first).
const MAX_VERIFIED_TOKENS: usize = 4096;

impl VerifiedTokens {
    /// [`verify`], answered from memory for a token verified before.
    pub fn verify(
        &self,
        token: &str,
        keys: &[VerificationKey],
        peer: Uuid,
        own: Uuid,
        now: DateTime<Utc>,
    ) -> Result<BranchClaims, BranchTokenError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let leeway = LEEWAY_SECONDS as i64;
        let at = now.timestamp();
        {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = map.get(&digest) {
                let key_still_valid = keys.iter().any(|k| {
                    k.kid == hit.kid && k.x == hit.x && k.not_after.is_none_or(|t| at <= t)
                });
                if hit.peer == peer && at <= hit.claims.exp + leeway && key_still_valid {
                    return Ok(hit.claims.clone());
                }
            }
        }
        let claims = verify(token, keys, peer, own, now)?;
        let kid = jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid);
        if let Some(key) = kid.and_then(|kid| keys.iter().find(|k| k.kid == kid)) {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= MAX_VERIFIED_TOKENS {
                map.retain(|_, v| at <= v.claims.exp + leeway);
                if map.len() >= MAX_VERIFIED_TOKENS {
                    map.clear();
                }
            }
            map.insert(
                digest,
                VerifiedToken {
                    peer,
                    kid: key.kid.clone(),
                    x: key.x.clone(),
                    claims: claims.clone(),
                },
            );
        }
        Ok(claims)
    }
}

/// Tokens this branch signed for its peers, reused while at least
/// [`TOKEN_REUSE_MARGIN`] of their life remains (a token is a bearer of the
/// peering's grant inside the peering's mutual-TLS connection; reusing it
/// saves a signature per call here and a verification per call there).
#[derive(Default)]
pub struct TokenCache {
    map: Mutex<std::collections::HashMap<Uuid, CachedToken>>,
}

struct CachedToken {
    token: String,
    org: String,
    scopes: Vec<String>,
    exp: i64,
}

/// A cached token is used only while it has at least this long to live.
pub const TOKEN_REUSE_MARGIN: Duration = Duration::from_secs(30);

impl TokenCache {
    /// A token for a call to `peer` with `claims` (made by [`claims_for`]):
    /// a cached one for the same organization and scopes, or `claims`
    /// signed by `ring`.
    pub async fn token_for(
        &self,
        ring: &KeyRing,
        store: &dyn Store,
        sealer: &Sealer,
        peer: Uuid,
        claims: BranchClaims,
    ) -> Result<String, KeyError> {
        let now = Utc::now().timestamp();
        let margin = TOKEN_REUSE_MARGIN.as_secs() as i64;
        {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = map.get(&peer) {
                if c.org == claims.org && c.scopes == claims.scopes && now + margin <= c.exp {
                    return Ok(c.token.clone());
                }
            }
        }
        let token = ring.sign(store, sealer, &claims).await?;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            peer,
            CachedToken {
                token: token.clone(),
                org: claims.org,
                scopes: claims.scopes,
                exp: claims.exp,
            },
        );
        Ok(token)
    }
}

/// Checks what a verified token may do: the organization of the peering,
/// and `scope` both in the token and granted by the invite.
pub fn authorize(
    claims: &BranchClaims,
    organization_id: Uuid,
    granted: &[String],
    scope: Option<&'static str>,
) -> Result<(), BranchTokenError> {
    if claims.org != organization_id.to_string() {
        return Err(BranchTokenError::WrongOrganization);
    }
    if let Some(scope) = scope {
        if !claims.scopes.iter().any(|s| s == scope) {
            return Err(BranchTokenError::MissingScope(scope));
        }
        if !granted.iter().any(|s| s == scope) {
            return Err(BranchTokenError::NotGranted(scope));
        }
    }
    Ok(())
}

/// This branch's signing keys as loaded from the store.
#[derive(Default)]
pub struct KeyRing {
    cache: Mutex<Option<(Vec<FederationKey>, DateTime<Utc>)>>,
}

/// How long the key list is cached before it is read again (other
/// replicas may have rotated).
const CACHE_FOR: chrono::Duration = chrono::Duration::seconds(30);

impl KeyRing {
    async fn keys(
        &self,
        store: &dyn Store,
        sealer: &Sealer,
    ) -> Result<Vec<FederationKey>, KeyError> {
        let now = Utc::now();
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .filter(|(_, at)| now - *at < CACHE_FOR);
        let mut keys = match cached {
            Some((keys, _)) => keys,
            None => store.federation_keys().await?,
        };
        let rotation = chrono::Duration::from_std(ROTATION_PERIOD).unwrap_or(chrono::Duration::MAX);
        let due = keys
            .iter()
            .filter(|k| k.retired_at.is_none())
            .map(|k| k.created_at)
            .max()
            .is_none_or(|newest| now - newest >= rotation);
        if due {
            let generated = generate_key()?;
            let kid = Uuid::now_v7();
            let key = FederationKey {
                kid,
                private_key_sealed: sealer.seal(&generated.pkcs8, &federation_key_context(kid)),
                x: generated.x,
                y: generated.y,
                created_at: now,
                retired_at: None,
            };
            store.rotate_federation_key(&key).await?;
            tracing::info!(kid = %kid, "federation signing key rotated");
            keys = store.federation_keys().await?;
        }
        if let Ok(mut cache) = self.cache.lock() {
            *cache = Some((keys.clone(), now));
        }
        Ok(keys)
    }

    /// The keys peers should accept now (the current one, one still in
    /// its publish lead, and retired ones until their last token expired).
    pub async fn published(
        &self,
        store: &dyn Store,
        sealer: &Sealer,
    ) -> Result<Vec<VerificationKey>, KeyError> {
        let now = Utc::now();
        let grace = chrono::Duration::from_std(PUBLISH_LEAD + TOKEN_LIFETIME)
            .unwrap_or(chrono::Duration::zero());
        Ok(self
            .keys(store, sealer)
            .await?
            .into_iter()
            .filter(|k| k.retired_at.is_none_or(|r| r + grace > now))
            .map(|k| VerificationKey {
                kid: k.kid.to_string(),
                x: k.x,
                y: k.y,
                not_after: k.retired_at.map(|r| (r + grace).timestamp()),
            })
            .collect())
    }

    /// Signs `claims` with the key that signs now: the newest key past its
    /// publish lead (or the only one, on a fresh branch).
    pub async fn sign(
        &self,
        store: &dyn Store,
        sealer: &Sealer,
        claims: &BranchClaims,
    ) -> Result<String, KeyError> {
        let now = Utc::now();
        let lead = chrono::Duration::from_std(PUBLISH_LEAD).unwrap_or(chrono::Duration::zero());
        let keys = self.keys(store, sealer).await?;
        let usable: Vec<&FederationKey> = keys
            .iter()
            .filter(|k| k.retired_at.is_none_or(|r| r + lead > now))
            .collect();
        let key = usable
            .iter()
            .rev()
            .find(|k| k.created_at + lead <= now)
            .or_else(|| usable.last())
            .ok_or(KeyError::Crypto)?;
        let pkcs8 = sealer.open(&key.private_key_sealed, &federation_key_context(key.kid))?;
        sign(&key.kid.to_string(), &pkcs8, claims)
    }
}

/// Claims for a call from `own` to `peer` acting in `org` with `scopes`.
pub fn claims_for(own: Uuid, peer: Uuid, org: &str, scopes: &[String]) -> BranchClaims {
    let now = Utc::now().timestamp();
    BranchClaims {
        iss: own.to_string(),
        aud: peer.to_string(),
        org: org.to_string(),
        scopes: scopes.to_vec(),
        iat: now,
        exp: now + TOKEN_LIFETIME.as_secs() as i64,
        jti: Uuid::new_v4().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (GeneratedKey, Vec<VerificationKey>, Uuid, Uuid) {
        let key = generate_key().unwrap();
        let published = vec![VerificationKey {
            kid: "k1".into(),
            x: key.x.clone(),
            y: key.y.clone(),
            not_after: None,
        }];
        (key, published, Uuid::now_v7(), Uuid::now_v7())
    }

    #[test]
    fn a_token_signed_with_a_published_key_verifies() {
        let (key, published, peer, own) = setup();
        let claims = claims_for(peer, own, "org", &["servers:read".into()]);
        let token = sign("k1", &key.pkcs8, &claims).unwrap();
        let verified = verify(&token, &published, peer, own, Utc::now()).unwrap();
        assert_eq!(verified.scopes, vec!["servers:read".to_string()]);
    }

    #[test]
    fn a_remembered_token_is_refused_on_another_peering_or_once_its_key_is_withdrawn() {
        let (key, mut published, peer, own) = setup();
        // The peer's claims: issued by `peer` for `own`.
        let claims = claims_for(peer, own, "org", &["servers:read".into()]);
        let token = sign("k1", &key.pkcs8, &claims).unwrap();
        let verified = VerifiedTokens::default();
        let now = Utc::now();
        assert!(verified.verify(&token, &published, peer, own, now).is_ok());
        // Answered again from memory.
        assert!(verified.verify(&token, &published, peer, own, now).is_ok());
        // Presented on another peering.
        assert_eq!(
            verified
                .verify(&token, &published, Uuid::now_v7(), own, now)
                .unwrap_err(),
            BranchTokenError::WrongParty
        );
        // Its key is no longer published.
        let other = generate_key().unwrap();
        published[0].x = other.x;
        published[0].y = other.y;
        assert_eq!(
            verified
                .verify(&token, &published, peer, own, now)
                .unwrap_err(),
            BranchTokenError::BadSignature
        );
    }

    #[test]
    fn forged_expired_and_misaddressed_tokens_are_refused() {
        let (key, published, peer, own) = setup();
        let other = generate_key().unwrap();
        let claims = claims_for(peer, own, "org", &[]);
        // Another key under a published kid.
        let token = sign("k1", &other.pkcs8, &claims).unwrap();
        assert_eq!(
            verify(&token, &published, peer, own, Utc::now()).unwrap_err(),
            BranchTokenError::BadSignature
        );
        // An unknown kid.
        let token = sign("k2", &key.pkcs8, &claims).unwrap();
        assert_eq!(
            verify(&token, &published, peer, own, Utc::now()).unwrap_err(),
            BranchTokenError::UnknownKey
        );
        // alg: none.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let token = format!("{header}.{body}.");
        assert_eq!(
            verify(&token, &published, peer, own, Utc::now()).unwrap_err(),
            BranchTokenError::WrongAlgorithm
        );
        // Expired.
        let mut old = claims.clone();
        old.exp = Utc::now().timestamp() - 120;
        let token = sign("k1", &key.pkcs8, &old).unwrap();
        assert_eq!(
            verify(&token, &published, peer, own, Utc::now()).unwrap_err(),
            BranchTokenError::Expired
        );
        // For another branch.
        let token = sign("k1", &key.pkcs8, &claims).unwrap();
        assert_eq!(
            verify(&token, &published, peer, Uuid::now_v7(), Utc::now()).unwrap_err(),
            BranchTokenError::WrongParty
        );
    }

    #[test]
    fn retired_keys_verify_only_until_their_not_after() {
        let (key, mut published, peer, own) = setup();
        let now = Utc::now();
        published[0].not_after = Some(now.timestamp() + 30);
        let token = sign("k1", &key.pkcs8, &claims_for(peer, own, "o", &[])).unwrap();
        assert!(verify(&token, &published, peer, own, now).is_ok());
        assert_eq!(
            verify(
                &token,
                &published,
                peer,
                own,
                now + chrono::Duration::seconds(31)
            )
            .unwrap_err(),
            BranchTokenError::RetiredKey
        );
    }

    #[test]
    fn authorization_needs_the_scope_in_the_token_and_the_grant() {
        let org = Uuid::now_v7();
        let claims = claims_for(
            Uuid::now_v7(),
            Uuid::now_v7(),
            &org.to_string(),
            &["servers:read".into()],
        );
        let granted = vec!["servers:read".to_string()];
        assert!(authorize(&claims, org, &granted, Some("servers:read")).is_ok());
        assert_eq!(
            authorize(&claims, org, &granted, Some("commands:run")).unwrap_err(),
            BranchTokenError::MissingScope("commands:run")
        );
        let mut wide = claims.clone();
        wide.scopes.push("commands:run".into());
        assert_eq!(
            authorize(&wide, org, &granted, Some("commands:run")).unwrap_err(),
            BranchTokenError::NotGranted("commands:run")
        );
        assert_eq!(
            authorize(&claims, Uuid::now_v7(), &granted, None).unwrap_err(),
            BranchTokenError::WrongOrganization
        );
    }

    #[tokio::test]
    async fn a_rotated_key_signs_only_after_its_publish_lead_and_the_retired_one_stays_published() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = crate::store::open(&url).await.unwrap();
        let sealer = Sealer::new(crate::secrets::MasterKey::generate());
        // A key made 25 h ago: rotation is due.
        let old = generate_key().unwrap();
        let old_kid = Uuid::now_v7();
        store
            .rotate_federation_key(&FederationKey {
                kid: old_kid,
                private_key_sealed: sealer.seal(&old.pkcs8, &federation_key_context(old_kid)),
                x: old.x.clone(),
                y: old.y.clone(),
                created_at: Utc::now() - chrono::Duration::hours(25),
                retired_at: None,
            })
            .await
            .unwrap();
        let ring = KeyRing::default();
        let (own, peer) = (Uuid::now_v7(), Uuid::now_v7());
        let token = ring
            .sign(&*store, &sealer, &claims_for(own, peer, "o", &[]))
            .await
            .unwrap();
        let keys = store.federation_keys().await.unwrap();
        assert_eq!(keys.len(), 2, "rotation did not add a key");
        // Within the lead the retired key still signs...
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        assert_eq!(kid, old_kid.to_string());
        // ...and both are published, the retired one with an end.
        let published = ring.published(&*store, &sealer).await.unwrap();
        assert_eq!(published.len(), 2);
        let retired = published
            .iter()
            .find(|k| k.kid == old_kid.to_string())
            .unwrap();
        assert!(retired
            .not_after
            .is_some_and(|t| t > Utc::now().timestamp()));
        let current = published
            .iter()
            .find(|k| k.kid != old_kid.to_string())
            .unwrap();
        assert_eq!(current.not_after, None);
        assert!(verify(&token, &published, own, peer, Utc::now()).is_ok());
    }
}
