//! The state machine: applies committed entries to `state.db` and publishes the View; builds and
//! installs snapshots with SQLite's online backup API.
//!
//! Durability comes from the Raft log, not from this file. Like etcd's backend, the state
//! machine keeps one SQLite transaction open across applies and commits it every
//! `COMMIT_EVERY` (or `COMMIT_COMMANDS` commands, or when its thread has been idle for
//! `COMMIT_IDLE`), so a burst of batches rewrites each index page once instead of once per
//! batch. A crash loses at most that uncommitted tail, and openraft re-applies it from the log
//! on restart. `state.db` runs with `synchronous=NORMAL` for the same reason. Small batches are
//! applied on the caller's thread when the state thread is free (`INLINE_COMMANDS`); commits,
//! checkpoints and large batches run on the state thread. Before a snapshot
//! lets openraft purge the log, the transaction is committed and a full WAL checkpoint makes the
//! file durable up to the snapshot point.
//!
//! Snapshots are self-contained SQLite files in `<data>/snapshots/`: `<id>.db` with
//! `<id>.meta.json` beside it and `current` naming the latest. A lagging node receives the file
//! and restores it over its live database with the backup API, then rebuilds its View.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot};
use rusqlite::backup::Backup;
use rusqlite::{Connection, MAIN_DB};
use serde::{Deserialize, Serialize};

use super::{
    Entry, LogId, SnapshotMeta, StoreError, StoredMembership, TypeConfig, read_err, write_err,
};
use crate::command::BatchResponse;
use crate::store::apply::{Applier, Cache};
use crate::store::sqlite::{Durability, SqliteThread};
use crate::store::{full_view, rows, schema, view_changes};
use crate::view::ViewHandle;

