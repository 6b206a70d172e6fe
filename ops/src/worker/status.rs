//! What `boxd admin status` says about the worker, disks included.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What `boxd admin status` says about the worker.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Runtime in use.
    pub runtime: String,
    /// Why that runtime.
    pub reason: String,
    /// Bridge and subnet.
    pub bridge: String,
    /// Subnet of the bridge.
    pub subnet: String,
    /// Outbound NAT for VMs: how, or why off (known once the first VM started).
    pub nat: Option<String>,
    /// VM processes answering on their API sockets at the last pass.
    pub running: usize,
    /// VMs found already running at the first pass (reconnected after a restart).
    pub reconnected: usize,
    /// Milliseconds from the supervisor's start to the end of its first pass.
    pub first_pass_ms: Option<u64>,
    /// Disks: their sizes against what the worker offers, and what they take on the host.
    #[serde(default)]
    pub disk: DiskStatus,
}

/// The worker's disk accounting (disks are thin: see vmm's `worker::disk`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Disk for VMs before overcommit (`worker.disk_gib`, or detected at start).
    pub disk_gib: u64,
    /// `worker.disk_overcommit_percent`.
    pub overcommit_percent: u32,
    /// The sizes of the VMs placed here, added up.
    pub allocated_gib: u64,
    /// What their disks take on the host (read when asked).
    pub written_bytes: u64,
    /// Free for boxd on the data directory's filesystem (read when asked).
    pub free_bytes: u64,
}

impl DiskStatus {
    /// What VMs' sizes may add up to.
    pub fn offered_gib(&self) -> u64 {
        self.disk_gib
            .saturating_mul(u64::from(self.overcommit_percent))
            / 100
    }

    /// Whether the host is close to full, so VMs writing within their sizes may fail.
    pub fn nearly_full(&self) -> bool {
        let total = self.written_bytes.saturating_add(self.free_bytes);
        total > 0 && self.free_bytes < total / 10
    }

    /// Reads what the disks take and what is free now.
    pub fn read_usage(&mut self, data_dir: &std::path::Path) {
        self.written_bytes = boxd_worker::written_bytes(data_dir);
        self.free_bytes = crate::host::free_disk_bytes(data_dir);
    }
}

/// Shared status cell.
pub type StatusCell = Arc<Mutex<Option<WorkerStatus>>>;
