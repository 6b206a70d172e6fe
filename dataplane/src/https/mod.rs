//! The HTTPS front door on glommio shards: one executor per configured CPU, each with its own
//! SO_REUSEPORT listeners (TLS and the plain-HTTP redirect), terminating TLS with rustls and
//! proxying HTTP/1.1 to the VM the SNI names, found in the lock-free View.

pub mod framing;
mod gather;
mod h2;
pub mod head;
pub mod pages;
mod pool;
mod proxy;
mod route;
mod shard;
mod signin;
mod site;
pub mod tls;
mod upstream;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd as _, IntoRawFd as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use boxd_operations::Operations;
use glommio::{LocalExecutorBuilder, Placement};
use serde::{Deserialize, Serialize};

/// `[https]` of boxd's configuration file, defined once: the binary embeds this type in its
/// `Config` and hands it to [`HttpsServer::start`] as it is (with `cpus` resolved and
/// `ssh_port` set).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpsConfig {
    /// TLS listen address.
    pub listen: SocketAddr,
    /// Plain HTTP listen address that redirects to HTTPS.
    pub redirect_listen: SocketAddr,
    /// CPUs to run shards on, one pinned shard each; empty means every CPU (`boxd` resolves
    /// that before starting; given an empty list, the server runs one unpinned shard).
    pub cpus: Vec<usize>,
    /// Operator's certificate chain (PEM) for `*.<zone>`; empty: a local CA made by boxd.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Seconds a client has for its TLS handshake and each request head, and a kept-alive
    /// HTTP/1.1 or an HTTP/2 connection for its next request (slowloris).
    pub header_timeout_secs: u64,
    /// Seconds to wait for a VM to accept a connection before answering 502.
    pub connect_timeout_secs: u64,
    /// Most open client connections per shard.
    pub max_connections_per_shard: usize,
    /// Most TLS handshakes in progress per shard.
    pub max_handshakes_per_shard: usize,
    /// Seconds between checks of `cert` and `key` for changes (reloaded without dropping
    /// connections).
    pub reload_secs: u64,
    /// Most open connections from one client address, per shard.
    pub max_connections_per_ip: usize,
    /// Largest request or response head (not in the file).
    #[serde(skip)]
    pub max_header_bytes: usize,
    /// Most header fields in a head (not in the file).
    #[serde(skip)]
    pub max_headers: usize,
    /// The lobby's SSH port, for the zone's own page (not in the file: `ssh.listen`'s).
    #[serde(skip)]
    pub ssh_port: u16,
}

impl Default for HttpsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            redirect_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            cpus: Vec::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            header_timeout_secs: 10,
            connect_timeout_secs: 3,
            max_connections_per_shard: 10_000,
            max_handshakes_per_shard: 256,
            reload_secs: 5,
            max_connections_per_ip: 256,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            ssh_port: 22,
        }
    }
}

