//! HTTP/2 from clients (ALPN `h2`), with the `h2` crate on the shard's glommio executor (its
//! I/O through tokio-util's compat adapters; it needs no timers or reactor of tokio's). Each
//! stream is a task of its own on the shard: routed like an HTTP/1.1 request (the
//! `:authority`, which must match SNI), turned into an HTTP/1.1 request to the VM — the same
//! head rewriting as HTTP/1.1 (forwarded fields, hop-by-hop fields dropped), body by its
//! Content-Length or chunked — and the VM's response turned back into HEADERS and DATA frames,
//! de-chunked, sent as the client's flow-control window allows. Nothing is buffered whole.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::route::{Elsewhere, Target};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use glommio::net::TcpStream;
use tokio_util::compat::FuturesAsyncReadCompatExt as _;

use super::framing::{Body, Chunked};
use super::head::{self, Parse, Response};
use super::pages;
use super::shard::{Shard, within};
use super::upstream::{Exchange, Outgoing, ProxyError, Upstream};

/// Streams one client may have open at once.
const MAX_STREAMS: u32 = 128;
/// Bytes read from a VM per DATA frame batch.
const READ: usize = 64 << 10;

/// Serves one HTTP/2 connection until the client closes it, or until it has had no open
/// stream for `header_timeout` — the bound a kept-alive HTTP/1.1 connection has between
/// requests. A client that never finishes its preface, or trickles a header block, never
/// opens a stream, so the same bound holds it too (slowloris).
pub(super) async fn serve<S>(
    tls: S,
    shard: Rc<Shard>,
    sni: Option<String>,
    client: IpAddr,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let cfg = shard.cfg();
    let idle = cfg.header_timeout();
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake::<_, Bytes>(tls.compat());
    let Some(conn) = within(idle, handshake).await else {
        tracing::debug!(%client, "no HTTP/2 preface in time");
        return Ok(());
    };
    let mut conn = conn.map_err(std::io::Error::other)?;
    let open = Rc::new(OpenStreams {
        count: Cell::new(0),
        idle_since: Cell::new(Instant::now()),
    });
    loop {
        // With streams open, wake up once per `idle` only to look again.
        let wait = match open.count.get() {
            0 => (open.idle_since.get() + idle).saturating_duration_since(Instant::now()),
            _ => idle,
        };
        let next = match within(wait, conn.accept()).await {
            Some(Some(next)) => next,
            Some(None) => break,
            None if open.count.get() == 0 && open.idle_since.get().elapsed() >= idle => {
                tracing::debug!(%client, "HTTP/2 connection idle; closing");
                // GOAWAY, then a short grace for it to go out; streams the client opens
                // meanwhile are refused by the GOAWAY's last stream id.
                conn.graceful_shutdown();
                let _ = within(CLOSE_GRACE, async {
                    while let Some(Ok(_)) = conn.accept().await {}
                })
                .await;
                break;
            }
            None => continue,
        };
        let (req, respond) = match next {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/2 connection");
                break;
            }
        };
        let (shard, sni) = (Rc::clone(&shard), sni.clone());
        let guard = OpenStreams::enter(&open);
        glommio::spawn_local(async move {
            let _open = guard;
            // Boxed: spawning then moves a small future, not the stream's (copying it whole
            // on spawn was ~3 % of the shard's time under h2load).
            if let Err(e) = Box::pin(stream(req, respond, &shard, sni, client)).await {
                tracing::debug!(fault = ?e.fault(), retry_safe = e.retry_safe(), error = %e, "HTTP/2 stream");
            }
        })
        .detach();
    }
    Ok(())
}

/// How long a closing idle connection gets to send its GOAWAY.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The streams of one connection being served, and since when there have been none.
struct OpenStreams {
    count: Cell<usize>,
    idle_since: Cell<Instant>,
}

impl OpenStreams {
    fn enter(this: &Rc<Self>) -> StreamGuard {
        this.count.set(this.count.get() + 1);
        StreamGuard(Rc::clone(this))
    }
}

/// One open stream; counted until dropped.
struct StreamGuard(Rc<OpenStreams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let n = self.0.count.get().saturating_sub(1);
        self.0.count.set(n);
        if n == 0 {
            self.0.idle_since.set(Instant::now());
        }
    }
}

type Respond = h2::server::SendResponse<Bytes>;

/// Sends one of the failure pages as the stream's response.
fn page(mut respond: Respond, page: &[u8]) -> Result<(), ProxyError> {
    let mut b = http::Response::builder();
    let body = match head::parse_response(page, 32, page.len()) {
        Parse::Complete(r) => {
            boxd_model::counters::https_response(r.status);
            b = b.status(r.status);
            for (name, value) in r.h2_fields() {
                b = b.header(name, value);
            }
            &page[r.len..]
        }
        _ => {
            b = b.status(500);
            &b""[..]
        }
    };
    let resp = b.body(()).map_err(ProxyError::boxd)?;
    let mut send = respond.send_response(resp, false).map_err(h2_client)?;
    send.send_data(Bytes::copy_from_slice(body), true)
        .map_err(h2_client)
}

