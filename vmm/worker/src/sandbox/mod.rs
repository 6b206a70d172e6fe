//! `boxd sandbox --config SPEC.json --api-sock PATH`: one VM of the `sandbox` runtime, for
//! hosts without usable hardware virtualization. Same process shape as `boxd vmm`: one OS
//! process per VM, detached from the supervisor, with the same HTTP API on a Unix socket
//! (`GET /vm`, `PUT /vm/actions {"action":"shutdown"}`), so the supervisor treats both alike.
//!
//! The process (the *monitor*) stays in the host's namespaces and makes the VM's init:
//!
//! 1. the monitor binds the API socket and takes a block of host ids (`userns`); a short-lived
//!    holder process makes the VM's user namespace (VM ids 0–65535 = that block) and a network
//!    namespace it owns; the monitor creates the veth pair (`eth0` inside, the other end on the
//!    worker's bridge) and configures `lo` and `eth0` there;
//! 2. `unshare(CLONE_NEWPID)` and fork: the child is PID 1 of a new PID namespace (the monitor
//!    switches its own children back with `setns`); the monitor puts it into its cgroups;
//! 3. the child joins the network namespace, unshares mount, UTS and IPC namespaces, mounts
//!    the VM's disk as idmapped layers (its files are the VM's root's), `/proc` and a fresh
//!    `/dev` (device binds, its own devpts) and `pivot_root`s into it (`root`);
//! 4. it enters the user namespace as uid 0 — from here on it is the VM's root, an
//!    unprivileged id on the host;
//! 5. with its own cgroup namespace, a cut capability bounding set and a seccomp filter
//!    (`confine`), as PID 1 it starts the guest agent as its child, restarts it if it dies,
//!    and reaps orphans — the job of an init.
//!
//! The child has `PR_SET_PDEATHSIG = SIGKILL`: the VM ends with its monitor, and the monitor
//! ends when PID 1 does. Shutdown is `SIGKILL` to PID 1, which ends every process of the VM;
//! the root tree is the VM's disk and keeps everything written to it.
//!
//! Exit status: 0 shut down through the API; 1 the VM ended by itself or could not start;
//! 2 invalid spec or unusable API socket (nothing started).

mod cgroups;
pub use cgroups::oom_kills;
mod init;
mod layer;
pub(crate) mod mounts;
mod root;
pub mod userns;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use boxd_vmm::api::{self, Request, Response};
pub use cgroups::{missing_controllers, remove as remove_cgroups};

/// Everything the sandbox process needs, written by the supervisor as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Host name inside the VM (its DNS label).
    pub hostname: String,
    /// The VM's root: the tree itself, or (with `overlay`) the directory it is mounted on.
    pub rootfs: PathBuf,
    /// The disk as an overlay of the image (read-only) and the VM's own layer.
    #[serde(default)]
    pub overlay: Option<Overlay>,
    /// CPU limit in whole CPUs.
    pub vcpus: u32,
    /// Memory limit.
    pub memory_mib: u64,
    /// Most processes inside.
    pub max_pids: u32,
    /// Networking; none leaves the VM with only a loopback interface.
    pub net: Option<SandboxNet>,
    /// The guest agent.
    pub agent: AgentSpec,
    /// cgroup path below each hierarchy's root, e.g. `boxd/<vm id>`.
    pub cgroup: String,
}

/// A copy-on-write disk: overlayfs with the image tree below and the VM's changes above.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    /// The image tree (never written).
    pub lower: PathBuf,
    /// The VM's layer: everything it writes.
    pub upper: PathBuf,
    /// overlayfs's work directory (same filesystem as `upper`).
    pub work: PathBuf,
    /// An ext4 image holding `upper` and `work`, mounted on their parent directory (see
    /// `layer`), so the layer is bounded by the image's size; none: they are host directories.
    #[serde(default)]
    pub image: Option<PathBuf>,
}

/// The VM's wire to the worker's bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxNet {
    /// Bridge the host end joins (must exist).
    pub bridge: String,
    /// Host end's name (at most 15 bytes).
    pub host_veth: String,
    /// The MAC of the VM's end (`eth0`); empty: the kernel's choice.
    #[serde(default)]
    pub mac: String,
    /// The VM's address on `eth0`.
    pub ip: Ipv4Addr,
    /// Prefix length of the bridge subnet.
    pub prefix: u8,
    /// Default route (the bridge's address).
    pub gateway: Ipv4Addr,
}