/// A failure inside the state machine's storage.
#[derive(Debug, thiserror::Error)]
pub enum SmError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored value did not decode.
    #[error("state database holds an undecodable value: {0}")]
    Codec(#[from] serde_json::Error),
    /// File handling failed.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    /// The database thread stopped.
    #[error(transparent)]
    Closed(#[from] crate::store::sqlite::Closed),
    /// A received snapshot does not match its metadata.
    #[error("received snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

/// Counters for `boxd admin status`.
#[derive(Debug, Default)]
pub struct SmStats {
    /// Snapshots built locally.
    pub snapshots_built: AtomicU64,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: AtomicU64,
}

/// The SQLite state machine.
pub struct StateMachine {
    db: SqliteThread,
    open_tx: OpenTx,
    state_path: PathBuf,
    snapshot_dir: PathBuf,
    view: Arc<ViewHandle>,
    stats: Arc<SmStats>,
    receiving: Option<PathBuf>,
    snapshot_files: SnapshotFiles,
}

/// Held while the snapshot directory changes or is read: openraft builds snapshots in a task
/// of its own, concurrently with the state machine installing a leader's snapshot, and each
/// one's `promote_snapshot` removes every file but its own (it once removed the snapshot being
/// installed before it was restored, which stopped the node).
type SnapshotFiles = Arc<tokio::sync::Mutex<()>>;

/// Builds snapshots from a separate read connection so apply is not blocked.
pub struct SnapshotBuilder {
    db: SqliteThread,
    open_tx: OpenTx,
    state_path: PathBuf,
    snapshot_dir: PathBuf,
    stats: Arc<SmStats>,
    snapshot_files: SnapshotFiles,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
}

fn last_applied(c: &Connection) -> Result<Option<LogId>, SmError> {
    Ok(rows::meta(c, "last_applied")?
        .map(|s| serde_json::from_str(&s))
        .transpose()?)
}

fn last_membership(c: &Connection) -> Result<StoredMembership, SmError> {
    Ok(rows::meta(c, "last_membership")?
        .map(|s| serde_json::from_str(&s))
        .transpose()?
        .unwrap_or_default())
}

impl StateMachine {
    /// Opens `state.db` under `dir` (creating it), restores the latest snapshot if the database
    /// is behind it, and publishes the View.
    pub fn open(dir: &Path, view: Arc<ViewHandle>) -> Result<Self, SmError> {
        let state_path = dir.join("state.db");
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        let open_tx = OpenTx::default();
        let tx = open_tx.clone();
        let idle: crate::store::sqlite::IdleHook = (
            COMMIT_IDLE,
            Box::new(move |c: &mut Connection| commit_logged(c, &tx)),
        );
        let db = SqliteThread::open_with_idle(
            "boxd-state",
            &state_path,
            Durability::Normal,
            Some(idle),
        )?;
        db.call_blocking(|c| schema::migrate(c))??;
        let sm = Self {
            db,
            open_tx,
            state_path,
            snapshot_dir,
            view,
            stats: Arc::default(),
            receiving: None,
            snapshot_files: SnapshotFiles::default(),
        };
        if let Some((meta, path)) = current_snapshot(&sm.snapshot_dir)? {
            let applied = sm.db.call_blocking(|c| last_applied(c))??;
            if applied.map(|l| l.index) < meta.last_log_id.map(|l| l.index) {
                tracing::warn!(snapshot = %meta.snapshot_id, "state database is behind the latest snapshot; restoring it");
                let tx = sm.open_tx.clone();
                sm.db.call_blocking(move |c| restore(c, &tx, &path))??;
            }
        }
        sm.republish_blocking()?;
        Ok(sm)
    }

    /// Path of `state.db`, for read-only readers.
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// Queries on this state machine's connection.
    pub fn reader(&self) -> crate::store::StateReader {
        crate::store::StateReader::new(self.db.clone())
    }

    /// Counters.
    pub fn stats(&self) -> Arc<SmStats> {
        Arc::clone(&self.stats)
    }

    fn republish_blocking(&self) -> Result<(), SmError> {
        let view = self.db.call_blocking(|c| -> Result<_, SmError> {
            let applied = last_applied(c)?.map_or(0, |l| l.index);
            Ok(full_view(c, applied)?)
        })??;
        self.view.publish(view);
        Ok(())
    }
}

/// Commit after this long with a transaction open (etcd's backend uses 100 ms)...
///
/// Every commit writes each page the transaction dirtied to the WAL, and VM names are random,
/// so under load a commit rewrites most of the name index's leaf pages whatever its length:
/// fewer, longer transactions write fewer bytes per command. With 100 ms a three-node cluster
/// under 64 writers wrote ~9–10 KiB to disk per write; with 1 s, ~6 KiB, which also shortens
/// the tail of the followers' log `fdatasync` (the state's write-back shares their disk). Under
/// that load `COMMIT_COMMANDS` usually comes first. The cost is at most this much re-applied
/// from the log after a crash.
const COMMIT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// ...or after this many commands (etcd's batch limit)...
const COMMIT_COMMANDS: usize = 10_000;
/// ...or when no apply arrived for this long.
const COMMIT_IDLE: std::time::Duration = std::time::Duration::from_millis(5);

/// The state machine's open transaction: when it began, how many commands it holds, and what
/// apply remembers inside it (`store::apply::Cache`), which goes with it whether it commits or
/// rolls back. Only touched with the connection held (on its thread or in `try_call_here`), so
/// the lock inside is never contended.
#[derive(Clone, Default)]
struct OpenTx(Arc<std::sync::Mutex<Option<TxState>>>);

struct TxState {
    since: std::time::Instant,
    held: usize,
    cache: Cache,
}

impl TxState {
    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            held: 0,
            cache: Cache::default(),
        }
    }
}

impl OpenTx {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TxState>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A transaction began.
    fn begin(&self) {
        *self.lock() = Some(TxState::new());
    }

    /// The transaction committed or rolled back.
    fn end(&self) {
        *self.lock() = None;
    }

    /// What apply remembered so far in this transaction (empty if none is open).
    fn take_cache(&self) -> Cache {
        self.lock()
            .as_mut()
            .map(|t| std::mem::take(&mut t.cache))
            .unwrap_or_default()
    }

