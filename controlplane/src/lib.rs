//! boxd's control plane: the replicated state every node holds.
//!
//! - `model`, `command`, `view`: re-exported from `boxd-model` (the nouns, the log's entries,
//!   the data plane's lock-free snapshot), which the data plane and DNS use alone;
//! - `store`: the SQLite replica (schema, deterministic apply, reads);
//! - `raft`: openraft glue (log store, state machine with backup-API snapshots, network);
//! - `scheduler`: placement as a pure function; `controller`: the loops that run it;
//! - `replica`, `membership`, `rpc`, `token`: running a node, joining one, talking between them.
//!
//! It does not bind sockets or read configuration files: `ops` composes it into the `boxd`
//! binary and hands it listeners.

pub mod config;
pub mod controller;
pub mod membership;
pub mod raft;
pub mod replica;
pub mod rpc;
pub mod scheduler;
pub mod store;
pub mod token;

pub use boxd_model::{command, counters, model, tokens, view};
pub use command::{ApplyError, Command, Outcome};
pub use config::RaftConfig;
pub use replica::{Clock, Replica, ReplicaConfig, SystemClock, WriteError};
pub use view::{View, ViewHandle, VmRoute};
