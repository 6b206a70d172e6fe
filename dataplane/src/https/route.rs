//! Which VM a request is for, or the page that says why none — one answer for HTTP/1.1
//! (`proxy.rs`) and HTTP/2 (`h2.rs`).

use std::net::Ipv4Addr;
use std::sync::Arc;

use boxd_model::model::Desired;
use boxd_model::view::VmRoute;

use super::pages;
use super::shard::Shard;

/// Why a request goes to no VM.
pub(super) enum Elsewhere {
    /// Answer with this page.
    Page(Vec<u8>),
    /// It is for the zone's own name: its site answers (`site.rs`).
    Site,
    /// It is for `api.<zone>`: the API's host answers (`site.rs`).
    Api,
}

impl From<Vec<u8>> for Elsewhere {
    fn from(page: Vec<u8>) -> Self {
        Self::Page(page)
    }
}

/// The VM a request goes to.
pub(super) struct Target {
    /// The name it was asked by.
    pub host: String,
    pub vm: Arc<VmRoute>,
    /// Its private address (running VMs only).
    pub private: Ipv4Addr,
}

impl Shard {
    /// The VM a request is for, or the page to answer with (the zone's own name: its site). SNI names it; without SNI (an IP
    /// in the URL) the first name the request carries does. Every name the request carries
    /// (`Host`, an absolute-form target, `:authority`) must be that one: a request for another
    /// VM than the TLS connection was opened for is misdirected (421, RFC 9110 15.5.20).
    pub(super) fn target(
        &self,
        sni: Option<String>,
        named: [Option<&str>; 2],
    ) -> Result<Target, Elsewhere> {
        let first = || named.iter().flatten().next().map(|h| (*h).to_owned());
        let Some(host) = sni.or_else(first) else {
            return Err(
                pages::bad_request("No server name and no Host header (or :authority).").into(),
            );
        };
        if named.iter().flatten().any(|h| *h != host) {
            return Err(pages::misdirected(&host).into());
        }
        let view = self.view().current();
        if self.is_api(&host) {
            return Err(Elsewhere::Api);
        }
        let Some(vm) = view.vm_by_host(&host).cloned() else {
            return Err(self.no_vm(&host));
        };
        let Some(private) = vm.private_ip.filter(|_| vm.desired == Desired::Running) else {
            let zone = view.zone().unwrap_or("");
            let stopped = vm.desired != Desired::Running;
            return Err(pages::unavailable(&vm.name, zone, stopped).into());
        };
        Ok(Target { host, vm, private })
    }

    /// Whether `host` is `api.<zone>`.
    pub(super) fn is_api(&self, host: &str) -> bool {
        is_api(host, self.view().current().zone().unwrap_or(""))
    }

    /// The answer for a `host` no VM has: the zone's own site for the zone's name, a 404 for
    /// an unknown VM name in the zone, a 421 for a name outside it.
    fn no_vm(&self, host: &str) -> Elsewhere {
        let view = self.view().current();
        let zone = view.zone().unwrap_or("");
        let bare = host.strip_suffix('.').unwrap_or(host);
        if bare.eq_ignore_ascii_case(zone) {
            Elsewhere::Site
        } else if view.in_zone(host) {
            pages::not_found(host, zone).into()
        } else {
            pages::not_served(host, zone).into()
        }
    }
}

/// Whether `host` is `api.<zone>` (any case, trailing dot or not).
fn is_api(host: &str, zone: &str) -> bool {
    let bare = host.strip_suffix('.').unwrap_or(host);
    bare.len() == zone.len() + 4
        && bare
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case("api."))
        && bare.get(4..).is_some_and(|z| z.eq_ignore_ascii_case(zone))
}
