//! Running a node: composes the roles this build has into one process, around the replica.
//!
//! Start-up order: lock the data directory, bind the Raft/gRPC port (fail early and clearly),
//! settle the node's identity (found, join or resume), open the replica and serve the internal
//! gRPC services, open the admin socket, then start the role loops. "ready" is printed once the
//! node has a leader and has applied what it knew to be committed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use boxd_controlplane::membership::{self, Founding, SelfInfo};
use boxd_controlplane::model::{Role, Roles, roles_to_string};
use boxd_controlplane::rpc::{pb, server, stream as rpc_stream};
use boxd_controlplane::{Replica, ReplicaConfig, SystemClock, controller, token};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::watch;
use uuid::Uuid;

use crate::admin;
use crate::config::{BUILT_ROLES, Config};
pub use crate::error::NodeError;
use crate::host::shard_cpus;
use crate::identity::Identity;
use crate::status::AdminContext;

/// How the node starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// Single node, every role: found a cluster on first start, resume afterwards.
    Up,
    /// Found a cluster (resume if this data directory already holds one).
    Init,
    /// Join the cluster that `seed` belongs to (resume if already joined).
    Join {
        /// Any member's Raft/gRPC address.
        seed: String,
        /// Join token.
        token: String,
    },
    /// Resume a node whose data directory is initialised.
    Run,
}

