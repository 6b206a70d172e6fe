//! Unit tests of `vsock.rs` (kept apart so the module reads in one go).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::*;

const CID: u64 = 3;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;

struct Rig {
    mem: GuestMemoryMmap,
    dir: tempfile::TempDir,
    dev: Vsock,
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Vsock::new(CID, &dir.path().join("v.sock")).expect("vsock");
    Rig { mem, dir, dev }
}

fn hdr(src_cid: u64, src_port: u32, dst_port: u32, op: u16, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(PKT_HEADER_SIZE);
    h.extend_from_slice(&src_cid.to_le_bytes());
    h.extend_from_slice(&HOST_CID.to_le_bytes());
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&TYPE_STREAM.to_le_bytes());
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&4096u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// Sends `packets` (raw bytes, each one descriptor) from the guest with 4 receive buffers
/// posted; returns the (op, src_port, dst_port, data) of each packet the guest received.
fn exchange(r: &mut Rig, packets: &[Vec<u8>]) -> Vec<(u16, u32, u32, Vec<u8>)> {
    let rxq = MockSplitQueue::create(&r.mem, GuestAddress(0), 16);
    let txq = MockSplitQueue::create(&r.mem, GuestAddress(0x8000), 16);
    let rx_descs: Vec<_> = (0..4u64)
        .map(|i| {
            RawDescriptor::from(SplitDescriptor::new(
                RX_BUF + i * 0x2000,
                0x1000,
                VRING_DESC_F_WRITE as u16,
                0,
            ))
        })
        .collect();
    rxq.add_desc_chains(&rx_descs, 0).expect("rx");
    let mut tx_descs = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        let at = TX_BUF + i as u64 * 0x2000;
        r.mem.write_slice(p, GuestAddress(at)).expect("packet");
        tx_descs.push(RawDescriptor::from(SplitDescriptor::new(
            at,
            p.len() as u32,
            0,
            0,
        )));
    }
    txq.add_desc_chains(&tx_descs, 0).expect("tx");
    let mut queues = [
        rxq.create_queue::<Queue>().expect("rxq"),
        txq.create_queue::<Queue>().expect("txq"),
    ];
    r.dev.process_queue(TX, &mut queues, &r.mem);
    // Host events (a listener, readable streams) as the I/O thread would deliver them.
    std::thread::sleep(std::time::Duration::from_millis(20));
    r.dev.host_event(0, &mut queues, &r.mem);
    assert_eq!(
        queues[1].next_used() as usize,
        packets.len(),
        "every packet returned"
    );
    (0..queues[0].next_used())
        .map(|i| {
            let at = RX_BUF + u64::from(i) * 0x2000;
            let mut h = [0u8; PKT_HEADER_SIZE];
            r.mem.read_slice(&mut h, GuestAddress(at)).expect("hdr");
            let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
            let op = u16::from_le_bytes([h[30], h[31]]);
            let len = le32(24) as usize;
            let mut data = vec![0u8; len];
            r.mem
                .read_slice(&mut data, GuestAddress(at + PKT_HEADER_SIZE as u64))
                .expect("data");
            (op, le32(16), le32(20), data)
        })
        .collect()
}

#[test]
fn refused_and_malformed_packets_get_rst_never_a_panic() {
    let mut r = rig();
    let got = exchange(
        &mut r,
        &[
            hdr(CID, 1000, 7000, OP_REQUEST, 0), // nobody listens on host port 7000
            hdr(CID + 1, 1001, 7000, OP_REQUEST, 0), // not the guest's CID
            hdr(CID, 1002, 7000, OP_RW, 0),      // data without a connection
            hdr(CID, 1003, 7000, 99, 0),         // unknown op, no connection
            vec![0u8; 10],                       // shorter than a header
            hdr(CID, 1004, 7000, OP_RW, 1 << 30), // claims more data than allowed
        ],
    );
    let ops: Vec<_> = got
        .iter()
        .map(|(op, src, dst, _)| (*op, *src, *dst))
        .collect();
    assert_eq!(
        ops,
        vec![
            (OP_RST, 7000, 1000),
            (OP_RST, 7000, 1001),
            (OP_RST, 7000, 1002),
            (OP_RST, 7000, 1003),
        ]
    );
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let r = rig();
    let e = Vsock::new(CID, &r.dir.path().join("v.sock"))
        .err()
        .expect("in use");
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    drop(r.dev);
    // Once nobody answers, the stale file is replaced.
    Vsock::new(CID, &r.dir.path().join("v.sock")).expect("stale socket replaced");
}

#[test]
fn guest_connects_sends_and_receives() {
    let mut r = rig();
    let listener = UnixListener::bind(r.dir.path().join("v.sock_5000")).expect("listen");
    let got = exchange(&mut r, &[hdr(CID, 1234, 5000, OP_REQUEST, 0)]);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1, got[0].2), (OP_RESPONSE, 5000, 1234));
    let (mut host, _) = listener.accept().expect("accept");

    let mut rw = hdr(CID, 1234, 5000, OP_RW, 5);
    rw.extend_from_slice(b"hello");
    exchange(&mut r, &[rw]);
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").expect("write");
    let got = exchange(&mut r, &[hdr(CID, 1234, 5000, OP_CREDIT_UPDATE, 0)]);
    let rw: Vec<_> = got.iter().filter(|p| p.0 == OP_RW).collect();
    assert_eq!(rw.len(), 1, "{got:?}");
    assert_eq!(rw[0].3, b"world");

    // Host closes: the guest hears SHUTDOWN.
    drop(host);
    let got = exchange(&mut r, &[hdr(CID, 1234, 5000, OP_CREDIT_UPDATE, 0)]);
    assert!(got.iter().any(|p| p.0 == OP_SHUTDOWN), "{got:?}");
}
