//! The front door: thread-per-core shards that terminate HTTPS (and, later, SSH) and route by
//! the control plane's lock-free [`View`](boxd_controlplane::view::View). See DESIGN.md.

pub mod https;
