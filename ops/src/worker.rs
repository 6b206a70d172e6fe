//! The worker role: a supervisor that drives the VMs placed on this node towards their desired
//! state and reports what is true back through the leader. It only reads its local replica
//! (the log is the API: control writes `PlaceVm`, the worker sees it here) and each VM's API
//! socket; VM processes are not its children in any way that matters, so it can die and come
//! back at any time (see vmm/worker/DESIGN.md "Supervisor").

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boxd_controlplane::Replica;
use boxd_controlplane::command::Command;
use boxd_controlplane::command::MAX_REASON;
use boxd_controlplane::model::{AGENT_PORT, Desired, NodeId, Observed, Vm, VmId, agent_key_seed};
use boxd_controlplane::store::WorkerState;
use boxd_worker::kvm_runtime::KvmRuntime;
use boxd_worker::{
    Host, HostConfig, Reported, Runtime, SandboxRuntime, Started, Step, VmPlan, decide,
};
use tokio::sync::{Notify, watch};

use crate::config::{Config, WorkerRuntime};

mod status;
pub use status::{DiskStatus, StatusCell, WorkerStatus};

/// What the worker checks before the node starts: the runtime it will use (and why), and for
/// the sandbox runtime that the VMs' limits can hold. A worker that could only run VMs without
/// memory, CPU and process limits refuses to start instead.
pub fn preflight(cfg: &Config) -> Result<(Arc<dyn Runtime>, String), String> {
    let (runtime, reason) = choose_runtime(cfg)?;
    let busybox = std::path::Path::new("/bin/busybox");
    let static_busybox = boxd_worker::image::is_static_elf(busybox).unwrap_or(false);
    let nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !static_busybox || !nft {
        let missing: Vec<&str> = [(!nft, "nftables"), (!static_busybox, "busybox-static")]
            .into_iter()
            .filter_map(|(m, p)| m.then_some(p))
            .collect();
        return Err(format!(
            "the worker needs nftables (it keeps VMs apart) and a static busybox at /bin/busybox \
             (the `minimal` image): install {} (apt-get install {}), or run without the worker \
             (boxd up --role control,proxy,dns)",
            missing.join(" and "),
            missing.join(" ")
        ));
    }
    if runtime.name() == "sandbox" {
        let mkfs = std::process::Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !mkfs || !std::path::Path::new("/dev/loop-control").exists() {
            return Err(format!(
                "the worker bounds each sandbox VM's disk by its size with an ext4 image on a loop \
                 device, and {}: {}",
                if mkfs {
                    "this host has no /dev/loop-control"
                } else {
                    "mkfs.ext4 is missing"
                },
                if mkfs {
                    "load the loop module (modprobe loop)"
                } else {
                    "apt-get install e2fsprogs"
                }
            ));
        }
        let missing = boxd_worker::sandbox::missing_controllers();
        if !missing.is_empty() {
            return Err(format!(
                "the worker cannot limit VMs: no {} cgroup controller under /sys/fs/cgroup, so \
                 sandbox VMs would run without memory, CPU and process limits. If boxd was \
                 started with `ip netns exec`, which mounts a /sys of its own, start it with \
                 `nsenter --net=/run/netns/NAME boxd …` instead; else mount cgroup2 at \
                 /sys/fs/cgroup (or run without the worker role)",
                missing.join(", ")
            ));
        }
    }
    Ok((runtime, reason))
}

