//! The internal services a member serves on its Raft/gRPC port: Raft RPCs and forwarded writes
//! (peer-key authenticated) and Join (token authenticated) over gRPC, and the Raft stream
//! connections (`rpc::stream`) that share the port.

use std::sync::Arc;

use openraft::raft::InstallSnapshotRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::{CheckPeer, pb};
use crate::command::Command;
use crate::raft::network::SnapshotHeader;
use crate::replica::Replica;

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("bad request: {e}")))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<pb::Json>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(pb::Json { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

/// Serves Raft RPCs into the local Raft instance.
pub struct RaftService(Arc<Replica>);

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn install_snapshot(
        &self,
        req: Request<pb::SnapshotChunk>,
    ) -> Result<Response<pb::Json>, Status> {
        let chunk = req.into_inner();
        let h: SnapshotHeader = decode(&chunk.header)?;
        let rpc = InstallSnapshotRequest {
            vote: h.vote,
            meta: h.meta,
            offset: h.offset,
            data: chunk.data,
            done: h.done,
        };
        reply(&self.0.raft().install_snapshot(rpc).await)
    }
}

/// Serves writes forwarded by followers.
pub struct ClusterService(Arc<Replica>);

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn write(&self, req: Request<pb::Json>) -> Result<Response<pb::Json>, Status> {
        let cmd: Command = decode(&req.into_inner().json)?;
        reply(&self.0.write_here(cmd).await)
    }
}

/// Serves join requests.
pub struct JoinService(Arc<Replica>);

#[tonic::async_trait]
impl pb::join_server::Join for JoinService {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        crate::membership::admit(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }
}

/// Serves Raft stream connections (`rpc::stream`) that arrive on the gRPC port.
#[derive(Clone)]
pub struct StreamService {
    replica: Arc<Replica>,
    peer_key: Arc<str>,
}

impl StreamService {
    /// Serves `conn` (recognised by [`super::stream::is_raft_stream`]) until it closes.
    pub async fn serve(&self, conn: tokio::net::TcpStream) {
        super::stream::serve(
            self.replica.raft().clone(),
            Arc::clone(&self.peer_key),
            conn,
        )
        .await;
    }
}

/// The three services, ready to add to a tonic server, and the Raft stream service beside them.
pub struct Services {
    /// Raft RPCs (peer key required).
    pub raft: InterceptedService<pb::raft_server::RaftServer<RaftService>, CheckPeer>,
    /// Forwarded writes (peer key required).
    pub cluster: InterceptedService<pb::cluster_server::ClusterServer<ClusterService>, CheckPeer>,
    /// Join (token in the request).
    pub join: pb::join_server::JoinServer<JoinService>,
    /// AppendEntries and Vote on plain streams (peer key in the preface).
    pub stream: StreamService,
}

/// Builds the services for `replica`, checking `peer_key` on internal calls.
pub fn services(replica: &Arc<Replica>, peer_key: &str) -> Services {
    let check = CheckPeer::new(peer_key);
    Services {
        raft: InterceptedService::new(
            pb::raft_server::RaftServer::new(RaftService(Arc::clone(replica)))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            check.clone(),
        ),
        cluster: InterceptedService::new(
            pb::cluster_server::ClusterServer::new(ClusterService(Arc::clone(replica))),
            check,
        ),
        join: pb::join_server::JoinServer::new(JoinService(Arc::clone(replica))),
        stream: StreamService {
            replica: Arc::clone(replica),
            peer_key: Arc::from(peer_key),
        },
    }
}
