//! Commands about nodes: registering, heartbeats with capacity.

#[allow(clippy::wildcard_imports)]
use super::*;
use uuid::Uuid;

use crate::model::{Capacity, Millis, Roles};

/// `RegisterNode`: adds a node, or returns the id it already has (keyed by `uuid`).
#[allow(clippy::too_many_arguments)] // the command's fields, as the dispatch takes them apart
pub(super) fn register_node(
    c: &Connection,
    cache: &mut Cache,
    id: &Option<NodeId>,
    uuid: &Uuid,
    name: &String,
    roles: &Roles,
    raft_addr: &String,
    capacity: &Capacity,
    at: &Millis,
) -> Result<Outcome, Fail> {
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
                    let max: Option<i64> = one(c, "SELECT MAX(id) FROM nodes", [], |r| r.get(0))?;
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

/// `Heartbeat`: a node is alive and offers `capacity`.
pub(super) fn heartbeat(
    c: &Connection,
    node: &NodeId,
    capacity: &Capacity,
    at: &Millis,
) -> Result<Outcome, Fail> {
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
