//! The worker's host side of VMs: each VM's directory, copy-on-write disk, private address,
//! bridge, and process, behind the [`Runtime`] trait, with the two runtimes (`sandbox`, the
//! `boxd sandbox` process; `kvm_runtime`, the `boxd vmm` process from boxd-vmm), the images
//! they boot and the network isolation between VMs. The VMM itself is boxd-vmm, which knows
//! nothing of this crate (the way Firecracker keeps its jailer apart). The supervisor loop
//! (which reads the replica and reports back) lives in `ops`; everything here is blocking and
//! replica-free, so the runtime conformance suite drives it directly. See DESIGN.md.
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
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub mod agent_key;
pub mod confine;
mod disk;
pub mod image;
pub mod isolation;
pub mod kvm_runtime;
mod net;
pub mod sandbox;
mod sandbox_runtime;
mod spawn;
mod vms;

pub use self::disk::{Disk, LAYER_IMAGE, LAYER_MOUNT, overlay_supported, written_bytes};
pub use self::net::{host_veth, tap_name};
pub use self::sandbox_runtime::SandboxRuntime;
pub(crate) use self::spawn::{stdin_tool, tool};

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

/// The cgroup (below each hierarchy's root) of a VM.
pub fn cgroup_of(id: &str) -> String {
    format!("boxd/{id}")
}

pub(crate) fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), WorkerError> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec_pretty(v).unwrap_or_default();
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| WorkerError::Host(format!("{}: {e}", path.display())))
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

/// This worker's VMs on disk.
pub struct Host {
    /// Settings.
    pub cfg: HostConfig,
    /// Addresses handed out (and on disk), so concurrent starts never share one.
    pub(crate) taken: Mutex<BTreeSet<Ipv4Addr>>,
    pub(crate) bridge_ready: Mutex<bool>,
    /// How outbound traffic is NATed, once the bridge is up.
    pub(crate) nat: Mutex<Option<String>>,
    /// Held while the isolation rules are rebuilt, so two rebuilds never interleave; holds
    /// the cluster members' Raft addresses, which VMs may not reach.
    pub(crate) isolating: Mutex<Vec<std::net::SocketAddrV4>>,
}

impl Host {
    /// Opens the VM directories under `cfg.data_dir`, learning the addresses they hold.
    pub fn open(cfg: HostConfig) -> Host {
        let mut taken = BTreeSet::new();
        if let Ok(rd) = std::fs::read_dir(cfg.data_dir.join("vms")) {
            for e in rd.flatten() {
                if let Some(n) = net::read_net(&e.path()) {
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
}
