//! SSH front door: boxd against OpenSSH's sshd (Debian), with the real OpenSSH client.
//!
//! Servers run on CPU 0 (boxd: the whole process, one SSH shard; sshd: the listener and every
//! child it forks, by affinity inheritance), clients on CPU 1. Measured, `BENCH_ROUNDS`
//! rounds (default 3), systems alternating, medians:
//!
//! - **New connections** (connect, key exchange, public-key auth, exec, close), `BENCH_CONC`
//!   (default 8) client loops for `BENCH_SECONDS` (default 10): boxd's lobby answering `help`
//!   itself; boxd relaying `true` to a guest agent (a local `boxd-agent` on CPU 0, its CPU
//!   counted with boxd's); sshd running `true` (listener plus reaped children). One client core
//!   caps the rate, so the table reports connections per server CPU-second, next to the crypto
//!   floor: what the handshake's own cryptography allows per CPU-second (two X25519 scalar
//!   multiplications, one Ed25519 sign, one verify, from `openssl speed` on CPU 0 right after
//!   each workload's runs, since this host's speed drifts by ±15 % over minutes; the table
//!   gives the median of the per-run ratios).
//!   Each workload runs twice: with OpenSSH clients (what users run; ~20 ms of client CPU per
//!   connection, so the server idles between packets) and with a russh load generator
//!   (`BENCH_CONC_RUSSH`, default 32, concurrent connections on one runtime on CPU 1), which
//!   loads the server the way many users at once would.
//! - **Relay throughput**: `BENCH_MIB` (default 256) MiB piped through `ssh host 'cat >
//!   /dev/null'`, via boxd to the agent against directly to sshd.
//!
//! `BENCH_ONLY=lobby` (any part of a workload's name) runs just that, without the transfers.
//!
//! `ops/bench ssh`, or `cargo build --release -p boxd -p boxd-agent && cargo bench -p
//! boxd-benches --bench ssh`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use boxd_benches::{
    Proc, admin, boxd_bin, cpu_seconds, cpu_seconds_with_children, env_or, median, pin_to_cpu,
    running_vm, sshc, start_boxd_up,
};

const BOXD_IP: &str = "127.0.44.1";
const SSHD_IP: &str = "127.0.44.2";
const AGENT_IP: &str = "127.0.44.3";
const BOXD_PORT: u16 = 29022;
const SSHD_PORT: u16 = 29023;
const LOBBY: &str = "127.77.0.1";
const VM: &str = "127.77.0.2";

/// A new Ed25519 key pair at `key` (and `key`.pub).
fn keygen(key: &Path) -> Result<()> {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(key)
        .status()?;
    if !st.success() {
        bail!("ssh-keygen -f {} failed", key.display());
    }
    Ok(())
}

fn fingerprint(key: &Path) -> Result<String> {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()?;
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .nth(1)
        .context("ssh-keygen -lf")?
        .to_owned())
}

