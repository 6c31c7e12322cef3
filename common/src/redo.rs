//! A redo log in front of sled: the participant's durability point.
//!
//! sled copies a tree leaf for every insert, and that copy was most of a participant's CPU per transfer. Most
//! of what a participant writes lives for milliseconds (a prepared record, removed at commit) or is rewritten
//! by every transfer (a balance, the journal's counters). So a write group is made durable by appending it to
//! this log and fdatasyncing it, and only the history (finished records, journal entries) goes to sled at
//! once. The rest waits in memory, coalesced by key, until a checkpoint writes it to sled in one batch with a
//! mark saying which group it reaches, and flushes sled. Log files wholly behind a flushed mark are deleted.
//!
//! Recovery: sled keeps a prefix of the writes made to it (its log iterator stops at the first tear), and
//! every group's history writes go to sled before the mark of any checkpoint that covers the group. So sled
//! holds every group up to its mark, and replaying the log's groups after the mark, in order, rebuilds the
//! rest. Each op sets or removes a whole key, so replaying a group sled already partly has is harmless.
//!
//! Frame: payload length (u32), crc32 of group and payload (u32), group number (u64), all little-endian, then
//! the payload: op count (u32), and per op key length (u32), key, and `0` for a removal or `1`, value length
//! (u32), value. Files are named by their first group and only ever appended to; recovery starts a new file.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A key and its new value, or `None` to remove it.
pub type Op = (Vec<u8>, Option<Vec<u8>>);

const HEADER: usize = 16;
/// A new log file is started once the current one holds this many bytes.
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// The longest frame recovery reads: a longer length field is a torn or corrupt header.
pub const FRAME_BYTES_MAX: usize = 256 << 20;
/// A checkpoint starts once this much has been logged since the last one: it bounds the log replayed at a
/// restart and the disk it takes.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;
/// A checkpoint also starts once this many keys wait for one: it bounds the memory they take.
pub const DEFERRED_KEYS_MAX: usize = 100_000;
/// Where sled records the last group a checkpoint wrote (big-endian u64).
pub const MARK_KEY: &[u8] = b"mredo_applied";
const SUFFIX: &str = "redo";

/// How a key is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Written to sled at once: history, which sled's readers must see.
    Direct,
    /// Kept in memory until a checkpoint, the last value per key: read from sled only at start.
    Deferred,
    /// Like `Deferred`, for keys that are usually removed soon after they are set: a removal of a key that
    /// never reached sled cancels it, so sled never sees it.
    Transient,
}

#[derive(Debug, thiserror::Error)]
pub enum RedoError {
    #[error("redo log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("redo log: groups {expected} to {} are missing (sled holds every group to {after})", found - 1)]
    Gap { after: u64, expected: u64, found: u64 },
    #[error("redo log file {path} is damaged at byte {offset}, and a later file holds frames")]
    Damaged { path: PathBuf, offset: u64 },
    #[error("redo log: group {group} does not decode")]
    Decode { group: u64 },
    #[error("redo log: unreadable mark in the store")]
    Mark,
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> RedoError + '_ {
    move |source| RedoError::Io { path: path.to_owned(), source }
}

/// Appends one frame for `group` to `out`.
pub fn encode_frame(group: u64, ops: &[Op], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for (key, value) in ops {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        match value {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value);
            }
        }
    }
    let payload_len = (out.len() - start - HEADER) as u32;
    out[start + 8..start + 16].copy_from_slice(&group.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn decode_ops(mut payload: &[u8]) -> Option<Vec<Op>> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if input.len() < n {
            return None;
        }
        let (head, rest) = input.split_at(n);
        *input = rest;
        Some(head)
    }
    fn len(input: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(input, 4)?.try_into().ok()?) as usize)
    }
    let count = len(&mut payload)?;
    let mut ops = Vec::with_capacity(count.min(payload.len()));
    for _ in 0..count {
        let key_len = len(&mut payload)?;
        let key = take(&mut payload, key_len)?.to_vec();
        let value = match take(&mut payload, 1)?[0] {
            0 => None,
            1 => {
                let value_len = len(&mut payload)?;
                Some(take(&mut payload, value_len)?.to_vec())
            }
            _ => return None,
        };
        ops.push((key, value));
    }
    payload.is_empty().then_some(ops)
}

