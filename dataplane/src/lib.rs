//! The front door: thread-per-core shards that terminate SSH and HTTPS and route by the
//! control plane's lock-free [`View`](boxd_model::view::View). See DESIGN.md.

pub mod https;
pub mod shard;
pub mod ssh;