/// `boxd up` with one SSH shard, a VM whose agent runs at AGENT_IP, and the client key bound
/// to the VM's owner. Returns boxd and the agent.
fn start_boxd(dir: &Path, key: &Path) -> Result<(Proc, Proc)> {
    let (proc, data) = start_boxd_up(
        dir,
        &format!(
            "[node]\nheartbeat_secs = 3600\n[raft]\nlisten = \"{BOXD_IP}:7000\"\n\
             [dns]\nlisten = \"{BOXD_IP}:5353\"\ncpus = [0]\n\
             [https]\nlisten = \"{BOXD_IP}:8443\"\nredirect_listen = \"{BOXD_IP}:8080\"\ncpus = [0]\n\
             [ssh]\nlisten = \"0.0.0.0:{BOXD_PORT}\"\ncpus = [0]\nmax_handshakes_per_ip = 256\n"
        ),
    )?;
    let socket = data.join("admin.sock");
    let owner = running_vm(&socket, "myapp", 80, AGENT_IP.parse()?)?;
    let public_key = std::fs::read_to_string(key.with_extension("pub"))?;
    admin(
        &socket,
        serde_json::json!({"op": "write", "command": {"type": "add_ssh_key", "account": owner,
            "fingerprint": fingerprint(key)?, "public_key": public_key.trim(), "at": 0}}),
    )?;
    let agent_pub = dir.join("agent.pub");
    let k = admin(&socket, serde_json::json!({"op": "agent-key"}))?;
    std::fs::write(&agent_pub, k["public_key"].as_str().context("agent key")?)?;
    let agent = Command::new("taskset")
        .args(["-c", "0"])
        .arg(boxd_bin().with_file_name("boxd-agent"))
        .args(["--listen", &format!("{AGENT_IP}:2200"), "--authorized-key"])
        .arg(&agent_pub)
        .env("BOXD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting boxd-agent (cargo build --release -p boxd-agent)")?;
    Ok((proc, Proc(agent)))
}

fn start_sshd(dir: &Path, key: &Path) -> Result<Proc> {
    std::fs::create_dir_all("/run/sshd")?;
    let host = dir.join("sshd_host");
    keygen(&host)?;
    let auth = dir.join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &auth)?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress {SSHD_IP}:{SSHD_PORT}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             UsePAM no\nPermitRootLogin yes\nStrictModes no\nLogLevel ERROR\nMaxStartups 256\n\
             MaxSessions 64\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             Subsystem sftp internal-sftp\n",
            host.display(),
            auth.display()
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", "0", "/usr/sbin/sshd", "-D", "-e", "-f"])
        .arg(&cfg)
        .stderr(std::fs::File::create(dir.join("sshd.log"))?)
        .spawn()
        .context("starting sshd (apt-get install openssh-server)")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Proc(child))
}

fn ssh(key: &Path, host: &str, port: u16) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", "1", "ssh", "-p", &port.to_string(), "-i"])
        .arg(key)
        .args(boxd_test_support::SSH_OPTS)
        .args(["-o", "BatchMode=yes"])
        .arg(host);
    c
}

