//! `boxd sandbox --config SPEC.json --api-sock PATH`: one VM of the `sandbox` runtime, for
//! hosts without usable hardware virtualization. Same process shape as `boxd vmm`: one OS
//! process per VM, detached from the supervisor, with the same HTTP API on a Unix socket
//! (`GET /vm`, `PUT /vm/actions {"action":"shutdown"}`), so the supervisor treats both alike.
//!
//! The process (the *monitor*) stays in the host's namespaces and forks the VM's init:
//!
//! 1. the monitor binds the API socket, then `unshare(CLONE_NEWPID)` and forks: the child is
//!    PID 1 of a new PID namespace (the monitor switches its own children back with `setns`,
//!    so the `ip` commands it runs stay outside);
//! 2. the child unshares mount, network, UTS and IPC namespaces and tells the monitor;
//! 3. the monitor creates the veth pair (its `eth0` end inside the child's network namespace,
//!    the other on the worker's bridge) and puts the child into its cgroups, then lets it go;
//! 4. the child configures `lo` and `eth0`, bind-mounts the VM's root tree, mounts `/proc`, a
//!    fresh `/dev` (device binds, its own devpts) and `pivot_root`s into it;
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

use std::ffi::CString;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::api::{self, Request, Response};

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
            for d in [&o.lower, &o.upper, &o.work] {
                if !d.is_absolute() || !d.is_dir() {
                    return Err(format!("overlay directory {} is missing", d.display()));
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
    let listener = match crate::process::detach_and_bind("boxd sandbox", opts.api_sock) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let fail = |what: String| {
        eprintln!("boxd sandbox: {what}");
        _ = std::fs::remove_file(opts.api_sock);
        1
    };
    let started = Instant::now();
    let init = match start_init(&spec) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let child = init.pid;
    let shutting_down = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(AtomicBool::new(false));
    {
        let (spec, shutting_down, ended) = (spec.clone(), shutting_down.clone(), ended.clone());
        let spawned = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                api::serve_with(
                    listener,
                    |req| handle(req, &spec, child, started, &shutting_down),
                    || ended.load(Ordering::Acquire),
                );
            });
        if let Err(e) = spawned {
            // SAFETY: signals our own child.
            unsafe { libc::kill(child, libc::SIGKILL) };
            return fail(format!("cannot start the API thread: {e}"));
        }
    }
    init.limit_and_release(&spec);
    tracing::info!(pid = child, hostname = %spec.hostname, rootfs = %spec.rootfs.display(),
        ip = ?spec.net.as_ref().map(|n| n.ip), "sandbox running");
    let status = wait_child(child);
    ended.store(true, Ordering::Release);
    remove_cgroups(&spec.cgroup);
    _ = std::fs::remove_file(opts.api_sock);
    if shutting_down.load(Ordering::Acquire) {
        tracing::info!("sandbox shut down");
        0
    } else {
        tracing::error!(status = %describe_status(status), "the sandbox's init ended by itself");
        1
    }
}

fn handle(
    req: &Request,
    spec: &SandboxSpec,
    child: libc::pid_t,
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

/// Forks the VM's init in new namespaces and wires it; returns its PID (in our namespace).
fn start_init(spec: &SandboxSpec) -> Result<Init, String> {
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let own_pidns =
        std::fs::File::open("/proc/self/ns/pid").map_err(|e| format!("/proc/self/ns/pid: {e}"))?;
    // SAFETY: unshare only changes which PID namespace our next children are created in.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(errno(
            "unshare(CLONE_NEWPID) (the sandbox runtime needs root)",
        ));
    }
    // SAFETY: this process is single-threaded here (the API thread starts later), so the child
    // may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno("fork"));
    }
    if pid == 0 {
        drop(ready_r);
        drop(go_w);
        let code = match init_child(spec, &ready_w, &go_r) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("boxd sandbox (init): {e}");
                write_byte(&ready_w, b'E');
                1
            }
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(ready_w);
    drop(go_r);
    // Our later children (the `ip` commands) belong to our own PID namespace again.
    // SAFETY: setns to the namespace we are in; affects only our future children.
    if unsafe { libc::setns(own_pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        tracing::warn!("{}", errno("setns back to our PID namespace"));
    }
    let kill = |e: String| {
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_child(pid);
        e
    };
    let t0 = Instant::now();
    if read_byte(&ready_r) != Some(b'k') {
        return Err(kill("the VM's init could not create its namespaces".into()));
    }
    if let Some(net) = &spec.net {
        wire_host(net, pid).map_err(kill)?;
    }
    tracing::debug!(wired = ?t0.elapsed(), "VM wired");
    write_byte(&go_w, b'g');
    Ok(Init { pid, go: go_w })
}

