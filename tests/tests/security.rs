//! The hostile-tenant suite (issue 25): `boxd up` attacked the way a stranger on the internet
//! would, with real tools — raw TLS and TCP sockets from Python (`fixtures/hostile.py`), curl,
//! OpenSSH and kdig. Each test reproduces a finding of that issue and fails on the code before
//! its fix: request smuggling through `Connection`, ambiguous Host and framing, an open
//! redirect, unallocated addresses served, slow heads and handshakes that never time out, SSH
//! clients that hold slots past the deadline, unbounded registration writes, secrets others can
//! read, DNS answers that drop the DO bit, SSH algorithms ssh-audit warns about, and an
//! impostor answering at a VM's private address.
//!
//! Network isolation between VMs and the sandbox's confinement are attacked from inside VMs in
//! `runtime.rs` (`the_bridge_keeps_tenants_apart`, `a_sandbox_vm_root_is_confined`).

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use boxd_tests::{
    Node, SSH_OPTS, UP, keygen, now_ms, ready_field, running_vm, spawn_ready, write, write_config,
};
use serde_json::{Value, json};
use uuid::Uuid;

const HOSTILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/hostile.py");

/// What `hostile.py send` saw.
struct Sent {
    reply: String,
    closed: bool,
    seconds: f64,
}

