//! The terminal side of a lobby channel: one command from `exec`, or the interactive prompt
//! (a small line editor under a pty, plain lines without one), with progress forwarded to
//! stderr while a command waits.

use bytes::Bytes;
use russh::ChannelMsg;
use russh::server::Msg;
use tokio::sync::mpsc;

use super::backend::Backend;
use super::command::{LobbyCommand, MAX_LINE, parse_line};
use super::lobby::{Caller, EXIT_USAGE, Lobby, Progress, Reply};

/// Largest stdin `keys add` reads.
const MAX_STDIN: usize = 64 * 1024;

/// Writes to the client's terminal, turning `\n` into `\r\n` under a pty.
pub(super) struct Term<'a> {
    pub ch: &'a russh::ChannelWriteHalf<Msg>,
    pub pty: bool,
}

impl Term<'_> {
    fn cook(&self, s: &str) -> Bytes {
        if self.pty {
            Bytes::from(s.replace('\n', "\r\n"))
        } else {
            Bytes::copy_from_slice(s.as_bytes())
        }
    }

    pub async fn out(&self, s: &str) {
        if !s.is_empty() {
            let _ = self.ch.data_bytes(self.cook(s)).await;
        }
    }

    pub async fn err(&self, s: &str) {
        if !s.is_empty() {
            let _ = self.ch.extended_data_bytes(1, self.cook(s)).await;
        }
    }

    pub async fn finish(&self, code: u32) {
        let _ = self.ch.exit_status(code).await;
        let _ = self.ch.eof().await;
        let _ = self.ch.close().await;
    }
}

/// Runs one command line; returns its exit status.
pub(super) async fn exec<B: Backend>(
    lobby: &Lobby<B>,
    caller: &Caller,
    line: &str,
    rx: &mut russh::ChannelReadHalf,
    term: &Term<'_>,
) -> u32 {
    let cmd = match parse_line(line) {
        Ok(Some(c)) => c,
        Ok(None) => LobbyCommand::Help,
        Err(e) => {
            term.err(&format!("boxd: {e}\n")).await;
            return EXIT_USAGE;
        }
    };
    let stdin = if cmd == LobbyCommand::KeysAdd {
        match read_stdin(rx).await {
            Some(s) => s,
            None => {
                term.err(&format!(
                    "boxd: more than {MAX_STDIN} bytes on stdin: pipe one public key\n"
                ))
                .await;
                return EXIT_USAGE;
            }
        }
    } else {
        Vec::new()
    };
    let reply = run_with_progress(lobby, caller, cmd, &stdin, term).await;
    term.out(&reply.stdout).await;
    term.err(&reply.stderr).await;
    reply.code
}

/// Runs a command while forwarding its progress lines to stderr.
async fn run_with_progress<B: Backend>(
    lobby: &Lobby<B>,
    caller: &Caller,
    cmd: LobbyCommand,
    stdin: &[u8],
    term: &Term<'_>,
) -> Reply {
    let (tx, mut prx) = mpsc::unbounded_channel::<String>();
    let progress = Progress::to(tx);
    let run = lobby.run(caller, cmd, stdin, &progress);
    tokio::pin!(run);
    loop {
        tokio::select! {
            reply = &mut run => {
                while let Ok(line) = prx.try_recv() {
                    term.err(&format!("{line}\n")).await;
                }
                return reply;
            }
            Some(line) = prx.recv() => term.err(&format!("{line}\n")).await,
        }
    }
}

async fn read_stdin(rx: &mut russh::ChannelReadHalf) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        match rx.wait().await {
            Some(ChannelMsg::Data { data }) => {
                if buf.len() + data.len() > MAX_STDIN {
                    return None;
                }
                buf.extend_from_slice(&data);
            }
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return Some(buf),
            Some(_) => {}
        }
    }
}

/// The interactive prompt: a small line editor under a pty, plain lines without one.
pub(super) async fn interactive<B: Backend>(
    lobby: &Lobby<B>,
    caller: &Caller,
    rx: &mut russh::ChannelReadHalf,
    term: &Term<'_>,
) -> u32 {
    const PROMPT: &str = "boxd> ";
    let zone = lobby.zone();
    term.out(&format!(
        "Welcome to {zone}. Type `help` for commands, `exit` to leave.\n"
    ))
    .await;
    if term.pty {
        term.out(PROMPT).await;
    }
    let mut line: Vec<u8> = Vec::new();
    let mut last = 0;
    let mut prev = 0u8;
    loop {
        let data = match rx.wait().await {
            Some(ChannelMsg::Data { data }) => data,
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                // A last line without a newline still runs (piped scripts).
                if !term.pty && !line.is_empty() {
                    let l = String::from_utf8_lossy(&line).into_owned();
                    last = run_line(lobby, caller, &l, term).await.unwrap_or(last);
                }
                return last;
            }
            Some(_) => continue,
        };
        for &b in data.iter() {
            let after_cr = std::mem::replace(&mut prev, b) == b'\r';
            match b {
                // `\r\n`: the `\r` already ran the line.
                b'\n' if after_cr => {}
                b'\r' | b'\n' => {
                    if term.pty {
                        term.out("\n").await;
                    }
                    let l = String::from_utf8_lossy(&line).into_owned();
                    line.clear();
                    match run_line(lobby, caller, &l, term).await {
                        None => return last,
                        Some(code) => last = code,
                    }
                    if term.pty {
                        term.out(PROMPT).await;
                    }
                }
                0x03 if term.pty => {
                    line.clear();
                    term.out("^C\n").await;
                    term.out(PROMPT).await;
                }
                0x04 if term.pty && line.is_empty() => {
                    term.out("\n").await;
                    return last;
                }
                0x7f | 0x08 if term.pty && !line.is_empty() => {
                    // Erase one character: its continuation bytes, then its first byte.
                    while line.pop().is_some_and(|c| c & 0xc0 == 0x80) {}
                    term.out("\u{8} \u{8}").await;
                }
                b if (b >= 0x20 || b == b'\t') && line.len() < MAX_LINE => {
                    line.push(b);
                    if term.pty {
                        let _ = term.ch.data_bytes(Bytes::copy_from_slice(&[b])).await;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Runs one interactive line; `None` means the user asked to leave.
async fn run_line<B: Backend>(
    lobby: &Lobby<B>,
    caller: &Caller,
    line: &str,
    term: &Term<'_>,
) -> Option<u32> {
    let cmd = match parse_line(line) {
        Ok(Some(LobbyCommand::Exit)) => return None,
        Ok(Some(c)) => c,
        Ok(None) => return Some(0),
        Err(e) => {
            term.err(&format!("boxd: {e}\n")).await;
            return Some(EXIT_USAGE);
        }
    };
    if cmd == LobbyCommand::KeysAdd {
        term.err(
            "boxd: `keys add` reads the key from stdin: run `ssh boxd.test keys add < key.pub`\n",
        )
        .await;
        return Some(EXIT_USAGE);
    }
    let reply = run_with_progress(lobby, caller, cmd, &[], term).await;
    term.out(&reply.stdout).await;
    term.err(&reply.stderr).await;
    Some(reply.code)
}
