//! What the answer engine needs to know about the zone: the narrow [`ZoneView`] trait (what
//! exists) and the implementation of `ZoneView` for the control plane's `View`.
//!
//! Names handed to a `ZoneView` are relative to the apex, lowercase, without a trailing dot:
//! `""` is the apex, `"myapp"` a VM, `"_acme-challenge.myapp"` a TXT owner.

use std::net::Ipv4Addr;

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
