//! A VM's disk, kept across stop/start until `delete`.
//!
//! Sandbox: overlayfs, the pinned image tree below and the VM's own layer above. The layer
//! lives on a filesystem of its own — `layer.img`, a sparse ext4 image of the disk's size,
//! mounted by the VM's process inside its own mount namespace (`sandbox::layer`) — so the VM
//! cannot write past its size, and the disk is thin: it costs what the VM wrote (plus ~2 MiB of
//! ext4 metadata), which [`written_bytes`] counts for the worker's accounting. Disks made before
//! sized layers (an `upper/` directory beside `rootfs/`) keep working, unbounded.
//! kvm: the runtime makes `disk.img` from the pinned tree (see `kvm_runtime`), also sparse.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Host, VmPlan, WorkerError, once, tool, write_json};

/// The sized layer's image in a VM's directory, and where the VM's process mounts it.
pub const LAYER_IMAGE: &str = "layer.img";
/// See [`LAYER_IMAGE`].
pub const LAYER_MOUNT: &str = "layer";

impl Host {
    /// Gives the VM its disk: where the kernel has overlayfs, an empty layer over a pinned copy
    /// of the image — with `sized`, on its own filesystem of the VM's disk size (see the module
    /// doc) — else a copy of the image tree (reflink where the filesystem has it).
    pub fn ensure_disk(&self, vm: &VmPlan, sized: bool) -> Result<Disk, WorkerError> {
        let dir = self.vm_dir(&vm.id);
        let rootfs = dir.join("rootfs");
        let disk_file = dir.join("disk.json");
        if let Ok(text) = std::fs::read(&disk_file)
            && let Ok(d) = serde_json::from_slice::<Disk>(&text)
        {
            return Ok(d);
        }
        if rootfs.is_dir() && !dir.join("upper").exists() {
            // A copied tree from before disk.json.
            return Ok(Disk {
                lower: None,
                layer_gib: None,
            });
        }
        let image = self.ensure_image(&vm.image)?;
        let mk = |p: &Path| {
            std::fs::create_dir_all(p)
                .map_err(|e| WorkerError::Host(format!("{}: {e}", p.display())))
        };
        mk(&dir)?;
        let disk = if overlay_supported() {
            let lower = self.pin_image(&vm.image, &image)?;
            mk(&dir.join("rootfs"))?;
            let layer_gib = if sized {
                make_layer(&dir, vm.disk_gib)?;
                Some(vm.disk_gib)
            } else {
                make_layer_tree(&dir)?;
                None
            };
            Disk {
                lower: Some(lower),
                layer_gib,
            }
        } else {
            let tmp = dir.join(".rootfs.copying");
            _ = std::fs::remove_dir_all(&tmp);
            cp(&["-a", "--reflink=auto"], &image.join("rootfs"), &tmp).inspect_err(|_| {
                _ = std::fs::remove_dir_all(&tmp);
            })?;
            std::fs::rename(&tmp, &rootfs)
                .map_err(|e| WorkerError::Host(format!("{}: {e}", rootfs.display())))?;
            Disk {
                lower: None,
                layer_gib: None,
            }
        };
        // The agent's own host key is born with the disk (see `agent_key`).
        crate::agent_key::create(&dir).map_err(WorkerError::Host)?;
        write_json(&disk_file, &disk)?;
        Ok(disk)
    }

