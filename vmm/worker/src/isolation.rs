//! Keeps the VMs on a worker's bridge apart: nftables rules, rebuilt whole from the VMs on disk
//! whenever one starts or goes, so that
//!
//! - a VM sends only from its own MAC and private address, ARP included (no address takeover:
//!   a VM root that adds a neighbour's address and announces it is dropped at its port), and
//!   nothing but IPv4 and ARP;
//! - VMs of different accounts cannot reach each other over the bridge (same account: allowed,
//!   an application VM talks to its database VM);
//! - a VM opens no connection to the worker host itself (Raft, admin, the front door's
//!   internal addresses): only replies to connections the host opened (the proxy's) and ping
//!   pass;
//! - nor to any cluster member's Raft (and image) port, wherever that member is: the worker
//!   lists the members' addresses from the replica. Other outbound traffic is the NAT's
//!   business.
//!
//! Two tables of boxd's own, `bridge` (per port) and `inet` (the host), replaced in one `nft -f`
//! transaction: a VM never runs under half a ruleset. Sans-io: [`ruleset`] only writes text.
//! Why nftables and not ebtables: one tool and one atomic transaction for both layers, and
//! sets/concatenations (`iifname . oifname`) that keep the rules O(VMs) per account.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

/// One VM's port on the bridge, as kept in `vms/<id>/port.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// The host-side interface (sandbox veth or kvm tap).
    pub ifname: String,
    /// The only MAC the VM may send from.
    pub mac: String,
    /// The only IPv4 address the VM may send from.
    pub ip: Ipv4Addr,
    /// The owning account: ports of one account may reach each other.
    pub owner: String,
}

/// A MAC for VM `id`: locally administered, unicast (`02:` prefix), from the random tail of
/// its UUID, so it is the same every time the VM starts and differs between VMs.
pub fn mac_of(id: &str) -> String {
    let hex: Vec<u8> = id
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|b| b.to_ascii_lowercase())
        .collect();
    let tail = &hex[hex.len().saturating_sub(10)..];
    let mut out = String::from("02");
    for pair in tail.chunks(2) {
        out.push(':');
        out.push_str(std::str::from_utf8(pair).unwrap_or("00"));
    }
    // Ids shorter than 10 hex digits (tests) are padded.
    while out.len() < 17 {
        out.push_str(":00");
    }
    out
}

