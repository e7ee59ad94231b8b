//! A bounded, lossy queue of whole lines and the thread that writes them out: to stdout, to
//! stderr, or to a log file with size-based rotation. The side that pushes never blocks and
//! never waits for the writer: a line that does not fit (too many lines or bytes queued) is
//! dropped whole and counted, and the writer says so in the output itself ("dropped N lines"),
//! at most every [`NOTICE_EVERY`].
//!
//! Used by the master for its workers' captured output and its event log (`master::events`,
//! through a [`Target::Sink`] and no notice: a JSON-lines file takes no prose), and by the
//! `logging` feature for the CLI's and the testbed's own logs (one implementation of the
//! pattern, not one per user).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The most often the writer writes a "dropped N lines" notice.
pub(crate) const NOTICE_EVERY: Duration = Duration::from_secs(5);

/// Where the writer thread writes.
pub(crate) enum Target {
    /// The process's standard output, under the standard library's lock (so that other code of
    /// the process printing whole lines never interleaves with ours mid-line).
    Stdout,
    /// The process's standard error, likewise.
    #[cfg_attr(not(feature = "logging"), allow(dead_code))]
    Stderr,
    /// A log file, rotated by size.
    File(LogFile),
    /// Anything that takes a batch of whole lines and deals with its own errors (the event
    /// log's file; in tests, anything).
    Sink(Sink),
}

/// What a [`Target::Sink`] writes each batch to.
pub(crate) type Sink = Box<dyn FnMut(&[Vec<u8>]) + Send>;

/// How much may wait in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) lines: usize,
    pub(crate) bytes: usize,
}

/// Makes the text of a "dropped N lines" notice, newline included.
pub(crate) type Notice = Box<dyn Fn(u64) -> Vec<u8> + Send>;

struct State {
    queue: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The writer is writing a batch it took.
    busy: bool,
    closed: bool,
    /// A log file opened anew (a reopen), for the writer to switch to.
    reopened: Option<File>,
}

struct Inner {
    state: Mutex<State>,
    /// Something to write, a reopen, or the end.
    work: Condvar,
    /// The writer finished a batch.
    idle: Condvar,
    dropped: AtomicU64,
    limits: Limits,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue; its writer thread runs from [`Lossy::start`] until [`Lossy::finish`] (or drop).
pub(crate) struct Lossy {
    inner: Arc<Inner>,
    /// Until started: what the thread will write to, and its notice (none: drops are only
    /// counted).
    pending: Option<(Target, Option<Notice>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lossy {
    /// A queue for `target` (no thread yet: lines pushed before [`start`](Lossy::start) wait,
    /// within the limits).
    pub(crate) fn new(target: Target, limits: Limits, notice: Notice) -> Lossy {
        Lossy::with(target, limits, Some(notice))
    }

    /// A queue that only counts what it drops ([`dropped`](Lossy::dropped)): no notice in the
    /// output.
    pub(crate) fn quiet(target: Target, limits: Limits) -> Lossy {
        Lossy::with(target, limits, None)
    }

    fn with(target: Target, limits: Limits, notice: Option<Notice>) -> Lossy {
        let state = State { queue: VecDeque::new(), bytes: 0, busy: false, closed: false, reopened: None };
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            work: Condvar::new(),
            idle: Condvar::new(),
            dropped: AtomicU64::new(0),
            limits,
        });
        Lossy { inner, pending: Some((target, notice)), thread: None }
    }

