//! One command in a VM for a program (the gRPC API's `Exec`), through the same relay to the
//! guest agent as `ssh NAME.<zone> CMD`: a connection to the VM's agent (the host key recorded
//! for the VM checked), one session channel with the environment asked for, the command,
//! stdin in, stdout and stderr out as they come, and how it ended.

use std::sync::Arc;
use std::time::Duration;

use boxd_model::view::VmRoute;
use russh::ChannelMsg;
use russh::keys::PrivateKey;
use tokio::sync::mpsc;

/// What a running command sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Bytes on its stdout.
    Stdout(Vec<u8>),
    /// Bytes on its stderr.
    Stderr(Vec<u8>),
}

/// How a command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ended {
    /// Its exit status, if it exited.
    pub status: Option<u32>,
    /// The signal that killed it (`KILL`, `TERM`, …), if one did.
    pub signal: Option<String>,
}

/// What to run and where.
pub struct Command<'a> {
    /// The VM.
    pub vm: Arc<VmRoute>,
    /// The user in the VM it runs as.
    pub user: &'a str,
    /// The cluster's agent key.
    pub key: Arc<PrivateKey>,
    /// The port guest agents listen on.
    pub port: u16,
    /// The command line (run by the user's shell, as `ssh vm CMD` does).
    pub command: &'a str,
    /// Environment variables to set first (the agent may refuse some, as sshd does).
    pub env: &'a [(String, String)],
}

/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `cmd`: `stdin` is written to the command as it comes (its end closes the command's
/// stdin), what the command writes goes to `out`; returns how it ended, or why it could not
/// run (a sentence for the user). If `out` closes (the caller went away), the command's
/// channel is closed.
pub async fn run(
    cmd: Command<'_>,
    mut stdin: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Output>,
) -> Result<Ended, String> {
    let agent = tokio::time::timeout(
        CONNECT_TIMEOUT,
        super::relay::dial(&cmd.vm, cmd.user, &cmd.key, cmd.port, None, Arc::default()),
    )
    .await
    .unwrap_or_else(|_| Err("it did not answer in time".into()))
    .map_err(|why| format!("cannot reach the agent of {} ({why})", cmd.vm.name))?;
    let fail = |e: russh::Error| format!("the agent of {} failed: {e}", cmd.vm.name);
    let mut ch = agent.channel_open_session().await.map_err(fail)?;
    for (k, v) in cmd.env {
        ch.set_env(false, k.as_str(), v.as_str())
            .await
            .map_err(fail)?;
    }
    ch.exec(true, cmd.command).await.map_err(fail)?;
    let mut ended = Ended::default();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            data = stdin.recv(), if stdin_open => match data {
                Some(d) => ch.data(&d[..]).await.map_err(fail)?,
                None => {
                    stdin_open = false;
                    ch.eof().await.map_err(fail)?;
                }
            },
            msg = ch.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if out.send(Output::Stdout(data.to_vec())).await.is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    if out.send(Output::Stderr(data.to_vec())).await.is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => ended.status = Some(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    ended.signal = Some(signal_name_text(&signal_name));
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
            () = out.closed() => break,
        }
    }
    let _ = ch.close().await;
    Ok(ended)
}

fn signal_name_text(s: &russh::Sig) -> String {
    match s {
        russh::Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}
