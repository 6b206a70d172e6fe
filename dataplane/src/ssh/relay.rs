//! Relaying a user's SSH connection to the guest agent inside their VM.
//!
//! The agent speaks SSH itself, so the relay is SSH to SSH: per user connection one client
//! connection to the agent (opened on the first channel, over the private fabric to the VM's
//! private address), authenticated with the cluster's agent key; per user channel one agent
//! channel, with every request and message passed through — pty and window changes, env,
//! exec/shell/subsystem, signals, data both ways, EOF, exit status and exit signal — plus
//! direct-tcpip (`ssh -L`) and tcpip-forward (`ssh -R`), whose forwarded channels come back
//! from the agent and are opened towards the user, and agent forwarding (`ssh -A`), whose
//! agent channels come back the same way — only once the user asked for it on the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use boxd_model::view::VmRoute;
use russh::client;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::server;
use russh::{Channel, ChannelMsg};
use tokio::sync::OnceCell;

pub use boxd_model::model::AGENT_PORT;

/// How long connecting and authenticating to an agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The cluster's agent key (see `boxd_model::model::agent_key_seed`): every proxy holds the
/// same one. Workers give VMs its public half.
pub fn agent_key(cluster_secret: &str) -> PrivateKey {
    let seed = boxd_model::model::agent_key_seed(cluster_secret);
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// Ciphers the relay offers the agent, first choice first: AES-GCM, which ring runs on the
/// CPU's AES instructions (the agent, in the VM, has the host's CPU). Both ends are boxd's, so
/// the private hop need not take a user's client's choice (OpenSSH picks ChaCha20-Poly1305).
const AGENT_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
];

/// The relay's SSH client configuration for its connection to a guest agent.
fn agent_client_config() -> client::Config {
    client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(AGENT_CIPHERS),
            ..russh::Preferred::default()
        },
        ..Default::default()
    }
}

/// The client side towards one agent.
pub(crate) struct AgentClient {
    /// The user's connection, for channels the agent opens (`ssh -R`); none for an API
    /// `Exec`, which refuses them.
    user: Option<server::Handle>,
    /// The host key its worker recorded for the VM's agent; none for VMs made before
    /// per-VM keys, whose agents have throwaway keys.
    expected: Option<String>,
    /// Set when the agent presented any other key.
    refused: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the user asked for agent forwarding (`ssh -A`) on this connection: until then
    /// a VM that opens an agent channel is refused, as OpenSSH's client refuses one.
    agent_forwarding: Arc<std::sync::atomic::AtomicBool>,
}

impl client::Handler for AgentClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Whatever answers at the VM's private address must prove it is the VM's agent: a
        // VM holding another's address (spoofed, or an address reused while a route was
        // stale) would otherwise get its owner's sessions.
        let Some(expected) = &self.expected else {
            return Ok(true);
        };
        let ok = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                russh::keys::PublicKey::from_openssh(expected)
                    .is_ok_and(|e| e.key_data() == key.key_data())
            }
            // Agents present plain keys; a certificate is not the recorded key.
            _ => false,
        };
        if !ok {
            self.refused
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(user) = &self.user else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let towards_user = user
            .channel_open_forwarded_tcpip(
                connected_address,
                connected_port,
                originator_address,
                originator_port,
            )
            .await;
        join(channel, reply, towards_user).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        use std::sync::atomic::Ordering;
        let user = match &self.user {
            Some(u) if self.agent_forwarding.load(Ordering::Relaxed) => u,
            _ => {
                tracing::debug!("agent channel from a VM whose user forwards no agent: refused");
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return Ok(());
            }
        };
        join(channel, reply, user.channel_open_agent().await).await;
        Ok(())
    }
}

