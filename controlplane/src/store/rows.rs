//! Reading the state tables back into `model` values. Used by apply (inside its transaction),
//! by the View builder, the scheduler loop and operator queries. A row that does not decode is
//! reported as a conversion error rather than skipped: a replica never silently drops state.

use std::net::Ipv4Addr;
use std::str::FromStr;

use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use crate::model::{
    Account, AccountId, ApiToken, Capacity, ClusterSettings, Fingerprint, ImageAd, Node, NodeId,
    Registration, SshKey, TlsMaterial, TokenId, Vm, VmId, VmSpec, parse_roles,
};
use crate::tokens::{PublicKey, SigningKey};

fn bad(idx: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e))
}

/// A text column parsed with `FromStr`.
pub(crate) fn parsed<T>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let s: String = row.get(idx)?;
    s.parse::<T>()
        .map_err(|e| bad(idx, std::io::Error::other(format!("`{s}`: {e}"))))
}

fn uuid(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    parsed(row, idx)
}

/// An unsigned column (SQLite stores i64).
fn unsigned<T: TryFrom<i64>>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let v: i64 = row.get(idx)?;
    T::try_from(v).map_err(|_| bad(idx, std::io::Error::other(format!("{v} is out of range"))))
}

/// `u64` as SQLite's i64 (values above i64::MAX do not occur: times are milliseconds).
pub(crate) fn sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Cluster settings, or `None` before `InitCluster`.
pub fn settings(conn: &Connection) -> rusqlite::Result<Option<ClusterSettings>> {
    conn.prepare_cached(
        "SELECT cluster_id, zone, lobby, public_pool, max_vms_per_account, created_at
         FROM cluster WHERE one = 1",
    )?
    .query_row([], |r| {
        Ok(ClusterSettings {
            cluster_id: uuid(r, 0)?,
            zone: r.get(1)?,
            lobby: parsed(r, 2)?,
            public_pool: parsed(r, 3)?,
            max_vms_per_account: unsigned(r, 4)?,
            created_at: unsigned(r, 5)?,
        })
    })
    .optional()
}

/// The cluster secret (hex), or `None` before `InitCluster`.
pub fn cluster_secret(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT secret FROM cluster WHERE one = 1")?
        .query_row([], |r| r.get(0))
        .optional()
}

const VM_COLUMNS: &str = "id, name, owner, vcpus, memory_mib, disk_gib, image, desired, observed,
    worker, private_ip, public_ip, http_port, created_at, updated_at, reason,
    agent_key";

fn vm_row(r: &Row<'_>) -> rusqlite::Result<Vm> {
    let private_ip: Option<String> = r.get(10)?;
    let private_ip = match private_ip {
        Some(s) => Some(
            s.parse::<Ipv4Addr>()
                .map_err(|e| bad(10, std::io::Error::other(e.to_string())))?,
        ),
        None => None,
    };
    Ok(Vm {
        id: VmId(uuid(r, 0)?),
        name: r.get(1)?,
        owner: AccountId(uuid(r, 2)?),
        spec: VmSpec {
            vcpus: unsigned(r, 3)?,
            memory_mib: unsigned(r, 4)?,
            disk_gib: unsigned(r, 5)?,
            image: r.get(6)?,
        },
        desired: parsed(r, 7)?,
        observed: parsed(r, 8)?,
        reason: r.get(15)?,
        worker: r
            .get::<_, Option<i64>>(9)?
            .map(|w| u64::try_from(w).unwrap_or(0)),
        private_ip,
        public_ip: Ipv4Addr::from(unsigned::<u32>(r, 11)?),
        http_port: unsigned(r, 12)?,
        created_at: unsigned(r, 13)?,
        updated_at: unsigned(r, 14)?,
        agent_key: r.get(16)?,
    })
}

/// One VM by id.
pub fn vm(conn: &Connection, id: VmId) -> rusqlite::Result<Option<Vm>> {
    conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"))?
        .query_row(params![id.to_string()], vm_row)
        .optional()
}