/// The tables' name for `bridge`.
pub fn table_name(bridge: &str) -> String {
    format!("boxd_iso_{bridge}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Whether an interface name can go into a rule as it is (what `ip` accepts, and no quote).
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Whether a port's name and MAC can go into a rule as they are (boxd makes both, so anything
/// else is a damaged `port.json`).
pub fn writable(port: &Port) -> bool {
    plain(&port.ifname) && parse_mac(&port.mac)
}

/// The `nft -f` script that replaces boxd's tables for `bridge` with rules for `ports`, and
/// closes the `cluster` members' Raft addresses to VMs. A port that is not [`writable`] is
/// left out of the text (it could not be quoted safely); `enforce` refuses to load rules
/// without one, since a port without rules is not isolated.
pub fn ruleset(bridge: &str, ports: &[Port], cluster: &[SocketAddrV4]) -> String {
    let t = table_name(bridge);
    let ports: Vec<&Port> = ports.iter().filter(|p| writable(p)).collect();
    let mut s = String::new();
    // Create-then-delete makes the first run and later ones alike; all in one transaction.
    s += &format!("table bridge {t} {{}}\ndelete table bridge {t}\n");
    s += &format!("table inet {t} {{}}\ndelete table inet {t}\n");
    s += &format!("table bridge {t} {{\n");
    s += "  set vm_ports {\n    type ifname\n";
    push_elements(&mut s, ports.iter().map(|p| format!("\"{}\"", p.ifname)));
    s += "  }\n  set same_owner {\n    type ifname . ifname\n";
    let mut pairs = Vec::new();
    for a in &ports {
        for b in &ports {
            if a.ifname != b.ifname && a.owner == b.owner {
                pairs.push(format!("\"{}\" . \"{}\"", a.ifname, b.ifname));
            }
        }
    }
    push_elements(&mut s, pairs.into_iter());
    s += "  }\n";
    // Every frame a VM sends, whatever its destination (another port or the host).
    s += "  chain from_vms {\n    type filter hook prerouting priority -200; policy accept;\n";
    for p in &ports {
        let (i, mac, ip) = (&p.ifname, &p.mac, p.ip);
        s += &format!("    iifname \"{i}\" ether saddr != {mac} drop\n");
        s += &format!("    iifname \"{i}\" ether type arp arp saddr ether != {mac} drop\n");
        s += &format!("    iifname \"{i}\" ether type arp arp saddr ip != {ip} drop\n");
        s += &format!("    iifname \"{i}\" ether type ip ip saddr != {ip} drop\n");
        s += &format!("    iifname \"{i}\" ether type != {{ ip, arp }} drop\n");
    }
    s += "  }\n";
    // Port to port: only between one account's VMs.
    s += "  chain between_vms {\n    type filter hook forward priority 0; policy accept;\n";
    s += "    iifname . oifname @same_owner accept\n";
    s += "    iifname @vm_ports oifname @vm_ports drop\n";
    s += "  }\n}\n";
    // To the host itself through the bridge: replies and ping only.
    s += &format!("table inet {t} {{\n");
    s += "  chain to_host {\n    type filter hook input priority 0; policy accept;\n";
    s += &format!("    iifname \"{bridge}\" ct state established,related accept\n");
    s += &format!("    iifname \"{bridge}\" icmp type echo-request accept\n");
    s += &format!("    iifname \"{bridge}\" drop\n");
    s += "  }\n";
    // To other cluster members (routed, then NATed): never their Raft port. Refused at once
    // (a reset) rather than left to time out: the VM learns nothing it could not guess.
    s += "  set cluster {\n    type ipv4_addr . inet_service\n";
    push_elements(
        &mut s,
        cluster.iter().map(|a| format!("{} . {}", a.ip(), a.port())),
    );
    s += "  }\n";
    s += "  chain to_cluster {\n    type filter hook forward priority 0; policy accept;\n";
    s += &format!("    iifname \"{bridge}\" ip daddr . tcp dport @cluster reject with tcp reset\n");
    s += "  }\n}\n";
    s
}

/// Rebuilds the rules for `bridge` from every `port.json` under `vms` and loads them in one
/// `nft` transaction. Returns how many ports they cover. Without nftables, VMs would run
/// unisolated: an error that says to install it.
pub fn enforce(
    vms: &std::path::Path,
    bridge: &str,
    cluster: &[SocketAddrV4],
) -> Result<usize, String> {
    let mut ports = Vec::new();
    if let Ok(rd) = std::fs::read_dir(vms) {
        for e in rd.flatten() {
            let file = e.path().join(PORT_FILE);
            let Ok(text) = std::fs::read(&file) else {
                continue;
            };
            let fix = "delete that VM or the file, then start VMs again";
            match serde_json::from_slice::<Port>(&text) {
                Ok(p) if writable(&p) => ports.push(p),
                // A port without rules would not be isolated: nothing is loaded instead.
                Ok(_) => {
                    return Err(format!(
                        "{}: an interface name or MAC boxd did not make: {fix}",
                        file.display()
                    ));
                }
                Err(err) => return Err(format!("{}: {err}: {fix}", file.display())),
            }
        }
    }
    ports.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    crate::stdin_tool("nft", &["-f", "-"], &ruleset(bridge, &ports, cluster)).map_err(|e| {
        format!("cannot load the rules that keep VMs apart ({e}): install nftables (apt-get install nftables)")
    })?;
    Ok(ports.len())
}

/// Where a VM's [`Port`] is kept, in its directory.
pub const PORT_FILE: &str = "port.json";

fn push_elements(s: &mut String, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    if !items.is_empty() {
        *s += &format!("    elements = {{ {} }}\n", items.join(", "));
    }
}

/// Whether `mac` is six two-digit hex groups.
pub(crate) fn parse_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(ifname: &str, mac: &str, ip: &str, owner: &str) -> Port {
        Port {
            ifname: ifname.into(),
            mac: mac.into(),
            ip: ip.parse().expect("ip"),
            owner: owner.into(),
        }
    }

    /// A damaged `port.json` stops the rules from loading (the VM would run unisolated), with
    /// the file named and the fix; nothing reaches nft.
    #[test]
    fn a_port_boxd_did_not_make_loads_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let vm = dir.path().join("vm1");
        std::fs::create_dir(&vm).expect("mkdir");
        let bad = port("bx1\" drop", "02:00:00:00:00:01", "10.200.1.2", "eve");
        std::fs::write(vm.join(PORT_FILE), serde_json::to_vec(&bad).expect("json")).expect("write");
        let err = enforce(dir.path(), "boxd0", &[]).expect_err("refused");
        assert!(
            err.contains("port.json") && err.contains("did not make"),
            "{err}"
        );
        std::fs::write(vm.join(PORT_FILE), b"{").expect("write");
        assert!(
            enforce(dir.path(), "boxd0", &[])
                .expect_err("refused")
                .contains("port.json")
        );
    }

    #[test]
    fn macs_are_stable_unicast_and_local() {
        let id = "019ab2c3-0000-7000-8000-0123456789ab";
        assert_eq!(mac_of(id), "02:23:45:67:89:ab");
        assert_eq!(mac_of(id), mac_of(id));
        assert_ne!(mac_of(id), mac_of("019ab2c3-0000-7000-8000-0123456789ac"));
        assert_eq!(mac_of("ab"), "02:ab:00:00:00:00");
        assert!(parse_mac(&mac_of("")));
    }

    #[test]
    fn each_port_is_pinned_and_accounts_are_apart() {
        let ports = [
            port("bxa1", "02:00:00:00:00:a1", "10.200.1.2", "alice"),
            port("bxa2", "02:00:00:00:00:a2", "10.200.1.3", "alice"),
            port("bxb", "02:00:00:00:00:0b", "10.200.1.4", "bob"),
            port("bad\"name", "02:00:00:00:00:0c", "10.200.1.5", "eve"),
            port("bxc", "not-a-mac", "10.200.1.6", "eve"),
        ];
        let members = ["10.9.0.1:7000".parse().expect("addr")];
        let s = ruleset("boxd0", &ports, &members);
        assert!(s.starts_with("table bridge boxd_iso_boxd0 {}\ndelete table bridge"));
        assert!(s.contains("iifname \"bxb\" ether saddr != 02:00:00:00:00:0b drop"));
        assert!(s.contains("iifname \"bxb\" ether type arp arp saddr ip != 10.200.1.4 drop"));
        assert!(s.contains("iifname \"bxb\" ether type ip ip saddr != 10.200.1.4 drop"));
        assert!(
            s.contains("\"bxa1\" . \"bxa2\", \"bxa2\" . \"bxa1\""),
            "{s}"
        );
        assert!(!s.contains("\"bxa1\" . \"bxb\""), "{s}");
        assert!(
            !s.contains("bad") && !s.contains("bxc"),
            "unsafe ports left out: {s}"
        );
        assert!(s.contains("iifname \"boxd0\" ct state established,related accept"));
        assert!(s.contains("iifname \"boxd0\" drop"));
        assert!(s.contains("elements = { 10.9.0.1 . 7000 }"), "{s}");
        assert!(
            s.contains("iifname \"boxd0\" ip daddr . tcp dport @cluster reject with tcp reset"),
            "{s}"
        );
        // No VM: the tables still replace whatever was there.
        let empty = ruleset("boxd0", &[], &[]);
        assert!(
            empty.contains("set vm_ports {\n    type ifname\n  }"),
            "{empty}"
        );
    }
}
