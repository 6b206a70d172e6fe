//! virtio-blk over a raw image file: read, write, flush, get-id; read-only on request.
//!
//! Requests are parsed from the descriptor chain first ([`Request::parse`]), then executed;
//! any malformed chain (wrong directions, too short, out-of-range guest addresses, past the end
//! of the disk, oversized) completes with `VIRTIO_BLK_S_IOERR` when the chain has a status
//! byte to put it in, and with nothing when it has not — never a host panic. Loops in the
//! chain are cut by virtio-queue (a chain is never longer than the queue).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{VirtioDevice, read_config_bytes};

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Largest data transfer of one request (the Linux driver's default max is 1 MiB per segment
/// list; anything larger is refused rather than buffered).
pub const MAX_TRANSFER: u32 = 4 << 20;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read sectors into guest buffers.
    Read,
    /// Write guest buffers to sectors.
    Write,
    /// Make writes durable.
    Flush,
    /// The device's id string.
    GetId,
    /// Anything else: answered UNSUPP.
    Unsupported(u32),
}

/// A request parsed from a descriptor chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Operation.
    pub op: Op,
    /// First sector.
    pub sector: u64,
    /// Data buffers (guest address, length).
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No device-writable last descriptor to put a status in.
    #[error("no status descriptor")]
    NoStatus,
    /// The header is missing, short, unreadable or device-writable.
    #[error("bad request header")]
    BadHeader,
    /// A data buffer goes the wrong way for the operation.
    #[error("data buffer direction does not match the request")]
    Direction,
    /// More data than [`MAX_TRANSFER`], or not whole sectors.
    #[error("bad transfer length")]
    Length,
}

/// A parse failure with the status address when there is one, so the error reaches the guest.
pub type ParseError = (RequestError, Option<GuestAddress>);

impl Request {
    /// Parses a chain: header (readable, 16 bytes), data, status (writable, 1 byte).
    pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<Self, ParseError>
    where
        M: std::ops::Deref<Target = GuestMemoryMmap>,
    {
        let descs: Vec<_> = chain.collect();
        let status = match descs.last() {
            Some(d) if d.is_write_only() && d.len() >= 1 && descs.len() >= 2 => d.addr(),
            _ => return Err((RequestError::NoStatus, None)),
        };
        let err = |e| (e, Some(status));
        let head = descs[0];
        if head.is_write_only() || head.len() < 16 {
            return Err(err(RequestError::BadHeader));
        }
        let mut hdr = [0u8; 16];
        mem.read_slice(&mut hdr, head.addr())
            .map_err(|_| err(RequestError::BadHeader))?;
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let op = match ty {
            VIRTIO_BLK_T_IN => Op::Read,
            VIRTIO_BLK_T_OUT => Op::Write,
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_GET_ID => Op::GetId,
            t => Op::Unsupported(t),
        };
        let middle = &descs[1..descs.len() - 1];
        let mut total: u64 = 0;
        let mut data = Vec::with_capacity(middle.len());
        for d in middle {
            let want_writable = matches!(op, Op::Read | Op::GetId);
            if matches!(op, Op::Read | Op::Write | Op::GetId) && d.is_write_only() != want_writable
            {
                return Err(err(RequestError::Direction));
            }
            total += u64::from(d.len());
            data.push((d.addr(), d.len()));
        }
        if total > u64::from(MAX_TRANSFER)
            || (matches!(op, Op::Read | Op::Write) && !total.is_multiple_of(SECTOR))
        {
            return Err(err(RequestError::Length));
        }
        Ok(Self {
            op,
            sector,
            data,
            status,
        })
    }
}

/// The block device.
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; 8],
    buf: Vec<u8>,
}

