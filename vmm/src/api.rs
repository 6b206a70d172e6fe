//! The VM's API: HTTP/1.1 with JSON bodies on a Unix socket (the Firecracker convention), so
//! `curl --unix-socket` works and any supervisor can reconnect at any time.
//!
//! - `GET /vm` → `{"state", "vcpus", "memory_mib", "uptime_ms", "pid"}`
//! - `PUT /vm/actions` with `{"action": "pause" | "resume" | "shutdown"}` → 204
//! - `GET /vm/console` → the most recent serial output (text/plain)
//! - `GET /metrics` → Prometheus text format
//!
//! [`probe`], [`shutdown`] and [`request`] are the client side, which the worker (and the
//! tests) use for both runtimes.
//!
//! One request per connection (`Connection: close`), served by one thread with a read
//! deadline: requests are rare control operations, and one thread keeps the process's
//! syscall surface fixed before the seccomp filter goes on.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::machine::{Ending, RunState, Running};

/// Largest request head plus body accepted.
const MAX_REQUEST: usize = 16 * 1024;
/// How long a client may take to send its request.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Binds the API socket at `path`, mode 0600. A socket file left by a dead VMM is replaced; a
/// live one is an error (two VMMs must not share a socket).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is the API socket of a running VMM: choose another path",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path (query string dropped).
    pub path: String,
    /// Body.
    pub body: Vec<u8>,
}

/// Why a request could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The client went away or was too slow; nothing to answer.
    Gone,
    /// Malformed or too large: answer 400 with this message.
    Bad(String),
}

/// Parses one request from `buf` if it is complete: `Ok(None)` means read more.
pub fn parse(buf: &[u8]) -> Result<Option<Request>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ReadError::Bad(format!("malformed HTTP request: {e}"))),
    };
    let mut len = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| ReadError::Bad("bad Content-Length".into()))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Bad(
                "chunked bodies are not accepted: send Content-Length".into(),
            ));
        }
    }
    // `len` is the client's number: it may be near usize::MAX (found by the fuzzer).
    if head.saturating_add(len) > MAX_REQUEST {
        return Err(ReadError::Bad(format!(
            "request larger than {MAX_REQUEST} bytes"
        )));
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    let path = req.path.unwrap_or("/");
    Ok(Some(Request {
        method: req.method.unwrap_or("").to_owned(),
        path: path.split('?').next().unwrap_or(path).to_owned(),
        body: buf[head..head + len].to_vec(),
    }))
}

fn read_request(s: &mut UnixStream) -> Result<Request, ReadError> {
    s.set_read_timeout(Some(READ_DEADLINE))
        .map_err(|_| ReadError::Gone)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = parse(&buf)? {
            return Ok(r);
        }
        if buf.len() > MAX_REQUEST {
            return Err(ReadError::Bad(format!(
                "request larger than {MAX_REQUEST} bytes"
            )));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(ReadError::Gone),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A response.
pub struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    /// A JSON body.
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
        }
    }

    /// `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.into() }))
    }

    /// 204 No Content.
    pub fn empty() -> Self {
        Self {
            status: 204,
            content_type: "application/json",
            body: Vec::new(),
        }
    }

    fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            _ => "Error",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.status,
            self.body.len()
        );
        if !self.body.is_empty() {
            out.push_str("Content-Type: ");
            out.push_str(self.content_type);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        w.write_all(&bytes)
    }
}

/// The body of `PUT /vm/actions`: `{"action": "…"}` (also served by the sandbox runtime).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub action: String,
}

