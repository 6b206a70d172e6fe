//! The answer engine's behaviour, one test per rule, against an in-memory zone. Queries are
//! built with hickory-proto (or by hand when they must be malformed) and responses parsed back.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr};

use boxd_dns::{Action, DnsConfig, Engine, MemZone, Transport};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
const SECONDARY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53));

fn zone() -> MemZone {
    let mut z = MemZone {
        apex: "boxd.test".into(),
        lobby: Some(Ipv4Addr::new(127, 77, 0, 1)),
        serial: 42,
        ..MemZone::default()
    };
    z.vms.insert("myapp".into(), Ipv4Addr::new(127, 77, 0, 2));
    z.vms.insert("db".into(), Ipv4Addr::new(127, 77, 0, 3));
    z.txt
        .insert("_acme-challenge.myapp".into(), vec!["token-1".into()]);
    z.txt.insert("_a.ghost".into(), vec!["x".into()]);
    z.txt.insert(
        "big".into(),
        (0..16)
            .map(|i| format!("{i:02}{}", "v".repeat(250)))
            .collect(),
    );
    z
}

fn engine() -> Engine {
    Engine::new(DnsConfig {
        secondaries: vec![SECONDARY],
        ..DnsConfig::default()
    })
}

fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some(p) = edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(bytes: &[u8], transport: Transport) -> Option<Message> {
    let mut out = Vec::new();
    match engine().answer(&zone(), bytes, transport, PEER, &mut out) {
        Action::Reply => Some(Message::from_vec(&out).unwrap()),
        Action::Drop => None,
        Action::Transfer => panic!("unexpected transfer"),
    }
}

fn udp(name: &str, t: RecordType) -> Message {
    ask(&query(name, t, None), Transport::Udp).unwrap()
}