/// The whole frames at the start of `bytes`, as (group, payload), and where the first bad one starts (the
/// length of `bytes` when all are whole). Frames after a bad one are not read: a crash may tear only the tail.
fn frames(bytes: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let header = &bytes[at..at + HEADER];
        let payload_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let group = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if payload_len > FRAME_BYTES_MAX || bytes.len() - at - HEADER < payload_len {
            break;
        }
        let end = at + HEADER + payload_len;
        if crc32fast::hash(&bytes[at + 8..end]) != crc || out.last().is_some_and(|(g, _)| *g + 1 != group) {
            break;
        }
        out.push((group, &bytes[at + HEADER..end]));
        at = end;
    }
    (out, at)
}

/// The log files in `dir`, oldest first, by the first group each holds.
fn segments(dir: &Path) -> Result<VecDeque<u64>, RedoError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(SUFFIX) {
            continue;
        }
        if let Some(first) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()) {
            out.push(first);
        }
    }
    out.sort_unstable();
    Ok(out.into())
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.{SUFFIX}"))
}

fn sync_dir(dir: &Path) -> Result<(), RedoError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

/// Reads every group in the log after `after`, in order, handing each to `apply`; cuts a torn tail off.
/// Returns the last group seen (or `after`).
fn replay(dir: &Path, after: u64, mut apply: impl FnMut(u64, Vec<Op>) -> Result<(), RedoError>) -> Result<u64, RedoError> {
    let files = segments(dir)?;
    let mut last = after;
    let mut torn: Option<(PathBuf, u64)> = None;
    for first in files {
        let path = segment_path(dir, first);
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        let (whole, good) = frames(&bytes);
        if let Some((path, offset)) = &torn {
            if !whole.is_empty() {
                return Err(RedoError::Damaged { path: path.clone(), offset: *offset });
            }
        }
        for (group, payload) in whole {
            if group <= last {
                continue;
            }
            if group != last + 1 {
                return Err(RedoError::Gap { after, expected: last + 1, found: group });
            }
            apply(group, decode_ops(payload).ok_or(RedoError::Decode { group })?)?;
            last = group;
        }
        if good < bytes.len() && torn.is_none() {
            // Never fsynced, so never acknowledged: cut it off, so that nothing is appended after garbage.
            let file = OpenOptions::new().write(true).open(&path).map_err(io_error(&path))?;
            file.set_len(good as u64).and_then(|_| file.sync_all()).map_err(io_error(&path))?;
            torn = Some((path, good as u64));
        }
    }
    Ok(last)
}

/// Frames appended and not yet written to the file: the flusher takes them.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    first_group: u64,
}

/// What waits for the next checkpoint, and the numbering of groups.
struct Deferred {
    next_group: u64,
    keys: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// The transient keys sled holds (as of the last checkpoint).
    transient_in_sled: HashSet<Vec<u8>>,
    bytes_since_checkpoint: u64,
}

/// The log as the writers see it. Writers are serialised by the caller (the participant's state lock) or by
/// the `deferred` lock here; the flusher takes `pending` only.
pub struct Redo {
    db: sled::Db,
    classify: fn(&[u8]) -> Class,
    pending: Mutex<Pending>,
    deferred: Mutex<Deferred>,
    checkpoints: std::sync::mpsc::SyncSender<()>,
    /// The mark of the newest checkpoint written to sled, for the checkpoint thread to flush.
    written_mark: Arc<AtomicU64>,
    /// Checkpoints written to sled and flushed (for `/stats` and the benchmark).
    pub checkpoints_done: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves nothing half-written that a later writer could see as
    // whole (frames are appended whole, maps updated whole), so a poisoned lock is taken as is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The file end of the log, owned by the store's flusher thread.
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    len: u64,
    segments: Arc<Mutex<VecDeque<u64>>>,
    redo: Arc<Redo>,
}

