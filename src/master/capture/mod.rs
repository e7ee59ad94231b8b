//! Capturing the workers' output ([`Cluster::capture_output`](crate::Cluster::capture_output)):
//! each worker's stdout and stderr are pipes whose read ends the master's loop polls
//! (non-blocking; the workers' ends stay blocking), split into whole lines per worker and
//! stream, kept in a recent-lines ring for `ecewo-cluster logs`, and written, prefixed or as
//! JSON, to the master's stdout or to a log file through a bounded lossy queue and a writer
//! thread ([`queue`]): the loop never blocks on output and a worker never waits for a slow
//! consumer (the master reads on and drops whole lines, counted).
//!
//! | file | what it does |
//! | --- | --- |
//! | `mod.rs` | the options ([`CaptureOutput`]), the pipes, reading them, the hooks the driver calls |
//! | `split.rs` | bytes in, whole lines (or marked pieces of long ones) out |
//! | `ring.rs` | the recent lines |
//! | `queue.rs` | the bounded lossy queue, its writer thread, the log file and its rotation |

pub(crate) mod queue;
mod ring;
mod split;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crate::error::Error;
use crate::proto::control::{LogLine, LogStream};
use crate::signal::Signal;
use crate::supervisor::WorkerKey;
use queue::{Limits, LogFile, Lossy, Target};

/// How captured lines are written ([`CaptureOutput::format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CaptureFormat {
    /// `[worker 3 pid 1234] text` for standard output, `[worker 3 pid 1234 stderr] text` for
    /// standard error (the default).
    #[default]
    Prefix,
    /// One JSON object per line:
    /// `{"time":"2025-01-02T03:04:05.678Z","worker":3,"pid":1234,"stream":"stdout","line":"text"}`.
    Json,
}

impl fmt::Display for CaptureFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaptureFormat::Prefix => "prefix",
            CaptureFormat::Json => "json",
        })
    }
}

impl std::str::FromStr for CaptureFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<CaptureFormat, String> {
        match s {
            "prefix" | "text" => Ok(CaptureFormat::Prefix),
            "json" => Ok(CaptureFormat::Json),
            other => Err(format!("unknown capture format `{other}`: use prefix or json")),
        }
    }
}

/// The longest captured line by default; longer lines are cut into pieces.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// The signal that reopens the log file by default: `SIGALRM`. Every conventional choice
/// already has a meaning in the master (`SIGHUP`, `SIGTERM`, `SIGINT` and `SIGQUIT` shut down,
/// `SIGUSR1` upgrades, `SIGUSR2` restarts, `SIGTTIN`/`SIGTTOU` scale); `SIGWINCH` arrives at
/// every resize of the terminal the master runs in (and stops the workers of nginx, which
/// operators may remember); nothing sends `SIGALRM` to a process from outside, and the master
/// sets no alarm.
pub const DEFAULT_REOPEN_SIGNAL: Signal = Signal::ALRM;

/// Signals that cannot reopen the log file: the master's own, the uncatchable, the faults.
const RESERVED: &[Signal] = &[
    Signal::TERM,
    Signal::INT,
    Signal::HUP,
    Signal::QUIT,
    Signal::USR1,
    Signal::USR2,
    Signal::TTIN,
    Signal::TTOU,
    Signal::CHLD,
    Signal::KILL,
    Signal::STOP,
    Signal::ILL,
    Signal::TRAP,
    Signal::ABRT,
    Signal::BUS,
    Signal::FPE,
    Signal::SEGV,
    Signal::PIPE,
    Signal::CONT,
    Signal::TSTP,
];

