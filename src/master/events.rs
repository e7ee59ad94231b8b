//! Where the master's loop takes each batch of the event history's entries (beside the control
//! socket's streams): the copy [`MasterHandle`](crate::MasterHandle)s read ([`EventMirror`]),
//! and the event log file (`Cluster::event_log`, [`EventLog`]): every entry appended as one
//! JSON line.
//!
//! - **Off the loop.** The loop only turns the entries into lines and queues them; a writer
//!   thread writes them out. The queue is bounded ([`QUEUE_LIMITS`]) and lossy: an entry that
//!   does not fit is dropped whole and counted, never waited for, and the loop warns with the
//!   count (at most every [`WARN_EVERY`]). So a file on a stalled network file system costs
//!   entries of the file, never the loop's answers (the history and `ecewo-cluster events` keep
//!   them). The thread starts with the first batch (from the loop: `init` runs while the
//!   process has one thread), and the master's end gives it a second to write out the rest.
//! - **A regular file only.** The path is opened `O_APPEND | O_NONBLOCK | O_CLOEXEC` and
//!   checked with `fstat` (and `stat` before, so that a FIFO or a device is never opened):
//!   anything else (a FIFO whose reader may never read or never come, `/dev/stdout` that is a
//!   pipe or a terminal, a socket) is refused by `init` in one sentence, and ignored (said once)
//!   when rotation finds one at the path.
//! - **One write per batch.** What the writer takes from the queue at once is written with one
//!   `write` on the file opened `O_APPEND`: lines are never interleaved with another writer's
//!   (two masters of an upgrade append to the same file).
//! - **Rotation.** Before each batch the path is checked (`stat`): when it no longer names the
//!   file we hold (logrotate moved it away, or it was deleted), the path is opened again,
//!   created if missing. No signal is needed, and `copytruncate` works too (appends go to the
//!   end of the truncated file). If the path names something that is not a regular file, the
//!   writer says so once and goes on with the file it holds.
//! - **Errors** (a full disk, a removed directory) are logged once, with the path; the entries
//!   of that batch are lost, later batches try again (and their success is logged). A batch
//!   cut short leaves a partial line: the next write begins with a newline, so every other line
//!   stays whole.

use super::capture::queue::{Limits, Lossy, Sink, Target};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::events::ClusterEvent;

/// How much of the event log may wait for its writer: entries and bytes (about 250 bytes an
/// entry: a burst of a thousand-worker restart fits several times).
pub(crate) const QUEUE_LIMITS: Limits = Limits { lines: 20_000, bytes: 8 << 20 };

/// The most often the loop warns that entries were dropped.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(5);

/// How long the master's end waits for the writer to write out what is queued.
const FINISH_WAIT: Duration = Duration::from_secs(1);

/// The event history as handles read it: the loop's copy of the supervisor's ring, kept
/// up to date batch by batch (other threads cannot reach the supervisor). Entries are shared
/// (`Arc`), so that a handle reading the whole history holds the lock the loop also takes only
/// while it copies pointers ([`since`](EventMirror::since)), and clones the entries after.
#[derive(Debug)]
pub(crate) struct EventMirror {
    capacity: usize,
    entries: VecDeque<std::sync::Arc<ClusterEvent>>,
}

impl EventMirror {
    pub(crate) fn new(capacity: usize) -> EventMirror {
        EventMirror { capacity, entries: VecDeque::new() }
    }

    /// Adds a batch, keeping the last `capacity` entries.
    pub(crate) fn extend(&mut self, batch: &[ClusterEvent]) {
        let skip = batch.len().saturating_sub(self.capacity);
        self.entries.extend(batch[skip..].iter().cloned().map(std::sync::Arc::new));
        let over = self.entries.len().saturating_sub(self.capacity);
        self.entries.drain(..over);
    }

    /// The entries kept whose sequence number is after `seq` (all with `None`), oldest first,
    /// shared: call it under the lock, clone them after ([`owned`]).
    pub(crate) fn since(&self, seq: Option<u64>) -> Vec<std::sync::Arc<ClusterEvent>> {
        let after = seq.unwrap_or(0);
        let start = self.entries.partition_point(|e| e.seq <= after);
        self.entries.range(start..).cloned().collect()
    }
}