/// Who owns a VM, its name and its public address (the create's idempotency check), without
/// decoding the whole row.
pub fn vm_identity(
    conn: &Connection,
    id: VmId,
) -> rusqlite::Result<Option<(AccountId, String, Ipv4Addr)>> {
    conn.prepare_cached("SELECT owner, name, public_ip FROM vms WHERE id = ?1")?
        .query_row(params![id.to_string()], |r| {
            Ok((
                AccountId(uuid(r, 0)?),
                r.get(1)?,
                Ipv4Addr::from(unsigned::<u32>(r, 2)?),
            ))
        })
        .optional()
}

/// Whether a VM has this name (from the name index alone).
pub fn vm_name_taken(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM vms WHERE name = ?1")?
        .query_row(params![name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Every VM, by name.
pub fn vms(conn: &Connection) -> rusqlite::Result<Vec<Vm>> {
    conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))?
        .query_map([], vm_row)?
        .collect()
}

/// VMs of one owner, by name.
pub fn vms_of(conn: &Connection, owner: AccountId) -> rusqlite::Result<Vec<Vm>> {
    conn.prepare_cached(&format!(
        "SELECT {VM_COLUMNS} FROM vms WHERE owner = ?1 ORDER BY name"
    ))?
    .query_map(params![owner.to_string()], vm_row)?
    .collect()
}

/// VMs placed on `worker` (the `vms_by_worker` index serves this).
pub fn vms_on(conn: &Connection, worker: NodeId) -> rusqlite::Result<Vec<Vm>> {
    conn.prepare_cached(&format!(
        "SELECT {VM_COLUMNS} FROM vms WHERE worker = ?1 ORDER BY created_at, id"
    ))?
    .query_map(params![sql_u64(worker)], vm_row)?
    .collect()
}

/// A VM's events, oldest first: (time, text).
pub fn vm_events(
    conn: &Connection,
    vm: VmId,
) -> rusqlite::Result<Vec<(crate::model::Millis, String)>> {
    conn.prepare_cached("SELECT at, text FROM vm_events WHERE vm = ?1 ORDER BY seq")?
        .query_map(params![vm.to_string()], |r| {
            Ok((unsigned(r, 0)?, r.get(1)?))
        })?
        .collect()
}

/// Adds an event to a VM's, dropping the oldest beyond `keep`.
pub fn add_vm_event(
    conn: &Connection,
    vm: VmId,
    at: crate::model::Millis,
    text: &str,
    keep: u64,
) -> rusqlite::Result<()> {
    let id = vm.to_string();
    let next: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_events WHERE vm = ?1")?
        .query_row(params![id], |r| r.get(0))?;
    conn.prepare_cached("INSERT INTO vm_events (vm, seq, at, text) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![id, next, sql_u64(at), text])?;
    conn.prepare_cached("DELETE FROM vm_events WHERE vm = ?1 AND seq <= ?2")?
        .execute(params![id, next - i64::try_from(keep).unwrap_or(i64::MAX)])?;
    Ok(())
}

/// Deleted VMs whose disks `worker` still has to remove (ids).
pub fn deleted_on(conn: &Connection, worker: NodeId) -> rusqlite::Result<Vec<VmId>> {
    conn.prepare_cached("SELECT id FROM deleted_vms WHERE worker = ?1 ORDER BY id")?
        .query_map(params![sql_u64(worker)], |r| Ok(VmId(uuid(r, 0)?)))?
        .collect()
}

/// The nodes that hold image `name`, newest build first: (node, its Raft/gRPC address, the
/// image).
pub fn image_sources(
    conn: &Connection,
    name: &str,
) -> rusqlite::Result<Vec<(NodeId, String, ImageAd)>> {
    conn.prepare_cached(
        "SELECT i.node, n.raft_addr, i.name, i.digest, i.bytes, i.built_at
         FROM node_images i JOIN nodes n ON n.id = i.node
         WHERE i.name = ?1 ORDER BY i.built_at DESC, i.node",
    )?
    .query_map(params![name], |r| {
        Ok((
            unsigned(r, 0)?,
            r.get(1)?,
            ImageAd {
                name: r.get(2)?,
                digest: r.get(3)?,
                bytes: unsigned(r, 4)?,
                built_at: unsigned(r, 5)?,
            },
        ))
    })?
    .collect()
}

/// The images node `node` published.
pub fn images_of(conn: &Connection, node: NodeId) -> rusqlite::Result<Vec<ImageAd>> {
    conn.prepare_cached(
        "SELECT name, digest, bytes, built_at FROM node_images WHERE node = ?1 ORDER BY name",
    )?
    .query_map(params![sql_u64(node)], |r| {
        Ok(ImageAd {
            name: r.get(0)?,
            digest: r.get(1)?,
            bytes: unsigned(r, 2)?,
            built_at: unsigned(r, 3)?,
        })
    })?
    .collect()
}

/// Up to `limit` VMs that wait for a worker, oldest first (the `vms_by_worker` index serves this).
pub fn unplaced_vms(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<Vm>> {
    conn.prepare_cached(&format!(
        "SELECT {VM_COLUMNS} FROM vms WHERE worker IS NULL ORDER BY created_at, id LIMIT ?1"
    ))?
    .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], vm_row)?
    .collect()
}

fn node_row(r: &Row<'_>) -> rusqlite::Result<Node> {
    let roles: String = r.get(3)?;
    Ok(Node {
        id: unsigned(r, 0)?,
        uuid: uuid(r, 1)?,
        name: r.get(2)?,
        roles: parse_roles(&roles).map_err(|e| bad(3, e))?,
        raft_addr: r.get(4)?,
        capacity: Capacity {
            vcpus: unsigned(r, 5)?,
            memory_mib: unsigned(r, 6)?,
            disk_gib: unsigned(r, 7)?,
        },
        used: Capacity {
            vcpus: unsigned(r, 8)?,
            memory_mib: unsigned(r, 9)?,
            disk_gib: unsigned(r, 10)?,
        },
        last_heartbeat: unsigned(r, 11)?,
        joined_at: unsigned(r, 12)?,
    })
}

const NODE_COLUMNS: &str = "id, uuid, name, roles, raft_addr, vcpus, memory_mib, disk_gib,
    used_vcpus, used_memory_mib, used_disk_gib, last_heartbeat, joined_at";

/// One node by id.
pub fn node(conn: &Connection, id: NodeId) -> rusqlite::Result<Option<Node>> {
    conn.prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"))?
        .query_row(params![sql_u64(id)], node_row)
        .optional()
}

/// Every node, by id.
pub fn nodes(conn: &Connection) -> rusqlite::Result<Vec<Node>> {
    conn.prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"))?
        .query_map([], node_row)?
        .collect()
}

/// One account by id.
pub fn account(conn: &Connection, id: AccountId) -> rusqlite::Result<Option<Account>> {
    conn.prepare_cached(
        "SELECT id, name, max_vms, vm_count, created_at, owner FROM accounts WHERE id = ?1",
    )?
    .query_row(params![id.to_string()], account_row)
    .optional()
}

/// One account by name.
pub fn account_named(conn: &Connection, name: &str) -> rusqlite::Result<Option<Account>> {
    conn.prepare_cached(
        "SELECT id, name, max_vms, vm_count, created_at, owner FROM accounts WHERE name = ?1",
    )?
    .query_row(params![name], account_row)
    .optional()
}

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: AccountId(uuid(r, 0)?),
        name: r.get(1)?,
        max_vms: unsigned(r, 2)?,
        vm_count: unsigned(r, 3)?,
        created_at: unsigned(r, 4)?,
        owner: r.get(5)?,
    })
}

