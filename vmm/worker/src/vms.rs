//! What `Host` (lib.rs) does with this worker's VMs: their directories, and bringing one up,
//! down or away. Its networking is in
//! `net.rs`, its processes in `spawn.rs`, its disk in `disk.rs`.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use boxd_vmm::api::{self, Probe};

use crate::net::{ip, link_exists, read_net, tap_name};
use crate::spawn::tail;
use crate::{Host, Runtime, Started, VmPlan, WorkerError, cgroup_of, sandbox, write_json};

impl Host {
    /// A VM's directory.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(id)
    }

    /// A VM's API socket.
    pub fn api_sock(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("api.sock")
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
