//! Workers that went silent. Every node heartbeats through the log; a worker not heard from
//! for longer than the liveness bound (`[node] heartbeat_secs × missed_heartbeats`) may be
//! down, and what its VMs were last reported doing is no longer known: the operations show
//! them as [`Observed::Unknown`] with which worker and how long, instead of `running` forever,
//! and the front doors say so instead of blaming the VM.

use std::collections::HashMap;

use boxd_model::model::{Desired, Millis, Node, NodeId, Observed, Vm};

use crate::{OpError, Operations};

/// Why a worker counts as down: `worker NAME not heard from for N s`.
fn silence(n: &Node, now: Millis) -> String {
    let secs = now.saturating_sub(n.last_heartbeat) / 1000;
    let name = if n.name.is_empty() {
        format!("node {}", n.id)
    } else {
        n.name.clone()
    };
    format!("worker {name} not heard from for {secs} s")
}

/// `vms` with those whose worker is in `silent` and that should run shown as unknown, the
/// worker's silence as their reason. (A VM meant to be stopped stays stopped.)
pub fn mark_unknown(vms: &mut [Vm], silent: &HashMap<NodeId, String>) {
    for v in vms {
        let Some(why) = v.worker.and_then(|w| silent.get(&w)) else {
            continue;
        };
        if v.desired == Desired::Running {
            v.observed = Observed::Unknown;
            v.reason = Some(why.clone());
        }
    }
}

impl Operations {
    /// Workers silent past the liveness bound, with why they count as down.
    pub async fn silent_workers(&self) -> Result<HashMap<NodeId, String>, OpError> {
        let now = self.backend.now();
        let bound = u64::try_from(self.settings.liveness.as_millis()).unwrap_or(u64::MAX);
        Ok(self
            .backend
            .workers()
            .await?
            .into_iter()
            .filter(|n| now.saturating_sub(n.last_heartbeat) > bound)
            .map(|n| (n.id, silence(&n, now)))
            .collect())
    }

    /// Why `worker` counts as down, if it does (for the front doors' messages when a VM there
    /// cannot be reached). `None` also when that cannot be read.
    pub async fn worker_silence(&self, worker: Option<NodeId>) -> Option<String> {
        let w = worker?;
        self.silent_workers().await.ok()?.remove(&w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxd_model::model::{AccountId, VmId, VmSpec};

    fn vm(name: &str, worker: NodeId) -> Vm {
        Vm {
            id: VmId::random(),
            name: name.into(),
            owner: AccountId::random(),
            spec: VmSpec::default(),
            desired: Desired::Running,
            observed: Observed::Running,
            reason: None,
            worker: Some(worker),
            private_ip: None,
            public_ip: std::net::Ipv4Addr::LOCALHOST,
            http_port: 80,
            created_at: 0,
            updated_at: 0,
            agent_key: None,
        }
    }

    #[test]
    fn only_vms_meant_to_run_on_a_silent_worker_are_unknown() {
        let mut vms = vec![vm("a", 1), vm("b", 2), vm("c", 1)];
        vms[2].desired = Desired::Stopped;
        vms[2].observed = Observed::Stopped;
        let silent = HashMap::from([(1, "worker w1 not heard from for 34 s".to_owned())]);
        mark_unknown(&mut vms, &silent);
        assert_eq!(vms[0].observed, Observed::Unknown);
        assert_eq!(
            vms[0].reason.as_deref(),
            Some("worker w1 not heard from for 34 s")
        );
        assert_eq!(vms[1].observed, Observed::Running);
        assert_eq!(vms[2].observed, Observed::Stopped);
    }
}
