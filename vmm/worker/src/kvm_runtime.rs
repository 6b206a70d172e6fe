//! The kvm runtime: each VM is a `boxd vmm` process booting the host's kernel (Debian's cloud
//! kernel, from `ops/fetch-kernel`) with a small initramfs, the image as an ext4 virtio-blk
//! root disk, and a tap on the worker's bridge.
//!
//! ```text
//! images/.pinned/<name>-<built>.ext4   the image's tree as ext4, made once per build
//! images/.initramfs-<kernel>.cpio      busybox + the virtio modules; mounts /dev/vda
//! vms/<id>/disk.img                    the VM's disk: a reflink (or sparse) copy, grown
//! vms/<id>/vm.json                     the `boxd vmm` config
//! vms/<id>/console.log                 the serial console (the kernel, init, the agent)
//! vms/<id>/vmm.log                     the VMM's own log
//! ```
//!
//! The guest learns its address, gateway, host name, the agent's port and the cluster's agent
//! key from `boxd.*` words on the kernel command line; the image's `/sbin/init` (busybox init
//! for `minimal`, systemd for `debian`) runs `/usr/local/sbin/boxd-net` once and keeps the
//! agent running.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::tap_name;
use crate::{Disk, Host, Runtime, VmNet, VmPlan, WorkerError, once};
use boxd_vmm::config::{BootConfig, DiskConfig, NetConfig, VmConfig};

/// Kernel modules the initramfs loads, each after those it depends on (the `depends=` of
/// its `.modinfo`); Debian's cloud kernel builds them as modules, ext4 is built in.
pub const INITRAMFS_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The kvm runtime's fixed inputs.
#[derive(Clone, Debug)]
pub struct KvmRuntime {
    /// Kernel image: the ELF `vmlinux` when there is one (it prints at once; a bzImage first
    /// decompresses itself, which takes minutes under an emulated KVM), else `vmlinuz`.
    pub kernel: PathBuf,
    /// Directory with the modules of [`INITRAMFS_MODULES`] (`<name>.ko`).
    pub modules: PathBuf,
    /// Kernel version (names the initramfs).
    pub version: String,
    /// Static busybox for the initramfs.
    pub busybox: PathBuf,
    /// Why guests cannot finish booting on this host, if they cannot (emulated KVM).
    pub cannot_finish: Option<String>,
}

