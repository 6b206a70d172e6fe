//! What every shard runtime shares: SO_REUSEPORT listeners (one per shard, so the kernel
//! spreads connections across cores with no hand-off) and pinning a thread to its CPU.

use std::net::{SocketAddr, TcpListener};

/// A non-blocking SO_REUSEPORT TCP listener on `addr`.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// `shards` listeners sharing one address; with port 0 the first bind picks the port.
pub fn listen_shards(addr: SocketAddr, shards: usize) -> std::io::Result<Vec<TcpListener>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(shards.max(1));
    for _ in 0..shards.max(1) {
        let l = listen(addr)?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other(format!("CPU {cpu} is out of range")));
    }
    // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and its size is passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
