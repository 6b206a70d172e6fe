//! Connections on a shard: accept (only on our addresses, within the per-shard limits), TLS
//! handshake, read the request head within the header deadline, route by SNI (or Host) in the
//! View, connect to the VM, forward the rewritten head, then stream both ways until the VM
//! closes. One request per connection for now (`Connection: close`); bodies are never
//! buffered whole.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use boxd_controlplane::model::Desired;
use boxd_controlplane::view::ViewHandle;
use futures_lite::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use futures_rustls::TlsAcceptor;
use glommio::net::{TcpListener, TcpStream};

use super::head::{self, Parse};
use super::{HttpsConfig, pages};

/// What every connection on one shard shares.
pub(super) struct Shard {
    cfg: HttpsConfig,
    acceptor: TlsAcceptor,
    view: Arc<ViewHandle>,
    https_port: u16,
    connections: Cell<usize>,
    handshakes: Cell<usize>,
}

impl Shard {
    pub(super) fn new(
        cfg: HttpsConfig,
        tls: Arc<rustls::ServerConfig>,
        view: Arc<ViewHandle>,
        https_port: u16,
    ) -> Self {
        Self {
            cfg,
            acceptor: TlsAcceptor::from(tls),
            view,
            https_port,
            connections: Cell::new(0),
            handshakes: Cell::new(0),
        }
    }

    /// Whether a connection to `local` is ours: the lobby or a pool address.
    fn ours(&self, local: SocketAddr) -> bool {
        if self.cfg.any_address {
            return true;
        }
        match local.ip() {
            IpAddr::V4(ip) => self.view.current().is_public_address(ip),
            IpAddr::V6(_) => false,
        }
    }
}

/// Counts a connection for as long as it lives.
struct Slot<'a>(&'a Cell<usize>);

impl<'a> Slot<'a> {
    fn take(c: &'a Cell<usize>, max: usize) -> Option<Self> {
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

pub(super) async fn accept_tls(listener: TcpListener, shard: Rc<Shard>) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "HTTPS accept");
                continue;
            }
        };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            if let Err(e) = serve_tls(stream, &shard).await {
                tracing::debug!(error = %e, "HTTPS connection");
            }
        })
        .detach();
    }
}

pub(super) async fn accept_redirect(listener: TcpListener, shard: Rc<Shard>) {
    loop {
        let Ok(stream) = listener.accept().await else {
            continue;
        };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let _ = serve_redirect(stream, &shard).await;
        })
        .detach();
    }
}

