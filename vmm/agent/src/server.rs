//! The agent's SSH server: one authorised key (the cluster's agent key), session channels that
//! run a login shell or a command (on a pty when asked, on pipes otherwise) with exit status
//! and exit signal, env, window changes and signals, the sftp subsystem (the system's
//! `sftp-server`), TCP forwarding both ways inside the VM, and the user's SSH agent
//! (`auth_sock`).

use std::ffi::CString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure};
use tokio::io::AsyncWriteExt as _;

use crate::pty;

/// Ciphers the agent accepts: russh's defaults plus AES-128-GCM, which boxd's relay asks for
/// first (ring runs AES-GCM on the CPU's AES instructions; the relay's own hop need not follow
/// the user's client, whose first choice is ChaCha20-Poly1305).
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// Serves the proxy on `listen` until the process ends, as `host_key` (a throwaway key
/// when none is given).
pub async fn serve(
    listen: SocketAddr,
    authorized: PublicKey,
    host_key: Option<russh::keys::PrivateKey>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let host_key = host_key.unwrap_or_else(|| {
        let seed: [u8; 32] = rand::random();
        russh::keys::PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &seed,
        ))
    });
    let config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-boxd-agent".into()),
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..russh::Preferred::default()
        },
        ..Default::default()
    });
    println!(
        "boxd-agent ready on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let authorized = Arc::new(authorized);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // `run_stream` leaves the socket as it is (`Config::nodelay` applies to russh's own
        // listener): without this, Nagle holds each small packet for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let agent = Agent {
            authorized: Arc::clone(&authorized),
            user: String::new(),
            forwards: std::collections::HashMap::new(),
        };
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            // russh reads each packet with two `read_exact`s (first block, then the rest);
            // buffered, a flight of packets costs one read instead of two per packet.
            let stream = tokio::io::BufReader::with_capacity(8 * 1024, stream);
            match russh::server::run_stream(config, stream, agent).await {
                Ok(s) => {
                    if let Err(e) = s.await {
                        tracing::debug!(%peer, error = %e, "session ended");
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "handshake"),
            }
        });
    }
}

struct Agent {
    authorized: Arc<PublicKey>,
    user: String,
    /// `ssh -R` listeners of this connection, by (address, port): they close with it.
    forwards: std::collections::HashMap<(String, u32), tokio::task::AbortHandle>,
}

impl Drop for Agent {
    /// The connection ended (the proxy's user went away): its `-R` listeners stop listening.
    fn drop(&mut self) {
        for (_, task) in self.forwards.drain() {
            task.abort();
        }
    }
}

impl Handler for Agent {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(
            if offer.public_key.key_data() == self.authorized.key_data() {
                Auth::Accept
            } else {
                reject()
            },
        )
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if key.public_key.key_data() != self.authorized.key_data() {
            return Ok(reject());
        }
        self.user = if user.is_empty() {
            "root".into()
        } else {
            user.to_owned()
        };
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let user = self.user.clone();
        let handle = session.handle();
        tokio::spawn(run_session(channel, user, handle));
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The session's loop sees the request too and makes the socket when its command starts.
        Ok(true)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" && sftp_server().is_some() {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let target = format!("{host_to_connect}:{port_to_connect}");
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(target.clone()),
        )
        .await;
        match connect {
            Ok(Ok(mut tcp)) => {
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
            _ => {
                tracing::debug!(%target, "direct-tcpip connect failed");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let bind = match address {
            "" | "*" | "0.0.0.0" => "0.0.0.0".to_owned(),
            "localhost" => "127.0.0.1".to_owned(),
            a => a.to_owned(),
        };
        let Ok(p) = u16::try_from(*port) else {
            return Ok(false);
        };
        let Ok(listener) = tokio::net::TcpListener::bind((bind.as_str(), p)).await else {
            return Ok(false);
        };
        if let Ok(a) = listener.local_addr() {
            *port = u32::from(a.port());
        }
        let handle = session.handle();
        let (address, bound) = (address.to_owned(), *port);
        let key = (address.clone(), bound);
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, peer)) = listener.accept().await {
                let Ok(ch) = handle
                    .channel_open_forwarded_tcpip(
                        address.clone(),
                        bound,
                        peer.ip().to_string(),
                        u32::from(peer.port()),
                    )
                    .await
                else {
                    // The client went away: stop forwarding.
                    return;
                };
                tokio::spawn(async move {
                    let mut stream = ch.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
        });
        if let Some(old) = self.forwards.insert(key, task.abort_handle()) {
            old.abort();
        }
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self
            .forwards
            .remove(&(address.to_owned(), port))
            .map(|task| task.abort())
            .is_some())
    }
}

