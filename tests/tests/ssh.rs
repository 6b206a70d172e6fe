//! The SSH front door of `boxd up`, driven with the real OpenSSH client: the first key claims
//! the cluster, unknown keys get a registration link, every lobby command with its exit status
//! and `--json`, `keys add` from stdin, `new` waiting until the VM runs (a worker's report
//! written through the admin socket stands in for the worker), the interactive prompt with and
//! without a pty, routing by (key, dialled address) with a second user's key refused, the host
//! key kept across restarts, and the handshake limits.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use boxd_test_support::fingerprint;
use boxd_tests::{
    Node, SSH_OPTS, UP, eventually, fake_worker, now_ms, ready_field as field, running_vm, write,
    write_config,
};
use serde_json::{Value, json};
use uuid::Uuid;

const IP: &str = "127.0.42.1";
const PORT: u16 = 22222;
const LOBBY: &str = "127.77.0.1";

/// A key pair made by ssh-keygen; returns the private key path.
fn keygen(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&p)
        .status()
        .unwrap();
    assert!(st.success());
    p
}

struct Ssh<'a> {
    key: &'a Path,
    host: &'a str,
    port: u16,
    extra: Vec<String>,
    stdin: Vec<u8>,
}

fn ssh<'a>(key: &'a Path, host: &'a str) -> Ssh<'a> {
    Ssh {
        key,
        host,
        port: PORT,
        extra: Vec::new(),
        stdin: Vec::new(),
    }
}

impl Ssh<'_> {
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }

    fn opt(mut self, o: &str) -> Self {
        self.extra.push(o.to_owned());
        self
    }

    fn stdin(mut self, s: &[u8]) -> Self {
        self.stdin = s.to_vec();
        self
    }

    fn command(&self, remote: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-p", &self.port.to_string(), "-i"])
            .arg(self.key)
            .args(SSH_OPTS)
            .args(["-o", "ConnectTimeout=10"])
            .args(&self.extra)
            .arg(self.host)
            .args(remote);
        c
    }

    fn run(&self, remote: &[&str]) -> (i32, String, String) {
        let mut child = self
            .command(remote)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&self.stdin).unwrap();
        drop(stdin);
        let out: Output = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn start(dir: &Path, extra: &str) -> (Node, String) {
    let cfg = write_config(dir, "ssh", &format!("{IP}:7000"), extra);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[ssh]\nlisten = \"{IP}:2222\""),
        &format!("[ssh]\nlisten = \"0.0.0.0:{PORT}\"\nauth_timeout_secs = 3\nmax_handshakes_per_ip = 3\nready_timeout_secs = 30"),
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.join("data"), &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    (node, ready)
}

