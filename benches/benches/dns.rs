//! Authoritative DNS: boxd against Knot DNS 3.2 and NSD 4.6 (Debian), serving the same zone of
//! 10,000 names. Each server is pinned to CPU 0 (boxd: the whole process, DNS shard and control
//! plane; Knot and NSD with one UDP worker); dnsperf runs on CPU 1 with a query mix of 90 %
//! existing names and 10 % NXDOMAIN. One dnsperf core can cap the rate, so besides queries per
//! second the table shows queries per server CPU-second (utime+stime of the server process from
//! /proc over the run), and a second table splits each query's CPU time into the server's
//! own code (utime) and the kernel (stime). `BENCH_ROUNDS` rounds (default 3), systems in
//! rotating order, medians.
//!
//! `ops/bench dns`, or `cargo build --release -p boxd && cargo bench -p boxd-benches --bench dns`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use boxd_benches::{Proc, cpu_split, env_or, median, start_boxd_up};

const NAMES: usize = 10_000;
const SECONDS: u32 = 10;

fn zone_file(dir: &Path) -> Result<std::path::PathBuf> {
    let mut z = String::from(
        "$ORIGIN boxd.test.\n$TTL 60\n@ IN SOA ns1.boxd.test. hostmaster.boxd.test. 1 3600 600 604800 60\n\
         @ IN NS ns1.boxd.test.\n@ IN A 127.77.0.1\nns1 IN A 127.0.0.1\n",
    );
    for i in 0..NAMES {
        let ip = i + 2;
        z.push_str(&format!("vm-{i} IN A 127.77.{}.{}\n", ip / 256, ip % 256));
    }
    let p = dir.join("boxd.test.zone");
    std::fs::write(&p, z)?;
    Ok(p)
}

fn query_file(dir: &Path) -> Result<std::path::PathBuf> {
    // A fixed pseudo-random sequence (xorshift), the same for every server.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut q = String::new();
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (x >> 8) as usize % NAMES;
        if x.is_multiple_of(10) {
            q.push_str(&format!("nx-{n}.boxd.test A\n"));
        } else {
            q.push_str(&format!("vm-{n}.boxd.test A\n"));
        }
    }
    let p = dir.join("queries.txt");
    std::fs::write(&p, q)?;
    Ok(p)
}

