//! openraft's network: AppendEntries and Vote on a Raft stream per target (`rpc::stream`),
//! snapshots over the internal gRPC service.
//!
//! Transport failures become `Unreachable` (openraft backs off) and the remote node's own Raft
//! errors come back as `RemoteError`, so openraft sees exactly what the peer decided.

// openraft's RPC error types are large by design; they are what its traits return.
#![allow(clippy::result_large_err)]

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::TypeConfig;
use crate::model::NodeId;
use crate::rpc::stream::{self, CallError, RaftStream};
use crate::rpc::{Peers, pb};

/// Creates connections to members.
#[derive(Clone)]
pub struct Network {
    peers: Peers,
}

impl Network {
    /// A network using `peers`' channels.
    pub fn new(peers: Peers) -> Self {
        Self { peers }
    }
}

/// A connection to one member.
pub struct Connection {
    target: NodeId,
    addr: String,
    peers: Peers,
    stream: RaftStream,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Connection {
            target,
            addr: node.addr.clone(),
            stream: self.peers.raft_stream(&node.addr),
            peers: self.peers.clone(),
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

fn transport<E: std::error::Error>(e: tonic::Status) -> RPCError<NodeId, BasicNode, E> {
    match e.code() {
        tonic::Code::Unavailable | tonic::Code::Unauthenticated => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn stream_error<E: std::error::Error>(e: CallError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        CallError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Broken { .. } | CallError::Timeout(_) => {
            RPCError::Network(NetworkError::new(&e))
        }
    }
}

fn encode<E: std::error::Error>(
    v: &impl Serialize,
) -> Result<Vec<u8>, RPCError<NodeId, BasicNode, E>> {
    serde_json::to_vec(v).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

fn decode<T, E>(
    target: NodeId,
    json: &[u8],
) -> Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
where
    T: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let reply: Result<T, RaftError<NodeId, E>> =
        serde_json::from_slice(json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    reply.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

fn timed<T>(msg: T, option: &RPCOption) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(option.hard_ttl());
    req
}

impl Connection {
    fn client(&self) -> Result<pb::raft_client::RaftClient<crate::rpc::Authed>, Unreachable> {
        self.peers
            .raft(&self.addr)
            .map_err(|e| Unreachable::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let request = stream::append_entries_frame(&rpc)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = self
            .stream
            .call_frame(&request, option.hard_ttl())
            .await
            .map_err(stream_error)?;
        decode(self.target, answer)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let InstallSnapshotRequest {
            vote,
            meta,
            offset,
            data,
            done,
        } = rpc;
        let header = encode(&SnapshotHeader {
            vote,
            meta,
            offset,
            done,
        })?;
        let reply = self
            .client()?
            .install_snapshot(timed(pb::SnapshotChunk { header, data }, &option))
            .await
            .map_err(transport)?;
        decode(self.target, &reply.into_inner().json)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let answer = self
            .stream
            .call(stream::VOTE, &rpc, option.hard_ttl())
            .await
            .map_err(stream_error)?;
        decode(self.target, answer)
    }
}

/// An `InstallSnapshotRequest` without its data, which travels as raw bytes beside it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct SnapshotHeader {
    pub vote: openraft::Vote<NodeId>,
    pub meta: super::SnapshotMeta,
    pub offset: u64,
    pub done: bool,
}