/// Optional capture of the workers' output, for
/// [`Cluster::capture_output`](crate::Cluster::capture_output). Without it (the default) the
/// workers inherit the master's stdout and stderr.
///
/// With it, each worker's stdout and stderr are pipes the master reads; every line is written
/// as [`CaptureFormat::Prefix`] (`[worker 3 pid 1234] text`) or [`CaptureFormat::Json`], to
/// the master's stdout or to a log file ([`to_file`](CaptureOutput::to_file)), and the recent
/// lines are kept for `ecewo-cluster logs`.
///
/// ```
/// use ecewo_cluster::{CaptureFormat, CaptureOutput, Cluster};
/// let cluster = Cluster::new(8080).capture_output(
///     CaptureOutput::new()
///         .format(CaptureFormat::Json)
///         .to_file("/var/log/app/workers.log")
///         .rotate(64 << 20, 5),
/// );
/// # let _ = cluster;
/// ```
///
/// # Caveats
///
/// - **Never blocking means losing lines.** The master reads the pipes as fast as the workers
///   write, so a worker never waits for whoever reads the output. Lines wait in a bounded queue
///   ([`queue`](CaptureOutput::queue)) for the writer; when it falls behind (a stdout nobody
///   reads, a slow disk), whole lines are dropped, counted in
///   [`ClusterStats::log_lines_dropped`](crate::ClusterStats::log_lines_dropped) and the
///   `ecewo_cluster_log_lines_dropped_total` metric, and a line `dropped N lines of worker
///   output` says so in the output itself (at most every 5 s). A line is never cut by a drop,
///   and lines are never interleaved mid-line.
/// - A line longer than [`max_line`](CaptureOutput::max_line) bytes is written as several
///   lines of at most that size: every piece but the last ends with ` [continued]` in the
///   prefixed format, and has `"continued":true` in JSON.
/// - **Nothing on the master's thread may write to a captured stdout with a blocking write.**
///   With the master's stdout as the destination (or a stderr that is the same pipe: `2>&1`,
///   systemd's journal stream), the writer holds the standard library's stdout lock while it
///   writes, also while a stdout nobody reads is full. The master's thread logs through
///   `tracing` and runs the `on_*` callbacks: a `println!` there, or a `tracing` subscriber
///   writing to stdout (`tracing_subscriber::fmt()` does by default), waits for that lock, the
///   loop stops, and so do the workers once their pipes are full. Route the master's logs
///   through `ecewo_cluster::logging` (feature `logging`: it writes stderr from a bounded
///   lossy queue of its own, never blocking the master), or another non-blocking writer, or
///   capture to a file ([`to_file`](CaptureOutput::to_file)).
/// - Written to a pipe, a FIFO, a socket or a terminal, batches go in writes of whole lines of
///   at most 4096 bytes (`PIPE_BUF`: such a write is never split by another process's writes,
///   such as the other master's during an upgrade); a longer line is one write of its own. When
///   stdout and stderr are the same file, the captured output's writer and the
///   `ecewo_cluster::logging` writer take turns, batch by batch.
/// - When a worker exits, what it wrote is read to the end; a process it left behind may hold
///   the pipes open: they are closed a second after the worker's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CaptureOutput {
    pub(crate) format: CaptureFormat,
    pub(crate) file: Option<PathBuf>,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) keep: usize,
    pub(crate) reopen_signal: Signal,
    pub(crate) max_line: usize,
    pub(crate) queue: Limits,
    pub(crate) recent: (usize, usize),
}

impl Default for CaptureOutput {
    fn default() -> CaptureOutput {
        CaptureOutput::new()
    }
}

impl CaptureOutput {
    /// Prefixed lines to the master's stdout, lines of at most 16 KiB, a queue of 10 000 lines
    /// or 4 MiB, and the last 1000 lines or 1 MiB kept for `ecewo-cluster logs`.
    pub fn new() -> CaptureOutput {
        CaptureOutput {
            format: CaptureFormat::Prefix,
            file: None,
            max_bytes: None,
            keep: 5,
            reopen_signal: DEFAULT_REOPEN_SIGNAL,
            max_line: DEFAULT_MAX_LINE,
            queue: Limits { lines: 10_000, bytes: 4 << 20 },
            recent: (1000, 1 << 20),
        }
    }

