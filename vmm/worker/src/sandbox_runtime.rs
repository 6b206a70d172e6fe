//! The sandbox runtime: each VM is a `boxd sandbox` process (namespaces, cgroups,
//! pivot_root; see `sandbox`), its port a veth on the bridge.

use std::path::PathBuf;

use crate::sandbox::{AgentSpec, Overlay, SandboxNet, SandboxSpec};
use crate::{
    Disk, Host, LAYER_IMAGE, LAYER_MOUNT, Runtime, VmNet, VmPlan, WorkerError, cgroup_of, host_veth,
};

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
