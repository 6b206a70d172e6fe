//! HTTP/1.1 heads as the proxy sees them: parsed with httparse, rewritten for the next hop
//! (hop-by-hop fields dropped, `X-Forwarded-*` and `Forwarded` added). Sans-io: bytes in,
//! bytes out; the fuzz target drives it with arbitrary input.

use std::net::IpAddr;

use super::framing::Body;

/// Result of parsing a head from the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse<T> {
    /// Read more.
    Partial,
    /// A complete head.
    Complete(T),
    /// Not HTTP/1.x, or over a limit: the message says which.
    Invalid(String),
}

/// A request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Host header (port and trailing dot removed, lower case), if any.
    pub host: Option<String>,
    /// The host an absolute-form target names (`GET https://a.zone/ …`), normalized like
    /// `host`; the target itself is then kept in origin form (RFC 9112 3.2.2).
    pub authority: Option<String>,
    /// The client asks to switch protocols (WebSocket).
    pub upgrade: bool,
    /// Bytes of the head in the buffer.
    pub len: usize,
    /// HTTP/1.x minor version.
    pub minor: u8,
    headers: Vec<(String, Vec<u8>)>,
}

/// A response head.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Bytes of the head in the buffer.
    pub len: usize,
    /// HTTP/1.x minor version.
    minor: u8,
    reason: String,
    headers: Vec<(String, Vec<u8>)>,
}

/// Fields that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Fields that frame or route a message: a `Connection` field naming one of them would make
/// the proxy drop it while still acting on it (request smuggling), so such a request is
/// refused, and no response ever loses one to `Connection`.
const FRAMING: &[&str] = &["content-length", "transfer-encoding", "host"];

fn owned(headers: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect()
}

/// Names the Connection field lists, which are hop-by-hop too.
fn connection_tokens(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    tokens(headers, "connection")
}

/// The fields to drop because Connection names them: never a framing or routing field.
fn connection_drops(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut drop = connection_tokens(headers);
    drop.retain(|t| !FRAMING.contains(&t.as_str()));
    drop
}

/// The comma-separated tokens of every `name` field, lower-cased.
fn tokens(headers: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Strips a port and a trailing dot from a Host value and lower-cases it.
pub fn normalize_host(v: &str) -> Option<String> {
    let v = v.trim();
    let host = if let Some(rest) = v.strip_prefix('[') {
        // [v6]:port — not a VM name, but keep it as it is.
        rest.split(']').next()?
    } else {
        v.rsplit_once(':').map_or(v, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                v
            }
        })
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    // A URI host is ASCII (RFC 3986 3.2.2); anything else names nothing of ours.
    (!host.is_empty() && host.is_ascii()).then(|| host.to_ascii_lowercase())
}

/// Parses a request head.
pub fn parse_request(buf: &[u8], max_headers: usize, max_bytes: usize) -> Parse<Request> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => {
            Parse::Invalid(format!("request head larger than {max_bytes} bytes"))
        }
        Ok(httparse::Status::Partial) => Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            Parse::Invalid(format!("more than {max_headers} header fields"))
        }
        Err(e) => Parse::Invalid(format!("malformed request: {e}")),
        Ok(httparse::Status::Complete(len)) if len > max_bytes => {
            Parse::Invalid(format!("request head larger than {max_bytes} bytes"))
        }
        Ok(httparse::Status::Complete(len)) => {
            let method = req.method.unwrap_or("GET");
            let minor = req.version.unwrap_or(1);
            let headers = owned(req.headers);
            match checked_request(method, req.path.unwrap_or("/"), minor, &headers) {
                Ok((target, host, authority)) => {
                    let upgrade = headers.iter().any(|(n, _)| n == "upgrade")
                        && connection_tokens(&headers).iter().any(|t| t == "upgrade");
                    Parse::Complete(Request {
                        method: method.to_owned(),
                        target,
                        host,
                        authority,
                        upgrade,
                        len,
                        minor,
                        headers,
                    })
                }
                Err(why) => Parse::Invalid(why),
            }
        }
    }
}

