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

use super::rows::{self, sql_u64};
use crate::command::{ApplyError, Command, Outcome, Response};
use crate::model::{
    AccountId, ClusterSettings, Desired, Fingerprint, NodeId, Observed, Role, VmId, is_dns_label,
    roles_to_string, vm_name_problem,
};

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

/// Whether `key` looks like one ed25519 public key in OpenSSH form, comment-free: the proxy
/// compares what an agent presents against it (a wrong shape would lock the VM out, so it is
/// refused here).
fn is_agent_key(key: &str) -> bool {
    key.strip_prefix("ssh-ed25519 AAAA").is_some_and(|b64| {
        (60..=80).contains(&b64.len())
            && b64
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
    })
}

/// Events a VM keeps (the oldest go first).
pub const MAX_EVENTS: u64 = 50;

/// Longest reason a worker may give for a VM's state.
pub const MAX_REASON: usize = 1024;

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

fn zone_problem(zone: &str) -> Option<&'static str> {
    if zone.is_empty() || zone.len() > 200 {
        Some("a zone has 1 to 200 characters")
    } else if !zone.split('.').all(is_dns_label) {
        Some("use dot-separated labels of lowercase letters, digits and '-'")
    } else {
        None
    }
}

/// Why `name` cannot own TXT records: dot-separated labels of lowercase letters, digits, '-' and
/// '_' (for `_acme-challenge`), relative to the zone; empty means the apex.
fn txt_owner_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return None;
    }
    if name.len() > 200 {
        return Some("a name has at most 200 characters");
    }
    let ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    });
    if ok {
        None
    } else {
        Some("use dot-separated labels of lowercase letters, digits, '-' and '_'")
    }
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
        } => {
            if let Some(existing) = rows::settings(c)? {
                return if existing.cluster_id == *cluster_id {
                    Ok(Outcome::Done)
                } else {
                    Err(ApplyError::AlreadyInitialized {
                        existing: existing.cluster_id,
                    }
                    .into())
                };
            }
            if let Some(p) = zone_problem(zone) {
                return Err(invalid(format!("zone `{zone}`"), p));
            }
            if secret.len() < 32 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("cluster secret", "expected at least 32 hex digits"));
            }
            exec(
                c,
                "INSERT INTO cluster (one, cluster_id, secret, zone, lobby, public_pool,
                     max_vms_per_account, created_at)
                 VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    cluster_id.to_string(),
                    secret,
                    zone,
                    lobby.to_string(),
                    public_pool.to_string(),
                    max_vms_per_account,
                    sql_u64(*at)
                ],
            )?;
            t.settings = true;
            Ok(Outcome::Done)
        }

        Command::RegisterNode {
            id,
            uuid,
            name,
            roles,
            raft_addr,
            capacity,
            at,
        } => {
            settings(c, &mut cache.settings)?;
            if let Some(p) = text_problem(name, 253) {
                return Err(invalid("node name", p));
            }
            if raft_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    format!("raft address `{raft_addr}`"),
                    "expected IP:PORT",
                ));
            }
            let existing: Option<i64> = c
                .query_row(
                    "SELECT id FROM nodes WHERE uuid = ?1",
                    params![uuid.to_string()],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(ignore_no_rows)?;
            let id = match existing {
                Some(existing) => {
                    exec(
                        c,
                        "UPDATE nodes SET name = ?2, roles = ?3, raft_addr = ?4, vcpus = ?5,
                             memory_mib = ?6, disk_gib = ?7 WHERE id = ?1",
                        params![
                            existing,
                            name,
                            roles_to_string(roles),
                            raft_addr,
                            capacity.vcpus,
                            sql_u64(capacity.memory_mib),
                            sql_u64(capacity.disk_gib)
                        ],
                    )?;
                    u64::try_from(existing).unwrap_or(0)
                }
                None => {
                    let id = match id {
                        Some(id) => {
                            if rows::node(c, *id)?.is_some() {
                                return Err(ApplyError::IdConflict {
                                    what: "node".into(),
                                    id: id.to_string(),
                                }
                                .into());
                            }
                            *id
                        }
                        None => {
                            let max: Option<i64> =
                                one(c, "SELECT MAX(id) FROM nodes", [], |r| r.get(0))?;
                            max.map_or(1, |m| u64::try_from(m).unwrap_or(0) + 1)
                        }
                    };
                    if id == 0 {
                        return Err(invalid("node id 0", "node ids start at 1"));
                    }
                    exec(
                        c,
                        "INSERT INTO nodes (id, uuid, name, roles, raft_addr, vcpus, memory_mib,
                             disk_gib, last_heartbeat, joined_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
                        params![
                            sql_u64(id),
                            uuid.to_string(),
                            name,
                            roles_to_string(roles),
                            raft_addr,
                            capacity.vcpus,
                            sql_u64(capacity.memory_mib),
                            sql_u64(capacity.disk_gib),
                            sql_u64(*at)
                        ],
                    )?;
                    id
                }
            };
            Ok(Outcome::NodeRegistered { id })
        }

        Command::Heartbeat { node, capacity, at } => {
            let n = exec(
                c,
                "UPDATE nodes SET last_heartbeat = MAX(last_heartbeat, ?2), vcpus = ?3,
                     memory_mib = ?4, disk_gib = ?5 WHERE id = ?1",
                params![
                    sql_u64(*node),
                    sql_u64(*at),
                    capacity.vcpus,
                    sql_u64(capacity.memory_mib),
                    sql_u64(capacity.disk_gib)
                ],
            )?;
            if n == 0 {
                return Err(not_found("node", node));
            }
            Ok(Outcome::Done)
        }

        Command::CreateAccount {
            id,
            name,
            max_vms,
            at,
        } => {
            let s = settings(c, &mut cache.settings)?;
            if let Some(existing) = rows::account(c, *id)? {
                return if existing.name == *name {
                    Ok(Outcome::Done)
                } else {
                    Err(ApplyError::IdConflict {
                        what: "account".into(),
                        id: id.to_string(),
                    }
                    .into())
                };
            }
            if let Some(p) = text_problem(name, 128) {
                return Err(invalid(format!("account name `{name}`"), p));
            }
            let taken: bool = one(
                c,
                "SELECT EXISTS (SELECT 1 FROM accounts WHERE name = ?1)",
                params![name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(ApplyError::AccountNameTaken { name: name.clone() }.into());
            }
            exec(
                c,
                "INSERT INTO accounts (id, name, max_vms, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    id.to_string(),
                    name,
                    max_vms.unwrap_or(s.max_vms_per_account),
                    sql_u64(*at)
                ],
            )?;
            Ok(Outcome::Done)
        }

        Command::AddSshKey {
            account,
            fingerprint,
            public_key,
            at,
        } => {
            settings(c, &mut cache.settings)?;
            if rows::account(c, *account)?.is_none() {
                return Err(not_found("account", account));
            }
            if let Some(p) = text_problem(public_key, 16 * 1024) {
                return Err(invalid("public key", p));
            }
            match rows::key_owner(c, fingerprint)? {
                Some(owner) if owner == *account => return Ok(Outcome::Done),
                Some(_) => {
                    return Err(ApplyError::KeyTaken {
                        fingerprint: fingerprint.clone(),
                    }
                    .into());
                }
                None => {}
            }
            insert_key(c, fingerprint, *account, public_key, *at)?;
            t.keys.insert(fingerprint.clone());
            Ok(Outcome::Done)
        }

        Command::RemoveSshKey {
            account,
            fingerprint,
        } => {
            match rows::key_owner(c, fingerprint)? {
                Some(owner) if owner == *account => {}
                Some(_) => {
                    return Err(ApplyError::NotYours {
                        what: "key".into(),
                        id: fingerprint.to_string(),
                    }
                    .into());
                }
                None => return Err(not_found("key", fingerprint)),
            }
            let count: i64 = one(
                c,
                "SELECT COUNT(*) FROM ssh_keys WHERE account = ?1",
                params![account.to_string()],
                |r| r.get(0),
            )?;
            if count <= 1 {
                return Err(ApplyError::LastKey.into());
            }
            exec(
                c,
                "DELETE FROM ssh_keys WHERE fingerprint = ?1",
                params![fingerprint.as_str()],
            )?;
            t.keys.insert(fingerprint.clone());
            Ok(Outcome::Done)
        }

        Command::CreateApiToken {
            id,
            account,
            name,
            hash,
            at,
            expires_at,
        } => {
            settings(c, &mut cache.settings)?;
            if rows::account(c, *account)?.is_none() {
                return Err(not_found("account", account));
            }
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("token hash", "expected 64 hex digits (SHA-256)"));
            }
            if let Some(p) = text_problem(name, 128) {
                return Err(invalid("token name", p));
            }
            let existing: Option<(String, String)> = c
                .query_row(
                    "SELECT account, hash FROM api_tokens WHERE id = ?1",
                    params![id.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map(Some)
                .or_else(ignore_no_rows)?;
            if let Some((a, h)) = existing {
                return if a == account.to_string() && h == *hash {
                    Ok(Outcome::Done)
                } else {
                    Err(ApplyError::IdConflict {
                        what: "token".into(),
                        id: id.to_string(),
                    }
                    .into())
                };
            }
            exec(
                c,
                "INSERT INTO api_tokens (id, account, name, hash, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id.to_string(),
                    account.to_string(),
                    name,
                    hash,
                    sql_u64(*at),
                    sql_u64(*expires_at)
                ],
            )?;
            Ok(Outcome::Done)
        }

        Command::RevokeApiToken { account, id } => {
            let owner: Option<String> = c
                .query_row(
                    "SELECT account FROM api_tokens WHERE id = ?1",
                    params![id.to_string()],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(ignore_no_rows)?;
            match owner {
                Some(o) if o == account.to_string() => {}
                Some(_) => {
                    return Err(ApplyError::NotYours {
                        what: "token".into(),
                        id: id.to_string(),
                    }
                    .into());
                }
                None => return Err(not_found("token", id)),
            }
            exec(
                c,
                "DELETE FROM api_tokens WHERE id = ?1",
                params![id.to_string()],
            )?;
            Ok(Outcome::Done)
        }

        Command::CreateRegistration {
            code,
            fingerprint,
            public_key,
            at,
            expires_at,
        } => {
            settings(c, &mut cache.settings)?;
            if !(8..=64).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(invalid(
                    "registration code",
                    "expected 8 to 64 letters or digits",
                ));
            }
            if let Some(p) = text_problem(public_key, 16 * 1024) {
                return Err(invalid("public key", p));
            }
            let existing: Option<String> = c
                .query_row(
                    "SELECT fingerprint FROM registrations WHERE code = ?1",
                    params![code],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(ignore_no_rows)?;
            if let Some(fp) = existing {
                return if fp == fingerprint.as_str() {
                    Ok(Outcome::Done)
                } else {
                    Err(ApplyError::IdConflict {
                        what: "registration".into(),
                        id: code.clone(),
                    }
                    .into())
                };
            }
            if rows::key_owner(c, fingerprint)?.is_some() {
                return Err(ApplyError::KeyTaken {
                    fingerprint: fingerprint.clone(),
                }
                .into());
            }
            // Any stranger's key causes one of these: expired links go, and past the bound
            // the oldest live ones make room (deterministic: by the proposal's own time).
            exec(
                c,
                "DELETE FROM registrations WHERE expires_at < ?1",
                params![sql_u64(*at)],
            )?;
            exec(
                c,
                "DELETE FROM registrations WHERE code IN (SELECT code FROM registrations
                 ORDER BY expires_at, code LIMIT max(0, (SELECT count(*) FROM registrations) - ?1))",
                params![MAX_REGISTRATIONS - 1],
            )?;
            exec(
                c,
                "INSERT INTO registrations (code, fingerprint, public_key, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    code,
                    fingerprint.as_str(),
                    public_key,
                    sql_u64(*at),
                    sql_u64(*expires_at)
                ],
            )?;
            Ok(Outcome::Done)
        }

        Command::CompleteRegistration { code, account, at } => {
            let reg: Option<(String, String, i64)> = c
                .query_row(
                    "SELECT fingerprint, public_key, expires_at FROM registrations WHERE code = ?1",
                    params![code],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map(Some)
                .or_else(ignore_no_rows)?;
            let Some((fp, public_key, expires_at)) = reg else {
                return Err(not_found("registration", code));
            };
            if sql_u64(*at) > expires_at {
                return Err(ApplyError::Expired { code: code.clone() }.into());
            }
            if rows::account(c, *account)?.is_none() {
                return Err(not_found("account", account));
            }
            let fp: Fingerprint = fp.parse().map_err(|e: crate::model::ModelError| {
                invalid("stored fingerprint", e.to_string())
            })?;
            if rows::key_owner(c, &fp)?.is_some() {
                return Err(ApplyError::KeyTaken { fingerprint: fp }.into());
            }
            insert_key(c, &fp, *account, &public_key, *at)?;
            exec(
                c,
                "DELETE FROM registrations WHERE code = ?1",
                params![code],
            )?;
            t.keys.insert(fp);
            Ok(Outcome::Done)
        }

        Command::ClaimOwner {
            id,
            name,
            fingerprint,
            public_key,
            at,
        } => {
            let mine = rows::key_owner(c, fingerprint)? == Some(*id);
            if mine {
                return Ok(Outcome::Done);
            }
            let any: bool = one(c, "SELECT EXISTS (SELECT 1 FROM accounts)", [], |r| {
                r.get(0)
            })?;
            if any {
                return Err(ApplyError::OwnerClaimed.into());
            }
            let create = Command::CreateAccount {
                id: *id,
                name: name.clone(),
                max_vms: None,
                at: *at,
            };
            apply_one(c, &create, t, cache)?;
            let key = Command::AddSshKey {
                account: *id,
                fingerprint: fingerprint.clone(),
                public_key: public_key.clone(),
                at: *at,
            };
            apply_one(c, &key, t, cache)
        }

        Command::SetSshHostKey { private_key } => {
            if private_key.len() > 16 * 1024
                || !private_key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
            {
                return Err(invalid(
                    "SSH host key",
                    "expected an OpenSSH private key of at most 16 KiB",
                ));
            }
            if rows::meta(c, rows::SSH_HOST_KEY)?.is_none() {
                rows::set_meta(c, rows::SSH_HOST_KEY, private_key)?;
            }
            Ok(Outcome::Done)
        }

        Command::SetTlsLocalCa { material } => {
            let pem = |s: &str| s.len() <= 64 * 1024 && s.contains("-----BEGIN ");
            if !(pem(&material.ca_cert) && pem(&material.chain) && pem(&material.key)) {
                return Err(invalid(
                    "TLS material",
                    "expected PEM certificates and key of at most 64 KiB each",
                ));
            }
            if rows::meta(c, rows::TLS_LOCAL_CA)?.is_none() {
                let json = serde_json::to_string(material)
                    .map_err(|e| invalid("TLS material", e.to_string()))?;
                rows::set_meta(c, rows::TLS_LOCAL_CA, &json)?;
            }
            Ok(Outcome::Done)
        }

        Command::CreateVm {
            id,
            owner,
            name,
            spec,
            http_port,
            at,
        } => {
            let s = settings(c, &mut cache.settings)?;
            // The success path reads only the account: the INSERT itself proves that the id
            // is new and the name free (both unique), and SQLite checks a row's constraints
            // before it writes any of it. A refusal then works out what the one-by-one
            // checks would have said, in their order: a repeat of an earlier create first,
            // then the name, spec and port, the account, the name's owner, quota, pool.
            let refuse = |c: &Connection, why: Fail, after_account: bool| -> Result<_, Fail> {
                if let Some(earlier) = earlier_create(c, *id, *owner, name)? {
                    return earlier;
                }
                if after_account && rows::vm_name_taken(c, name)? {
                    return Err(ApplyError::NameTaken { name: name.clone() }.into());
                }
                Err(why)
            };
            if let Some(p) = vm_name_problem(name) {
                return refuse(c, invalid(format!("name `{name}`"), p), false);
            }
            if let Err(r) = spec.validate() {
                return refuse(c, invalid("VM spec", r), false);
            }
            if *http_port == 0 {
                return refuse(
                    c,
                    invalid("HTTP port 0", "use a port from 1 to 65535"),
                    false,
                );
            }
            let Some(account) = account_counters(c, &cache.accounts, *owner)? else {
                return refuse(c, not_found("account", owner), false);
            };
            if account.vm_count >= account.max_vms {
                let quota = ApplyError::QuotaExceeded {
                    limit: account.max_vms,
                };
                return refuse(c, quota.into(), true);
            }
            let Some((public_ip, reused)) = pick_address(c, &s, *owner, &account)? else {
                let exhausted = ApplyError::PoolExhausted {
                    pool: s.public_pool,
                };
                return refuse(c, exhausted.into(), true);
            };
            // Nothing is written before this point, so a refusal above changes nothing.
            let inserted = exec(
                c,
                "INSERT INTO vms (id, name, owner, vcpus, memory_mib, disk_gib, image, desired,
                     observed, worker, private_ip, public_ip, http_port, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', 'pending', NULL, NULL, ?8, ?9,
                     ?10, ?10)",
                params![
                    id.to_string(),
                    name,
                    owner.to_string(),
                    spec.vcpus,
                    sql_u64(spec.memory_mib),
                    sql_u64(spec.disk_gib),
                    spec.image,
                    u32::from(public_ip),
                    http_port,
                    sql_u64(*at)
                ],
            );
            if let Err(e) = inserted {
                // A unique constraint (id, name) refused the row before any of it was written.
                return if is_constraint(&e) {
                    refuse(c, e.into(), true)
                } else {
                    Err(e.into())
                };
            }
            let ip = i64::from(u32::from(public_ip));
            if reused {
                exec(
                    c,
                    "DELETE FROM free_public_ips WHERE owner = ?1 AND ip = ?2",
                    params![owner.to_string(), ip],
                )?;
            }
            let moved = AccountCounters {
                vm_count: account.vm_count + 1,
                freed_ips: account.freed_ips - i64::from(reused),
                ip_high_water: if reused {
                    account.ip_high_water
                } else {
                    Some(ip)
                },
                ..account
            };
            exec(
                c,
                "UPDATE accounts SET vm_count = ?2, freed_ips = ?3, ip_high_water = ?4
                 WHERE rowid = ?1",
                params![
                    moved.rowid,
                    moved.vm_count,
                    moved.freed_ips,
                    moved.ip_high_water
                ],
            )?;
            cache.accounts.insert(*owner, moved);
            t.vm(*id);
            // The row as just inserted (`view_changes` would read the same back).
            t.created.insert(
                *id,
                crate::view::VmRoute {
                    id: *id,
                    name: name.clone(),
                    owner: *owner,
                    public_ip,
                    private_ip: None,
                    http_port: *http_port,
                    desired: Desired::Running,
                    observed: Observed::Pending,
                    reason: None,
                    worker: None,
                    agent_key: None,
                },
            );
            Ok(Outcome::VmCreated { id: *id, public_ip })
        }

        Command::PlaceVm { vm, worker, at } => {
            let Some(v) = rows::vm(c, *vm)? else {
                return Err(not_found("VM", vm));
            };
            if v.worker == Some(*worker) {
                return Ok(Outcome::Done);
            }
            let cannot = |reason: String| {
                Fail::Reject(ApplyError::CannotPlace {
                    node: *worker,
                    reason,
                })
            };
            if let Some(other) = v.worker {
                return Err(cannot(format!("the VM is already placed on node {other}")));
            }
            let Some(node) = rows::node(c, *worker)? else {
                return Err(not_found("node", worker));
            };
            if !node.roles.contains(&Role::Worker) {
                return Err(cannot("it does not have the worker role".into()));
            }
            if !node
                .capacity
                .saturating_sub(&node.used)
                .fits(&v.spec.capacity())
            {
                return Err(cannot("not enough free capacity".into()));
            }
            add_usage(c, *worker, &v.spec, 1)?;
            exec(
                c,
                "UPDATE vms SET worker = ?2, updated_at = ?3,
                     observed = CASE observed WHEN 'pending' THEN 'placed' ELSE observed END
                 WHERE id = ?1",
                params![vm.to_string(), sql_u64(*worker), sql_u64(*at)],
            )?;
            t.vm(*vm);
            Ok(Outcome::Done)
        }

        Command::SetVmDesired {
            by,
            vm,
            desired,
            at,
        } => {
            let v = owned_vm(c, *vm, *by)?;
            exec(
                c,
                "UPDATE vms SET desired = ?2, updated_at = ?3 WHERE id = ?1",
                params![vm.to_string(), desired.as_str(), sql_u64(*at)],
            )?;
            if v.desired != *desired {
                let text = match desired {
                    Desired::Running => "start asked by its owner",
                    Desired::Stopped => "stop asked by its owner",
                };
                rows::add_vm_event(c, *vm, *at, text, MAX_EVENTS)?;
            }
            t.vm(*vm);
            Ok(Outcome::Done)
        }

        Command::ReportVm {
            vm,
            worker,
            observed,
            private_ip,
            reason,
            at,
        } => {
            placed_vm(c, *vm, *worker, "report")?;
            if *observed == Observed::Pending {
                return Err(invalid(
                    "observed state pending",
                    "a placed VM is never pending",
                ));
            }
            if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
                return Err(invalid(
                    "reason",
                    format!("at most {MAX_REASON} bytes; shorten it"),
                ));
            }
            exec(
                c,
                "UPDATE vms SET observed = ?2, private_ip = ?3, updated_at = ?4, reason = ?5
                 WHERE id = ?1",
                params![
                    vm.to_string(),
                    observed.as_str(),
                    private_ip.map(|ip| ip.to_string()),
                    sql_u64(*at),
                    reason
                ],
            )?;
            t.vm(*vm);
            Ok(Outcome::Done)
        }

        Command::DeleteVm { by, vm, at } => {
            let v = owned_vm(c, *vm, *by)?;
            exec(c, "DELETE FROM vms WHERE id = ?1", params![vm.to_string()])?;
            exec(
                c,
                "DELETE FROM vm_events WHERE vm = ?1",
                params![vm.to_string()],
            )?;
            exec(
                c,
                "UPDATE accounts SET vm_count = MAX(0, vm_count - 1) WHERE id = ?1",
                params![v.owner.to_string()],
            )?;
            let freed = exec(
                c,
                "INSERT OR IGNORE INTO free_public_ips (owner, ip) VALUES (?1, ?2)",
                params![v.owner.to_string(), u32::from(v.public_ip)],
            )?;
            exec(
                c,
                "UPDATE accounts SET freed_ips = freed_ips + ?2 WHERE id = ?1",
                params![v.owner.to_string(), i64::try_from(freed).unwrap_or(0)],
            )?;
            if let Some(worker) = v.worker {
                add_usage(c, worker, &v.spec, -1)?;
                exec(
                    c,
                    "INSERT OR REPLACE INTO deleted_vms (id, worker, deleted_at)
                     VALUES (?1, ?2, ?3)",
                    params![vm.to_string(), sql_u64(worker), sql_u64(*at)],
                )?;
            }
            t.vm(*vm);
            Ok(Outcome::Done)
        }

        Command::RecordVmEvent {
            vm,
            worker,
            text,
            at,
        } => {
            placed_vm(c, *vm, *worker, "event")?;
            if text.is_empty() || text.len() > MAX_REASON || text.chars().any(char::is_control) {
                return Err(invalid(
                    "event",
                    format!("one line of at most {MAX_REASON} bytes"),
                ));
            }
            rows::add_vm_event(c, *vm, *at, text, MAX_EVENTS)?;
            Ok(Outcome::Done)
        }

        Command::SetAgentKey { vm, worker, key } => {
            let v = placed_vm(c, *vm, *worker, "agent key")?;
            if !is_agent_key(key) {
                return Err(invalid(
                    "agent key",
                    "expected one ed25519 public key in OpenSSH form (ssh-ed25519 AAAA…)",
                ));
            }
            if v.agent_key.as_deref() == Some(key.as_str()) {
                return Ok(Outcome::Done);
            }
            exec(
                c,
                "UPDATE vms SET agent_key = ?2 WHERE id = ?1",
                params![vm.to_string(), key],
            )?;
            t.vm(*vm);
            Ok(Outcome::Done)
        }

        Command::SetTxt { name, values } => {
            settings(c, &mut cache.settings)?;
            if let Some(p) = txt_owner_problem(name) {
                return Err(invalid(format!("TXT owner `{name}`"), p));
            }
            if values.len() > 16 {
                return Err(invalid("TXT values", "at most 16 records per name"));
            }
            if let Some(v) = values.iter().find(|v| v.len() > 255) {
                return Err(invalid(
                    format!("TXT value of {} bytes", v.len()),
                    "a TXT string holds at most 255 bytes",
                ));
            }
            if values.is_empty() {
                exec(c, "DELETE FROM dns_txt WHERE name = ?1", params![name])?;
            } else {
                let vals = serde_json::to_string(values)
                    .map_err(|e| invalid("TXT values", e.to_string()))?;
                exec(
                    c,
                    "INSERT INTO dns_txt (name, vals) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET vals = excluded.vals",
                    params![name, vals],
                )?;
            }
            t.txt.insert(name.clone());
            Ok(Outcome::Done)
        }

        Command::PublishImages { node, images } => {
            if rows::node(c, *node)?.is_none() {
                return Err(not_found("node", node));
            }
            if images.len() > MAX_IMAGES {
                return Err(invalid(
                    "images",
                    format!("at most {MAX_IMAGES} per node; remove some"),
                ));
            }
            for i in images {
                if !is_dns_label(&i.name) {
                    return Err(invalid(
                        format!("image name {:?}", i.name),
                        "use lowercase letters, digits and '-'",
                    ));
                }
                if i.digest.len() != 64 || !i.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        format!("digest of image {}", i.name),
                        "a SHA-256 in hex (64 digits)",
                    ));
                }
            }
            exec(
                c,
                "DELETE FROM node_images WHERE node = ?1",
                params![sql_u64(*node)],
            )?;
            for i in images {
                exec(
                    c,
                    "INSERT OR REPLACE INTO node_images (node, name, digest, bytes, built_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        sql_u64(*node),
                        i.name,
                        i.digest,
                        sql_u64(i.bytes),
                        sql_u64(i.built_at)
                    ],
                )?;
            }
            Ok(Outcome::Done)
        }

        Command::PurgeVm { vm } => {
            exec(
                c,
                "DELETE FROM deleted_vms WHERE id = ?1",
                params![vm.to_string()],
            )?;
            Ok(Outcome::Done)
        }
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

