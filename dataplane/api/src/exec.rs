//! `Exec`: one command in a VM, streamed both ways, through the relay to the guest agent
//! (`boxd_dataplane::ssh::exec`). The operations decide whether the caller may (a write on
//! that VM) and find the VM; this file only moves messages.

use std::sync::Arc;

use boxd_dataplane::ssh::exec::{self, Output};
use boxd_model::model::AGENT_PORT;
use boxd_operations::{Caller, Operations};
use russh::keys::PrivateKey;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tonic::{Status, Streaming};

use crate::convert::status;
use crate::pb::{self, exec_request::Kind as In, exec_response::Kind as Out};

/// Messages buffered each way.
const BUFFER: usize = 16;
/// Most environment variables one command may be given.
const MAX_ENV: usize = 64;

/// The stream of answers.
pub type Answers = tokio_stream::wrappers::ReceiverStream<Result<pb::ExecResponse, Status>>;

/// Starts the command the first message of `requests` names; answers on the returned stream.
pub async fn start(
    ops: Arc<Operations>,
    key: Arc<PrivateKey>,
    caller: Caller,
    mut requests: Streaming<pb::ExecRequest>,
) -> Result<Answers, Status> {
    let first = requests.next().await.ok_or_else(|| {
        Status::invalid_argument("no ExecStart: the first message says what to run")
    })??;
    let Some(In::Start(start)) = first.kind else {
        return Err(Status::invalid_argument(
            "the first message must be an ExecStart (vm, command)",
        ));
    };
    if start.command.is_empty() {
        return Err(Status::invalid_argument("give a command to run"));
    }
    if start.env.len() > MAX_ENV {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_ENV} environment variables"
        )));
    }
    let vm = ops.exec_target(&caller, &start.vm).map_err(status)?;
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(BUFFER);
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(BUFFER);
    let (tx, rx) = mpsc::channel(BUFFER);
    // Stdin: from the request stream until it ends or says so.
    tokio::spawn(async move {
        while let Some(Ok(r)) = requests.next().await {
            let sent = match r.kind {
                Some(In::Stdin(b)) => stdin_tx.send(b).await.is_ok(),
                Some(In::CloseStdin(true)) => false,
                _ => true,
            };
            if !sent {
                return;
            }
        }
    });
    let user = if start.user.is_empty() {
        "root".to_owned()
    } else {
        start.user
    };
    let env: Vec<(String, String)> = start.env.into_iter().collect();
    tokio::spawn(async move {
        let cmd = exec::Command {
            vm,
            user: &user,
            key,
            port: AGENT_PORT,
            command: &start.command,
            env: &env,
        };
        let forward = {
            let tx = tx.clone();
            async move {
                while let Some(o) = out_rx.recv().await {
                    let kind = match o {
                        Output::Stdout(b) => Out::Stdout(b),
                        Output::Stderr(b) => Out::Stderr(b),
                    };
                    let msg = pb::ExecResponse { kind: Some(kind) };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            }
        };
        let (ended, ()) = tokio::join!(exec::run(cmd, stdin_rx, out_tx), forward);
        let last = match ended {
            Ok(e) => Ok(pb::ExecResponse {
                kind: Some(Out::Exit(pb::ExecExit {
                    status: e.status.unwrap_or(if e.signal.is_some() { 0 } else { 255 }),
                    signal: e.signal.unwrap_or_default(),
                })),
            }),
            Err(why) => Err(Status::unavailable(why)),
        };
        let _ = tx.send(last).await;
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}
