//! Admin API tokens: JWTs signed by the control plane, and scopes.
//!
//! Tokens are HS256 JWTs signed with a random instance secret kept sealed in
//! the store, so every replica verifies them and rotating the master key
//! leaves them valid. The algorithm is pinned
//! (`none` and any other algorithm are refused). Each token carries its
//! organization, scopes and id (`jti`); the id's row in the store is checked on
//! every request, so revocation takes effect at once on every replica.

use chrono::{DateTime, Utc};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Issuer claim of every token.
const ISSUER: &str = "tether";

/// A permission a token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Scope {
    #[serde(rename = "admin")]
    Admin,
    #[serde(rename = "servers:read")]
    ServersRead,
    #[serde(rename = "servers:write")]
    ServersWrite,
    #[serde(rename = "commands:run")]
    CommandsRun,
    #[serde(rename = "infrastructure:provision")]
    InfrastructureProvision,
    #[serde(rename = "infrastructure:destroy")]
    InfrastructureDestroy,
    #[serde(rename = "infrastructure:approve")]
    InfrastructureApprove,
    #[serde(rename = "webhooks:write")]
    WebhooksWrite,
    #[serde(rename = "branches:write")]
    BranchesWrite,
}

impl Scope {
    /// Every scope, in the order the documentation lists them.
    pub const ALL: [Scope; 9] = [
        Self::Admin,
        Self::ServersRead,
        Self::ServersWrite,
        Self::CommandsRun,
        Self::InfrastructureProvision,
        Self::InfrastructureDestroy,
        Self::InfrastructureApprove,
        Self::WebhooksWrite,
        Self::BranchesWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::ServersRead => "servers:read",
            Self::ServersWrite => "servers:write",
            Self::CommandsRun => "commands:run",
            Self::InfrastructureProvision => "infrastructure:provision",
            Self::InfrastructureDestroy => "infrastructure:destroy",
            Self::InfrastructureApprove => "infrastructure:approve",
            Self::WebhooksWrite => "webhooks:write",
            Self::BranchesWrite => "branches:write",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// Claims of an API token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Token id (the store row).
    pub jti: Uuid,
    /// Organization the token acts for.
    pub org: Uuid,
    pub scopes: Vec<Scope>,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

/// Why a bearer token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed or its signature does not verify")]
    Invalid,
    #[error("token has expired")]
    Expired,
}

/// Signs and verifies API tokens.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuthority(<key>)")
    }
}

impl TokenAuthority {
    /// An authority signing with `secret` (at least 32 random bytes).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// Signs a token for `org` with `scopes`, valid until `expires_at`.
    pub fn issue(
        &self,
        id: Uuid,
        org: Uuid,
        scopes: Vec<Scope>,
        issued_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> String {
        let claims = TokenClaims {
            jti: id,
            org,
            scopes,
            iss: ISSUER.into(),
            iat: issued_at.timestamp(),
            exp: expires_at.timestamp(),
        };
        // HS256 over serialisable claims cannot fail.
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).unwrap_or_default()
    }

    /// Verifies signature, algorithm, issuer and expiry.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.leeway = 0;
        decode::<TokenClaims>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn authority() -> TokenAuthority {
        let secret: [u8; 32] = rand::random();
        TokenAuthority::new(&secret)
    }

    #[test]
    fn issued_token_verifies_with_its_claims() {
        let auth = authority();
        let (id, org) = (Uuid::now_v7(), Uuid::now_v7());
        let now = Utc::now();
        let token = auth.issue(
            id,
            org,
            vec![Scope::ServersRead],
            now,
            now + chrono::Duration::hours(1),
        );
        let claims = auth.verify(&token).unwrap();
        assert_eq!((claims.jti, claims.org), (id, org));
        assert_eq!(claims.scopes, vec![Scope::ServersRead]);
    }

    #[test]
    fn token_from_another_key_or_expired_or_alg_none_is_refused() {
        let now = Utc::now();
        let (a, b) = (authority(), authority());
        let token = a.issue(
            Uuid::now_v7(),
            Uuid::now_v7(),
            vec![Scope::Admin],
            now,
            now + chrono::Duration::hours(1),
        );
        assert!(matches!(b.verify(&token), Err(TokenError::Invalid)));
        let expired = a.issue(
            Uuid::now_v7(),
            Uuid::now_v7(),
            vec![Scope::Admin],
            now,
            now - chrono::Duration::seconds(5),
        );
        assert!(matches!(a.verify(&expired), Err(TokenError::Expired)));
        // Same claims, header rewritten to alg none and the signature dropped.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = token.split('.').nth(1).unwrap();
        let forged = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            claims
        );
        assert!(a.verify(&forged).is_err());
    }

    #[test]
    fn scope_names_match_the_contract() {
        for s in [
            "admin",
            "servers:read",
            "servers:write",
            "commands:run",
            "infrastructure:provision",
            "infrastructure:destroy",
            "infrastructure:approve",
            "webhooks:write",
            "branches:write",
        ] {
            assert_eq!(Scope::parse(s).unwrap().as_str(), s);
        }
        assert!(Scope::parse("root").is_none());
    }
}
