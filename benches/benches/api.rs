//! Reads through the gRPC API: boxd's `GetVm` against etcd's serializable `Range` (Debian's
//! etcd-server, one member), both over TLS (ECDSA P-256 certificates) and HTTP/2 on the same
//! machine — each a read of the node's local replica over gRPC. boxd's calls carry a token
//! (`authorization: Bearer …`, checked per call). The server runs on CPU 0 (boxd: the whole
//! process; etcd: `taskset`), the client on CPU 1 (one tokio worker): `CONNS` connections with `INFLIGHT` calls
//! each, for `BENCH_SECONDS` (default 10). The table shows calls per second and calls per
//! server CPU-second (utime+stime from /proc over the run), `BENCH_ROUNDS` rounds (default 3)
//! in alternating order, medians, and the ratio boxd/etcd per round.
//!
//! `ops/bench api`, or `cargo build --release -p boxd && cargo bench -p boxd-benches --bench api`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use boxd_benches::{Proc, apipb, cpu_seconds, env_or, etcdpb, median, pin_to_cpu, start_boxd_up};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint};

const CONNS: usize = 4;
const INFLIGHT: usize = 32;
const HTTPS: &str = "127.77.0.1:28499";
const SSH_PORT: u16 = 22299;
const ETCD: &str = "127.0.33.31:2379";

/// A TLS channel to `addr` (HTTP/2 by ALPN) that checks the server's name `name` against `ca`
/// (PEM): rustls with ring through tokio-rustls, as tonic's own TLS would, built here so the
/// workspace's rustls keeps its `logging` feature off.
async fn channel(addr: &str, name: &str, ca: &[u8]) -> Result<Channel> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let server = ServerName::try_from(name.to_owned())?;
    let addr: std::net::SocketAddr = addr.parse()?;
    let connect = tower::service_fn(move |_: http::Uri| {
        let (tls, server) = (tls.clone(), server.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connect)
        .await?)
}

/// Runs `call` from `CONNS × INFLIGHT` loops for `seconds` on `rt` (the client, on CPU 1);
/// returns the number of calls that succeeded (a failed call fails the run).
fn load<F, Fut>(rt: &tokio::runtime::Runtime, seconds: u64, call: F) -> Result<u64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let call = Arc::new(call);
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..CONNS * INFLIGHT {
            let (call, d, s) = (Arc::clone(&call), Arc::clone(&done), Arc::clone(&stop));
            tasks.spawn(async move {
                while !s.load(Ordering::Relaxed) {
                    call(i % CONNS).await?;
                    d.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed))
}

struct Run {
    per_sec: f64,
    per_cpu: f64,
}

/// Warms up for a second, then measures `seconds` of `call` against server `pid`.
fn measure<F, Fut>(rt: &tokio::runtime::Runtime, pid: u32, seconds: u64, call: F) -> Result<Run>
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    load(rt, 1, call.clone())?;
    let cpu0 = cpu_seconds(&[pid]);
    let t0 = Instant::now();
    let n = load(rt, seconds, call)?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&[pid]) - cpu0;
    Ok(Run {
        per_sec: n as f64 / wall,
        per_cpu: n as f64 / cpu.max(1e-9),
    })
}

