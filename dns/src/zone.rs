//! What the answer engine needs to know about the zone: the narrow [`ZoneView`] trait (what
//! exists), [`ZoneConfig`] (how it is presented: TTLs, SOA timers, name server, CAA, who may
//! transfer it), and the implementation of `ZoneView` for the control plane's `View`.
//!
//! Names handed to a `ZoneView` are relative to the apex, lowercase, without a trailing dot:
//! `""` is the apex, `"myapp"` a VM, `"_acme-challenge.myapp"` a TXT owner.

use std::net::{IpAddr, Ipv4Addr};

use boxd_model::View;

/// Read access to the zone's data.
pub trait ZoneView {
    /// The zone apex (`boxd.test`), lowercase without a trailing dot; `None` until the cluster
    /// is initialised.
    fn apex(&self) -> Option<&str>;
    /// The public address of the VM named `label` (a single label).
    fn vm_addr(&self, label: &str) -> Option<Ipv4Addr>;
    /// The lobby address (the apex's A record).
    fn lobby(&self) -> Option<Ipv4Addr>;
    /// SOA serial: increases with every change of the zone.
    fn serial(&self) -> u32;
    /// TXT records at `name`.
    fn txt(&self, name: &str) -> Option<&[String]>;
    /// Calls `f` for every TXT owner.
    fn each_txt(&self, f: &mut dyn FnMut(&str, &[String]));
    /// Calls `f` for every VM.
    fn each_vm(&self, f: &mut dyn FnMut(&str, Ipv4Addr));

    /// Whether `name` has descendants holding records (an empty non-terminal when it has no
    /// records of its own). Only TXT owners have more than one label below the apex.
    fn has_descendants(&self, name: &str) -> bool {
        let mut found = false;
        self.each_txt(&mut |owner, _| {
            found |= owner.len() > name.len()
                && owner.ends_with(name)
                && owner.as_bytes()[owner.len() - name.len() - 1] == b'.';
        });
        found
    }
}

impl ZoneView for View {
    fn apex(&self) -> Option<&str> {
        self.zone()
    }

    fn vm_addr(&self, label: &str) -> Option<Ipv4Addr> {
        View::vm_addr(self, label)
    }

    fn lobby(&self) -> Option<Ipv4Addr> {
        self.settings().map(|s| s.lobby)
    }

    fn serial(&self) -> u32 {
        // The Raft applied index only grows; the SOA serial space wraps (RFC 1982).
        (self.applied() & u64::from(u32::MAX)) as u32
    }

    fn txt(&self, name: &str) -> Option<&[String]> {
        View::txt(self, name).map(|v| &v[..])
    }

    fn each_txt(&self, f: &mut dyn FnMut(&str, &[String])) {
        for (name, values) in self.txt_records() {
            f(name, values);
        }
    }

    fn each_vm(&self, f: &mut dyn FnMut(&str, Ipv4Addr)) {
        for r in self.vms() {
            f(&r.name, r.public_ip);
        }
    }

    fn has_descendants(&self, name: &str) -> bool {
        self.txt_records().any(|(owner, _)| {
            owner.len() > name.len()
                && owner.ends_with(name)
                && owner.as_bytes()[owner.len() - name.len() - 1] == b'.'
        })
    }
}

/// How the zone is presented. The same on every DNS node of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneConfig {
    /// TTL of positive answers, seconds.
    pub ttl: u32,
    /// SOA minimum: the TTL of negative answers, seconds.
    pub negative_ttl: u32,
    /// SOA refresh, retry and expire, seconds (for secondaries).
    pub refresh: i32,
    /// See `refresh`.
    pub retry: i32,
    /// See `refresh`.
    pub expire: i32,
    /// Address of `ns1.<zone>`, the zone's name server.
    pub nameserver: Ipv4Addr,
    /// CAs allowed to issue for the zone (`CAA 0 issue "<ca>"` at the apex).
    pub caa_issuers: Vec<String>,
    /// Addresses allowed to transfer the zone (AXFR/IXFR); everyone else is refused.
    pub secondaries: Vec<IpAddr>,
    /// Largest UDP response we send to an EDNS client, and what we advertise.
    pub edns_payload: u16,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        Self {
            ttl: 60,
            negative_ttl: 60,
            refresh: 3600,
            retry: 600,
            expire: 604_800,
            nameserver: Ipv4Addr::LOCALHOST,
            caa_issuers: vec!["letsencrypt.org".into()],
            secondaries: Vec::new(),
            edns_payload: 1232,
        }
    }
}

/// A zone held in memory, for tests and benchmarks of the engine alone.
#[derive(Clone, Debug, Default)]
pub struct MemZone {
    /// Apex.
    pub apex: String,
    /// Lobby address.
    pub lobby: Option<Ipv4Addr>,
    /// VMs by name.
    pub vms: std::collections::BTreeMap<String, Ipv4Addr>,
    /// TXT records by owner.
    pub txt: std::collections::BTreeMap<String, Vec<String>>,
    /// Serial.
    pub serial: u32,
}

impl ZoneView for MemZone {
    fn apex(&self) -> Option<&str> {
        Some(&self.apex)
    }
    fn vm_addr(&self, label: &str) -> Option<Ipv4Addr> {
        self.vms.get(label).copied()
    }
    fn lobby(&self) -> Option<Ipv4Addr> {
        self.lobby
    }
    fn serial(&self) -> u32 {
        self.serial
    }
    fn txt(&self, name: &str) -> Option<&[String]> {
        self.txt.get(name).map(Vec::as_slice)
    }
    fn each_txt(&self, f: &mut dyn FnMut(&str, &[String])) {
        for (n, v) in &self.txt {
            f(n, v);
        }
    }
    fn each_vm(&self, f: &mut dyn FnMut(&str, Ipv4Addr)) {
        for (n, ip) in &self.vms {
            f(n, *ip);
        }
    }
}
