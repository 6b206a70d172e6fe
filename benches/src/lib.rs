//! Shared pieces of the side-by-side benchmarks: starting boxd and peer clusters as real
//! processes on loopback, clients for each, and latency statistics.
//!
//! Benchmarks never assert on speed; they print numbers and ratios for people to read.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// etcd's API subset (see `proto/etcd.proto`).
#[allow(clippy::all, clippy::pedantic)]
pub mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

/// boxd's API (`dataplane/api/proto`), client side.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod apipb {
    tonic::include_proto!("boxd.api.v1");
}

pub use boxd_test_support::{Proc, boxd_bin, sshc};

/// Latency samples of one run.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// Per-operation latencies.
    pub latencies: Vec<Duration>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Samples {
    /// Percentile `p` (0..=100) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        let mut v: Vec<u128> = self.latencies.iter().map(Duration::as_micros).collect();
        v.sort_unstable();
        if v.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)] as f64
    }

    /// Operations per second.
    pub fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// The median of `xs`.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

/// Something that performs one durable write per call.
pub trait Writer: Send {
    /// Writes one record (`i` makes it unique).
    fn write(&mut self, i: u64) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// Runs `writers` concurrently, each doing `per_writer` sequential writes.
pub async fn run<W: Writer + 'static>(writers: Vec<W>, per_writer: u64) -> Result<Samples> {
    let start = Instant::now();
    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(n, mut w)| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_writer as usize);
                for i in 0..per_writer {
                    let t = Instant::now();
                    w.write((n as u64) << 32 | i).await?;
                    lat.push(t.elapsed());
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Samples {
        latencies,
        elapsed: start.elapsed(),
    })
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A boxd cluster of `n` control nodes on 127.0.33.{1..n}:7000.
pub struct BoxdCluster {
    pub procs: Vec<Proc>,
    pub dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

fn admin_sync(socket: &Path, req: &serde_json::Value) -> Result<serde_json::Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    if v["ok"] != true {
        bail!("admin {req}: {v}");
    }
    Ok(v["result"].clone())
}

impl BoxdCluster {
    /// Starts and forms the cluster under `base` (a directory on the disk being measured).
    pub fn start(n: usize, base: &Path) -> Result<Self> {
        let tmp = tempfile::tempdir_in(base)?;
        let mut procs = Vec::new();
        let mut dirs = Vec::new();
        let mut token = String::new();
        for i in 0..n {
            let dir = tmp.path().join(format!("boxd{i}"));
            std::fs::create_dir_all(&dir)?;
            let cfg = dir.join("boxd.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[node]\nroles = [\"control\"]\nheartbeat_secs = 3600\n[raft]\nlisten = \"127.0.33.{}:7000\"\n",
                    i + 1
                ),
            )?;
            let data = dir.join("data");
            let mut cmd = Command::new(boxd_bin());
            if i == 0 {
                cmd.arg("init");
            } else {
                cmd.args([
                    "join",
                    "127.0.33.1:7000",
                    "--token",
                    &token,
                    "--role",
                    "control",
                ]);
            }
            let child = cmd
                .arg("--data-dir")
                .arg(&data)
                .arg("--config")
                .arg(&cfg)
                .env(
                    "BOXD_LOG",
                    std::env::var("BENCH_BOXD_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(format!("/tmp/bench-boxd{i}.log"))?)
                .spawn()
                .context("starting boxd")?;
            procs.push(Proc(child));
            let socket = data.join("admin.sock");
            wait_for("boxd admin socket", Duration::from_secs(30), || {
                admin_sync(&socket, &serde_json::json!({"op": "status"}))
                    .is_ok_and(|s| s["replica"]["leader"].is_u64())
            })?;
            if i == 0 {
                // The admin socket answers before the founder has applied its cluster settings
                // ("ready" comes after): until then a join token is refused, so ask again.
                let req = serde_json::json!({"op": "join-token", "roles": ["control"]});
                wait_for("a join token", Duration::from_secs(30), || {
                    admin_sync(&socket, &req).is_ok_and(|r| {
                        token = r["token"].as_str().unwrap_or_default().to_owned();
                        !token.is_empty()
                    })
                })?;
            }
            dirs.push(data);
        }
        let leader = dirs[0].join("admin.sock");
        wait_for("all voters", Duration::from_secs(30), || {
            admin_sync(&leader, &serde_json::json!({"op": "status"}))
                .is_ok_and(|s| s["replica"]["voters"].as_array().map_or(0, Vec::len) == n)
        })?;
        Ok(Self {
            procs,
            dirs,
            _tmp: tmp,
        })
    }

    /// The leader's admin socket.
    pub fn leader_socket(&self) -> Result<PathBuf> {
        let s = admin_sync(
            &self.dirs[0].join("admin.sock"),
            &serde_json::json!({"op": "status"}),
        )?;
        let leader = s["replica"]["leader"].as_u64().context("no leader")?;
        Ok(self.dirs[usize::try_from(leader)? - 1].join("admin.sock"))
    }

    /// Process ids (for CPU accounting).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }
}

/// A boxd writer: one admin connection creating VMs for its own account.
pub struct BoxdWriter {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    account: String,
    line: String,
}

impl BoxdWriter {
    /// Connects and creates this writer's account.
    pub async fn connect(socket: &Path) -> Result<Self> {
        let (r, w) = UnixStream::connect(socket).await?.into_split();
        let mut me = Self {
            r: BufReader::new(r),
            w,
            account: uuid::Uuid::new_v4().to_string(),
            line: String::new(),
        };
        let req = serde_json::json!({"op": "write", "command": {
            "type": "create_account", "id": me.account, "name": format!("bench-{}", me.account),
            "max_vms": 4_000_000_000u32, "at": 0}});
        me.call(&req).await?;
        Ok(me)
    }