/// What a create with `id` gets if an earlier create already made that VM: the same outcome
/// again when it is the same VM (a client retrying after a lost reply), else `IdConflict`.
fn earlier_create(
    c: &Connection,
    id: VmId,
    owner: crate::model::AccountId,
    name: &str,
) -> rusqlite::Result<Option<Result<Outcome, Fail>>> {
    Ok(
        rows::vm_identity(c, id)?.map(|(existing_owner, existing_name, public_ip)| {
            if existing_owner == owner && existing_name == name {
                Ok(Outcome::VmCreated { id, public_ip })
            } else {
                Err(ApplyError::IdConflict {
                    what: "VM".into(),
                    id: id.to_string(),
                }
                .into())
            }
        }),
    )
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

fn insert_key(
    c: &Connection,
    fp: &Fingerprint,
    account: crate::model::AccountId,
    public_key: &str,
    at: u64,
) -> rusqlite::Result<()> {
    exec(
        c,
        "INSERT INTO ssh_keys (fingerprint, account, public_key, added_at) VALUES (?1, ?2, ?3, ?4)",
        params![fp.as_str(), account.to_string(), public_key, sql_u64(at)],
    )?;
    Ok(())
}

/// The VM if `by` owns it. A VM of another account is reported like a missing one.
/// The VM `vm`, if it is placed on `worker` (who sends a `what` about it).
fn placed_vm(
    c: &Connection,
    vm: VmId,
    worker: NodeId,
    what: &str,
) -> Result<crate::model::Vm, Fail> {
    let Some(v) = rows::vm(c, vm)? else {
        return Err(not_found("VM", vm));
    };
    if v.worker != Some(worker) {
        return Err(invalid(
            format!("{what} from node {worker}"),
            "the VM is not placed on that node",
        ));
    }
    Ok(v)
}

fn owned_vm(
    c: &Connection,
    vm: VmId,
    by: crate::model::AccountId,
) -> Result<crate::model::Vm, Fail> {
    match rows::vm(c, vm)? {
        Some(v) if v.owner == by => Ok(v),
        Some(_) => Err(ApplyError::NotYours {
            what: "VM".into(),
            id: vm.to_string(),
        }
        .into()),
        None => Err(not_found("VM", vm)),
    }
}

/// Adds (`sign` 1) or removes (`sign` -1) a VM's resources from a node's usage.
fn add_usage(
    c: &Connection,
    node: NodeId,
    spec: &crate::model::VmSpec,
    sign: i64,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE nodes SET used_vcpus = MAX(0, used_vcpus + ?2),
             used_memory_mib = MAX(0, used_memory_mib + ?3),
             used_disk_gib = MAX(0, used_disk_gib + ?4)
         WHERE id = ?1",
    )?
    .execute(params![
        sql_u64(node),
        sign * i64::from(spec.vcpus),
        sign * sql_u64(spec.memory_mib),
        sign * sql_u64(spec.disk_gib)
    ])?;
    Ok(())
}

