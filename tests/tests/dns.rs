//! boxd's authoritative DNS as resolvers and operators meet it: the real `dig` (BIND 9) and
//! `kdig` (Knot) against `boxd up`, one behaviour per check, plus raw malformed packets.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use boxd_tests::{Node, UP, eventually, now_ms, write, write_config};
use serde_json::json;
use uuid::Uuid;

const IP: &str = "127.0.37.1";
const SECONDARY: &str = "127.0.37.9";

fn tool(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap_or_else(|e| {
        panic!("{bin} is required (ops/test installs dnsutils and knot-dnsutils): {e}")
    });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dig(args: &[&str]) -> String {
    let mut all = vec!["@127.0.37.1", "-p", "5353", "+norec", "+time=2", "+tries=1"];
    all.extend_from_slice(args);
    tool("dig", &all)
}

fn kdig(args: &[&str]) -> String {
    let mut all = vec!["@127.0.37.1", "-p", "5353", "+norec", "+time=2", "+retry=0"];
    all.extend_from_slice(args);
    tool("kdig", &all)
}

fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| {
            s.split(|c: char| c == ',' || c == ';' || c.is_whitespace())
                .next()
        })
        .unwrap_or_else(|| panic!("no status in:\n{out}"))
}

fn flags(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(";; flags:"))
        .and_then(|l| l.strip_prefix(";; flags:"))
        .and_then(|l| l.split(';').next())
        .unwrap_or_else(|| panic!("no flags in:\n{out}"))
        .trim()
        .to_owned()
}

