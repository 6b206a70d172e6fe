//! A worker's VM networking: the bridge and its gateway address, each VM's private address
//! (kept in its directory), outbound NAT, the port names, and the isolation rules between
//! accounts (see `isolation`).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use crate::spawn::{stdin_tool, tool};
use crate::{Host, VmNet, WorkerError, write_json};

impl Host {
    /// The bridge's own address (first host address of the subnet).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cfg.subnet.network()) + 1)
    }
    /// The VM's address as kept in its directory.
    pub fn net_of(&self, id: &str) -> Option<VmNet> {
        read_net(&self.vm_dir(id))
    }
    /// The VM's address: the one in its directory, else `hint` (what the replica last saw) if
    /// free and in the subnet, else the lowest free one.
    pub fn address(&self, id: &str, hint: Option<Ipv4Addr>) -> Result<VmNet, WorkerError> {
        let dir = self.vm_dir(id);
        if let Some(n) = read_net(&dir) {
            return Ok(n);
        }
        let mut taken = self
            .taken
            .lock()
            .map_err(|_| WorkerError::Host("address table poisoned".into()))?;
        let gw = self.gateway();
        let usable = |ip: &Ipv4Addr| {
            self.cfg.subnet.contains(ip)
                && *ip != gw
                && *ip != self.cfg.subnet.network()
                && *ip != self.cfg.subnet.broadcast()
        };
        let ip = match hint.filter(|h| usable(h) && !taken.contains(h)) {
            Some(h) => h,
            None => self
                .cfg
                .subnet
                .hosts()
                .find(|ip| usable(ip) && !taken.contains(ip))
                .ok_or_else(|| {
                    WorkerError::Host(format!(
                        "subnet {} has no free address: enlarge worker.subnet",
                        self.cfg.subnet
                    ))
                })?,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| WorkerError::Host(format!("{}: {e}", dir.display())))?;
        let n = VmNet { ip };
        write_json(&dir.join("net.json"), &n)?;
        taken.insert(ip);
        Ok(n)
    }
    /// Creates the bridge with the gateway address once (idempotent across restarts).
    pub fn ensure_bridge(&self) -> Result<(), WorkerError> {
        let mut ready = self
            .bridge_ready
            .lock()
            .map_err(|_| WorkerError::Host("bridge state poisoned".into()))?;
        if *ready {
            return Ok(());
        }
        let b = self.cfg.bridge.as_str();
        if !link_exists(b) {
            ip(&["link", "add", "name", b, "type", "bridge"])?;
            tracing::info!(bridge = b, subnet = %self.cfg.subnet, "bridge created");
        }
        let addr = format!("{}/{}", self.gateway(), self.cfg.subnet.prefix_len());
        // After a restart the bridge has its address already (kernels word that differently).
        if let Err(e) = ip(&["addr", "add", &addr, "dev", b]) {
            let has = Command::new("ip")
                .args(["-o", "-4", "addr", "show", "dev", b])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {addr} ")))
                .unwrap_or(false);
            if !has {
                return Err(e);
            }
        }
        ip(&["link", "set", "dev", b, "up"])?;
        let nat = if self.cfg.nat {
            self.ensure_nat()
        } else {
            "off (worker.nat = false)".to_owned()
        };
        tracing::info!(bridge = b, nat = %nat, "VM networking ready");
        if let Ok(mut n) = self.nat.lock() {
            *n = Some(nat);
        }
        *ready = true;
        Ok(())
    }
    /// How outbound traffic from VMs is NATed (`None` until the first VM started).
    pub fn nat_status(&self) -> Option<String> {
        self.nat.lock().ok().and_then(|n| n.clone())
    }
    /// Enables forwarding and masquerades traffic from the subnet leaving through any other
    /// interface, with nftables (a table of its own, replaced whole, so repeating it is
    /// harmless) or else iptables. Without either, VMs reach only the bridge; said in the log
    /// and in `boxd admin status`. Returns what was done.
    fn ensure_nat(&self) -> String {
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            let m = format!("off: cannot enable IPv4 forwarding: {e}");
            tracing::warn!("outbound NAT for VMs is {m}");
            return m;
        }
        let (b, net) = (self.cfg.bridge.as_str(), self.cfg.subnet);
        let table: String = format!("boxd_{b}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let script = format!(
            "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n  chain postrouting {{\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {net} oifname != \"{b}\" masquerade\n  }}\n}}\n"
        );
        match stdin_tool("nft", &["-f", "-"], &script) {
            Ok(()) => return format!("nftables (table ip {table})"),
            Err(e) => tracing::debug!(error = %e, "nft"),
        }
        let rule = [
            "-t",
            "nat",
            "POSTROUTING",
            "-s",
            &net.to_string(),
            "!",
            "-o",
            b,
            "-j",
            "MASQUERADE",
        ];
        let with = |op: &'static str| -> Vec<&str> {
            let mut v = vec![rule[0], rule[1], op];
            v.extend_from_slice(&rule[2..]);
            v
        };
        if tool("iptables", &with("-C")).is_ok() || tool("iptables", &with("-A")).is_ok() {
            return "iptables (nat POSTROUTING MASQUERADE)".into();
        }
        let m = "off: neither nft nor iptables works here (apt-get install nftables)".to_owned();
        tracing::warn!("outbound NAT for VMs is {m}");
        m
    }
    /// Loads the rules that pin each VM's port and keep accounts apart (see `isolation`).
    pub fn isolate(&self) -> Result<(), WorkerError> {
        let cluster = self
            .isolating
            .lock()
            .map_err(|_| WorkerError::Host("isolation lock poisoned".into()))?;
        let n =
            crate::isolation::enforce(&self.cfg.data_dir.join("vms"), &self.cfg.bridge, &cluster)
                .map_err(WorkerError::Host)?;
        tracing::debug!(
            ports = n,
            members = cluster.len(),
            "VM isolation rules loaded"
        );
        Ok(())
    }
    /// Sets the cluster members' Raft addresses that VMs may not reach; reloads the rules when
    /// they changed and VMs have ports here. Returns whether they changed.
    pub fn set_cluster(
        &self,
        mut members: Vec<std::net::SocketAddrV4>,
    ) -> Result<bool, WorkerError> {
        members.sort();
        members.dedup();
        {
            let mut cur = self
                .isolating
                .lock()
                .map_err(|_| WorkerError::Host("isolation lock poisoned".into()))?;
            if *cur == members {
                return Ok(false);
            }
            *cur = members;
        }
        if self.local_vms().is_empty() {
            return Ok(true);
        }
        self.isolate().map(|()| true)
    }
}

