//! Applying one command to the state tables: validation and mutation in one place.
//!
//! Apply is deterministic: it reads only the command and the tables, never a clock or a random
//! source, so every replica reaches the same state. A refused command returns a typed
//! `ApplyError` and leaves the tables exactly as they were (each command runs in a savepoint that
//! is rolled back on refusal). Storage failures are a different thing and surface as
//! `rusqlite::Error`; Raft treats those as fatal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::rows::{self, sql_u64};

mod accounts;
mod cluster;
mod images;
mod nodes;
mod tokens;
mod vms;

use crate::command::{ApplyError, Command, Outcome, Response};
use crate::model::{
    AccountId, ClusterSettings, Desired, Fingerprint, NodeId, Observed, Role, VmId, is_dns_label,
    roles_to_string, vm_name_problem,
};
use vms::AccountCounters;
pub use vms::next_assignable;

/// What a batch of commands changed, for patching the View.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// VMs created, changed or deleted.
    pub vms: BTreeSet<VmId>,
    /// The routes of VMs these commands created and did not change afterwards: the View takes
    /// them as they are instead of reading the rows back.
    pub created: BTreeMap<VmId, crate::view::VmRoute>,
    /// Keys added or removed.
    pub keys: BTreeSet<Fingerprint>,
    /// Cluster settings were written.
    pub settings: bool,
    /// TXT owner names written.
    pub txt: BTreeSet<String>,
    /// API tokens created, revoked or expired.
    pub tokens: BTreeSet<crate::model::TokenId>,
    /// The token signing keys changed.
    pub token_keys: bool,
}

impl Touched {
    /// Adds `other`'s changes.
    pub fn merge(&mut self, other: Touched) {
        for id in &other.vms {
            if !other.created.contains_key(id) {
                self.created.remove(id);
            }
        }
        self.created.extend(other.created);
        self.vms.extend(other.vms);
        self.keys.extend(other.keys);
        self.settings |= other.settings;
        self.txt.extend(other.txt);
        self.tokens.extend(other.tokens);
        self.token_keys |= other.token_keys;
    }

    /// Records that `vm` changed (or went): its row must be read back for the View.
    fn vm(&mut self, vm: VmId) {
        self.vms.insert(vm);
        self.created.remove(&vm);
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.keys.is_empty() && !self.settings && self.txt.is_empty()
    }
}

enum Fail {
    Reject(ApplyError),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

impl From<ApplyError> for Fail {
    fn from(e: ApplyError) -> Self {
        Fail::Reject(e)
    }
}

/// Applies the commands of one transaction, collecting what they changed.
#[derive(Debug, Default)]
pub struct Applier {
    /// What the applied commands changed.
    pub touched: Touched,
    cache: Cache,
}

/// Rows apply reads again and again, remembered as this applier's own commands left them. Only
/// valid while the tables change through this applier alone: whoever rolls back the
/// transaction it applied into must drop it (see `Applier::into_parts`, `Applier::with_cache`).
#[derive(Debug, Default)]
pub struct Cache {
    /// Cluster settings (only `InitCluster` changes them).
    settings: Option<ClusterSettings>,
    /// The counters of accounts that `CreateVm` read or moved. Only creates keep it: any other
    /// command empties it first, so nothing else has to know what it holds. Under a create load
    /// the account row was read once per create, a sixth of apply's time.
    accounts: std::collections::HashMap<AccountId, AccountCounters>,
}

impl Applier {
    /// An applier that starts from what an earlier one of the same transaction remembered.
    pub fn with_cache(cache: Cache) -> Self {
        Self {
            touched: Touched::default(),
            cache,
        }
    }

    /// What this applier changed, and what it remembers for the next one of the same
    /// transaction.
    pub fn into_parts(self) -> (Touched, Cache) {
        (self.touched, self.cache)
    }

