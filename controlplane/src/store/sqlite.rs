//! A rusqlite connection owned by one dedicated OS thread.
//!
//! rusqlite calls block (disk I/O, fsync), so they must not run on tokio's workers. Each
//! connection lives on its own thread and runs closures sent to it in FIFO order; async callers
//! await a oneshot reply. FIFO order matters: the Raft log store relies on an `append` queued
//! before a `truncate` being executed before it.
//!
//! A writable database also gets a checkpointer thread with its own connection: WAL
//! checkpoints (and their fsync of the main file) run there in PASSIVE mode instead of inside
//! whichever commit crossed SQLite's auto-checkpoint threshold.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::Connection;

type Job = Box<dyn FnOnce(&mut Connection) + Send + 'static>;

/// Work a connection's thread does after it has been idle for a while.
pub type IdleHook = (
    std::time::Duration,
    Box<dyn FnMut(&mut Connection) + Send + 'static>,
);

/// How long a connection waits for another connection's lock (a checkpoint, a backup) before
/// reporting SQLITE_BUSY. Every connection to a boxd database must set it: a busy error in the
/// state machine is fatal to Raft.
pub const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The connection's thread has stopped (it panicked or the process is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the SQLite thread has stopped")]
pub struct Closed;

/// Handle to a connection on its own thread. Cloning shares the same thread and connection.
#[derive(Clone)]
pub struct SqliteThread {
    jobs: mpsc::Sender<Job>,
}

/// How durable commits must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced (the Raft log and vote).
    Full,
    /// `synchronous=NORMAL`: commits survive a process crash, fsync at checkpoints (the state
    /// machine, which the log can rebuild).
    Normal,
}

impl SqliteThread {
    /// Opens (creating if needed) the database at `path` in WAL mode and starts its thread.
    pub fn open(name: &str, path: &Path, durability: Durability) -> rusqlite::Result<Self> {
        Self::open_with_idle(name, path, durability, None)
    }

    /// Like `open`; `idle` runs on the thread once its duration has passed without a job since
    /// the last job. A thread with nothing to do sleeps until the next job: an idle node costs no
    /// wake-ups.
    pub fn open_with_idle(
        name: &str,
        path: &Path,
        durability: Durability,
        idle: Option<IdleHook>,
    ) -> rusqlite::Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // After `wal_autocheckpoint`, which would replace it.
        conn.wal_hook(Some(restart_large_wal))?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        // 64 MiB page cache and memory-mapped reads: the state of a large cluster stays hot.
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.pragma_update(None, "mmap_size", 256 << 20)?;
        // Savepoint sub-journals in memory, not in temporary files.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(128);
        let checkpointer = Connection::open(path)?;
        checkpointer.busy_timeout(BUSY_TIMEOUT)?;
        checkpointer.pragma_update(None, "synchronous", sync)?;
        let (alive, stopped) = mpsc::channel::<()>();
        let me = Self::spawn_with(name, conn, alive, idle);
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-ckpt"))
            .spawn(move || checkpoint_loop(&checkpointer, &stopped));
        if let Err(e) = spawned {
            tracing::error!(thread = name, error = %e, "could not start the checkpointer");
        }
        Ok(me)
    }

    /// Runs `conn`'s jobs on a new thread named `name`.
    pub fn spawn(name: &str, conn: Connection) -> Self {
        let (alive, _) = mpsc::channel::<()>();
        Self::spawn_with(name, conn, alive, None)
    }

    /// Like `spawn`; `alive` is dropped when the thread ends (the checkpointer watches it).
    fn spawn_with(
        name: &str,
        mut conn: Connection,
        alive: mpsc::Sender<()>,
        idle: Option<IdleHook>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                match idle {
                    None => {
                        while let Ok(job) = rx.recv() {
                            job(&mut conn);
                        }
                    }
                    Some((after, mut hook)) => {
                        // Whether a job has run since the hook last did.
                        let mut worked = false;
                        loop {
                            let next = if worked {
                                rx.recv_timeout(after)
                            } else {
                                rx.recv()
                                    .map_err(|mpsc::RecvError| mpsc::RecvTimeoutError::Disconnected)
                            };
                            match next {
                                Ok(job) => {
                                    job(&mut conn);
                                    worked = true;
                                }
                                Err(mpsc::RecvTimeoutError::Timeout) => {
                                    hook(&mut conn);
                                    worked = false;
                                }
                                Err(mpsc::RecvTimeoutError::Disconnected) => {
                                    hook(&mut conn);
                                    break;
                                }
                            }
                        }
                    }
                }
                drop(alive);
            });
        if let Err(e) = spawned {
            // Jobs sent to a handle whose thread never started fail with `Closed`.
            tracing::error!(thread = name, error = %e, "could not start SQLite thread");
        }
        Self { jobs: tx }
    }

    /// Runs `f` on the connection's thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Closed>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(move |c| {
            let _ = tx.send(f(c));
        })?;
        rx.await.map_err(|_| Closed)
    }

    /// Runs `f` on the connection's thread, blocking the caller (for non-async code).
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T, Closed>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(move |c| {
            let _ = tx.send(f(c));
        })?;
        rx.recv().map_err(|_| Closed)
    }

    /// Queues `f` without waiting for it.
    pub fn send<F>(&self, f: F) -> Result<(), Closed>
    where
        F: FnOnce(&mut Connection) + Send + 'static,
    {
        self.jobs.send(Box::new(f)).map_err(|_| Closed)
    }
}

