//! A client's TCP connection under rustls: what rustls queues goes out in as few system calls
//! as the protocol allows. On loopback and between hosts alike each `sendto` costs the sender
//! a trip through TCP's transmit path (on loopback also the receiver's), so a one-request
//! connection's five sends (server flight, session tickets, response, closing alert, request
//! to the VM — HAProxy's count) are worth bringing down.
//!
//! * rustls keeps each TLS record as a separate buffer and hands them all to
//!   `write_vectored`; glommio's `TcpStream` has no vectored write, so the `AsyncWrite`
//!   default sent the first buffer only, one `sendto` per record. `sendmsg` with every queued
//!   buffer sends them as one.
//! * While *holding* (during the handshake, and while a last response is written before the
//!   connection closes), writes are kept here and flushes do nothing; everything held goes out
//!   before the next read from the socket (the peer may be waiting for it), on close, when
//!   holding ends and something else is written or flushed, or once more than [`HOLD_MAX`] is
//!   held. So a TLS 1.3 server's session tickets, which no client waits for, leave with the
//!   response, and a closing connection's response with its `close_notify`.

use std::io::IoSlice;
use std::ops::Deref;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// Most buffers one `sendmsg` takes (rustls offers up to 64).
const MAX_IOV: usize = 64;

/// Most bytes held back; more are sent at once (a large body is not gathered whole).
const HOLD_MAX: usize = 64 << 10;

/// A TCP connection whose vectored writes are one system call, and which can hold writes back.
pub(super) struct Gathered {
    s: TcpStream,
    held: Vec<u8>,
    holding: bool,
}

impl Gathered {
    /// `s`, holding writes (for the handshake) until [`Gathered::release`].
    pub fn new(s: TcpStream) -> Self {
        Self {
            s,
            held: Vec::new(),
            holding: true,
        }
    }

    /// Holds writes back (flushes do nothing) until the next read, close, or `release`.
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// Stops holding; what is held goes out with the next write or flush.
    pub fn release(&mut self) {
        self.holding = false;
    }

    /// Sends what is held, waiting for room if it must.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.held.is_empty() {
            match ready!(Pin::new(&mut self.s).poll_write(cx, &self.held)) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => drop(self.held.drain(..n)),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// One `sendmsg` of `bufs` without waiting: the bytes sent, or `None` if the socket is full.
    fn send_now<'a>(&self, bufs: impl Iterator<Item = &'a [u8]>) -> std::io::Result<Option<usize>> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0;
        for b in bufs.filter(|b| !b.is_empty()).take(MAX_IOV) {
            iov[n] = libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            };
            n += 1;
        }
        loop {
            // SAFETY: a zeroed msghdr is valid (no name, no control data); its iovecs point
            // into `bufs`, which outlive the call, and `n` of them are set.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n;
                libc::sendmsg(
                    self.s.as_raw_fd(),
                    &raw const msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if let Ok(sent) = usize::try_from(sent) {
                return Ok(Some(sent));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }
}

impl Drop for Gathered {
    fn drop(&mut self) {
        // What a failed handshake left (its alert): one try, without waiting.
        if !self.held.is_empty() {
            let _ = self.send_now(std::iter::once(&self.held[..]));
        }
    }
}

impl Deref for Gathered {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.s
    }
}