fn failed(context: &str) -> impl FnOnce(String) -> NodeError + '_ {
    move |e| NodeError::Failed(format!("{context}: {e}"))
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    start: Start,
    cfg: Config,
    data_dir: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let tightened = crate::datadir::make_private(&data_dir).map_err(|e| {
        NodeError::Usage(format!(
            "cannot create data directory {}: {e} (choose another with --data-dir)",
            data_dir.display()
        ))
    })?;
    for change in tightened {
        tracing::warn!(%change, "others could read this state or key file; made it private");
    }
    let data_dir = data_dir
        .canonicalize()
        .map_err(|e| NodeError::Usage(format!("data directory {}: {e}", data_dir.display())))?;
    let _lock = lock(&data_dir)?;
    let existing = Identity::load(&data_dir).map_err(NodeError::Usage)?;
    if matches!(start, Start::Run) && existing.is_none() {
        return Err(NodeError::Usage(format!(
            "{} holds no node yet: run `boxd init`, `boxd join` or `boxd up` first",
            data_dir.display()
        )));
    }
    let listener = TcpListener::bind(cfg.raft.listen).await.map_err(|e| {
        NodeError::Usage(format!(
            "cannot listen on raft.listen {}: {e} (is another boxd running? set raft.listen in the config)",
            cfg.raft.listen
        ))
    })?;
    let roles: Roles = cfg.node.roles.iter().copied().collect();
    let worker = if roles.contains(&Role::Worker) {
        Some(crate::worker::preflight(&cfg).map_err(NodeError::Usage)?)
    } else {
        None
    };
    let dns_sockets = if roles.contains(&Role::Dns) {
        Some(bind_dns(&cfg)?)
    } else {
        None
    };
    let https_listeners = if roles.contains(&Role::Proxy) {
        Some(crate::https::bind(&cfg)?)
    } else {
        None
    };
    let ssh_listeners = if roles.contains(&Role::Proxy) {
        Some(crate::ssh::bind(&cfg)?)
    } else {
        None
    };
    let metrics_listener = crate::metrics::bind(&cfg.metrics.listen).map_err(NodeError::Usage)?;
    let me = SelfInfo {
        uuid: existing.as_ref().map_or_else(Uuid::new_v4, |i| i.uuid),
        name: if cfg.node.name.is_empty() {
            crate::host::hostname()
        } else {
            cfg.node.name.clone()
        },
        roles: roles.clone(),
        capacity: crate::host::capacity(&cfg.worker, &data_dir),
    };
    let advertise = cfg.raft.advertise_addr();
    let identity = match existing {
        Some(id) => {
            if let Start::Join { .. } = start {
                tracing::info!("already a member of cluster {}; resuming", id.cluster_id);
            }
            id
        }
        None => {
            let id = match &start {
                Start::Up | Start::Init => founder_identity(me.uuid),
                Start::Join { seed, token } => join(seed, token, &me, &advertise).await?,
                Start::Run => unreachable!("checked above"),
            };
            id.store(&data_dir)
                .map_err(|e| NodeError::Failed(format!("cannot write node identity: {e}")))?;
            id
        }
    };

    let replica = Replica::open(
        ReplicaConfig {
            data_dir: data_dir.clone(),
            node_id: identity.node_id,
            advertise: advertise.clone(),
            peer_key: identity.peer_key.clone(),
            raft: cfg.raft.clone(),
        },
        Arc::new(SystemClock),
    )
    .await
    .map_err(|e| NodeError::Failed(format!("cannot open the replica: {e}")))?;

    let dns = match dns_sockets {
        Some(sockets) => Some(start_dns(&cfg, sockets, Arc::clone(replica.view()))?),
        None => None,
    };
    let dns_addr = dns.as_ref().map(boxd_dns::server::DnsServer::local_addr);

    let (stop_tx, stop_rx) = watch::channel(false);
    let images = tonic::service::interceptor::InterceptedService::new(
        boxd_controlplane::rpc::pb::images_server::ImagesServer::new(
            crate::images::ImagesService::new(data_dir.clone()),
        ),
        boxd_controlplane::rpc::CheckPeer::new(&identity.peer_key),
    );
    let grpc = tokio::spawn(serve_grpc(
        listener,
        server::services(&replica, &identity.peer_key),
        images,
        stop_rx.clone(),
    ));

    // One operations layer per process, for every front end and the admin socket (it keeps
    // the per-address registration-link limits).
    let ops = crate::ssh::operations(
        &cfg,
        &replica,
        https_listeners.as_ref().map(|l| l.local_addr().port()),
    );
    let socket_path = cfg.admin_socket(&data_dir);
    let admin_listener = bind_admin(&socket_path)?;
    let worker_status = crate::worker::StatusCell::default();
    let ctx = Arc::new(AdminContext {
        ops: Arc::clone(&ops),
        worker: Arc::clone(&worker_status),
        replica: Arc::clone(&replica),
        identity: identity.clone(),
        name: me.name.clone(),
        roles: roles.clone(),
        data_dir: data_dir.clone(),
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, ctx, stop_rx.clone()));
    if let Some(l) = metrics_listener {
        let sources = Arc::new(crate::metrics::Sources {
            replica: Arc::clone(&replica),
            ops: Arc::clone(&ops),
        });
        tokio::spawn(crate::metrics::serve(l, sources, stop_rx.clone()));
    }

    let not_built: Vec<&str> = roles
        .iter()
        .filter(|r| !BUILT_ROLES.contains(r))
        .map(|r| r.as_str())
        .collect();
    if !not_built.is_empty() {
        tracing::warn!(
            roles = %not_built.join(","),
            "these roles are not built into this boxd yet: the node replicates state for them but serves nothing"
        );
    }

    let front = Arc::new(std::sync::Mutex::new(FrontDoor::default()));
    let settle = settle(
        Arc::clone(&replica),
        start.clone(),
        identity.clone(),
        me.clone(),
        cfg.clone(),
        stop_rx.clone(),
        Ready {
            socket: socket_path.clone(),
            data_dir: data_dir.clone(),
            advertise,
            dns: dns_addr,
            https: https_listeners,
            ssh: ssh_listeners,
            ops,
            front: Arc::clone(&front),
            worker: worker_status,
            runtime: worker,
        },
    );
    let settle = tokio::spawn(settle);

    let result = tokio::select! {
        () = shutdown => Ok(()),
        reason = replica.fatal() => {
            tracing::error!(%reason, "raft stopped on a fatal error; exiting");
            Err(NodeError::Failed(format!("raft stopped: {reason}")))
        }
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    settle.abort();
    let _ = admin_task.await;
    if let Some(dns) = dns {
        let _ = tokio::task::spawn_blocking(move || dns.stop()).await;
    }
    let servers = front.lock().map(|mut f| std::mem::take(&mut *f));
    if let Ok(f) = servers {
        let _ = tokio::task::spawn_blocking(move || f.stop()).await;
    }
    replica.shutdown().await;
    let _ = grpc.await;
    let _ = std::fs::remove_file(&socket_path);
    result
}