    /// How lines are written (default [`CaptureFormat::Prefix`]).
    pub fn format(mut self, format: CaptureFormat) -> CaptureOutput {
        self.format = format;
        self
    }

    /// Writes to the file at `path` (appended to, created with mode 0640) instead of the
    /// master's stdout. It is opened at [`init`](crate::Cluster::init) (a path that cannot be
    /// opened fails there), reopened at the same path on the
    /// [`reopen_signal`](CaptureOutput::reopen_signal) and on `ecewo-cluster reopen-logs`, and
    /// rotated by size with [`rotate`](CaptureOutput::rotate).
    pub fn to_file(mut self, path: impl Into<PathBuf>) -> CaptureOutput {
        self.file = Some(path.into());
        self
    }

    /// Rotates the log file once it would grow past `max_bytes`: `path` becomes `path.1`,
    /// `path.1` becomes `path.2`, … up to `path.keep` (older ones are removed; `keep` 0 keeps
    /// none). Rotation happens between lines. Default: no rotation (and `keep` 5).
    pub fn rotate(mut self, max_bytes: u64, keep: usize) -> CaptureOutput {
        self.max_bytes = Some(max_bytes);
        self.keep = keep;
        self
    }

    /// The signal that makes the master reopen its log file (default
    /// [`DEFAULT_REOPEN_SIGNAL`], `SIGALRM`, and why). It must not be one the master already
    /// gives a meaning (`SIGTERM`, `SIGINT`, `SIGHUP`, `SIGQUIT`, `SIGUSR1`, `SIGUSR2`,
    /// `SIGTTIN`, `SIGTTOU`), a fault, or (with a log file) one bound with
    /// [`Cluster::on_signal`](crate::Cluster::on_signal).
    ///
    /// The master handles it whenever the output is captured, also to its stdout: there it
    /// logs "nothing to reopen" (a `SIGALRM` left to its default action would end the master
    /// and, with it, its workers). Without a log file, a signal bound with `on_signal` stays
    /// the program's.
    pub fn reopen_signal(mut self, signal: Signal) -> CaptureOutput {
        self.reopen_signal = signal;
        self
    }

    /// The longest line written whole (default 16 KiB, from 128 bytes to 1 MiB); longer lines
    /// are cut into marked pieces.
    pub fn max_line(mut self, bytes: usize) -> CaptureOutput {
        self.max_line = bytes;
        self
    }

    /// How much may wait for the writer before lines are dropped (default 10 000 lines or
    /// 4 MiB, whichever comes first). The writer takes everything waiting at once, so the
    /// memory used is at most twice the bytes.
    pub fn queue(mut self, lines: usize, bytes: usize) -> CaptureOutput {
        self.queue = Limits { lines, bytes };
        self
    }

    /// How many recent lines the master keeps for `ecewo-cluster logs` (default 1000 lines or
    /// 1 MiB, whichever comes first; at most 8 MiB; 0 lines keeps none).
    pub fn recent(mut self, lines: usize, bytes: usize) -> CaptureOutput {
        self.recent = (lines, bytes);
        self
    }

    /// The signal that reopens the log file, when there is one.
    pub(crate) fn file_reopen_signal(&self) -> Option<Signal> {
        self.file.as_ref().map(|_| self.reopen_signal)
    }

    /// The signal the capture handles, given the signals `bound` with `on_signal`: the reopen
    /// signal whenever the output is captured, also without a log file (logrotate's
    /// `postrotate` may send it all the same, and an unhandled `SIGALRM` would kill the master
    /// and its workers with it), unless there is no file and `on_signal` binds it (then it is
    /// the program's; with a file that is refused by [`Cluster::validate`](crate::Cluster::validate)).
    pub(crate) fn handled_signal(&self, bound: &[Signal]) -> Option<Signal> {
        (self.file.is_some() || !bound.contains(&self.reopen_signal)).then_some(self.reopen_signal)
    }

