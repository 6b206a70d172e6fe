//! A node's replica: the Raft instance, its SQLite stores, the published View and the write
//! path. Writes go to the leader (forwarded over the internal gRPC service when this node is not
//! the leader); reads are local.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};

use crate::command::{ApplyError, Batch, Command, Outcome};
use crate::config::RaftConfig;
use crate::model::{Millis, NodeId};
use crate::raft::Raft;
use crate::raft::log_store::{LogDbError, LogStore};
use crate::raft::network::Network;
use crate::raft::state_machine::{SmError, SmStats, StateMachine};
use crate::rpc::{BadAddress, Peers, WriteReply, pb};
use crate::store::StateReader;
use crate::view::ViewHandle;

/// Source of wall-clock time for proposals (injected so tests can control it).
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> Millis;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// What a replica needs to start.
pub struct ReplicaConfig {
    /// Directory holding `raft-log.db`, `state.db` and `snapshots/`.
    pub data_dir: PathBuf,
    /// This node's Raft id.
    pub node_id: NodeId,
    /// Address other members reach this node on.
    pub advertise: String,
    /// Key for internal RPCs.
    pub peer_key: String,
    /// Timing and log retention (`[raft]`).
    pub raft: RaftConfig,
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The Raft log could not be opened.
    #[error(transparent)]
    Log(#[from] LogDbError),
    /// The state database could not be opened.
    #[error(transparent)]
    State(#[from] SmError),
    /// A read-only connection could not be opened.
    #[error("state database: {0}")]
    Reader(#[from] rusqlite::Error),
    /// Raft rejected its configuration.
    #[error("raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    /// Raft failed to start.
    #[error("raft failed to start: {0}")]
    Raft(String),
    /// The peer key is unusable.
    #[error(transparent)]
    Peers(#[from] BadAddress),
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The log refused the command; state is unchanged.
    #[error(transparent)]
    Rejected(#[from] ApplyError),
    /// No leader could take the write in time.
    #[error(
        "no leader took the write within {0:?} ({1}): the cluster may have lost its majority; check `boxd admin status` on the control nodes"
    )]
    Unavailable(Duration, String),
    /// Raft stopped on this node.
    #[error("raft has stopped on this node: {0}")]
    Fatal(String),
    /// The leader applied the write, but this node's replica did not catch up in time.
    #[error(
        "the write was made (log index {index}), but this node's replica has applied only up to {applied}: it is falling behind the leader; retry the read in a moment and check `boxd admin status` on this node"
    )]
    Behind {
        /// The write's log index.
        index: u64,
        /// This replica's last applied index.
        applied: u64,
    },
}

/// A node's replica of the cluster state.
pub struct Replica {
    id: NodeId,
    advertise: String,
    raft: Raft,
    view: Arc<ViewHandle>,
    reader: StateReader,
    peers: Peers,
    committed: Arc<AtomicU64>,
    sm_stats: Arc<SmStats>,
    clock: Arc<dyn Clock>,
    write_timeout: Duration,
    election_max: Duration,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    commit_latency: Histogram,
}

/// A command waiting for the proposer, with where its answer goes.
type Proposal = (Command, tokio::sync::oneshot::Sender<WriteReply>);

/// How many log entries openraft purges at once: 256, or less when a snapshot interval leaves
/// fewer to purge. openraft purges only once a whole batch can go, so a batch larger than
/// `snapshot_every - logs_kept` would leave the log unpurged until a later snapshot.
fn purge_batch(snapshot_every: u64, logs_kept: u64) -> u64 {
    (snapshot_every.saturating_sub(logs_kept) / 2).clamp(1, 256)
}

/// Most commands in one log entry.
const MAX_BATCH: usize = 1024;
/// Log entries proposed and not yet applied at once (openraft pipelines them). Three, not two,
/// since the View and the apply got cheaper: on three nodes a third entry is appended while
/// the others are replicated and rides with the next AppendEntries (controlplane/DESIGN.md).
const IN_FLIGHT: usize = 3;

/// What `boxd admin status` reports about the replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// This node.
    pub node_id: NodeId,
    /// leader, follower, candidate or learner.
    pub state: String,
    /// Current leader.
    pub leader: Option<NodeId>,
    /// Its address.
    pub leader_addr: Option<String>,
    /// Raft term.
    pub term: u64,
    /// Last log index on this node.
    pub last_log_index: u64,
    /// Commit index this node knows.
    pub commit_index: u64,
    /// Applied index of the local state machine.
    pub applied_index: u64,
    /// `commit_index - applied_index`.
    pub replica_lag: u64,
    /// Log index of the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Last purged log index.
    pub purged_index: Option<u64>,
    /// Snapshots built here.
    pub snapshots_built: u64,
    /// Snapshots received and installed here.
    pub snapshots_installed: u64,
    /// Voting members.
    pub voters: Vec<NodeId>,
    /// Non-voting members.
    pub learners: Vec<NodeId>,
}

