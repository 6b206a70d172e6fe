//! The runtime conformance suite: every runtime the worker can drive passes the same checks,
//! through the same `Host` calls the supervisor makes — start (idempotent), its agent
//! answering on the private address, stop, start again with the disk kept, death of the VM
//! process noticed, delete freeing directory, address and cgroups. Runs in a network
//! namespace of this test process's own (the bridge and veths exist only there).

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use boxd_tests::{agent_bin, boxd_bin, eventually, keygen};
use boxd_vmm::worker::{Host, HostConfig, Runtime, SandboxRuntime, VmPlan};

/// Every runtime the worker can use here (kvm joins once the worker drives `boxd vmm`).
fn runtimes() -> Vec<Box<dyn Runtime>> {
    vec![Box::new(SandboxRuntime)]
}

fn banner(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn conform(rt: &dyn Runtime, dir: &Path) {
    let key = dir.join("agent");
    keygen(&key);
    let host = Host::open(HostConfig {
        data_dir: dir.join("data"),
        boxd: boxd_bin(),
        bridge: "bxconf0".into(),
        subnet: "10.201.0.0/24".parse().unwrap(),
        agent_key: std::fs::read_to_string(key.with_extension("pub"))
            .unwrap()
            .trim()
            .into(),
        agent_port: 2200,
        minimal: boxd_vmm::image::MinimalSources {
            busybox: "/bin/busybox".into(),
            agent: agent_bin(),
        },
        nat: true,
    });
    let vm = VmPlan {
        id: uuid::Uuid::new_v4().to_string(),
        name: "conf".into(),
        image: "minimal".into(),
        vcpus: 1,
        memory_mib: 128,
    };
    let wait = Duration::from_secs(30);
    let what = rt.name();

    // Start: the agent answers SSH on the VM's private address.
    let net = host.start(rt, &vm, None, wait).unwrap();
    assert_eq!(
        net.ip.to_string(),
        "10.201.0.2",
        "{what}: first free address"
    );
    let agent = SocketAddr::from((net.ip, 2200));
    let b = banner(agent).unwrap_or_default();
    assert!(b.starts_with("SSH-2.0-"), "{what}: agent banner {b:?}");
    let first = host.probe(&vm.id).expect("running");
    assert_eq!(first.state, "running", "{what}");
    // Starting a running VM changes nothing.
    assert_eq!(host.start(rt, &vm, None, wait).unwrap(), net);
    assert_eq!(
        host.probe(&vm.id).unwrap().pid,
        first.pid,
        "{what}: same process"
    );

    // Limits: the memory cgroup holds the VM where the host has one.
    let v1 = Path::new("/sys/fs/cgroup/memory").join(boxd_vmm::worker::cgroup_of(&vm.id));
    if rt.name() == "sandbox" && v1.is_dir() {
        let limit = std::fs::read_to_string(v1.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(
            limit.trim(),
            (128u64 << 20).to_string(),
            "{what}: memory limit"
        );
    }

    // What the VM writes to its disk survives stop and start.
    let pid = first.pid;
    if let Some(pid) = pid {
        std::fs::write(format!("/proc/{pid}/root/root/kept"), "yes").unwrap();
    }
    host.stop(&vm.id).unwrap();
    assert!(host.probe(&vm.id).is_none(), "{what}: stopped");
    assert!(banner(agent).is_none(), "{what}: agent gone with the VM");
    let again = host.start(rt, &vm, None, wait).unwrap();
    assert_eq!(again, net, "{what}: the address is kept");
    let second = host.probe(&vm.id).expect("running again");
    assert_ne!(second.pid, pid, "{what}: a new process");
    if let Some(pid) = second.pid {
        let kept = std::fs::read_to_string(format!("/proc/{pid}/root/root/kept")).unwrap();
        assert_eq!(kept, "yes", "{what}: disk kept across stop/start");
    }

    // A VM whose processes die is noticed (the supervisor then restarts it).
    if let Some(pid) = second.pid {
        // SAFETY: kill(2) of the VM's init, which this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        eventually(Duration::from_secs(5), "the death is noticed", || {
            host.probe(&vm.id).is_none().then_some(())
        });
        host.start(rt, &vm, None, wait).unwrap();
        assert!(banner(agent).is_some(), "{what}: restarted");
    }

    // Delete: process, disk, address and cgroups go.
    host.delete(&vm.id).unwrap();
    assert!(host.probe(&vm.id).is_none());
    assert!(!host.vm_dir(&vm.id).exists(), "{what}: disk deleted");
    assert!(!v1.exists(), "{what}: cgroup removed");
    let other = VmPlan {
        id: uuid::Uuid::new_v4().to_string(),
        ..vm
    };
    assert_eq!(
        host.address(&other.id, None).unwrap().ip,
        net.ip,
        "{what}: address freed"
    );
}

#[test]
fn every_runtime_conforms() {
    // A network namespace for this thread and the processes it starts (ended with them).
    // SAFETY: unshare of the calling thread's network namespace.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare(CLONE_NEWNET): this test needs root");
    assert!(
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    for rt in runtimes() {
        let dir = tempfile::tempdir().unwrap();
        conform(rt.as_ref(), dir.path());
    }
}