    /// Applies `cmd` on `c` (inside the caller's transaction, if one is open) in a savepoint of
    /// its own. `Ok(Err(_))` means refused with state unchanged; `Err(_)` is a storage failure.
    pub fn apply(&mut self, c: &Connection, cmd: &Command) -> rusqlite::Result<Response> {
        exec(c, "SAVEPOINT apply_command", [])?;
        let mut local = Touched::default();
        match apply_one(c, cmd, &mut local, &mut self.cache) {
            Ok(outcome) => {
                exec(c, "RELEASE apply_command", [])?;
                if local.settings {
                    self.cache.settings = None;
                }
                self.touched.merge(local);
                Ok(Ok(outcome))
            }
            Err(Fail::Reject(e)) => {
                exec(c, "ROLLBACK TO apply_command", [])?;
                exec(c, "RELEASE apply_command", [])?;
                // Whatever the command remembered went with its writes.
                self.cache.accounts.clear();
                Ok(Err(e))
            }
            Err(Fail::Sql(e)) => {
                let _ = exec(c, "ROLLBACK TO apply_command", []);
                let _ = exec(c, "RELEASE apply_command", []);
                self.cache = Cache::default();
                Err(e)
            }
        }
    }
}

impl Applier {
    /// Applies `cmds` in order with the same answers and the same end state as calling
    /// [`Applier::apply`] on each (a refused command changes nothing), but with one savepoint
    /// for the whole batch: each savepoint copies every page its command first touches into the
    /// statement journal, and the commands of a batch mostly touch the same pages. Should a
    /// command be refused, the batch is rolled back and applied again one command at a time.
    pub fn apply_batch(
        &mut self,
        c: &Connection,
        cmds: &[Command],
    ) -> rusqlite::Result<Vec<Response>> {
        if cmds.len() <= 1 {
            return cmds.iter().map(|cmd| self.apply(c, cmd)).collect();
        }
        if cmds.iter().all(checks_before_writing) {
            return self.apply_unguarded(c, cmds);
        }
        exec(c, "SAVEPOINT apply_batch", [])?;
        // Rolling the batch back leaves `self.cache` empty: it forgets what the batch did.
        let mut cache = std::mem::take(&mut self.cache);
        let mut touched = Touched::default();
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let mut one = Touched::default();
            match apply_one(c, cmd, &mut one, &mut cache) {
                Ok(outcome) => {
                    if one.settings {
                        cache.settings = None;
                    }
                    touched.merge(one);
                    out.push(Ok(outcome));
                }
                Err(Fail::Reject(_)) => {
                    exec(c, "ROLLBACK TO apply_batch", [])?;
                    exec(c, "RELEASE apply_batch", [])?;
                    return cmds.iter().map(|cmd| self.apply(c, cmd)).collect();
                }
                Err(Fail::Sql(e)) => {
                    let _ = exec(c, "ROLLBACK TO apply_batch", []);
                    let _ = exec(c, "RELEASE apply_batch", []);
                    return Err(e);
                }
            }
        }
        exec(c, "RELEASE apply_batch", [])?;
        self.cache = cache;
        self.touched.merge(touched);
        Ok(out)
    }
}

impl Applier {
    /// `apply_batch` for commands that make every check before their first write
    /// ([`checks_before_writing`]): a refused one has written nothing, so no savepoint is
    /// needed to undo it. SQLite copies every page a savepoint first touches into its journal,
    /// which was a tenth of a loaded node's CPU. A storage error mid-command is fatal to the
    /// state machine, whose caller rolls back the whole open transaction (`apply_entries`).
    fn apply_unguarded(
        &mut self,
        c: &Connection,
        cmds: &[Command],
    ) -> rusqlite::Result<Vec<Response>> {
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let mut one = Touched::default();
            match apply_one(c, cmd, &mut one, &mut self.cache) {
                Ok(outcome) => {
                    if one.settings {
                        self.cache.settings = None;
                    }
                    self.touched.merge(one);
                    out.push(Ok(outcome));
                }
                Err(Fail::Reject(e)) => out.push(Err(e)),
                Err(Fail::Sql(e)) => {
                    self.cache = Cache::default();
                    return Err(e);
                }
            }
        }
        Ok(out)
    }
}