/// A channel the agent opened, joined to its counterpart towards the user: accepted and copied
/// both ways, or refused when the user's side could not be opened.
async fn join(
    channel: Channel<client::Msg>,
    reply: client::ChannelOpenHandle,
    towards_user: Result<Channel<server::Msg>, russh::Error>,
) {
    match towards_user {
        Ok(u) => {
            reply.accept().await;
            tokio::spawn(async move {
                let mut a = channel.into_stream();
                let mut b = u.into_stream();
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
        Err(_) => reply.reject(russh::ChannelOpenFailure::ConnectFailed).await,
    }
}

/// What `connect` says when the agent is not the VM's.
const NOT_VERIFIED: &str = "not verified";

/// One user connection's link to its VM's agent, opened on first use.
pub(crate) struct AgentLink {
    vm: Arc<VmRoute>,
    user: String,
    key: Arc<PrivateKey>,
    port: u16,
    conn: OnceCell<Result<Arc<client::Handle<AgentClient>>, String>>,
    agent_forwarding: Arc<std::sync::atomic::AtomicBool>,
    /// To say why when the VM cannot be reached because its worker is silent.
    ops: Arc<boxd_operations::Operations>,
}

impl AgentLink {
    pub fn new(
        vm: Arc<VmRoute>,
        user: String,
        key: Arc<PrivateKey>,
        port: u16,
        ops: Arc<boxd_operations::Operations>,
    ) -> Self {
        Self {
            vm,
            user,
            key,
            port,
            ops,
            conn: OnceCell::new(),
            agent_forwarding: Arc::default(),
        }
    }

    /// The user asked for agent forwarding (`ssh -A`): the VM's agent channels now reach them.
    pub fn forward_agent(&self) {
        self.agent_forwarding
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The agent connection, or why there is none (a sentence for the user).
    pub async fn get(
        &self,
        user_handle: &server::Handle,
    ) -> Result<Arc<client::Handle<AgentClient>>, String> {
        let got = self
            .conn
            .get_or_init(|| async {
                tokio::time::timeout(CONNECT_TIMEOUT, self.connect(user_handle.clone()))
                    .await
                    .unwrap_or_else(|_| Err("it did not answer in time".into()))
                    .map(Arc::new)
            })
            .await
            .clone();
        if got.is_err()
            && let Some(silence) = self.ops.worker_silence(self.vm.worker).await
        {
            return Err(format!(
                "cannot reach {}: its {silence}; it comes back with its worker, try again later",
                self.vm.name
            ));
        }
        got.map_err(|why| {
            if why == NOT_VERIFIED {
                return format!(
                    "{} could not be verified: what answered at its address did not present \
                         the host key its worker recorded for it, so boxd did not connect you \
                         (tell the operator of this cluster)",
                    self.vm.name
                );
            }
            format!(
                "cannot reach the agent of {} ({why}); if it just started, try again in a moment",
                self.vm.name
            )
        })
    }

    async fn connect(&self, user: server::Handle) -> Result<client::Handle<AgentClient>, String> {
        dial(
            &self.vm,
            &self.user,
            &self.key,
            self.port,
            Some(user),
            Arc::clone(&self.agent_forwarding),
        )
        .await
    }
}

/// Connects to `vm`'s agent at `port` and authenticates as `user` with the cluster's `key`;
/// the agent must present the host key recorded for the VM. `towards_user` is the user's
/// connection, for channels the agent opens (none for an API `Exec`).
pub(super) async fn dial(
    vm: &VmRoute,
    user: &str,
    key: &Arc<PrivateKey>,
    port: u16,
    towards_user: Option<server::Handle>,
    agent_forwarding: Arc<std::sync::atomic::AtomicBool>,
) -> Result<client::Handle<AgentClient>, String> {
    let ip = vm.private_ip.ok_or("it has no private address yet")?;
    let addr = SocketAddr::from((ip, port));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let cfg = Arc::new(agent_client_config());
    // Buffered for the same reason as the shards' accepted connections.
    let tcp = tokio::io::BufReader::with_capacity(super::READ_BUFFER, tcp);
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = AgentClient {
        user: towards_user,
        expected: vm.agent_key.clone(),
        refused: Arc::clone(&refused),
        agent_forwarding,
    };
    let mut h = client::connect_stream(cfg, tcp, client)
        .await
        .map_err(|e| {
            if refused.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(vm = %vm.name, %addr, "the agent's host key is not the one recorded for the VM");
                NOT_VERIFIED.to_owned()
            } else {
                format!("handshake: {e}")
            }
        })?;
    let auth = h
        .authenticate_publickey(
            user.to_owned(),
            russh::keys::PrivateKeyWithHashAlg::new(Arc::clone(key), None),
        )
        .await
        .map_err(|e| format!("authentication: {e}"))?;
    if !auth.success() {
        return Err("it refused the cluster's agent key".into());
    }
    Ok(h)
}

/// Relays one session channel to a new agent session channel until either side closes.
///
/// `ended` resolves, with a line for the user, when the VM is stopped or deleted meanwhile: the
/// user is told why, and the agent's channel closed. An agent that goes away without an exit
/// status (the VM's process ended) is explained too, rather than a bare exit 255.
pub(crate) async fn session(
    agent: &client::Handle<AgentClient>,
    user: Channel<server::Msg>,
    user_handle: server::Handle,
    ended: impl std::future::Future<Output = String>,
    vm: &str,
) -> Result<(), String> {
    let remote = agent
        .channel_open_session()
        .await
        .map_err(|e| format!("the agent refused a session: {e}"))?;
    let id = user.id();
    let (mut urx, utx) = user.split();
    let (mut arx, atx) = remote.split();
    // The two directions run side by side, never one waiting on the other: a write that waits
    // for a peer's window must not stop the other direction's reads, or russh's session —
    // which stalls while a channel's queue is full — never processes the window adjust that
    // write waits for (an scp download of 50 MB hung that way). A failed write ends nothing:
    // each direction reads on until its side closes.
    let user_to_agent = async {
        loop {
            let _ = match urx.wait().await {
                Some(ChannelMsg::Data { data }) => atx.data_bytes(data).await,
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    atx.extended_data_bytes(ext, data).await
                }
                Some(ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                    ..
                }) => {
                    atx.request_pty(
                        false,
                        &term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        &terminal_modes,
                    )
                    .await
                }
                Some(ChannelMsg::SetEnv {
                    variable_name,
                    variable_value,
                    ..
                }) => atx.set_env(false, variable_name, variable_value).await,
                Some(ChannelMsg::Exec { command, .. }) => atx.exec(false, command).await,
                Some(ChannelMsg::RequestShell { .. }) => atx.request_shell(false).await,
                Some(ChannelMsg::RequestSubsystem { name, .. }) => {
                    atx.request_subsystem(false, name).await
                }
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                }) => {
                    atx.window_change(col_width, row_height, pix_width, pix_height)
                        .await
                }
                Some(ChannelMsg::Signal { signal }) => atx.signal(signal).await,
                Some(ChannelMsg::AgentForward { .. }) => atx.agent_forward(false).await,
                Some(ChannelMsg::Eof) => atx.eof().await,
                Some(ChannelMsg::Close) | None => {
                    // The user is gone (or done): close the agent's channel — the agent hangs
                    // up its command — and stop. Its answering close is not awaited: russh
                    // drops a peer's CHANNEL_CLOSE for a channel closed locally, so waiting
                    // for it would hold the agent connection open forever.
                    let _ = atx.close().await;
                    return;
                }
                Some(_) => Ok(()),
            };
        }
    };
    let agent_to_user = async {
        // Whether the agent said how the command ended (else its going away needs a word).
        let mut exited = false;
        loop {
            let _ = match arx.wait().await {
                Some(ChannelMsg::Data { data }) => utx.data_bytes(data).await,
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    utx.extended_data_bytes(ext, data).await
                }
                Some(ChannelMsg::Eof) => utx.eof().await,
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    exited = true;
                    utx.exit_status(exit_status).await
                }
                Some(ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                }) => {
                    exited = true;
                    user_handle
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await
                        .map_err(|()| russh::Error::SendError)
                }
                Some(ChannelMsg::Close) | None => {
                    if !exited {
                        let why = format!(
                            "boxd: the connection to {vm} ended before its command did: the VM \
                             stopped or restarted (`events {vm}` in the lobby says which)\n"
                        );
                        let _ = utx.extended_data_bytes(1, bytes::Bytes::from(why)).await;
                    }
                    let _ = utx.close().await;
                    return;
                }
                Some(_) => Ok(()),
            };
        }
    };
    tokio::select! {
        why = ended => {
            let _ = utx.extended_data_bytes(1, bytes::Bytes::from(why)).await;
            let _ = utx.close().await;
            let _ = atx.close().await;
        }
        () = user_to_agent => {}
        () = agent_to_user => {}
    }
    Ok(())
}

