//! The VM side of a request, one for HTTP/1.1 (`proxy.rs`) and HTTP/2 (`h2.rs`): take a VM
//! connection an earlier request left open (see `pool`) or open one, send the request, read
//! up to the final response head. A kept connection that turns out closed before any answer
//! began is replaced once by a fresh one when the request can go again unchanged (it has no
//! body, so nothing of the client's was consumed) — as HAProxy, nginx and Go's transport do.
//!
//! Failures are a [`ProxyError`], which says whose fault it was and whether sending the
//! request again would be safe (Pingora's habit), and which page the client gets, if any.

use std::net::SocketAddr;

use glommio::net::TcpStream;

use super::head::{self, Parse, Response};
use super::pages;
use super::shard::{Shard, read_head};

/// Whose fault a failure is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// The client: a malformed request, or its connection went away.
    Client,
    /// The VM: it did not accept, answered garbage or closed mid-message.
    Vm,
    /// boxd itself (a response it could not build).
    Boxd,
}

/// Why proxying a request failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ProxyError {
    /// The request is malformed (its chunked body): the client gets 400 saying why.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The VM's worker has not been heard from, and the VM did not answer: the client gets
    /// 503 naming the worker.
    #[error("VM {vm} unreachable: {why}")]
    WorkerDown {
        /// The VM's name.
        vm: String,
        /// `worker NAME not heard from for N s`.
        why: String,
    },
    /// The VM gave no usable response head: the client gets 502. `sent` says whether any of
    /// the request reached it.
    #[error("VM {vm} gave no response ({why})")]
    BadGateway {
        /// The VM's name.
        vm: String,
        /// Its port, for the page.
        port: u16,
        /// What happened.
        why: &'static str,
        /// Whether any of the request reached the VM.
        sent: bool,
    },
    /// A connection failed mid-message: nothing more can be answered.
    #[error("{fault:?} side failed: {source}")]
    Broken {
        /// Whose connection.
        fault: Fault,
        /// The error.
        source: std::io::Error,
    },
}

impl ProxyError {
    /// Whose fault it is.
    pub(super) fn fault(&self) -> Fault {
        match self {
            Self::BadRequest(_) => Fault::Client,
            Self::BadGateway { .. } => Fault::Vm,
            Self::WorkerDown { .. } => Fault::Boxd,
            Self::Broken { fault, .. } => *fault,
        }
    }

    /// This error, or, when the VM did not answer and its worker is silent, [`Self::WorkerDown`]
    /// (the VM is not at fault; its worker may be down).
    pub(super) async fn on_worker(
        self,
        ops: &boxd_operations::Operations,
        worker: Option<u64>,
    ) -> Self {
        let Self::BadGateway {
            vm,
            port,
            why,
            sent,
        } = self
        else {
            return self;
        };
        match ops.worker_silence(worker).await {
            Some(silence) => Self::WorkerDown { vm, why: silence },
            None => Self::BadGateway {
                vm,
                port,
                why,
                sent,
            },
        }
    }

    /// Whether sending the same request again (to this VM or elsewhere) is safe: only when
    /// none of it reached a VM.
    pub(super) fn retry_safe(&self) -> bool {
        matches!(self, Self::BadGateway { sent: false, .. })
    }

    /// The page the client gets, if it can still get one.
    pub(super) fn page(&self) -> Option<Vec<u8>> {
        match self {
            Self::BadRequest(why) => Some(pages::bad_request(why)),
            Self::BadGateway { vm, port, .. } => Some(pages::bad_gateway(vm, *port)),
            Self::WorkerDown { vm, why } => Some(pages::worker_down(vm, why)),
            Self::Broken { .. } => None,
        }
    }

    /// A failed connection of the client's.
    pub(super) fn client(source: std::io::Error) -> Self {
        Self::Broken {
            fault: Fault::Client,
            source,
        }
    }

    /// Something boxd could not do (build a response).
    pub(super) fn boxd(e: impl std::fmt::Display) -> Self {
        Self::Broken {
            fault: Fault::Boxd,
            source: std::io::Error::other(e.to_string()),
        }
    }

    /// A failed connection to the VM.
    pub(super) fn vm(source: std::io::Error) -> Self {
        Self::Broken {
            fault: Fault::Vm,
            source,
        }
    }
}

