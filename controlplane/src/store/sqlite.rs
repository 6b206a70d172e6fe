//! A rusqlite connection owned by one dedicated OS thread.
//!
//! rusqlite calls block (disk I/O, fsync), so they must not run on tokio's workers. Each
//! connection lives on its own thread and runs closures sent to it in FIFO order; async callers
//! await a oneshot reply. FIFO order matters: the Raft log store relies on an `append` queued
//! before a `truncate` being executed before it.
//!
//! Work that is known to be short and free of I/O (the state machine applying a small batch
//! into its open transaction) can instead run on the caller's thread with
//! [`SqliteThread::try_call_here`] when the thread is not busy: the connection sits behind a
//! mutex that the thread holds for each job, so the two never overlap, and the caller saves the
//! two thread hand-offs of a round trip.
//!
//! A writable database also gets a checkpointer thread with its own connection: WAL
//! checkpoints (and their fsync of the main file) run there in PASSIVE mode instead of inside
//! whichever commit crossed SQLite's auto-checkpoint threshold.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};

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
    conn: Arc<Mutex<Connection>>,
    idle: Arc<IdleState>,
}

/// What `try_call_here` tells the thread so that its idle hook also follows work it did not see.
#[derive(Default)]
struct IdleState {
    /// The thread has an idle hook.
    hooked: bool,
    /// Bumped by every `try_call_here`.
    calls: AtomicU64,
    /// The thread is counting towards its idle hook (it will run the hook after the next quiet
    /// spell); when false, the thread sleeps until a job arrives.
    armed: AtomicBool,
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A job that panicked leaves the connection usable: SQLite rolls back whatever statement
    // was in flight when it is next used.
    conn.lock().unwrap_or_else(PoisonError::into_inner)
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
        conn: Connection,
        alive: mpsc::Sender<()>,
        idle: Option<IdleHook>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let conn = Arc::new(Mutex::new(conn));
        let state = Arc::new(IdleState {
            hooked: idle.is_some(),
            ..IdleState::default()
        });
        let (thread_conn, thread_state) = (Arc::clone(&conn), Arc::clone(&state));
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                match idle {
                    None => {
                        while let Ok(job) = rx.recv() {
                            job(&mut lock(&thread_conn));
                        }
                    }
                    Some((after, hook)) => idle_loop(&rx, &thread_conn, &thread_state, after, hook),
                }
                drop(alive);
            });
        if let Err(e) = spawned {
            // Jobs sent to a handle whose thread never started fail with `Closed`.
            tracing::error!(thread = name, error = %e, "could not start SQLite thread");
        }
        Self {
            jobs: tx,
            conn,
            idle: state,
        }
    }

    /// Runs `f` on the caller's thread if the connection is free right now, or gives `f` back
    /// (the thread is running a job: a commit, a checkpoint, a read) so that the caller can
    /// queue it instead of blocking. For short work without I/O only. An idle hook counts these
    /// calls as work.
    pub fn try_call_here<T, F>(&self, f: F) -> Result<T, F>
    where
        F: FnOnce(&mut Connection) -> T,
    {
        let mut conn = match self.conn.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(f),
        };
        let out = f(&mut conn);
        drop(conn);
        if self.idle.hooked {
            self.idle.calls.fetch_add(1, Ordering::SeqCst);
            // After the connection is released: if the thread was already armed, its hook runs
            // later and locks the connection after us, so it sees this call's work.
            if !self.idle.armed.swap(true, Ordering::SeqCst) {
                // The thread may be asleep with no deadline: wake it to start counting.
                let _ = self.send(|_| {});
            }
        }
        Ok(out)
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

/// The loop of a connection thread with an idle hook: the hook runs once `after` has passed
/// with neither a job nor a `try_call_here`, and never while the connection is idle.
fn idle_loop(
    rx: &mpsc::Receiver<Job>,
    conn: &Mutex<Connection>,
    state: &IdleState,
    after: std::time::Duration,
    mut hook: Box<dyn FnMut(&mut Connection) + Send + 'static>,
) {
    // Whether work has been seen since the hook last ran, and the `try_call_here` count then.
    let mut worked = false;
    let mut seen = state.calls.load(Ordering::SeqCst);
    loop {
        let next = if worked {
            rx.recv_timeout(after)
        } else {
            rx.recv()
                .map_err(|mpsc::RecvError| mpsc::RecvTimeoutError::Disconnected)
        };
        match next {
            Ok(job) => {
                state.armed.store(true, Ordering::SeqCst);
                job(&mut lock(conn));
                worked = true;
                seen = state.calls.load(Ordering::SeqCst);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let calls = state.calls.load(Ordering::SeqCst);
                if calls != seen {
                    // Work on the callers' threads during the interval: not idle yet.
                    seen = calls;
                    continue;
                }
                // Disarm before the hook: a `try_call_here` that finds the thread disarmed wakes
                // it again; one that found it armed finished before the hook locks.
                state.armed.store(false, Ordering::SeqCst);
                hook(&mut lock(conn));
                worked = false;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                hook(&mut lock(conn));
                break;
            }
        }
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
    async fn work_done_on_the_callers_thread_is_committed_by_the_idle_hook() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&runs);
        let hook: IdleHook = (
            std::time::Duration::from_millis(100),
            Box::new(move |c: &mut Connection| {
                if !c.is_autocommit() {
                    c.execute_batch("COMMIT").unwrap();
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        );
        let db = SqliteThread::open_with_idle("t", &path, Durability::Normal, Some(hook)).unwrap();
        db.call(|c| c.execute_batch("CREATE TABLE t (v INTEGER)"))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let count = || runs.load(std::sync::atomic::Ordering::SeqCst);
        let after_create = count();
        // A burst of inserts on this thread, into one open transaction, none through the
        // thread's queue; while they keep coming the hook waits.
        for i in 0..60 {
            let done = db.try_call_here(|c| {
                if c.is_autocommit() {
                    c.execute_batch("BEGIN").unwrap();
                }
                c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            });
            assert!(
                done.is_ok(),
                "the connection's thread is idle, so the call runs here"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(
            count(),
            after_create,
            "no idle hook while work keeps coming"
        );
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(count(), after_create + 1, "one idle hook after the burst");
        // Committed: another connection sees every row.
        let other = Connection::open(&path).unwrap();
        let rows: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 60);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(count(), after_create + 1, "no hook while idle");
    }

    #[tokio::test]
    async fn a_busy_connection_hands_the_work_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteThread::open("t", &dir.path().join("t.db"), Durability::Normal).unwrap();
        let (started, wait) = std::sync::mpsc::channel();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        db.send(move |_| {
            started.send(()).unwrap();
            let _ = hold.recv();
        })
        .unwrap();
        wait.recv().unwrap();
        let back = db.try_call_here(|_| 7);
        assert!(
            back.is_err(),
            "the thread holds the connection: the caller must not block"
        );
        release.send(()).unwrap();
        let f = back.err().unwrap();
        assert_eq!(db.call(f).await.unwrap(), 7);
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
