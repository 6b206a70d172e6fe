//! The hot path allocates nothing: answering A/AAAA queries for VM names and for missing
//! names, with and without EDNS, from the control plane's real `View`, into a reused buffer.
//! Counted with a global allocator wrapper.

#![allow(clippy::unwrap_used, missing_docs, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use boxd_dns::{Action, DnsConfig, Engine, Transport};
use boxd_model::model::{AccountId, VmId};
use boxd_model::view::{View, ViewHandle};
use boxd_test_support::fixtures;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(1, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        m.set_edns(Edns::new());
    }
    m.to_vec().unwrap()
}

#[test]
fn hot_path_does_not_allocate() {
    let settings = fixtures::settings(10);
    let owner = AccountId::random();
    let routes = (0..10_000u32).map(|i| {
        fixtures::route(
            VmId::random(),
            format!("vm-{i}"),
            owner,
            Ipv4Addr::from(0x7f4d_0002 + i),
        )
    });
    let handle = ViewHandle::new();
    handle.publish(View::build(7, Some(settings), routes, []));
    let engine = Engine::new(DnsConfig::default());
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let queries: Vec<Vec<u8>> = [
        ("vm-42.boxd.test.", RecordType::A),
        ("VM-9999.Boxd.Test.", RecordType::A),
        ("vm-42.boxd.test.", RecordType::AAAA),
        ("missing.boxd.test.", RecordType::A),
    ]
    .iter()
    .flat_map(|(n, t)| [query(n, *t, false), query(n, *t, true)])
    .collect();
    let mut out = Vec::with_capacity(4096);
    // Warm up (first use of thread-locals etc.).
    for q in &queries {
        engine.answer(&**handle.current(), q, Transport::Udp, peer, &mut out);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..1000 {
        for q in &queries {
            let view = handle.current();
            let a = engine.answer(&**view, q, Transport::Udp, peer, &mut out);
            assert_eq!(a, Action::Reply);
            assert!(out.len() > 12);
        }
    }
    let allocations = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 8000 hot-path answers"
    );
}
