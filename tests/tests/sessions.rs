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

/// The agent's address in the first test (each test has its own addresses and port).
const AGENT: &str = "127.0.45.30";

/// Kills a child process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One test's boxd, agent and user.
struct Env {
    _node: Node,
    agent: KillOnDrop,
    key: std::path::PathBuf,
    /// The VM's public address.
    vm: String,
    port: u16,
}

/// `boxd up` (no worker) on `127.0.45.<10n+1>` whose SSH front door listens at `22250 + n` on
/// every address, a guest agent at `127.0.45.<10n+30>`:2200 and a VM `myapp` of the first
/// key's account routed to it.
fn setup(dir: &Path, n: u8) -> Env {
    let (ip, agent_ip, port) = (
        format!("127.0.45.{}", 10 * n + 1),
        format!("127.0.45.{}", 10 * n + 30),
        22250 + u16::from(n),
    );
    let cfg = write_config(dir, "sessions", &format!("{ip}:7000"), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("[ssh]\nlisten = \"{ip}:2222\""),
        &format!("[ssh]\nlisten = \"0.0.0.0:{port}\""),
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.join("data"), &cfg);
    node.wait_ready(Duration::from_secs(30));
    let key = dir.join("user");
    keygen(&key);
    let whoami = ssh(port, &key, "127.77.0.1", &["whoami", "--json"])
        .output()
        .unwrap();
    let owner = serde_json::from_slice::<Value>(&whoami.stdout).unwrap()["id"].clone();
    let cluster_key = dir.join("agent.pub");
    let public = node.admin().ok(&json!({"op": "agent-key"}))["public_key"].clone();
    std::fs::write(&cluster_key, public.as_str().unwrap()).unwrap();
    let agent = KillOnDrop(spawn_agent(
        Command::new(agent_bin())
            .args(["--listen", &format!("{agent_ip}:2200"), "--authorized-key"])
            .arg(&cluster_key),
    ));
    running_vm(&node, &owner, "myapp", 80, &agent_ip);
    Env {
        _node: node,
        agent,
        key,
        vm: "127.77.0.2".to_owned(),
        port,
    }
}

