//! The VM's user namespace: its root is root only inside.
//!
//! Every sandbox VM runs in a user namespace of its own that maps ids 0–65535 inside to a block
//! of 65,536 unprivileged host ids. Its uid 0 has capabilities over what the namespace owns —
//! the VM's network namespace, files of its disk — and over nothing of the host's: on the host
//! it is uid `0x7000_0000 + n·0x10000`, which owns no file and can signal no host process.
//!
//! - **Blocks**: the monitor takes the first free block for as long as it lives, holding an
//!   `flock` on `/run/boxd/uids/<base>` (released however the monitor ends, so a crash frees
//!   it). Blocks start at `0x7000_0000`, above systemd-nspawn's pick range
//!   (`0x80000`–`0x6fff0000`) and far above ordinary users; 4,096 of them, so VMs on one host
//!   never share ids, whatever data directory their worker uses.
//! - **The disk keeps the VM's own ids.** The image tree and the VM's layer are mounted as
//!   idmapped mounts (Linux ≥ 5.19 for overlayfs layers): a file owned by 0 on disk is the
//!   VM's root's, and what the VM's root writes is stored as 0. So a block can differ from one
//!   start to the next, images stay shared between VMs, and disks written before user
//!   namespaces keep working. The data directory is 0700, so no host user reaches those files.
//! - **Which namespaces it owns**: network (so its root binds port 80, configures `eth0`, runs
//!   a firewall), and the cgroup namespace. Mount, PID, UTS and IPC namespaces are made by the
//!   host's root, as the VM cannot mount, unshare or set its host name anyway (`confine`).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::mounts::cstr;
use super::{errno, pipe, read_byte, write_byte};

/// Ids a VM has: 0–65535 inside.
pub const SIZE: u32 = 0x1_0000;
/// The first block's first host id.
pub const FIRST: u32 = 0x7000_0000;
/// How many blocks there are (the last ends at `0x8000_0000`).
pub const BLOCKS: u32 = 4096;
/// Where the blocks' lock files live.
pub const LOCK_DIR: &str = "/run/boxd/uids";

/// A block of host ids, the VM's while this value lives.
#[derive(Debug)]
pub struct Block {
    /// The host uid (and gid) that is 0 inside.
    pub base: u32,
    _lock: File,
}

/// Takes the first free block.
pub fn take_block() -> Result<Block, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .map_err(|e| format!("{LOCK_DIR}: {e}"))?;
    for n in 0..BLOCKS {
        let base = FIRST + n * SIZE;
        let path = Path::new(LOCK_DIR).join(format!("{base:#x}"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Block { base, _lock: file });
        }
    }
    Err(format!(
        "all {BLOCKS} uid blocks under {LOCK_DIR} are taken: too many sandbox VMs on this host"
    ))
}

/// The VM's user and network namespaces, made before its init exists.
#[derive(Debug)]
pub struct Namespaces {
    /// The user namespace (for `setns` and idmapped mounts).
    pub user: OwnedFd,
    /// The network namespace, owned by `user`.
    pub net: OwnedFd,
}

/// A short-lived process that makes the namespaces and holds them while the monitor maps its
/// ids and wires its network; it ends when dropped.
pub struct Holder {
    /// Its PID (for `ip link … netns PID`).
    pub pid: libc::pid_t,
    release: Option<OwnedFd>,
}

