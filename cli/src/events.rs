//! `ecewo-cluster events`: the master's event history, one line per entry, and with `--follow`
//! every new entry as it happens, across restarts and upgrades of the master.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use ecewo_cluster::Signal;
use ecewo_cluster::control::{Client, ClientError, EventStream, EventsLine};

#[derive(Args)]
pub(crate) struct EventsArgs {
    /// Go on printing each new event as it happens (Ctrl-C to stop); reconnects, and says so on
    /// stderr, when the master goes away (an upgrade or a restart of the master).
    #[arg(short, long)]
    follow: bool,
    /// One JSON object per line, as the master records it (the event log's lines).
    #[arg(long)]
    json: bool,
    /// Only the events after this sequence number (the `#N` of each line).
    #[arg(long, value_name = "SEQ")]
    since: Option<u64>,
}

/// How often a follower looks whether it was asked to stop while no event comes.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// The longest pause between two attempts to reach a master that went away.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Why printing stopped.
enum Stop {
    /// Done, or asked to stop (Ctrl-C, SIGTERM, the reader of our output went away).
    Done,
    /// The master closed the connection (when following: it went away).
    Closed,
    /// A failure, to report.
    Failed(String),
}

struct Printer {
    out: std::io::BufWriter<std::io::Stdout>,
    json: bool,
    follow: bool,
}

impl Printer {
    /// Prints one line; false when nobody reads our output any more (`| head`).
    fn line(&mut self, l: &EventsLine) -> bool {
        let written = match l {
            EventsLine::Event(e) if self.json => self.out.write_all(&e.to_json_line()),
            EventsLine::Event(e) => writeln!(self.out, "{e}"),
            EventsLine::Missed { count, next_seq } => {
                let _ = self.out.flush();
                eprintln!(
                    "ecewo-cluster: {count} events left the master's history before they could be read (it keeps a bounded number); going on with #{next_seq}"
                );
                Ok(())
            }
            _ => Ok(()),
        };
        // A follower's lines go out as they come; a listing in one go.
        let flushed = if self.follow { written.and_then(|()| self.out.flush()) } else { written };
        flushed.is_ok()
    }
}

pub(crate) fn main(args: EventsArgs, path: PathBuf, timeout: Duration) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    if args.follow {
        // Ctrl-C (or a SIGTERM) ends a follower cleanly, with status 0.
        for sig in [Signal::INT, Signal::TERM, Signal::HUP] {
            if let Err(e) = signal_hook::flag::register(sig.as_raw(), stop.clone()) {
                eprintln!("ecewo-cluster: cannot handle {sig}: {e}");
            }
        }
    }
    let mut printer = Printer { out: std::io::BufWriter::new(std::io::stdout()), json: args.json, follow: args.follow };
    let code = run(&args, &path, timeout, &stop, &mut printer);
    let _ = printer.out.flush();
    code
}

fn run(args: &EventsArgs, path: &Path, timeout: Duration, stop: &AtomicBool, printer: &mut Printer) -> ExitCode {
    let mut client = match Client::connect(path, timeout) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    // The master followed, and the last entry printed.
    let (mut master, mut last) = (None, args.since);
    let mut backoff = Backoff::new(path);
    loop {
        let begun = Instant::now();
        let (stopped, streamed) = stream(&mut client, args.follow, stop, printer, &mut master, &mut last);
        match stopped {
            Stop::Done => return ExitCode::SUCCESS,
            Stop::Failed(message) => return fail(&message),
            Stop::Closed if !args.follow => {
                return fail("the master closed the connection before the end of the history (did it exit?)");
            }
            Stop::Closed => {}
        }
        if streamed {
            let pid = master.map_or_else(String::new, |p: u32| format!(" (pid {p})"));
            eprintln!("ecewo-cluster: the master{pid} went away; waiting for a master at {}", path.display());
            // A stream that lasted: the next master is tried at once. One that ended as soon
            // as it began is a failed attempt like any other.
            if begun.elapsed() >= RECONNECT_MAX {
                backoff.reset();
            }
        } else {
            backoff.failed("the master closed the connection without answering");
        }
        client = loop {
            if !backoff.wait(stop) {
                return ExitCode::SUCCESS;
            }
            let mut c = match Client::connect(path, timeout) {
                Ok(c) => c,
                Err(ClientError::NotRunning(_)) => {
                    backoff.failed_quietly();
                    continue;
                }
                Err(e) => {
                    backoff.failed(&e.to_string());
                    continue;
                }
            };
            // Which master answers: sequence numbers are its own.
            match master_of(&mut c) {
                Ok(pid) if Some(pid) == master => {
                    eprintln!("ecewo-cluster: following master pid {pid} again");
                }
                Ok(pid) => {
                    // An upgrade or a restart of the master: its history from its beginning.
                    eprintln!("ecewo-cluster: now following master pid {pid}, from the start of its history");
                    (master, last) = (Some(pid), None);
                }
                // A master that will not stream (an older one without `events`, or one with
                // too many followers): waiting would not change its mind.
                Err(ClientError::Refused(message)) => return fail(&message),
                // Gone again meanwhile (an old master handing over): wait for the next one.
                Err(e) => {
                    backoff.failed(&e.to_string());
                    continue;
                }
            }
            break c;
        };
    }
}