/// One request as the VM side needs it: sent (perhaps twice), and told of interim answers.
pub(super) trait Outgoing {
    /// Whether it can go a second time, unchanged: it has no body.
    fn replayable(&self) -> bool;
    /// Sends it on `vm`; `again` says whether a failure here will be retried (then keep what
    /// is needed to send it once more).
    async fn send(&mut self, vm: &mut TcpStream, again: bool) -> Result<(), ProxyError>;
    /// An informational (1xx) response head arrived: returns whether it was one to pass over
    /// (wait for the final one); `false` makes it the response.
    async fn interim(&mut self, resp: &Response) -> Result<bool, ProxyError>;
}

/// The VM's final response head, with the connection it came on and what was read past it.
pub(super) struct Exchange {
    /// The VM connection (back to the pool when its message ends cleanly).
    pub vm: TcpStream,
    /// Bytes after the head (the start of the body).
    pub buf: Vec<u8>,
    /// The head.
    pub resp: Response,
}

/// The VM a request goes to.
pub(super) struct Upstream<'a> {
    /// Its private address and HTTP port.
    pub addr: SocketAddr,
    /// Its name (for pages and logs).
    pub name: &'a str,
}

impl Upstream<'_> {
    fn gateway(&self, why: &'static str, sent: bool) -> ProxyError {
        ProxyError::BadGateway {
            vm: self.name.to_owned(),
            port: self.addr.port(),
            why,
            sent,
        }
    }

    /// A fresh connection to the VM (502 when it does not accept within the connect timeout).
    pub(super) async fn connect(&self, shard: &Shard) -> Result<TcpStream, ProxyError> {
        let cfg = shard.cfg();
        match TcpStream::connect_timeout(self.addr, cfg.connect_timeout()).await {
            Ok(b) => {
                // A connection that cannot take the option still works; it is only slower.
                let _ = b.set_nodelay(true);
                Ok(b)
            }
            Err(e) => {
                tracing::debug!(vm = %self.name, addr = %self.addr, error = %e, "VM did not accept");
                Err(self.gateway("did not accept", false))
            }
        }
    }

    /// Sends `out` and reads the final response head.
    pub(super) async fn exchange(
        &self,
        shard: &Shard,
        out: &mut impl Outgoing,
    ) -> Result<Exchange, ProxyError> {
        let cfg = shard.cfg();
        let mut kept = shard.vms().take(self.addr);
        loop {
            let reused = kept.is_some();
            let mut vm = match kept.take() {
                Some(b) => b,
                None => self.connect(shard).await?,
            };
            let mut again = reused && out.replayable();
            match out.send(&mut vm, again).await {
                Ok(()) => {}
                Err(ProxyError::Broken {
                    fault: Fault::Vm, ..
                }) if again => continue,
                Err(e) => return Err(e),
            }
            let mut buf = Vec::with_capacity(4096);
            loop {
                let parsed = read_head(&mut vm, &mut buf, |b| {
                    head::parse_response(b, cfg.max_headers, cfg.max_header_bytes)
                })
                .await;
                match parsed {
                    Ok(Parse::Complete(r)) if (100..200).contains(&r.status) => {
                        if !out.interim(&r).await? {
                            return Ok(Exchange { vm, buf, resp: r });
                        }
                        buf.drain(..r.len);
                        // An answer began: this request does not go again.
                        again = false;
                    }
                    Ok(Parse::Complete(resp)) => return Ok(Exchange { vm, buf, resp }),
                    // The kept connection was closed under us before any answer: once more,
                    // on a fresh one.
                    Err(_) if again && buf.is_empty() => break,
                    Ok(_) => return Err(self.gateway("invalid response head", true)),
                    Err(_) => return Err(self.gateway("closed before answering", true)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whose_fault_and_whether_to_retry() {
        let refused = ProxyError::BadGateway {
            vm: "web".into(),
            port: 80,
            why: "did not accept",
            sent: false,
        };
        assert_eq!(refused.fault(), Fault::Vm);
        assert!(refused.retry_safe(), "nothing reached the VM");
        assert!(
            refused
                .page()
                .is_some_and(|p| p.starts_with(b"HTTP/1.1 502"))
        );
        let cut = ProxyError::BadGateway {
            vm: "web".into(),
            port: 80,
            why: "closed before answering",
            sent: true,
        };
        assert!(!cut.retry_safe(), "the VM may have acted on it");
        let bad = ProxyError::BadRequest("bad chunk size".into());
        assert_eq!(bad.fault(), Fault::Client);
        assert!(bad.page().is_some_and(|p| p.starts_with(b"HTTP/1.1 400")));
        let gone = ProxyError::client(std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(gone.fault(), Fault::Client);
        assert!(gone.page().is_none(), "nobody to answer");
    }
}