/// The account a key belongs to.
pub fn key_owner(conn: &Connection, fp: &Fingerprint) -> rusqlite::Result<Option<AccountId>> {
    conn.prepare_cached("SELECT account FROM ssh_keys WHERE fingerprint = ?1")?
        .query_row(params![fp.as_str()], |r| Ok(AccountId(uuid(r, 0)?)))
        .optional()
}

/// Every key and its account.
pub fn keys(conn: &Connection) -> rusqlite::Result<Vec<(Fingerprint, AccountId)>> {
    conn.prepare_cached("SELECT fingerprint, account FROM ssh_keys")?
        .query_map([], |r| Ok((parsed(r, 0)?, AccountId(uuid(r, 1)?))))?
        .collect()
}

/// The `meta` key holding the SSH host key.
pub const SSH_HOST_KEY: &str = "ssh_host_key";

/// The `meta` key holding the local CA (JSON `TlsMaterial`).
pub const TLS_LOCAL_CA: &str = "tls_local_ca";

/// The cluster's local CA, once a proxy has stored one.
pub fn tls_local_ca(conn: &Connection) -> rusqlite::Result<Option<TlsMaterial>> {
    meta(conn, TLS_LOCAL_CA)?
        .map(|s| serde_json::from_str(&s).map_err(|e| bad(0, e)))
        .transpose()
}

