//! The runtime conformance suite: every runtime the worker can drive passes the same checks,
//! through the same `Host` calls the supervisor makes — start (idempotent), its agent
//! answering on the private address, stop, start again with the disk kept, death of the VM
//! process noticed, delete freeing directory, address, tap and cgroups. Runs in a network
//! namespace of this test process's own (the bridge, veths and taps exist only there).
//!
//! The kvm runtime runs wherever `/dev/kvm` works. Where KVM only emulates guests (this
//! project's CI machines), its VMs cannot finish booting: the suite then checks what is true
//! there instead of the agent — `start` says booting with the reason, the VMM runs Debian's
//! kernel from the root disk's initramfs with a tap on the bridge, and the kernel's first
//! lines reach the VM's console log.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use boxd_tests::{agent_bin, boxd_bin, eventually, keygen};
use boxd_vmm::Virtualization;
use boxd_worker::kvm_runtime::KvmRuntime;
use boxd_worker::tap_name;
use boxd_worker::{Host, HostConfig, Runtime, SandboxRuntime, Started, VmPlan};

fn kernel_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var_os("BOXD_KERNEL_DIR").unwrap_or_else(|| "/var/cache/boxd/kernel".into()),
    );
    assert!(
        dir.join("modules").is_dir(),
        "no kernel with modules in {}: run `ops/fetch-kernel` (ops/test does)",
        dir.display()
    );
    dir
}

/// Every runtime the worker can use here: sandbox always, kvm where `/dev/kvm` works.
fn runtimes() -> Vec<Box<dyn Runtime>> {
    let mut out: Vec<Box<dyn Runtime>> = vec![Box::new(SandboxRuntime)];
    let host = boxd_vmm::host::detect();
    match host.virtualization {
        Virtualization::None => eprintln!("kvm runtime not checked: {}", host.reason),
        v => {
            let why = (v != Virtualization::Hardware).then(|| format!("virtualization is {v}"));
            let kvm = KvmRuntime::open(&kernel_dir(), Path::new("/bin/busybox"), why).unwrap();
            out.push(Box::new(kvm));
        }
    }
    out
}

fn banner(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A `Host` in `dir` on its own bridge, with a fresh agent key (whose private half's path is
/// returned).
fn test_host(dir: &Path, bridge: &str, subnet: &str) -> (Host, PathBuf) {
    let key = dir.join("agent");
    keygen(&key);
    let host = Host::open(HostConfig {
        data_dir: dir.join("data"),
        boxd: boxd_bin(),
        bridge: bridge.into(),
        subnet: subnet.parse().unwrap(),
        agent_key: std::fs::read_to_string(key.with_extension("pub"))
            .unwrap()
            .trim()
            .into(),
        agent_port: 2200,
        minimal: boxd_worker::image::MinimalSources {
            busybox: "/bin/busybox".into(),
            agent: agent_bin(),
        },
        nat: true,
    });
    (host, key)
}

/// Deletes a VM (process, disk, cgroups, tap) when dropped, so a failing check leaves nothing
/// running behind.
struct Delete<'a>(&'a Host, String);

impl Drop for Delete<'_> {
    fn drop(&mut self) {
        let _ = self.0.delete(&self.1);
    }
}

