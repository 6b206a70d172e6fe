//! The View: an immutable snapshot of what the data plane needs to route a connection, published
//! lock-free after every applied batch.
//!
//! Readers (SSH, HTTPS and DNS shards) call [`ViewHandle::current`] and never lock. The state
//! machine is the only writer: after each applied batch it patches a clone of the current View
//! with the entries that batch touched and stores it. The maps are persistent (`imbl`), so the
//! clone is O(1) and a patch costs O(changed entries · log n), not O(all VMs); see
//! `benches/benches/view.rs`.
//!
//! SSH routing is keyed by (client key fingerprint, local address of the connection). It is
//! stored as two maps, fingerprint → account and (account, address) → VM, so adding a key to an
//! account with many VMs is one insert rather than one per VM. The lookup is the same.

use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use imbl::GenericHashMap;
use imbl::shared_ptr::DefaultSharedPtr;
use tokio::sync::watch;

use crate::model::{
    AccountId, ClusterSettings, Desired, Fingerprint, NodeId, Observed, TokenId, Vm, VmId,
};
use crate::tokens::PublicKey;

/// What the data plane knows about one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRoute {
    /// Identity.
    pub id: VmId,
    /// DNS label.
    pub name: String,
    /// Owner.
    pub owner: AccountId,
    /// Public address (DNS answer, SSH routing key).
    pub public_ip: Ipv4Addr,
    /// Private address the proxy connects to, once the worker has wired the VM.
    pub private_ip: Option<Ipv4Addr>,
    /// HTTP port inside the VM.
    pub http_port: u16,
    /// Owner's intent.
    pub desired: Desired,
    /// Worker's report.
    pub observed: Observed,
    /// Why it is in that state, when the worker said.
    pub reason: Option<String>,
    /// Worker it runs on.
    pub worker: Option<NodeId>,
    /// Its guest agent's public host key (OpenSSH form), once recorded.
    pub agent_key: Option<String>,
}

impl From<&Vm> for VmRoute {
    fn from(v: &Vm) -> Self {
        Self {
            id: v.id,
            name: v.name.clone(),
            owner: v.owner,
            public_ip: v.public_ip,
            private_ip: v.private_ip,
            http_port: v.http_port,
            desired: v.desired,
            observed: v.observed,
            reason: v.reason.clone(),
            agent_key: v.agent_key.clone(),
            worker: v.worker,
        }
    }
}

/// One change to apply to a View.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewChange {
    /// Cluster settings (zone, lobby, pool) were set.
    Settings(ClusterSettings),
    /// A VM was created or changed (shared: both copies of the View hold the same route).
    VmUpsert(Arc<VmRoute>),
    /// A VM was deleted.
    VmRemove(VmId),
    /// A key now belongs to an account.
    KeyUpsert(Fingerprint, AccountId),
    /// A key was removed.
    KeyRemove(Fingerprint),
    /// TXT records now at a name (relative to the zone).
    TxtUpsert(String, Arc<[String]>),
    /// TXT records at a name were removed.
    TxtRemove(String),
    /// An API token exists (for an account).
    TokenUpsert(TokenId, AccountId),
    /// An API token was revoked or expired.
    TokenRemove(TokenId),
    /// The keys that verify API tokens, all of them.
    TokenKeys(Vec<PublicKey>),
}

/// The View's maps: persistent, hashed with foldhash (seeded per map, like the standard
/// library's `RandomState`). Every DNS query and TLS handshake does a lookup, and SipHash was
/// a third of a name lookup's cost.
type HashMap<K, V> = GenericHashMap<K, V, foldhash::fast::RandomState, DefaultSharedPtr>;

/// An immutable routing snapshot. Cheap to clone.
#[derive(Clone, Debug, Default)]
#[cfg_attr(test, derive(PartialEq))]
pub struct View {
    applied: u64,
    settings: Option<Arc<ClusterSettings>>,
    keys: HashMap<Fingerprint, AccountId>,
    by_id: HashMap<VmId, Arc<VmRoute>>,
    by_owner_ip: HashMap<(AccountId, Ipv4Addr), VmId>,
    by_name: HashMap<Label, NameEntry>,
    /// Public addresses some VM has, with how many VMs have each (addresses are unique per
    /// owner, shared between owners): the front door serves these and the lobby, nothing else
    /// of the pool.
    addresses: HashMap<Ipv4Addr, u32>,
    txt: HashMap<String, Arc<[String]>>,
    /// Live API tokens: revoking one removes it, and every proxy then refuses it.
    tokens: HashMap<TokenId, AccountId>,
    /// The keys that verify API tokens, by key id.
    token_keys: Arc<[PublicKey]>,
}