/// A failed send on the client's stream.
fn h2_client(e: h2::Error) -> ProxyError {
    ProxyError::client(std::io::Error::other(e))
}

/// The request as an HTTP/1.1 head (parsed back with the HTTP/1.1 rules, so both versions are
/// rewritten alike), and whether its body goes chunked.
fn h1_head(parts: &http::request::Parts, authority: &str, has_body: bool) -> (Vec<u8>, bool) {
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let mut out = format!(
        "{} {target} HTTP/1.1\r\nhost: {authority}\r\n",
        parts.method
    )
    .into_bytes();
    let mut length = false;
    for (name, value) in &parts.headers {
        if name == http::header::HOST {
            continue;
        }
        length |= name == http::header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let chunked = has_body && !length;
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out, chunked)
}

async fn stream(
    req: http::Request<h2::RecvStream>,
    respond: Respond,
    shard: &Shard,
    sni: Option<String>,
    client: IpAddr,
) -> Result<(), ProxyError> {
    let cfg = shard.cfg();
    let (parts, mut body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let named = authority.as_deref().and_then(head::normalize_host);
    let Target { host, vm, private } = match shard.target(sni, [named.as_deref(), None]) {
        Ok(t) => t,
        Err(Elsewhere::Page(p)) => return page(respond, &p),
        Err(Elsewhere::Site) => {
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let cookies: Vec<&str> = (parts.headers.get_all(http::header::COOKIE).iter())
                .filter_map(|v| v.to_str().ok())
                .collect();
            let cookies = cookies.join("; ");
            let p = super::site::answer(shard, parts.method.as_str(), target, &cookies).await;
            return page(respond, &p);
        }
        Err(Elsewhere::Api) => {
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            return page(
                respond,
                &super::site::api(shard, parts.method.as_str(), target),
            );
        }
    };
    let has_body = !body.is_end_stream();
    let (raw, chunked) = h1_head(&parts, authority.as_deref().unwrap_or(&host), has_body);
    // The same field limit as HTTP/1.1 (`:authority` counts as Host does there), plus the
    // Transfer-Encoding added here.
    let req = match head::parse_request(&raw, cfg.max_headers + usize::from(chunked), raw.len()) {
        Parse::Complete(r) => r,
        Parse::Invalid(why) => return page(respond, &pages::bad_request(&why)),
        Parse::Partial => return page(respond, &pages::bad_request("incomplete request head")),
    };
    let up = Upstream {
        addr: SocketAddr::from((private, vm.http_port)),
        name: &vm.name,
    };
    let h1 = req.forward(client, &host);
    let mut out = H2Request {
        h1: &h1,
        body: &mut body,
        has_body,
        chunked,
    };
    let x = match up.exchange(shard, &mut out).await {
        Ok(x) => x,
        Err(e) => {
            let e = e.on_worker(shard.ops(), vm.worker).await;
            tracing::debug!(fault = ?e.fault(), retry_safe = e.retry_safe(), error = %e, "HTTP/2 request failed");
            return match e.page() {
                Some(p) => page(respond, &p),
                None => Err(e),
            };
        }
    };
    respond_with(x, respond, shard, &up, req.method.as_str()).await
}

/// Sends the VM's response on the stream: HEADERS, then the body de-framed into DATA frames
/// as the client's window allows; the VM connection goes back to the pool if it ended cleanly.
async fn respond_with(
    x: Exchange,
    mut respond: Respond,
    shard: &Shard,
    up: &Upstream<'_>,
    method: &str,
) -> Result<(), ProxyError> {
    let Exchange {
        vm: mut backend,
        buf: mut rbuf,
        resp,
    } = x;
    rbuf.drain(..resp.len);
    let framing = resp.body(method);
    // Whether the VM connection may carry a later stream once this response has ended.
    let reusable = framing != Body::UntilClose && resp.keeps_alive();
    boxd_model::counters::https_response(resp.status);
    let mut out = http::Response::builder().status(resp.status);
    for (name, value) in resp.h2_fields() {
        out = out.header(name, value);
    }
    let out = out.body(()).map_err(ProxyError::boxd)?;
    if matches!(framing, Body::None | Body::Length(0)) {
        respond.send_response(out, true).map_err(h2_client)?;
        if reusable && rbuf.is_empty() {
            shard.vms().put(up.addr, backend);
        }
        return Ok(());
    }
    let mut send = respond.send_response(out, false).map_err(h2_client)?;
    let mut left = match framing {
        Body::Length(n) => Some(n),
        _ => None,
    };
    let mut chunks = (framing == Body::Chunked).then(|| Chunked::new(shard.cfg().max_header_bytes));
    // Allocated (and zeroed) only once a body must be read from the VM: a small response is
    // usually whole in `rbuf` already (64 KiB zeroed per stream was ~4 % of the shard).
    let mut buf = Vec::new();
    loop {
        let (raw, fresh) = if rbuf.is_empty() {
            if buf.is_empty() {
                buf.resize(READ, 0);
            }
            let n = backend.read(&mut buf).await.map_err(ProxyError::vm)?;
            if n == 0 {
                if framing == Body::UntilClose {
                    break;
                }
                // Resets the stream.
                return Err(ProxyError::vm(std::io::ErrorKind::UnexpectedEof.into()));
            }
            (&buf[..n], true)
        } else {
            (&rbuf[..], false)
        };
        let (data, used): (Vec<u8>, usize) = match (&mut chunks, &mut left) {
            (Some(c), _) => {
                let mut d = Vec::with_capacity(raw.len());
                let used = c
                    .decode(raw, &mut d)
                    .map_err(|e| ProxyError::vm(std::io::Error::other(e)))?;
                (d, used)
            }
            (None, Some(n)) => {
                let take = usize::try_from(*n).unwrap_or(usize::MAX).min(raw.len());
                *n -= take as u64;
                (raw[..take].to_vec(), take)
            }
            (None, None) => (raw.to_vec(), raw.len()),
        };
        // Bytes after the body: the VM is out of step, its connection is not kept.
        let tail = used < raw.len();
        if !fresh {
            rbuf.clear();
        }
        let done = chunks.as_ref().is_some_and(Chunked::done) || left == Some(0);
        // The last piece carries END_STREAM itself (no empty DATA frame after it).
        send_all(&mut send, Bytes::from(data), done)
            .await
            .map_err(ProxyError::client)?;
        if done {
            if reusable && !tail {
                shard.vms().put(up.addr, backend);
            }
            return Ok(());
        }
    }
    send.send_data(Bytes::new(), true).map_err(h2_client)
}

/// An HTTP/2 stream's request on its way to a VM, as HTTP/1.1.
struct H2Request<'a> {
    /// The rewritten head.
    h1: &'a [u8],
    body: &'a mut h2::RecvStream,
    has_body: bool,
    /// Whether the body goes chunked (the client gave no length).
    chunked: bool,
}

