//! Cluster membership: founding a cluster, admitting nodes that present a join token, and the
//! member list. Control nodes vote; every other role replicates as a learner. A control node is
//! admitted as a learner first and promoted to voter by the leader's reconcile loop (see
//! `controller`) once it has caught up, so a slow joiner never stalls the quorum.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use openraft::BasicNode;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

use crate::command::{Command, Outcome};
use crate::model::{Capacity, Millis, NodeId, Role, Roles, parse_roles};
use crate::replica::{Replica, WriteError};
use crate::rpc::{Peers, pb};
use crate::store::ReadError;
use crate::token::{self, JoinGrant};

/// Settings for a new cluster.
#[derive(Clone, Debug)]
pub struct Founding {
    /// DNS zone.
    pub zone: String,
    /// Lobby address.
    pub lobby: Ipv4Addr,
    /// Public pool.
    pub public_pool: Ipv4Net,
    /// Default VM quota.
    pub max_vms_per_account: u32,
}

/// This node as it registers itself.
#[derive(Clone, Debug)]
pub struct SelfInfo {
    /// Stable identity.
    pub uuid: Uuid,
    /// Display name.
    pub name: String,
    /// Roles.
    pub roles: Roles,
    /// Resources offered.
    pub capacity: Capacity,
}

/// Founds a cluster with this node as its only voter, or resumes one: initialises Raft, waits
/// for leadership, writes the settings and registers this node. Every step is idempotent.
pub async fn found(
    replica: &Replica,
    cluster_id: Uuid,
    secret: &str,
    founding: &Founding,
    me: &SelfInfo,
) -> Result<(), WriteError> {
    replica.bootstrap().await?;
    replica.wait_ready(Duration::from_secs(30)).await?;
    replica
        .write(Command::InitCluster {
            cluster_id,
            secret: secret.to_owned(),
            zone: founding.zone.clone(),
            lobby: founding.lobby,
            public_pool: founding.public_pool,
            max_vms_per_account: founding.max_vms_per_account,
            at: replica.now(),
        })
        .await?;
    register(replica, Some(replica.id()), me).await?;
    Ok(())
}

/// Writes `RegisterNode` for this node and returns its id.
pub async fn register(
    replica: &Replica,
    id: Option<NodeId>,
    me: &SelfInfo,
) -> Result<NodeId, WriteError> {
    let outcome = replica
        .write(Command::RegisterNode {
            id,
            uuid: me.uuid,
            name: me.name.clone(),
            roles: me.roles.clone(),
            raft_addr: replica.advertise().to_owned(),
            capacity: me.capacity,
            at: replica.now(),
        })
        .await?;
    match outcome {
        Outcome::NodeRegistered { id } => Ok(id),
        other => Err(WriteError::Fatal(format!(
            "unexpected outcome {other:?} for RegisterNode"
        ))),
    }
}

/// Mints a join token valid for `ttl` for `roles`.
pub async fn join_token(replica: &Replica, roles: Roles, ttl: Duration) -> Result<String, String> {
    let (settings, secret) = cluster_identity(replica)
        .await
        .map_err(|e| e.message().to_owned())?;
    let grant = JoinGrant {
        cluster_id: settings,
        roles,
        expires_at: replica.now() / 1000 + ttl.as_secs(),
    };
    token::issue(&secret, &grant).map_err(|e| e.to_string())
}

async fn cluster_identity(replica: &Replica) -> Result<(Uuid, String), Status> {
    let reader = replica.reader();
    let settings = reader.settings().await.map_err(internal)?;
    let secret = reader.cluster_secret().await.map_err(internal)?;
    match (settings, secret) {
        (Some(s), Some(secret)) => Ok((s.cluster_id, secret)),
        _ => Err(Status::unavailable(
            "this node has no cluster settings yet: wait for it to catch up, or ask another node",
        )),
    }
}

fn internal(e: ReadError) -> Status {
    Status::internal(e.to_string())
}

/// Admits a node: checks its token, registers it through the log and adds it as a learner.
/// On a node that is not the leader the request is forwarded to the leader.
pub async fn admit(replica: &Replica, req: pb::JoinRequest) -> Result<pb::JoinReply, Status> {
    if !replica.is_leader() {
        let Some((_, addr)) = replica.leader() else {
            return Err(Status::unavailable(
                "no leader elected yet: retry in a moment",
            ));
        };
        let mut client = replica
            .peers()
            .join(&addr)
            .map_err(|e| Status::internal(e.to_string()))?;
        return client.join(req).await.map(tonic::Response::into_inner);
    }
    let (cluster_id, secret) = cluster_identity(replica).await?;
    let grant = token::verify(&secret, cluster_id, &req.token, replica.now() / 1000)
        .map_err(|e| Status::permission_denied(e.to_string()))?;
    let roles =
        parse_roles(&req.roles.join(",")).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if roles.is_empty() {
        return Err(Status::invalid_argument("a node needs at least one role"));
    }
    if let Some(extra) = roles.iter().find(|r| !grant.roles.contains(r)) {
        return Err(Status::permission_denied(format!(
            "the join token does not allow the {extra} role: create one with `boxd admin join-token --role {}`",
            crate::model::roles_to_string(&roles)
        )));
    }
    let uuid: Uuid = req
        .uuid
        .parse()
        .map_err(|_| Status::invalid_argument("node uuid is not a UUID"))?;
    if req.raft_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "raft address `{}` is not IP:PORT",
            req.raft_addr
        )));
    }
    let write = |e: WriteError| match e {
        WriteError::Rejected(r) => Status::invalid_argument(r.to_string()),
        other => Status::unavailable(other.to_string()),
    };
    let outcome = replica
        .write(Command::RegisterNode {
            id: None,
            uuid,
            name: req.name.clone(),
            roles: roles.clone(),
            raft_addr: req.raft_addr.clone(),
            capacity: Capacity {
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                disk_gib: req.disk_gib,
            },
            at: replica.now(),
        })
        .await
        .map_err(write)?;
    let Outcome::NodeRegistered { id } = outcome else {
        return Err(Status::internal("RegisterNode did not return an id"));
    };
    add_learner(replica, id, &req.raft_addr).await?;
    tracing::info!(node = id, roles = %crate::model::roles_to_string(&roles), addr = %req.raft_addr, "admitted node");
    Ok(pb::JoinReply {
        node_id: id,
        cluster_id: cluster_id.to_string(),
        peer_key: token::peer_key(&secret).map_err(|e| Status::internal(e.to_string()))?,
    })
}

