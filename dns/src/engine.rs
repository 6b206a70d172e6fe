//! The answer engine: query bytes and a [`ZoneView`] in, response bytes out. No I/O.
//!
//! Behaviour (RFC 1034/1035/2181/6891/8482): authoritative answers for the zone; NXDOMAIN or
//! NODATA with the SOA in the authority section (TTL capped by the SOA minimum); REFUSED outside
//! the zone and for other classes; the question echoed with its case; EDNS(0) answered with an
//! OPT record, BADVERS for versions above 0, the client's UDP payload size honoured (512 without
//! EDNS) and TC set when the answer does not fit; opcodes other than QUERY get NOTIMP; ANY gets
//! one RRset; AXFR/IXFR only for configured secondaries over TCP. Malformed queries get FORMERR
//! when their header is readable, and are dropped otherwise (and when they are responses).

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CAA, NS, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::config::DnsConfig;
use crate::fastpath;
use crate::zone::ZoneView;

/// How the query arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP: responses are limited to the client's payload size.
    Udp,
    /// TCP: up to 65535 bytes; zone transfers allowed for secondaries.
    Tcp,
}

/// What the server should do after `Engine::answer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the bytes now in `out`.
    Reply,
    /// Send nothing.
    Drop,
    /// Stream a zone transfer: call `Engine::transfer`.
    Transfer,
}

/// The answer engine for one zone presentation.
#[derive(Clone, Debug)]
pub struct Engine {
    cfg: DnsConfig,
}

/// What a name holds for a query type.
enum Found {
    Answer(Vec<Record>, Vec<Record>),
    NoData,
    NxDomain,
}

const MAX_TRANSFER_MESSAGE: usize = 16 * 1024;

