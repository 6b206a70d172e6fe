//! Log entries: the typed commands every replica applies in the same order, what applying one
//! yields, and the typed reasons a command is refused.
//!
//! Commands carry everything apply needs (ids, timestamps, secrets), so apply never reads a clock
//! or a random source. Commands that create something carry the id of the thing they create, so
//! a client that retries after losing a reply gets the original outcome instead of a duplicate.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{
    AccountId, Capacity, Desired, Fingerprint, ImageAd, Millis, NodeId, Observed, Roles,
    TlsMaterial, TokenId, VmId, VmSpec,
};

/// One entry of the replicated log.
///
/// Two forms. In JSON (and any human-readable format) a command is an object whose `type`
/// names the variant: `{"type":"create_vm","id":…}` — what the admin socket, the gRPC API and
/// logs written before the binary form take and give. In binary formats (the Raft stream and
/// the log, through `raft::codec`) it is serde's default enum form, which postcard can read
/// back without buffering: the `type`-tagged form can only be read by buffering the whole
/// object first, and reading it back was most of a follower's Raft message decoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "snake_case")]
pub enum Command {
    /// Fixes the cluster settings. Applied once; a repeat with the same cluster id is a no-op.
    InitCluster {
        /// Cluster identity.
        cluster_id: Uuid,
        /// Hex secret that signs join tokens and internal RPCs.
        secret: String,
        /// DNS zone.
        zone: String,
        /// Lobby address.
        lobby: Ipv4Addr,
        /// Public address pool.
        public_pool: Ipv4Net,
        /// Default quota.
        max_vms_per_account: u32,
        /// Proposal time.
        at: Millis,
    },
    /// Adds a node, or returns the id it already has (keyed by `uuid`).
    RegisterNode {
        /// The id to use, for the node that initialises the cluster; others get the next free.
        id: Option<NodeId>,
        /// The node's self-chosen stable identity.
        uuid: Uuid,
        /// Display name.
        name: String,
        /// Roles it runs.
        roles: Roles,
        /// Raft/gRPC address.
        raft_addr: String,
        /// Resources offered to VMs.
        capacity: Capacity,
        /// Proposal time.
        at: Millis,
    },
    /// A node is alive and offers `capacity`.
    Heartbeat {
        /// The node.
        node: NodeId,
        /// Current offer (may change when an operator resizes a worker).
        capacity: Capacity,
        /// Proposal time.
        at: Millis,
    },
    /// Creates an account.
    CreateAccount {
        /// New id.
        id: AccountId,
        /// Unique name.
        name: String,
        /// Quota; the cluster default when absent.
        max_vms: Option<u32>,
        /// Proposal time.
        at: Millis,
    },
    /// Binds an SSH key to an account.
    AddSshKey {
        /// Account.
        account: AccountId,
        /// Fingerprint of `public_key`.
        fingerprint: Fingerprint,
        /// OpenSSH form.
        public_key: String,
        /// Proposal time.
        at: Millis,
    },
    /// Unbinds a key; an account keeps at least one key.
    RemoveSshKey {
        /// Account that asks.
        account: AccountId,
        /// Key to remove.
        fingerprint: Fingerprint,
    },
    /// Records an API token's hash.
    CreateApiToken {
        /// New id.
        id: TokenId,
        /// Owner.
        account: AccountId,
        /// Label.
        name: String,
        /// Hex SHA-256 of the secret.
        hash: String,
        /// Proposal time.
        at: Millis,
        /// Expiry.
        expires_at: Millis,
    },
    /// Revokes a token.
    RevokeApiToken {
        /// Account that asks.
        account: AccountId,
        /// Token.
        id: TokenId,
    },
    /// Parks an unknown key until its owner logs in through the web.
    CreateRegistration {
        /// Code in the URL.
        code: String,
        /// The key's fingerprint.
        fingerprint: Fingerprint,
        /// The key.
        public_key: String,
        /// Proposal time.
        at: Millis,
        /// Expiry.
        expires_at: Millis,
    },
    /// Links a parked key to an account and deletes the registration.
    CompleteRegistration {
        /// Code in the URL.
        code: String,
        /// Account the key joins.
        account: AccountId,
        /// Proposal time; an expired code is refused.
        at: Millis,
    },
    /// On a cluster without accounts, creates the owner account with its first key; refused
    /// once any account exists (the first key ever seen on a fresh cluster owns it).
    ClaimOwner {
        /// New id.
        id: AccountId,
        /// Account name.
        name: String,
        /// Fingerprint of `public_key`.
        fingerprint: Fingerprint,
        /// OpenSSH form.
        public_key: String,
        /// Proposal time.
        at: Millis,
    },
    /// Stores the SSH host key every proxy presents (OpenSSH private key PEM). The first one
    /// written stays; later ones are ignored, so proxies that race at startup agree.
    SetSshHostKey {
        /// OpenSSH-format private key.
        private_key: String,
    },
    /// Stores the cluster's local CA and zone certificate. Like the host key, the first one
    /// written stays.
    SetTlsLocalCa {
        /// The material (PEM).
        material: TlsMaterial,
    },
    /// Creates a VM with the lowest pool address not yet used by its owner.
    CreateVm {
        /// New id.
        id: VmId,
        /// Owner.
        owner: AccountId,
        /// DNS label.
        name: String,
        /// Resources.
        spec: VmSpec,
        /// HTTP port inside the VM.
        http_port: u16,
        /// Proposal time.
        at: Millis,
    },
    /// The scheduler's decision.
    PlaceVm {
        /// VM.
        vm: VmId,
        /// Worker chosen.
        worker: NodeId,
        /// Proposal time.
        at: Millis,
    },
    /// The owner starts or stops a VM.
    SetVmDesired {
        /// Account that asks.
        by: AccountId,
        /// VM.
        vm: VmId,
        /// New intent.
        desired: Desired,
        /// Proposal time.
        at: Millis,
    },
    /// A worker reports what a VM is doing.
    ReportVm {
        /// VM.
        vm: VmId,
        /// Reporting worker (must be the one it is placed on).
        worker: NodeId,
        /// State.
        observed: Observed,
        /// Private address, once wired.
        private_ip: Option<Ipv4Addr>,
        /// Why, for states that need one (failed, booting). Absent in logs written before
        /// it existed.
        #[serde(default)]
        reason: Option<String>,
        /// Proposal time.
        at: Millis,
    },
    /// Deletes a VM: its name and address are free at once; the worker then removes its disk
    /// and acknowledges with `PurgeVm`.
    DeleteVm {
        /// Account that asks.
        by: AccountId,
        /// VM.
        vm: VmId,
        /// Proposal time.
        at: Millis,
    },
    /// A worker finished removing a deleted VM.
    PurgeVm {
        /// VM.
        vm: VmId,
    },
    /// A node says which images it holds (replacing what it said before), so a worker that
    /// lacks one can fetch it from a peer.
    PublishImages {
        /// Node.
        node: NodeId,
        /// Its images.
        images: Vec<ImageAd>,
    },
    /// Publishes TXT records at `name` in the zone (e.g. `_acme-challenge.myapp`), replacing
    /// any there; no values removes them.
    SetTxt {
        /// Owner name relative to the zone apex; empty for the apex itself.
        name: String,
        /// One TXT record per value (each at most 255 bytes).
        values: Vec<String>,
    },
}

