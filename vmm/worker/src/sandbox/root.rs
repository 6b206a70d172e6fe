//! The VM's root tree: mounts made by the host's root before the VM's init becomes the VM's
//! root.

use std::os::fd::OwnedFd;
use std::path::Path;

use super::mounts::{cstr, mount};
use super::{Overlay, errno, userns};

/// Makes `rootfs` the root, its files owned by the VM's user namespace `user` (whose root is
/// host id `base`): private mounts, the disk as idmapped layers (see `userns`), /proc, a fresh
/// /dev, then `pivot_root` and detaching the old root.
pub(super) fn enter_root(
    rootfs: &Path,
    overlay: Option<&Overlay>,
    user: &OwnedFd,
    base: u32,
) -> Result<(), String> {
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
            // The layers, idmapped, on a scratch tmpfs at `rootfs` that the overlay then
            // covers; upper and work must share a mount, so their directory is mapped whole.
            let disk = o.upper.parent().filter(|d| Some(*d) == o.work.parent());
            let (Some(disk), Some(upper), Some(work)) =
                (disk, o.upper.file_name(), o.work.file_name())
            else {
                return Err("the overlay's upper and work directories must be siblings".into());
            };
            if [rootfs.as_os_str(), upper, work]
                .iter()
                .any(|p| p.as_bytes().iter().any(|b| *b == b',' || *b == b':'))
            {
                return Err("overlay paths must not contain ',' or ':'".into());
            }
            mount(
                Some("tmpfs"),
                rootfs,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("mode=700,size=16k"),
            )?;
            let (lower_at, disk_at) = (rootfs.join("lower"), rootfs.join("disk"));
            for d in [&lower_at, &disk_at] {
                std::fs::create_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
            }
            if let Some(image) = &o.image {
                super::layer::mount(image, disk)?;
            }
            userns::idmapped_bind(&o.lower, &lower_at, user)?;
            userns::idmapped_bind(disk, &disk_at, user)?;
            // Paths relative to the scratch tmpfs: the options show in the VM's /proc/mounts,
            // and the host's paths are none of its business.
            std::env::set_current_dir(rootfs)
                .map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
            let opts = format!(
                "lowerdir=lower,upperdir={},workdir={}",
                Path::new("disk").join(upper).display(),
                Path::new("disk").join(work).display()
            );
            userns::as_vm_root(base, || {
                mount(Some("overlay"), rootfs, Some("overlay"), 0, Some(&opts))
            })?;
        }
        None => userns::idmapped_bind(rootfs, rootfs, user)?,
    }
    // From here on paths are relative to the new root, so that directories it lacks are made
    // by the VM's root (the host's root cannot write through an idmapped mount).
    std::env::set_current_dir(rootfs).map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
    let mk = |p: &str| {
        userns::as_vm_root(base, || {
            std::fs::create_dir_all(p).map_err(|e| format!("/{p}: {e}"))
        })
    };
    mk("proc")?;
    mount(
        Some("proc"),
        Path::new("proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    mk("dev")?;
    let dev = Path::new("dev");
    let owned = format!("uid={base},gid={base}");
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(&format!("mode=755,size=64k,{owned}")),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        std::fs::write(&target, b"").map_err(|e| format!("/{}: {e}", target.display()))?;
        let host = format!("/dev/{name}");
        mount(Some(&host), &target, None, libc::MS_BIND, None)?;
    }
    let mkdev = |p: &Path| std::fs::create_dir(p).map_err(|e| format!("/{}: {e}", p.display()));
    let pts = dev.join("pts");
    mkdev(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )?;
    let shm = dev.join("shm");
    mkdev(&shm)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&format!("mode=1777,{owned}")),
    )?;
    // The host's kernel knobs are not the VM's to turn (see `confine`).
    crate::confine::restrict_proc(Path::new("proc"), &dev.join("null"))?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link)).map_err(|e| format!("/dev/{link}: {e}"))?;
    }
    // pivot_root(".", "."): the old root ends up on top of the new one, then goes.
    let dot = cstr(".")?;
    // SAFETY: live NUL-terminated paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(errno("pivot_root"));
    }
    // SAFETY: a live NUL-terminated path.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(errno("umount the old root"));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}
