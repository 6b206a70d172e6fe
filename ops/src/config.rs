//! Typed configuration: TOML with `deny_unknown_fields`, a default for every field (so no file
//! is needed), and `validate()` that names the field and the fix. `boxd config default` prints
//! [`DEFAULT_TOML`], which a test keeps identical to `Config::default()`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub use boxd_controlplane::RaftConfig;
use boxd_controlplane::model::{Role, is_dns_label};
pub use boxd_dataplane::https::HttpsConfig;
pub use boxd_dataplane::ssh::SshConfig;
pub use boxd_dns::DnsConfig;
pub use boxd_oidc::IdentityConfig;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Roles whose services this build contains.
pub const BUILT_ROLES: [Role; 4] = [Role::Control, Role::Worker, Role::Proxy, Role::Dns];

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// Cluster-wide settings, fixed when the cluster is founded.
    pub cluster: ClusterConfig,
    /// Raft and the internal gRPC port.
    pub raft: RaftConfig,
    /// SSH front door.
    pub ssh: SshConfig,
    /// HTTPS front door.
    pub https: HttpsConfig,
    /// Authoritative DNS.
    pub dns: DnsConfig,
    /// Admin socket.
    pub admin: AdminConfig,
    /// Resources offered to VMs.
    pub worker: WorkerConfig,
    /// The OpenID provider people sign in with to link keys.
    pub identity: IdentityConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
}

/// `[metrics]`
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP `/metrics`, `/healthz` and `/readyz`; empty: off.
    pub listen: String,
}

/// `[node]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Display name; empty means the host name.
    pub name: String,
    /// Roles this node runs.
    pub roles: Vec<Role>,
    /// Seconds between heartbeats written through the log.
    pub heartbeat_secs: u64,
    /// Heartbeats a node may miss before it counts as unreachable: nothing is placed on it,
    /// and its VMs show as `unknown` (every node should use the same two values).
    pub missed_heartbeats: u64,
}

impl NodeConfig {
    /// How long a node may be silent and still count as up.
    pub fn liveness(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.heartbeat_secs.saturating_mul(self.missed_heartbeats))
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            roles: Role::ALL.to_vec(),
            heartbeat_secs: 10,
            missed_heartbeats: 3,
        }
    }
}

/// `[cluster]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// DNS zone VMs are named in.
    pub zone: String,
    /// Address of the lobby (`ssh <zone>`).
    pub lobby: Ipv4Addr,
    /// Public addresses handed to VMs.
    pub public_pool: Ipv4Net,
    /// VM quota of a new account.
    pub max_vms_per_account: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            zone: "boxd.test".into(),
            lobby: Ipv4Addr::new(127, 77, 0, 1),
            public_pool: Ipv4Net::new(Ipv4Addr::new(127, 77, 0, 0), 16)
                .unwrap_or_else(|_| Ipv4Net::default()),
            max_vms_per_account: 20,
        }
    }
}

/// `[admin]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Socket path; empty means `<data-dir>/admin.sock`.
    pub socket: String,
}

/// `[worker]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// vCPUs offered to VMs; 0 means four per host CPU.
    pub vcpus: u32,
    /// Memory offered to VMs in MiB; 0 means the host's memory minus 1 GiB.
    pub memory_mib: u64,
    /// Disk for VMs in GiB; 0 means the data directory's free space plus what VM disks
    /// already take there.
    pub disk_gib: u64,
    /// VMs' disk sizes may add up to this percentage of `disk_gib`: disks are thin (they take
    /// what the VM wrote), so most never fill.
    pub disk_overcommit_percent: u32,
    /// `auto`, `sandbox` or `kvm`.
    pub runtime: WorkerRuntime,
    /// Bridge the VMs attach to.
    pub bridge: String,
    /// The bridge's subnet; empty means 10.200.<node id>.0/24.
    pub subnet: String,
    /// How long a starting VM's agent may take to listen before the VM counts as failed.
    pub start_timeout_secs: u64,
    /// NAT the VMs' outbound traffic.
    pub nat: bool,
    /// Kernel for the kvm runtime (`vmlinux` or `vmlinuz`, `version`, `modules/`).
    pub kernel_dir: PathBuf,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            vcpus: 0,
            memory_mib: 0,
            disk_gib: 0,
            disk_overcommit_percent: 200,
            runtime: WorkerRuntime::Auto,
            bridge: "boxd0".into(),
            subnet: String::new(),
            start_timeout_secs: 30,
            nat: true,
            kernel_dir: "/var/cache/boxd/kernel".into(),
        }
    }
}

/// `worker.runtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRuntime {
    /// kvm where virtualization is hardware, else sandbox.
    Auto,
    /// Linux namespaces and cgroups.
    Sandbox,
    /// `boxd vmm` per VM.
    Kvm,
}

