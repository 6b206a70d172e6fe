//! boxd's authoritative DNS for the cluster zone.
//!
//! - `zone`: what the engine reads ([`zone::ZoneView`], implemented by the control plane's
//!   `View`) and how the zone is presented ([`zone::ZoneConfig`]);
//! - `engine`: query bytes in, response bytes out, no I/O; `fastpath` answers the common
//!   A/AAAA query without allocating;
//! - `rrl`: response rate limiting (sans-io);
//! - `server`: glommio shards serving UDP and TCP on SO_REUSEPORT sockets.

pub mod engine;
pub mod fastpath;
pub mod mmsg;
pub mod rrl;
pub mod server;
pub mod zone;

pub use engine::{Action, Engine, Transport};
pub use zone::{MemZone, ZoneConfig, ZoneView};
