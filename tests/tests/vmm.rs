//! `boxd vmm` as the worker will use it: a separate process per VM, driven through its config
//! file, its API socket (with the real curl) and its serial log. Boots the freestanding test
//! guest and Debian's cloud kernel on this host's /dev/kvm.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use boxd_tests::{boxd_bin, eventually};
use boxd_vmm::Virtualization;
use serde_json::Value;

fn kvm() -> Option<Virtualization> {
    let h = boxd_vmm::host::detect();
    if h.virtualization == Virtualization::None {
        eprintln!("skipped: no usable KVM on this host ({})", h.reason);
        return None;
    }
    Some(h.virtualization)
}

fn write_vm(dir: &Path, kernel: &Path, cmdline: &str, vcpus: u8, memory_mib: u64) -> PathBuf {
    let p = dir.join("vm.json");
    let cfg = serde_json::json!({
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "boot": {"kernel": kernel, "cmdline": cmdline},
        "serial_log": dir.join("serial.log"),
    });
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

/// Starts `boxd vmm` and returns once its API answers (or it has ended), so that callers
/// never race its socket.
fn spawn(dir: &Path, config: &Path) -> Child {
    let sock = dir.join("api.sock");
    let mut child = Command::new(boxd_bin())
        .arg("vmm")
        .arg("--config")
        .arg(config)
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while boxd_vmm::api::probe(&sock).is_none()
        && child.try_wait().unwrap().is_none()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// The test guest under `boxd vmm` in a fresh directory; `None` where there is no KVM.
fn start_guest(cmdline: &str, vcpus: u8) -> Option<(tempfile::TempDir, Child)> {
    kvm()?;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_vm(
        dir.path(),
        Path::new(boxd_vmm::TEST_GUEST),
        cmdline,
        vcpus,
        32,
    );
    let vmm = spawn(dir.path(), &cfg);
    Some((dir, vmm))
}

fn serial(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default()
}

/// `curl --unix-socket`: (status, body).
fn curl(dir: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--unix-socket")
        .arg(dir.join("api.sock"))
        .args(["-X", method]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    let out = c.arg(format!("http://localhost{path}")).output().unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

fn wait_exit(child: &mut Child, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("VMM still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn invalid_config_exits_2_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            r#"{"vcpus": 0, "boot": {"kernel": "KERNEL"}}"#,
            "`vcpus` is 0: use 1 to 32",
        ),
        (
            r#"{"boot": {"kernel": "/nonexistent"}}"#,
            "`boot.kernel` /nonexistent is not a readable file",
        ),
        (
            r#"{"memory": 64, "boot": {"kernel": "KERNEL"}}"#,
            "unknown field `memory`",
        ),
        ("{", "EOF while parsing"),
    ];
    for (cfg, want) in cases {
        let p = d.join("vm.json");
        std::fs::write(&p, cfg.replace("KERNEL", boxd_vmm::TEST_GUEST)).unwrap();
        let out: Output = Command::new(boxd_bin())
            .arg("vmm")
            .arg("--config")
            .arg(&p)
            .arg("--api-sock")
            .arg(d.join("api.sock"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cfg}: {err}");
        assert!(err.contains(want), "{cfg}: stderr was {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!d.join("api.sock").exists(), "nothing started");
    }
}

#[test]
fn test_guest_boots_and_its_reset_ends_the_process() {
    let Some((dir, mut vmm)) = start_guest("", 3) else {
        return;
    };
    let d = dir.path();
    let code = wait_exit(&mut vmm, Duration::from_secs(60));
    let out = serial(d);
    assert_eq!(
        code,
        0,
        "serial:\n{out}\nlog:\n{}",
        std::fs::read_to_string(d.join("vmm.log")).unwrap()
    );
    for want in [
        "boxd-guest: hello",
        "boxd-guest: cpus 3",
        "boxd-guest: done",
    ] {
        assert!(out.contains(want), "missing {want:?} in serial:\n{out}");
    }
}

#[test]
fn test_guest_uses_virtio_blk_disks_on_pci() {
    if kvm().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut rw = vec![0u8; 1 << 20];
    let magic = format!("BOXD-DISK {token}\n");
    rw[..magic.len()].copy_from_slice(magic.as_bytes());
    std::fs::write(d.join("rw.img"), &rw).unwrap();
    let mut ro = vec![0u8; 64 << 10];
    ro[..9].copy_from_slice(b"READONLY\n");
    std::fs::write(d.join("ro.img"), &ro).unwrap();
    let cfg = d.join("vm.json");
    let v = serde_json::json!({
        "memory_mib": 32,
        "boot": {"kernel": boxd_vmm::TEST_GUEST},
        "serial_log": d.join("serial.log"),
        "disks": [
            {"path": d.join("rw.img"), "id": "boxd-rw"},
            {"path": d.join("ro.img"), "read_only": true},
        ],
    });
    std::fs::write(&cfg, v.to_string()).unwrap();
    let mut vmm = spawn(d, &cfg);
    assert_eq!(wait_exit(&mut vmm, Duration::from_secs(60)), 0);
    let out = serial(d);
    for want in [
        "boxd-guest: pci 00:0 0x0000000012378086".to_owned(),
        "boxd-guest: pci 00:1 0x0000000010421af4".to_owned(),
        format!("boxd-guest: blk0 capacity 2048 rw id boxd-rw sector0 BOXD-DISK {token}"),
        "boxd-guest: blk0 write status 0 flush status 0 read status 0 data same".to_owned(),
        "boxd-guest: blk0 past-end status 1".to_owned(),
        "boxd-guest: blk1 capacity 128 ro id disk1 sector0 READONLY".to_owned(),
        "boxd-guest: blk1 write status 1 flush status 0 read status 0 data differs".to_owned(),
        "boxd-guest: done".to_owned(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in serial:\n{out}");
    }
    // The guest's writes reached the image file; the read-only image is untouched.
    let disk = std::fs::read(d.join("rw.img")).unwrap();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
    assert_eq!(&disk[1024..2048], &pattern[..]);
    assert_eq!(std::fs::read(d.join("ro.img")).unwrap(), ro);
}

/// A network namespace this test made, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "ip netns add {name} (needs root and iproute2)"
        );
        Self(name.to_owned())
    }

    fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "ip -n {} {args:?}", self.0);
    }

    fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Answers the first frame of ethertype 0x88b5 on `tap` with one addressed to its sender.
const RESPONDER: &str = r#"
import socket, sys
tap, token = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((tap, 0))
s.settimeout(60)
print("ready", flush=True)
while True:
    f = s.recv(2048)
    if f[12:14] != b"\x88\xb5":
        continue
    print("got", f[14:].rstrip(b"\0").decode(errors="replace"), "from", f[6:12].hex(":"), flush=True)
    reply = f[6:12] + bytes.fromhex("020000000001") + b"\x88\xb5" + ("boxd-host pong " + token).encode()
    s.send(reply + bytes(max(0, 60 - len(reply))))
    break
"#;

#[test]
fn test_guest_exchanges_frames_over_virtio_net_and_a_tap() {
    if kvm().is_none() {
        return;
    }
    let id = format!("{:04x}", std::process::id() & 0xffff);
    let ns = Netns::new(&format!("boxd-vmm-net-{id}"));
    let tap = format!("bxt{id}");
    ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
    ns.ip(&["link", "set", &tap, "up"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut responder = ns
        .exec()
        .args(["python3", "-c", RESPONDER, &tap, &token])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(responder.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let cfg = d.join("vm.json");
    let v = serde_json::json!({
        "memory_mib": 32,
        "boot": {"kernel": boxd_vmm::TEST_GUEST},
        "serial_log": d.join("serial.log"),
        "net": [{"tap": tap, "mac": "52:54:00:12:34:56"}],
    });
    std::fs::write(&cfg, v.to_string()).unwrap();
    let mut vmm = ns
        .exec()
        .arg(boxd_bin())
        .arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(d.join("api.sock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("vmm.log")).unwrap())
        .spawn()
        .unwrap();
    let code = wait_exit(&mut vmm, Duration::from_secs(60));
    let serial_out = serial(d);
    assert_eq!(code, 0, "serial:\n{serial_out}");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "got boxd-guest ping from 52:54:00:12:34:56");
    let want =
        format!("boxd-guest: net0 mac 52:54:00:12:34:56 sent received boxd-host pong {token}");
    assert!(
        serial_out.contains(&want),
        "missing {want:?} in serial:\n{serial_out}"
    );
    responder.wait().unwrap();
}

#[test]
fn test_guest_talks_to_host_unix_sockets_over_virtio_vsock() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    if kvm().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let uds = d.join("v.sock");
    let token = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    // Guest → host: the guest connects to host port 5000, which is `<uds>_5000`.
    let listener = UnixListener::bind(d.join("v.sock_5000")).unwrap();
    let cfg = d.join("vm.json");
    let v = serde_json::json!({
        "memory_mib": 32,
        "boot": {"kernel": boxd_vmm::TEST_GUEST, "cmdline": "vsock_port=5000"},
        "serial_log": d.join("serial.log"),
        "vsock": {"guest_cid": 42, "uds_path": uds},
    });
    std::fs::write(&cfg, v.to_string()).unwrap();
    let mut vmm = spawn(d, &cfg);
    listener.set_nonblocking(true).unwrap();
    let (conn, _) = eventually(Duration::from_secs(30), "the guest's connection", || {
        listener.accept().ok()
    });
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "hello from the guest\n");
    (&conn)
        .write_all(format!("hello guest {token}\n").as_bytes())
        .unwrap();
    let want =
        format!("boxd-guest: vsock cid 42 connected to port 5000 received hello guest {token}");
    eventually(
        Duration::from_secs(30),
        "the guest to print the answer",
        || serial(d).contains(&want).then_some(()),
    );

    // A host stream that does not start with CONNECT is told so and closed.
    let mut bad = UnixStream::connect(&uds).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"HELLO 5001\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&bad).read_line(&mut reply).unwrap();
    assert_eq!(reply, "ERR expected CONNECT <port>\n");

    // Host → guest: CONNECT to the port the guest accepts on; bytes after the line are data.
    let host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    (&host)
        .write_all(format!("CONNECT 5001\nping {token}\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(host.try_clone().unwrap());
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK ") && line.ends_with('\n'), "{line:?}");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("echo: ping {token}\n"));
    drop(r);
    drop(host);

    assert_eq!(wait_exit(&mut vmm, Duration::from_secs(60)), 0);
    let out = serial(d);
    for want in [
        format!("boxd-guest: vsock accepted on port 5001 received ping {token}"),
        "boxd-guest: vsock host closed".to_owned(),
        "boxd-guest: done".to_owned(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in serial:\n{out}");
    }
}

#[test]
fn api_pause_resume_console_metrics_shutdown() {
    let Some((dir, mut vmm)) = start_guest("wait", 2) else {
        return;
    };
    let d = dir.path();
    eventually(Duration::from_secs(30), "first tick", || {
        serial(d).contains("boxd-guest: tick 1").then_some(())
    });

    let (code, body) = curl(d, "GET", "/vm", None);
    assert_eq!(code, 200, "{body}");
    let vm: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(vm["state"], "running");
    assert_eq!(
        (vm["vcpus"].as_u64(), vm["memory_mib"].as_u64()),
        (Some(2), Some(32))
    );

    assert_eq!(
        curl(d, "PUT", "/vm/actions", Some(r#"{"action":"pause"}"#)).0,
        204
    );
    let vm: Value = serde_json::from_str(&curl(d, "GET", "/vm", None).1).unwrap();
    assert_eq!(vm["state"], "paused");
    // Paused vCPUs run no guest code: the console cannot grow.
    let (_, before) = curl(d, "GET", "/vm/console", None);
    std::thread::sleep(Duration::from_millis(500));
    let (_, after) = curl(d, "GET", "/vm/console", None);
    assert_eq!(before, after, "console grew while paused");
    assert!(before.contains("boxd-guest: tick 1"));

    assert_eq!(
        curl(d, "PUT", "/vm/actions", Some(r#"{"action":"resume"}"#)).0,
        204
    );
    let ticks = before.matches("tick").count();
    eventually(Duration::from_secs(30), "a tick after resume", || {
        (serial(d).matches("tick").count() > ticks).then_some(())
    });

    let (code, metrics) = curl(d, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(metrics.contains("boxd_vmm_vcpus 2"), "{metrics}");
    let io: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("boxd_vmm_vcpu_exits_total{kind=\"io\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(io > 0, "{metrics}");

    let (code, body) = curl(d, "PUT", "/vm/actions", Some(r#"{"action":"explode"}"#));
    assert_eq!(code, 400);
    assert!(
        body.contains("unknown action `explode`: use pause, resume or shutdown"),
        "{body}"
    );
    let (code, body) = curl(d, "PUT", "/vm/actions", Some("not json"));
    assert_eq!(code, 400, "{body}");
    assert_eq!(curl(d, "GET", "/nope", None).0, 404);
    assert_eq!(curl(d, "DELETE", "/vm", None).0, 405);

    assert_eq!(
        curl(d, "PUT", "/vm/actions", Some(r#"{"action":"shutdown"}"#)).0,
        204
    );
    assert_eq!(wait_exit(&mut vmm, Duration::from_secs(10)), 0);
}

#[test]
fn vm_outlives_its_starter_and_accepts_new_clients() {
    if kvm().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write_vm(d, Path::new(boxd_vmm::TEST_GUEST), "wait", 1, 32);
    // A shell starts the VMM in the background and exits at once, as a supervisor that dies.
    let script = format!(
        "{} vmm --config {} --api-sock {} >{} 2>&1 & echo $!",
        boxd_bin().display(),
        cfg.display(),
        d.join("api.sock").display(),
        d.join("vmm.log").display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(out.status.success());
    let pid: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually(Duration::from_secs(30), "first tick", || {
        serial(d).contains("tick 1").then_some(())
    });
    for _ in 0..3 {
        let (code, body) = curl(d, "GET", "/vm", None);
        assert_eq!(code, 200);
        assert!(body.contains("\"running\""), "{body}");
    }
    // A second VMM may not take over the live socket.
    let second = Command::new(boxd_bin())
        .arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(d.join("api.sock"))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&second.stderr).contains("API socket of a running VMM"));

    assert_eq!(
        curl(d, "PUT", "/vm/actions", Some(r#"{"action":"shutdown"}"#)).0,
        204
    );
    eventually(Duration::from_secs(10), "the VMM to exit", || {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        (!alive).then_some(())
    });
}

fn kernel_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var_os("BOXD_KERNEL_DIR").unwrap_or_else(|| "/var/cache/boxd/kernel".into()),
    );
    assert!(
        dir.join("vmlinux").exists() && dir.join("vmlinuz").exists(),
        "no kernel in {}: run `ops/fetch-kernel` (ops/test does)",
        dir.display()
    );
    dir
}

/// Boots Debian's cloud kernel and reads its first console lines. On an emulated-KVM host the
/// kernel stops soon after (an instruction the emulator lacks); with hardware virtualization it
/// must reach the initramfs.
fn linux_smoke(image: &str) {
    let Some(virt) = kvm() else { return };
    let kdir = kernel_dir();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = uuid::Uuid::new_v4().simple().to_string();
    let cmdline = format!("console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 boxd.smoke={token}");
    let cfg = write_vm(d, &kdir.join(image), &cmdline, 1, 256);
    if virt == Virtualization::Hardware {
        let initrd = busybox_initramfs(d, &token);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v["boot"]["initrd"] = serde_json::json!(initrd);
        std::fs::write(&cfg, v.to_string()).unwrap();
    }
    let mut vmm = spawn(d, &cfg);
    let started = Instant::now();
    let deadline = Duration::from_secs(120);
    let want = [
        "Linux version ".to_owned(),
        format!("Command line: {cmdline}\r\n"),
    ];
    loop {
        let out = serial(d);
        if want.iter().all(|w| out.contains(w.as_str())) {
            eprintln!("{image}: both lines after {:?}", started.elapsed());
            break;
        }
        if let Some(s) = vmm.try_wait().unwrap() {
            panic!("VMM exited ({s}) before the lines appeared; serial:\n{out}");
        }
        assert!(
            started.elapsed() < deadline,
            "not within {deadline:?}; serial:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    if virt == Virtualization::Hardware {
        // /init prints the marker and reboots; with reboot=k that is the i8042 reset, which
        // ends the VMM with status 0.
        let marker = format!("BOXD-INIT-OK {token}");
        let code = wait_exit(&mut vmm, Duration::from_secs(120));
        let out = serial(d);
        assert!(
            out.contains(&marker),
            "no {marker:?} from /init; serial:\n{out}"
        );
        assert_eq!(code, 0, "serial:\n{out}");
        eprintln!(
            "{image}: reached the initramfs /init in {:?}",
            started.elapsed()
        );
        return;
    } else {
        eprintln!(
            "{image}: not booting to an initramfs here: virtualization is {virt}, where KVM \
             emulates every guest instruction and a stock kernel stops early"
        );
    }
    if vmm.try_wait().unwrap().is_none() {
        let (code, body) = curl(d, "PUT", "/vm/actions", Some(r#"{"action":"shutdown"}"#));
        assert_eq!(code, 204, "{body}");
    }
    wait_exit(&mut vmm, Duration::from_secs(10));
}

/// A cpio initramfs of Debian's busybox-static whose /init prints a marker and reboots.
fn busybox_initramfs(dir: &Path, token: &str) -> PathBuf {
    let root = dir.join("initramfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox: install busybox-static (ops/test does)");
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox echo BOXD-INIT-OK {token}\n/bin/busybox reboot -f\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    let st = Command::new("chmod")
        .args(["0755"])
        .arg(root.join("init"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.join("initramfs.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed (install cpio; ops/test does)");
    out
}

#[test]
fn linux_vmlinux_prints_version_and_command_line() {
    linux_smoke("vmlinux");
}

/// A bzImage decompresses itself before it prints anything: 53 MB of LZ4 output, which under
/// an emulated KVM takes far longer than a test may. So on such hosts this proves that the
/// bzImage path (linux-loader's setup header, the 64-bit entry at load + 0x200, the zero page)
/// starts the decompressor: it programs the early UART (port writes counted by the VMM's
/// metrics) without a KVM failure. With hardware virtualization it must print the same lines
/// as the vmlinux boot.
#[test]
fn linux_bzimage_starts() {
    let Some(virt) = kvm() else { return };
    if virt == Virtualization::Hardware {
        linux_smoke("vmlinuz");
        return;
    }
    let kdir = kernel_dir();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200";
    let cfg = write_vm(d, &kdir.join("vmlinuz"), cmdline, 1, 256);
    let mut vmm = spawn(d, &cfg);
    let io = eventually(
        Duration::from_secs(60),
        "the decompressor's UART setup",
        || {
            if let Some(s) = vmm.try_wait().unwrap() {
                panic!(
                    "VMM exited ({s}): {}",
                    std::fs::read_to_string(d.join("vmm.log")).unwrap()
                );
            }
            let (code, m) = curl(d, "GET", "/metrics", None);
            assert_eq!(code, 200);
            let io: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("boxd_vmm_vcpu_exits_total{kind=\"io\"} "))?
                .parse()
                .ok()?;
            (io >= 8).then_some(io)
        },
    );
    eprintln!(
        "bzImage: the decompressor set up the UART ({io} port I/O exits); virtualization is \
         {virt}, so its decompression is not waited for"
    );
    assert_eq!(
        curl(d, "PUT", "/vm/actions", Some(r#"{"action":"shutdown"}"#)).0,
        204
    );
    assert_eq!(wait_exit(&mut vmm, Duration::from_secs(10)), 0);
}
