//! The user journey on `boxd up` with its real worker (sandbox runtime), inside a network
//! namespace this test creates (boxd's bridge, veths and VM addresses exist only there), with
//! the real OpenSSH client, dig and curl: `new`, DNS, a session's output and exit status, a web
//! server in the VM behind HTTPS, a file kept across stop/start, `rm` freeing name, address
//! and disk; then kill -9 of boxd while three VMs run: they stay up and the restarted
//! supervisor reconnects to them; a VM whose processes are killed is started again. On the
//! way, the first day's checks (issue 26) and the private-files ones (issue 25): names through
//! `ssh-config`, a size no worker holds refused, file modes and umask on the host and inside,
//! scp and sftp of 50 MB both ways, a cluster member's Raft port closed to VMs, and the events
//! of stop, start and a crash.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use boxd_tests::{Netns, Node, eventually, keygen, ready_field as field};
use serde_json::Value;

#[path = "support/journey.rs"]
mod support;

use support::{ChildGuard, Client, LOBBY, VmReaper, api, vm_pids};

#[test]
fn the_journey_on_the_sandbox_runtime() {
    journey("sandbox");
}

fn kernel_dir() -> String {
    std::env::var("BOXD_KERNEL_DIR").unwrap_or_else(|_| "/var/cache/boxd/kernel".into())
}

/// `boxd.toml` in `dir` for node `name` on `runtime`: the embedded defaults (lobby 127.77.0.1,
/// SSH 2222, HTTPS 8443, DNS 127.0.0.1:5353, used inside the test's namespace); only the
/// runtime (and the kvm runtime's kernel) is pinned so a test means the same on every host.
fn config(dir: &Path, name: &str, runtime: &str) -> PathBuf {
    let cfg = dir.join("boxd.toml");
    std::fs::write(
        &cfg,
        format!(
            // A fixed disk capacity: detected, it is the data dir's free space, and this host's
            // build trees can leave less than the journey's three 4 GiB (sparse) disks.
            "[node]\nname = \"{name}\"\n\n[worker]\nruntime = \"{runtime}\"\nkernel_dir = \"{}\"\n\
             disk_gib = 64\n",
            kernel_dir()
        ),
    )
    .unwrap();
    cfg
}