impl KvmRuntime {
    /// Finds the kernel in `kernel_dir` (what `ops/fetch-kernel` leaves: `vmlinux`, `vmlinuz`,
    /// `version`, `modules/`). The error says how to get one.
    pub fn open(
        kernel_dir: &Path,
        busybox: &Path,
        cannot_finish: Option<String>,
    ) -> Result<KvmRuntime, String> {
        let kernel = ["vmlinux", "vmlinuz"]
            .iter()
            .map(|k| kernel_dir.join(k))
            .find(|k| k.is_file())
            .ok_or_else(|| {
                format!(
                    "no kernel in {} (vmlinux or vmlinuz): fetch Debian's cloud kernel with `ops/fetch-kernel {}` or set worker.kernel_dir",
                    kernel_dir.display(),
                    kernel_dir.display()
                )
            })?;
        let modules = kernel_dir.join("modules");
        if let Some(m) = INITRAMFS_MODULES
            .iter()
            .find(|m| !modules.join(format!("{m}.ko")).is_file())
        {
            return Err(format!(
                "{} has no {m}.ko (the initramfs needs the virtio modules): run `ops/fetch-kernel {}` again",
                modules.display(),
                kernel_dir.display()
            ));
        }
        let version = std::fs::read_to_string(kernel_dir.join("version"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        if !busybox.is_file() {
            return Err(format!(
                "{} is missing: the initramfs needs a static busybox (apt-get install busybox-static)",
                busybox.display()
            ));
        }
        Ok(KvmRuntime {
            kernel,
            modules,
            version,
            busybox: busybox.to_owned(),
            cannot_finish,
        })
    }

    /// The initramfs, built once per kernel version under the images directory.
    fn initramfs(&self, host: &Host) -> Result<PathBuf, WorkerError> {
        let images = crate::image::images_dir(&host.cfg.data_dir);
        let out = images.join(format!(".initramfs-{}.cpio", self.version));
        static BUILDING: Mutex<()> = Mutex::new(());
        once(
            &BUILDING,
            || out.is_file(),
            || {
                let work = images.join(format!(".initramfs-{}.building", std::process::id()));
                _ = std::fs::remove_dir_all(&work);
                let r = build_initramfs(self, &work, &out);
                _ = std::fs::remove_dir_all(&work);
                r
            },
        )?;
        Ok(out)
    }

    /// The VM's kernel command line.
    pub fn cmdline(host: &Host, vm: &VmPlan, net: VmNet) -> String {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode(host.cfg.agent_key.trim());
        format!(
            "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 net.ifnames=0 boxd.ip={}/{} boxd.gw={} boxd.hostname={} boxd.port={} boxd.key={key}",
            net.ip,
            host.cfg.subnet.prefix_len(),
            host.gateway(),
            vm.name,
            host.cfg.agent_port,
        )
    }

    /// Everything a VM needs before its VMM starts — root disk, tap on the bridge, initramfs —
    /// and the VMM config that uses them (idempotent: what exists is kept).
    pub fn prepare(
        &self,
        host: &Host,
        vm: &VmPlan,
        disk: &Disk,
        net: VmNet,
    ) -> Result<VmConfig, WorkerError> {
        let dir = host.vm_dir(&vm.id);
        let image = dir.join("disk.img");
        if !image.is_file() {
            let tree = disk.lower.clone().unwrap_or_else(|| dir.join("rootfs"));
            let base = base_disk(host, vm, &tree)?;
            vm_disk(
                &base,
                &image,
                vm.disk_gib,
                crate::agent_key::path(&dir).as_deref(),
            )?;
        }
        let tap = tap_name(&vm.id);
        ensure_tap(&tap, &host.cfg.bridge)?;
        Ok(VmConfig {
            vcpus: u8::try_from(vm.vcpus.clamp(1, u32::from(boxd_vmm::config::MAX_VCPUS)))
                .unwrap_or(1),
            memory_mib: vm.memory_mib.max(boxd_vmm::config::MIN_MEMORY_MIB),
            boot: BootConfig {
                kernel: self.kernel.clone(),
                cmdline: Self::cmdline(host, vm, net),
                initrd: Some(self.initramfs(host)?),
            },
            serial_log: Some(dir.join("console.log")),
            disks: vec![DiskConfig {
                path: image,
                read_only: false,
                id: Some("boxd-root".into()),
            }],
            // The MAC the port's rules allow (see `isolation`).
            net: vec![NetConfig {
                tap,
                mac: Some(crate::isolation::mac_of(&vm.id)),
            }],
            vsock: None,
        })
    }
}

impl Runtime for KvmRuntime {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn cannot_finish(&self) -> Option<&str> {
        self.cannot_finish.as_deref()
    }

    fn launch(&self, host: &Host, vm: &VmPlan, disk: &Disk, net: VmNet) -> Result<(), WorkerError> {
        let cfg = self.prepare(host, vm, disk, net)?;
        host.spawn_vm(&vm.id, "vmm", "vm.json", &cfg, "vmm.log")
    }

    fn port(&self, id: &str) -> String {
        tap_name(id)
    }
}

/// A persistent tap on the bridge, up; kept across stop/start, removed with the VM.
fn ensure_tap(tap: &str, bridge: &str) -> Result<(), WorkerError> {
    if !crate::net::link_exists(tap) {
        crate::tool("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    crate::tool("ip", &["link", "set", "dev", tap, "master", bridge, "up"])
}

/// The image tree as an ext4 file, once per pinned build (`<pinned>.ext4`): sized to the tree
/// plus room for metadata; each VM's disk is a copy grown to its own size.
fn base_disk(host: &Host, vm: &VmPlan, tree: &Path) -> Result<PathBuf, WorkerError> {
    let name = tree
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| vm.image.clone());
    let base = if tree.starts_with(crate::image::images_dir(&host.cfg.data_dir)) {
        tree.with_file_name(format!("{name}.ext4"))
    } else {
        host.vm_dir(&vm.id).join("base.ext4") // a VM with a copied tree: no shared base
    };
    static MAKING: Mutex<()> = Mutex::new(());
    once(&MAKING, || base.is_file(), || make_base(tree, &base))?;
    Ok(base)
}

/// `mkfs.ext4 -d tree` into `base` (through a temporary name).
fn make_base(tree: &Path, base: &Path) -> Result<(), WorkerError> {
    let bytes = crate::image::tree_bytes(tree)
        .map_err(|e| WorkerError::Image(format!("reading the image tree: {e}")))?;
    // ext4 needs room for inode tables and the journal next to the data.
    let kib = (bytes / 1024) * 5 / 4 + 64 * 1024;
    let tmp = base.with_extension("ext4.making");
    _ = std::fs::remove_file(&tmp);
    let (t, d) = (tmp.to_string_lossy(), tree.to_string_lossy());
    let size = format!("{kib}k");
    crate::tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "boxd-root",
            "-E",
            "root_owner=0:0",
            "-d",
            &d,
            &t,
            &size,
        ],
    )
    .map_err(|e| {
        WorkerError::Image(format!(
            "making the root disk: {e} (apt-get install e2fsprogs)"
        ))
    })?;
    std::fs::rename(&tmp, base).map_err(|e| WorkerError::Host(format!("{}: {e}", base.display())))
}

/// The VM's disk: a copy of `base` (reflink where the filesystem has it, else sparse), grown
/// to `gib` and its filesystem with it.
fn vm_disk(
    base: &Path,
    image: &Path,
    gib: u64,
    host_key: Option<&Path>,
) -> Result<(), WorkerError> {
    let tmp = image.with_extension("img.making");
    _ = std::fs::remove_file(&tmp);
    let (b, t) = (base.to_string_lossy(), tmp.to_string_lossy());
    crate::tool("cp", &["--reflink=auto", "--sparse=always", &b, &t])?;
    let want = gib.max(1) << 30;
    let have = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
    if want > have {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_len(want))
            .map_err(|e| WorkerError::Host(format!("{}: {e}", tmp.display())));
        f?;
        crate::tool("resize2fs", &["-f", &t])
            .map_err(|e| WorkerError::Host(format!("growing the VM's disk: {e}")))?;
    }
    if let Some(key) = host_key {
        // The agent's host key goes onto the disk (not the kernel command line, which every
        // process in the guest can read); `boxd-agent-run` passes it to the agent.
        let dest = Path::new(crate::agent_key::GUEST_PATH);
        let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
            return Err(WorkerError::Host("agent key path has no directory".into()));
        };
        let script = format!(
            "mkdir {dir}\ncd {dir}\nrm {name}\nwrite {key} {name}\nsif {name} mode 0100600\n\
             sif {name} uid 0\nsif {name} gid 0\n",
            dir = dir.display(),
            name = name.to_string_lossy(),
            key = key.display(),
        );
        crate::stdin_tool("debugfs", &["-w", "-f", "-", &t], &script)
            .map_err(|e| WorkerError::Host(format!("writing the agent's key to the disk: {e}")))?;
    }
    std::fs::rename(&tmp, image).map_err(|e| WorkerError::Host(format!("{}: {e}", image.display())))
}