    /// Checks the options (see [`Cluster::validate`](crate::Cluster::validate)).
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidOption { option: "capture_output", reason });
        if !(128..=1 << 20).contains(&self.max_line) {
            return invalid(format!(
                "max_line {} is out of range; use 128 to 1048576 bytes (default 16384)",
                self.max_line
            ));
        }
        if self.queue.lines == 0 || self.queue.bytes < self.max_line + 128 {
            return invalid(format!(
                "queue of {} lines and {} bytes cannot hold a line; use at least 1 line and max_line + 128 bytes (default 10000 lines, 4 MiB)",
                self.queue.lines, self.queue.bytes
            ));
        }
        if self.recent.1 > 8 << 20 {
            return invalid(format!("recent bytes {} is more than the 8 MiB supported", self.recent.1));
        }
        if let Some(max) = self.max_bytes
            && max < 1024
        {
            return invalid(format!("rotate max_bytes {max} is too small; use at least 1024 bytes"));
        }
        if self.keep > 1000 {
            return invalid(format!("rotate keep {} is more than the 1000 files supported", self.keep));
        }
        if let Some(path) = &self.file
            && (path.file_name().is_none() || path.as_os_str().as_encoded_bytes().ends_with(b"/"))
        {
            return invalid(format!("log file {:?} is not a file path; give one like /var/log/app/workers.log", path));
        }
        if RESERVED.contains(&self.reopen_signal) {
            return invalid(format!(
                "reopen_signal {} already means something to the master or cannot be handled; use another, such as SIGALRM (the default) or SIGWINCH",
                self.reopen_signal
            ));
        }
        Ok(())
    }
}

/// A worker's pipes: its ends for the spawn (moved into the child's stdout and stderr), and
/// the master's ends.
pub(crate) struct WorkerPipes {
    child: Option<(OwnedFd, OwnedFd)>,
    /// The master's ends: stdout's, then stderr's.
    pub(crate) master: (OwnedFd, OwnedFd),
}

impl WorkerPipes {
    /// The worker's ends, its stdout's and its stderr's (once).
    pub(crate) fn take_worker_ends(&mut self) -> Option<(OwnedFd, OwnedFd)> {
        self.child.take()
    }
}

/// The pipe buffer asked for (best effort: the kernel caps what an unprivileged process gets at
/// `/proc/sys/fs/pipe-max-size`, 1 MiB by default, and past the user's share of pipe memory
/// new pipes keep their 64 KiB): a burst of output fits while the master reads.
const PIPE_SIZE: usize = 1 << 20;

/// The most bytes read from one pipe per wake-up of the loop: a worker writing as fast as it
/// can neither holds the loop nor starves the others; `poll` reports the rest at once.
const READ_BUDGET: usize = 64 * 1024;

/// How long the pipes of an exited worker stay open for what is left in them (a process the
/// worker left behind may hold them for ever).
const EXIT_DRAIN: Duration = Duration::from_secs(1);

/// The largest `logs` answer the master builds, in bytes of JSON (the client accepts up to
/// 16 MiB): what one connection may hold of the master's memory until its client reads it.
pub(crate) const ANSWER_BUDGET: usize = 4 << 20;

/// One pipe the master reads.
struct Pipe {
    fd: OwnedFd,
    worker: usize,
    pid: u32,
    split: split::Splitter,
    /// The worker exited: closed at this time at the latest.
    close_at: Option<Instant>,
}

/// A control connection following the captured lines.
pub(crate) struct Follower {
    /// Only this slot's lines.
    pub(crate) worker: Option<usize>,
    /// Lines left out since the last notice to it.
    pub(crate) dropped: u64,
}