    async fn call(&mut self, req: &serde_json::Value) -> Result<serde_json::Value> {
        let mut bytes = serde_json::to_vec(req)?;
        bytes.push(b'\n');
        self.w.write_all(&bytes).await?;
        self.line.clear();
        self.r.read_line(&mut self.line).await?;
        let v: serde_json::Value = serde_json::from_str(&self.line)?;
        if v["ok"] != true || v["result"]["refused"].is_object() {
            bail!("boxd write failed: {v}");
        }
        Ok(v)
    }
}

/// The record both systems store: the JSON of a VM creation (~300 bytes).
pub fn record(account: &str, i: u64) -> serde_json::Value {
    // Time-ordered, as boxd's own proposers generate ids.
    let id = uuid::Uuid::now_v7();
    serde_json::json!({
        "type": "create_vm", "id": id, "owner": account,
        "name": format!("b{i:x}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]), "http_port": 80, "at": 0,
        "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}
    })
}

impl Writer for BoxdWriter {
    async fn write(&mut self, i: u64) -> Result<()> {
        let cmd = record(&self.account, i);
        self.call(&serde_json::json!({"op": "write", "command": cmd}))
            .await
            .map(drop)
    }
}

/// An etcd cluster of `n` members on 127.0.33.{11..}:2379/2380.
pub struct EtcdCluster {
    pub procs: Vec<Proc>,
    pub endpoints: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts the members (Debian's `etcd`).
    pub fn start(n: usize, base: &Path) -> Result<Self> {
        let tmp = tempfile::tempdir_in(base)?;
        let ip = |i: usize| format!("127.0.33.{}", 11 + i);
        let initial: Vec<String> = (0..n)
            .map(|i| format!("e{i}=http://{}:2380", ip(i)))
            .collect();
        let mut procs = Vec::new();
        let mut endpoints = Vec::new();
        for i in 0..n {
            let dir = tmp.path().join(format!("etcd{i}"));
            let client = format!("http://{}:2379", ip(i));
            let peer = format!("http://{}:2380", ip(i));
            let child = Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(&dir)
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "bench",
                ])
                .args(["--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting etcd (apt-get install etcd-server)")?;
            procs.push(Proc(child));
            endpoints.push(client);
        }
        Ok(Self {
            procs,
            endpoints,
            _tmp: tmp,
        })
    }

    /// Waits for a leader and returns its client URL.
    pub async fn leader(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for ep in &self.endpoints {
                let Ok(mut c) =
                    etcdpb::maintenance_client::MaintenanceClient::connect(ep.clone()).await
                else {
                    continue;
                };
                if let Ok(s) = c.status(etcdpb::StatusRequest {}).await {
                    let s = s.into_inner();
                    if s.leader != 0 && s.header.is_some_and(|h| h.member_id == s.leader) {
                        return Ok(ep.clone());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("etcd elected no leader");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Process ids (for CPU accounting).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }
}

/// An etcd writer: one gRPC connection putting the same records.
pub struct EtcdWriter {
    kv: etcdpb::kv_client::KvClient<tonic::transport::Channel>,
    account: String,
}

impl EtcdWriter {
    /// Connects to `endpoint`.
    pub async fn connect(endpoint: &str) -> Result<Self> {
        Ok(Self {
            kv: etcdpb::kv_client::KvClient::connect(endpoint.to_owned()).await?,
            account: uuid::Uuid::new_v4().to_string(),
        })
    }
}

impl Writer for EtcdWriter {
    async fn write(&mut self, i: u64) -> Result<()> {
        let value = serde_json::to_vec(&record(&self.account, i))?;
        let key = format!("/boxd/vms/{}/{i:x}", self.account).into_bytes();
        self.kv
            .put(etcdpb::PutRequest {
                key,
                value,
                ..Default::default()
            })
            .await?;
        Ok(())
    }
}

/// CPU seconds (user + system) consumed so far by `pids`, from /proc.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let (user, system) = cpu_split(pids);
    user + system
}

/// CPU seconds consumed so far by `pids` in user space and in the kernel (utime, stime).
pub fn cpu_split(pids: &[u32]) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name (which may contain spaces) start after ')'.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime / ticks, stime / ticks))
        })
        .fold((0.0, 0.0), |(u, s), (pu, ps)| (u + pu, s + ps))
}