/// The checks RFC 9112 asks of a request head before anyone acts on it: exactly one valid
/// `Host` in HTTP/1.1 (at most one in 1.0), no framing or routing field named by `Connection`,
/// a request target in one of the four forms; an absolute-form target is split into its
/// host (returned as the authority) and its origin form.
/// Returns the target to forward, the Host and the authority.
fn checked_request(
    method: &str,
    target: &str,
    minor: u8,
    headers: &[(String, Vec<u8>)],
) -> Result<(String, Option<String>, Option<String>), String> {
    let mut hosts = headers.iter().filter(|(n, _)| n == "host");
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err("more than one Host header".into()),
        (None, _) if minor >= 1 => return Err("an HTTP/1.1 request needs a Host header".into()),
        (None, _) => None,
        (Some((_, v)), None) => Some(
            std::str::from_utf8(v)
                .ok()
                .and_then(normalize_host)
                .ok_or("the Host header is empty or not text")?,
        ),
    };
    if let Some(t) = connection_tokens(headers)
        .into_iter()
        .find(|t| FRAMING.contains(&t.as_str()))
    {
        return Err(format!(
            "the Connection header may not name {t}: it frames or routes the request"
        ));
    }
    let (target, authority) = if target.starts_with('/') {
        (target.to_owned(), None)
    } else if let Some((scheme, rest)) = target.split_once("://")
        && (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
    {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (auth, path) = rest.split_at(end);
        if auth.contains('@') {
            return Err("a request target with user information".into());
        }
        let auth = normalize_host(auth).ok_or("a request target without a host")?;
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('/') => p.to_owned(),
            p => format!("/{p}"),
        };
        (path, Some(auth))
    } else if (target == "*" && method == "OPTIONS") || method == "CONNECT" {
        (target.to_owned(), None)
    } else {
        return Err(format!("request target {target:?} is not a path or a URL"));
    };
    Ok((target, host, authority))
}

/// Parses a response head.
pub fn parse_response(buf: &[u8], max_headers: usize, max_bytes: usize) -> Parse<Response> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => {
            Parse::Invalid(format!("response head larger than {max_bytes} bytes"))
        }
        Ok(httparse::Status::Partial) => Parse::Partial,
        Err(e) => Parse::Invalid(format!("malformed response: {e}")),
        Ok(httparse::Status::Complete(len)) => match resp.code {
            Some(status @ 100..=599) => Parse::Complete(Response {
                status,
                len,
                minor: resp.version.unwrap_or(0),
                reason: resp.reason.unwrap_or("").to_owned(),
                headers: owned(resp.headers),
            }),
            other => Parse::Invalid(format!("response status {other:?} is not 100-599")),
        },
    }
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// The body framing the fields declare: Transfer-Encoding (chunked last) or Content-Length
/// (all copies equal). `Err` for what cannot be framed safely.
fn declared_body(headers: &[(String, Vec<u8>)]) -> Result<Option<Body>, String> {
    let te = tokens(headers, "transfer-encoding");
    if te.is_empty() && headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err("empty Transfer-Encoding".into());
    }
    let mut lengths = headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| {
            std::str::from_utf8(v)
                .ok()
                .map(str::trim)
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| "bad Content-Length".to_owned())
        });
    let first = lengths.next().transpose()?;
    for l in lengths {
        if Some(l?) != first {
            return Err("conflicting Content-Length fields".into());
        }
    }
    match (te.last().map(String::as_str), first) {
        (Some(_), Some(_)) => Err("both Transfer-Encoding and Content-Length".into()),
        (Some("chunked"), None) => Ok(Some(Body::Chunked)),
        (Some(_), None) => Ok(Some(Body::UntilClose)),
        (None, Some(n)) => Ok(Some(Body::Length(n))),
        (None, None) => Ok(None),
    }
}

impl Request {
    /// The request body's framing (RFC 9112 6.3): none unless declared; a transfer coding
    /// that does not end in chunked, or both codings and a length, cannot be framed: `Err`.
    pub fn body(&self) -> Result<Body, String> {
        let te = tokens(&self.headers, "transfer-encoding");
        if !te.is_empty() && self.minor == 0 {
            return Err("Transfer-Encoding in an HTTP/1.0 request".into());
        }
        if te.iter().filter(|t| *t == "chunked").count() > 1 {
            return Err("chunked applied more than once".into());
        }
        match declared_body(&self.headers)? {
            None => Ok(Body::None),
            Some(Body::UntilClose) => Err("request Transfer-Encoding must end in chunked".into()),
            Some(b) => Ok(b),
        }
    }