/// Whether `cmd` refuses only before it writes anything, so that a refusal needs nothing
/// undone. True of `CreateVm` (nearly all of the write load): its checks come first and its
/// writes are an INSERT that SQLite checks whole before changing anything, then updates of
/// rows it has just read. Every other command keeps its savepoint. `tests/apply.rs` holds
/// this to account: a refused command must leave every table as it was.
fn checks_before_writing(cmd: &Command) -> bool {
    matches!(cmd, Command::CreateVm { .. })
}

/// Most images one node may publish.
pub const MAX_IMAGES: usize = 256;

/// Most registration links the replica keeps: any stranger's key can ask for one, so past
/// this the oldest make room (a proxy also bounds them per source address).
pub const MAX_REGISTRATIONS: i64 = 10_000;

/// Events a VM keeps (the oldest go first).
pub const MAX_EVENTS: u64 = 50;

pub use crate::command::MAX_REASON;

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Fail {
    Fail::Reject(ApplyError::Invalid {
        what: what.into(),
        reason: reason.into(),
    })
}

fn not_found(what: &str, id: impl ToString) -> Fail {
    Fail::Reject(ApplyError::NotFound {
        what: what.into(),
        id: id.to_string(),
    })
}

fn settings(
    conn: &Connection,
    cache: &mut Option<ClusterSettings>,
) -> Result<ClusterSettings, Fail> {
    if let Some(s) = cache {
        return Ok(s.clone());
    }
    let s = rows::settings(conn)?.ok_or(Fail::Reject(ApplyError::NotInitialized))?;
    *cache = Some(s.clone());
    Ok(s)
}

fn text_problem(s: &str, max: usize) -> Option<String> {
    if s.trim().is_empty() {
        Some("it cannot be empty".into())
    } else if s.len() > max {
        Some(format!("it has at most {max} bytes"))
    } else if s.chars().any(char::is_control) {
        Some("it cannot contain control characters".into())
    } else {
        None
    }
}

