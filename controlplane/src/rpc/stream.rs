//! Raft's hot RPCs (AppendEntries and Vote) on a plain TCP stream per peer, beside gRPC on the
//! same port.
//!
//! Every write is one AppendEntries to each follower and, once committed, a second one that
//! carries the commit index; as unary gRPC calls each was an HTTP/2 stream (HEADERS, DATA,
//! trailers, window updates) through tonic's and hyper's tasks, which was a quarter of a
//! leader's CPU in the one-writer benchmark. Here a request is one length-prefixed frame and
//! its answer another, on a connection that stays open — what etcd's rafthttp stream and
//! TiKV's batched Raft messages do. Snapshots, forwarded writes, joins and images stay on gRPC.
//!
//! The wire format, all integers big-endian:
//!
//! - The client opens with [`PREFACE`], then the peer key's length (`u16`) and the key. A
//!   server that does not accept the key closes the connection.
//! - Request: `u32` length of what follows, a kind byte, and openraft's request:
//!   [`APPEND_ENTRIES_BINARY`] in postcard (`raft::codec`); [`VOTE`] in JSON. (Kind 1, an
//!   AppendEntries in JSON, was sent by leaders before the postcard form and is no longer
//!   served.)
//! - Answer: `u32` length, then the JSON of `Result<response, RaftError>`.
//!
//! A connection carries one request at a time (openraft sends one RPC at a time per target);
//! any error closes it and the next request opens a new one.
//!
//! The listener is shared with gRPC: [`is_raft_stream`] tells the two apart by the first bytes
//! (an HTTP/2 connection starts with `PRI * HTTP/2.0`).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::raft::Raft;
use crate::token::constant_time_eq;

/// First bytes of a Raft stream connection.
pub const PREFACE: &[u8; 8] = b"BOXDRFT1";
/// Request kind: openraft's `VoteRequest`.
pub const VOTE: u8 = 2;
/// Request kind: openraft's `AppendEntriesRequest` in postcard.
pub const APPEND_ENTRIES_BINARY: u8 = 3;
/// Largest frame either side accepts (the gRPC service's limit too).
pub const MAX_FRAME: usize = 64 << 20;
/// How long a new connection may take to say what it is.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer per connection: a batch of entries usually fits in one read.
const READ_BUFFER: usize = 64 << 10;

/// Whether `stream` opens with [`PREFACE`] (without consuming anything). `false` for anything
/// else, including a peer that says nothing within a few seconds; gRPC then gets the
/// connection and deals with it.
pub async fn is_raft_stream(stream: &TcpStream) -> bool {
    let mut buf = [0u8; PREFACE.len()];
    let peek = async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n >= PREFACE.len() => return buf == *PREFACE,
                // The peer closed, or what it sent so far already differs.
                Ok(n) if n == 0 || buf[..n] != PREFACE[..n] => return false,
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(PREFACE_TIMEOUT, peek)
        .await
        .unwrap_or(false)
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
}

