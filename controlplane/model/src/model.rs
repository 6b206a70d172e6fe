//! The state model: the nouns every replica agrees on (accounts, keys, tokens, VMs, nodes, the
//! public address pool, registrations) and the validation rules that belong to the values
//! themselves. This module does no I/O; storage lives in `store`, decisions in `apply` and
//! `scheduler`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A Raft node id. Ids are assigned by the log (`RegisterNode`) and never reused.
pub type NodeId = u64;

/// Milliseconds since the Unix epoch. Stamped by whoever proposes a command, never read from
/// the clock during apply, so that apply stays deterministic.
pub type Millis = u64;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh id (for proposers; apply never generates ids). Time-ordered (UUIDv7), so
            /// new rows land at the end of the id index instead of on a random page.
            pub fn random() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// Identity of a VM, chosen by the proposer of `CreateVm` so that a retried create is
    /// recognised as the same request.
    VmId
);
uuid_id!(
    /// Identity of an account (a user or a team); SSH keys and API tokens point at it.
    AccountId
);
uuid_id!(
    /// Identity of an API token (its secret is never stored, only a hash).
    TokenId
);

/// The port the guest agent listens on inside every VM.
pub const AGENT_PORT: u16 = 2200;

/// The seed of the cluster's agent key (Ed25519), derived from the cluster secret: every proxy
/// holds the same key, the only client guest agents accept, and workers give VMs its public
/// half, with no further secret in the log. The proxy side builds the key in
/// `dataplane::ssh::relay::agent_key`, the worker side its public half in
/// `boxd_worker::agent_key::cluster_public`.
pub fn agent_key_seed(cluster_secret: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"boxd agent key v1\0");
    h.update(cluster_secret.as_bytes());
    h.finalize().into()
}

/// An OpenSSH-style key fingerprint: `SHA256:` followed by 43 characters of unpadded base64.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of a raw public key blob (the SSH wire encoding of the key).
    pub fn of_key_blob(blob: &[u8]) -> Self {
        use base64::Engine as _;
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(blob);
        Self(format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        ))
    }

    /// The fingerprint as text, `SHA256:…`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let body = s
            .strip_prefix("SHA256:")
            .ok_or_else(|| ModelError::Fingerprint(s.clone()))?;
        let ok = body.len() == 43
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
        if ok {
            Ok(Self(s))
        } else {
            Err(ModelError::Fingerprint(s))
        }
    }
}

impl FromStr for Fingerprint {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A malformed value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Not an OpenSSH SHA256 fingerprint.
    #[error(
        "`{0}` is not a key fingerprint: expected `SHA256:` and 43 base64 characters, as `ssh-keygen -lf KEY` prints"
    )]
    Fingerprint(String),
    /// Not a role name.
    #[error("`{0}` is not a role: use control, worker, proxy or dns")]
    Role(String),
}

/// What a node does. Control nodes vote in Raft; every other role replicates as a learner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Raft voter, API, scheduler.
    Control,
    /// Runs VMs.
    Worker,
    /// SSH and HTTPS front door.
    Proxy,
    /// Authoritative DNS.
    Dns,
}

impl Role {
    /// Every role, in a stable order.
    pub const ALL: [Role; 4] = [Role::Control, Role::Worker, Role::Proxy, Role::Dns];

    /// The role's name as used in config and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Worker => "worker",
            Role::Proxy => "proxy",
            Role::Dns => "dns",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| ModelError::Role(s.to_owned()))
    }
}

/// A set of roles, kept sorted so it serialises the same way on every node.
pub type Roles = BTreeSet<Role>;

/// Formats roles as `control,worker`.
pub fn roles_to_string(roles: &Roles) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `control,worker` (order and spaces do not matter; empty parts are ignored).
pub fn parse_roles(s: &str) -> Result<Roles, ModelError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// Resources a node offers or a VM asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
}

impl Capacity {
    /// Whether `want` fits into `self`.
    pub fn fits(&self, want: &Capacity) -> bool {
        want.vcpus <= self.vcpus
            && want.memory_mib <= self.memory_mib
            && want.disk_gib <= self.disk_gib
    }

    /// `self - other`, clamped at zero.
    pub fn saturating_sub(&self, other: &Capacity) -> Capacity {
        Capacity {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }

    /// `self + other`, saturating.
    pub fn saturating_add(&self, other: &Capacity) -> Capacity {
        Capacity {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            disk_gib: self.disk_gib.saturating_add(other.disk_gib),
        }
    }
}

/// What a VM is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Virtual CPUs (1..=64).
    pub vcpus: u32,
    /// Memory in MiB (64..=262144).
    pub memory_mib: u64,
    /// Root disk size in GiB (1..=2048).
    pub disk_gib: u64,
    /// Image name, e.g. `minimal` or `debian`.
    pub image: String,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 4,
            image: "minimal".to_owned(),
        }
    }
}

