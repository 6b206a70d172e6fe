//! The admin socket: protocol (`proto`, sans-io), server loop and client.

pub mod proto;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use boxd_controlplane::controller::stopped;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

pub use proto::{Reply, Request};

/// Answers admin requests.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(
        &self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<serde_json::Value, String>> + Send;
}

/// Most connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;

/// Serves `listener` until `shutdown` turns true.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut shutdown) => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            connection(stream, handler).await;
            drop(permit);
        });
    }
}

async fn connection<H: Handler>(stream: UnixStream, handler: Arc<H>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded read: a line longer than MAX_LINE is answered with an error and dropped.
        let n = match (&mut r)
            .take(proto::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let complete = line.last() == Some(&b'\n');
        if !complete && n > proto::MAX_LINE {
            let _ = w
                .write_all(&Reply::err("request line too long").to_line())
                .await;
            return;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let reply = match proto::parse_request(text) {
            Ok(req) => match handler.handle(req).await {
                Ok(v) => Reply::ok(v),
                Err(e) => Reply::err(e),
            },
            Err(e) => Reply::err(e),
        };
        if w.write_all(&reply.to_line()).await.is_err() {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// Why an admin call failed before getting a reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "cannot reach boxd at {path}: {source} (is `boxd up` running, and is --data-dir right?)"
    )]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The connection broke or the reply was not JSON.
    #[error("admin socket: {0}")]
    Protocol(String),
}

/// Sends one request and returns the reply.
pub async fn call(path: &Path, req: &Request) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut reply = Vec::new();
    BufReader::new(r)
        .read_until(b'\n', &mut reply)
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    serde_json::from_slice(&reply).map_err(|e| ClientError::Protocol(format!("bad reply: {e}")))
}
