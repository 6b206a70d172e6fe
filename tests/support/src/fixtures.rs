//! Replicated-model values for tests and benchmarks of the View and the engines that read it.

use std::net::Ipv4Addr;

use boxd_model::model::{AccountId, ClusterSettings, Desired, Observed, VmId};
use boxd_model::view::VmRoute;

/// The development cluster's settings: zone `boxd.test`, lobby 127.77.0.1, pool
/// 127.77.0.0/16, `max_vms` per account.
pub fn settings(max_vms: u32) -> ClusterSettings {
    ClusterSettings {
        cluster_id: uuid::Uuid::nil(),
        zone: "boxd.test".into(),
        lobby: Ipv4Addr::new(127, 77, 0, 1),
        public_pool: "127.77.0.0/16".parse().unwrap(),
        max_vms_per_account: max_vms,
        created_at: 0,
    }
}

/// A running VM `name` of `owner` at public address `public_ip`, placed on node 1, without a
/// private address.
pub fn route(id: VmId, name: String, owner: AccountId, public_ip: Ipv4Addr) -> VmRoute {
    VmRoute {
        id,
        name,
        owner,
        public_ip,
        private_ip: None,
        http_port: 80,
        desired: Desired::Running,
        observed: Observed::Running,
        reason: None,
        worker: Some(1),
        agent_key: None,
    }
}
