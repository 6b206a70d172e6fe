//! What every connection on one HTTPS shard shares (settings, TLS acceptor, View, limits,
//! the pool of idle VM connections), and the deadline and head-reading helpers both HTTP
//! versions use. `proxy.rs` (HTTP/1.1), `h2.rs`, `route.rs` and `upstream.rs` build on it;
//! it depends on none of them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use boxd_model::view::ViewHandle;
use boxd_operations::Operations;
use futures_lite::{AsyncRead, AsyncReadExt as _};
use futures_rustls::TlsAcceptor;

use super::HttpsConfig;
use super::head::Parse;
use super::pool::Pool;

/// What every connection on one shard shares.
pub(super) struct Shard {
    pub(super) cfg: HttpsConfig,
    pub(super) acceptor: TlsAcceptor,
    pub(super) view: Arc<ViewHandle>,
    /// The operations (the zone's own pages read through them).
    pub(super) ops: Arc<Operations>,
    /// The gRPC API, for HTTP/2 connections to `api.<zone>`.
    pub(super) api: Option<Arc<dyn super::ApiServer>>,
    /// Signing in to link a key (`/register/<code>/login`), when configured.
    pub(super) sign_in: Option<Arc<boxd_oidc::SignIn>>,
    /// The port clients reach HTTPS on (for redirects).
    pub(super) https_port: u16,
    /// Open client connections.
    pub(super) connections: Cell<usize>,
    /// TLS handshakes in progress.
    pub(super) handshakes: Cell<usize>,
    /// Open connections per client address.
    pub(super) per_ip: RefCell<HashMap<IpAddr, usize>>,
    /// Idle VM connections, for any of this shard's client connections (see `pool`).
    pub(super) vms: Pool,
}

impl Shard {
    pub(super) fn new(
        cfg: HttpsConfig,
        tls: Arc<rustls::ServerConfig>,
        services: super::Services,
        https_port: u16,
    ) -> Self {
        Self {
            cfg,
            acceptor: TlsAcceptor::from(tls),
            view: Arc::clone(services.ops.view()),
            ops: services.ops,
            api: services.api,
            sign_in: services.sign_in,
            https_port,
            connections: Cell::new(0),
            handshakes: Cell::new(0),
            per_ip: RefCell::new(HashMap::new()),
            vms: Pool::default(),
        }
    }

    /// The shard's settings.
    pub(super) fn cfg(&self) -> &HttpsConfig {
        &self.cfg
    }

    /// The shard's idle VM connections.
    pub(super) fn vms(&self) -> &Pool {
        &self.vms
    }

    /// The operations.
    pub(super) fn ops(&self) -> &Operations {
        &self.ops
    }

    /// The View the shard routes by.
    pub(super) fn view(&self) -> &ViewHandle {
        &self.view
    }

    /// Whether a connection to `local` is ours: the lobby or a VM's public address.
    pub(super) fn ours(&self, local: SocketAddr) -> bool {
        match local.ip() {
            IpAddr::V4(ip) => self.view.current().is_public_address(ip),
            IpAddr::V6(_) => false,
        }
    }
}

/// Counts a connection for as long as it lives.
pub(super) struct Slot<'a>(&'a Cell<usize>);

impl<'a> Slot<'a> {
    pub(super) fn take(c: &'a Cell<usize>, max: usize) -> Option<Self> {
        (c.get() < max).then(|| {
            c.set(c.get() + 1);
            Self(c)
        })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Counts a client address's open connections for as long as one lives.
pub(super) struct IpSlot<'a> {
    counts: &'a RefCell<HashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl<'a> IpSlot<'a> {
    pub(super) fn take(
        counts: &'a RefCell<HashMap<IpAddr, usize>>,
        ip: IpAddr,
        max: usize,
    ) -> Option<Self> {
        let mut m = counts.borrow_mut();
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { counts, ip })
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.counts.borrow_mut();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// `f`'s output, or `None` if it takes longer than `limit` (then `f` is dropped).
pub(super) async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await
}

pub(super) fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} not complete in time"),
    )
}

/// Reads a request head whose first bytes may take as long as the socket's read timeout (a
/// kept-alive connection waiting for its next request) and which, from its first byte, must be
/// whole within `limit`: a head dripped a byte at a time does not renew its time with each
/// byte (slowloris).
pub(super) async fn read_request_head<S, T>(
    s: &mut S,
    buf: &mut Vec<u8>,
    limit: Duration,
    mut parse: impl FnMut(&[u8]) -> Parse<T>,
) -> std::io::Result<Parse<T>>
where
    S: AsyncRead + Unpin,
{
    if buf.is_empty() {
        let mut first = [0u8; 4096];
        let n = s.read(&mut first).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&first[..n]);
    }
    // Nearly every head is whole after its first read: no timer for those.
    match parse(buf) {
        Parse::Partial => {}
        done => return Ok(done),
    }
    within(limit, read_head(s, buf, parse))
        .await
        .unwrap_or_else(|| Err(timed_out("request head")))
}

/// Reads until a complete head (or a limit, or the peer goes away).
pub(super) async fn read_head<S, T>(
    s: &mut S,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Parse<T>,
) -> std::io::Result<Parse<T>>
where
    S: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    loop {
        match parse(buf) {
            Parse::Partial => {}
            done => return Ok(done),
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