fn conform(rt: &dyn Runtime, dir: &Path) {
    let (host, key) = test_host(dir, "bxconf0", "10.201.0.0/24");
    let vm = VmPlan {
        id: uuid::Uuid::new_v4().to_string(),
        name: "conf".into(),
        image: "minimal".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        owner: "tester".into(),
    };
    let wait = Duration::from_secs(60);
    let what = rt.name();
    let _cleanup = Delete(&host, vm.id.clone());
    let vm_dir = host.vm_dir(&vm.id);

    // Start: the agent answers SSH on the VM's private address, or (kvm under emulation)
    // the VM boots as far as it can and `start` says why it cannot finish.
    let started = host.start(rt, &vm, None, wait).unwrap();
    let (net, ready) = match &started {
        Started::Ready(n) => (*n, true),
        Started::Booting(n, why) => {
            assert_eq!(rt.cannot_finish(), Some(why.as_str()), "{what}");
            (*n, false)
        }
    };
    assert_eq!(
        net.ip.to_string(),
        "10.201.0.2",
        "{what}: first free address"
    );
    let agent = SocketAddr::from((net.ip, 2200));
    if ready {
        let b = banner(agent).unwrap_or_default();
        assert!(b.starts_with("SSH-2.0-"), "{what}: agent banner {b:?}");
    }
    let first = host.probe(&vm.id).expect("running");
    assert_eq!(first.state, "running", "{what}");
    if what == "kvm" {
        kvm_checks(&host, &vm, &vm_dir, first.pid);
    }
    // Starting a running VM changes nothing.
    assert_eq!(host.start(rt, &vm, None, wait).unwrap(), started);
    assert_eq!(
        host.probe(&vm.id).unwrap().pid,
        first.pid,
        "{what}: same process"
    );

    // Limits: the memory cgroup holds the VM where the host has one.
    let v1 = Path::new("/sys/fs/cgroup/memory").join(boxd_worker::cgroup_of(&vm.id));
    if rt.name() == "sandbox" && v1.is_dir() {
        let limit = std::fs::read_to_string(v1.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(
            limit.trim(),
            (vm.memory_mib << 20).to_string(),
            "{what}: memory limit"
        );
    }

    // What the VM writes to its disk survives stop and start (sandbox: a file in its root;
    // kvm: the disk image itself, not made again).
    let pid = first.pid;
    let sandbox = what == "sandbox";
    if sandbox {
        let (code, _, err) = agent_ssh(&key, net.ip, "printf yes > /root/kept");
        assert_eq!(code, Some(0), "{what}: {err}");
    }
    // The agent answers with the VM's own host key, made with its disk, the same after a
    // restart (kvm: the key is on the disk image).
    let host_key = boxd_worker::agent_key::public(&vm_dir).expect("the VM's agent key");
    if ready {
        assert_eq!(agent_host_key(net.ip), host_key, "{what}: agent host key");
    }
    let disk_inode = |d: &Path| std::fs::metadata(d.join("disk.img")).map(|m| m.ino()).ok();
    let inode = disk_inode(&vm_dir);
    host.stop(&vm.id).unwrap();
    assert!(host.probe(&vm.id).is_none(), "{what}: stopped");
    assert!(banner(agent).is_none(), "{what}: agent gone with the VM");
    let again = host.start(rt, &vm, None, wait).unwrap();
    assert_eq!(again, started, "{what}: the address is kept");
    let second = host.probe(&vm.id).expect("running again");
    assert_ne!(second.pid, pid, "{what}: a new process");
    if sandbox && let Some(pid) = second.pid {
        let kept = std::fs::read_to_string(format!("/proc/{pid}/root/root/kept")).unwrap();
        assert_eq!(kept, "yes", "{what}: disk kept across stop/start");
        assert_eq!(
            agent_host_key(net.ip),
            host_key,
            "{what}: same key after a restart"
        );
    }
    assert_eq!(
        disk_inode(&vm_dir),
        inode,
        "{what}: disk kept across stop/start"
    );

    // A VM whose processes die is noticed (the supervisor then restarts it).
    if let Some(pid) = second.pid {
        // SAFETY: kill(2) of the VM's init, which this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        eventually(Duration::from_secs(5), "the death is noticed", || {
            host.probe(&vm.id).is_none().then_some(())
        });
        assert_eq!(host.start(rt, &vm, None, wait).unwrap(), started);
        assert!(!ready || banner(agent).is_some(), "{what}: restarted");
    }

    // Delete: process, disk, address and cgroups go.
    host.delete(&vm.id).unwrap();
    assert!(host.probe(&vm.id).is_none());
    assert!(!host.vm_dir(&vm.id).exists(), "{what}: disk deleted");
    assert!(!v1.exists(), "{what}: cgroup removed");
    assert_eq!(link_show(&tap_name(&vm.id)), "", "{what}: tap removed");
    let other = VmPlan {
        id: uuid::Uuid::new_v4().to_string(),
        ..vm.clone()
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

/// Issue 25, finding 2 (hostile tenants on one bridge, sandbox runtime): a VM's root that
/// takes another VM's address and announces it (`ip addr add`, `arping -U`) does not get that
/// VM's traffic; VMs of other accounts cannot reach each other's ports while one account's
/// VMs can; and no VM opens a connection to the worker host itself.
#[test]
fn the_bridge_keeps_tenants_apart() {
    own_netns();
    let dir = tempfile::tempdir().unwrap();
    let (host, key) = test_host(dir.path(), "bxiso0", "10.202.0.0/24");
    let vm = |name: &str, owner: &str| VmPlan {
        owner: owner.into(),
        id: uuid::Uuid::new_v4().to_string(),
        ..plan(name, "minimal")
    };
    let (a1, a2, b) = (
        vm("alice1", "alice"),
        vm("alice2", "alice"),
        vm("bob", "bob"),
    );
    let _cleanup = [&a1, &a2, &b].map(|v| Delete(&host, v.id.clone()));
    let start = |v: &VmPlan| match host.start(&SandboxRuntime, v, None, Duration::from_secs(60)) {
        Ok(Started::Ready(n)) => n.ip,
        other => panic!("{}: {other:?}", v.name),
    };
    let (ia1, ia2, ib) = (start(&a1), start(&a2), start(&b));
    let run = |ip, cmd: &str| {
        let (code, out, err) = agent_ssh(&key, ip, cmd);
        assert_eq!(code, Some(0), "{ip}: {cmd}: {err}");
        out.trim().to_owned()
    };
    let banner_of = |from, to| {
        run(
            from,
            &format!("timeout 5 nc -w 3 {to} 2200 </dev/null | head -c 7; true"),
        )
    };
    assert_eq!(
        banner_of(ia2, ia1),
        "SSH-2.0",
        "one account's VMs reach each other"
    );
    assert_eq!(banner_of(ib, ia1), "", "bob reached alice's VM");
    assert_eq!(banner_of(ia1, ib), "", "alice reached bob's VM");

    // The worker host: a port listening on the bridge address is not for VMs.
    let gateway = host.gateway();
    let listener = std::net::TcpListener::bind((gateway, 7777)).unwrap();
    listener.set_nonblocking(true).unwrap();
    run(
        ib,
        &format!("timeout 5 nc -w 3 {gateway} 7777 </dev/null; true"),
    );
    assert!(listener.accept().is_err(), "a VM connected to the host");

    // Address takeover: bob adds alice1's address and announces it for three seconds.
    assert_eq!(run(ia1, "hostname"), "alice1");
    run(
        ib,
        &format!(
            "ip addr add {ia1}/32 dev eth0 && timeout 10 arping -U -c 3 -s {ia1} -I eth0 {gateway}; true"
        ),
    );
    for _ in 0..3 {
        assert_eq!(
            run(ia1, "hostname"),
            "alice1",
            "alice1's address led into bob's VM"
        );
    }
}

/// Issue 25, finding 3: root inside a sandbox VM is not the host's root — no capability to
/// mount, make device nodes or read the kernel log, a seccomp filter, the kernel's knobs under
/// `/proc/sys` read-only, no host devices, a cgroup namespace of its own — and the VM still
/// works as one (a shell, its network).
#[test]
fn a_sandbox_vm_root_is_confined() {
    own_netns();
    let dir = tempfile::tempdir().unwrap();
    let (host, key) = test_host(dir.path(), "bxconfine0", "10.203.0.0/24");
    let vm = VmPlan {
        id: uuid::Uuid::new_v4().to_string(),
        ..plan("confined", "minimal")
    };
    let _cleanup = Delete(&host, vm.id.clone());
    let ip = match host.start(&SandboxRuntime, &vm, None, Duration::from_secs(60)) {
        Ok(Started::Ready(n)) => n.ip,
        other => panic!("{other:?}"),
    };
    let sh = |cmd: &str| {
        let (code, out, err) = agent_ssh(&key, ip, cmd);
        assert_eq!(code, Some(0), "{cmd}: {err}");
        out.trim().to_owned()
    };
    let field = |name: &str| sh(&format!("grep '^{name}:' /proc/self/status | cut -f2"));
    let cap_eff = u64::from_str_radix(&field("CapEff"), 16).unwrap();
    for (bit, cap) in [
        (21, "CAP_SYS_ADMIN"),
        (27, "CAP_MKNOD"),
        (34, "CAP_SYSLOG"),
        (16, "CAP_SYS_MODULE"),
    ] {
        assert_eq!(cap_eff & (1 << bit), 0, "{cap} in CapEff {cap_eff:x}");
    }
    assert_eq!(field("Seccomp"), "2", "a seccomp filter");
    let refused = |cmd: &str| sh(&format!("{cmd} >/dev/null 2>&1; echo $?")) != "0";
    assert!(
        refused("mkdir -p /mnt/d && mount -t devtmpfs none /mnt/d"),
        "devtmpfs mounted"
    );
    assert!(
        refused(
            "cat /proc/sys/kernel/core_pattern > /tmp/cp && cat /tmp/cp > /proc/sys/kernel/core_pattern"
        ),
        "core_pattern written"
    );
    assert!(refused("dmesg"), "the host's kernel log read");
    assert!(refused("mknod /tmp/sda b 8 0"), "a block device made");
    assert!(refused("unshare -m true"), "a new namespace made");
    assert_eq!(
        sh("ls /dev | tr '\\n' ' '"),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    assert_eq!(sh("cut -d: -f3 /proc/self/cgroup | sort -u"), "/");
    // The host's paths are not the VM's to see (issue 26): PID 1 is `init`, and the mount
    // table names no host directory.
    assert_eq!(
        sh("tr '\\0' ' ' < /proc/1/cmdline; cat /proc/1/comm"),
        "init init"
    );
    let mounts = sh("cat /proc/mounts");
    let data = dir.path().to_string_lossy();
    assert!(!mounts.contains(&*data), "{mounts}");
    // Its root is root only inside: a user namespace maps it to an unprivileged block of host
    // ids, and every process of the VM runs as such an id on the host.
    let map: Vec<u64> = sh("cat /proc/self/uid_map")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(map.len(), 3, "one uid range: {map:?}");
    assert_eq!((map[0], map[2]), (0, 65536), "uid_map {map:?}");
    let base = map[1];
    assert!(base >= 0x7000_0000, "VM root is host uid {base}");
    assert_eq!(
        sh("cat /proc/self/gid_map").split_whitespace().nth(1),
        Some(&*base.to_string())
    );
    let procs = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/{}/cgroup.procs",
        boxd_worker::cgroup_of(&vm.id)
    ))
    .or_else(|_| {
        std::fs::read_to_string(format!(
            "/sys/fs/cgroup/{}/cgroup.procs",
            boxd_worker::cgroup_of(&vm.id)
        ))
    })
    .unwrap();
    let pids: Vec<&str> = procs.split_whitespace().collect();
    assert!(pids.len() >= 2, "init and the agent at least: {pids:?}");
    for pid in pids {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uids.split_whitespace()
                .skip(1)
                .all(|u| u == base.to_string()),
            "process {pid} of the VM runs as host {uids}"
        );
    }
    // Files keep the VM's own ids on disk: what its root writes is root's inside and 0 in
    // the VM's layer; the image's files are its root's too.
    assert_eq!(
        sh("touch /root/mine && stat -c %u:%g /root/mine /bin/busybox"),
        "0:0\n0:0"
    );
    assert_eq!(
        sh("chown 1000:1000 /root/mine && stat -c %u /root/mine"),
        "1000"
    );
    // Nothing of the host's is its: a host-owned device is nobody's inside.
    assert_eq!(sh("stat -c %u /dev/null"), "65534");
    // Still a machine to use: its own network (port 80 included), processes, files.
    assert!(sh("ip -4 addr show eth0").contains(&ip.to_string()));
    sh("mkdir -p /www && httpd -p 80 -h /www");
    assert!(sh("netstat -ltn").contains(":80 "), "httpd on port 80");
    assert_eq!(sh("echo hi > /tmp/f && cat /tmp/f && sh -c 'exit 0'"), "hi");
    // Its disk is its size (issue 26): `df` shows the VM's 1 GiB, not the host's disk; writing
    // past it fails inside the VM, the host keeps no more than that, and once the VM frees
    // space it writes again.
    let df: Vec<u64> = sh("df -k / | tail -1")
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert!(
        (900_000..=1_048_576).contains(&df[0]),
        "df says the VM's disk has {df:?} KiB"
    );
    let (code, out, err) = agent_ssh(
        &key,
        ip,
        "dd if=/dev/zero of=/fill bs=1M count=1200; echo written $(du -m /fill | cut -f1)",
    );
    assert!(
        err.contains("No space left on device"),
        "{code:?} {out} {err}"
    );
    let written: u64 = out
        .trim()
        .strip_prefix("written ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(written < 1024, "the VM wrote {written} MiB on a 1 GiB disk");
    let layer = host.vm_dir(&vm.id).join(boxd_worker::LAYER_IMAGE);
    let taken = std::fs::metadata(&layer).unwrap().blocks() * 512;
    assert!(
        taken < 1100 << 20,
        "the disk takes {taken} bytes on the host"
    );
    assert_eq!(sh("rm /fill && echo more > /more && cat /more"), "more");
    // Files keep the VM's own ids on disk (read once the VM is stopped and its disk clean).
    host.stop(&vm.id).unwrap();
    let stat = Command::new("debugfs")
        .args(["-R", "stat /upper/root/mine"])
        .arg(&layer)
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    assert!(
        stat.contains("User:  1000   Group:  1000"),
        "on disk: {stat}"
    );
}

