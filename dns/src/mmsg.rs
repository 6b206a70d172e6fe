//! Batched UDP I/O with `recvmmsg`/`sendmmsg` on a non-blocking socket: one system call for up
//! to [`BATCH`] datagrams each way, as Knot and NSD do. The shard waits for the first datagram
//! through glommio and drains the rest here; nothing in this module ever blocks.
//!
//! All `unsafe` of the DNS server lives here: building `mmsghdr` arrays that point into buffers
//! owned by [`Batch`].

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Largest datagram received (EDNS queries are small; anything longer is truncated and then
/// fails to parse, which gets FORMERR).
pub const MAX_DATAGRAM: usize = 4096;

/// Buffers for one batch: queries in, responses out, and the peers.
pub struct Batch {
    /// Received datagrams.
    pub queries: Vec<[u8; MAX_DATAGRAM]>,
    /// Their lengths.
    pub lens: [usize; BATCH],
    /// Their senders.
    pub peers: Vec<SockAddr>,
    /// Responses (same index as the query); empty means nothing to send.
    pub responses: Vec<Vec<u8>>,
}

impl Default for Batch {
    fn default() -> Self {
        let any = SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)));
        Self {
            queries: vec![[0u8; MAX_DATAGRAM]; BATCH],
            lens: [0; BATCH],
            peers: vec![any; BATCH],
            responses: (0..BATCH)
                .map(|_| Vec::with_capacity(MAX_DATAGRAM))
                .collect(),
        }
    }
}

fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct of integers and pointers; all-zero is a valid
    // (empty) value that we fill in before use.
    unsafe { std::mem::zeroed() }
}

impl Batch {
    /// Receives up to `BATCH - from` datagrams into slots `from..` without waiting; returns
    /// how many arrived (0 when none are queued).
    pub fn recv(&mut self, fd: RawFd, from: usize) -> io::Result<usize> {
        let n = BATCH.saturating_sub(from);
        if n == 0 {
            return Ok(0);
        }
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        let mut hdrs: [libc::mmsghdr; BATCH] = [empty_mmsghdr(); BATCH];
        let mut addrs: [SockAddrStorage; BATCH] =
            std::array::from_fn(|_| SockAddrStorage::zeroed());
        for i in 0..n {
            iov[i].iov_base = self.queries[from + i].as_mut_ptr().cast();
            iov[i].iov_len = MAX_DATAGRAM;
            hdrs[i].msg_hdr.msg_name = std::ptr::addr_of_mut!(addrs[i]).cast();
            hdrs[i].msg_hdr.msg_namelen = addrs[i].size_of();
            hdrs[i].msg_hdr.msg_iov = std::ptr::addr_of_mut!(iov[i]);
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live iovec and sockaddr_storage on this stack frame
        // and each iovec at a MAX_DATAGRAM-byte buffer owned by `self`; the kernel writes at
        // most those lengths. MSG_DONTWAIT makes the call return at once.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let got = got as usize;
        for (i, storage) in addrs.into_iter().enumerate().take(got) {
            self.lens[from + i] = (hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
            // SAFETY: the kernel filled `storage` with an address of `msg_namelen` bytes.
            self.peers[from + i] = unsafe { SockAddr::new(storage, hdrs[i].msg_hdr.msg_namelen) };
        }
        Ok(got)
    }

    /// Sends the non-empty responses among slots `0..count` without waiting. Returns the slots
    /// that could not be sent (the socket's buffer was full), for the caller to send by
    /// waiting.
    pub fn send(&mut self, fd: RawFd, count: usize) -> io::Result<Vec<usize>> {
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        let mut hdrs: [libc::mmsghdr; BATCH] = [empty_mmsghdr(); BATCH];
        let mut slots = [0usize; BATCH];
        let mut n = 0;
        for i in 0..count.min(BATCH) {
            if self.responses[i].is_empty() {
                continue;
            }
            iov[n].iov_base = self.responses[i].as_mut_ptr().cast();
            iov[n].iov_len = self.responses[i].len();
            hdrs[n].msg_hdr.msg_name = self.peers[i].as_ptr().cast_mut().cast();
            hdrs[n].msg_hdr.msg_namelen = self.peers[i].len();
            hdrs[n].msg_hdr.msg_iov = std::ptr::addr_of_mut!(iov[n]);
            hdrs[n].msg_hdr.msg_iovlen = 1;
            slots[n] = i;
            n += 1;
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: every header points at a live iovec on this stack frame, each iovec at a
        // response buffer owned by `self` with its exact length, and each name at a SockAddr
        // owned by `self`; the kernel only reads them. MSG_DONTWAIT: never blocks.
        let sent = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT) };
        if sent < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(slots[..n].to_vec())
            } else {
                Err(e)
            };
        }
        Ok(slots[sent as usize..n].to_vec())
    }
}
