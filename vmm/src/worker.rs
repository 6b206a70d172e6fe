//! The worker's host side of VMs: each VM's directory, copy-on-write disk, private address,
//! bridge, and process, behind the [`Runtime`] trait. The supervisor loop (which reads the
//! replica and reports back) lives in `ops`; everything here is blocking and replica-free, so
//! the runtime conformance suite drives it directly.
//!
//! Layout under the data directory:
//!
//! ```text
//! vms/<id>/rootfs/       the VM's root (sandbox: where its overlay is mounted)
//! vms/<id>/disk.json     how its disk is laid out (see `disk`)
//! vms/<id>/layer.img     the sandbox VM's own layer, sized (`layer/` is its mount point)
//! vms/<id>/disk.img      the kvm VM's disk
//! vms/<id>/net.json      its private address (kept across stop/start)
//! vms/<id>/sandbox.json  the spec its process was started with
//! vms/<id>/api.sock      its process's API (GET /vm, PUT /vm/actions)
//! vms/<id>/console.log   the process's output: init, agent
//! ```

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use self::disk::{Disk, LAYER_IMAGE, LAYER_MOUNT, overlay_supported, written_bytes};
use crate::api::{self, Probe};
use crate::sandbox::{self, AgentSpec, Overlay, SandboxNet, SandboxSpec};

mod disk;

/// Why a worker operation failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The image is neither built nor buildable here.
    #[error("{0}")]
    Image(String),
    /// A host operation failed.
    #[error("{0}")]
    Host(String),
    /// The VM process did not come up.
    #[error("{0}")]
    Start(String),
}

/// What the worker needs to know about one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    /// VM id (a UUID; names directories).
    pub id: String,
    /// DNS label (host name inside).
    pub name: String,
    /// Image name.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u64,
    /// Disk size (the kvm runtime's root disk).
    pub disk_gib: u64,
    /// The owning account: only its VMs may reach this one over the bridge.
    pub owner: String,
}

/// Host settings shared by every VM on this worker.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// The `boxd` binary that runs VM processes.
    pub boxd: PathBuf,
    /// Bridge VMs attach to.
    pub bridge: String,
    /// Its subnet; the first address is the bridge's (the VMs' gateway).
    pub subnet: Ipv4Net,
    /// The cluster's agent public key (OpenSSH form).
    pub agent_key: String,
    /// Port of the guest agent.
    pub agent_port: u16,
    /// Where `minimal` comes from when it has to be built here.
    pub minimal: crate::image::MinimalSources,
    /// Masquerade the VMs' outbound traffic (and enable IPv4 forwarding).
    pub nat: bool,
}

/// A VM's private address, kept in its directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNet {
    /// Address on the bridge subnet.
    pub ip: Ipv4Addr,
}

/// How a VM process is started; both runtimes serve the same API on `api.sock`.
pub trait Runtime: Send + Sync {
    /// `sandbox` or `kvm`.
    fn name(&self) -> &'static str;
    /// Starts the VM's process detached from the caller (it outlives the supervisor) and
    /// returns once its API answers. The disk and address exist already.
    fn launch(&self, host: &Host, vm: &VmPlan, disk: &Disk, net: VmNet) -> Result<(), WorkerError>;
    /// Why a guest cannot finish booting on this host, if it cannot (the kvm runtime under
    /// an emulated KVM): the worker then reports the VM booting with this reason instead of
    /// waiting for an agent that will never listen.
    fn cannot_finish(&self) -> Option<&str> {
        None
    }
    /// Whether the VM's init is a host process whose network namespace shows in
    /// `/proc/<pid>/net` (sandbox), so readiness can be read there before dialling.
    fn netns_visible(&self) -> bool {
        false
    }
    /// The host-side interface of VM `id`'s port on the bridge.
    fn port(&self, id: &str) -> String;
    /// Whether the VM's overlay layer gets a filesystem of the disk's size (sandbox); the kvm
    /// runtime bounds its disk by the disk file's size instead.
    fn sized_layer(&self) -> bool {
        false
    }
}

/// How a start ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    /// The guest agent accepts connections at this address.
    Ready(VmNet),
    /// The VM's process runs, but its guest cannot finish booting here; why.
    Booting(VmNet, String),
}

