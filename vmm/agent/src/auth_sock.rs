//! `ssh -A`: the user's SSH agent, reached from inside the VM through `SSH_AUTH_SOCK`.
//!
//! As OpenSSH's sshd does it: on a session's `auth-agent-req@openssh.com` the agent listens on
//! a Unix socket in a fresh directory under `/tmp` (mode 0700, owned by the session's user),
//! sets `SSH_AUTH_SOCK` for the session's command, and for each connection to the socket opens
//! an `auth-agent@openssh.com` channel back through the proxy, which passes it to the user's
//! client. The socket and its directory go when the session ends.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::PathBuf;

use rand::Rng as _;

/// A session's agent socket; removed when dropped.
pub struct AuthSock {
    dir: PathBuf,
    /// The socket, for `SSH_AUTH_SOCK`.
    pub path: PathBuf,
    task: tokio::task::AbortHandle,
}

impl AuthSock {
    /// Listens for the session's user; connections reach the user's agent over `handle`.
    pub fn listen(uid: u32, gid: u32, handle: russh::server::Handle) -> std::io::Result<Self> {
        let dir = private_dir()?;
        let sock = Self::bind(&dir, uid, gid);
        let (path, listener) = match sock {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let handle = handle.clone();
                tokio::spawn(async move {
                    // Refused when the user's client (or the proxy) does not forward an agent.
                    let Ok(channel) = handle.channel_open_agent().await else {
                        return;
                    };
                    let mut channel = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut channel).await;
                });
            }
        })
        .abort_handle();
        Ok(Self { dir, path, task })
    }

    fn bind(
        dir: &std::path::Path,
        uid: u32,
        gid: u32,
    ) -> std::io::Result<(PathBuf, tokio::net::UnixListener)> {
        let path = dir.join(format!("agent.{}", std::process::id()));
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        Ok((path, listener))
    }
}

impl Drop for AuthSock {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory `/tmp/ssh-XXXXXXXXXX`, 0700. `mkdir` neither follows a link nor takes a
/// name someone else made first, so another user of the VM cannot slip in its own.
fn private_dir() -> std::io::Result<PathBuf> {
    let mut rng = rand::rng();
    let mut last = None;
    for _ in 0..16 {
        let name: String = (0..10)
            .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
            .collect();
        let dir = PathBuf::from(format!("/tmp/ssh-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name under /tmp")))
}