fn read_mark(db: &sled::Db) -> Result<u64, RedoError> {
    match db.get(MARK_KEY)? {
        None => Ok(0),
        Some(bytes) => Ok(u64::from_be_bytes(bytes.as_ref().try_into().map_err(|_| RedoError::Mark)?)),
    }
}

impl Redo {
    /// Replays the log in `dir` into `db` (checkpointing it), and starts a new log file and the checkpoint
    /// thread. `log_file` is sled's file, fdatasynced after each checkpoint's flush.
    pub fn open(
        dir: &Path,
        db: &sled::Db,
        log_file: File,
        classify: fn(&[u8]) -> Class,
        transient_prefix: u8,
    ) -> Result<(Arc<Redo>, LogWriter), RedoError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mark = read_mark(db)?;
        let (checkpoints, requests) = std::sync::mpsc::sync_channel(1);
        let mut transient_in_sled = HashSet::new();
        for entry in db.scan_prefix([transient_prefix]) {
            transient_in_sled.insert(entry?.0.to_vec());
        }
        let redo = Arc::new(Redo {
            db: db.clone(),
            classify,
            pending: Mutex::new(Pending::default()),
            deferred: Mutex::new(Deferred {
                next_group: mark + 1,
                keys: HashMap::new(),
                transient_in_sled,
                bytes_since_checkpoint: 0,
            }),
            checkpoints,
            written_mark: Arc::new(AtomicU64::new(mark)),
            checkpoints_done: Arc::default(),
        });
        let last = replay(dir, mark, |group, ops| {
            let mut deferred = lock(&redo.deferred);
            deferred.next_group = group;
            redo.route(&mut deferred, ops)?;
            deferred.next_group = group + 1;
            Ok(())
        })?;
        {
            let mut deferred = lock(&redo.deferred);
            deferred.next_group = last + 1;
            if last > mark {
                redo.write_checkpoint(&mut deferred)?;
            }
        }
        // What recovery wrote must be durable before the log behind it goes.
        db.flush()?;
        log_file.sync_data().map_err(io_error(dir))?;
        let segments = Arc::new(Mutex::new(segments(dir)?));
        drop_through(dir, &segments, last)?;
        let first = last + 1;
        let path = segment_path(dir, first);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_error(&path))?;
        sync_dir(dir)?;
        let len = file.metadata().map_err(io_error(&path))?.len();
        {
            let mut segments = lock(&segments);
            if segments.back() != Some(&first) {
                segments.push_back(first);
            }
        }
        lock(&redo.pending).first_group = first;
        let writer = LogWriter { dir: dir.to_owned(), file, len, segments: segments.clone(), redo: redo.clone() };
        let checkpointer = Checkpointer {
            db: db.clone(),
            log_file,
            dir: dir.to_owned(),
            segments,
            mark: redo.written_mark.clone(),
            done: redo.checkpoints_done.clone(),
        };
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || checkpointer.run(requests))
            .map_err(io_error(Path::new("checkpoint thread")))?;
        Ok((redo, writer))
    }

    /// Logs one group of writes (durable at the next flush of the log) and applies it: history to sled at
    /// once, the rest kept for the next checkpoint.
    pub fn log(&self, ops: Vec<Op>) -> Result<(), RedoError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut deferred = lock(&self.deferred);
        let group = deferred.next_group;
        {
            let mut pending = lock(&self.pending);
            if pending.bytes.is_empty() {
                pending.first_group = group;
            }
            let before = pending.bytes.len();
            encode_frame(group, &ops, &mut pending.bytes);
            deferred.bytes_since_checkpoint += (pending.bytes.len() - before) as u64;
        }
        self.route(&mut deferred, ops)?;
        deferred.next_group = group + 1;
        if deferred.bytes_since_checkpoint >= CHECKPOINT_BYTES || deferred.keys.len() >= DEFERRED_KEYS_MAX {
            self.write_checkpoint(&mut deferred)?;
            // The checkpoint thread flushes sled and drops old log files; one request waiting is enough, as
            // each flush covers every checkpoint written before it.
            let _ = self.checkpoints.try_send(());
        }
        Ok(())
    }

    fn route(&self, deferred: &mut Deferred, ops: Vec<Op>) -> Result<(), RedoError> {
        for (key, value) in ops {
            match (self.classify)(&key) {
                Class::Direct => match value {
                    Some(value) => drop(self.db.insert(key, value)?),
                    None => drop(self.db.remove(key)?),
                },
                Class::Deferred => drop(deferred.keys.insert(key, value)),
                Class::Transient if value.is_none() && !deferred.transient_in_sled.contains(&key) => {
                    deferred.keys.remove(&key);
                }
                Class::Transient => drop(deferred.keys.insert(key, value)),
            }
        }
        Ok(())
    }

    /// Writes what waits, with the mark of the last group logged, as one sled batch (not yet flushed).
    fn write_checkpoint(&self, deferred: &mut Deferred) -> Result<(), RedoError> {
        let mut batch = sled::Batch::default();
        for (key, value) in deferred.keys.drain() {
            let transient = (self.classify)(&key) == Class::Transient;
            match value {
                Some(value) => {
                    batch.insert(key.as_slice(), value);
                    if transient {
                        deferred.transient_in_sled.insert(key);
                    }
                }
                None => {
                    batch.remove(key.as_slice());
                    deferred.transient_in_sled.remove(&key);
                }
            }
        }
        batch.insert(MARK_KEY, &(deferred.next_group - 1).to_be_bytes()[..]);
        self.db.apply_batch(batch)?;
        self.written_mark.store(deferred.next_group - 1, Ordering::Release);
        deferred.bytes_since_checkpoint = 0;
        Ok(())
    }

    /// Keys waiting for a checkpoint (bounded by [`DEFERRED_KEYS_MAX`]).
    pub fn deferred_keys(&self) -> usize {
        lock(&self.deferred).keys.len()
    }
}

