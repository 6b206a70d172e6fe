//! Wiring the HTTPS front door into a node: listeners, shard configuration, and the
//! certificate — the operator's PEM files (watched and reloaded when they change), or the
//! cluster's local CA kept in the replica (the first proxy to start makes it; every proxy
//! serves the same one and writes it to `<data-dir>/tls/` for `curl --cacert`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boxd_controlplane::Replica;
use boxd_controlplane::command::Command;
use boxd_dataplane::https::tls::{self, CertFiles, ZoneCert};
use boxd_dataplane::https::{HttpsConfig, HttpsServer, Listeners, Services};
use tokio::sync::watch;

use crate::config::Config;
use crate::error::NodeError;
use crate::host::shard_cpus;

/// What the ready line says about HTTPS.
pub struct HttpsReady {
    /// TLS address.
    pub addr: std::net::SocketAddr,
    /// The local CA's certificate, when boxd made the certificate.
    pub ca: Option<PathBuf>,
}

/// `[https]` as the shards take it: `cpus` resolved, the lobby's SSH port for the zone page.
pub fn https_config(cfg: &Config) -> HttpsConfig {
    HttpsConfig {
        cpus: shard_cpus(&cfg.https.cpus),
        ssh_port: cfg.ssh.listen.port(),
        ..cfg.https.clone()
    }
}

/// Binds the shard listeners, and checks the operator's certificate files if there are any
/// (before the replica opens, so a taken port or a bad file fails fast with exit code 2).
pub fn bind(cfg: &Config) -> Result<Listeners, NodeError> {
    if let Some(files) = operator_files(cfg) {
        tls::load(&files).map_err(|e| NodeError::Usage(format!("https certificate: {e}")))?;
    }
    Listeners::bind(&https_config(cfg), shard_cpus(&cfg.https.cpus).len()).map_err(|e| {
        NodeError::Usage(format!(
            "cannot listen on https.listen {} / https.redirect_listen {}: {e} (set them in the config)",
            cfg.https.listen, cfg.https.redirect_listen
        ))
    })
}

fn operator_files(cfg: &Config) -> Option<CertFiles> {
    (!cfg.https.cert.as_os_str().is_empty()).then(|| CertFiles {
        cert: cfg.https.cert.clone(),
        key: cfg.https.key.clone(),
        ca: None,
    })
}

/// The cluster's local CA: the one in the replica, or a new one stored there first (the log
/// keeps the first written, so proxies that race agree).
async fn local_ca(replica: &Replica, zone: &str) -> Result<tls::LocalCa, String> {
    loop {
        if let Some(m) = replica
            .reader()
            .tls_local_ca()
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(m);
        }
        let material = tls::generate_local_ca(zone).map_err(|e| e.to_string())?;
        replica
            .write(Command::SetTlsLocalCa { material })
            .await
            .map_err(|e| format!("cannot store the local CA: {e}"))?;
    }
}

/// Starts the HTTPS shards once the replica is settled.
pub async fn start(
    cfg: &Config,
    data_dir: &Path,
    listeners: Listeners,
    replica: &Arc<Replica>,
    ops: Arc<boxd_operations::Operations>,
    stop: watch::Receiver<bool>,
) -> Result<(HttpsServer, HttpsReady), NodeError> {
    let view = Arc::clone(replica.view());
    let files = match operator_files(cfg) {
        Some(f) => f,
        None => {
            let zone = view
                .current()
                .zone()
                .map_or_else(|| cfg.cluster.zone.clone(), str::to_owned);
            let ca = local_ca(replica, &zone)
                .await
                .map_err(|e| NodeError::Failed(format!("local CA: {e}")))?;
            tls::write_local_ca(&ca, &data_dir.join("tls"))
                .map_err(|e| NodeError::Failed(format!("writing the local CA: {e}")))?
        }
    };
    let key = tls::load(&files).map_err(|e| NodeError::Usage(format!("https certificate: {e}")))?;
    let certs = ZoneCert::new(key);
    if files.ca.is_none() {
        tokio::spawn(watch_files(
            files.clone(),
            Arc::clone(&certs),
            Duration::from_secs(cfg.https.reload_secs),
            stop,
        ));
    }
    let tls_cfg =
        tls::server_config(certs).map_err(|e| NodeError::Failed(format!("TLS setup: {e}")))?;
    let addr = listeners.local_addr();
    let agent_key = crate::ssh::agent_key(replica).await?;
    let api = boxd_api::Api::new(
        Arc::clone(&ops),
        tokio::runtime::Handle::current(),
        agent_key,
    )
    .map_err(NodeError::Failed)?;
    let api: Arc<dyn boxd_dataplane::https::ApiServer> = api;
    let sign_in = sign_in(cfg, &ops)?;
    let services = Services {
        ops,
        api: Some(api),
        sign_in,
    };
    let server = HttpsServer::start(listeners, https_config(cfg), tls_cfg, services)
        .map_err(|e| NodeError::Failed(format!("cannot start HTTPS: {e}")))?;
    Ok((server, HttpsReady { addr, ca: files.ca }))
}

/// The OpenID relying party, when `[identity]` names an issuer. Its discovery runs in the
/// background: a provider that is down at start is retried at the first sign-in.
fn sign_in(
    cfg: &Config,
    ops: &Arc<boxd_operations::Operations>,
) -> Result<Option<Arc<boxd_oidc::SignIn>>, NodeError> {
    if !cfg.identity.enabled() {
        return Ok(None);
    }
    let redirect = ops.apex_url("register/callback");
    let s = boxd_oidc::SignIn::new(
        &cfg.identity,
        &redirect,
        Arc::clone(ops),
        tokio::runtime::Handle::current(),
    )
    .map_err(NodeError::Usage)?;
    let probe = Arc::clone(&s);
    let issuer = cfg.identity.issuer.clone();
    tokio::spawn(async move {
        match probe.discover().await {
            Ok(()) => tracing::info!(%issuer, %redirect, "signing in with OpenID Connect"),
            Err(e) => tracing::warn!(%issuer, "the OpenID provider cannot be read yet: {e}"),
        }
    });
    Ok(Some(s))
}

/// Modification time and length of both files: a change in either means a reload.
fn stamp(files: &CertFiles) -> Option<[(SystemTime, u64); 2]> {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(&files.cert)?, one(&files.key)?])
}

/// Reloads the operator's certificate when its files change. Files that do not load together
/// (say, the key was replaced before the certificate) keep the old certificate in service and
/// are tried again every tick until they do.
async fn watch_files(
    files: CertFiles,
    certs: Arc<ZoneCert>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = stamp(&files);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let now = stamp(&files);
        if now == last || now.is_none() {
            continue;
        }
        match tls::load(&files) {
            Ok(key) => {
                certs.replace(key);
                last = now;
                tracing::info!(cert = %files.cert.display(), "reloaded the HTTPS certificate");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the changed HTTPS certificate does not load; still serving the previous one");
            }
        }
    }
}