/// The initramfs /init: load the virtio modules, mount the root disk, switch to its init.
const INIT: &str = r#"#!/bin/busybox sh
# boxd initramfs: loads the virtio modules, mounts /dev/vda (ext4) and runs its /sbin/init.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
  insmod /modules/$m.ko || echo "boxd initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "boxd initramfs: cannot mount /dev/vda; rebooting"
  sleep 2
  reboot -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"#;

fn build_initramfs(rt: &KvmRuntime, work: &Path, out: &Path) -> Result<(), WorkerError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |p: &Path| {
        let p = p.to_owned();
        move |e: std::io::Error| WorkerError::Host(format!("{}: {e}", p.display()))
    };
    for d in ["bin", "proc", "sys", "dev", "modules", "newroot"] {
        let p = work.join(d);
        std::fs::create_dir_all(&p).map_err(err(&p))?;
    }
    let bb = work.join("bin/busybox");
    std::fs::copy(&rt.busybox, &bb).map_err(err(&bb))?;
    let init = work.join("init");
    std::fs::write(&init, INIT).map_err(err(&init))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).map_err(err(&init))?;
    for m in INITRAMFS_MODULES {
        let from = rt.modules.join(format!("{m}.ko"));
        let to = work.join("modules").join(format!("{m}.ko"));
        std::fs::copy(&from, &to).map_err(err(&from))?;
    }
    let order = work.join("modules/order");
    std::fs::write(&order, INITRAMFS_MODULES.join("\n") + "\n").map_err(err(&order))?;
    let tmp = out.with_extension("cpio.making");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        work.display(),
        tmp.display()
    );
    crate::tool("sh", &["-c", &script]).map_err(|e| {
        WorkerError::Host(format!("making the initramfs: {e} (apt-get install cpio)"))
    })?;
    std::fs::rename(&tmp, out).map_err(err(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_differ_from_veths() {
        let id = "0193a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b";
        assert_eq!(tap_name(id), "bt1c2d3e4f5a6b");
        assert_eq!(crate::host_veth(id), "bx1c2d3e4f5a6b");
        assert!(tap_name(id).len() <= 15);
    }
}