impl LogWriter {
    /// Writes every frame appended so far to the file, and fdatasyncs it if `sync`. Starts a new file first
    /// when the current one is full.
    pub fn write(&mut self, sync: bool) -> Result<(), RedoError> {
        let (bytes, first_group) = {
            let mut pending = lock(&self.redo.pending);
            (std::mem::take(&mut pending.bytes), pending.first_group)
        };
        if bytes.is_empty() && !sync {
            return Ok(());
        }
        if !bytes.is_empty() && self.len >= SEGMENT_BYTES {
            let path = segment_path(&self.dir, first_group);
            // The old file's frames are all synced (every write below is, before the next).
            self.file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_error(&path))?;
            sync_dir(&self.dir)?;
            self.len = 0;
            lock(&self.segments).push_back(first_group);
        }
        self.file.write_all(&bytes).map_err(io_error(&self.dir))?;
        self.len += bytes.len() as u64;
        if sync {
            self.file.sync_data().map_err(io_error(&self.dir))?;
        }
        // Give the buffer back, so its capacity is reused rather than reallocated per group commit.
        let mut pending = lock(&self.redo.pending);
        if pending.bytes.is_empty() && bytes.capacity() <= 4 * SEGMENT_BYTES as usize {
            let mut bytes = bytes;
            bytes.clear();
            pending.bytes = bytes;
        }
        Ok(())
    }
}