/// OpenSSH's `ssh -p port -i key host args…`, not yet run.
fn ssh(port: u16, key: &Path, host: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-p", &port.to_string(), "-i"])
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
    let env = setup(dir.path(), 0);
    let (key, vm, port) = (&env.key, &env.vm, env.port);
    let ssh = |key: &Path, host: &str, args: &[&str]| ssh(port, key, host, args);
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
        let client = ssh(key, vm, &args)
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
    let client = ssh(key, vm, &["-R", &forward, "-N"]).spawn().unwrap();
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
    let master = ssh(key, vm, &["-M", "-S", ctl, "-N"]).spawn().unwrap();
    let _master = KillOnDrop(master);
    eventually(Duration::from_secs(10), "the master connection", || {
        Path::new(ctl).exists().then_some(())
    });
    let control = |op: &str| {
        let out = ssh(key, vm, &["-S", ctl, "-O", op, "-R", &forward])
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

/// Finding 5: 10 MB of garbage piped into the lobby's prompt ends with an error that says why,
/// in bounded time, and boxd still answers.
#[test]
fn garbage_into_the_prompt_ends_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let env = setup(dir.path(), 1);
    let (key, port) = (&env.key, env.port);
    let garbage = dir.path().join("garbage");
    let out = Command::new("head")
        .args(["-c", "10000000", "/dev/urandom"])
        .output()
        .unwrap();
    std::fs::write(&garbage, &out.stdout).unwrap();
    let t = std::time::Instant::now();
    let out = Command::new("timeout")
        .args(["60", "ssh"])
        .args(ssh(port, key, "127.77.0.1", &[]).get_args())
        .stdin(std::fs::File::open(&garbage).unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(124),
        "still open after {:?}",
        t.elapsed()
    );
    assert_ne!(out.status.code(), Some(0));
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("closing"), "{last}");
    let again = ssh(port, key, "127.77.0.1", &["whoami"]).output().unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// Finding 8: the prompt under a pty recalls the last line with Up (an arrow key is not typed
/// as `[A`), and an error comes before the next prompt (one stream under a pty).
#[test]
fn the_prompt_edits_lines_and_keeps_errors_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let env = setup(dir.path(), 2);
    let mut client = ssh(env.port, &env.key, "127.77.0.1", &["-tt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    for keys in [&b"bogus\r"[..], b"\x1b[A\r", b"exit\r"] {
        std::io::Write::write_all(&mut stdin, keys).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(stdin);
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("[A"), "an arrow key typed as text: {text:?}");
    let error = "unknown command `bogus`";
    assert_eq!(
        text.matches(error).count(),
        2,
        "Up recalls the line: {text:?}"
    );
    // Each error is followed by the next prompt, never preceded by it.
    for piece in text.split(error).skip(1) {
        assert!(piece.contains("boxd> "), "{text:?}");
        assert!(!piece.starts_with("boxd> "), "{text:?}");
    }
    let after_first = text.split(error).nth(1).unwrap();
    assert!(
        after_first.find("boxd> ").unwrap() > after_first.find('\n').unwrap(),
        "the prompt after the error's line: {text:?}"
    );
}

/// Finding 6: an open session ends with a sentence, not a bare exit 255, when its VM's agent
/// goes away (the VM's process ended) and when its owner stops the VM.
#[test]
fn sessions_say_why_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = setup(dir.path(), 3);
    let session = |env: &Env| {
        let client = ssh(env.port, &env.key, &env.vm, &["sleep 300"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        client
    };
    let ended = |client: Child| {
        let out = client.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // The agent goes away (as when the VM's process is killed).
    let client = session(&env);
    let _ = env.agent.0.kill();
    let _ = env.agent.0.wait();
    let err = ended(client);
    assert!(
        err.contains("the connection to myapp ended before its command did"),
        "{err}"
    );

    // The owner stops the VM while a session runs.
    env.agent = KillOnDrop(spawn_agent(
        Command::new(agent_bin())
            .args(["--listen", "127.0.45.60:2200", "--authorized-key"])
            .arg(dir.path().join("agent.pub")),
    ));
    let client = session(&env);
    let stop = ssh(env.port, &env.key, "127.77.0.1", &["stop", "myapp"])
        .output()
        .unwrap();
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let err = ended(client);
    assert!(
        err.contains("myapp was stopped by its owner; this session ends"),
        "{err}"
    );
}

/// Finding 8: `ssh -A` reaches the user's agent from inside the VM — `SSH_AUTH_SOCK` is set and
/// OpenSSH's `ssh-add -l` there lists the key held by the user's `ssh-agent` — and the socket
/// goes with the session. Without `-A` there is no socket.
#[test]
fn agent_forwarding_reaches_the_users_agent() {
    let dir = tempfile::tempdir().unwrap();
    let env = setup(dir.path(), 4);
    let sock = dir.path().join("agent.sock");
    let _agent = KillOnDrop(
        Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(Duration::from_secs(10), "ssh-agent listening", || {
        sock.exists().then_some(())
    });
    let add = Command::new("ssh-add")
        .arg(&env.key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let fingerprint = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(env.key.with_extension("pub"))
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&fingerprint.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();

    let run = |forward: &str| {
        // Options go before the host: after it they would be part of the command.
        let out = Command::new("ssh")
            .args(["-p", &env.port.to_string(), "-i"])
            .arg(&env.key)
            .args(SSH_OPTS)
            .args(["-o", &format!("ForwardAgent={forward}"), &env.vm])
            .arg("echo ${SSH_AUTH_SOCK:-none}; ssh-add -l")
            .env("SSH_AUTH_SOCK", &sock)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run("yes");
    let mut lines = out.lines();
    let inside = lines.next().unwrap_or_default().to_owned();
    assert!(inside.starts_with("/tmp/ssh-"), "{out}");
    assert!(out.contains(&fingerprint), "{out}");
    eventually(Duration::from_secs(10), "the socket removed", || {
        (!Path::new(&inside).exists()).then_some(())
    });
    let out = run("no");
    assert!(out.starts_with("none\n"), "{out}");
    assert!(!out.contains(&fingerprint), "{out}");
}

/// The hostile side of `-A`: a VM whose root replaced its agent opens an agent channel towards
/// a user who did not forward one. The proxy refuses it itself — the user's client never sees
/// the attempt (OpenSSH would print "ssh server tried agent forwarding") — and lets it through
/// once the user forwards an agent.
#[test]
fn a_vm_gets_no_agent_channel_unless_the_user_forwards_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = setup(dir.path(), 5);
    let _ = env.agent.0.kill();
    let _ = env.agent.0.wait();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.spawn(hostile::serve("127.0.45.80:2200".parse().unwrap()));
    let sock = dir.path().join("agent.sock");
    let _agent = KillOnDrop(
        Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let run = |forward: &str| {
        let out = Command::new("timeout")
            .args(["20", "ssh"])
            .args(["-p", &env.port.to_string(), "-i"])
            .arg(&env.key)
            .args(SSH_OPTS)
            .args([
                "-o",
                &format!("ForwardAgent={forward}"),
                &env.vm,
                "anything",
            ])
            .env("SSH_AUTH_SOCK", &sock)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, err) = run("no");
    assert_eq!(out, "refused", "{err}");
    assert!(!err.contains("agent forwarding"), "{err}");
    let (out, err) = run("yes");
    assert_eq!(out, "opened", "{err}");
}

/// An SSH server standing in for a VM's agent under its root's control: it takes the proxy's
/// key, and on `exec` tries to open an agent channel, saying on the session whether it could.
mod hostile {
    use std::sync::Arc;

    use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
    use russh::{Channel, ChannelId};

    struct Hostile(Vec<Channel<Msg>>);

    impl Handler for Hostile {
        type Error = russh::Error;

        async fn auth_publickey_offered(
            &mut self,
            _user: &str,
            _offer: russh::server::PublicKeyOffer<'_>,
        ) -> Result<Auth, Self::Error> {
            Ok(Auth::Accept)
        }

        async fn auth_publickey(
            &mut self,
            _user: &str,
            _key: russh::server::VerifiedPublicKey<'_>,
        ) -> Result<Auth, Self::Error> {
            Ok(Auth::Accept)
        }

        async fn channel_open_session(
            &mut self,
            channel: Channel<Msg>,
            reply: ChannelOpenHandle,
            _session: &mut Session,
        ) -> Result<(), Self::Error> {
            reply.accept().await;
            self.0.push(channel);
            Ok(())
        }

        async fn exec_request(
            &mut self,
            channel: ChannelId,
            _data: &[u8],
            session: &mut Session,
        ) -> Result<(), Self::Error> {
            session.channel_success(channel)?;
            let handle = session.handle();
            tokio::spawn(async move {
                let said = match handle.channel_open_agent().await {
                    Ok(agent) => {
                        let _ = agent.close().await;
                        "opened"
                    }
                    Err(_) => "refused",
                };
                let _ = handle.data(channel, said.as_bytes().to_vec()).await;
                let _ = handle.exit_status_request(channel, 0).await;
                let _ = handle.eof(channel).await;
                let _ = handle.close(channel).await;
            });
            Ok(())
        }
    }

    pub async fn serve(listen: std::net::SocketAddr) {
        let seed: [u8; 32] = rand::random();
        let key = russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed),
        );
        let config = Arc::new(russh::server::Config {
            keys: vec![key],
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        while let Ok((stream, _)) = listener.accept().await {
            let config = Arc::clone(&config);
            tokio::spawn(async move {
                if let Ok(s) = russh::server::run_stream(config, stream, Hostile(Vec::new())).await
                {
                    let _ = s.await;
                }
            });
        }
    }
}

/// Finding 8: over one multiplexed connection (OpenSSH's ControlMaster), the session past the
/// per-connection limit (16) is told why, not refused with an empty "open failed".
#[test]
fn a_session_past_the_connection_limit_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let env = setup(dir.path(), 6);
    let control = dir.path().join("mux");
    let mux = |extra: &[&str]| {
        let mut c = Command::new("ssh");
        c.args(["-p", &env.port.to_string(), "-i"])
            .arg(&env.key)
            .args(SSH_OPTS)
            .arg("-S")
            .arg(&control)
            .args(extra)
            .arg(&env.vm)
            .stdin(Stdio::null());
        c
    };
    let master = mux(&["-M", "-N", "-o", "ControlPersist=no"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _master = KillOnDrop(master);
    eventually(Duration::from_secs(10), "the control socket", || {
        control.exists().then_some(())
    });
    let sessions: Vec<KillOnDrop> = (0..16)
        .map(|_| {
            KillOnDrop(
                mux(&[])
                    .arg("sleep 47")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    eventually(Duration::from_secs(20), "16 sessions running", || {
        let out = Command::new("pgrep")
            .args(["-fxc", "sleep 47"])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&out.stdout).trim() == "16").then_some(())
    });
    let out = mux(&[]).arg("true").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already has 16 sessions and forwards open") && err.contains("close one"),
        "{err}"
    );
    drop(sessions);
}
