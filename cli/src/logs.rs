//! `ecewo-cluster logs`: the workers' recent captured output, and with `--follow` every new
//! line as it comes, across restarts and upgrades of the master (it reconnects, and says so on
//! stderr).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use ecewo_cluster::Signal;
use ecewo_cluster::control::{self, Client, ClientError, LogEvent, LogLine, LogStream, Request, Response};

#[derive(Args)]
pub(crate) struct LogsArgs {
    /// Keep printing new lines as they are captured (Ctrl-C to stop); reconnects, and says so
    /// on stderr, when the master goes away (an upgrade or a restart of the master).
    #[arg(short, long)]
    follow: bool,
    /// Only this worker slot's lines.
    #[arg(long, value_name = "N")]
    worker: Option<usize>,
    /// At most this many recent lines (the newest).
    #[arg(short = 'n', long = "lines", value_name = "LINES", default_value_t = control::DEFAULT_LOG_LINES)]
    lines: usize,
    /// One JSON object per line (time, worker, pid, stream, line).
    #[arg(long)]
    json: bool,
}

/// The longest pause between two attempts to reach a master that went away.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Why printing stopped.
enum Stop {
    /// The reader of our output went away (`| head`): done, quietly.
    ReaderGone,
    /// The master closed the connection (when following: it went away).
    Closed,
    /// A failure, to report.
    Failed(String),
}

/// The newest line printed: its time, and the lines printed with that very time (times are
/// milliseconds: several lines may share one), so that a reconnection to the same master
/// prints none of them again.
#[derive(Default)]
struct Printed {
    time: Option<SystemTime>,
    at_time: HashSet<(u32, LogStream, String)>,
}

impl Printed {
    fn is_new(&self, l: &LogLine) -> bool {
        match self.time {
            None => true,
            Some(t) => l.time > t || (l.time == t && !self.at_time.contains(&key(l))),
        }
    }

    fn note(&mut self, l: &LogLine) {
        if self.time != Some(l.time) {
            self.time = Some(l.time);
            self.at_time.clear();
        }
        self.at_time.insert(key(l));
    }
}

fn key(l: &LogLine) -> (u32, LogStream, String) {
    (l.pid, l.stream, l.line.clone())
}

struct Printer {
    out: std::io::Stdout,
    json: bool,
    printed: Printed,
}

impl Printer {
    /// Prints one event, each line in one write, flushed; `Err(Stop::ReaderGone)` when nobody
    /// reads our output any more.
    fn print(&mut self, event: &LogEvent) -> Result<(), Stop> {
        let mut text = match (event, self.json) {
            (LogEvent::Line(l), true) => serde_json::to_string(l).unwrap_or_default(),
            (LogEvent::Line(l), false) => l.to_string(),
            (LogEvent::Dropped(n), true) => serde_json::json!({ "dropped": n }).to_string(),
            (LogEvent::Dropped(n), false) => {
                format!("[ecewo-cluster] {n} lines left out: this client did not read fast enough")
            }
            (_, _) => return Ok(()),
        };
        text.push('\n');
        let mut out = self.out.lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(Stop::ReaderGone),
            Err(e) => return Err(Stop::Failed(format!("cannot write the output: {e}"))),
        }
        if let LogEvent::Line(l) = event {
            self.printed.note(l);
        }
        Ok(())
    }
}

pub(crate) fn main(args: LogsArgs, path: &Path, timeout: Duration) -> ExitCode {
    if args.follow {
        stop_on_signals();
    }
    let mut printer = Printer { out: std::io::stdout(), json: args.json, printed: Printed::default() };
    match run(&args, path, timeout, &mut printer) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ecewo-cluster: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C, SIGTERM and SIGHUP end a follower with status 0 (each line is written whole and
/// flushed as it comes, so there is nothing left to write): a thread waits for them.
fn stop_on_signals() {
    let (mut read, write) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ecewo-cluster: cannot handle Ctrl-C ({e}); it ends this command with its signal");
            return;
        }
    };
    for sig in [Signal::INT, Signal::TERM, Signal::HUP] {
        let registered =
            write.try_clone().and_then(|w| signal_hook::low_level::pipe::register(sig.as_raw(), w).map(|_| ()));
        if let Err(e) = registered {
            eprintln!("ecewo-cluster: cannot handle {sig}: {e}");
        }
    }
    let spawned = std::thread::Builder::new().name("stop".into()).spawn(move || {
        let mut byte = [0u8];
        if read.read(&mut byte).is_ok_and(|n| n > 0) {
            std::process::exit(0);
        }
    });
    if let Err(e) = spawned {
        eprintln!("ecewo-cluster: cannot handle Ctrl-C ({e}); it ends this command with its signal");
    }
}