/// Host name of a VM's tap: `bt` and the last 12 hex digits of its id (kvm runtime; as for veths).
pub fn tap_name(id: &str) -> String {
    let mut n = host_veth(id);
    n.replace_range(..2, "bt");
    n
}

/// Host name of a VM's veth end: `bx` and the last 12 hex digits of its id (the random part
/// of a v4 or v7 UUID; v7's leading digits are a timestamp that VMs created together share).
pub fn host_veth(id: &str) -> String {
    let hex: Vec<char> = id.chars().filter(char::is_ascii_hexdigit).collect();
    let tail: String = hex[hex.len().saturating_sub(12)..].iter().collect();
    format!("bx{tail}")
}

pub(crate) fn read_net(dir: &Path) -> Option<VmNet> {
    let text = std::fs::read(dir.join("net.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Whether this network namespace has an interface `name` (`if_nametoindex`, which asks the
/// kernel in the caller's namespace; `/sys/class/net` shows the namespace sysfs was mounted
/// in, which under `nsenter --net` is another one).
pub(crate) fn link_exists(name: &str) -> bool {
    std::ffi::CString::new(name)
        // SAFETY: a valid NUL-terminated string; the call only reads it.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
        .unwrap_or(false)
}

pub(crate) fn ip(args: &[&str]) -> Result<(), WorkerError> {
    tool("ip", args)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::tests::test_config;

    #[test]
    fn veth_names_fit_and_addresses_are_kept() {
        assert_eq!(
            host_veth("019ab2c3-0000-7000-8000-0123456789ab"),
            "bx0123456789ab"
        );
        assert_eq!(host_veth("019ab2c3-0000-7000-8000-0123456789ab").len(), 14);
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = test_config(dir.path(), "10.200.1.0/30", Path::new("/nonexistent"));
        let host = Host::open(cfg.clone());
        assert_eq!(host.gateway(), Ipv4Addr::new(10, 200, 1, 1));
        let a = host.address("a", None).expect("first");
        assert_eq!(a.ip, Ipv4Addr::new(10, 200, 1, 2));
        assert_eq!(host.address("a", None).expect("same"), a, "kept in its dir");
        let e = host.address("b", None).unwrap_err().to_string();
        assert!(e.contains("no free address"), "{e}");
        // A restarted worker learns the taken addresses from disk.
        let again = Host::open(cfg);
        assert!(
            again.address("c", Some(a.ip)).is_err(),
            "hint already taken, none free"
        );
        again.delete("a").expect("delete");
        assert_eq!(again.address("c", None).expect("freed").ip, a.ip);
    }
}