impl AsyncRead for Gathered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        // The peer may be waiting for what is held before it says anything more.
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.s).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gathered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.holding && this.held.len() + total <= HOLD_MAX {
            for b in bufs {
                this.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(total));
        }
        let held = this.held.len();
        let all = std::iter::once(&this.held[..]).chain(bufs.iter().map(|b| &**b));
        match this.send_now(all)? {
            Some(n) if n > held => {
                this.held.clear();
                return Poll::Ready(Ok(n - held));
            }
            Some(n) => drop(this.held.drain(..n)),
            None => {}
        }
        // The socket is full, or took only held bytes: glommio's own writes wait for room
        // (and wake this task).
        ready!(this.poll_send_held(cx))?;
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(first) => Pin::new(&mut this.s).poll_write(cx, first),
            None => Poll::Ready(Ok(0)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.holding {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.s).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.s).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
    use glommio::net::TcpListener;

    #[test]
    fn vectored_writes_send_every_buffer_in_order() {
        glommio::LocalExecutor::default().run(async {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let mut w = Gathered::new(TcpStream::connect(addr).await.expect("connect"));
            w.release();
            let mut r = l.accept().await.expect("accept");
            // With room in the socket, several buffers go in one write.
            let small = [IoSlice::new(b"ab"), IoSlice::new(b""), IoSlice::new(b"cd")];
            assert_eq!(w.write_vectored(&small).await.expect("write"), 4);
            let mut got = [0u8; 4];
            r.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"abcd");
            // Large enough to fill the socket buffers: the rest waits for the reader.
            let big: &'static [u8] = Box::leak(vec![7u8; 8 << 20].into_boxed_slice());
            let parts = [&b"one,"[..], b"", b"two,", big, b"three"];
            let want: Vec<u8> = parts.concat();
            let writer = glommio::spawn_local(async move {
                let mut at = 0;
                while at < want.len() {
                    // What is left, as the caller's buffers would be after a short write.
                    let mut skip = at;
                    let mut bufs = Vec::new();
                    for p in parts {
                        if skip >= p.len() {
                            skip -= p.len();
                            continue;
                        }
                        bufs.push(IoSlice::new(&p[skip..]));
                        skip = 0;
                    }
                    let n = w.write_vectored(&bufs).await.expect("write");
                    assert!(n > 0);
                    at += n;
                }
                w.close().await.expect("close");
                want
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("read");
            let want = writer.await;
            assert_eq!(got.len(), want.len());
            assert!(got == want, "bytes out of order");
        });
    }

    /// Whether `s` has nothing to read right now (no bytes, no EOF).
    fn quiet(s: &TcpStream) -> bool {
        super::super::pool::usable(s)
    }

    #[test]
    fn held_writes_go_out_before_a_read_on_close_and_on_drop() {
        glommio::LocalExecutor::default().run(async {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let mut w = Gathered::new(TcpStream::connect(addr).await.expect("connect"));
            let mut peer = l.accept().await.expect("accept");
            // Held from the start (the handshake), flushes included.
            w.write_all(b"flight").await.expect("write");
            w.flush().await.expect("flush");
            glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            assert!(quiet(&peer), "a held write was sent");
            // Reading sends it first: the peer may be waiting for it.
            peer.write_all(b"?").await.expect("write");
            let mut one = [0u8; 1];
            w.read_exact(&mut one).await.expect("read");
            let mut got = [0u8; 6];
            peer.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"flight");
            // Released: what is held goes with the next write, in order.
            w.write_all(b"tickets,").await.expect("write");
            w.release();
            w.write_all(b"response,").await.expect("write");
            w.flush().await.expect("flush");
            let mut got = [0u8; 17];
            peer.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"tickets,response,");
            // Held again for a last response: it leaves on close.
            w.hold();
            w.write_all(b"last,").await.expect("write");
            w.flush().await.expect("flush");
            glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            assert!(quiet(&peer), "a held write was sent");
            w.write_all(b"bye").await.expect("write");
            w.close().await.expect("close");
            let mut rest = Vec::new();
            peer.read_to_end(&mut rest).await.expect("read");
            assert_eq!(rest, b"last,bye");
            // Dropped while holding (a handshake that failed after writing its alert).
            let mut w = Gathered::new(TcpStream::connect(addr).await.expect("connect"));
            let mut peer = l.accept().await.expect("accept");
            w.write_all(b"alert").await.expect("write");
            drop(w);
            let mut rest = Vec::new();
            peer.read_to_end(&mut rest).await.expect("read");
            assert_eq!(rest, b"alert");
        });
    }

    #[test]
    fn more_than_the_hold_limit_is_sent_at_once() {
        glommio::LocalExecutor::default().run(async {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let mut w = Gathered::new(TcpStream::connect(addr).await.expect("connect"));
            let mut peer = l.accept().await.expect("accept");
            let big = vec![1u8; HOLD_MAX];
            w.write_all(b"x").await.expect("write");
            w.write_all(&big).await.expect("write");
            let mut got = vec![0u8; HOLD_MAX + 1];
            peer.read_exact(&mut got).await.expect("read");
            assert_eq!(got[0], b'x');
            assert!(got[1..].iter().all(|b| *b == 1));
        });
    }
}
