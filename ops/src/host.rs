//! What this host can offer to VMs, detected at start unless the config fixes it.

use std::path::Path;

use boxd_controlplane::model::Capacity;

use crate::config::WorkerConfig;

/// The capacity to advertise: configured values, or detected ones for fields left at 0.
pub fn capacity(cfg: &WorkerConfig, data_dir: &Path) -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Capacity {
        vcpus: if cfg.vcpus > 0 {
            cfg.vcpus
        } else {
            u32::try_from(cpus * 4).unwrap_or(u32::MAX)
        },
        memory_mib: if cfg.memory_mib > 0 {
            cfg.memory_mib
        } else {
            memory_mib().saturating_sub(1024)
        },
        disk_gib: disk_gib(cfg, data_dir).saturating_mul(u64::from(cfg.disk_overcommit_percent))
            / 100,
    }
}

/// The disk for VMs before overcommit: configured, or the data directory's free space plus
/// what VM disks already take there (they count at their sizes in the offer).
pub fn disk_gib(cfg: &WorkerConfig, data_dir: &Path) -> u64 {
    if cfg.disk_gib > 0 {
        return cfg.disk_gib;
    }
    free_disk_bytes(data_dir).saturating_add(boxd_worker::written_bytes(data_dir)) >> 30
}

fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// Bytes free for boxd (not root-reserved) on the filesystem of `dir`.
pub fn free_disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    st.f_bavail.saturating_mul(st.f_frsize)
}

/// The host name, for the default node name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "boxd".into())
}

/// The CPUs to run one shard each on: the configured list, or every CPU when it is empty.
pub fn shard_cpus(configured: &[usize]) -> Vec<usize> {
    if configured.is_empty() {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    } else {
        configured.to_vec()
    }
}