/// An account's keys, oldest first.
pub fn keys_of(conn: &Connection, account: AccountId) -> rusqlite::Result<Vec<SshKey>> {
    conn.prepare_cached(
        "SELECT fingerprint, account, public_key, added_at FROM ssh_keys
         WHERE account = ?1 ORDER BY added_at, fingerprint",
    )?
    .query_map(params![account.to_string()], |r| {
        Ok(SshKey {
            fingerprint: parsed(r, 0)?,
            account: AccountId(uuid(r, 1)?),
            public_key: r.get(2)?,
            added_at: unsigned(r, 3)?,
        })
    })?
    .collect()
}

const REGISTRATION_COLUMNS: &str = "code, fingerprint, public_key, created_at, expires_at";

fn registration_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Registration> {
    Ok(Registration {
        code: r.get(0)?,
        fingerprint: parsed(r, 1)?,
        public_key: r.get(2)?,
        created_at: unsigned(r, 3)?,
        expires_at: unsigned(r, 4)?,
    })
}

/// The newest registration waiting for `fp`, expired or not.
pub fn registration_of(
    conn: &Connection,
    fp: &Fingerprint,
) -> rusqlite::Result<Option<Registration>> {
    conn.prepare_cached(&format!(
        "SELECT {REGISTRATION_COLUMNS} FROM registrations
         WHERE fingerprint = ?1 ORDER BY expires_at DESC LIMIT 1"
    ))?
    .query_row(params![fp.as_str()], registration_row)
    .optional()
}

/// The registration with `code`, expired or not.
pub fn registration(conn: &Connection, code: &str) -> rusqlite::Result<Option<Registration>> {
    conn.prepare_cached(&format!(
        "SELECT {REGISTRATION_COLUMNS} FROM registrations WHERE code = ?1"
    ))?
    .query_row(params![code], registration_row)
    .optional()
}

/// Registrations that expire after `now`, oldest first, at most `limit`.
pub fn registrations_pending(
    conn: &Connection,
    now: u64,
    limit: u32,
) -> rusqlite::Result<Vec<Registration>> {
    conn.prepare_cached(&format!(
        "SELECT {REGISTRATION_COLUMNS} FROM registrations WHERE expires_at > ?1
         ORDER BY created_at, code LIMIT ?2"
    ))?
    .query_map(params![sql_u64(now), limit], registration_row)?
    .collect()
}

/// The account a token belongs to, if it exists.
pub fn token_account(conn: &Connection, id: TokenId) -> rusqlite::Result<Option<AccountId>> {
    conn.prepare_cached("SELECT account FROM api_tokens WHERE id = ?1")?
        .query_row(params![id.to_string()], |r| Ok(AccountId(uuid(r, 0)?)))
        .optional()
}

