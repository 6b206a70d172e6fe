//! Harness for end-to-end tests: starts the built `boxd` binary as separate processes, reads
//! their "ready" lines, talks to their admin sockets and kills them like an operator (or a
//! crash) would. Nothing here reaches into boxd's internals.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use boxd_test_support::{SSH_OPTS, agent_bin, boxd_bin, keygen};

pub mod at;

/// `boxd up` without the worker role. Tests outside a network namespace of their own must not
/// run a worker (it creates a bridge for its VMs); where they need placed VMs, [`fake_worker`]
/// stands in. The journey test runs the real worker inside its own namespace.
pub const UP: [&str; 3] = ["up", "--role", "control,proxy,dns"];

/// A running (or stopped) boxd process.
pub struct Node {
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

/// Writes a config file for a node listening on `raft` with fast test timings.
/// Every listener goes on the raft address's IP (unique per test), so tests run in parallel.
pub fn write_config(dir: &Path, name: &str, raft: &str, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let ip = raft.rsplit_once(':').map_or(raft, |(ip, _)| ip);
    std::fs::write(
        &p,
        format!(
            "[node]\nname = \"{name}\"\nheartbeat_secs = 60\nroles = [\"control\", \"proxy\", \"dns\"]\n\n[dns]\nlisten = \"{ip}:5353\"\ncpus = [0]\n\n\
             [https]\nlisten = \"{ip}:8443\"\nredirect_listen = \"{ip}:8080\"\ncpus = [0]\n\n\
             [ssh]\nlisten = \"{ip}:2222\"\ncpus = [0]\n\n\
             [raft]\nlisten = \"{raft}\"\n{extra}\n"
        ),
    )
    .unwrap();
    p
}

impl Node {
    /// Starts `boxd <args> --data-dir <dir> --config <config>`.
    pub fn start(args: &[&str], data_dir: &Path, config: &Path) -> Node {
        Node::start_in(None, args, data_dir, config)
    }

    /// Like [`Node::start`], inside network namespace `netns` (`nsenter --net`, which execs
    /// boxd: the process is boxd itself).
    pub fn start_in(netns: Option<&Netns>, args: &[&str], data_dir: &Path, config: &Path) -> Node {
        let log = data_dir.with_extension("log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path().display()))
                    .arg(boxd_bin());
                c
            }
            None => Command::new(boxd_bin()),
        };
        let mut child = cmd
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config")
            .arg(config)
            // `TEST_BOXD_LOG=debug,russh=debug` to see more in `<data dir>.log`.
            .env(
                "BOXD_LOG",
                std::env::var("TEST_BOXD_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Node {
            data_dir: data_dir.to_owned(),
            config: config.to_owned(),
            child: Some(child),
            lines: rx,
            log,
        }
    }

    /// Waits for the "boxd ready:" line and returns it.
    pub fn wait_ready(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("boxd ready:") => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "{} not ready within {timeout:?}; log:\n{}",
                    self.data_dir.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// Further stdout lines received so far.
    pub fn drain_stdout(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("node is running");
        let pid = i32::try_from(c.id()).unwrap();
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The admin socket path.
    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    /// Opens an admin connection; when the node does not answer, fails with the end of its
    /// log (why it is gone).
    pub fn admin(&self) -> Admin {
        Admin::try_connect(&self.socket()).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "admin socket {}: {e}; the node's log ends:\n{}",
                self.socket().display(),
                tail.join("\n")
            )
        })
    }