/// `boxd up` on CPU 0 with a VM `web` of account `bench`, and a token of that account made in
/// the lobby (an SSH key added for it through the admin socket). Returns the process, the CA
/// and the token.
fn start_boxd(dir: &Path) -> Result<(Proc, Vec<u8>, String)> {
    let (proc, data) = start_boxd_up(
        dir,
        &format!(
            "[node]\nheartbeat_secs = 3600\n[raft]\nlisten = \"127.0.39.91:7000\"\n\
             [dns]\nlisten = \"127.0.39.91:5353\"\ncpus = [0]\n\
             [https]\nlisten = \"{HTTPS}\"\nredirect_listen = \"127.0.39.91:8080\"\ncpus = [0]\n\
             [ssh]\nlisten = \"127.77.0.1:{SSH_PORT}\"\ncpus = [0]\n"
        ),
    )?;
    let socket = data.join("admin.sock");
    let account = boxd_benches::running_vm(&socket, "web", 80, "10.0.0.2".parse()?)?;
    let key = dir.join("bench-key");
    boxd_test_support::keygen(&key);
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    boxd_benches::admin(
        &socket,
        serde_json::json!({"op": "write", "command": {"type": "add_ssh_key", "account": account,
            "fingerprint": boxd_test_support::fingerprint(&key), "public_key": public.trim(),
            "at": 0}}),
    )?;
    let out = Command::new("ssh")
        .args(["-p", &SSH_PORT.to_string(), "-i"])
        .arg(&key)
        .args(boxd_test_support::SSH_OPTS)
        .args(["127.77.0.1", "token", "create", "--ttl=1h"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("token create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    let ca = std::fs::read(data.join("tls/ca.crt"))?;
    Ok((proc, ca, token))
}

/// etcd (one member) on CPU 0 serving TLS with a P-256 certificate made here (as boxd's local
/// CA makes its own). Returns the process and the CA certificate.
fn start_etcd(dir: &Path) -> Result<(Proc, Vec<u8>)> {
    // A CA and a leaf signed by it (rustls refuses a self-signed CA certificate as a leaf).
    let (ca, ca_key) = (dir.join("etcd-ca.crt"), dir.join("etcd-ca.key"));
    let (cert, key, csr) = (
        dir.join("etcd.crt"),
        dir.join("etcd.key"),
        dir.join("etcd.csr"),
    );
    let ext = dir.join("etcd.ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:etcd.bench,IP:127.0.33.31\nbasicConstraints=CA:FALSE\n",
    )?;
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut make_ca = Command::new("openssl");
    make_ca
        .args(["req", "-x509"])
        .args(p256)
        .args(["-days", "1", "-subj", "/CN=bench CA", "-keyout"])
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca);
    let mut make_csr = Command::new("openssl");
    make_csr
        .arg("req")
        .args(p256)
        .args(["-subj", "/CN=etcd", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr);
    let mut sign = Command::new("openssl");
    sign.args(["x509", "-req", "-days", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .args(["-CAcreateserial", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&cert);
    for step in [&mut make_ca, &mut make_csr, &mut sign] {
        let ok = step
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("openssl could not make etcd's certificate");
        }
    }
    let url = format!("https://{ETCD}");
    let child = Command::new("taskset")
        .args(["-c", "0", "etcd", "--name", "e0"])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", "http://127.0.33.31:2380"])
        .args(["--initial-advertise-peer-urls", "http://127.0.33.31:2380"])
        .args(["--initial-cluster", "e0=http://127.0.33.31:2380"])
        .arg("--cert-file")
        .arg(&cert)
        .arg("--key-file")
        .arg(&key)
        .args(["--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (apt-get install etcd-server)")?;
    Ok((Proc(child), std::fs::read(&ca)?))
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base)?;
    println!(
        "api benchmark: GetVm (boxd, token per call) vs serializable Range (etcd), TLS + HTTP/2, \
         {CONNS} connections x {INFLIGHT} in flight, {seconds}s x {rounds} rounds, server on CPU 0, client on CPU 1"
    );
    let (boxd, boxd_ca, token) = start_boxd(dir.path())?;
    let (etcd, etcd_ca) = start_etcd(dir.path())?;
    // The client: this thread and the runtime's, on CPU 1 (the servers were started on 0).
    pin_to_cpu(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    let boxd_chans: Vec<Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..CONNS {
            v.push(channel(HTTPS, "api.boxd.test", &boxd_ca).await?);
        }
        anyhow::Ok(v)
    })?;
    let etcd_chans: Vec<Channel> = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            match channel(ETCD, "etcd.bench", &etcd_ca).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => bail!("etcd did not start: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let value = serde_json::to_vec(&boxd_benches::record("bench", 1))?;
        etcdpb::kv_client::KvClient::new(first.clone())
            .put(etcdpb::PutRequest {
                key: b"/boxd/vms/web".to_vec(),
                value,
                ..Default::default()
            })
            .await?;
        let mut v = vec![first];
        for _ in 1..CONNS {
            v.push(channel(ETCD, "etcd.bench", &etcd_ca).await?);
        }
        anyhow::Ok(v)
    })?;

    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let get_vm = {
        let chans = boxd_chans.clone();
        move |c: usize| {
            let mut client = apipb::boxd_client::BoxdClient::new(chans[c].clone());
            let mut req = tonic::Request::new(apipb::GetVmRequest { name: "web".into() });
            req.metadata_mut().insert("authorization", bearer.clone());
            async move {
                let vm = client.get_vm(req).await?.into_inner();
                anyhow::ensure!(vm.name == "web", "wrong VM: {vm:?}");
                Ok(())
            }
        }
    };
    let range = {
        let chans = etcd_chans.clone();
        move |c: usize| {
            let mut client = etcdpb::kv_client::KvClient::new(chans[c].clone());
            async move {
                let r = client
                    .range(etcdpb::RangeRequest {
                        key: b"/boxd/vms/web".to_vec(),
                        serializable: true,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(r.kvs.len() == 1, "no key");
                Ok(())
            }
        }
    };

    let (mut b, mut e) = (Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let (rb, re) = if round % 2 == 0 {
            let rb = measure(&rt, boxd.0.id(), seconds, get_vm.clone())?;
            (rb, measure(&rt, etcd.0.id(), seconds, range.clone())?)
        } else {
            let re = measure(&rt, etcd.0.id(), seconds, range.clone())?;
            (measure(&rt, boxd.0.id(), seconds, get_vm.clone())?, re)
        };
        eprintln!(
            "  round {}: boxd {:.0} calls/s, {:.0} per CPU-s; etcd {:.0} calls/s, {:.0} per CPU-s; ratio {:.2}",
            round + 1,
            rb.per_sec,
            rb.per_cpu,
            re.per_sec,
            re.per_cpu,
            rb.per_cpu / re.per_cpu
        );
        ratios.push(rb.per_cpu / re.per_cpu);
        b.push(rb);
        e.push(re);
    }
    let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    println!("\n| system | calls/s | calls per server CPU-s |\n|---|---|---|");
    println!(
        "| boxd GetVm | {:.0} | {:.0} |",
        med(&b, |r| r.per_sec),
        med(&b, |r| r.per_cpu)
    );
    println!(
        "| etcd Range (serializable) | {:.0} | {:.0} |",
        med(&e, |r| r.per_sec),
        med(&e, |r| r.per_cpu)
    );
    println!(
        "\nboxd/etcd calls per server CPU-second: median of per-round ratios {:.2} (goal >= 1.0)",
        median(ratios)
    );
    drop(rt);
    Ok(())
}