/// An account's tokens that expired by `now`.
pub fn expired_tokens(
    conn: &Connection,
    account: AccountId,
    now: u64,
) -> rusqlite::Result<Vec<TokenId>> {
    conn.prepare_cached("SELECT id FROM api_tokens WHERE account = ?1 AND expires_at <= ?2")?
        .query_map(params![account.to_string(), sql_u64(now)], |r| {
            Ok(TokenId(uuid(r, 0)?))
        })?
        .collect()
}

/// Every token and its account (the View's set of live token ids).
pub fn all_tokens(conn: &Connection) -> rusqlite::Result<Vec<(TokenId, AccountId)>> {
    conn.prepare_cached("SELECT id, account FROM api_tokens")?
        .query_map([], |r| Ok((TokenId(uuid(r, 0)?), AccountId(uuid(r, 1)?))))?
        .collect()
}

/// An account's tokens, newest first.
pub fn tokens_of(conn: &Connection, account: AccountId) -> rusqlite::Result<Vec<ApiToken>> {
    conn.prepare_cached(
        "SELECT id, account, name, hash, created_at, expires_at, vms, read_only FROM api_tokens
         WHERE account = ?1 ORDER BY created_at DESC, id",
    )?
    .query_map(params![account.to_string()], |r| {
        let vms: String = r.get(6)?;
        Ok(ApiToken {
            id: TokenId(uuid(r, 0)?),
            account: AccountId(uuid(r, 1)?),
            name: r.get(2)?,
            hash: r.get(3)?,
            created_at: unsigned(r, 4)?,
            expires_at: unsigned(r, 5)?,
            vms: serde_json::from_str(&vms).unwrap_or_default(),
            read_only: r.get(7)?,
        })
    })?
    .collect()
}

/// The keys that verify tokens, oldest first.
pub fn token_public_keys(conn: &Connection) -> rusqlite::Result<Vec<PublicKey>> {
    conn.prepare_cached("SELECT kid, public FROM token_keys ORDER BY created_at, kid")?
        .query_map([], |r| {
            Ok(PublicKey {
                kid: r.get(0)?,
                key: r.get(1)?,
            })
        })?
        .collect()
}

/// The key that signs new tokens: the newest not superseded.
pub fn token_signing_key(conn: &Connection) -> rusqlite::Result<Option<SigningKey>> {
    conn.prepare_cached(
        "SELECT kid, pkcs8 FROM token_keys WHERE superseded_at IS NULL
         ORDER BY created_at DESC, kid LIMIT 1",
    )?
    .query_row([], |r| {
        let hex_der: String = r.get(1)?;
        Ok(SigningKey {
            kid: r.get(0)?,
            pkcs8: hex::decode(hex_der).unwrap_or_default(),
        })
    })
    .optional()
}

/// A value from the `meta` table.
pub fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row(params![key], |r| r.get(0))
        .optional()
}

/// Sets a value in the `meta` table.
pub fn set_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// TXT records at `name` (relative to the zone), if any.
pub fn txt(conn: &Connection, name: &str) -> rusqlite::Result<Option<Vec<String>>> {
    let raw: Option<String> = conn
        .prepare_cached("SELECT vals FROM dns_txt WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
        .optional()?;
    raw.map(|s| serde_json::from_str(&s).map_err(|e| bad(0, e)))
        .transpose()
}

/// Every TXT owner and its records.
pub fn all_txt(conn: &Connection) -> rusqlite::Result<Vec<(String, Vec<String>)>> {
    conn.prepare_cached("SELECT name, vals FROM dns_txt")?
        .query_map([], |r| {
            let vals: String = r.get(1)?;
            Ok((
                r.get(0)?,
                serde_json::from_str(&vals).map_err(|e| bad(1, e))?,
            ))
        })?
        .collect()
}
