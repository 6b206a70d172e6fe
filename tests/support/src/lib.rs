//! What tests (`tests/`, the crates' own `tests/`) and benchmarks (`benches/`) share: the built
//! binaries, OpenSSH client options and keys, a russh client, and fixtures of the replicated
//! model. Nothing here reaches into boxd's internals beyond the model's public types.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod fixtures;
pub mod sshc;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The `boxd` binary: `$BOXD_BIN`, or `boxd` in the target directory of the running test or
/// benchmark (`target/<profile>/deps/<exe>` → `target/<profile>/boxd`).
pub fn boxd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BOXD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("boxd");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p boxd` (`--release` for benchmarks; \
         ops/test and ops/bench do)",
        bin.display()
    );
    bin
}

/// The guest agent binary, built next to `boxd`.
pub fn agent_bin() -> PathBuf {
    let bin = boxd_bin().with_file_name("boxd-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace` (ops/test does)",
        bin.display()
    );
    bin
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Options for an OpenSSH client: no user config, only the given key, no host key pinning,
/// quiet, no passwords.
pub const SSH_OPTS: [&str; 12] = [
    "-F",
    "/dev/null",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "PasswordAuthentication=no",
];

/// A new passphrase-less Ed25519 key pair at `path` (and `path`.pub), made by ssh-keygen.
pub fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ssh-keygen -f {} failed", path.display());
}

/// The `SHA256:` fingerprint `ssh-keygen -lf` prints for the key pair at `key` (its `.pub`).
pub fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().nth(1).unwrap().to_owned()
}

/// Runs `cmd` to the end: (exit status, or -1 for a signal; stdout; stderr), lossily decoded.
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
