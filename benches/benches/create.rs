//! Create → SSH-ready on the sandbox runtime: `boxd up` (release, pinned to CPU 0) with its
//! real worker inside a network namespace this bench creates, and a russh client on CPU 1 in
//! the same namespace. One connection to the lobby stays open; for each of `BENCH_VMS`
//! (default 50) VMs, one after another:
//!
//! - **new**: exec `new --name=vmN --memory=128M --disk=1G` on the lobby until its exit status
//!   (the lobby returns once the worker reports the VM running, which it does once the guest
//!   agent accepts connections);
//! - **ssh-ready**: from the same start until a fresh SSH connection to the VM's address has
//!   run `true` in it (key exchange, auth, the proxy's link to the agent, a process in the VM).
//!
//! Then every VM is removed (`rm`, timed too). Reports p50/p99/max in milliseconds; the goal is
//! a p50 of at most 100 ms for ssh-ready. The first VM of a fresh worker builds the `minimal`
//! image; a warm-up VM (not counted) pays that.
//!
//! Needs root (namespaces, bridge, cgroups). `ops/bench create`, or `cargo build --release -p
//! boxd -p boxd-agent && cargo bench -p boxd-benches --bench create`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use boxd_benches::{Proc, boxd_bin, env_or, sshc};

/// A network namespace for the bench; deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Result<Self> {
        let name = format!("boxd-bench-create-{}", std::process::id());
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["netns", "add", &name]) {
            bail!("ip netns add {name} failed: this bench needs root and iproute2");
        }
        let ns = Netns(name);
        if !ok(&["-n", &ns.0, "link", "set", "lo", "up"]) {
            bail!("loopback up in {}", ns.0);
        }
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Shuts down every VM process under `data` when the bench ends (they outlive boxd).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for e in rd.flatten() {
            let _ = boxd_vmm::api::shutdown(&e.path().join("api.sock"), Duration::from_secs(5));
        }
    }
}

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; cpu is below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn row(what: &str, xs: &[f64]) {
    println!(
        "{what:<34} {:>8.1} {:>8.1} {:>8.1}",
        percentile(xs, 0.5),
        percentile(xs, 0.99),
        percentile(xs, 1.0)
    );
}

fn main() -> Result<()> {
    let n: usize = env_or("BENCH_VMS", 50);
    let tmp = tempfile::tempdir()?;
    let ns = Netns::new()?;
    let data = tmp.path().join("data");
    let _reaper = Reaper(data.clone());
    let cfg = tmp.path().join("boxd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cluster]\nmax_vms_per_account = {}\n\n[worker]\nruntime = \"sandbox\"\nvcpus = {}\n\
             memory_mib = {}\ndisk_gib = {}\n",
            n + 10,
            n + 10,
            (n + 10) * 128,
            n + 10
        ),
    )?;
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["taskset", "-c", "0"])
        .arg(boxd_bin())
        .arg("up")
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&cfg)
        .env("BOXD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(tmp.path().join("boxd.log"))?)
        .spawn()
        .context("starting boxd")?;
    let stdout = child.stdout.take().context("stdout")?;
    let _boxd = Proc(child);
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("boxd ready:") => break,
            Some(Ok(_)) => {}
            _ => bail!(
                "boxd did not start: {}",
                std::fs::read_to_string(tmp.path().join("boxd.log")).unwrap_or_default()
            ),
        }
    }
    let key_path = tmp.path().join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key_path)
        .status()?;
    if !st.success() {
        bail!("ssh-keygen failed");
    }
    let key = Arc::new(russh::keys::load_secret_key(&key_path, None)?);

    // This thread (and the current-thread runtime on it) joins boxd's namespace and CPU 1.
    let f = std::fs::File::open(ns.path())?;
    // SAFETY: setns on this thread with a namespace fd it holds open.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    pin(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (new_ms, ready_ms, rm_ms, connect_ms, exec_ms) = rt.block_on(async {
        let lobby_addr: std::net::SocketAddr = "127.77.0.1:2222".parse()?;
        let lobby = sshc::connect(lobby_addr, Arc::clone(&key)).await?;
        let run = |cmd: String| {
            let lobby = &lobby;
            async move {
                let (status, out) = sshc::exec(lobby, &cmd).await?;
                if status != Some(0) {
                    bail!("{cmd}: exit {status:?}: {}", String::from_utf8_lossy(&out));
                }
                Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out).into_owned())
            }
        };
        run("new --name=warm --memory=128M --disk=1G".into()).await?;
        run("rm warm".into()).await?;
        let (mut new_ms, mut ready_ms, mut rm_ms) = (Vec::new(), Vec::new(), Vec::new());
        let (mut connect_ms, mut exec_ms) = (Vec::new(), Vec::new());
        let mut names = Vec::new();
        for i in 0..n {
            let name = format!("vm{i}");
            let t0 = Instant::now();
            let out = run(format!("new --name={name} --memory=128M --disk=1G")).await?;
            new_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            let ip = out
                .lines()
                .find_map(|l| l.trim().strip_prefix("address"))
                .map(|a| a.trim().to_owned())
                .with_context(|| format!("no address in {out}"))?;
            let t1 = Instant::now();
            let vm = sshc::connect(format!("{ip}:2222").parse()?, Arc::clone(&key)).await?;
            connect_ms.push(t1.elapsed().as_secs_f64() * 1000.0);
            let t2 = Instant::now();
            let (status, _) = sshc::exec(&vm, "true").await?;
            exec_ms.push(t2.elapsed().as_secs_f64() * 1000.0);
            if status != Some(0) {
                bail!("{name}: `true` exited {status:?}");
            }
            ready_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            let _ = vm
                .disconnect(russh::Disconnect::ByApplication, "", "")
                .await;
            names.push(name);
        }
        for name in names {
            let t0 = Instant::now();
            run(format!("rm {name}")).await?;
            rm_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        Ok::<_, anyhow::Error>((new_ms, ready_ms, rm_ms, connect_ms, exec_ms))
    })?;

    println!("\ncreate → SSH-ready, sandbox runtime, {n} VMs one after another (ms)");
    println!("{:<34} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    row("new (lobby returns)", &new_ms);
    row("ssh-ready (first session done)", &ready_ms);
    row("  of which: SSH connect to the VM", &connect_ms);
    row("  of which: first exec (agent link)", &exec_ms);
    row("rm", &rm_ms);
    let p50 = percentile(&ready_ms, 0.5);
    println!(
        "goal: ssh-ready p50 ≤ 100 ms: {} ({p50:.1} ms)",
        if p50 <= 100.0 { "met" } else { "missed" }
    );
    Ok(())
}
