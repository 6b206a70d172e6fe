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

/// Where the host files for `minimal` come from.
#[derive(Clone, Debug)]
pub struct MinimalSources {
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// The guest agent binary.
    pub agent: PathBuf,
}

/// Where `debian` comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianSource {
    /// Debian mirror (`http://deb.debian.org/debian`).
    pub mirror: String,
    /// Suite (`bookworm`).
    pub suite: String,
}

impl Default for DebianSource {
    fn default() -> Self {
        Self {
            mirror: "http://deb.debian.org/debian".into(),
            suite: "bookworm".into(),
        }
    }
}

/// The image recipes.
pub const RECIPES: &[&str] = &["minimal", "debian"];

/// Packages `debian` adds to debootstrap's minbase: an init for kvm guests, the tools
/// `boxd-net` uses, and what a user expects of a shell and an SSH session.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "iproute2",
    "procps",
    "ca-certificates",
    "openssh-sftp-server",
    "less",
];

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

/// Whether the ELF file at `path` has no program interpreter (is statically linked).
pub fn is_static_elf(path: &Path) -> Result<bool, ImageError> {
    let data = std::fs::read(path).map_err(io(path))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return Err(ImageError::Host(format!(
            "{} is not a 64-bit ELF executable",
            path.display()
        )));
    }
    let bad = || ImageError::Host(format!("{} has a truncated ELF header", path.display()));
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?).map_err(|_| bad())?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(bad)?);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let ty = data
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(bad)?;
        if ty == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

/// The shared libraries `bin` loads, as absolute host paths (empty for a static binary).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, ImageError> {
    if is_static_elf(bin)? {
        return Ok(Vec::new());
    }
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| ImageError::Host(format!("running ldd on {}: {e}", bin.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if libs.is_empty() {
        return Err(ImageError::Host(format!(
            "ldd found no libraries for {}: {}",
            bin.display(),
            text.trim()
        )));
    }
    Ok(libs)
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

/// Copies `from` (following links) to `root` + `at`, creating directories, keeping the mode.
fn copy_into(root: &Path, from: &Path, at: &Path) -> Result<(), ImageError> {
    let rel = at.strip_prefix("/").unwrap_or(at);
    let dest = root.join(rel);
    if let Some(p) = dest.parent() {
        public_dirs(p).map_err(io(p))?;
    }
    std::fs::copy(from, &dest).map_err(io(from))?;
    Ok(())
}

fn build_minimal(
    root: &Path,
    src: &MinimalSources,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt as _;
    if !src.busybox.is_file() || !is_static_elf(&src.busybox)? {
        return Err(ImageError::Host(format!(
            "{} is not a static busybox: install Debian's busybox-static (apt-get install busybox-static)",
            src.busybox.display()
        )));
    }
    if !src.agent.is_file() {
        return Err(ImageError::Host(format!(
            "the guest agent {} is missing: build it with `cargo build -p boxd-agent` (it is installed next to boxd)",
            src.agent.display()
        )));
    }
    progress("laying out the tree");
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "etc/boxd",
        "root",
        "proc",
        "sys",
        "dev",
        "run",
        "var/log",
        "home",
    ] {
        let p = root.join(d);
        public_dirs(&p).map_err(io(&p))?;
    }
    let t = root.join("tmp");
    public_dirs(&t).map_err(io(&t))?;
    std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o1777)).map_err(io(&t))?;
    let r = root.join("root");
    std::fs::set_permissions(&r, std::fs::Permissions::from_mode(0o700)).map_err(io(&r))?;

    progress("busybox and its applets");
    copy_into(root, &src.busybox, Path::new("/bin/busybox"))?;
    let out = Command::new(&src.busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| ImageError::Host(format!("running {}: {e}", src.busybox.display())))?;
    let mut applets = 0;
    for path in String::from_utf8_lossy(&out.stdout).lines() {
        let path = path.trim();
        if path.is_empty() || path == "bin/busybox" || path.contains("..") {
            continue;
        }
        let link = root.join(path);
        if let Some(p) = link.parent() {
            public_dirs(p).map_err(io(p))?;
        }
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io(&link))?;
            applets += 1;
        }
    }
    progress(&format!("{applets} applets linked"));

    progress("the guest agent");
    copy_into(root, &src.agent, Path::new("/usr/local/bin/boxd-agent"))?;
    for lib in shared_libraries(&src.agent)? {
        copy_into(root, &lib, &lib)?;
    }

    progress("users and settings");
    let sbin = root.join("usr/local/sbin");
    public_dirs(&sbin).map_err(io(&sbin))?;
    for (file, text, mode) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
        (
            "etc/shadow",
            "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
            0o600,
        ),
        ("etc/hostname", "vm\n", 0o644),
        ("etc/hosts", "127.0.0.1 localhost\n", 0o644),
        ("etc/resolv.conf", "", 0o644),
        ("etc/profile", "export PS1='\\u@\\h:\\w\\$ '\n", 0o644),
        ("etc/inittab", MINIMAL_INITTAB, 0o644),
        ("usr/local/sbin/boxd-net", BOXD_NET, 0o755),
        ("usr/local/sbin/boxd-agent-run", BOXD_AGENT_RUN, 0o755),
    ] {
        let p = root.join(file);
        std::fs::write(&p, text).map_err(io(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io(&p))?;
    }
    Ok(())
}

