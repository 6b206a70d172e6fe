//! `[dns]` of boxd's configuration file, defined once: the binary embeds this type in its
//! `Config`; the engine reads how the zone is presented from it (TTLs, SOA timers, name
//! server, CAA, who may transfer it) and the server how it serves (shards, TCP limits, rate
//! limiting). Fields marked "not in the file" keep their defaults in `boxd`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use boxd_model::model::is_dns_label;
use serde::{Deserialize, Serialize};

/// `[dns]`. The same on every DNS node of a cluster, except `listen` and `cpus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP and TCP listen address.
    pub listen: SocketAddr,
    /// CPUs to run shards on, one pinned shard each; empty means every CPU (`boxd` resolves
    /// that before starting; given an empty list, the server runs unpinned shards).
    pub cpus: Vec<usize>,
    /// TTL of positive answers, seconds.
    pub ttl: u32,
    /// SOA minimum: the TTL of negative answers, seconds.
    pub negative_ttl: u32,
    /// Address of `ns1.<zone>`, the zone's name server (NS glue).
    pub nameserver: Ipv4Addr,
    /// CAs allowed to issue for the zone (`CAA 0 issue "<ca>"` at the apex).
    pub caa_issuers: Vec<String>,
    /// Addresses allowed to transfer the zone (AXFR/IXFR over TCP); everyone else is refused.
    pub secondaries: Vec<IpAddr>,
    /// Close idle TCP connections after this many seconds.
    pub tcp_idle_secs: u64,
    /// Close a TCP connection after this many queries.
    pub tcp_max_queries: u32,
    /// Response rate limit per client network (/24, /56), responses per second; 0 is off.
    pub rrl_responses_per_second: u32,
    /// Over the limit, every `rrl_slip`-th response is sent truncated; 0 drops them all.
    pub rrl_slip: u32,
    /// SOA refresh, seconds, for secondaries (not in the file).
    #[serde(skip)]
    pub refresh: i32,
    /// SOA retry, seconds (not in the file).
    #[serde(skip)]
    pub retry: i32,
    /// SOA expire, seconds (not in the file).
    #[serde(skip)]
    pub expire: i32,
    /// Largest UDP response sent to an EDNS client, and what is advertised (not in the file).
    #[serde(skip)]
    pub edns_payload: u16,
    /// Most TCP connections per shard (not in the file).
    #[serde(skip)]
    pub tcp_max_connections: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5353)),
            cpus: Vec::new(),
            ttl: 60,
            negative_ttl: 60,
            nameserver: Ipv4Addr::LOCALHOST,
            caa_issuers: vec!["letsencrypt.org".into()],
            secondaries: Vec::new(),
            tcp_idle_secs: 10,
            tcp_max_queries: 1000,
            rrl_responses_per_second: 0,
            rrl_slip: 2,
            refresh: 3600,
            retry: 600,
            expire: 604_800,
            edns_payload: 1232,
            tcp_max_connections: 1024,
        }
    }
}

impl DnsConfig {
    /// How long a TCP connection may idle.
    pub fn tcp_idle(&self) -> Duration {
        Duration::from_secs(self.tcp_idle_secs)
    }

    /// Checks what the types cannot express; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.ttl == 0 || self.negative_ttl == 0 {
            return Err(("dns.ttl", "TTLs must be at least 1 second".into()));
        }
        if self.tcp_idle_secs == 0 || self.tcp_max_queries == 0 {
            return Err((
                "dns.tcp_idle_secs",
                "TCP limits must be at least 1 (second, query)".into(),
            ));
        }
        if let Some(ca) = self.caa_issuers.iter().find(|ca| {
            ca.is_empty() || !ca.split('.').all(|l| is_dns_label(&l.to_ascii_lowercase()))
        }) {
            return Err((
                "dns.caa_issuers",
                format!(
                    "`{ca}` is not a domain name: use the CA's domain, e.g. \"letsencrypt.org\""
                ),
            ));
        }
        Ok(())
    }
}
