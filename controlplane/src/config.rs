//! `[raft]` of boxd's configuration file, defined once: the binary embeds this type in its
//! `Config`, and the replica and the Raft listener read it as it is. Defaults here are the
//! only ones (`ops/src/config/default.toml` is checked against them by a test).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `[raft]`: the Raft/gRPC port, Raft timing and log retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Address the Raft/gRPC port listens on.
    pub listen: SocketAddr,
    /// Address other members use; empty means `listen`.
    pub advertise: String,
    /// Leader heartbeat interval, milliseconds.
    pub heartbeat_ms: u64,
    /// Lower bound of the election timeout, milliseconds.
    pub election_min_ms: u64,
    /// Upper bound of the election timeout, milliseconds.
    pub election_max_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log after a snapshot (lets slightly lagging nodes catch up without
    /// a snapshot).
    pub logs_kept: u64,
    /// How long a write may wait for a leader before failing, milliseconds.
    pub write_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            advertise: String::new(),
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
            snapshot_every: 10_000,
            logs_kept: 1_000,
            write_timeout_ms: 10_000,
        }
    }
}

impl RaftConfig {
    /// The address other members use.
    pub fn advertise_addr(&self) -> String {
        if self.advertise.is_empty() {
            self.listen.to_string()
        } else {
            self.advertise.clone()
        }
    }

    /// Checks what the types cannot express; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |field, message: String| Err((field, message));
        if self.heartbeat_ms == 0 {
            return bad("raft.heartbeat_ms", "use 1 or more milliseconds".into());
        }
        if self.election_min_ms < 3 * self.heartbeat_ms {
            return bad(
                "raft.election_min_ms",
                format!(
                    "{} ms is less than three heartbeats ({} ms): raise it, or lower raft.heartbeat_ms",
                    self.election_min_ms,
                    3 * self.heartbeat_ms
                ),
            );
        }
        if self.election_max_ms <= self.election_min_ms {
            return bad(
                "raft.election_max_ms",
                format!(
                    "must be greater than raft.election_min_ms ({} ms)",
                    self.election_min_ms
                ),
            );
        }
        if self.snapshot_every == 0 {
            return bad("raft.snapshot_every", "use 1 or more entries".into());
        }
        if self.write_timeout_ms < self.election_max_ms {
            return bad(
                "raft.write_timeout_ms",
                "must be at least raft.election_max_ms, or writes fail during every election"
                    .into(),
            );
        }
        if !self.advertise.is_empty() && self.advertise.parse::<SocketAddr>().is_err() {
            return bad(
                "raft.advertise",
                format!(
                    "`{}` is not IP:PORT (leave it empty to use raft.listen)",
                    self.advertise
                ),
            );
        }
        if self.advertise.is_empty() && self.listen.ip().is_unspecified() {
            return bad(
                "raft.advertise",
                format!(
                    "raft.listen is {} which other nodes cannot dial: set raft.advertise to this node's reachable IP:PORT",
                    self.listen
                ),
            );
        }
        Ok(())
    }
}