/// A VM name as a map key, stored inline (DNS labels have at most 63 bytes). A patch copies the
/// map nodes on its path; with keys and values that are plain bytes that is a `memcpy`, where
/// `String` keys were an allocation each and `Arc` values a reference count on a cold cache
/// line each (the View's updates were a fifth of a three-node cluster's CPU under load).
type Label = arrayvec::ArrayString<63>;

/// What the name map holds: enough for a DNS answer without a second lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NameEntry {
    id: VmId,
    public_ip: Ipv4Addr,
}

impl View {
    /// Builds a View from full state (startup, snapshot install).
    pub fn build(
        applied: u64,
        settings: Option<ClusterSettings>,
        vms: impl IntoIterator<Item = VmRoute>,
        keys: impl IntoIterator<Item = (Fingerprint, AccountId)>,
    ) -> Self {
        let mut v = View {
            applied,
            settings: settings.map(Arc::new),
            keys: keys.into_iter().collect(),
            ..View::default()
        };
        for r in vms {
            v.upsert_vm(Arc::new(r));
        }
        v
    }

    /// Applies `changes` in order and records `applied` as the log index they reflect.
    pub fn patch(&mut self, applied: u64, changes: impl IntoIterator<Item = ViewChange>) {
        self.applied = applied;
        for c in changes {
            match c {
                ViewChange::Settings(s) => self.settings = Some(Arc::new(s)),
                ViewChange::VmUpsert(r) => self.upsert_vm(r),
                ViewChange::VmRemove(id) => self.remove_vm(id),
                ViewChange::KeyUpsert(fp, a) => {
                    self.keys.insert(fp, a);
                }
                ViewChange::KeyRemove(fp) => {
                    self.keys.remove(&fp);
                }
                ViewChange::TxtUpsert(name, values) => {
                    self.txt.insert(name, values);
                }
                ViewChange::TxtRemove(name) => {
                    self.txt.remove(&name);
                }
                ViewChange::TokenUpsert(id, account) => {
                    self.tokens.insert(id, account);
                }
                ViewChange::TokenRemove(id) => {
                    self.tokens.remove(&id);
                }
                ViewChange::TokenKeys(keys) => self.token_keys = keys.into(),
            }
        }
    }

    fn upsert_vm(&mut self, r: Arc<VmRoute>) {
        let (id, owner, public_ip) = (r.id, r.owner, r.public_ip);
        // Longer names are refused by the control plane (`vm_name_problem`); one that got
        // here anyway could not be asked for in DNS or TLS either.
        let label = Label::from(&r.name).ok();
        // The insert hands back the route it replaces: one walk of `by_id`, not a lookup
        // and then an insert (a create, nearly every upsert, replaces nothing).
        if let Some(old) = self.by_id.insert(id, r) {
            // Removing what is absent still makes the map's path unique (imbl), so only keys
            // that change are removed; inserting over a key replaces its value.
            if (old.owner, old.public_ip) != (owner, public_ip) {
                self.by_owner_ip.remove(&(old.owner, old.public_ip));
            }
            if label.as_ref().is_none_or(|l| l.as_str() != old.name) {
                self.by_name.remove(old.name.as_str());
            }
            if old.public_ip != public_ip {
                self.release_address(old.public_ip);
                *self.addresses.entry(public_ip).or_insert(0) += 1;
            }
        } else {
            *self.addresses.entry(public_ip).or_insert(0) += 1;
        }
        self.by_owner_ip.insert((owner, public_ip), id);
        if let Some(label) = label {
            self.by_name.insert(label, NameEntry { id, public_ip });
        }
    }

    fn remove_vm(&mut self, id: VmId) {
        if !self.by_id.contains_key(&id) {
            return;
        }
        if let Some(old) = self.by_id.remove(&id) {
            self.by_owner_ip.remove(&(old.owner, old.public_ip));
            self.by_name.remove(old.name.as_str());
            self.release_address(old.public_ip);
        }
    }

