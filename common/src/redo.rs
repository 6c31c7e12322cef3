//! A redo log in front of sled: the participant's durability point.
//!
//! sled copies a tree leaf for every insert, and that copy was most of a participant's CPU per transfer. Most
//! of what a participant writes lives for milliseconds (a prepared record, removed at commit) or is rewritten
//! by every transfer (a balance, the journal's counters). So a write group is made durable by appending it to
//! this log and fdatasyncing it, and reaches sled only at a checkpoint: every 4 MiB of log, what the groups
//! since the last checkpoint left (the last value of each key; a transient key set and removed in between
//! never reaches sled) is written to sled by a thread of its own, with a mark naming the last group it covers,
//! and sled is flushed. Log files wholly behind a flushed mark are deleted. Until then readers see those
//! writes through [`Redo::get`] and [`Redo::overlay_range`], ahead of sled.
//!
//! Recovery: sled holds every group up to its mark, and some of those after it, each key as some group left
//! it: a checkpoint is written only once every group it covers is durable in the log, and the mark goes last.
//! Replaying the log's groups after the mark, in order, rebuilds the rest. Each op sets or removes a whole
//! key, so replaying a group sled already partly has is harmless. sled never holds a write of a group that
//! is not durable in the log, so a crash can never keep half of a group.
//!
//! Frame: payload length (u32), crc32 of group and payload (u32), group number (u64), all little-endian, then
//! the payload: op count (u32), and per op key length (u32), key, and `0` for a removal or `1`, value length
//! (u32), value. Files are named by their first group and only ever appended to; recovery starts a new file.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::runs::{self, RunError, Runs};

/// A key and its new value, or `None` to remove it.
pub type Op = (Vec<u8>, Option<Vec<u8>>);

const HEADER: usize = 16;
/// A new log file is started once the current one holds this many bytes.
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// The longest frame recovery reads: a longer length field is a torn or corrupt header.
pub const FRAME_BYTES_MAX: usize = 256 << 20;
/// A checkpoint starts once this much has been logged since the last one: it bounds the log replayed at a
/// restart, the disk it takes, and the writes held in memory.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;
/// A checkpoint also starts once this many keys wait for one.
pub const DEFERRED_KEYS_MAX: usize = 100_000;
/// Past this many keys waiting while a checkpoint is being written, writers wait for it: memory stays bounded
/// even if sled falls behind.
pub const OVERLAY_KEYS_MAX: usize = 4 * DEFERRED_KEYS_MAX;
/// The most keys that wait for sled, give or take one group's: those since the last checkpoint, and those of
/// the checkpoint being written, each at most [`OVERLAY_KEYS_MAX`].
pub const WAITING_KEYS_MAX: usize = 2 * OVERLAY_KEYS_MAX;
/// Where sled records the last group a checkpoint wrote (big-endian u64).
pub const MARK_KEY: &[u8] = b"mredo_applied";
/// Where sled records which run files hold the history keys ([`crate::runs`]), written with the mark.
pub const RUNS_KEY: &[u8] = b"mredo_runs";
const SUFFIX: &str = "redo";

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
    #[error(transparent)]
    Run(#[from] RunError),
}

/// What kinds of keys a store has, by their first byte.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyClasses {
    /// Keys that usually live for less than a checkpoint (see the module's text).
    pub transient: Option<u8>,
    /// Keys written once per transfer and kept forever: checkpoints write them to run files, not to sled.
    pub history: &'static [u8],
}

impl KeyClasses {
    pub fn is_history(&self, key: &[u8]) -> bool {
        key.first().is_some_and(|b| self.history.contains(b))
    }

