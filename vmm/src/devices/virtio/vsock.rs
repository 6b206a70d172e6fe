//! virtio-vsock with the host side on Unix sockets, the Firecracker convention:
//!
//! - guest → host: a guest connecting to host (CID 2) port P makes the VMM connect to the Unix
//!   socket `<uds_path>_<P>`;
//! - host → guest: a host process connects to `<uds_path>` and writes `CONNECT <P>\n`; once the
//!   guest accepts on port P the VMM answers `OK <host port>\n` and the stream carries bytes.
//!
//! Queues: 0 receive (to the guest), 1 transmit (from the guest), 2 events (unused).
//! Streams use the virtio-vsock credit protocol both ways. Packets are parsed by rust-vmm's
//! virtio-vsock crate; the connection logic is here. All host descriptors live in the
//! device's own epoll set, whose fd is the single descriptor the I/O thread watches.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{VirtioDevice, read_config_bytes};

/// The host's CID.
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// Bytes of guest data the VMM buffers per connection (the credit it gives the guest).
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest data payload per packet.
const MAX_PKT_DATA: u32 = 64 * 1024;
/// Host ports handed to host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most connections at once.
const MAX_CONNS: usize = 1024;
const LISTENER_KEY: u64 = u64::MAX;

/// A control or data header to send the guest.
#[derive(Clone, Copy, Debug)]
struct Reply {
    src_port: u32,
    dst_port: u32,
    op: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingGuest,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes from the guest written to the stream.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest data the stream did not take yet.
    pending: Vec<u8>,
    /// The stream has data (or EOF) we have not moved yet.
    readable: bool,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host stream that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    /// (host port, guest port) → connection.
    conns: HashMap<(u32, u32), Conn>,
    by_fd: HashMap<RawFd, (u32, u32)>,
    registered: std::collections::HashSet<RawFd>,
    replies: VecDeque<Reply>,
    next_local_port: u32,
    config: [u8; 8],
    buf: Vec<u8>,
}

