//! The allocation-free path for the queries that make up nearly all traffic: one question,
//! type A or AAAA, class IN, for a single label under the apex (a VM name or a name that does
//! not exist), with or without an EDNS OPT record. It reads the query bytes in place and writes
//! the response into the caller's buffer; anything else returns `false` and goes to the
//! hickory-proto path in `engine`, which defines the behaviour. Fuzzing checks that both paths
//! give the same answer wherever the fast path answers (`fuzz/fuzz_targets/dns_engine.rs`).

use crate::config::DnsConfig;
use crate::zone::ZoneView;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
/// EDNS options hickory-proto decodes rather than keeps as bytes (RFC 5001, 6975, 7871).
const OPT_NSID: u16 = 3;
const OPT_DAU: u16 = 5;
const OPT_SUBNET: u16 = 8;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// Longest label kept on the stack (DNS labels are at most 63 bytes).
const MAX_LABEL: usize = 63;

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// Parsed shape of a fast-path query.
struct Shape {
    /// End of the question section.
    question_end: usize,
    /// Offset of the apex within the question name (for compression pointers).
    apex_at: usize,
    /// Query type.
    qtype: u16,
    /// Whether the query carried EDNS (version 0).
    edns: bool,
    /// The OPT record's DO bit (RFC 3225), echoed in the answer.
    dnssec_ok: bool,
}

/// Answers `query` into `out` if it is of the fast-path shape; `false` otherwise (`out` may
/// then hold garbage and must be cleared by the caller).
pub fn answer<Z: ZoneView + ?Sized>(
    cfg: &DnsConfig,
    zone: &Z,
    query: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let Some(apex) = zone.apex() else {
        return false;
    };
    let mut label = [0u8; MAX_LABEL];
    let Some((shape, len)) = parse(query, apex, &mut label) else {
        return false;
    };
    let Ok(name) = std::str::from_utf8(&label[..len]) else {
        return false;
    };
    if name == "ns1" || name == "api" {
        return false;
    }
    out.clear();
    // Header: same id; QR, opcode 0, AA, RD and CD copied; RA, AD zero.
    out.extend_from_slice(&query[..2]);
    let rd = query[2] & 0x01;
    let cd = query[3] & 0x10;
    let arcount = u16::from(shape.edns);
    match zone.vm_addr(name) {
        Some(ip) if shape.qtype == TYPE_A => {
            out.extend_from_slice(&[0x84 | rd, cd, 0, 1, 0, 1, 0, 0, 0, arcount as u8]);
            out.extend_from_slice(&query[HEADER..shape.question_end]);
            // Answer: pointer to the question name, A, IN, TTL, 4 bytes.
            out.extend_from_slice(&[0xc0, 0x0c, 0, TYPE_A as u8, 0, CLASS_IN as u8]);
            out.extend_from_slice(&cfg.ttl.to_be_bytes());
            out.extend_from_slice(&[0, 4]);
            out.extend_from_slice(&ip.octets());
        }
        found => {
            let exists = found.is_some() || zone.txt(name).is_some() || zone.has_descendants(name);
            let rcode = if exists { 0 } else { 3 };
            out.extend_from_slice(&[0x84 | rd, cd | rcode, 0, 1, 0, 0, 0, 1, 0, arcount as u8]);
            out.extend_from_slice(&query[HEADER..shape.question_end]);
            soa(out, cfg, zone, shape.apex_at);
        }
    }
    if shape.edns {
        // OPT: root owner, our payload size, extended rcode 0, version 0, the query's DO bit
        // echoed (RFC 3225 §3) and no other flags, no data.
        out.extend_from_slice(&[0, 0, TYPE_OPT as u8]);
        out.extend_from_slice(&cfg.edns_payload.to_be_bytes());
        let flags = if shape.dnssec_ok { 0x80 } else { 0 };
        out.extend_from_slice(&[0, 0, flags, 0, 0, 0]);
    }
    true
}