    /// Every `Cookie` field, joined with `; ` (HTTP/2 may split them, RFC 9113 8.2.3); empty
    /// when there is none or it is not text.
    pub fn cookies(&self) -> String {
        let mut out = String::new();
        for (_, v) in self.headers.iter().filter(|(n, _)| n == "cookie") {
            if let Ok(v) = std::str::from_utf8(v) {
                if !out.is_empty() {
                    out.push_str("; ");
                }
                out.push_str(v);
            }
        }
        out
    }

    /// How many fields named `name` (lower case) the head has.
    pub fn fields(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }

    /// Whether the client wants the connection closed after this exchange.
    pub fn wants_close(&self) -> bool {
        let tokens = connection_tokens(&self.headers);
        self.minor == 0 || tokens.iter().any(|t| t == "close")
    }

    /// The head to send the VM: HTTP/1.1, hop-by-hop fields removed, no `Connection` field
    /// (the VM connection stays open for later requests, whatever the client does with its
    /// own; an upgrade keeps `Connection: upgrade`), and who asked: `X-Forwarded-For`
    /// (appended), `X-Forwarded-Proto`, `X-Forwarded-Host`, `Forwarded` (RFC 7239).
    pub fn forward(&self, client: IpAddr, host: &str) -> Vec<u8> {
        let drop = connection_drops(&self.headers);
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut xff: Option<Vec<u8>> = None;
        for (name, value) in &self.headers {
            if name == "x-forwarded-for" {
                let v = xff.get_or_insert_with(Vec::new);
                if !v.is_empty() {
                    v.extend_from_slice(b", ");
                }
                v.extend_from_slice(value);
                continue;
            }
            if HOP_BY_HOP.contains(&name.as_str())
                || drop.contains(name)
                || name.starts_with("x-forwarded-proto")
                || name == "x-forwarded-host"
            {
                continue;
            }
            push_field(&mut out, name, value);
        }
        if self.host.is_none() {
            // An HTTP/1.0 client may omit Host; the VM gets the name the request was routed by.
            push_field(&mut out, "host", host.as_bytes());
        }
        if self.upgrade {
            if let Some((_, v)) = self.headers.iter().find(|(n, _)| n == "upgrade") {
                push_field(&mut out, "upgrade", v);
            }
            push_field(&mut out, "connection", b"upgrade");
        }
        let mut chain = xff.unwrap_or_default();
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(client.to_string().as_bytes());
        push_field(&mut out, "x-forwarded-for", &chain);
        push_field(&mut out, "x-forwarded-proto", b"https");
        push_field(&mut out, "x-forwarded-host", host.as_bytes());
        let fwd = format!("for={};proto=https;host=\"{host}\"", forwarded_for(client));
        push_field(&mut out, "forwarded", fwd.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }
}

impl Response {
    /// The response body's framing for a request with `method` (RFC 9112 6.3).
    pub fn body(&self, method: &str) -> Body {
        if method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Body::None;
        }
        match declared_body(&self.headers) {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => Body::UntilClose,
        }
    }

    /// Whether the VM keeps its connection open after this response (HTTP/1.1 without
    /// `Connection: close`), so that it may carry another request.
    pub fn keeps_alive(&self) -> bool {
        self.minor >= 1
            && !connection_tokens(&self.headers)
                .iter()
                .any(|t| t == "close")
    }