/// Answers one request about `vm`.
pub fn handle(vm: &Running, req: &Request) -> Response {
    let ctl = vm.control();
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/vm") => Response::json(
            200,
            &serde_json::json!({
                "state": ctl.run_state(),
                "vcpus": ctl.vcpus,
                "memory_mib": ctl.memory_mib,
                "uptime_ms": ctl.started.elapsed().as_millis() as u64,
                "pid": std::process::id(),
            }),
        ),
        ("GET", "/vm/console") => Response {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: ctl
                .console
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        },
        ("GET", "/metrics") => {
            let m = &ctl.metrics;
            let text = format!(
                "# TYPE boxd_vmm_uptime_seconds gauge\nboxd_vmm_uptime_seconds {:.3}\n\
                 # TYPE boxd_vmm_vcpus gauge\nboxd_vmm_vcpus {}\n\
                 # TYPE boxd_vmm_memory_bytes gauge\nboxd_vmm_memory_bytes {}\n\
                 # TYPE boxd_vmm_vcpu_exits_total counter\n\
                 boxd_vmm_vcpu_exits_total{{kind=\"io\"}} {}\n\
                 boxd_vmm_vcpu_exits_total{{kind=\"mmio\"}} {}\n\
                 boxd_vmm_vcpu_exits_total{{kind=\"all\"}} {}\n",
                ctl.started.elapsed().as_secs_f64(),
                ctl.vcpus,
                ctl.memory_mib << 20,
                m.io_exits.load(Ordering::Relaxed),
                m.mmio_exits.load(Ordering::Relaxed),
                m.exits.load(Ordering::Relaxed),
            );
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: text.into_bytes(),
            }
        }
        ("PUT", "/vm/actions") => {
            let a: Action = match serde_json::from_slice(&req.body) {
                Ok(a) => a,
                Err(e) => {
                    return Response::error(
                        400,
                        format!(r#"body must be {{"action": "pause"|"resume"|"shutdown"}}: {e}"#),
                    );
                }
            };
            match a.action.as_str() {
                "pause" if vm.pause() => Response::empty(),
                "resume" if vm.resume() => Response::empty(),
                "pause" | "resume" => Response::error(409, "the VM has stopped"),
                "shutdown" => {
                    ctl.end(Ending::Shutdown);
                    Response::empty()
                }
                other => Response::error(
                    400,
                    format!("unknown action `{other}`: use pause, resume or shutdown"),
                ),
            }
        }
        (_, "/vm" | "/vm/console" | "/metrics" | "/vm/actions") => Response::error(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
        (_, p) => Response::error(
            404,
            format!("no such resource {p}: try /vm, /vm/actions, /vm/console or /metrics"),
        ),
    }
}

/// Serves the API until the VM stops. Runs on its own thread.
pub fn serve(listener: UnixListener, vm: Arc<Running>) {
    serve_with(
        listener,
        |req| handle(&vm, req),
        || vm.control().run_state() == RunState::Stopped,
    );
}

/// Serves requests on `listener` with `handler`, one at a time, until `done()` is true when a
/// connection arrives. Shared by `boxd vmm` and `boxd sandbox`, so a supervisor speaks one
/// protocol to both runtimes.
pub fn serve_with(
    listener: UnixListener,
    handler: impl Fn(&Request) -> Response,
    done: impl Fn() -> bool,
) {
    for conn in listener.incoming() {
        if done() {
            return;
        }
        let Ok(mut s) = conn else { continue };
        let resp = match read_request(&mut s) {
            Ok(req) => handler(&req),
            Err(ReadError::Bad(m)) => Response::error(400, m),
            Err(ReadError::Gone) => continue,
        };
        _ = s.set_write_timeout(Some(READ_DEADLINE));
        _ = resp.write_to(&mut s);
    }
}

// The client side, for supervisors and tests: the same protocol for both runtimes.

/// What `GET /vm` says about a VM process (both runtimes).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Probe {
    /// `running`, `paused`, `stopping`, `stopped`.
    pub state: String,
    /// Process id of the VM's init (sandbox) or of the VMM (kvm).
    #[serde(default)]
    pub pid: Option<i32>,
}

/// Asks the VM process behind `api_sock`; `None` when no process answers there.
pub fn probe(api_sock: &Path) -> Option<Probe> {
    let body = request(api_sock, "GET", "/vm", "").ok()?;
    serde_json::from_str(&body).ok()
}

/// Asks the VM process to shut down and waits (up to `wait`) for its socket to stop answering.
pub fn shutdown(api_sock: &Path, wait: Duration) -> Result<(), String> {
    if request(api_sock, "PUT", "/vm/actions", r#"{"action":"shutdown"}"#).is_err() {
        return Ok(()); // nothing answers: already gone
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if probe(api_sock).is_none() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!(
        "the VM behind {} did not stop within {wait:?}",
        api_sock.display()
    ))
}

/// One HTTP request on the API socket; the body of a 2xx answer.
pub fn request(api_sock: &Path, method: &str, path: &str, body: &str) -> Result<String, String> {
    let mut s = std::os::unix::net::UnixStream::connect(api_sock)
        .map_err(|e| format!("{}: {e}", api_sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    s.set_write_timeout(Some(Duration::from_secs(2))).ok();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: vm\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("truncated answer")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status.starts_with('2') {
        Ok(body.to_owned())
    } else {
        Err(format!("{status}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_bad_ones() {
        assert_eq!(parse(b"GET /vm HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let r = parse(b"GET /vm?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/vm"));
        let body = b"PUT /vm/actions HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"action\":\"pause\"}";
        assert_eq!(parse(body), Ok(None), "one byte short of the body");
        let full = b"PUT /vm/actions HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"action\":\"pause\"}";
        assert_eq!(parse(full).expect("ok").expect("complete").body.len(), 18);
        assert!(matches!(
            parse(b"\x00\x01 / HTTP/1.1\r\n\r\n"),
            Err(ReadError::Bad(_))
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Err(ReadError::Bad(_))
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(ReadError::Bad(_))
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n"),
            Err(ReadError::Bad(_))
        ));
    }
}
