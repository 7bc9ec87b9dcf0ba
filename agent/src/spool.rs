//! The metrics spool: batches not yet acknowledged by the control plane,
//! kept on disk in `<state dir>/spool/` so they survive disconnections and
//! restarts, bounded in size.
//!
//! Layout:
//!
//! * `<seq, 20 digits>.batch` — one postcard-encoded [`MetricsBatch`] each;
//!   zero padding makes name order sequence order.
//! * `next_seq` — the next sequence number, decimal. It is written before
//!   the batch using it, so a sequence number is never handed out twice,
//!   even after a restart with an empty spool.
//! * `dropped` — batches dropped so far (bound exceeded, corrupt files),
//!   decimal, cumulative for the agent's lifetime.
//! * `interval_ms` — the last metrics interval the control plane asked for
//!   (written by [`crate::telemetry`]).
//!
//! Every file is written to a temporary file, synced and renamed into place;
//! a crash leaves either the old or the new content. Leftover temporary
//! files are removed when the spool is opened.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tether_protocol::MetricsBatch;

/// Default bound on the spool's size: 16 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

const BATCH_SUFFIX: &str = ".batch";
const TEMP_SUFFIX: &str = ".tmp";
const NEXT_SEQ_FILE: &str = "next_seq";
const DROPPED_FILE: &str = "dropped";

/// Why the spool could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct SpoolError {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A bounded, ordered, on-disk queue of [`MetricsBatch`]es.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    next_seq: u64,
    dropped: u64,
    /// seq -> file size.
    files: BTreeMap<u64, u64>,
    total_bytes: u64,
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, bounded to
    /// `max_bytes` of batch files.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, SpoolError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error("create", &dir))?;
        let mut files = BTreeMap::new();
        let mut total_bytes = 0;
        for entry in fs::read_dir(&dir).map_err(io_error("list", &dir))? {
            let entry = entry.map_err(io_error("list", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TEMP_SUFFIX) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(seq) = name
                .strip_suffix(BATCH_SUFFIX)
                .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<u64>().ok())
            else {
                continue;
            };
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            files.insert(seq, size);
            total_bytes += size;
        }
        let after_files = files.last_key_value().map_or(1, |(seq, _)| seq + 1);
        let next_seq = match read_counter(&dir, NEXT_SEQ_FILE) {
            Ok(Some(next)) => next.max(after_files),
            Ok(None) => after_files,
            Err(why) => {
                // Never reuse a sequence number the control plane may have
                // stored: jump past anything this agent can have used.
                let jump = unix_ms().max(after_files);
                tracing::warn!(
                    "{}; continuing from sequence number {jump}",
                    why_counter(&dir, NEXT_SEQ_FILE, &why)
                );
                jump
            }
        };
        let dropped = match read_counter(&dir, DROPPED_FILE) {
            Ok(count) => count.unwrap_or(0),
            Err(why) => {
                tracing::warn!("{}; counting from 0", why_counter(&dir, DROPPED_FILE, &why));
                0
            }
        };
        let mut spool = Self {
            dir,
            max_bytes,
            next_seq,
            dropped,
            files,
            total_bytes,
        };
        spool.enforce_bound(None)?;
        Ok(spool)
    }

    /// The directory holding the spool.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hands out the next sequence number, persisting the counter first.
    pub fn allocate_seq(&mut self) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        write_atomic(
            &self.dir,
            NEXT_SEQ_FILE,
            format!("{}\n", seq + 1).as_bytes(),
        )?;
        self.next_seq = seq + 1;
        Ok(seq)
    }

    /// Batches dropped so far (cumulative).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Number of batches waiting for an ack.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no batch waits.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Size of the batch files, in bytes.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Stores `batch` durably, then drops the oldest batches while the spool
    /// is over its bound (never the one just stored). Returns how many were
    /// dropped.
    pub fn push(&mut self, batch: &MetricsBatch) -> Result<u64, SpoolError> {
        let body = postcard::to_stdvec(batch).map_err(|err| SpoolError {
            action: "encode batch for",
            path: self.dir.clone(),
            source: io::Error::other(err),
        })?;
        let name = batch_name(batch.seq);
        write_atomic(&self.dir, &name, &body)?;
        let size = body.len() as u64;
        if let Some(old) = self.files.insert(batch.seq, size) {
            self.total_bytes -= old;
        }
        self.total_bytes += size;
        self.enforce_bound(Some(batch.seq))
    }

    /// Deletes the oldest batches (never `keep`) while over the bound.
    fn enforce_bound(&mut self, keep: Option<u64>) -> Result<u64, SpoolError> {
        let mut dropped = 0;
        while self.total_bytes > self.max_bytes {
            let Some((&oldest, _)) = self.files.iter().find(|(seq, _)| Some(**seq) != keep) else {
                break;
            };
            self.remove(oldest);
            dropped += 1;
        }
        if dropped > 0 {
            self.count_dropped(dropped)?;
            tracing::warn!(
                "metrics spool over its {} byte bound: dropped the {dropped} oldest batch(es), {} dropped in total",
                self.max_bytes,
                self.dropped
            );
        }
        Ok(dropped)
    }

    /// Counts a batch that could not be spooled at all (disk full...) as
    /// dropped; persisting the count is best effort.
    pub fn record_lost(&mut self) {
        if let Err(err) = self.count_dropped(1) {
            tracing::debug!("{err}");
        }
    }

    fn count_dropped(&mut self, count: u64) -> Result<(), SpoolError> {
        self.dropped += count;
        write_atomic(
            &self.dir,
            DROPPED_FILE,
            format!("{}\n", self.dropped).as_bytes(),
        )
    }

    fn remove(&mut self, seq: u64) {
        if let Some(size) = self.files.remove(&seq) {
            self.total_bytes -= size;
        }
        let path = self.dir.join(batch_name(seq));
        if let Err(err) = fs::remove_file(&path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot delete {}: {err}", path.display());
            }
        }
    }

    /// Size of the spooled encoding of batch `seq`, if it is spooled.
    pub fn batch_bytes(&self, seq: u64) -> Option<u64> {
        self.files.get(&seq).copied()
    }

    /// Sequence numbers waiting for an ack, oldest first.
    pub fn pending(&self) -> Vec<u64> {
        self.files.keys().copied().collect()
    }

    /// The oldest waiting sequence number at or after `from`.
    pub fn first_pending_from(&self, from: u64) -> Option<u64> {
        self.files.range(from..).next().map(|(seq, _)| *seq)
    }

    /// The batch stored under `seq`. `Ok(None)` when it is gone (acked,
    /// dropped) or was unreadable: an unreadable or corrupt file is deleted
    /// and counted as dropped.
    pub fn load(&mut self, seq: u64) -> Result<Option<MetricsBatch>, SpoolError> {
        if !self.files.contains_key(&seq) {
            return Ok(None);
        }
        let path = self.dir.join(batch_name(seq));
        let why = match fs::read(&path) {
            Ok(body) => match tether_protocol::codec::decode_body::<MetricsBatch>(&body) {
                Ok(batch) if batch.seq == seq => return Ok(Some(batch)),
                Ok(batch) => format!("it holds sequence number {}", batch.seq),
                Err(err) => err.to_string(),
            },
            Err(err) => err.to_string(),
        };
        tracing::warn!("dropping spooled metrics batch {}: {why}", path.display());
        self.remove(seq);
        self.count_dropped(1)?;
        Ok(None)
    }

    /// Forgets `seq`: the control plane stored it.
    pub fn ack(&mut self, seq: u64) {
        // Not synced: a deletion lost in a crash only means the batch is
        // sent again, and the control plane stores each seq once.
        self.remove(seq);
    }
}