/// Records of a section (`ANSWER`, `AUTHORITY`, `ADDITIONAL`) as dig prints them.
fn section(out: &str, name: &str) -> Vec<String> {
    let header = format!(";; {name} SECTION:");
    out.lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn dig_and_kdig_get_what_a_resolver_expects() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "dns", &format!("{IP}:7000"), "");
    // Let the secondary transfer the zone.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "cpus = [0]\n",
        &format!("cpus = [0]\nsecondaries = [\"{SECONDARY}\"]\n"),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let node = Node::start(&UP, &dir.path().join("data"), &cfg);
    let ready = node.wait_ready(Duration::from_secs(30));
    assert!(ready.contains(&format!("dns={IP}:5353")), "{ready}");

    let owner = Uuid::new_v4();
    let vm = Uuid::new_v4();
    write(
        &node,
        json!({"type": "create_account", "id": owner, "name": "alice", "max_vms": null, "at": now_ms()}),
    );
    write(
        &node,
        json!({"type": "create_vm", "id": vm, "owner": owner, "name": "myapp", "http_port": 80,
        "at": now_ms(), "spec": {"vcpus": 1, "memory_mib": 512, "disk_gib": 4, "image": "minimal"}}),
    );
    write(
        &node,
        json!({"type": "set_txt", "name": "_acme-challenge.myapp", "values": ["token-xyz"]}),
    );
    let big: Vec<String> = (0..16)
        .map(|i| format!("{i:02}{}", "v".repeat(250)))
        .collect();
    write(
        &node,
        json!({"type": "set_txt", "name": "big", "values": big}),
    );

    // A VM name: its public address, authoritative, question case kept.
    let out = dig(&["MyApp.BOXD.test", "A"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(flags(&out).split_whitespace().any(|f| f == "aa"), "{out}");
    let answer = section(&out, "ANSWER");
    assert_eq!(answer.len(), 1, "{out}");
    assert!(
        answer[0].starts_with("MyApp.BOXD.test.") && answer[0].ends_with("127.77.0.2"),
        "{out}"
    );

    // Missing name: NXDOMAIN with the SOA; negative TTL from the SOA minimum.
    let out = dig(&["nope.boxd.test"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    let soa = section(&out, "AUTHORITY");
    assert!(
        soa[0].contains("SOA") && soa[0].contains("ns1.boxd.test. hostmaster.boxd.test."),
        "{out}"
    );
    assert!(
        soa[0].split_whitespace().nth(1) == Some("60") && soa[0].ends_with(" 60"),
        "{out}"
    );

    // Existing name, other type: NODATA with the SOA.
    let out = dig(&["myapp.boxd.test", "AAAA"]);
    assert_eq!(status(&out), "NOERROR");
    assert!(section(&out, "ANSWER").is_empty());
    assert!(section(&out, "AUTHORITY")[0].contains("SOA"), "{out}");

    // Outside the zone: REFUSED, not authoritative.
    let out = dig(&["example.com"]);
    assert_eq!(status(&out), "REFUSED");
    assert!(!flags(&out).split_whitespace().any(|f| f == "aa"));

    // The apex: SOA, NS with glue, the lobby's A, CAA.
    assert!(
        dig(&["+short", "boxd.test", "SOA"]).starts_with("ns1.boxd.test. hostmaster.boxd.test.")
    );
    let out = dig(&["boxd.test", "NS"]);
    assert!(
        section(&out, "ANSWER")[0].ends_with("ns1.boxd.test."),
        "{out}"
    );
    assert!(
        section(&out, "ADDITIONAL")
            .iter()
            .any(|l| l.starts_with("ns1.boxd.test.") && l.ends_with("127.0.0.1")),
        "{out}"
    );
    assert_eq!(dig(&["+short", "boxd.test", "A"]).trim(), "127.77.0.1");
    assert_eq!(
        dig(&["+short", "boxd.test", "CAA"]).trim(),
        "0 issue \"letsencrypt.org\""
    );

    // TXT published through the log (an ACME challenge).
    assert_eq!(
        dig(&["+short", "_acme-challenge.myapp.boxd.test", "TXT"]).trim(),
        "\"token-xyz\""
    );

    // ANY: one RRset (RFC 8482).
    let out = dig(&["boxd.test", "ANY"]);
    let types: std::collections::BTreeSet<String> = section(&out, "ANSWER")
        .iter()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect();
    assert_eq!(types.len(), 1, "{out}");

    // Other opcodes: NOTIMP.
    assert_eq!(
        status(&dig(&["+opcode=notify", "boxd.test", "SOA"])),
        "NOTIMP"
    );

    // EDNS: OPT echoed with our payload size; version 1 gets BADVERS.
    let out = dig(&["+edns=0", "+bufsize=4096", "myapp.boxd.test"]);
    assert!(
        out.contains("EDNS: version: 0") && out.contains("udp: 1232"),
        "{out}"
    );
    assert_eq!(
        status(&dig(&["+edns=1", "+noednsnegotiation", "myapp.boxd.test"])),
        "BADVERS"
    );
    let out = kdig(&["+edns=0", "myapp.boxd.test"]);
    assert!(
        out.contains("EDNS PSEUDOSECTION") && out.contains("status: NOERROR"),
        "{out}"
    );

    // Too big for UDP: TC set; dig retries over TCP and gets all 16 records.
    let out = dig(&["+ignore", "+noedns", "big.boxd.test", "TXT"]);
    assert!(flags(&out).split_whitespace().any(|f| f == "tc"), "{out}");
    let out = dig(&["big.boxd.test", "TXT"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(section(&out, "ANSWER").len(), 16, "{out}");

    // TCP: several queries on one connection.
    let out = kdig(&[
        "+tcp",
        "+keepopen",
        "myapp.boxd.test",
        "A",
        "boxd.test",
        "SOA",
        "nope.boxd.test",
        "A",
    ]);
    assert_eq!(out.matches("status: NOERROR").count(), 2, "{out}");
    assert_eq!(out.matches("status: NXDOMAIN").count(), 1, "{out}");

    // Zone transfer: refused to strangers, served to the configured secondary.
    let out = dig(&["boxd.test", "AXFR"]);
    assert!(out.contains("Transfer failed"), "{out}");
    let out = dig(&["-b", SECONDARY, "boxd.test", "AXFR"]);
    assert!(
        out.contains("myapp.boxd.test.") && out.contains("127.77.0.2"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.contains("\tSOA\t")).count(),
        2,
        "SOA first and last:\n{out}"
    );

    // Malformed packets: no crash, FORMERR where the header is readable.
    let sock = UdpSocket::bind(format!("{IP}:0")).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 512];
    for junk in [
        &b"\x01"[..],
        &[0u8; 11],
        b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
    ] {
        sock.send_to(junk, format!("{IP}:5353")).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            assert!(n >= 12);
            assert_eq!(buf[3] & 0x0f, 1, "FORMERR for {junk:?}");
        }
    }
    assert_eq!(
        status(&dig(&["myapp.boxd.test"])),
        "NOERROR",
        "still serving"
    );

    // The zone follows the replica: a deleted VM loses its address; the name stays as an
    // empty non-terminal while its ACME record exists, and is gone once that is removed.
    write(
        &node,
        json!({"type": "delete_vm", "by": owner, "vm": vm, "at": now_ms()}),
    );
    eventually(Duration::from_secs(5), "no address after delete", || {
        let out = dig(&["myapp.boxd.test"]);
        (status(&out) == "NOERROR" && section(&out, "ANSWER").is_empty()).then_some(())
    });
    write(
        &node,
        json!({"type": "set_txt", "name": "_acme-challenge.myapp", "values": []}),
    );
    eventually(
        Duration::from_secs(5),
        "NXDOMAIN once nothing is left",
        || (status(&dig(&["myapp.boxd.test"])) == "NXDOMAIN").then_some(()),
    );
}