    /// Starts the writer thread named `name`. If it cannot be started, lines go on being
    /// dropped and counted (the process has bigger problems).
    pub(crate) fn start(&mut self, name: &str) -> io::Result<()> {
        let Some((target, notice)) = self.pending.take() else { return Ok(()) };
        let inner = self.inner.clone();
        let thread =
            std::thread::Builder::new().name(name.to_owned()).spawn(move || write_out(&inner, target, notice))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Queues `line` (a whole line, newline included); `false` when it was dropped (and
    /// counted) because the queue is full or closed. Never blocks on the writer.
    pub(crate) fn push(&self, line: Vec<u8>) -> bool {
        push(&self.inner, line)
    }

    /// Lines dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// A handle that pushes to this queue from anywhere (the `logging` feature's writer).
    #[cfg(feature = "logging")]
    pub(crate) fn pusher(&self) -> Pusher {
        Pusher(self.inner.clone())
    }

    /// Hands the writer a log file opened anew: it writes there from its next batch on.
    pub(crate) fn reopened(&self, file: File) {
        self.inner.lock().reopened = Some(file);
        self.inner.work.notify_one();
    }

    /// Writes out what is queued, waiting at most `timeout` for the writer (which may be stuck
    /// on a full pipe), and ends it. Lines pushed later are dropped.
    pub(crate) fn finish(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.lock();
        st.closed = true;
        self.inner.work.notify_one();
        if self.thread.is_none() {
            return;
        }
        while !st.queue.is_empty() || st.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Left behind, blocked: it ends with the process. What it did not take is
                // lost, and counted.
                let left_behind = st.queue.len() as u64;
                st.queue.clear();
                st.bytes = 0;
                self.inner.dropped.fetch_add(left_behind, Ordering::Relaxed);
                self.thread = None;
                return;
            }
            st = self.inner.idle.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(st);
        if let Some(t) = self.thread.take() {
            // It is past its last batch (the queue is empty and it is not busy): it returns at
            // once, after a last notice at most.
            let _ = t.join();
        }
    }
}

/// Pushes to a [`Lossy`] queue ([`Lossy::push`]); clonable, for writers that live anywhere.
#[cfg(feature = "logging")]
#[derive(Clone)]
pub(crate) struct Pusher(Arc<Inner>);

#[cfg(feature = "logging")]
impl Pusher {
    /// As [`Lossy::push`].
    pub(crate) fn push(&self, line: Vec<u8>) -> bool {
        push(&self.0, line)
    }
}

impl Drop for Lossy {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish(Duration::from_secs(1));
        }
    }
}