/// The capture as the master runs it.
pub(crate) struct Capture {
    config: CaptureOutput,
    /// The signal handled as the reopen signal ([`CaptureOutput::handled_signal`]).
    signal: Option<Signal>,
    pipes: HashMap<(WorkerKey, LogStream), Pipe>,
    recent: ring::Recent,
    out: Lossy,
    /// Control connections following (`logs --follow`), by connection.
    pub(crate) followers: HashMap<super::control::ConnId, Follower>,
    scratch: Vec<u8>,
    /// The pipes of exited workers, by the time they close at the latest (exits come in time
    /// order, so this is too): what is due is found without looking at every pipe.
    closing: VecDeque<(Instant, PipeKey)>,
    /// The descriptors of pipes closed since [`take_closed`](Capture::take_closed): the loop
    /// takes them out of its epoll set before they are closed.
    closed: Vec<(PipeKey, OwnedFd)>,
}

/// A pipe: the worker's, and which of its streams.
pub(crate) type PipeKey = (WorkerKey, LogStream);

impl Capture {
    /// The capture of `config`: its log file is opened now (at `init`), its writer thread
    /// starts with the loop ([`start`](Capture::start)). `bound`: the signals bound with
    /// `on_signal` ([`CaptureOutput::handled_signal`]).
    pub(crate) fn open(config: CaptureOutput, bound: &[Signal]) -> Result<Capture, Error> {
        let target = match &config.file {
            None => Target::Stdout,
            Some(path) => Target::File(LogFile::open(path, config.max_bytes, config.keep).map_err(|e| {
                Error::LogFile { path: path.clone(), reason: format!("cannot open it: {e}; choose a writable path") }
            })?),
        };
        let format = config.format;
        let notice: queue::Notice = Box::new(move |n| drop_notice(format, n));
        let out = Lossy::new(target, config.queue, notice);
        Ok(Capture {
            recent: ring::Recent::new(config.recent.0, config.recent.1),
            signal: config.handled_signal(bound),
            config,
            pipes: HashMap::new(),
            out,
            followers: HashMap::new(),
            scratch: vec![0; READ_BUDGET],
            closing: VecDeque::new(),
            closed: Vec::new(),
        })
    }

    /// Starts the writer thread (from the loop: `init` runs while the process has one thread).
    pub(crate) fn start(&mut self) {
        if let Err(e) = self.out.start("ecewo-cluster-output") {
            tracing::error!("cannot start the writer of the workers' output ({e}); their lines are dropped");
        }
    }

    /// The signal that reopens the log file (registered also without a file: see
    /// [`CaptureOutput::handled_signal`]).
    pub(crate) fn reopen_signal(&self) -> Option<Signal> {
        self.signal
    }

    /// Whether the output goes to a log file (else to the master's stdout).
    pub(crate) fn has_file(&self) -> bool {
        self.config.file.is_some()
    }

    /// Two new pipes for a worker about to be spawned.
    pub(crate) fn worker_pipes(&self) -> std::io::Result<WorkerPipes> {
        let pair = || -> std::io::Result<(OwnedFd, OwnedFd)> {
            let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            // The master's end, kept for the worker's life: above the numbers a spawn copies.
            let read = crate::os::sys::lift(read);
            // Only the master's end: O_NONBLOCK belongs to the open file, and each end is its own.
            rustix::fs::fcntl_setfl(&read, rustix::fs::OFlags::NONBLOCK)?;
            let _ = rustix::pipe::fcntl_setpipe_size(&read, PIPE_SIZE);
            Ok((read, write))
        };
        let (out_read, out_write) = pair()?;
        let (err_read, err_write) = pair()?;
        Ok(WorkerPipes { child: Some((out_write, err_write)), master: (out_read, err_read) })
    }

