//! virtio-net over a tap: queue 0 receives (tap → guest), queue 1 transmits (guest → tap).
//! Frames carry the 12-byte virtio-net header both ways, passed through to the tap
//! (`IFF_VNET_HDR`); no offloads are offered, so the header is all zeros but for
//! `num_buffers` = 1 on receive. A frame from the tap waits in a one-frame buffer until the
//! guest posts a receive buffer; the tap is read edge-triggered, so reading resumes when the
//! guest adds buffers.

use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::tap::{Tap, VNET_HDR_LEN};

use super::{VirtioDevice, read_config_bytes};
use std::os::unix::net::UnixDatagram;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with header (64 KiB + header, as a tap may deliver with GSO off).
const MAX_FRAME: usize = 65_562;
const RX: u16 = 0;
const TX: u16 = 1;

/// Where frames go and come from: a tap, or in tests a datagram socket. Each read or write is
/// one frame with its 12-byte virtio-net header.
pub trait FrameIo: AsRawFd + Send {
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize>;
    /// A name for logs.
    fn name(&self) -> &str;
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        Tap::write_frame(self, frame)
    }
    fn name(&self) -> &str {
        Tap::name(self)
    }
}

/// The network device.
pub struct Net<T = Tap> {
    tap: T,
    config: [u8; 8],
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl<T: FrameIo> Net<T> {
    /// A device on `tap` with MAC address `mac`.
    pub fn new(tap: T, mac: [u8; 6]) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Self {
            tap,
            config,
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
        }
    }