/// The entries [`EventMirror::since`] gave, as values.
pub(crate) fn owned(shared: Vec<std::sync::Arc<ClusterEvent>>) -> Vec<ClusterEvent> {
    shared.into_iter().map(std::sync::Arc::unwrap_or_clone).collect()
}

/// Why a path cannot be (or become again) the event log.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// It names something other than a regular file (what, as "a FIFO").
    NotAFile(&'static str),
    /// Opening (or creating) it failed.
    Io(io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::NotAFile(what) => write!(
                f,
                "the event log is {what}, not a regular file; it must be a file (to stream the events, use `ecewo-cluster events -f --json`)"
            ),
            OpenError::Io(e) => write!(f, "cannot open it for appending: {e}; choose a writable file"),
        }
    }
}

/// What `meta` describes, if it is not a regular file.
fn not_a_file(meta: &std::fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device (a terminal, /dev/null)")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    }
}

/// Opens (or creates, mode 0640) the regular file at `path` for appending, without ever
/// blocking: a path naming anything else is refused before it is opened (`stat`), and once
/// opened (`fstat`: it may have been replaced in between).
fn open(path: &Path) -> Result<(File, (u64, u64)), OpenError> {
    if let Some(what) = std::fs::metadata(path).ok().as_ref().and_then(not_a_file) {
        return Err(OpenError::NotAFile(what));
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        // O_CLOEXEC is the standard library's default.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // A FIFO without a reader (or a device without its driver), put there since the
            // `stat` above.
            Some(libc::ENXIO) => OpenError::NotAFile("not a regular file"),
            _ => OpenError::Io(e),
        })?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    if let Some(what) = not_a_file(&meta) {
        return Err(OpenError::NotAFile(what));
    }
    Ok((file, (meta.dev(), meta.ino())))
}

/// The event log: a bounded lossy queue of JSON lines ([`Lossy`], the one the captured output
/// uses), whose thread appends them to the file (see the [module documentation](self)).
pub(crate) struct EventLog {
    path: PathBuf,
    queue: Lossy,
    /// Whether the writer thread was started (with the first batch).
    started: bool,
    /// How many of the entries dropped a warning reported, and when the last one was.
    reported: u64,
    last_warning: Option<Instant>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").field("path", &self.path).field("dropped", &self.dropped()).finish_non_exhaustive()
    }
}

impl EventLog {
    /// Opens (or creates) the regular file at `path` for appending; the writer thread starts
    /// with the first batch.
    ///
    /// # Errors
    ///
    /// Why the file cannot be the event log, for `init` to report (`Error::LogFile`).
    pub(crate) fn open(path: &Path) -> Result<EventLog, OpenError> {
        let mut file = EventFile::open(path)?;
        Ok(EventLog::with_sink(path, QUEUE_LIMITS, Box::new(move |lines| file.write(lines))))
    }

    fn with_sink(path: &Path, limits: Limits, sink: Sink) -> EventLog {
        EventLog {
            path: path.to_owned(),
            queue: Lossy::quiet(Target::Sink(sink), limits),
            started: false,
            reported: 0,
            last_warning: None,
        }
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Entries dropped so far (the queue was full, or the writer was left behind at the end).
    fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    /// Queues `entries`, one JSON line each, for the writer; never waits for it. Entries that
    /// do not fit are dropped and counted (see the [module documentation](self)).
    pub(crate) fn append(&mut self, entries: &[ClusterEvent]) {
        if entries.is_empty() {
            return;
        }
        if !std::mem::replace(&mut self.started, true)
            && let Err(e) = self.queue.start("ecewo-cluster-events")
        {
            tracing::error!("event log {}: cannot start its writer ({e}); events are not logged", self.path.display());
            // Closed: every entry from now on is dropped and counted.
            self.queue.finish(Duration::ZERO);
        }
        for e in entries {
            self.queue.push(e.to_json_line());
        }
        if self.dropped() > self.reported && self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.warn_dropped();
        }
    }

    fn warn_dropped(&mut self) {
        tracing::warn!(
            "event log {}: {} events dropped, its writer is behind (a slow or stalled file system?); the history and `ecewo-cluster events` still have them",
            self.path.display(),
            self.dropped() - self.reported
        );
        self.reported = self.dropped();
        self.last_warning = Some(Instant::now());
    }

