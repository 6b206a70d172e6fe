//! HTTPS front door: boxd against HAProxy 2.6 (Debian), both terminating TLS with the same
//! ECDSA P-256 certificate (boxd's local CA's zone certificate) and forwarding to the same
//! backend (a small HTTP server in this process answering `ok`), both keeping backend
//! connections alive and sharing them between client connections (boxd's default; HAProxy's
//! `http-keep-alive` with `http-reuse always`), and choosing the same
//! cipher suite (checked before measuring). Each server is pinned to CPU 0 (boxd: the
//! whole process; HAProxy: one thread); the load generator and the backend run on CPU 1. Four
//! workloads,
//! `BENCH_SECONDS` (default 10) each: new TLS handshakes (wrk, one request per connection,
//! `Connection: close`; wrk resumes its TLS session on each reconnect, so these are resumed
//! TLS 1.3 handshakes: PSK plus an X25519 exchange), HTTP/1.1 keep-alive requests (wrk),
//! HTTP/2 requests (h2load, 16 connections × 8 concurrent streams), and full handshakes
//! (`openssl s_time -new`, 8 processes: no resumption, so the server signs with its ECDSA key
//! every time; no request, the client closes after the handshake). One load core can cap the
//! rate, so the table also shows requests
//! per server CPU-second (utime+stime from /proc over the run). `BENCH_ROUNDS` rounds
//! (default 3); in each, every workload runs on both systems back to back (which goes first
//! alternates); medians. The last column is the median of those back-to-back ratios, which
//! this host's drifting speed (±10 % within minutes) disturbs least.
//!
//! `BENCH_ONLY=handshake` (any part of a workload's name) runs just the workloads that match;
//! `BENCH_HAPROXY_REUSE` sets HAProxy's `http-reuse` (default `always`, as boxd does; HAProxy's
//! own default is `safe`, which opens a backend connection for each client connection).
//!
//! `ops/bench https`, or `cargo build --release -p boxd && cargo bench -p boxd-benches --bench https`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use boxd_benches::{Proc, cpu_seconds, env_or, median, pin_to_cpu, running_vm, start_boxd_up};

const BOXD_IP: &str = "127.0.41.1";
const HAPROXY_IP: &str = "127.0.41.2";
const BACKEND: &str = "127.0.41.10:8000";
const PORT: u16 = 29443;

/// The "VM": answers every request on a connection with `ok`, closing when asked. Its threads
/// run on CPU 1 with the load generator, so CPU 0 is the server's alone.
fn backend() -> Result<()> {
    let l = TcpListener::bind(BACKEND)?;
    std::thread::spawn(move || {
        pin_to_cpu(1);
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = Vec::with_capacity(2048);
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let close = String::from_utf8_lossy(&buf[..end])
                        .to_ascii_lowercase()
                        .contains("connection: close");
                    buf.drain(..end);
                    let resp: &[u8] = if close {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if s.write_all(resp).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

/// `boxd up` pinned to CPU 0 with one HTTPS shard, and a VM whose web server is the backend.
fn start_boxd(dir: &Path) -> Result<(Proc, std::path::PathBuf)> {
    let (proc, data) = start_boxd_up(
        dir,
        &format!(
            "[node]\nheartbeat_secs = 3600\n[raft]\nlisten = \"{BOXD_IP}:7000\"\n\
             [dns]\nlisten = \"{BOXD_IP}:5353\"\ncpus = [0]\n\
             [https]\nlisten = \"0.0.0.0:{PORT}\"\nredirect_listen = \"{BOXD_IP}:8080\"\ncpus = [0]\n\
             [ssh]\nlisten = \"{BOXD_IP}:2222\"\ncpus = [0]\n"
        ),
    )?;
    let backend_ip = BACKEND.split(':').next().unwrap().parse()?;
    running_vm(&data.join("admin.sock"), "myapp", 8000, backend_ip)?;
    Ok((proc, data.join("tls")))
}

fn start_haproxy(dir: &Path, tls: &Path) -> Result<Proc> {
    let reuse = std::env::var("BENCH_HAPROXY_REUSE").unwrap_or_else(|_| "always".into());
    let pem = dir.join("haproxy.pem");
    let mut both = std::fs::read(tls.join("zone.crt"))?;
    both.extend(std::fs::read(tls.join("zone.key"))?);
    std::fs::write(&pem, both)?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  cpu-map 1/1 0\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n\
               ssl-default-bind-ciphersuites {SUITES13}\n  ssl-default-bind-ciphers {SUITES12}\n\
             defaults\n  mode http\n  timeout connect 3s\n  timeout client 30s\n  timeout server 30s\n\
               option forwardfor\n\
             frontend fe\n  bind {HAPROXY_IP}:{PORT} ssl crt {} alpn h2,http/1.1\n  default_backend be\n\
             backend be\n  http-reuse {reuse}\n  server s1 {BACKEND}\n",
            pem.display()
        ),
    )?;
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()?;
    if !check.status.success() {
        bail!("haproxy config: {}", String::from_utf8_lossy(&check.stderr));
    }
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log"))?)
        .spawn()
        .context("starting haproxy")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Proc(child))
}

/// boxd's cipher suite order (dataplane/src/https/tls.rs), given to HAProxy too: both choose
/// by their own order, so both negotiate TLS_AES_128_GCM_SHA256 with wrk and h2load.
const SUITES13: &str = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
const SUITES12: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
                        ECDHE-ECDSA-CHACHA20-POLY1305";

/// The TLS version and cipher suite an OpenSSL client (as wrk and h2load are) negotiates with
/// `ip`.
fn negotiated(ip: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("{ip}:{PORT}")])
        .args(["-servername", "myapp.boxd.test"])
        .stdin(Stdio::null())
        .output()
        .context("openssl s_client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("New, "))
        .map(|l| l.replace(", Cipher is ", " "))
        .with_context(|| format!("no cipher from openssl s_client against {ip}"))
}