/// The name of the field that holds a command's variant in its JSON form.
const TAG: &str = "type";

/// A command in serde's default enum form, `{"create_vm":{…}}`, whatever the format.
struct Untagged<'a>(&'a Command);

impl Serialize for Untagged<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Command::serialize(self.0, s)
    }
}

impl Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeMap as _};
        if !s.is_human_readable() {
            return Command::serialize(self, s);
        }
        // JSON is off the hot path (Raft and the log are binary): build the default form as
        // a value and move the variant's name into `type`, first.
        let value = serde_json::to_value(Untagged(self)).map_err(S::Error::custom)?;
        let serde_json::Value::Object(outer) = value else {
            return Err(S::Error::custom("a command serializes as an object"));
        };
        let Some((kind, serde_json::Value::Object(fields))) = outer.into_iter().next() else {
            return Err(S::Error::custom("a command serializes as one named object"));
        };
        let mut map = s.serialize_map(Some(fields.len() + 1))?;
        map.serialize_entry(TAG, &kind)?;
        for (k, v) in &fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        if !d.is_human_readable() {
            return Command::deserialize(d);
        }
        let mut fields = serde_json::Map::deserialize(d)?;
        let kind = match fields.remove(TAG) {
            Some(serde_json::Value::String(kind)) => kind,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "`{TAG}` must be a string naming the command, not {other}"
                )));
            }
            None => return Err(D::Error::missing_field(TAG)),
        };
        let untagged = serde_json::Value::Object(serde_json::Map::from_iter([(
            kind,
            serde_json::Value::Object(fields),
        )]));
        Command::deserialize(untagged).map_err(D::Error::custom)
    }
}