fn batch_name(seq: u64) -> String {
    format!("{seq:020}{BATCH_SUFFIX}")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn why_counter(dir: &Path, name: &str, why: &str) -> String {
    format!("{} is unreadable ({why})", dir.join(name).display())
}

/// Reads a decimal counter file: `Ok(None)` when absent, `Err` (a reason)
/// when present but not a number.
pub(crate) fn read_counter(dir: &Path, name: &str) -> Result<Option<u64>, String> {
    match fs::read_to_string(dir.join(name)) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|err: std::num::ParseIntError| err.to_string()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// Writes `dir/name` through a synced temporary file and a rename, then syncs
/// the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<(), SpoolError> {
    let target = dir.join(name);
    let temporary = dir.join(format!(".{name}{TEMP_SUFFIX}"));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, &target)?;
        fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|source| {
        let _ = fs::remove_file(&temporary);
        SpoolError {
            action: "write",
            path: target,
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::SystemMetrics;

    fn batch(seq: u64) -> MetricsBatch {
        MetricsBatch {
            seq,
            collected_at_unix_ms: 1_700_000_000_000 + seq,
            system: SystemMetrics {
                cpu_percent: 12.5,
                cpu_per_core: vec![10.0, 15.0],
                memory_total_bytes: 1 << 30,
                ..Default::default()
            },
            containers: None,
            dropped_batches: 0,
        }
    }

    fn push_new(spool: &mut Spool) -> u64 {
        let seq = spool.allocate_seq().unwrap();
        spool.push(&batch(seq)).unwrap();
        seq
    }

    fn batch_size() -> u64 {
        postcard::to_stdvec(&batch(1)).unwrap().len() as u64
    }

    #[test]
    fn batches_come_back_in_order_and_ack_removes_them() {
        let root = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(root.path().join("spool"), DEFAULT_MAX_BYTES).unwrap();
        let seqs: Vec<u64> = (0..3).map(|_| push_new(&mut spool)).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(spool.pending(), seqs);
        assert_eq!(spool.load(2).unwrap(), Some(batch(2)));
        assert_eq!(spool.first_pending_from(2), Some(2));
        spool.ack(2);
        assert_eq!(spool.pending(), [1, 3]);
        assert_eq!(spool.load(2).unwrap(), None);
        assert_eq!(spool.first_pending_from(2), Some(3));
        assert!(!root.path().join("spool").join(batch_name(2)).exists());
        assert_eq!(spool.dropped(), 0, "an ack is not a drop");
        spool.ack(2);
        spool.ack(1);
        spool.ack(3);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn over_the_bound_the_oldest_are_dropped_and_counted() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let mut spool = Spool::open(&dir, 3 * batch_size()).unwrap();
        for _ in 0..3 {
            push_new(&mut spool);
        }
        assert_eq!(spool.dropped(), 0);
        let seq = spool.allocate_seq().unwrap();
        assert_eq!(spool.push(&batch(seq)).unwrap(), 1);
        push_new(&mut spool);
        assert_eq!(spool.pending(), [3, 4, 5]);
        assert_eq!(spool.dropped(), 2);
        assert!(spool.bytes() <= 3 * batch_size());
        drop(spool);
        // The count survives a restart, and a smaller bound applies at once.
        let spool = Spool::open(&dir, batch_size()).unwrap();
        assert_eq!(spool.pending(), [5]);
        assert_eq!(spool.dropped(), 4);
    }

    #[test]
    fn the_newest_batch_is_kept_even_when_alone_over_the_bound() {
        let root = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(root.path(), 1).unwrap();
        push_new(&mut spool);
        push_new(&mut spool);
        assert_eq!(spool.pending(), [2]);
        assert_eq!(spool.dropped(), 1);
    }

    #[test]
    fn sequence_numbers_survive_reopening_even_with_an_empty_spool() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let mut spool = Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap();
        for _ in 0..5 {
            let seq = push_new(&mut spool);
            spool.ack(seq);
        }
        drop(spool);
        let mut spool = Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.allocate_seq().unwrap(), 6);
        // A lost counter never goes below what the files show.
        push_new(&mut spool);
        fs::remove_file(dir.join(NEXT_SEQ_FILE)).unwrap();
        let mut spool = Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(spool.allocate_seq().unwrap(), 8);
        // A garbled counter jumps ahead rather than reusing numbers.
        fs::write(dir.join(NEXT_SEQ_FILE), "garbage").unwrap();
        let mut spool = Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap();
        assert!(spool.allocate_seq().unwrap() > 1_000_000);
    }

    #[test]
    fn corrupt_files_are_dropped_and_counted_without_panicking() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let mut spool = Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap();
        for _ in 0..4 {
            push_new(&mut spool);
        }
        drop(spool);
        fs::write(dir.join(batch_name(1)), b"\xff\xff\xff not postcard").unwrap();
        fs::write(dir.join(batch_name(2)), b"").unwrap();
        // A valid batch under the wrong name is not trusted either.
        fs::write(
            dir.join(batch_name(3)),
            postcard::to_stdvec(&batch(9)).unwrap(),
        )
        .unwrap();
        fs::write(dir.join(".00000000000000000005.batch.tmp"), b"half").unwrap();
        fs::write(dir.join("notes.txt"), b"left alone").unwrap();

        let mut spool = Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap();
        assert!(!dir.join(".00000000000000000005.batch.tmp").exists());
        assert_eq!(spool.pending(), [1, 2, 3, 4]);
        for seq in 1..=3 {
            assert_eq!(spool.load(seq).unwrap(), None, "seq {seq}");
            assert!(!dir.join(batch_name(seq)).exists());
        }
        assert_eq!(spool.load(4).unwrap(), Some(batch(4)));
        assert_eq!(spool.pending(), [4]);
        assert_eq!(spool.dropped(), 3);
        assert!(dir.join("notes.txt").exists());
        // A file deleted behind the spool's back counts as dropped too.
        fs::remove_file(dir.join(batch_name(4))).unwrap();
        assert_eq!(spool.load(4).unwrap(), None);
        assert_eq!(spool.dropped(), 4);
        drop(spool);
        assert_eq!(Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap().dropped(), 4);
    }

    #[test]
    fn spool_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let mut spool = Spool::open(&dir, DEFAULT_MAX_BYTES).unwrap();
        push_new(&mut spool);
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(batch_name(1))), 0o600);
        assert_eq!(mode(&dir.join(NEXT_SEQ_FILE)), 0o600);
    }
}