fn build_debian(
    root: &Path,
    agent: &Path,
    src: &DebianSource,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    use std::io::BufRead as _;
    use std::os::unix::fs::PermissionsExt as _;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::Host(
            "building debian needs root (debootstrap makes device nodes and chroots)".into(),
        ));
    }
    if !agent.is_file() {
        return Err(ImageError::Host(format!(
            "the guest agent {} is missing: build it with `cargo build -p boxd-agent` (it is installed next to boxd)",
            agent.display()
        )));
    }
    progress(&format!(
        "debootstrap {} from {} (minbase + {}); this takes minutes",
        src.suite,
        src.mirror,
        DEBIAN_PACKAGES.join(",")
    ));
    let mut child = with_public_umask(&mut Command::new("debootstrap"))
        .arg("--variant=minbase")
        .arg(format!("--include={}", DEBIAN_PACKAGES.join(",")))
        .arg(&src.suite)
        .arg(root)
        .arg(&src.mirror)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            ImageError::Host(format!(
                "cannot run debootstrap: {e} (apt-get install debootstrap)"
            ))
        })?;
    // debootstrap's stderr is short (its errors); read it on a thread so neither pipe fills.
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut e) = stderr {
            _ = std::io::Read::read_to_string(&mut e, &mut text);
        }
        text
    });
    let mut last = String::new();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            // "I: Retrieving libc6 2.36-9", "I: Unpacking ...", "I: Configuring ..."
            if let Some(step) = line.strip_prefix("I: ") {
                progress(step);
            }
            last = line;
        }
    }
    let status = child
        .wait()
        .map_err(|e| ImageError::Host(format!("debootstrap: {e}")))?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        let log = root.join("debootstrap/debootstrap.log");
        let tail: Vec<String> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .map(str::to_owned)
            .collect();
        return Err(ImageError::Host(format!(
            "debootstrap {} failed ({status}): {} {} {}",
            src.suite,
            errors.trim(),
            last,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }

    progress("the guest agent and its units");
    copy_into(root, agent, Path::new("/usr/local/bin/boxd-agent"))?;
    let ok = with_public_umask(&mut Command::new("chroot"))
        .arg(root)
        .args(["/usr/local/bin/boxd-agent", "--help"])
        .output()
        .map_err(|e| ImageError::Host(format!("chroot: {e}")))?;
    if !ok.status.success() {
        return Err(ImageError::Host(format!(
            "the guest agent does not run inside {} (built against a newer C library than the suite has?): {}",
            src.suite,
            String::from_utf8_lossy(&ok.stderr).trim()
        )));
    }
    for (file, text, mode) in [
        ("usr/local/sbin/boxd-net", BOXD_NET, 0o755),
        ("usr/local/sbin/boxd-agent-run", BOXD_AGENT_RUN, 0o755),
        ("etc/systemd/system/boxd-net.service", BOXD_NET_UNIT, 0o644),
        (
            "etc/systemd/system/boxd-agent.service",
            BOXD_AGENT_UNIT,
            0o644,
        ),
        ("etc/hostname", "vm\n", 0o644),
        ("etc/hosts", "127.0.0.1 localhost\n", 0o644),
        // The host's resolver means nothing inside a VM.
        ("etc/resolv.conf", "", 0o644),
    ] {
        let p = root.join(file);
        if let Some(d) = p.parent() {
            public_dirs(d).map_err(io(d))?;
        }
        _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).map_err(io(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io(&p))?;
    }
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    public_dirs(&wants).map_err(io(&wants))?;
    for unit in ["boxd-net.service", "boxd-agent.service"] {
        let link = wants.join(unit);
        _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), &link)
            .map_err(io(&link))?;
    }
    progress("cleaning apt's caches");
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = root.join(d);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