/// Reads until a complete head (or a limit, or the peer goes away).
async fn read_head<S, T>(
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

async fn serve_redirect(mut stream: TcpStream, shard: &Shard) -> std::io::Result<()> {
    if !shard.ours(stream.local_addr()?) {
        return Ok(());
    }
    let _slot = Slot::take(&shard.connections, shard.cfg.max_connections);
    stream.set_read_timeout(Some(shard.cfg.header_timeout))?;
    let cfg = &shard.cfg;
    let mut buf = Vec::with_capacity(1024);
    let resp = match read_head(&mut stream, &mut buf, |b| {
        head::parse_request(b, cfg.max_headers, cfg.max_header_bytes)
    })
    .await?
    {
        Parse::Complete(req) => match req.host {
            Some(host) => {
                let port = if shard.https_port == 443 {
                    String::new()
                } else {
                    format!(":{}", shard.https_port)
                };
                let loc = format!("https://{host}{port}{}", req.target);
                format!(
                    "HTTP/1.1 301 Moved Permanently\r\nLocation: {loc}\r\nContent-Length: 0\r\n\
                     Connection: close\r\n\r\n"
                )
                .into_bytes()
            }
            None => pages::bad_request("A Host header is needed to redirect to HTTPS."),
        },
        Parse::Invalid(why) => pages::bad_request(&why),
        Parse::Partial => return Ok(()),
    };
    stream.write_all(&resp).await?;
    stream.close().await
}

async fn serve_tls(stream: TcpStream, shard: &Shard) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    if !shard.ours(local) {
        return Ok(());
    }
    let Some(_conn) = Slot::take(&shard.connections, shard.cfg.max_connections) else {
        return Ok(());
    };
    let client = stream.peer_addr()?.ip();
    // The deadline covers the handshake and the request head (slowloris); lifted once the
    // request is on its way.
    stream.set_read_timeout(Some(shard.cfg.header_timeout))?;
    let mut tls = {
        let Some(_hs) = Slot::take(&shard.handshakes, shard.cfg.max_handshakes) else {
            return Ok(());
        };
        shard.acceptor.accept(stream).await?
    };
    let sni = tls.get_ref().1.server_name().map(str::to_ascii_lowercase);
    let cfg = &shard.cfg;
    let mut buf = Vec::with_capacity(2048);
    let req = match read_head(&mut tls, &mut buf, |b| {
        head::parse_request(b, cfg.max_headers, cfg.max_header_bytes)
    })
    .await?
    {
        Parse::Complete(r) => r,
        Parse::Invalid(why) => return reply(&mut tls, &pages::bad_request(&why)).await,
        Parse::Partial => return Ok(()),
    };
    // SNI names the VM; without SNI (an IP in the URL) the Host header does.
    let Some(host) = sni.or_else(|| req.host.clone()) else {
        return reply(
            &mut tls,
            &pages::bad_request("No server name and no Host header."),
        )
        .await;
    };
    let (route, zone) = {
        let view = shard.view.current();
        (
            view.vm_by_host(&host).cloned(),
            view.zone().unwrap_or("").to_owned(),
        )
    };
    let Some(vm) = route else {
        return reply(&mut tls, &pages::not_found(&host, &zone)).await;
    };
    let Some(private) = vm.private_ip.filter(|_| vm.desired == Desired::Running) else {
        let stopped = vm.desired != Desired::Running;
        return reply(&mut tls, &pages::unavailable(&vm.name, &zone, stopped)).await;
    };
    let backend_addr = SocketAddr::from((private, vm.http_port));
    let mut backend = match TcpStream::connect_timeout(backend_addr, cfg.connect_timeout).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(vm = %vm.name, addr = %backend_addr, error = %e, "VM did not accept");
            return reply(&mut tls, &pages::bad_gateway(&vm.name, vm.http_port)).await;
        }
    };
    backend.set_nodelay(true)?;
    backend.write_all(&req.forward(client, &host)).await?;
    backend.write_all(&buf[req.len..]).await?;
    tls.get_ref().0.set_read_timeout(None)?;

    let (client_r, mut client_w) = futures_lite::io::split(tls);
    let (backend_r, mut backend_w) = futures_lite::io::split(backend);
    let upload = async move {
        // Ok: the client finished sending (TLS close_notify): pass the half-close on, so a VM
        // waiting for more sees EOF, and let the response finish. Err: the client is gone
        // (reset, or EOF without close_notify): nobody will read the response, so the
        // connection ends here, whatever the VM is doing.
        if futures_lite::io::copy(client_r, &mut backend_w)
            .await
            .is_ok()
        {
            let _ = backend_w.close().await;
            std::future::pending::<()>().await;
        }
    };
    let download = async move {
        let mut backend_r = backend_r;
        let mut rbuf = Vec::with_capacity(2048);
        let r = read_head(&mut backend_r, &mut rbuf, |b| {
            head::parse_response(b, cfg.max_headers, cfg.max_header_bytes)
        })
        .await;
        match r {
            Ok(Parse::Complete(resp)) => {
                client_w.write_all(&resp.forward()).await?;
                client_w.write_all(&rbuf[resp.len..]).await?;
                futures_lite::io::copy(backend_r, &mut client_w).await?;
            }
            _ => {
                client_w
                    .write_all(&pages::bad_gateway(&vm.name, vm.http_port))
                    .await?;
            }
        }
        client_w.close().await
    };
    futures_lite::future::or(download, async move {
        upload.await;
        Ok(())
    })
    .await
}

async fn reply<S: AsyncWrite + Unpin>(s: &mut S, page: &[u8]) -> std::io::Result<()> {
    s.write_all(page).await?;
    s.close().await
}