    /// Reads the pipes `master` (a new worker's, [`WorkerPipes::master`]) from now on.
    pub(crate) fn add(&mut self, key: WorkerKey, worker: usize, pid: u32, master: (OwnedFd, OwnedFd)) {
        let max = self.config.max_line;
        for (stream, fd) in [(LogStream::Stdout, master.0), (LogStream::Stderr, master.1)] {
            let pipe = Pipe { fd, worker, pid, split: split::Splitter::new(max), close_at: None };
            self.pipes.insert((key, stream), pipe);
        }
    }

    /// The pipes to poll.
    pub(crate) fn fds(&self) -> impl Iterator<Item = ((WorkerKey, LogStream), &OwnedFd)> {
        self.pipes.iter().map(|(k, p)| (*k, &p.fd))
    }

    /// Reads what pipe `key` holds, up to the budget; its lines are kept and queued, and
    /// returned for the followers. At EOF the partial last line comes too, and the pipe closes.
    pub(crate) fn read(&mut self, key: (WorkerKey, LogStream)) -> Vec<LogLine> {
        let Some(pipe) = self.pipes.get_mut(&key) else { return Vec::new() };
        let (pieces, eof) = read_pipe(pipe, &mut self.scratch);
        let lines = to_lines(pipe, key.1, pieces);
        if eof && let Some(pipe) = self.pipes.remove(&key) {
            self.closed.push((key, pipe.fd));
            self.prune();
        }
        self.deliver(&lines);
        lines
    }

    /// Worker `key` exited: its pipes close once they are read to the end, or after
    /// [`EXIT_DRAIN`].
    pub(crate) fn exited(&mut self, key: WorkerKey, now: Instant) {
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            if let Some(p) = self.pipes.get_mut(&(key, stream))
                && p.close_at.is_none()
            {
                p.close_at = Some(now + EXIT_DRAIN);
                self.closing.push_back((now + EXIT_DRAIN, (key, stream)));
            }
        }
    }

    /// When the next pipe of an exited worker must be closed: O(1).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.closing.front().map(|(t, _)| *t)
    }

    /// Closes the pipes whose time is up, after a last read; returns their last lines. O(1)
    /// when none is due.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<LogLine> {
        let mut lines = Vec::new();
        while let Some(&(t, key)) = self.closing.front()
            && t <= now
        {
            self.closing.pop_front();
            if let Some(mut pipe) = self.pipes.remove(&key) {
                lines.extend(self.drain(&mut pipe, key.1));
                self.closed.push((key, pipe.fd));
            }
        }
        self.prune();
        self.deliver(&lines);
        lines
    }

    /// Drops the first entries of `closing` whose pipe ended already (read to its end).
    fn prune(&mut self) {
        while self.closing.front().is_some_and(|(_, key)| !self.pipes.contains_key(key)) {
            self.closing.pop_front();
        }
    }

    /// The descriptors of the pipes closed since the last call, and whose they were (the
    /// caller drops them).
    pub(crate) fn take_closed(&mut self) -> Vec<(PipeKey, OwnedFd)> {
        std::mem::take(&mut self.closed)
    }

    /// Everything still in `pipe` (without blocking), and its partial last line.
    fn drain(&mut self, pipe: &mut Pipe, stream: LogStream) -> Vec<LogLine> {
        let mut pieces = Vec::new();
        // Bounded: what the pipe buffer holds, not what a writer still adds.
        for _ in 0..(PIPE_SIZE / READ_BUDGET + 1) {
            let (more, eof) = read_pipe(pipe, &mut self.scratch);
            let empty = more.is_empty();
            pieces.extend(more);
            if eof || empty {
                break;
            }
        }
        pipe.split.finish(&mut pieces);
        to_lines(pipe, stream, pieces)
    }

    /// Keeps `lines` for `logs` and queues them for the output.
    fn deliver(&mut self, lines: &[LogLine]) {
        for l in lines {
            self.recent.push(l);
            let mut bytes = match self.config.format {
                CaptureFormat::Prefix => l.to_string().into_bytes(),
                CaptureFormat::Json => serde_json::to_vec(l).unwrap_or_default(),
            };
            bytes.push(b'\n');
            self.out.push(bytes);
        }
    }

    /// Lines dropped because the output did not keep up.
    pub(crate) fn dropped(&self) -> u64 {
        self.out.dropped()
    }

    /// The newest `n` lines (of `worker`), oldest first, in at most `budget` bytes of JSON.
    pub(crate) fn recent(&self, worker: Option<usize>, n: usize, budget: usize) -> Vec<LogLine> {
        self.recent.last(worker, n, budget.min(ANSWER_BUDGET))
    }

    /// Opens the log file at its path anew (after it was moved away) and hands it to the
    /// writer; the path, or what went wrong.
    pub(crate) fn reopen(&mut self) -> Result<PathBuf, String> {
        let Some(path) = self.config.file.clone() else {
            return Err(
                "the workers' output goes to the master's stdout, not to a file: there is nothing to reopen".into()
            );
        };
        let file = queue::open_append(&path)
            .map_err(|e| format!("cannot reopen the log file {}: {e}; the old one is written to", path.display()))?;
        self.out.reopened(file);
        tracing::info!("reopened the log file {}", path.display());
        Ok(path)
    }
}

