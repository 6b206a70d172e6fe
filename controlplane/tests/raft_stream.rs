//! The Raft stream transport (`rpc::stream`) against a real single-node replica: it carries
//! openraft's Vote and AppendEntries and their answers, shares a port with gRPC by its first
//! bytes, and closes on strangers and oversized frames.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use boxd_controlplane::model::NodeId;
use boxd_controlplane::raft::TypeConfig;
use boxd_controlplane::rpc::server;
use boxd_controlplane::rpc::stream::{self, CallError, RaftStream};
use boxd_controlplane::{RaftConfig, Replica, ReplicaConfig, SystemClock};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{CommittedLeaderId, LogId, Vote};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "the-peer-key";
const DEADLINE: Duration = Duration::from_secs(5);

/// A founded one-node replica whose port serves Raft streams (and drops anything else).
async fn node() -> (tempfile::TempDir, Arc<Replica>, String) {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let replica = Replica::open(
        ReplicaConfig {
            data_dir: dir.path().to_owned(),
            node_id: 1,
            advertise: addr.clone(),
            peer_key: KEY.into(),
            raft: RaftConfig::default(),
        },
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    replica.bootstrap().await.unwrap();
    replica.wait_ready(Duration::from_secs(10)).await.unwrap();
    let streams = server::services(&replica, KEY).stream;
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let streams = streams.clone();
            tokio::spawn(async move {
                if stream::is_raft_stream(&conn).await {
                    streams.serve(conn).await;
                }
            });
        }
    });
    (dir, replica, addr)
}

fn term(replica: &Replica) -> u64 {
    replica.raft().metrics().borrow().current_term
}

#[tokio::test]
async fn votes_and_appends_travel_and_come_back_with_the_peers_answer() {
    let (_dir, replica, addr) = node().await;
    let mut client = RaftStream::new(&addr, Arc::from(KEY));

    // A candidate from an older term does not get the vote; the answer says the node's own.
    let stale = VoteRequest::<NodeId>::new(Vote::new(0, 2), None);
    let answer = client.call(stream::VOTE, &stale, DEADLINE).await.unwrap();
    let vote: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
        serde_json::from_slice(answer).unwrap();
    let vote = vote.unwrap();
    assert!(!vote.vote_granted);
    assert_eq!(vote.vote.leader_id().term, term(&replica));

    // The same connection carries the next request: an AppendEntries from a leader of an older
    // term is refused with the node's higher vote.
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(0, 2),
        prev_log_id: Some(LogId::new(CommittedLeaderId::new(0, 2), 0)),
        entries: Vec::new(),
        leader_commit: None,
    };
    // In postcard, as leaders send it.
    let binary = stream::append_entries_frame(&append).unwrap();
    let answer = client.call_frame(&binary, DEADLINE).await.unwrap().to_vec();
    // Kind 1, the JSON form leaders sent before postcard, is not served any more: the
    // connection closes rather than answer.
    assert!(client.call(1, &append, DEADLINE).await.is_err());
    let append: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
        serde_json::from_slice(&answer).unwrap();
    assert!(
        matches!(append.unwrap(), AppendEntriesResponse::HigherVote(v) if v.leader_id().term == term(&replica)),
        "a stale leader is told about the higher vote"
    );
}

#[tokio::test]
async fn a_malformed_binary_append_closes_the_connection() {
    let (_dir, replica, addr) = node().await;
    let mut client = RaftStream::new(&addr, Arc::from(KEY));
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(0, 2),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let mut frame = stream::append_entries_frame(&append).unwrap();
    // Cut the body short and fix up the length: a well-framed request that does not decode.
    frame.truncate(frame.len() - 1);
    let len = u32::try_from(frame.len() - 4).unwrap();
    frame[..4].copy_from_slice(&len.to_be_bytes());
    let err = client.call_frame(&frame, DEADLINE).await.unwrap_err();
    assert!(matches!(err, CallError::Broken { .. }), "{err}");
    // The node still answers on a new connection.
    let stale = VoteRequest::<NodeId>::new(Vote::new(0, 2), None);
    let answer = client.call(stream::VOTE, &stale, DEADLINE).await.unwrap();
    let vote: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
        serde_json::from_slice(answer).unwrap();
    assert_eq!(vote.unwrap().vote.leader_id().term, term(&replica));
}

#[tokio::test]
async fn a_wrong_peer_key_gets_no_answer() {
    let (_dir, replica, addr) = node().await;
    let mut stranger = RaftStream::new(&addr, Arc::from("not-the-key"));
    let request = VoteRequest::<NodeId>::new(Vote::new(9, 2), None);
    let err = stranger
        .call(stream::VOTE, &request, DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Broken { .. }), "{err}");
    // The request was never handled: the node did not move to the stranger's term 9.
    assert!(term(&replica) < 9);
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection() {
    let (_dir, _replica, addr) = node().await;
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    let mut hello = stream::PREFACE.to_vec();
    hello.extend_from_slice(&u16::try_from(KEY.len()).unwrap().to_be_bytes());
    hello.extend_from_slice(KEY.as_bytes());
    hello.extend_from_slice(&u32::try_from(stream::MAX_FRAME + 1).unwrap().to_be_bytes());
    hello.push(stream::VOTE);
    raw.write_all(&hello).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, raw.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "the server closes instead of answering or waiting for 64 MiB"
    );
}

#[tokio::test]
async fn the_first_bytes_tell_raft_streams_from_grpc() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for (sent, want) in [
        (&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], false),
        (&stream::PREFACE[..], true),
        (&b"GET / HTTP/1.1\r\n"[..], false),
        (&b"BOXDRFT2"[..], false),
    ] {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(sent).await.unwrap();
        assert_eq!(
            stream::is_raft_stream(&server).await,
            want,
            "{:?}",
            String::from_utf8_lossy(sent)
        );
    }
    // Our preface split over two writes is still recognised.
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    client.write_all(&stream::PREFACE[..3]).await.unwrap();
    let check = tokio::spawn(async move { stream::is_raft_stream(&server).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.write_all(&stream::PREFACE[3..]).await.unwrap();
    assert!(check.await.unwrap());
}
