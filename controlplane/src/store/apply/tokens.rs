//! Commands about API tokens: the keys that sign them, the tokens (id, account, scope,
//! expiry; the JWT itself is never stored) and their revocation. Every change is recorded in
//! `Touched` so the View — which every proxy checks tokens against — follows.

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::model::{Millis, TokenId};
use crate::tokens::{MAX_SCOPED_VMS, MAX_TTL_MS, SigningKey};

/// Most live (unexpired) tokens one account may hold.
pub const MAX_TOKENS_PER_ACCOUNT: u32 = 100;

/// `AddTokenKey`: a new signing key; the previous newest is superseded, and keys superseded
/// longer ago than a token may live are dropped (no live token can name them).
pub(super) fn add_token_key(
    c: &Connection,
    t: &mut Touched,
    kid: &str,
    pkcs8_hex: &str,
    at: Millis,
    if_none: bool,
) -> Result<Outcome, Fail> {
    let any: bool = one(c, "SELECT EXISTS (SELECT 1 FROM token_keys)", [], |r| {
        r.get(0)
    })?;
    if if_none && any {
        return Ok(Outcome::Done);
    }
    if kid.is_empty()
        || kid.len() > 64
        || !kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("token key id", "1 to 64 of A-Z a-z 0-9 - _"));
    }
    let pkcs8 = hex::decode(pkcs8_hex).map_err(|_| invalid("token key", "not hex"))?;
    let public = SigningKey {
        kid: kid.to_owned(),
        pkcs8,
    }
    .public()
    .map_err(|e| invalid("token key", e.to_string()))?;
    let taken: bool = one(
        c,
        "SELECT EXISTS (SELECT 1 FROM token_keys WHERE kid = ?1)",
        params![kid],
        |r| r.get(0),
    )?;
    if taken {
        return Err(ApplyError::IdConflict {
            what: "token key".into(),
            id: kid.to_owned(),
        }
        .into());
    }
    exec(
        c,
        "UPDATE token_keys SET superseded_at = ?1 WHERE superseded_at IS NULL",
        params![sql_u64(at)],
    )?;
    exec(
        c,
        "DELETE FROM token_keys WHERE superseded_at < ?1",
        params![sql_u64(at.saturating_sub(MAX_TTL_MS))],
    )?;
    exec(
        c,
        "INSERT INTO token_keys (kid, pkcs8, public, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![kid, pkcs8_hex, public, sql_u64(at)],
    )?;
    t.token_keys = true;
    Ok(Outcome::Done)
}

/// What `CreateToken` (and the older `CreateApiToken`) records.
pub(super) struct NewToken<'a> {
    pub id: &'a TokenId,
    pub account: &'a AccountId,
    pub label: &'a str,
    pub hash: &'a str,
    pub vms: &'a [String],
    pub read_only: bool,
    pub at: Millis,
    pub expires_at: Millis,
}

/// `CreateToken`: records a token. An account's expired tokens go first; past
/// [`MAX_TOKENS_PER_ACCOUNT`] live ones, it is refused.
pub(super) fn create_token(
    c: &Connection,
    t: &mut Touched,
    cache: &mut Cache,
    n: &NewToken<'_>,
) -> Result<Outcome, Fail> {
    settings(c, &mut cache.settings)?;
    if rows::account(c, *n.account)?.is_none() {
        return Err(not_found("account", n.account));
    }
    if n.hash.len() != 64 || !n.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("token hash", "expected 64 hex digits (SHA-256)"));
    }
    if n.label.len() > 128 || n.label.chars().any(char::is_control) {
        return Err(invalid(
            "token label",
            "at most 128 bytes, no control characters",
        ));
    }
    if n.expires_at <= n.at || n.expires_at - n.at > MAX_TTL_MS {
        return Err(invalid("token lifetime", "from a second to 90 days"));
    }
    if n.vms.len() > MAX_SCOPED_VMS {
        return Err(invalid(
            "token scope",
            format!("at most {MAX_SCOPED_VMS} VMs"),
        ));
    }
    if let Some(p) = n.vms.iter().find_map(|v| vm_name_problem(v)) {
        return Err(invalid("token scope", p));
    }
    let vms = serde_json::to_string(n.vms).map_err(|e| invalid("token scope", e.to_string()))?;
    let existing: Option<(String, String)> = c
        .query_row(
            "SELECT account, hash FROM api_tokens WHERE id = ?1",
            params![n.id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(ignore_no_rows)?;
    if let Some((a, h)) = existing {
        return if a == n.account.to_string() && h == n.hash {
            Ok(Outcome::Done)
        } else {
            Err(ApplyError::IdConflict {
                what: "token".into(),
                id: n.id.to_string(),
            }
            .into())
        };
    }
    let expired = rows::expired_tokens(c, *n.account, n.at)?;
    let live: u32 = one(
        c,
        "SELECT count(*) FROM api_tokens WHERE account = ?1 AND expires_at > ?2",
        params![n.account.to_string(), sql_u64(n.at)],
        |r| r.get(0),
    )?;
    if live >= MAX_TOKENS_PER_ACCOUNT {
        return Err(ApplyError::TokenLimit {
            limit: MAX_TOKENS_PER_ACCOUNT,
        }
        .into());
    }
    for id in expired {
        exec(
            c,
            "DELETE FROM api_tokens WHERE id = ?1",
            params![id.to_string()],
        )?;
        t.tokens.insert(id);
    }
    exec(
        c,
        "INSERT INTO api_tokens (id, account, name, hash, created_at, expires_at, vms, read_only)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            n.id.to_string(),
            n.account.to_string(),
            n.label,
            n.hash,
            sql_u64(n.at),
            sql_u64(n.expires_at),
            vms,
            n.read_only
        ],
    )?;
    t.tokens.insert(*n.id);
    Ok(Outcome::Done)
}

/// `RevokeApiToken`: revokes a token; every proxy refuses it once it has applied this.
pub(super) fn revoke_api_token(
    c: &Connection,
    t: &mut Touched,
    account: &AccountId,
    id: &TokenId,
) -> Result<Outcome, Fail> {
    match rows::token_account(c, *id)? {
        Some(o) if o == *account => {}
        Some(_) => {
            return Err(ApplyError::NotYours {
                what: "token".into(),
                id: id.to_string(),
            }
            .into());
        }
        None => return Err(not_found("token", id)),
    }
    exec(
        c,
        "DELETE FROM api_tokens WHERE id = ?1",
        params![id.to_string()],
    )?;
    t.tokens.insert(*id);
    Ok(Outcome::Done)
}