    /// Moves frames from the tap into receive buffers until either runs out. Returns whether
    /// any frame was delivered.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut delivered = false;
        loop {
            let len = match self.pending {
                Some(n) => n,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n >= VNET_HDR_LEN => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(tap = self.tap.name(), error = %e, "virtio-net: tap read");
                        break;
                    }
                },
            };
            // num_buffers = 1.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // No receive buffer: hold the frame until the guest posts one.
                self.pending = Some(len);
                break;
            };
            self.pending = None;
            let head = chain.head_index();
            let mut written = 0usize;
            for d in chain {
                if written == len {
                    break;
                }
                if !d.is_write_only() {
                    break;
                }
                let n = (d.len() as usize).min(len - written);
                if mem
                    .write_slice(&self.rx_buf[written..written + n], d.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            if written < len {
                tracing::debug!(
                    len,
                    written,
                    "virtio-net: receive buffer too small; frame dropped"
                );
                written = 0;
            }
            if queue.add_used(mem, head, written as u32).is_err() {
                break;
            }
            delivered = true;
        }
        delivered && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.tx_buf.clear();
            let mut ok = true;
            for d in chain {
                let n = d.len() as usize;
                if d.is_write_only() || self.tx_buf.len() + n > MAX_FRAME {
                    ok = false;
                    break;
                }
                let at = self.tx_buf.len();
                self.tx_buf.resize(at + n, 0);
                if mem.read_slice(&mut self.tx_buf[at..], d.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && self.tx_buf.len() > VNET_HDR_LEN {
                if let Err(e) = self.tap.write_frame(&self.tx_buf) {
                    tracing::debug!(error = %e, "virtio-net: tap write; frame dropped");
                }
            } else {
                tracing::debug!("virtio-net: malformed transmit chain; dropped");
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

impl<T: FrameIo> VirtioDevice for Net<T> {
    fn device_type(&self) -> u16 {
        1
    }

    fn pci_class(&self) -> u32 {
        0x02_00_00 // network, Ethernet
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match (index, queues.get_mut(usize::from(index))) {
            (RX, Some(q)) => self.receive(q, mem),
            (TX, Some(q)) => self.transmit(q, mem),
            _ => false,
        }
    }

    fn host_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }

    fn host_event(&mut self, _fd: RawFd, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match queues.get_mut(usize::from(RX)) {
            Some(q) if q.ready() => self.receive(q, mem),
            _ => false,
        }
    }
}

impl FrameIo for UnixDatagram {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.send(frame)
    }
    fn name(&self) -> &str {
        "socketpair"
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    fn setup() -> (GuestMemoryMmap, Net<UnixDatagram>, UnixDatagram) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let (dev_side, host_side) = UnixDatagram::pair().expect("pair");
        dev_side.set_nonblocking(true).expect("nonblocking");
        host_side.set_nonblocking(true).expect("nonblocking");
        (mem, Net::new(dev_side, [0x52, 0x54, 0, 1, 2, 3]), host_side)
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Runs `descs` on a fresh queue as queue `index`; returns the used lengths.
    fn run(
        net: &mut Net<UnixDatagram>,
        mem: &GuestMemoryMmap,
        index: u16,
        descs: &[RawDescriptor],
    ) -> Vec<u32> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).expect("chains");
        let q: Queue = vq.create_queue().expect("queue");
        let mut queues = [vq.create_queue().expect("queue"), q];
        net.process_queue(index, &mut queues, mem);
        (0..queues[usize::from(index)].next_used())
            .map(|i| {
                vq.used()
                    .ring()
                    .ref_at(usize::from(i))
                    .expect("used")
                    .load()
                    .len()
            })
            .collect()
    }

    #[test]
    fn transmit_gathers_a_chain_into_one_frame() {
        let (mem, mut net, host) = setup();
        let hdr = [0u8; VNET_HDR_LEN];
        mem.write_slice(&hdr, GuestAddress(0x10_0000)).expect("hdr");
        mem.write_slice(b"0123456789abcdef", GuestAddress(0x10_1000))
            .expect("payload");
        let chain = [desc(0x10_0000, 12, NEXT, 1), desc(0x10_1000, 16, 0, 0)];
        assert_eq!(run(&mut net, &mem, 1, &chain), vec![0]);
        let mut got = [0u8; 64];
        let n = host.recv(&mut got).expect("frame");
        assert_eq!(
            &got[..n],
            [&hdr[..], b"0123456789abcdef"].concat().as_slice()
        );
    }

    #[test]
    fn malformed_transmit_chains_are_dropped_not_fatal() {
        let (mem, mut net, host) = setup();
        // Device-writable buffer, buffer outside memory, header only, oversized: each chain is
        // returned, nothing is sent.
        let chains = [
            desc(0x10_0000, 64, WRITE, 0),
            desc(0x4000_0000, 64, 0, 0),
            desc(0x10_0000, 12, 0, 0),
            desc(0x10_0000, MAX_FRAME as u32 + 1, 0, 0),
        ];
        assert_eq!(run(&mut net, &mem, 1, &chains), vec![0, 0, 0, 0]);
        let mut got = [0u8; 64];
        assert!(host.recv(&mut got).is_err(), "nothing was sent");
    }

    #[test]
    fn receive_fills_buffers_and_holds_a_frame_without_one() {
        let (mem, mut net, host) = setup();
        let frame = [[0u8; VNET_HDR_LEN].as_slice(), b"hello guest"].concat();
        host.send(&frame).expect("send");
        // No receive buffer posted yet: the frame waits.
        let vq = MockSplitQueue::new(&mem, 16);
        let q: Queue = vq.create_queue().expect("queue");
        let mut queues = [vq.create_queue().expect("queue"), q];
        let fd = net.host_fds()[0];
        assert!(!net.host_event(fd, &mut queues, &mem));
        assert_eq!(net.pending, Some(frame.len()));
        // A buffer split over two descriptors arrives; the frame lands in it.
        let chain = [
            desc(0x20_0000, 8, WRITE | NEXT, 1),
            desc(0x20_1000, 100, WRITE, 0),
        ];
        assert_eq!(run(&mut net, &mem, 0, &chain), vec![frame.len() as u32]);
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got[..8], GuestAddress(0x20_0000))
            .expect("a");
        mem.read_slice(&mut got[8..], GuestAddress(0x20_1000))
            .expect("b");
        assert_eq!(&got[12..], b"hello guest");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    }

    #[test]
    fn receive_into_a_bad_buffer_drops_the_frame() {
        let (mem, mut net, host) = setup();
        host.send(&[0u8; 40]).expect("send");
        // Too small, then device-readable: each is returned with length 0.
        let chains = [desc(0x20_0000, 16, WRITE, 0)];
        assert_eq!(run(&mut net, &mem, 0, &chains), vec![0]);
        host.send(&[0u8; 40]).expect("send");
        let chains = [desc(0x20_0000, 64, 0, 0)];
        assert_eq!(run(&mut net, &mem, 0, &chains), vec![0]);
    }
}