/// How PID 1 starts the guest agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Agent binary, as a path inside the root tree.
    pub path: PathBuf,
    /// The cluster's agent public key (OpenSSH form), written to `/etc/boxd/agent.pub`.
    pub authorized_key: String,
    /// The VM's agent host key (a host path, read before the VM starts), given to the agent
    /// at [`crate::agent_key::GUEST_PATH`]; none: a throwaway key.
    #[serde(default)]
    pub host_key: Option<PathBuf>,
    /// TCP port it listens on (all addresses of the VM).
    pub port: u16,
}

/// Where the agent's key goes inside the root tree.
pub const AGENT_KEY_PATH: &str = "etc/boxd/agent.pub";

impl SandboxSpec {
    /// Reads and checks a spec file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let spec: SandboxSpec = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a sandbox spec: {e}", path.display()))?;
        spec.check()?;
        Ok(spec)
    }

    /// Checks what can be checked before anything starts.
    pub fn check(&self) -> Result<(), String> {
        if !self.rootfs.is_absolute() || !self.rootfs.is_dir() {
            return Err(format!(
                "rootfs {} is not an absolute path to a directory",
                self.rootfs.display()
            ));
        }
        let tree = self.overlay.as_ref().map_or(&self.rootfs, |o| &o.lower);
        let agent = tree.join(
            self.agent
                .path
                .strip_prefix("/")
                .unwrap_or(&self.agent.path),
        );
        if !agent.is_file() {
            return Err(format!(
                "the guest agent {} is not in the root tree {} (rebuild the image)",
                self.agent.path.display(),
                tree.display()
            ));
        }
        if let Some(o) = &self.overlay {
            // With an image, upper and work are inside it (seen once it is mounted).
            let on_host: &[&PathBuf] = match &o.image {
                Some(_) => &[&o.lower],
                None => &[&o.lower, &o.upper, &o.work],
            };
            for d in on_host {
                if !d.is_absolute() || !d.is_dir() {
                    return Err(format!("overlay directory {} is missing", d.display()));
                }
            }
            if o.upper.parent() != o.work.parent() {
                return Err("the overlay's upper and work directories must be siblings".into());
            }
            if let Some(image) = &o.image {
                let at = o.upper.parent().unwrap_or(Path::new(""));
                if !image.is_file() || !at.is_absolute() || !at.is_dir() {
                    return Err(format!(
                        "the disk image {} or its mount point {} is missing",
                        image.display(),
                        at.display()
                    ));
                }
            }
        }
        if self.hostname.is_empty() || self.hostname.len() > 63 {
            return Err(format!("hostname {:?} must be 1-63 bytes", self.hostname));
        }
        if let Some(n) = &self.net {
            if n.host_veth.is_empty() || n.host_veth.len() > 15 || n.bridge.len() > 15 {
                return Err("interface names must be 1-15 bytes".into());
            }
            if n.prefix == 0 || n.prefix > 30 {
                return Err(format!("prefix /{} must be between 1 and 30", n.prefix));
            }
            if !n.mac.is_empty() && !crate::isolation::parse_mac(&n.mac) {
                return Err(format!("MAC {:?} is not six hex pairs", n.mac));
            }
        }
        if self.cgroup.split('/').any(|p| p.is_empty() || p == "..") {
            return Err(format!("cgroup {:?} must be a relative path", self.cgroup));
        }
        Ok(())
    }
}

/// Options of `boxd sandbox`.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Spec (JSON).
    pub config: &'a Path,
    /// API socket path.
    pub api_sock: &'a Path,
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(errno("pipe"));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn read_byte(fd: &OwnedFd) -> Option<u8> {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reads one byte into a live buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            return Some(b[0]);
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

fn write_byte(fd: &OwnedFd, b: u8) {
    // SAFETY: writes one byte from a live buffer.
    _ = unsafe { libc::write(fd.as_raw_fd(), (&raw const b).cast(), 1) };
}

/// Runs the VM to its end; returns the process exit status.
pub fn run(opts: &Options<'_>) -> u8 {
    let spec = match SandboxSpec::load(opts.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("boxd sandbox: {e}");
            return 2;
        }
    };
    let listener = match boxd_vmm::process::detach_and_bind("boxd sandbox", opts.api_sock) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let fail = |what: String| {
        eprintln!("boxd sandbox: {what}");
        _ = std::fs::remove_file(opts.api_sock);
        1
    };
    let started = Instant::now();
    let init = match init::start_init(&spec) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let (child, uid_base) = (init.pid, init.uid_base);
    let shutting_down = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(AtomicBool::new(false));
    {
        let (spec, shutting_down, ended) = (spec.clone(), shutting_down.clone(), ended.clone());
        let spawned = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                api::serve_with(
                    listener,
                    |req| handle(req, &spec, (child, uid_base), started, &shutting_down),
                    || ended.load(Ordering::Acquire),
                );
            });
        if let Err(e) = spawned {
            // SAFETY: signals our own child.
            unsafe { libc::kill(child, libc::SIGKILL) };
            return fail(format!("cannot start the API thread: {e}"));
        }
    }
    if let Err(e) = init.limit_and_release(&spec) {
        return fail(e);
    }
    tracing::info!(pid = child, uid_base = init.uid_base, hostname = %spec.hostname, rootfs = %spec.rootfs.display(),
        ip = ?spec.net.as_ref().map(|n| n.ip), "sandbox running");
    let status = wait_child(child);
    // Said before the API goes quiet: the worker notices the VM gone by its API socket and
    // reads this line back as the VM's last words (`Host::last_words`).
    let by_itself = !shutting_down.load(Ordering::Acquire);
    if by_itself {
        let mut why = describe_status(status);
        let oom = cgroups::oom_kills(&spec.cgroup);
        if oom > 0 {
            why += &format!("; out of memory: the kernel killed {oom} of its processes");
        }
        tracing::error!("the sandbox's init ended by itself: {why}");
    }
    ended.store(true, Ordering::Release);
    remove_cgroups(&spec.cgroup);
    _ = std::fs::remove_file(opts.api_sock);
    if by_itself {
        1
    } else {
        tracing::info!("sandbox shut down");
        0
    }
}

