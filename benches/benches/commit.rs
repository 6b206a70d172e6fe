//! Commit latency and throughput: boxd against etcd (Debian's etcd-server), same machine, same
//! disk, fsync on in both (boxd's Raft log is SQLite with `synchronous=FULL`; etcd fsyncs its
//! WAL). Each write stores the same ~300-byte record: in boxd a `create_vm` command through
//! the leader's admin socket (validated and applied into SQLite), in etcd a `Put` through its
//! gRPC API on the leader.
//!
//! Scenarios: 1 and 3 nodes × 1 writer (latency) and 64 writers (batched throughput). Each
//! scenario runs `BENCH_ROUNDS` times (default 3) with the two systems alternating, and the
//! table shows medians and boxd/etcd ratios. CPU seconds are the servers' utime+stime from
//! /proc over the run. Nothing is asserted: this prints numbers.
//!
//! `ops/bench commit` (builds the release binary first), or
//! `cargo build --release -p boxd && cargo bench -p boxd-benches --bench commit`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use boxd_benches::{
    BoxdCluster, BoxdWriter, EtcdCluster, EtcdWriter, Samples, Writer, cpu_seconds, env_or, median,
    run,
};

const LATENCY_WRITES: u64 = 1000;
const WRITERS: usize = 64;
/// Writes per writer in the batched scenario; `BENCH_PER_WRITER` raises it (for profiling).
const PER_WRITER: u64 = 150;

#[derive(Default, Clone)]
struct Result1 {
    p50: Vec<f64>,
    p99: Vec<f64>,
    ops: Vec<f64>,
    per_cpu: Vec<f64>,
}

impl Result1 {
    fn add(&mut self, s: &Samples, cpu: f64) {
        self.p50.push(s.percentile_us(50.0));
        self.p99.push(s.percentile_us(99.0));
        self.ops.push(s.throughput());
        self.per_cpu.push(s.latencies.len() as f64 / cpu.max(1e-9));
    }
}

async fn measure<W: Writer + 'static>(
    make: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<W>>>>,
    pids: &[u32],
    lat: &mut Result1,
    thr: &mut Result1,
) -> Result<()> {
    // Warm up.
    run(vec![make().await?], 100).await?;
    let cpu0 = cpu_seconds(pids);
    let s = run(vec![make().await?], LATENCY_WRITES).await?;
    lat.add(&s, cpu_seconds(pids) - cpu0);
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        writers.push(make().await?);
    }
    let cpu0 = cpu_seconds(pids);
    let s = run(writers, env_or("BENCH_PER_WRITER", PER_WRITER)).await?;
    thr.add(&s, cpu_seconds(pids) - cpu0);
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let base = PathBuf::from(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "commit benchmark: {rounds} rounds, data under {}",
        base.display()
    );
    // BENCH_ONLY=boxd|etcd and BENCH_NODES=1|3 narrow the run (for profiling).
    let only = std::env::var("BENCH_ONLY").ok();
    let node_counts: Vec<usize> = match std::env::var("BENCH_NODES").ok().as_deref() {
        Some("1") => vec![1],
        Some("3") => vec![3],
        _ => vec![1, 3],
    };
    let mut rows = Vec::new();
    for nodes in node_counts {
        let (mut bl, mut bt, mut el, mut et) = Default::default();
        for round in 0..rounds {
            for system in if round % 2 == 0 {
                ["boxd", "etcd"]
            } else {
                ["etcd", "boxd"]
            } {
                if only.as_deref().is_some_and(|o| o != system) {
                    continue;
                }
                if system == "boxd" {
                    let c = BoxdCluster::start(nodes, &base)?;
                    let socket = c.leader_socket()?;
                    rt.block_on(measure(
                        || {
                            let s = socket.clone();
                            Box::pin(async move { BoxdWriter::connect(&s).await })
                        },
                        &c.pids(),
                        &mut bl,
                        &mut bt,
                    ))?;
                } else {
                    let c = EtcdCluster::start(nodes, &base)?;
                    let leader = rt.block_on(c.leader())?;
                    rt.block_on(measure(
                        || {
                            let l = leader.clone();
                            Box::pin(async move { EtcdWriter::connect(&l).await })
                        },
                        &c.pids(),
                        &mut el,
                        &mut et,
                    ))?;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            eprintln!("  {nodes} node(s): round {} done", round + 1);
        }
        rows.push((format!("{nodes} node(s), 1 writer"), bl, el));
        rows.push((format!("{nodes} node(s), {WRITERS} writers"), bt, et));
    }
    println!(
        "\n{:<24} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7} {:>11} {:>11} {:>7}",
        "scenario",
        "boxd p50",
        "etcd p50",
        "ratio",
        "boxd p99",
        "etcd p99",
        "ratio",
        "boxd w/s",
        "etcd w/s",
        "ratio",
        "boxd w/cpu",
        "etcd w/cpu",
        "ratio"
    );
    // Each round runs boxd and etcd back to back; this host's speed drifts within minutes, so
    // the median of each round's own ratio is steadier than the ratio of the medians.
    let paired = |b: &[f64], e: &[f64]| -> String {
        if b.is_empty() || b.len() != e.len() {
            return "-".into();
        }
        format!(
            "{:.2}",
            median(b.iter().zip(e).map(|(x, y)| x / y.max(1e-9)).collect())
        )
    };
    let paired_rows: Vec<String> = rows
        .iter()
        .map(|(name, b, e)| {
            format!(
                "{name:<24} {:>10} {:>10} {:>10}",
                paired(&b.p50, &e.p50),
                paired(&b.ops, &e.ops),
                paired(&b.per_cpu, &e.per_cpu)
            )
        })
        .collect();
    for (name, b, e) in rows {
        let (bp50, ep50) = (median(b.p50), median(e.p50));
        let (bp99, ep99) = (median(b.p99), median(e.p99));
        let (bops, eops) = (median(b.ops), median(e.ops));
        let (bcpu, ecpu) = (median(b.per_cpu), median(e.per_cpu));
        println!(
            "{name:<24} {:>8.0}us {:>8.0}us {:>7.2} {:>8.0}us {:>8.0}us {:>7.2} {:>10.0} {:>10.0} {:>7.2} {:>11.0} {:>11.0} {:>7.2}",
            bp50,
            ep50,
            bp50 / ep50,
            bp99,
            ep99,
            bp99 / ep99,
            bops,
            eops,
            bops / eops,
            bcpu,
            ecpu,
            bcpu / ecpu
        );
    }
    println!(
        "\n{:<24} {:>10} {:>10} {:>10}",
        "paired per round", "p50", "w/s", "w/cpu"
    );
    for row in paired_rows {
        println!("{row}");
    }
    println!(
        "\nlatency ratios: boxd/etcd (lower is better for boxd); w/s and w/cpu ratios: boxd/etcd (higher is better)."
    );
    Ok(())
}
