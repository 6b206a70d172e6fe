//! The data directory: made private (0700) or tightened to it, its state and key files kept
//! to their owner (0600), and locked so one boxd process uses it at a time. It holds the
//! replica (with the cluster secret and the SSH host key) and the TLS key: nothing in it is
//! for other local users.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Subdirectories whose files are state or keys, tightened like the top level. (VM disks and
/// images are trees the VMs see, with modes of their own, and are left as they are.)
const PRIVATE_SUBDIRS: &[&str] = &["snapshots", "tls"];

/// Creates `dir` (mode 0700), or tightens an existing one to 0700, and any state or key file
/// that others can read to 0600; returns one line per change made, for a warning.
pub fn make_private(dir: &Path) -> std::io::Result<Vec<String>> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut changed = Vec::new();
    tighten(dir, 0o700, &mut changed)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let name = entry.file_name();
        if kind.is_file() {
            tighten(&entry.path(), 0o600, &mut changed)?;
        } else if kind.is_dir() && PRIVATE_SUBDIRS.iter().any(|d| name == *d) {
            tighten(&entry.path(), 0o700, &mut changed)?;
            for inner in std::fs::read_dir(entry.path())? {
                let inner = inner?;
                if inner.file_type()?.is_file() {
                    tighten(&inner.path(), 0o600, &mut changed)?;
                }
            }
        }
    }
    Ok(changed)
}

/// Clears the group and other bits of `path` (leaving it at most `mode`) if any are set.
fn tighten(path: &Path, mode: u32, changed: &mut Vec<String>) -> std::io::Result<()> {
    let now = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    if now & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(now & mode))?;
        changed.push(format!("{} {:o} -> {:o}", path.display(), now, now & mode));
    }
    Ok(())
}

/// Takes the data directory's lock: `None` when another process holds it.
pub fn lock(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    let f = std::fs::File::create(dir.join("lock"))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    /// Issue 25, finding 4: a data directory that existed before boxd (0755, its databases
    /// 0644) is tightened, and each change is reported; images are left alone.
    #[test]
    fn an_open_data_dir_is_tightened() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("data");
        for d in ["", "tls", "snapshots", "images/minimal"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
            std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        for f in [
            "state.db",
            "raft-log.db-wal",
            "tls/zone.key",
            "snapshots/1.db",
            "images/minimal/x",
        ] {
            std::fs::write(dir.join(f), b"secret").expect("write");
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        let changed = make_private(&dir).expect("tighten");
        assert_eq!(mode(&dir), 0o700);
        for f in [
            "state.db",
            "raft-log.db-wal",
            "tls/zone.key",
            "snapshots/1.db",
        ] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&dir.join("images/minimal/x")), 0o644);
        assert_eq!(changed.len(), 7, "{changed:?}");
        assert!(changed[0].ends_with("755 -> 700"), "{changed:?}");
        assert!(
            make_private(&dir).expect("again").is_empty(),
            "nothing left to change"
        );
        // A new one is private from the start.
        let fresh = tmp.path().join("a/b");
        assert!(make_private(&fresh).expect("create").is_empty());
        assert_eq!(mode(&fresh), 0o700);
    }
}
