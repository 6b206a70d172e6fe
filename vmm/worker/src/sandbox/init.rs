//! The VM's init: made by the monitor, wired, limited, then PID 1 of the VM.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::mounts::cstr;
use super::root::enter_root;
use super::userns::{self, Block, Holder, Namespaces};
use super::{
    AGENT_KEY_PATH, AgentSpec, SandboxNet, SandboxSpec, cgroups, describe_status, errno, pipe,
    read_byte, wait_child, write_byte,
};

/// The VM's init, waiting for its cgroups before it starts the agent.
pub(super) struct Init {
    /// Its PID in our namespace.
    pub pid: libc::pid_t,
    /// The host id of the VM's root.
    pub uid_base: u32,
    go: OwnedFd,
    ready: OwnedFd,
    _block: Block,
}

/// Makes the VM's namespaces, wires its network, and forks its init; returns before the init
/// starts the agent (see [`Init::limit_and_release`]).
pub(super) fn start_init(spec: &SandboxSpec) -> Result<Init, String> {
    let t0 = Instant::now();
    let block = userns::take_block()?;
    // The user and network namespaces first, while we are single-threaded and still in our
    // own PID namespace: the holder keeps them while the network is wired.
    let ns = {
        let (holder, ns) = Holder::spawn(block.base)?;
        if let Some(net) = &spec.net {
            wire_host(net, holder.pid)?;
        }
        wire_guest(spec.net.as_ref(), &ns.net)?;
        ns
    };
    tracing::debug!(wired = ?t0.elapsed(), "VM namespaces made and wired");
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
        let code = match init_child(spec, &ns, block.base, &ready_w, &go_r) {
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
    // Our later children belong to our own PID namespace again.
    // SAFETY: setns to the namespace we are in; affects only our future children.
    if unsafe { libc::setns(own_pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        tracing::warn!("{}", errno("setns back to our PID namespace"));
    }
    Ok(Init {
        pid,
        uid_base: block.base,
        go: go_w,
        ready: ready_r,
        _block: block,
    })
}

impl Init {
    /// Puts the VM into its cgroups (in v1 a move into a memory cgroup costs ~10 ms, spent
    /// while init mounts its root), lets it start the agent, and waits until it has (or
    /// could not).
    pub fn limit_and_release(&self, spec: &SandboxSpec) -> Result<(), String> {
        let t0 = Instant::now();
        let applied = cgroups::apply(spec, self.pid);
        tracing::debug!(controllers = ?applied, took = ?t0.elapsed(), "cgroup limits");
        write_byte(&self.go, b'c');
        if read_byte(&self.ready) == Some(b'k') {
            return Ok(());
        }
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        wait_child(self.pid);
        Err("the VM's init could not start (its reason is above)".into())
    }
}

/// Runs `ip -batch -` with `commands` (one per line), in network namespace `netns` if given:
/// one process for several changes, each a few milliseconds cheaper than its own `ip`.
fn ip_batch(commands: &[String], netns: Option<&OwnedFd>) -> Result<(), String> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(ns) = netns {
        let fd = ns.as_raw_fd();
        // SAFETY: the closure only calls setns, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
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

/// The host's end: a veth pair with `eth0` in the namespace of process `pid`.
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
    match ip_batch(&cmds, None) {
        // A pair left by a monitor killed between creating it and moving its peer.
        Err(e) if e.contains("File exists") => {
            ip_batch(&[format!("link del {}", net.host_veth)], None)?;
            ip_batch(&cmds, None)
        }
        r => r,
    }
}

/// The VM's end: `lo`, and `eth0` with its address and default route.
fn wire_guest(net: Option<&SandboxNet>, netns: &OwnedFd) -> Result<(), String> {
    let mut cmds = vec!["link set lo up".to_owned()];
    if let Some(net) = net {
        cmds.push(format!("addr add {}/{} dev eth0", net.ip, net.prefix));
        cmds.push("link set eth0 up".to_owned());
        cmds.push(format!("route add default via {}", net.gateway));
    }
    ip_batch(&cmds, Some(netns))
}

/// The init side: namespaces, filesystem, the VM's root, then PID 1's loop. Returns only on
/// error.
fn init_child(
    spec: &SandboxSpec,
    ns: &Namespaces,
    base: u32,
    ready: &OwnedFd,
    go: &OwnedFd,
) -> Result<std::convert::Infallible, String> {
    // SAFETY: plain prctl; the VM dies with its monitor.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // Read while the host's files are in reach.
    let host_key = match &spec.agent.host_key {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    userns::join(&ns.net, libc::CLONE_NEWNET, "net")?;
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    // SAFETY: unshare of namespaces in a single-threaded process.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(errno("unshare(mount, uts, ipc)"));
    }
    let host = spec.hostname.as_bytes();
    // SAFETY: host is a live buffer of the given length.
    if unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) } != 0 {
        return Err(errno("sethostname"));
    }
    let t0 = Instant::now();
    rename_init()?;
    enter_root(&spec.rootfs, spec.overlay.as_ref(), &ns.user, base)?;
    userns::become_root(&ns.user)?;
    tracing::debug!(root = ?t0.elapsed(), "init ready");
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
    if let Some(pem) = &host_key {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = crate::agent_key::GUEST_PATH;
        _ = std::fs::remove_file(path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(pem))
            .map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    // Its own view of cgroups (it is at the root of its own), then the limits on what its
    // root may do (see `confine`); the agent and everything after it inherit both.
    // SAFETY: unshare of the cgroup namespace in a single-threaded process.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(errno("unshare(cgroup)"));
    }
    crate::confine::confine()?;
    // boxd keeps its own files private (umask 077); the VM's processes get the usual 022.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o022) };
    write_byte(ready, b'k');
    init_loop(&spec.agent, host_key.is_some())
}

