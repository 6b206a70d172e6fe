//! Internal gRPC between members: the generated protocol, the peer-key check, and a cache of
//! client channels. The services themselves are in `server`; openraft's network adapter is
//! `raft::network`.

pub mod server;
pub mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::command::Response;
use crate::model::NodeId;
use crate::token::constant_time_eq;

/// Generated protocol types and stubs.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("boxd.cluster.v1");
}

/// Metadata key carrying the peer key.
pub const PEER_HEADER: &str = "x-boxd-peer";

/// A forwarded write's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum WriteReply {
    /// Committed and applied; the log's answer.
    Applied {
        /// Outcome or refusal.
        response: Response,
        /// The log index of the entry it was applied in: a node that forwarded the write
        /// answers only once its own replica has applied that far (read-your-writes). 0 from
        /// a leader of an older version, which did not say.
        #[serde(default)]
        index: u64,
    },
    /// The receiver is not the leader (any more); try `leader` if known.
    NotLeader {
        /// Leader id and address, if known.
        leader: Option<(NodeId, String)>,
    },
    /// Raft failed on the receiver.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Adds the peer key to outgoing calls.
#[derive(Clone)]
pub struct PeerAuth(MetadataValue<Ascii>);

impl tonic::service::Interceptor for PeerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(PEER_HEADER, self.0.clone());
        Ok(req)
    }
}

/// Checks the peer key on incoming calls.
#[derive(Clone)]
pub struct CheckPeer(Arc<str>);

impl CheckPeer {
    /// Accepts calls carrying `key`.
    pub fn new(key: &str) -> Self {
        Self(Arc::from(key))
    }
}

impl tonic::service::Interceptor for CheckPeer {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let ok = req
            .metadata()
            .get(PEER_HEADER)
            .is_some_and(|v| constant_time_eq(v.as_bytes(), self.0.as_bytes()));
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong peer key: only members of this cluster may call this service",
            ))
        }
    }
}

/// A client authenticated as a member.
pub type Authed = InterceptedService<Channel, PeerAuth>;

/// Client channels to other members, one per address, created lazily and reused.
#[derive(Clone)]
pub struct Peers {
    auth: PeerAuth,
    key: Arc<str>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// A peer address that is not usable.
#[derive(Debug, thiserror::Error)]
#[error("peer address `{addr}` is not usable: {reason}")]
pub struct BadAddress {
    addr: String,
    reason: String,
}

/// Opens a lazy channel to `addr` (`IP:PORT`).
pub fn channel(addr: &str) -> Result<Channel, BadAddress> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| BadAddress {
        addr: addr.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

impl Peers {
    /// Clients that authenticate with `peer_key`.
    pub fn new(peer_key: &str) -> Result<Self, BadAddress> {
        let value = peer_key.parse().map_err(|_| BadAddress {
            addr: String::new(),
            reason: "the peer key is not ASCII".into(),
        })?;
        Ok(Self {
            auth: PeerAuth(value),
            key: Arc::from(peer_key),
            channels: Arc::default(),
        })
    }

    /// A Raft stream client for `addr` (AppendEntries and Vote; see [`stream`]).
    pub fn raft_stream(&self, addr: &str) -> stream::RaftStream {
        stream::RaftStream::new(addr, Arc::clone(&self.key))
    }

    fn channel(&self, addr: &str) -> Result<Channel, BadAddress> {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = channel(addr)?;
        map.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// The Raft service of `addr`.
    pub fn raft(&self, addr: &str) -> Result<pb::raft_client::RaftClient<Authed>, BadAddress> {
        Ok(
            pb::raft_client::RaftClient::with_interceptor(self.channel(addr)?, self.auth.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
    }

    /// The Cluster service of `addr`.
    pub fn cluster(
        &self,
        addr: &str,
    ) -> Result<pb::cluster_client::ClusterClient<Authed>, BadAddress> {
        Ok(pb::cluster_client::ClusterClient::with_interceptor(
            self.channel(addr)?,
            self.auth.clone(),
        ))
    }

    /// The Images service of `addr`, on a connection of its own: hundreds of megabytes of
    /// image must not queue Raft's heartbeats behind them on the shared one.
    pub fn images(
        &self,
        addr: &str,
    ) -> Result<pb::images_client::ImagesClient<Authed>, BadAddress> {
        Ok(pb::images_client::ImagesClient::with_interceptor(
            channel(addr)?,
            self.auth.clone(),
        ))
    }

    /// The Join service of `addr` (needs no peer key).
    pub fn join(&self, addr: &str) -> Result<pb::join_client::JoinClient<Channel>, BadAddress> {
        Ok(pb::join_client::JoinClient::new(self.channel(addr)?))
    }
}