impl Command {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::InitCluster { .. } => "init_cluster",
            Command::RegisterNode { .. } => "register_node",
            Command::Heartbeat { .. } => "heartbeat",
            Command::CreateAccount { .. } => "create_account",
            Command::AddSshKey { .. } => "add_ssh_key",
            Command::RemoveSshKey { .. } => "remove_ssh_key",
            Command::CreateApiToken { .. } => "create_api_token",
            Command::RevokeApiToken { .. } => "revoke_api_token",
            Command::CreateRegistration { .. } => "create_registration",
            Command::CompleteRegistration { .. } => "complete_registration",
            Command::ClaimOwner { .. } => "claim_owner",
            Command::SetSshHostKey { .. } => "set_ssh_host_key",
            Command::SetTlsLocalCa { .. } => "set_tls_local_ca",
            Command::CreateVm { .. } => "create_vm",
            Command::PlaceVm { .. } => "place_vm",
            Command::SetVmDesired { .. } => "set_vm_desired",
            Command::ReportVm { .. } => "report_vm",
            Command::DeleteVm { .. } => "delete_vm",
            Command::PurgeVm { .. } => "purge_vm",
            Command::SetTxt { .. } => "set_txt",
            Command::PublishImages { .. } => "publish_images",
        }
    }
}

/// One log entry: the commands that reached the leader while the previous entry was being
/// made durable. openraft 0.9 flushes each entry before it takes the next client write, so
/// proposing one command per entry would cost one fsync per command; batching them costs one
/// fsync per batch. Every command is applied on its own (a refusal touches only itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Batch(pub Vec<Command>);

/// The answers to a `Batch`, one per command, in order.
pub type BatchResponse = Vec<Response>;

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Applied; nothing to report.
    Done,
    /// A node's id (new or existing).
    NodeRegistered {
        /// Its id.
        id: NodeId,
    },
    /// A VM exists with this address.
    VmCreated {
        /// Its id.
        id: VmId,
        /// Its public address.
        public_ip: Ipv4Addr,
    },
}

/// The log's answer to a command: applied, or refused with state unchanged.
pub type Response = Result<Outcome, ApplyError>;

/// Why a command was refused. State is unchanged when one of these is returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum ApplyError {
    /// The cluster has not been initialised yet.
    #[error("the cluster is not initialised yet: run `boxd init` (or `boxd up`) first")]
    NotInitialized,
    /// `InitCluster` with a different cluster id.
    #[error("this replica already belongs to cluster {existing}")]
    AlreadyInitialized {
        /// The cluster it belongs to.
        existing: Uuid,
    },
    /// A value failed validation.
    #[error("{what} is invalid: {reason}")]
    Invalid {
        /// What was invalid (e.g. `name "My App"`).
        what: String,
        /// How to fix it.
        reason: String,
    },
    /// The VM name is used in the zone.
    #[error("the name {name} is taken: pick another")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The account name is used.
    #[error("the account name {name} is taken")]
    AccountNameTaken {
        /// The name.
        name: String,
    },
    /// The account has as many VMs as its quota allows.
    #[error("quota reached: this account may own {limit} VMs; remove one first")]
    QuotaExceeded {
        /// The quota.
        limit: u32,
    },
    /// Every pool address is already used by this owner.
    #[error("no public address left in {pool} for this account")]
    PoolExhausted {
        /// The pool.
        pool: Ipv4Net,
    },
    /// Something the command names does not exist.
    #[error("no such {what}: {id}")]
    NotFound {
        /// Kind of thing.
        what: String,
        /// Its id or name.
        id: String,
    },
    /// The VM, key or token belongs to another account.
    #[error("no such {what}: {id}")]
    NotYours {
        /// Kind of thing (the message is the same as for a missing one, on purpose).
        what: String,
        /// Its id.
        id: String,
    },
    /// The key is bound to an account already.
    #[error("key {fingerprint} already belongs to an account")]
    KeyTaken {
        /// The key.
        fingerprint: Fingerprint,
    },
    /// `ClaimOwner` on a cluster that has accounts.
    #[error("this cluster already has an owner")]
    OwnerClaimed,
    /// An account's last key cannot be removed.
    #[error("cannot remove the last key of an account: add another key first")]
    LastKey,
    /// A registration code has expired.
    #[error("registration {code} has expired: connect with ssh again to get a new link")]
    Expired {
        /// The code.
        code: String,
    },
    /// The node cannot take the VM.
    #[error("node {node} cannot take this VM: {reason}")]
    CannotPlace {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// A retried create whose id exists with different content.
    #[error("id {id} is already used by a different {what}")]
    IdConflict {
        /// Kind of thing.
        what: String,
        /// The id.
        id: String,
    },
}