    /// Whether a history key may lie in `range`.
    pub fn may_hold_history(&self, range: &std::ops::Range<Vec<u8>>) -> bool {
        self.history.iter().any(|p| {
            // Keys starting with `p` lie in [p] .. [p + 1] (to the end, for 0xff).
            let below_next = p.checked_add(1).is_none_or(|next| range.start.as_slice() < &[next][..]);
            below_next && &[*p][..] < range.end.as_slice()
        })
    }
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
fn replay(
    dir: &Path,
    after: u64,
    mut apply: impl FnMut(u64, Vec<Op>) -> Result<(), RedoError>,
) -> Result<u64, RedoError> {
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
        // Log files are made ahead, full of zeros (so that an fdatasync need not update the file's size): a
        // zero tail is room never written, anything else a torn write.
        if good < bytes.len() && bytes[good..].iter().any(|b| *b != 0) && torn.is_none() {
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

/// A key's value as the log's groups left it: `None` if removed. A hash map: every write inserts and every
/// point read looks up here, and an ordered map's key comparisons were a tenth of a node's CPU; the few
/// range reads and the checkpoint's run sort what they take.
type Overlay = HashMap<Vec<u8>, Option<Vec<u8>>>;

/// Keys of the overlay in order, with their values, as [`Redo::overlay_range`] returns them.
pub type SortedOverlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Writes not yet in sled: those since the last checkpoint, and those of the checkpoint being written.
struct Deferred {
    next_group: u64,
    current: Overlay,
    /// The checkpoint the checkpoint thread is writing to sled: every group through `frozen_through`.
    frozen: Option<Arc<Overlay>>,
    frozen_through: u64,
    /// The transient keys sled holds once the frozen checkpoint is written.
    transient_in_sled: HashSet<Vec<u8>>,
    bytes_since_checkpoint: u64,
}

/// The log as the writers and readers see it. Writers are serialised by the `deferred` lock (and by the
/// participant's state lock before it); the flusher takes `pending` only.
pub struct Redo {
    pub(crate) classes: KeyClasses,
    /// The history keys that checkpoints have written.
    pub runs: Runs,
    pending: Mutex<Pending>,
    deferred: Mutex<Deferred>,
    /// Signalled when the checkpoint thread has written a frozen checkpoint to sled.
    thawed: Condvar,
    wake: SyncSender<()>,
    wake_rx: Mutex<Option<Receiver<()>>>,
    /// Wakes the merging thread after each checkpoint.
    merge_wake: SyncSender<()>,
    merge_wake_rx: Mutex<Option<Receiver<()>>>,
    segments: Arc<Mutex<VecDeque<u64>>>,
    dir: PathBuf,
    db: sled::Db,
    /// Checkpoints written to sled and flushed (for `/stats` and the benchmark).
    pub checkpoints_done: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves nothing half-written that a later writer could see as
    // whole (frames are appended whole, maps updated whole), so a poisoned lock is taken as is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The file end of the log, owned by the store's flusher thread.
pub struct LogWriter {
    file: File,
    /// Bytes of frames in `file`, where the next one goes (the file may be longer: zeros made ahead).
    len: u64,
    redo: Arc<Redo>,
}

fn read_mark(db: &sled::Db) -> Result<u64, RedoError> {
    match db.get(MARK_KEY)? {
        None => Ok(0),
        Some(bytes) => Ok(u64::from_be_bytes(bytes.as_ref().try_into().map_err(|_| RedoError::Mark)?)),
    }
}

impl Redo {
    /// Replays the log in `dir` after sled's mark, writes it as a checkpoint (to sled and, for the history
    /// keys, to a run file in `runs_dir`) and flushes it (`log_file`, sled's file, is fdatasynced after each
    /// of its flushes), and starts a new log file.
    pub fn open(
        dir: &Path,
        runs_dir: &Path,
        db: &sled::Db,
        log_file: &File,
        classes: KeyClasses,
    ) -> Result<(Arc<Redo>, LogWriter), RedoError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mark = read_mark(db)?;
        let manifest = match db.get(RUNS_KEY)? {
            None => Vec::new(),
            Some(bytes) => runs::decode_manifest(&bytes)?,
        };
        let runs = Runs::open(runs_dir, &manifest)?;
        let mut transient_in_sled = HashSet::new();
        if let Some(prefix) = classes.transient {
            for entry in db.scan_prefix([prefix]) {
                transient_in_sled.insert(entry?.0.to_vec());
            }
        }
        let (wake, wake_rx) = sync_channel(1);
        let (merge_wake, merge_wake_rx) = sync_channel(1);
        let redo = Arc::new(Redo {
            classes,
            runs,
            pending: Mutex::new(Pending::default()),
            deferred: Mutex::new(Deferred {
                next_group: mark + 1,
                current: Overlay::new(),
                frozen: None,
                frozen_through: mark,
                transient_in_sled,
                bytes_since_checkpoint: 0,
            }),
            thawed: Condvar::new(),
            wake,
            wake_rx: Mutex::new(Some(wake_rx)),
            merge_wake,
            merge_wake_rx: Mutex::new(Some(merge_wake_rx)),
            segments: Arc::new(Mutex::new(VecDeque::new())),
            dir: dir.to_owned(),
            db: db.clone(),
            checkpoints_done: AtomicU64::new(0),
        });
        let last = replay(dir, mark, |group, ops| {
            let mut deferred = lock(&redo.deferred);
            redo.route(&mut deferred, ops);
            deferred.next_group = group + 1;
            Ok(())
        })?;
        // Every replayed group is durable (it was read from the log), so the checkpoint may be written now.
        let frozen = {
            let mut deferred = lock(&redo.deferred);
            deferred.next_group = last + 1;
            redo.freeze(&mut deferred)
        };
        if let Some((overlay, through)) = frozen {
            redo.write_checkpoint(&overlay, through)?;
            lock(&redo.deferred).frozen = None;
        }
        db.flush()?;
        log_file.sync_data().map_err(io_error(dir))?;
        *lock(&redo.segments) = segments(dir)?;
        drop_through(dir, &redo.segments, last)?;
        make_spare(dir)?;
        let first = last + 1;
        // Replay read any frames this file had (there were none, or `last` would reach `first`).
        let file = new_segment(dir, &segment_path(dir, first))?;
        {
            let mut segments = lock(&redo.segments);
            if segments.back() != Some(&first) {
                segments.push_back(first);
            }
        }
        lock(&redo.pending).first_group = first;
        Ok((redo.clone(), LogWriter { file, len: 0, redo }))
    }

    /// Starts the checkpoint thread. `sync` makes every group logged so far durable (the store's group
    /// commit); `log_file` is sled's file.
    pub fn start_checkpoints(
        self: &Arc<Redo>,
        log_file: File,
        sync: impl Fn() -> bool + Send + 'static,
    ) -> Result<(), RedoError> {
        let Some(wake) = lock(&self.wake_rx).take() else { return Ok(()) };
        let Some(merge_wake) = lock(&self.merge_wake_rx).take() else { return Ok(()) };
        let merge_log_file = log_file.try_clone().map_err(io_error(&self.dir))?;
        // Weak, so that the threads end (their channels close) once the store is dropped.
        let redo = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while let Ok(()) = wake.recv() {
                    let Some(redo) = redo.upgrade() else { return };
                    if !redo.checkpoint(&log_file, &sync) {
                        return;
                    }
                }
            })
            .map_err(io_error(Path::new("checkpoint thread")))?;
        // Merges run on a thread of their own: merging the larger tiers takes seconds, and checkpoints (and
        // so the writers, once the overlay is full) must not wait for them.
        let redo = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("run-merge".into())
            .spawn(move || {
                while let Ok(()) = merge_wake.recv() {
                    let Some(redo) = redo.upgrade() else { return };
                    if let Err(error) = redo.merge_runs(&merge_log_file) {
                        tracing::error!(%error, "merging run files failed: stopping so recovery starts from what is on disk");
                        std::process::abort();
                    }
                }
            })
            .map(drop)
            .map_err(io_error(Path::new("run-merge thread")))
    }

    /// Logs one group of writes: durable at the next flush of the log, seen by [`Redo::get`] and
    /// [`Redo::overlay_range`] at once, in sled after the next checkpoint.
    pub fn log(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let mut deferred = lock(&self.deferred);
        // Memory stays bounded: past this, wait for the checkpoint being written (it needs no lock held here).
        while deferred.frozen.is_some() && deferred.current.len() >= OVERLAY_KEYS_MAX {
            deferred = self.thawed.wait(deferred).unwrap_or_else(|p| p.into_inner());
        }
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
        self.route(&mut deferred, ops);
        deferred.next_group = group + 1;
        let due = deferred.bytes_since_checkpoint >= CHECKPOINT_BYTES || deferred.current.len() >= DEFERRED_KEYS_MAX;
        if due && deferred.frozen.is_none() {
            self.freeze(&mut deferred);
            let _ = self.wake.try_send(());
        }
    }

    fn route(&self, deferred: &mut Deferred, ops: Vec<Op>) {
        for (key, value) in ops {
            let transient = self.classes.transient.is_some() && key.first() == self.classes.transient.as_ref();
            if transient && value.is_none() && !deferred.transient_in_sled.contains(&key) {
                // Set and removed before it reached sled: sled never sees it.
                deferred.current.remove(&key);
            } else {
                deferred.current.insert(key, value);
            }
        }
    }

    /// Hands what waits to the checkpoint thread (if anything does), as of the last group logged.
    fn freeze(&self, deferred: &mut Deferred) -> Option<(Arc<Overlay>, u64)> {
        let through = deferred.next_group - 1;
        if deferred.current.is_empty() && through == deferred.frozen_through {
            return None;
        }
        let overlay = Arc::new(std::mem::take(&mut deferred.current));
        if let Some(prefix) = self.classes.transient {
            for (key, value) in overlay.iter().filter(|(key, _)| key.first() == Some(&prefix)) {
                match value {
                    Some(_) => deferred.transient_in_sled.insert(key.clone()),
                    None => deferred.transient_in_sled.remove(key),
                };
            }
        }
        deferred.frozen = Some(overlay.clone());
        deferred.frozen_through = through;
        deferred.bytes_since_checkpoint = 0;
        Some((overlay, through))
    }

    /// Writes a frozen checkpoint: its history keys as a new run file (fsynced, and seen by readers from
    /// then on), the rest to sled one by one, then the manifest of runs and the mark. Not a sled batch: that
    /// takes sled's lock against every reader for its length. Every group it covers must be durable in the
    /// log: a crash may keep any prefix of these sled writes (sled's log is read back to its first tear), and
    /// replay from the previous mark redoes them all (a run it wrote and no durable manifest names is deleted
    /// at open).
    fn write_checkpoint(&self, overlay: &Overlay, through: u64) -> Result<(), RedoError> {
        let mut history: Vec<_> = overlay.iter().filter(|(k, _)| self.classes.is_history(k)).collect();
        history.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let count = history.len();
        if count > 0 {
            if let Some(run) = self.runs.write(history.into_iter().map(|(k, v)| (k.clone(), v.clone())), count)? {
                self.runs.add(run);
            }
        }
        for (key, value) in overlay.iter().filter(|(k, _)| !self.classes.is_history(k)) {
            match value {
                Some(value) => drop(self.db.insert(key.as_slice(), value.as_slice())?),
                None => drop(self.db.remove(key.as_slice())?),
            }
        }
        if count > 0 {
            self.runs.write_manifest(|manifest| self.db.insert(RUNS_KEY, manifest).map(drop))?;
        }
        self.db.insert(MARK_KEY, &through.to_be_bytes()[..])?;
        Ok(())
    }

    /// The merging thread's work: merges runs while a tier is full. Each merged run goes live, then a manifest
    /// naming it is made durable (sled flushed, `log_file` fdatasynced), then the runs it replaces are deleted.
    fn merge_runs(&self, log_file: &File) -> Result<(), RedoError> {
        while let Some((merged, replaced)) = self.runs.merge()? {
            self.runs.replace(merged, &replaced);
            self.runs.write_manifest(|manifest| self.db.insert(RUNS_KEY, manifest).map(drop))?;
            self.db.flush()?;
            log_file.sync_data().map_err(io_error(&self.dir))?;
            self.runs.delete(&replaced)?;
        }
        Ok(())
    }

    /// The checkpoint thread's work when woken: if a checkpoint is frozen, make its groups durable, write it
    /// to sled, flush sled (and fdatasync its file) and drop the log files it covers; then make a spare log
    /// file if none is ready. A failure stops the process, as a failed group commit does: recovery starts from
    /// what is on disk. False once the store is shutting down.
    fn checkpoint(&self, log_file: &File, sync: &impl Fn() -> bool) -> bool {
        {
            let frozen = {
                let deferred = lock(&self.deferred);
                deferred.frozen.clone().map(|overlay| (overlay, deferred.frozen_through))
            };
            let mut result = Ok(());
            let done = frozen.is_some();
            if let Some((overlay, through)) = frozen {
                if !sync() {
                    return false;
                }
                result = self
                    .write_checkpoint(&overlay, through)
                    .and_then(|_| self.db.flush().map_err(RedoError::from))
                    .and_then(|_| log_file.sync_data().map_err(io_error(&self.dir)))
                    .and_then(|_| drop_through(&self.dir, &self.segments, through));
                lock(&self.deferred).frozen = None;
                self.thawed.notify_all();
                let _ = self.merge_wake.try_send(());
            }
            if let Err(error) = result.and_then(|_| make_spare(&self.dir)) {
                tracing::error!(%error, "checkpoint failed: stopping so recovery starts from what is on disk");
                std::process::abort();
            }
            if done {
                // Last, so that a count seen means that checkpoint's work is all done.
                self.checkpoints_done.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    /// The value the log gives `key` ahead of the runs and sled: `Some(None)` if removed, `None` if they have
    /// the answer.
    pub fn get(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let deferred = lock(&self.deferred);
        if let Some(value) = deferred.current.get(key) {
            return Some(value.clone());
        }
        deferred.frozen.as_ref().and_then(|frozen| frozen.get(key).cloned())
    }

    /// The keys in `range` that the log has ahead of sled, with their values (`None`: removed), newest
    /// checkpoint winning.
    pub fn overlay_range(&self, range: std::ops::Range<Vec<u8>>) -> SortedOverlay {
        let deferred = lock(&self.deferred);
        let within = |(k, v): (&Vec<u8>, &Option<Vec<u8>>)| range.contains(k).then(|| (k.clone(), v.clone()));
        let mut out: SortedOverlay = match &deferred.frozen {
            Some(frozen) => frozen.iter().filter_map(within).collect(),
            None => SortedOverlay::new(),
        };
        out.extend(deferred.current.iter().filter_map(within));
        out
    }

    /// Keys waiting for sled (bounded by [`WAITING_KEYS_MAX`]).
    pub fn deferred_keys(&self) -> usize {
        let deferred = lock(&self.deferred);
        deferred.current.len() + deferred.frozen.as_ref().map_or(0, |f| f.len())
    }
}

impl LogWriter {
    /// Writes every frame appended so far to the file, and fdatasyncs it if `sync`. Starts a new file first
    /// when the current one is full.
    pub fn write(&mut self, sync: bool) -> Result<(), RedoError> {
        let dir = &self.redo.dir;
        let (bytes, first_group) = {
            let mut pending = lock(&self.redo.pending);
            (std::mem::take(&mut pending.bytes), pending.first_group)
        };
        if bytes.is_empty() && !sync {
            return Ok(());
        }
        if !bytes.is_empty() && self.len >= SEGMENT_BYTES {
            let path = segment_path(dir, first_group);
            // The old file's frames are all synced (every write below is, before the next).
            self.file = new_segment(dir, &path)?;
            self.len = 0;
            lock(&self.redo.segments).push_back(first_group);
            // The spare is used up: the checkpoint thread makes the next one.
            let _ = self.redo.wake.try_send(());
        }
        self.file.write_all_at(&bytes, self.len).map_err(io_error(dir))?;
        self.len += bytes.len() as u64;
        if sync {
            self.file.sync_data().map_err(io_error(dir))?;
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

/// The next log file, made ahead of time and full of zeros (see [`make_spare`]).
const SPARE: &str = "spare.tmp";
const SPARE_PARTIAL: &str = "spare.partial";

/// Starts the log file `path`: the spare renamed into place if there is one, else an empty file.
fn new_segment(dir: &Path, path: &Path) -> Result<File, RedoError> {
    match fs::rename(dir.join(SPARE), path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => drop(File::create(path).map_err(io_error(path))?),
        Err(e) => return Err(io_error(path)(e)),
    }
    sync_dir(dir)?;
    OpenOptions::new().read(true).write(true).open(path).map_err(io_error(path))
}

/// Writes a zero-filled spare log file unless one is ready: writing frames over blocks that exist costs an
/// fdatasync less than appending, which must also make the new file size durable (0.35 against 0.5 ms per
/// group commit at 64 clients here).
fn make_spare(dir: &Path) -> Result<(), RedoError> {
    if dir.join(SPARE).exists() {
        return Ok(());
    }
    let partial = dir.join(SPARE_PARTIAL);
    let mut file = File::create(&partial).map_err(io_error(&partial))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..SEGMENT_BYTES >> 20 {
        file.write_all(&zeros).map_err(io_error(&partial))?;
    }
    file.sync_all().map_err(io_error(&partial))?;
    // Out of the page cache: the kernel caches a file written in big runs in big folios, and a small write
    // into one later dirties (and writes back) the whole folio, up to 2 MiB per group commit.
    // SAFETY: an fadvise on an open descriptor, which it only reads.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_DONTNEED) };
    fs::rename(&partial, dir.join(SPARE)).map_err(io_error(&partial))?;
    sync_dir(dir)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, value: Option<&str>) -> Op {
        (key.as_bytes().to_vec(), value.map(|v| v.as_bytes().to_vec()))
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

    struct Opened {
        db: sled::Db,
        redo: Arc<Redo>,
        writer: Arc<Mutex<LogWriter>>,
    }

    impl Opened {
        fn write(&self) {
            lock(&self.writer).write(true).expect("write");
        }

        fn get(&self, key: &str) -> Option<String> {
            let value = match self.redo.get(key.as_bytes()) {
                Some(value) => value,
                None => match self.redo.runs.get(key.as_bytes()).expect("runs readable") {
                    Some(value) => value,
                    None => self.db.get(key).expect("get").map(|v| v.to_vec()),
                },
            };
            value.map(|v| String::from_utf8(v).expect("utf8"))
        }
    }

    /// `p` keys are transient and `h` keys history, as a participant's prepared and finished records are.
    const CLASSES: KeyClasses = KeyClasses { transient: Some(b'p'), history: b"h" };

    /// Opens the store in `dir` with its checkpoint thread, whose sync writes the log as the store's would.
    fn open(dir: &Path) -> Opened {
        let db = sled(dir);
        let sled_file = || File::open(dir.join("store").join("db")).expect("sled's file");
        let (redo, writer) =
            Redo::open(&dir.join("redo"), &dir.join("runs"), &db, &sled_file(), CLASSES).expect("redo opens");
        let writer = Arc::new(Mutex::new(writer));
        let weak = Arc::downgrade(&writer);
        let sync = move || weak.upgrade().is_some_and(|w| lock(&w).write(true).is_ok());
        redo.start_checkpoints(sled_file(), sync).expect("checkpoint thread");
        Opened { db, redo, writer }
    }

    fn in_sled(db: &sled::Db, key: &str) -> bool {
        db.get(key).expect("get").is_some()
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
    fn writes_reach_sled_only_at_a_checkpoint_and_replay_restores_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let s = open(dir.path());
            s.redo.log(vec![op("a1", Some("10")), op("p1", Some("held")), op("f0", Some("done"))]);
            s.redo.log(vec![op("a1", Some("20")), op("p1", None), op("j1", Some("entry"))]);
            s.redo.log(vec![op("p2", Some("held"))]);
            s.write();
            assert_eq!(s.get("f0").as_deref(), Some("done"), "readers see the log ahead of sled");
            assert_eq!(s.get("a1").as_deref(), Some("20"));
            assert!(!in_sled(&s.db, "f0") && !in_sled(&s.db, "a1"), "sled waits for a checkpoint");
            assert_eq!(s.redo.deferred_keys(), 4, "p1 was set and removed before any checkpoint: gone");
            // Dropped without a checkpoint: a crash.
        }
        let s = open(dir.path());
        for (key, value) in [("a1", Some("20")), ("p1", None), ("p2", Some("held")), ("j1", Some("entry"))] {
            assert_eq!(
                s.db.get(key).expect("get").map(|v| String::from_utf8(v.to_vec()).expect("utf8")).as_deref(),
                value
            );
        }
        assert_eq!(read_mark(&s.db).expect("mark"), 3);
        assert_eq!(s.redo.deferred_keys(), 0);
        // A transient key that reached sled is removed from it by a later removal.
        s.redo.log(vec![op("p2", None)]);
        let frozen = s.redo.freeze(&mut lock(&s.redo.deferred)).expect("something to write");
        s.write();
        s.redo.write_checkpoint(&frozen.0, frozen.1).expect("checkpoint");
        assert!(!in_sled(&s.db, "p2"));
        assert_eq!(read_mark(&s.db).expect("mark"), 4);
    }

    #[test]
    fn unwritten_groups_are_lost_whole_and_numbering_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let s = open(dir.path());
            s.redo.log(vec![op("a1", Some("1"))]);
            s.write();
            s.redo.log(vec![op("a1", Some("2")), op("f1", Some("x"))]);
            // Never written: the crash comes first.
        }
        {
            let s = open(dir.path());
            assert_eq!(s.get("a1").as_deref(), Some("1"));
            assert_eq!(s.get("f1"), None, "no part of the lost group survives");
            s.redo.log(vec![op("a1", Some("3"))]);
            s.write();
        }
        let s = open(dir.path());
        assert_eq!(s.get("a1").as_deref(), Some("3"));
    }

    #[test]
    fn a_torn_file_is_cut_and_a_gap_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let s = open(dir.path());
            s.redo.log(vec![op("a1", Some("1"))]);
            s.redo.log(vec![op("a1", Some("2"))]);
            s.write();
        }
        let redo_dir = dir.path().join("redo");
        let file = segment_path(&redo_dir, 1);
        let frames_end = frames(&fs::read(&file).expect("read")).1 as u64;
        OpenOptions::new().write(true).open(&file).expect("open").set_len(frames_end - 3).expect("tear");
        {
            let s = open(dir.path());
            assert_eq!(s.get("a1").as_deref(), Some("1"), "the torn second group is gone, the first is not");
        }
        // A log that skips groups past sled's mark has lost acknowledged writes: refuse to start.
        let mut bytes = Vec::new();
        encode_frame(9, &[op("a1", Some("9"))], &mut bytes);
        fs::write(segment_path(&redo_dir, 9), bytes).expect("write");
        let db = sled(dir.path());
        let sled_file = File::open(dir.path().join("store").join("db")).expect("file");
        let result = Redo::open(&redo_dir, &dir.path().join("runs"), &db, &sled_file, CLASSES);
        assert!(matches!(result, Err(RedoError::Gap { .. })), "{:?}", result.err());
    }

    #[test]
    fn checkpoints_reach_sled_drop_old_files_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = open(dir.path());
        let value = "v".repeat(64 * 1024);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        for i in 0..400u32 {
            // Checkpoints make their own groups durable: nothing here syncs.
            s.redo.log(vec![op("a1", Some(&value)), op(&format!("f{i:03}"), Some("x"))]);
            while lock(&s.redo.deferred).frozen.is_some() {
                assert!(std::time::Instant::now() < deadline, "checkpoints end");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        assert!(s.redo.checkpoints_done.load(Ordering::Relaxed) >= 5);
        assert!(in_sled(&s.db, "f000") && in_sled(&s.db, "f300"), "checkpoints wrote to sled");
        let files = segments(&dir.path().join("redo")).expect("list").len();
        assert!(files <= 3, "{files} log files left after checkpoints (26 MB logged, 4 MB per file)");
        s.write();
        drop(s);
        // The files left end in zeros made ahead: read as room never written, not as damage.
        let s = open(dir.path());
        assert_eq!(s.get("f399").as_deref(), Some("x"));
        assert_eq!(s.get("a1"), Some(value));
        assert_eq!(read_mark(&s.db).expect("mark"), 400);
    }

    #[test]
    fn history_keys_go_to_run_files_that_merge_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A bound on liveness, not on speed: 17 checkpoints of 4 MiB each, fsynced, take seconds on an idle
        // machine and far longer on a loaded 2-core one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        let checkpoints = runs::FANOUT * runs::FANOUT + 1;
        {
            let s = open(dir.path());
            let big = "v".repeat(CHECKPOINT_BYTES as usize + 1);
            for i in 0..checkpoints as u32 {
                // One history key per checkpoint, and a balance rewritten by each; a big value forces the
                // checkpoint.
                s.redo.log(vec![
                    op(&format!("h{i:03}"), Some("x")),
                    op("a1", Some(&i.to_string())),
                    op("z", Some(&big)),
                ]);
                while lock(&s.redo.deferred).frozen.is_some()
                    || s.redo.checkpoints_done.load(Ordering::Relaxed) <= i.into()
                {
                    assert!(std::time::Instant::now() < deadline, "checkpoints end");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            assert!(!in_sled(&s.db, "h000"), "history keys never reach sled");
            assert!(in_sled(&s.db, "a1"), "the rest does");
            // The merging thread catches up: every full tier is merged.
            while s.redo.runs.live().len() >= runs::FANOUT {
                assert!(std::time::Instant::now() < deadline, "merges end");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(s.redo.runs.stats().0, checkpoints as u64);
            assert_eq!(s.get("h007").as_deref(), Some("x"));
        }
        let s = open(dir.path());
        for i in 0..checkpoints {
            assert_eq!(s.get(&format!("h{i:03}")).as_deref(), Some("x"), "h{i:03} after a restart");
        }
        let files = fs::read_dir(dir.path().join("runs")).expect("list").count();
        assert_eq!(files, s.redo.runs.live().len(), "merged runs' files are deleted");
    }

    #[test]
    fn a_range_may_hold_history_exactly_when_it_meets_a_history_prefix() {
        let classes = KeyClasses { transient: None, history: &[b'f', 0xff] };
        let may = |start: &[u8], end: &[u8]| classes.may_hold_history(&(start.to_vec()..end.to_vec()));
        assert!(may(b"f", b"g") && may(b"a", b"z") && may(b"f\x05", b"f\x06") && may(b"e\xff", b"f\x01"));
        assert!(!may(b"a", b"f") && !may(b"g", b"h") && !may(b"j", b"k"));
        assert!(may(&[0xff, 1], &[0xff, 2]), "the last prefix byte has no next byte");
    }
}