/// The first assignable pool address at or after `from`.
pub fn next_assignable(s: &ClusterSettings, from: u32) -> Option<Ipv4Addr> {
    let last = u32::from(s.public_pool.broadcast());
    (from.max(u32::from(s.public_pool.network()))..=last)
        .map(Ipv4Addr::from)
        .find(|ip| s.is_assignable(*ip))
}

/// An account's counters that a create checks and moves, and where its row is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AccountCounters {
    rowid: i64,
    max_vms: u32,
    vm_count: u32,
    ip_high_water: Option<i64>,
    freed_ips: i64,
}

/// The counters of `owner`'s account: remembered from an earlier create of this transaction,
/// or read (and then remembered by the create that moves them).
fn account_counters(
    c: &Connection,
    cache: &std::collections::HashMap<AccountId, AccountCounters>,
    owner: AccountId,
) -> rusqlite::Result<Option<AccountCounters>> {
    if let Some(known) = cache.get(&owner) {
        return Ok(Some(*known));
    }
    c.prepare_cached(
        "SELECT rowid, max_vms, vm_count, ip_high_water, freed_ips FROM accounts WHERE id = ?1",
    )?
    .query_row(params![owner.to_string()], |r| {
        Ok(AccountCounters {
            rowid: r.get(0)?,
            max_vms: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(u32::MAX),
            vm_count: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
            ip_high_water: r.get(3)?,
            freed_ips: r.get(4)?,
        })
    })
    .optional()
}