/// The record sections of a response.
#[derive(Default)]
struct Sections {
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Engine {
    /// An engine presenting zones with `cfg`.
    pub fn new(cfg: DnsConfig) -> Self {
        Self { cfg }
    }

    /// The presentation settings.
    pub fn config(&self) -> &DnsConfig {
        &self.cfg
    }

    /// Answers `query` from `peer` into `out`.
    pub fn answer<Z: ZoneView + ?Sized>(
        &self,
        zone: &Z,
        query: &[u8],
        transport: Transport,
        peer: IpAddr,
        out: &mut Vec<u8>,
    ) -> Action {
        if fastpath::answer(&self.cfg, zone, query, out) {
            return Action::Reply;
        }
        out.clear();
        self.slow(zone, query, transport, peer, out)
    }

    /// The full path, built on hickory-proto. Public so tests can compare it with the fast path.
    pub fn slow<Z: ZoneView + ?Sized>(
        &self,
        zone: &Z,
        query: &[u8],
        transport: Transport,
        peer: IpAddr,
        out: &mut Vec<u8>,
    ) -> Action {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            // No readable header, or a response: answering could start a loop.
            return Action::Drop;
        }
        let id = u16::from_be_bytes([query[0], query[1]]);
        let opcode = OpCode::from_u8((query[2] >> 3) & 0x0f);
        let mut decoder = BinDecoder::new(query);
        let msg = match Message::read(&mut decoder) {
            Ok(m) if decoder.is_empty() => m,
            _ => return self.bare(id, opcode, query, ResponseCode::FormErr, out),
        };
        if msg.metadata.op_code != OpCode::Query {
            return self.reply(
                &msg,
                ResponseCode::NotImp,
                false,
                Sections::default(),
                transport,
                out,
            );
        }
        if msg.queries.len() != 1 {
            return self.reply(
                &msg,
                ResponseCode::FormErr,
                false,
                Sections::default(),
                transport,
                out,
            );
        }
        if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return self.reply(
                &msg,
                ResponseCode::BADVERS,
                false,
                Sections::default(),
                transport,
                out,
            );
        }
        let q = &msg.queries[0];
        let Some(apex) = zone.apex() else {
            return self.reply(
                &msg,
                ResponseCode::Refused,
                false,
                Sections::default(),
                transport,
                out,
            );
        };
        let Some(rel) = relative(q.name(), apex) else {
            return self.reply(
                &msg,
                ResponseCode::Refused,
                false,
                Sections::default(),
                transport,
                out,
            );
        };
        if q.query_class() != DNSClass::IN {
            return self.reply(
                &msg,
                ResponseCode::Refused,
                false,
                Sections::default(),
                transport,
                out,
            );
        }
        let apex_name = Name::from_ascii(format!("{apex}.")).unwrap_or_else(|_| Name::root());
        match q.query_type() {
            RecordType::AXFR | RecordType::IXFR => {
                let allowed = self.cfg.secondaries.contains(&peer);
                return match (allowed, transport, rel.as_str()) {
                    (false, _, _) => self.reply(
                        &msg,
                        ResponseCode::Refused,
                        true,
                        Sections::default(),
                        transport,
                        out,
                    ),
                    (true, _, r) if !r.is_empty() => self.reply(
                        &msg,
                        ResponseCode::NotAuth,
                        false,
                        Sections::default(),
                        transport,
                        out,
                    ),
                    // Over UDP: TC makes the secondary retry over TCP.
                    (true, Transport::Udp, _) => {
                        let a = self.reply(
                            &msg,
                            ResponseCode::NoError,
                            true,
                            Sections::default(),
                            transport,
                            out,
                        );
                        if a == Action::Reply && out.len() > 2 {
                            out[2] |= 0x02;
                        }
                        a
                    }
                    (true, Transport::Tcp, _) => Action::Transfer,
                };
            }
            _ => {}
        }
        let (rcode, sections) = match self.resolve(zone, &apex_name, q, &rel) {
            Found::Answer(answers, additionals) => (
                ResponseCode::NoError,
                Sections {
                    answers,
                    additionals,
                    ..Sections::default()
                },
            ),
            found @ (Found::NoData | Found::NxDomain) => (
                if matches!(found, Found::NxDomain) {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                },
                Sections {
                    authorities: vec![self.soa(zone, &apex_name, true)],
                    ..Sections::default()
                },
            ),
        };
        self.reply(&msg, rcode, true, sections, transport, out)
    }

    fn soa<Z: ZoneView + ?Sized>(&self, zone: &Z, apex: &Name, negative: bool) -> Record {
        let sub = |l: &str| {
            Name::from_ascii(l)
                .and_then(|n| n.append_domain(apex))
                .unwrap_or_else(|_| apex.clone())
        };
        let ttl = if negative {
            self.cfg.ttl.min(self.cfg.negative_ttl)
        } else {
            self.cfg.ttl
        };
        Record::from_rdata(
            apex.clone(),
            ttl,
            RData::SOA(SOA::new(
                sub("ns1"),
                sub("hostmaster"),
                zone.serial(),
                self.cfg.refresh,
                self.cfg.retry,
                self.cfg.expire,
                self.cfg.negative_ttl,
            )),
        )
    }

    fn ns_name(apex: &Name) -> Name {
        Name::from_ascii("ns1")
            .and_then(|n| n.append_domain(apex))
            .unwrap_or_else(|_| apex.clone())
    }

    /// The RRsets at `rel`: the apex, ns1, api, a VM, a TXT owner, an empty non-terminal, or nothing.
    fn rrsets<Z: ZoneView + ?Sized>(
        &self,
        zone: &Z,
        apex: &Name,
        owner: &Name,
        rel: &str,
    ) -> Option<Vec<(RecordType, Vec<Record>)>> {
        let ttl = self.cfg.ttl;
        let rec = |rdata: RData| Record::from_rdata(owner.clone(), ttl, rdata);
        let mut sets: Vec<(RecordType, Vec<Record>)> = Vec::new();
        if rel.is_empty() {
            sets.push((
                RecordType::SOA,
                vec![{
                    let mut r = self.soa(zone, apex, false);
                    r.name = owner.clone();
                    r
                }],
            ));
            sets.push((
                RecordType::NS,
                vec![rec(RData::NS(NS(Self::ns_name(apex))))],
            ));
            if let Some(ip) = zone.lobby() {
                sets.push((RecordType::A, vec![rec(RData::A(A(ip)))]));
            }
            let caa: Vec<Record> = self
                .cfg
                .caa_issuers
                .iter()
                .filter_map(|ca| Name::from_ascii(ca).ok())
                .map(|ca| rec(RData::CAA(CAA::new_issue(false, Some(ca), Vec::new()))))
                .collect();
            if !caa.is_empty() {
                sets.push((RecordType::CAA, caa));
            }
        } else if rel == "ns1" {
            sets.push((RecordType::A, vec![rec(RData::A(A(self.cfg.nameserver)))]));
        } else if rel == "api" {
            // The API is served by every proxy at the lobby address, as the apex is.
            if let Some(ip) = zone.lobby() {
                sets.push((RecordType::A, vec![rec(RData::A(A(ip)))]));
            }
        } else if let Some(ip) = zone.vm_addr(rel) {
            sets.push((RecordType::A, vec![rec(RData::A(A(ip)))]));
        }
        if let Some(values) = zone.txt(rel) {
            let txt = values
                .iter()
                .map(|v| rec(RData::TXT(TXT::new(vec![v.clone()]))))
                .collect();
            sets.push((RecordType::TXT, txt));
        }
        if sets.is_empty() && !zone.has_descendants(rel) {
            return None;
        }
        Some(sets)
    }

    fn resolve<Z: ZoneView + ?Sized>(&self, zone: &Z, apex: &Name, q: &Query, rel: &str) -> Found {
        let Some(sets) = self.rrsets(zone, apex, q.name(), rel) else {
            return Found::NxDomain;
        };
        let qtype = q.query_type();
        if qtype == RecordType::ANY {
            // RFC 8482: one RRset is enough.
            return match sets.into_iter().next() {
                Some((_, records)) => Found::Answer(records, Vec::new()),
                None => Found::NoData,
            };
        }
        match sets.into_iter().find(|(t, _)| *t == qtype) {
            Some((RecordType::NS, records)) => {
                let glue = Record::from_rdata(
                    Self::ns_name(apex),
                    self.cfg.ttl,
                    RData::A(A(self.cfg.nameserver)),
                );
                Found::Answer(records, vec![glue])
            }
            Some((_, records)) => Found::Answer(records, Vec::new()),
            None => Found::NoData,
        }
    }

    /// A response carrying only a header (and the question, when it could be read).
    fn bare(
        &self,
        id: u16,
        opcode: OpCode,
        query: &[u8],
        rcode: ResponseCode,
        out: &mut Vec<u8>,
    ) -> Action {
        let mut m = Message::new(id, MessageType::Response, opcode);
        m.metadata.recursion_desired = query[2] & 0x01 != 0;
        m.metadata.checking_disabled = query[3] & 0x10 != 0;
        m.metadata.response_code = rcode;
        match m.to_vec() {
            Ok(bytes) => {
                out.extend_from_slice(&bytes);
                Action::Reply
            }
            Err(_) => Action::Drop,
        }
    }

    fn reply(
        &self,
        req: &Message,
        rcode: ResponseCode,
        authoritative: bool,
        sections: Sections,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Action {
        let mut m = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
        m.metadata.authoritative = authoritative;
        m.metadata.recursion_desired = req.metadata.recursion_desired;
        m.metadata.checking_disabled = req.metadata.checking_disabled;
        m.metadata.response_code = rcode;
        m.queries = req.queries.clone();
        let limit = match (transport, &req.edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => 512,
            (Transport::Udp, Some(e)) => {
                usize::from(e.max_payload().clamp(512, self.cfg.edns_payload.max(512)))
            }
        };
        if let Some(asked) = &req.edns {
            let mut e = Edns::new();
            e.set_max_payload(self.cfg.edns_payload.max(512));
            e.set_version(0);
            e.set_rcode_high(rcode.high());
            // RFC 3225 §3: the DO bit is copied into the response (the zone is unsigned, so
            // nothing else changes).
            e.set_dnssec_ok(asked.flags().dnssec_ok);
            m.edns = Some(e);
        }
        m.answers = sections.answers;
        m.authorities = sections.authorities;
        m.additionals = sections.additionals;
        let Ok(bytes) = m.to_vec() else {
            return Action::Drop;
        };
        if bytes.len() <= limit {
            out.extend_from_slice(&bytes);
            return Action::Reply;
        }
        // Does not fit: say so, with the question only, so the client retries over TCP.
        m.answers.clear();
        m.authorities.clear();
        m.additionals.clear();
        m.metadata.truncation = true;
        match m.to_vec() {
            Ok(bytes) => {
                out.extend_from_slice(&bytes);
                Action::Reply
            }
            Err(_) => Action::Drop,
        }
    }

    /// The messages of a zone transfer answering `query` (already checked by `answer`):
    /// SOA, every record, SOA again, packed into messages of at most 16 KiB.
    pub fn transfer<Z: ZoneView + ?Sized>(&self, zone: &Z, query: &[u8]) -> Vec<Vec<u8>> {
        let Ok(req) = Message::from_vec(query) else {
            return Vec::new();
        };
        let Some(apex) = zone.apex() else {
            return Vec::new();
        };
        let apex_name = Name::from_ascii(format!("{apex}.")).unwrap_or_else(|_| Name::root());
        let soa = self.soa(zone, &apex_name, false);
        let mut records = vec![soa.clone()];
        let mut owners: Vec<(String, Vec<Record>)> = Vec::new();
        let mut push = |rel: &str| {
            let owner = if rel.is_empty() {
                apex_name.clone()
            } else {
                Name::from_ascii(rel)
                    .and_then(|n| n.append_domain(&apex_name))
                    .unwrap_or_else(|_| apex_name.clone())
            };
            if let Some(sets) = self.rrsets(zone, &apex_name, &owner, rel) {
                let recs: Vec<Record> = sets
                    .into_iter()
                    .filter(|(t, _)| *t != RecordType::SOA)
                    .flat_map(|(_, r)| r)
                    .collect();
                owners.push((rel.to_owned(), recs));
            }
        };
        push("");
        push("ns1");
        push("api");
        let mut names: Vec<String> = Vec::new();
        zone.each_vm(&mut |n, _| names.push(n.to_owned()));
        zone.each_txt(&mut |n, _| names.push(n.to_owned()));
        names.sort();
        names.dedup();
        for n in names
            .iter()
            .filter(|n| !matches!(n.as_str(), "ns1" | "api"))
        {
            push(n);
        }
        records.extend(owners.into_iter().flat_map(|(_, r)| r));
        records.push(soa);

        let mut messages = Vec::new();
        let mut batch: Vec<Record> = Vec::new();
        let mut size = 0;
        let mut first = true;
        let mut flush = |batch: &mut Vec<Record>, first: &mut bool| {
            let mut m = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            m.metadata.authoritative = true;
            if *first {
                m.queries = req.queries.clone();
                *first = false;
            }
            m.answers = std::mem::take(batch);
            if let Ok(bytes) = m.to_vec() {
                messages.push(bytes);
            }
        };
        for r in records {
            let approx = 64 + r.name.len();
            if size + approx > MAX_TRANSFER_MESSAGE && !batch.is_empty() {
                flush(&mut batch, &mut first);
                size = 0;
            }
            size += approx;
            batch.push(r);
        }
        if !batch.is_empty() {
            flush(&mut batch, &mut first);
        }
        messages
    }
}

/// `name` relative to `apex`, lowercase (`""` for the apex), or `None` when it is not in the
/// zone. A label that cannot be part of any name we serve (a dot or a control byte in it) maps
/// to a name that matches nothing.
fn relative(name: &Name, apex: &str) -> Option<String> {
    let labels: Vec<&[u8]> = name.iter().collect();
    let apex_labels: Vec<&str> = apex.split('.').collect();
    if labels.len() < apex_labels.len() {
        return None;
    }
    let split = labels.len() - apex_labels.len();
    for (l, a) in labels[split..].iter().zip(&apex_labels) {
        if !l.eq_ignore_ascii_case(a.as_bytes()) {
            return None;
        }
    }
    let mut rel = String::new();
    for (i, l) in labels[..split].iter().enumerate() {
        if i > 0 {
            rel.push('.');
        }
        if l.iter().any(|b| *b == b'.' || !b.is_ascii_graphic()) {
            rel.push('\u{0}');
        }
        rel.push_str(&String::from_utf8_lossy(l).to_ascii_lowercase());
    }
    Some(rel)
}