impl VmSpec {
    /// The resources this spec takes from a worker.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
        }
    }

    /// Checks the bounds; the reason says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.vcpus) {
            return Err(format!("{} vCPUs is out of range: use 1 to 64", self.vcpus));
        }
        if !(64..=262_144).contains(&self.memory_mib) {
            return Err(format!(
                "{} MiB of memory is out of range: use 64 MiB to 256 GiB",
                self.memory_mib
            ));
        }
        if !(1..=2048).contains(&self.disk_gib) {
            return Err(format!(
                "{} GiB of disk is out of range: use 1 to 2048 GiB",
                self.disk_gib
            ));
        }
        if !is_dns_label(&self.image) {
            return Err(format!(
                "image `{}` is not a valid image name: use lowercase letters, digits and '-'",
                self.image
            ));
        }
        Ok(())
    }
}

/// What the owner wants a VM to be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Running.
    Running,
    /// Stopped, disk kept.
    Stopped,
}

/// What the worker last reported about a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    /// Not yet placed on a worker.
    Pending,
    /// Placed; the worker has not reported yet.
    Placed,
    /// Being created or started.
    Starting,
    /// Its process runs but the guest is not reachable yet; `Vm::reason` says why when the
    /// worker knows it cannot finish (a kernel under emulated KVM).
    Booting,
    /// Running.
    Running,
    /// Stopped.
    Stopped,
    /// The worker could not run it; `Vm::reason` says why.
    Failed,
    /// Its worker has not been heard from for longer than the cluster's liveness bound: it may
    /// run or not. Never stored: the operations show it in place of the last report.
    Unknown,
}

macro_rules! text_enum {
    ($ty:ty { $($variant:ident = $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The value as stored and displayed.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($text => Ok(Self::$variant),)+ _ => Err(s.to_owned()) }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(Desired { Running = "running", Stopped = "stopped" });
text_enum!(Observed {
    Pending = "pending",
    Placed = "placed",
    Starting = "starting",
    Booting = "booting",
    Running = "running",
    Stopped = "stopped",
    Failed = "failed",
    Unknown = "unknown",
});

/// An image a node holds, by content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAd {
    /// Name (a DNS label).
    pub name: String,
    /// SHA-256 (hex) of the image's canonical tar archive.
    pub digest: String,
    /// Size of that archive in bytes.
    pub bytes: u64,
    /// When it was built (ms since the epoch; names the pinned copies VMs use).
    pub built_at: u64,
}

/// A VM as the replica knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// Identity.
    pub id: VmId,
    /// DNS label, unique in the zone.
    pub name: String,
    /// Owning account.
    pub owner: AccountId,
    /// Resources and image.
    pub spec: VmSpec,
    /// Owner's intent.
    pub desired: Desired,
    /// Worker's report.
    pub observed: Observed,
    /// Why it is in that state, when the worker said (failed, booting); cleared by the next
    /// report without one.
    pub reason: Option<String>,
    /// Worker it is placed on.
    pub worker: Option<NodeId>,
    /// Address on the private fabric (set when the worker has wired it).
    pub private_ip: Option<Ipv4Addr>,
    /// Public address from the pool, unique among the owner's VMs.
    pub public_ip: Ipv4Addr,
    /// Port inside the VM that HTTPS requests are forwarded to.
    pub http_port: u16,
    /// Creation time.
    pub created_at: Millis,
    /// Last change.
    pub updated_at: Millis,
    /// The public host key of its guest agent (OpenSSH form), once its worker recorded it;
    /// none for VMs made before per-VM keys.
    pub agent_key: Option<String>,
}

/// A cluster member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Raft id.
    pub id: NodeId,
    /// Stable identity generated by the node itself (makes joining idempotent).
    pub uuid: Uuid,
    /// Human name (hostname by default).
    pub name: String,
    /// What it runs.
    pub roles: Roles,
    /// Raft/gRPC address.
    pub raft_addr: String,
    /// What it offers to VMs (workers).
    pub capacity: Capacity,
    /// What the VMs placed on it take.
    pub used: Capacity,
    /// Last heartbeat written through the log.
    pub last_heartbeat: Millis,
    /// When it joined.
    pub joined_at: Millis,
}

/// An account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Identity.
    pub id: AccountId,
    /// Unique display name.
    pub name: String,
    /// Largest number of VMs it may own.
    pub max_vms: u32,
    /// VMs it owns now.
    pub vm_count: u32,
    /// Creation time.
    pub created_at: Millis,
    /// The cluster's owner (the first key's account): approves registrations when no identity
    /// provider is configured.
    #[serde(default)]
    pub owner: bool,
}

/// An SSH public key bound to an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshKey {
    /// `SHA256:` fingerprint; the identity.
    pub fingerprint: Fingerprint,
    /// Owning account.
    pub account: AccountId,
    /// The key in OpenSSH `authorized_keys` form.
    pub public_key: String,
    /// When it was added.
    pub added_at: Millis,
}

/// An API token (only its SHA-256 hash is stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Identity (also the JWT `jti`).
    pub id: TokenId,
    /// Owning account.
    pub account: AccountId,
    /// Label chosen by the owner.
    pub name: String,
    /// Hex SHA-256 of the token as issued (the token itself is never stored).
    pub hash: String,
    /// Creation time.
    pub created_at: Millis,
    /// Expiry.
    pub expires_at: Millis,
    /// VMs it is limited to; empty: all.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Reads only.
    #[serde(default)]
    pub read_only: bool,
}