/// The whole journey with `worker.runtime = runtime`.
fn journey(runtime: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("journey");
    let data = dir.path().join("data");
    let _reaper = VmReaper(data.clone());
    let cfg = config(dir.path(), "journey", runtime);
    let mut node = Node::start_in(Some(&ns), &["up"], &data, &cfg);
    let ready = node.wait_ready(Duration::from_secs(60));
    assert!(field(&ready, "serving").contains("worker"), "{ready}");
    let ca = field(&ready, "ca").to_owned();

    let key = dir.path().join("id_ed25519");
    keygen(&key);
    let c = Client { ns: &ns, key };

    // new → the VM runs and its address answers DNS.
    let ip = c.new_vm("myapp");
    assert_eq!(ip, "127.77.0.2");
    let dig = ns
        .command("dig")
        .args(["+short", "-p", "5353", "@127.0.0.1", "myapp.boxd.test", "A"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), ip);

    // Names without DNS changes (issue 26): the ready line gives the lobby, and the lobby an
    // OpenSSH config with every VM's name, which plain `ssh NAME.zone` then uses.
    assert_eq!(field(&ready, "lobby"), "127.77.0.1:2222", "{ready}");
    let config = dir.path().join("ssh_config");
    std::fs::write(&config, c.ok(LOBBY, &["ssh-config"])).unwrap();
    let named = ns
        .command("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-i",
        ])
        .arg(&c.key)
        .args(["myapp.boxd.test", "hostname"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&named.stdout),
        "myapp\n",
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );

    // A size no worker here could hold is refused at once, with the numbers (issue 26).
    let (code, _, err) = c.ssh(LOBBY, &["new", "--name=huge", "--cpus=64"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no worker offers 64 vCPUs; the largest offers"),
        "{err}"
    );

    // A disk is its size, and thin (issue 26): the VM sees its 4 GiB, not the host's disk
    // (the runtime suite fills one); `admin status` shows the sizes against the offer (64 GiB,
    // 200 % overcommit) and what the disks take on the host.
    let df: Vec<u64> = c
        .ok(&ip, &["df -k / | tail -1"])
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert!((3_900_000..=4 << 20).contains(&df[0]), "df: {df:?}");
    let disk = &node.admin().ok(&serde_json::json!({"op": "status"}))["worker"]["disk"];
    assert_eq!(
        (
            &disk["allocated_gib"],
            &disk["disk_gib"],
            &disk["overcommit_percent"]
        ),
        (&4.into(), &64.into(), &200.into()),
        "{disk}"
    );
    let written = disk["written_bytes"].as_u64().unwrap();
    assert!((1..64 << 20).contains(&written), "{disk}");

    // A session: output and exit status.
    let (code, out, err) = c.ssh(&ip, &["echo hi; exit 3"]);
    assert_eq!((code, out.as_str()), (3, "hi\n"), "{err}");

    // boxd keeps what it writes to itself (umask 077: the VM's files on the host are root's
    // alone), yet the VM is an ordinary machine: its tree is its users' to read and run, and a
    // session's umask is 022.
    let vm_dir = std::fs::read_dir(data.join("vms"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    for file in ["sandbox.json", "console.log", "net.json", "agent_host_key"] {
        let mode = std::fs::metadata(vm_dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is {mode:o}");
    }
    let modes = c.ok(
        &ip,
        &["umask; stat -c '%a %n' / /bin /usr/local/bin /usr/local/bin/boxd-agent /etc/passwd /tmp"],
    );
    assert_eq!(
        modes,
        "0022\n755 /\n755 /bin\n755 /usr/local/bin\n755 /usr/local/bin/boxd-agent\n\
         644 /etc/passwd\n1777 /tmp\n"
    );
    let as_nobody = c.ok(
        &ip,
        &["su -s /bin/sh nobody -c 'id -u; ls /usr/local/bin; hostname; touch /tmp/n; stat -c %a /tmp/n'"],
    );
    assert_eq!(as_nobody, "65534\nboxd-agent\nmyapp\n644\n");

    // Files both ways with scp and sftp, 50 MB with checksums: `minimal` has no sftp-server,
    // so the agent serves the protocol itself.
    let big = dir.path().join("big");
    let made = Command::new("head")
        .args(["-c", "50000000", "/dev/urandom"])
        .output()
        .unwrap();
    std::fs::write(&big, &made.stdout).unwrap();
    let sum = |p: &Path| {
        let out = Command::new("sha256sum").arg(p).output().unwrap();
        String::from_utf8_lossy(&out.stdout)[..64].to_owned()
    };
    let want = sum(&big);
    let in_vm = |file: &str| c.ok(&ip, &[&format!("sha256sum {file}")])[..64].to_owned();
    let (big_s, back) = (big.to_str().unwrap(), dir.path().join("back"));
    c.copy("scp", &[big_s, &format!("{ip}:/root/big")]);
    assert_eq!(in_vm("/root/big"), want, "scp up");
    c.copy("scp", &[&format!("{ip}:/root/big"), back.to_str().unwrap()]);
    assert_eq!(sum(&back), want, "scp down");
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {big_s} /root/big2\nget /root/big2 {}\n",
            back.display()
        ),
    )
    .unwrap();
    std::fs::remove_file(&back).unwrap();
    c.copy("sftp", &["-b", batch.to_str().unwrap(), &ip]);
    assert_eq!(in_vm("/root/big2"), want, "sftp up");
    assert_eq!(sum(&back), want, "sftp down");
    c.ok(&ip, &["rm /root/big /root/big2"]);

    // A web server in the VM answers through the HTTPS front door.
    c.ok(
        &ip,
        &["mkdir -p /www && echo hello from myapp > /www/index.html && httpd -p 80 -h /www"],
    );
    let curl = ns
        .command("curl")
        .args(["-sS", "--max-time", "10", "--cacert", &ca, "--resolve"])
        .arg(format!("myapp.boxd.test:8443:{ip}"))
        .arg("https://myapp.boxd.test:8443/")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "hello from myapp\n",
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );

    // Outbound traffic is NATed: a server in a second namespace, reachable from boxd's only
    // through a veth pair and with no route back to the VMs' subnet, answers the VM and sees
    // the worker's address.
    let outside = Netns::new("journey-out");
    let veth = format!("jx{}", std::process::id() % 100_000);
    let ip_ok = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {args:?}");
    };
    let (ns_name, out_name) = (ns.name(), outside.name());
    ip_ok(&[
        "-n", ns_name, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
        out_name,
    ]);
    ip_ok(&["-n", ns_name, "addr", "add", "192.0.2.1/24", "dev", &veth]);
    ip_ok(&["-n", ns_name, "link", "set", &veth, "up"]);
    ip_ok(&["-n", out_name, "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    ip_ok(&["-n", out_name, "link", "set", "eth0", "up"]);
    let www = dir.path().join("outside");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "outside\n").unwrap();
    // A web server in the outside namespace at 192.0.2.2:`port`; its log on stderr.
    let http_server = |port: &str| {
        let server = outside
            .command("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "192.0.2.2",
                port,
                "--directory",
            ])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        ChildGuard(server)
    };
    let mut server = http_server("8000");
    let fetched = eventually(
        Duration::from_secs(10),
        "the VM reaches the outside",
        || {
            // busybox nc, not wget: the static busybox's wget crashes even on an address.
            let get = r"printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 2 192.0.2.2 8000";
            let (code, out, _) = c.ssh(&ip, &[get]);
            (code == 0 && out.starts_with("HTTP/1.0 200")).then_some(out)
        },
    );
    assert!(fetched.ends_with("\r\n\r\noutside\n"), "{fetched}");

    // A cluster member out there (its Raft port 7001 here): reachable through NAT like any
    // server until the replica lists it, then closed to VMs; other ports stay open.
    let member = http_server("7001");
    let get = |port: u16| {
        let cmd =
            format!(r"printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 192.0.2.2 {port} | head -c 12");
        c.ssh(&ip, &[&cmd]).1
    };
    eventually(Duration::from_secs(10), "port 7001 answers", || {
        (get(7001) == "HTTP/1.0 200").then_some(())
    });
    boxd_tests::write(
        &node,
        serde_json::json!({"type": "register_node", "id": null,
            "uuid": "00000000-0000-4000-8000-00000000beef", "name": "member-outside",
            "roles": ["control"], "raft_addr": "192.0.2.2:7001",
            "capacity": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0}, "at": boxd_tests::now_ms()}),
    );
    eventually(
        Duration::from_secs(10),
        "the member's Raft port closes",
        || get(7001).is_empty().then_some(()),
    );
    assert_eq!(
        get(8000),
        "HTTP/1.0 200",
        "only the member's Raft port is closed"
    );
    drop(member);
    server.0.kill().unwrap();
    let mut log = String::new();
    server
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("192.0.2.1 "),
        "the server saw the worker's address: {log}"
    );
    assert!(
        !log.contains("10.200."),
        "the VM's private address leaked: {log}"
    );

    // stop/start keeps what was written to disk.
    c.ok(&ip, &["echo kept > /root/file && sync"]);
    c.ok(LOBBY, &["stop", "myapp"]);
    let (code, _, err) = c.ssh(&ip, &["true"]);
    assert_eq!(code, 255);
    assert!(err.contains("stopped"), "{err}");
    c.ok(LOBBY, &["start", "myapp"]);
    eventually(Duration::from_secs(20), "myapp runs again", || {
        (c.ssh(&ip, &["true"]).0 == 0).then_some(())
    });
    assert_eq!(c.ok(&ip, &["cat /root/file"]), "kept\n");
    // ... and each step is in the VM's events (issue 26).
    let events = c.ok(LOBBY, &["events", "myapp"]);
    let order = [
        "started",
        "stop asked by its owner",
        "stopped",
        "start asked by its owner",
        "started",
    ];
    let texts: Vec<&str> = events
        .lines()
        .map(|l| l.split("  ").nth(1).unwrap_or(l))
        .collect();
    assert_eq!(texts, order, "{events}");
    // A process the kernel kills for want of memory, in a VM that keeps running, is an event
    // too: dd's 600 MiB buffer does not fit the VM's 512 MiB.
    let (code, _, err) = c.ssh(&ip, &["dd if=/dev/zero of=/dev/null bs=600M count=1"]);
    assert_ne!(code, 0, "{err}");
    let show = eventually(Duration::from_secs(20), "the OOM kill in show", || {
        let show = c.ok(LOBBY, &["show", "myapp"]);
        show.contains("out of memory: the kernel killed 1 process in it (memory limit 512 MiB)")
            .then_some(show)
    });
    assert!(show.contains("running"), "{show}");
    assert_eq!(c.ok(&ip, &["echo alive"]), "alive\n");

    // rm frees the name, the address and the disk.
    let vm_dir = std::fs::read_dir(data.join("vms"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    c.ok(LOBBY, &["rm", "myapp"]);
    eventually(Duration::from_secs(20), "the disk is deleted", || {
        (!vm_dir.exists()).then_some(())
    });
    assert_eq!(
        c.new_vm("myapp"),
        "127.77.0.2",
        "name and address are free again"
    );
    let (code, _, _) = c.ssh(&ip, &["test -e /root/file"]);
    assert_eq!(code, 1, "the new myapp starts from a fresh disk");

    // Three VMs; kill -9 boxd (supervisor, proxy and all): they keep running, and the
    // restarted supervisor reconnects to the same processes.
    let ips = [ip.clone(), c.new_vm("two"), c.new_vm("three")];
    let before = vm_pids(&data);
    assert_eq!(before.len(), 3, "{before:?}");
    node.kill9();
    std::thread::sleep(Duration::from_millis(500));
    for (vm, pid) in &before {
        // SAFETY: kill(pid, 0) only checks that the process exists.
        let alive = unsafe { libc::kill(i32::try_from(*pid).unwrap(), 0) } == 0;
        assert!(alive, "VM {vm} (pid {pid}) died with the supervisor");
    }
    assert_eq!(
        vm_pids(&data),
        before,
        "every VM answers on its API socket meanwhile"
    );
    let node = Node::start_in(Some(&ns), &["up"], &data, &cfg);
    node.wait_ready(Duration::from_secs(60));
    let worker = eventually(Duration::from_secs(10), "the worker's first pass", || {
        let w = node.status()["worker"].clone();
        w["first_pass_ms"].as_u64().map(|_| w)
    });
    eprintln!("restarted supervisor: {worker}");
    assert_eq!(worker["reconnected"], 3, "{worker}");
    assert!(
        worker["nat"].as_str().unwrap().starts_with("nftables"),
        "{worker}"
    );
    assert!(worker["first_pass_ms"].as_u64().unwrap() < 1000, "{worker}");
    assert_eq!(
        vm_pids(&data),
        before,
        "the same VM processes, not new ones"
    );
    for (i, ip) in ips.iter().enumerate() {
        let name = ["myapp", "two", "three"][i];
        assert_eq!(c.ok(ip, &["hostname"]).trim(), name);
    }

    // A VM whose processes die is started again by the supervisor (restart policy: always).
    let (dead_vm, dead_pid) = before[0].clone();
    // SAFETY: kill(2) of a VM init this test's boxd started.
    unsafe { libc::kill(i32::try_from(dead_pid).unwrap(), libc::SIGKILL) };
    let reborn = eventually(Duration::from_secs(10), "the VM is started again", || {
        vm_pids(&data)
            .into_iter()
            .find(|(vm, pid)| *vm == dead_vm && *pid != dead_pid)
    });
    eprintln!("restarted {dead_vm}: pid {dead_pid} -> {}", reborn.1);
    eventually(Duration::from_secs(30), "its agent answers again", || {
        ips.iter()
            .all(|ip| c.ssh(ip, &["true"]).0 == 0)
            .then_some(())
    });
    // The restart and its cause are in that VM's events and in `show` (issue 26).
    let crashed: Vec<String> = ["myapp", "two", "three"]
        .iter()
        .map(|name| c.ok(LOBBY, &["show", name]))
        .filter(|show| show.contains("restarted: its process had ended (killed by signal 9)"))
        .collect();
    assert_eq!(crashed.len(), 1, "{crashed:?}");
}

/// `runtime = "kvm"`: with hardware virtualization, the whole journey above. Where KVM only
/// emulates guests (these machines) `new` starts a real `boxd vmm` with Debian's kernel, the
/// image as an ext4 root disk and a tap on the bridge; the kernel prints its first lines and
/// gets no further, and the VM is reported booting with that reason — by `new`, `show`, and
/// a session attempt.
#[test]
fn the_kvm_runtime_boots_a_real_vmm() {
    let host = boxd_vmm::host::detect();
    match host.virtualization {
        boxd_vmm::Virtualization::None => {
            eprintln!("no kvm here ({}): nothing to check", host.reason);
            return;
        }
        boxd_vmm::Virtualization::Hardware => {
            journey("kvm");
            return;
        }
        boxd_vmm::Virtualization::Emulated => {}
    }
    let kernel_dir = kernel_dir();
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("journey-kvm");
    let data = dir.path().join("data");
    let _reaper = VmReaper(data.clone());
    let cfg = config(dir.path(), "kvm", "kvm");
    let node = Node::start_in(Some(&ns), &["up"], &data, &cfg);
    node.wait_ready(Duration::from_secs(60));
    let worker = eventually(Duration::from_secs(10), "the worker's status", || {
        let w = node.status()["worker"].clone();
        w["runtime"].is_string().then_some(w)
    });
    assert_eq!(worker["runtime"], "kvm", "{worker}");
    let key = dir.path().join("id_ed25519");
    keygen(&key);
    let c = Client { ns: &ns, key };

    let (code, out, err) = c.ssh(LOBBY, &["new", "--name=slow"]);
    assert_eq!(code, 1, "{out}{err}");
    eprintln!("new --name=slow: exit {code}: {err}");
    assert!(
        err.contains("slow is booting but cannot finish on its worker") && err.contains("emulated"),
        "{err}"
    );
    let ip = "127.77.0.2";

    // One VM directory, run by `boxd vmm` with the kernel, the root disk and the tap.
    let vms: Vec<PathBuf> = std::fs::read_dir(data.join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vm_dir = &vms[0];
    let probe = api(&vm_dir.join("api.sock"), "GET", "").expect("the VMM answers");
    let pid = probe["pid"].as_i64().unwrap();
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(argv.contains(" vmm --config "), "{argv}");
    let vm: Value =
        serde_json::from_slice(&std::fs::read(vm_dir.join("vm.json")).unwrap()).unwrap();
    assert!(
        vm["boot"]["kernel"]
            .as_str()
            .unwrap()
            .starts_with(&kernel_dir),
        "{vm}"
    );
    assert!(vm["boot"]["initrd"].is_string(), "{vm}");
    assert!(
        vm["disks"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("disk.img"),
        "{vm}"
    );
    let tap = vm["net"][0]["tap"].as_str().unwrap().to_owned();
    let link = ns
        .command("ip")
        .args(["-o", "link", "show", "dev", &tap])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    assert!(link.contains(" master boxd0 "), "{link}");

    // The VM is booting, and says why (checked first: emulated KVM ends the VMM a minute or
    // so later, and the worker then reports it failed until it boots it again).
    eprintln!("show slow:\n{}", c.ok(LOBBY, &["show", "slow"]));
    let show: Value = serde_json::from_str(&c.ok(LOBBY, &["show", "slow", "--json"])).unwrap();
    assert_eq!(show["state"], "booting", "{show}");
    assert!(
        show["reason"]
            .as_str()
            .unwrap()
            .contains("instruction emulator"),
        "{show}"
    );
    let (code, _, err) = c.ssh(ip, &["true"]);
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("slow is booting but cannot finish"), "{err}");
    // The kernel's first lines reach the console log.
    let console = vm_dir.join("console.log");
    eventually(Duration::from_secs(180), "the kernel's first lines", || {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        text.contains("Linux version ").then_some(())
    });

    // When the VMM ends (as emulated KVM makes it do at the first instruction it cannot
    // emulate; here by signal), the VM is reported failed with why, then booted again after
    // the backoff rather than at once in a loop.
    // SAFETY: kill(2) of the VMM this test's boxd started.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    let failed = eventually(Duration::from_secs(10), "reported failed", || {
        let v: Value = serde_json::from_str(&c.ok(LOBBY, &["show", "slow", "--json"])).ok()?;
        (v["state"] == "failed").then_some(v)
    });
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .starts_with("its guest stopped booting"),
        "{failed}"
    );
    let again = eventually(Duration::from_secs(20), "booted again", || {
        let v = api(&vm_dir.join("api.sock"), "GET", "")?;
        let p = v["pid"].as_i64()?;
        (p != pid).then_some(p)
    });
    eprintln!(
        "VMM {pid} killed: reported failed ({}), booted again as {again}",
        failed["reason"]
    );

    // rm stops the VMM and removes its disk, directory and tap.
    c.ok(LOBBY, &["rm", "slow"]);
    eventually(
        Duration::from_secs(20),
        "the VM's directory removed",
        || (!vm_dir.exists()).then_some(()),
    );
    let link = ns
        .command("ip")
        .args(["-o", "link", "show", "dev", &tap])
        .output()
        .unwrap();
    assert!(link.stdout.is_empty(), "the tap is gone");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM ended"
    );
}