fn ips(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn vm_name_gets_its_address_authoritatively_with_the_question_case_kept() {
    let m = udp("MyApp.BOXD.Test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_desired, "RD is copied");
    assert!(!m.metadata.recursion_available);
    assert_eq!(ips(&m), vec![Ipv4Addr::new(127, 77, 0, 2)]);
    assert_eq!(m.queries[0].name().to_ascii(), "MyApp.BOXD.Test.");
    assert_eq!(m.answers[0].name.to_ascii(), "MyApp.BOXD.Test.");
    assert_eq!(m.answers[0].ttl, 60);
    assert_eq!(m.metadata.id, 0x1234);
}

#[test]
fn existing_name_other_type_is_nodata_with_soa() {
    let m = udp("myapp.boxd.test.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn missing_name_is_nxdomain_with_soa_and_negative_ttl() {
    let m = udp("nope.boxd.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.metadata.authoritative);
    let soa = &m.authorities[0];
    let RData::SOA(s) = &soa.data else {
        panic!("{soa:?}")
    };
    assert_eq!(s.serial, 42);
    assert_eq!(s.minimum, 60);
    assert_eq!(soa.ttl, 60);
    assert_eq!(soa.name.to_ascii(), "boxd.test.");
    assert_eq!(s.mname.to_ascii(), "ns1.boxd.test.");
    // Below a VM, nothing exists unless published.
    assert_eq!(
        udp("x.myapp.boxd.test.", RecordType::A)
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
}

#[test]
fn names_outside_the_zone_and_other_classes_are_refused() {
    let m = udp("example.com.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
    assert_eq!(
        udp("test.", RecordType::A).metadata.response_code,
        ResponseCode::Refused
    );
    let mut q = Message::new(7, MessageType::Query, OpCode::Query);
    let mut question = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
    question.set_query_class(DNSClass::CH);
    q.add_query(question);
    let m = ask(&q.to_vec().unwrap(), Transport::Udp).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn apex_has_soa_ns_with_glue_lobby_a_and_caa_and_api_is_at_the_lobby() {
    let m = udp("boxd.test.", RecordType::SOA);
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    let m = udp("boxd.test.", RecordType::NS);
    let RData::NS(ns) = &m.answers[0].data else {
        panic!()
    };
    assert_eq!(ns.0.to_ascii(), "ns1.boxd.test.");
    assert_eq!(m.additionals[0].name.to_ascii(), "ns1.boxd.test.");
    assert_eq!(
        ips(&udp("boxd.test.", RecordType::A)),
        vec![Ipv4Addr::new(127, 77, 0, 1)]
    );
    assert_eq!(
        ips(&udp("ns1.boxd.test.", RecordType::A)),
        vec![Ipv4Addr::LOCALHOST]
    );
    // The API is at the lobby too.
    assert_eq!(
        ips(&udp("api.boxd.test.", RecordType::A)),
        vec![Ipv4Addr::new(127, 77, 0, 1)]
    );
    let m = udp("boxd.test.", RecordType::CAA);
    let RData::CAA(caa) = &m.answers[0].data else {
        panic!()
    };
    assert!(caa.to_string().contains("letsencrypt.org"), "{caa}");
    assert_eq!(udp("boxd.test.", RecordType::MX).answers.len(), 0);
}

#[test]
fn published_txt_records_and_empty_non_terminals() {
    let m = udp("_acme-challenge.MYAPP.boxd.test.", RecordType::TXT);
    let RData::TXT(t) = &m.answers[0].data else {
        panic!()
    };
    assert_eq!(t.to_string(), "token-1");
    // "ghost" only has a descendant: it exists, with no records.
    let m = udp("ghost.boxd.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

#[test]
fn any_is_answered_with_one_rrset() {
    let m = udp("boxd.test.", RecordType::ANY);
    let types: std::collections::BTreeSet<RecordType> =
        m.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(types.len(), 1, "{types:?}");
    let m = udp("myapp.boxd.test.", RecordType::ANY);
    assert_eq!(ips(&m), vec![Ipv4Addr::new(127, 77, 0, 2)]);
}

#[test]
fn other_opcodes_get_notimp() {
    let mut q = Message::new(9, MessageType::Query, OpCode::Notify);
    q.add_query(Query::query(
        Name::from_ascii("boxd.test.").unwrap(),
        RecordType::SOA,
    ));
    assert_eq!(
        ask(&q.to_vec().unwrap(), Transport::Udp)
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
}

#[test]
fn edns_is_echoed_and_unknown_versions_get_badvers() {
    let m = ask(
        &query("myapp.boxd.test.", RecordType::A, Some(4096)),
        Transport::Udp,
    )
    .unwrap();
    let e = m.edns.expect("OPT in the response");
    assert_eq!(e.max_payload(), 1232);
    assert_eq!(e.version(), 0);
    let mut q = Message::from_vec(&query("myapp.boxd.test.", RecordType::A, Some(1232))).unwrap();
    q.edns.as_mut().unwrap().set_version(1);
    let m = ask(&q.to_vec().unwrap(), Transport::Udp).unwrap();
    // BADVERS is 16 (it shares the number with TSIG's BADSIG, which is how it decodes).
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.edns.is_some(), "BADVERS comes with an OPT record");
    assert!(m.answers.is_empty());
}

/// RFC 3225 §3: the DO bit of the query's OPT record comes back in the answer's, on the fast
/// path (a VM name) and the full path (the apex SOA) alike; without it, none.
#[test]
fn the_do_bit_is_echoed() {
    let e = engine();
    let z = zone();
    for (name, t) in [
        ("myapp.boxd.test.", RecordType::A),
        ("nope.boxd.test.", RecordType::AAAA),
        ("boxd.test.", RecordType::SOA),
    ] {
        for dnssec_ok in [false, true] {
            let mut q = Message::from_vec(&query(name, t, Some(1232))).unwrap();
            q.edns.as_mut().unwrap().set_dnssec_ok(dnssec_ok);
            let q = q.to_vec().unwrap();
            let mut fast = Vec::new();
            let mut answers = vec![ask(&q, Transport::Udp).unwrap()];
            if boxd_dns::fastpath::answer(e.config(), &z, &q, &mut fast) {
                answers.push(Message::from_vec(&fast).unwrap());
            }
            for m in answers {
                let opt = m.edns.expect("OPT in the response");
                assert_eq!(opt.flags().dnssec_ok, dnssec_ok, "{name} {t}");
            }
        }
    }
}

#[test]
fn truncation_over_udp_and_full_answer_over_tcp() {
    // 16 strings of 252 bytes: ~4 KiB.
    let plain = udp("big.boxd.test.", RecordType::TXT);
    assert!(plain.metadata.truncation);
    assert!(plain.answers.is_empty());
    assert_eq!(plain.queries.len(), 1);
    let edns = ask(
        &query("big.boxd.test.", RecordType::TXT, Some(1232)),
        Transport::Udp,
    )
    .unwrap();
    assert!(edns.metadata.truncation, "1232 bytes is too small too");
    let tcp = ask(
        &query("big.boxd.test.", RecordType::TXT, None),
        Transport::Tcp,
    )
    .unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 16);
    // A payload size under 512 still means 512.
    let small = ask(
        &query("myapp.boxd.test.", RecordType::A, Some(100)),
        Transport::Udp,
    )
    .unwrap();
    assert_eq!(ips(&small).len(), 1);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    let good = query("myapp.boxd.test.", RecordType::A, None);
    assert!(
        ask(&good[..11], Transport::Udp).is_none(),
        "no header: drop"
    );
    let mut response = good.clone();
    response[2] |= 0x80;
    assert!(ask(&response, Transport::Udp).is_none(), "a response: drop");
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"junk");
    assert_eq!(
        ask(&trailing, Transport::Udp)
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
    let cut = &good[..good.len() - 2];
    assert_eq!(
        ask(cut, Transport::Udp).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    // Question name that points at itself.
    let mut looped = good[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(
        ask(&looped, Transport::Udp).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    // QDCOUNT 0 and 2.
    let mut none = good.clone();
    none[5] = 0;
    let r = ask(&none, Transport::Udp).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    let mut two = Message::from_vec(&good).unwrap();
    two.add_query(Query::query(
        Name::from_ascii("db.boxd.test.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        ask(&two.to_vec().unwrap(), Transport::Udp)
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
}

#[test]
fn zone_transfer_only_for_secondaries_over_tcp() {
    let q = query("boxd.test.", RecordType::AXFR, None);
    let e = engine();
    let z = zone();
    let mut out = Vec::new();
    assert_eq!(
        e.answer(&z, &q, Transport::Tcp, PEER, &mut out),
        Action::Reply
    );
    assert_eq!(
        Message::from_vec(&out).unwrap().metadata.response_code,
        ResponseCode::Refused
    );
    out.clear();
    assert_eq!(
        e.answer(&z, &q, Transport::Udp, SECONDARY, &mut out),
        Action::Reply
    );
    assert!(
        Message::from_vec(&out).unwrap().metadata.truncation,
        "UDP: go to TCP"
    );
    out.clear();
    assert_eq!(
        e.answer(&z, &q, Transport::Tcp, SECONDARY, &mut out),
        Action::Transfer
    );
    let msgs = e.transfer(&z, &q);
    let records: Vec<_> = msgs
        .iter()
        .flat_map(|m| Message::from_vec(m).unwrap().answers)
        .collect();
    assert_eq!(records.first().unwrap().record_type(), RecordType::SOA);
    assert_eq!(records.last().unwrap().record_type(), RecordType::SOA);
    let names: std::collections::BTreeSet<String> =
        records.iter().map(|r| r.name.to_ascii()).collect();
    for n in [
        "boxd.test.",
        "ns1.boxd.test.",
        "api.boxd.test.",
        "myapp.boxd.test.",
        "db.boxd.test.",
        "_acme-challenge.myapp.boxd.test.",
    ] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    let sub = query("myapp.boxd.test.", RecordType::AXFR, None);
    out.clear();
    e.answer(&z, &sub, Transport::Tcp, SECONDARY, &mut out);
    assert_eq!(
        Message::from_vec(&out).unwrap().metadata.response_code,
        ResponseCode::NotAuth
    );
}

/// Wherever the fast path answers, the full path gives the same message.
#[test]
fn fast_path_agrees_with_the_full_path() {
    let e = engine();
    let z = zone();
    let names = [
        "myapp",
        "MYAPP",
        "db",
        "nope",
        "ghost",
        "big",
        "_acme-challenge.myapp",
        "ns1",
        "api",
        "",
    ];
    for name in names {
        for t in [RecordType::A, RecordType::AAAA] {
            for edns in [None, Some(512), Some(4096)] {
                let fqdn = if name.is_empty() {
                    "boxd.test.".to_owned()
                } else {
                    format!("{name}.boxd.test.")
                };
                let q = query(&fqdn, t, edns);
                let mut fast = Vec::new();
                let answered = boxd_dns::fastpath::answer(e.config(), &z, &q, &mut fast);
                let mut slow = Vec::new();
                assert_eq!(
                    e.slow(&z, &q, Transport::Udp, PEER, &mut slow),
                    Action::Reply
                );
                if answered {
                    assert_eq!(
                        Message::from_vec(&fast).unwrap(),
                        Message::from_vec(&slow).unwrap(),
                        "{fqdn} {t} {edns:?}"
                    );
                }
                let expect_fast = name.split('.').count() == 1
                    && !name.is_empty()
                    && name != "ns1"
                    && name != "api";
                assert_eq!(answered, expect_fast, "{fqdn} {t} {edns:?}");
            }
        }
    }
}

/// Found by the `dns_engine` fuzz target: an OPT record with a malformed client-subnet option
/// (code 8). hickory-proto refuses the query whole (FORMERR), while the fast path, which reads
/// options only as opaque TLVs, answered it. The fast path now leaves options that hickory
/// decodes to the full path.
#[test]
fn the_fast_path_leaves_decoded_edns_options_to_the_full_path() {
    let q: &[u8] = &[
        18, 52, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 4, 110, 111, 112, 101, 4, 98, 111, 120, 100, 4, 116,
        101, 115, 116, 0, 0, 28, 0, 1, 0, 0, 41, 4, 208, 0, 0, 18, 1, 0, 52, 0, 1, 0, 9, 0, 0, 0,
        63, 0, 0, 0, 255, 25, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 19, 0, 0, 0, 0, 43, 111,
        44, 101, 0, 0, 0, 44, 101, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let (e, z) = (engine(), zone());
    let mut fast = Vec::new();
    assert!(!boxd_dns::fastpath::answer(e.config(), &z, q, &mut fast));
    let m = ask(q, Transport::Udp).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
}