/// The VM's init, waiting for its cgroups before it starts the agent.
struct Init {
    pid: libc::pid_t,
    go: OwnedFd,
}

impl Init {
    /// Puts the VM into its cgroups (in v1 a move into a memory cgroup costs ~10 ms, spent
    /// while init wires its side and mounts its root), then lets it start the agent.
    fn limit_and_release(self, spec: &SandboxSpec) {
        let t0 = Instant::now();
        let applied = apply_cgroups(spec, self.pid);
        tracing::debug!(controllers = ?applied, took = ?t0.elapsed(), "cgroup limits");
        write_byte(&self.go, b'c');
    }
}

/// Runs `ip -batch -` with `commands` (one per line): one process for several changes, each a
/// few milliseconds cheaper than its own `ip`.
fn ip_batch(commands: &[String]) -> Result<(), String> {
    let mut child = std::process::Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let script = commands.join("\n") + "\n";
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("ip -batch: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ip -batch: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip: {} (commands: {})",
            String::from_utf8_lossy(&out.stderr).trim(),
            commands.join("; ")
        ))
    }
}

fn wire_host(net: &SandboxNet, pid: libc::pid_t) -> Result<(), String> {
    let cmds = [
        format!(
            "link add {} type veth peer name eth0{} netns {pid}",
            net.host_veth,
            if net.mac.is_empty() {
                String::new()
            } else {
                format!(" address {}", net.mac)
            }
        ),
        format!("link set {} master {} up", net.host_veth, net.bridge),
        // A VM started again keeps its address but not its MAC: forget the old one, or the
        // host sends to it until the stale entry times out.
        format!("neigh flush to {} dev {}", net.ip, net.bridge),
    ];
    match ip_batch(&cmds) {
        // A pair left by a monitor killed between creating it and moving its peer.
        Err(e) if e.contains("File exists") => {
            ip_batch(&[format!("link del {}", net.host_veth)])?;
            ip_batch(&cmds)
        }
        r => r,
    }
}

fn wire_guest(net: Option<&SandboxNet>) -> Result<(), String> {
    let mut cmds = vec!["link set lo up".to_owned()];
    if let Some(net) = net {
        cmds.push(format!("addr add {}/{} dev eth0", net.ip, net.prefix));
        cmds.push("link set eth0 up".to_owned());
        cmds.push(format!("route add default via {}", net.gateway));
    }
    ip_batch(&cmds)
}

/// The init side: namespaces, network, filesystem, then PID 1's loop. Returns only on error.
fn init_child(
    spec: &SandboxSpec,
    ready: &OwnedFd,
    go: &OwnedFd,
) -> Result<std::convert::Infallible, String> {
    // SAFETY: plain prctl; the VM dies with its monitor.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    // SAFETY: unshare of namespaces in a single-threaded process.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(errno("unshare(mount, net, uts, ipc)"));
    }
    write_byte(ready, b'k');
    if read_byte(go) != Some(b'g') {
        return Err("the monitor did not finish wiring the VM".into());
    }
    let host = spec.hostname.as_bytes();
    // SAFETY: host is a live buffer of the given length.
    if unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) } != 0 {
        return Err(errno("sethostname"));
    }
    let t0 = Instant::now();
    wire_guest(spec.net.as_ref())?;
    let wired = t0.elapsed();
    enter_root(&spec.rootfs, spec.overlay.as_ref())?;
    tracing::debug!(?wired, root = ?t0.elapsed(), "init ready (cumulative)");
    // Everything forked from here on (the agent, the user's processes) starts in the cgroups.
    if read_byte(go) != Some(b'c') {
        return Err("the monitor did not set the VM's limits".into());
    }
    let key_file = Path::new("/").join(AGENT_KEY_PATH);
    key_file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&key_file, format!("{}\n", spec.agent.authorized_key)))
        .map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
    // Its own view of cgroups (it is at the root of its own), then the limits on what its
    // root may do (see `confine`); the agent and everything after it inherit both.
    // SAFETY: unshare of the cgroup namespace in a single-threaded process.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(errno("unshare(cgroup)"));
    }
    crate::confine::confine()?;
    init_loop(&spec.agent)
}

