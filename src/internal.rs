//! Trust between instances over HTTP: requests from one instance to another (the multi-region
//! endpoints under `/internal/v1`) carry a short-lived JWT signed with a key derived from
//! `CHATMESH_CLUSTER_SECRET`, and come from an address in `CHATMESH_INTERNAL_ALLOW`.
//!
//! The key is not the cluster secret itself nor the user-token key, and the audience is not a
//! user token's: a user token is never an internal one, nor the other way round.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::error::ApiError;

pub const AUDIENCE: &str = "chatmesh-internal";
/// The longest life an internal token may claim (`exp - iat`): a stolen one is soon useless.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);
/// The life of the tokens this instance issues.
const LIFETIME: Duration = Duration::from_secs(30);
const KEY_LABEL: &[u8] = b"chatmesh internal api v1";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
}

/// Issues this instance's internal tokens and checks other instances'.
pub struct InternalTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
}

impl InternalTokens {
    pub fn new(cluster_secret: &Secret, instance_id: &str) -> Self {
        let key = cluster_secret.derive(KEY_LABEL);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
        validation.set_audience(&[AUDIENCE]);
        Self {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            validation,
            issuer: instance_id.to_string(),
        }
    }

    /// A token naming this instance, valid for 30 s.
    pub fn issue(&self) -> String {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims { iss: self.issuer.clone(), aud: AUDIENCE.into(), iat: now, exp: now + LIFETIME.as_secs() };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of a small claim set does not fail")
    }

    /// The issuing instance of a valid internal token. One answer for every refusal.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        let refused = |why: &str| {
            tracing::debug!(reason = why, "internal token refused");
            ApiError::Unauthorized("invalid internal token".into())
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| refused(&e.to_string()))?
            .claims;
        if claims.exp.saturating_sub(claims.iat) > MAX_LIFETIME.as_secs() {
            return Err(refused("lifetime over 60 s"));
        }
        if claims.iss.is_empty() || claims.iss.len() > 128 {
            return Err(refused("no issuing instance"));
        }
        Ok(claims.iss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(key: &[u8], c: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), c, &EncodingKey::from_secret(key)).unwrap()
    }

    #[test]
    fn only_short_lived_internal_tokens_of_this_cluster_pass() {
        let secret = Secret::new("c".repeat(32));
        let n1 = InternalTokens::new(&secret, "n1");
        let n2 = InternalTokens::new(&secret, "n2");
        assert_eq!(n2.verify(&n1.issue()).unwrap(), "n1", "the issuer is the calling instance");
        let other = InternalTokens::new(&Secret::new("d".repeat(32)), "n1");
        assert!(n2.verify(&other.issue()).is_err(), "another cluster's");

        let now = chrono::Utc::now().timestamp() as u64;
        let claims = |iss: &str, aud: &str, iat: u64, exp: u64| Claims { iss: iss.into(), aud: aud.into(), iat, exp };
        let key = secret.derive(KEY_LABEL);
        assert_eq!(n2.verify(&sign(&key, &claims("n9", AUDIENCE, now, now + 60))).unwrap(), "n9");
        for (what, c) in [
            ("an hour long", claims("n9", AUDIENCE, now, now + 3600)),
            ("expired", claims("n9", AUDIENCE, now - 120, now - 60)),
            ("a user token's audience", claims("n9", "chatmesh-user", now, now + 30)),
            ("no issuer", claims("", AUDIENCE, now, now + 30)),
        ] {
            assert!(n2.verify(&sign(&key, &c)).is_err(), "{what}");
        }
        let raw = sign(&[b'c'; 32], &claims("n9", AUDIENCE, now, now + 30));
        assert!(n2.verify(&raw).is_err(), "signed with the cluster secret itself, not the derived key");
    }
}