struct Ready {
    socket: PathBuf,
    data_dir: PathBuf,
    advertise: String,
    dns: Option<std::net::SocketAddr>,
    /// HTTPS and SSH listeners, started once the cluster is settled (the local CA and the SSH
    /// host key live in the replica).
    https: Option<boxd_dataplane::https::Listeners>,
    /// See `https`.
    ssh: Option<boxd_dataplane::ssh::Listeners>,
    /// The operations both front ends serve.
    ops: Arc<boxd_operations::Operations>,
    /// Where the started servers are kept for shutdown.
    front: Arc<std::sync::Mutex<FrontDoor>>,
    /// What the worker reports to `boxd admin status`.
    worker: crate::worker::StatusCell,
    /// The worker's runtime and why, when this node is a worker (checked before start).
    runtime: Option<(Arc<dyn boxd_worker::Runtime>, String)>,
}

/// The front-door servers a node runs.
#[derive(Default)]
struct FrontDoor {
    https: Option<boxd_dataplane::https::HttpsServer>,
    ssh: Option<boxd_dataplane::ssh::SshServer>,
}

impl FrontDoor {
    /// Stops both (blocking: joins their threads).
    fn stop(self) {
        if let Some(h) = self.https {
            h.stop();
        }
        if let Some(s) = self.ssh {
            s.stop();
        }
    }
}

