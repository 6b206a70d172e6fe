//! What a sandbox VM's root may not do, however root it is: the host's kernel state and
//! devices stay out of reach. Applied by the VM's init to itself before it starts the guest
//! agent, so every process of the VM inherits it:
//!
//! - **capabilities**: the bounding set is cut to what container runtimes grant by default
//!   (Docker's list) plus `CAP_NET_ADMIN`, which acts on the VM's own network namespace (its
//!   `eth0`, routes, firewall) — and without `CAP_MKNOD`: the VM cannot make a device node for
//!   a host disk. No `CAP_SYS_ADMIN` (mount, namespaces), `CAP_SYSLOG` (the host's kernel log),
//!   `CAP_SYS_MODULE`, `CAP_SYS_RAWIO`, `CAP_SYS_PTRACE`, `CAP_SYS_TIME`, `CAP_SYS_BOOT`.
//! - **seccomp**: a denylist at least as strict as Docker's default profile: mounts (old and new
//!   API), namespaces (`unshare`, `setns`, `clone` with namespace flags), kernel modules,
//!   kexec, the kernel log, keyrings, BPF, perf, userfaultfd, io_uring, ptrace and cross-process
//!   memory access, clock setting, swap, reboot, quotas, handle-based opens. Refused with
//!   `EPERM`; `clone3` gets `ENOSYS` so that glibc falls back to `clone`, whose flags can be
//!   checked.
//! - **/proc**: `/proc/sys`, `/proc/sysrq-trigger`, `/proc/irq` and `/proc/bus` read-only;
//!   `/proc/kcore`, `/proc/keys`, `/proc/kmsg`, `/proc/timer_list` and `/proc/sched_debug`
//!   hidden behind `/dev/null` (as container runtimes mask them).
//!
//! With the user namespace (`sandbox::userns`) these limits apply to a root that is an
//! unprivileged id on the host. What this does not give (docs/worker.md says so): the kernel is
//! the host's — a kernel bug reachable through the allowed syscalls is a host bug. Hardware virtualization (the kvm runtime) is the boundary
//! for strangers' code; the sandbox is for hosts without it.

use std::collections::BTreeMap;
use std::path::Path;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Capabilities a VM's processes keep (numbers from linux/capability.h).
const KEEP: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    12, // CAP_NET_ADMIN (its own network namespace)
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Syscalls no VM process may make (`EPERM`).
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_syslog,
    libc::SYS_add_key,
    libc::SYS_keyctl,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_settimeofday,
    libc::SYS_adjtimex,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_nfsservctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_sysfs,
    libc::SYS_vhangup,
    libc::SYS_mbind,
    libc::SYS_set_mempolicy,
    libc::SYS_move_pages,
];

/// `clone` flags that create namespaces.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e:?}"))
}

/// The denylist (`EPERM`), with `clone` refused when it asks for a new namespace.
pub fn denylist() -> Result<BpfProgram, String> {
    let err = |e: seccompiler::BackendError| format!("seccomp: {e}");
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|s| (*s, Vec::new())).collect();
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        let bit = u64::from(flag.unsigned_abs());
        let cond =
            SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(bit), bit)
                .map_err(err)?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(err)?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        arch()?,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)
}

/// `clone3` passes its flags in memory a filter cannot read: `ENOSYS`, so callers (glibc's
/// `pthread_create`, `posix_spawn`) fall back to `clone`.
pub fn no_clone3() -> Result<BpfProgram, String> {
    let err = |e: seccompiler::BackendError| format!("seccomp: {e}");
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS.unsigned_abs()),
        arch()?,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)
}

/// Bind-mounts `src` over `target` and, for `read_only`, makes that mount read-only.
fn bind(src: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    crate::sandbox::mounts::mount_path(
        Some(src),
        target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    if read_only {
        let flags = libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC;
        crate::sandbox::mounts::mount_path(None, target, None, flags, None)?;
    }
    Ok(())
}

/// Makes the kernel's knobs under a freshly mounted `proc` (at `proc`, before `pivot_root`)
/// read-only and hides what leaks the host; `null` is the VM's `/dev/null`.
pub fn restrict_proc(proc: &Path, null: &Path) -> Result<(), String> {
    for ro in ["sys", "sysrq-trigger", "irq", "bus"] {
        let p = proc.join(ro);
        if p.exists() {
            bind(&p, &p, true)?;
        }
    }
    for hidden in ["kcore", "keys", "kmsg", "timer_list", "sched_debug"] {
        let p = proc.join(hidden);
        if p.exists() {
            bind(null, &p, false)?;
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_V3: u32 = 0x2008_0522;

/// Cuts the bounding set to [`KEEP`], clears ambient capabilities and limits this process's
/// own sets to [`KEEP`] too; then installs both seccomp filters. Children inherit all of it.
pub fn confine() -> Result<(), String> {
    let keep = |cap: u32| KEEP.contains(&cap);
    for cap in 0..64u32 {
        if keep(cap) {
            continue;
        }
        // SAFETY: plain prctl; EINVAL past the kernel's last capability is expected.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(format!(
                "cannot drop capability {cap}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut data = [CapData::default(); 2];
    for &cap in KEEP {
        let word = &mut data[(cap / 32) as usize];
        let bit = 1u32 << (cap % 32);
        word.effective |= bit;
        word.permitted |= bit;
    }
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    // Seccomp first: installing a filter without no_new_privs needs CAP_SYS_ADMIN, which
    // capset takes away. (no_new_privs would break setuid programs inside the VM.)
    for bpf in [denylist()?, no_clone3()?] {
        seccompiler::apply_filter(&bpf).map_err(|e| format!("seccomp: {e}"))?;
    }
    // SAFETY: header and data are live, correctly sized for version 3 (two data words).
    let r = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_mut_ptr()) };
    if r != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes every permitted capability effective again (a change of file system id from 0 clears
/// the file capabilities from the effective set).
pub fn raise_effective() -> Result<(), String> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are live, correctly sized for version 3 (two data words).
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(format!("capget: {}", std::io::Error::last_os_error()));
    }
    for d in &mut data {
        d.effective = d.permitted;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_host() {
        assert!(!denylist().expect("denylist").is_empty());
        assert!(!no_clone3().expect("clone3").is_empty());
        assert!(!KEEP.contains(&21), "no CAP_SYS_ADMIN");
        assert!(!KEEP.contains(&27), "no CAP_MKNOD");
        assert!(!KEEP.contains(&34), "no CAP_SYSLOG");
    }
}