/// [`mount`] with a path as the source.
pub(crate) fn mount_path(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src = src
        .map(|p| {
            p.to_str()
                .ok_or_else(|| format!("{} is not UTF-8", p.display()))
        })
        .transpose()?;
    mount(src, target, fstype, flags, data)
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, String> {
    CString::new(s.as_ref()).map_err(|_| "path contains a NUL byte".to_owned())
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target.as_os_str().as_bytes())?;
    let fstype_c = fstype.map(cstr).transpose()?;
    let data_c = data.map(cstr).transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a live NUL-terminated string.
    let r = unsafe {
        libc::mount(
            p(&src_c),
            target_c.as_ptr(),
            p(&fstype_c),
            flags,
            p(&data_c).cast(),
        )
    };
    if r != 0 {
        return Err(errno(&format!("mount {}", target.display())));
    }
    Ok(())
}

/// Makes `rootfs` the root: private mounts, a bind of the tree, /proc, a fresh /dev, then
/// `pivot_root` and detaching the old root.
fn enter_root(rootfs: &Path, overlay: Option<&Overlay>) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    match overlay {
        Some(o) => {
            if [&o.lower, &o.upper, &o.work].iter().any(|p| {
                p.as_os_str()
                    .as_bytes()
                    .iter()
                    .any(|b| *b == b',' || *b == b':')
            }) {
                return Err("overlay paths must not contain ',' or ':'".into());
            }
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                o.lower.display(),
                o.upper.display(),
                o.work.display()
            );
            mount(Some("overlay"), rootfs, Some("overlay"), 0, Some(&opts))?;
        }
        None => {
            let root = rootfs.to_str().ok_or("rootfs path is not UTF-8")?;
            mount(Some(root), rootfs, None, libc::MS_BIND | libc::MS_REC, None)?;
        }
    }
    let mk = |p: &Path| std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()));
    let proc_dir = rootfs.join("proc");
    mk(&proc_dir)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    let dev = rootfs.join("dev");
    mk(&dev)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        std::fs::write(&target, b"").map_err(|e| format!("{}: {e}", target.display()))?;
        let host = format!("/dev/{name}");
        mount(Some(&host), &target, None, libc::MS_BIND, None)?;
    }
    let pts = dev.join("pts");
    mk(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )?;
    let shm = dev.join("shm");
    mk(&shm)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    // The host's kernel knobs are not the VM's to turn (see `confine`).
    crate::confine::restrict_proc(&proc_dir, &dev.join("null"))?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link)).map_err(|e| format!("/dev/{link}: {e}"))?;
    }
    let old = rootfs.join(".oldroot");
    mk(&old)?;
    let new_c = cstr(rootfs.as_os_str().as_bytes())?;
    let old_c = cstr(old.as_os_str().as_bytes())?;
    // SAFETY: both are live NUL-terminated paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) } != 0 {
        return Err(errno("pivot_root"));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    let old_in = cstr("/.oldroot")?;
    // SAFETY: a live NUL-terminated path.
    if unsafe { libc::umount2(old_in.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(errno("umount the old root"));
    }
    _ = std::fs::remove_dir("/.oldroot");
    Ok(())
}

