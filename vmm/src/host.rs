//! What kind of virtualization this host offers, so that `boxd` can choose a runtime.
//!
//! `hardware`: `/dev/kvm` backed by VT-x/AMD-V, guests run at native speed. `emulated`:
//! `/dev/kvm` exists but is backed by PVM (`kvm_pvm`, KVM on a host without nested
//! virtualization), where an ordinary guest runs through KVM's instruction emulator at about a
//! million instructions per second — fine for tiny test guests, useless for a real OS.
//! `none`: no usable `/dev/kvm`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The host's virtualization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Virtualization {
    /// Hardware-assisted KVM.
    Hardware,
    /// KVM that emulates ordinary guests instruction by instruction (PVM).
    Emulated,
    /// No usable KVM.
    None,
}

impl std::fmt::Display for Virtualization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hardware => "hardware",
            Self::Emulated => "emulated",
            Self::None => "none",
        })
    }
}

/// What was found, and why it was judged so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// The verdict.
    pub virtualization: Virtualization,
    /// One line saying why.
    pub reason: String,
}

/// Looks at this host.
pub fn detect() -> HostReport {
    detect_in(Path::new("/"))
}

/// Looks at a host whose `/dev`, `/sys` and `/proc` are under `root` (for tests).
pub fn detect_in(root: &Path) -> HostReport {
    let report = |virtualization, reason: &str| HostReport {
        virtualization,
        reason: reason.to_owned(),
    };
    let kvm = root.join("dev/kvm");
    if !kvm.exists() {
        return report(Virtualization::None, "/dev/kvm does not exist");
    }
    if root == Path::new("/") && kvm_ioctls::Kvm::new().is_err() {
        return report(
            Virtualization::None,
            "/dev/kvm exists but cannot be opened (permissions, or KVM unusable)",
        );
    }
    if root.join("sys/module/kvm_pvm").exists() {
        return report(
            Virtualization::Emulated,
            "KVM is provided by kvm_pvm: ordinary guests run in KVM's instruction emulator",
        );
    }
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if has("vmx") || has("svm") {
        return report(
            Virtualization::Hardware,
            "KVM with hardware virtualization (vmx/svm)",
        );
    }
    if root.join("sys/module/kvm_intel").exists() || root.join("sys/module/kvm_amd").exists() {
        return report(
            Virtualization::Hardware,
            "KVM with kvm_intel/kvm_amd loaded (CPU flags hidden)",
        );
    }
    report(
        Virtualization::Emulated,
        "/dev/kvm exists but the CPU shows neither vmx nor svm and no hardware KVM module is loaded",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(files: &[(&str, &str)]) -> Virtualization {
        let d = tempfile::tempdir().expect("tempdir");
        for (p, c) in files {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
            std::fs::write(f, c).expect("write");
        }
        detect_in(d.path()).virtualization
    }

    #[test]
    fn verdicts() {
        assert_eq!(host(&[]), Virtualization::None);
        let kvm = ("dev/kvm", "");
        assert_eq!(
            host(&[kvm, ("sys/module/kvm_pvm/x", "")]),
            Virtualization::Emulated
        );
        assert_eq!(
            host(&[kvm, ("proc/cpuinfo", "flags\t: fpu vmx sse\n")]),
            Virtualization::Hardware
        );
        assert_eq!(
            host(&[kvm, ("proc/cpuinfo", "flags\t: fpu sse\n")]),
            Virtualization::Emulated
        );
        assert_eq!(
            host(&[kvm, ("sys/module/kvm_amd/x", "")]),
            Virtualization::Hardware
        );
    }
}