/// An unknown key waiting to be linked to an account through the web login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The code in the registration URL.
    pub code: String,
    /// The waiting key.
    pub fingerprint: Fingerprint,
    /// The key in OpenSSH form.
    pub public_key: String,
    /// Creation time.
    pub created_at: Millis,
    /// Expiry.
    pub expires_at: Millis,
}

/// The cluster's local CA and the zone certificate it signed (PEM), used when the operator
/// gives no certificate. Every proxy serves the same one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMaterial {
    /// The CA certificate (what `curl --cacert` needs).
    pub ca_cert: String,
    /// The zone certificate followed by the CA certificate.
    pub chain: String,
    /// The zone certificate's private key.
    pub key: String,
}

/// Cluster-wide settings fixed at `init` and replicated to every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Cluster identity.
    pub cluster_id: Uuid,
    /// DNS zone, e.g. `boxd.test`.
    pub zone: String,
    /// Lobby address (`ssh <zone>` lands here).
    pub lobby: Ipv4Addr,
    /// Public addresses handed to VMs.
    pub public_pool: Ipv4Net,
    /// Default VM quota for new accounts.
    pub max_vms_per_account: u32,
    /// When the cluster was created.
    pub created_at: Millis,
}

impl ClusterSettings {
    /// Whether `ip` may be handed to a VM: inside the pool, not the lobby, and not the network
    /// or broadcast address of a pool that has them.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        let pool = self.public_pool;
        if !pool.contains(&ip) || ip == self.lobby {
            return false;
        }
        if pool.prefix_len() < 31 && (ip == pool.network() || ip == pool.broadcast()) {
            return false;
        }
        true
    }

    /// How many addresses of the pool can be handed out.
    pub fn assignable_count(&self) -> u64 {
        let pool = self.public_pool;
        let total = 1u64 << (32 - u32::from(pool.prefix_len()));
        let edges = if pool.prefix_len() < 31 { 2 } else { 0 };
        let lobby = u64::from(pool.contains(&self.lobby));
        total.saturating_sub(edges + lobby)
    }
}

/// Whether `s` is a DNS label boxd accepts as a VM or image name: 1 to 63 of `[a-z0-9-]`,
/// not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Names the zone uses itself.
pub const RESERVED_VM_NAMES: [&str; 2] = ["ns1", "api"];

/// Why a VM name is refused, or `None` when it is fine.
pub fn vm_name_problem(name: &str) -> Option<&'static str> {
    if RESERVED_VM_NAMES.contains(&name) {
        Some("the name is reserved for the zone's own services (ns1, api): pick another")
    } else if name.is_empty() {
        Some("a name cannot be empty")
    } else if name.len() > 63 {
        Some("a name has at most 63 characters")
    } else if !is_dns_label(name) {
        Some("use lowercase letters, digits and '-', not at the start or end")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_accepts_openssh_form_and_rejects_others() {
        let fp = Fingerprint::of_key_blob(b"key");
        assert!(fp.as_str().starts_with("SHA256:"));
        assert_eq!(fp.as_str().parse::<Fingerprint>().unwrap(), fp);
        for bad in [
            "",
            "SHA256:",
            "MD5:aa",
            "SHA256:short",
            &format!("{}=", fp.as_str()),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_parse_in_any_order() {
        let r = parse_roles("worker, control,,dns").unwrap();
        assert_eq!(roles_to_string(&r), "control,worker,dns");
        assert!(parse_roles("control,web").is_err());
    }

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["a", "myapp", "my-app-2", &"a".repeat(63)] {
            assert_eq!(vm_name_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "MyApp",
            "a.b",
            "a_b",
            "ns1",
            &"a".repeat(64),
        ] {
            assert!(vm_name_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn pool_excludes_lobby_network_and_broadcast() {
        let s = ClusterSettings {
            cluster_id: Uuid::nil(),
            zone: "boxd.test".into(),
            lobby: "127.77.0.1".parse().unwrap(),
            public_pool: "127.77.0.0/16".parse().unwrap(),
            max_vms_per_account: 10,
            created_at: 0,
        };
        assert!(!s.is_assignable("127.77.0.0".parse().unwrap()));
        assert!(!s.is_assignable("127.77.0.1".parse().unwrap()));
        assert!(s.is_assignable("127.77.0.2".parse().unwrap()));
        assert!(!s.is_assignable("127.77.255.255".parse().unwrap()));
        assert!(!s.is_assignable("127.78.0.2".parse().unwrap()));
        assert_eq!(s.assignable_count(), 65536 - 3);
    }

    #[test]
    fn spec_bounds() {
        assert!(VmSpec::default().validate().is_ok());
        let s = VmSpec {
            vcpus: 0,
            ..VmSpec::default()
        };
        assert!(s.validate().unwrap_err().contains("vCPUs"));
        let s = VmSpec {
            image: "Bad Image".into(),
            ..VmSpec::default()
        };
        assert!(s.validate().unwrap_err().contains("image"));
    }
}
