//! Sessions that end cleanly (issue 26): a user's SSH client that goes away — killed, its
//! network gone — takes its work in the VM with it. Driven with the real OpenSSH client through
//! `boxd up` to a guest agent running as a local process on a loopback "private address" (a
//! worker's report written through the admin socket stands in for the worker).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use boxd_tests::{
    Node, SSH_OPTS, UP, agent_bin, eventually, keygen, running_vm, spawn_agent, write_config,
};
use serde_json::{Value, json};

const IP: &str = "127.0.45.1";
const AGENT: &str = "127.0.45.30";
const PORT: u16 = 22250;

/// Kills a child process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `boxd up` (no worker) whose SSH front door listens at `PORT` on every address, a guest
/// agent at `AGENT`:2200 and a VM `myapp` of the first key's account routed to it; returns the
/// node, the agent, the key and the VM's public address.
fn setup(dir: &Path) -> (Node, KillOnDrop, std::path::PathBuf, String) {
    let cfg = write_config(dir, "sessions", &format!("{IP}:7000"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[ssh]\nlisten = \"{IP}:2222\""),
        &format!("[ssh]\nlisten = \"0.0.0.0:{PORT}\""),
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.join("data"), &cfg);
    node.wait_ready(Duration::from_secs(30));
    let key = dir.join("user");
    keygen(&key);
    let whoami = ssh(&key, "127.77.0.1", &["whoami", "--json"])
        .output()
        .unwrap();
    let owner = serde_json::from_slice::<Value>(&whoami.stdout).unwrap()["id"].clone();
    let cluster_key = dir.join("agent.pub");
    let public = node.admin().ok(&json!({"op": "agent-key"}))["public_key"].clone();
    std::fs::write(&cluster_key, public.as_str().unwrap()).unwrap();
    let agent = KillOnDrop(spawn_agent(
        Command::new(agent_bin())
            .args(["--listen", &format!("{AGENT}:2200"), "--authorized-key"])
            .arg(&cluster_key),
    ));
    running_vm(&node, &owner, "myapp", 80, AGENT);
    (node, agent, key, "127.77.0.2".to_owned())
}

/// OpenSSH's `ssh -p PORT -i key host args…`, not yet run.
fn ssh(key: &Path, host: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-p", &PORT.to_string(), "-i"])
        .arg(key)
        .args(SSH_OPTS)
        .args(["-o", "ConnectTimeout=10", host])
        .args(args)
        .stdin(Stdio::null());
    c
}

fn alive(pid: &str) -> bool {
    Path::new("/proc").join(pid.trim()).exists()
}

/// TCP connections between the proxy and the agent, as `ss` lists them.
fn agent_connections() -> usize {
    let out = Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "dst",
            &format!("{AGENT}:2200"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn listening(port: u16) -> bool {
    let out = Command::new("ss")
        .args(["-Hltn", "sport", &format!("= :{port}")])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// Finding 1: a client killed (SIGKILL, with and without a pty, and SIGTERM) ends its work in
/// the VM — the shell gets SIGHUP (its trap runs), what it started in the background ends with
/// it, the proxy's connection to the agent closes, and `-R` listeners go.
#[test]
fn a_client_that_goes_away_takes_its_work_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, _agent, key, vm) = setup(dir.path());
    let cases: [(&str, &[&str], libc::c_int); 3] = [
        ("kill -9, no pty", &[], libc::SIGKILL),
        ("kill -9, pty", &["-tt"], libc::SIGKILL),
        ("kill -TERM, no pty", &[], libc::SIGTERM),
    ];
    for (n, (what, opts, signal)) in cases.into_iter().enumerate() {
        let run = dir.path().join(format!("run{n}"));
        std::fs::create_dir(&run).unwrap();
        let r = run.display();
        let script =
            format!("trap 'echo hup > {r}/hup; exit 0' HUP; sleep 301 & echo $! > {r}/sleep; wait");
        let mut args: Vec<&str> = opts.to_vec();
        args.push(&script);
        let client = ssh(&key, &vm, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut client = KillOnDrop(client);
        let sleep = eventually(Duration::from_secs(10), "the command runs", || {
            std::fs::read_to_string(run.join("sleep"))
                .ok()
                .filter(|s| s.ends_with('\n'))
        });
        assert!(alive(&sleep), "{what}");
        // SAFETY: signals our own child.
        unsafe { libc::kill(client.0.id() as libc::pid_t, signal) };
        let _ = client.0.wait();
        eventually(Duration::from_secs(10), "the shell's HUP trap ran", || {
            run.join("hup").exists().then_some(())
        });
        eventually(Duration::from_secs(10), "the background job ended", || {
            (!alive(&sleep)).then_some(())
        });
        eventually(
            Duration::from_secs(10),
            "no connection to the agent",
            || (agent_connections() == 0).then_some(()),
        );
    }

    // A remote forward goes with its client.
    let port = 22259;
    let forward = format!("127.0.45.31:{port}:127.0.0.1:9");
    let client = ssh(&key, &vm, &["-R", &forward, "-N"]).spawn().unwrap();
    let mut client = KillOnDrop(client);
    eventually(Duration::from_secs(10), "the -R listener", || {
        listening(port).then_some(())
    });
    client.0.kill().unwrap();
    let _ = client.0.wait();
    eventually(Duration::from_secs(10), "the -R listener closes", || {
        (!listening(port)).then_some(())
    });
    eventually(
        Duration::from_secs(10),
        "no connection to the agent",
        || (agent_connections() == 0).then_some(()),
    );

    // A forward cancelled while the connection stays (`ssh -O cancel` through a master).
    let ctl = dir.path().join("ctl");
    let ctl = ctl.to_str().unwrap();
    let master = ssh(&key, &vm, &["-M", "-S", ctl, "-N"]).spawn().unwrap();
    let _master = KillOnDrop(master);
    eventually(Duration::from_secs(10), "the master connection", || {
        Path::new(ctl).exists().then_some(())
    });
    let control = |op: &str| {
        let out = ssh(&key, &vm, &["-S", ctl, "-O", op, "-R", &forward])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "-O {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    control("forward");
    eventually(Duration::from_secs(10), "the forwarded listener", || {
        listening(port).then_some(())
    });
    control("cancel");
    eventually(
        Duration::from_secs(10),
        "the cancelled listener closes",
        || (!listening(port)).then_some(()),
    );
}
