//! Any bytes as a DNS query, over UDP and TCP: the engine never panics, every reply is a DNS
//! message of the right size, and wherever the allocation-free fast path answers, the full
//! hickory-proto path gives the same message.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use boxd_dns::{Action, Engine, MemZone, Transport, DnsConfig};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;

fn zone() -> MemZone {
    let mut z = MemZone {
        apex: "boxd.test".into(),
        lobby: Some(Ipv4Addr::new(127, 77, 0, 1)),
        serial: 7,
        ..MemZone::default()
    };
    z.vms.insert("myapp".into(), Ipv4Addr::new(127, 77, 0, 2));
    z.vms.insert("a".into(), Ipv4Addr::new(127, 77, 0, 3));
    z.txt
        .insert("_acme-challenge.myapp".into(), vec!["t".into()]);
    z.txt.insert("x.ghost".into(), vec!["t".into()]);
    z
}

fuzz_target!(|data: &[u8]| {
    let z = zone();
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let engine = Engine::new(DnsConfig {
        secondaries: vec![peer],
        ..DnsConfig::default()
    });
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut out = Vec::new();
        match engine.answer(&z, data, transport, peer, &mut out) {
            Action::Reply => {
                if transport == Transport::Udp {
                    assert!(out.len() <= 4096, "UDP reply of {} bytes", out.len());
                }
                assert!(out.len() >= 12);
                assert_eq!(out[..2], data[..2], "reply carries the query id");
                let reply = Message::from_vec(&out).expect("reply parses");
                let mut fast = Vec::new();
                if boxd_dns::fastpath::answer(engine.config(), &z, data, &mut fast) {
                    let mut slow = Vec::new();
                    assert_eq!(
                        engine.slow(&z, data, transport, peer, &mut slow),
                        Action::Reply
                    );
                    assert_eq!(
                        Message::from_vec(&fast).expect("fast parses"),
                        Message::from_vec(&slow).expect("slow parses")
                    );
                    assert_eq!(reply, Message::from_vec(&fast).expect("fast parses"));
                }
            }
            Action::Drop => {}
            Action::Transfer => {
                for m in engine.transfer(&z, data) {
                    Message::from_vec(&m).expect("transfer message parses");
                }
            }
        }
    }
});
