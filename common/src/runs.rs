//! History keys outside sled: immutable sorted run files, merged in tiers (a small log-structured merge tree).
//!
//! A finished record, a journal entry, a coordinator's decision: each is written once and read rarely, and
//! there is one per transfer ever made. In sled each cost a copy of a tree leaf per insert (most of a node's
//! checkpoint CPU), a page in its cache, and a share of its restart, which reads a page table that grows with
//! every key. So a checkpoint writes the history keys it covers as one run file: sorted, in checksummed
//! blocks, with a block index and a Bloom filter at the end. A lookup asks the runs newest first, and reads
//! a block only if the filter lets the key through; a range merges them. Once [`FANOUT`] runs of one tier sit
//! at the newest end, they are merged into one run of the next tier, so a history of N keys lives in
//! O(FANOUT · log N) runs, each key rewritten once per tier.
//!
//! Which runs are live is the manifest, a value the caller keeps in sled next to its own mark and makes
//! durable with it. A run file is fsynced (and its directory entry) before any manifest names it, and files
//! no manifest names are deleted at open: a crash leaves either the old set of runs or the new one, never a
//! half-written run in use.
//!
//! File: 8-byte magic, then blocks (payload length u32, crc32 u32, payload: per entry key length u32, key,
//! `0` for a removal or `1`, value length u32, value), then the index (block count u32, per block first key
//! length u32, first key, offset u64, length u32), then the filter (probe count u32, bit count u64, the bits),
//! then the footer: index offset, filter offset, entry count (u64 each), crc32 of index and filter (u32), and
//! the magic's last 4 bytes. All integers little-endian.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A key's value in a run, or `None` where a run records its removal.
pub type Entry = (Vec<u8>, Option<Vec<u8>>);

/// Keys from `start` up to `end` (excluded), or to the last key if `end` is `None`.
#[derive(Clone, Debug)]
pub struct Span {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl Span {
    pub fn all() -> Span {
        Span { start: Vec::new(), end: None }
    }

    fn below_end(&self, key: &[u8]) -> bool {
        self.end.as_ref().is_none_or(|end| key < end.as_slice())
    }

    fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.below_end(key)
    }
}

impl From<Range<Vec<u8>>> for Span {
    fn from(range: Range<Vec<u8>>) -> Span {
        Span { start: range.start, end: Some(range.end) }
    }
}

const MAGIC: &[u8; 8] = b"LDGRUN01";
const FOOTER: usize = 8 + 8 + 8 + 4 + 4;
/// A block is closed once its entries reach this many bytes: a point lookup reads and decodes one block.
pub const BLOCK_BYTES: usize = 8 << 10;
/// Runs of one tier merged at once into one of the next.
pub const FANOUT: usize = 4;
/// Filter bits per key: about 0.2% false positives with [`PROBES`] probes. A lookup of an id no run holds
/// (every new transfer's) asks every run, so each false positive, a block read, counts.
const FILTER_BITS_PER_KEY: u64 = 14;
const PROBES: u32 = 10;
/// The most probes a stored filter may ask for.
const PROBES_MAX: usize = 32;
/// The longest run file read at open: a larger footer offset is corrupt.
const ENTRY_BYTES_MAX: usize = 256 << 20;
const SUFFIX: &str = "run";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("run file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("run file {path} is damaged ({what})")]
    Damaged { path: PathBuf, what: &'static str },
    #[error("the manifest of run files does not decode")]
    Manifest,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> RunError + '_ {
    move |source| RunError::Io { path: path.to_owned(), source }
}

/// One live run: its id (unique; the manifest's order is the runs' age) and tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunId {
    pub id: u64,
    pub tier: u8,
}

/// Encodes the live runs, oldest first, as the manifest value.
pub fn encode_manifest(runs: &[RunId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 9);
    for run in runs {
        out.extend_from_slice(&run.id.to_le_bytes());
        out.push(run.tier);
    }
    out
}