    /// Records `commands` more applied, and what apply remembers now; returns whether the
    /// transaction is due to be committed.
    fn applied(&self, commands: usize, cache: Cache) -> bool {
        let mut state = self.lock();
        let t = state.get_or_insert_with(TxState::new);
        t.held += commands;
        t.cache = cache;
        t.since.elapsed() >= COMMIT_EVERY || t.held >= COMMIT_COMMANDS
    }
}

/// Commits the state machine's open transaction, if any.
fn commit_open(c: &Connection, tx: &OpenTx) -> rusqlite::Result<()> {
    if !c.is_autocommit() {
        c.execute_batch("COMMIT")?;
    }
    tx.end();
    Ok(())
}

/// `commit_open` where nobody waits for the outcome (idle and periodic commits). A failed
/// commit leaves the transaction open; the next one retries, and the log still holds it all.
fn commit_logged(c: &mut Connection, tx: &OpenTx) {
    if let Err(e) = commit_open(c, tx) {
        tracing::error!(error = %e, "committing the state database failed");
    }
}

/// Replaces the live database's contents with the snapshot file at `src`.
fn restore(live: &mut Connection, tx: &OpenTx, src: &Path) -> Result<(), SmError> {
    commit_open(live, tx)?;
    let src = Connection::open_with_flags(src, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(crate::store::sqlite::BUSY_TIMEOUT)?;
    {
        let backup = Backup::new(&src, live)?;
        backup.run_to_completion(1024, std::time::Duration::ZERO, None)?;
    }
    live.pragma_update(None, "journal_mode", "WAL")?;
    schema::migrate(live)?;
    Ok(())
}

fn current_snapshot(dir: &Path) -> Result<Option<(SnapshotMeta, PathBuf)>, SmError> {
    let id = match std::fs::read_to_string(dir.join("current")) {
        Ok(id) => id.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta: StoredSnapshot =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{id}.meta.json")))?)?;
    Ok(Some((meta.meta, dir.join(format!("{id}.db")))))
}

/// Makes `<id>.db` (already in place) the current snapshot and removes older ones.
fn promote_snapshot(dir: &Path, meta: &SnapshotMeta) -> Result<(), SmError> {
    let id = &meta.snapshot_id;
    let meta_json = serde_json::to_vec(&StoredSnapshot { meta: meta.clone() })?;
    write_synced(&dir.join(format!("{id}.meta.json")), &meta_json)?;
    write_synced(&dir.join("current.tmp"), id.as_bytes())?;
    std::fs::rename(dir.join("current.tmp"), dir.join("current"))?;
    std::fs::File::open(dir)?.sync_all()?;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let keep = name == "current"
            || name == format!("{id}.db")
            || name == format!("{id}.meta.json")
            || name.starts_with("incoming-");
        if !keep {
            let _ = std::fs::remove_file(dir.join(name.as_ref()));
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // Snapshots hold the whole state, secrets included: the owner's alone.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn build_snapshot_file(state_path: &Path, dir: &Path) -> Result<SnapshotMeta, SmError> {
    let src = Connection::open_with_flags(state_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(crate::store::sqlite::BUSY_TIMEOUT)?;
    let tmp = dir.join(format!("building-{}.db", uuid::Uuid::new_v4()));
    src.backup(MAIN_DB, &tmp, None::<fn(rusqlite::backup::Progress)>)?;
    drop(src);
    let (last, membership) = {
        let out = Connection::open(&tmp)?;
        out.busy_timeout(crate::store::sqlite::BUSY_TIMEOUT)?;
        out.pragma_update(None, "journal_mode", "DELETE")?;
        (last_applied(&out)?, last_membership(&out)?)
    };
    std::fs::File::open(&tmp)?.sync_all()?;
    let snapshot_id = match &last {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, short_id()),
        None => format!("0-0-{}", short_id()),
    };
    let meta = SnapshotMeta {
        last_log_id: last,
        last_membership: membership,
        snapshot_id,
    };
    std::fs::rename(&tmp, dir.join(format!("{}.db", meta.snapshot_id)))?;
    promote_snapshot(dir, &meta)?;
    Ok(meta)
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

async fn open_snapshot(
    meta: SnapshotMeta,
    path: &Path,
) -> Result<Snapshot<TypeConfig>, StoreError> {
    let sig = Some(meta.signature());
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| openraft::StorageIOError::read_snapshot(sig, openraft::AnyError::new(&e)))?;
    Ok(Snapshot {
        meta,
        snapshot: Box::new(file),
    })
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StoreError> {
        // Make state.db durable up to (at least) the snapshot point before openraft may purge
        // the log entries the snapshot contains. Runs on the writer's thread: it is the only
        // writer, so the checkpoint cannot collide with an apply.
        let tx = self.open_tx.clone();
        self.db
            .call(move |c| {
                commit_open(c, &tx)?;
                c.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))
            })
            .await
            .map_err(write_err)?
            .map_err(write_err)?;
        let (state, dir) = (self.state_path.clone(), self.snapshot_dir.clone());
        let files = Arc::clone(&self.snapshot_files).lock_owned().await;
        let meta = tokio::task::spawn_blocking(move || {
            let _files = files;
            build_snapshot_file(&state, &dir)
        })
        .await
        .map_err(write_err)?
        .map_err(write_err)?;
        self.stats.snapshots_built.fetch_add(1, Ordering::Relaxed);
        tracing::info!(snapshot = %meta.snapshot_id, "built snapshot");
        let path = self.snapshot_dir.join(format!("{}.db", meta.snapshot_id));
        open_snapshot(meta, &path).await
    }
}

type Applied = (Vec<BatchResponse>, Vec<crate::view::ViewChange>, u64);

/// Batches of at most this many commands are applied on the calling thread (`try_call_here`,
/// when the state thread is not busy):
/// tens of microseconds of CPU, less than handing them to the state thread and back costs in
/// latency. Larger batches go to the state thread, so that under load the control plane's
/// thread serves the network while the previous batch is applied.
const INLINE_COMMANDS: usize = 8;

/// Applies `entries` into the open transaction (beginning one if none is open). Returns what
/// was applied and whether the transaction is due to be committed (`COMMIT_EVERY`,
/// `COMMIT_COMMANDS`); committing is the caller's business.
fn apply_entries(
    c: &mut Connection,
    tx_clock: &OpenTx,
    entries: Vec<Entry>,
) -> Result<(Applied, bool), SmError> {
    let applied = apply_entries_open(c, tx_clock, entries);
    if applied.is_err() && !c.is_autocommit() {
        // A storage error stops the state machine. Whatever the open transaction holds (this
        // call's commands up to the failure, and earlier calls' not yet committed) must never
        // be committed without the `last_applied` that goes with it: drop it all. The log
        // still holds every entry, and the next start re-applies them from the last commit.
        if let Err(e) = c.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "rolling back the state database failed");
        }
        tx_clock.end();
    }
    applied
}