/// PID 1: keeps the agent running and reaps every orphan.
fn init_loop(agent: &AgentSpec) -> Result<std::convert::Infallible, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = cstr(agent.path.as_os_str().as_bytes())?;
    let args = [
        cstr(agent.path.as_os_str().as_bytes())?,
        cstr("--listen")?,
        cstr(format!("0.0.0.0:{}", agent.port))?,
        cstr("--authorized-key")?,
        cstr(format!("/{AGENT_KEY_PATH}"))?,
    ];
    let env = [
        cstr("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")?,
        cstr("HOME=/root")?,
        cstr("BOXD_LOG=info")?,
    ];
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let spawn = || -> libc::pid_t {
        // SAFETY: PID 1 is single-threaded; the child only calls async-signal-safe functions
        // (setsid, execve, _exit) with pointers prepared before the fork.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::setsid();
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
            pid
        }
    };
    let mut agent_pid = spawn();
    let mut last_start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waits for any child; status is a live int.
        let r = unsafe { libc::waitpid(-1, &raw mut status, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // No children at all: start the agent again below.
            agent_pid = -1;
        }
        if r == agent_pid || agent_pid < 0 {
            eprintln!(
                "boxd sandbox (init): the guest agent ended ({}); restarting it",
                describe_status(status)
            );
            // Back off when it keeps dying at once.
            if last_start.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_secs(1));
            }
            agent_pid = spawn();
            last_start = Instant::now();
        }
        if agent_pid < 0 {
            return Err(errno("fork the guest agent"));
        }
    }
}

/// The cgroup directories a spec uses: (hierarchy root, limits to write).
fn cgroup_plan(spec: &SandboxSpec) -> Vec<(PathBuf, Vec<(&'static str, String)>)> {
    let base = Path::new("/sys/fs/cgroup");
    let mem = spec.memory_mib.max(16) * (1 << 20);
    let quota = u64::from(spec.vcpus.max(1)) * 100_000;
    if base.join("cgroup.controllers").is_file() {
        // cgroup v2, unified at the root.
        let limits = vec![
            ("memory.max", mem.to_string()),
            ("cpu.max", format!("{quota} 100000")),
            ("pids.max", spec.max_pids.to_string()),
        ];
        return vec![(base.join(&spec.cgroup), limits)];
    }
    let mut out = Vec::new();
    for (ctl, limits) in [
        ("memory", vec![("memory.limit_in_bytes", mem.to_string())]),
        (
            "cpu",
            vec![
                ("cpu.cfs_period_us", "100000".to_owned()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ],
        ),
        ("pids", vec![("pids.max", spec.max_pids.to_string())]),
    ] {
        let root = base.join(ctl);
        if root.is_dir() {
            out.push((root.join(&spec.cgroup), limits));
        }
    }
    out
}

/// Puts `pid` into a cgroup per available controller with the spec's limits. Best effort:
/// a host without a controller runs the VM without that limit, said in the log.
fn apply_cgroups(spec: &SandboxSpec, pid: libc::pid_t) -> Vec<String> {
    let plan = cgroup_plan(spec);
    if plan.is_empty() {
        tracing::warn!(
            "no cgroup controllers found under /sys/fs/cgroup: the VM runs without memory, CPU and process limits"
        );
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let mut applied = Vec::new();
    for (dir, limits) in plan {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cgroup not created: no limit");
            continue;
        }
        if v2 {
            // Controllers must be enabled in every ancestor's subtree_control.
            let mut p = PathBuf::from("/sys/fs/cgroup");
            for part in Path::new(&spec.cgroup).iter() {
                _ = std::fs::write(p.join("cgroup.subtree_control"), "+memory +cpu +pids");
                p.push(part);
            }
        }
        for (file, value) in limits {
            match std::fs::write(dir.join(file), &value) {
                Ok(()) => applied.push(file.to_owned()),
                Err(e) => tracing::warn!(file, error = %e, "cgroup limit not set"),
            }
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            tracing::warn!(dir = %dir.display(), error = %e, "VM not placed in its cgroup");
        }
    }
    applied
}

/// Removes a VM's cgroup directories (they must be empty: its processes gone).
pub fn remove_cgroups(cgroup: &str) {
    let spec_dirs = ["", "memory", "cpu", "pids"];
    for ctl in spec_dirs {
        let dir = Path::new("/sys/fs/cgroup").join(ctl).join(cgroup);
        // Processes leave a cgroup a moment after they are reaped.
        for _ in 0..50 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
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