fn handle(
    req: &Request,
    spec: &SandboxSpec,
    (child, uid_base): (libc::pid_t, u32),
    started: Instant,
    shutting_down: &AtomicBool,
) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/vm") => Response::json(
            200,
            &serde_json::json!({
                "state": if shutting_down.load(Ordering::Acquire) { "stopping" } else { "running" },
                "runtime": "sandbox",
                "pid": child,
                "uid_base": uid_base,
                "vcpus": spec.vcpus,
                "memory_mib": spec.memory_mib,
                "ip": spec.net.as_ref().map(|n| n.ip.to_string()),
                "uptime_ms": started.elapsed().as_millis() as u64,
            }),
        ),
        ("PUT", "/vm/actions") => {
            let a: api::Action = match serde_json::from_slice(&req.body) {
                Ok(a) => a,
                Err(e) => {
                    return Response::error(400, format!("expected {{\"action\": ...}}: {e}"));
                }
            };
            match a.action.as_str() {
                "shutdown" => {
                    shutting_down.store(true, Ordering::Release);
                    // SAFETY: signals our own child (PID 1 of the VM); SIGKILL to a PID
                    // namespace's init ends every process in it.
                    unsafe { libc::kill(child, libc::SIGKILL) };
                    Response::empty()
                }
                "pause" | "resume" => {
                    Response::error(409, "the sandbox runtime does not pause VMs")
                }
                other => {
                    Response::error(400, format!("unknown action {other:?}: use \"shutdown\""))
                }
            }
        }
        (_, "/vm" | "/vm/actions") => Response::error(405, "method not allowed"),
        (_, p) => Response::error(404, format!("no such resource {p}: try GET /vm")),
    }
}

fn wait_child(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; status is a live int.
        let r = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if r == pid {
            return status;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return status;
        }
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit {}", libc::WEXITSTATUS(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(root: &Path) -> SandboxSpec {
        SandboxSpec {
            hostname: "web".into(),
            rootfs: root.to_owned(),
            overlay: None,
            vcpus: 1,
            memory_mib: 256,
            max_pids: 512,
            net: None,
            agent: AgentSpec {
                path: "/usr/local/bin/boxd-agent".into(),
                authorized_key: "ssh-ed25519 AAAA".into(),
                host_key: None,
                port: 2200,
            },
            cgroup: "boxd/x".into(),
        }
    }

    #[test]
    fn specs_are_checked_before_anything_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = spec(dir.path());
        assert!(s.check().unwrap_err().contains("guest agent"));
        std::fs::create_dir_all(dir.path().join("usr/local/bin")).expect("mkdir");
        std::fs::write(dir.path().join("usr/local/bin/boxd-agent"), b"").expect("write");
        assert_eq!(s.check(), Ok(()));
        let mut bad = s.clone();
        bad.cgroup = "../escape".into();
        assert!(bad.check().is_err());
        let mut bad = s.clone();
        bad.rootfs = "relative".into();
        assert!(bad.check().is_err());
        let mut bad = s;
        bad.net = Some(SandboxNet {
            bridge: "boxd0".into(),
            host_veth: "a-name-longer-than-15".into(),
            mac: String::new(),
            ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
        });
        assert!(bad.check().unwrap_err().contains("15 bytes"));
    }
}