fn reject() -> Auth {
    Auth::Reject {
        proceed_with_methods: None,
        partial_success: false,
    }
}

/// The sftp server to run: the system's if the VM has one (OpenSSH's), else the agent's own
/// (`boxd-agent --sftp-server`, see `sftp`), with its arguments.
fn sftp_server() -> Option<(PathBuf, &'static [&'static str])> {
    [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/lib/ssh/sftp-server",
        "/usr/libexec/sftp-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .map(|p| (p, &[][..]))
    .or_else(|| {
        std::env::current_exe()
            .ok()
            .map(|exe| (exe, &["--sftp-server"][..]))
    })
}

/// A user from the password database.
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

fn lookup(name: &str) -> Option<User> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns null or a pointer to static storage valid until the next
    // call; this process only calls it from here and copies the fields out at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points to a valid passwd whose strings are NUL-terminated.
    let (uid, gid, home, shell) = unsafe {
        let p = &*pw;
        (
            p.pw_uid,
            p.pw_gid,
            std::ffi::CStr::from_ptr(p.pw_dir)
                .to_string_lossy()
                .into_owned(),
            std::ffi::CStr::from_ptr(p.pw_shell)
                .to_string_lossy()
                .into_owned(),
        )
    };
    Some(User {
        name: name.to_owned(),
        uid,
        gid,
        home,
        shell,
    })
}

/// What a session channel runs.
enum Run {
    Exec(String),
    Shell,
    /// The sftp server and its arguments.
    Sftp(PathBuf, &'static [&'static str]),
}

struct PtyReq {
    term: String,
    cols: u32,
    rows: u32,
}

async fn run_session(channel: Channel<Msg>, user: String, handle: russh::server::Handle) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    let mut pty_req = None;
    let mut env = Vec::new();
    let mut forward_agent = false;
    let run = loop {
        match rx.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                pty_req = Some(PtyReq {
                    term,
                    cols: col_width,
                    rows: row_height,
                });
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => env.push((variable_name, variable_value)),
            Some(ChannelMsg::AgentForward { .. }) => forward_agent = true,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Run::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Some(ChannelMsg::RequestShell { .. }) => break Run::Shell,
            Some(ChannelMsg::RequestSubsystem { name, .. }) => match sftp_server() {
                Some((p, args)) if name == "sftp" => break Run::Sftp(p, args),
                _ => {
                    let _ = tx.close().await;
                    return;
                }
            },
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };
    let Some(u) = lookup(&user) else {
        let _ = tx
            .extended_data_bytes(1, format!("boxd-agent: no user {user} in this VM\n"))
            .await;
        let _ = tx.exit_status(1).await;
        let _ = tx.eof().await;
        let _ = tx.close().await;
        return;
    };
    let shell = if u.shell.is_empty() {
        "/bin/sh".to_owned()
    } else {
        u.shell.clone()
    };
    let mut cmd = std::process::Command::new(match &run {
        Run::Sftp(p, _) => p.to_string_lossy().into_owned(),
        _ => shell.clone(),
    });
    match &run {
        Run::Exec(c) => {
            cmd.arg("-c").arg(c);
        }
        Run::Shell => {
            use std::os::unix::process::CommandExt as _;
            let base = shell.rsplit('/').next().unwrap_or("sh");
            cmd.arg0(format!("-{base}"));
        }
        Run::Sftp(_, args) => {
            cmd.args(*args);
        }
    }
    cmd.env_clear()
        .env("HOME", &u.home)
        .env("USER", &u.name)
        .env("LOGNAME", &u.name)
        .env("SHELL", &shell)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    if let Some(p) = &pty_req {
        cmd.env("TERM", &p.term);
    }
    cmd.envs(env);
    // Lives until the session ends, then the socket goes.
    let auth_sock = if forward_agent {
        crate::auth_sock::AuthSock::listen(u.uid, u.gid, handle.clone())
            .map_err(|e| tracing::warn!(error = %e, "no socket for the forwarded agent"))
            .ok()
    } else {
        None
    };
    if let Some(sock) = &auth_sock {
        cmd.env("SSH_AUTH_SOCK", &sock.path);
    }
    if std::path::Path::new(&u.home).is_dir() {
        cmd.current_dir(&u.home);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && u.uid != 0 {
        use std::os::unix::process::CommandExt as _;
        cmd.uid(u.uid).gid(u.gid);
    }
    let status = match pty_req {
        Some(p) if !matches!(run, Run::Sftp(..)) => run_on_pty(cmd, &p, rx, &tx).await,
        _ => run_on_pipes(cmd, rx, &tx).await,
    };
    match status {
        Ok(st) => {
            if let Some(sig) = st.signal() {
                let _ = handle
                    .exit_signal_request(
                        id,
                        pty::signal_name(sig),
                        st.core_dumped(),
                        String::new(),
                        String::new(),
                    )
                    .await;
            } else {
                let _ = tx
                    .exit_status(u32::try_from(st.code().unwrap_or(1)).unwrap_or(1))
                    .await;
            }
        }
        Err(e) => {
            let _ = tx
                .extended_data_bytes(1, format!("boxd-agent: cannot run the command: {e}\n"))
                .await;
            let _ = tx.exit_status(127).await;
        }
    }
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// How long a session's command has after SIGHUP before it is killed.
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// The client went away: SIGHUP (and SIGCONT, so stopped jobs see it) to the session's process
/// group — its command and what it started in the background — as a terminal hangup does.
/// What ignores it on purpose (`nohup`, daemons in their own session) keeps running, as after
/// an OpenSSH logout.
fn hang_up(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill has no memory preconditions; -pid is our child's own process group.
        unsafe {
            libc::kill(-pid, libc::SIGHUP);
            libc::kill(-pid, libc::SIGCONT);
        }
    }
}

