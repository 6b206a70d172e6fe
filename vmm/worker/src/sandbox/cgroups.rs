//! The VM's limits: a cgroup per controller (v1) or one (v2) with memory, CPU and process
//! limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SandboxSpec;

/// The controllers a sandbox VM's limits need.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Which of [`CONTROLLERS`] this process cannot see under `/sys/fs/cgroup` (v2: not in
/// `cgroup.controllers`; v1: no hierarchy mounted). A `/sys` remounted by `ip netns exec`
/// shows none.
pub fn missing_controllers() -> Vec<&'static str> {
    missing_under(Path::new("/sys/fs/cgroup"))
}

fn missing_under(base: &Path) -> Vec<&'static str> {
    if let Ok(list) = std::fs::read_to_string(base.join("cgroup.controllers")) {
        let have: Vec<&str> = list.split_whitespace().collect();
        return CONTROLLERS
            .into_iter()
            .filter(|c| !have.contains(c))
            .collect();
    }
    CONTROLLERS
        .into_iter()
        .filter(|c| !base.join(c).join("cgroup.procs").is_file())
        .collect()
}

/// The cgroup directories a spec uses: (hierarchy root, limits to write).
fn cgroup_plan(spec: &SandboxSpec) -> Vec<(PathBuf, Vec<(&'static str, String)>)> {
    let base = Path::new("/sys/fs/cgroup");
    let mem = spec.memory_mib.max(16) * (1 << 20);
    let quota = u64::from(spec.vcpus.max(1)) * 100_000;
    if base.join("cgroup.controllers").is_file() {
        // cgroup v2, unified at the root.
        let limits = vec![
            ("memory.max", mem.to_string()),
            ("cpu.max", format!("{quota} 100000")),
            ("pids.max", spec.max_pids.to_string()),
        ];
        return vec![(base.join(&spec.cgroup), limits)];
    }
    let mut out = Vec::new();
    for (ctl, limits) in [
        ("memory", vec![("memory.limit_in_bytes", mem.to_string())]),
        (
            "cpu",
            vec![
                ("cpu.cfs_period_us", "100000".to_owned()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ],
        ),
        ("pids", vec![("pids.max", spec.max_pids.to_string())]),
    ] {
        let root = base.join(ctl);
        if root.is_dir() {
            out.push((root.join(&spec.cgroup), limits));
        }
    }
    out
}

/// Puts `pid` into a cgroup per available controller with the spec's limits. Best effort:
/// a host without a controller runs the VM without that limit, said in the log.
pub(super) fn apply(spec: &SandboxSpec, pid: libc::pid_t) -> Vec<String> {
    let plan = cgroup_plan(spec);
    if plan.is_empty() {
        tracing::warn!(
            "no cgroup controllers found under /sys/fs/cgroup: the VM runs without memory, CPU and process limits"
        );
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let mut applied = Vec::new();
    for (dir, limits) in plan {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cgroup not created: no limit");
            continue;
        }
        if v2 {
            // Controllers must be enabled in every ancestor's subtree_control.
            let mut p = PathBuf::from("/sys/fs/cgroup");
            for part in Path::new(&spec.cgroup).iter() {
                _ = std::fs::write(p.join("cgroup.subtree_control"), "+memory +cpu +pids");
                p.push(part);
            }
        }
        for (file, value) in limits {
            match std::fs::write(dir.join(file), &value) {
                Ok(()) => applied.push(file.to_owned()),
                Err(e) => tracing::warn!(file, error = %e, "cgroup limit not set"),
            }
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            tracing::warn!(dir = %dir.display(), error = %e, "VM not placed in its cgroup");
        }
    }
    applied
}

/// How many processes the kernel killed in the VM's memory cgroup for want of memory (v1
/// `memory.oom_control`, v2 `memory.events`); 0 when it cannot tell.
pub fn oom_kills(cgroup: &str) -> u64 {
    let base = Path::new("/sys/fs/cgroup");
    [
        base.join("memory").join(cgroup).join("memory.oom_control"),
        base.join(cgroup).join("memory.events"),
    ]
    .iter()
    .filter_map(|f| std::fs::read_to_string(f).ok())
    .flat_map(|text| {
        text.lines()
            .filter_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
            .collect::<Vec<_>>()
    })
    .max()
    .unwrap_or(0)
}

/// Removes a VM's cgroup directories (they must be empty: its processes gone).
pub fn remove(cgroup: &str) {
    let spec_dirs = ["", "memory", "cpu", "pids"];
    for ctl in spec_dirs {
        let dir = Path::new("/sys/fs/cgroup").join(ctl).join(cgroup);
        // Processes leave a cgroup a moment after they are reaped.
        for _ in 0..50 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_controllers_are_named_for_v1_and_v2() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            missing_under(dir.path()),
            CONTROLLERS.to_vec(),
            "nothing mounted"
        );
        for c in ["memory", "pids"] {
            std::fs::create_dir(dir.path().join(c)).expect("mkdir");
            std::fs::write(dir.path().join(c).join("cgroup.procs"), "").expect("write");
        }
        assert_eq!(missing_under(dir.path()), vec!["cpu"], "v1 without cpu");
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("write");
        assert!(missing_under(dir.path()).is_empty(), "v2 with all three");
    }
}
