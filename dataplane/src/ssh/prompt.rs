//! The terminal side of a lobby channel: one command from `exec`, or the interactive prompt
//! (a small line editor under a pty, plain lines without one), with progress forwarded to
//! stderr while a command waits.

use bytes::Bytes;
use russh::ChannelMsg;
use russh::server::Msg;
use tokio::sync::mpsc;

use super::command::{LobbyCommand, MAX_LINE, parse_line};
use super::lobby::{Caller, EXIT_USAGE, Lobby, Progress, Reply};

/// Largest stdin `keys add` reads.
const MAX_STDIN: usize = 64 * 1024;
/// Input the prompt holds unread (typed ahead or piped) before it closes the session.
const MAX_PENDING: usize = 1 << 20;
/// Lines in a row that are not commands before the prompt closes the session.
const MAX_BAD_LINES: u32 = 100;

/// What the prompt reads.
enum Input {
    Data(Bytes),
    End,
}

/// Reads the channel on a task of its own, so that it is always drained: the prompt may wait
/// on the client's window to write (a client that does not read its output), and russh's
/// session stalls — window adjustments included — while a channel's queue is full, which
/// wedged a prompt fed megabytes of garbage. Past [`MAX_PENDING`] unread bytes the input is
/// dropped and `overflow` set; the prompt then closes the session.
fn read_ahead(
    mut rx: russh::ChannelReadHalf,
) -> (
    mpsc::UnboundedReceiver<Input>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, out) = mpsc::unbounded_channel();
    let counted = std::sync::Arc::clone(&pending);
    tokio::spawn(async move {
        loop {
            match rx.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    if counted.load(Relaxed) > MAX_PENDING {
                        continue;
                    }
                    counted.fetch_add(data.len(), Relaxed);
                    if tx.send(Input::Data(data)).is_err() {
                        return;
                    }
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                    let _ = tx.send(Input::End);
                    return;
                }
                Some(_) => {}
            }
        }
    });
    (out, pending)
}

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

    /// Error text: stderr, or under a pty the terminal itself, as with sshd (a terminal has one
    /// stream, and two would let an error arrive after the next prompt).
    pub async fn err(&self, s: &str) {
        if self.pty {
            self.out(s).await;
        } else if !s.is_empty() {
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
pub(super) async fn exec(
    lobby: &Lobby,
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
async fn run_with_progress(
    lobby: &Lobby,
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
pub(super) async fn interactive(
    lobby: &Lobby,
    caller: &Caller,
    rx: russh::ChannelReadHalf,
    term: &Term<'_>,
) -> u32 {
    use std::sync::atomic::Ordering::Relaxed;
    const PROMPT: &str = "boxd> ";
    let zone = lobby.ops().zone();
    term.out(&format!(
        "Welcome to {zone}. Type `help` for commands, `exit` to leave.\n"
    ))
    .await;
    if term.pty {
        term.out(PROMPT).await;
    }
    let (mut input, pending) = read_ahead(rx);
    let mut line: Vec<u8> = Vec::new();
    let mut last = 0;
    let mut prev = 0u8;
    let mut bad_lines = 0;
    let mut keys = Keys::default();
    loop {
        let data = match input.recv().await {
            Some(Input::Data(data)) => data,
            Some(Input::End) | None => {
                // A last line without a newline still runs (piped scripts).
                if !term.pty && !line.is_empty() {
                    let l = String::from_utf8_lossy(&line).into_owned();
                    last = run_line(lobby, caller, &l, term).await.unwrap_or(last);
                }
                return last;
            }
        };
        if pending.fetch_sub(data.len(), Relaxed) > MAX_PENDING {
            term.err(&format!(
                "boxd: more than {} MiB of input arrived faster than commands run: the prompt \
                 reads commands, not data; closing\n",
                MAX_PENDING >> 20
            ))
            .await;
            return EXIT_USAGE;
        }
        for &b in data.iter() {
            if term.pty {
                match keys.feed(b) {
                    Key::Byte => {}
                    Key::Pending => continue,
                    Key::Recall(up) => {
                        if let Some(l) = keys.recall(up, &line) {
                            line = l;
                            // Back to the line's start, clear it, draw the recalled one.
                            term.out(&format!("\r\u{1b}[K{PROMPT}")).await;
                            term.out(&String::from_utf8_lossy(&line)).await;
                        }
                        continue;
                    }
                }
            }
            let after_cr = std::mem::replace(&mut prev, b) == b'\r';
            match b {
                // `\r\n`: the `\r` already ran the line.
                b'\n' if after_cr => {}
                b'\r' | b'\n' => {
                    if term.pty {
                        term.out("\n").await;
                    }
                    let l = String::from_utf8_lossy(&line).into_owned();
                    keys.remember(&line);
                    line.clear();
                    match run_line(lobby, caller, &l, term).await {
                        None => return last,
                        Some(code) => last = code,
                    }
                    bad_lines = if last == EXIT_USAGE { bad_lines + 1 } else { 0 };
                    if bad_lines >= MAX_BAD_LINES {
                        term.err(&format!(
                            "boxd: {MAX_BAD_LINES} lines in a row were not commands; closing \
                             (`ssh {} help` lists them)\n",
                            lobby.ops().zone()
                        ))
                        .await;
                        return EXIT_USAGE;
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

/// Lines the prompt remembers for Up and Down.
const HISTORY: usize = 100;

/// What a byte typed under a pty means to the line editor.
enum Key {
    /// An ordinary byte (or control character) for the line.
    Byte,
    /// Part of an escape sequence not complete yet (or one that means nothing here).
    Pending,
    /// Up (`true`) or Down: recall an earlier or later line.
    Recall(bool),
}

/// The line editor's memory: escape sequences in progress and the lines typed.
#[derive(Default)]
struct Keys {
    /// 0: none; 1: after ESC; 2: inside `ESC [` or `ESC O`.
    escape: u8,
    history: std::collections::VecDeque<Vec<u8>>,
    /// How far back Up went (0: the line being typed).
    back: usize,
    /// The line being typed when Up was first pressed.
    draft: Vec<u8>,
}

impl Keys {
    /// Escape sequences (arrows, function keys) are consumed whole, not typed as text.
    fn feed(&mut self, b: u8) -> Key {
        match (self.escape, b) {
            (0, 0x1b) => {
                self.escape = 1;
                Key::Pending
            }
            (0, _) => Key::Byte,
            (1, b'[' | b'O') => {
                self.escape = 2;
                Key::Pending
            }
            (1, _) => {
                self.escape = 0;
                Key::Pending
            }
            // Parameters and intermediates until the final byte.
            (_, 0x20..=0x3f) => Key::Pending,
            (_, final_byte) => {
                self.escape = 0;
                match final_byte {
                    b'A' => Key::Recall(true),
                    b'B' => Key::Recall(false),
                    _ => Key::Pending,
                }
            }
        }
    }

    fn remember(&mut self, line: &[u8]) {
        self.back = 0;
        if line.is_empty() || self.history.back().is_some_and(|l| l == line) {
            return;
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(line.to_vec());
    }

    /// The line Up or Down leads to from `current`, if it moves.
    fn recall(&mut self, up: bool, current: &[u8]) -> Option<Vec<u8>> {
        let back = if up {
            (self.back < self.history.len()).then_some(self.back + 1)?
        } else {
            self.back.checked_sub(1)?
        };
        if self.back == 0 {
            self.draft = current.to_vec();
        }
        self.back = back;
        Some(match back {
            0 => std::mem::take(&mut self.draft),
            n => self.history[self.history.len() - n].clone(),
        })
    }
}

/// Runs one interactive line; `None` means the user asked to leave.
async fn run_line(lobby: &Lobby, caller: &Caller, line: &str, term: &Term<'_>) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::{Key, Keys};

    fn feed(keys: &mut Keys, bytes: &[u8]) -> Vec<&'static str> {
        bytes
            .iter()
            .map(|b| match keys.feed(*b) {
                Key::Byte => "byte",
                Key::Pending => "-",
                Key::Recall(true) => "up",
                Key::Recall(false) => "down",
            })
            .collect()
    }

    #[test]
    fn arrows_recall_lines_and_other_sequences_vanish() {
        let mut k = Keys::default();
        assert_eq!(feed(&mut k, b"a\x1b[A"), ["byte", "-", "-", "up"]);
        assert_eq!(
            feed(&mut k, b"\x1bOB\x1b[1;5C\x1bx"),
            ["-", "-", "down", "-", "-", "-", "-", "-", "-", "-", "-"]
        );
        assert_eq!(k.recall(true, b"x"), None, "no history yet");
        k.remember(b"ls");
        k.remember(b"show a");
        k.remember(b"show a");
        assert_eq!(k.recall(true, b"dra").as_deref(), Some(&b"show a"[..]));
        assert_eq!(k.recall(true, b"").as_deref(), Some(&b"ls"[..]));
        assert_eq!(k.recall(true, b""), None, "at the oldest");
        assert_eq!(k.recall(false, b"").as_deref(), Some(&b"show a"[..]));
        assert_eq!(
            k.recall(false, b"").as_deref(),
            Some(&b"dra"[..]),
            "the draft back"
        );
        assert_eq!(k.recall(false, b""), None);
    }
}
