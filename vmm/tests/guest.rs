//! Boots the freestanding test guest on this host's /dev/kvm (hardware or emulated) and reads
//! what it prints on the serial console.

use std::path::PathBuf;

use boxd_vmm::config::{BootConfig, VmConfig};
use boxd_vmm::{Ending, Machine, Virtualization};

fn kvm_or_skip() -> bool {
    let host = boxd_vmm::host::detect();
    if host.virtualization == Virtualization::None {
        eprintln!("skipped: no usable KVM here ({})", host.reason);
        return false;
    }
    true
}

fn guest(vcpus: u8, log: Option<PathBuf>) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 64,
        boot: BootConfig {
            kernel: boxd_vmm::TEST_GUEST.into(),
            cmdline: String::new(),
            initrd: None,
        },
        serial_log: log,
        disks: Vec::new(),
        net: Vec::new(),
        vsock: None,
    }
}

#[test]
fn test_guest_prints_counts_cpus_and_resets() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serial.log");
    let vm = Machine::build(&guest(2, Some(log.clone())))
        .expect("build")
        .start()
        .expect("start");
    let ending = vm.wait();
    let out = std::fs::read_to_string(&log).expect("serial log");
    assert_eq!(ending, Ending::Reset, "console:\n{out}");
    assert!(out.contains("boxd-guest: hello\r\n"), "console:\n{out}");
    assert!(out.contains("boxd-guest: cpus 2\r\n"), "console:\n{out}");
    assert!(out.contains("boxd-guest: done\r\n"), "console:\n{out}");
    let tail = vm.control().console.lock().expect("console").clone();
    assert_eq!(String::from_utf8_lossy(&tail), out);
}
