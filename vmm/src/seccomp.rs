//! The VMM's seccomp filter, installed on every thread once setup is done: from then on the
//! process can only run vCPUs, move bytes on descriptors it already has, accept API
//! connections and exit. Anything else traps; the SIGSYS handler writes one line naming the
//! syscall to stderr and ends the process with status 31.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status after a blocked syscall.
pub const BLOCKED_EXIT: i32 = 31;

/// Syscalls the VMM makes after setup, by what makes them.
const ALLOWED: &[libc::c_long] = &[
    // vCPUs, irqfds, the serial log, disk images, the API.
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_accept4,
    // vsock: guest connections to host ports connect Unix sockets (`socket` is allowed for
    // AF_UNIX only, below).
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_poll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_ppoll,
    // Threads waiting on each other; kicks; timers.
    libc::SYS_futex,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    // The allocator.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    // Ending.
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Compiles the filter.
pub fn filter() -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|s| (*s, Vec::new())).collect();
    let unix_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )?;
    rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![unix_only])?]);
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's siginfo for SIGSYS holds the syscall number after the faulting address:
    // si_signo, si_errno, si_code, padding (16 bytes), _call_addr (8), _syscall (4).
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t, which is 128 bytes long; offset 24
        // lies within it and is 4-byte aligned.
        unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) }
    };
    const HEAD: &[u8] = b"boxd vmm: seccomp blocked syscall ";
    const TAIL: &[u8] = b"; stopping the VM (this is a bug in boxd: report it)\n";
    let mut msg = [0u8; 128];
    msg[..HEAD.len()].copy_from_slice(HEAD);
    let mut len = HEAD.len();
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 || d == digits.len() {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        msg[len] = digits[d];
        len += 1;
    }
    msg[len..len + TAIL.len()].copy_from_slice(TAIL);
    len += TAIL.len();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid for its length.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(BLOCKED_EXIT);
    }
}

/// Installs the SIGSYS reporter and the filter on every thread of the process.
pub fn install() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let bpf = filter().map_err(|e| std::io::Error::other(e.to_string()))?;
    seccompiler::apply_filter_all_threads(&bpf).map_err(|e| std::io::Error::other(e.to_string()))
}