/// `boxd up` pinned to CPU 0 with `config` (TOML) in `dir`, logging warnings to
/// `dir/boxd.log`. Returns the process and its data directory (admin socket inside).
pub fn start_boxd_up(dir: &Path, config: &str) -> Result<(Proc, PathBuf)> {
    let cfg = dir.join("boxd.toml");
    std::fs::write(&cfg, config)?;
    let data = dir.join("boxd-data");
    let child = std::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(boxd_bin())
        // No worker: the benches stand in for it (see `running_vm`), on loopback only.
        .args(["up", "--role", "control,proxy,dns"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&cfg)
        .env("BOXD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("boxd.log"))?)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting boxd: {e}"))?;
    Ok((Proc(child), data))
}

/// A numeric setting from the environment (`BENCH_ROUNDS`, `BENCH_SECONDS`, ...), or `default`
/// when unset or not a number.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request on `boxd`'s admin socket; fails on an error or a refused write.
pub fn admin(socket: &Path, cmd: serde_json::Value) -> Result<serde_json::Value> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    writeln!(s, "{cmd}")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    if v["ok"] != true || !v["result"]["refused"].is_null() {
        bail!("admin {cmd}: {v}");
    }
    Ok(v["result"].clone())
}

/// On a fresh `boxd up`: an account `bench` owning a VM `name` that the worker (stood in for
/// by a report through the admin socket) says is running at `private_ip`. Returns the
/// account id.
pub fn running_vm(
    socket: &Path,
    name: &str,
    http_port: u16,
    private_ip: std::net::Ipv4Addr,
) -> Result<String> {
    let owner = uuid::Uuid::now_v7().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin(
        socket,
        serde_json::json!({"op": "write", "command": {"type": "create_account", "id": owner,
            "name": "bench", "max_vms": 10, "at": 0}}),
    )
    .is_err()
    {
        if Instant::now() > deadline {
            bail!("boxd did not accept writes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let vm = uuid::Uuid::now_v7().to_string();
    admin(
        socket,
        serde_json::json!({"op": "write", "command": {"type": "create_vm", "id": vm, "owner": owner,
            "name": name, "http_port": http_port, "at": 0,
            "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}}}),
    )?;
    // A worker node no process runs, alive for the scheduler; its reports are written here.
    let cap = serde_json::json!({"vcpus": 1000, "memory_mib": 1_000_000, "disk_gib": 10_000});
    let node = admin(
        socket,
        serde_json::json!({"op": "write", "command": {"type": "register_node", "id": null,
            "uuid": "00000000-0000-4000-8000-00000000f00d", "name": "bench-worker",
            "roles": ["worker"], "raft_addr": "127.0.0.1:9", "capacity": cap, "at": 0}}),
    )?["outcome"]["id"]
        .clone();
    admin(
        socket,
        serde_json::json!({"op": "write", "command": {"type": "heartbeat", "node": node,
            "capacity": cap, "at": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)}}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vms = admin(socket, serde_json::json!({"op": "vms"}))?;
        if !vms[0]["worker"].is_null() {
            break;
        }
        if Instant::now() > deadline {
            bail!("VM not placed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    admin(
        socket,
        serde_json::json!({"op": "write", "command": {"type": "report_vm", "vm": vm, "worker": node,
            "observed": "running", "private_ip": private_ip.to_string(), "at": 0}}),
    )?;
    Ok(owner)
}

/// CPU seconds of `pid` including its reaped children (servers that fork per connection).
pub fn cpu_seconds_with_children(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<f64> = rest
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 4).then(|| f.iter().sum::<f64>() / ticks)
        })
        .unwrap_or(0.0)
}

/// Pins the calling thread (and the threads it spawns after this) to `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    assert!(cpu < libc::CPU_SETSIZE as usize, "CPU {cpu} out of range");
    // SAFETY: cpu_set_t is plain data (zeroed is the empty set); `cpu` is below CPU_SETSIZE,
    // checked above; the set's size is passed along with it, and pid 0 is this thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set)
    };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}
