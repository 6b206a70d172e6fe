//! Wiring the SSH front door into a node: the operations it fronts (on this node's replica),
//! the host key kept in the replica, and the shard configuration.

use std::sync::Arc;
use std::time::Duration;

use boxd_controlplane::Replica;
use boxd_controlplane::command::Command;
use boxd_dataplane::ssh::{HostKey, Listeners, SshConfig, SshServer};
use boxd_operations::{Operations, Settings};

use crate::backend::ReplicaBackend;
use crate::config::Config;
use crate::error::NodeError;
use crate::host::shard_cpus;

/// `[ssh]` as the shards take it: `cpus` resolved.
pub fn ssh_config(cfg: &Config) -> SshConfig {
    SshConfig {
        cpus: shard_cpus(&cfg.ssh.cpus),
        ..cfg.ssh.clone()
    }
}

/// What the operations print (the ports users reach) and how long they wait, from `[ssh]`.
pub fn operations_settings(cfg: &Config, https_port: Option<u16>) -> Settings {
    Settings {
        ssh_port: cfg.ssh.listen.port(),
        https_port,
        ready_timeout: Duration::from_secs(cfg.ssh.ready_timeout_secs),
        sign_in: cfg.identity.enabled().then(|| cfg.identity.name()),
        liveness: cfg.node.liveness(),
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

/// The operations on this node's replica, as the front ends and the admin socket serve them.
/// `https_port` is the port HTTPS listens on, when this node serves it (for the links printed).
pub fn operations(
    cfg: &Config,
    replica: &Arc<Replica>,
    https_port: Option<u16>,
) -> Arc<Operations> {
    let backend = Arc::new(ReplicaBackend::new(Arc::clone(replica)));
    Arc::new(Operations::new(
        backend,
        Arc::clone(replica.view()),
        operations_settings(cfg, https_port),
    ))
}

/// The cluster's agent key (derived from the cluster secret): what the relay and the API's
/// `Exec` authenticate to guest agents with.
pub async fn agent_key(replica: &Replica) -> Result<HostKey, NodeError> {
    let secret = replica
        .reader()
        .cluster_secret()
        .await
        .map_err(|e| NodeError::Failed(format!("reading the cluster secret: {e}")))?
        .ok_or_else(|| NodeError::Failed("the cluster has no secret yet".into()))?;
    Ok(boxd_dataplane::ssh::relay::agent_key(&secret))
}

/// Starts the SSH shards; returns the server and the host key's fingerprint.
pub async fn start(
    cfg: &Config,
    listeners: Listeners,
    replica: &Arc<Replica>,
    ops: Arc<Operations>,
) -> Result<(SshServer, String), NodeError> {
    let (key, fp) = host_key(replica)
        .await
        .map_err(|e| NodeError::Failed(format!("SSH host key: {e}")))?;
    let agent_key = agent_key(replica).await?;
    let server = SshServer::start(listeners, ssh_config(cfg), key, agent_key, ops)
        .map_err(|e| NodeError::Failed(format!("cannot start SSH: {e}")))?;
    Ok((server, fp))
}
