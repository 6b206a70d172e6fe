//! API tokens: make one (a JWT for the gRPC API, limited to some VMs, read-only, for a while),
//! list them, revoke one. A call made with a token can only narrow: the token it makes asks
//! for no more VMs, no more rights and no more time than its own.

use boxd_model::command::Command;
use boxd_model::model::{ApiToken, Millis, TokenId};
use boxd_model::tokens::{self, Claims, MAX_TTL_MS, Scope};
use sha2::{Digest as _, Sha256};

use crate::{Caller, Credential, ErrorKind, OpError, Operations};

/// A token's lifetime when none is asked for.
pub const DEFAULT_TTL_MS: Millis = 24 * 3600 * 1000;

/// What a new token may do and for how long.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewToken {
    /// Lifetime; `None` is [`DEFAULT_TTL_MS`], or what the caller's own token has left if less.
    pub ttl_ms: Option<Millis>,
    /// Only these VMs (names); empty: all of them, and new ones.
    pub vms: Vec<String>,
    /// Reads only.
    pub read_only: bool,
    /// A label to tell it apart in `token ls`.
    pub label: String,
}

/// A token as made: the JWT (shown once, never stored) and its record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The JWT.
    pub token: String,
    /// What the replica keeps of it.
    pub info: ApiToken,
}

/// A duration as people write one: `90s`, `30m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 90s, 30m, 24h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit `{unit}`: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is too long"))
}

impl Operations {
    /// Makes a token for the caller's account: within the caller's own scope and lifetime.
    pub async fn create_token(&self, caller: &Caller, req: NewToken) -> Result<Issued, OpError> {
        let now = self.backend.now();
        let parent_expiry = match &caller.credential {
            Credential::Key(_) => None,
            Credential::Token(t) => Some(t.expires_at),
        };
        let ttl = match (req.ttl_ms, parent_expiry) {
            (Some(t), _) => t,
            (None, Some(e)) => DEFAULT_TTL_MS.min(e.saturating_sub(now)),
            (None, None) => DEFAULT_TTL_MS,
        };
        if !(1000..=MAX_TTL_MS).contains(&ttl) {
            return Err(OpError::invalid(
                "a token lives from 1s to 90d: give e.g. --ttl=1h, --ttl=30d",
            ));
        }
        let expires_at = now + ttl;
        if parent_expiry.is_some_and(|e| expires_at > e) {
            return Err(OpError::new(
                ErrorKind::Denied,
                "a token cannot make one that outlives it: ask for a shorter --ttl",
            ));
        }
        let mut vms = req.vms;
        vms.sort();
        vms.dedup();
        let scope = Scope {
            vms,
            read_only: req.read_only,
        };
        if !scope.within(&caller.scope()) {
            return Err(OpError::new(
                ErrorKind::Denied,
                "a token can only make narrower ones: the same VMs or fewer, read-only if it is",
            ));
        }
        if !scope.vms.is_empty() {
            let mine = self.backend.vms_of(caller.account).await?;
            if let Some(v) = scope
                .vms
                .iter()
                .find(|v| !mine.iter().any(|m| &m.name == *v))
            {
                return Err(OpError::new(
                    ErrorKind::NotFound,
                    format!("no VM named {v}: see `ls`"),
                ));
            }
        }
        let key = self
            .backend
            .signing_key()
            .await?
            .ok_or_else(|| OpError::unavailable("the cluster has no token signing key yet"))?;
        let id = TokenId::random();
        let claims = Claims {
            iss: tokens::issuer(&self.zone()),
            aud: tokens::AUDIENCE.into(),
            sub: caller.account.to_string(),
            jti: id.to_string(),
            iat: now / 1000,
            exp: expires_at / 1000,
            vms: scope.vms.clone(),
            ro: scope.read_only,
        };
        let token = key
            .sign(&claims)
            .map_err(|e| OpError::unavailable(format!("signing the token: {e}")))?;
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        // The token carries whole seconds; the record says the same.
        let expires_at = claims.exp * 1000;
        self.backend
            .write(Command::CreateToken {
                id,
                account: caller.account,
                label: req.label.clone(),
                hash: hash.clone(),
                vms: scope.vms.clone(),
                read_only: scope.read_only,
                at: now,
                expires_at,
            })
            .await?;
        Ok(Issued {
            token,
            info: ApiToken {
                id,
                account: caller.account,
                name: req.label,
                hash,
                created_at: now,
                expires_at,
                vms: scope.vms,
                read_only: scope.read_only,
            },
        })
    }

    /// The caller's account's live tokens, newest first.
    pub async fn tokens(&self, caller: &Caller) -> Result<Vec<ApiToken>, OpError> {
        let now = self.backend.now();
        let mut all = self.backend.tokens_of(caller.account).await?;
        all.retain(|t| t.expires_at > now);
        Ok(all)
    }

    /// Revokes the caller's account's token `id` (as `token ls` prints it).
    pub async fn revoke_token(&self, caller: &Caller, id: &str) -> Result<(), OpError> {
        if caller.scope().read_only {
            return Err(OpError::new(
                ErrorKind::Denied,
                "this token is read-only: use one made without --read-only",
            ));
        }
        let parsed: TokenId = id.parse().map_err(|_| {
            OpError::invalid(format!("{id} is not a token id: copy one from `token ls`"))
        })?;
        self.backend
            .write(Command::RevokeApiToken {
                account: caller.account,
                id: parsed,
            })
            .await
            .map_err(|e| match e.kind {
                ErrorKind::NotFound => OpError::new(
                    ErrorKind::NotFound,
                    format!("no token {id} on this account: see `token ls`"),
                ),
                _ => e,
            })?;
        Ok(())
    }
}