/// Brings the node into the cluster (found / catch up / register), prints "ready" and starts
/// the role loops.
async fn settle(
    replica: Arc<Replica>,
    start: Start,
    identity: Identity,
    me: SelfInfo,
    cfg: Config,
    stop: watch::Receiver<bool>,
    ready: Ready,
) {
    // A founder that crashed before its settings were committed founds again (idempotent);
    // every other start waits for the cluster and (re-)registers this node.
    let settled = replica.reader().settings().await.ok().flatten().is_some();
    match &identity.secret {
        Some(secret) if !settled => {
            let founding = Founding {
                zone: cfg.cluster.zone.clone(),
                lobby: cfg.cluster.lobby,
                public_pool: cfg.cluster.public_pool,
                max_vms_per_account: cfg.cluster.max_vms_per_account,
            };
            let mut delay = Duration::from_millis(200);
            loop {
                tracing::info!("founding the cluster");
                match membership::found(&replica, identity.cluster_id, secret, &founding, &me).await
                {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "founding the cluster: retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        _ => {
            loop {
                tracing::info!("waiting for a leader and catching up");
                match replica.wait_ready(Duration::from_secs(30)).await {
                    Ok(leader) => {
                        tracing::info!(leader, "caught up");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "waiting for the cluster"),
                }
            }
            let id = identity.secret.as_ref().map(|_| replica.id());
            loop {
                match membership::register(&replica, id, &me).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "registering this node: retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    if ready.https.is_some() || ready.ssh.is_some() {
        // Both front ends mint API tokens (the lobby) or check them (the API).
        if let Err(e) = crate::api::add_token_key(&replica, true).await {
            tracing::error!(error = %e, "no token signing key: `token create` will fail");
        }
    }
    let mut https_ready = None;
    if let Some(listeners) = ready.https {
        match crate::https::start(
            &cfg,
            &ready.data_dir,
            listeners,
            &replica,
            Arc::clone(&ready.ops),
            stop.clone(),
        )
        .await
        {
            Ok((server, r)) => {
                https_ready = Some(r);
                if let Ok(mut f) = ready.front.lock() {
                    f.https = Some(server);
                }
            }
            Err(e) => tracing::error!(error = %e, "the HTTPS front door did not start"),
        }
    }
    let mut ssh_line = String::new();
    if let Some(listeners) = ready.ssh {
        let addr = listeners.local_addr();
        match crate::ssh::start(&cfg, listeners, &replica, Arc::clone(&ready.ops)).await {
            Ok((server, fp)) => {
                let lobby = replica
                    .view()
                    .current()
                    .lobby_addresses()
                    .next()
                    .map(|ip| format!(" lobby={ip}:{}", addr.port()))
                    .unwrap_or_default();
                ssh_line = format!(" ssh={addr}{lobby} ssh_host_key={fp}");
                if let Ok(mut f) = ready.front.lock() {
                    f.ssh = Some(server);
                }
            }
            Err(e) => tracing::error!(error = %e, "the SSH front door did not start"),
        }
    }
    let serving: Vec<&str> = me
        .roles
        .iter()
        .filter(|r| BUILT_ROLES.contains(r))
        .map(|r| r.as_str())
        .collect();
    let dns = ready.dns.map(|a| format!(" dns={a}")).unwrap_or_default();
    let https = https_ready
        .as_ref()
        .map(|h| {
            let ca =
                h.ca.as_ref()
                    .map(|c| format!(" ca={}", c.display()))
                    .unwrap_or_default();
            format!(" https={}{ca}", h.addr)
        })
        .unwrap_or_default();
    println!(
        "boxd ready: node={} roles={} serving={} cluster={} zone={} raft={}{dns}{https}{ssh_line} admin={} data={}",
        replica.id(),
        roles_to_string(&me.roles),
        serving.join(","),
        identity.cluster_id,
        replica
            .view()
            .current()
            .zone()
            .unwrap_or(cfg.cluster.zone.as_str()),
        ready.advertise,
        ready.socket.display(),
        ready.data_dir.display(),
    );
    if matches!(start, Start::Init) {
        let others: Roles = Role::ALL
            .into_iter()
            .filter(|r| *r != Role::Control)
            .collect();
        if let Ok(t) =
            membership::join_token(&replica, others.clone(), Duration::from_secs(24 * 3600)).await
        {
            println!(
                "join other nodes (token valid 24 h): boxd join {} --token {t} --role {}",
                ready.advertise,
                roles_to_string(&others)
            );
        }
    }

    let heartbeat = Duration::from_secs(cfg.node.heartbeat_secs);
    tokio::spawn(controller::heartbeat(
        Arc::clone(&replica),
        me.capacity,
        heartbeat,
        stop.clone(),
    ));
    tokio::spawn(crate::images::publish(
        Arc::clone(&replica),
        ready.data_dir.clone(),
        stop.clone(),
    ));
    if let Some(runtime) = ready.runtime {
        tokio::spawn(crate::worker::run(
            Arc::clone(&replica),
            cfg.clone(),
            ready.data_dir.clone(),
            ready.worker,
            runtime,
            stop.clone(),
        ));
    }
    if me.roles.contains(&Role::Control) {
        let liveness = u64::try_from(cfg.node.liveness().as_millis()).unwrap_or(u64::MAX);
        tokio::spawn(controller::leader_duties(replica, liveness, stop));
    }
}

/// Shards for the DNS role: one per configured CPU, or one per CPU of the host.
fn bind_dns(cfg: &Config) -> Result<boxd_dns::server::Sockets, NodeError> {
    boxd_dns::server::Sockets::bind(cfg.dns.listen, shard_cpus(&cfg.dns.cpus).len()).map_err(|e| {
        NodeError::Usage(format!(
            "cannot listen on dns.listen {}: {e} (is another DNS server running? set dns.listen in the config)",
            cfg.dns.listen
        ))
    })
}

fn start_dns(
    cfg: &Config,
    sockets: boxd_dns::server::Sockets,
    view: Arc<boxd_controlplane::ViewHandle>,
) -> Result<boxd_dns::server::DnsServer, NodeError> {
    let dns = boxd_dns::DnsConfig {
        cpus: shard_cpus(&cfg.dns.cpus),
        ..cfg.dns.clone()
    };
    let engine = boxd_dns::Engine::new(dns.clone());
    boxd_dns::server::DnsServer::start(sockets, dns, engine, view)
        .map_err(|e| NodeError::Failed(format!("cannot start DNS: {e}")))
}

fn founder_identity(uuid: Uuid) -> Identity {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    // The secret is freshly generated hex, so deriving the peer key cannot fail.
    let peer_key = token::peer_key(&secret).unwrap_or_default();
    Identity {
        uuid,
        node_id: 1,
        cluster_id: Uuid::new_v4(),
        peer_key,
        secret: Some(secret),
    }
}

async fn join(
    seed: &str,
    token: &str,
    me: &SelfInfo,
    advertise: &str,
) -> Result<Identity, NodeError> {
    let req = pb::JoinRequest {
        token: token.to_owned(),
        uuid: me.uuid.to_string(),
        name: me.name.clone(),
        roles: me.roles.iter().map(|r| r.as_str().to_owned()).collect(),
        raft_addr: advertise.to_owned(),
        vcpus: me.capacity.vcpus,
        memory_mib: me.capacity.memory_mib,
        disk_gib: me.capacity.disk_gib,
    };
    let reply = membership::request_join(seed, req, Duration::from_secs(60))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                NodeError::Usage(format!("join refused by {seed}: {}", s.message()))
            }
            _ => NodeError::Failed(format!("cannot join through {seed}: {}", s.message())),
        })?;
    let cluster_id = reply
        .cluster_id
        .parse()
        .map_err(|_| NodeError::Failed("the cluster sent a malformed cluster id".into()))?;
    tracing::info!(node = reply.node_id, %cluster_id, "joined");
    Ok(Identity {
        uuid: me.uuid,
        node_id: reply.node_id,
        cluster_id,
        peer_key: reply.peer_key,
        secret: None,
    })
}

async fn serve_grpc(
    listener: TcpListener,
    services: server::Services,
    images: tonic::service::interceptor::InterceptedService<
        boxd_controlplane::rpc::pb::images_server::ImagesServer<crate::images::ImagesService>,
        boxd_controlplane::rpc::CheckPeer,
    >,
    mut stop: watch::Receiver<bool>,
) {
    // Raft stream connections and gRPC share the port: each accepted connection is told apart
    // by its first bytes, off the accept loop. The builder's tcp_nodelay applies only to
    // listeners tonic binds itself; without it here Nagle and delayed ACKs add ~40 ms to
    // gRPC round trips.
    let (grpc_tx, grpc_rx) = tokio::sync::mpsc::channel::<std::io::Result<TcpStream>>(64);
    let raft_streams = services.stream.clone();
    let mut accept_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                () = controller::stopped(&mut accept_stop) => return,
            };
            let (conn, _) = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept on the Raft/gRPC port");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = conn.set_nodelay(true);
            let (grpc_tx, raft_streams) = (grpc_tx.clone(), raft_streams.clone());
            tokio::spawn(async move {
                if rpc_stream::is_raft_stream(&conn).await {
                    raft_streams.serve(conn).await;
                } else {
                    let _ = grpc_tx.send(Ok(conn)).await;
                }
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(grpc_rx);
    let result = tonic::transport::Server::builder()
        .add_service(services.raft)
        .add_service(services.cluster)
        .add_service(services.join)
        .add_service(images)
        .serve_with_incoming_shutdown(
            incoming,
            async move { controller::stopped(&mut stop).await },
        )
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server stopped");
    }
}

fn lock(dir: &Path) -> Result<std::fs::File, NodeError> {
    match crate::datadir::lock(dir) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(NodeError::Usage(format!(
            "{} is in use by another boxd process: stop it, or pass another --data-dir",
            dir.display()
        ))),
        Err(e) => Err(failed("locking the data directory")(e.to_string())),
    }
}

fn bind_admin(path: &Path) -> Result<UnixListener, NodeError> {
    use std::os::unix::fs::PermissionsExt as _;
    if path.exists() {
        // The data directory lock is ours, so a socket file left here is stale.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        NodeError::Usage(format!(
            "cannot create the admin socket {}: {e} (set admin.socket in the config)",
            path.display()
        ))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| failed("admin socket permissions")(e.to_string()))?;
    Ok(listener)
}
