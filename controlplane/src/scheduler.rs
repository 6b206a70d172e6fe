//! Placement: a pure function from the state (workers, their load, VMs waiting) to `PlaceVm`
//! decisions. The control leader runs it after changes and proposes the decisions through the
//! log; apply re-checks capacity, so a decision made on a stale view is refused, not applied.
//!
//! Policy: spread. A VM goes to the live worker with the most free memory after placement, then
//! the most free vCPUs, then the lowest node id (a deterministic tie-break, so two leaders with
//! the same state make the same choice).

use crate::model::{Capacity, Millis, Node, NodeId, Role, Vm, VmId};

/// A worker as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerLoad {
    /// Node id.
    pub node: NodeId,
    /// What it offers.
    pub capacity: Capacity,
    /// What placed VMs take.
    pub used: Capacity,
}

impl WorkerLoad {
    fn free(&self) -> Capacity {
        self.capacity.saturating_sub(&self.used)
    }
}

/// Workers that count as alive at `now`: worker role and a heartbeat within `liveness`.
pub fn live_workers(nodes: &[Node], now: Millis, liveness: Millis) -> Vec<WorkerLoad> {
    nodes
        .iter()
        .filter(|n| n.roles.contains(&Role::Worker))
        .filter(|n| now.saturating_sub(n.last_heartbeat) <= liveness)
        .map(|n| WorkerLoad {
            node: n.id,
            capacity: n.capacity,
            used: n.used,
        })
        .collect()
}

/// The worker for one VM needing `want`, or `None` when nothing fits.
pub fn place(workers: &[WorkerLoad], want: &Capacity) -> Option<NodeId> {
    workers
        .iter()
        .filter(|w| w.free().fits(want))
        .max_by(|a, b| {
            let (fa, fb) = (a.free(), b.free());
            fa.memory_mib
                .cmp(&fb.memory_mib)
                .then(fa.vcpus.cmp(&fb.vcpus))
                // Lower id wins ties: reverse so that max_by picks it.
                .then(b.node.cmp(&a.node))
        })
        .map(|w| w.node)
}

/// Places `waiting` VMs in order, accounting for each decision before the next.
pub fn plan(mut workers: Vec<WorkerLoad>, waiting: &[Vm]) -> Vec<(VmId, NodeId)> {
    let mut out = Vec::new();
    for vm in waiting {
        let want = vm.spec.capacity();
        if let Some(node) = place(&workers, &want) {
            if let Some(w) = workers.iter_mut().find(|w| w.node == node) {
                w.used = w.used.saturating_add(&want);
            }
            out.push((vm.id, node));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccountId, Desired, Observed, VmSpec};

    fn cap(vcpus: u32, memory_mib: u64) -> Capacity {
        Capacity {
            vcpus,
            memory_mib,
            disk_gib: 100,
        }
    }

    /// Used or wanted resources (1 GiB of disk).
    fn u(vcpus: u32, memory_mib: u64) -> Capacity {
        Capacity {
            vcpus,
            memory_mib,
            disk_gib: 1,
        }
    }

    fn w(node: NodeId, capacity: Capacity, used: Capacity) -> WorkerLoad {
        WorkerLoad {
            node,
            capacity,
            used,
        }
    }

    fn vm(memory_mib: u64) -> Vm {
        Vm {
            id: VmId::random(),
            name: "v".into(),
            owner: AccountId::random(),
            spec: VmSpec {
                memory_mib,
                ..VmSpec::default()
            },
            desired: Desired::Running,
            observed: Observed::Pending,
            reason: None,
            worker: None,
            private_ip: None,
            public_ip: "127.77.0.2".parse().unwrap(),
            http_port: 80,
            created_at: 0,
            updated_at: 0,
            agent_key: None,
        }
    }

    #[test]
    fn place_table() {
        let none = Capacity::default();
        let cases: Vec<(&str, Vec<WorkerLoad>, Capacity, Option<NodeId>)> = vec![
            ("no workers", vec![], u(1, 512), None),
            (
                "one fits",
                vec![w(1, cap(2, 1024), none)],
                u(1, 512),
                Some(1),
            ),
            (
                "exact fit",
                vec![w(1, cap(2, 1024), u(1, 512))],
                u(1, 512),
                Some(1),
            ),
            (
                "memory too small",
                vec![w(1, cap(8, 1024), u(0, 600))],
                u(1, 512),
                None,
            ),
            (
                "cpus too few",
                vec![w(1, cap(1, 8192), u(1, 0))],
                u(1, 512),
                None,
            ),
            (
                "most free memory wins",
                vec![w(1, cap(4, 4096), none), w(2, cap(4, 8192), none)],
                u(1, 512),
                Some(2),
            ),
            (
                "then most free cpus",
                vec![w(1, cap(2, 4096), none), w(2, cap(4, 4096), none)],
                u(1, 512),
                Some(2),
            ),
            (
                "then lowest id",
                vec![w(3, cap(4, 4096), none), w(2, cap(4, 4096), none)],
                u(1, 512),
                Some(2),
            ),
            (
                "skips full",
                vec![w(1, cap(4, 8192), u(4, 0)), w(2, cap(4, 1024), none)],
                u(1, 512),
                Some(2),
            ),
        ];
        for (name, workers, want, expect) in cases {
            assert_eq!(place(&workers, &want), expect, "{name}");
        }
    }

    #[test]
    fn plan_accounts_for_earlier_decisions() {
        let workers = vec![
            w(1, cap(8, 2048), Capacity::default()),
            w(2, cap(8, 2048), Capacity::default()),
        ];
        let vms: Vec<Vm> = (0..5).map(|_| vm(1024)).collect();
        let p = plan(workers, &vms);
        let nodes: Vec<NodeId> = p.iter().map(|(_, n)| *n).collect();
        assert_eq!(nodes, vec![1, 2, 1, 2], "spread, then stop when full");
    }

    #[test]
    fn liveness_filters_stale_and_non_workers() {
        let node = |id, roles: &str, hb, used| Node {
            id,
            uuid: uuid::Uuid::from_u128(u128::from(id)),
            name: format!("n{id}"),
            roles: crate::model::parse_roles(roles).unwrap(),
            raft_addr: "127.0.0.1:7000".into(),
            capacity: cap(4, 4096),
            used,
            last_heartbeat: hb,
            joined_at: 0,
        };
        let nodes = vec![
            node(1, "control,worker", 10_000, u(1, 512)),
            node(2, "worker", 1_000, Capacity::default()),
            node(3, "dns", 10_000, Capacity::default()),
        ];
        let live = live_workers(&nodes, 10_500, 5_000);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].node, 1);
        assert_eq!(live[0].used, u(1, 512));
    }
}
