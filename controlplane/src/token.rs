//! Join tokens and the peer key, both derived from the cluster secret held in the replica.
//!
//! A join token is `boxd-join.<payload>.<mac>`: the payload (base64url JSON) names the cluster,
//! the roles the holder may take and an expiry; the MAC is HMAC-SHA256 over the payload with the
//! cluster secret. Any node holding the replica can mint and check tokens; no token is stored.
//! The peer key authenticates internal RPCs between members.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::model::Roles;

const PREFIX: &str = "boxd-join";

/// What a join token allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGrant {
    /// Cluster the token belongs to.
    #[serde(rename = "c")]
    pub cluster_id: Uuid,
    /// Roles the joining node may take.
    #[serde(rename = "r")]
    pub roles: Roles,
    /// Expiry, seconds since the Unix epoch.
    #[serde(rename = "e")]
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the form `boxd-join.<payload>.<mac>`.
    #[error("the join token is malformed: copy it again from `boxd admin join-token`")]
    Malformed,
    /// MAC mismatch: another cluster's token or a typo.
    #[error("the join token was not issued by this cluster")]
    BadSignature,
    /// Past its expiry.
    #[error("the join token expired: create a new one with `boxd admin join-token`")]
    Expired,
    /// Issued for another cluster.
    #[error("the join token belongs to cluster {0}, not this one")]
    WrongCluster(Uuid),
    /// The secret is not usable.
    #[error("the cluster secret is not valid hex")]
    BadSecret,
}

fn mac(secret_hex: &str, msg: &[u8]) -> Result<Hmac<Sha256>, TokenError> {
    let key = hex::decode(secret_hex).map_err(|_| TokenError::BadSecret)?;
    let mut m = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| TokenError::BadSecret)?;
    m.update(msg);
    Ok(m)
}

/// Mints a token.
pub fn issue(secret_hex: &str, grant: &JoinGrant) -> Result<String, TokenError> {
    let payload = B64.encode(serde_json::to_vec(grant).map_err(|_| TokenError::Malformed)?);
    let tag = mac(secret_hex, payload.as_bytes())?.finalize().into_bytes();
    Ok(format!("{PREFIX}.{payload}.{}", B64.encode(tag)))
}

/// Checks a token's signature, cluster and expiry (`now` in seconds since the epoch).
pub fn verify(
    secret_hex: &str,
    cluster_id: Uuid,
    token: &str,
    now: u64,
) -> Result<JoinGrant, TokenError> {
    let mut parts = token.trim().split('.');
    let (Some(PREFIX), Some(payload), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
    mac(secret_hex, payload.as_bytes())?
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    let raw = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
    let grant: JoinGrant = serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)?;
    if grant.cluster_id != cluster_id {
        return Err(TokenError::WrongCluster(grant.cluster_id));
    }
    if grant.expires_at < now {
        return Err(TokenError::Expired);
    }
    Ok(grant)
}

/// The key members put in `x-boxd-peer` on internal RPCs.
pub fn peer_key(secret_hex: &str) -> Result<String, TokenError> {
    Ok(hex::encode(
        mac(secret_hex, b"boxd peer key v1")?
            .finalize()
            .into_bytes(),
    ))
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Role, parse_roles};

    const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn grant() -> JoinGrant {
        JoinGrant {
            cluster_id: Uuid::from_u128(7),
            roles: parse_roles("worker,dns").unwrap(),
            expires_at: 1000,
        }
    }

    #[test]
    fn round_trip() {
        let t = issue(SECRET, &grant()).unwrap();
        assert!(t.starts_with("boxd-join."));
        let g = verify(SECRET, Uuid::from_u128(7), &t, 999).unwrap();
        assert!(g.roles.contains(&Role::Worker));
        assert_eq!(g, grant());
    }

    #[test]
    fn refusals() {
        let t = issue(SECRET, &grant()).unwrap();
        let other = "ff".repeat(32);
        assert_eq!(
            verify(&other, Uuid::from_u128(7), &t, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(SECRET, Uuid::from_u128(7), &t, 1001),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(SECRET, Uuid::from_u128(8), &t, 0),
            Err(TokenError::WrongCluster(Uuid::from_u128(7)))
        );
        for bad in [
            "",
            "boxd-join",
            "boxd-join.a.b.c",
            "x.a.b",
            "boxd-join.!!.??",
        ] {
            assert_eq!(
                verify(SECRET, Uuid::from_u128(7), bad, 0),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
        // A tampered payload keeps the old tag.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(
            serde_json::to_vec(&JoinGrant {
                roles: parse_roles("control").unwrap(),
                ..grant()
            })
            .unwrap(),
        );
        parts[1] = &forged;
        assert_eq!(
            verify(SECRET, Uuid::from_u128(7), &parts.join("."), 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn peer_key_is_stable_and_secret_dependent() {
        assert_eq!(peer_key(SECRET).unwrap(), peer_key(SECRET).unwrap());
        assert_ne!(
            peer_key(SECRET).unwrap(),
            peer_key(&"ff".repeat(32)).unwrap()
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