/// The pause before the next attempt to reach a master: none after a stream that lasted,
/// then from 50 ms doubling up to [`RECONNECT_MAX`] with every attempt that failed (nothing
/// listening, a connection closed before an answer), so that a socket that accepts and drops
/// at once is not hammered. Failures are said on stderr at most every 30 s.
struct Backoff<'a> {
    path: &'a Path,
    pause: Duration,
    said: Instant,
}

impl Backoff<'_> {
    const FIRST: Duration = Duration::from_millis(50);
    const SAY_EVERY: Duration = Duration::from_secs(30);

    fn new(path: &Path) -> Backoff<'_> {
        Backoff { path, pause: Duration::ZERO, said: Instant::now() }
    }

    fn reset(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// An attempt failed because of `why` (said if nothing was said for a while).
    fn failed(&mut self, why: &str) {
        if self.said.elapsed() > Self::SAY_EVERY {
            eprintln!("ecewo-cluster: still waiting for a master at {}: {why}", self.path.display());
            self.said = Instant::now();
        }
        self.failed_quietly();
    }

    /// An attempt failed in the expected way (nothing listens yet).
    fn failed_quietly(&mut self) {
        self.pause = (self.pause * 2).clamp(Self::FIRST, RECONNECT_MAX);
    }

    /// Waits the pause in short sleeps, so that Ctrl-C is seen at once; false if asked to stop.
    fn wait(&self, stop: &AtomicBool) -> bool {
        let until = Instant::now() + self.pause;
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// The pid of the master at the other end, asked without taking any entry (the connection
/// then takes requests again).
fn master_of(client: &mut Client) -> Result<u32, ClientError> {
    let mut s = client.events(Some(u64::MAX), false)?;
    let pid = s.info().master_pid;
    while s.next_line()?.is_some() {}
    Ok(pid)
}

/// Reads one connection's stream of the entries after `last` to its end; `master` and `last`
/// are set to the master and the entry printed last. Also says whether the master answered
/// with the stream's header.
fn stream(
    client: &mut Client,
    follow: bool,
    stop: &AtomicBool,
    printer: &mut Printer,
    master: &mut Option<u32>,
    last: &mut Option<u64>,
) -> (Stop, bool) {
    let mut s = match client.events(*last, follow) {
        Ok(s) => s,
        // Gone before it answered: as closed.
        Err(ClientError::NoAnswer(_) | ClientError::Io { .. } | ClientError::Timeout { .. }) if follow => {
            return (Stop::Closed, false);
        }
        Err(e) => return (Stop::Failed(e.to_string()), false),
    };
    *master = Some(s.info().master_pid);
    (read_stream(&mut s, follow, stop, printer, last), true)
}

/// Reads the lines of `s` to its end (see [`stream`]).
fn read_stream(
    s: &mut EventStream<'_>,
    follow: bool,
    stop: &AtomicBool,
    printer: &mut Printer,
    last: &mut Option<u64>,
) -> Stop {
    if follow {
        s.set_timeout(Some(STOP_CHECK));
    }
    loop {
        if stop.load(Ordering::Relaxed) {
            return Stop::Done;
        }
        match s.next_line() {
            Ok(Some(l)) => {
                if !printer.line(&l) {
                    return Stop::Done;
                }
                match l {
                    EventsLine::Event(e) => *last = Some(e.seq),
                    EventsLine::End { .. } => return Stop::Done,
                    _ => {}
                }
            }
            Ok(None) => return Stop::Closed,
            Err(ClientError::Timeout { .. }) if follow => {}
            // The master went away in the middle of a line (killed): as closed.
            Err(ClientError::NoAnswer(_) | ClientError::Io { .. }) if follow => return Stop::Closed,
            Err(e) => return Stop::Failed(e.to_string()),
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("ecewo-cluster: {message}");
    ExitCode::FAILURE
}
