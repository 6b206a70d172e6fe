//! Wiring the programmatic API into a node: the keys that sign its tokens (kept in the
//! replica; a proxy makes the first one, an operator rotates them).

use boxd_controlplane::Replica;
use boxd_controlplane::command::Command;
use boxd_controlplane::replica::WriteError;
use boxd_controlplane::tokens::SigningKey;

/// Adds a token signing key: with `if_none`, only when the cluster has none (what a proxy
/// does at start; proxies racing agree on the first written); without, a rotation (the new
/// key signs from now on; the old ones verify until their tokens have expired).
pub async fn add_token_key(replica: &Replica, if_none: bool) -> Result<String, String> {
    let key = SigningKey::generate().map_err(|e| e.to_string())?;
    let kid = key.kid.clone();
    let cmd = Command::AddTokenKey {
        kid: key.kid,
        pkcs8: hex::encode(&key.pkcs8),
        at: replica.now(),
        if_none,
    };
    match replica.write(cmd).await {
        Ok(_) => Ok(kid),
        Err(WriteError::Rejected(e)) => Err(e.to_string()),
        Err(e) => Err(format!("cannot store the token signing key: {e}")),
    }
}