impl Vsock {
    /// A device with guest CID `cid` whose host side listens on `uds`.
    pub fn new(cid: u64, uds: &Path) -> std::io::Result<Self> {
        if uds.exists() {
            // A socket someone answers on belongs to a running VMM: never take it over.
            if UnixStream::connect(uds).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "a running VMM serves this vsock socket: choose another uds_path",
                ));
            }
            std::fs::remove_file(uds)?;
        }
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_KEY),
        )?;
        Ok(Self {
            cid,
            uds: uds.to_owned(),
            epoll,
            listener,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            registered: std::collections::HashSet::new(),
            replies: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            config: cid.to_le_bytes(),
            buf: vec![0; MAX_PKT_DATA as usize],
        })
    }

    fn watch(&mut self, fd: RawFd) {
        self.interest(fd, Some(EventSet::IN | EventSet::READ_HANG_UP));
    }

    fn unwatch(&mut self, fd: RawFd) {
        self.interest(fd, None);
    }

    /// Sets what `fd` is watched for; `None` takes it out of the set entirely (an fd in the
    /// set always reports hang-ups, which would spin a level-triggered loop).
    fn interest(&mut self, fd: RawFd, events: Option<EventSet>) {
        let registered = self.registered.contains(&fd);
        let r = match (events, registered) {
            (None, false) => return,
            (None, true) => {
                self.registered.remove(&fd);
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            }
            (Some(ev), true) => {
                self.epoll
                    .ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, fd as u64))
            }
            (Some(ev), false) => {
                self.registered.insert(fd);
                self.epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, fd as u64))
            }
        };
        if let Err(e) = r {
            tracing::warn!(fd, error = %e, "virtio-vsock: epoll_ctl");
        }
    }

    fn close(&mut self, key: (u32, u32), rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.unwatch(c.stream.as_raw_fd());
            self.by_fd.remove(&c.stream.as_raw_fd());
        }
        if rst {
            self.reply(key, OP_RST);
        }
    }

    fn reply(&mut self, (local, peer): (u32, u32), op: u16) {
        self.replies.push_back(Reply {
            src_port: local,
            dst_port: peer,
            op,
        });
    }

    /// Handles one packet from the guest.
    fn on_tx(&mut self, hdr: &Header, data: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.cid || hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.reply(key, OP_RST);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = hdr.fwd_cnt;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connects(key),
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.reply(key, OP_RST);
                    return;
                };
                if c.state == State::AwaitingGuest {
                    c.state = State::Established;
                    let ok = format!("OK {}\n", key.0);
                    let fd = c.stream.as_raw_fd();
                    if c.stream.write_all(ok.as_bytes()).is_err() {
                        self.close(key, true);
                        return;
                    }
                    // The stream's bytes may flow now.
                    self.watch(fd);
                }
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.reply(key, OP_RST);
                    return;
                };
                if c.state != State::Established
                    || c.pending.len() + data.len() > BUF_ALLOC as usize
                {
                    // Data before the handshake, or beyond the credit we gave: a broken peer.
                    self.close(key, true);
                    return;
                }
                c.pending.extend_from_slice(data);
                self.flush_pending(key);
            }
            OP_CREDIT_UPDATE => {
                // The credit fields were taken above; the stream may now move.
            }
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.reply(key, OP_CREDIT_UPDATE);
                }
            }
            OP_SHUTDOWN | OP_RST => self.close(key, false),
            _ => self.close(key, true),
        }
    }

    fn guest_connects(&mut self, key: (u32, u32)) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
            self.reply(key, OP_RST);
            return;
        }
        let path = format!("{}_{}", self.uds.display(), key.0);
        match UnixStream::connect(&path) {
            Ok(stream) if stream.set_nonblocking(true).is_ok() => {
                self.add_conn(key, stream, State::Established);
                self.reply(key, OP_RESPONSE);
            }
            _ => self.reply(key, OP_RST),
        }
    }

    fn add_conn(&mut self, key: (u32, u32), stream: UnixStream, state: State) {
        let fd = stream.as_raw_fd();
        self.watch(fd);
        self.by_fd.insert(fd, key);
        self.conns.insert(
            key,
            Conn {
                stream,
                state,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                rx_cnt: 0,
                fwd_cnt: 0,
                last_fwd_cnt_sent: 0,
                pending: Vec::new(),
                readable: false,
            },
        );
    }

    /// Writes buffered guest data to the stream; tells the guest when room opened up.
    fn flush_pending(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(0) => break,
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key, true);
                    return;
                }
            }
        }
        let update = c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 2;
        let fd = c.stream.as_raw_fd();
        let waiting = !c.pending.is_empty();
        if update {
            self.reply(key, OP_CREDIT_UPDATE);
        }
        if waiting {
            // Wait for the stream to drain (and keep noticing its data unless that is already
            // known).
            let readable = self.conns.get(&key).is_some_and(|c| c.readable);
            let ev = if readable {
                EventSet::OUT
            } else {
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP
            };
            self.interest(fd, Some(ev));
        }
    }

    /// Host side: accept connections, read CONNECT lines, notice readable streams.
    fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        // Every handled event changes what is watched, so this ends; the bound is a backstop.
        for _ in 0..64 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for ev in &events[..n] {
                let key = ev.data();
                if key == LISTENER_KEY {
                    while let Ok((s, _)) = self.listener.accept() {
                        if s.set_nonblocking(true).is_ok() && self.handshakes.len() < MAX_CONNS {
                            let fd = s.as_raw_fd();
                            self.handshakes.insert(
                                fd,
                                Handshake {
                                    stream: s,
                                    line: Vec::new(),
                                },
                            );
                            self.watch(fd);
                        }
                    }
                    continue;
                }
                let fd = key as RawFd;
                if self.handshakes.contains_key(&fd) {
                    self.read_connect_line(fd);
                    continue;
                }
                let Some(k) = self.by_fd.get(&fd).copied() else {
                    self.unwatch(fd);
                    continue;
                };
                let set = ev.event_set();
                if set.contains(EventSet::OUT) {
                    self.flush_pending(k);
                }
                let Some(c) = self.conns.get_mut(&k) else {
                    continue;
                };
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                    // Data or EOF to move: stop watching reads until it has moved (see
                    // stream_to_guest), keep watching writes while guest data waits.
                    c.readable = true;
                }
                let next = match (c.readable, c.pending.is_empty()) {
                    (true, true) => None,
                    (true, false) => Some(EventSet::OUT),
                    (false, true) => Some(EventSet::IN | EventSet::READ_HANG_UP),
                    (false, false) => Some(EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP),
                };
                self.interest(fd, next);
            }
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        // One byte at a time: whatever follows the newline is the stream's first data and
        // must stay in the socket.
        let done = loop {
            let mut b = [0u8; 1];
            match h.stream.read(&mut b) {
                Ok(0) => break Err(()),
                Ok(_) if b[0] == b'\n' => {
                    break std::str::from_utf8(&h.line)
                        .ok()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|p| p.trim().parse::<u32>().ok())
                        .map(Some)
                        .ok_or(());
                }
                Ok(_) if h.line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => h.line.push(b[0]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        match done {
            Ok(None) => {}
            Ok(Some(port)) => {
                let Some(h) = self.handshakes.remove(&fd) else {
                    return;
                };
                self.unwatch(fd);
                let local = self.next_local_port;
                self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
                let key = (local, port);
                self.add_conn(key, h.stream, State::AwaitingGuest);
                // Until the guest answers, the stream's bytes wait.
                self.unwatch(fd);
                self.reply(key, OP_REQUEST);
            }
            Err(()) => {
                if let Some(mut h) = self.handshakes.remove(&fd) {
                    self.unwatch(fd);
                    _ = h.stream.write_all(b"ERR expected CONNECT <port>\n");
                }
            }
        }
    }

    /// Fills receive buffers: replies first, then stream data within the guest's credit.
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let data_ready = self
                .conns
                .iter()
                .any(|(_, c)| c.readable && c.state == State::Established && c.credit() > 0);
            if self.replies.is_empty() && !data_ready {
                break;
            }
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "virtio-vsock: bad receive buffer");
                    if queue.add_used(mem, head, 0).is_err() {
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let len = if let Some(r) = self.replies.pop_front() {
                let c = self.conns.get_mut(&(r.src_port, r.dst_port));
                let (buf_alloc, fwd_cnt) = c.map_or((0, 0), |c| {
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    (BUF_ALLOC, c.fwd_cnt)
                });
                self.header(
                    &mut pkt, r.src_port, r.dst_port, r.op, 0, buf_alloc, fwd_cnt,
                );
                PKT_HEADER_SIZE as u32
            } else {
                self.stream_to_guest(&mut pkt)
            };
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn header<B: vm_memory::bitmap::BitmapSlice>(
        &self,
        pkt: &mut VsockPacket<'_, B>,
        src_port: u32,
        dst_port: u32,
        op: u16,
        len: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) {
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.cid)
            .set_src_port(src_port)
            .set_dst_port(dst_port)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_len(len)
            .set_flags(0)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    /// Moves bytes from one readable stream into `pkt`; returns the used length.
    fn stream_to_guest<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
    ) -> u32 {
        let Some(key) = self
            .conns
            .iter()
            .find(|(_, c)| c.readable && c.state == State::Established && c.credit() > 0)
            .map(|(k, _)| *k)
        else {
            return 0;
        };
        let room = pkt.data_slice().map_or(0, |d| d.len() as u32);
        let Some(c) = self.conns.get_mut(&key) else {
            return 0;
        };
        let max = room.min(c.credit()).min(MAX_PKT_DATA) as usize;
        let (op, n) = match c.stream.read(&mut self.buf[..max]) {
            Ok(0) => (OP_SHUTDOWN, 0),
            Ok(n) => (OP_RW, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.readable = false;
                let fd = c.stream.as_raw_fd();
                let ev = if c.pending.is_empty() {
                    EventSet::IN | EventSet::READ_HANG_UP
                } else {
                    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP
                };
                self.interest(fd, Some(ev));
                // Nothing to send after all: an empty credit update keeps the chain useful.
                let Some(c) = self.conns.get_mut(&key) else {
                    return 0;
                };
                c.last_fwd_cnt_sent = c.fwd_cnt;
                let fwd = c.fwd_cnt;
                self.header(pkt, key.0, key.1, OP_CREDIT_UPDATE, 0, BUF_ALLOC, fwd);
                return PKT_HEADER_SIZE as u32;
            }
            Err(_) => (OP_RST, 0),
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return 0;
        };
        if n > 0 {
            if let Some(d) = pkt.data_slice()
                && d.write_slice(&self.buf[..n], 0).is_err()
            {
                return 0;
            }
            c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
        }
        c.last_fwd_cnt_sent = c.fwd_cnt;
        let fwd = c.fwd_cnt;
        self.header(pkt, key.0, key.1, op, n as u32, BUF_ALLOC, fwd);
        if op == OP_SHUTDOWN || op == OP_RST {
            // Tell the guest both directions are done; it answers with RST.
            if op == OP_SHUTDOWN {
                pkt.set_flags(3);
            }
            self.close(key, false);
        }
        (PKT_HEADER_SIZE + n) as u32
    }

    fn drain_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header {
                        src_cid: pkt.src_cid(),
                        dst_cid: pkt.dst_cid(),
                        src_port: pkt.src_port(),
                        dst_port: pkt.dst_port(),
                        type_: pkt.type_(),
                        op: pkt.op(),
                        buf_alloc: pkt.buf_alloc(),
                        fwd_cnt: pkt.fwd_cnt(),
                    };
                    let len = pkt.len() as usize;
                    self.buf.resize(MAX_PKT_DATA as usize, 0);
                    let mut data = std::mem::take(&mut self.buf);
                    let n = match pkt.data_slice() {
                        Some(d) if len > 0 => {
                            let n = len.min(d.len()).min(data.len());
                            if d.read_slice(&mut data[..n], 0).is_err() {
                                0
                            } else {
                                n
                            }
                        }
                        _ => 0,
                    };
                    self.on_tx(&hdr, &data[..n]);
                    self.buf = data;
                }
                Err(e) => tracing::debug!(error = %e, "virtio-vsock: malformed packet"),
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Moves whatever can move: guest packets out, host data and replies in.
    fn pump(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut irq = false;
        if let Some(q) = queues.get_mut(usize::from(TX))
            && q.ready()
        {
            irq |= self.drain_tx(q, mem);
        }
        self.poll_host();
        if let Some(q) = queues.get_mut(usize::from(RX))
            && q.ready()
        {
            irq |= self.fill_rx(q, mem);
        }
        irq
    }
}

/// The fields of a packet header the device acts on.
#[derive(Clone, Copy, Debug)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    type_: u16,
    op: u16,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        19
    }

    fn pci_class(&self) -> u32 {
        0x08_80_00 // base system peripheral, other
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn reset(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.close(k, false);
        }
        self.replies.clear();
    }

    fn process_queue(&mut self, _index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.pump(queues, mem)
    }

    fn host_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn host_event(&mut self, _fd: RawFd, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.pump(queues, mem)
    }
}

#[cfg(test)]
#[path = "vsock_tests.rs"]
mod tests;
