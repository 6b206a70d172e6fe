//! The DNS server: one glommio executor per shard, each pinned to its CPU and owning its own
//! SO_REUSEPORT UDP socket and TCP listener, so the kernel spreads queries over shards with no
//! hand-off between them. Every query reads the zone through a [`ZoneSource`] (for boxd, the
//! lock-free View) and is answered by the sans-io [`Engine`].
//!
//! The caller binds the sockets ([`Sockets::bind`]) and hands them over, so a port conflict is
//! reported before anything starts, and tests can use their own.

use boxd_model::counters;
use std::cell::{Cell, RefCell};
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use boxd_model::ViewHandle;
use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::DnsConfig;
use crate::engine::{Action, Engine, Transport};
use crate::mmsg::Batch;
use crate::rrl::{self, RateLimiter, Verdict};
use crate::zone::ZoneView;

/// Where queries find the zone. Implemented by the control plane's `ViewHandle`.
pub trait ZoneSource: Send + Sync + 'static {
    /// The zone type.
    type Zone: ZoneView;
    /// Runs `f` on the current zone.
    fn with<R>(&self, f: impl FnOnce(&Self::Zone) -> R) -> R;
}

impl ZoneSource for ViewHandle {
    type Zone = boxd_model::View;
    fn with<R>(&self, f: impl FnOnce(&Self::Zone) -> R) -> R {
        f(&self.current())
    }
}

/// A fixed zone (tests, benchmarks of the server alone).
impl<Z: ZoneView + Send + Sync + 'static> ZoneSource for std::sync::Mutex<Z> {
    type Zone = Z;
    fn with<R>(&self, f: impl FnOnce(&Z) -> R) -> R {
        let z = self
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&z)
    }
}

/// One UDP socket and one TCP listener per shard, all on the same address (SO_REUSEPORT).
pub struct Sockets {
    pairs: Vec<(UdpSocket, TcpListener)>,
    addr: SocketAddr,
}