    /// One VM fewer has `ip`.
    fn release_address(&mut self, ip: Ipv4Addr) {
        match self.addresses.get_mut(&ip) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.addresses.remove(&ip);
            }
            None => {}
        }
    }

    /// The log index this View reflects.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Cluster settings, once the cluster is initialised.
    pub fn settings(&self) -> Option<&ClusterSettings> {
        self.settings.as_deref()
    }

    /// The DNS zone, once known.
    pub fn zone(&self) -> Option<&str> {
        self.settings.as_ref().map(|s| s.zone.as_str())
    }

    /// Addresses on which the lobby answers.
    pub fn lobby_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.settings.iter().map(|s| s.lobby)
    }

    /// Whether a connection addressed to `ip` is ours to accept: the lobby, or an address that
    /// some VM has (a pool address no VM has is not served).
    pub fn is_public_address(&self, ip: Ipv4Addr) -> bool {
        self.settings.as_ref().is_some_and(|s| s.lobby == ip) || self.addresses.contains_key(&ip)
    }

    /// The account a key belongs to.
    pub fn account_of(&self, fp: &Fingerprint) -> Option<AccountId> {
        self.keys.get(fp).copied()
    }

    /// The SSH route: the VM of the key's owner at the connection's local address.
    pub fn ssh_route(&self, fp: &Fingerprint, local: Ipv4Addr) -> Option<&Arc<VmRoute>> {
        let account = self.keys.get(fp)?;
        self.by_id.get(self.by_owner_ip.get(&(*account, local))?)
    }

    /// A VM by its DNS label.
    pub fn vm_by_name(&self, name: &str) -> Option<&Arc<VmRoute>> {
        self.by_id.get(&self.by_name.get(name)?.id)
    }

    /// The public address of the VM with this DNS label (one lookup: DNS's hot path).
    pub fn vm_addr(&self, name: &str) -> Option<Ipv4Addr> {
        self.by_name.get(name).map(|e| e.public_ip)
    }

    /// A VM by id.
    pub fn vm(&self, id: VmId) -> Option<&Arc<VmRoute>> {
        self.by_id.get(&id)
    }

    /// The VM a host name (`<vm>.<zone>`, any case, optional trailing dot) refers to; serves
    /// both SNI and DNS.
    pub fn vm_by_host(&self, host: &str) -> Option<&Arc<VmRoute>> {
        let label = self.zone_label(host)?;
        if label.bytes().any(|b| b.is_ascii_uppercase()) {
            self.vm_by_name(&label.to_ascii_lowercase())
        } else {
            self.vm_by_name(label)
        }
    }

    /// Whether `host` is the zone or a name in it (any case, optional trailing dot).
    pub fn in_zone(&self, host: &str) -> bool {
        let bare = host.strip_suffix('.').unwrap_or(host);
        self.zone().is_some_and(|z| bare.eq_ignore_ascii_case(z))
            || self.zone_label(host).is_some_and(|l| !l.is_empty())
    }

    /// The part of `host` before `.<zone>` (any case, optional trailing dot), if it ends so.
    fn zone_label<'a>(&self, host: &'a str) -> Option<&'a str> {
        let zone = self.zone()?;
        let host = host.strip_suffix('.').unwrap_or(host);
        let split = host.len().checked_sub(zone.len() + 1)?;
        // A name from a Host header may hold any UTF-8; no VM name does.
        let (label, rest) = host.split_at_checked(split)?;
        let rest = rest.strip_prefix('.')?;
        rest.eq_ignore_ascii_case(zone).then_some(label)
    }

    /// TXT records at `name` (relative to the zone, lowercase; empty for the apex).
    pub fn txt(&self, name: &str) -> Option<&Arc<[String]>> {
        self.txt.get(name)
    }

    /// Every TXT owner name and its records (unordered).
    pub fn txt_records(&self) -> impl Iterator<Item = (&String, &Arc<[String]>)> {
        self.txt.iter()
    }

    /// Replaces the TXT records wholesale (building a View from full state).
    pub fn with_txt(mut self, txt: impl IntoIterator<Item = (String, Vec<String>)>) -> Self {
        self.txt = txt.into_iter().map(|(n, v)| (n, Arc::from(v))).collect();
        self
    }

    /// Replaces the tokens and their keys wholesale (building a View from full state).
    pub fn with_tokens(
        mut self,
        tokens: impl IntoIterator<Item = (TokenId, AccountId)>,
        keys: Vec<PublicKey>,
    ) -> Self {
        self.tokens = tokens.into_iter().collect();
        self.token_keys = keys.into();
        self
    }

    /// Whether token `id` is live (created, not revoked, not yet pruned) for `account`.
    pub fn token_live(&self, id: TokenId, account: AccountId) -> bool {
        self.tokens.get(&id) == Some(&account)
    }

    /// The public key with id `kid` that verifies tokens.
    pub fn token_key(&self, kid: &str) -> Option<&[u8]> {
        self.token_keys
            .iter()
            .find(|k| k.kid == kid)
            .map(|k| k.key.as_slice())
    }

    /// Every key that verifies tokens (what the JWKS publishes).
    pub fn token_keys(&self) -> &[PublicKey] {
        &self.token_keys
    }

    /// How many keys are bound to accounts.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Number of VMs.
    pub fn vm_count(&self) -> usize {
        self.by_id.len()
    }

    /// Every VM (unordered).
    pub fn vms(&self) -> impl Iterator<Item = &Arc<VmRoute>> {
        self.by_id.values()
    }
}

