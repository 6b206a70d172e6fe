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
///
/// The default form comes from serde's derive with `remote = "Self"`, which also leaves the
/// inherent functions `Command::serialize` and `Command::deserialize` behind: they always use
/// the default form. Go through the traits (`serde_json::from_str::<Command>`, …) for the
/// form that fits the format.
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
    /// A worker records the public half of the host key it gave a VM's guest agent: from then
    /// on the proxy accepts that agent only with that key.
    SetAgentKey {
        /// VM.
        vm: VmId,
        /// Reporting worker (must be the one it is placed on).
        worker: NodeId,
        /// The key in OpenSSH form (`ssh-ed25519 AAAA…`).
        key: String,
    },
    /// A worker records something that happened to a VM (started, restarted after its process
    /// ended and why, stopped); the VM keeps its last `MAX_EVENTS` (50, `boxd_controlplane::store::apply`).
    RecordVmEvent {
        /// VM.
        vm: VmId,
        /// Reporting worker (must be the one it is placed on).
        worker: NodeId,
        /// What happened, one line.
        text: String,
        /// When.
        at: Millis,
    },
    /// The owner (or an operator) approves a parked key: it joins `account`, created first
    /// with `new_account` as its name when that is given. Refused, with nothing changed, when
    /// the code is unknown, used or expired, the name is taken, or the key is registered.
    ApproveRegistration {
        /// Code in the URL.
        code: String,
        /// Account the key joins (the new account's id when `new_account` is given).
        account: AccountId,
        /// Name of the account to create, or `None` to join an existing one.
        new_account: Option<String>,
        /// Proposal time; an expired code is refused.
        at: Millis,
    },
    /// Adds a key that signs API tokens: the newest signs, every kept one verifies. With
    /// `if_none`, only when the cluster has none yet (proxies racing at startup agree on one).
    /// Keys superseded longer ago than a token may live are dropped.
    AddTokenKey {
        /// Key id (the JWT `kid`).
        kid: String,
        /// Hex PKCS#8 v2 DER of the Ed25519 key.
        pkcs8: String,
        /// Proposal time.
        at: Millis,
        /// Only when there is no key yet.
        if_none: bool,
    },
    /// Records an API token (its id is the JWT `jti`; the JWT itself is never stored).
    CreateToken {
        /// New id.
        id: TokenId,
        /// Owner.
        account: AccountId,
        /// Label (may be empty).
        label: String,
        /// Hex SHA-256 of the JWT.
        hash: String,
        /// VMs it is limited to; empty: all.
        vms: Vec<String>,
        /// Reads only.
        read_only: bool,
        /// Proposal time.
        at: Millis,
        /// Expiry.
        expires_at: Millis,
    },
    /// A person signed in with the cluster's OpenID provider for a parked key: the key joins
    /// the account their identity (`issuer` + `subject`) is linked to, or, on their first
    /// sign-in, a new account `account` named `name` (`name-<code's first 6>` when `name` is
    /// taken) that the identity is linked to from then on. Refused, with nothing changed, like
    /// `ApproveRegistration`.
    LinkIdentity {
        /// Code in the URL.
        code: String,
        /// The ID token's `iss`.
        issuer: String,
        /// Its `sub`: the person at that issuer.
        subject: String,
        /// Its `email`, when it has one (shown, never used to match).
        email: Option<String>,
        /// Id for the account to create on a first sign-in.
        account: AccountId,
        /// Name for that account.
        name: String,
        /// Proposal time; an expired code is refused.
        at: Millis,
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
        if !d.is_human_readable() {
            return Command::deserialize(d);
        }
        d.deserialize_map(tagged::CommandVisitor)
    }
}

/// Reading the `type`-tagged JSON form as it streams by: the fields before `type` are kept as
/// JSON values, then the variant it names reads them and the rest of the object directly.
/// serde's own internally tagged enums buffer the whole object first, and so would reading it
/// into a JSON map: 1.5 µs a create that way against 0.6 µs here when `type` comes first (as
/// boxd writes it), 2.3 against 2.0 µs when it comes last.
mod tagged {
    use serde::de::{self, Error as _, IntoDeserializer as _, MapAccess, Visitor};

    use super::{Command, TAG};

    pub(super) struct CommandVisitor;

