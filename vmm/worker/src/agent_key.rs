//! Each VM's guest agent has a host key of its own, made with the VM's disk: the worker keeps
//! it in the VM's directory (0600), hands it to the agent (written into the VM's tree, or its
//! disk image), and records the public half in the replica, so the proxy connects a user to
//! the VM only when what answers at its address holds that key. VMs whose disk predates
//! per-VM keys have no key file; their agents keep throwaway keys.

use std::path::{Path, PathBuf};

use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

/// The public half (OpenSSH form) of the cluster's agent key with `seed` (see boxd-model's
/// `agent_key_seed`): the one client every VM's agent accepts.
pub fn cluster_public(seed: &[u8; 32]) -> String {
    PrivateKey::from(Ed25519Keypair::from_seed(seed))
        .public_key()
        .to_openssh()
        .unwrap_or_default()
}

/// The key's file in the VM's directory.
pub const FILE: &str = "agent_host_key";

/// Where the agent finds it inside the VM.
pub const GUEST_PATH: &str = "/etc/boxd/agent_host_key";

/// The key file of the VM whose directory is `dir`, if it has one.
pub fn path(dir: &Path) -> Option<PathBuf> {
    let p = dir.join(FILE);
    p.is_file().then_some(p)
}

/// Makes a new key in `dir` (a new VM's directory); an existing key is kept.
pub fn create(dir: &Path) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = dir.join(FILE);
    if p.is_file() {
        return Ok(());
    }
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("cannot encode the agent host key: {e}"))?;
    let tmp = dir.join(format!(".{FILE}.new"));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(pem.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &p))
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// The public half (OpenSSH form, no comment) of the key in `dir`, if it has a readable one.
pub fn public(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(FILE)).ok()?;
    let key = PrivateKey::from_openssh(text.trim()).ok()?;
    let mut public = key.public_key().clone();
    public.set_comment("");
    public.to_openssh().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_private_and_its_public_half_is_openssh() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(public(dir.path()), None);
        create(dir.path()).expect("create");
        let first = public(dir.path()).expect("public");
        assert!(first.starts_with("ssh-ed25519 AAAA"), "{first}");
        assert_eq!(first.split(' ').count(), 2, "no comment: {first}");
        let mode = std::fs::metadata(dir.path().join(FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        create(dir.path()).expect("again");
        assert_eq!(public(dir.path()), Some(first), "kept");
    }
}