/// The owner's lowest free pool address, and whether it is one freed by a deletion: the lowest
/// freed address or the first assignable one above the owner's high-water mark, whichever is
/// lower. Allocation always takes the lowest, so every free address at or below the mark is in
/// `free_public_ips`; an owner who never deleted a VM costs no lookup beyond its account row.
/// Writes nothing: the create records what it took along with its own counter update.
fn pick_address(
    c: &Connection,
    s: &ClusterSettings,
    owner: crate::model::AccountId,
    account: &AccountCounters,
) -> rusqlite::Result<Option<(Ipv4Addr, bool)>> {
    let lowest_freed = if account.freed_ips > 0 {
        one(
            c,
            "SELECT ip FROM free_public_ips WHERE owner = ?1 ORDER BY ip LIMIT 1",
            params![owner.to_string()],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .and_then(|f| u32::try_from(f).ok())
        .map(Ipv4Addr::from)
    } else {
        None
    };
    let above = match account.ip_high_water.and_then(|h| u32::try_from(h).ok()) {
        None => next_assignable(s, 0),
        Some(h) => h.checked_add(1).and_then(|n| next_assignable(s, n)),
    };
    Ok(match (lowest_freed, above) {
        (Some(f), Some(a)) if f < a => Some((f, true)),
        (Some(f), None) => Some((f, true)),
        (_, Some(a)) => Some((a, false)),
        (None, None) => None,
    })
}
