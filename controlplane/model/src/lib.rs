//! The part of boxd's control plane that every role reads, with light dependencies (no Raft,
//! SQLite or gRPC): the data plane and DNS depend on this crate alone.
//!
//! - `model`: the nouns (accounts, keys, VMs, nodes, pool) and their validation;
//! - `command`: typed log entries, outcomes and refusals;
//! - `view`: the lock-free routing snapshot the data plane reads;
//! - `counters`: what the front doors count, for `/metrics`.
//!
//! `boxd-controlplane` re-exports all three, so its paths (`boxd_controlplane::model::…`) stay.

pub mod command;
pub mod counters;
pub mod model;
pub mod tokens;
pub mod view;

pub use command::{ApplyError, Command, Outcome};
pub use view::{View, ViewHandle, VmRoute};
