//! The image recipes: `minimal` (busybox, the agent and the shared libraries it needs) and
//! `debian` (debootstrap minbase with systemd), each built into a tree the caller then
//! installs (see `image`).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ImageError, io, public_dirs, with_public_umask};

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

pub(super) fn build_minimal(
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

pub(super) fn build_debian(
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
}