fn push(inner: &Inner, line: Vec<u8>) -> bool {
    let mut st = inner.lock();
    let limits = inner.limits;
    if st.closed || st.queue.len() >= limits.lines || st.bytes + line.len() > limits.bytes {
        drop(st);
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    st.bytes += line.len();
    st.queue.push_back(line);
    drop(st);
    inner.work.notify_one();
    true
}

/// The writer thread: takes every queued line at once and writes them in one go; a notice of
/// the lines dropped since the last one goes first.
fn write_out(inner: &Inner, mut target: Target, notice: Option<Notice>) {
    let mut reported = 0u64;
    let mut last_notice: Option<Instant> = None;
    let mut broken = false;
    loop {
        let (mut batch, reopened, closed) = {
            let mut st = inner.lock();
            while st.queue.is_empty() && st.reopened.is_none() && !st.closed {
                let pending = notice.is_some() && inner.dropped.load(Ordering::Relaxed) > reported;
                if pending && last_notice.is_none_or(|t| t.elapsed() >= NOTICE_EVERY) {
                    break;
                }
                st = inner.work.wait_timeout(st, NOTICE_EVERY).unwrap_or_else(|e| e.into_inner()).0;
            }
            st.busy = true;
            st.bytes = 0;
            (std::mem::take(&mut st.queue), st.reopened.take(), st.closed)
        };
        if let (Some(file), Target::File(log)) = (reopened, &mut target) {
            log.adopt(file);
        }
        let dropped = inner.dropped.load(Ordering::Relaxed);
        if let Some(notice) = notice
            .as_ref()
            .filter(|_| dropped > reported && (closed || last_notice.is_none_or(|t| t.elapsed() >= NOTICE_EVERY)))
        {
            batch.push_front(notice(dropped - reported));
            reported = dropped;
            last_notice = Some(Instant::now());
        }
        if !batch.is_empty() {
            let lines = batch.make_contiguous();
            let result = if broken { Err(io::ErrorKind::BrokenPipe.into()) } else { write_batch(&mut target, lines) };
            if let Err(e) = result {
                // Lost: counted like lines that did not fit (and said so once it works again).
                inner.dropped.fetch_add(lines.len() as u64, Ordering::Relaxed);
                // A reader that went away (`| head`) does not come back; a file may (space freed).
                if e.kind() == io::ErrorKind::BrokenPipe && matches!(target, Target::Stdout | Target::Stderr) {
                    broken = true;
                }
            }
        }
        let mut st = inner.lock();
        st.busy = false;
        inner.idle.notify_all();
        if closed && st.queue.is_empty() {
            return;
        }
    }
}

/// Held around each batch written to stdout or to stderr while the two are the same file
/// (`2>&1`, systemd's journal stream): the captured output's writer and the `logging`
/// feature's writer then never cut each other's lines, whatever the size of their writes.
/// Taken before the standard library's lock of the stream, never after it.
static SHARED_STREAM: Mutex<()> = Mutex::new(());

/// The most bytes a pipe takes in one write without letting another writer's bytes in between
/// (`PIPE_BUF`): batches go to a pipe, a FIFO, a socket or a terminal in writes of whole lines
/// of at most this size, so that even another process's writes (the other master's during an
/// upgrade) never split a line. A longer line is one write of its own.
pub(crate) const ATOMIC_WRITE: usize = 4096;

fn write_batch(target: &mut Target, lines: &[Vec<u8>]) -> io::Result<()> {
    match target {
        Target::Stdout => {
            let _shared = shared_stream();
            let mut out = io::stdout().lock();
            let max = write_size(&out);
            write_chunks(&mut out, lines, max)?;
            out.flush()
        }
        Target::Stderr => {
            let _shared = shared_stream();
            let mut err = io::stderr().lock();
            let max = write_size(&err);
            write_chunks(&mut err, lines, max)
        }
        Target::File(log) => log.write_lines(lines),
        Target::Sink(sink) => {
            sink(lines);
            Ok(())
        }
    }
}

/// [`SHARED_STREAM`], when stdout and stderr are one file now (asked at each batch: cheap,
/// and a program may redirect them at any time).
fn shared_stream() -> Option<MutexGuard<'static, ()>> {
    let id = |s: &rustix::fs::Stat| (s.st_dev, s.st_ino);
    let same = match (rustix::fs::fstat(io::stdout()), rustix::fs::fstat(io::stderr())) {
        (Ok(a), Ok(b)) => id(&a) == id(&b),
        _ => false,
    };
    same.then(|| SHARED_STREAM.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The largest write to `fd`: [`ATOMIC_WRITE`], unless it is a regular file (where appends
/// are whole writes anyway, and fewer are quicker).
fn write_size(fd: &impl std::os::fd::AsFd) -> usize {
    match rustix::fs::fstat(fd) {
        Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile => usize::MAX,
        _ => ATOMIC_WRITE,
    }
}

/// Writes `lines` (each a whole line) in writes of whole lines of at most `max` bytes; a line
/// longer than `max` is a write of its own.
fn write_chunks(out: &mut impl Write, lines: &[Vec<u8>], max: usize) -> io::Result<()> {
    let mut chunk = Vec::with_capacity(max.min(1 << 20));
    for line in lines {
        if !chunk.is_empty() && chunk.len() + line.len() > max {
            out.write_all(&chunk)?;
            chunk.clear();
        }
        if line.len() >= max {
            out.write_all(line)?;
        } else {
            chunk.extend_from_slice(line);
        }
    }
    if !chunk.is_empty() {
        out.write_all(&chunk)?;
    }
    Ok(())
}

/// A log file at a path: appended to, rotated by size (`path` → `path.1` → … → `path.K`), and
/// reopened at the path on request.
pub(crate) struct LogFile {
    path: PathBuf,
    file: File,
    /// Bytes in the file, as far as we know (checked again before rotating: a `copytruncate`
    /// may have emptied it).
    size: u64,
    max_bytes: Option<u64>,
    keep: usize,
    /// The last rotation failed: said once, until one works.
    failing: bool,
}

impl LogFile {
    /// Opens (creates, mode 0640, or appends to) the log file at `path`.
    pub(crate) fn open(path: &Path, max_bytes: Option<u64>, keep: usize) -> io::Result<LogFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile { path: path.to_owned(), file, size, max_bytes, keep, failing: false })
    }

    /// Appends `lines`, rotating first whenever the next line would take the file past its
    /// maximum size (a file holds whole lines only; a single line longer than the maximum
    /// gets a file of its own).
    fn write_lines(&mut self, lines: &[Vec<u8>]) -> io::Result<()> {
        let mut start = 0;
        let mut run = 0u64;
        for (i, line) in lines.iter().enumerate() {
            if let Some(max) = self.max_bytes
                && self.size + run + line.len() as u64 > max
                && self.size + run > 0
            {
                self.append(&lines[start..i])?;
                self.rotate_if_full(max)?;
                start = i;
                run = 0;
            }
            run += line.len() as u64;
        }
        self.append(&lines[start..])
    }

    fn append(&mut self, lines: &[Vec<u8>]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let buf = lines.concat();
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Rotates, unless the file turns out to be smaller than we counted (emptied by someone
    /// else): then the count is corrected.
    fn rotate_if_full(&mut self, max: u64) -> io::Result<()> {
        if let Ok(meta) = self.file.metadata()
            && meta.len() < self.size
        {
            self.size = meta.len();
            if self.size < max {
                return Ok(());
            }
        }
        match self.rotate() {
            Ok(()) => {
                self.failing = false;
                Ok(())
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!("cannot rotate the log file {}: {e}; writing on to it", self.path.display());
                }
                self.failing = true;
                // Writing on to the full file beats losing the lines.
                self.size = 0;
                Ok(())
            }
        }
    }

    /// `path.K-1` → `path.K` (the oldest, `path.K`, is replaced), …, `path` → `path.1`, and a
    /// new file at `path`. With `keep` 0, the old file is removed.
    fn rotate(&mut self) -> io::Result<()> {
        let numbered = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let ignore_missing = |r: io::Result<()>| match r {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        for n in (1..self.keep).rev() {
            ignore_missing(std::fs::rename(numbered(n), numbered(n + 1)))?;
        }
        if self.keep > 0 {
            ignore_missing(std::fs::rename(&self.path, numbered(1)))?;
        } else {
            ignore_missing(std::fs::remove_file(&self.path))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }

    /// Switches to `file`, opened at the path anew; if the path names another file by now (a
    /// rotation happened in between), that one is opened instead.
    fn adopt(&mut self, file: File) {
        let same = match (file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        let file = if same { Ok(file) } else { open_append(&self.path) };
        match file.and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((size, f)) => {
                self.file = f;
                self.size = size;
            }
            Err(e) => {
                tracing::warn!("cannot reopen the log file {}: {e}; writing on to the old one", self.path.display())
            }
        }
    }
}

/// Opens `path` for appending, creating it with mode 0640 (logs may hold what a program
/// should not show everyone). Opened by the master's loop (at `init`, and to reopen), so it
/// never waits: `O_NONBLOCK` (a FIFO without a reader would block the `open`), and anything but
/// a regular file is refused (a FIFO or a device would block the writer, or the loop).
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    let not_a_file = || {
        io::Error::other(format!(
            "{} is not a regular file (a FIFO, socket or device could block the writer)",
            path.display()
        ))
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        // (std adds O_CLOEXEC.)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        // ENXIO: a FIFO without a reader (or a device without its driver).
        .map_err(|e| if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) { not_a_file() } else { e })?;
    if !file.metadata()?.is_file() {
        return Err(not_a_file());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ecewo-cluster-queue-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn notice() -> Notice {
        Box::new(|n| format!("dropped {n}\n").into_bytes())
    }

    /// Without a writer, the queue takes lines up to its limits and drops (and counts) the rest,
    /// whole: nothing blocks.
    #[test]
    fn a_full_queue_drops_whole_lines_and_counts_them() {
        let d = dir("full");
        let log = LogFile::open(&d.join("a.log"), None, 0).unwrap();
        let q = Lossy::new(Target::File(log), Limits { lines: 3, bytes: 1000 }, notice());
        assert!(q.push(b"one\n".to_vec()));
        assert!(q.push(b"two\n".to_vec()));
        assert!(q.push(b"three\n".to_vec()));
        assert!(!q.push(b"four\n".to_vec()), "past the line limit");
        assert_eq!(q.dropped(), 1);
        let q2 = Lossy::new(Target::Stderr, Limits { lines: 100, bytes: 10 }, notice());
        assert!(q2.push(b"123456789\n".to_vec()));
        assert!(!q2.push(b"x\n".to_vec()), "past the byte limit");
        assert_eq!(q2.dropped(), 1);
        // Once written out, the lines are in the file, whole and in order, and the drop is said.
        let mut q = q;
        q.start("test-writer").unwrap();
        q.finish(Duration::from_secs(5));
        let text = std::fs::read_to_string(d.join("a.log")).unwrap();
        assert_eq!(text, "dropped 1\none\ntwo\nthree\n");
        assert!(!q.push(b"late\n".to_vec()), "a finished queue takes nothing");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Rotation at line boundaries: `path`, `path.1` … `path.keep`, never more, each at most the
    /// maximum size.
    #[test]
    fn rotation_keeps_whole_lines_and_respects_keep() {
        let d = dir("rotate");
        let path = d.join("out.log");
        let mut log = LogFile::open(&path, Some(100), 2).unwrap();
        let lines: Vec<Vec<u8>> = (0..40).map(|i| format!("line {i:04} .......\n").into_bytes()).collect();
        // 40 lines of 18 bytes: 5 per file.
        for chunk in lines.chunks(3) {
            log.write_lines(chunk).unwrap();
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let numbered = |n: usize| d.join(format!("out.log.{n}"));
        assert!(!numbered(3).exists(), "keep 2: no third old file");
        for p in [path.clone(), numbered(1), numbered(2)] {
            let text = read(&p);
            assert!(text.len() <= 100, "{} holds {} bytes", p.display(), text.len());
            assert!(text.lines().all(|l| l.starts_with("line ") && l.len() == 17), "whole lines: {text:?}");
        }
        // The newest lines are in `path`, the ones before in .1, then .2.
        assert!(read(&path).ends_with("line 0039 .......\n"));
        assert!(read(&numbered(1)).ends_with("line 0034 .......\n"));
        assert!(read(&numbered(2)).ends_with("line 0029 .......\n"));
        // keep 0: the old file is removed.
        let path0 = d.join("zero.log");
        let mut log = LogFile::open(&path0, Some(30), 0).unwrap();
        log.write_lines(&lines[..4]).unwrap();
        assert_eq!(read(&path0), "line 0003 .......\n");
        assert!(!d.join("zero.log.1").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Batches are cut into writes of whole lines of at most the size given; a longer line is
    /// one write.
    #[test]
    fn chunks_end_on_line_boundaries() {
        /// Records each write.
        struct Writes(Vec<Vec<u8>>);
        impl Write for Writes {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.push(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let line = |c: u8, n: usize| {
            let mut l = vec![c; n - 1];
            l.push(b'\n');
            l
        };
        let lines = [line(b'a', 40), line(b'b', 50), line(b'c', 30), line(b'd', 250), line(b'e', 10)];
        let mut w = Writes(Vec::new());
        write_chunks(&mut w, &lines, 100).unwrap();
        let sizes: Vec<usize> = w.0.iter().map(Vec::len).collect();
        assert_eq!(sizes, [90, 30, 250, 10]);
        assert!(w.0.iter().all(|c| c.ends_with(b"\n")));
        assert_eq!(w.0.concat(), lines.concat(), "everything, in order");
        let mut w = Writes(Vec::new());
        write_chunks(&mut w, &lines, usize::MAX).unwrap();
        assert_eq!(w.0.len(), 1, "a regular file: one write");
    }

    /// A FIFO is refused at once (its `open` would block without a reader).
    #[test]
    fn a_fifo_is_not_a_log_file() {
        let d = dir("fifo");
        let path = d.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&path).status().unwrap().success());
        let e = open_append(&path).unwrap_err();
        assert!(e.to_string().contains("is not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A file moved away (as logrotate does): the writer goes on into the moved file until it
    /// is handed the file reopened at the path.
    #[test]
    fn a_reopened_file_takes_the_next_lines() {
        let d = dir("reopen");
        let path = d.join("app.log");
        let log = LogFile::open(&path, None, 0).unwrap();
        let mut q = Lossy::new(Target::File(log), Limits { lines: 100, bytes: 10_000 }, notice());
        q.start("test-writer").unwrap();
        q.push(b"before\n".to_vec());
        let moved = d.join("app.log.old");
        let written = |p: &Path, text: &str| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(p).unwrap_or_default() != text {
                assert!(Instant::now() < deadline, "{} never held {text:?}", p.display());
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        written(&path, "before\n");
        std::fs::rename(&path, &moved).unwrap();
        q.push(b"moved\n".to_vec());
        written(&moved, "before\nmoved\n");
        q.reopened(open_append(&path).unwrap());
        q.push(b"after\n".to_vec());
        q.finish(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "before\nmoved\n");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