    /// A copy of the image's current build that no rebuild changes: hard links (so it costs
    /// only directory entries) under `images/.pinned/<name>-<built_at>`, made once per build.
    fn pin_image(&self, name: &str, image: &Path) -> Result<PathBuf, WorkerError> {
        let info: crate::image::ImageInfo = std::fs::read(image.join("image.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .ok_or_else(|| {
                WorkerError::Image(format!("image {name} has no image.json: rebuild it"))
            })?;
        let pinned = crate::image::images_dir(&self.cfg.data_dir)
            .join(".pinned")
            .join(format!("{name}-{}", info.built_at));
        static PINNING: Mutex<()> = Mutex::new(());
        once(
            &PINNING,
            || pinned.is_dir(),
            || {
                let tmp = pinned.with_extension("pinning");
                _ = std::fs::remove_dir_all(&tmp);
                if let Some(parent) = tmp.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| WorkerError::Host(format!("{}: {e}", parent.display())))?;
                }
                cp(&["-al"], &image.join("rootfs"), &tmp)?;
                std::fs::rename(&tmp, &pinned)
                    .map_err(|e| WorkerError::Host(format!("{}: {e}", pinned.display())))
            },
        )?;
        Ok(pinned)
    }

    /// Whether image `name` is built and current: for `minimal`, built by this recipe version
    /// with the agent that is next to `boxd` now (after an upgrade, new VMs get the new agent;
    /// VMs created before keep the build they were pinned to).
    fn image_current(&self, name: &str, dir: &Path) -> bool {
        if !dir.join("rootfs").is_dir() {
            return false;
        }
        if name != "minimal" {
            return true;
        }
        let built: Option<crate::image::ImageInfo> = std::fs::read(dir.join("image.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok());
        if built.as_ref().and_then(|b| b.recipe) != Some(crate::image::RECIPE_VERSION) {
            return false;
        }
        let now = crate::image::agent_stamp(&self.cfg.minimal.agent);
        match (built.and_then(|b| b.agent), now) {
            (Some(b), Some(n)) => b == n,
            // No agent here to compare with (it is only needed to build): keep the image.
            (_, None) => true,
            (None, Some(_)) => false,
        }
    }

    /// The image's directory, building `minimal` here if it is missing or its agent is stale.
    fn ensure_image(&self, name: &str) -> Result<PathBuf, WorkerError> {
        let dir = crate::image::images_dir(&self.cfg.data_dir).join(name);
        // One build at a time; a concurrent start waits here and then finds it built.
        static BUILDING: Mutex<()> = Mutex::new(());
        once(
            &BUILDING,
            || self.image_current(name, &dir),
            || {
                if name != "minimal" {
                    return Err(WorkerError::Image(format!(
                        "image {name} is not on this worker: build it with `boxd image build {name}`"
                    )));
                }
                tracing::info!("image minimal is missing or has an older agent: building it");
                crate::image::build(&self.cfg.data_dir, name, &self.cfg.minimal, &mut |s| {
                    tracing::info!("image minimal: {s}");
                })
                .map(|_| ())
                .map_err(|e| WorkerError::Image(format!("building image minimal: {e}")))
            },
        )?;
        Ok(dir)
    }
}

/// How a VM's disk is laid out (`disk.json` in its directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The pinned image tree below the VM's `upper` layer; none when `rootfs` is a full copy.
    pub lower: Option<PathBuf>,
    /// The size of [`LAYER_IMAGE`], which holds the layer; none: `upper/` and `work/` are
    /// directories beside `rootfs/`, unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_gib: Option<u64>,
}

/// The layer's `upper` and `work` directories in `at`. `upper`'s top is the VM's `/`: it
/// must be 0755 whatever boxd's umask, or the VM's users cannot reach anything.
fn make_layer_tree(at: &Path) -> Result<(), WorkerError> {
    let host = |p: &Path, e: std::io::Error| WorkerError::Host(format!("{}: {e}", p.display()));
    let work = at.join("work");
    std::fs::create_dir_all(&work).map_err(|e| host(&work, e))?;
    let upper = at.join("upper");
    crate::image::public_dirs(&upper).map_err(|e| host(&upper, e))
}