/// `conc` client loops of `ssh host cmd` for `seconds`; returns (connections/s, completed,
/// failed, server CPU seconds).
fn connections(
    key: &Path,
    host: &str,
    port: u16,
    cmd: &str,
    cpu: &dyn Fn() -> f64,
    conc: usize,
    seconds: u64,
) -> (f64, u64, u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let before = cpu();
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..conc {
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            s.spawn(move || {
                while Instant::now() < deadline {
                    let ok = ssh(key, host, port)
                        .arg(cmd)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let used = cpu() - before;
    let n = done.load(Ordering::Relaxed);
    (n as f64 / elapsed, n, failed.load(Ordering::Relaxed), used)
}

/// One connection with a russh client: key exchange, public-key auth, exec `cmd`, read to
/// the exit status, disconnect.
async fn one_connection(
    addr: std::net::SocketAddr,
    key: Arc<russh::keys::PrivateKey>,
    cmd: &str,
) -> Result<()> {
    let h = sshc::connect(addr, key).await?;
    let (status, _) = sshc::exec(&h, cmd).await?;
    h.disconnect(russh::Disconnect::ByApplication, "", "")
        .await?;
    match status {
        Some(0) => Ok(()),
        other => bail!("exit status {other:?}"),
    }
}

/// Like [`connections`] with russh clients: `conc` concurrent loops on one runtime pinned to
/// CPU 1, so the load generator is not the limit.
fn russh_connections(
    key: &Path,
    addr: std::net::SocketAddr,
    cmd: &str,
    cpu: &dyn Fn() -> f64,
    conc: usize,
    seconds: u64,
) -> Result<(f64, u64, u64, f64)> {
    let key = Arc::new(russh::keys::load_secret_key(key, None)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let before = cpu();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let (done, failed) = std::thread::scope(|s| {
        s.spawn(|| {
            pin_to_cpu(1);
            rt.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..conc {
                    let key = Arc::clone(&key);
                    let cmd = cmd.to_owned();
                    tasks.push(tokio::spawn(async move {
                        let (mut ok, mut bad) = (0u64, 0u64);
                        while Instant::now() < deadline {
                            match one_connection(addr, Arc::clone(&key), &cmd).await {
                                Ok(()) => ok += 1,
                                Err(_) => bad += 1,
                            }
                        }
                        (ok, bad)
                    }));
                }
                let mut sum = (0, 0);
                for t in tasks {
                    if let Ok((a, b)) = t.await {
                        sum.0 += a;
                        sum.1 += b;
                    }
                }
                sum
            })
        })
        .join()
        .unwrap()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let used = cpu() - before;
    Ok((done as f64 / elapsed, done, failed, used))
}

/// MiB/s of `mib` MiB piped through `ssh host 'cat > /dev/null'`.
fn throughput(key: &Path, host: &str, port: u16, mib: u64) -> Result<f64> {
    let start = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} /dev/zero | {}",
            mib << 20,
            shell_words(ssh(key, host, port).arg("cat > /dev/null"))
        ))
        .status()?;
    if !st.success() {
        bail!("transfer through {host}:{port} failed");
    }
    Ok(mib as f64 / start.elapsed().as_secs_f64())
}

fn shell_words(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Connections per CPU-second the handshake's cryptography allows: two X25519 scalar
/// multiplications, one Ed25519 signature and one verification.
fn crypto_floor() -> Result<f64> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            "openssl",
            "speed",
            "-seconds",
            "2",
            "ed25519",
            "ecdhx25519",
        ])
        .stderr(Stdio::null())
        .output()
        .context("openssl speed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let nums = |marker: &str| -> Option<Vec<f64>> {
        let l = text.lines().find(|l| l.contains(marker))?;
        Some(
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect(),
        )
    };
    let x = *nums("(X25519)")
        .context("X25519 line")?
        .last()
        .context("X25519 op/s")?;
    let ed = nums("(Ed25519)").context("Ed25519 line")?;
    let (sign, verify) = (ed[ed.len() - 2], ed[ed.len() - 1]);
    Ok(1.0 / (2.0 / x + 1.0 / sign + 1.0 / verify))
}

/// (name, host, port, command, server CPU seconds so far).
type Workload<'a> = (&'a str, &'a str, u16, &'a str, &'a dyn Fn() -> f64);