impl Sockets {
    /// Binds `shards` socket pairs on `addr`.
    pub fn bind(addr: SocketAddr, shards: usize) -> io::Result<Self> {
        use socket2::{Domain, Protocol, Socket, Type};
        let mut pairs = Vec::new();
        let mut addr = addr;
        for _ in 0..shards.max(1) {
            let u = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            u.set_reuse_port(true)?;
            u.set_recv_buffer_size(4 << 20)?;
            crate::mmsg::set_dont_fragment(&u, addr.is_ipv6())?;
            u.bind(&addr.into())?;
            u.set_nonblocking(true)?;
            // With port 0 the first bind picks the port; the others must share it.
            if let Some(a) = u.local_addr()?.as_socket() {
                addr = a;
            }
            let t = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            t.set_reuse_port(true)?;
            t.set_reuse_address(true)?;
            t.bind(&addr.into())?;
            t.listen(1024)?;
            t.set_nonblocking(true)?;
            pairs.push((u.into(), t.into()));
        }
        Ok(Self { pairs, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Running shards.
pub struct DnsServer {
    stop: Arc<AtomicBool>,
    shards: Vec<glommio::ExecutorJoinHandle<()>>,
    addr: SocketAddr,
}

/// How long a task runs before it yields when others wait: a UDP loop that always finds
/// datagrams queued gives the shard's TCP connections a turn at least this often.
const TIME_SLICE: Duration = Duration::from_millis(1);
/// I/O memory per executor: small, so that the default 8 MiB memlock limit suffices.
const IO_MEMORY: usize = 512 << 10;

impl DnsServer {
    /// Starts one shard per socket pair.
    pub fn start<S: ZoneSource>(
        sockets: Sockets,
        cfg: DnsConfig,
        engine: Engine,
        source: Arc<S>,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut shards = Vec::new();
        let addr = sockets.addr;
        for (i, (udp, tcp)) in sockets.pairs.into_iter().enumerate() {
            let placement = match cfg.cpus.get(i) {
                Some(cpu) => Placement::Fixed(*cpu),
                None => Placement::Unbound,
            };
            let (stop, engine, source, cfg) = (
                Arc::clone(&stop),
                engine.clone(),
                Arc::clone(&source),
                cfg.clone(),
            );
            let handle = LocalExecutorBuilder::new(placement)
                .name(&format!("boxd-dns-{i}"))
                .io_memory(IO_MEMORY)
                .preempt_timer(TIME_SLICE)
                .spawn(move || shard(udp, tcp, engine, source, cfg, stop))
                .map_err(|e| io::Error::other(format!("starting DNS shard {i}: {e}")))?;
            shards.push(handle);
        }
        Ok(Self { stop, shards, addr })
    }

    /// The address served.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops every shard and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.shards {
            let _ = h.join();
        }
    }
}

async fn shard<S: ZoneSource>(
    udp: UdpSocket,
    tcp: TcpListener,
    engine: Engine,
    source: Arc<S>,
    cfg: DnsConfig,
    stop: Arc<AtomicBool>,
) {
    // SAFETY: the descriptors come from sockets we own and give up here (into_raw_fd), so
    // glommio's sockets are their only owners.
    let udp = Rc::new(unsafe { glommio::net::UdpSocket::from_raw_fd(udp.into_raw_fd()) });
    // SAFETY: as above.
    let tcp = unsafe { glommio::net::TcpListener::from_raw_fd(tcp.into_raw_fd()) };
    let engine = Rc::new(engine);
    let rrl = Rc::new(RefCell::new(RateLimiter::new(
        cfg.rrl_responses_per_second,
        cfg.rrl_slip,
    )));
    let epoch = Instant::now();
    glommio::spawn_local(serve_udp(
        Rc::clone(&udp),
        Rc::clone(&engine),
        Arc::clone(&source),
        Rc::clone(&rrl),
        epoch,
    ))
    .detach();
    glommio::spawn_local(accept_tcp(tcp, engine, source, cfg)).detach();
    while !stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

async fn serve_udp<S: ZoneSource>(
    udp: Rc<glommio::net::UdpSocket>,
    engine: Rc<Engine>,
    source: Arc<S>,
    rrl: Rc<RefCell<RateLimiter>>,
    epoch: Instant,
) {
    let fd = udp.as_raw_fd();
    let mut batch = Box::<Batch>::default();
    loop {
        // Take whatever is queued; only an empty socket waits for readiness through glommio.
        let count = match batch.recv(fd) {
            Ok(0) => {
                if let Err(e) = udp.readable().await {
                    tracing::debug!(error = %e, "DNS UDP readiness");
                }
                continue;
            }
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "DNS UDP recvmmsg");
                glommio::yield_if_needed().await;
                continue;
            }
        };
        {
            let mut limiter = rrl.borrow_mut();
            let now = if limiter.enabled() {
                u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
            } else {
                0
            };
            source.with(|z| {
                let b = &mut *batch;
                for i in 0..count {
                    let out = &mut b.responses[i];
                    let Some(peer) = b.peers[i].as_socket() else {
                        out.clear();
                        continue;
                    };
                    let query = &b.queries[i][..b.lens[i]];
                    if engine.answer(z, query, Transport::Udp, peer.ip(), out) != Action::Reply {
                        out.clear();
                        counters::inc(&counters::COUNTERS.dns_dropped);
                        continue;
                    }
                    if limiter.enabled() {
                        match limiter.check(peer.ip(), now) {
                            Verdict::Send => {}
                            Verdict::Slip => rrl::truncate(out),
                            Verdict::Drop => out.clear(),
                        }
                    }
                    if out.is_empty() {
                        counters::inc(&counters::COUNTERS.dns_dropped);
                    } else {
                        counters::dns_answer(out);
                    }
                }
            });
        }
        match batch.send(fd, count) {
            Ok(unsent) => {
                // The socket buffer was full: wait for room through glommio.
                for i in unsent {
                    if let Some(peer) = batch.peers[i].as_socket()
                        && let Err(e) = udp.send_to(&batch.responses[i], peer).await
                    {
                        tracing::debug!(error = %e, %peer, "DNS UDP send");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "DNS UDP sendmmsg"),
        }
        // A busy socket never leaves this loop: let the shard's other tasks (TCP) run.
        glommio::yield_if_needed().await;
    }
}

async fn accept_tcp<S: ZoneSource>(
    listener: glommio::net::TcpListener,
    engine: Rc<Engine>,
    source: Arc<S>,
    cfg: DnsConfig,
) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "DNS TCP accept");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= cfg.tcp_max_connections {
            // Over the limit: close at once rather than queue.
            continue;
        }
        open.set(open.get() + 1);
        let (engine, source, cfg, open) = (
            Rc::clone(&engine),
            Arc::clone(&source),
            cfg.clone(),
            Rc::clone(&open),
        );
        glommio::spawn_local(async move {
            let _ = serve_tcp(stream, &engine, &*source, &cfg).await;
            open.set(open.get() - 1);
        })
        .detach();
    }
}

/// Reads exactly `buf.len()` bytes, or fails after `idle` without progress.
async fn read_idle(
    stream: &mut glommio::net::TcpStream,
    buf: &mut [u8],
    idle: Duration,
) -> io::Result<()> {
    let read = async { stream.read_exact(buf).await };
    let timeout = async {
        glommio::timer::sleep(idle).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "idle"))
    };
    futures_lite::future::or(read, timeout).await
}

async fn serve_tcp<S: ZoneSource>(
    mut stream: glommio::net::TcpStream,
    engine: &Engine,
    source: &S,
    cfg: &DnsConfig,
) -> io::Result<()> {
    let peer = stream.peer_addr()?.ip();
    let mut out = Vec::with_capacity(512);
    let mut query = Vec::with_capacity(512);
    for _ in 0..cfg.tcp_max_queries {
        let mut len = [0u8; 2];
        read_idle(&mut stream, &mut len, cfg.tcp_idle()).await?;
        query.resize(usize::from(u16::from_be_bytes(len)), 0);
        read_idle(&mut stream, &mut query, cfg.tcp_idle()).await?;
        let action = source.with(|z| engine.answer(z, &query, Transport::Tcp, peer, &mut out));
        match action {
            Action::Reply => {
                counters::dns_answer(&out);
                write_framed(&mut stream, &out).await?;
            }
            Action::Drop => {
                counters::inc(&counters::COUNTERS.dns_dropped);
                return Ok(());
            }
            Action::Transfer => {
                let messages = source.with(|z| engine.transfer(z, &query));
                for m in messages {
                    write_framed(&mut stream, &m).await?;
                }
            }
        }
    }
    Ok(())
}

async fn write_framed(stream: &mut glommio::net::TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await?;
    stream.flush().await
}
