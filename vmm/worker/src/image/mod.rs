//! Images: root filesystem trees the worker gives VMs, kept in `<data-dir>/images/<name>/`
//! (`rootfs/` and `image.json`). The sandbox runtime uses the tree directly; the kvm runtime
//! makes an ext4 root disk of it.
//!
//! `minimal` is busybox (the host's static build from Debian's `busybox-static`) with a link
//! for every applet, a root user, and the guest agent with the shared libraries it needs,
//! copied from the host at their own paths. `debian` is Debian (bookworm by default) from
//! `debootstrap --variant=minbase` with systemd, iproute2 and the sftp server, plus the agent
//! and two systemd units that do what busybox init does for `minimal` under kvm. Both are
//! built into a temporary directory and renamed into place, so a half-built image is never
//! used.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

mod recipes;

pub use self::recipes::{
    BOXD_AGENT_RUN, BOXD_NET, DEBIAN_PACKAGES, DebianSource, MinimalSources, RECIPES, is_static_elf,
};
use self::recipes::{build_debian, build_minimal};

/// What `image ls` shows about a built image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Name (`minimal`).
    pub name: String,
    /// Regular files in the tree.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Build time, milliseconds since the Unix epoch.
    pub built_at: u64,
    /// Which guest agent binary went in ([`agent_stamp`]), so a worker can tell that the
    /// agent next to `boxd` has changed since.
    #[serde(default)]
    pub agent: Option<String>,
    /// Version of the recipe that built it ([`RECIPE_VERSION`]); absent before versions.
    #[serde(default)]
    pub recipe: Option<u32>,
}

/// Bumped whenever a recipe changes what goes into an image, so that workers rebuild
/// `minimal` (2: `/etc/inittab` and `boxd-net` for kvm guests; 3: the agent's own host key).
pub const RECIPE_VERSION: u32 = 3;

/// Identifies an agent binary cheaply: size and modification time (nanoseconds). A rebuilt
/// or upgraded agent has a different stamp.
pub fn agent_stamp(agent: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(agent).ok()?;
    Some(format!("{}-{}.{:09}", m.size(), m.mtime(), m.mtime_nsec()))
}

/// Why an image could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No such image recipe.
    #[error(
        "there is no image recipe `{0}`: the recipes are `minimal` (busybox and the agent, seconds) and `debian` (debootstrap, minutes)"
    )]
    UnknownRecipe(String),
    /// A needed host file is missing or unsuitable.
    #[error("{0}")]
    Host(String),
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The images directory under a data directory.
pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

/// Builds image `name` into `<data-dir>/images/<name>`, replacing an older build (`debian`
/// with the default [`DebianSource`]).
pub fn build(
    data_dir: &Path,
    name: &str,
    src: &MinimalSources,
    progress: &mut dyn FnMut(&str),
) -> Result<ImageInfo, ImageError> {
    build_from(data_dir, name, src, &DebianSource::default(), progress)
}

