//! Any bytes as what a guest puts on a virtio queue: up to 8 descriptors (address, length,
//! flags, next) and 16 bytes of payload, processed by a real device: virtio-blk over a real
//! (temporary) disk image, virtio-net's transmit or receive queue over a socketpair (with
//! a frame waiting), or virtio-vsock's transmit queue (packets from the guest). Never a panic; every chain made available is completed; the image keeps
//! its size.
#![no_main]

use std::sync::OnceLock;

use boxd_vmm::devices::virtio::VirtioDevice;
use boxd_vmm::devices::virtio::block::Block;
use boxd_vmm::devices::virtio::net::Net;
use boxd_vmm::devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn image() -> &'static tempfile::NamedTempFile {
    static IMG: OnceLock<tempfile::NamedTempFile> = OnceLock::new();
    IMG.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().expect("temp");
        f.as_file().set_len(64 * 1024).expect("size");
        f
    })
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = d.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    // At most 8 descriptors: virtio-queue's mock queue lays out its used ring right after 8
    // avail entries, so more chains than that would overwrite it from the test side.
    let n = usize::from(n % 8) + 1;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
    // The request header the descriptors may point at, at 1 MiB.
    mem.write_slice(&rest[..rest.len().min(16)], GuestAddress(0x10_0000))
        .expect("header");
    let mut descs = Vec::with_capacity(n);
    for i in 0..n {
        let at = 16 + i * 16;
        // Addresses inside memory from 1 MiB up, or anywhere past its end. Never below 1 MiB:
        // the queue's own rings live there, and a guest that points buffers at its rings only
        // corrupts its own queue.
        let raw = u64_at(rest, at);
        let addr = if raw & 1 == 0 {
            0x10_0000 + (raw >> 1) % (1 << 20)
        } else {
            (2 << 20) + (raw >> 1)
        };
        let len = u64_at(rest, at + 8) as u32;
        let flags = (u64_at(rest, at + 12) as u16) & 0x3; // NEXT, WRITE (no indirect)
        let next = (u64_at(rest, at + 14) as u16) % 16;
        descs.push(RawDescriptor::from(Descriptor::new(
            addr,
            len % (8 << 20),
            flags,
            next,
        )));
    }
    // The top bits of the count byte choose the device and queue.
    let kind = data[0] >> 5;
    let mut uds = None;
    let (mut dev, index): (Box<dyn VirtioDevice>, u16) = match kind {
        0..=3 => (
            Box::new(Block::open(image().path(), false, "fuzz").expect("open")),
            0,
        ),
        4 | 5 => {
            let (a, b) = UnixDatagram::pair().expect("pair");
            a.set_nonblocking(true).expect("nonblocking");
            b.send(&rest[..rest.len().min(200)]).expect("frame");
            (
                Box::new(Net::new(a, [2, 0, 0, 0, 0, 1])),
                if kind == 4 { 0 } else { 1 },
            )
        }
        _ => {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = image()
                .path()
                .with_extension(format!("vsock{}", N.fetch_add(1, Ordering::Relaxed)));
            let v = Vsock::new(3, &p).expect("vsock");
            uds = Some(p);
            (Box::new(v), 1)
        }
    };
    let vq = MockSplitQueue::new(&mem, 16);
    if vq.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let (Ok(q0), Ok(q1)) = (vq.create_queue::<Queue>(), vq.create_queue::<Queue>()) else {
        return;
    };
    let mut queues = [q0, q1];
    let heads = vq.avail().idx().load();
    dev.process_queue(index, &mut queues, &mem);
    if let Some(p) = uds {
        let _ = std::fs::remove_file(p);
    }
    let q = &queues[usize::from(index)];
    if kind == 4 {
        // Receive: chains are taken while frames last (one here).
        assert!(q.next_used() <= heads);
    } else {
        assert_eq!(q.next_used(), heads, "every available chain is completed");
    }
    assert_eq!(image().as_file().metadata().expect("meta").len(), 64 * 1024);
});
