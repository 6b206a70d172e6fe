//! One SSH connection: authentication by public key, the routing decision (lobby or a VM, by
//! the key's fingerprint and the address the client dialled), and one task per session
//! channel that runs lobby commands or explains why there is nothing to reach.
//!
//! Unknown keys are rejected at first, so that a client holding several keys goes on to offer
//! the one that is registered; the first verified unknown key is remembered, and if the client
//! then falls back to keyboard-interactive (OpenSSH does, with no prompts here) the session is
//! admitted in a mode that only prints the registration link or the "no VM" message. On a
//! fresh cluster the first key ever seen claims the owner account instead.

use boxd_model::counters;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use boxd_model::model::{Desired, Fingerprint, Observed};
use boxd_model::view::VmRoute;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure};

use super::SshConfig;
use super::lobby::{Caller, EXIT_FAILED, Lobby};
use super::prompt::{Term, exec, interactive};
use super::relay::{self, AgentLink};
use super::slots::{HandshakeSlot, Limits};
use boxd_operations::ErrorKind;

/// Exit status when there is no VM to reach (what `ssh` itself uses for connection failures).
pub const EXIT_NO_VM: u32 = 255;

/// What every connection of a shard shares.
pub(crate) struct Shared {
    pub lobby: Lobby,
    pub cfg: SshConfig,
    pub limits: Limits,
    /// The cluster's agent key (authenticates the proxy to guest agents).
    pub agent_key: Arc<russh::keys::PrivateKey>,
    /// The port agents listen on.
    pub agent_port: u16,
}

/// What an authenticated connection may do.
#[derive(Clone, Debug)]
enum Mode {
    /// Not authenticated yet.
    Pending,
    /// The lobby, as this account.
    Lobby(Caller),
    /// An unknown key at the lobby: print this and exit 1.
    Refused(String),
    /// A VM of the caller's at the dialled address.
    Vm(Arc<VmRoute>),
    /// Nothing of the caller's at the dialled address.
    NoVm,
}

/// The russh handler for one connection.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    local: SocketAddr,
    /// The client's address.
    peer: IpAddr,
    mode: Mode,
    /// The first verified key that was not admitted, with its OpenSSH form.
    unknown: Option<(Fingerprint, String)>,
    slot: Option<HandshakeSlot>,
    authed: Arc<AtomicBool>,
    channels: Arc<AtomicUsize>,
    /// The SSH user name (selects the user inside the VM; the lobby ignores it).
    user: String,
    /// The link to the VM's agent, for VM sessions.
    link: Option<Arc<AgentLink>>,
    /// Said on the connection's first session (that this key just became the owner).
    notice: Option<String>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        counters::inc(&counters::COUNTERS.ssh_closed);
    }
}

impl Conn {
    pub fn new(
        shared: Arc<Shared>,
        local: SocketAddr,
        peer: IpAddr,
        slot: HandshakeSlot,
        authed: Arc<AtomicBool>,
    ) -> Self {
        counters::inc(&counters::COUNTERS.ssh_connections);
        Self {
            shared,
            local,
            peer,
            mode: Mode::Pending,
            unknown: None,
            slot: Some(slot),
            authed,
            channels: Arc::new(AtomicUsize::new(0)),
            user: String::new(),
            link: None,
            notice: None,
        }
    }

    fn local_v4(&self) -> Option<Ipv4Addr> {
        super::ipv4_of(self.local)
    }

    fn is_lobby(&self) -> bool {
        let view = self.shared.lobby.ops().view().current();
        match self.local_v4() {
            Some(ip) => view.lobby_addresses().any(|l| l == ip),
            None => false,
        }
    }

    fn admit(&mut self, mode: Mode) -> Auth {
        if let Mode::Vm(vm) = &mode {
            let user = if self.user.is_empty() {
                "root"
            } else {
                &self.user
            };
            self.link = Some(Arc::new(AgentLink::new(
                Arc::clone(vm),
                user.to_owned(),
                Arc::clone(&self.shared.agent_key),
                self.shared.agent_port,
                Arc::clone(self.shared.lobby.ops()),
            )));
        }
        self.mode = mode;
        self.slot = None;
        self.authed.store(true, Ordering::Relaxed);
        Auth::Accept
    }

    /// The message for an unknown key at the lobby: a registration link (reusing a live one).
    async fn registration_message(&self, fp: &Fingerprint, public_key: &str) -> String {
        let ops = self.shared.lobby.ops();
        let zone = ops.zone();
        match ops.registration_link(fp, public_key, self.peer).await {
            Ok(link) => {
                let how = match &ops.settings().sign_in {
                    Some(name) => format!("sign in with {name} and link it to your account"),
                    None => "link it to your account".to_owned(),
                };
                format!(
                    "this key ({fp}) is not registered with {zone}.\nOpen {link} to {how} (valid 24 h),\nor add it from a registered key with `keys add`."
                )
            }
            Err(e) if e.kind == ErrorKind::Exhausted => format!(
                "this key ({fp}) is not registered with {zone}, and no link was made: {e},\nor add it from a registered key with `keys add`."
            ),
            Err(e) => {
                format!("this key ({fp}) is not registered, and no link could be made: {e}")
            }
        }
    }
}

