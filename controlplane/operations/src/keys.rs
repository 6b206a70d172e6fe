//! The account operations: its keys (list, add, remove) and who the caller is.

use boxd_model::command::Command;
use boxd_model::model::{Account, AccountId, Fingerprint, SshKey};

use crate::{Caller, ErrorKind, OpError, Operations};

/// Who the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Whoami {
    /// Account name.
    pub account: String,
    /// Account id.
    pub id: AccountId,
    /// The key the caller authenticated with (`None` with a token).
    pub key: Option<Fingerprint>,
    /// VMs the account owns.
    pub vms: usize,
    /// VMs it may own.
    pub max_vms: u32,
    /// Whether it is the cluster's owner.
    pub owner: bool,
}

/// How to give a key, for messages about a missing or malformed one.
const ADD_KEY_HINT: &str =
    "pipe a public key, e.g. `ssh boxd.test keys add < ~/.ssh/id_ed25519.pub`";

impl Operations {
    /// The caller's account's keys.
    pub async fn keys(&self, caller: &Caller) -> Result<Vec<SshKey>, OpError> {
        self.backend.keys_of(caller.account).await
    }

    /// Adds the first key in `text` (an `authorized_keys`-style file: blank and `#` lines are
    /// skipped) to the caller's account; returns its fingerprint.
    pub async fn add_key(&self, caller: &Caller, text: &[u8]) -> Result<Fingerprint, OpError> {
        keys_over_ssh(caller)?;
        let text = std::str::from_utf8(text).map_err(|_| {
            OpError::invalid(format!("the key on stdin is not text: {ADD_KEY_HINT}"))
        })?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| OpError::invalid(format!("no key on stdin: {ADD_KEY_HINT}")))?;
        let (fingerprint, public_key) = parse_public_key(line).map_err(OpError::invalid)?;
        self.backend
            .write(Command::AddSshKey {
                account: caller.account,
                fingerprint: fingerprint.clone(),
                public_key,
                at: self.backend.now(),
            })
            .await?;
        Ok(fingerprint)
    }

    /// Removes the key with fingerprint `fp` (as `keys` prints it) from the caller's account.
    pub async fn remove_key(&self, caller: &Caller, fp: &str) -> Result<(), OpError> {
        keys_over_ssh(caller)?;
        let fingerprint: Fingerprint = fp.parse().map_err(|_| {
            OpError::invalid(format!(
                "{fp} is not a key fingerprint: copy one from `keys`"
            ))
        })?;
        self.backend
            .write(Command::RemoveSshKey {
                account: caller.account,
                fingerprint,
            })
            .await
            .map_err(|e| match e.kind {
                ErrorKind::NotFound => OpError::new(
                    ErrorKind::NotFound,
                    format!("no key {fp} on this account: see `keys`"),
                ),
                _ => e,
            })?;
        Ok(())
    }

    /// Who the caller is.
    pub async fn whoami(&self, caller: &Caller) -> Result<Whoami, OpError> {
        let account = self.account_of(caller).await?;
        let vms = self.backend.vms_of(caller.account).await?.len();
        Ok(Whoami {
            account: account.name,
            id: caller.account,
            key: caller.fingerprint().cloned(),
            vms,
            max_vms: account.max_vms,
            owner: account.owner,
        })
    }

    /// The caller's account.
    pub(crate) async fn account_of(&self, caller: &Caller) -> Result<Account, OpError> {
        self.backend
            .account(caller.account)
            .await?
            .ok_or_else(|| OpError::new(ErrorKind::NotFound, "your account no longer exists"))
    }
}

/// Keys are added and removed with a key: a token that could add one would outlive its own
/// expiry and scope.
fn keys_over_ssh(caller: &Caller) -> Result<(), OpError> {
    match caller.fingerprint() {
        Some(_) => Ok(()),
        None => Err(OpError::new(
            ErrorKind::Denied,
            "SSH keys are added and removed over SSH, not with a token",
        )),
    }
}

/// Parses one `authorized_keys`-style line; returns its fingerprint (what `ssh-keygen -l`
/// prints) and its normalised form.
pub fn parse_public_key(line: &str) -> Result<(Fingerprint, String), String> {
    let key = ssh_key::PublicKey::from_openssh(line).map_err(|e| {
        format!("not an OpenSSH public key ({e}): expected a line like `ssh-ed25519 AAAA… me@host`")
    })?;
    let blob = key
        .to_bytes()
        .map_err(|e| format!("cannot encode the key: {e}"))?;
    let text = key
        .to_openssh()
        .map_err(|e| format!("cannot encode the key: {e}"))?;
    Ok((Fingerprint::of_key_blob(&blob), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_parse_and_fingerprint_like_ssh_keygen() {
        // `ssh-keygen -lf` on each key prints this fingerprint.
        for (line, fp) in [
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICiaWZBXvChxym9lHO8Ic11i09+NIml12WBGcy18GNd5 t@x",
                "SHA256:ZQRBpHM/+AqtWckq+X1GA9+jPj/NX2bCQWauY5oyBRw",
            ),
            (
                "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBE/QjZII/cH4hfJbiSOrlQuFqYaA4kieZy/52QOuEgyFxSdnTRt0MrwmRpbJCswU1HboP0SGO3LJza3UFOqNp8I= t@x",
                "SHA256:CcdqR4hkqAC9wv93s3naL+huSnjkSHx03jdYI4iqmC4",
            ),
            (
                "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCvsd0xx1kGamGO3Caa1PTzQyWmjN5GYW/q8yZhsW9j4X7JtI195t81TM+Ck6sTOuI9DgioV2cFyYd9aAO1RaArwqAu0b++ye+G4D45B+gtLWcw2GfgMAbjPLnHzil/T/VBrFloxDd/ltAylxns3SZ/7Rpz1clF1nFV3yNxJ8oySw== t@x",
                "SHA256:5BIL35uRzf5ljtAwUHN4UgZFbzAzjK1xfImGmpgfKww",
            ),
        ] {
            let (got, text) = parse_public_key(line).expect(line);
            assert_eq!(got.as_str(), fp);
            assert_eq!(text, line, "already normal");
        }
        assert!(
            parse_public_key("ssh-ed25519 notbase64")
                .expect_err("bad base64")
                .contains("OpenSSH public key")
        );
        assert!(parse_public_key("").is_err());
    }
}