impl Drop for Capture {
    /// The master is done: what the workers left in their pipes is read and written out (the
    /// writer gets a second).
    fn drop(&mut self) {
        let keys: Vec<_> = self.pipes.keys().copied().collect();
        let mut lines = Vec::new();
        for key in keys {
            if let Some(mut pipe) = self.pipes.remove(&key) {
                lines.extend(self.drain(&mut pipe, key.1));
            }
        }
        self.deliver(&lines);
        self.out.finish(Duration::from_secs(1));
    }
}

/// One budget's worth of `pipe`, split: the pieces, and whether the pipe ended (EOF, or an
/// error that ends it), in which case the partial last line is among the pieces.
fn read_pipe(pipe: &mut Pipe, scratch: &mut [u8]) -> (Vec<split::Piece>, bool) {
    let mut pieces = Vec::new();
    let mut read = 0;
    let eof = loop {
        if read >= scratch.len() {
            break false;
        }
        match rustix::io::read(&pipe.fd, &mut scratch[read..]) {
            Ok(0) => break true,
            Ok(n) => read += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => break false,
            Err(_) => break true,
        }
    };
    pipe.split.feed(&scratch[..read], &mut pieces);
    if eof {
        pipe.split.finish(&mut pieces);
    }
    (pieces, eof)
}