fn apply_one(
    c: &Connection,
    cmd: &Command,
    t: &mut Touched,
    cache: &mut Cache,
) -> Result<Outcome, Fail> {
    if !matches!(cmd, Command::CreateVm { .. }) {
        cache.accounts.clear();
    }
    match cmd {
        Command::InitCluster {
            cluster_id,
            secret,
            zone,
            lobby,
            public_pool,
            max_vms_per_account,
            at,
        } => cluster::init_cluster(
            c,
            t,
            cluster_id,
            secret,
            zone,
            lobby,
            public_pool,
            max_vms_per_account,
            at,
        ),
        Command::RegisterNode {
            id,
            uuid,
            name,
            roles,
            raft_addr,
            capacity,
            at,
        } => nodes::register_node(c, cache, id, uuid, name, roles, raft_addr, capacity, at),
        Command::Heartbeat { node, capacity, at } => nodes::heartbeat(c, node, capacity, at),
        Command::CreateAccount {
            id,
            name,
            max_vms,
            at,
        } => accounts::create_account(c, cache, id, name, max_vms, at),
        Command::AddSshKey {
            account,
            fingerprint,
            public_key,
            at,
        } => accounts::add_ssh_key(c, t, cache, account, fingerprint, public_key, at),
        Command::RemoveSshKey {
            account,
            fingerprint,
        } => accounts::remove_ssh_key(c, t, account, fingerprint),
        Command::CreateApiToken {
            id,
            account,
            name,
            hash,
            at,
            expires_at,
        } => {
            // The older form, which nothing proposes any more: a token for every VM.
            let token = Command::CreateToken {
                id: *id,
                account: *account,
                label: name.clone(),
                hash: hash.clone(),
                vms: Vec::new(),
                read_only: false,
                at: *at,
                expires_at: *expires_at,
            };
            apply_one(c, &token, t, cache)
        }
        Command::CreateToken {
            id,
            account,
            label,
            hash,
            vms,
            read_only,
            at,
            expires_at,
        } => {
            let n = tokens::NewToken {
                id,
                account,
                label,
                hash,
                vms,
                read_only: *read_only,
                at: *at,
                expires_at: *expires_at,
            };
            tokens::create_token(c, t, cache, &n)
        }
        Command::AddTokenKey {
            kid,
            pkcs8,
            at,
            if_none,
        } => tokens::add_token_key(c, t, kid, pkcs8, *at, *if_none),
        Command::RevokeApiToken { account, id } => tokens::revoke_api_token(c, t, account, id),
        Command::CreateRegistration {
            code,
            fingerprint,
            public_key,
            at,
            expires_at,
        } => accounts::create_registration(c, cache, code, fingerprint, public_key, at, expires_at),
        Command::CompleteRegistration { code, account, at } => {
            accounts::complete_registration(c, t, code, account, at)
        }
        Command::ApproveRegistration {
            code,
            account,
            new_account,
            at,
        } => {
            if let Some(name) = new_account {
                let create = Command::CreateAccount {
                    id: *account,
                    name: name.clone(),
                    max_vms: None,
                    at: *at,
                };
                // A refusal below undoes the account too (the command's savepoint).
                apply_one(c, &create, t, cache)?;
            }
            accounts::complete_registration(c, t, code, account, at)
        }
        Command::LinkIdentity {
            code,
            issuer,
            subject,
            email,
            account,
            name,
            at,
        } => {
            let who = accounts::Identity {
                issuer,
                subject,
                email: email.as_deref(),
            };
            accounts::link_identity(c, t, cache, code, &who, account, name, at)
        }
        Command::ClaimOwner {
            id,
            name,
            fingerprint,
            public_key,
            at,
        } => accounts::claim_owner(c, t, cache, id, name, fingerprint, public_key, at),
        Command::SetSshHostKey { private_key } => cluster::set_ssh_host_key(c, private_key),
        Command::SetTlsLocalCa { material } => cluster::set_tls_local_ca(c, material),
        Command::CreateVm {
            id,
            owner,
            name,
            spec,
            http_port,
            at,
        } => vms::create_vm(c, t, cache, id, owner, name, spec, http_port, at),
        Command::PlaceVm { vm, worker, at } => vms::place_vm(c, t, vm, worker, at),
        Command::SetVmDesired {
            by,
            vm,
            desired,
            at,
        } => vms::set_vm_desired(c, t, by, vm, desired, at),
        Command::ReportVm {
            vm,
            worker,
            observed,
            private_ip,
            reason,
            at,
        } => vms::report_vm(c, t, vm, worker, observed, private_ip, reason, at),
        Command::DeleteVm { by, vm, at } => vms::delete_vm(c, t, by, vm, at),
        Command::RecordVmEvent {
            vm,
            worker,
            text,
            at,
        } => vms::record_vm_event(c, vm, worker, text, at),
        Command::SetAgentKey { vm, worker, key } => vms::set_agent_key(c, t, vm, worker, key),
        Command::SetTxt { name, values } => cluster::set_txt(c, t, cache, name, values),
        Command::PublishImages { node, images } => images::publish_images(c, node, images),
        Command::PurgeVm { vm } => vms::purge_vm(c, vm),
    }
}

/// `execute` through the statement cache (apply runs the same statements for every command).
fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// `query_row` through the statement cache.
fn one<T>(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(p, f)
}

/// Whether SQLite refused a statement for a constraint (nothing of it was written).
fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
}

fn ignore_no_rows<T>(e: rusqlite::Error) -> rusqlite::Result<Option<T>> {
    match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        e => Err(e),
    }
}
