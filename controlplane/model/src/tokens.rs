//! API tokens: JWTs (RFC 7519) signed with Ed25519 (`alg: EdDSA`) by a key the replica holds,
//! named by its key id (`kid`). A token says whose it is (`sub`: the account), which token it
//! is (`jti`: revocation deletes that id from the replica), until when (`exp`) and what it may
//! do (`vms`: only these VMs, all when absent; `ro`: reads only). Signing and checking are
//! here, sans-io (the caller passes the time and the keys it trusts); the keys and the set of
//! live token ids come from the View, so every proxy checks a token without a replica read
//! and refuses a revoked one as soon as it has applied the revocation.
//!
//! Built on `jsonwebtoken` (ring underneath, as rustls and russh here). See DESIGN.md.

use std::fmt;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

use crate::model::{AccountId, Millis, TokenId};

/// The audience every boxd API token names.
pub const AUDIENCE: &str = "boxd-api";
/// Longest lifetime a token may have (90 days).
pub const MAX_TTL_MS: Millis = 90 * 24 * 3600 * 1000;
/// Longest token accepted, in bytes; anything longer is refused before it is parsed.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Most VMs one token may name.
pub const MAX_SCOPED_VMS: usize = 64;

/// What a token may do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Only these VMs (by name); empty: every VM of the account, and creating new ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
    /// Reads only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl Scope {
    /// Whether `self` asks for no more than `parent` allows: a narrower VM list (or the same),
    /// read-only if the parent is.
    pub fn within(&self, parent: &Scope) -> bool {
        let vms = parent.vms.is_empty()
            || (!self.vms.is_empty() && self.vms.iter().all(|v| parent.vms.contains(v)));
        vms && (self.read_only || !parent.read_only)
    }

    /// Whether VM `name` is in scope.
    pub fn covers(&self, name: &str) -> bool {
        self.vms.is_empty() || self.vms.iter().any(|v| v == name)
    }
}

/// The claims of a boxd token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: `https://api.<zone>`.
    pub iss: String,
    /// Audience: [`AUDIENCE`].
    pub aud: String,
    /// The account.
    pub sub: String,
    /// The token's id.
    pub jti: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
    /// VMs in scope; absent: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
    /// Reads only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ro: bool,
}

/// A checked token: whose, which, until when, what for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The account.
    pub account: AccountId,
    /// The token.
    pub id: TokenId,
    /// Expiry (milliseconds).
    pub expires_at: Millis,
    /// What it may do.
    pub scope: Scope,
}

/// The issuer of tokens for `zone`.
pub fn issuer(zone: &str) -> String {
    format!("https://api.{zone}")
}

/// A signing key: its id and its PKCS#8 document (what the replica stores).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// Key id (`kid`).
    pub kid: String,
    /// PKCS#8 v2 DER of the Ed25519 key.
    pub pkcs8: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Why a token or key was refused. The messages say what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or not one of ours in form.
    #[error("the token is malformed ({0}): pass the whole token boxd printed")]
    Malformed(String),
    /// Signed by a key this cluster does not know (another cluster's, or long retired).
    #[error("the token was signed by an unknown key: make a new one with `token create`")]
    UnknownKey,
    /// The signature does not match.
    #[error("the token's signature is not valid: make a new one with `token create`")]
    BadSignature,
    /// For another audience or issuer.
    #[error("the token is not for this cluster's API ({0}): make one here with `token create`")]
    NotForUs(String),
    /// Past its expiry.
    #[error("the token has expired: make a new one with `token create`")]
    Expired,
    /// Revoked (or never recorded).
    #[error("the token was revoked: make a new one with `token create`")]
    Revoked,
    /// A signing key could not be made or read.
    #[error("signing key: {0}")]
    Key(String),
}

impl SigningKey {
    /// A new random key with a random id.
    pub fn generate() -> Result<Self, TokenError> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| TokenError::Key(e.to_string()))?;
        let mut id = [0u8; 9];
        ring::rand::SecureRandom::fill(&rng, &mut id)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        Ok(Self {
            kid: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id),
            pkcs8: doc.as_ref().to_vec(),
        })
    }

    /// The public half (32 bytes).
    pub fn public(&self) -> Result<Vec<u8>, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(&self.pkcs8)
            .map_err(|e| TokenError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        Ok(pair.public_key().as_ref().to_vec())
    }

    /// Signs `claims` as a compact JWT.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&self.pkcs8))
            .map_err(|e| TokenError::Key(e.to_string()))
    }
}

/// A verification key: an id and the public half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    /// Key id.
    pub kid: String,
    /// Ed25519 public key (32 bytes).
    pub key: Vec<u8>,
}

/// The JSON Web Key Set (RFC 7517) of `keys`: what `https://api.<zone>/.well-known/jwks.json`
/// serves, so anyone can check a token's signature.
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a PublicKey>) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let keys: Vec<_> = keys
        .into_iter()
        .map(|k| {
            serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": k.kid, "x": b64.encode(&k.key),
            })
        })
        .collect();
    serde_json::json!({ "keys": keys })
}

/// Checks `token` at `now` (milliseconds): form, key (`key_of` gives the public key for a
/// `kid`), signature, audience, issuer (`issuer(zone)`), expiry and revocation (`live` says
/// whether a token id is still in the replica). Total: any input gives an answer, never a
/// panic (fuzzed: `fuzz/fuzz_targets/token.rs`).
pub fn verify(
    token: &str,
    zone: &str,
    now: Millis,
    key_of: impl Fn(&str) -> Option<Vec<u8>>,
    live: impl Fn(TokenId) -> bool,
) -> Result<Verified, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed(format!(
            "longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    if token.bytes().filter(|b| *b == b'.').count() != 2 {
        return Err(TokenError::Malformed("not a JSON Web Token".into()));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
    if header.alg != Algorithm::EdDSA {
        return Err(TokenError::Malformed(format!(
            "signed with {:?}, boxd signs with EdDSA",
            header.alg
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| TokenError::Malformed("no key id".into()))?;
    let key = key_of(&kid).ok_or(TokenError::UnknownKey)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[AUDIENCE]);
    v.set_issuer(&[issuer(zone)]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    // Expiry is checked below against the caller's clock (sans-io).
    v.validate_exp = false;
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_ed_der(&key), &v).map_err(
        |e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => TokenError::BadSignature,
                K::InvalidAudience => TokenError::NotForUs("audience".into()),
                K::InvalidIssuer => TokenError::NotForUs("issuer".into()),
                _ => TokenError::Malformed(e.to_string()),
            }
        },
    )?;
    let c = data.claims;
    if c.exp.saturating_mul(1000) <= now {
        return Err(TokenError::Expired);
    }
    let bad = |what: &str| TokenError::Malformed(format!("{what} is not an id"));
    let account: AccountId = c.sub.parse().map_err(|_| bad("sub"))?;
    let id: TokenId = c.jti.parse().map_err(|_| bad("jti"))?;
    if !live(id) {
        return Err(TokenError::Revoked);
    }
    Ok(Verified {
        account,
        id,
        expires_at: c.exp.saturating_mul(1000),
        scope: Scope {
            vms: c.vms,
            read_only: c.ro,
        },
    })
}

#[cfg(test)]
#[path = "tokens_tests.rs"]
mod tests;