/// PID 1: keeps the agent running and reaps every orphan.
fn init_loop(agent: &AgentSpec, host_key: bool) -> Result<std::convert::Infallible, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = cstr(agent.path.as_os_str().as_bytes())?;
    let mut args = vec![
        cstr(agent.path.as_os_str().as_bytes())?,
        cstr("--listen")?,
        cstr(format!("0.0.0.0:{}", agent.port))?,
        cstr("--authorized-key")?,
        cstr(format!("/{AGENT_KEY_PATH}"))?,
    ];
    if host_key {
        args.push(cstr("--host-key")?);
        args.push(cstr(crate::agent_key::GUEST_PATH)?);
    }
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

/// What the VM sees as PID 1's command line and name: `init`, not the host's paths to boxd
/// and the VM's directory. `PR_SET_MM_MAP` moves the command line to a buffer of its own; unlike
/// the one-field `PR_SET_MM` calls it needs no `CAP_SYS_RESOURCE`, but it takes the whole
/// memory map, so the other fields are this process's own (from `/proc/self/stat`).
fn rename_init() -> Result<(), String> {
    use linux_raw_sys::prctl::prctl_mm_map;
    // On the heap: the kernel reads a command line only from anonymous memory, not from the
    // binary's mapped read-only data. Leaked, as PID 1's command line lives as long as it does.
    let argv: &'static [u8] = Box::leak(Box::new(*b"init\0"));
    let stat =
        std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("/proc/self/stat: {e}"))?;
    // Fields after the command name, which may hold spaces and ends at the last ')'.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    // proc(5) numbers fields from 1; field 3 is the first after the name.
    let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
    // SAFETY: brk(0) changes nothing and returns the current break.
    let brk = unsafe { libc::syscall(libc::SYS_brk, 0usize) } as u64;
    let start = argv.as_ptr() as u64;
    let mut map = prctl_mm_map {
        start_code: field(26),
        end_code: field(27),
        start_data: field(45),
        end_data: field(46),
        start_brk: field(47),
        brk,
        start_stack: field(28),
        arg_start: start,
        arg_end: start + argv.len() as u64,
        env_start: field(50),
        env_end: field(51),
        auxv: std::ptr::null_mut(),
        auxv_size: 0,
        exe_fd: u32::MAX,
    };
    let size = std::mem::size_of::<prctl_mm_map>() as libc::c_ulong;
    // SAFETY: map is a complete prctl_mm_map of the given size, read by the kernel only; its
    // command line points at a leaked, NUL-ended buffer.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP as libc::c_ulong,
            &raw mut map,
            size,
            0,
        )
    };
    if r != 0 {
        return Err(errno("prctl(PR_SET_MM_MAP) for PID 1's command line"));
    }
    // SAFETY: a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"init".as_ptr()) };
    Ok(())
}