/// systemd unit: `boxd-net` once, before the network is considered up (kvm guests).
const BOXD_NET_UNIT: &str = "[Unit]
Description=boxd: address, host name and agent key from the kernel command line
DefaultDependencies=no
After=local-fs.target
Before=network.target
ConditionKernelCommandLine=boxd.ip

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/boxd-net

[Install]
WantedBy=multi-user.target
";

/// systemd unit: the guest agent, always restarted (kvm guests).
const BOXD_AGENT_UNIT: &str = "[Unit]
Description=boxd guest agent (SSH sessions relayed by boxd's proxy)
After=boxd-net.service
Wants=boxd-net.service
ConditionPathExists=/etc/boxd/agent.pub

[Service]
ExecStart=/usr/local/sbin/boxd-agent-run
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
";

/// A kvm guest's boot-time settings, from `boxd.*` words on the kernel command line (the
/// sandbox runtime sets the same things from outside and never runs this).
pub const BOXD_NET: &str = r#"#!/bin/sh
# boxd-net: applies a kvm guest's settings from the kernel command line once at boot:
# boxd.ip=ADDR/PREFIX boxd.gw=GATEWAY boxd.hostname=NAME boxd.port=AGENT_PORT
# boxd.key=BASE64 (the cluster's agent key, which the guest agent accepts).
for w in $(cat /proc/cmdline); do
  case "$w" in
    boxd.ip=*) addr=${w#boxd.ip=} ;;
    boxd.gw=*) gw=${w#boxd.gw=} ;;
    boxd.hostname=*) name=${w#boxd.hostname=} ;;
    boxd.port=*) port=${w#boxd.port=} ;;
    boxd.key=*) key=${w#boxd.key=} ;;
  esac
done
if [ -n "$name" ]; then hostname "$name"; echo "$name" > /etc/hostname; fi
ip link set lo up
if [ -n "$addr" ]; then
  ip link set eth0 up
  ip addr add "$addr" dev eth0
  ip route add default via "$gw"
fi
mkdir -p /etc/boxd
if [ -n "$key" ]; then echo "$key" | base64 -d > /etc/boxd/agent.pub; fi
echo "BOXD_AGENT_PORT=${port:-2200}" > /etc/boxd/agent.env
echo "boxd-net: ${name:-?} ${addr:-no address} via ${gw:-none}, agent on ${port:-2200}"
"#;

/// Runs the guest agent with the settings `boxd-net` wrote (kvm guests).
pub const BOXD_AGENT_RUN: &str = r#"#!/bin/sh
. /etc/boxd/agent.env
# The VM's own host key, which the worker put on the disk (absent on disks made before).
if [ -f /etc/boxd/agent_host_key ]; then set -- --host-key /etc/boxd/agent_host_key; fi
exec /usr/local/bin/boxd-agent --listen "0.0.0.0:$BOXD_AGENT_PORT" --authorized-key /etc/boxd/agent.pub "$@"
"#;

/// busybox init's table for `minimal` as a kvm guest: mount, configure, keep the agent up.
const MINIMAL_INITTAB: &str = "::sysinit:/bin/mount -t proc proc /proc
::sysinit:/bin/mount -o remount,rw /
::sysinit:/bin/mount -t sysfs sys /sys
::sysinit:/bin/mkdir -p /dev/pts
::sysinit:/bin/mount -t devpts -o ptmxmode=0666 devpts /dev/pts
::sysinit:/bin/mount -t tmpfs tmpfs /run
::sysinit:/bin/mount -t tmpfs tmpfs /tmp
::sysinit:/usr/local/sbin/boxd-net
::respawn:/usr/local/sbin/boxd-agent-run
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn elf_linkage_is_read_from_program_headers() {
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap(), "test binaries are dynamic");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        assert!(is_static_elf(&f).is_err());
    }

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