/// [`build`] with the Debian mirror and suite given.
pub fn build_from(
    data_dir: &Path,
    name: &str,
    src: &MinimalSources,
    debian: &DebianSource,
    progress: &mut dyn FnMut(&str),
) -> Result<ImageInfo, ImageError> {
    if !RECIPES.contains(&name) {
        return Err(ImageError::UnknownRecipe(name.to_owned()));
    }
    let images = images_dir(data_dir);
    std::fs::create_dir_all(&images).map_err(io(&images))?;
    let tmp = images.join(format!(".{name}.building-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let root = tmp.join("rootfs");
    // The tree's top is the VM's `/`.
    let recipe = public_dirs(&root)
        .map_err(io(&root))
        .and_then(|()| match name {
            "debian" => build_debian(&root, &src.agent, debian, progress),
            _ => build_minimal(&root, src, progress),
        });
    let r = recipe.and_then(|()| {
        let (files, bytes) = tree_size(&root)?;
        let info = ImageInfo {
            name: name.to_owned(),
            files,
            bytes,
            built_at: now_ms(),
            agent: agent_stamp(&src.agent),
            recipe: Some(RECIPE_VERSION),
        };
        let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
        let meta = tmp.join("image.json");
        std::fs::write(&meta, json).map_err(io(&meta))?;
        Ok(info)
    });
    let info = match r {
        Ok(i) => i,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    install(data_dir, name, &tmp)?;
    Ok(info)
}

/// Puts the image tree made in `tmp` (a directory under the images directory) in place as
/// image `name`, replacing an older one; a half-made image is never visible under its name.
pub fn install(data_dir: &Path, name: &str, tmp: &Path) -> Result<(), ImageError> {
    let images = images_dir(data_dir);
    let dest = images.join(name);
    if dest.exists() {
        let old = images.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(io(&dest))?;
        std::fs::rename(tmp, &dest).map_err(io(&dest))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(tmp, &dest).map_err(io(&dest))?;
    }
    Ok(())
}

/// The built images, by name.
pub fn list(data_dir: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let images = images_dir(data_dir);
    let Ok(rd) = std::fs::read_dir(&images) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let meta = e.path().join("image.json");
        if e.file_name().to_string_lossy().starts_with('.') || !meta.is_file() {
            continue;
        }
        let text = std::fs::read(&meta).map_err(io(&meta))?;
        if let Ok(info) = serde_json::from_slice::<ImageInfo>(&text) {
            out.push(info);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An image's canonical archive, by content: what a peer that lacks the image fetches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archive {
    /// The build it was made of ([`ImageInfo::built_at`]).
    pub built_at: u64,
    /// SHA-256 of the archive, hex.
    pub digest: String,
    /// Its size.
    pub bytes: u64,
}

/// `tar` writing image `dir`'s tree to stdout as its canonical archive: GNU format (no pax
/// headers, whose names would carry a process id), entries sorted by name, numeric owners.
/// The same tree gives the same bytes, so the archive's hash names the image's content.
pub fn archive_command(dir: &Path) -> Command {
    let mut c = Command::new("tar");
    c.args(["--format=gnu", "--sort=name", "--numeric-owner", "-C"])
        .arg(dir.join("rootfs"))
        .args(["-cf", "-", "."]);
    c
}

/// The image at `dir`'s archive digest and size, computed once per build and kept in
/// `archive.json` beside it.
pub fn archive(dir: &Path) -> Result<Archive, ImageError> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let meta = dir.join("image.json");
    let info: ImageInfo = serde_json::from_slice(&std::fs::read(&meta).map_err(io(&meta))?)
        .map_err(|e| ImageError::Host(format!("{}: {e}", meta.display())))?;
    let cached = dir.join("archive.json");
    if let Ok(text) = std::fs::read(&cached)
        && let Ok(a) = serde_json::from_slice::<Archive>(&text)
        && a.built_at == info.built_at
    {
        return Ok(a);
    }
    let mut child = archive_command(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Host(format!("cannot run tar: {e}")))?;
    let mut hash = sha2::Sha256::new();
    let mut bytes = 0u64;
    if let Some(mut out) = child.stdout.take() {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = out.read(&mut buf).map_err(io(dir))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            bytes += n as u64;
        }
    }
    let done = child
        .wait_with_output()
        .map_err(|e| ImageError::Host(format!("tar: {e}")))?;
    if !done.status.success() {
        return Err(ImageError::Host(format!(
            "archiving {}: tar: {}",
            dir.display(),
            String::from_utf8_lossy(&done.stderr).trim()
        )));
    }
    let a = Archive {
        built_at: info.built_at,
        digest: hex::encode(hash.finalize()),
        bytes,
    };
    let tmp = cached.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&a).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, &cached))
        .map_err(io(&cached))?;
    Ok(a)
}

/// Bytes in the regular files of a tree.
pub fn tree_bytes(dir: &Path) -> Result<u64, ImageError> {
    tree_size(dir).map(|(_, b)| b)
}

/// Regular files in a tree and their total size.
pub fn tree_size(dir: &Path) -> Result<(u64, u64), ImageError> {
    let (mut files, mut bytes) = (0, 0);
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let ft = e.file_type().map_err(io(&e.path()))?;
        if ft.is_dir() {
            let (f, b) = tree_size(&e.path())?;
            files += f;
            bytes += b;
        } else if ft.is_file() {
            files += 1;
            bytes += e.metadata().map_err(io(&e.path()))?.len();
        }
    }
    Ok((files, bytes))
}

/// Creates directory `p` and any missing parents with mode 0755 whatever the umask (boxd
/// runs with 077, but a VM's tree is for its users to read), as `mkdir -p -m 755` would.
pub fn public_dirs(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if p.is_dir() {
        return Ok(());
    }
    if let Some(parent) = p.parent() {
        public_dirs(parent)?;
    }
    match std::fs::create_dir(p) {
        Ok(()) => std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Lets a tool that builds a VM's tree (debootstrap, tar, chroot) create files with the
/// usual umask 022 rather than boxd's own 077.
pub fn with_public_umask(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_recipes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = MinimalSources {
            busybox: "/bin/busybox".into(),
            agent: "/nonexistent".into(),
        };
        let e = build(d.path(), "gentoo", &src, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("recipes are `minimal`"), "{e}");
        assert!(list(d.path()).unwrap().is_empty());
    }
}