impl Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        user.clone_into(&mut self.user);
        let Ok(blob) = key.public_key.to_bytes() else {
            return Ok(reject());
        };
        let fp = Fingerprint::of_key_blob(&blob);
        let lobby = self.is_lobby();
        let account = self.shared.lobby.ops().view().current().account_of(&fp);
        if lobby {
            if let Some(account) = account {
                return Ok(self.admit(Mode::Lobby(Caller::key(account, fp))));
            }
            let text = key.public_key.to_openssh().unwrap_or_default();
            // A fresh cluster: the first key claims the owner account.
            if let Ok(caller) = self.shared.lobby.ops().claim_owner(&fp, &text).await {
                self.notice = Some(format!(
                    "boxd: this key ({fp}) now owns {}: it was the first to connect. Other \
                     keys get a registration link; add yours with `keys add`.\n",
                    self.shared.lobby.ops().zone()
                ));
                return Ok(self.admit(Mode::Lobby(caller)));
            }
            if self.unknown.is_none() {
                self.unknown = Some((fp, text));
            }
            return Ok(reject());
        }
        let Some(ip) = self.local_v4() else {
            return Ok(reject());
        };
        let route = self
            .shared
            .lobby
            .ops()
            .view()
            .current()
            .ssh_route(&fp, ip)
            .cloned();
        match route {
            Some(vm) => Ok(self.admit(Mode::Vm(vm))),
            None => {
                if self.unknown.is_none() {
                    self.unknown = Some((fp, String::new()));
                }
                Ok(reject())
            }
        }
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        _user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        // Only a client that proved a key (and had it refused) gets in, to be told why.
        let Some((fp, text)) = self.unknown.clone() else {
            return Ok(reject());
        };
        let mode = if self.is_lobby() {
            Mode::Refused(self.registration_message(&fp, &text).await)
        } else {
            Mode::NoVm
        };
        Ok(self.admit(mode))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let open = self.channels.fetch_add(1, Ordering::Relaxed);
        let max = self.shared.cfg.max_channels_per_connection;
        if open >= max + EXPLAINED_REFUSALS {
            self.channels.fetch_sub(1, Ordering::Relaxed);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        reply.accept().await;
        if open >= max {
            // Past the limit: accepted only to say why (a bare refusal shows the user an empty
            // "open failed"), then closed.
            let count = Arc::clone(&self.channels);
            let msg = format!(
                "boxd: this connection already has {max} sessions and forwards open, the most \
                 one connection may have: close one, or open another connection"
            );
            tokio::spawn(async move {
                let _ = tokio::time::timeout(EXPLAIN_TIMEOUT, explain(channel, &msg, 1)).await;
                count.fetch_sub(1, Ordering::Relaxed);
            });
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let mode = self.mode.clone();
        let count = Arc::clone(&self.channels);
        let local = self.local;
        let link = self.link.clone();
        let handle = session.handle();
        let notice = self.notice.take();
        tokio::spawn(async move {
            serve_channel(shared, mode, channel, local, link, handle, notice).await;
            count.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(link) = self.link.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let open = self.channels.fetch_add(1, Ordering::Relaxed);
        if open >= self.shared.cfg.max_channels_per_connection {
            self.channels.fetch_sub(1, Ordering::Relaxed);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let handle = session.handle();
        let origin = (originator_address.to_owned(), originator_port);
        let target = relay::direct_tcpip(
            &link,
            &handle,
            host_to_connect.to_owned(),
            port_to_connect,
            origin,
        )
        .await;
        match target {
            Ok(remote) => {
                reply.accept().await;
                let count = Arc::clone(&self.channels);
                tokio::spawn(async move {
                    let mut a = channel.into_stream();
                    let mut b = remote.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    count.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(why) => {
                self.channels.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(%why, "direct-tcpip refused");
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
        let Some(link) = self.link.clone() else {
            return Ok(false);
        };
        let handle = session.handle();
        match relay::tcpip_forward(&link, &handle, address.to_owned(), *port).await {
            Ok(bound) => {
                *port = bound;
                Ok(true)
            }
            Err(why) => {
                tracing::debug!(%why, "tcpip-forward refused");
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(link) = self.link.clone() else {
            return Ok(false);
        };
        let handle = session.handle();
        Ok(relay::cancel_tcpip_forward(&link, &handle, address.to_owned(), port).await)
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
        // Relayed to the agent by the channel's loop; the lobby has no agent to forward to.
        match &self.link {
            Some(link) => {
                link.forward_agent();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The lobby has no subsystems; VM sessions relay theirs to the agent.
        match self.mode {
            Mode::Vm(_) => session.channel_success(channel),
            _ => session.channel_failure(channel),
        }
    }
}

/// Session channels past the per-connection limit that are accepted to say why; past these,
/// channels are refused outright.
const EXPLAINED_REFUSALS: usize = 4;

/// How long such a channel waits for the client's request before it is dropped.
const EXPLAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn reject() -> Auth {
    counters::inc(&counters::COUNTERS.ssh_auth_failures);
    Auth::Reject {
        proceed_with_methods: None,
        partial_success: false,
    }
}

/// Runs one session channel to its end.
async fn serve_channel(
    shared: Arc<Shared>,
    mode: Mode,
    channel: Channel<Msg>,
    local: SocketAddr,
    link: Option<Arc<AgentLink>>,
    handle: russh::server::Handle,
    notice: Option<String>,
) {
    let caller = match &mode {
        Mode::Lobby(c) => c.clone(),
        Mode::Refused(msg) => {
            return explain(channel, &format!("boxd: {msg}\n"), EXIT_FAILED).await;
        }
        Mode::NoVm => {
            let msg = format!(
                "boxd: none of your VMs has the address {}: check the name with `ssh {} ls`\n",
                local.ip(),
                shared.lobby.ops().zone()
            );
            return explain(channel, &msg, EXIT_NO_VM).await;
        }
        Mode::Vm(vm) => {
            let why = match (vm_blocked(&shared, vm), link) {
                (Some(why), _) => why,
                (None, None) => "boxd: no agent link\n".to_owned(),
                (None, Some(link)) => match link.get(&handle).await {
                    Ok(agent) => {
                        let ended = vm_ended(Arc::clone(&shared), vm.id, vm.name.clone());
                        if let Err(e) =
                            relay::session(&agent, channel, handle, ended, &vm.name).await
                        {
                            tracing::debug!(error = %e, "relay ended");
                        }
                        return;
                    }
                    Err(why) => format!("boxd: {why}\n"),
                },
            };
            return explain(channel, &why, EXIT_NO_VM).await;
        }
        Mode::Pending => return explain(channel, "", EXIT_FAILED).await,
    };
    let (mut rx, tx) = channel.split();
    let Some((request, pty)) = wait_request(&mut rx).await else {
        return;
    };
    let term = Term { ch: &tx, pty };
    if let Some(n) = notice {
        term.err(&n).await;
    }
    let code = match request {
        Some(command) => {
            let line = String::from_utf8_lossy(&command).into_owned();
            exec(&shared.lobby, &caller, &line, &mut rx, &term).await
        }
        None => interactive(&shared.lobby, &caller, rx, &term).await,
    };
    term.finish(code).await;
}

/// Waits for what the client wants: `Some(command)` for exec, `None` for a shell (or a
/// subsystem, which only VMs have); with whether a pty was requested. `None` if it left.
async fn wait_request(rx: &mut russh::ChannelReadHalf) -> Option<(Option<Vec<u8>>, bool)> {
    let mut pty = false;
    loop {
        match rx.wait().await {
            Some(ChannelMsg::RequestPty { .. }) => pty = true,
            Some(ChannelMsg::Exec { command, .. }) => return Some((Some(command), pty)),
            Some(ChannelMsg::RequestShell { .. } | ChannelMsg::RequestSubsystem { .. }) => {
                return Some((None, pty));
            }
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return None,
            Some(_) => {}
        }
    }
}

/// Answers the client's request with `msg` on stderr and `code`.
async fn explain(channel: Channel<Msg>, msg: &str, code: u32) {
    let (mut rx, tx) = channel.split();
    let Some((_, pty)) = wait_request(&mut rx).await else {
        return;
    };
    let term = Term { ch: &tx, pty };
    term.err(msg).await;
    term.finish(code).await;
}

/// Why a VM session cannot be served right now, if it cannot.
/// Resolves, with a line for the user, once VM `id` is stopped or deleted (so its open
/// sessions say why they end).
async fn vm_ended(shared: Arc<Shared>, id: boxd_model::model::VmId, name: String) -> String {
    let view = shared.lobby.ops().view();
    let mut changes = view.subscribe();
    loop {
        match view.current().vm(id) {
            None => return format!("boxd: {name} was deleted; this session ends\n"),
            Some(v) if v.desired == Desired::Stopped => {
                return format!("boxd: {name} was stopped by its owner; this session ends\n");
            }
            Some(_) => {}
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

fn vm_blocked(shared: &Shared, vm: &VmRoute) -> Option<String> {
    let zone = shared.lobby.ops().zone();
    let current = shared.lobby.ops().view().current().vm(vm.id).cloned();
    let Some(vm) = current else {
        return Some(format!("boxd: {} was deleted\n", vm.name));
    };
    if vm.desired == Desired::Stopped || vm.observed == Observed::Stopped {
        return Some(format!(
            "boxd: {} is stopped: start it with `ssh {zone} start {}`\n",
            vm.name, vm.name
        ));
    }
    if vm.observed == Observed::Booting
        && let Some(why) = &vm.reason
    {
        return Some(format!(
            "boxd: {} is booting but cannot finish on its worker: {why}\n",
            vm.name
        ));
    }
    if vm.observed != Observed::Running || vm.private_ip.is_none() {
        return Some(format!(
            "boxd: {} is {}; try again when it is running (`ssh {zone} show {}`)\n",
            vm.name, vm.observed, vm.name
        ));
    }
    None
}