/// wrk on CPU 1 against `ip`; returns (requests/s, requests, server CPU seconds).
fn wrk(ip: &str, pid: u32, close: bool, seconds: u32) -> Result<(f64, f64, f64)> {
    let mut c = Command::new("taskset");
    c.args(["-c", "1", "wrk", "-t1", "-c64", "--latency"])
        .arg(format!("-d{seconds}s"))
        .args(["-H", "Host: myapp.boxd.test"]);
    if close {
        c.args(["-H", "Connection: close"]);
    }
    c.arg(format!("https://{ip}:{PORT}/"));
    let before = cpu_seconds(&[pid]);
    let out = c.output().context("wrk")?;
    let cpu = cpu_seconds(&[pid]) - before;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .context("no Requests/sec")?
        .trim()
        .parse()?;
    let total: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .context("no request count")?
        .0
        .trim()
        .parse()?;
    if text.contains("Non-2xx") || text.contains("Socket errors") && !close {
        eprintln!("wrk reported errors against {ip}:\n{text}");
    }
    Ok((rps, total, cpu))
}

/// h2load (HTTP/2, 16 connections × 8 streams) on CPU 1 against `ip`; returns (requests/s,
/// requests, server CPU seconds).
fn h2load(ip: &str, pid: u32, seconds: u32) -> Result<(f64, f64, f64)> {
    let mut c = Command::new("taskset");
    c.args(["-c", "1", "h2load", "-t1", "-c16", "-m8"])
        .arg(format!("-D{seconds}"))
        .arg(format!("--connect-to={ip}:{PORT}"))
        .arg(format!("https://myapp.boxd.test:{PORT}/"));
    let before = cpu_seconds(&[pid]);
    let out = c
        .output()
        .context("h2load (apt-get install nghttp2-client)")?;
    let cpu = cpu_seconds(&[pid]) - before;
    let text = String::from_utf8_lossy(&out.stdout);
    // "finished in 10.00s, 12345.60 req/s, 1.23MB/s"
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .context("no req/s from h2load")?
        .trim()
        .parse()?;
    // "requests: 123 total, 123 started, 123 done, 120 succeeded, 3 failed, ..."
    let line = text
        .lines()
        .find(|l| l.starts_with("requests: "))
        .context("no request count from h2load")?;
    let field = |name: &str| -> Option<f64> {
        line.split(", ")
            .find_map(|p| p.trim().strip_suffix(name))
            .and_then(|n| n.trim_start_matches("requests: ").trim().parse().ok())
    };
    let ok = field(" succeeded").context("no succeeded count")?;
    if field(" failed").unwrap_or(0.0) > 0.0 || field(" errored").unwrap_or(0.0) > 0.0 {
        eprintln!("h2load reported failures against {ip}:\n{text}");
    }
    Ok((rps, ok, cpu))
}