    impl<'de> Visitor<'de> for CommandVisitor {
        type Value = Command;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a command: an object whose `{TAG}` names it")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Command, A::Error> {
            let mut before = Vec::new();
            loop {
                match map.next_key::<Key>()? {
                    Some(Key::Tag) => break,
                    Some(Key::Other(name)) => {
                        before.push((name, map.next_value::<serde_json::Value>()?));
                    }
                    None => return Err(A::Error::missing_field(TAG)),
                }
            }
            let Kind(kind) = map.next_value()?;
            Command::deserialize(Variant {
                kind,
                fields: Fields {
                    before: before.into_iter(),
                    pending: None,
                    rest: map,
                },
            })
        }
    }

    /// A key: the tag, or any other (kept, to hand to the variant).
    enum Key {
        Tag,
        Other(String),
    }

    impl<'de> de::Deserialize<'de> for Key {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct KeyVisitor;
            impl Visitor<'_> for KeyVisitor {
                type Value = Key;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a field name")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                    Ok(if v == TAG {
                        Key::Tag
                    } else {
                        Key::Other(v.to_owned())
                    })
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Key, E> {
                    Ok(if v == TAG { Key::Tag } else { Key::Other(v) })
                }
            }
            d.deserialize_str(KeyVisitor)
        }
    }

    /// The tag's value: the command's name.
    struct Kind(String);

    impl<'de> de::Deserialize<'de> for Kind {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct KindVisitor;
            impl Visitor<'_> for KindVisitor {
                type Value = Kind;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    write!(f, "the command's name as a string in `{TAG}`")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
                    Ok(Kind(v.to_owned()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Kind, E> {
                    Ok(Kind(v))
                }
            }
            d.deserialize_str(KindVisitor)
        }
    }

    /// The rest of the object as serde's default enum form: `kind` names the variant, whose
    /// fields are `fields`.
    struct Variant<A> {
        kind: String,
        fields: Fields<A>,
    }

    impl<'de, A: MapAccess<'de>> de::Deserializer<'de> for Variant<A> {
        type Error = A::Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
            visitor.visit_enum(self)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct
            enum identifier ignored_any
        }
    }

    impl<'de, A: MapAccess<'de>> de::EnumAccess<'de> for Variant<A> {
        type Error = A::Error;
        type Variant = Fields<A>;

        fn variant_seed<V: de::DeserializeSeed<'de>>(
            self,
            seed: V,
        ) -> Result<(V::Value, Fields<A>), A::Error> {
            let name = seed.deserialize(self.kind.into_deserializer())?;
            Ok((name, self.fields))
        }
    }

    /// The fields seen before the tag, then the ones after it, as one map.
    struct Fields<A> {
        before: std::vec::IntoIter<(String, serde_json::Value)>,
        pending: Option<serde_json::Value>,
        rest: A,
    }

    impl<'de, A: MapAccess<'de>> de::VariantAccess<'de> for Fields<A> {
        type Error = A::Error;

        fn unit_variant(self) -> Result<(), A::Error> {
            Err(A::Error::custom("every command has fields"))
        }

        fn newtype_variant_seed<T: de::DeserializeSeed<'de>>(
            self,
            _seed: T,
        ) -> Result<T::Value, A::Error> {
            Err(A::Error::custom("every command has named fields"))
        }

        fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _v: V) -> Result<V::Value, A::Error> {
            Err(A::Error::custom("every command has named fields"))
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            _fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            visitor.visit_map(self)
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Fields<A> {
        type Error = A::Error;

        fn next_key_seed<K: de::DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            match self.before.next() {
                Some((name, value)) => {
                    self.pending = Some(value);
                    seed.deserialize(name.into_deserializer()).map(Some)
                }
                None => self.rest.next_key_seed(seed),
            }
        }

        fn next_value_seed<V: de::DeserializeSeed<'de>>(
            &mut self,
            seed: V,
        ) -> Result<V::Value, A::Error> {
            match self.pending.take() {
                Some(value) => seed.deserialize(value).map_err(A::Error::custom),
                None => self.rest.next_value_seed(seed),
            }
        }
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
            Command::SetAgentKey { .. } => "set_agent_key",
            Command::RecordVmEvent { .. } => "record_vm_event",
            Command::PublishImages { .. } => "publish_images",
            Command::ApproveRegistration { .. } => "approve_registration",
            Command::AddTokenKey { .. } => "add_token_key",
            Command::CreateToken { .. } => "create_token",
            Command::LinkIdentity { .. } => "link_identity",
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

/// Longest reason a worker may give for a VM's state (longer ones are refused; workers cut
/// theirs to fit).
pub const MAX_REASON: usize = 1024;

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
    /// The account has as many live tokens as it may.
    #[error("this account has {limit} live tokens, the most it may: remove some with `token rm`")]
    TokenLimit {
        /// The limit.
        limit: u32,
    },
}
