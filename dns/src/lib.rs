//! boxd's authoritative DNS for the cluster zone.
//!
//! - `config`: `[dns]` of the configuration file ([`DnsConfig`]): how the zone is presented
//!   and how it is served;
//! - `zone`: what the engine reads ([`zone::ZoneView`], implemented by the control plane's
//!   `View`);
//! - `engine`: query bytes in, response bytes out, no I/O; `fastpath` answers the common
//!   A/AAAA query without allocating;
//! - `rrl`: response rate limiting (sans-io);
//! - `server`: glommio shards serving UDP and TCP on SO_REUSEPORT sockets.

pub mod config;
pub mod engine;
pub mod fastpath;
pub mod mmsg;
pub mod rrl;
pub mod server;
pub mod zone;

pub use config::DnsConfig;
pub use engine::{Action, Engine, Transport};
pub use zone::{MemZone, ZoneView};