fn run(args: &LogsArgs, path: &Path, timeout: Duration, printer: &mut Printer) -> Result<(), String> {
    let mut client = Client::connect(path, timeout).map_err(|e| e.to_string())?;
    let request = Request::Logs { worker: args.worker, lines: args.lines, follow: args.follow };
    if !args.follow {
        return match stream(&mut client, &request, printer, |_| true) {
            Stop::ReaderGone | Stop::Closed => Ok(()),
            Stop::Failed(message) => Err(message),
        };
    }
    // The master followed (its pid: which lines are new after a reconnection).
    let mut master = master_of(&mut client, path).ok();
    let mut same_master = false;
    loop {
        let outcome = if same_master {
            // The same master again: only what was not printed yet.
            let seen = std::mem::take(&mut printer.printed);
            let outcome = stream(&mut client, &request, printer, |l| seen.is_new(l));
            if printer.printed.time.is_none() {
                printer.printed = seen;
            }
            outcome
        } else {
            // Another master's lines are all new here: its recent ones, then the new ones.
            stream(&mut client, &request, printer, |_| true)
        };
        match outcome {
            Stop::ReaderGone => return Ok(()),
            Stop::Failed(message) => return Err(message),
            Stop::Closed => {}
        }
        let pid = master.map_or_else(String::new, |p| format!(" (pid {p})"));
        eprintln!("ecewo-cluster: the master{pid} went away; waiting for a master at {}", path.display());
        (client, same_master) = loop {
            let mut c = reconnect(path, timeout);
            match master_of(&mut c, path) {
                Ok(pid) if Some(pid) == master => {
                    eprintln!("ecewo-cluster: following master pid {pid} again");
                    break (c, true);
                }
                Ok(pid) => {
                    eprintln!("ecewo-cluster: now following master pid {pid} (upgraded or restarted)");
                    master = Some(pid);
                    break (c, false);
                }
                // Gone again meanwhile (an old master handing over): wait for the next one.
                Err(_) => continue,
            }
        };
    }
}

/// The pid of the master at the other end (the connection then takes requests again).
fn master_of(client: &mut Client, path: &Path) -> Result<u32, ClientError> {
    match client.request(&Request::Status)? {
        Response::Status(s) => Ok(s.master.pid),
        _ => Err(ClientError::BadAnswer(path.to_owned())),
    }
}

/// Asks for `request` and prints the answer's lines that `new` accepts, then (following) each
/// new event until the master closes the connection.
fn stream(client: &mut Client, request: &Request, printer: &mut Printer, new: impl Fn(&LogLine) -> bool) -> Stop {
    let following = matches!(request, Request::Logs { follow: true, .. });
    let lines = match client.request(request) {
        Ok(Response::Logs { lines }) => lines,
        Ok(_) => return Stop::Failed("the master answered something unexpected to `logs`".into()),
        // Gone before it answered: as closed.
        Err(ClientError::NoAnswer(_) | ClientError::Io { .. } | ClientError::Timeout { .. }) if following => {
            return Stop::Closed;
        }
        Err(e) => return Stop::Failed(e.to_string()),
    };
    for l in lines.into_iter().filter(|l| new(l)) {
        if let Err(stop) = printer.print(&LogEvent::Line(l)) {
            return stop;
        }
    }
    if !following {
        return Stop::Closed;
    }
    loop {
        match client.next_log() {
            Ok(Some(event)) => {
                if let Err(stop) = printer.print(&event) {
                    return stop;
                }
            }
            Ok(None) | Err(ClientError::Io { .. } | ClientError::NoAnswer(_)) => return Stop::Closed,
            Err(e) => return Stop::Failed(e.to_string()),
        }
    }
}

/// Connects to `path` again, waiting (with a growing pause, at most [`RECONNECT_MAX`]) for a
/// master to answer there: a new one after an upgrade or a restart. Ctrl-C ends the wait (and
/// the command).
fn reconnect(path: &Path, timeout: Duration) -> Client {
    let mut pause = Duration::from_millis(50);
    let mut said = Instant::now();
    loop {
        match Client::connect(path, timeout) {
            Ok(c) => return c,
            Err(ClientError::NotRunning(_)) => {}
            Err(e) if said.elapsed() > Duration::from_secs(30) => {
                eprintln!("ecewo-cluster: still waiting for a master at {}: {e}", path.display());
                said = Instant::now();
            }
            Err(_) => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(RECONNECT_MAX);
    }
}