impl Holder {
    /// Forks the holder; it unshares a user and a network namespace, whose ids the monitor
    /// then maps to `base`. The caller must be single-threaded and not yet in a new PID
    /// namespace (the holder would become its init).
    pub fn spawn(base: u32) -> Result<(Self, Namespaces), String> {
        let (ready_r, ready_w) = pipe()?;
        let (release_r, release_w) = pipe()?;
        // SAFETY: the caller is single-threaded; the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(errno("fork"));
        }
        if pid == 0 {
            drop(ready_r);
            drop(release_w);
            // SAFETY: plain prctl and unshare in the single-threaded child.
            let ok = unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0
            };
            write_byte(&ready_w, if ok { b'k' } else { b'E' });
            // Hold the namespaces until the monitor has them (it closes its end).
            _ = read_byte(&release_r);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        drop(ready_w);
        drop(release_r);
        let holder = Holder {
            pid,
            release: Some(release_w),
        };
        if read_byte(&ready_r) != Some(b'k') {
            return Err(
                "cannot make the VM's user namespace (unshare CLONE_NEWUSER failed; is \
                 user.max_user_namespaces 0?)"
                    .into(),
            );
        }
        let map = format!("0 {base} {SIZE}\n");
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(map.as_bytes()))
                .map_err(|e| format!("{path}: {e}"))?;
        }
        let open = |ns: &str| {
            let path = format!("/proc/{pid}/ns/{ns}");
            File::open(&path)
                .map(OwnedFd::from)
                .map_err(|e| format!("{path}: {e}"))
        };
        let ns = Namespaces {
            user: open("user")?,
            net: open("net")?,
        };
        Ok((holder, ns))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.release.take();
        let mut status = 0;
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(self.pid, &raw mut status, 0) };
    }
}

/// Joins `ns` (a namespace of the given `CLONE_*` type).
pub fn join(ns: &OwnedFd, kind: libc::c_int, what: &str) -> Result<(), String> {
    // SAFETY: setns with a descriptor we own, in a single-threaded process.
    if unsafe { libc::setns(ns.as_raw_fd(), kind) } != 0 {
        return Err(errno(&format!("setns({what})")));
    }
    Ok(())
}

/// Becomes the VM's root: enters its user namespace as uid and gid 0 with no supplementary
/// groups (full capabilities there, none outside).
pub fn become_root(user: &OwnedFd) -> Result<(), String> {
    join(user, libc::CLONE_NEWUSER, "user")?;
    // SAFETY: plain id changes in a single-threaded process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(errno("setgroups"));
        }
        if libc::setresgid(0, 0, 0) != 0 {
            return Err(errno("setresgid(0)"));
        }
        if libc::setresuid(0, 0, 0) != 0 {
            return Err(errno("setresuid(0)"));
        }
    }
    Ok(())
}

/// `struct mount_attr` of linux/mount.h.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Mounts `src` at `target` (an existing directory) with the ids of `user`: on-disk id `n` is
/// `n` inside the VM.
pub fn idmapped_bind(src: &Path, target: &Path, user: &OwnedFd) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let hint = "the sandbox runtime needs idmapped mounts: Linux 5.19 or later and the data \
                directory on ext4, xfs, btrfs or tmpfs";
    let src_c = cstr(src.as_os_str().as_bytes())?;
    // SAFETY: a live NUL-terminated path; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src_c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(format!(
            "{} ({hint})",
            errno(&format!("open_tree {}", src.display()))
        ));
    }
    // SAFETY: open_tree returned a descriptor nobody else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: user.as_raw_fd() as u64,
    };
    // SAFETY: attr is a live struct of the size passed; the path is the empty string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(format!(
            "{} ({hint})",
            errno(&format!("idmapped mount of {}", src.display()))
        ));
    }
    let target_c = cstr(target.as_os_str().as_bytes())?;
    // SAFETY: live NUL-terminated paths and a descriptor we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(errno(&format!("move_mount to {}", target.display())));
    }
    Ok(())
}

/// Runs `f` with file system ids `base` (the VM's root as the host sees it) and the host
/// root's capabilities, so that what it creates through an idmapped mount is stored as the
/// VM's root's; then back to 0. An overlay mounted this way does its own work (its work
/// directory, copies up) as that id.
pub fn as_vm_root<T>(base: u32, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    // SAFETY: setfsuid/setfsgid only change this thread's file system ids.
    unsafe {
        libc::setfsgid(base);
        libc::setfsuid(base);
    }
    let out = crate::confine::raise_effective().and_then(|()| f());
    // SAFETY: as above; back to 0 makes the file capabilities effective again.
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
    }
    out
}