/// Sends `bytes` to `addr` (over TLS for `tls = Some((sni, ca))`), a byte per `drip` seconds
/// if given, and waits up to `wait` seconds for the server to close.
fn send(addr: &str, tls: Option<(&str, &str)>, bytes: &[u8], drip: Option<f64>, wait: u32) -> Sent {
    let mut c = Command::new("python3");
    c.args([HOSTILE, "send", addr, "--wait", &wait.to_string()]);
    if let Some((sni, ca)) = tls {
        c.args(["--tls", sni, "--ca", ca]);
    }
    if let Some(d) = drip {
        c.args(["--drip", &d.to_string()]);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hostile.py: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Sent {
        reply: v["reply"].as_str().unwrap().to_owned(),
        closed: v["closed"].as_bool().unwrap(),
        seconds: v["seconds"].as_f64().unwrap(),
    }
}

/// The request-logging web server of a VM, on `ip`:8000.
struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(ip: &str, dir: &Path) -> Backend {
        let log = dir.join(format!("backend-{ip}.log"));
        std::fs::write(&log, "").unwrap();
        let child = spawn_ready(
            Command::new("python3")
                .args([HOSTILE, "backend", ip, "8000"])
                .arg(&log),
        );
        Backend { child, log }
    }

    /// Request lines the VM has read so far.
    fn requests(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[ssh]` settings of most tests: a short authentication deadline.
const FAST_AUTH: &str = "auth_timeout_secs = 2";

/// `boxd up` (no worker) on `ip`; HTTPS and its redirect listen on every address at
/// `https_port` and `https_port + 1`, SSH at `ssh_port` with the `[ssh]` settings `ssh`.
fn node(dir: &Path, ip: &str, https_port: u16, ssh_port: u16, ssh: &str) -> (Node, String) {
    let cfg = write_config(dir, "sec", &format!("{ip}:7000"), "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            &format!("[https]\nlisten = \"{ip}:8443\"\nredirect_listen = \"{ip}:8080\""),
            &format!(
                "[https]\nlisten = \"0.0.0.0:{https_port}\"\nredirect_listen = \"0.0.0.0:{}\"\n\
                 header_timeout_secs = 2",
                https_port + 1
            ),
        )
        .replace(
            &format!("[ssh]\nlisten = \"{ip}:2222\""),
            &format!("[ssh]\nlisten = \"0.0.0.0:{ssh_port}\"\n{ssh}"),
        );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.join("data"), &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    (node, ready)
}

/// A new account (named after its first VM) whose VMs `names` run, their web servers at
/// `web`:8000.
fn vms_of_new_account(node: &Node, names: &[&str], web: &str) {
    let owner = Uuid::new_v4();
    write(
        node,
        json!({"type": "create_account", "id": owner, "name": names[0], "max_vms": null, "at": now_ms()}),
    );
    for name in names {
        running_vm(node, &json!(owner), name, 8000, web);
    }
}

/// OpenSSH's `ssh -p port -i key 127.77.0.1 whoami` (the lobby).
fn lobby_whoami(port: u16, key: &Path) -> std::process::Output {
    ssh_at(port, key, "127.77.0.1", &["whoami"])
}

/// OpenSSH's `ssh -p port -i key host args…`.
fn ssh_at(port: u16, key: &Path, host: &str, args: &[&str]) -> std::process::Output {
    Command::new("ssh")
        .args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args(SSH_OPTS)
        .args(["-o", "ConnectTimeout=10", host])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The public address the admin socket gives VM `name`.
fn public_ip(node: &Node, name: &str) -> String {
    let vms = node.admin().ok(&json!({"op": "vms"}));
    vms.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .and_then(|v| v["public_ip"].as_str())
        .unwrap_or_else(|| panic!("no public_ip for {name} in {vms}"))
        .to_owned()
}

const HTTPS_PORT: u16 = 29443;

/// Findings 1 and 7 (HTTP): smuggling through `Connection`, Host rules, absolute-form targets
/// naming another VM, malformed chunk sizes, the open redirect and unallocated addresses.
#[test]
fn the_https_front_door_frames_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.44.1";
    let (node, ready) = node(dir.path(), ip, HTTPS_PORT, 29222, FAST_AUTH);
    let ca = ready_field(&ready, "ca").to_owned();
    let web = Backend::start("127.0.44.10", dir.path());
    vms_of_new_account(&node, &["victim", "other"], "127.0.44.10");
    let addr = format!("{}:{HTTPS_PORT}", public_ip(&node, "victim"));
    let tls = Some(("victim.boxd.test", ca.as_str()));
    let host = "Host: victim.boxd.test\r\n";
    let smuggled = format!("GET /SMUGGLED HTTP/1.1\r\n{host}\r\n");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "Connection naming Content-Length",
            format!(
                "POST / HTTP/1.1\r\n{host}Connection: Content-Length\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            "400",
        ),
        (
            "Connection naming Transfer-Encoding",
            format!(
                "POST / HTTP/1.1\r\n{host}Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n\
                 {:x}\r\n{smuggled}\r\n0\r\n\r\n",
                smuggled.len()
            ),
            "400",
        ),
        (
            "two Host fields",
            format!("GET / HTTP/1.1\r\n{host}Host: other.boxd.test\r\n\r\n"),
            "400",
        ),
        (
            "HTTP/1.1 without Host",
            "GET / HTTP/1.1\r\n\r\n".into(),
            "400",
        ),
        (
            "an absolute-form target naming another VM",
            format!("GET https://other.boxd.test/ HTTP/1.1\r\n{host}\r\n"),
            "421",
        ),
        (
            "a malformed chunk size",
            format!(
                "POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            ),
            "400",
        ),
        (
            "chunked twice",
            format!(
                "POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"
            ),
            "400",
        ),
    ];
    for (what, request, status) in &cases {
        let got = send(&addr, tls, request.as_bytes(), None, 10);
        assert!(
            got.reply.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {:?}",
            got.reply
        );
        assert!(
            got.closed,
            "{what}: the connection must close after a refusal"
        );
    }
    // Without SNI the Host header routes; one that is not ASCII is refused (it used to reach a
    // byte split of the name that panicked the shard).
    for bad_host in ["\u{e4}boxd.test", "\u{e4}.boxd.test"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {bad_host}\r\n\r\n");
        let got = send(&addr, Some(("-", ca.as_str())), req.as_bytes(), None, 10);
        assert!(
            got.reply.starts_with("HTTP/1.1 400 "),
            "{bad_host}: {:?}",
            got.reply
        );
    }
    // The VM never read a request it was not sent, and the shard still serves normally.
    let ok = send(
        &addr,
        tls,
        format!("GET /after HTTP/1.1\r\n{host}Connection: close\r\n\r\n").as_bytes(),
        None,
        10,
    );
    assert!(ok.reply.starts_with("HTTP/1.1 200 "), "{}", ok.reply);
    assert!(ok.reply.ends_with("ok /after"), "{}", ok.reply);
    let seen = web.requests();
    assert!(
        !seen.contains("SMUGGLED"),
        "the VM read a smuggled request:\n{seen}"
    );
    assert!(seen.contains("GET /after HTTP/1.1"), "{seen}");

    // Plain HTTP redirects only names of this cluster: anything else is not an open redirect.
    let redirect = format!("{}:{}", public_ip(&node, "victim"), HTTPS_PORT + 1);
    let evil = send(
        &redirect,
        None,
        b"GET /x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        None,
        10,
    );
    assert!(evil.reply.starts_with("HTTP/1.1 400 "), "{}", evil.reply);
    assert!(!evil.reply.contains("evil.example/x"), "{}", evil.reply);
    let good = send(
        &redirect,
        None,
        format!("GET /x HTTP/1.1\r\n{host}\r\n").as_bytes(),
        None,
        10,
    );
    assert!(good.reply.starts_with("HTTP/1.1 301 "), "{}", good.reply);
    assert!(
        good.reply
            .contains(&format!("https://victim.boxd.test:{HTTPS_PORT}/x")),
        "{}",
        good.reply
    );

    // A pool address no VM has is not served (docs/https.md): no handshake at all.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--cacert", &ca, "--resolve"])
        .arg(format!("victim.boxd.test:{HTTPS_PORT}:127.77.200.200"))
        .arg(format!("https://victim.boxd.test:{HTTPS_PORT}/"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "000",
        "served an unallocated address"
    );
}

/// Finding 5 (HTTPS): a head or a TLS handshake dripped a byte at a time is cut off at the
/// header deadline (2 s here), not kept alive by each byte.
#[test]
fn slow_heads_and_handshakes_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.44.2";
    let port = HTTPS_PORT + 10;
    let (node, ready) = node(dir.path(), ip, port, 29232, FAST_AUTH);
    let ca = ready_field(&ready, "ca").to_owned();
    let _web = Backend::start("127.0.44.20", dir.path());
    vms_of_new_account(&node, &["slow"], "127.0.44.20");
    let addr = format!("{}:{port}", public_ip(&node, "slow"));
    // 64 bytes at 4 per second: 16 s to send, where the deadline is 2 s.
    let head = format!(
        "GET / HTTP/1.1\r\nHost: slow.boxd.test\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(19)
    );
    let got = send(
        &addr,
        Some(("slow.boxd.test", &ca)),
        head.as_bytes(),
        Some(0.25),
        12,
    );
    assert!(
        got.closed && got.seconds < 6.0,
        "head: open for {} s",
        got.seconds
    );
    // The start of a ClientHello, then a byte every 0.25 s.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend(std::iter::repeat_n(7u8, 60));
    let got = send(&addr, None, &hello, Some(0.25), 12);
    assert!(
        got.closed && got.seconds < 6.0,
        "handshake: open for {} s",
        got.seconds
    );
}

/// Findings 5 and 6 (SSH): a client that only sends its version line is cut off at the auth
/// deadline (2 s here; it used to be held 120 s by keepalives), and one address gets a bounded
/// number of registration links (each is a Raft write), with a sentence when refused.
#[test]
fn ssh_slots_and_registrations_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.44.3";
    let ssh_port = 29242;
    let (_node, _ready) = node(dir.path(), ip, HTTPS_PORT + 20, ssh_port, FAST_AUTH);
    let lobby = format!("127.77.0.1:{ssh_port}");
    let got = send(&lobby, None, b"SSH-2.0-OpenSSH_9.2\r\n", None, 15);
    assert!(got.reply.starts_with("SSH-2.0-boxd"), "{}", got.reply);
    assert!(
        got.closed && got.seconds < 6.0,
        "version line only: open for {} s",
        got.seconds
    );

    let ssh =
        |key: &Path| String::from_utf8_lossy(&lobby_whoami(ssh_port, key).stderr).into_owned();
    let owner = dir.path().join("owner");
    keygen(&owner);
    ssh(&owner);
    let mut linked = 0;
    let mut refused = Vec::new();
    for i in 0..12 {
        let key = dir.path().join(format!("stranger{i}"));
        keygen(&key);
        let err = ssh(&key);
        if err.contains("/register/") {
            linked += 1;
            // The same key again reuses its link: no second write.
            let again = ssh(&key);
            let link = |e: &str| {
                e.split_whitespace()
                    .find(|w| w.contains("/register/"))
                    .map(str::to_owned)
            };
            assert_eq!(link(&again), link(&err), "{again}");
        } else {
            refused.push(err);
        }
    }
    assert_eq!(linked, 10, "links from one address: {refused:?}");
    assert_eq!(refused.len(), 2);
    for err in refused {
        assert!(
            err.contains("no link was made") && err.contains("try again later"),
            "{err}"
        );
    }
}

/// Finding 4: a data directory that existed before `boxd up` (0755) is made private, and the
/// replica's databases, their WAL files and the TLS key are the owner's alone. Finding 7
/// (DNS): the DO bit of a query comes back in the answer (RFC 3225 §3).
#[test]
fn secrets_are_private_and_dns_echoes_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ip = "127.0.44.4";
    let (node, _ready) = node(dir.path(), ip, HTTPS_PORT + 30, 29252, FAST_AUTH);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data directory");
    let mut checked = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains(".db") {
            assert_eq!(mode(&p), 0o600, "{name}");
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "state.db, raft-log.db and their WAL files: {checked}"
    );
    assert_eq!(mode(&data.join("tls/zone.key")), 0o600);
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(
        log.contains("made it private"),
        "a warning names the change:\n{log}"
    );

    let dig = |flag: &str| {
        let out = Command::new("kdig")
            .args([
                &format!("@{ip}"),
                "-p",
                "5353",
                flag,
                "+timeout=5",
                "boxd.test",
                "SOA",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let with = dig("+dnssec");
    assert!(with.contains("flags: do;"), "{with}");
    let without = dig("+edns");
    assert!(
        without.contains("Version: 0;") && !without.contains("flags: do"),
        "{without}"
    );
}

/// Finding 7 (SSH): ssh-audit (PyPI) finds no failure at the lobby or at a VM's address, and
/// warns only that the X25519 and finite-field exchanges are not post-quantum — kept for
/// clients older than OpenSSH 9.9 (Debian 12 ships 9.2); such a client cannot avoid them, and
/// a newer one gets mlkem768x25519 first (dataplane/DESIGN.md).
#[test]
fn ssh_audit_finds_nothing_a_client_can_avoid() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.44.5";
    let ssh_port = 29262;
    let (node, _ready) = node(dir.path(), ip, HTTPS_PORT + 40, ssh_port, FAST_AUTH);
    vms_of_new_account(&node, &["audited"], "127.0.44.50");
    for target in ["127.77.0.1".to_owned(), public_ip(&node, "audited")] {
        let out = Command::new("python3")
            .args(["-m", "ssh_audit", "-j", "--skip-rate-test", "-p"])
            .arg(ssh_port.to_string())
            .arg(&target)
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ssh-audit {target}: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(report["cves"], json!([]), "{target}");
        let mut kex = Vec::new();
        for section in ["kex", "key", "enc", "mac"] {
            for alg in report[section].as_array().unwrap() {
                let name = alg["algorithm"].as_str().unwrap();
                assert!(
                    alg["notes"]["fail"].is_null(),
                    "{target} {section} {name}: {alg}"
                );
                for warn in alg["notes"]["warn"].as_array().into_iter().flatten() {
                    assert_eq!(
                        warn, "does not provide protection against post-quantum attacks",
                        "{target} {section} {name}"
                    );
                }
                if section == "kex" {
                    kex.push(name.to_owned());
                }
            }
        }
        assert_eq!(kex[0], "mlkem768x25519-sha256", "{target}: {kex:?}");
    }
}

/// testssl.sh (Debian) against the HTTPS front door: nothing rated HIGH or CRITICAL except the
/// local CA's certificate policy (a self-signed root, a 20-year leaf, no CRL or OCSP: a CA made
/// for one cluster, trusted by whoever chooses to; an operator certificate replaces it).
#[test]
fn testssl_finds_nothing_but_the_local_cas_policy() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.44.6";
    let port = HTTPS_PORT + 50;
    let (_node, _ready) = node(dir.path(), ip, port, 29272, FAST_AUTH);
    let json = dir.path().join("testssl.json");
    let out = Command::new("testssl")
        .args(["--quiet", "--color", "0", "--warnings", "off", "--jsonfile"])
        .arg(&json)
        .args(["--ip", "127.77.0.1"])
        .arg(format!("https://boxd.test:{port}"))
        .output()
        .unwrap();
    let findings: Value = serde_json::from_slice(&std::fs::read(&json).unwrap_or_default())
        .unwrap_or_else(|e| panic!("testssl: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    let policy = [
        "cert_chain_of_trust",
        "cert_validityPeriod",
        "cert_revocation",
    ];
    let mut serious = Vec::new();
    for f in findings.as_array().unwrap() {
        let severity = f["severity"].as_str().unwrap_or("");
        let id = f["id"].as_str().unwrap_or("");
        if matches!(severity, "HIGH" | "CRITICAL") && !policy.contains(&id) {
            serious.push(format!("{severity} {id}: {}", f["finding"]));
        }
    }
    assert!(serious.is_empty(), "{serious:#?}");
    assert!(
        findings.as_array().unwrap().len() > 50,
        "testssl ran its checks: {findings}"
    );
}

/// Finding 5 (SSH), its second half: addresses that fill a shard's handshake slots (here 8, 4
/// per address, a 30 s deadline) no longer keep a newcomer out — the busiest address's oldest
/// handshake gives way, and the owner gets in while the flood holds on.
#[test]
fn a_flood_of_handshakes_does_not_lock_the_owner_out() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.44.7";
    let ssh_port = 29282;
    let slots = "auth_timeout_secs = 30\nmax_handshakes_per_shard = 8\nmax_handshakes_per_ip = 4";
    let (_node, _ready) = node(dir.path(), ip, HTTPS_PORT + 60, ssh_port, slots);
    let lobby = format!("127.77.0.1:{ssh_port}");
    let _flood: Vec<_> = (1..=4)
        .map(|n| {
            let src = format!("127.0.46.{n}");
            spawn_ready(Command::new("python3").args([HOSTILE, "hold", &lobby, &src, "4", "25"]))
        })
        .map(KillOnDrop)
        .collect();
    let owner = dir.path().join("owner");
    keygen(&owner);
    let out = lobby_whoami(ssh_port, &owner);
    assert!(
        out.status.success(),
        "locked out by the flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("owner"));
}

/// Finding 2, the proxy's side: whatever answers at a VM's private address must hold the host
/// key its worker recorded for the VM's agent. An impostor there (a VM that took the address,
/// or one that got it while a route was stale) gets none of the owner's sessions, and the
/// owner is told the VM could not be verified; the VM's own agent gets them.
#[test]
fn only_the_vms_own_agent_gets_its_owners_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.44.8";
    let ssh_port = 29292;
    let (node, _ready) = node(dir.path(), ip, HTTPS_PORT + 70, ssh_port, FAST_AUTH);
    let owner_key = dir.path().join("owner");
    keygen(&owner_key);
    let whoami = ssh_at(ssh_port, &owner_key, "127.77.0.1", &["whoami", "--json"]);
    let owner = serde_json::from_slice::<Value>(&whoami.stdout).unwrap()["id"].clone();
    let cluster_key = dir.path().join("agent.pub");
    let public = node.admin().ok(&json!({"op": "agent-key"}))["public_key"].clone();
    std::fs::write(&cluster_key, public.as_str().unwrap()).unwrap();
    let (vm_key, impostor_key) = (dir.path().join("vm"), dir.path().join("impostor"));
    keygen(&vm_key);
    keygen(&impostor_key);
    let agent = |host_key: &Path| {
        KillOnDrop(boxd_tests::spawn_agent(
            Command::new(boxd_tests::agent_bin())
                .args(["--listen", "127.0.44.80:2200", "--authorized-key"])
                .arg(&cluster_key)
                .arg("--host-key")
                .arg(host_key),
        ))
    };
    let vm = running_vm(&node, &owner, "victim", 80, "127.0.44.80");
    let worker = node.admin().ok(&json!({"op": "vms"}))[0]["worker"].clone();
    let recorded = std::fs::read_to_string(vm_key.with_extension("pub")).unwrap();
    let recorded: Vec<&str> = recorded.split_whitespace().take(2).collect();
    write(
        &node,
        json!({"type": "set_agent_key", "vm": vm, "worker": worker, "key": recorded.join(" ")}),
    );
    let vm_ssh = || {
        ssh_at(
            ssh_port,
            &owner_key,
            &public_ip(&node, "victim"),
            &["echo inside"],
        )
    };
    {
        let _impostor = agent(&impostor_key);
        let out = vm_ssh();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(!out.status.success(), "the impostor ran it: {stdout}");
        assert!(!stdout.contains("inside"), "{stdout}");
        assert!(stderr.contains("victim could not be verified"), "{stderr}");
    }
    let _own = agent(&vm_key);
    let out = vm_ssh();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "inside\n");
}

/// Kills a child process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
