//! The SSH front door: one tokio current-thread runtime per configured CPU, pinned to it, each
//! with its own SO_REUSEPORT listener, serving russh sessions. Connections to the lobby address
//! run lobby commands; connections to a pool address are routed by (client key fingerprint,
//! dialled address) to the caller's VM. See dataplane/DESIGN.md ("SSH shards") and docs/ssh.md.

pub mod command;
mod cutoff;
pub mod exec;
mod listing;
pub mod lobby;
mod prompt;
pub mod relay;
mod session;
mod slots;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use boxd_operations::Operations;
use russh::keys::PrivateKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use self::cutoff::{Cutoff, Switch};
use self::lobby::Lobby;
use self::session::{Conn, Shared};
use self::slots::{HandshakeSlot, Limits};

/// Read buffer per SSH connection (both the client's and the one to the guest agent). Larger
/// reads (bulk data) bypass it.
const READ_BUFFER: usize = 8 * 1024;

/// `[ssh]` of boxd's configuration file, defined once: the binary embeds this type in its
/// `Config` and hands it to [`SshServer::start`] as it is (with `cpus` resolved).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// Listen address; only connections addressed to the lobby or a pool address are served.
    pub listen: SocketAddr,
    /// CPUs to run shards on, one pinned shard each; empty means every CPU (`boxd` resolves
    /// that before starting; given an empty list, the server runs one unpinned shard).
    pub cpus: Vec<usize>,
    /// Seconds a client has to authenticate.
    pub auth_timeout_secs: u64,
    /// Connections still authenticating, per shard, and per client address per shard.
    pub max_handshakes_per_shard: usize,
    /// See `max_handshakes_per_shard`.
    pub max_handshakes_per_ip: usize,
    /// Channels one connection may have open.
    pub max_channels_per_connection: usize,
    /// Seconds between keepalive probes (three unanswered close the connection).
    pub keepalive_secs: u64,
    /// Seconds `new`, `start` and `restart` wait for the VM to become reachable (the
    /// operations' wait; see boxd-operations `Settings`).
    pub ready_timeout_secs: u64,
    /// The port guest agents listen on (not in the file).
    #[serde(skip)]
    pub agent_port: u16,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 2222)),
            cpus: Vec::new(),
            auth_timeout_secs: 30,
            max_handshakes_per_shard: 256,
            max_handshakes_per_ip: 32,
            max_channels_per_connection: 16,
            keepalive_secs: 30,
            ready_timeout_secs: 120,
            agent_port: relay::AGENT_PORT,
        }
    }
}