/// Picks the runtime: explicit config, or `auto` from the host's virtualization. `kvm` on a
/// host whose KVM emulates guests runs (the VMs boot as far as the emulator lets them and are
/// reported booting, with that reason); `kvm` without a usable `/dev/kvm` or without a kernel
/// is refused with what to do.
pub fn choose_runtime(cfg: &Config) -> Result<(Arc<dyn Runtime>, String), String> {
    let host = boxd_vmm::host::detect();
    let busybox = std::path::Path::new("/bin/busybox");
    let kvm = |cannot_finish: Option<String>| {
        KvmRuntime::open(&cfg.worker.kernel_dir, busybox, cannot_finish)
            .map(|k| Arc::new(k) as Arc<dyn Runtime>)
    };
    match (cfg.worker.runtime, host.virtualization) {
        (WorkerRuntime::Sandbox, _) => Ok((
            Arc::new(SandboxRuntime),
            "worker.runtime = \"sandbox\" in the config".into(),
        )),
        (WorkerRuntime::Kvm, boxd_vmm::Virtualization::None) => Err(format!(
            "worker.runtime = \"kvm\" but this host has no usable KVM ({}): use \"sandbox\" or \"auto\"",
            host.reason
        )),
        (WorkerRuntime::Kvm, boxd_vmm::Virtualization::Hardware) => Ok((
            kvm(None).map_err(|e| format!("worker.runtime = \"kvm\": {e}"))?,
            format!("worker.runtime = \"kvm\" in the config; {}", host.reason),
        )),
        (WorkerRuntime::Kvm, v) => {
            let why = format!(
                "virtualization here is {v} (kvm_pvm): the guest kernel runs in KVM's instruction emulator at about a million instructions per second and stops early, so its agent never listens; its first lines are in the VM's console.log on the worker"
            );
            Ok((
                kvm(Some(why)).map_err(|e| format!("worker.runtime = \"kvm\": {e}"))?,
                format!(
                    "worker.runtime = \"kvm\" in the config, on {v} virtualization: VMs boot as far as the emulator lets them and are reported booting"
                ),
            ))
        }
        (WorkerRuntime::Auto, boxd_vmm::Virtualization::Hardware) => match kvm(None) {
            Ok(k) => Ok((
                k,
                format!("auto: virtualization is hardware ({})", host.reason),
            )),
            Err(e) => Ok((
                Arc::new(SandboxRuntime),
                format!("auto: virtualization is hardware, but {e}; so sandbox"),
            )),
        },
        (WorkerRuntime::Auto, v) => Ok((
            Arc::new(SandboxRuntime),
            format!("auto: virtualization is {v} ({}), so sandbox", host.reason),
        )),
    }
}

