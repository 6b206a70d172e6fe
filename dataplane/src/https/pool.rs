//! Kept-alive connections to VMs, held per client connection: HAProxy's default
//! (`http-keep-alive` with `http-reuse safe`). A client connection's next request to the same
//! VM reuses the VM connection its last one left open, instead of a TCP connect and close per
//! request. Connections are never shared between clients, so a VM never sees one client's
//! request arrive on a connection another client's opened, and a client's first request always
//! gets a fresh connection.
//!
//! A VM may close an idle connection at any time. Before reuse, a kept connection is checked
//! without blocking (`MSG_PEEK`): closed, reset, or holding bytes nobody asked for, it is
//! dropped. What remains is the race of a VM closing just as a request goes out; the caller
//! retries such a request once on a fresh connection when it had no body (nothing of the
//! client's was consumed), and answers 502 otherwise — as HAProxy and Go's transport do.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;

use glommio::net::TcpStream;

/// Most idle VM connections one client connection keeps. HTTP/1.1 needs one; HTTP/2 streams
/// run side by side, each on its own VM connection.
const MAX_IDLE: usize = 8;

/// The idle VM connections of one client connection.
#[derive(Default)]
pub(super) struct Idle(RefCell<Vec<(SocketAddr, TcpStream)>>);

impl Idle {
    /// A kept connection to `addr` that the VM has not closed, if there is one.
    pub fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.0.borrow_mut();
        while let Some(i) = idle.iter().rposition(|(a, _)| *a == addr) {
            let (_, s) = idle.swap_remove(i);
            if usable(&s) {
                return Some(s);
            }
        }
        None
    }

    /// Keeps `s`, a connection to `addr` whose last exchange ended cleanly; the oldest goes
    /// when there are too many.
    pub fn put(&self, addr: SocketAddr, s: TcpStream) {
        let mut idle = self.0.borrow_mut();
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push((addr, s));
    }
}

/// Whether an idle connection can carry another request: nothing to read on it (no EOF, no
/// error, no bytes the VM sent unasked).
fn usable(s: &TcpStream) -> bool {
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
            let idle = Idle::default();
            let mut open = Vec::new();
            for _ in 0..3 {
                idle.put(addr, TcpStream::connect(addr).await.expect("connect"));
                open.push(l.accept().await.expect("accept"));
            }
            let other = SocketAddr::from(([127, 0, 0, 1], 1));
            assert!(idle.take(other).is_none(), "kept for another address");
            // The newest first: the VM wrote on it unasked.
            open[2].write_all(b"x").await.expect("write");
            // The middle one: closed by the VM.
            drop(open.remove(1));
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            let mut kept = idle.take(addr).expect("the oldest is still open");
            assert!(idle.take(addr).is_none(), "the others were dropped");
            // And it is the oldest: the VM's end of it still talks to it.
            kept.write_all(b"ping").await.expect("write");
            let mut got = [0u8; 4];
            open[0].read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"ping");
        });
    }
}
