//! Logs of a program that runs a cluster, set up in one call (feature `logging`; the
//! `ecewo-cluster` CLI and the testbed use it): `tracing` events to stderr as text or as JSON
//! lines, filtered by `RUST_LOG` (default `info`), through a bounded lossy queue written by a
//! thread of its own, so that the master never blocks on a stderr nobody reads (a stuck log
//! collector): lines that do not fit are dropped whole and counted, and a line says so.
//!
//! ```no_run
//! use ecewo_cluster::logging::{self, LogFormat};
//! use ecewo_cluster::{Cluster, Role};
//!
//! logging::init(LogFormat::Json);
//! let role = Cluster::new(8080).init().expect("init");
//! // After init (which needs one thread); the master only: a worker's lines are plain writes
//! // (see `start`'s caveats).
//! if let Role::Master(_) = &role {
//!     logging::start("app-log");
//! }
//! // …
//! logging::finish("app");
//! # let _ = role;
//! ```
//!
//! In JSON, each line is one object as `tracing-subscriber`'s JSON formatter writes it:
//! `{"timestamp":"2025-01-02T03:04:05.678901Z","level":"INFO","fields":{"message":"…","key":"value"},"target":"ecewo_cluster::master::driver"}`.
//! Colour codes are written only to a terminal, and never with `NO_COLOR` set.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::master::capture::queue::{Limits, Lossy, Pusher, Target};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target` and `fields` (with `message`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format `{other}`: use text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Log lines queued for stderr at most; past it they are dropped (and counted).
const QUEUE: Limits = Limits { lines: 16_384, bytes: 8 << 20 };

/// The queue, once started; until then lines go to stderr directly.
static PUSHER: OnceLock<Pusher> = OnceLock::new();
/// The queue's owner, to write it out at the end.
static QUEUE_OWNER: Mutex<Option<Lossy>> = Mutex::new(None);
/// The format chosen at [`init`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the global `tracing` subscriber: `format` to stderr, `RUST_LOG` (default `info`).
/// Starts no thread (call it before [`Cluster::init`](crate::Cluster::init)); lines go to
/// stderr directly until [`start`]. A second call changes nothing.
pub fn init(format: LogFormat) {
    if FORMAT.set(format).is_err() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_writer(Writer).with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour_on_stderr()).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).with_current_span(false).try_init(),
    };
}

/// Starts the queue and its writer thread, named `thread_name`. Call it after
/// [`Cluster::init`](crate::Cluster::init), which must run while the process has one thread.
///
/// # Caveats
/// Call it in the master (which must never block on its stderr); in a worker, think twice: a
/// second thread makes glibc leave its single-threaded fast paths for the life of the process
/// (a few per cent of a hello-world server's throughput), and without it a worker's lines are
/// plain blocking writes, each line one `write`, like any program's. The testbed starts it in
/// the master only.
pub fn start(thread_name: &str) {
    let format = FORMAT.get().copied().unwrap_or_default();
    let notice = Box::new(move |n: u64| {
        let text = format!("{n} log lines were dropped: stderr was not read fast enough");
        let mut line = match format {
            LogFormat::Text => format!("WARN {text}").into_bytes(),
            LogFormat::Json => serde_json::to_vec(&serde_json::json!({
                "timestamp": crate::rfc3339::format(std::time::SystemTime::now()),
                "level": "WARN",
                "fields": { "message": text },
                "target": "ecewo_cluster::logging",
            }))
            .unwrap_or_default(),
        };
        line.push(b'\n');
        line
    });
    let mut owner = QUEUE_OWNER.lock().unwrap_or_else(|e| e.into_inner());
    if owner.is_some() {
        return;
    }
    let mut queue = Lossy::new(Target::Stderr, QUEUE, notice);
    if let Err(e) = queue.start(thread_name) {
        eprintln!("cannot start the log writer ({e}); logging to stderr directly");
        return;
    }
    let _ = PUSHER.set(queue.pusher());
    *owner = Some(queue);
}

/// Writes one line to the log, never blocking once the queue runs: as it is in text, as a
/// `tracing` event (level `INFO`, target `program`) in JSON, so that every line parses.
pub fn line(args: std::fmt::Arguments<'_>) {
    if FORMAT.get() == Some(&LogFormat::Json) {
        tracing::info!(target: "program", "{args}");
        return;
    }
    match PUSHER.get() {
        Some(q) => {
            q.push(format!("{args}\n").into_bytes());
        }
        // One write of the whole line: `eprintln!` writes piece by piece, and the lines of
        // processes sharing a stderr (workers) would interleave.
        None => {
            let _ = std::io::stderr().write_all(format!("{args}\n").as_bytes());
        }
    }
}

/// At the end of `main`: writes out what is queued (waiting at most a second for a stderr
/// nobody reads) and says, as `program: N log lines were dropped…`, how many were lost.
pub fn finish(program: &str) {
    let queue = QUEUE_OWNER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(mut queue) = queue {
        queue.finish(Duration::from_secs(1));
        let dropped = queue.dropped();
        if dropped > 0 {
            let _ = writeln!(
                std::io::stderr(),
                "{program}: {dropped} log lines were dropped: stderr was not read fast enough"
            );
        }
    }
}

/// Where the subscriber writes: the queue once it runs, stderr before.
#[derive(Clone, Copy)]
struct Writer;

/// One log write: queued, or direct.
enum Out {
    Queued(Pusher),
    Direct(std::io::Stderr),
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            // One event is one write of its whole line: queued whole, or dropped whole.
            Out::Queued(q) => {
                q.push(buf.to_vec());
                Ok(buf.len())
            }
            Out::Direct(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::Queued(_) => Ok(()),
            Out::Direct(e) => e.flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Out;

    fn make_writer(&'a self) -> Out {
        match PUSHER.get() {
            Some(q) => Out::Queued(q.clone()),
            None => Out::Direct(std::io::stderr()),
        }
    }
}

/// Colour codes only for a person at a terminal, and never with `NO_COLOR` set (no-color.org).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("text or json"));
        assert_eq!(LogFormat::Json.to_string(), "json");
    }
}
