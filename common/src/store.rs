//! The durable store both kinds of node write through: sled, with a redo log in front of it
//! ([`crate::redo`]) and run files beside it for the history keys ([`crate::runs`]), and one group-commit
//! flusher thread.
//!
//! A write group is durable once it is appended to the redo log and the log file is `fdatasync`ed: that
//! survives SIGKILL and power loss. The flusher is the only thread that writes the log, and it serves every
//! writer waiting when it starts, so one fdatasync covers a whole batch of transfers (group commit). sled is
//! written, flushed and its file `fdatasync`ed only at checkpoints, by the checkpoint thread (sled 0.34's own
//! `flush()` ends in `sync_file_range`, which survives SIGKILL but not power loss).

pub use crate::redo::KeyClasses;
use crate::redo::{LogWriter, Op, Redo, RedoError};
use crate::runs::{Merge, RunError};
use crate::telemetry::names;
pub use migrations::StoreKind;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Writers that may wait for the flusher at once; past it `sync` waits for room (backpressure, bounded memory).
const FLUSH_QUEUE_MAX: usize = 65_536;
/// Attempts to open the store: right after a SIGKILL sled can report the old process's lock for about a second.
const OPEN_ATTEMPTS_MAX: u32 = 50;
const OPEN_RETRY_DELAY: Duration = Duration::from_millis(200);

/// How far a write goes before it counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// An append to the redo log, then an fdatasync of it: survives SIGKILL and power loss.
    Fsync,
    /// The append without the fdatasync. Not durable: only for measuring what durability costs.
    NoFsync,
}

/// sled's page cache when no size is given (`--cache-mb`): sled's own default is 1 GiB, more than a node
/// needs, and the cache is what a node's memory grows with as its history does.
pub const CACHE_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

/// How a store is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    pub durability: Durability,
    /// The most sled keeps of the store in memory.
    pub cache_bytes: u64,
}

