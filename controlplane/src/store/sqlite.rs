//! A rusqlite connection owned by one dedicated OS thread.
//!
//! rusqlite calls block (disk I/O, fsync), so they must not run on tokio's workers. Each
//! connection lives on its own thread and runs closures sent to it in FIFO order; async callers
//! await a oneshot reply. FIFO order matters: the Raft log store relies on an `append` queued
//! before a `truncate` being executed before it.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::{Connection, OpenFlags};

type Job = Box<dyn FnOnce(&mut Connection) + Send + 'static>;

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
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self::spawn(name, conn))
    }

    /// Opens an existing database read-only (readers see committed data thanks to WAL).
    pub fn open_read_only(name: &str, path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self::spawn(name, conn))
    }

    /// Runs `conn`'s jobs on a new thread named `name`.
    pub fn spawn(name: &str, mut conn: Connection) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
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
}