impl WorkerConfig {
    /// The bridge subnet for node `node`.
    pub fn subnet_for(&self, node: u64) -> Result<ipnet::Ipv4Net, ConfigError> {
        if self.subnet.is_empty() {
            let third = u8::try_from(node).map_err(|_| {
                invalid(
                    "worker.subnet",
                    format!("node id {node} is above 255: set worker.subnet for this node"),
                )
            })?;
            return Ok(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 200, third, 0), 24)
                    .unwrap_or_default(),
            );
        }
        let net: ipnet::Ipv4Net = self.subnet.parse().map_err(|_| {
            invalid(
                "worker.subnet",
                format!("{:?} is not an IPv4 subnet like 10.200.1.0/24", self.subnet),
            )
        })?;
        if net.prefix_len() > 29 {
            return Err(invalid(
                "worker.subnet",
                format!("{net} is too small: use a prefix of /29 or shorter"),
            ));
        }
        Ok(net.trunc())
    }
}

/// A configuration problem, naming the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Field, position and cause.
        message: String,
    },
    /// A value is out of bounds.
    #[error("config field `{field}`: {message}")]
    Invalid {
        /// Dotted field name.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl Config {
    /// Parses TOML text (`path` is only used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let span = inner
                .span()
                .map(|s| line_col(text, s.start))
                .map(|(l, c)| format!(" (line {l}, column {c})"))
                .unwrap_or_default();
            let message = inner.message().trim_end().to_owned();
            ConfigError::Parse {
                path: path.to_owned(),
                message: if field == "." || field.is_empty() {
                    format!("{message}{span}")
                } else {
                    format!("field `{field}`: {message}{span}")
                },
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates `path`, or returns the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Ok(Self::default()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Self::parse(&text, p)
            }
        }
    }

    /// Checks values that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zone = &self.cluster.zone;
        if zone.is_empty() || zone.len() > 200 || !zone.split('.').all(is_dns_label) {
            return Err(invalid(
                "cluster.zone",
                format!(
                    "`{zone}` is not a DNS zone: use dot-separated labels of lowercase letters, digits and '-', e.g. \"boxd.test\""
                ),
            ));
        }
        let settings = boxd_controlplane::model::ClusterSettings {
            cluster_id: uuid::Uuid::nil(),
            zone: zone.clone(),
            lobby: self.cluster.lobby,
            public_pool: self.cluster.public_pool,
            max_vms_per_account: self.cluster.max_vms_per_account,
            created_at: 0,
        };
        if settings.assignable_count() == 0 {
            return Err(invalid(
                "cluster.public_pool",
                format!(
                    "{} leaves no address for VMs once the lobby, network and broadcast addresses are excluded: use a larger pool",
                    self.cluster.public_pool
                ),
            ));
        }
        if self.cluster.max_vms_per_account == 0 {
            return Err(invalid(
                "cluster.max_vms_per_account",
                "0 would forbid every VM: use 1 or more",
            ));
        }
        let roles: BTreeSet<Role> = self.node.roles.iter().copied().collect();
        if roles.is_empty() {
            return Err(invalid(
                "node.roles",
                "a node needs at least one role: use some of \"control\", \"worker\", \"proxy\", \"dns\"",
            ));
        }
        if roles.len() != self.node.roles.len() {
            return Err(invalid(
                "node.roles",
                "a role is listed twice: list each once",
            ));
        }
        if self.node.heartbeat_secs == 0 {
            return Err(invalid("node.heartbeat_secs", "use 1 or more seconds"));
        }
        if self.node.missed_heartbeats < 2 {
            return Err(invalid(
                "node.missed_heartbeats",
                "use 2 or more: one late heartbeat must not make a node unreachable",
            ));
        }
        if !(10..=10_000).contains(&self.worker.disk_overcommit_percent) {
            return Err(invalid(
                "worker.disk_overcommit_percent",
                "use 100 for no overcommit, more to let VMs' sizes add up past the disk (10 to 10000)",
            ));
        }
        self.raft
            .validate()
            .map_err(|(field, m)| invalid(field, m))?;
        self.dns
            .validate()
            .map_err(|(field, m)| invalid(field, m))?;
        self.https
            .validate()
            .map_err(|(field, m)| invalid(field, m))?;
        self.ssh
            .validate()
            .map_err(|(field, m)| invalid(field, m))?;
        if !self.metrics.listen.is_empty() {
            self.metrics.listen.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "metrics.listen",
                    format!(
                        "{:?}: {e} (an address and port, like 127.0.0.1:9464)",
                        self.metrics.listen
                    ),
                )
            })?;
        }
        if self.identity.enabled() {
            self.identity
                .secret()
                .map_err(|(field, m)| invalid(field, m))?;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (field, list) in [
            ("dns.cpus", &self.dns.cpus),
            ("https.cpus", &self.https.cpus),
            ("ssh.cpus", &self.ssh.cpus),
        ] {
            if let Some(c) = list.iter().find(|c| **c >= cpus) {
                return Err(invalid(
                    field,
                    format!(
                        "CPU {c} does not exist: this host has CPUs 0 to {}",
                        cpus - 1
                    ),
                ));
            }
        }
        let listeners: [(&'static str, SocketAddr); 5] = [
            ("ssh.listen", self.ssh.listen),
            ("https.listen", self.https.listen),
            ("https.redirect_listen", self.https.redirect_listen),
            ("raft.listen", self.raft.listen),
            ("dns.listen", self.dns.listen),
        ];
        for (i, (name, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| {
                a.port() == addr.port()
                    && (a.ip() == addr.ip()
                        || a.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            }) {
                return Err(invalid(
                    name,
                    format!("{addr} collides with {other}: give each listener its own port"),
                ));
            }
        }
        let w = &self.worker;
        if w.bridge.is_empty()
            || w.bridge.len() > 15
            || !w
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "worker.bridge",
                format!(
                    "{:?} is not an interface name: use 1-15 letters, digits, - or _",
                    w.bridge
                ),
            ));
        }
        if !w.subnet.is_empty() {
            w.subnet_for(1)?;
        }
        if w.start_timeout_secs == 0 {
            return Err(invalid("worker.start_timeout_secs", "must be at least 1"));
        }
        if w.kernel_dir.as_os_str().is_empty() {
            return Err(invalid(
                "worker.kernel_dir",
                "must name a directory (default /var/cache/boxd/kernel, filled by ops/fetch-kernel)",
            ));
        }
        Ok(())
    }

    /// The admin socket path for `data_dir`.
    pub fn admin_socket(&self, data_dir: &Path) -> PathBuf {
        if self.admin.socket.is_empty() {
            data_dir.join("admin.sock")
        } else {
            PathBuf::from(&self.admin.socket)
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The default data directory: `/var/lib/boxd` as root, else `$XDG_DATA_HOME/boxd` (or
/// `~/.local/share/boxd`).
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return PathBuf::from("/var/lib/boxd");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("boxd");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/boxd")
}

/// The full default configuration with comments (`boxd config default`).
pub const DEFAULT_TOML: &str = include_str!("config/default.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            let name = format!("{prefix}{k}");
            match v {
                toml::Value::Table(inner) => keys(inner, &format!("{name}."), out),
                _ => out.push(name),
            }
        }
    }

    #[test]
    fn default_text_is_the_default_config_and_names_every_field() {
        let parsed = Config::parse(DEFAULT_TOML, Path::new("default")).unwrap();
        assert_eq!(parsed, Config::default());
        let mut documented = Vec::new();
        keys(
            &DEFAULT_TOML.parse::<toml::Table>().unwrap(),
            "",
            &mut documented,
        );
        let mut all = Vec::new();
        keys(
            &toml::Table::try_from(Config::default()).unwrap(),
            "",
            &mut all,
        );
        documented.sort();
        all.sort();
        assert_eq!(documented, all);
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(
            Config::parse("", Path::new("x")).unwrap(),
            Config::default()
        );
    }

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("boxd.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_field_and_the_fix() {
        let cases = [
            ("[cluster]\nzone = 5\n", "cluster.zone"),
            ("[cluster]\nzonee = \"x\"\n", "zonee"),
            ("[clusterr]\n", "clusterr"),
            ("[cluster]\nzone = \"Boxd Test\"\n", "cluster.zone"),
            ("[cluster]\nlobby = \"300.1.1.1\"\n", "cluster.lobby"),
            (
                "[cluster]\npublic_pool = \"127.77.0.1/32\"\n",
                "cluster.public_pool",
            ),
            ("[node]\nroles = []\n", "node.roles"),
            ("[node]\nroles = [\"web\"]\n", "node.roles"),
            ("[raft]\nelection_min_ms = 100\n", "raft.election_min_ms"),
            ("[raft]\nlisten = \"0.0.0.0:7000\"\n", "raft.advertise"),
            ("[ssh]\nlisten = \"0.0.0.0:7000\"\n", "raft.listen"),
            ("[raft]\nheartbeat_ms = -1\n", "raft.heartbeat_ms"),
            ("[dns]\ncpus = [999]\n", "dns.cpus"),
            ("[dns]\ncaa_issuers = [\"not a name\"]\n", "dns.caa_issuers"),
            ("[dns]\nlisten = \"0.0.0.0:7000\"\n", "dns.listen"),
            ("not toml", "boxd.toml"),
            // What each crate's section keeps out of the file stays out of it.
            ("[dns]\nrefresh = 5\n", "unknown field `refresh`"),
            ("[https]\nssh_port = 22\n", "unknown field `ssh_port`"),
            ("[ssh]\nagent_port = 1\n", "unknown field `agent_port`"),
        ];
        for (text, field) in cases {
            let e = err(text);
            assert!(e.contains(field), "{text:?} -> {e}");
        }
        assert!(err("[cluster]\nzone = 5\n").contains("line 2"));
    }

    #[test]
    fn advertise_defaults_to_listen() {
        let c = Config::default();
        assert_eq!(c.raft.advertise_addr(), "127.0.0.1:7000");
        assert_eq!(
            c.admin_socket(Path::new("/d")),
            PathBuf::from("/d/admin.sock")
        );
    }
}
