//! VMM start-up: `boxd vmm` against `qemu-system-x86_64 -M microvm` (Debian's QEMU) booting the
//! same freestanding test guest (QEMU through its PVH entry note, boxd through its 64-bit ELF
//! entry), 1 vCPU, 32 MiB. Measured per start: process spawn → first byte of the guest's serial
//! output (read from the process's stdout pipe), and, after the guest has run for 300 ms, the
//! process's peak RSS (VmHWM) split into anonymous memory (RssAnon: the VMM's own heap,
//! stacks and the guest pages it touched — what each further VM costs) and file pages
//! (RssFile: the binary and libraries, shared by every process that maps them).
//! `BENCH_ROUNDS` starts per system (default 20), alternating, medians. Goals: ≤ 0.25× QEMU's
//! start time, ≤ 5 MiB VMM RSS overhead.
//!
//! `ops/bench vmm`, or `cargo build --release -p boxd && cargo bench -p boxd-benches --bench vmm`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Read;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use boxd_benches::{boxd_bin, env_or, median};

const MEMORY_MIB: u64 = 32;

struct Start {
    first_byte: Duration,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Spawns `cmd` (stdout piped), times the first byte, lets it run 300 ms, kills it and reaps
/// it with wait4 for its peak RSS.
fn measure(mut cmd: Command) -> Result<Start> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("spawn")?;
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    let n = out.read(&mut b)?;
    let first_byte = t0.elapsed();
    if n == 0 {
        bail!("no serial output");
    }
    // Keep draining so the guest never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        _ = out.read_to_end(&mut sink);
        sink
    });
    std::thread::sleep(Duration::from_millis(300));
    let id = child.id();
    let (hwm_kib, anon_kib, file_kib) = (
        status_kib(id, "VmHWM:"),
        status_kib(id, "RssAnon:"),
        status_kib(id, "RssFile:"),
    );
    let pid = id as libc::pid_t;
    // SAFETY: kill and waitpid on our own child's pid; status is a valid out-pointer.
    let status = unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        status
    };
    let text = drain.join().unwrap();
    let status = std::process::ExitStatus::from_raw(status);
    if !String::from_utf8_lossy(&text).contains("tick")
        && !String::from_utf8_lossy(&text).contains("done")
    {
        bail!(
            "guest did not run ({status}): {}",
            String::from_utf8_lossy(&text)
        );
    }
    Ok(Start {
        first_byte,
        hwm_kib,
        anon_kib,
        file_kib,
    })
}

fn boxd(dir: &Path, guest: &str) -> Result<Command> {
    let cfg = dir.join("vm.json");
    let v = serde_json::json!({
        "vcpus": 1,
        "memory_mib": MEMORY_MIB,
        "boot": {"kernel": guest, "cmdline": "wait"},
        "serial_log": "/dev/stdout",
    });
    std::fs::write(&cfg, v.to_string())?;
    let mut c = Command::new(boxd_bin());
    c.arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(dir.join("api.sock"));
    Ok(c)
}

fn qemu(guest: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-smp",
        "1",
        "-m",
        &MEMORY_MIB.to_string(),
        "-kernel",
        guest,
        "-append",
        "wait",
    ]);
    c
}

fn main() -> Result<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 20);
    let guest = boxd_vmm::TEST_GUEST;
    let host = boxd_vmm::host::detect();
    println!(
        "VMM start: test guest, 1 vCPU, {MEMORY_MIB} MiB, {rounds} starts each; host virtualization: {} ({})",
        host.virtualization, host.reason
    );
    let dir = tempfile::tempdir()?;
    // start ms, peak RSS, anon, file (MiB) per system.
    let mut b: [Vec<f64>; 4] = Default::default();
    let mut q: [Vec<f64>; 4] = Default::default();
    for i in 0..rounds {
        let order: [bool; 2] = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_boxd in order {
            let (s, into) = if is_boxd {
                (
                    measure(boxd(dir.path(), guest)?).context("boxd vmm")?,
                    &mut b,
                )
            } else {
                (measure(qemu(guest)).context("qemu-system-x86_64")?, &mut q)
            };
            into[0].push(s.first_byte.as_secs_f64() * 1e3);
            into[1].push(s.hwm_kib as f64 / 1024.0);
            into[2].push(s.anon_kib as f64 / 1024.0);
            into[3].push(s.file_kib as f64 / 1024.0);
        }
    }
    let [bs, bh, ba, bf] = b.map(median);
    let [qs, qh, qa, qf] = q.map(median);
    println!();
    println!("| (medians) | boxd vmm | QEMU microvm | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| spawn → first serial byte | {bs:.1} ms | {qs:.1} ms | {:.3} |",
        bs / qs
    );
    println!("| peak RSS | {bh:.1} MiB | {qh:.1} MiB | {:.3} |", bh / qh);
    println!(
        "| of which anonymous (per-VM cost) | {ba:.1} MiB | {qa:.1} MiB | {:.3} |",
        ba / qa
    );
    println!(
        "| of which file pages (shared) | {bf:.1} MiB | {qf:.1} MiB | {:.3} |",
        bf / qf
    );
    println!();
    println!(
        "goals: start ≤ 0.25× QEMU: {}; VMM RSS overhead ≤ 5 MiB: {} (anonymous), {} (peak RSS)",
        if bs / qs <= 0.25 { "met" } else { "NOT met" },
        if ba <= 5.0 { "met" } else { "NOT met" },
        if bh <= 5.0 { "met" } else { "NOT met" },
    );
    Ok(())
}
