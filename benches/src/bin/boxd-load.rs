//! Load generator for profiling a running boxd: `boxd-load SOCKET WRITERS WRITES_PER_WRITER`
//! drives the same create-VM workload as the commit benchmark against an admin socket and
//! prints throughput and latency percentiles.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use boxd_benches::{BoxdWriter, run};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: boxd-load SOCKET WRITERS WRITES_PER_WRITER";
    let socket = PathBuf::from(args.get(1).context(usage)?);
    let writers: usize = args.get(2).context(usage)?.parse()?;
    let per: u64 = args.get(3).context(usage)?.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut ws = Vec::new();
        for _ in 0..writers {
            ws.push(BoxdWriter::connect(&socket).await?);
        }
        let s = run(ws, per).await?;
        println!(
            "{:.0} writes/s, p50 {:.0} us, p99 {:.0} us",
            s.throughput(),
            s.percentile_us(50.0),
            s.percentile_us(99.0)
        );
        anyhow::Ok(())
    })
}