/// Runs the supervisor until `stop`. Passes run on View changes and at least every second
/// (that tick notices VM processes that died).
pub async fn run(
    replica: Arc<Replica>,
    cfg: Config,
    data_dir: std::path::PathBuf,
    status: StatusCell,
    (runtime, reason): (Arc<dyn Runtime>, String),
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let me = replica.id();
    let subnet = match cfg.worker.subnet_for(me) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("the worker does not run: {e}");
            return;
        }
    };
    let secret = loop {
        match replica.reader().cluster_secret().await {
            Ok(Some(s)) => break s,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let agent_key = boxd_worker::agent_key::cluster_public(&agent_key_seed(&secret));
    let here = std::env::current_exe().unwrap_or_else(|_| "boxd".into());
    let host = Arc::new(Host::open(HostConfig {
        data_dir: data_dir.clone(),
        boxd: here.clone(),
        bridge: cfg.worker.bridge.clone(),
        subnet,
        agent_key,
        agent_port: AGENT_PORT,
        minimal: boxd_worker::image::MinimalSources {
            busybox: "/bin/busybox".into(),
            agent: here.with_file_name("boxd-agent"),
        },
        nat: cfg.worker.nat,
    }));
    tracing::warn!(runtime = runtime.name(), %reason, bridge = %cfg.worker.bridge, %subnet, "worker running");
    if let Ok(mut s) = status.lock() {
        *s = Some(WorkerStatus {
            runtime: runtime.name().into(),
            reason,
            bridge: cfg.worker.bridge.clone(),
            subnet: subnet.to_string(),
            disk: DiskStatus {
                disk_gib: crate::host::disk_gib(&cfg.worker, &data_dir),
                overcommit_percent: cfg.worker.disk_overcommit_percent,
                ..DiskStatus::default()
            },
            ..WorkerStatus::default()
        });
    }
    let sup = Arc::new(Supervisor {
        replica: Arc::clone(&replica),
        host,
        runtime,
        me,
        start_timeout: Duration::from_secs(cfg.worker.start_timeout_secs),
        busy: Mutex::new(HashSet::new()),
        ended: Mutex::new(HashMap::new()),
        ops_ended: std::sync::atomic::AtomicU64::new(0),
        retry: Mutex::new(HashMap::new()),
        oom_kills: Mutex::new(HashMap::new()),
        wake: Notify::new(),
    });
    let mut changed = replica.view().subscribe();
    let mut first = true;
    loop {
        match sup.pass().await {
            Ok(p) => {
                if let Ok(mut s) = status.lock()
                    && let Some(s) = s.as_mut()
                {
                    s.running = p.running;
                    s.disk.allocated_gib = p.allocated_gib;
                    s.nat = sup.host.nat_status();
                    if first {
                        s.reconnected = p.running;
                        s.first_pass_ms = Some(started.elapsed().as_millis() as u64);
                        tracing::info!(
                            reconnected = p.running,
                            ms = started.elapsed().as_millis() as u64,
                            "worker: first pass done"
                        );
                    }
                }
                first = false;
            }
            Err(e) => tracing::warn!(error = %e, "worker pass failed"),
        }
        tokio::select! {
            _ = changed.changed() => { changed.mark_unchanged(); }
            () = sup.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = crate::worker::stopped(&mut stop) => return,
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

struct Supervisor {
    replica: Arc<Replica>,
    host: Arc<Host>,
    runtime: Arc<dyn Runtime>,
    me: NodeId,
    start_timeout: Duration,
    /// VMs with an operation in flight; a pass leaves them alone.
    busy: Mutex<HashSet<VmId>>,
    /// When each VM's last operation ended (a number of [`Supervisor::ops_ended`]): a pass
    /// that read the replica before that acts on a stale view of the VM (say, not yet the
    /// `booting` its start just wrote) and leaves it to the next pass, which the end woke.
    ended: Mutex<HashMap<VmId, u64>>,
    /// Operations ended so far.
    ops_ended: std::sync::atomic::AtomicU64,
    /// Failed starts: when to try again and the next backoff.
    retry: Mutex<HashMap<VmId, (Instant, Duration)>>,
    /// Ends the wait between passes early (an operation finished).
    wake: Notify,
    /// Out-of-memory kills seen so far in each running VM (its memory cgroup's count, which
    /// starts at 0 with each start): a rise is an event.
    oom_kills: Mutex<HashMap<VmId, u64>>,
}

struct PassReport {
    running: usize,
    /// The sizes of this worker's VMs, added up.
    allocated_gib: u64,
}

impl Supervisor {
    async fn pass(self: &Arc<Self>) -> Result<PassReport, String> {
        let me = self.me;
        let read_at = self.ops_ended.load(std::sync::atomic::Ordering::Acquire);
        if let Ok(mut e) = self.ended.lock() {
            e.retain(|_, n| *n > read_at);
        }
        let WorkerState {
            vms,
            deleted,
            members,
        } = self
            .replica
            .reader()
            .worker_state(me)
            .await
            .map_err(|e| e.to_string())?;
        // Every member's Raft address is closed to VMs (see `isolation`).
        let members: Vec<SocketAddrV4> = members
            .iter()
            .filter_map(|n| n.raft_addr.parse::<SocketAddrV4>().ok())
            .filter(|a| !a.ip().is_unspecified())
            .collect();
        let allocated_gib = vms.iter().map(|v| v.spec.disk_gib).sum();
        let host = Arc::clone(&self.host);
        let ids: Vec<String> = vms.iter().map(|v| v.id.to_string()).collect();
        // With VMs here (say, running from before a restart), make sure their network is as
        // configured (bridge address, NAT) even before anything new starts.
        let wire = !ids.is_empty() && self.host.nat_status().is_none();
        // Probes are short Unix-socket requests; one blocking task asks them all.
        let probes = tokio::task::spawn_blocking(move || {
            if wire && let Err(e) = host.ensure_bridge() {
                tracing::warn!(error = %e, "VM network not ready");
            }
            if let Err(e) = host.set_cluster(members) {
                tracing::warn!(error = %e, "cluster members' addresses not closed to VMs");
            }
            ids.iter()
                .map(|id| host.probe(id).map(|_| host.oom_kills(id)))
                .collect::<Vec<Option<u64>>>()
        })
        .await
        .map_err(|e| e.to_string())?;
        let running = probes.iter().filter(|p| p.is_some()).count();
        if let Ok(mut seen) = self.oom_kills.lock() {
            seen.retain(|id, _| vms.iter().any(|v| v.id == *id));
        }
        let stale = |id: &VmId| {
            self.ended
                .lock()
                .is_ok_and(|e| e.get(id).is_some_and(|n| *n > read_at))
        };
        for (vm, probe) in vms.into_iter().zip(probes) {
            if stale(&vm.id) {
                continue;
            }
            let process = probe.is_some();
            if let Some(text) = probe.and_then(|kills| self.oom_news(vm.id, kills, &vm)) {
                self.event(vm.id, text).await;
            }
            let local_ip = self.host.net_of(&vm.id.to_string()).map(|n| n.ip);
            let reported = match vm.observed {
                Observed::Running => Reported::Running,
                Observed::Booting => Reported::Booting,
                Observed::Stopped => Reported::Stopped,
                _ => Reported::Other,
            };
            let step = decide(
                vm.desired == Desired::Running,
                reported,
                vm.private_ip.is_some() && vm.private_ip == local_ip,
                process,
            );
            self.act(vm, step, local_ip);
        }
        for id in deleted {
            self.spawn_op(id, {
                let sup = Arc::clone(self);
                move || async move {
                    let host = Arc::clone(&sup.host);
                    let key = id.to_string();
                    match tokio::task::spawn_blocking(move || host.delete(&key)).await {
                        Ok(Ok(())) => {
                            if let Err(e) = sup.replica.write(Command::PurgeVm { vm: id }).await {
                                tracing::warn!(%id, error = %e, "purge not written");
                            } else {
                                tracing::info!(%id, "VM deleted: process, disk and address freed");
                            }
                        }
                        Ok(Err(e)) => tracing::warn!(%id, error = %e, "deleting the VM failed"),
                        Err(e) => tracing::warn!(%id, error = %e, "deleting the VM failed"),
                    }
                }
            });
        }
        Ok(PassReport {
            running,
            allocated_gib,
        })
    }

    fn act(self: &Arc<Self>, vm: Vm, step: Step, local_ip: Option<Ipv4Addr>) {
        let id = vm.id;
        match step {
            Step::Nothing => {}
            Step::ReportRunning => self.spawn_op(id, {
                let sup = Arc::clone(self);
                move || async move {
                    sup.record_agent_key(&vm).await;
                    sup.report(id, Observed::Running, local_ip, None).await;
                }
            }),
            Step::ReportStopped => self.spawn_op(id, {
                let sup = Arc::clone(self);
                move || async move { sup.report(id, Observed::Stopped, vm.private_ip, None).await }
            }),
            Step::Stop => self.spawn_op(id, {
                let sup = Arc::clone(self);
                move || async move {
                    let host = Arc::clone(&sup.host);
                    let key = id.to_string();
                    match tokio::task::spawn_blocking(move || host.stop(&key)).await {
                        Ok(Ok(())) => {
                            tracing::info!(vm = %vm.name, "VM stopped");
                            sup.event(id, "stopped".into()).await;
                            sup.report(id, Observed::Stopped, vm.private_ip, None).await;
                        }
                        Ok(Err(e)) => tracing::warn!(vm = %vm.name, error = %e, "stop failed"),
                        Err(e) => tracing::warn!(vm = %vm.name, error = %e, "stop failed"),
                    }
                }
            }),
            Step::Start => {
                if let Ok(r) = self.retry.lock()
                    && let Some((at, _)) = r.get(&id)
                    && Instant::now() < *at
                {
                    return;
                }
                // A guest that could not finish booting here has stopped (emulated KVM ends
                // the VMM at the first instruction it cannot emulate): say so, and boot it
                // again only after the backoff, not at once in a loop.
                if vm.observed == Observed::Booting && self.runtime.cannot_finish().is_some() {
                    self.spawn_op(id, {
                        let sup = Arc::clone(self);
                        move || async move {
                            let why = sup.host.vmm_ending(&id.to_string());
                            sup.failed(&vm, format!("its guest stopped booting: {why}"))
                                .await;
                        }
                    });
                    return;
                }
                self.spawn_op(id, {
                    let sup = Arc::clone(self);
                    move || async move { sup.start(vm).await }
                });
            }
        }
    }

    async fn start(self: &Arc<Self>, vm: Vm) {
        let id = vm.id;
        let plan = VmPlan {
            id: id.to_string(),
            name: vm.name.clone(),
            image: vm.spec.image.clone(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            disk_gib: vm.spec.disk_gib,
            owner: vm.owner.to_string(),
        };
        let (host, runtime, timeout) = (
            Arc::clone(&self.host),
            Arc::clone(&self.runtime),
            self.start_timeout,
        );
        let hint = vm.private_ip;
        // Read before this start logs its own first line.
        let last_words = self.host.last_words(&id.to_string());
        tracing::debug!(vm = %vm.name, "starting");
        let t0 = Instant::now();
        let fetched = self.fetch_image(&vm).await;
        let r = match fetched {
            Err(e) => Err(e),
            Ok(()) => tokio::task::spawn_blocking(move || {
                host.start(runtime.as_ref(), &plan, hint, timeout)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
        };
        if r.is_ok() {
            // A new run, a new memory cgroup: its kills count from 0.
            if let Ok(mut seen) = self.oom_kills.lock() {
                seen.insert(id, 0);
            }
            self.record_agent_key(&vm).await;
            // Running before, with no process now: it ended without being asked to.
            let text = if matches!(vm.observed, Observed::Running | Observed::Booting) {
                let why = last_words
                    .unwrap_or_else(|| "its process was killed or the host restarted".to_owned());
                format!("restarted: its process had ended ({why})")
            } else {
                "started".to_owned()
            };
            self.event(id, text).await;
        }
        match r {
            Ok(started) => {
                match started {
                    Started::Ready(net) => {
                        if let Ok(mut r) = self.retry.lock() {
                            r.remove(&id);
                        }
                        tracing::info!(vm = %vm.name, ip = %net.ip, ms = t0.elapsed().as_millis() as u64, "VM running");
                        self.report(id, Observed::Running, Some(net.ip), None).await;
                    }
                    // The backoff stays: a guest that cannot finish will stop again.
                    Started::Booting(net, why) => {
                        tracing::warn!(vm = %vm.name, ip = %net.ip, reason = %why, "VM booting; it cannot finish here");
                        self.report(id, Observed::Booting, Some(net.ip), Some(why))
                            .await;
                    }
                }
            }
            Err(e) => self.failed(&vm, e).await,
        }
    }

    /// Reports the VM failed with `why` and schedules the next start after a backoff that
    /// doubles with each failure in a row (1 s to 60 s).
    async fn failed(&self, vm: &Vm, why: String) {
        let id = vm.id;
        let wait = self
            .retry
            .lock()
            .map(|mut r| {
                let next = r.get(&id).map_or(Duration::from_secs(1), |(_, d)| {
                    (*d * 2).min(Duration::from_secs(60))
                });
                r.insert(id, (Instant::now() + next, next));
                next
            })
            .unwrap_or(Duration::from_secs(1));
        tracing::error!(vm = %vm.name, error = %why, retry_in = ?wait, "VM did not start");
        self.report(id, Observed::Failed, vm.private_ip, Some(why))
            .await;
    }

    /// Fetches the VM's image from a peer when this node lacks it (`minimal` is built here
    /// instead), reporting each step as the VM's reason while it is starting.
    async fn fetch_image(self: &Arc<Self>, vm: &Vm) -> Result<(), String> {
        let (data_dir, image) = (&self.host.cfg.data_dir, &vm.spec.image);
        if image == "minimal" || crate::images::present(data_dir, image) {
            return Ok(());
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let sup = Arc::clone(self);
        let (id, name, ip) = (vm.id, vm.name.clone(), vm.private_ip);
        let reporter = tokio::spawn(async move {
            while let Some(step) = rx.recv().await {
                tracing::info!(vm = %name, "{step}");
                sup.report(id, Observed::Starting, ip, Some(step)).await;
            }
        });
        let progress = move |step: String| {
            _ = tx.send(step);
        };
        let r = crate::images::fetch(&self.replica, data_dir, image, &progress).await;
        drop(progress);
        _ = reporter.await;
        r
    }

    /// Records the public half of the VM's agent host key in the replica when it is not
    /// there yet: before the VM is reported running at its address, so that no proxy connects
    /// a user to it without checking the key.
    async fn record_agent_key(&self, vm: &Vm) {
        let dir = self.host.vm_dir(&vm.id.to_string());
        let Some(key) = boxd_worker::agent_key::public(&dir) else {
            return;
        };
        if vm.agent_key.as_deref() == Some(key.as_str()) {
            return;
        }
        let cmd = Command::SetAgentKey {
            vm: vm.id,
            worker: self.me,
            key,
        };
        if let Err(e) = self.replica.write(cmd).await {
            tracing::warn!(vm = %vm.name, error = %e, "the agent's host key was not recorded");
        }
    }

    /// The event for out-of-memory kills in a running VM since the last pass, if there were
    /// any. The first count seen after this supervisor started is where it starts counting.
    fn oom_news(&self, id: VmId, kills: u64, vm: &Vm) -> Option<String> {
        let before = self.oom_kills.lock().ok()?.insert(id, kills)?;
        let n = kills.checked_sub(before).filter(|n| *n > 0)?;
        let what = if n == 1 { "process" } else { "processes" };
        Some(format!(
            "out of memory: the kernel killed {n} {what} in it (memory limit {} MiB)",
            vm.spec.memory_mib
        ))
    }

    /// Records an event in the VM's history (see `RecordVmEvent`).
    async fn event(&self, vm: VmId, text: String) {
        let cmd = Command::RecordVmEvent {
            vm,
            worker: self.me,
            text: shorten(text, MAX_REASON),
            at: self.replica.now(),
        };
        if let Err(e) = self.replica.write(cmd).await {
            tracing::debug!(%vm, error = %e, "event not written");
        }
    }

    async fn report(
        &self,
        vm: VmId,
        observed: Observed,
        private_ip: Option<Ipv4Addr>,
        reason: Option<String>,
    ) {
        let cmd = Command::ReportVm {
            vm,
            worker: self.me,
            observed,
            private_ip,
            reason: reason.map(|r| shorten(r, MAX_REASON)),
            at: self.replica.now(),
        };
        if let Err(e) = self.replica.write(cmd).await {
            tracing::debug!(%vm, error = %e, "report not written");
        }
    }

    /// Runs `op` for `vm` unless one is in flight; wakes the loop when it ends.
    fn spawn_op<F, Fut>(self: &Arc<Self>, vm: VmId, op: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Ok(mut busy) = self.busy.lock() else {
            return;
        };
        if !busy.insert(vm) {
            return;
        }
        drop(busy);
        let sup = Arc::clone(self);
        tokio::spawn(async move {
            op().await;
            let n = sup
                .ops_ended
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                + 1;
            if let Ok(mut e) = sup.ended.lock() {
                e.insert(vm, n);
            }
            if let Ok(mut b) = sup.busy.lock() {
                b.remove(&vm);
            }
            sup.wake.notify_one();
        });
    }
}

/// `text` cut to at most `max` bytes at a character boundary, marked with an ellipsis.
fn shorten(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_at_character_boundaries() {
        assert_eq!(shorten("short".into(), 10), "short");
        let long = "é".repeat(600);
        let cut = shorten(long, MAX_REASON);
        assert!(
            cut.len() <= MAX_REASON && cut.ends_with("..."),
            "{}",
            cut.len()
        );
    }

    #[test]
    fn workers_hand_vms_the_public_half_of_the_proxies_agent_key() {
        for secret in ["00", "a cluster secret"] {
            let proxy = boxd_dataplane::ssh::relay::agent_key(secret);
            let worker = boxd_worker::agent_key::cluster_public(&agent_key_seed(secret));
            assert_eq!(proxy.public_key().to_openssh().expect("encodes"), worker);
        }
        assert_ne!(
            boxd_worker::agent_key::cluster_public(&agent_key_seed("one")),
            boxd_worker::agent_key::cluster_public(&agent_key_seed("two")),
            "each cluster its own key"
        );
    }
}