async fn add_learner(replica: &Replica, id: NodeId, addr: &str) -> Result<(), Status> {
    for _ in 0..50 {
        let known = {
            let m = replica.raft().metrics();
            let m = m.borrow();
            m.membership_config.membership().get_node(&id).is_some()
        };
        if known {
            return Ok(());
        }
        let node = BasicNode {
            addr: addr.to_owned(),
        };
        match replica.raft().add_learner(id, node, false).await {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
    }
    Err(Status::unavailable(
        "another membership change is in progress: retry",
    ))
}

/// Asks `seed` (any member) to admit this node; retries while no leader is available.
pub async fn request_join(
    seed: &str,
    req: pb::JoinRequest,
    timeout: Duration,
) -> Result<pb::JoinReply, Status> {
    let start = tokio::time::Instant::now();
    let client = Peers::new("none")
        .map_err(|e| Status::internal(e.to_string()))?
        .join(seed)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    loop {
        match client.clone().join(req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable && start.elapsed() < timeout => {
                tracing::info!(seed, reason = s.message(), "join: waiting for the cluster");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// A member as `boxd admin members` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    /// Raft id.
    pub id: NodeId,
    /// Display name (empty until registered).
    pub name: String,
    /// Roles.
    pub roles: Roles,
    /// Raft/gRPC address.
    pub raft_addr: String,
    /// voter, learner, or removed (registered but no longer in the Raft membership).
    pub membership: String,
    /// Last heartbeat.
    pub last_heartbeat: Millis,
    /// `up`, or `unreachable` once silent past the liveness bound ([`Member::judge`]).
    #[serde(default)]
    pub state: String,
    /// Highest log index known to be replicated to it (leader only).
    pub matched: Option<u64>,
    /// Entries it is behind the leader's log (leader only).
    pub lag: Option<u64>,
}

impl Member {
    /// Sets `state`: `up` when heard from within `liveness` of `now`, else `unreachable`.
    pub fn judge(&mut self, now: Millis, liveness: Millis) {
        let up = self.last_heartbeat != 0 && now.saturating_sub(self.last_heartbeat) <= liveness;
        self.state = if up { "up" } else { "unreachable" }.into();
    }
}

/// Members: the Raft membership joined with the node table.
pub async fn members(replica: &Replica) -> Result<Vec<Member>, ReadError> {
    let nodes = replica.reader().nodes().await?;
    let m = replica.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let last = m.last_log_index.unwrap_or(0);
    let replication = m.replication.clone().unwrap_or_default();
    let mut out: BTreeMap<NodeId, Member> = BTreeMap::new();
    for (id, node) in membership.nodes() {
        let voter = membership.voter_ids().any(|v| v == *id);
        let matched = if m.replication.is_some() {
            if *id == replica.id() {
                Some(last)
            } else {
                replication.get(id).map(|l| l.map_or(0, |l| l.index))
            }
        } else {
            None
        };
        out.insert(
            *id,
            Member {
                id: *id,
                name: String::new(),
                roles: Roles::new(),
                raft_addr: node.addr.clone(),
                membership: if voter { "voter" } else { "learner" }.into(),
                last_heartbeat: 0,
                state: String::new(),
                matched,
                lag: matched.map(|x| last.saturating_sub(x)),
            },
        );
    }
    for n in nodes {
        let e = out.entry(n.id).or_insert_with(|| Member {
            id: n.id,
            name: String::new(),
            roles: Roles::new(),
            raft_addr: n.raft_addr.clone(),
            membership: "removed".into(),
            last_heartbeat: 0,
            state: String::new(),
            matched: None,
            lag: None,
        });
        e.name = n.name;
        e.roles = n.roles;
        e.last_heartbeat = n.last_heartbeat;
    }
    Ok(out.into_values().collect())
}

/// Promotes learners that registered with the control role and have caught up. Runs on the
/// leader; a no-op elsewhere.
pub async fn promote_caught_up(replica: &Replica) -> Result<(), String> {
    if !replica.is_leader() {
        return Ok(());
    }
    let nodes = replica.reader().nodes().await.map_err(|e| e.to_string())?;
    let m = replica.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership().clone();
    let last = m.last_log_index.unwrap_or(0);
    let Some(replication) = m.replication.clone() else {
        return Ok(());
    };
    for n in nodes {
        let is_learner = membership.learner_ids().any(|l| l == n.id);
        if !is_learner || !n.roles.contains(&Role::Control) {
            continue;
        }
        let matched = replication
            .get(&n.id)
            .and_then(|l| l.map(|l| l.index))
            .unwrap_or(0);
        if last.saturating_sub(matched) > 64 {
            continue;
        }
        let ids = std::collections::BTreeSet::from([n.id]);
        match replica
            .raft()
            .change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
            .await
        {
            Ok(_) => tracing::info!(node = n.id, "promoted to voter"),
            Err(e) => tracing::info!(node = n.id, error = %e, "promotion deferred"),
        }
    }
    Ok(())
}