/// The zone's SOA record for the authority section of a negative answer.
fn soa<Z: ZoneView + ?Sized>(out: &mut Vec<u8>, cfg: &DnsConfig, zone: &Z, apex_at: usize) {
    // apex_at < 512 in any query we accept, so it fits a compression pointer.
    let ptr = [0xc0 | ((apex_at >> 8) as u8 & 0x3f), (apex_at & 0xff) as u8];
    out.extend_from_slice(&ptr);
    out.extend_from_slice(&[0, TYPE_SOA as u8, 0, CLASS_IN as u8]);
    out.extend_from_slice(&cfg.ttl.min(cfg.negative_ttl).to_be_bytes());
    // RDATA: "ns1" + apex, "hostmaster" + apex, five counters.
    out.extend_from_slice(&[0, 39, 3, b'n', b's', b'1']);
    out.extend_from_slice(&ptr);
    out.push(10);
    out.extend_from_slice(b"hostmaster");
    out.extend_from_slice(&ptr);
    out.extend_from_slice(&zone.serial().to_be_bytes());
    out.extend_from_slice(&cfg.refresh.to_be_bytes());
    out.extend_from_slice(&cfg.retry.to_be_bytes());
    out.extend_from_slice(&cfg.expire.to_be_bytes());
    out.extend_from_slice(&cfg.negative_ttl.to_be_bytes());
}

/// Checks the query's shape and copies its first label, lowercased, into `label`.
fn parse(q: &[u8], apex: &str, label: &mut [u8; MAX_LABEL]) -> Option<(Shape, usize)> {
    if q.len() < HEADER || q.len() > 512 {
        return None;
    }
    // QR = 0, opcode QUERY, no TC; QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 0 or 1.
    if q[2] & 0xfa != 0 || q[3] & 0x40 != 0 {
        return None;
    }
    if u16_at(q, 4)? != 1 || u16_at(q, 6)? != 0 || u16_at(q, 8)? != 0 {
        return None;
    }
    let arcount = u16_at(q, 10)?;
    if arcount > 1 {
        return None;
    }
    // First label: the VM name.
    let mut i = HEADER;
    let len = usize::from(*q.get(i)?);
    if len == 0 || len > MAX_LABEL {
        return None;
    }
    let bytes = q.get(i + 1..i + 1 + len)?;
    for (dst, src) in label.iter_mut().zip(bytes) {
        let c = src.to_ascii_lowercase();
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_') {
            return None;
        }
        *dst = c;
    }
    i += 1 + len;
    // Then exactly the apex labels, any case, ending with the root.
    let apex_at = i;
    for part in apex.split('.') {
        let n = usize::from(*q.get(i)?);
        if n != part.len()
            || !q
                .get(i + 1..i + 1 + n)?
                .eq_ignore_ascii_case(part.as_bytes())
        {
            return None;
        }
        i += 1 + n;
    }
    if *q.get(i)? != 0 {
        return None;
    }
    i += 1;
    let qtype = u16_at(q, i)?;
    if (qtype != TYPE_A && qtype != TYPE_AAAA) || u16_at(q, i + 2)? != CLASS_IN {
        return None;
    }
    let question_end = i + 4;
    let mut edns = false;
    let mut dnssec_ok = false;
    let mut end = question_end;
    if arcount == 1 {
        // OPT: root owner, type 41, class = payload (≥ 512), ext-rcode 0, version 0.
        if *q.get(end)? != 0 || u16_at(q, end + 1)? != TYPE_OPT || u16_at(q, end + 3)? < 512 {
            return None;
        }
        if *q.get(end + 5)? != 0 || *q.get(end + 6)? != 0 {
            return None;
        }
        dnssec_ok = *q.get(end + 7)? & 0x80 != 0;
        let rdlen = usize::from(u16_at(q, end + 9)?);
        end += 11;
        // Options must be well-formed TLVs filling the data exactly, and opaque to hickory:
        // the options it reads (NSID, DAU, client subnet) may be refused there as malformed,
        // and the full path defines what such a query gets.
        let data_end = end + rdlen;
        while end < data_end {
            if matches!(u16_at(q, end)?, OPT_NSID | OPT_DAU | OPT_SUBNET) {
                return None;
            }
            let olen = usize::from(u16_at(q, end + 2)?);
            end += 4 + olen;
        }
        if end != data_end {
            return None;
        }
        edns = true;
    }
    if end != q.len() {
        return None;
    }
    Some((
        Shape {
            question_end,
            apex_at,
            qtype,
            edns,
            dnssec_ok,
        },
        len,
    ))
}
