//! The Raft log, vote and commit index in SQLite (`raft-log.db`, WAL, `synchronous=FULL`).
//!
//! All access goes through one dedicated thread, so an append queued before a read is visible to
//! that read. A leader's `append` returns as soon as the entries are queued and reports
//! durability through openraft's callback after the transaction commits; several appends queued
//! back to back are committed by one transaction and one fsync (group commit). A follower's
//! core waits for each append's flush anyway, so its append commits on the calling thread when
//! the log thread is free and nothing is queued, and returns with the callback fired.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, Vote};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Entry, LogId, StoreError, TypeConfig, read_err, write_err};
use crate::model::NodeId;
use crate::store::sqlite::{Durability, SqliteThread};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
";

/// A failure inside the log database.
#[derive(Debug, thiserror::Error)]
pub enum LogDbError {
    /// SQLite failed.
    #[error("raft log database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored value did not decode.
    #[error("raft log database holds an undecodable value: {0}")]
    Codec(#[from] serde_json::Error),
    /// A stored entry did not decode.
    #[error("raft log database holds an undecodable entry: {0}")]
    Entry(#[from] super::codec::CodecError),
    /// The database thread stopped.
    #[error(transparent)]
    Closed(#[from] crate::store::sqlite::Closed),
}

/// The Raft log store.
pub struct LogStore {
    db: SqliteThread,
    /// The most recent entries, so that apply and replication (which read what was just
    /// appended) need neither the writer thread nor a decode.
    cache: Arc<Mutex<EntryCache>>,
    committed: Arc<AtomicU64>,
    /// Appends waiting for the writer thread; the first one queued schedules the job that
    /// commits them all.
    pending: Arc<Mutex<Vec<PendingAppend>>>,
    /// The latest commit index openraft reported, written with the next append's transaction.
    committed_pending: Arc<Mutex<Option<LogId>>>,
}

/// A reader of the same log, for openraft's replication tasks.
pub struct LogReader {
    db: SqliteThread,
    cache: Arc<Mutex<EntryCache>>,
}

/// Entries kept in memory after the newest append.
const CACHE_ENTRIES: usize = 4096;

/// A contiguous run of the newest entries, mirroring the log: appends extend it, truncation
/// and purging cut it. A read is served from it only when it holds the whole range.
#[derive(Default)]
struct EntryCache {
    entries: std::collections::VecDeque<Entry>,
}

impl EntryCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn append(&mut self, new: &[Entry]) {
        let Some(first) = new.first() else { return };
        // Keep the cache contiguous: drop anything at or after the new entries' start, and
        // start over if there would be a gap.
        let next = self.entries.back().map(|e| e.log_id.index + 1);
        if next.is_some_and(|n| first.log_id.index > n) {
            self.entries.clear();
        }
        self.truncate(first.log_id.index);
        self.entries.extend(new.iter().cloned());
        while self.entries.len() > CACHE_ENTRIES {
            self.entries.pop_front();
        }
    }

    fn truncate(&mut self, from: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= from) {
            self.entries.pop_back();
        }
    }

    fn purge(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= upto) {
            self.entries.pop_front();
        }
    }

    /// The entries in `[start, end)` if the cache holds all of them that exist.
    fn get(&self, start: i64, end: i64) -> Option<Vec<Entry>> {
        let first = i64::try_from(self.first_index()?).ok()?;
        if start < first {
            return None;
        }
        Some(
            self.entries
                .iter()
                .filter(|e| {
                    let i = i64::try_from(e.log_id.index).unwrap_or(i64::MAX);
                    i >= start && i < end
                })
                .cloned()
                .collect(),
        )
    }
}

impl LogStore {
    /// Opens or creates the log at `path`.
    pub fn open(path: &Path) -> Result<Self, LogDbError> {
        let db = SqliteThread::open("boxd-raft-log", path, Durability::Full)?;
        db.call_blocking(|c| c.execute_batch(SCHEMA))??;
        let committed: Option<LogId> = db.call_blocking(|c| kv_get(c, "committed"))??;
        Ok(Self {
            db,
            committed: Arc::new(AtomicU64::new(committed.map_or(0, |l| l.index))),
            cache: Arc::default(),
            pending: Arc::default(),
            committed_pending: Arc::default(),
        })
    }

    /// The commit index this node knows of (updated as openraft reports it).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.committed)
    }
}