fn main() -> Result<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let conc: usize = env_or("BENCH_CONC", 8);
    let mib: u64 = env_or("BENCH_MIB", 256);
    let russh_conc: usize = env_or("BENCH_CONC_RUSSH", 32);
    // Measure only the workloads whose name contains this (for profiling), no transfers.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("client");
    keygen(&key)?;
    let (boxd, agent) = start_boxd(dir.path(), &key)?;
    let sshd = start_sshd(dir.path(), &key)?;
    let (boxd_pid, agent_pid, sshd_pid) = (boxd.0.id(), agent.0.id(), sshd.0.id());
    // Everything must answer before measuring.
    for (host, port, cmd) in [
        (LOBBY, BOXD_PORT, "help"),
        (VM, BOXD_PORT, "true"),
        (SSHD_IP, SSHD_PORT, "true"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ssh(&key, host, port)
            .arg(cmd)
            .stdout(Stdio::null())
            .status()?
            .success()
        {
            if Instant::now() > deadline {
                bail!("{host}:{port} does not answer `{cmd}`");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "SSH: OpenSSH client, {conc} loops on CPU 1; servers on CPU 0; {seconds} s per run, {rounds} rounds; {mib} MiB per transfer"
    );
    let boxd_cpu = || cpu_seconds(&[boxd_pid]);
    let relay_cpu = || cpu_seconds(&[boxd_pid]) + cpu_seconds_with_children(agent_pid);
    let sshd_cpu = || cpu_seconds_with_children(sshd_pid);
    let workloads: [Workload<'_>; 3] = [
        ("boxd lobby (`help`)", LOBBY, BOXD_PORT, "help", &boxd_cpu),
        ("boxd → agent (`true`)", VM, BOXD_PORT, "true", &relay_cpu),
        ("sshd (`true`)", SSHD_IP, SSHD_PORT, "true", &sshd_cpu),
    ];
    // [client][workload] -> samples
    let mut rate = vec![vec![Vec::new(); 3]; 2];
    let mut per_cpu = vec![vec![Vec::new(); 3]; 2];
    let mut failures = [[0u64; 3]; 2];
    // The host's speed drifts over minutes, so each run is compared with a floor measured right
    // after it: [client][workload] -> per-CPU-s / floor.
    let mut vs_floor = vec![vec![Vec::new(); 3]; 2];
    let mut floors = Vec::new();
    let (mut relay, mut direct) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut order = [0, 1, 2];
        if round % 2 == 1 {
            order.reverse();
        }
        for w in order {
            let (name, host, port, cmd, cpu) = workloads[w];
            if !name.contains(&only) {
                continue;
            }
            let (r, n, f, used) = connections(&key, host, port, cmd, cpu, conc, seconds);
            rate[0][w].push(r);
            per_cpu[0][w].push(n as f64 / used.max(1e-9));
            failures[0][w] += f;
            let addr = std::net::SocketAddr::new(host.parse()?, port);
            let (r, n, f, used) = russh_connections(&key, addr, cmd, cpu, russh_conc, seconds)?;
            rate[1][w].push(r);
            per_cpu[1][w].push(n as f64 / used.max(1e-9));
            failures[1][w] += f;
            let floor = crypto_floor()?;
            floors.push(floor);
            for c in 0..2 {
                let last = *per_cpu[c][w].last().unwrap_or(&0.0);
                vs_floor[c][w].push(last / floor);
            }
        }
        if !only.is_empty() {
            continue;
        }
        if round % 2 == 0 {
            relay.push(throughput(&key, VM, BOXD_PORT, mib)?);
            direct.push(throughput(&key, SSHD_IP, SSHD_PORT, mib)?);
        } else {
            direct.push(throughput(&key, SSHD_IP, SSHD_PORT, mib)?);
            relay.push(throughput(&key, VM, BOXD_PORT, mib)?);
        }
    }
    println!();
    println!(
        "| new connections | client | conn/s | conn per server CPU-s | vs sshd | vs crypto floor | failed |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (c, client) in [
        (0, format!("OpenSSH ×{conc}")),
        (1, format!("russh ×{russh_conc}")),
    ] {
        let sshd_per_cpu = median(per_cpu[c][2].clone());
        for (w, (name, ..)) in workloads.iter().enumerate() {
            let pc = median(per_cpu[c][w].clone());
            println!(
                "| {name} | {client} | {:.0} | {pc:.0} | {:.1}× | {:.0} % | {} |",
                median(rate[c][w].clone()),
                pc / sshd_per_cpu,
                100.0 * median(vs_floor[c][w].clone()),
                failures[c][w]
            );
        }
    }
    println!(
        "| crypto floor (openssl speed, CPU 0, after each run) | | | {:.0} | | 100 % | |",
        median(floors)
    );
    if !only.is_empty() {
        return Ok(());
    }
    let (r, d) = (median(relay), median(direct));
    println!();
    println!("| transfer ({mib} MiB, `cat > /dev/null`) | MiB/s |");
    println!("|---|---|");
    println!("| through boxd to the agent | {r:.0} |");
    println!("| directly to sshd | {d:.0} |");
    println!("| ratio | {:.2} |", r / d);
    drop((boxd, agent, sshd));
    Ok(())
}