impl Block {
    /// Opens `path` as a disk; `id` is what GET_ID returns (truncated to 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        Self::new(file, read_only, id)
    }

    /// A disk on an open file.
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR;
        let mut idb = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(idb.len());
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only,
            sectors,
            id: idb,
            config: sectors.to_le_bytes(),
            buf: Vec::new(),
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Executes a parsed request; returns (status, bytes written into guest memory).
    pub fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let total: u64 = req.data.iter().map(|(_, l)| u64::from(*l)).sum();
        let in_range = || {
            req.sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(total))
                .is_some_and(|end| end <= self.sectors * SECTOR)
        };
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        match req.op {
            Op::Read => {
                if !in_range() {
                    return (ioerr, 0);
                }
                let mut off = req.sector * SECTOR;
                let mut written = 0u32;
                for (addr, len) in &req.data {
                    self.buf.resize(*len as usize, 0);
                    if self.file.read_exact_at(&mut self.buf, off).is_err()
                        || mem.write_slice(&self.buf, *addr).is_err()
                    {
                        return (ioerr, written);
                    }
                    off += u64::from(*len);
                    written += len;
                }
                (VIRTIO_BLK_S_OK as u8, written)
            }
            Op::Write => {
                if self.read_only || !in_range() {
                    return (ioerr, 0);
                }
                let mut off = req.sector * SECTOR;
                for (addr, len) in &req.data {
                    self.buf.resize(*len as usize, 0);
                    if mem.read_slice(&mut self.buf, *addr).is_err()
                        || self.file.write_all_at(&self.buf, off).is_err()
                    {
                        return (ioerr, 0);
                    }
                    off += u64::from(*len);
                }
                (VIRTIO_BLK_S_OK as u8, 0)
            }
            Op::Flush => {
                if self.read_only || self.file.sync_data().is_ok() {
                    (VIRTIO_BLK_S_OK as u8, 0)
                } else {
                    (ioerr, 0)
                }
            }
            Op::GetId => {
                let mut left = &self.id[..];
                let mut written = 0u32;
                for (addr, len) in &req.data {
                    let n = left.len().min(*len as usize);
                    if mem.write_slice(&left[..n], *addr).is_err() {
                        return (ioerr, written);
                    }
                    left = &left[n..];
                    written += n as u32;
                }
                (VIRTIO_BLK_S_OK as u8, written)
            }
            Op::Unsupported(_) => (VIRTIO_BLK_S_UNSUPP as u8, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        2
    }

    fn pci_class(&self) -> u32 {
        0x01_80_00 // mass storage, other
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(usize::from(index)) else {
            return false;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (status_addr, status, len) = match Request::parse(chain, mem) {
                Ok(req) => {
                    let (status, len) = self.execute(&req, mem);
                    (Some(req.status), status, len)
                }
                Err((e, addr)) => {
                    tracing::debug!(error = %e, "virtio-blk: malformed request");
                    (addr, VIRTIO_BLK_S_IOERR as u8, 0)
                }
            };
            let mut used_len = len;
            if let Some(a) = status_addr
                && mem.write_obj(status, a).is_ok()
            {
                used_len += 1;
            }
            if queue.add_used(mem, head, used_len).is_err() {
                // The used ring is outside guest memory: the driver broke the queue; stop.
                tracing::warn!("virtio-blk: used ring not writable; request dropped");
                break;
            }
            used_any = true;
        }
        used_any && queue.needs_notification(mem).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x10_3000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const SENTINEL: u8 = 0xee;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory")
    }

    /// A 64 KiB disk whose byte i is (i / 512) as u8, so every sector is recognisable.
    fn disk(read_only: bool) -> (tempfile::NamedTempFile, Block) {
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        let bytes: Vec<u8> = (0..64 * 1024).map(|i| (i / 512) as u8).collect();
        f.write_all(&bytes).expect("write");
        let b = Block::open(f.path(), read_only, "test-disk").expect("open");
        (f, b)
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn header(mem: &GuestMemoryMmap, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).expect("header");
    }

    /// Runs one chain through the device; returns (status byte, used length, interrupt).
    fn run(blk: &mut Block, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32, bool) {
        mem.write_obj(SENTINEL, GuestAddress(STATUS))
            .expect("sentinel");
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let irq = blk.process_queue(0, std::slice::from_mut(&mut q), mem);
        let used = vq.used().ring().ref_at(0).expect("used").load();
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
        (status, used.len(), irq)
    }

    /// Header, one data buffer, status.
    fn three(len: u32, data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, NEXT, 1),
            desc(DATA, len, data_flags | NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
        ]
    }

    #[test]
    fn read_write_flush_get_id() {
        let mem = memory();
        let (f, mut blk) = disk(false);
        assert_eq!(blk.sectors(), 128);

        header(&mem, VIRTIO_BLK_T_IN, 3);
        let (status, len, irq) = run(&mut blk, &mem, &three(1024, WRITE));
        assert_eq!((status, len, irq), (0, 1025, true));
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("read");
        assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));

        mem.write_slice(&[0xab; 512], GuestAddress(DATA))
            .expect("fill");
        header(&mem, VIRTIO_BLK_T_OUT, 7);
        assert_eq!(run(&mut blk, &mem, &three(512, 0)).0, 0);
        let on_disk = std::fs::read(f.path()).expect("disk");
        assert!(on_disk[7 * 512..8 * 512].iter().all(|b| *b == 0xab));
        assert!(
            on_disk[8 * 512..9 * 512].iter().all(|b| *b == 8),
            "neighbour untouched"
        );

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(run(&mut blk, &mem, &flush).0, 0);

        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(run(&mut blk, &mem, &three(20, WRITE)).0, 0);
        let mut id = [0u8; 9];
        mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id, b"test-disk");

        header(&mem, 99, 0);
        assert_eq!(run(&mut blk, &mem, &flush).0, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn read_only_and_out_of_range_get_ioerr() {
        let mem = memory();
        let (f, mut blk) = disk(true);
        assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        header(&mem, VIRTIO_BLK_T_OUT, 1);
        assert_eq!(
            run(&mut blk, &mem, &three(512, 0)).0,
            VIRTIO_BLK_S_IOERR as u8
        );
        assert!(
            std::fs::read(f.path()).expect("disk")[512..1024]
                .iter()
                .all(|b| *b == 1)
        );

        for sector in [127, 128, u64::MAX / 512, u64::MAX] {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            assert_eq!(
                run(&mut blk, &mem, &three(1024, WRITE)).0,
                VIRTIO_BLK_S_IOERR as u8,
                "sector {sector}"
            );
        }
    }

    #[test]
    fn malformed_chains_get_an_error_never_a_panic() {
        let mem = memory();
        let (_f, mut blk) = disk(false);
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // Header writable by the device.
        let c = [
            desc(HDR, 16, WRITE | NEXT, 1),
            desc(DATA, 512, WRITE | NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
        ];
        assert_eq!(run(&mut blk, &mem, &c).0, ioerr);
        // Header too short.
        let c = [
            desc(HDR, 8, NEXT, 1),
            desc(DATA, 512, WRITE | NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
        ];
        assert_eq!(run(&mut blk, &mem, &c).0, ioerr);
        // Read into a device-readable buffer.
        assert_eq!(run(&mut blk, &mem, &three(512, 0)).0, ioerr);
        // Not whole sectors.
        assert_eq!(run(&mut blk, &mem, &three(100, WRITE)).0, ioerr);
        // Oversized transfer.
        assert_eq!(
            run(&mut blk, &mem, &three(MAX_TRANSFER + 512, WRITE)).0,
            ioerr
        );
        // Data buffer outside guest memory.
        let c = [
            desc(HDR, 16, NEXT, 1),
            desc(0x4000_0000, 512, WRITE | NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
        ];
        assert_eq!(run(&mut blk, &mem, &c).0, ioerr);
        // Header outside guest memory.
        let c = [
            desc(0x4000_0000, 16, NEXT, 1),
            desc(DATA, 512, WRITE | NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
        ];
        assert_eq!(run(&mut blk, &mem, &c).0, ioerr);
        // No status descriptor: nothing to write the error into, but the chain is returned.
        let c = [desc(HDR, 16, NEXT, 1), desc(DATA, 512, 0, 0)];
        let (status, len, _) = run(&mut blk, &mem, &c);
        assert_eq!((status, len), (SENTINEL, 0));
        // A single descriptor.
        let (status, len, _) = run(&mut blk, &mem, &[desc(STATUS, 1, WRITE, 0)]);
        assert_eq!((status, len), (SENTINEL, 0));
        // A loop: descriptor 1 points back to 0. virtio-queue ends the chain after the queue's
        // size; the request is malformed, the host survives.
        let c = [desc(HDR, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 0)];
        let vq = MockSplitQueue::new(&mem, 16);
        for (i, d) in c.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).expect("store");
        }
        vq.avail().ring().ref_at(0).expect("avail").store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().expect("queue");
        blk.process_queue(0, std::slice::from_mut(&mut q), &mem);
        assert_eq!(q.next_used(), 1, "the looping chain was completed");
    }
}