impl HttpsConfig {
    /// A client must finish its TLS handshake and request head within this.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    /// Connecting to a VM gives up after this: 502.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    /// Checks what the types cannot express (the certificate files are checked when they
    /// are loaded); the error names the field and the fix.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.cert.as_os_str().is_empty() != self.key.as_os_str().is_empty() {
            return Err((
                "https.cert",
                "set both https.cert and https.key, or neither (for a local CA)".into(),
            ));
        }
        for (field, path) in [("https.cert", &self.cert), ("https.key", &self.key)] {
            if !path.as_os_str().is_empty() && !path.is_file() {
                return Err((field, format!("{} is not a readable file", path.display())));
            }
        }
        if self.header_timeout_secs == 0
            || self.connect_timeout_secs == 0
            || self.max_connections_per_shard == 0
            || self.max_handshakes_per_shard == 0
            || self.reload_secs == 0
            || self.max_connections_per_ip == 0
        {
            return Err((
                "https.header_timeout_secs",
                "HTTPS timeouts and limits must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A TLS-terminated client connection, as the API server takes it (tokio's I/O traits).
pub trait ApiIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> ApiIo for T {}

/// What serves `api.<zone>` over HTTP/2: the gRPC API (`boxd-api`). It is handed each such
/// connection once TLS is done, on the shard that accepted it, and serves it there (the
/// future need not be `Send`).
pub trait ApiServer: Send + Sync + 'static {
    /// Serves `io` from `client` until it ends; a connection with no call in progress for
    /// `idle` (from its start, or since its last call ended) is closed, as an HTTP/2
    /// connection to a VM is.
    fn serve(
        &self,
        io: Box<dyn ApiIo>,
        client: std::net::IpAddr,
        idle: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;
}

/// Bound listeners: per shard a TLS listener and a redirect listener, SO_REUSEPORT.
pub struct Listeners {
    shards: Vec<(TcpListener, TcpListener)>,
    addr: SocketAddr,
    redirect_addr: SocketAddr,
}

impl Listeners {
    /// Binds `shards` listener sets.
    pub fn bind(cfg: &HttpsConfig, shards: usize) -> std::io::Result<Self> {
        let (mut addr, mut redirect_addr) = (cfg.listen, cfg.redirect_listen);
        let mut out = Vec::new();
        for _ in 0..shards.max(1) {
            let l = crate::shard::listen(addr)?;
            let r = crate::shard::listen(redirect_addr)?;
            // With port 0 the first bind picks the port; the other shards share it.
            addr = l.local_addr()?;
            redirect_addr = r.local_addr()?;
            out.push((l, r));
        }
        Ok(Self {
            shards: out,
            addr,
            redirect_addr,
        })
    }

    /// The TLS address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The redirect address.
    pub fn redirect_addr(&self) -> SocketAddr {
        self.redirect_addr
    }
}

/// Running shards.
pub struct HttpsServer {
    stop: Arc<AtomicBool>,
    shards: Vec<glommio::ExecutorJoinHandle<()>>,
}

/// I/O memory per executor: small, so that the default 8 MiB memlock limit suffices.
const IO_MEMORY: usize = 512 << 10;

/// What the shards answer with besides VMs.
#[derive(Clone)]
pub struct Services {
    /// The operations (the zone's pages, registration).
    pub ops: Arc<Operations>,
    /// The gRPC API, for HTTP/2 connections to `api.<zone>`.
    pub api: Option<Arc<dyn ApiServer>>,
    /// Signing in to link a key, when an OpenID provider is configured.
    pub sign_in: Option<Arc<boxd_oidc::SignIn>>,
}

impl HttpsServer {
    /// Starts one shard per listener set.
    pub fn start(
        listeners: Listeners,
        cfg: HttpsConfig,
        tls: Arc<rustls::ServerConfig>,
        services: Services,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let https_port = listeners.addr.port();
        let mut shards = Vec::new();
        for (i, (l, r)) in listeners.shards.into_iter().enumerate() {
            let placement = match cfg.cpus.get(i) {
                Some(cpu) => Placement::Fixed(*cpu),
                None => Placement::Unbound,
            };
            let (stop, cfg, tls) = (stop.clone(), cfg.clone(), tls.clone());
            let services = services.clone();
            let h = LocalExecutorBuilder::new(placement)
                .name(&format!("boxd-https-{i}"))
                .io_memory(IO_MEMORY)
                .spawn(move || async move {
                    // SAFETY: the descriptors come from listeners we own and give up here, so
                    // glommio's listeners are their only owners.
                    let l = unsafe { glommio::net::TcpListener::from_raw_fd(l.into_raw_fd()) };
                    let shard = Rc::new(shard::Shard::new(cfg, tls, services, https_port));
                    glommio::spawn_local(proxy::accept_tls(l, shard.clone())).detach();
                    // SAFETY: as above.
                    let r = unsafe { glommio::net::TcpListener::from_raw_fd(r.into_raw_fd()) };
                    glommio::spawn_local(proxy::accept_redirect(r, shard.clone())).detach();
                    let mut ticks = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                        ticks = ticks.wrapping_add(1);
                        if ticks.is_multiple_of(10) {
                            shard.vms().purge();
                        }
                    }
                })
                .map_err(|e| std::io::Error::other(format!("starting HTTPS shard {i}: {e}")))?;
            shards.push(h);
        }
        Ok(Self { stop, shards })
    }

    /// Stops every shard and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.shards {
            let _ = h.join();
        }
    }
}

use std::rc::Rc;
