//! A client's TCP connection under rustls, writing what rustls has queued in one system call.
//!
//! rustls keeps each TLS record it has to send as a separate buffer and hands them all to
//! `write_vectored`; glommio's `TcpStream` has no vectored write, so the `AsyncWrite` default
//! sent the first buffer only, one `sendto` per record: a TLS 1.3 handshake's server flight,
//! its session tickets, the response and the closing alert made ~7 `sendto` per
//! one-request connection, each of which on loopback also runs the receiver's TCP path.
//! `sendmsg` with every queued buffer sends them as one.

use std::io::IoSlice;
use std::ops::Deref;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// Most buffers one `sendmsg` takes (rustls offers up to 64).
const MAX_IOV: usize = 64;

/// A TCP connection whose vectored writes are one system call.
pub(super) struct Gathered(TcpStream);

impl Gathered {
    pub fn new(s: TcpStream) -> Self {
        Self(s)
    }
}

impl Deref for Gathered {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for Gathered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gathered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0;
        for b in bufs.iter().filter(|b| !b.is_empty()).take(MAX_IOV) {
            iov[n] = libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            };
            n += 1;
        }
        if n <= 1 {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return Pin::new(&mut self.0).poll_write(cx, first);
        }
        loop {
            // SAFETY: a zeroed msghdr is valid (no name, no control data); its iovecs point
            // into `bufs`, which outlive the call, and `n` of them are set.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n;
                libc::sendmsg(
                    self.0.as_raw_fd(),
                    &raw const msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if let Ok(sent) = usize::try_from(sent) {
                return Poll::Ready(Ok(sent));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                // Full: glommio's own write waits for room (and wakes this task).
                std::io::ErrorKind::WouldBlock => {
                    let first = bufs
                        .iter()
                        .find(|b| !b.is_empty())
                        .map_or(&[][..], |b| &**b);
                    return Pin::new(&mut self.0).poll_write(cx, first);
                }
                _ => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
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
}