pub fn decode_manifest(bytes: &[u8]) -> Result<Vec<RunId>, RunError> {
    if !bytes.len().is_multiple_of(9) {
        return Err(RunError::Manifest);
    }
    let runs: Vec<RunId> = bytes
        .chunks_exact(9)
        .map(|c| RunId { id: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")), tier: c[8] })
        .collect();
    let ids: std::collections::HashSet<u64> = runs.iter().map(|r| r.id).collect();
    if ids.len() != runs.len() {
        return Err(RunError::Manifest);
    }
    Ok(runs)
}

/// FNV-1a, then a finaliser: stable across builds, since the filter bits are stored.
fn hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

struct Filter {
    probes: u32,
    bits: Vec<u8>,
    nbits: u64,
}

impl Filter {
    fn new(keys: usize) -> Filter {
        let nbits = (keys as u64 * FILTER_BITS_PER_KEY).max(64);
        Filter { probes: PROBES, bits: vec![0; nbits.div_ceil(8) as usize], nbits }
    }

    /// The bits a key with hash `h` sets (double hashing).
    fn probes(&self, h: u64) -> impl Iterator<Item = u64> {
        let (h1, h2) = (h & 0xffff_ffff, (h >> 32) | 1);
        let nbits = self.nbits;
        (0..u64::from(self.probes)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % nbits)
    }

    fn add(&mut self, h: u64) {
        for bit in self.probes(h) {
            self.bits[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }

    fn may_contain(&self, h: u64) -> bool {
        self.probes(h).all(|bit| self.bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }
}

/// An open run: its index and filter in memory, its blocks read on demand.
pub struct Run {
    pub id: RunId,
    path: PathBuf,
    file: File,
    /// First key, offset and length of each block.
    index: Vec<(Vec<u8>, u64, u32)>,
    filter: Filter,
    pub entries: u64,
    pub bytes: u64,
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.input.len() < n {
            return None;
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// A block's entries, borrowed from its bytes: `None` where they do not decode.
fn block_entries(payload: &[u8]) -> impl Iterator<Item = Option<(&[u8], Option<&[u8]>)>> {
    let mut r = Reader { input: payload };
    std::iter::from_fn(move || {
        if r.input.is_empty() {
            return None;
        }
        let mut entry = || {
            let key_len = r.u32()?;
            let key = r.take(key_len)?;
            let value = match r.take(1)?[0] {
                0 => None,
                1 => {
                    let len = r.u32()?;
                    Some(r.take(len)?)
                }
                _ => return None,
            };
            Some((key, value))
        };
        let next = entry();
        if next.is_none() {
            r.input = &[]; // nothing after a bad entry is read
        }
        Some(next)
    })
}

fn decode_block(payload: &[u8]) -> Option<Vec<Entry>> {
    block_entries(payload).map(|e| e.map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))).collect()
}

fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SUFFIX}"))
}

/// Writes the run `id` of `tier` in `dir` from `entries` (in strictly increasing key order), fsyncs it and
/// its directory entry, and opens it. None if `entries` is empty.
pub fn write_run(
    dir: &Path,
    id: RunId,
    entries: impl Iterator<Item = Result<Entry, RunError>>,
    expected: usize,
) -> Result<Option<Run>, RunError> {
    let path = run_path(dir, id.id);
    let partial = path.with_extension("partial");
    let file = File::create(&partial).map_err(io_error(&partial))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(MAGIC).map_err(io_error(&partial))?;
    let mut offset = MAGIC.len() as u64;
    let mut index: Vec<(Vec<u8>, u64, u32)> = Vec::new();
    let mut keys: Vec<u64> = Vec::with_capacity(expected);
    let mut block: Vec<u8> = Vec::with_capacity(BLOCK_BYTES + 1024);
    let mut first_key: Option<Vec<u8>> = None;
    let mut last_key: Option<Vec<u8>> = None;
    let mut count = 0u64;
    let mut flush = |block: &mut Vec<u8>, first: Vec<u8>, out: &mut BufWriter<File>, offset: &mut u64| {
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&(block.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&crc32fast::hash(block).to_le_bytes());
        out.write_all(&header).and_then(|_| out.write_all(block))?;
        index.push((first, *offset, (block.len() + 8) as u32));
        *offset += (block.len() + 8) as u64;
        block.clear();
        Ok::<(), io::Error>(())
    };
    for entry in entries {
        let (key, value) = entry?;
        debug_assert!(last_key.as_ref().is_none_or(|last| *last < key), "run entries must be sorted and distinct");
        keys.push(hash(&key));
        put_u32(&mut block, key.len());
        block.extend_from_slice(&key);
        match &value {
            None => block.push(0),
            Some(value) => {
                block.push(1);
                put_u32(&mut block, value.len());
                block.extend_from_slice(value);
            }
        }
        if first_key.is_none() {
            first_key = Some(key.clone());
        }
        count += 1;
        if block.len() >= BLOCK_BYTES {
            let first = first_key.take().expect("a block has a first key");
            flush(&mut block, first, &mut out, &mut offset).map_err(io_error(&partial))?;
        }
        last_key = Some(key);
    }
    if let Some(first) = first_key.take() {
        flush(&mut block, first, &mut out, &mut offset).map_err(io_error(&partial))?;
    }
    if count == 0 {
        drop(out);
        fs::remove_file(&partial).map_err(io_error(&partial))?;
        return Ok(None);
    }
    let mut filter = Filter::new(keys.len());
    for h in keys {
        filter.add(h);
    }
    let mut tail = Vec::new();
    put_u32(&mut tail, index.len());
    for (key, at, len) in &index {
        put_u32(&mut tail, key.len());
        tail.extend_from_slice(key);
        tail.extend_from_slice(&at.to_le_bytes());
        tail.extend_from_slice(&len.to_le_bytes());
    }
    let index_offset = offset;
    let filter_offset = offset + tail.len() as u64;
    tail.extend_from_slice(&filter.probes.to_le_bytes());
    tail.extend_from_slice(&filter.nbits.to_le_bytes());
    tail.extend_from_slice(&filter.bits);
    let crc = crc32fast::hash(&tail);
    tail.extend_from_slice(&index_offset.to_le_bytes());
    tail.extend_from_slice(&filter_offset.to_le_bytes());
    tail.extend_from_slice(&count.to_le_bytes());
    tail.extend_from_slice(&crc.to_le_bytes());
    tail.extend_from_slice(&MAGIC[4..]);
    out.write_all(&tail).map_err(io_error(&partial))?;
    let file = out.into_inner().map_err(|e| io_error(&partial)(e.into_error()))?;
    file.sync_all().map_err(io_error(&partial))?;
    drop(file);
    fs::rename(&partial, &path).map_err(io_error(&path))?;
    sync_dir(dir)?;
    Run::open(dir, id).map(Some)
}

fn sync_dir(dir: &Path) -> Result<(), RunError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

impl Run {
    /// Opens run `id` in `dir`: reads and checks its index and filter.
    pub fn open(dir: &Path, id: RunId) -> Result<Run, RunError> {
        let path = run_path(dir, id.id);
        let file = OpenOptions::new().read(true).open(&path).map_err(io_error(&path))?;
        let bytes = file.metadata().map_err(io_error(&path))?.len();
        let damaged = |what| RunError::Damaged { path: path.clone(), what };
        if bytes < (MAGIC.len() + FOOTER) as u64 {
            return Err(damaged("shorter than its header and footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, bytes - FOOTER as u64).map_err(io_error(&path))?;
        let mut r = Reader { input: &footer };
        let (index_offset, filter_offset, entries) = (r.u64().expect("8"), r.u64().expect("8"), r.u64().expect("8"));
        let crc = r.u32().expect("4") as u32;
        if r.take(4) != Some(&MAGIC[4..]) {
            return Err(damaged("bad footer magic"));
        }
        let tail_end = bytes - FOOTER as u64;
        if index_offset < MAGIC.len() as u64 || filter_offset < index_offset || filter_offset > tail_end {
            return Err(damaged("footer offsets out of range"));
        }
        let tail_len = (tail_end - index_offset) as usize;
        if tail_len > ENTRY_BYTES_MAX {
            return Err(damaged("index too large"));
        }
        let mut tail = vec![0u8; tail_len];
        file.read_exact_at(&mut tail, index_offset).map_err(io_error(&path))?;
        if crc32fast::hash(&tail) != crc {
            return Err(damaged("index or filter checksum"));
        }
        let (index_bytes, filter_bytes) = tail.split_at((filter_offset - index_offset) as usize);
        let mut r = Reader { input: index_bytes };
        let blocks = r.u32().ok_or_else(|| damaged("index"))?;
        let mut index = Vec::with_capacity(blocks.min(index_bytes.len()));
        for _ in 0..blocks {
            let key_len = r.u32().ok_or_else(|| damaged("index"))?;
            let key = r.take(key_len).ok_or_else(|| damaged("index"))?.to_vec();
            let at = r.u64().ok_or_else(|| damaged("index"))?;
            let len = r.u32().ok_or_else(|| damaged("index"))? as u32;
            if at + u64::from(len) > index_offset {
                return Err(damaged("block out of range"));
            }
            index.push((key, at, len));
        }
        let mut r = Reader { input: filter_bytes };
        let probes = r.u32().ok_or_else(|| damaged("filter"))?;
        let nbits = r.u64().ok_or_else(|| damaged("filter"))?;
        if probes == 0 || probes > PROBES_MAX || nbits == 0 || r.input.len() as u64 != nbits.div_ceil(8) {
            return Err(damaged("filter"));
        }
        let filter = Filter { probes: probes as u32, bits: r.input.to_vec(), nbits };
        Ok(Run { id, path, file, index, filter, entries, bytes })
    }

    fn block(&self, i: usize) -> Result<Vec<Entry>, RunError> {
        let payload = self.read_block(i)?;
        decode_block(&payload).ok_or_else(|| RunError::Damaged { path: self.path.clone(), what: "block" })
    }

    /// Block `i`'s entries, checked against its crc, undecoded.
    fn read_block(&self, i: usize) -> Result<Vec<u8>, RunError> {
        let (_, at, len) = &self.index[i];
        let mut buf = vec![0u8; *len as usize];
        self.file.read_exact_at(&mut buf, *at).map_err(io_error(&self.path))?;
        let damaged = || RunError::Damaged { path: self.path.clone(), what: "block" };
        if buf.len() < 8 {
            return Err(damaged());
        }
        let payload_len = u32::from_le_bytes(buf[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4"));
        if payload_len != buf.len() - 8 || crc32fast::hash(&buf[8..]) != crc {
            return Err(damaged());
        }
        buf.drain(..8);
        Ok(buf)
    }

    /// The block that would hold `key`: the last whose first key is at or before it.
    fn block_for(&self, key: &[u8]) -> Option<usize> {
        self.index.partition_point(|(first, _, _)| first.as_slice() <= key).checked_sub(1)
    }

    /// `key`'s entry in this run: `Some(None)` if the run records its removal.
    pub fn get(&self, key: &[u8]) -> Result<Option<Option<Vec<u8>>>, RunError> {
        self.get_hashed(key, hash(key))
    }

    fn get_hashed(&self, key: &[u8], h: u64) -> Result<Option<Option<Vec<u8>>>, RunError> {
        if !self.filter.may_contain(h) {
            return Ok(None);
        }
        let Some(i) = self.block_for(key) else { return Ok(None) };
        let payload = self.read_block(i)?;
        // Scanned in place: only the value found is copied (a false positive of the filter copies nothing).
        for entry in block_entries(&payload) {
            let (found, value) = entry.ok_or_else(|| RunError::Damaged { path: self.path.clone(), what: "block" })?;
            match found.cmp(key) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Ok(Some(value.map(<[u8]>::to_vec))),
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The entries in `range`, in key order or in reverse, read a block at a time.
    pub fn range(self: &Arc<Self>, range: impl Into<Span>, reverse: bool) -> RunIter {
        let range = range.into();
        let next_block = if reverse {
            // The last block whose first key is below the end.
            self.index.partition_point(|(first, _, _)| range.below_end(first)).checked_sub(1)
        } else {
            Some(self.block_for(&range.start).unwrap_or(0))
        };
        RunIter { run: self.clone(), range, reverse, next_block, buffered: std::collections::VecDeque::new() }
    }
}

/// An iterator over a range of one run.
pub struct RunIter {
    run: Arc<Run>,
    range: Span,
    reverse: bool,
    next_block: Option<usize>,
    buffered: std::collections::VecDeque<Entry>,
}

impl Iterator for RunIter {
    type Item = Result<Entry, RunError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.buffered.pop_front() {
                return Some(Ok(entry));
            }
            let i = self.next_block?;
            if i >= self.run.index.len() || !self.range.below_end(&self.range.start) {
                self.next_block = None;
                return None;
            }
            let block = match self.run.block(i) {
                Ok(block) => block,
                Err(e) => {
                    self.next_block = None;
                    return Some(Err(e));
                }
            };
            let range = &self.range;
            if self.reverse {
                self.next_block = i.checked_sub(1);
                if block.first().is_some_and(|(k, _)| *k < range.start) {
                    self.next_block = None; // nothing in range before this block
                }
                self.buffered = block.into_iter().rev().filter(|(k, _)| range.contains(k)).collect();
            } else {
                self.next_block = Some(i + 1);
                if self.run.index.get(i + 1).is_some_and(|(first, _, _)| !range.below_end(first)) {
                    self.next_block = None; // nothing in range after this block
                }
                self.buffered = block.into_iter().filter(|(k, _)| range.contains(k)).collect();
            }
        }
    }
}

/// Merges sorted sources (in key order, or reverse key order if `reverse`) into one, the earliest source
/// winning where several hold a key. Removals are passed on.
pub struct Merge<I: Iterator> {
    sources: Vec<std::iter::Peekable<I>>,
    reverse: bool,
}

impl<I: Iterator<Item = Result<Entry, E>>, E> Merge<I> {
    pub fn new(sources: impl IntoIterator<Item = I>, reverse: bool) -> Self {
        Merge { sources: sources.into_iter().map(Iterator::peekable).collect(), reverse }
    }
}

impl<I: Iterator<Item = Result<Entry, E>>, E> Iterator for Merge<I> {
    type Item = Result<Entry, E>;

    fn next(&mut self) -> Option<Self::Item> {
        // The source holding the next key (the first such source: it wins), found without copying a key.
        let mut best: Option<usize> = None;
        for i in 0..self.sources.len() {
            let (before, rest) = self.sources.split_at_mut(i);
            let key = match rest[0].peek() {
                None => continue,
                Some(Err(_)) => return rest[0].next(),
                Some(Ok((key, _))) => key,
            };
            let better = match best.and_then(|b| before[b].peek()) {
                Some(Ok((b, _))) => {
                    if self.reverse {
                        key > b
                    } else {
                        key < b
                    }
                }
                _ => true,
            };
            if better {
                best = Some(i);
            }
        }
        let winner = best?;
        let out = self.sources[winner].next();
        if let Some(Ok((key, _))) = &out {
            for source in &mut self.sources[winner + 1..] {
                if matches!(source.peek(), Some(Ok((k, _))) if k == key) {
                    source.next();
                }
            }
        }
        out
    }
}

/// The live runs of one store, newest first, shared by readers, the checkpoint thread (which adds runs at the
/// newest end) and the merging thread (which replaces a group of runs by one in their place).
pub struct Runs {
    dir: PathBuf,
    live: Mutex<Arc<Vec<Arc<Run>>>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Held while a manifest is encoded and written, so that the last one written is the newest.
    manifest_write: Mutex<()>,
}

impl Runs {
    /// Opens the runs `manifest` names in `dir` and deletes every other run file there (a crash's leftovers).
    pub fn open(dir: &Path, manifest: &[RunId]) -> Result<Runs, RunError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut removed = false;
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            let id = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok());
            let live = path.extension().and_then(|e| e.to_str()) == Some(SUFFIX)
                && id.is_some_and(|id| manifest.iter().any(|r| r.id == id));
            if !live {
                fs::remove_file(&path).map_err(io_error(&path))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(dir)?;
        }
        let mut live = Vec::with_capacity(manifest.len());
        for id in manifest.iter().rev() {
            live.push(Arc::new(Run::open(dir, *id)?));
        }
        let next_id = manifest.iter().map(|r| r.id + 1).max().unwrap_or(1);
        Ok(Runs {
            dir: dir.to_owned(),
            live: Mutex::new(Arc::new(live)),
            next_id: next_id.into(),
            manifest_write: Mutex::new(()),
        })
    }

    /// The live runs, newest first.
    pub fn live(&self) -> Arc<Vec<Arc<Run>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The manifest of the live runs, oldest first.
    pub fn manifest(&self) -> Vec<RunId> {
        self.live().iter().rev().map(|r| r.id).collect()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the manifest of the live runs with `write` (into sled, next to the mark), as of now: calls are
    /// serialised, so a later call never writes an older list.
    pub fn write_manifest<E>(&self, write: impl FnOnce(Vec<u8>) -> Result<(), E>) -> Result<(), E> {
        let _one_at_a_time = self.manifest_write.lock().unwrap_or_else(|p| p.into_inner());
        write(encode_manifest(&self.manifest()))
    }

    /// `key`'s entry in the newest run that has one.
    pub fn get(&self, key: &[u8]) -> Result<Option<Option<Vec<u8>>>, RunError> {
        let h = hash(key);
        for run in self.live().iter() {
            if let Some(found) = run.get_hashed(key, h)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Writes `entries` (sorted, distinct) as a new run of tier 0. Readers see it once it is [`add`]ed; the
    /// caller makes the manifest naming it durable.
    ///
    /// [`add`]: Runs::add
    pub fn write(&self, entries: impl Iterator<Item = Entry>, expected: usize) -> Result<Option<Run>, RunError> {
        write_run(&self.dir, RunId { id: self.next_id(), tier: 0 }, entries.map(Ok), expected)
    }

    /// Makes `run` the newest live run.
    pub fn add(&self, run: Run) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Arc<Run>> = Vec::with_capacity(live.len() + 1);
        next.push(Arc::new(run));
        next.extend(live.iter().cloned());
        *live = Arc::new(next);
    }

    /// Merges the first group of [`FANOUT`] neighbouring runs of one tier (the lowest such tier) into one run of
    /// the next, not yet live: see [`Runs::replace`]. Returns it and the ids it replaces. Only one thread
    /// merges; others may add runs meanwhile.
    pub fn merge(&self) -> Result<Option<(Run, Vec<u64>)>, RunError> {
        let live = self.live();
        let group = live
            .windows(FANOUT)
            .filter(|w| w.iter().all(|r| r.id.tier == w[0].id.tier) && w[0].id.tier < u8::MAX)
            .min_by_key(|w| w[0].id.tier);
        let Some(group) = group else { return Ok(None) };
        let id = RunId { id: self.next_id(), tier: group[0].id.tier + 1 };
        // Newest first, so that the merge keeps the newest entry of a key.
        let sources: Vec<RunIter> = group.iter().map(|r| r.range(Span::all(), false)).collect();
        let expected = group.iter().map(|r| r.entries as usize).sum();
        let merged = write_run(&self.dir, id, Merge::new(sources, false), expected)?;
        let replaced: Vec<u64> = group.iter().map(|r| r.id.id).collect();
        // Never empty: removals are kept (sled may hold an older value of the key).
        Ok(merged.map(|run| (run, replaced)))
    }

    /// Puts `merged` where the runs `replaced` are (they are neighbours: runs are only ever added at the
    /// newest end); their files are deleted by [`Runs::delete`] once a manifest without them is durable.
    pub fn replace(&self, merged: Run, replaced: &[u64]) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let at = live.iter().position(|r| replaced.contains(&r.id.id)).unwrap_or(0);
        let mut next: Vec<Arc<Run>> = live.iter().filter(|r| !replaced.contains(&r.id.id)).cloned().collect();
        next.insert(at.min(next.len()), Arc::new(merged));
        *live = Arc::new(next);
    }

    /// Deletes the files of runs no longer live (readers holding them keep reading the open file).
    pub fn delete(&self, ids: &[u64]) -> Result<(), RunError> {
        for id in ids {
            let path = run_path(&self.dir, *id);
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
        sync_dir(&self.dir)
    }

    /// Entries and bytes in the live runs, and how many runs.
    pub fn stats(&self) -> (u64, u64, usize) {
        let live = self.live();
        (live.iter().map(|r| r.entries).sum(), live.iter().map(|r| r.bytes).sum(), live.len())
    }

    /// The runs' filters and block indexes held in memory: about 1.8 bytes per key (14 filter bits, and an
    /// index entry per 8 KiB block). The one part of a node's memory that grows with its history.
    pub fn index_bytes(&self) -> u64 {
        let index = |r: &Run| r.index.iter().map(|(k, _, _)| k.len() as u64 + 12).sum::<u64>();
        self.live().iter().map(|r| r.filter.bits.len() as u64 + index(r)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn k(i: u32) -> Vec<u8> {
        format!("k{i:06}").into_bytes()
    }

    fn collect(iter: impl Iterator<Item = Result<Entry, RunError>>) -> Vec<Entry> {
        iter.map(|e| e.expect("readable")).collect()
    }

    /// A pseudo-random sequence, so that the test needs no dependency.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn a_run_answers_gets_and_ranges_like_the_map_it_was_written_from() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut seed = 7;
        for i in 0..5_000u32 {
            if lcg(&mut seed).is_multiple_of(3) {
                continue;
            }
            let value = (!lcg(&mut seed).is_multiple_of(10)).then(|| vec![b'v'; (lcg(&mut seed) % 200) as usize]);
            model.insert(k(i), value);
        }
        let run = write_run(dir.path(), RunId { id: 1, tier: 0 }, model.clone().into_iter().map(Ok), model.len())
            .expect("writes")
            .expect("not empty");
        assert!(run.index.len() > 10, "several blocks: {}", run.index.len());
        assert_eq!(run.entries, model.len() as u64);
        let run = Arc::new(Run::open(dir.path(), run.id).expect("reopens"));
        for i in 0..5_001u32 {
            assert_eq!(run.get(&k(i)).expect("get"), model.get(&k(i)).cloned(), "key {i}");
        }
        for (start, end) in [(0, 5_000), (17, 18), (100, 2_345), (4_999, 6_000), (3_000, 3_000), (10, 9)] {
            let range = k(start)..k(end);
            let want: Vec<Entry> = if start < end {
                model.range(range.clone()).map(|(a, b)| (a.clone(), b.clone())).collect()
            } else {
                Vec::new()
            };
            assert_eq!(collect(run.range(range.clone(), false)), want, "{start}..{end}");
            let mut reversed = want.clone();
            reversed.reverse();
            assert_eq!(collect(run.range(range, true)), reversed, "{start}..{end} reversed");
        }
    }

    #[test]
    fn a_damaged_run_is_refused_not_misread() {
        let dir = tempfile::tempdir().expect("temp dir");
        let entries = (0..2_000u32).map(|i| Ok((k(i), Some(vec![1u8; 50]))));
        let id = RunId { id: 1, tier: 0 };
        write_run(dir.path(), id, entries, 2_000).expect("writes").expect("not empty");
        let path = run_path(dir.path(), 1);
        let mut bytes = fs::read(&path).expect("read");
        // A flipped byte in the first block: the block's checksum catches it on read.
        bytes[20] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        let run = Run::open(dir.path(), id).expect("index intact");
        assert!(matches!(run.get(&k(0)), Err(RunError::Damaged { .. })));
        // A cut-off file: the footer is gone.
        fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
        assert!(matches!(Run::open(dir.path(), id), Err(RunError::Damaged { .. })));
    }

    #[test]
    fn merges_keep_the_newest_entry_and_compaction_keeps_every_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let runs = Runs::open(dir.path(), &[]).expect("opens");
        let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut seed = 11;
        for round in 0..(FANOUT * FANOUT + 3) {
            let mut batch = BTreeMap::new();
            for _ in 0..300 {
                let key = k((lcg(&mut seed) % 2_000) as u32);
                let value = (!lcg(&mut seed).is_multiple_of(8)).then(|| format!("r{round}").into_bytes());
                batch.insert(key, value);
            }
            model.extend(batch.clone());
            let run = runs.write(batch.into_iter(), 300).expect("writes").expect("not empty");
            runs.add(run);
            while let Some((merged, replaced)) = runs.merge().expect("merges") {
                runs.replace(merged, &replaced);
                runs.delete(&replaced).expect("deletes");
            }
        }
        let manifest = runs.manifest();
        assert!(manifest.len() < FANOUT * 3, "tiers keep the run count small: {manifest:?}");
        assert!(manifest.iter().any(|r| r.tier == 2), "two merges deep: {manifest:?}");
        let check = |runs: &Runs| {
            for i in 0..2_001u32 {
                assert_eq!(runs.get(&k(i)).expect("get"), model.get(&k(i)).cloned(), "key {i}");
            }
            let live = runs.live();
            let merged = collect(Merge::new(live.iter().map(|r| r.range(k(0)..k(2_000), true)), true));
            let want: Vec<Entry> = model.clone().into_iter().rev().collect();
            assert_eq!(merged, want);
        };
        check(&runs);
        drop(runs);
        // A file no manifest names (a crash between writing a run and the manifest) is deleted at open.
        fs::write(run_path(dir.path(), 999), b"left by a crash").expect("write");
        let reopened = Runs::open(dir.path(), &manifest).expect("reopens");
        assert!(!run_path(dir.path(), 999).exists());
        check(&reopened);
        assert_eq!(decode_manifest(&encode_manifest(&manifest)).expect("decodes"), manifest);
    }

    #[test]
    fn the_filter_lets_every_key_through_and_few_others() {
        let mut filter = Filter::new(10_000);
        for i in 0..10_000u32 {
            filter.add(hash(&k(i)));
        }
        assert!((0..10_000u32).all(|i| filter.may_contain(hash(&k(i)))));
        let false_positives = (10_000..110_000u32).filter(|i| filter.may_contain(hash(&k(*i)))).count();
        assert!(false_positives < 600, "{false_positives} of 100000");
    }

    #[test]
    fn a_merge_goes_where_its_runs_were_while_newer_runs_are_added() {
        let dir = tempfile::tempdir().expect("temp dir");
        let runs = Runs::open(dir.path(), &[]).expect("opens");
        let add = |round: u32| {
            // Every round rewrites key 0 and adds a key of its own.
            let batch = vec![(k(0), Some(format!("r{round}").into_bytes())), (k(round + 1), Some(vec![1]))];
            runs.add(runs.write(batch.into_iter(), 2).expect("writes").expect("not empty"));
        };
        for round in 0..FANOUT as u32 {
            add(round);
        }
        let (merged, replaced) = runs.merge().expect("merges").expect("a full tier");
        // Meanwhile the checkpoint thread adds two newer runs.
        add(FANOUT as u32);
        add(FANOUT as u32 + 1);
        runs.replace(merged, &replaced);
        runs.delete(&replaced).expect("deletes");
        let tiers: Vec<u8> = runs.live().iter().map(|r| r.id.tier).collect();
        assert_eq!(tiers, vec![0, 0, 1], "newest first, the merge in its runs' place");
        assert_eq!(runs.get(&k(0)).expect("get"), Some(Some(format!("r{}", FANOUT + 1).into_bytes())));
        let manifest = runs.manifest();
        drop(runs);
        let reopened = Runs::open(dir.path(), &manifest).expect("reopens");
        assert_eq!(reopened.get(&k(0)).expect("get"), Some(Some(format!("r{}", FANOUT + 1).into_bytes())));
        assert_eq!(reopened.get(&k(1)).expect("get"), Some(Some(vec![1])));
        assert_eq!(reopened.live().iter().map(|r| r.id.tier).collect::<Vec<_>>(), vec![0, 0, 1]);
    }
}