/// Makes `layer.img`: a sparse file of `gib` GiB holding an ext4 filesystem with the layer's
/// directories, written by mkfs without mounting anything. Lazy inode-table and journal
/// initialisation (and `noinit_itable` where it is mounted) keep it thin: ~2 MiB on the host
/// whatever its size. No reserved blocks: the VM's root is the only user.
fn make_layer(dir: &Path, gib: u64) -> Result<(), WorkerError> {
    let host = |p: &Path, e: std::io::Error| WorkerError::Host(format!("{}: {e}", p.display()));
    let (image, tree) = (dir.join(LAYER_IMAGE), dir.join(".layer-tree"));
    let tmp = image.with_extension("img.making");
    _ = std::fs::remove_dir_all(&tree);
    make_layer_tree(&tree)?;
    let made = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| host(&tmp, e))?;
        let bytes = gib
            .checked_mul(1 << 30)
            .ok_or_else(|| WorkerError::Host(format!("a disk of {gib} GiB is too large")))?;
        f.set_len(bytes).map_err(|e| host(&tmp, e))?;
        drop(f);
        let (tree_s, tmp_s) = (tree.to_string_lossy(), tmp.to_string_lossy());
        tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-L",
                "boxd-disk",
                "-d",
                &tree_s,
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
                &tmp_s,
            ],
        )
        .map_err(|e| {
            WorkerError::Host(format!(
                "making the VM's disk: {e} (apt-get install e2fsprogs)"
            ))
        })?;
        std::fs::rename(&tmp, &image).map_err(|e| host(&image, e))?;
        let at = dir.join(LAYER_MOUNT);
        std::fs::create_dir_all(&at).map_err(|e| host(&at, e))
    })();
    _ = std::fs::remove_dir_all(&tree);
    if made.is_err() {
        _ = std::fs::remove_file(&tmp);
    }
    made
}

/// Bytes the VMs' disks under `data_dir` take on the host (allocated blocks of each sized layer
/// and kvm disk; a sparse disk costs only what was written). Unsized layers are not counted:
/// walking their trees would cost more than the number is worth.
pub fn written_bytes(data_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(vms) = std::fs::read_dir(data_dir.join("vms")) else {
        return 0;
    };
    vms.flatten()
        .flat_map(|vm| [vm.path().join(LAYER_IMAGE), vm.path().join("disk.img")])
        .filter_map(|f| std::fs::symlink_metadata(f).ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.blocks().saturating_mul(512))
        .sum()
}

/// Whether the kernel offers overlayfs (a sandbox disk is then a layer, not a copy).
pub fn overlay_supported() -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some("overlay"))
        })
        .unwrap_or(false)
}

fn cp(flags: &[&str], from: &Path, to: &Path) -> Result<(), WorkerError> {
    let (from, to) = (from.to_string_lossy(), to.to_string_lossy());
    let mut args = flags.to_vec();
    args.extend([from.as_ref(), to.as_ref()]);
    tool("cp", &args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::test_config;

    #[test]
    fn minimal_is_stale_once_the_agent_or_the_recipe_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = dir.path().join("boxd-agent");
        std::fs::write(&agent, b"v1").expect("agent");
        let host = Host::open(test_config(dir.path(), "10.200.1.0/24", &agent));
        let image = crate::image::images_dir(dir.path()).join("minimal");
        assert!(!host.image_current("minimal", &image), "not built");
        std::fs::create_dir_all(image.join("rootfs")).expect("mkdir");
        let info = crate::image::ImageInfo {
            name: "minimal".into(),
            files: 1,
            bytes: 2,
            built_at: 1,
            agent: crate::image::agent_stamp(&agent),
            recipe: Some(crate::image::RECIPE_VERSION - 1),
        };
        let write = |info: &crate::image::ImageInfo| {
            std::fs::write(
                image.join("image.json"),
                serde_json::to_vec(info).expect("json"),
            )
            .expect("write");
        };
        write(&info);
        assert!(
            !host.image_current("minimal", &image),
            "built by an older recipe"
        );
        write(&crate::image::ImageInfo {
            recipe: Some(crate::image::RECIPE_VERSION),
            ..info
        });
        assert!(
            host.image_current("minimal", &image),
            "built with this agent"
        );
        std::fs::write(&agent, b"version 2").expect("agent");
        assert!(!host.image_current("minimal", &image), "the agent changed");
        assert!(
            host.image_current("other", &image),
            "only minimal carries the agent"
        );
    }
}