/// What a kvm VM is made of: a `boxd vmm` process with Debian's kernel, the initramfs, an ext4
/// root disk grown to the VM's size and a tap on the bridge; and the kernel's first lines in
/// its console log.
fn kvm_checks(host: &Host, vm: &VmPlan, dir: &Path, pid: Option<i32>) {
    let pid = pid.expect("the VMM's pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(argv.get(1).map(String::as_str), Some("vmm"), "{argv:?}");
    let cfg: boxd_vmm::VmConfig =
        serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap();
    assert!(
        cfg.boot.kernel.starts_with(kernel_dir()),
        "{:?}",
        cfg.boot.kernel
    );
    assert!(
        cfg.boot.cmdline.contains("boxd.ip=10.201.0.2/24"),
        "{}",
        cfg.boot.cmdline
    );
    let disk = &cfg.disks[0].path;
    assert_eq!(std::fs::metadata(disk).unwrap().len(), vm.disk_gib << 30);
    let probe = Command::new("dumpe2fs")
        .arg("-h")
        .arg(disk)
        .output()
        .unwrap();
    let fs = String::from_utf8_lossy(&probe.stdout);
    assert!(fs.contains("boxd-root"), "root disk label: {fs}");
    // The image's tree is on the disk, agent included.
    let ls = Command::new("debugfs")
        .args(["-R", "ls -l /usr/local/bin"])
        .arg(disk)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("boxd-agent"));
    // So is the VM's own agent host key, readable by root only, the key the worker kept.
    let cat = |cmd: &str| {
        let out = Command::new("debugfs")
            .args(["-R", cmd])
            .arg(disk)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let on_disk = cat("cat /etc/boxd/agent_host_key");
    assert_eq!(
        on_disk,
        std::fs::read_to_string(dir.join(boxd_worker::agent_key::FILE)).unwrap()
    );
    let stat = cat("stat /etc/boxd/agent_host_key");
    assert!(
        stat.contains("Mode:  0600") && stat.contains("User:     0"),
        "{stat}"
    );
    let tap = tap_name(&vm.id);
    assert_eq!(cfg.net[0].tap, tap);
    let link = link_show(&tap);
    assert!(
        link.contains(&format!(" master {} ", host.cfg.bridge)),
        "{link}"
    );
    let console = dir.join("console.log");
    let t0 = std::time::Instant::now();
    eventually(
        Duration::from_secs(180),
        "the kernel's first console lines",
        || {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            text.contains("Linux version ").then_some(())
        },
    );
    eprintln!(
        "kvm: the kernel printed its first lines after {:?}",
        t0.elapsed()
    );
}

/// `ip -o link show dev NAME` (empty when there is no such interface in this namespace).
fn link_show(name: &str) -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Enters a network namespace of this test's own (its bridge and taps exist only there).
fn own_netns() {
    // SAFETY: unshare of the calling thread's network namespace.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare(CLONE_NEWNET): this test needs root");
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(st.success());
}

/// `ssh -p 2200 root@ip cmd` straight to a guest agent with the cluster key: (status, stdout,
/// stderr).
/// The host key the agent at `ip` presents (OpenSSH form, as ssh-keyscan prints it).
fn agent_host_key(ip: std::net::Ipv4Addr) -> String {
    let out = Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", "2200"])
        .arg(ip.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| !l.starts_with('#'))
        .unwrap_or_default();
    // "[ip]:2200 ssh-ed25519 AAAA…"
    line.split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ")
}

fn agent_ssh(key: &Path, ip: std::net::Ipv4Addr, cmd: &str) -> (Option<i32>, String, String) {
    let out = Command::new("ssh")
        .args(boxd_tests::SSH_OPTS)
        .args(["-o", "BatchMode=yes", "-p", "2200", "-i"])
        .arg(key)
        .arg(format!("root@{ip}"))
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills a child process when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `vm` the way the kvm runtime would — its root disk, initramfs, kernel command line
/// and tap — but under QEMU with software emulation (TCG), standing in for hardware KVM,
/// which these machines lack. Returns QEMU and the guest's address once its agent answers.
fn boot_under_qemu(host: &Host, vm: &VmPlan, console: &Path) -> (Kill, std::net::Ipv4Addr) {
    let kvm = KvmRuntime::open(&kernel_dir(), Path::new("/bin/busybox"), None).unwrap();
    host.ensure_bridge().unwrap();
    let net = host.address(&vm.id, None).unwrap();
    let disk = host.ensure_disk(vm, false).unwrap();
    let cfg = kvm.prepare(host, vm, &disk, net).unwrap();
    // The bzImage: QEMU boots it directly (it would take an ELF vmlinux only with PVH).
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
        ])
        .arg(vm.memory_mib.to_string())
        .args(["-display", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel_dir().join("vmlinuz"))
        .arg("-initrd")
        .arg(cfg.boot.initrd.as_ref().unwrap())
        .arg("-append")
        .arg(&cfg.boot.cmdline)
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw",
            cfg.disks[0].path.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0", "-netdev"])
        .arg(format!(
            "tap,id=n0,ifname={},script=no,downscript=no",
            cfg.net[0].tap
        ))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64: apt-get install qemu-system-x86 (ops/test does)");
    let mut qemu = Kill(qemu);
    let t0 = std::time::Instant::now();
    eventually(Duration::from_secs(300), "the guest agent's banner", || {
        if let Ok(Some(st)) = qemu.0.try_wait() {
            panic!(
                "QEMU ended ({st}); console:\n{}",
                std::fs::read_to_string(console).unwrap_or_default()
            );
        }
        banner(SocketAddr::from((net.ip, 2200))).filter(|b| b.starts_with("SSH-2.0-"))
    });
    eprintln!(
        "qemu (TCG), image {}: the agent answered after {:?}",
        vm.image,
        t0.elapsed()
    );
    (qemu, net.ip)
}

fn plan(name: &str, image: &str) -> VmPlan {
    VmPlan {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.into(),
        image: image.into(),
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 1,
        owner: "tester".into(),
    }
}

/// The kvm runtime's guest (`minimal`) under QEMU: the initramfs loads the virtio modules and
/// mounts the disk, busybox init runs `boxd-net` and the agent, and the real OpenSSH client
/// runs a command through the agent with the cluster key.
#[test]
fn the_kvm_guest_reaches_its_agent_under_qemu() {
    own_netns();
    let dir = tempfile::tempdir().unwrap();
    let (host, key) = test_host(dir.path(), "bxqemu0", "10.202.0.0/24");
    let vm = plan("viaqemu", "minimal");
    let _cleanup = Delete(&host, vm.id.clone());
    let console = dir.path().join("console.log");
    let (mut qemu, ip) = boot_under_qemu(&host, &vm, &console);
    let (code, out, err) = agent_ssh(
        &key,
        ip,
        "hostname; ip addr show dev eth0 | grep -c 'inet 10.202.0.2/24'; exit 3",
    );
    assert_eq!(
        (code, out.as_str()),
        (Some(3), "viaqemu\n1\n"),
        "{err}\nconsole:\n{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let _ = qemu.0.kill();
    host.delete(&vm.id).unwrap();
    assert_eq!(link_show(&kvm_runtime_tap(&vm)), "", "tap removed");
}

fn kvm_runtime_tap(vm: &VmPlan) -> String {
    tap_name(&vm.id)
}

/// `boxd image build debian` (debootstrap, with progress), then the image on both runtimes:
/// a sandbox VM and a kvm guest under QEMU (systemd starting `boxd-net` and the agent) both
/// answer an OpenSSH session as Debian.
#[test]
fn the_debian_image_builds_and_runs_on_both_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let (host, key) = test_host(dir.path(), "bxdeb0", "10.203.0.0/24");
    // Built before entering the test's own network namespace: debootstrap needs the mirror.
    let t0 = std::time::Instant::now();
    let out = Command::new(boxd_bin())
        .arg("--data-dir")
        .arg(&host.cfg.data_dir)
        .args(["image", "build", "debian"])
        .output()
        .unwrap();
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{progress}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let steps = progress
        .lines()
        .filter(|l| l.starts_with("debian: "))
        .count();
    assert!(
        steps > 50 && progress.contains("debian: Retrieving "),
        "progress shown: {progress}"
    );
    eprintln!(
        "image build debian: {:?}, {steps} progress lines; {}",
        t0.elapsed(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let ls = Command::new(boxd_bin())
        .arg("--data-dir")
        .arg(&host.cfg.data_dir)
        .args(["image", "ls"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("debian"));
    let check = ". /etc/os-release; echo $ID $VERSION_ID $(hostname); exit 3";
    own_netns();

    let vm = plan("deb-sandbox", "debian");
    let _cleanup = Delete(&host, vm.id.clone());
    let Started::Ready(net) = host
        .start(&SandboxRuntime, &vm, None, Duration::from_secs(60))
        .unwrap()
    else {
        panic!("a sandbox VM is ready or fails")
    };
    let (code, out, err) = agent_ssh(&key, net.ip, check);
    assert_eq!(
        (code, out.as_str()),
        (Some(3), "debian 12 deb-sandbox\n"),
        "{err}"
    );
    host.delete(&vm.id).unwrap();

    let vm = plan("deb-kvm", "debian");
    let _cleanup = Delete(&host, vm.id.clone());
    let console = dir.path().join("console.log");
    let (mut qemu, ip) = boot_under_qemu(&host, &vm, &console);
    let (code, out, err) = agent_ssh(
        &key,
        ip,
        &format!("systemctl is-active boxd-agent boxd-net | tr '\\n' ' '; {check}"),
    );
    assert_eq!(
        (code, out.as_str()),
        (Some(3), "active active debian 12 deb-kvm\n"),
        "{err}\nconsole:\n{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let _ = qemu.0.kill();
    host.delete(&vm.id).unwrap();
}