/// Reads one frame's body (after its `u32` length) into `buf`.
async fn read_frame(r: &mut BufReader<OwnedReadHalf>, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// A frame: the `u32` length, then `kind` (if any) and what `write` appends.
fn frame_with<E>(
    kind: Option<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let mut out = vec![0u8; 4];
    out.extend(kind);
    write(&mut out)?;
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// A frame: the `u32` length, then `kind` (if any) and the JSON of `body`.
fn frame(kind: Option<u8>, body: &impl serde::Serialize) -> Result<Vec<u8>, serde_json::Error> {
    frame_with(kind, |out| serde_json::to_writer(out, body))
}

/// The request frame of an AppendEntries, in postcard.
pub fn append_entries_frame(
    rpc: &openraft::raft::AppendEntriesRequest<crate::raft::TypeConfig>,
) -> Result<Vec<u8>, postcard::Error> {
    frame_with(Some(APPEND_ENTRIES_BINARY), |out| {
        crate::raft::codec::encode_into(rpc, out)
    })
}

/// Serves one Raft stream connection (already recognised by [`is_raft_stream`]) until the peer
/// closes it or sends something malformed. `peer_key` is the cluster's internal key.
pub async fn serve(raft: Raft, peer_key: Arc<str>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    if let Err(e) = serve_inner(&raft, &peer_key, stream).await {
        tracing::debug!(?peer, error = %e, "raft stream closed");
    }
}

async fn serve_inner(
    raft: &Raft,
    peer_key: &str,
    stream: TcpStream,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let mut preface = [0u8; PREFACE.len()];
    r.read_exact(&mut preface).await?;
    let key_len = usize::from(r.read_u16().await?);
    let mut key = vec![0u8; key_len];
    r.read_exact(&mut key).await?;
    if preface != *PREFACE || !constant_time_eq(&key, peer_key.as_bytes()) {
        return Err("wrong preface or peer key: only members of this cluster may connect".into());
    }
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut r, &mut buf).await {
            Ok(()) => {}
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let (&kind, body) = buf.split_first().ok_or("empty frame")?;
        let answer = match kind {
            APPEND_ENTRIES_BINARY => frame(
                None,
                &raft
                    .append_entries(crate::raft::codec::decode_append_entries(body)?)
                    .await,
            )?,
            VOTE => frame(None, &raft.vote(serde_json::from_slice(body)?).await)?,
            other => return Err(format!("unknown request kind {other}").into()),
        };
        w.write_all(&answer).await?;
    }
}

/// The client side: one connection to one peer, opened on first use and after any error.
pub struct RaftStream {
    addr: String,
    key: Arc<str>,
    conn: Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
    buf: Vec<u8>,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection could be opened: the peer is down or unreachable.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The connection failed mid-request, or the answer was malformed.
    #[error("raft stream to {addr}: {reason}")]
    Broken {
        /// The peer.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("raft stream to {0}: no answer in time")]
    Timeout(String),
}

impl RaftStream {
    /// A client for the peer at `addr` (`IP:PORT`) that authenticates with `key`.
    pub fn new(addr: &str, key: Arc<str>) -> Self {
        Self {
            addr: addr.to_owned(),
            key,
            conn: None,
            buf: Vec::new(),
        }
    }

    async fn connect(&self) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf), CallError> {
        let connect_err = |source| CallError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let stream = TcpStream::connect(&self.addr).await.map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        let (r, mut w) = stream.into_split();
        let key = self.key.as_bytes();
        let mut hello = Vec::with_capacity(PREFACE.len() + 2 + key.len());
        hello.extend_from_slice(PREFACE);
        hello.extend_from_slice(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_be_bytes());
        hello.extend_from_slice(key);
        w.write_all(&hello).await.map_err(connect_err)?;
        Ok((BufReader::with_capacity(READ_BUFFER, r), w))
    }

    /// Sends one request of `kind` in JSON and returns the JSON of its answer, within
    /// `deadline`.
    pub async fn call(
        &mut self,
        kind: u8,
        request: &impl serde::Serialize,
        deadline: Duration,
    ) -> Result<&[u8], CallError> {
        let request = frame(Some(kind), request).map_err(|e| CallError::Broken {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })?;
        self.call_frame(&request, deadline).await
    }

    /// Sends a whole request frame (see [`append_entries_frame`]) and returns the JSON of its
    /// answer, within `deadline`.
    pub async fn call_frame(
        &mut self,
        request: &[u8],
        deadline: Duration,
    ) -> Result<&[u8], CallError> {
        match tokio::time::timeout(deadline, self.exchange(request)).await {
            Ok(Ok(())) => Ok(&self.buf),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(CallError::Timeout(self.addr.clone()))
            }
        }
    }

    /// Writes `request` (connecting first if needed) and reads the answer into `self.buf`.
    async fn exchange(&mut self, request: &[u8]) -> Result<(), CallError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let Some((r, w)) = self.conn.as_mut() else {
            return Err(CallError::Broken {
                addr: self.addr.clone(),
                reason: "not connected".into(),
            });
        };
        let result = match w.write_all(request).await {
            Ok(()) => read_frame(r, &mut self.buf).await,
            Err(e) => Err(e.into()),
        };
        result.map_err(|e| CallError::Broken {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })
    }
}