impl Replica {
    /// Opens the stores under `cfg.data_dir` and starts Raft (not yet initialised or joined).
    pub async fn open(cfg: ReplicaConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>, OpenError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(SmError::Io)?;
        let view = ViewHandle::new();
        let sm = StateMachine::open(&cfg.data_dir, Arc::clone(&view))?;
        let reader = sm.reader();
        let sm_stats = sm.stats();
        let log = LogStore::open(&cfg.data_dir.join("raft-log.db"))?;
        let committed = log.committed_index();
        let peers = Peers::new(&cfg.peer_key)?;
        let t = &cfg.raft;
        let config = openraft::Config {
            cluster_name: "boxd".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_min_ms,
            election_timeout_max: t.election_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_every),
            max_in_snapshot_log_to_keep: t.logs_kept,
            purge_batch_size: purge_batch(t.snapshot_every, t.logs_kept),
            max_payload_entries: 1024,
            ..Default::default()
        }
        .validate()?;
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(config),
            Network::new(peers.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| OpenError::Raft(e.to_string()))?;
        let (proposals, queue) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
        // 0.5 ms to 8 s.
        let commit_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        tokio::spawn(propose(
            raft.clone(),
            cfg.node_id,
            queue,
            Duration::from_millis(3 * t.election_max_ms),
            commit_latency.clone(),
        ));
        Ok(Arc::new(Self {
            id: cfg.node_id,
            advertise: cfg.advertise,
            raft,
            view,
            reader,
            peers,
            committed,
            sm_stats,
            clock,
            write_timeout: Duration::from_millis(t.write_timeout_ms),
            election_max: Duration::from_millis(t.election_max_ms),
            proposals,
            commit_latency,
        }))
    }

    /// Seconds from proposing a batch to its commit and apply, on this node while leader.
    pub fn commit_latency(&self) -> &Histogram {
        &self.commit_latency
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address other members use for this node.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The published View.
    pub fn view(&self) -> &Arc<ViewHandle> {
        &self.view
    }

    /// Local read-only queries.
    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// Clients to other members.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Current time from the injected clock.
    pub fn now(&self) -> Millis {
        self.clock.now_millis()
    }

    /// Makes this node the single voter of a new cluster. Harmless on a node that is already
    /// initialised (openraft answers `NotAllowed`, which is success here).
    pub async fn bootstrap(&self) -> Result<(), WriteError> {
        let members = [(
            self.id,
            BasicNode {
                addr: self.advertise.clone(),
            },
        )]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(WriteError::Fatal(e.to_string())),
        }
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// The current leader's id and address, if known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        leader_of(&self.raft)
    }

    /// Appends `cmd` to the log through the leader and returns the log's answer.
    ///
    /// Transport failures and leader changes are retried until the write timeout. A retried
    /// create is recognised by its id, so it cannot create twice.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, WriteError> {
        let start = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let cause = match self.write_here(cmd.clone()).await {
                // Applied here: this replica has it (the leader applies before it answers).
                WriteReply::Applied { response, .. } => return Ok(response?),
                WriteReply::Failed { reason } => return Err(WriteError::Fatal(reason)),
                WriteReply::NotLeader { leader: None } => "no leader elected".to_owned(),
                WriteReply::NotLeader {
                    leader: Some((id, addr)),
                } => match self.forward(&addr, &cmd).await {
                    Ok(WriteReply::Applied { response, index }) => {
                        // Read-your-writes: whoever asked here reads this replica next.
                        self.wait_applied(index, start).await?;
                        return Ok(response?);
                    }
                    Ok(WriteReply::Failed { reason }) => format!("leader {id} failed: {reason}"),
                    Ok(WriteReply::NotLeader { .. }) => format!("node {id} is no longer leader"),
                    Err(e) => format!("leader {id} at {addr}: {e}"),
                },
            };
            if start.elapsed() >= self.write_timeout {
                return Err(WriteError::Unavailable(self.write_timeout, cause));
            }
            tracing::debug!(%cause, "write retry");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Waits until this replica has applied log index `index` (a write the leader applied
    /// there), within what is left of the write timeout counted from `start`.
    async fn wait_applied(
        &self,
        index: u64,
        start: tokio::time::Instant,
    ) -> Result<(), WriteError> {
        let mut rx = self.raft.metrics();
        let wait = async {
            loop {
                if rx.borrow_and_update().last_applied.map_or(0, |l| l.index) >= index {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        let left = self.write_timeout.saturating_sub(start.elapsed());
        match tokio::time::timeout(left.max(Duration::from_secs(1)), wait).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(WriteError::Fatal("raft stopped".into())),
            Err(_) => Err(WriteError::Behind {
                index,
                applied: self
                    .raft
                    .metrics()
                    .borrow()
                    .last_applied
                    .map_or(0, |l| l.index),
            }),
        }
    }

    /// Appends `cmd` if this node is the leader; never forwards (the receiving end of a
    /// forwarded write). Commands from all callers are batched into log entries by the
    /// proposer task.
    pub async fn write_here(&self, cmd: Command) -> WriteReply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.proposals.send((cmd, tx)).await.is_err() {
            return WriteReply::Failed {
                reason: "the proposer has stopped".into(),
            };
        }
        rx.await.unwrap_or_else(|_| WriteReply::Failed {
            reason: "the proposer dropped the write".into(),
        })
    }

    async fn forward(&self, addr: &str, cmd: &Command) -> Result<WriteReply, String> {
        let json = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(pb::Json { json });
        req.set_timeout(self.write_timeout);
        let reply = self
            .peers
            .cluster(addr)
            .map_err(|e| e.to_string())?
            .write(req)
            .await
            .map_err(|s| s.message().to_owned())?;
        serde_json::from_slice(&reply.into_inner().json).map_err(|e| e.to_string())
    }

    /// Waits until some node is leader and this replica has applied at least up to the commit
    /// index it knew when called; returns the leader.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<NodeId, WriteError> {
        let mut rx = self.raft.metrics();
        let wait = async {
            loop {
                {
                    let m = rx.borrow_and_update();
                    let applied = m.last_applied.map_or(0, |l| l.index);
                    // A leader restored from its own persisted vote is not trusted until a
                    // quorum has acknowledged it in this run.
                    let confirmed = match m.state {
                        ServerState::Leader => m
                            .millis_since_quorum_ack
                            .is_some_and(|ms| u128::from(ms) < self.election_max.as_millis()),
                        _ => m.current_leader.is_some_and(|l| l != self.id),
                    };
                    if let Some(leader) = m.current_leader
                        && confirmed
                        && applied >= self.committed.load(Ordering::Relaxed)
                    {
                        return Ok(leader);
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(WriteError::Fatal("raft stopped".into()));
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| WriteError::Unavailable(timeout, "no leader elected".into()))?
    }

    /// Raft and replication state for operators.
    pub fn status(&self) -> ReplicaStatus {
        let m = self.raft.metrics().borrow().clone();
        let applied = m.last_applied.map_or(0, |l| l.index);
        let commit = self.committed.load(Ordering::Relaxed).max(applied);
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        ReplicaStatus {
            node_id: self.id,
            state: state.into(),
            leader: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| membership.get_node(&l))
                .map(|n| n.addr.clone()),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: commit,
            applied_index: applied,
            replica_lag: commit.saturating_sub(applied),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            snapshots_built: self.sm_stats.snapshots_built.load(Ordering::Relaxed),
            snapshots_installed: self.sm_stats.snapshots_installed.load(Ordering::Relaxed),
            voters: voters.into_iter().collect(),
            learners,
        }
    }

    /// Resolves with the reason if Raft stops on a fatal error (storage failure, panic). The
    /// node cannot continue then; its process should exit so a supervisor restarts it.
    pub async fn fatal(&self) -> String {
        let mut rx = self.raft.metrics();
        loop {
            if let Err(e) = &rx.borrow_and_update().running_state {
                return e.to_string();
            }
            if rx.changed().await.is_err() {
                return "raft stopped".into();
            }
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

fn leader_of(raft: &Raft) -> Option<(NodeId, String)> {
    let m = raft.metrics();
    let m = m.borrow();
    let id = m.current_leader?;
    let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
    Some((id, addr))
}

/// The proposer: takes every command queued since the last proposal into one log entry, with up
/// to `IN_FLIGHT` entries outstanding. A follower's openraft core waits for each entry's fsync
/// before it takes the next one (the leader's no longer does: `vendor/README.md`), so this is
/// what turns concurrent writers into group commits.
///
/// An attempt is bounded by `attempt_timeout`: openraft 0.9 restarts a former leader as leader
/// at once, and an entry it accepts before learning of the newer term never completes. The
/// callers then retry elsewhere, which is safe because creates are idempotent by id.
async fn propose(
    raft: Raft,
    me: NodeId,
    mut queue: tokio::sync::mpsc::Receiver<Proposal>,
    attempt_timeout: Duration,
    latency: Histogram,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (commands, waiters): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        let raft = raft.clone();
        let latency = latency.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let attempt = tokio::time::timeout(attempt_timeout, raft.client_write(Batch(commands)));
            let replies: Vec<WriteReply> = match attempt.await {
                Ok(Ok(r)) => {
                    latency.observe(started.elapsed().as_secs_f64());
                    r.data
                        .into_iter()
                        .map(|response| WriteReply::Applied {
                            response,
                            index: r.log_id.index,
                        })
                        .collect()
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    let leader = f.leader_id.zip(f.leader_node.map(|n| n.addr));
                    vec![WriteReply::NotLeader { leader }; waiters.len()]
                }
                Ok(Err(e)) => vec![
                    WriteReply::Failed {
                        reason: e.to_string()
                    };
                    waiters.len()
                ],
                Err(_) => {
                    let leader = leader_of(&raft).filter(|(id, _)| *id != me);
                    vec![WriteReply::NotLeader { leader }; waiters.len()]
                }
            };
            let mut replies = replies.into_iter();
            for w in waiters {
                let reply = replies.next().unwrap_or_else(|| WriteReply::Failed {
                    reason: "the log returned fewer answers than commands".into(),
                });
                let _ = w.send(reply);
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::purge_batch;

    #[test]
    fn a_purge_batch_fits_in_one_snapshot_interval() {
        assert_eq!(purge_batch(10_000, 1_000), 256, "the defaults");
        // Snapshot at 199 keeping 20: 180 entries can go, so a batch must be at most that.
        assert_eq!(purge_batch(200, 20), 90);
        assert_eq!(purge_batch(1, 1_000), 1, "never zero");
    }
}
