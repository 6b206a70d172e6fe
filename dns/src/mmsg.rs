//! Batched UDP I/O with `recvmmsg`/`sendmmsg` on a non-blocking socket: one system call for up
//! to [`BATCH`] datagrams each way, as Knot and NSD do. The shard drains the socket here and
//! waits for readiness through glommio only when it is empty; nothing in this module ever
//! blocks.
//!
//! All `unsafe` of the DNS server lives here: building `mmsghdr` arrays that point into buffers
//! owned by [`Batch`], and the one socket option socket2 does not offer
//! ([`set_dont_fragment`]).

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

/// Sends the socket's datagrams with the IP "Don't Fragment" bit (IPv4) and never fragments them
/// locally (IPv6), at the interface MTU whatever path MTU the kernel has cached
/// (`IP_PMTUDISC_PROBE`). RFC 9715 §3.1 asks this of UDP responders: a response too big for
/// the path is dropped, and the client retries over TCP, instead of travelling as fragments
/// that an off-path attacker can spoof. Responses are at most 1232 bytes (EDNS) anyway. As a
/// side effect the kernel skips the per-datagram IP ID hash it needs for fragmentable packets.
pub fn set_dont_fragment(socket: &socket2::Socket, ipv6: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (level, name, value) = if ipv6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )
    };
    // SAFETY: `value` is a live c_int and the length passed is its size; the kernel only
    // reads it. The descriptor belongs to `socket`, which outlives the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct of integers and pointers; all-zero is a valid
    // (empty) value that we fill in before use.
    unsafe { std::mem::zeroed() }
}

impl Batch {
    /// Receives up to [`BATCH`] datagrams without waiting; returns how many arrived (0 when
    /// none are queued).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        let mut hdrs: [libc::mmsghdr; BATCH] = [empty_mmsghdr(); BATCH];
        let mut addrs: [SockAddrStorage; BATCH] =
            std::array::from_fn(|_| SockAddrStorage::zeroed());
        for i in 0..BATCH {
            iov[i].iov_base = self.queries[i].as_mut_ptr().cast();
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
                BATCH as u32,
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
            self.lens[i] = (hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
            // SAFETY: the kernel filled `storage` with an address of `msg_namelen` bytes.
            self.peers[i] = unsafe { SockAddr::new(storage, hdrs[i].msg_hdr.msg_namelen) };
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::fd::AsRawFd as _;

    use socket2::{Domain, Protocol, Socket, Type};

    fn mtu_discover(s: &Socket, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live locals of the sizes passed; the kernel writes at
        // most `len` bytes into `value`.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                std::ptr::addr_of_mut!(value).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        value
    }

    #[test]
    fn responses_are_sent_with_dont_fragment_at_the_interface_mtu() {
        let v4 = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        let default = mtu_discover(&v4, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER);
        assert_ne!(
            default,
            libc::IP_PMTUDISC_PROBE,
            "the kernel default differs"
        );
        super::set_dont_fragment(&v4, false).unwrap();
        assert_eq!(
            mtu_discover(&v4, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_PROBE
        );
        let Ok(v6) = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) else {
            return; // no IPv6 on this host
        };
        super::set_dont_fragment(&v6, true).unwrap();
        assert_eq!(
            mtu_discover(&v6, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER),
            libc::IPV6_PMTUDISC_PROBE
        );
    }
}