fn wait_answering(ip: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("dig")
            .args([
                &format!("@{ip}"),
                "-p",
                "5353",
                "+short",
                "+time=1",
                "+tries=1",
                "vm-9999.boxd.test",
            ])
            .output()?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{ip} does not answer vm-9999.boxd.test");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_boxd(dir: &Path) -> Result<Proc> {
    let (proc, data) = start_boxd_up(
        dir,
        "[node]\nheartbeat_secs = 3600\n[raft]\nlisten = \"127.0.38.1:7000\"\n\
         [dns]\nlisten = \"127.0.38.1:5353\"\ncpus = [0]\n\
         [https]\nlisten = \"127.0.38.1:8443\"\nredirect_listen = \"127.0.38.1:8080\"\ncpus = [0]\n\
         [ssh]\nlisten = \"127.0.38.1:2222\"\ncpus = [0]\n",
    )?;
    // Fill the zone through the log: one account, 10,000 VMs named like the zone file's.
    let socket = data.join("admin.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&socket) {
            break s;
        }
        if Instant::now() > deadline {
            bail!("boxd admin socket did not appear");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut call = |cmd: serde_json::Value| -> Result<()> {
        writeln!(
            conn,
            "{}",
            serde_json::json!({"op": "write", "command": cmd})
        )?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if v["ok"] != true || !v["result"]["refused"].is_null() {
            bail!("boxd write failed: {v}");
        }
        Ok(())
    };
    let owner = uuid::Uuid::now_v7().to_string();
    // Wait until the cluster is founded (writes before that are refused as NotInitialized).
    let deadline = Instant::now() + Duration::from_secs(30);
    while call(
        serde_json::json!({"type": "create_account", "id": owner, "name": "bench",
        "max_vms": NAMES + 10, "at": 0}),
    )
    .is_err()
    {
        if Instant::now() > deadline {
            bail!("boxd did not accept writes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..NAMES {
        call(
            serde_json::json!({"type": "create_vm", "id": uuid::Uuid::now_v7(), "owner": owner,
            "name": format!("vm-{i}"), "http_port": 80, "at": 0,
            "spec": {"vcpus": 1, "memory_mib": 64, "disk_gib": 1, "image": "minimal"}}),
        )?;
    }
    wait_answering("127.0.38.1")?;
    Ok(proc)
}

fn start_knot(dir: &Path, zone: &Path) -> Result<Proc> {
    let run = dir.join("knot-run");
    let db = dir.join("knot-db");
    std::fs::create_dir_all(&run)?;
    std::fs::create_dir_all(&db)?;
    let conf = dir.join("knot.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  listen: 127.0.38.2@5353\n  rundir: {}\n  user: root:root\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: {}\nlog:\n  - target: stderr\n    any: warning\n\
             zone:\n  - domain: boxd.test\n    file: {}\n    zonefile-sync: -1\n    journal-content: none\n",
            run.display(),
            db.display(),
            zone.display()
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", "0", "knotd", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("knot.log"))?)
        .spawn()
        .context("starting knotd (apt-get install knot)")?;
    let p = Proc(child);
    wait_answering("127.0.38.2")?;
    Ok(p)
}

fn start_nsd(dir: &Path, zone: &Path) -> Result<Proc> {
    let conf = dir.join("nsd.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "server:\n  ip-address: 127.0.38.3@5353\n  server-count: 1\n  username: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n\
             pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 0\n\
               rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\n\
             remote-control:\n  control-enable: no\nzone:\n  name: boxd.test\n  zonefile: {}\n",
            zone.display()
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", "0", "nsd", "-d", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nsd (apt-get install nsd)")?;
    let p = Proc(child);
    wait_answering("127.0.38.3")?;
    Ok(p)
}

/// Runs dnsperf on CPU 1 against `ip` and returns (queries completed, qps).
fn dnsperf(ip: &str, queries: &Path) -> Result<(f64, f64)> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "dnsperf",
            "-s",
            ip,
            "-p",
            "5353",
            "-l",
            &SECONDS.to_string(),
            "-c",
            "4",
            "-q",
            "256",
            "-d",
        ])
        .arg(queries)
        .output()
        .context("running dnsperf (apt-get install dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))?
            .split(':')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    match (number("Queries completed"), number("Queries per second")) {
        (Some(done), Some(qps)) => Ok((done, qps)),
        _ => bail!("unexpected dnsperf output:\n{text}"),
    }
}

/// `pid` and all its descendants (NSD answers from a forked child).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
                if ppid == Some(parent) && !all.contains(&child) {
                    all.push(child);
                }
            }
        }
        i += 1;
    }
    all
}

/// A server process whose whole tree is killed on drop (NSD's children outlive their parent).
struct Tree(Proc);

