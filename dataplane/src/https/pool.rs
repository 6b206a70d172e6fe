//! Kept-alive connections to VMs, one pool per shard, shared by the shard's client
//! connections: what nginx does with an upstream `keepalive` and HAProxy with
//! `http-reuse always`. A request to a VM goes on a connection an earlier request (of any
//! client on this shard) left open, instead of a TCP connect and close per request — which
//! matters most for clients that send one request per connection.
//!
//! A VM may close an idle connection at any time. A connection idle longer than
//! [`MAX_IDLE_TIME`] (4 s) is never used again (it is below the 5 s keep-alive timeouts of Apache
//! httpd and Node.js, so servers like those never close a connection as it is being
//! reused). Before reuse a kept connection is also checked without blocking (`MSG_PEEK`):
//! closed, reset, or holding bytes nobody asked for, it is dropped. What remains is the race
//! of a VM closing just as a request goes out; the caller retries such a request once on a
//! fresh connection when it had no body (nothing of the client's was consumed), and answers
//! 502 otherwise — as HAProxy, nginx and Go's transport do.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

/// Most idle connections a shard keeps to one VM; a burst that opened more closes the rest.
/// Enough for the requests one VM has in flight at once through one shard (the kept set
/// follows them: 128 concurrent HTTP/2 streams with 32 kept connected afresh 3 times in 4),
/// and bounded so a prefork server's workers are not all held idle.
const MAX_PER_VM: usize = 256;

/// Most idle VM connections a shard keeps in all (descriptors held while nobody asks).
const MAX_IDLE: usize = 4096;

/// How long a connection may sit idle and still be reused.
const MAX_IDLE_TIME: Duration = Duration::from_secs(4);

/// The idle VM connections of one shard, newest last per VM.
pub(super) struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<(Instant, TcpStream)>>>,
    count: Cell<usize>,
    max_idle_time: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(MAX_IDLE_TIME)
    }
}

impl Pool {
    /// A pool whose connections may be reused until idle for `max_idle_time`.
    fn new(max_idle_time: Duration) -> Self {
        Self {
            idle: RefCell::default(),
            count: Cell::new(0),
            max_idle_time,
        }
    }

    /// The most recently kept connection to `addr` that is neither too old nor closed by the
    /// VM, if there is one (the newest: the likeliest to still be open; the older ones age out
    /// when traffic falls).
    pub fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let kept = idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut found = None;
        while let Some((since, s)) = kept.pop() {
            self.count.set(self.count.get() - 1);
            if now.duration_since(since) > self.max_idle_time {
                // Older still, all of them.
                self.count.set(self.count.get() - kept.len());
                kept.clear();
                break;
            }
            if usable(&s) {
                found = Some(s);
                break;
            }
        }
        if kept.is_empty() {
            idle.remove(&addr);
        }
        found
    }

    /// Keeps `s`, a connection to `addr` whose last exchange ended cleanly. The oldest to that
    /// VM goes when it has too many; `s` itself when the shard has.
    pub fn put(&self, addr: SocketAddr, s: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        let now = Instant::now();
        if let Some(kept) = idle.get_mut(&addr).filter(|k| k.len() >= MAX_PER_VM) {
            kept.remove(0);
            kept.push((now, s));
            return;
        }
        // A full shard keeps nothing more (and leaves no empty entry behind).
        if self.count.get() >= MAX_IDLE {
            return;
        }
        self.count.set(self.count.get() + 1);
        idle.entry(addr).or_default().push((now, s));
    }

    /// Closes every connection too old to be reused; the shard calls it now and then, so an
    /// idle shard holds no descriptors for VMs nobody asks for.
    pub fn purge(&self) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        idle.retain(|_, kept| {
            kept.retain(|(since, _)| now.duration_since(*since) <= self.max_idle_time);
            !kept.is_empty()
        });
        self.count.set(idle.values().map(Vec::len).sum());
    }

    /// How many connections are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.count.get()
    }
}

/// Whether an idle connection can carry another request: nothing to read on it (no EOF, no
/// error, no bytes the VM sent unasked).
pub(super) fn usable(s: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: the descriptor is open (owned by `s`, borrowed for this call) and the buffer is
    // one valid, writable byte.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
    use glommio::net::TcpListener;

    #[test]
    fn a_connection_the_vm_closed_or_wrote_on_is_not_reused() {
        glommio::LocalExecutor::default().run(async {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let pool = Pool::default();
            let mut open = Vec::new();
            for _ in 0..3 {
                pool.put(addr, TcpStream::connect(addr).await.expect("connect"));
                open.push(l.accept().await.expect("accept"));
            }
            let other = SocketAddr::from(([127, 0, 0, 1], 1));
            assert!(pool.take(other).is_none(), "kept for another address");
            // The newest first: the VM wrote on it unasked.
            open[2].write_all(b"x").await.expect("write");
            // The middle one: closed by the VM.
            drop(open.remove(1));
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let mut kept = pool.take(addr).expect("the oldest is still open");
            assert!(pool.take(addr).is_none(), "the others were dropped");
            assert_eq!(pool.len(), 0);
            // And it is the oldest: the VM's end of it still talks to it.
            kept.write_all(b"ping").await.expect("write");
            let mut got = [0u8; 4];
            open[0].read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"ping");
        });
    }

    #[test]
    fn connections_idle_too_long_are_neither_reused_nor_held() {
        glommio::LocalExecutor::default().run(async {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let pool = Pool::new(Duration::from_millis(100));
            let mut open = Vec::new();
            for _ in 0..2 {
                pool.put(addr, TcpStream::connect(addr).await.expect("connect"));
                open.push(l.accept().await.expect("accept"));
            }
            glommio::timer::sleep(Duration::from_millis(150)).await;
            assert!(pool.take(addr).is_none(), "an old connection was reused");
            assert_eq!(pool.len(), 0, "old connections are still held");
            // Purged without being asked for: the VM sees them closed.
            pool.put(addr, TcpStream::connect(addr).await.expect("connect"));
            let mut vm_end = l.accept().await.expect("accept");
            pool.purge();
            assert_eq!(pool.len(), 1, "a fresh connection was purged");
            glommio::timer::sleep(Duration::from_millis(150)).await;
            pool.purge();
            assert_eq!(pool.len(), 0);
            let mut rest = Vec::new();
            let n = vm_end.read_to_end(&mut rest).await.expect("read");
            assert_eq!(n, 0, "the purged connection is closed");
        });
    }

    #[test]
    fn a_vm_gets_at_most_its_share_of_kept_connections() {
        glommio::LocalExecutor::default().run(async {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let pool = Pool::default();
            let mut open = Vec::new();
            for _ in 0..MAX_PER_VM + 3 {
                pool.put(addr, TcpStream::connect(addr).await.expect("connect"));
                open.push(l.accept().await.expect("accept"));
            }
            assert_eq!(pool.len(), MAX_PER_VM);
            // The oldest went: the VM sees the first three closed, the fourth still open.
            for vm_end in &mut open[..3] {
                let mut rest = Vec::new();
                assert_eq!(vm_end.read_to_end(&mut rest).await.expect("read"), 0);
            }
            let mut n = 0;
            while pool.take(addr).is_some() {
                n += 1;
            }
            assert_eq!(n, MAX_PER_VM);
        });
    }
}