impl SshConfig {
    /// Checks what the types cannot express; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.auth_timeout_secs == 0
            || self.max_handshakes_per_shard == 0
            || self.max_handshakes_per_ip == 0
            || self.max_channels_per_connection == 0
            || self.keepalive_secs == 0
            || self.ready_timeout_secs == 0
        {
            return Err((
                "ssh.auth_timeout_secs",
                "SSH timeouts and limits must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// One SO_REUSEPORT listener per shard.
pub struct Listeners {
    shards: Vec<TcpListener>,
    addr: SocketAddr,
}

impl Listeners {
    /// Binds `shards` listeners on `addr`.
    pub fn bind(addr: SocketAddr, shards: usize) -> std::io::Result<Self> {
        let shards = crate::shard::listen_shards(addr, shards)?;
        let addr = shards[0].local_addr()?;
        Ok(Self { shards, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Key exchanges offered, best first: the post-quantum hybrid (OpenSSH 9.9+), then X25519
/// (every OpenSSH since 6.5; Debian 12 ships 9.2), then the 4096- and 8192-bit groups
/// for clients without either. Not offered: `diffie-hellman-group14-sha256` (2048 bits,
/// which ssh-audit warns about) and group exchange. The pseudo-algorithms announce RFC 8308
/// extensions and strict key exchange (Terrapin).
const KEX: &[russh::kex::Name] = &[
    russh::kex::MLKEM768X25519_SHA256,
    russh::kex::CURVE25519,
    russh::kex::CURVE25519_PRE_RFC_8731,
    russh::kex::DH_G16_SHA512,
    russh::kex::DH_G18_SHA512,
    russh::kex::EXTENSION_SUPPORT_AS_SERVER,
    russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// MACs for the non-AEAD ciphers: encrypt-then-MAC only (ssh-audit warns about
/// encrypt-and-MAC). AEAD ciphers (chosen by every current client) need none.
const MACS: &[russh::mac::Name] = &[russh::mac::HMAC_SHA512_ETM, russh::mac::HMAC_SHA256_ETM];

/// A parsed host key.
pub type HostKey = PrivateKey;

/// Why the host key is unusable.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// Not an OpenSSH private key.
    #[error("the stored SSH host key is not an OpenSSH private key ({0})")]
    Parse(String),
}

/// A new Ed25519 host key in OpenSSH form.
pub fn generate_host_key() -> String {
    let seed: [u8; 32] = rand::random();
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(pair);
    // Encoding an in-memory Ed25519 key cannot fail.
    key.to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// Parses a host key stored by [`generate_host_key`]; returns it with its public fingerprint.
pub fn parse_host_key(pem: &str) -> Result<(PrivateKey, String), HostKeyError> {
    let key = PrivateKey::from_openssh(pem).map_err(|e| HostKeyError::Parse(e.to_string()))?;
    let fp = key
        .public_key()
        .fingerprint(russh::keys::HashAlg::Sha256)
        .to_string();
    Ok((key, fp))
}

/// Running shards.
pub struct SshServer {
    stop: watch::Sender<bool>,
    shards: Vec<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl SshServer {
    /// Starts one shard per listener, pinned to `cfg.cpus` in order.
    pub fn start(
        listeners: Listeners,
        cfg: SshConfig,
        host_key: PrivateKey,
        agent_key: PrivateKey,
        ops: Arc<Operations>,
    ) -> std::io::Result<Self> {
        let russh_cfg = Arc::new(russh::server::Config {
            server_id: russh::SshId::Standard("SSH-2.0-boxd".into()),
            methods: russh::MethodSet::from(
                &[
                    russh::MethodKind::PublicKey,
                    russh::MethodKind::KeyboardInteractive,
                ][..],
            ),
            auth_rejection_time: Duration::from_millis(50),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key],
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(cfg.keepalive_secs)),
            keepalive_max: 3,
            max_auth_attempts: 8,
            nodelay: true,
            preferred: russh::Preferred {
                kex: std::borrow::Cow::Borrowed(KEX),
                mac: std::borrow::Cow::Borrowed(MACS),
                ..russh::Preferred::DEFAULT
            },
            ..Default::default()
        });
        let agent_key = Arc::new(agent_key);
        let (stop, stop_rx) = watch::channel(false);
        let addr = listeners.addr;
        let mut shards = Vec::new();
        for (i, listener) in listeners.shards.into_iter().enumerate() {
            let cpu = cfg.cpus.get(i).copied();
            let shared = Arc::new(Shared {
                lobby: Lobby::new(Arc::clone(&ops)),
                cfg: cfg.clone(),
                limits: Limits::default(),
                agent_key: Arc::clone(&agent_key),
                agent_port: cfg.agent_port,
            });
            let russh_cfg = Arc::clone(&russh_cfg);
            let stop_rx = stop_rx.clone();
            let t = std::thread::Builder::new()
                .name(format!("ssh-shard-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu
                        && let Err(e) = crate::shard::pin_current_thread(cpu)
                    {
                        tracing::warn!(cpu, error = %e, "cannot pin the SSH shard");
                    }
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the SSH shard runtime");
                            return;
                        }
                    };
                    rt.block_on(shard(listener, shared, russh_cfg, stop_rx));
                })?;
            shards.push(t);
        }
        Ok(Self { stop, shards, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and ends every shard (open sessions are dropped).
    pub fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.shards {
            let _ = t.join();
        }
    }
}

async fn shard(
    listener: TcpListener,
    shared: Arc<Shared>,
    russh_cfg: Arc<russh::server::Config>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the SSH listener");
            return;
        }
    };
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        if !ours(&shared, local) {
            // Not the lobby or a pool address: not ours to serve.
            continue;
        }
        let cfg = &shared.cfg;
        // Cuts this connection's socket: at the auth deadline, or to make room for another
        // address on a full shard (`slots`).
        let switch = Switch::default();
        let Some(slot) = HandshakeSlot::take(
            &shared.limits,
            peer.ip(),
            cfg.max_handshakes_per_shard,
            cfg.max_handshakes_per_ip,
            switch.clone(),
        ) else {
            tracing::debug!(%peer, "too many handshakes; dropping");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let authed = Arc::new(AtomicBool::new(false));
        let conn = Conn::new(
            Arc::clone(&shared),
            local,
            peer.ip(),
            slot,
            Arc::clone(&authed),
        );
        let russh_cfg = Arc::clone(&russh_cfg);
        let auth_timeout = Duration::from_secs(cfg.auth_timeout_secs);
        tokio::spawn(async move {
            // One deadline from accept for the version exchange, the key exchange and
            // authentication, however the client paces its bytes: past it, the connection is
            // cut off wherever the session is (see `cutoff`).
            let deadline = tokio::time::Instant::now() + auth_timeout;
            let cut = switch.clone();
            let watchdog = tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                if !authed.load(Ordering::Relaxed) {
                    tracing::debug!(%peer, "not authenticated in time; closing");
                    cut.cut();
                }
            });
            // russh reads each packet with two `read_exact`s (the first block, then the rest):
            // buffered, one flight of packets costs one `recvfrom` instead of two per packet.
            let stream =
                tokio::io::BufReader::with_capacity(READ_BUFFER, Cutoff::new(stream, switch));
            match russh::server::run_stream(russh_cfg, stream, conn).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(%peer, error = %e, "ssh session ended");
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "ssh handshake"),
            }
            watchdog.abort();
        });
    }
}

/// The IPv4 address of a local socket address (IPv4-mapped IPv6 included).
pub(crate) fn ipv4_of(addr: SocketAddr) -> Option<std::net::Ipv4Addr> {
    match addr.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// Whether a connection to `local` is ours: the lobby or a pool address.
fn ours(shared: &Shared, local: SocketAddr) -> bool {
    ipv4_of(local).is_some_and(|ip| shared.lobby.ops().view().current().is_public_address(ip))
}