    /// Ends the writer, letting it write out what is queued within `timeout` (it may be stuck
    /// on a stalled file system: then it is left behind, to end with the process, and what it
    /// did not take is counted as dropped).
    fn finish(&mut self, timeout: Duration) {
        self.queue.finish(timeout);
        if self.dropped() > self.reported {
            self.warn_dropped();
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.finish(FINISH_WAIT);
    }
}

/// The event log's file, as the writer thread holds it.
#[derive(Debug, Default)]
struct EventFile {
    path: PathBuf,
    /// The open file and its device and inode (`None`: opening it again failed).
    file: Option<(File, (u64, u64))>,
    /// An error was logged and nothing worked since.
    failing: bool,
    /// The last write may have stopped in the middle of a line.
    torn: bool,
    /// The path was found naming something that is not a regular file, and that was said.
    refused: bool,
}

impl EventFile {
    /// Opens the file at `path` (see [`open`]).
    fn open(path: &Path) -> Result<EventFile, OpenError> {
        Ok(EventFile { path: path.to_owned(), file: Some(open(path)?), ..EventFile::default() })
    }

    /// Appends `lines` with one write (see the [module documentation](self)).
    fn write(&mut self, lines: &[Vec<u8>]) {
        let result = self.reopen_if_moved().and_then(|()| {
            let mut batch = Vec::with_capacity(lines.iter().map(Vec::len).sum::<usize>() + 1);
            if self.torn {
                batch.push(b'\n');
            }
            for l in lines {
                batch.extend_from_slice(l);
            }
            let (file, _) = self.file.as_mut().expect("opened");
            file.write_all(&batch)
        });
        match result {
            Ok(()) => {
                self.torn = false;
                if std::mem::take(&mut self.failing) {
                    tracing::info!("event log {}: writing again", self.path.display());
                }
            }
            Err(e) => {
                self.torn = true;
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(
                        "event log {}: {e}; events are not logged until it works again (the history and `ecewo-cluster events` still have them)",
                        self.path.display()
                    );
                }
            }
        }
    }