impl Outgoing for H2Request<'_> {
    fn replayable(&self) -> bool {
        !self.has_body
    }

    async fn send(&mut self, vm: &mut TcpStream, _again: bool) -> Result<(), ProxyError> {
        send_request(vm, self.h1, self.body, self.has_body, self.chunked).await
    }

    async fn interim(&mut self, _resp: &Response) -> Result<bool, ProxyError> {
        // Interim answers end here (HTTP/2 has no 101); the final one follows.
        Ok(true)
    }
}

/// Writes the request head `h1` and, if `has_body`, the client's body as it comes (chunked
/// when the client gave no length), giving its flow-control window back as it is sent on.
async fn send_request(
    backend: &mut TcpStream,
    h1: &[u8],
    body: &mut h2::RecvStream,
    has_body: bool,
    chunked: bool,
) -> Result<(), ProxyError> {
    backend.write_all(h1).await.map_err(ProxyError::vm)?;
    if has_body {
        while let Some(data) = body.data().await {
            let data = data.map_err(|e| ProxyError::client(std::io::Error::other(e)))?;
            let n = data.len();
            if chunked && n > 0 {
                // One write per chunk (size line, data, CRLF): one `sendto`, not three.
                let mut piece = format!("{n:x}\r\n").into_bytes();
                piece.reserve(n + 2);
                piece.extend_from_slice(&data);
                piece.extend_from_slice(b"\r\n");
                backend.write_all(&piece).await.map_err(ProxyError::vm)?;
            } else {
                backend.write_all(&data).await.map_err(ProxyError::vm)?;
            }
            _ = body.flow_control().release_capacity(n);
        }
        if chunked {
            backend
                .write_all(b"0\r\n\r\n")
                .await
                .map_err(ProxyError::vm)?;
        }
    }
    backend.flush().await.map_err(ProxyError::vm)
}

/// Sends `data` as the client's window allows (never queueing more than it granted), the
/// last piece with END_STREAM if `end`.
async fn send_all(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> std::io::Result<()> {
    if data.is_empty() && end {
        return send.send_data(data, true).map_err(std::io::Error::other);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?
            .map_err(std::io::Error::other)?;
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        send.send_data(piece, end && data.is_empty())
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}
