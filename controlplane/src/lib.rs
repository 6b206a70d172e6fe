//! boxd's control plane: the replicated state every node holds.
//!
//! - `model`: the nouns (accounts, keys, VMs, nodes, pool) and their validation;
//! - `command`: typed log entries, outcomes and refusals;
//! - `store`: the SQLite replica (schema, deterministic apply, reads);
//! - `raft`: openraft glue (log store, state machine with backup-API snapshots, network);
//! - `view`: the lock-free routing snapshot the data plane reads;
//! - `scheduler`: placement as a pure function; `controller`: the loops that run it;
//! - `replica`, `membership`, `rpc`, `token`: running a node, joining one, talking between them.
//!
//! It does not bind sockets or read configuration files: `ops` composes it into the `boxd`
//! binary and hands it listeners.

pub mod command;
pub mod controller;
pub mod membership;
pub mod model;
pub mod raft;
pub mod replica;
pub mod rpc;
pub mod scheduler;
pub mod store;
pub mod token;
pub mod view;

pub use command::{ApplyError, Command, Outcome};
pub use replica::{Clock, RaftTuning, Replica, ReplicaConfig, SystemClock, WriteError};
pub use view::{View, ViewHandle, VmRoute};