fn apply_entries_open(
    c: &mut Connection,
    tx_clock: &OpenTx,
    entries: Vec<Entry>,
) -> Result<(Applied, bool), SmError> {
    if c.is_autocommit() {
        c.execute_batch("BEGIN")?;
        tx_clock.begin();
    }
    // The transaction stays open after this function: it is committed by `commit_open`.
    let tx: &Connection = c;
    let mut applier = Applier::with_cache(tx_clock.take_cache());
    let mut responses = Vec::with_capacity(entries.len());
    let mut last = None;
    let mut commands = 0;
    for e in entries {
        let response = match &e.payload {
            EntryPayload::Blank => Vec::new(),
            EntryPayload::Normal(batch) => {
                commands += batch.0.len();
                applier.apply_batch(tx, &batch.0)?
            }
            EntryPayload::Membership(m) => {
                let stored = StoredMembership::new(Some(e.log_id), m.clone());
                rows::set_meta(tx, "last_membership", &serde_json::to_string(&stored)?)?;
                Vec::new()
            }
        };
        responses.push(response);
        last = Some(e.log_id);
    }
    let mut index = 0;
    if let Some(last) = last {
        rows::set_meta(tx, "last_applied", &serde_json::to_string(&last)?)?;
        index = last.index;
    }
    let (touched, cache) = applier.into_parts();
    let changes = view_changes(tx, &touched)?;
    let due = tx_clock.applied(commands, cache);
    tracing::debug!(entries = responses.len(), commands, "applied");
    Ok(((responses, changes, index), due))
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        self.db
            .call(|c| -> Result<_, SmError> { Ok((last_applied(c)?, last_membership(c)?)) })
            .await
            .map_err(read_err)?
            .map_err(read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResponse>, StoreError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let commands: usize = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(batch) => batch.0.len(),
                EntryPayload::Blank | EntryPayload::Membership(_) => 1,
            })
            .sum();
        let tx = self.open_tx.clone();
        let apply = move |c: &mut Connection| apply_entries(c, &tx, entries);
        let inline = if commands <= INLINE_COMMANDS {
            self.db.try_call_here(apply)
        } else {
            Err(apply)
        };
        let ((responses, changes, index), due) = match inline {
            Ok(applied) => applied,
            Err(apply) => self.db.call(apply).await.map_err(write_err)?,
        }
        .map_err(write_err)?;
        if due {
            // Writing the transaction out is I/O: a job for the state thread, after this batch.
            let tx = self.open_tx.clone();
            self.db
                .send(move |c| commit_logged(c, &tx))
                .map_err(write_err)?;
        }
        self.view.update(index, changes);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            open_tx: self.open_tx.clone(),
            state_path: self.state_path.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            stats: Arc::clone(&self.stats),
            snapshot_files: Arc::clone(&self.snapshot_files),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StoreError> {
        let path = self
            .snapshot_dir
            .join(format!("incoming-{}.db", uuid::Uuid::new_v4()));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(write_err)?;
        if let Some(old) = self.receiving.replace(path) {
            let _ = tokio::fs::remove_file(old).await;
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StoreError> {
        use tokio::io::AsyncSeekExt as _;
        let _files = self.snapshot_files.lock().await;
        // Copy from the handle rather than trusting the path handed out by
        // `begin_receiving_snapshot`: the caller may pass any file.
        let target = self.snapshot_dir.join(format!("{}.db", meta.snapshot_id));
        let copy = async {
            snapshot.seek(std::io::SeekFrom::Start(0)).await?;
            let mut out = tokio::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&target)
                .await?;
            tokio::io::copy(&mut snapshot, &mut out).await?;
            out.sync_all().await
        };
        copy.await.map_err(write_err)?;
        drop(snapshot);
        if let Some(incoming) = self.receiving.take() {
            let _ = tokio::fs::remove_file(incoming).await;
        }
        let meta = meta.clone();
        let dir = self.snapshot_dir.clone();
        let tx = self.open_tx.clone();
        let view = self
            .db
            .call(move |c| -> Result<_, SmError> {
                restore(c, &tx, &target)?;
                let applied = last_applied(c)?;
                if applied != meta.last_log_id {
                    return Err(SmError::Inconsistent(format!(
                        "file is at {applied:?}, metadata says {:?}",
                        meta.last_log_id
                    )));
                }
                promote_snapshot(&dir, &meta)?;
                Ok(full_view(c, applied.map_or(0, |l| l.index))?)
            })
            .await
            .map_err(write_err)?
            .map_err(write_err)?;
        self.view.publish(view);
        self.stats
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!("installed snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        // The file is opened under the lock; once open it survives a later removal.
        let _files = self.snapshot_files.lock().await;
        let current = current_snapshot(&self.snapshot_dir).map_err(read_err)?;
        match current {
            Some((meta, path)) => open_snapshot(meta, &path).await.map(Some),
            None => Ok(None),
        }
    }
}
