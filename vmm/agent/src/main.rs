//! `boxd-agent`: the guest agent. It runs inside every VM (as the init process's child in the
//! sandbox runtime, from the image in kvm) and serves SSH to exactly one client: the boxd proxy,
//! which proves the cluster's agent key. Users never reach it directly; the proxy relays their
//! channels to it.
//!
//! ```text
//! boxd-agent --listen 10.0.0.2:2200 --authorized-key /etc/boxd/agent.pub \
//!     --host-key /etc/boxd/agent_host_key
//! ```

mod auth_sock;
mod pty;
mod server;
mod sftp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the proxy reaches the agent unless told otherwise.
pub const DEFAULT_PORT: u16 = 2200;

struct Args {
    listen: SocketAddr,
    authorized_key: PathBuf,
    host_key: Option<PathBuf>,
}

const USAGE: &str = "usage: boxd-agent --listen ADDR:PORT --authorized-key FILE [--host-key FILE]\n\
  --listen          address to serve the proxy on (default 0.0.0.0:2200)\n\
  --authorized-key  the cluster's agent public key (OpenSSH form); nothing else may connect\n\
  --host-key        this VM's agent host key (OpenSSH private key), which the proxy checks;\n\
                    without it a throwaway key\n\
boxd-agent --sftp-server: an SFTP server on stdin/stdout (the agent runs it as a session's\n\
  user when the VM has no OpenSSH sftp-server)\n";

fn parse_args() -> Result<Args, String> {
    let mut listen = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT));
    let mut key = None;
    let mut host_key = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                listen = v
                    .parse()
                    .map_err(|_| format!("--listen {v} is not ADDR:PORT, e.g. 0.0.0.0:2200"))?;
            }
            "--authorized-key" => key = Some(PathBuf::from(value()?)),
            "--host-key" => host_key = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let authorized_key = key.ok_or_else(|| format!("--authorized-key is required\n{USAGE}"))?;
    Ok(Args {
        listen,
        authorized_key,
        host_key,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOXD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The agent runs itself this way, as a session's user, for the sftp subsystem.
    if std::env::args().nth(1).as_deref() == Some("--sftp-server") {
        return sftp::serve_stdio();
    }
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprint!("boxd-agent: {e}");
            if !e.ends_with('\n') {
                eprintln!();
            }
            return ExitCode::from(2);
        }
    };
    let authorized = match std::fs::read_to_string(&args.authorized_key)
        .map_err(|e| e.to_string())
        .and_then(|t| russh::keys::PublicKey::from_openssh(t.trim()).map_err(|e| e.to_string()))
    {
        Ok(k) => k,
        Err(e) => {
            eprintln!(
                "boxd-agent: --authorized-key {}: {e} (expected one OpenSSH public key)",
                args.authorized_key.display()
            );
            return ExitCode::from(2);
        }
    };
    let host_key = match &args.host_key {
        None => None,
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                russh::keys::PrivateKey::from_openssh(t.trim()).map_err(|e| e.to_string())
            }) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!(
                    "boxd-agent: --host-key {}: {e} (expected an OpenSSH private key)",
                    path.display()
                );
                return ExitCode::from(2);
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("boxd-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(server::serve(args.listen, authorized, host_key)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boxd-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