/// Deletes the log files whose groups are all at or before `mark`; never the newest.
fn drop_through(dir: &Path, segments: &Mutex<VecDeque<u64>>, mark: u64) -> Result<(), RedoError> {
    let mut segments = lock(segments);
    let mut dropped = false;
    while segments.len() > 1 && segments[1] <= mark + 1 {
        let first = segments.pop_front().expect("len > 1");
        let path = segment_path(dir, first);
        fs::remove_file(&path).map_err(io_error(&path))?;
        dropped = true;
    }
    if dropped {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Flushes sled after checkpoints (sled's flush, then an fdatasync of its file), then drops the log files the
/// flushed mark covers. A failure stops the process, as a failed group commit does: recovery starts from disk.
struct Checkpointer {
    db: sled::Db,
    log_file: File,
    dir: PathBuf,
    segments: Arc<Mutex<VecDeque<u64>>>,
    mark: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
}

impl Checkpointer {
    fn run(self, requests: std::sync::mpsc::Receiver<()>) {
        while let Ok(()) = requests.recv() {
            // Read before the flush: the checkpoint it names was applied to sled before it was published.
            let mark = self.mark.load(Ordering::Acquire);
            let result = self
                .db
                .flush()
                .map_err(RedoError::from)
                .and_then(|_| self.log_file.sync_data().map_err(io_error(&self.dir)))
                .and_then(|_| drop_through(&self.dir, &self.segments, mark));
            if let Err(error) = result {
                tracing::error!(%error, "checkpoint failed: stopping so recovery starts from what is on disk");
                std::process::abort();
            }
            self.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, value: Option<&str>) -> Op {
        (key.as_bytes().to_vec(), value.map(|v| v.as_bytes().to_vec()))
    }

    fn classify(key: &[u8]) -> Class {
        match key.first() {
            Some(b'a') => Class::Deferred,
            Some(b'p') => Class::Transient,
            _ => Class::Direct,
        }
    }

    /// sled, once the checkpoint thread of an earlier open in this process has let go of it.
    fn sled(dir: &Path) -> sled::Db {
        for _ in 0..100 {
            if let Ok(db) = sled::Config::new().path(dir.join("store")).open() {
                return db;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("sled does not open");
    }

    fn open(dir: &Path) -> (sled::Db, Arc<Redo>, LogWriter) {
        let db = sled(dir);
        let file = File::open(dir.join("store").join("db")).expect("sled's file");
        let (redo, writer) = Redo::open(&dir.join("redo"), &db, file, classify, b'p').expect("redo opens");
        (db, redo, writer)
    }

    fn get(db: &sled::Db, key: &str) -> Option<String> {
        db.get(key).expect("get").map(|v| String::from_utf8(v.to_vec()).expect("utf8"))
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_is_cut() {
        let mut bytes = Vec::new();
        encode_frame(7, &[op("a1", Some("x")), op("p2", None)], &mut bytes);
        encode_frame(8, &[], &mut bytes);
        let whole_len = bytes.len();
        encode_frame(9, &[op("f3", Some("y"))], &mut bytes);
        for cut in whole_len..bytes.len() {
            let (whole, good) = frames(&bytes[..cut]);
            assert_eq!(whole.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![7, 8], "cut at {cut}");
            assert_eq!(good, whole_len);
        }
        let (whole, good) = frames(&bytes);
        assert_eq!((whole.len(), good), (3, bytes.len()));
        assert_eq!(decode_ops(whole[0].1), Some(vec![op("a1", Some("x")), op("p2", None)]));
        let mut flipped = bytes.clone();
        flipped[whole_len + HEADER + 2] ^= 1;
        assert_eq!(frames(&flipped).1, whole_len, "a damaged frame ends the log");
    }

    #[test]
    fn deferred_keys_reach_sled_only_at_a_checkpoint_and_replay_restores_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (db, redo, mut writer) = open(dir.path());
            redo.log(vec![op("a1", Some("10")), op("p1", Some("held")), op("f0", Some("done"))]).expect("log");
            redo.log(vec![op("a1", Some("20")), op("p1", None), op("j1", Some("entry"))]).expect("log");
            redo.log(vec![op("p2", Some("held"))]).expect("log");
            writer.write(true).expect("write");
            assert_eq!(get(&db, "f0").as_deref(), Some("done"), "history goes to sled at once");
            assert_eq!(get(&db, "a1"), None, "a balance waits for a checkpoint");
            assert_eq!(redo.deferred_keys(), 2, "p1 was set and removed before any checkpoint: gone");
            // Dropped without a checkpoint: a crash.
        }
        let (db, redo, _writer) = open(dir.path());
        assert_eq!(get(&db, "a1").as_deref(), Some("20"));
        assert_eq!(get(&db, "p1"), None);
        assert_eq!(get(&db, "p2").as_deref(), Some("held"));
        assert_eq!(get(&db, "j1").as_deref(), Some("entry"));
        assert_eq!(read_mark(&db).expect("mark"), 3);
        assert_eq!(redo.deferred_keys(), 0);
        // The transient key that reached sled is removed from it by a later removal.
        redo.log(vec![op("p2", None)]).expect("log");
        let mut deferred = lock(&redo.deferred);
        redo.write_checkpoint(&mut deferred).expect("checkpoint");
        assert_eq!(get(&db, "p2"), None);
        assert_eq!(read_mark(&db).expect("mark"), 4);
    }

    #[test]
    fn unwritten_groups_are_lost_whole_and_numbering_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (_db, redo, mut writer) = open(dir.path());
            redo.log(vec![op("a1", Some("1"))]).expect("log");
            writer.write(true).expect("write");
            redo.log(vec![op("a1", Some("2"))]).expect("log");
            // Never written: the crash comes first.
        }
        {
            let (db, redo, mut writer) = open(dir.path());
            assert_eq!(get(&db, "a1").as_deref(), Some("1"));
            redo.log(vec![op("a1", Some("3"))]).expect("log");
            writer.write(true).expect("write");
        }
        let (db, _redo, _writer) = open(dir.path());
        assert_eq!(get(&db, "a1").as_deref(), Some("3"));
    }

    #[test]
    fn a_torn_file_is_cut_and_a_gap_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (_db, redo, mut writer) = open(dir.path());
            redo.log(vec![op("a1", Some("1"))]).expect("log");
            redo.log(vec![op("a1", Some("2"))]).expect("log");
            writer.write(true).expect("write");
        }
        let redo_dir = dir.path().join("redo");
        let file = segment_path(&redo_dir, 1);
        let len = fs::metadata(&file).expect("file").len();
        OpenOptions::new().write(true).open(&file).expect("open").set_len(len - 3).expect("tear");
        {
            let (db, _redo, _writer) = open(dir.path());
            assert_eq!(get(&db, "a1").as_deref(), Some("1"), "the torn second group is gone, the first is not");
        }
        // A log that skips groups past sled's mark has lost acknowledged writes: refuse to start.
        let mut bytes = Vec::new();
        encode_frame(9, &[op("a1", Some("9"))], &mut bytes);
        fs::write(segment_path(&redo_dir, 9), bytes).expect("write");
        let db = sled(dir.path());
        let sled_file = File::open(dir.path().join("store").join("db")).expect("file");
        let result = Redo::open(&redo_dir, &db, sled_file, classify, b'p');
        assert!(matches!(result, Err(RedoError::Gap { .. })), "{:?}", result.err());
    }

    #[test]
    fn checkpoints_drop_old_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, redo, mut writer) = open(dir.path());
        let value = "v".repeat(64 * 1024);
        for i in 0..400u32 {
            redo.log(vec![op("a1", Some(&value)), op(&format!("f{i}"), Some("x"))]).expect("log");
            writer.write(true).expect("write");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while redo.checkpoints_done.load(Ordering::Relaxed) < 3 {
            assert!(std::time::Instant::now() < deadline, "checkpoints ran");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let files = segments(&dir.path().join("redo")).expect("list").len();
        assert!(files <= 2, "{files} log files left after checkpoints (26 MB logged, 8 MB per file)");
        assert!(read_mark(&db).expect("mark") >= 100);
    }
}
