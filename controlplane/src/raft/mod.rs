//! openraft glue: the type configuration, the SQLite log store and state machine, and the gRPC
//! network between nodes. Nothing here decides anything about VMs; it moves batches of `Command`s into the
//! same order on every node and hands them to `store::apply`.

pub mod codec;
pub mod log_store;
pub mod network;
pub mod state_machine;

use openraft::{AnyError, BasicNode, StorageError, StorageIOError};

use crate::command::{Batch, BatchResponse};
use crate::model::NodeId;

openraft::declare_raft_types!(
    /// boxd's Raft types: batches of commands in, one answer per command out, SQLite backup
    /// files as snapshots.
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = tokio::fs::File,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A storage error.
pub type StoreError = StorageError<NodeId>;
/// Membership as stored.
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;

/// Wraps any error as a storage read error.
pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StoreError {
    StorageIOError::read(AnyError::new(&e)).into()
}

/// Wraps any error as a storage write error.
pub(crate) fn write_err(e: impl std::error::Error + 'static) -> StoreError {
    StorageIOError::write(AnyError::new(&e)).into()
}
