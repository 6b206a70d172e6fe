//! The glommio server over real loopback sockets: UDP and TCP (several queries per
//! connection), two shards sharing the port, a clean stop, and TCP answered while UDP keeps a
//! shard busy.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boxd_dns::server::{DnsServer, Sockets};
use boxd_dns::{DnsConfig, Engine, MemZone};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn start(shards: usize) -> DnsServer {
    let mut zone = MemZone {
        apex: "boxd.test".into(),
        ..MemZone::default()
    };
    zone.vms.insert("web".into(), Ipv4Addr::new(127, 77, 0, 2));
    let sockets = Sockets::bind("127.0.0.1:0".parse().unwrap(), shards).unwrap();
    DnsServer::start(
        sockets,
        DnsConfig::default(),
        Engine::new(DnsConfig::default()),
        Arc::new(Mutex::new(zone)),
    )
    .unwrap()
}

/// One query over TCP on `tcp`; returns the answer's id and rcode.
fn tcp_query(tcp: &mut TcpStream, id: u16, name: &str) -> (u16, ResponseCode) {
    let q = query(id, name);
    tcp.write_all(&u16::try_from(q.len()).unwrap().to_be_bytes())
        .unwrap();
    tcp.write_all(&q).unwrap();
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).unwrap();
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut msg).unwrap();
    let m = Message::from_vec(&msg).unwrap();
    (m.metadata.id, m.metadata.response_code)
}

#[test]
fn udp_and_tcp_on_two_shards() {
    let server = start(2);
    let addr = server.local_addr();

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for id in 0..50u16 {
        client.send_to(&query(id, "web.boxd.test."), addr).unwrap();
        let mut buf = [0u8; 512];
        let n = client.recv(&mut buf).unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, id);
        assert!(matches!(m.answers[0].data, RData::A(a) if a.0 == Ipv4Addr::new(127, 77, 0, 2)));
    }

    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (id, name, rcode) in [
        (1, "web.boxd.test.", ResponseCode::NoError),
        (2, "x.boxd.test.", ResponseCode::NXDomain),
    ] {
        assert_eq!(tcp_query(&mut tcp, id, name), (id, rcode));
    }
    server.stop();
    // Stopped: nothing answers any more.
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    client.send_to(&query(99, "web.boxd.test."), addr).unwrap();
    let mut buf = [0u8; 512];
    assert!(client.recv(&mut buf).is_err());
}

/// The UDP loop drains its socket for as long as datagrams keep coming; it must still let the
/// shard's TCP connections run. Four threads keep one shard's UDP queue full (for at most 20 s)
/// while TCP queries are asked on the same shard.
#[test]
fn tcp_is_answered_while_udp_keeps_the_shard_busy() {
    let server = start(1);
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(20);
    let blasters: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                let q = query(7, "web.boxd.test.");
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    // Answers are not read; a full receive buffer just drops them.
                    if s.send_to(&q, addr).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for id in 0..20u16 {
        assert_eq!(
            tcp_query(&mut tcp, id, "web.boxd.test."),
            (id, ResponseCode::NoError)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = blasters.into_iter().map(|b| b.join().unwrap()).sum();
    assert!(sent > 1000, "the UDP load never got going ({sent} queries)");
    server.stop();
}