impl From<Durability> for StoreOptions {
    fn from(durability: Durability) -> Self {
        StoreOptions { durability, cache_bytes: CACHE_BYTES_DEFAULT }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot open store log file {path}: {source}")]
    LogFile { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Migration(#[from] migrations::MigrationError),
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("the flusher thread has stopped")]
    FlusherGone,
    #[error(transparent)]
    Record(#[from] crate::records::RecordError),
    #[error(transparent)]
    Redo(#[from] RedoError),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Counters of the flusher, for the benchmark and `/stats`.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// fdatasync calls made (one per group commit).
    pub fsyncs: AtomicU64,
    /// Writers released by those fsyncs.
    pub waiters: AtomicU64,
    /// Total time spent in flush + fdatasync, in microseconds.
    pub flush_micros: AtomicU64,
}

#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    flush_queue: mpsc::Sender<oneshot::Sender<()>>,
    pub stats: Arc<FlushStats>,
    redo: Arc<Redo>,
    /// Whether sled holds history keys, written before they went to run files (layout 6 and older).
    history_in_sled: bool,
}

/// A key and its value, as [`Store::range`] returns them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

impl Store {
    /// Opens the store in `dir` (retrying while an old process's lock lingers): replays its redo log
    /// (`dir/redo`) into sled and the run files (`dir/runs`), migrates, and starts the flusher and checkpoint
    /// threads. Writes go through [`Store::log`], reads through [`Store::get`] and [`Store::range`], which see
    /// the log ahead of the runs and sled. `classes` says which keys are transient and which are history (see
    /// [`crate::redo`] and [`crate::runs`]).
    pub fn open(
        dir: &Path,
        kind: StoreKind,
        options: impl Into<StoreOptions>,
        classes: KeyClasses,
    ) -> Result<Store, StoreError> {
        let StoreOptions { durability, cache_bytes } = options.into();
        let path = dir.join("store");
        let db = open_with_retry(&path, cache_bytes)?;
        // A newer binary's log may not be ours to replay: refuse the store first.
        if let Some(found) = migrations::stored_version(&db)? {
            if found > migrations::LAYOUT_VERSION {
                return Err(migrations::MigrationError::TooNew { found }.into());
            }
        }
        // sled 0.34 keeps its whole log in this one file.
        let log_path = path.join("db");
        let open_log =
            || File::open(&log_path).map_err(|source| StoreError::LogFile { path: log_path.clone(), source });
        let (redo, writer) = Redo::open(&dir.join("redo"), &dir.join("runs"), &db, &open_log()?, classes)?;
        let previous = migrations::migrate(&db, kind)?;
        let mut history_in_sled = false;
        for prefix in classes.history {
            history_in_sled |= db.scan_prefix([*prefix]).next().transpose()?.is_some();
        }
        tracing::info!(path = %path.display(), previous_layout = previous, layout = migrations::LAYOUT_VERSION, "store open");
        let (flush_queue, rx) = mpsc::channel(FLUSH_QUEUE_MAX);
        let stats = Arc::new(FlushStats::default());
        let flusher_stats = stats.clone();
        std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || flusher(writer, durability, rx, flusher_stats))
            .map_err(|source| StoreError::LogFile { path: path.clone(), source })?;
        // A checkpoint makes its groups durable as any writer does: through the group commit. Weak, so that the
        // flusher stops once the store is dropped.
        let queue = flush_queue.downgrade();
        let sync = move || {
            let Some(queue) = queue.upgrade() else { return false };
            let (done, wait) = oneshot::channel();
            queue.blocking_send(done).is_ok() && wait.blocking_recv().is_ok()
        };
        redo.start_checkpoints(open_log()?, sync)?;
        Ok(Store { db, flush_queue, stats, redo, history_in_sled })
    }

    /// Logs one group of writes, which a crash keeps whole or not at all; durable after the next [`sync`].
    ///
    /// [`sync`]: Store::sync
    pub fn log(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        self.redo.log(ops);
        Ok(())
    }

    /// The value of `key`: the redo log's, if it has one not yet checkpointed, else the newest run's for a
    /// history key, else sled's.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.redo.get(key) {
            return Ok(value);
        }
        if self.redo.classes.is_history(key) {
            if let Some(value) = self.redo.runs.get(key)? {
                return Ok(value);
            }
            if !self.history_in_sled {
                return Ok(None);
            }
        }
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    /// The keys in `range` with their values, in key order, or the last `limit` of them in reverse order if
    /// `reverse`: the redo log's writes not yet checkpointed, over the runs (newest first), over sled.
    pub fn range(
        &self,
        range: std::ops::Range<Vec<u8>>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        type Source<'a> = Box<dyn Iterator<Item = Result<crate::runs::Entry, StoreError>> + 'a>;
        let overlay = self.redo.overlay_range(range.clone());
        let overlay: Source =
            if reverse { Box::new(overlay.into_iter().rev().map(Ok)) } else { Box::new(overlay.into_iter().map(Ok)) };
        let mut sources = vec![overlay];
        if self.redo.classes.may_hold_history(&range) {
            for run in self.redo.runs.live().iter() {
                sources.push(Box::new(run.range(range.clone(), reverse).map(|e| e.map_err(StoreError::from))));
            }
        }
        let sled_entry = |e: sled::Result<(sled::IVec, sled::IVec)>| -> Result<crate::runs::Entry, StoreError> {
            let (key, value) = e?;
            Ok((key.to_vec(), Some(value.to_vec())))
        };
        let from_sled = self.db.range(range);
        if reverse {
            sources.push(Box::new(from_sled.rev().map(sled_entry)));
        } else {
            sources.push(Box::new(from_sled.map(sled_entry)));
        }
        let mut out = Vec::new();
        for entry in Merge::new(sources, reverse) {
            if out.len() >= limit {
                break;
            }
            if let (key, Some(value)) = entry? {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// The history's run files: how many, their entries and bytes, and the bytes of their filters and
    /// indexes in memory, as JSON for `/stats`.
    pub fn runs_json(&self) -> serde_json::Value {
        let (entries, bytes, runs) = self.redo.runs.stats();
        serde_json::json!({"runs": runs, "entries": entries, "bytes": bytes, "index_bytes": self.redo.runs.index_bytes()})
    }

    /// Checkpoints written, and keys waiting for sled.
    pub fn redo_stats(&self) -> (u64, usize) {
        (self.redo.checkpoints_done.load(Ordering::Relaxed), self.redo.deferred_keys())
    }

    /// Returns once every write this task made before the call is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.flush_queue.send(done).await.map_err(|_| StoreError::FlusherGone)?;
        wait.await.map_err(|_| StoreError::FlusherGone)
    }
}

fn open_with_retry(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let mut attempt = 1;
    loop {
        match sled::Config::new().path(path).mode(sled::Mode::HighThroughput).cache_capacity(cache_bytes).open() {
            Ok(db) => return Ok(db),
            Err(source) if attempt < OPEN_ATTEMPTS_MAX => {
                tracing::warn!(attempt, error = %source, "store busy or unreadable, retrying");
                attempt += 1;
                std::thread::sleep(OPEN_RETRY_DELAY);
                let _ = source;
            }
            Err(source) => return Err(StoreError::Open { path: path.to_owned(), source }),
        }
    }
}

/// The group-commit loop: take every waiting writer, make their writes durable with one flush and one
/// fdatasync, release them all. A failed fsync leaves the page cache in an unknown state (the write may be
/// lost while the cache says clean), so the only safe answer is to stop the process and recover from disk.
fn flusher(
    mut writer: LogWriter,
    durability: Durability,
    mut rx: mpsc::Receiver<oneshot::Sender<()>>,
    stats: Arc<FlushStats>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while let Ok(next) = rx.try_recv() {
            batch.push(next);
        }
        let started = Instant::now();
        // Without fsync the frames are still written, so that a clean restart finds them.
        let result = writer.write(durability == Durability::Fsync);
        if let Err(error) = result {
            tracing::error!(%error, "flush or fdatasync failed: stopping so recovery starts from what is on disk");
            std::process::abort();
        }
        let took = started.elapsed();
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        stats.waiters.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.flush_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        metrics::counter!(names::WAL_FSYNCS).increment(1);
        metrics::histogram!(names::WAL_FLUSH_SECONDS).record(took.as_secs_f64());
        metrics::histogram!(names::WAL_RECORDS_PER_FLUSH).record(batch.len() as f64);
        for done in batch.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_syncs_share_fsyncs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Store::open(dir.path(), StoreKind::Participant, Durability::Fsync, KeyClasses::default()).expect("opens");
        let tasks: Vec<_> = (0..64u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.log(vec![(i.to_be_bytes().to_vec(), Some(b"x".to_vec()))]).expect("log");
                    store.sync().await.expect("sync");
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        let fsyncs = store.stats.fsyncs.load(Ordering::Relaxed);
        assert_eq!(store.stats.waiters.load(Ordering::Relaxed), 64);
        assert!((1..=64).contains(&fsyncs), "{fsyncs} fsyncs for 64 writers");
    }

    #[test]
    fn reads_see_the_redo_log_ahead_of_sled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(
            dir.path(),
            StoreKind::Participant,
            Durability::NoFsync,
            KeyClasses { transient: Some(b'p'), history: b"h" },
        )
        .expect("opens");
        let key = |i: u8| vec![b'k', i];
        for i in 1..=5 {
            // As a checkpoint leaves them.
            store.db.insert(key(i), vec![i]).expect("insert");
        }
        store.log(vec![(key(4), None), (key(6), Some(vec![6])), (key(2), Some(vec![20]))]).expect("log");
        let values = |r: Vec<KeyValue>| r.into_iter().map(|(_, v)| v[0]).collect::<Vec<_>>();
        let all = key(0)..key(9);
        assert_eq!(values(store.range(all.clone(), true, 3).expect("range")), vec![6, 5, 3]);
        assert_eq!(values(store.range(all.clone(), false, 3).expect("range")), vec![1, 20, 3]);
        assert_eq!(values(store.range(all, false, usize::MAX).expect("range")), vec![1, 20, 3, 5, 6]);
        assert_eq!(store.get(&key(4)).expect("get"), None, "removed in the log, still in sled");
        assert_eq!(store.get(&key(2)).expect("get"), Some(vec![20]));
        assert_eq!(store.get(&key(1)).expect("get"), Some(vec![1]));
    }

    #[tokio::test]
    async fn a_synced_write_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path(), StoreKind::Coordinator, Durability::Fsync, KeyClasses::default())
                .expect("opens");
            store.log(vec![(b"k".to_vec(), Some(b"v".to_vec()))]).expect("log");
            store.sync().await.expect("sync");
        }
        let store =
            Store::open(dir.path(), StoreKind::Coordinator, Durability::Fsync, KeyClasses::default()).expect("reopens");
        assert_eq!(store.db.get(b"k").expect("get").as_deref(), Some(&b"v"[..]), "replayed into sled at open");
        assert_eq!(store.get(b"k").expect("get"), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn history_reads_merge_the_log_the_runs_and_what_sled_kept_from_before_runs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let classes = KeyClasses { transient: None, history: b"h" };
        let kv = |k: &str, v: Option<&str>| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()));
        drop(Store::open(dir.path(), StoreKind::Coordinator, Durability::Fsync, classes).expect("opens"));
        {
            // History a layout-6 node wrote to sled itself (the threads of the store above let go of it soon).
            let mut attempts = 0;
            let db = loop {
                match sled::open(dir.path().join("store")) {
                    Ok(db) => break db,
                    Err(e) if attempts < 100 => {
                        attempts += 1;
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("sled does not open: {e}"),
                }
            };
            db.insert("h1", "sled1").and_then(|_| db.insert("h3", "sled3")).expect("insert");
            db.flush().expect("flush");
        }
        let store = Store::open(dir.path(), StoreKind::Coordinator, Durability::Fsync, classes).expect("reopens");
        let big = "z".repeat(crate::redo::CHECKPOINT_BYTES as usize);
        store.log(vec![kv("h2", Some("run2")), kv("h3", Some("run3")), kv("zz", Some(&big))]).expect("log");
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.redo_stats().0 == 0 {
            assert!(Instant::now() < deadline, "a checkpoint is written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.redo.runs.stats().0, 2, "the checkpoint wrote h2 and h3 to a run");
        assert!(store.db.get("h2").expect("get").is_none(), "and not to sled");
        store.log(vec![kv("h4", Some("log4")), kv("h1", None)]).expect("log");
        let get = |k: &str| store.get(k.as_bytes()).expect("get").map(|v| String::from_utf8(v).expect("utf8"));
        assert_eq!(get("h1"), None, "removed in the log");
        assert_eq!(get("h2").as_deref(), Some("run2"));
        assert_eq!(get("h3").as_deref(), Some("run3"), "the run's over sled's");
        assert_eq!(get("h4").as_deref(), Some("log4"));
        let keys = |r: Vec<KeyValue>| {
            r.into_iter()
                .map(|(k, v)| format!("{}={}", k[1] - b'0', String::from_utf8(v).expect("utf8")))
                .collect::<Vec<_>>()
        };
        let all = b"h".to_vec()..b"i".to_vec();
        assert_eq!(keys(store.range(all.clone(), true, 2).expect("range")), vec!["4=log4", "3=run3"]);
        assert_eq!(keys(store.range(all, false, 10).expect("range")), vec!["2=run2", "3=run3", "4=log4"]);
    }
}