/// Relays `ssh -L`: a direct-tcpip channel opened towards the agent, bytes copied both ways.
pub(crate) async fn direct_tcpip(
    link: &AgentLink,
    user_handle: &server::Handle,
    host: String,
    port: u32,
    origin: (String, u32),
) -> Result<Channel<client::Msg>, String> {
    let agent = link.get(user_handle).await?;
    agent
        .channel_open_direct_tcpip(host, port, origin.0, origin.1)
        .await
        .map_err(|e| format!("the VM could not connect: {e}"))
}

/// Asks the agent to stop listening for an `ssh -R`; whether it was listening.
pub(crate) async fn cancel_tcpip_forward(
    link: &AgentLink,
    user_handle: &server::Handle,
    address: String,
    port: u32,
) -> bool {
    match link.get(user_handle).await {
        Ok(agent) => agent.cancel_tcpip_forward(address, port).await.is_ok(),
        Err(_) => false,
    }
}

/// Asks the agent to listen for `ssh -R`; returns the bound port.
pub(crate) async fn tcpip_forward(
    link: &AgentLink,
    user_handle: &server::Handle,
    address: String,
    port: u32,
) -> Result<u32, String> {
    let agent = link.get(user_handle).await?;
    agent
        .tcpip_forward(address, port)
        .await
        .map_err(|e| format!("the VM refused the forward: {e}"))
}
