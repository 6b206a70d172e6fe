//! A connection that can be cut off from outside. russh's own `Handle::disconnect` is queued
//! behind the key exchange, so a client that sends its version line and then stalls (or stalls
//! in the middle of the exchange) kept its handshake slot until keepalives gave up, 120 s
//! later (issue 25). Cut, every read and write of the session fails at once and the session,
//! its handler and its slot are dropped, wherever russh is.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Cuts a [`Cutoff`] stream.
#[derive(Clone, Default)]
pub(crate) struct Switch(Arc<Inner>);

#[derive(Default)]
struct Inner {
    cut: AtomicBool,
    /// The task last polling the stream (russh reads and writes from one task).
    waker: AtomicWaker,
}

impl Switch {
    /// Ends the stream: pending and later reads and writes fail.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::Release);
        self.0.waker.wake();
    }

    /// Whether [`Switch::cut`] was called.
    #[cfg(test)]
    pub fn is_cut(&self) -> bool {
        self.0.cut.load(Ordering::Acquire)
    }

    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.0.waker.register(cx.waker());
        if self.0.cut.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "authentication timed out",
            ));
        }
        Ok(())
    }
}

/// A stream that fails once its [`Switch`] is cut.
pub(crate) struct Cutoff<S> {
    inner: S,
    switch: Switch,
}

impl<S> Cutoff<S> {
    /// Wraps `inner`; `switch` ends it.
    pub fn new(inner: S, switch: Switch) -> Self {
        Self { inner, switch }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cutoff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cutoff<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A read waiting on a silent peer fails as soon as the switch is cut.
    #[tokio::test]
    async fn a_pending_read_ends_when_cut() {
        let (a, mut b) = tokio::io::duplex(64);
        let switch = Switch::default();
        let mut s = Cutoff::new(a, switch.clone());
        b.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.expect("reads before the cut");
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            s.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        switch.cut();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the read ended")
            .expect("join");
        assert_eq!(r.expect_err("cut").kind(), io::ErrorKind::TimedOut);
        drop(b);
    }
}