    /// The fields an HTTP/2 response carries: those of [`Response::forward`] less what HTTP/2
    /// forbids (hop-by-hop and connection-specific fields, `Transfer-Encoding`).
    pub fn h2_fields(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let drop = connection_drops(&self.headers);
        self.headers
            .iter()
            .filter(move |(n, _)| {
                !HOP_BY_HOP.contains(&n.as_str()) && !drop.contains(n) && n != "transfer-encoding"
            })
            .map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// The head to send the client: hop-by-hop fields removed; `Connection: close` unless
    /// `keep_alive`; `101 Switching Protocols` keeps its upgrade.
    pub fn forward(&self, keep_alive: bool) -> Vec<u8> {
        let drop = connection_drops(&self.headers);
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", self.status, self.reason).as_bytes());
        for (name, value) in &self.headers {
            if self.status == 101 && (name == "upgrade" || name == "connection") {
                push_field(&mut out, name, value);
                continue;
            }
            if HOP_BY_HOP.contains(&name.as_str()) || drop.contains(name) {
                continue;
            }
            push_field(&mut out, name, value);
        }
        if self.status != 101 && !keep_alive {
            push_field(&mut out, "connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Request {
        match parse_request(s.as_bytes(), 64, 16384) {
            Parse::Complete(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(
            normalize_host("MyApp.Boxd.Test:8443"),
            Some("myapp.boxd.test".into())
        );
        assert_eq!(
            normalize_host("myapp.boxd.test."),
            Some("myapp.boxd.test".into())
        );
        assert_eq!(normalize_host("[::1]:80"), Some("::1".into()));
        assert_eq!(normalize_host(""), None);
    }

    #[test]
    fn request_forwarding() {
        let r = req(
            "POST /up?x=1 HTTP/1.1\r\nHost: A.boxd.test:8443\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\n\
             Content-Length: 3\r\n\r\nabc",
        );
        assert_eq!(r.host.as_deref(), Some("a.boxd.test"));
        assert!(!r.upgrade);
        let client = "192.0.2.7".parse().expect("ip");
        let out = String::from_utf8(r.forward(client, "a.boxd.test")).expect("utf8");
        assert!(out.starts_with("POST /up?x=1 HTTP/1.1\r\n"), "{out}");
        assert!(out.contains("content-length: 3\r\n"));
        assert!(!out.contains("connection:"), "persistent by default: {out}");
        assert!(
            out.contains("x-forwarded-for: 10.0.0.1, 192.0.2.7\r\n"),
            "{out}"
        );
        assert!(out.contains("x-forwarded-proto: https\r\n"));
        assert!(out.contains("forwarded: for=192.0.2.7;proto=https;host=\"a.boxd.test\"\r\n"));
        for gone in ["keep-alive", "x-secret", "x-forwarded-proto: http\r"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert!(out.ends_with("\r\n\r\n"));
    }

    #[test]
    fn upgrades_keep_their_fields() {
        let r = req(
            "GET /ws HTTP/1.1\r\nHost: a.boxd.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(r.upgrade);
        let out =
            String::from_utf8(r.forward("::1".parse().expect("ip"), "a.boxd.test")).expect("utf8");
        assert!(
            out.contains("upgrade: websocket\r\nconnection: upgrade\r\n"),
            "{out}"
        );
        assert!(out.contains("forwarded: for=\"[::1]\""), "{out}");
        let resp = match parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            64,
            16384,
        ) {
            Parse::Complete(r) => r,
            other => panic!("{other:?}"),
        };
        let out = String::from_utf8(resp.forward(false)).expect("utf8");
        assert!(out.contains("upgrade: websocket") && out.contains("connection: Upgrade"));
        assert!(!out.contains("connection: close"));
    }

    #[test]
    fn body_framing() {
        let r = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.body(), Ok(Body::Length(5)));
        assert!(!r.wants_close());
        let r = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(r.body(), Ok(Body::Chunked));
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a\r\n\r\n").body(),
            Ok(Body::None)
        );
        assert!(req("GET / HTTP/1.0\r\n\r\n").wants_close());
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n").wants_close());
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding:\r\nContent-Length: 5\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n",
        ] {
            let bad = format!("{bad}Host: a\r\n\r\n");
            assert!(req(&bad).body().is_err(), "{bad}");
        }
        let resp = |s: &str| match parse_response(s.as_bytes(), 64, 16384) {
            Parse::Complete(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").body("GET"),
            Body::Length(3)
        );
        assert_eq!(
            resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").body("HEAD"),
            Body::None
        );
        assert_eq!(
            resp("HTTP/1.1 204 No Content\r\n\r\n").body("GET"),
            Body::None
        );
        assert_eq!(
            resp("HTTP/1.1 200 OK\r\n\r\n").body("GET"),
            Body::UntilClose
        );
        let keep =
            String::from_utf8(resp("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").forward(true))
                .expect("utf8");
        assert!(!keep.contains("connection"), "{keep}");
        // Whether the VM's connection can carry another request.
        assert!(resp("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").keeps_alive());
        assert!(!resp("HTTP/1.1 200 OK\r\nConnection: Close\r\n\r\n").keeps_alive());
        assert!(!resp("HTTP/1.1 200 OK\r\nConnection: x, close\r\n\r\n").keeps_alive());
        assert!(!resp("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keeps_alive());
    }

    fn invalid(s: &str) -> String {
        match parse_request(s.as_bytes(), 64, 16384) {
            Parse::Invalid(why) => why,
            other => panic!("{s:?} parsed: {other:?}"),
        }
    }

    /// Issue 25, finding 1: `Connection` naming a framing or routing field would have the proxy
    /// drop the field while still framing by it, so the VM read the body as a second request.
    #[test]
    fn connection_may_not_name_framing_fields() {
        for name in ["Content-Length", "transfer-encoding", "Host"] {
            let why = invalid(&format!(
                "POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, {name}\r\n\
                 Content-Length: 5\r\n\r\n"
            ));
            assert!(why.contains(&name.to_ascii_lowercase()), "{why}");
        }
        // A response cannot lose its framing to Connection either.
        let resp = match parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok",
            64,
            16384,
        ) {
            Parse::Complete(r) => r,
            other => panic!("{other:?}"),
        };
        let out = String::from_utf8(resp.forward(true)).expect("utf8");
        assert!(out.contains("content-length: 2\r\n"), "{out}");
        assert!(resp.h2_fields().any(|(n, _)| n == "content-length"));
    }

    /// Issue 25, finding 7: one Host, and an absolute-form target's host is reported for the
    /// proxy to check (and forwarded in origin form).
    #[test]
    fn host_and_target_forms() {
        assert!(invalid("GET / HTTP/1.1\r\n\r\n").contains("Host"));
        assert!(invalid("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").contains("Host"));
        assert!(invalid("GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n").contains("Host"));
        assert!(invalid("GET / HTTP/1.1\r\nHost: \r\n\r\n").contains("Host"));
        assert!(invalid("GET foo HTTP/1.1\r\nHost: a\r\n\r\n").contains("target"));
        assert!(invalid("GET * HTTP/1.1\r\nHost: a\r\n\r\n").contains("target"));
        assert!(invalid("GET http://u@b/ HTTP/1.1\r\nHost: a\r\n\r\n").contains("user"));
        let r = req("GET HTTPS://B.boxd.test:8443?q=1 HTTP/1.1\r\nHost: a.boxd.test\r\n\r\n");
        assert_eq!(r.authority.as_deref(), Some("b.boxd.test"));
        assert_eq!(r.host.as_deref(), Some("a.boxd.test"));
        assert_eq!(r.target, "/?q=1");
        assert_eq!(req("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").target, "*");
        // HTTP/1.0 may leave Host out; the VM then gets the name the request was routed by.
        let r = req("GET / HTTP/1.0\r\n\r\n");
        assert_eq!(r.host, None);
        let out = String::from_utf8(r.forward("192.0.2.7".parse().expect("ip"), "a.boxd.test"))
            .expect("utf8");
        assert!(out.contains("\r\nhost: a.boxd.test\r\n"), "{out}");
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: a", 64, 16384),
            Parse::Partial
        );
        assert!(matches!(
            parse_request(b"\x16\x03\x01garbage\r\n\r\n", 64, 16384),
            Parse::Invalid(_)
        ));
        let many: String = (0..70).map(|i| format!("X-{i}: 1\r\n")).collect();
        let r = parse_request(
            format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(),
            64,
            16384,
        );
        assert!(matches!(r, Parse::Invalid(m) if m.contains("64 header")));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(20000));
        assert!(
            matches!(parse_request(big.as_bytes(), 64, 16384), Parse::Invalid(m) if m.contains("larger"))
        );
    }
}