/// The published View plus a change notification. One writer (the state machine), any number
/// of lock-free readers.
///
/// Two copies of the View take turns (the left-right pattern, with `ArcSwap` as the switch):
/// readers see the published one; an update takes the copy published before it, which
/// readers have let go of by then, brings it up to date with the changes it missed, applies
/// the new ones, and publishes it. Its map nodes are its own, so the persistent maps change
/// in place: no path copies, no reference counts on the siblings of every touched node, and
/// no old View to free (those were a quarter of a loaded node's CPU). If a reader still holds
/// the spare copy, the update clones the published View as before; the two copies share
/// nodes until each has touched them once.
pub struct ViewHandle {
    current: ArcSwap<View>,
    changed: watch::Sender<u64>,
    spare: std::sync::Mutex<Option<Spare>>,
}

/// The View published before the current one, and what the current one has that it lacks.
struct Spare {
    view: Arc<View>,
    applied: u64,
    changes: Vec<ViewChange>,
}

impl Default for ViewHandle {
    fn default() -> Self {
        Self {
            current: ArcSwap::from_pointee(View::default()),
            changed: watch::channel(0).0,
            spare: std::sync::Mutex::default(),
        }
    }
}

impl ViewHandle {
    /// An empty handle.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current View (lock-free; hold it briefly on hot paths).
    pub fn current(&self) -> arc_swap::Guard<Arc<View>> {
        self.current.load()
    }

    /// The current View as an owned `Arc`.
    pub fn snapshot(&self) -> Arc<View> {
        self.current.load_full()
    }

    /// Notified with the applied index after every publication.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Replaces the View wholesale.
    pub fn publish(&self, view: View) {
        let mut spare = self.spare();
        // The spare copy has nothing to do with the new View.
        *spare = None;
        self.swap_in(view);
    }

    /// Patches the current View. Only the state machine calls this (and `publish`), so
    /// read-modify-write without a compare-and-swap loop is safe; the lock is never contended.
    pub fn update(&self, applied: u64, changes: Vec<ViewChange>) {
        let mut spare = self.spare();
        let next = match spare.take() {
            Some(Spare {
                view,
                applied: missed_at,
                changes: missed,
            }) => match Arc::try_unwrap(view) {
                Ok(mut own) => {
                    own.patch(missed_at, missed);
                    own.patch(applied, changes.iter().cloned());
                    own
                }
                Err(held) => {
                    drop(held);
                    self.patched_clone(applied, &changes)
                }
            },
            None => self.patched_clone(applied, &changes),
        };
        let view = self.swap_in(next);
        *spare = Some(Spare {
            view,
            applied,
            changes,
        });
    }

    fn patched_clone(&self, applied: u64, changes: &[ViewChange]) -> View {
        let mut next = View::clone(&self.current.load());
        next.patch(applied, changes.iter().cloned());
        next
    }

    /// Publishes `view` and returns the one it replaces.
    fn swap_in(&self, view: View) -> Arc<View> {
        let applied = view.applied();
        let old = self.current.swap(Arc::new(view));
        self.changed.send_replace(applied);
        old
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Option<Spare>> {
        self.spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
