//! Linking a key by signing in: a person proved who they are to the cluster's OpenID provider
//! (boxd-oidc checked the ID token), and the key waiting behind a registration code joins
//! their account — made on their first sign-in, the same one for every key after.

use boxd_model::command::Command;
use boxd_model::model::AccountId;

use crate::{Approved, ErrorKind, OpError, Operations};

/// A person as the provider's ID token names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedIn {
    /// `iss`.
    pub issuer: String,
    /// `sub`: who they are at that issuer (the only thing matched on).
    pub subject: String,
    /// `email`, when the token has one: names a new account and is shown, never matched.
    pub email: Option<String>,
}

/// The name a first sign-in's account gets: the email's local part, lower case, letters,
/// digits and `-` only (at most 32), or `user-<code's first 8>` when that leaves nothing
/// that starts with a letter. (`LinkIdentity` adds a suffix when the name is taken.)
pub fn account_name(who: &SignedIn, code: &str) -> String {
    let local = who
        .email
        .as_deref()
        .and_then(|e| e.split('@').next())
        .unwrap_or("");
    let name: String = local
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(32)
        .collect();
    let name = name.trim_matches('-');
    if name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.to_owned()
    } else {
        format!("user-{}", code.get(..8).unwrap_or(code))
    }
}

impl Operations {
    /// Links the key waiting behind `code` to `who`'s account (made now on their first
    /// sign-in). Nothing changes when it is refused: an unknown or used code (a replayed
    /// callback) is [`ErrorKind::NotFound`], an expired one [`ErrorKind::Refused`].
    pub async fn link_identity(&self, code: &str, who: &SignedIn) -> Result<Approved, OpError> {
        let pending = self.pending_key(code).await?;
        if pending.expired {
            return Err(OpError::new(
                ErrorKind::Refused,
                "this registration link has expired: connect with ssh again for a new one",
            ));
        }
        let proposed = AccountId::random();
        self.backend
            .write(Command::LinkIdentity {
                code: code.to_owned(),
                issuer: who.issuer.clone(),
                subject: who.subject.clone(),
                email: who.email.clone(),
                account: proposed,
                name: account_name(who, code),
                at: self.backend.now(),
            })
            .await?;
        let account = self.view.current().account_of(&pending.fingerprint);
        let name = match account {
            Some(id) => self.backend.account(id).await?.map(|a| a.name),
            None => None,
        };
        tracing::info!(key = %pending.fingerprint, issuer = %who.issuer, subject = %who.subject,
            new_account = account == Some(proposed), "key linked by signing in");
        Ok(Approved {
            fingerprint: pending.fingerprint,
            account: name.unwrap_or_default(),
            new_account: account == Some(proposed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(email: Option<&str>) -> SignedIn {
        SignedIn {
            issuer: "https://id.example".into(),
            subject: "1".into(),
            email: email.map(str::to_owned),
        }
    }

    #[test]
    fn names_come_from_the_email_when_they_can() {
        let code = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            account_name(&who(Some("Ada.Lovelace@x.org")), code),
            "ada-lovelace"
        );
        assert_eq!(account_name(&who(Some("42@x.org")), code), "user-01234567");
        assert_eq!(account_name(&who(Some("<b>@x")), code), "b");
        assert_eq!(account_name(&who(Some("ü@x")), code), "user-01234567");
        assert_eq!(account_name(&who(None), code), "user-01234567");
        assert_eq!(account_name(&who(Some(&"a".repeat(99))), code).len(), 32);
    }
}