impl Drop for Tree {
    fn drop(&mut self) {
        for pid in process_tree(self.0.0.id()).into_iter().rev() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// One dnsperf run: qps, queries per server CPU-second, and the server's user and kernel
/// CPU time per query (ns).
struct Sample {
    qps: f64,
    per_cpu: f64,
    user_ns: f64,
    kernel_ns: f64,
}

fn measure(pid: u32, ip: &str, queries: &Path) -> Result<Sample> {
    let pids = process_tree(pid);
    let (u0, s0) = cpu_split(&pids);
    let (done, qps) = dnsperf(ip, queries)?;
    let (u1, s1) = cpu_split(&pids);
    // A run that completed nothing reports 0 per CPU-second, not a rate made up of the floor.
    let per_query = done.max(1.0);
    Ok(Sample {
        qps,
        per_cpu: done / (u1 - u0 + s1 - s0).max(1e-9),
        user_ns: (u1 - u0) * 1e9 / per_query,
        kernel_ns: (s1 - s0) * 1e9 / per_query,
    })
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base)?;
    let zone = zone_file(dir.path())?;
    let queries = query_file(dir.path())?;
    println!(
        "dns benchmark: {NAMES} names, 90% existing / 10% NXDOMAIN, {SECONDS}s x {rounds} rounds, server on CPU 0, dnsperf on CPU 1"
    );

    let boxd = Tree(start_boxd(dir.path())?);
    let knot = Tree(start_knot(dir.path(), &zone)?);
    let nsd = Tree(start_nsd(dir.path(), &zone)?);
    let servers = [
        ("boxd", boxd.0.0.id(), "127.0.38.1"),
        ("knot", knot.0.0.id(), "127.0.38.2"),
        ("nsd", nsd.0.0.id(), "127.0.38.3"),
    ];
    let mut qps: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut per_cpu: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut user: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut kernel: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for round in 0..rounds {
        for k in 0..3 {
            let i = (k + round) % 3;
            let (name, pid, ip) = servers[i];
            let m = measure(pid, ip, &queries)?;
            eprintln!(
                "  round {} {name}: {:.0} qps, {:.0} queries per CPU-second ({:.0} ns user + {:.0} ns kernel per query)",
                round + 1,
                m.qps,
                m.per_cpu,
                m.user_ns,
                m.kernel_ns
            );
            qps[i].push(m.qps);
            per_cpu[i].push(m.per_cpu);
            user[i].push(m.user_ns);
            kernel[i].push(m.kernel_ns);
        }
    }
    // Each server's per-CPU-s rate over Knot's in the same round (the three run back to back):
    // this host's speed drifts within minutes, so ratios within a round are steadier than
    // ratios of medians taken over different minutes. Both are printed.
    let paired: Vec<f64> = (0..3)
        .map(|i| {
            median(
                per_cpu[i]
                    .iter()
                    .zip(&per_cpu[1])
                    .map(|(x, k)| x / k)
                    .collect(),
            )
        })
        .collect();
    let q: Vec<f64> = qps.into_iter().map(median).collect();
    let c: Vec<f64> = per_cpu.into_iter().map(median).collect();
    println!(
        "\n{:<6} {:>10} {:>16} {:>12} {:>12} {:>14} {:>14} {:>20}",
        "server",
        "qps",
        "queries/CPU-s",
        "qps/knot",
        "qps/nsd",
        "q/CPU-s /knot",
        "q/CPU-s /nsd",
        "paired q/CPU-s /knot"
    );
    for (i, (name, _, _)) in servers.iter().enumerate() {
        println!(
            "{name:<6} {:>10.0} {:>16.0} {:>12.2} {:>12.2} {:>14.2} {:>14.2} {:>20.2}",
            q[i],
            c[i],
            q[i] / q[1],
            q[i] / q[2],
            c[i] / c[1],
            c[i] / c[2],
            paired[i]
        );
    }
    // Where a query's CPU time goes: the server's own code (user) and the kernel's UDP path
    // (system). On loopback the kernel's share also carries delivering each response into
    // dnsperf's socket, which the sender pays.
    let u: Vec<f64> = user.into_iter().map(median).collect();
    let k: Vec<f64> = kernel.into_iter().map(median).collect();
    println!(
        "\n{:<6} {:>14} {:>16} {:>12} {:>14}",
        "server", "user ns/query", "kernel ns/query", "user /knot", "kernel /knot"
    );
    for (i, (name, _, _)) in servers.iter().enumerate() {
        println!(
            "{name:<6} {:>14.0} {:>16.0} {:>12.2} {:>14.2}",
            u[i],
            k[i],
            u[i] / u[1],
            k[i] / k[1]
        );
    }
    Ok(())
}