/// WAL frames after which the writer finishes the checkpoint itself, so that its next
/// transaction starts the WAL over from the beginning (8 MiB of 4 KiB pages).
const WAL_RESTART_FRAMES: std::ffi::c_int = 2048;

/// What a restarted WAL is cut back to if it grew past it (while a snapshot held a reader).
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Runs after every commit with the WAL's length in frames. SQLite restarts the WAL from its
/// first frame only when a write transaction begins with every frame checkpointed; under a
/// steady stream of commits the checkpointer never wins that race, so the WAL would grow without
/// bound, and every commit would append to new file blocks: the kernel zeroes each new page
/// (7 % of a three-node cluster's CPU under the commit benchmark) and `fdatasync` also
/// commits the file's new size (~130 µs instead of ~80 µs here). A PASSIVE checkpoint on the
/// writer, right after a commit, has only what the checkpointer has not done yet left to copy.
fn restart_large_wal(
    wal: &mut rusqlite::hooks::Wal,
    frames: std::ffi::c_int,
) -> rusqlite::Result<()> {
    if frames >= WAL_RESTART_FRAMES
        && let Err(e) = wal.checkpoint()
    {
        // Busy: the checkpointer is at it right now. The next commit tries again.
        if e.sqlite_error_code() != Some(rusqlite::ErrorCode::DatabaseBusy) {
            tracing::warn!(error = %e, "WAL checkpoint after commit failed; the next commit retries");
        }
    }
    Ok(())
}

/// How often the checkpointer runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Checkpoints the WAL every `CHECKPOINT_EVERY` until the writer thread ends. PASSIVE mode
/// never blocks the writer; the writer restarts the WAL from its start once everything in it
/// has been checkpointed.
fn checkpoint_loop(conn: &Connection, writer_gone: &mpsc::Receiver<()>) {
    loop {
        match writer_gone.recv_timeout(CHECKPOINT_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => {
                // Final checkpoint so a clean shutdown leaves a small WAL.
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                return;
            }
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteThread::open("t", &dir.path().join("t.db"), Durability::Full).unwrap();
        db.call(|c| c.execute_batch("CREATE TABLE t (v INTEGER)"))
            .await
            .unwrap()
            .unwrap();
        for i in 0..10 {
            db.send(move |c| {
                c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            })
            .unwrap();
        }
        let got: Vec<i64> = db
            .call(|c| {
                let mut s = c.prepare("SELECT v FROM t ORDER BY rowid").unwrap();
                s.query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            })
            .await
            .unwrap();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        let mode: String = db
            .call_blocking(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
            .unwrap()
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn the_wal_starts_over_under_a_steady_stream_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = SqliteThread::open("t", &path, Durability::Normal).unwrap();
        db.call(|c| c.execute_batch("CREATE TABLE t (v BLOB)"))
            .await
            .unwrap()
            .unwrap();
        // Commits back to back on the writer thread, as under load: ~3 frames each, 30,000
        // frames in all, while the checkpointer checkpoints every 250 ms beside them.
        let frames = usize::try_from(WAL_RESTART_FRAMES).unwrap();
        for _ in 0..10_000 {
            db.send(|c| {
                c.execute("INSERT INTO t VALUES (zeroblob(8000))", [])
                    .unwrap();
            })
            .unwrap();
        }
        let rows: i64 = db
            .call(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rows, 10_000);
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        // A WAL starts over once it passes WAL_RESTART_FRAMES frames and the writer's checkpoint
        // gets through; while the checkpointer's own checkpoint holds the lock (long, on a busy
        // machine) the writer retries after each commit and the WAL keeps growing meanwhile
        // (seen: 1.3× the threshold under CI's parallel tests). Without the restart it grows to
        // ~167 MB here.
        let bound = u64::try_from(4 * frames * (4096 + 24)).unwrap();
        assert!(
            wal <= bound,
            "the WAL grew to {wal} bytes (bound {bound}): it is not being restarted"
        );
    }

    #[tokio::test]
    async fn the_idle_hook_runs_once_after_work_and_never_while_idle() {
        let dir = tempfile::tempdir().unwrap();
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&runs);
        let hook: IdleHook = (
            std::time::Duration::from_millis(10),
            Box::new(move |_: &mut Connection| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        );
        let db = SqliteThread::open_with_idle(
            "t",
            &dir.path().join("t.db"),
            Durability::Normal,
            Some(hook),
        )
        .unwrap();
        let count = || runs.load(std::sync::atomic::Ordering::SeqCst);
        // Opening runs no job: nothing to be idle after.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(count(), 0);
        for round in 1..=2 {
            db.call(|c| c.execute_batch("SELECT 1"))
                .await
                .unwrap()
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            assert_eq!(
                count(),
                round,
                "one hook run per burst of work, none while idle"
            );
        }
        drop(db);
    }
}
