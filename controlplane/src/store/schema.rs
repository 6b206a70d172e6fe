//! The state machine's SQLite schema. One table per noun of `model`; `meta` holds Raft's
//! bookkeeping (last applied log id, last membership) in the same transaction as the data it
//! describes, so a replica is always internally consistent.

use rusqlite::Connection;

/// Version of the schema below; stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 7;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster (
    one                 INTEGER PRIMARY KEY CHECK (one = 1),
    cluster_id          TEXT NOT NULL,
    secret              TEXT NOT NULL,
    zone                TEXT NOT NULL,
    lobby               TEXT NOT NULL,
    public_pool         TEXT NOT NULL,
    max_vms_per_account INTEGER NOT NULL,
    created_at          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id             INTEGER PRIMARY KEY,
    uuid           TEXT NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    roles          TEXT NOT NULL,
    raft_addr      TEXT NOT NULL,
    vcpus          INTEGER NOT NULL,
    memory_mib     INTEGER NOT NULL,
    disk_gib       INTEGER NOT NULL,
    -- Taken by VMs placed here; maintained by apply (PlaceVm adds, DeleteVm subtracts).
    used_vcpus      INTEGER NOT NULL DEFAULT 0,
    used_memory_mib INTEGER NOT NULL DEFAULT 0,
    used_disk_gib   INTEGER NOT NULL DEFAULT 0,
    last_heartbeat INTEGER NOT NULL,
    joined_at      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    max_vms    INTEGER NOT NULL,
    -- VMs owned now; maintained by apply so the quota check is O(1).
    vm_count   INTEGER NOT NULL DEFAULT 0,
    -- Highest public address ever handed to this account, and how many addresses at or below
    -- it are free again (listed in free_public_ips).
    ip_high_water INTEGER,
    freed_ips     INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    -- 1 for the cluster's owner (the first key's account, ClaimOwner).
    owner      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ssh_keys (
    fingerprint TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    added_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ssh_keys_by_account ON ssh_keys (account);
CREATE TABLE IF NOT EXISTS api_tokens (
    id         TEXT PRIMARY KEY,
    account    TEXT NOT NULL,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    -- JSON array of VM names the token is limited to; empty array: all.
    vms        TEXT NOT NULL DEFAULT '[]',
    read_only  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS api_tokens_by_account ON api_tokens (account, expires_at);
-- Keys that sign API tokens: the newest one not superseded signs; all verify.
CREATE TABLE IF NOT EXISTS token_keys (
    kid           TEXT PRIMARY KEY,
    pkcs8         TEXT NOT NULL,
    public        BLOB NOT NULL,
    created_at    INTEGER NOT NULL,
    superseded_at INTEGER
);
-- People who signed in with the cluster's OpenID provider (version 7): the account their
-- identity (issuer + subject) is linked to.
CREATE TABLE IF NOT EXISTS identities (
    issuer    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    account   TEXT NOT NULL,
    email     TEXT,
    linked_at INTEGER NOT NULL,
    PRIMARY KEY (issuer, subject)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identities_by_account ON identities (account);
CREATE TABLE IF NOT EXISTS registrations (
    code        TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS registrations_by_expiry ON registrations (expires_at, code);
CREATE TABLE IF NOT EXISTS vms (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    owner      TEXT NOT NULL,
    vcpus      INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_gib   INTEGER NOT NULL,
    image      TEXT NOT NULL,
    desired    TEXT NOT NULL,
    observed   TEXT NOT NULL,
    worker     INTEGER,
    private_ip TEXT,
    public_ip  INTEGER NOT NULL,
    http_port  INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- Why the VM is in its observed state, when the worker said (version 2).
    reason     TEXT,
    -- Its guest agent's public host key, OpenSSH form (version 3).
    agent_key  TEXT,
    UNIQUE (owner, public_ip)
);
-- Serves both "VMs on worker N" and "unplaced VMs, oldest first" (worker IS NULL). Not a
-- partial index: SQLite re-prepares statements whose parameters touch a partial index's
-- condition, which cost 10% of apply's CPU.
CREATE INDEX IF NOT EXISTS vms_by_worker ON vms (worker, created_at, id);
-- Addresses freed by deletions, per owner: with accounts.ip_high_water, "lowest free address"
-- is min(lowest freed, next after the high-water mark), O(log n).
CREATE TABLE IF NOT EXISTS free_public_ips (
    owner TEXT NOT NULL,
    ip    INTEGER NOT NULL,
    PRIMARY KEY (owner, ip)
) WITHOUT ROWID;
-- TXT records published in the zone (ACME challenges and the like); vals is a JSON array.
CREATE TABLE IF NOT EXISTS dns_txt (
    name TEXT PRIMARY KEY,
    vals TEXT NOT NULL
);
-- Images each node holds (version 2), replaced whole by PublishImages.
CREATE TABLE IF NOT EXISTS node_images (
    node     INTEGER NOT NULL,
    name     TEXT NOT NULL,
    digest   TEXT NOT NULL,
    bytes    INTEGER NOT NULL,
    built_at INTEGER NOT NULL,
    PRIMARY KEY (name, node)
) WITHOUT ROWID;
-- What happened to each VM, its last MAX_EVENTS (version 4).
CREATE TABLE IF NOT EXISTS vm_events (
    vm   TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    at   INTEGER NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (vm, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deleted_vms (
    id         TEXT PRIMARY KEY,
    worker     INTEGER,
    deleted_at INTEGER NOT NULL
);
"#;

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
}

/// Creates the tables if they do not exist and checks the version.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the state database has schema version {version}, newer than this boxd ({SCHEMA_VERSION}): upgrade boxd"
        )));
    }
    if version == 1 {
        conn.execute_batch("ALTER TABLE vms ADD COLUMN reason TEXT")?;
    }
    if (1..=2).contains(&version) {
        conn.execute_batch("ALTER TABLE vms ADD COLUMN agent_key TEXT")?;
    }
    if (1..=4).contains(&version) && has_table(conn, "accounts")? {
        // Before version 5 the owner was the account ClaimOwner named `owner`.
        conn.execute_batch(
            "ALTER TABLE accounts ADD COLUMN owner INTEGER NOT NULL DEFAULT 0;
             UPDATE accounts SET owner = 1 WHERE name = 'owner';",
        )?;
    }
    if (1..=5).contains(&version) && has_table(conn, "api_tokens")? {
        conn.execute_batch(
            "ALTER TABLE api_tokens ADD COLUMN vms TEXT NOT NULL DEFAULT '[]';
             ALTER TABLE api_tokens ADD COLUMN read_only INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_version_1_database_gains_the_later_columns() {
        let c = Connection::open_in_memory().unwrap();
        // The vms table as version 1 made it, with a row.
        c.execute_batch(
            "CREATE TABLE vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
                vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, disk_gib INTEGER NOT NULL,
                image TEXT NOT NULL, desired TEXT NOT NULL, observed TEXT NOT NULL, worker INTEGER,
                private_ip TEXT, public_ip INTEGER NOT NULL, http_port INTEGER NOT NULL,
                created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, UNIQUE (owner, public_ip));
             INSERT INTO vms VALUES ('v', 'n', 'o', 1, 128, 1, 'minimal', 'running', 'running',
                1, NULL, 1, 80, 1, 1);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        migrate(&c).unwrap();
        let (name, reason, key): (String, Option<String>, Option<String>) = c
            .query_row("SELECT name, reason, agent_key FROM vms", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((name.as_str(), reason, key), ("n", None, None));
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        // Opening again changes nothing.
        migrate(&c).unwrap();
    }

    #[test]
    fn a_version_4_database_knows_its_owner() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                max_vms INTEGER NOT NULL, vm_count INTEGER NOT NULL DEFAULT 0,
                ip_high_water INTEGER, freed_ips INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL);
             INSERT INTO accounts (id, name, max_vms, created_at) VALUES ('a', 'owner', 3, 1),
                ('b', 'bob', 3, 2);
             PRAGMA user_version = 4;",
        )
        .unwrap();
        migrate(&c).unwrap();
        let owners: Vec<String> = c
            .prepare("SELECT name FROM accounts WHERE owner = 1")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(owners, ["owner"]);
    }
}