/// The sandbox runtime: `boxd sandbox` per VM (namespaces, cgroups, pivot_root).
pub struct SandboxRuntime;

impl Runtime for SandboxRuntime {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn launch(&self, host: &Host, vm: &VmPlan, disk: &Disk, net: VmNet) -> Result<(), WorkerError> {
        let dir = host.vm_dir(&vm.id);
        let spec = SandboxSpec {
            hostname: vm.name.clone(),
            rootfs: dir.join("rootfs"),
            overlay: disk.lower.as_ref().map(|lower| {
                let (at, image) = match disk.layer_gib {
                    Some(_) => (dir.join(LAYER_MOUNT), Some(dir.join(LAYER_IMAGE))),
                    None => (dir.clone(), None),
                };
                Overlay {
                    lower: lower.clone(),
                    upper: at.join("upper"),
                    work: at.join("work"),
                    image,
                }
            }),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            max_pids: 4096,
            net: Some(SandboxNet {
                bridge: host.cfg.bridge.clone(),
                host_veth: host_veth(&vm.id),
                mac: crate::isolation::mac_of(&vm.id),
                ip: net.ip,
                prefix: host.cfg.subnet.prefix_len(),
                gateway: host.gateway(),
            }),
            agent: AgentSpec {
                path: PathBuf::from("/usr/local/bin/boxd-agent"),
                authorized_key: host.cfg.agent_key.clone(),
                host_key: crate::agent_key::path(&dir),
                port: host.cfg.agent_port,
            },
            cgroup: cgroup_of(&vm.id),
        };
        host.spawn_vm(&vm.id, "sandbox", "sandbox.json", &spec, "console.log")
    }

    fn netns_visible(&self) -> bool {
        true
    }

    fn port(&self, id: &str) -> String {
        host_veth(id)
    }

    fn sized_layer(&self) -> bool {
        true
    }
}

/// The cgroup (below each hierarchy's root) of a VM.
pub fn cgroup_of(id: &str) -> String {
    format!("boxd/{id}")
}

/// Host name of a VM's tap: `bt` and the last 12 hex digits of its id (kvm runtime; as for veths).
pub fn tap_name(id: &str) -> String {
    let mut n = host_veth(id);
    n.replace_range(..2, "bt");
    n
}

/// Host name of a VM's veth end: `bx` and the last 12 hex digits of its id (the random part
/// of a v4 or v7 UUID; v7's leading digits are a timestamp that VMs created together share).
pub fn host_veth(id: &str) -> String {
    let hex: Vec<char> = id.chars().filter(char::is_ascii_hexdigit).collect();
    let tail: String = hex[hex.len().saturating_sub(12)..].iter().collect();
    format!("bx{tail}")
}

pub(crate) fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), WorkerError> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec_pretty(v).unwrap_or_default();
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| WorkerError::Host(format!("{}: {e}", path.display())))
}

/// This worker's VMs on disk.
pub struct Host {
    /// Settings.
    pub cfg: HostConfig,
    /// Addresses handed out (and on disk), so concurrent starts never share one.
    taken: Mutex<BTreeSet<Ipv4Addr>>,
    bridge_ready: Mutex<bool>,
    /// How outbound traffic is NATed, once the bridge is up.
    nat: Mutex<Option<String>>,
    /// Held while the isolation rules are rebuilt, so two rebuilds never interleave; holds
    /// the cluster members' Raft addresses, which VMs may not reach.
    isolating: Mutex<Vec<std::net::SocketAddrV4>>,
}

impl Host {
    /// Opens the VM directories under `cfg.data_dir`, learning the addresses they hold.
    pub fn open(cfg: HostConfig) -> Host {
        let mut taken = BTreeSet::new();
        if let Ok(rd) = std::fs::read_dir(cfg.data_dir.join("vms")) {
            for e in rd.flatten() {
                if let Some(n) = read_net(&e.path()) {
                    taken.insert(n.ip);
                }
            }
        }
        Host {
            cfg,
            taken: Mutex::new(taken),
            bridge_ready: Mutex::new(false),
            nat: Mutex::new(None),
            isolating: Mutex::new(Vec::new()),
        }
    }