fn to_lines(pipe: &Pipe, stream: LogStream, pieces: Vec<split::Piece>) -> Vec<LogLine> {
    let now = SystemTime::now();
    pieces
        .into_iter()
        .map(|p| {
            let text =
                String::from_utf8(p.bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            LogLine::new(now, pipe.worker, pipe.pid, stream, text, p.continued)
        })
        .collect()
}

/// The "dropped N lines" line, in the output's format.
fn drop_notice(format: CaptureFormat, n: u64) -> Vec<u8> {
    let text = format!("dropped {n} lines of worker output: the output was not read fast enough");
    let mut line = match format {
        CaptureFormat::Prefix => format!("[ecewo-cluster] {text}").into_bytes(),
        CaptureFormat::Json => serde_json::to_vec(&serde_json::json!({
            "time": crate::rfc3339::format(SystemTime::now()),
            "dropped": n,
            "line": text,
        }))
        .unwrap_or_default(),
    };
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(CaptureOutput::new().validate().is_ok());
        assert!(CaptureOutput::new().to_file("/tmp/x.log").rotate(1 << 20, 3).validate().is_ok());
        for bad in [
            CaptureOutput::new().max_line(10),
            CaptureOutput::new().max_line(2 << 20),
            CaptureOutput::new().queue(0, 1 << 20),
            CaptureOutput::new().queue(10, 100),
            CaptureOutput::new().recent(10, 9 << 20),
            CaptureOutput::new().rotate(100, 1),
            CaptureOutput::new().rotate(1 << 20, 5000),
            CaptureOutput::new().to_file(""),
            CaptureOutput::new().to_file("/var/log/"),
            CaptureOutput::new().reopen_signal(Signal::HUP),
            CaptureOutput::new().reopen_signal(Signal::USR1),
            CaptureOutput::new().reopen_signal(Signal::SEGV),
        ] {
            match bad.validate() {
                Err(Error::InvalidOption { option: "capture_output", reason }) => assert!(!reason.is_empty()),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(CaptureOutput::new().reopen_signal(Signal::WINCH).validate().is_ok());
        assert_eq!("json".parse::<CaptureFormat>(), Ok(CaptureFormat::Json));
        assert_eq!("prefix".parse::<CaptureFormat>(), Ok(CaptureFormat::Prefix));
        assert!("xml".parse::<CaptureFormat>().is_err());
    }

    /// A worker's pipes end to end, without a worker: what is written to its ends comes out as
    /// lines, kept, queued to the file, and the partial last line at the end; the master's end
    /// never blocks, the writer's end does.
    #[test]
    fn pipes_give_whole_lines() {
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-capture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.log");
        let mut c = Capture::open(CaptureOutput::new().to_file(&path).format(CaptureFormat::Json), &[]).unwrap();
        c.start();
        let mut pipes = c.worker_pipes().unwrap();
        let (out_w, err_w) = pipes.child.take().unwrap();
        let flags = rustix::fs::fcntl_getfl(&out_w).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK), "the worker's end blocks");
        assert!(rustix::fs::fcntl_getfl(&pipes.master.0).unwrap().contains(rustix::fs::OFlags::NONBLOCK));
        let key = WorkerKey(7);
        c.add(key, 3, 4242, pipes.master);
        rustix::io::write(&out_w, b"hello\nwor").unwrap();
        rustix::io::write(&err_w, b"oops\n").unwrap();
        let got = c.read((key, LogStream::Stdout));
        assert_eq!(got.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["hello"]);
        assert!(c.read((key, LogStream::Stdout)).is_empty(), "nothing more: no block, no line");
        rustix::io::write(&out_w, b"ld").unwrap();
        drop(out_w);
        let last = c.read((key, LogStream::Stdout));
        assert_eq!(last.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["world"], "the partial last line at EOF");
        let err = c.read((key, LogStream::Stderr));
        assert_eq!((err[0].stream, err[0].worker, err[0].pid), (LogStream::Stderr, 3, 4242));
        // The exited worker's stderr is still held (by a "grandchild"): closed at the deadline.
        let now = Instant::now();
        c.exited(key, now);
        rustix::io::write(&err_w, b"late, no newline").unwrap();
        assert_eq!(c.next_deadline(), Some(now + EXIT_DRAIN));
        let late = c.expire(now + EXIT_DRAIN);
        assert_eq!(late.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["late, no newline"]);
        assert_eq!(c.fds().count(), 0);
        assert_eq!(c.recent(None, 10, usize::MAX).len(), 4);
        assert_eq!(c.recent(None, 10, usize::MAX)[0].line, "hello");
        drop(c);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0]["line"], "hello");
        assert_eq!(lines[0]["worker"], 3);
        assert_eq!(lines[0]["pid"], 4242);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drop_notices_in_both_formats() {
        let text = String::from_utf8(drop_notice(CaptureFormat::Prefix, 12)).unwrap();
        assert_eq!(text, "[ecewo-cluster] dropped 12 lines of worker output: the output was not read fast enough\n");
        let json: serde_json::Value = serde_json::from_slice(&drop_notice(CaptureFormat::Json, 3)).unwrap();
        assert_eq!(json["dropped"], 3);
    }
}