/// `S_TIME` `openssl s_time -new` processes on CPU 1 against `ip`, each making full TLS
/// handshakes (no resumption: ECDHE and the server's ECDSA signature every time), one at a
/// time, closing each right after; returns (handshakes/s, handshakes, server CPU seconds).
fn s_time(ip: &str, pid: u32, seconds: u32) -> Result<(f64, f64, f64)> {
    let before = cpu_seconds(&[pid]);
    let start = std::time::Instant::now();
    let children = (0..S_TIME)
        .map(|_| {
            Command::new("taskset")
                .args(["-c", "1", "openssl", "s_time", "-new"])
                .arg(format!("-time={seconds}"))
                .arg(format!("-connect={ip}:{PORT}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("openssl s_time")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut total = 0.0;
    for child in children {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "1688 connections in 1.05s; 1607.62 connections/user sec, bytes read 0"
        let n: f64 = text
            .lines()
            .find_map(|l| l.split_once(" connections in ").map(|(n, _)| n.trim()))
            .with_context(|| format!("no connection count from openssl s_time: {text}"))?
            .parse()?;
        total += n;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&[pid]) - before;
    Ok((total / wall, total, cpu))
}

/// Concurrent `openssl s_time` processes in the full-handshake workload.
const S_TIME: usize = 8;

/// The workloads, in the order they run; `BENCH_ONLY` picks those whose name contains it.
const WORKLOADS: [&str; 4] = [
    "new TLS handshake per request",
    "keep-alive requests (HTTP/1.1, wrk)",
    "HTTP/2 requests (h2load -c16 -m8)",
    "full TLS handshake, no resumption (openssl s_time -new ×8)",
];

fn main() -> Result<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let seconds: u32 = env_or("BENCH_SECONDS", 10);
    let dir = tempfile::tempdir()?;
    backend()?;
    let (boxd, tls) = start_boxd(dir.path())?;
    let haproxy = start_haproxy(dir.path(), &tls)?;
    // Both must answer before measuring.
    for ip in [BOXD_IP, HAPROXY_IP] {
        let target = if ip == BOXD_IP { "127.77.0.2" } else { ip };
        let ok = Command::new("curl")
            .args(["-sk", "-H", "Host: myapp.boxd.test"])
            .arg(format!("https://{target}:{PORT}/"))
            .output()?;
        if ok.stdout != b"ok" {
            bail!(
                "{ip} does not proxy: {}",
                String::from_utf8_lossy(&ok.stdout)
            );
        }
    }
    let suites = [negotiated("127.77.0.2")?, negotiated(HAPROXY_IP)?];
    if suites[0] != suites[1] {
        bail!("boxd negotiates {} but HAProxy {}", suites[0], suites[1]);
    }
    println!(
        "HTTPS: wrk -t1 -c64 / h2load -c16 -m8 on CPU 1, servers on CPU 0, {seconds} s per run, {rounds} rounds, {}",
        suites[0]
    );
    // [system][workload] -> (rps, per CPU-s) samples
    let mut results: Vec<Vec<(Vec<f64>, Vec<f64>)>> =
        vec![vec![Default::default(); WORKLOADS.len()]; 2];
    // [workload] -> boxd / HAProxy per CPU-s, each from two runs back to back: this host's
    // speed drifts within minutes, so ratios of neighbours are steadier than ratios of medians.
    let mut paired: Vec<Vec<f64>> = vec![Vec::new(); WORKLOADS.len()];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for (w, pairs) in paired.iter_mut().enumerate() {
            if !only.is_empty() && !WORKLOADS[w].contains(only.as_str()) {
                continue;
            }
            let mut per_cpu = [0.0; 2];
            for sys in order {
                let (ip, pid) = if sys == 0 {
                    ("127.77.0.2", boxd.0.id())
                } else {
                    (HAPROXY_IP, haproxy.0.id())
                };
                let (rps, total, cpu) = match w {
                    0 => wrk(ip, pid, true, seconds)?,
                    1 => wrk(ip, pid, false, seconds)?,
                    2 => h2load(ip, pid, seconds)?,
                    _ => s_time(ip, pid, seconds)?,
                };
                per_cpu[sys] = total / cpu.max(1e-9);
                results[sys][w].0.push(rps);
                results[sys][w].1.push(per_cpu[sys]);
            }
            pairs.push(per_cpu[0] / per_cpu[1].max(1e-9));
        }
    }
    let m = |v: &Vec<f64>| median(v.clone());
    println!();
    println!(
        "| workload | boxd req/s | HAProxy req/s | ratio | boxd req/CPU-s | HAProxy req/CPU-s | ratio | paired ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (w, name) in WORKLOADS.iter().enumerate() {
        let (b, h) = (&results[0][w], &results[1][w]);
        if b.0.is_empty() {
            continue;
        }
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} |",
            m(&b.0),
            m(&h.0),
            m(&b.0) / m(&h.0),
            m(&b.1),
            m(&h.1),
            m(&b.1) / m(&h.1),
            m(&paired[w])
        );
    }
    println!();
    println!("goals: handshakes per CPU-s >= 1.5x HAProxy; keep-alive requests per CPU-s >= 1.0x");
    Ok(())
}
