//! Keys without an account: the first key to reach a fresh cluster claims its owner account;
//! any other unknown key gets a registration link to open in a browser (bounded per source
//! address: each new link is a log write any stranger can cause).

use std::net::IpAddr;

use boxd_model::command::Command;
use boxd_model::model::{AccountId, Fingerprint};

use crate::{Caller, ErrorKind, OpError, Operations};

/// Registration links stay valid this long.
pub const REGISTRATION_TTL_MS: u64 = 24 * 3600 * 1000;

/// A link is reused while it has at least this long to live.
const REUSE_MARGIN_MS: u64 = 60_000;

impl Operations {
    /// Makes the key `fp` (`public_key` in OpenSSH form) the owner of a fresh cluster: one
    /// with no key yet. Refused once any key exists (or another key won the race), and on a
    /// cluster whose people sign in with a provider: there every key is linked that way (a
    /// stranger who connects first must not own it).
    pub async fn claim_owner(&self, fp: &Fingerprint, public_key: &str) -> Result<Caller, OpError> {
        if self.settings.sign_in.is_some() {
            return Err(OpError::new(
                ErrorKind::Refused,
                "keys are linked by signing in on this cluster",
            ));
        }
        if self.view.current().key_count() != 0 {
            return Err(OpError::new(
                ErrorKind::Refused,
                "this cluster already has an owner",
            ));
        }
        let id = AccountId::random();
        self.backend
            .write(Command::ClaimOwner {
                id,
                name: "owner".into(),
                fingerprint: fp.clone(),
                public_key: public_key.to_owned(),
                at: self.backend.now(),
            })
            .await?;
        tracing::info!(key = %fp, "the first key claimed the owner account");
        Ok(Caller::key(id, fp.clone()))
    }

    /// A link (`https://ZONE/register/CODE`) that binds the unknown key `fp` to an account
    /// once opened: the live one for this key if it has a minute left, else a new one, which
    /// `peer` pays for from its per-address allowance ([`ErrorKind::Exhausted`] when spent).
    pub async fn registration_link(
        &self,
        fp: &Fingerprint,
        public_key: &str,
        peer: IpAddr,
    ) -> Result<String, OpError> {
        let now = self.backend.now();
        let live = match self.backend.registration_of(fp.clone()).await {
            Ok(Some(r)) if r.expires_at > now + REUSE_MARGIN_MS => Some(r.code),
            _ => None,
        };
        let code = match live {
            Some(c) => c,
            None => {
                if let Err(e) = self.take_registration(peer, now) {
                    tracing::info!(%peer, key = %fp, "registration link refused: {e}");
                    return Err(e);
                }
                let code = uuid::Uuid::new_v4().simple().to_string();
                self.backend
                    .write(Command::CreateRegistration {
                        code: code.clone(),
                        fingerprint: fp.clone(),
                        public_key: public_key.to_owned(),
                        at: now,
                        expires_at: now + REGISTRATION_TTL_MS,
                    })
                    .await?;
                code
            }
        };
        Ok(self.apex_url(&format!("register/{code}")))
    }
}
