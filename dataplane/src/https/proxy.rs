//! Connections on a shard: accept (only on our addresses, within the per-shard limits), TLS
//! handshake, read the request head within the header deadline, route by SNI (or Host) in the
//! View, connect to the VM, forward the rewritten head and the body as its framing says, then
//! the response; the client connection is kept alive for the next request when both sides
//! frame their bodies. Bodies are never buffered whole. Upgrades (WebSocket) become a
//! two-way byte stream.

use boxd_model::counters::{self, COUNTERS};
use std::net::SocketAddr;
use std::rc::Rc;

use futures_lite::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use glommio::net::{TcpListener, TcpStream};

use super::framing::{Body, Chunked};
use super::gather::Gathered;
use super::head::{self, Parse, Response};
use super::route::{Elsewhere, Target};
use super::shard::{IpSlot, Shard, Slot, read_head, read_request_head, timed_out, within};
use super::upstream::{Exchange, Outgoing, ProxyError, Upstream};
use super::{HttpsConfig, pages};

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
        // Boxed, so spawning moves a pointer: the connection's future is several KB (rustls'
        // state, the request loop), and glommio copied it whole more than once per spawn.
        let conn = Box::pin(serve_tls(stream, shard));
        glommio::spawn_local(async move {
            if let Err(e) = conn.await {
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

async fn serve_redirect(mut stream: TcpStream, shard: &Shard) -> std::io::Result<()> {
    if !shard.ours(stream.local_addr()?) {
        return Ok(());
    }
    let Some(_slot) = Slot::take(&shard.connections, shard.cfg.max_connections_per_shard) else {
        return Ok(());
    };
    stream.set_read_timeout(Some(shard.cfg.header_timeout()))?;
    let cfg = &shard.cfg;
    let mut buf = Vec::with_capacity(1024);
    let read = read_head(&mut stream, &mut buf, |b| {
        head::parse_request(b, cfg.max_headers, cfg.max_header_bytes)
    });
    let resp = match within(cfg.header_timeout(), read)
        .await
        .unwrap_or_else(|| Err(timed_out("request head")))?
    {
        Parse::Complete(req) => match req.host {
            // Only names of this cluster are redirected (else any Host would make this an
            // open redirect).
            Some(host) if !shard.view.current().in_zone(&host) => pages::bad_request(&format!(
                "{host} is not served here: only names in this cluster's zone are redirected to HTTPS."
            )),
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

async fn serve_tls(stream: TcpStream, shard: Rc<Shard>) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    if !shard.ours(local) {
        return Ok(());
    }
    let Some(_conn) = Slot::take(&shard.connections, shard.cfg.max_connections_per_shard) else {
        return Ok(());
    };
    let client = stream.peer_addr()?.ip();
    let Some(_per_ip) = IpSlot::take(&shard.per_ip, client, shard.cfg.max_connections_per_ip)
    else {
        return Ok(());
    };
    counters::inc(&COUNTERS.https_connections);
    let _closed = Closed;
    // The deadline covers the handshake and each request head (slowloris, and the idle time
    // of a kept-alive connection); lifted while a request is being forwarded.
    stream.set_read_timeout(Some(shard.cfg.header_timeout()))?;
    let mut tls = {
        let Some(_hs) = Slot::take(&shard.handshakes, shard.cfg.max_handshakes_per_shard) else {
            return Ok(());
        };
        // One deadline for the whole handshake, however the client paces its bytes.
        let accept = shard.acceptor.accept(Gathered::new(stream));
        let done = within(shard.cfg.header_timeout(), accept)
            .await
            .unwrap_or_else(|| Err(timed_out("TLS handshake")));
        if done.is_err() {
            counters::inc(&COUNTERS.https_handshake_errors);
        }
        done?
    };
    // The handshake's last writes (TLS 1.3 session tickets) are still held: they leave with
    // the first response (see `gather`).
    tls.get_mut().0.release();
    let sni = tls.get_ref().1.server_name().map(str::to_ascii_lowercase);
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        if let Some(api) = &shard.api
            && sni.as_deref().is_some_and(|h| shard.is_api(h))
        {
            // The API bounds its connections' idle time itself; a call may wait (a VM
            // starting) with nothing to read from the client meanwhile.
            tls.get_ref().0.set_read_timeout(None)?;
            use tokio_util::compat::FuturesAsyncReadCompatExt as _;
            let idle = shard.cfg.header_timeout();
            api.serve(Box::new(tls.compat()), client, idle).await;
            return Ok(());
        }
        // h2::serve bounds the preface and the idle time itself: a stream may wait on a slow
        // VM with nothing to read from the client meanwhile, so no read deadline here.
        tls.get_ref().0.set_read_timeout(None)?;
        return super::h2::serve(tls, Rc::clone(&shard), sni, client).await;
    }
    let cfg = &shard.cfg;
    // Bytes read from the client and not yet used: the start of the next request.
    let mut buf = Vec::with_capacity(4096);
    loop {
        tls.get_ref()
            .0
            .set_read_timeout(Some(cfg.header_timeout()))?;
        let req = match read_request_head(&mut tls, &mut buf, cfg.header_timeout(), |b| {
            head::parse_request(b, cfg.max_headers, cfg.max_header_bytes)
        })
        .await
        {
            Ok(Parse::Complete(r)) => r,
            Ok(Parse::Invalid(why)) => return reply(&mut tls, &pages::bad_request(&why)).await,
            Ok(Parse::Partial) => return Ok(()),
            // A kept-alive connection the client closes (or leaves idle) between requests.
            Err(_) if buf.is_empty() => return Ok(()),
            Err(e) => return Err(e),
        };
        buf.drain(..req.len);
        // An absolute-form target names the host too (RFC 9112 3.2.2).
        let named = [req.host.as_deref(), req.authority.as_deref()];
        let Target { host, vm, private } = match shard.target(sni.clone(), named) {
            Ok(t) => t,
            Err(Elsewhere::Page(page)) => return reply(&mut tls, &page).await,
            Err(Elsewhere::Site) => {
                let page =
                    super::site::answer(&shard, &req.method, &req.target, &req.cookies()).await;
                return reply(&mut tls, &page).await;
            }
            Err(Elsewhere::Api) => {
                let page = super::site::api(&shard, &req.method, &req.target);
                return reply(&mut tls, &page).await;
            }
        };
        let body = match req.body() {
            Ok(b) => b,
            Err(why) => return reply(&mut tls, &pages::bad_request(&why)).await,
        };
        let up = Upstream {
            addr: SocketAddr::from((private, vm.http_port)),
            name: &vm.name,
        };
        // The VM connection outlives this client connection: other clients of the shard reuse
        // it, so a client's `Connection: close` is not passed on.
        let head = req.forward(client, &host);
        tls.get_ref().0.set_read_timeout(None)?;
        if req.upgrade {
            let mut backend = match up.connect(&shard).await {
                Ok(b) => b,
                Err(e) => return fail(&mut tls, e.on_worker(shard.ops(), vm.worker).await).await,
            };
            backend.write_all(&head).await?;
            backend.write_all(&buf).await?;
            return tunnel(tls, backend, cfg, &up).await;
        }
        let limit = cfg.max_header_bytes;
        let mut out = H1Request {
            client: &mut tls,
            buf: &mut buf,
            head,
            body,
            limit,
        };
        let Exchange {
            vm: mut backend,
            buf: mut rbuf,
            resp,
        } = match up.exchange(&shard, &mut out).await {
            Ok(x) => x,
            Err(e) => return fail(&mut tls, e.on_worker(shard.ops(), vm.worker).await).await,
        };
        let rbody = resp.body(&req.method);
        // Either connection outlives this exchange only if the response's end is known.
        let framed = rbody != Body::UntilClose && resp.status != 101;
        let keep = framed && !req.wants_close();
        let reuse = framed && resp.keeps_alive();
        let out = resp.forward(keep);
        counters::https_response(resp.status);
        rbuf.drain(..resp.len);
        if resp.status == 101 {
            // The VM switched protocols without being asked to: carry bytes both ways.
            tls.write_all(&out).await?;
            tls.write_all(&rbuf).await?;
            backend.write_all(&buf).await?;
            return splice(tls, backend).await;
        }
        let whole = match rbody {
            Body::None => true,
            Body::Length(n) => rbuf.len() as u64 >= n,
            _ => false,
        };
        if !keep && whole {
            // The last response, already read whole, leaves together with the `close_notify`
            // after it. (Never one still streaming: its bytes must not wait.)
            tls.get_mut().0.hold();
        }
        copy_body(&mut backend, &mut rbuf, &mut tls, rbody, limit, out)
            .await
            .map_err(CopyError::download)?;
        // Nothing may follow a response the VM framed; if something did, the connection is
        // out of step and goes.
        if reuse && rbuf.is_empty() {
            shard.vms.put(up.addr, backend);
        }
        tls.flush().await?;
        if !keep {
            return tls.close().await;
        }
    }
}

/// An HTTP/1.1 request on its way to a VM: its rewritten head, then its body as it comes
/// from the client.
struct H1Request<'a, C> {
    client: &'a mut C,
    /// What was read from the client past the head.
    buf: &'a mut Vec<u8>,
    head: Vec<u8>,
    body: Body,
    /// Largest chunked trailer.
    limit: usize,
}

impl<C: AsyncRead + AsyncWrite + Unpin> Outgoing for H1Request<'_, C> {
    fn replayable(&self) -> bool {
        self.body == Body::None
    }

    async fn send(&mut self, vm: &mut TcpStream, again: bool) -> Result<(), ProxyError> {
        let head = if again {
            self.head.clone()
        } else {
            std::mem::take(&mut self.head)
        };
        copy_body(self.client, self.buf, vm, self.body, self.limit, head)
            .await
            .map_err(CopyError::upload)
    }

    async fn interim(&mut self, resp: &Response) -> Result<bool, ProxyError> {
        // 101 is final: the VM switched protocols without being asked to.
        if resp.status == 101 {
            return Ok(false);
        }
        // Interim answers (100 Continue) pass through; the final one follows.
        self.client
            .write_all(&resp.forward(true))
            .await
            .map_err(ProxyError::client)?;
        Ok(true)
    }
}

/// Answers a failed request with its page when there is one; otherwise the connection ends.
async fn fail<S: AsyncWrite + Unpin>(s: &mut S, e: ProxyError) -> std::io::Result<()> {
    tracing::debug!(fault = ?e.fault(), retry_safe = e.retry_safe(), error = %e, "request failed");
    match e.page() {
        Some(page) => reply(s, &page).await,
        None => Err(e.into()),
    }
}

impl From<ProxyError> for std::io::Error {
    fn from(e: ProxyError) -> Self {
        match e {
            ProxyError::Broken { source, .. } => source,
            e => std::io::Error::other(e),
        }
    }
}

/// Where copying a message failed.
#[derive(Debug)]
pub(super) enum CopyError {
    /// Reading the sender.
    Read(std::io::Error),
    /// Writing the receiver.
    Write(std::io::Error),
    /// The sender's chunked body does not follow RFC 9112 7.1.
    Framing(String),
}

impl CopyError {
    /// For a request: the client sent, the VM received.
    pub(super) fn upload(self) -> ProxyError {
        match self {
            Self::Read(e) => ProxyError::client(e),
            Self::Write(e) => ProxyError::vm(e),
            Self::Framing(why) => ProxyError::BadRequest(why),
        }
    }

    /// For a response: the VM sent, the client received.
    pub(super) fn download(self) -> ProxyError {
        match self {
            Self::Read(e) => ProxyError::vm(e),
            Self::Write(e) => ProxyError::client(e),
            Self::Framing(why) => {
                ProxyError::vm(std::io::Error::new(std::io::ErrorKind::InvalidData, why))
            }
        }
    }
}

/// Most bytes of a body read at a time. Allocated only for a body that is not already
/// buffered whole (zeroing 64 KiB per small response cost ~3 % of the shard under wrk).
const COPY_BUFFER: usize = 64 * 1024;

/// Writes a message's `head` and copies its body from `src` to `dst` as it comes: first what
/// is already in `buf` (in one write with the head: one TLS record and one `sendto` for a
/// small message, where two writes cost two), then from `src`; leaves in `buf` whatever
/// follows the body.
async fn copy_body<R, W>(
    src: &mut R,
    buf: &mut Vec<u8>,
    dst: &mut W,
    body: Body,
    max_trailer: usize,
    mut head: Vec<u8>,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let eof = || CopyError::Read(std::io::ErrorKind::UnexpectedEof.into());
    match body {
        Body::None => dst.write_all(&head).await.map_err(CopyError::Write),
        Body::Length(mut left) => {
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            head.extend_from_slice(&buf[..take]);
            dst.write_all(&head).await.map_err(CopyError::Write)?;
            buf.drain(..take);
            left -= take as u64;
            if left == 0 {
                return Ok(());
            }
            let size = usize::try_from(left).unwrap_or(usize::MAX).min(COPY_BUFFER);
            let mut chunk = vec![0u8; size];
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                let n = src
                    .read(&mut chunk[..want])
                    .await
                    .map_err(CopyError::Read)?;
                if n == 0 {
                    return Err(eof());
                }
                dst.write_all(&chunk[..n]).await.map_err(CopyError::Write)?;
                left -= n as u64;
            }
            Ok(())
        }
        Body::Chunked => {
            let mut dec = Chunked::new(max_trailer);
            let used = dec.feed(buf).map_err(CopyError::Framing)?;
            head.extend_from_slice(&buf[..used]);
            dst.write_all(&head).await.map_err(CopyError::Write)?;
            buf.drain(..used);
            if dec.done() {
                return Ok(());
            }
            let mut chunk = vec![0u8; COPY_BUFFER];
            while !dec.done() {
                let n = src.read(&mut chunk).await.map_err(CopyError::Read)?;
                if n == 0 {
                    return Err(eof());
                }
                let used = dec.feed(&chunk[..n]).map_err(CopyError::Framing)?;
                dst.write_all(&chunk[..used])
                    .await
                    .map_err(CopyError::Write)?;
                buf.extend_from_slice(&chunk[used..n]);
            }
            Ok(())
        }
        Body::UntilClose => {
            head.append(buf);
            dst.write_all(&head).await.map_err(CopyError::Write)?;
            let mut chunk = vec![0u8; COPY_BUFFER];
            loop {
                let n = src.read(&mut chunk).await.map_err(CopyError::Read)?;
                if n == 0 {
                    return Ok(());
                }
                dst.write_all(&chunk[..n]).await.map_err(CopyError::Write)?;
            }
        }
    }
}

/// An upgrade: forward the VM's answer, then carry bytes both ways until the VM closes.
async fn tunnel<C>(
    mut client: C,
    mut backend: TcpStream,
    cfg: &HttpsConfig,
    up: &Upstream<'_>,
) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut rbuf = Vec::with_capacity(2048);
    let r = read_head(&mut backend, &mut rbuf, |b| {
        head::parse_response(b, cfg.max_headers, cfg.max_header_bytes)
    })
    .await;
    let Ok(Parse::Complete(resp)) = r else {
        return reply(&mut client, &pages::bad_gateway(up.name, up.addr.port())).await;
    };
    counters::https_response(resp.status);
    client.write_all(&resp.forward(false)).await?;
    client.write_all(&rbuf[resp.len..]).await?;
    splice(client, backend).await
}

/// Carries bytes both ways until the VM closes (or the client vanishes).
async fn splice<C>(client: C, backend: TcpStream) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (client_r, mut client_w) = futures_lite::io::split(client);
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
        futures_lite::io::copy(backend_r, &mut client_w).await?;
        client_w.close().await
    };
    futures_lite::future::or(download, async move {
        upload.await;
        Ok(())
    })
    .await
}

/// Counts a closed client connection when dropped.
struct Closed;

impl Drop for Closed {
    fn drop(&mut self) {
        counters::inc(&COUNTERS.https_closed);
    }
}

async fn reply<S: AsyncWrite + Unpin>(s: &mut S, page: &[u8]) -> std::io::Result<()> {
    counters::https_response_bytes(page);
    s.write_all(page).await?;
    s.close().await
}