/// A worker that lacks a VM's image fetches it from the node that has it, hash-checked, with
/// progress shown to `new`; an image that no longer matches what its node published is
/// refused. Node 1 (control, proxy, DNS) holds the images; node 2 joins as a bare worker.
#[test]
fn a_new_worker_fetches_images_from_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("journey-fetch");
    let (data1, data2) = (dir.path().join("n1"), dir.path().join("n2"));
    let _reaper = VmReaper(data2.clone());
    // Node 1's images: `minimal`, and copies of it named `tiny` and `tampered`.
    let built = Command::new(boxd_tests::boxd_bin())
        .arg("--data-dir")
        .arg(&data1)
        .args(["image", "build", "minimal"])
        .output()
        .unwrap();
    assert!(built.status.success(), "{built:?}");
    let images1 = data1.join("images");
    for copy in ["tiny", "tampered"] {
        let st = Command::new("cp")
            .arg("-a")
            .arg(images1.join("minimal"))
            .arg(images1.join(copy))
            .status()
            .unwrap();
        assert!(st.success());
        let meta = images1.join(copy).join("image.json");
        let mut info: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        info["name"] = copy.into();
        std::fs::write(&meta, info.to_string()).unwrap();
    }
    let cfg1 = dir.path().join("n1.toml");
    std::fs::write(&cfg1, "[node]\nname = \"n1\"\n").unwrap();
    let n1 = Node::start_in(
        Some(&ns),
        &["up", "--role", "control,proxy,dns"],
        &data1,
        &cfg1,
    );
    n1.wait_ready(Duration::from_secs(60));
    let token = n1
        .admin()
        .ok(&serde_json::json!({"op": "join-token", "roles": ["worker"]}))["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let cfg2 = dir.path().join("n2.toml");
    std::fs::write(
        &cfg2,
        "[node]\nname = \"n2\"\n\n[raft]\nlisten = \"127.0.0.2:7000\"\n\n[worker]\nruntime = \"sandbox\"\n",
    )
    .unwrap();
    let n2 = Node::start_in(
        Some(&ns),
        &[
            "join",
            "127.0.0.1:7000",
            "--token",
            &token,
            "--role",
            "worker",
        ],
        &data2,
        &cfg2,
    );
    n2.wait_ready(Duration::from_secs(60));
    // Node 1 publishes its images (at start, then every 5 s).
    let published = |name: &str| images1.join(name).join("archive.json").is_file();
    eventually(Duration::from_secs(30), "node 1's images published", || {
        (published("tiny") && published("tampered")).then_some(())
    });
    // Change `tampered` after its hash was published: whoever serves or fetches it must notice.
    std::fs::write(images1.join("tampered/rootfs/etc/hostname"), "changed\n").unwrap();

    let key = dir.path().join("id_ed25519");
    keygen(&key);
    let c = Client { ns: &ns, key };
    let (code, out, err) = c.ssh(LOBBY, &["new", "--name=far", "--image=tiny"]);
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("new --image=tiny:\n{err}");
    assert!(
        err.contains("far: fetching image tiny from node 1")
            && err.contains("far: image tiny fetched from node 1 and checked"),
        "progress shown: {err}"
    );
    let ip = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("address"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(c.ok(&ip, &["hostname"]).trim(), "far");
    let archive = |data: &Path, name: &str| -> Value {
        let p = data.join("images").join(name).join("archive.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    assert_eq!(
        archive(&data2, "tiny"),
        archive(&data1, "tiny"),
        "same content"
    );

    let (code, _, err) = c.ssh(LOBBY, &["new", "--name=bad", "--image=tampered"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("could not be fetched") && err.contains("changed while it was sent"),
        "{err}"
    );
    assert!(
        !data2.join("images/tampered").exists(),
        "nothing unchecked is kept"
    );
}
