//! What the admin socket answers: node status, members, VMs, join tokens, and operator writes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use boxd_controlplane::membership;
use boxd_controlplane::model::{NodeId, Role, Roles};
use boxd_controlplane::replica::ReplicaStatus;
use boxd_controlplane::{Replica, WriteError};
use boxd_operations::{Approver, LinkTo};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::admin::{Handler, Request};
use crate::config::BUILT_ROLES;
use crate::identity::Identity;

/// State the admin handler needs.
pub struct AdminContext {
    /// The operations (registrations are approved through them).
    pub ops: Arc<boxd_operations::Operations>,
    /// The replica.
    pub replica: Arc<Replica>,
    /// This node's identity.
    pub identity: Identity,
    /// Display name.
    pub name: String,
    /// Configured roles.
    pub roles: Roles,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The worker's status, on worker nodes.
    pub worker: crate::worker::StatusCell,
}

/// `boxd admin status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Raft id.
    pub node_id: NodeId,
    /// Display name.
    pub name: String,
    /// Cluster.
    pub cluster_id: Uuid,
    /// Zone, once replicated.
    pub zone: Option<String>,
    /// Configured roles.
    pub roles: Roles,
    /// Roles whose services run in this process.
    pub serving: Vec<Role>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// VMs in the local View.
    pub vms: usize,
    /// Raft and replication.
    pub replica: ReplicaStatus,
    /// The worker: runtime (and why), bridge, VMs running, first pass after start.
    #[serde(default)]
    pub worker: Option<crate::worker::WorkerStatus>,
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

impl Handler for AdminContext {
    async fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status {} => {
                let view = self.replica.view().snapshot();
                to_value(&NodeStatus {
                    node_id: self.replica.id(),
                    name: self.name.clone(),
                    cluster_id: self.identity.cluster_id,
                    zone: view.zone().map(str::to_owned),
                    roles: self.roles.clone(),
                    serving: self
                        .roles
                        .iter()
                        .copied()
                        .filter(|r| BUILT_ROLES.contains(r))
                        .collect(),
                    data_dir: self.data_dir.clone(),
                    vms: view.vm_count(),
                    replica: self.replica.status(),
                    worker: self
                        .worker
                        .lock()
                        .ok()
                        .and_then(|w| w.clone())
                        .map(|mut w| {
                            w.disk.read_usage(&self.data_dir);
                            w
                        }),
                })
            }
            Request::Members {} => {
                let mut members = membership::members(&self.replica)
                    .await
                    .map_err(|e| e.to_string())?;
                let liveness = self.ops.settings().liveness.as_millis();
                let now = self.replica.now();
                for m in &mut members {
                    m.judge(now, u64::try_from(liveness).unwrap_or(u64::MAX));
                }
                to_value(&members)
            }
            Request::AgentKey {} => {
                let secret = self
                    .replica
                    .reader()
                    .cluster_secret()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the cluster is not initialised yet")?;
                let seed = boxd_controlplane::model::agent_key_seed(&secret);
                Ok(serde_json::json!({
                    "public_key": boxd_worker::agent_key::cluster_public(&seed),
                }))
            }
            Request::Vms {} => to_value(
                &self
                    .replica
                    .reader()
                    .vms()
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            Request::JoinToken { roles, ttl_secs } => {
                let roles: Roles = roles.into_iter().collect();
                if roles.is_empty() {
                    return Err("name at least one role with --role".into());
                }
                let token =
                    membership::join_token(&self.replica, roles, Duration::from_secs(ttl_secs))
                        .await?;
                Ok(json!({ "token": token, "seed": self.replica.advertise() }))
            }
            Request::Registrations {} => {
                let keys = self.ops.pending_keys(Approver::Operator).await;
                to_value(&keys.map_err(|e| e.message)?)
            }
            Request::Approve {
                code,
                name,
                to_account,
            } => {
                let to = match (name, to_account) {
                    (None, Some(a)) => LinkTo::Account(a),
                    (name, None) => LinkTo::NewAccount(name),
                    (Some(_), Some(_)) => {
                        return Err("give --name (a new account) or --to-account, not both".into());
                    }
                };
                let a = self.ops.approve(Approver::Operator, &code, to).await;
                to_value(&a.map_err(|e| e.message)?)
            }
            Request::RotateTokenKey {} => {
                let kid = crate::api::add_token_key(&self.replica, false).await?;
                Ok(json!({ "kid": kid }))
            }
            Request::Write { command } => match self.replica.write(command).await {
                Ok(outcome) => Ok(json!({ "applied": true, "outcome": outcome })),
                Err(WriteError::Rejected(e)) => {
                    Ok(json!({ "applied": true, "refused": e, "message": e.to_string() }))
                }
                Err(e) => Err(e.to_string()),
            },
        }
    }
}