fn kv_get<T: DeserializeOwned>(c: &Connection, key: &str) -> Result<Option<T>, LogDbError> {
    let raw: Option<Vec<u8>> = c
        .prepare_cached("SELECT value FROM kv WHERE key = ?1")?
        .query_row(params![key], |r| r.get(0))
        .optional()?;
    Ok(raw.map(|b| serde_json::from_slice(&b)).transpose()?)
}

fn kv_put<T: Serialize>(c: &Connection, key: &str, value: &T) -> Result<(), LogDbError> {
    let raw = serde_json::to_vec(value)?;
    c.prepare_cached(
        "INSERT INTO kv (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, raw])?;
    Ok(())
}

fn sql_index(i: u64) -> i64 {
    i64::try_from(i).unwrap_or(i64::MAX)
}

fn bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(s) => sql_index(*s),
        Bound::Excluded(s) => sql_index(s.saturating_add(1)),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => sql_index(e.saturating_add(1)),
        Bound::Excluded(e) => sql_index(*e),
        Bound::Unbounded => i64::MAX,
    };
    (start, end)
}

fn read_range(c: &Connection, start: i64, end: i64) -> Result<Vec<Entry>, LogDbError> {
    let mut stmt =
        c.prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
    let rows = stmt.query_map(params![start, end], |r| r.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for raw in rows {
        out.push(super::codec::decode_entry(&raw?)?);
    }
    Ok(out)
}

async fn read_entries<RB>(
    db: &SqliteThread,
    cache: &Mutex<EntryCache>,
    range: RB,
) -> Result<Vec<Entry>, StoreError>
where
    RB: RangeBounds<u64>,
{
    let (start, end) = bounds(&range);
    let cached = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(start, end);
    if let Some(entries) = cached {
        return Ok(entries);
    }
    db.call(move |c| read_range(c, start, end))
        .await
        .map_err(read_err)?
        .map_err(read_err)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StoreError> {
        read_entries(&self.db, &self.cache, range).await
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StoreError> {
        read_entries(&self.db, &self.cache, range).await
    }
}

/// Serialised entries waiting to be committed, with the callbacks to fire afterwards.
type PendingAppend = (Vec<(i64, Vec<u8>)>, LogFlushed<TypeConfig>);

fn write_entries(
    c: &mut Connection,
    batch: &[PendingAppend],
    committed: Option<LogId>,
) -> Result<(), LogDbError> {
    let tx = c.transaction()?;
    if let Some(committed) = committed {
        kv_put(&tx, "committed", &Some(committed))?;
    }
    {
        let mut stmt =
            tx.prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)")?;
        for (entries, _) in batch {
            for (idx, raw) in entries {
                stmt.execute(params![idx, raw])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StoreError> {
        self.db
            .call(|c| -> Result<_, LogDbError> {
                let last_purged: Option<LogId> = kv_get(c, "last_purged")?;
                let last: Option<Vec<u8>> = c
                    .query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                        r.get(0)
                    })
                    .optional()?;
                let last_log_id = match last {
                    Some(raw) => Some(super::codec::decode_entry(&raw)?.log_id),
                    None => last_purged,
                };
                Ok(LogState {
                    last_purged_log_id: last_purged,
                    last_log_id,
                })
            })
            .await
            .map_err(read_err)?
            .map_err(read_err)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            db: self.db.clone(),
            cache: Arc::clone(&self.cache),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StoreError> {
        let vote = *vote;
        self.db
            .call(move |c| kv_put(c, "vote", &vote))
            .await
            .map_err(write_err)?
            .map_err(write_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StoreError> {
        self.db
            .call(|c| kv_get(c, "vote"))
            .await
            .map_err(read_err)?
            .map_err(read_err)
    }

    /// openraft awaits this on every commit, on its core task. It must not wait for the disk:
    /// the value is written with the next append's transaction (no fsync of its own). Losing
    /// the latest value in a crash only means re-learning the commit index from the leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StoreError> {
        if let Some(c) = &committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        *self
            .committed_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StoreError> {
        let pending = *self
            .committed_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pending.is_some() {
            return Ok(pending);
        }
        self.db
            .call(|c| kv_get(c, "committed"))
            .await
            .map_err(read_err)?
            .map_err(read_err)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut rows = Vec::with_capacity(entries.len());
        for e in &entries {
            let raw = super::codec::encode_entry(e).map_err(write_err)?;
            rows.push((sql_index(e.log_id.index), raw));
        }
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&entries);
        // Group commit. Only openraft's core calls `append`/`truncate`/`purge` (through
        // `&mut self`, one at a time, awaiting the others), so no non-append job can sit between
        // the scheduled job and an append that joins its batch.
        let first = {
            let mut q = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            // A follower's core waits for this flush before it does anything else, so the
            // write may as well happen here: that saves waking the log thread and being woken
            // by it. Only when nothing is queued (the log keeps its order) and the connection
            // is free (no read or commit running on the log thread). A leader's append stays on
            // the log thread, where its fsync overlaps replication.
            if q.is_empty() && callback.is_awaited() {
                let committed = *self
                    .committed_pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let batch = [(rows, callback)];
                match self
                    .db
                    .try_call_here(|c| write_entries(c, &batch, committed))
                {
                    Ok(result) => {
                        let [(_, callback)] = batch;
                        callback.log_io_completed(
                            result.map_err(|e| std::io::Error::other(e.to_string())),
                        );
                        return Ok(());
                    }
                    Err(_) => {
                        let [pending] = batch;
                        q.push(pending);
                    }
                }
            } else {
                q.push((rows, callback));
            }
            q.len() == 1
        };
        if !first {
            return Ok(());
        }
        let pending = Arc::clone(&self.pending);
        let committed = Arc::clone(&self.committed_pending);
        self.db
            .send(move |c| {
                let batch =
                    std::mem::take(&mut *pending.lock().unwrap_or_else(PoisonError::into_inner));
                let committed = *committed.lock().unwrap_or_else(PoisonError::into_inner);
                let result = write_entries(c, &batch, committed);
                tracing::debug!(appends = batch.len(), "log batch committed");
                for (_, cb) in batch {
                    cb.log_io_completed(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(std::io::Error::other(e.to_string())),
                    });
                }
            })
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StoreError> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .truncate(log_id.index);
        let from = sql_index(log_id.index);
        self.db
            .call(move |c| c.execute("DELETE FROM log WHERE idx >= ?1", params![from]))
            .await
            .map_err(write_err)?
            .map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StoreError> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .purge(log_id.index);
        self.db
            .call(move |c| -> Result<(), LogDbError> {
                let tx = c.transaction()?;
                kv_put(&tx, "last_purged", &log_id)?;
                tx.execute(
                    "DELETE FROM log WHERE idx <= ?1",
                    params![sql_index(log_id.index)],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(write_err)?
            .map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: openraft::LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(v: &Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.as_ref()
            .map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn cache_serves_only_ranges_it_holds_entirely() {
        let mut c = EntryCache::default();
        assert_eq!(indexes(&c.get(1, 5)), None, "empty cache serves nothing");
        c.append(&(5..10).map(|i| entry(1, i)).collect::<Vec<_>>());
        assert_eq!(indexes(&c.get(5, 8)), Some(vec![5, 6, 7]));
        assert_eq!(
            indexes(&c.get(8, 100)),
            Some(vec![8, 9]),
            "past the end: what exists"
        );
        assert_eq!(
            indexes(&c.get(4, 8)),
            None,
            "starts before the cache: go to disk"
        );
    }

    #[test]
    fn cache_follows_truncate_purge_and_overwrite() {
        let mut c = EntryCache::default();
        c.append(&(1..=6).map(|i| entry(1, i)).collect::<Vec<_>>());
        c.truncate(5);
        assert_eq!(indexes(&c.get(1, 10)), Some(vec![1, 2, 3, 4]));
        // A new leader overwrites from index 3 with term 2.
        c.append(&[entry(2, 3), entry(2, 4)]);
        let got = c.get(1, 10).unwrap();
        assert_eq!(
            got.iter()
                .map(|e| e.log_id.leader_id.term)
                .collect::<Vec<_>>(),
            vec![1, 1, 2, 2]
        );
        c.purge(2);
        assert_eq!(indexes(&c.get(3, 10)), Some(vec![3, 4]));
        assert_eq!(indexes(&c.get(2, 10)), None);
        // A gap (entries installed by snapshot elsewhere) restarts the cache.
        c.append(&[entry(3, 100)]);
        assert_eq!(indexes(&c.get(100, 101)), Some(vec![100]));
        assert_eq!(indexes(&c.get(4, 101)), None);
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = EntryCache::default();
        let n = u64::try_from(CACHE_ENTRIES).unwrap() + 10;
        c.append(&(1..=n).map(|i| entry(1, i)).collect::<Vec<_>>());
        assert_eq!(c.entries.len(), CACHE_ENTRIES);
        assert_eq!(c.first_index(), Some(11));
    }
}