    /// `status` result.
    pub fn status(&self) -> Value {
        self.admin().ok(&serde_json::json!({"op": "status"}))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A connection to an admin socket.
pub struct Admin {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Admin {
    /// Connects, retrying for a few seconds while the node starts.
    pub fn connect(path: &Path) -> Admin {
        Self::try_connect(path).unwrap_or_else(|e| panic!("admin socket {}: {e}", path.display()))
    }

    /// [`Admin::connect`], returning the last error instead of failing.
    pub fn try_connect(path: &Path) -> std::io::Result<Admin> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    // A hung node fails the test instead of hanging it.
                    s.set_read_timeout(Some(Duration::from_secs(120)))?;
                    return Ok(Admin {
                        reader: BufReader::new(s.try_clone()?),
                        writer: s,
                    });
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one raw line and returns the reply object.
    pub fn raw(&mut self, line: &[u8]) -> Value {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    /// Sends a request and returns the whole reply.
    pub fn call(&mut self, req: &Value) -> Value {
        self.raw(req.to_string().as_bytes())
    }

    /// Sends a request that must succeed and returns its result.
    pub fn ok(&mut self, req: &Value) -> Value {
        let r = self.call(req);
        assert_eq!(r["ok"], true, "{req} -> {r}");
        r["result"].clone()
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wall-clock milliseconds, for commands written through the admin socket.
pub fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// The value of `key=` in a ready line.
pub fn ready_field<'a>(ready: &'a str, key: &str) -> &'a str {
    ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {ready}"))
}

/// Writes a log command through `node`'s admin socket; panics if the log refuses it.
pub fn write(node: &Node, command: Value) {
    let r = node
        .admin()
        .ok(&serde_json::json!({"op": "write", "command": command}));
    assert!(r["refused"].is_null(), "{command} -> {r}");
}

/// Registers (once) a worker node that no process runs, heartbeats it so the scheduler sees it
/// alive, and returns its id. Tests write its reports themselves.
pub fn fake_worker(node: &Node) -> Value {
    let cap = serde_json::json!({"vcpus": 1000, "memory_mib": 1_000_000, "disk_gib": 10_000});
    let r = node
        .admin()
        .ok(&serde_json::json!({"op": "write", "command": {
        "type": "register_node", "id": null, "uuid": "00000000-0000-4000-8000-00000000f00d",
        "name": "fake-worker", "roles": ["worker"], "raft_addr": "127.0.0.1:9",
        "capacity": cap, "at": now_ms()}}));
    let id = r["outcome"]["id"].clone();
    assert!(id.is_u64(), "register_node -> {r}");
    write(
        node,
        serde_json::json!({"type": "heartbeat", "node": id, "capacity": cap, "at": now_ms()}),
    );
    id
}

/// Creates VM `name` for `owner` and, once the scheduler has placed it on the [`fake_worker`],
/// reports it running at `private_ip` as that worker. Returns its id.
pub fn running_vm(
    node: &Node,
    owner: &Value,
    name: &str,
    http_port: u16,
    private_ip: &str,
) -> Value {
    let worker = fake_worker(node);
    let vm = Value::String(uuid_v4());
    write(
        node,
        serde_json::json!({"type": "create_vm", "id": vm, "owner": owner, "name": name,
            "http_port": http_port, "at": now_ms(),
            "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}}),
    );
    eventually(Duration::from_secs(20), "the VM is placed", || {
        let vms = node.admin().ok(&serde_json::json!({"op": "vms"}));
        vms.as_array()?
            .iter()
            .any(|v| v["id"] == vm && v["worker"] == worker)
            .then_some(())
    });
    write(
        node,
        serde_json::json!({"type": "report_vm", "vm": vm, "worker": worker, "observed": "running",
            "private_ip": private_ip, "at": now_ms()}),
    );
    vm
}

fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A network namespace made by a test (`ip netns add`), with loopback up; deleted on drop.
/// Bridges, veths and addresses a test creates live only in here.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `boxd-<tag>-<pid>`.
    pub fn new(tag: &str) -> Netns {
        let name = format!("boxd-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "ip netns add {name} failed: this test needs root and iproute2"
        );
        let ok = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "loopback up in {name}");
        Netns { name }
    }

    /// Its name (for `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Spawns `cmd` with its stdout piped and waits for its first line to be `ready` (the test
/// fixtures' servers print it once they listen).
pub fn spawn_ready(cmd: &mut Command) -> Child {
    let (child, line) = spawn_first_line(cmd);
    assert_eq!(line.trim(), "ready", "{cmd:?}");
    child
}

/// Spawns a guest agent (`cmd` runs [`agent_bin`]) and waits until it listens.
pub fn spawn_agent(cmd: &mut Command) -> Child {
    let (child, line) = spawn_first_line(cmd);
    assert!(line.starts_with("boxd-agent ready"), "{cmd:?}: {line}");
    child
}

/// Spawns `cmd` with its stdout piped; returns it and its first line.
fn spawn_first_line(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}