    /// Makes sure the file held is the one the path names: opens the path again if it names
    /// another file now (or none). A path naming something that is not a regular file is
    /// said once and the file held is kept.
    fn reopen_if_moved(&mut self) -> io::Result<()> {
        let current = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        let held = self.file.as_ref().map(|(_, id)| *id);
        if held.is_some() && current == held {
            return Ok(());
        }
        match open(&self.path) {
            Ok(opened) => {
                if held.is_some() {
                    tracing::info!(
                        "event log {}: the file was moved or removed; opening it again",
                        self.path.display()
                    );
                }
                self.file = Some(opened);
                // A new file starts with whole lines.
                self.torn = false;
                self.refused = false;
                Ok(())
            }
            // Nothing to go on with: an error like any other (said once).
            Err(e @ OpenError::NotAFile(_)) if held.is_none() => Err(io::Error::other(e.to_string())),
            Err(e @ OpenError::NotAFile(_)) => {
                if !std::mem::replace(&mut self.refused, true) {
                    tracing::warn!(
                        "event log {}: {e}; writing on to the file held until the path names a regular file again",
                        self.path.display()
                    );
                }
                Ok(())
            }
            Err(OpenError::Io(e)) => {
                self.file = None;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::SystemTime;

    use super::*;
    use crate::events::EventKind;

    fn entry(seq: u64) -> ClusterEvent {
        ClusterEvent::new(seq, SystemTime::now(), 1, Some(0), Some(100 + seq as u32), EventKind::Ready)
    }

    fn lines(seqs: impl IntoIterator<Item = u64>) -> Vec<Vec<u8>> {
        seqs.into_iter().map(|s| entry(s).to_json_line()).collect()
    }

    fn seqs(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<ClusterEvent>(l).expect("a whole JSON line").seq)
            .collect()
    }

    fn mkfifo(path: &Path) {
        rustix::fs::mknodat(rustix::fs::CWD, path, rustix::fs::FileType::Fifo, rustix::fs::Mode::from(0o600), 0)
            .unwrap();
    }

    #[test]
    fn the_mirror_keeps_the_last_entries() {
        let mut m = EventMirror::new(3);
        m.extend(&[entry(1), entry(2)]);
        m.extend(&[entry(3), entry(4), entry(5), entry(6), entry(7)]);
        let seqs = |v: Vec<std::sync::Arc<ClusterEvent>>| owned(v).into_iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(m.since(None)), vec![5, 6, 7]);
        assert_eq!(seqs(m.since(Some(5))), vec![6, 7]);
        assert_eq!(seqs(m.since(Some(1))), vec![5, 6, 7]);
        assert!(m.since(Some(7)).is_empty());
        let mut off = EventMirror::new(0);
        off.extend(&[entry(1)]);
        assert!(off.since(None).is_empty());
    }

    #[test]
    fn lines_are_appended_and_a_rotated_file_is_opened_again() {
        let dir = tempfile_dir("rotate");
        let path = dir.join("events.jsonl");
        std::fs::write(&path, "").unwrap();
        let mut log = EventFile::open(&path).unwrap();
        log.write(&lines([1, 2]));
        log.write(&lines([3]));
        assert_eq!(seqs(&path), vec![1, 2, 3]);
        // logrotate's default: the file is renamed, the next batch goes to a new one.
        std::fs::rename(&path, dir.join("events.jsonl.1")).unwrap();
        log.write(&lines([4]));
        assert_eq!(seqs(&dir.join("events.jsonl.1")), vec![1, 2, 3]);
        assert_eq!(seqs(&path), vec![4]);
        // Removed: created again.
        std::fs::remove_file(&path).unwrap();
        log.write(&lines([5]));
        assert_eq!(seqs(&path), vec![5]);
        // copytruncate: appends go on at the (new) end.
        std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        log.write(&lines([6]));
        assert_eq!(seqs(&path), vec![6]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_error_is_survived_and_the_next_lines_are_whole() {
        let dir = tempfile_dir("error");
        let path = dir.join("events.jsonl");
        let mut log = EventFile::open(&path).unwrap();
        log.write(&lines([1]));
        // The directory goes away: the batch is lost, the writer goes on.
        std::fs::remove_dir_all(&dir).unwrap();
        log.write(&lines([2]));
        assert!(log.failing && log.file.is_none());
        std::fs::create_dir_all(&dir).unwrap();
        log.write(&lines([3]));
        assert!(!log.failing);
        assert_eq!(seqs(&path), vec![3]);
        // A torn line (as a write cut short leaves it) is ended before the next batch.
        log.torn = true;
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"seq\":").unwrap();
        log.write(&lines([4]));
        let text = std::fs::read_to_string(&path).unwrap();
        let whole: Vec<u64> =
            text.lines().filter_map(|l| serde_json::from_str::<ClusterEvent>(l).ok()).map(|e| e.seq).collect();
        assert_eq!(whole, vec![3, 4], "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A FIFO (with no reader: opening it would block; with a reader that never reads: writing
    /// would), a character device, a directory: refused at once, in one sentence, and nothing
    /// is created.
    #[test]
    fn only_a_regular_file_is_opened() {
        let dir = tempfile_dir("fifo");
        let fifo = dir.join("events.fifo");
        mkfifo(&fifo);
        let refused = |path: &Path, what: &str| {
            let (tx, rx) = mpsc::channel();
            let p = path.to_owned();
            std::thread::spawn(move || tx.send(EventLog::open(&p).map(|_| ()).map_err(|e| e.to_string())));
            let result = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("opening {what} blocked"));
            let message = result.expect_err(what);
            assert!(
                message.contains(&format!("the event log is {what}, not a regular file; it must be a file"))
                    && message.contains("ecewo-cluster events -f --json"),
                "{message}"
            );
        };
        refused(&fifo, "a FIFO");
        // A reader that never reads.
        let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        refused(&fifo, "a FIFO");
        drop(reader);
        refused(Path::new("/dev/null"), "a character device (a terminal, /dev/null)");
        refused(&dir, "a directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rotation that finds a FIFO at the path: said once, the file held takes the lines, and
    /// nothing blocks; a regular file at the path again is opened.
    #[test]
    fn a_fifo_found_at_rotation_is_not_opened() {
        let dir = tempfile_dir("fifo-rotate");
        let path = dir.join("events.jsonl");
        let mut log = EventFile::open(&path).unwrap();
        log.write(&lines([1]));
        let moved = dir.join("events.jsonl.1");
        std::fs::rename(&path, &moved).unwrap();
        mkfifo(&path);
        // Without a reader opening it would block (or fail), with one writing would: neither.
        log.write(&lines([2]));
        assert!(log.refused && !log.failing);
        log.write(&lines([3]));
        assert_eq!(seqs(&moved), vec![1, 2, 3]);
        std::fs::remove_file(&path).unwrap();
        log.write(&lines([4]));
        assert!(!log.refused);
        assert_eq!(seqs(&path), vec![4]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A log whose writer took the first batch (entry 1) and is blocked in its sink until
    /// the sender gets `()` (one per batch); the receiver gets each batch's sequence numbers.
    fn blocked_log(limits: Limits) -> (EventLog, mpsc::Sender<()>, mpsc::Receiver<Vec<u64>>) {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (written_tx, written_rx) = mpsc::channel::<Vec<u64>>();
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let sink: Sink = Box::new(move |batch| {
            let _ = entered_tx.send(());
            let _ = release_rx.recv();
            let seqs = batch
                .iter()
                .map(|l| serde_json::from_slice::<ClusterEvent>(l).expect("a whole JSON line").seq)
                .collect();
            let _ = written_tx.send(seqs);
        });
        let mut log = EventLog::with_sink(Path::new("/test/events.jsonl"), limits, sink);
        log.append(&[entry(1)]);
        entered_rx.recv_timeout(Duration::from_secs(5)).expect("the writer took the first batch");
        (log, release_tx, written_rx)
    }

    /// A sink that blocks (a stalled file system) never holds the caller: appends return at
    /// once, entries past the queue's limit are dropped whole and counted, and what was queued
    /// is written out, in order, once the sink moves again.
    #[test]
    fn the_writer_never_blocks_the_caller() {
        let (log, release, written) = blocked_log(Limits { lines: 10, bytes: 1 << 20 });
        // 100 batches while it is blocked: the caller never waits.
        let (done_tx, done_rx) = mpsc::channel();
        let caller = std::thread::spawn(move || {
            let mut log = log;
            for seq in 2..=101 {
                log.append(&[entry(seq)]);
            }
            done_tx.send(()).unwrap();
            log
        });
        done_rx.recv_timeout(Duration::from_secs(5)).expect("append never waits for a blocked writer");
        let mut log = caller.join().unwrap();
        assert_eq!(log.dropped(), 90, "10 queued, the other 90 dropped whole");
        assert_eq!(log.reported, 1, "the first drop said at once, the next ones at most every WARN_EVERY");
        // Let it go: the first batch, then the 10 queued, at once.
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        log.finish(Duration::from_secs(5));
        assert_eq!(log.reported, 90, "the end says the rest");
        let batches: Vec<Vec<u64>> = written.try_iter().collect();
        assert_eq!(batches, vec![vec![1], (2..=11).collect::<Vec<_>>()]);
        // A finished log takes nothing, and counts it.
        log.append(&[entry(200)]);
        assert_eq!(log.dropped(), 91);
    }

    /// The byte limit counts too; the end gives up on a writer stuck for good, counting what
    /// it could not write.
    #[test]
    fn the_byte_limit_drops_whole_entries_and_a_stuck_writer_is_left_behind() {
        let line = entry(2).to_json_line().len();
        let (mut log, release, written) = blocked_log(Limits { lines: 100, bytes: line * 3 + line / 2 });
        log.append(&[entry(2), entry(3), entry(4), entry(5), entry(6)]);
        assert_eq!(log.dropped(), 2, "3 fit in the bytes, the last 2 dropped whole");
        let started = Instant::now();
        log.finish(Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5), "the end does not wait for a stuck writer");
        assert_eq!(log.dropped(), 5, "the 3 queued are counted too");
        assert!(written.try_recv().is_err(), "nothing was written");
        drop(release);
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-event-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
