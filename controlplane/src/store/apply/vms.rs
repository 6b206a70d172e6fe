//! Commands about VMs: create (with quota and a public address), place, desired and observed state, delete, events, agent keys, purge.

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::model::{Millis, VmSpec};

/// `CreateVm`: creates a VM with the lowest pool address not yet used by its owner.
#[allow(clippy::too_many_arguments)] // the command's fields, as the dispatch takes them apart
pub(super) fn create_vm(
    c: &Connection,
    t: &mut Touched,
    cache: &mut Cache,
    id: &VmId,
    owner: &AccountId,
    name: &String,
    spec: &VmSpec,
    http_port: &u16,
    at: &Millis,
) -> Result<Outcome, Fail> {
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

/// `PlaceVm`: the scheduler's decision.
pub(super) fn place_vm(
    c: &Connection,
    t: &mut Touched,
    vm: &VmId,
    worker: &NodeId,
    at: &Millis,
) -> Result<Outcome, Fail> {
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

/// `SetVmDesired`: the owner starts or stops a VM.
pub(super) fn set_vm_desired(
    c: &Connection,
    t: &mut Touched,
    by: &AccountId,
    vm: &VmId,
    desired: &Desired,
    at: &Millis,
) -> Result<Outcome, Fail> {
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

/// `ReportVm`: a worker reports what a VM is doing.
#[allow(clippy::too_many_arguments)] // the command's fields, as the dispatch takes them apart
pub(super) fn report_vm(
    c: &Connection,
    t: &mut Touched,
    vm: &VmId,
    worker: &NodeId,
    observed: &Observed,
    private_ip: &Option<Ipv4Addr>,
    reason: &Option<String>,
    at: &Millis,
) -> Result<Outcome, Fail> {
    placed_vm(c, *vm, *worker, "report")?;
    if *observed == Observed::Pending {
        return Err(invalid(
            "observed state pending",
            "a placed VM is never pending",
        ));
    }
    if *observed == Observed::Unknown {
        return Err(invalid(
            "observed state unknown",
            "only readers say that, of a VM whose worker is silent",
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

/// `DeleteVm`: deletes a VM: its name and address are free at once; the worker then removes its
/// disk and acknowledges with `PurgeVm`.
pub(super) fn delete_vm(
    c: &Connection,
    t: &mut Touched,
    by: &AccountId,
    vm: &VmId,
    at: &Millis,
) -> Result<Outcome, Fail> {
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

/// `RecordVmEvent`: a worker records something that happened to a VM (started, restarted after its
/// process ended and why, stopped); the VM keeps its last [`crate::store::apply::MAX_EVENTS`].
pub(super) fn record_vm_event(
    c: &Connection,
    vm: &VmId,
    worker: &NodeId,
    text: &str,
    at: &Millis,
) -> Result<Outcome, Fail> {
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

/// `SetAgentKey`: a worker records the public half of the host key it gave a VM's guest agent: from
/// then on the proxy accepts that agent only with that key.
pub(super) fn set_agent_key(
    c: &Connection,
    t: &mut Touched,
    vm: &VmId,
    worker: &NodeId,
    key: &String,
) -> Result<Outcome, Fail> {
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

/// `PurgeVm`: a worker finished removing a deleted VM.
pub(super) fn purge_vm(c: &Connection, vm: &VmId) -> Result<Outcome, Fail> {
    exec(
        c,
        "DELETE FROM deleted_vms WHERE id = ?1",
        params![vm.to_string()],
    )?;
    Ok(Outcome::Done)
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
