//! Wiring the SSH front door into a node: the [`Backend`] the lobby uses, implemented on this
//! node's replica, the host key kept in the replica, and the shard configuration.
//!
//! The SSH shards run their own tokio runtimes; every replica call is spawned onto the control
//! plane's runtime, so the replica's tasks and gRPC channels stay on the runtime that owns them.

use std::sync::Arc;
use std::time::Duration;

use boxd_controlplane::Replica;
use boxd_controlplane::command::{Command, Outcome};
use boxd_controlplane::model::{AccountId, Fingerprint, Millis, Node, Registration, SshKey, Vm};
use boxd_controlplane::replica::WriteError;
use boxd_controlplane::store::ReadError;
use boxd_dataplane::ssh::backend::{Backend, BackendError, BoxFuture};
use boxd_dataplane::ssh::lobby::LobbySettings;
use boxd_dataplane::ssh::{HostKey, Listeners, SshConfig, SshServer};

use crate::config::Config;
use crate::error::NodeError;
use crate::host::shard_cpus;

/// The lobby's backend on this node's replica.
pub struct ReplicaBackend {
    replica: Arc<Replica>,
    rt: tokio::runtime::Handle,
}

impl ReplicaBackend {
    /// A backend running its calls on the current runtime.
    pub fn new(replica: Arc<Replica>) -> Self {
        Self {
            replica,
            rt: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `f` on the control plane's runtime.
    fn on_rt<T, F>(
        &self,
        f: impl FnOnce(Arc<Replica>) -> F,
    ) -> BoxFuture<'_, Result<T, BackendError>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, BackendError>> + Send + 'static,
    {
        let task = self.rt.spawn(f(Arc::clone(&self.replica)));
        Box::pin(async move {
            task.await
                .map_err(|e| BackendError::Unavailable(format!("the node is stopping ({e})")))?
        })
    }
}

fn read_err(e: ReadError) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

impl Backend for ReplicaBackend {
    fn write(&self, cmd: Command) -> BoxFuture<'_, Result<Outcome, BackendError>> {
        self.on_rt(|r| async move {
            r.write(cmd).await.map_err(|e| match e {
                WriteError::Rejected(a) => BackendError::Rejected(a),
                e => BackendError::Unavailable(e.to_string()),
            })
        })
    }

    fn vms_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<Vm>, BackendError>> {
        self.on_rt(move |r| async move { r.reader().vms_of(account).await.map_err(read_err) })
    }

    fn keys_of(&self, account: AccountId) -> BoxFuture<'_, Result<Vec<SshKey>, BackendError>> {
        self.on_rt(move |r| async move { r.reader().keys_of(account).await.map_err(read_err) })
    }

    fn registration_of(
        &self,
        fp: Fingerprint,
    ) -> BoxFuture<'_, Result<Option<Registration>, BackendError>> {
        self.on_rt(move |r| async move { r.reader().registration_of(fp).await.map_err(read_err) })
    }

    fn account_name(
        &self,
        account: AccountId,
    ) -> BoxFuture<'_, Result<Option<(String, u32)>, BackendError>> {
        self.on_rt(move |r| async move {
            let a = r.reader().account(account).await.map_err(read_err)?;
            Ok(a.map(|a| (a.name, a.max_vms)))
        })
    }

    fn events_of(
        &self,
        vm: boxd_controlplane::model::VmId,
    ) -> BoxFuture<'_, Result<Vec<(Millis, String)>, BackendError>> {
        self.on_rt(move |r| async move { r.reader().vm_events(vm).await.map_err(read_err) })
    }

    fn workers(&self) -> BoxFuture<'_, Result<Vec<Node>, BackendError>> {
        self.on_rt(|r| async move {
            let nodes = r.reader().nodes().await.map_err(read_err)?;
            Ok(nodes
                .into_iter()
                .filter(|n| n.roles.contains(&boxd_controlplane::model::Role::Worker))
                .collect())
        })
    }

    fn now(&self) -> Millis {
        self.replica.now()
    }
}

/// The shard configuration from `[ssh]`.
pub fn ssh_config(cfg: &Config, https_port: Option<u16>) -> SshConfig {
    let s = &cfg.ssh;
    SshConfig {
        listen: s.listen,
        cpus: shard_cpus(&s.cpus),
        auth_timeout: Duration::from_secs(s.auth_timeout_secs),
        max_handshakes: s.max_handshakes_per_shard,
        max_handshakes_per_ip: s.max_handshakes_per_ip,
        max_channels_per_connection: s.max_channels_per_connection,
        keepalive: Duration::from_secs(s.keepalive_secs),
        lobby: LobbySettings {
            ssh_port: s.listen.port(),
            https_port,
            ready_timeout: Duration::from_secs(s.ready_timeout_secs),
        },
        ..SshConfig::default()
    }
}

/// Binds the shard listeners (before the replica opens, so a taken port fails fast).
pub fn bind(cfg: &Config) -> Result<Listeners, NodeError> {
    Listeners::bind(cfg.ssh.listen, shard_cpus(&cfg.ssh.cpus).len()).map_err(|e| {
        NodeError::Usage(format!(
            "cannot listen on ssh.listen {}: {e} (is another SSH server on that port? set ssh.listen in the config)",
            cfg.ssh.listen
        ))
    })
}

/// The cluster's SSH host key: the one in the replica, or a new one stored there first (the
/// log keeps the first written, so proxies that race agree). Returns it with its fingerprint.
async fn host_key(replica: &Replica) -> Result<(HostKey, String), String> {
    loop {
        match replica.reader().ssh_host_key().await {
            Ok(Some(pem)) => {
                return boxd_dataplane::ssh::parse_host_key(&pem).map_err(|e| e.to_string());
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let pem = boxd_dataplane::ssh::generate_host_key();
        replica
            .write(Command::SetSshHostKey { private_key: pem })
            .await
            .map_err(|e| format!("cannot store the SSH host key: {e}"))?;
    }
}

/// Starts the SSH shards; returns the server and the host key's fingerprint.
pub async fn start(
    cfg: &Config,
    listeners: Listeners,
    replica: &Arc<Replica>,
    https_port: Option<u16>,
) -> Result<(SshServer, String), NodeError> {
    let (key, fp) = host_key(replica)
        .await
        .map_err(|e| NodeError::Failed(format!("SSH host key: {e}")))?;
    let secret = replica
        .reader()
        .cluster_secret()
        .await
        .map_err(|e| NodeError::Failed(format!("reading the cluster secret: {e}")))?
        .ok_or_else(|| NodeError::Failed("the cluster has no secret yet".into()))?;
    let agent_key = boxd_dataplane::ssh::relay::agent_key(&secret);
    let backend = Arc::new(ReplicaBackend::new(Arc::clone(replica)));
    let server = SshServer::start(
        listeners,
        ssh_config(cfg, https_port),
        key,
        agent_key,
        Arc::clone(replica.view()),
        backend,
    )
    .map_err(|e| NodeError::Failed(format!("cannot start SSH: {e}")))?;
    Ok((server, fp))
}