#[test]
fn openssh_drives_the_lobby_and_reaches_only_its_own_vms() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, ready) = start(dir.path(), "");
    assert_eq!(field(&ready, "ssh"), format!("0.0.0.0:{PORT}"));
    let host_key = field(&ready, "ssh_host_key").to_owned();
    let alice = keygen(dir.path(), "alice");
    let bob = keygen(dir.path(), "bob");
    let carol = keygen(dir.path(), "carol");

    // The first key on a fresh cluster owns it.
    let (code, out, err) = ssh(&alice, LOBBY).run(&["whoami", "--json"]);
    assert_eq!(code, 0, "{err}");
    let me: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(me["account"], "owner");
    assert_eq!(me["key"], fingerprint(&alice));
    // ... and is told so, once (issue 26, finding 8).
    assert!(
        err.contains("now owns boxd.test: it was the first to connect"),
        "{err}"
    );
    let (_, _, err) = ssh(&alice, LOBBY).run(&["whoami"]);
    assert!(!err.contains("now owns"), "{err}");

    // A later unknown key gets a registration link, the same one on a second try.
    let (code, out, err) = ssh(&bob, LOBBY).run(&["ls"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.contains(&fingerprint(&bob)) && err.contains("https://boxd.test:8443/register/"),
        "{err}"
    );
    let link = |e: &str| {
        e.split_whitespace()
            .find(|w| w.contains("/register/"))
            .unwrap()
            .to_owned()
    };
    let (_, _, err2) = ssh(&bob, LOBBY).run(&["ls"]);
    assert_eq!(link(&err), link(&err2));

    // `keys add` reads the key from stdin; then bob's key is alice's account too.
    let bob_pub = std::fs::read(bob.with_extension("pub")).unwrap();
    let (code, out, err) = ssh(&alice, LOBBY).stdin(&bob_pub).run(&["keys", "add"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("added {}", fingerprint(&bob)));
    let (code, out, _) = ssh(&bob, LOBBY).run(&["whoami"]);
    assert_eq!(code, 0);
    assert!(out.contains("owner"), "{out}");
    let (_, out, _) = ssh(&alice, LOBBY).run(&["keys", "--json"]);
    let keys: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2, "{keys}");
    let (code, _, err) = ssh(&alice, LOBBY)
        .stdin(b"not a key\n")
        .run(&["keys", "add"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("boxd: not an OpenSSH public key"), "{err}");
    let (code, out, err) = ssh(&alice, LOBBY).run(&["keys", "rm", &fingerprint(&bob)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("removed"), "{out}");
    assert_eq!(
        ssh(&bob, LOBBY).run(&["whoami"]).0,
        1,
        "bob is unknown again"
    );

    // Bad commands: a one-line reason on stderr and a non-zero status.
    for (args, want, needle) in [
        (&["frobnicate"][..], 2, "unknown command"),
        (&["new", "--cpus=lots"][..], 2, "not a number"),
        (&["new", "--name=Bad_Name"][..], 2, "not valid"),
        (&["show", "nope"][..], 1, "no VM named nope"),
        (&["rm", "nope"][..], 1, "no VM named nope"),
        (&["new", "--name='unterminated"][..], 2, "unbalanced quotes"),
    ] {
        let (code, out, err) = ssh(&alice, LOBBY).run(args);
        assert_eq!(code, want, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let (code, out, _) = ssh(&alice, LOBBY).run(&["help"]);
    assert_eq!(code, 0);
    assert!(out.contains("new [NAME | --name=NAME]"), "{out}");

    // `new` waits until the VM runs; the worker's report arrives while it waits.
    let mut new = ssh(&alice, LOBBY)
        .command(&["new", "--name=web", "--memory=1G"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let node_id = fake_worker(&node);
    let vm = eventually(Duration::from_secs(20), "web is placed", || {
        let vms = node.admin().ok(&json!({"op": "vms"}));
        vms.as_array()?
            .iter()
            .find(|v| v["name"] == "web" && !v["worker"].is_null())
            .map(|v| v["id"].clone())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        new.try_wait().unwrap().is_none(),
        "new returned before the VM ran"
    );
    write(
        &node,
        json!({"type": "report_vm", "vm": vm, "worker": node_id, "observed": "running",
               "private_ip": "10.0.0.2", "at": now_ms()}),
    );
    let out = new.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("creating web: 1 vCPU, 1024 MiB memory"),
        "{stderr}"
    );
    assert!(stdout.starts_with("web\n"), "{stdout}");
    assert!(stdout.contains("127.77.0.2"), "{stdout}");
    assert!(
        stdout.contains(&format!("ssh -p {PORT} web.boxd.test")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("https://web.boxd.test:{}/", 8443)),
        "{stdout}"
    );

    let (_, out, _) = ssh(&alice, LOBBY).run(&["ls", "--json"]);
    let vms: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vms[0]["name"], "web");
    assert_eq!(vms[0]["state"], "running");
    assert_eq!(vms[0]["memory_mib"], 1024);
    let (code, _, err) = ssh(&alice, LOBBY).run(&["new", "--name=web"]);
    assert_eq!(code, 1);
    assert!(err.contains("taken"), "{err}");

    // The interactive prompt: a line editor under a pty, plain lines without one.
    let (code, out, _) = ssh(&alice, LOBBY).opt("-tt").stdin(b"ls\rexit\r").run(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Welcome to boxd.test")
            && out.contains("boxd> ")
            && out.contains("127.77.0.2  "),
        "{out}"
    );
    let (code, out, err) = ssh(&alice, LOBBY)
        .opt("-T")
        .stdin(b"whoami\nfrobnicate\n")
        .run(&[]);
    assert_eq!(code, 2, "the last command's status");
    assert!(out.contains("account  owner"), "{out}");
    assert!(err.contains("unknown command"), "{err}");

    // Sessions to the VM's address: routed by key and address.
    bob_gets_his_own_account(&node, &bob);
    let (code, out, err) = ssh(&bob, "127.77.0.2").run(&["true"]);
    assert_eq!((code, out.as_str()), (255, ""));
    assert!(
        err.contains("none of your VMs has the address 127.77.0.2"),
        "{err}"
    );
    assert!(!err.contains("web"), "nothing about alice's VM: {err}");
    let (code, _, err) = ssh(&carol, "127.77.0.2").run(&["true"]);
    assert_eq!(code, 255);
    assert!(err.contains("none of your VMs"), "{err}");
    let (code, _, err) = ssh(&alice, LOBBY).run(&["stop", "web"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ssh(&alice, "127.77.0.2").run(&["true"]);
    assert_eq!(code, 255);
    assert!(
        err.contains("web is stopped: start it with `ssh boxd.test start web`"),
        "{err}"
    );

    // `rm` frees the name.
    let (code, out, _) = ssh(&alice, LOBBY).run(&["rm", "web"]);
    assert_eq!((code, out.trim()), (0, "deleted web"));
    assert_eq!(ssh(&alice, LOBBY).run(&["show", "web"]).0, 1);

    // Addresses that are not the lobby or the pool get nothing.
    let mut s = TcpStream::connect((IP, PORT)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        s.read(&mut buf).unwrap(),
        0,
        "closed at once, without a banner"
    );

    // The host key lives in the replica: the same after a restart.
    let scanned = keyscan();
    assert_eq!(scanned, host_key);
    node.terminate();
    let (_node, ready) = start(dir.path(), "");
    assert_eq!(field(&ready, "ssh_host_key"), host_key);
    assert_eq!(keyscan(), host_key);
}

fn bob_gets_his_own_account(node: &Node, bob: &Path) {
    let id = Uuid::new_v4();
    write(
        node,
        json!({"type": "create_account", "id": id, "name": "bob", "max_vms": null, "at": now_ms()}),
    );
    let public_key = std::fs::read_to_string(bob.with_extension("pub")).unwrap();
    write(
        node,
        json!({"type": "add_ssh_key", "account": id, "fingerprint": fingerprint(bob),
               "public_key": public_key.trim(), "at": now_ms()}),
    );
}

/// The lobby's host key fingerprint as the client sees it.
fn keyscan() -> String {
    let out = Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &PORT.to_string(), LOBBY])
        .output()
        .unwrap();
    let mut child = Command::new("ssh-keygen")
        .args(["-lf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn silent_and_excess_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_ip = "127.0.42.2";
    let cfg = write_config(dir.path(), "ssh2", &format!("{cfg_ip}:7000"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[ssh]\nlisten = \"{cfg_ip}:2222\""),
        "[ssh]\nlisten = \"0.0.0.0:22223\"\nauth_timeout_secs = 2\nmax_handshakes_per_ip = 2",
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.path().join("data"), &cfg);
    node.wait_ready(Duration::from_secs(30));

    // Some(text) for data, None once the server has closed; a read timeout fails the test.
    let banner = |s: &mut TcpStream| -> Option<String> {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    };
    let connect = || {
        let s = TcpStream::connect((LOBBY, 22223)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    // Two silent clients hold this address's two handshake slots; a third is dropped.
    let mut a = connect();
    let mut b = connect();
    assert!(banner(&mut a).unwrap().starts_with("SSH-2.0-boxd"));
    assert!(banner(&mut b).unwrap().starts_with("SSH-2.0-boxd"));
    let mut c = connect();
    assert_eq!(banner(&mut c), None, "over the per-address handshake limit");
    // A client that never authenticates is cut off after auth_timeout_secs.
    let t = Instant::now();
    assert_eq!(banner(&mut a), None);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    // Its slot is free again.
    let mut d = eventually(Duration::from_secs(5), "a slot frees", || {
        let mut d = connect();
        banner(&mut d).map(|_| d)
    });
    // Lines that are not a version line do not hold a slot past the deadline either (the
    // read timeout is 10 s, so a connection left open would fail the time check).
    let t = Instant::now();
    let _ = d.write_all(b"garbage that is not SSH\r\n");
    assert_eq!(banner(&mut d), None);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(node);
}

/// A guest agent running as a local process on a loopback "private address".
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(listen: &str, authorized_key: &Path) -> Agent {
    let mut c = Command::new(boxd_tests::agent_bin());
    c.args(["--listen", listen, "--authorized-key"])
        .arg(authorized_key);
    spawn_agent(c)
}

fn spawn_agent(mut c: Command) -> Agent {
    Agent(boxd_tests::spawn_agent(&mut c))
}

/// The body at `url` once something answers there (a tunnel coming up).
fn fetch_when_up(url: &str) -> String {
    eventually(Duration::from_secs(10), url, || {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "2", url])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// scp/sftp options matching `Ssh::command`'s.
fn copy_opts(key: &Path, port: u16) -> Vec<String> {
    let mut v = vec![
        "-P".to_owned(),
        port.to_string(),
        "-i".to_owned(),
        key.display().to_string(),
    ];
    v.extend(SSH_OPTS.map(str::to_owned));
    v
}

#[test]
fn vm_sessions_are_relayed_to_the_guest_agent() {
    const AGENT: &str = "127.0.42.30";
    const WEB: &str = "127.0.42.31";
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.42.3";
    let port: u16 = 22224;
    let cfg = write_config(dir.path(), "relay", &format!("{ip}:7000"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[ssh]\nlisten = \"{ip}:2222\""),
        &format!("[ssh]\nlisten = \"0.0.0.0:{port}\""),
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.path().join("data"), &cfg);
    node.wait_ready(Duration::from_secs(30));
    let alice = keygen(dir.path(), "alice");
    let bob = keygen(dir.path(), "bob");
    let at = |host: &'static str| ssh(&alice, host).port(port);
    assert_eq!(at(LOBBY).run(&["whoami"]).0, 0, "alice owns the cluster");

    // The agent authorises only the cluster's agent key.
    let key = node.admin().ok(&json!({"op": "agent-key"}))["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(key.starts_with("ssh-ed25519 "), "{key}");
    let key_file = dir.path().join("agent.pub");
    std::fs::write(&key_file, &key).unwrap();
    let _agent = agent(&format!("{AGENT}:2200"), &key_file);

    // The agent takes AES-GCM, which the relay asks it for first (a key it does not authorise
    // gets as far as authentication, not "no matching cipher").
    let (code, _, err) = ssh(&alice, AGENT)
        .port(2200)
        .opt("-c")
        .opt("aes128-gcm@openssh.com")
        .run(&["true"]);
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("Permission denied (publickey)"), "{err}");

    // A VM whose private address is the agent's (a worker's report stands in for the worker).
    let owner =
        serde_json::from_str::<Value>(&at(LOBBY).run(&["whoami", "--json"]).1).unwrap()["id"]
            .clone();
    running_vm(&node, &owner, "myapp", 80, AGENT);
    let vmip = "127.77.0.2";

    // exec: output, exit status, stdin EOF, env.
    let (code, out, err) = at(vmip).run(&["echo hi; exit 3"]);
    assert_eq!((code, out.as_str()), (3, "hi\n"), "{err}");
    let (code, out, _) = at(vmip).stdin(&[b'x'; 1000]).run(&["wc -c"]);
    assert_eq!((code, out.trim()), (0, "1000"));
    let (_, out, _) = at(vmip)
        .opt("-o")
        .opt("SetEnv=GREETING=hello")
        .run(&["echo $GREETING"]);
    assert_eq!(out.trim(), "hello");
    let (code, out, _) = at(vmip).run(&["echo before; kill -TERM $$"]);
    assert_eq!(
        (code, out.as_str()),
        (255, "before\n"),
        "killed by a signal"
    );

    // A pty: a login shell on a terminal.
    let (code, out, _) = at(vmip).opt("-tt").stdin(b"tty; exit 7\r").run(&[]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");

    // Window changes reach the shell: a real pty for the client, resized mid-session.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/pty_resize.py");
    let mut args = at(vmip)
        .command(&[])
        .get_args()
        .map(|a| a.to_os_string())
        .collect::<Vec<_>>();
    args.insert(0, "-t".into());
    let out = Command::new("python3")
        .arg(script)
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "24 80\n40 100\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 100 MiB each way with scp (SFTP protocol), checked by sha256; sftp itself.
    let up = dir.path().join("up.bin");
    let st = Command::new("head")
        .args(["-c", "104857600", "/dev/urandom"])
        .stdout(std::fs::File::create(&up).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let remote = dir.path().join("remote.bin");
    let back = dir.path().join("back.bin");
    let opts = copy_opts(&alice, port);
    let st = Command::new("scp")
        .args(&opts)
        .arg(&up)
        .arg(format!("{vmip}:{}", remote.display()))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(sha256(&remote), sha256(&up));
    let st = Command::new("scp")
        .args(&opts)
        .arg(format!("{vmip}:{}", remote.display()))
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(sha256(&back), sha256(&up));
    let mut sftp = Command::new("sftp")
        .args(&opts)
        .args(["-b", "-", vmip])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(sftp.stdin.take().unwrap(), "ls -l {}", remote.display()).unwrap();
    let out = sftp.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("104857600"));

    // ssh -L: a web server inside the "VM" reached through a local port.
    let web_root = dir.path().join("www");
    std::fs::create_dir(&web_root).unwrap();
    std::fs::write(web_root.join("index.html"), "through the tunnel\n").unwrap();
    let mut web = Command::new("python3")
        .args(["-m", "http.server", "8000", "--bind", WEB])
        .current_dir(&web_root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // ssh -L reaches the "VM"'s web server from a local port; ssh -R makes the "VM" listen on
    // 127.0.42.33:18002 and forwards back to the client's side.
    for (flag, spec, url) in [
        (
            "-L",
            format!("127.0.42.32:18001:{WEB}:8000"),
            "http://127.0.42.32:18001/index.html",
        ),
        (
            "-R",
            format!("127.0.42.33:18002:{WEB}:8000"),
            "http://127.0.42.33:18002/index.html",
        ),
    ] {
        let mut tunnel = at(vmip)
            .opt("-N")
            .opt("-o")
            .opt("ExitOnForwardFailure=yes")
            .opt(flag)
            .opt(&spec)
            .command(&[])
            .spawn()
            .unwrap();
        assert_eq!(fetch_when_up(url), "through the tunnel\n", "{flag}");
        let _ = tunnel.kill();
        let _ = tunnel.wait();
    }
    let _ = web.kill();
    let _ = web.wait();

    // A second user's key reaches nothing at that address; nor can it talk to the agent.
    bob_gets_his_own_account(&node, &bob);
    let (code, out, err) = ssh(&bob, vmip).port(port).run(&["echo hi"]);
    assert_eq!((code, out.as_str()), (255, ""));
    assert!(err.contains("none of your VMs"), "{err}");
    let (code, out, _) = ssh(&alice, AGENT)
        .port(2200)
        .opt("-o")
        .opt("BatchMode=yes")
        .run(&["echo hi"]);
    assert_eq!(
        (code, out.as_str()),
        (255, ""),
        "the agent refuses user keys"
    );
}

#[test]
fn commands_run_inside_the_minimal_image() {
    const AGENT: &str = "127.0.42.40";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(boxd_tests::boxd_bin())
        .args(["image", "build", "minimal", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("built image minimal ("), "{stdout}");
    let ls = Command::new(boxd_tests::boxd_bin())
        .args(["image", "ls", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let images: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(images[0]["name"], "minimal");
    let rootfs = data.join("images/minimal/rootfs");

    let ip = "127.0.42.4";
    let port: u16 = 22225;
    let cfg = write_config(dir.path(), "image", &format!("{ip}:7000"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[ssh]\nlisten = \"{ip}:2222\""),
        &format!("[ssh]\nlisten = \"0.0.0.0:{port}\""),
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &data, &cfg);
    node.wait_ready(Duration::from_secs(30));
    let alice = keygen(dir.path(), "alice");
    let (code, out, _) = ssh(&alice, LOBBY).port(port).run(&["whoami", "--json"]);
    assert_eq!(code, 0);
    let owner = serde_json::from_str::<Value>(&out).unwrap()["id"].clone();
    // The agent inside the image's tree (chroot stands in for the sandbox runtime here).
    let key = node.admin().ok(&json!({"op": "agent-key"}))["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(rootfs.join("etc/boxd/agent.pub"), &key).unwrap();
    let mut c = Command::new("chroot");
    c.arg(&rootfs).args([
        "/usr/local/bin/boxd-agent",
        "--listen",
        &format!("{AGENT}:2200"),
        "--authorized-key",
        "/etc/boxd/agent.pub",
    ]);
    let _agent = spawn_agent(c);
    running_vm(&node, &json!(owner), "tiny", 80, AGENT);
    let (code, out, err) = ssh(&alice, "127.77.0.2")
        .port(port)
        .run(&["cat /etc/hostname; echo $HOME $SHELL; busybox | head -1 | cut -c1-7"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "vm\n/root /bin/sh\nBusyBox\n");
}