/// Waits for a session's command; one that outlives [`HANGUP_GRACE`] after a hangup is
/// killed.
async fn reap(
    child: &mut tokio::process::Child,
    hung_up: bool,
) -> std::io::Result<std::process::ExitStatus> {
    if hung_up && let Ok(r) = tokio::time::timeout(HANGUP_GRACE, child.wait()).await {
        return r;
    }
    if hung_up {
        let _ = child.start_kill();
    }
    child.wait().await
}

fn kill(pid: Option<u32>, sig: &russh::Sig) {
    if let (Some(pid), Some(n)) = (
        pid.and_then(|p| i32::try_from(p).ok()),
        pty::signal_number(sig),
    ) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(pid, n) };
    }
}

async fn run_on_pipes(
    mut cmd: std::process::Command,
    mut rx: russh::ChannelReadHalf,
    tx: &russh::ChannelWriteHalf<Msg>,
) -> std::io::Result<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt as _;
    use std::process::Stdio;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a hangup reaches what it starts too.
        .process_group(0);
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    let pid = child.id();
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_w = tx.make_writer();
    let mut err_w = tx.make_writer_ext(Some(1));
    let pump_out = async {
        if let Some(s) = stdout.as_mut() {
            let _ = tokio::io::copy(s, &mut out_w).await;
        }
    };
    let pump_err = async {
        if let Some(s) = stderr.as_mut() {
            let _ = tokio::io::copy(s, &mut err_w).await;
        }
    };
    let input = async {
        loop {
            match rx.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some(ChannelMsg::Signal { signal }) => kill(pid, &signal),
                Some(ChannelMsg::Eof) => stdin = None,
                Some(ChannelMsg::Close) | None => {
                    stdin = None;
                    // The client is gone: end the command as a hangup would.
                    hang_up(pid);
                    return true;
                }
                Some(_) => {}
            }
        }
    };
    let outputs = async { tokio::join!(pump_out, pump_err) };
    tokio::pin!(input);
    let hung_up = tokio::select! {
        // Output closed, the command may still run: a hangup still ends it.
        _ = outputs => tokio::select! {
            st = child.wait() => return st,
            h = &mut input => h,
        },
        h = &mut input => h,
    };
    reap(&mut child, hung_up).await
}

async fn run_on_pty(
    mut cmd: std::process::Command,
    req: &PtyReq,
    mut rx: russh::ChannelReadHalf,
    tx: &russh::ChannelWriteHalf<Msg>,
) -> std::io::Result<std::process::ExitStatus> {
    let p = pty::open(req.cols, req.rows)?;
    pty::attach(&mut cmd, &p.slave)?;
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    drop(p.slave);
    let pid = child.id();
    let master: OwnedFd = p.master;
    let resize_fd = master.try_clone()?;
    let mut reader = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(master));
    let mut out_w = tx.make_writer();
    let output = async {
        // Reading the master fails with EIO once the child and every holder of the slave
        // are gone: that is the end of output.
        let _ = tokio::io::copy(&mut reader, &mut out_w).await;
    };
    let input = async {
        loop {
            match rx.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    if writer.write_all(&data).await.is_ok() {
                        let _ = writer.flush().await;
                    }
                }
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                }) => {
                    pty::resize(&resize_fd, col_width, row_height);
                }
                Some(ChannelMsg::Signal { signal }) => kill(pid, &signal),
                Some(ChannelMsg::Close) | None => {
                    hang_up(pid);
                    return true;
                }
                Some(_) => {}
            }
        }
    };
    tokio::pin!(input);
    let hung_up = tokio::select! {
        () = output => false,
        h = &mut input => h,
    };
    reap(&mut child, hung_up).await
}
