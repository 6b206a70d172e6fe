//! Registration links seen from the other side: the page a link opens (which key, until when),
//! the owner's list of keys waiting, and approving one — the way a key joins a cluster that has
//! no identity provider configured. The owner (the account of the first key) approves from the
//! lobby; an operator from `boxd admin registrations`.

use boxd_model::command::Command;
use boxd_model::model::{AccountId, Fingerprint, Millis, Registration};

use crate::{Caller, ErrorKind, OpError, Operations};

/// Most registrations listed at once.
pub const MAX_LISTED: u32 = 200;

/// Who approves a registration.
#[derive(Clone, Copy, Debug)]
pub enum Approver<'a> {
    /// An account: only the cluster's owner may.
    Account(&'a Caller),
    /// The operator, through the admin socket (root on a node).
    Operator,
}

/// Which account an approved key joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkTo {
    /// A new account, with this name or one made from the code.
    NewAccount(Option<String>),
    /// The existing account with this name or id.
    Account(String),
}

/// A key waiting behind a registration link, as its page shows it (and as `--json` and the
/// admin socket print it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PendingKey {
    /// The code.
    pub code: String,
    /// The key's algorithm, e.g. `ssh-ed25519`.
    pub key_type: String,
    /// Its fingerprint, as `ssh-keygen -l` prints it.
    pub fingerprint: Fingerprint,
    /// When the link was made.
    pub created_at: Millis,
    /// When the link stops working.
    pub expires_at: Millis,
    /// Whether it already has.
    #[serde(skip)]
    pub expired: bool,
}

impl PendingKey {
    fn of(r: Registration, now: Millis) -> Self {
        Self {
            key_type: r
                .public_key
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_owned(),
            expired: r.expires_at <= now,
            code: r.code,
            fingerprint: r.fingerprint,
            created_at: r.created_at,
            expires_at: r.expires_at,
        }
    }
}

/// What an approval did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Approved {
    /// The key now registered.
    pub fingerprint: Fingerprint,
    /// The account it joined.
    pub account: String,
    /// Whether that account was created for it.
    pub new_account: bool,
}

/// Whether `code` can be a registration code: 32 lowercase hex digits (`registration_link`
/// makes them). Anything else is not looked up.
pub fn is_code(code: &str) -> bool {
    code.len() == 32 && code.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn no_such(code: &str) -> OpError {
    OpError::new(
        ErrorKind::NotFound,
        format!(
            "no registration link {code}: it was used or replaced; connect with ssh again for a new one"
        ),
    )
}

impl Operations {
    /// The key waiting behind the link with `code` (expired or not), for its page.
    pub async fn pending_key(&self, code: &str) -> Result<PendingKey, OpError> {
        let short = code.get(..code.len().min(40)).unwrap_or("");
        if !is_code(code) {
            return Err(no_such(short));
        }
        let r = self.backend.registration(code.to_owned()).await?;
        let r = r.ok_or_else(|| no_such(code))?;
        Ok(PendingKey::of(r, self.backend.now()))
    }

    /// The keys waiting for approval, oldest first (the owner or the operator only).
    pub async fn pending_keys(&self, by: Approver<'_>) -> Result<Vec<PendingKey>, OpError> {
        self.check_approver(by).await?;
        let now = self.backend.now();
        let list = self.backend.registrations(now, MAX_LISTED).await?;
        Ok(list.into_iter().map(|r| PendingKey::of(r, now)).collect())
    }

    /// Links the key waiting behind `code` to the account `to` names (the owner or the
    /// operator only). Nothing changes when it is refused.
    pub async fn approve(
        &self,
        by: Approver<'_>,
        code: &str,
        to: LinkTo,
    ) -> Result<Approved, OpError> {
        self.check_approver(by).await?;
        let pending = self.pending_key(code).await?;
        if pending.expired {
            return Err(OpError::new(
                ErrorKind::Refused,
                format!(
                    "registration {code} has expired: the key's owner connects with ssh again for a new link"
                ),
            ));
        }
        let (account, name, new_account) = match to {
            LinkTo::NewAccount(name) => {
                let id = AccountId::random();
                let name = name.unwrap_or_else(|| format!("user-{}", &code[..8]));
                (id, name, true)
            }
            LinkTo::Account(which) => {
                let found = match self.backend.account_named(which.clone()).await? {
                    Some(a) => Some(a),
                    None => match which.parse::<AccountId>() {
                        Ok(id) => self.backend.account(id).await?,
                        Err(_) => None,
                    },
                };
                let a = found.ok_or_else(|| {
                    OpError::new(
                        ErrorKind::NotFound,
                        format!(
                            "no account {which}: name one by its name or id (`whoami` shows both)"
                        ),
                    )
                })?;
                (a.id, a.name, false)
            }
        };
        self.backend
            .write(Command::ApproveRegistration {
                code: code.to_owned(),
                account,
                new_account: new_account.then(|| name.clone()),
                at: self.backend.now(),
            })
            .await?;
        tracing::info!(key = %pending.fingerprint, %account, new_account, "registration approved");
        Ok(Approved {
            fingerprint: pending.fingerprint,
            account: name,
            new_account,
        })
    }

    async fn check_approver(&self, by: Approver<'_>) -> Result<(), OpError> {
        match by {
            Approver::Operator => Ok(()),
            Approver::Account(caller) => {
                if caller.fingerprint().is_some() && self.account_of(caller).await?.owner {
                    Ok(())
                } else {
                    Err(OpError::new(
                        ErrorKind::Denied,
                        "only the cluster's owner approves registrations: send them the code",
                    ))
                }
            }
        }
    }
}
