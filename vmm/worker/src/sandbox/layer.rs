//! The VM's own layer on a filesystem of its own: an ext4 image (a sparse file of the disk's
//! size) attached to a loop device and mounted inside the VM's mount namespace, so the layer
//! can hold no more than the disk's size, and the mount and loop device go when the VM does
//! (the device is `LO_FLAGS_AUTOCLEAR`: detached when its last user — the mount — is gone).
//!
//! The loop ioctls come from `linux-raw-sys`; util-linux's `losetup`/`mount -o loop` would do
//! the same through two more processes per start.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use linux_raw_sys::loop_device as lo;

use super::errno;

/// Tries before giving up when other starts take the free device first.
const ATTEMPTS: usize = 16;

/// Mounts the ext4 `image` at `at` through a fresh loop device that detaches itself once
/// unmounted.
pub(super) fn mount(image: &Path, at: &Path) -> Result<(), String> {
    let device = attach(image)?;
    let r = super::mounts::mount_path(
        Some(&device.path),
        at,
        Some("ext4"),
        libc::MS_NODEV | libc::MS_NOSUID,
        // The tables mkfs left uninitialised stay so (zeroing them would allocate the sparse
        // file's blocks for nothing).
        Some("noinit_itable"),
    );
    drop(device); // the mount holds the device now; on failure this detaches it
    r.map_err(|e| format!("{e} (the VM's disk {})", image.display()))
}

struct Attached {
    path: PathBuf,
    _fd: std::fs::File,
}

fn attach(image: &Path) -> Result<Attached, String> {
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(p)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let file = open(image)?;
    let control = open(Path::new("/dev/loop-control"))
        .map_err(|e| format!("{e} (the sandbox needs loop devices: modprobe loop)"))?;
    let mut config = lo::loop_config {
        fd: u32::try_from(file.as_raw_fd()).map_err(|_| "bad descriptor".to_owned())?,
        block_size: 0,
        // SAFETY: loop_info64 is plain integers and byte arrays; all zeroes is valid.
        info: unsafe { std::mem::zeroed() },
        __reserved: [0; 8],
    };
    config.info.lo_flags = lo::LO_FLAGS_AUTOCLEAR as u32;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), lo::LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(errno("no free loop device"));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = open(&path)?;
        // SAFETY: `config` is a live loop_config; the kernel only reads it.
        let r = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                lo::LOOP_CONFIGURE as _,
                std::ptr::from_ref(&config),
            )
        };
        if r == 0 {
            return Ok(Attached { path, _fd: device });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(format!(
                "attaching {} to {}: {e}",
                image.display(),
                path.display()
            ));
        }
        // Another start took this device between GET_FREE and CONFIGURE: ask again.
    }
    Err(format!(
        "attaching {}: every free loop device was taken {ATTEMPTS} times over",
        image.display()
    ))
}