    /// The bridge's own address (first host address of the subnet).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cfg.subnet.network()) + 1)
    }

    /// A VM's directory.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    /// A VM's API socket.
    pub fn api_sock(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("api.sock")
    }

    /// The VM's address as kept in its directory.
    pub fn net_of(&self, id: &str) -> Option<VmNet> {
        read_net(&self.vm_dir(id))
    }

    /// What the VM's process says, if one runs.
    pub fn probe(&self, id: &str) -> Option<Probe> {
        api::probe(&self.api_sock(id))
    }

    /// The VMs with a directory here (ids).
    pub fn local_vms(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("vms")) {
            for e in rd.flatten() {
                if let Some(n) = e.file_name().to_str()
                    && !n.starts_with('.')
                {
                    out.push(n.to_owned());
                }
            }
        }
        out.sort();
        out
    }

    /// The VM's address: the one in its directory, else `hint` (what the replica last saw) if
    /// free and in the subnet, else the lowest free one.
    pub fn address(&self, id: &str, hint: Option<Ipv4Addr>) -> Result<VmNet, WorkerError> {
        let dir = self.vm_dir(id);
        if let Some(n) = read_net(&dir) {
            return Ok(n);
        }
        let mut taken = self
            .taken
            .lock()
            .map_err(|_| WorkerError::Host("address table poisoned".into()))?;
        let gw = self.gateway();
        let usable = |ip: &Ipv4Addr| {
            self.cfg.subnet.contains(ip)
                && *ip != gw
                && *ip != self.cfg.subnet.network()
                && *ip != self.cfg.subnet.broadcast()
        };
        let ip = match hint.filter(|h| usable(h) && !taken.contains(h)) {
            Some(h) => h,
            None => self
                .cfg
                .subnet
                .hosts()
                .find(|ip| usable(ip) && !taken.contains(ip))
                .ok_or_else(|| {
                    WorkerError::Host(format!(
                        "subnet {} has no free address: enlarge worker.subnet",
                        self.cfg.subnet
                    ))
                })?,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| WorkerError::Host(format!("{}: {e}", dir.display())))?;
        let n = VmNet { ip };
        write_json(&dir.join("net.json"), &n)?;
        taken.insert(ip);
        Ok(n)
    }

    /// Creates the bridge with the gateway address once (idempotent across restarts).
    pub fn ensure_bridge(&self) -> Result<(), WorkerError> {
        let mut ready = self
            .bridge_ready
            .lock()
            .map_err(|_| WorkerError::Host("bridge state poisoned".into()))?;
        if *ready {
            return Ok(());
        }
        let b = self.cfg.bridge.as_str();
        if !link_exists(b) {
            ip(&["link", "add", "name", b, "type", "bridge"])?;
            tracing::info!(bridge = b, subnet = %self.cfg.subnet, "bridge created");
        }
        let addr = format!("{}/{}", self.gateway(), self.cfg.subnet.prefix_len());
        // After a restart the bridge has its address already (kernels word that differently).
        if let Err(e) = ip(&["addr", "add", &addr, "dev", b]) {
            let has = Command::new("ip")
                .args(["-o", "-4", "addr", "show", "dev", b])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {addr} ")))
                .unwrap_or(false);
            if !has {
                return Err(e);
            }
        }
        ip(&["link", "set", "dev", b, "up"])?;
        let nat = if self.cfg.nat {
            self.ensure_nat()
        } else {
            "off (worker.nat = false)".to_owned()
        };
        tracing::info!(bridge = b, nat = %nat, "VM networking ready");
        if let Ok(mut n) = self.nat.lock() {
            *n = Some(nat);
        }
        *ready = true;
        Ok(())
    }

    /// How outbound traffic from VMs is NATed (`None` until the first VM started).
    pub fn nat_status(&self) -> Option<String> {
        self.nat.lock().ok().and_then(|n| n.clone())
    }

    /// Enables forwarding and masquerades traffic from the subnet leaving through any other
    /// interface, with nftables (a table of its own, replaced whole, so repeating it is
    /// harmless) or else iptables. Without either, VMs reach only the bridge; said in the log
    /// and in `boxd admin status`. Returns what was done.
    fn ensure_nat(&self) -> String {
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            let m = format!("off: cannot enable IPv4 forwarding: {e}");
            tracing::warn!("outbound NAT for VMs is {m}");
            return m;
        }
        let (b, net) = (self.cfg.bridge.as_str(), self.cfg.subnet);
        let table: String = format!("boxd_{b}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let script = format!(
            "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n  chain postrouting {{\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {net} oifname != \"{b}\" masquerade\n  }}\n}}\n"
        );
        match stdin_tool("nft", &["-f", "-"], &script) {
            Ok(()) => return format!("nftables (table ip {table})"),
            Err(e) => tracing::debug!(error = %e, "nft"),
        }
        let rule = [
            "-t",
            "nat",
            "POSTROUTING",
            "-s",
            &net.to_string(),
            "!",
            "-o",
            b,
            "-j",
            "MASQUERADE",
        ];
        let with = |op: &'static str| -> Vec<&str> {
            let mut v = vec![rule[0], rule[1], op];
            v.extend_from_slice(&rule[2..]);
            v
        };
        if tool("iptables", &with("-C")).is_ok() || tool("iptables", &with("-A")).is_ok() {
            return "iptables (nat POSTROUTING MASQUERADE)".into();
        }
        let m = "off: neither nft nor iptables works here (apt-get install nftables)".to_owned();
        tracing::warn!("outbound NAT for VMs is {m}");
        m
    }

    /// Writes `spec` to `file` in the VM's directory and starts `boxd <subcommand> --config
    /// <file> --api-sock <dir>/api.sock` detached, its output to `log` there.
    pub fn spawn_vm<T: Serialize>(
        &self,
        id: &str,
        subcommand: &str,
        file: &str,
        spec: &T,
        log: &str,
    ) -> Result<(), WorkerError> {
        let dir = self.vm_dir(id);
        let path = dir.join(file);
        write_json(&path, spec)?;
        let mut cmd = Command::new(&self.cfg.boxd);
        cmd.arg(subcommand)
            .arg("--config")
            .arg(&path)
            .arg("--api-sock")
            .arg(dir.join("api.sock"));
        self.spawn_detached(cmd, &dir, log)
    }

    /// Starts `cmd` as a VM process: its own session (a signal to the supervisor's group does
    /// not reach it), output to `log` in `dir`, reaped by a small thread while the supervisor
    /// lives (and by init after). Returns once the API socket answers.
    pub fn spawn_detached(
        &self,
        mut cmd: Command,
        dir: &Path,
        log: &str,
    ) -> Result<(), WorkerError> {
        let log_path = dir.join(log);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| WorkerError::Host(format!("{}: {e}", dir.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| WorkerError::Host(e.to_string()))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        if std::env::var_os("BOXD_LOG").is_none() {
            cmd.env("BOXD_LOG", "info");
        }
        // SAFETY: setsid is async-signal-safe and touches no Rust state.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let api = dir.join("api.sock");
        let mut child = cmd.spawn().map_err(|e| {
            WorkerError::Start(format!("cannot run {}: {e}", self.cfg.boxd.display()))
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let result = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Err(WorkerError::Start(format!(
                    "the VM process ended at once ({status}): {}",
                    tail(&log_path)
                )));
            }
            // `boxd vmm` answers while still paused, just before its vCPUs run.
            if api::probe(&api).is_some_and(|p| p.state == "running") {
                break Ok(());
            }
            if Instant::now() > deadline {
                _ = child.kill();
                break Err(WorkerError::Start(
                    "the VM process did not answer on its API socket within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        _ = std::thread::Builder::new()
            .name("vm-reaper".into())
            .stack_size(64 * 1024)
            .spawn(move || child.wait());
        result
    }

    /// Brings a VM up: bridge, address, disk, process, then waits (up to `ready`) until its
    /// agent accepts TCP connections. Returns its address.
    pub fn start(
        &self,
        runtime: &dyn Runtime,
        vm: &VmPlan,
        hint: Option<Ipv4Addr>,
        ready: Duration,
    ) -> Result<Started, WorkerError> {
        let t0 = Instant::now();
        self.ensure_bridge()?;
        let net = self.address(&vm.id, hint)?;
        let disk = self.ensure_disk(vm, runtime.sized_layer())?;
        // The VM's port is pinned (its MAC and address) and fenced off from other accounts
        // before the VM can send anything.
        let port = crate::isolation::Port {
            ifname: runtime.port(&vm.id),
            mac: crate::isolation::mac_of(&vm.id),
            ip: net.ip,
            owner: vm.owner.clone(),
        };
        write_json(
            &self.vm_dir(&vm.id).join(crate::isolation::PORT_FILE),
            &port,
        )?;
        self.isolate()?;
        let prepared = t0.elapsed();
        if self.probe(&vm.id).is_none() {
            runtime.launch(self, vm, &disk, net)?;
        }
        let launched = t0.elapsed();
        if let Some(why) = runtime.cannot_finish() {
            return Ok(Started::Booting(net, why.to_owned()));
        }
        let agent = SocketAddr::from((net.ip, self.cfg.agent_port));
        let deadline = Instant::now() + ready;
        // Where the VM's init is a host process (sandbox), wait until the agent's socket listens
        // in the VM's network namespace before dialling: a SYN sent before the VM's interface
        // is up leaves a failed neighbour entry that costs a second of ARP retries.
        if let Some(pid) = self
            .probe(&vm.id)
            .and_then(|p| p.pid)
            .filter(|_| runtime.netns_visible())
        {
            let table = PathBuf::from(format!("/proc/{pid}/net/tcp"));
            while !listens(&table, self.cfg.agent_port) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        loop {
            if TcpStream::connect_timeout(&agent, Duration::from_millis(200)).is_ok() {
                tracing::debug!(
                    vm = %vm.name,
                    ?prepared,
                    ?launched,
                    agent = ?t0.elapsed(),
                    "VM start steps (cumulative)"
                );
                return Ok(Started::Ready(net));
            }
            if Instant::now() > deadline {
                return Err(WorkerError::Start(format!(
                    "the guest agent did not listen on {agent} within {ready:?}: {}",
                    tail(&self.vm_dir(&vm.id).join("console.log"))
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Why the VM's last run ended, from its logs (the sandbox's `ended by itself: …`, the
    /// VMM's `VM failed: …`); none if that run left no word (its process was killed) or is
    /// still going.
    pub fn last_words(&self, id: &str) -> Option<String> {
        let dir = self.vm_dir(id);
        ["vmm.log", "console.log"].iter().find_map(|f| {
            let log = std::fs::read_to_string(dir.join(f)).ok()?;
            for l in log.lines().rev() {
                if l.contains("sandbox running") || l.contains("VM running") {
                    return None;
                }
                for mark in ["ended by itself: ", "VM failed: "] {
                    if let Some((_, why)) = l.split_once(mark) {
                        return Some(why.trim().to_owned());
                    }
                }
            }
            None
        })
    }

    /// How many of the VM's processes the kernel has killed for want of memory since it
    /// started (its memory cgroup's count; 0 where there is none, as for kvm guests).
    pub fn oom_kills(&self, id: &str) -> u64 {
        crate::sandbox::oom_kills(&cgroup_of(id))
    }

    /// Why a VM's `boxd vmm` ended, from its log (`VM failed: …`), for the report.
    pub fn vmm_ending(&self, id: &str) -> String {
        let log = std::fs::read_to_string(self.vm_dir(id).join("vmm.log")).unwrap_or_default();
        log.lines()
            .rev()
            .find_map(|l| {
                l.split_once("VM failed: ")
                    .map(|(_, why)| why.trim().to_owned())
            })
            .unwrap_or_else(|| "its VMM process ended".into())
    }

    /// Stops the VM's process (the disk stays).
    pub fn stop(&self, id: &str) -> Result<(), WorkerError> {
        api::shutdown(&self.api_sock(id), Duration::from_secs(10)).map_err(WorkerError::Host)
    }

    /// Stops the VM and removes its directory (disk, address).
    pub fn delete(&self, id: &str) -> Result<(), WorkerError> {
        self.stop(id)?;
        // Left behind when a VM process was killed rather than shut down.
        sandbox::remove_cgroups(&cgroup_of(id));
        let tap = tap_name(id);
        if link_exists(&tap) {
            ip(&["link", "del", "dev", &tap])?;
        }
        let dir = self.vm_dir(id);
        let net = read_net(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WorkerError::Host(format!("{}: {e}", dir.display()))),
        }
        if let (Some(n), Ok(mut t)) = (net, self.taken.lock()) {
            t.remove(&n.ip);
        }
        if let Err(e) = self.isolate() {
            tracing::warn!(error = %e, "VM deleted; its rules stay until the next VM starts");
        }
        Ok(())
    }

    /// Loads the rules that pin each VM's port and keep accounts apart (see `isolation`).
    pub fn isolate(&self) -> Result<(), WorkerError> {
        let cluster = self
            .isolating
            .lock()
            .map_err(|_| WorkerError::Host("isolation lock poisoned".into()))?;
        let n =
            crate::isolation::enforce(&self.cfg.data_dir.join("vms"), &self.cfg.bridge, &cluster)
                .map_err(WorkerError::Host)?;
        tracing::debug!(
            ports = n,
            members = cluster.len(),
            "VM isolation rules loaded"
        );
        Ok(())
    }

    /// Sets the cluster members' Raft addresses that VMs may not reach; reloads the rules when
    /// they changed and VMs have ports here. Returns whether they changed.
    pub fn set_cluster(
        &self,
        mut members: Vec<std::net::SocketAddrV4>,
    ) -> Result<bool, WorkerError> {
        members.sort();
        members.dedup();
        {
            let mut cur = self
                .isolating
                .lock()
                .map_err(|_| WorkerError::Host("isolation lock poisoned".into()))?;
            if *cur == members {
                return Ok(false);
            }
            *cur = members;
        }
        if self.local_vms().is_empty() {
            return Ok(true);
        }
        self.isolate().map(|()| true)
    }
}

/// Whether `/proc/<pid>/net/tcp` shows a listening socket on `port`.
fn listens(table: &Path, port: u16) -> bool {
    let Ok(text) = std::fs::read_to_string(table) else {
        return false;
    };
    let want = format!(":{port:04X}");
    text.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        local.ends_with(&want) && state == "0A"
    })
}

fn read_net(dir: &Path) -> Option<VmNet> {
    let text = std::fs::read(dir.join("net.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let out: Vec<&str> = lines.into_iter().rev().collect();
    if out.is_empty() {
        format!("nothing in {}", path.display())
    } else {
        out.join(" | ")
    }
}

/// Makes something once across threads: unless `done()` already, takes `lock`, checks again
/// (another thread may have made it meanwhile), then `make()`s it. A lock poisoned by a
/// panicking maker still serialises (the maker cleans up its own temporaries).
pub(crate) fn once(
    lock: &Mutex<()>,
    done: impl Fn() -> bool,
    make: impl FnOnce() -> Result<(), WorkerError>,
) -> Result<(), WorkerError> {
    if done() {
        return Ok(());
    }
    let _g = lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if done() {
        return Ok(());
    }
    make()
}

/// Whether this network namespace has an interface `name` (`if_nametoindex`, which asks the
/// kernel in the caller's namespace; `/sys/class/net` shows the namespace sysfs was mounted
/// in, which under `nsenter --net` is another one).
pub(crate) fn link_exists(name: &str) -> bool {
    std::ffi::CString::new(name)
        // SAFETY: a valid NUL-terminated string; the call only reads it.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
        .unwrap_or(false)
}

fn ip(args: &[&str]) -> Result<(), WorkerError> {
    tool("ip", args)
}

/// Runs a host tool with `input` on its stdin; its stderr becomes the error.
pub(crate) fn stdin_tool(program: &str, args: &[&str], input: &str) -> Result<(), WorkerError> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| WorkerError::Host(format!("cannot run {program}: {e}")))?;
    if let Some(mut i) = child.stdin.take() {
        _ = i.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| WorkerError::Host(format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(WorkerError::Host(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs a host tool; its stderr becomes the error.
pub(crate) fn tool(program: &str, args: &[&str]) -> Result<(), WorkerError> {
    stdin_tool(program, args, "").map_err(|e| match e {
        WorkerError::Host(m) => {
            WorkerError::Host(format!("{m} (ran: {program} {})", args.join(" ")))
        }
        other => other,
    })
}

/// What the supervisor should do about one VM, from the replica's view and the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing: the replica already says what is true.
    Nothing,
    /// Start its process (create its disk and address first if new).
    Start,
    /// Stop its process.
    Stop,
    /// Tell the replica it runs (at this address).
    ReportRunning,
    /// Tell the replica it is stopped.
    ReportStopped,
}

/// What the replica last heard about a VM, as far as [`decide`] cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reported {
    /// Running.
    Running,
    /// Its process runs; its guest cannot finish booting here.
    Booting,
    /// Stopped.
    Stopped,
    /// Anything else (placed, starting, failed).
    Other,
}

/// The supervisor's decision for a VM: `want_running` is the owner's intent, `reported` what
/// the replica last heard, `ip_matches` whether the replica has its address, `process`
/// whether a VM process answers.
pub fn decide(want_running: bool, reported: Reported, ip_matches: bool, process: bool) -> Step {
    match (want_running, process) {
        (true, true) if reported == Reported::Booting => Step::Nothing,
        (true, true) if reported == Reported::Running && ip_matches => Step::Nothing,
        (true, true) => Step::ReportRunning,
        (true, false) => Step::Start,
        (false, true) => Step::Stop,
        (false, false) if reported == Reported::Stopped => Step::Nothing,
        (false, false) => Step::ReportStopped,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn decisions_cover_every_case() {
        use Reported::*;
        assert_eq!(decide(true, Running, true, true), Step::Nothing);
        assert_eq!(decide(true, Running, false, true), Step::ReportRunning);
        assert_eq!(decide(true, Other, false, true), Step::ReportRunning);
        assert_eq!(decide(true, Running, true, false), Step::Start);
        assert_eq!(decide(true, Booting, true, true), Step::Nothing);
        assert_eq!(decide(true, Booting, true, false), Step::Start);
        assert_eq!(decide(false, Booting, true, true), Step::Stop);
        assert_eq!(decide(false, Running, true, true), Step::Stop);
        assert_eq!(decide(false, Stopped, true, false), Step::Nothing);
        assert_eq!(decide(false, Running, true, false), Step::ReportStopped);
    }

    pub(crate) fn test_config(data: &Path, subnet: &str, agent: &Path) -> HostConfig {
        HostConfig {
            data_dir: data.to_owned(),
            boxd: "/nonexistent".into(),
            bridge: "boxd0".into(),
            subnet: subnet.parse().expect("net"),
            agent_key: String::new(),
            agent_port: 2200,
            minimal: crate::image::MinimalSources {
                busybox: "/bin/busybox".into(),
                agent: agent.to_owned(),
            },
            nat: false,
        }
    }

    #[test]
    fn veth_names_fit_and_addresses_are_kept() {
        assert_eq!(
            host_veth("019ab2c3-0000-7000-8000-0123456789ab"),
            "bx0123456789ab"
        );
        assert_eq!(host_veth("019ab2c3-0000-7000-8000-0123456789ab").len(), 14);
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = test_config(dir.path(), "10.200.1.0/30", Path::new("/nonexistent"));
        let host = Host::open(cfg.clone());
        assert_eq!(host.gateway(), Ipv4Addr::new(10, 200, 1, 1));
        let a = host.address("a", None).expect("first");
        assert_eq!(a.ip, Ipv4Addr::new(10, 200, 1, 2));
        assert_eq!(host.address("a", None).expect("same"), a, "kept in its dir");
        let e = host.address("b", None).unwrap_err().to_string();
        assert!(e.contains("no free address"), "{e}");
        // A restarted worker learns the taken addresses from disk.
        let again = Host::open(cfg);
        assert!(
            again.address("c", Some(a.ip)).is_err(),
            "hint already taken, none free"
        );
        again.delete("a").expect("delete");
        assert_eq!(again.address("c", None).expect("freed").ip, a.ip);
    }
}
