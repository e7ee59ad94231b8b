//! The control protocol: how the `ecewo-cluster` CLI (or any other tool) talks to a running
//! master over its unix socket.
//!
//! One JSON object per line in each direction. Every request carries the protocol version
//! `"v": 1` and a command:
//!
//! | request | reply (besides `"v": 1, "ok": true`) |
//! | --- | --- |
//! | `{"v":1,"cmd":"status"}` | `"master"`, `"cluster"` ([`ClusterStats`](crate::ClusterStats)), `"workers"` ([`WorkerStats`](crate::WorkerStats) list) |
//! | `{"v":1,"cmd":"restart"}` | `"started": true` (or queued behind a running restart) |
//! | `{"v":1,"cmd":"restart","wait":true}` | sent when the rollout ends: `"outcome"` ([`RestartOutcome`](crate::RestartOutcome)); `"ok"` is false if it did not complete |
//! | `{"v":1,"cmd":"upgrade"}` | `"upgrading": true` once the new master is being started (`"ok"` is false, with `"outcome"`, if the upgrade was refused) |
//! | `{"v":1,"cmd":"upgrade","wait":true}` | sent when the upgrade ends: `"outcome"` ([`UpgradeOutcome`](crate::UpgradeOutcome)); `"ok"` is false if it did not complete |
//! | `{"v":1,"cmd":"scale","workers":N}` | `"workers": N` |
//! | `{"v":1,"cmd":"signal","signal":"USR1"}` (a name, with or without `SIG`, or a number) | `"signal": 10` |
//! | `{"v":1,"cmd":"stop"}` | `"stopping": true` |
//! | `{"v":1,"cmd":"metrics"}` | `"text"`: Prometheus text ([`crate::metrics`]) |
//! | `{"v":1,"cmd":"probe","probe":"live"}` (`live`, `ready` or `startup`) | `"pass"`: true or false, `"detail"`: why |
//! | `{"v":1,"cmd":"logs","worker":1,"lines":100,"follow":true}` (all optional) | `"lines"`: the recent captured lines ([`LogLine`]), oldest first; with `follow`, then one line per new captured line, `{"v":1,"ok":true,"line":{…}}`, and `{"v":1,"ok":true,"dropped":N}` where N lines were left out for a client that did not read fast enough |
//! | `{"v":1,"cmd":"reopen_logs"}` | `"reopened"`: the log file's path |
//! | `{"v":1,"cmd":"events","since":41,"follow":true}` (both optional) | `"history"` ([`EventsInfo`]), then one line per entry (see below) |
//!
//! `events` streams the master's event history ([`ClusterEvent`]): after its header line come
//! the entries kept whose sequence number is after `since` (all kept ones without it), one line
//! each, `{"v":1,"ok":true,"event":{…}}`; without `follow` a last line
//! `{"v":1,"ok":true,"end":{"last_seq":N}}` ends them (the connection then takes requests
//! again); with `follow` each new entry follows as it happens, until the client disconnects.
//! Entries that left the master's ring before they could be sent (a `since` older than the
//! oldest entry kept, or a client reading slower than events happen) are replaced by one line
//! `{"v":1,"ok":true,"missed":{"count":N,"next_seq":S}}`: the master keeps at most 64 KiB of
//! unwritten lines per connection and never blocks on a client. Sequence numbers start at 1
//! in every master process: a client that reconnects after an upgrade of the master (the
//! header's `master_pid` changed) starts again from the new master's beginning. A connection
//! takes no other request while it streams (one sent meanwhile, or right behind `events`, is
//! answered with an error and the connection closed); after the end line it takes requests
//! again.
//!
//! A failed request gets `{"v":1,"ok":false,"error":"what went wrong and what to do"}`. A line
//! longer than [`MAX_REQUEST`] bytes is answered with an error and the connection is closed.
//! Several requests may be sent on one connection. Fields a command does not know are ignored,
//! so newer clients can add optional ones; likewise a client ignores reply fields it does not
//! know. Only the master's user (or root) may connect.
//!
//! In Rust both directions are typed: a [`Request`] is sent with [`Client::request`], which
//! returns the matching [`Response`]; the master encodes its replies from the same types.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::events::ClusterEvent;
use crate::signal::Signal;
use crate::stats::{ClusterStats, RestartOutcome, UpgradeOutcome, WorkerStats};

/// The protocol version this library speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// The longest request line the master accepts, newline included.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The longest answer line a [`Client`] accepts (a status answer of `MAX_WORKERS` workers is
/// about 1 MiB).
pub const MAX_ANSWER: usize = 16 << 20;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The master's, the cluster's and every worker's statistics: [`Response::Status`].
    Status,
    /// A graceful restart: [`Response::RestartStarted`]; with `wait`, the reply comes when the
    /// rollout has ended: [`Response::RestartFinished`].
    Restart {
        /// Reply only once the rollout has ended.
        #[serde(default)]
        wait: bool,
    },
    /// Upgrade the master in place: [`Response::UpgradeStarted`] once the new master is being
    /// started; with `wait`, the reply comes when the upgrade has ended:
    /// [`Response::UpgradeFinished`]. A refused upgrade is answered with its outcome either way.
    Upgrade {
        /// Reply only once the upgrade has ended.
        #[serde(default)]
        wait: bool,
        /// Slot by slot (`true`) or all new workers next to the old ones (`false`); absent: as
        /// the cluster is configured (`Cluster::upgrade_slot_by_slot`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot_by_slot: Option<bool>,
    },
    /// Change the number of workers: [`Response::Scaling`].
    Scale {
        /// The new number of workers.
        workers: usize,
    },
    /// Send a signal to every active worker: [`Response::Signalled`]. On the wire, a name
    /// (`"USR1"`, `"SIGUSR1"`, `"usr1"`) or a number.
    Signal {
        /// The signal.
        signal: Signal,
    },
    /// A graceful shutdown of the whole cluster: [`Response::Stopping`].
    Stop,
    /// The cluster's Prometheus metrics: [`Response::Metrics`].
    Metrics,
    /// One of the probes the admin listener serves: [`Response::Probe`].
    Probe {
        /// Which.
        probe: Probe,
    },
    /// The workers' recent output, when the cluster captures it
    /// ([`Cluster::capture_output`](crate::Cluster::capture_output)): [`Response::Logs`]; with
    /// `follow`, new lines are sent as they come ([`Client::next_log`]). Refused (with a
    /// sentence saying so) when the cluster does not capture.
    Logs {
        /// Only this worker slot's lines (all workers' when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<usize>,
        /// At most this many recent lines (the newest ones).
        #[serde(default = "default_log_lines")]
        lines: usize,
        /// Keep the connection and send new lines as they are captured.
        #[serde(default)]
        follow: bool,
    },
    /// Reopen the captured output's log file (after it was moved away, as logrotate does):
    /// [`Response::LogsReopened`]. Refused when the cluster does not capture to a file.
    ReopenLogs,
    /// The event history: [`Response::Events`] (its header), then [`EventsLine`]s, read with
    /// [`Client::events`] (see the [module documentation](self)).
    Events {
        /// Only the entries after this sequence number (absent: all kept ones).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// Go on with each new entry as it happens, until the client disconnects.
        #[serde(default)]
        follow: bool,
    },
}

/// The lines a [`Request::Logs`] asks for when it does not say.
pub const DEFAULT_LOG_LINES: usize = 100;

fn default_log_lines() -> usize {
    DEFAULT_LOG_LINES
}

/// Which output of a worker a captured line comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LogStream {
    /// Its standard output.
    Stdout,
    /// Its standard error.
    Stderr,
}

impl std::fmt::Display for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        })
    }
}

/// One line of a worker's output as the master captured it
/// ([`Cluster::capture_output`](crate::Cluster::capture_output)). On the wire and in JSON log
/// files: `{"time":"2025-01-02T03:04:05.678Z","worker":3,"pid":1234,"stream":"stdout","line":"…"}`.
///
/// Its [`Display`](std::fmt::Display) is the prefixed text form: `[worker 3 pid 1234] text`
/// for standard output, `[worker 3 pid 1234 stderr] text` for standard error, and a piece of a
/// line longer than the maximum line length ends with ` [continued]` (the rest follows as the
/// next line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LogLine {
    /// When the master read it (on the wire: RFC 3339, UTC, milliseconds).
    #[serde(with = "crate::rfc3339")]
    pub time: SystemTime,
    /// The worker's slot.
    pub worker: usize,
    /// The worker process's pid.
    pub pid: u32,
    /// Standard output or standard error.
    pub stream: LogStream,
    /// The text, without its newline (invalid UTF-8 replaced by U+FFFD).
    pub line: String,
    /// The line was longer than the maximum line length: this is a piece of it, and the rest
    /// follows (absent on the wire when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continued: bool,
}

impl LogLine {
    /// A captured line (for the master).
    pub(crate) fn new(
        time: SystemTime,
        worker: usize,
        pid: u32,
        stream: LogStream,
        line: String,
        continued: bool,
    ) -> LogLine {
        LogLine { time, worker, pid, stream, line, continued }
    }
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stream {
            LogStream::Stdout => write!(f, "[worker {} pid {}] {}", self.worker, self.pid, self.line)?,
            LogStream::Stderr => write!(f, "[worker {} pid {} stderr] {}", self.worker, self.pid, self.line)?,
        }
        if self.continued {
            f.write_str(" [continued]")?;
        }
        Ok(())
    }
}

/// What a following [`Request::Logs`] receives after its first answer ([`Client::next_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogEvent {
    /// A newly captured line.
    Line(LogLine),
    /// This many lines were left out: this client did not read fast enough (the master never
    /// waits for a client).
    Dropped(u64),
}

/// A health probe, as Kubernetes names them: what `/livez`, `/readyz` and `/startupz` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Probe {
    /// The cluster can still run a worker.
    Live,
    /// Enough workers are ready (`min_ready`) and no shutdown was asked for.
    Ready,
    /// The initial start-up completed.
    Startup,
}

impl std::str::FromStr for Probe {
    type Err = String;
    fn from_str(s: &str) -> Result<Probe, String> {
        match s {
            "live" | "liveness" | "livez" => Ok(Probe::Live),
            "ready" | "readiness" | "readyz" => Ok(Probe::Ready),
            "startup" | "startupz" => Ok(Probe::Startup),
            other => Err(format!("unknown probe `{other}`: use live, ready or startup")),
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Probe::Live => "live",
            Probe::Ready => "ready",
            Probe::Startup => "startup",
        })
    }
}

/// The master's answer to a [`Request`] that it carried out.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Response {
    /// The answer to [`Request::Status`].
    Status(Box<Status>),
    /// A rollout was started, or queued behind the one running (`"started": true`).
    RestartStarted,
    /// The rollout that served a waiting restart ended (`"outcome"`); on the wire `"ok"` is false
    /// when it did not complete.
    RestartFinished(RestartOutcome),
    /// The new master of an upgrade is being started (`"upgrading": true`).
    UpgradeStarted,
    /// An upgrade ended, or was refused (`"outcome"`); on the wire `"ok"` is false when it did
    /// not complete.
    UpgradeFinished(UpgradeOutcome),
    /// The cluster is scaling to this many workers (`"workers"`).
    Scaling {
        /// The new number of workers.
        workers: usize,
    },
    /// The signal is being sent to every active worker (`"signal"`, its number).
    Signalled {
        /// The signal.
        signal: Signal,
    },
    /// The cluster is shutting down (`"stopping": true`).
    Stopping,
    /// The cluster's metrics in the Prometheus text format (`"text"`).
    Metrics {
        /// The text.
        text: String,
    },
    /// A probe's verdict (`"pass"`) and why (`"detail"`).
    Probe {
        /// The probe passes.
        pass: bool,
        /// What it is based on, for a person (`"2 of 2 workers ready (at least 1 needed)"`).
        detail: String,
    },
    /// The recent captured lines (`"lines"`), oldest first; with `follow`, [`LogEvent`]s follow
    /// ([`Client::next_log`]).
    Logs {
        /// The lines.
        lines: Vec<LogLine>,
    },
    /// The log file was reopened (`"reopened"`: its path).
    LogsReopened {
        /// The log file.
        path: PathBuf,
    },
    /// The header of an event stream (`"history"`); its lines follow ([`EventsLine`]).
    Events(EventsInfo),
}

/// The header of an event stream ([`Request::Events`]): the history as the master keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventsInfo {
    /// The master's pid: sequence numbers are this master's (a new master starts from 1).
    pub master_pid: u32,
    /// The most entries it keeps (0: the history is off).
    pub capacity: usize,
    /// The oldest entry kept, if any.
    pub first_seq: Option<u64>,
    /// The last entry recorded so far (0 before the first).
    pub last_seq: u64,
}

/// A line of an event stream after its header.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventsLine {
    /// An entry (`"event"`).
    Event(ClusterEvent),
    /// Entries that left the master's ring before they could be sent (`"missed"`).
    Missed {
        /// How many.
        count: u64,
        /// The sequence number of the next entry sent.
        next_seq: u64,
    },
    /// The end of a stream that does not follow (`"end"`).
    End {
        /// The last entry of the stream (0: none).
        last_seq: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct Missed {
    count: u64,
    next_seq: u64,
}
#[derive(Serialize, Deserialize)]
struct End {
    last_seq: u64,
}
#[derive(Serialize)]
struct EventRef<'a> {
    event: &'a ClusterEvent,
}
#[derive(Serialize)]
struct MissedField {
    missed: Missed,
}
#[derive(Serialize)]
struct EndField {
    end: End,
}
#[derive(Deserialize)]
struct StreamLine {
    #[serde(default)]
    event: Option<ClusterEvent>,
    #[serde(default)]
    missed: Option<Missed>,
    #[serde(default)]
    end: Option<End>,
}
#[derive(Serialize, Deserialize)]
struct History {
    history: EventsInfo,
}

impl EventsLine {
    /// The line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            EventsLine::Event(e) => encode_event(e),
            EventsLine::Missed { count, next_seq } => {
                line(true, None, MissedField { missed: Missed { count: *count, next_seq: *next_seq } })
            }
            EventsLine::End { last_seq } => line(true, None, EndField { end: End { last_seq: *last_seq } }),
        }
    }

    /// Reads a line of an event stream: `Ok(None)` for a line this version does not know (a
    /// newer master's), to be skipped.
    ///
    /// # Errors
    ///
    /// [`ClientError::Refused`] for an `"ok": false` line, [`ClientError::BadAnswer`] for a
    /// line that is not the protocol's.
    pub fn decode(reply: &[u8], path: &Path) -> Result<Option<EventsLine>, ClientError> {
        let bad = || ClientError::BadAnswer(path.to_owned());
        let head: Wire<Nothing> = serde_json::from_slice(reply).map_err(|_| bad())?;
        if !head.ok {
            return Err(ClientError::Refused(head.error.unwrap_or_else(|| "the master ended the stream".into())));
        }
        let body = serde_json::from_slice::<Wire<StreamLine>>(reply).map_err(|_| bad())?.body;
        Ok(match body {
            StreamLine { event: Some(e), .. } => Some(EventsLine::Event(e)),
            StreamLine { missed: Some(m), .. } => Some(EventsLine::Missed { count: m.count, next_seq: m.next_seq }),
            StreamLine { end: Some(e), .. } => Some(EventsLine::End { last_seq: e.last_seq }),
            _ => None,
        })
    }
}

/// The stream line of an entry, newline included (without copying it).
pub(crate) fn encode_event(event: &ClusterEvent) -> Vec<u8> {
    line(true, None, EventRef { event })
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// The master process.
    pub master: MasterInfo,
    /// The cluster's statistics.
    pub cluster: ClusterStats,
    /// Every worker slot's statistics.
    pub workers: Vec<WorkerStats>,
}

/// The master process, as [`Request::Status`] describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MasterInfo {
    /// Its pid.
    pub pid: u32,
    /// The cluster's name.
    pub name: String,
    /// The address the cluster listens on.
    pub address: String,
    /// How connections are spread (`reuseport` or `shared`).
    pub balance: String,
    /// When the master started (on the wire: seconds since the Unix epoch).
    #[serde(with = "crate::stats::unix_time")]
    pub started: Option<SystemTime>,
    /// The master's resident memory, in bytes.
    pub rss_bytes: Option<u64>,
}

impl MasterInfo {
    /// The master's description (for the master's own status answer).
    pub(crate) fn new(
        pid: u32,
        name: String,
        address: String,
        balance: String,
        started: SystemTime,
        rss_bytes: Option<u64>,
    ) -> MasterInfo {
        MasterInfo { pid, name, address, balance, started: Some(started), rss_bytes }
    }
}

/// Every line on the wire: the version, whether the request was carried out, why not, and the
/// command's own fields.
#[derive(Serialize, Deserialize)]
struct Wire<T> {
    v: u64,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize, Deserialize)]
struct Started {
    started: bool,
}
#[derive(Serialize, Deserialize)]
struct Outcome {
    outcome: RestartOutcome,
}
#[derive(Serialize, Deserialize)]
struct Upgrading {
    upgrading: bool,
}
#[derive(Serialize, Deserialize)]
struct UpgradeOutcomeField {
    outcome: UpgradeOutcome,
}
#[derive(Serialize, Deserialize)]
struct Workers {
    workers: usize,
}
#[derive(Serialize, Deserialize)]
struct Signalled {
    signal: Signal,
}
#[derive(Serialize, Deserialize)]
struct Stopping {
    stopping: bool,
}
#[derive(Serialize, Deserialize)]
struct Text {
    text: String,
}
#[derive(Serialize, Deserialize)]
struct Verdict {
    pass: bool,
    detail: String,
}
#[derive(Serialize, Deserialize)]
struct Lines {
    lines: Vec<LogLine>,
}
#[derive(Serialize, Deserialize)]
struct Reopened {
    reopened: PathBuf,
}
#[derive(Serialize, Deserialize)]
struct Nothing {}
#[derive(Serialize, Deserialize)]
struct Followed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    line: Option<LogLine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dropped: Option<u64>,
}

impl LogEvent {
    /// The line a following client receives for this event, newline included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            LogEvent::Line(l) => line(true, None, Followed { line: Some(l.clone()), dropped: None }),
            LogEvent::Dropped(n) => line(true, None, Followed { line: None, dropped: Some(*n) }),
        }
    }
}

fn line<T: Serialize>(ok: bool, error: Option<String>, body: T) -> Vec<u8> {
    let mut out = serde_json::to_vec(&Wire { v: PROTOCOL_VERSION, ok, error, body }).unwrap_or_default();
    out.push(b'\n');
    out
}

impl Response {
    /// The reply line for this response, newline included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Status(s) => line(true, None, s),
            Response::RestartStarted => line(true, None, Started { started: true }),
            Response::RestartFinished(outcome) => {
                let ok = outcome.is_completed();
                let error = (!ok).then(|| format!("graceful restart {outcome}"));
                line(ok, error, Outcome { outcome: outcome.clone() })
            }
            Response::UpgradeStarted => line(true, None, Upgrading { upgrading: true }),
            Response::UpgradeFinished(outcome) => {
                let ok = outcome.is_completed();
                let error = (!ok).then(|| format!("upgrade {outcome}"));
                line(ok, error, UpgradeOutcomeField { outcome: outcome.clone() })
            }
            Response::Scaling { workers } => line(true, None, Workers { workers: *workers }),
            Response::Signalled { signal } => line(true, None, Signalled { signal: *signal }),
            Response::Stopping => line(true, None, Stopping { stopping: true }),
            Response::Metrics { text } => line(true, None, Text { text: text.clone() }),
            Response::Probe { pass, detail } => line(true, None, Verdict { pass: *pass, detail: detail.clone() }),
            Response::Logs { lines } => line(true, None, Lines { lines: lines.clone() }),
            Response::LogsReopened { path } => line(true, None, Reopened { reopened: path.clone() }),
            Response::Events(info) => line(true, None, History { history: info.clone() }),
        }
    }

    /// Reads the master's reply line to `request`. An `"ok": false` reply is
    /// [`ClientError::Refused`], except a waited restart that ended without completing, which is
    /// [`Response::RestartFinished`] with its outcome.
    pub fn decode(request: &Request, reply: &[u8], path: &Path) -> Result<Response, ClientError> {
        let bad = || ClientError::BadAnswer(path.to_owned());
        fn parse<'a, T: Deserialize<'a>>(reply: &'a [u8], bad: impl Fn() -> ClientError) -> Result<T, ClientError> {
            serde_json::from_slice::<Wire<T>>(reply).map(|w| w.body).map_err(|_| bad())
        }
        let head: Wire<Nothing> = serde_json::from_slice(reply).map_err(|_| bad())?;
        if !head.ok {
            if let Request::Restart { wait: true } = request
                && let Ok(Outcome { outcome }) = parse(reply, bad)
            {
                return Ok(Response::RestartFinished(outcome));
            }
            // An upgrade that was refused or failed, waited for or not, says how.
            if let Request::Upgrade { .. } = request
                && let Ok(UpgradeOutcomeField { outcome }) = parse(reply, bad)
            {
                return Ok(Response::UpgradeFinished(outcome));
            }
            let message = head.error.unwrap_or_else(|| "the master refused the request".into());
            return Err(ClientError::Refused(message));
        }
        Ok(match request {
            Request::Status => Response::Status(Box::new(parse(reply, bad)?)),
            Request::Restart { wait: false } => Response::RestartStarted,
            Request::Restart { wait: true } => Response::RestartFinished(parse::<Outcome>(reply, bad)?.outcome),
            Request::Upgrade { wait: false, .. } => Response::UpgradeStarted,
            Request::Upgrade { wait: true, .. } => {
                Response::UpgradeFinished(parse::<UpgradeOutcomeField>(reply, bad)?.outcome)
            }
            Request::Scale { .. } => Response::Scaling { workers: parse::<Workers>(reply, bad)?.workers },
            Request::Signal { .. } => Response::Signalled { signal: parse::<Signalled>(reply, bad)?.signal },
            Request::Stop => Response::Stopping,
            Request::Metrics => Response::Metrics { text: parse::<Text>(reply, bad)?.text },
            Request::Probe { .. } => {
                let v = parse::<Verdict>(reply, bad)?;
                Response::Probe { pass: v.pass, detail: v.detail }
            }
            Request::Logs { .. } => Response::Logs { lines: parse::<Lines>(reply, bad)?.lines },
            Request::ReopenLogs => Response::LogsReopened { path: parse::<Reopened>(reply, bad)?.reopened },
            Request::Events { .. } => Response::Events(parse::<History>(reply, bad)?.history),
        })
    }
}

/// The reply line of a request that failed, newline included.
pub fn encode_error(message: &str) -> Vec<u8> {
    line(false, Some(message.to_owned()), Nothing {})
}

/// The line of a request, newline included.
pub fn encode_request(request: &Request) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        v: u64,
        #[serde(flatten)]
        request: &'a Request,
    }
    let mut out = serde_json::to_vec(&Out { v: PROTOCOL_VERSION, request }).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parses one request line (without its newline). Never panics; the error is the message to
/// send back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    #[derive(Deserialize)]
    struct Version {
        v: u64,
    }
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let version: Version = serde_json::from_slice(line).map_err(|e| {
        format!("malformed request: {e}; send one JSON object per line, like {{\"v\":1,\"cmd\":\"status\"}}")
    })?;
    if version.v != PROTOCOL_VERSION {
        return Err(format!(
            "unsupported protocol version {}; this master speaks version {PROTOCOL_VERSION}",
            version.v
        ));
    }
    serde_json::from_slice(line).map_err(|e| {
        format!("invalid request: {e}; commands are status, restart, upgrade, scale, signal, stop, metrics, probe, logs, reopen_logs and events")
    })
}

/// The directory control sockets live in by default: `$XDG_RUNTIME_DIR/ecewo-cluster`, else
/// `<temp dir>/ecewo-cluster-<uid>`.
pub fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("ecewo-cluster"),
        None => std::env::temp_dir().join(format!("ecewo-cluster-{}", rustix::process::geteuid().as_raw())),
    }
}

/// The default socket path of a cluster named `name`.
pub fn socket_path(name: &str) -> PathBuf {
    socket_dir().join(format!("{name}.sock"))
}

/// The control sockets in [`socket_dir`], by name.
pub fn list_sockets() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(socket_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".sock")?.to_owned();
            Some((name, path))
        })
        .collect();
    out.sort();
    out
}

/// Why a control request failed on the client's side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nothing listens at the path.
    #[error("no cluster is running at {0} (is it started? `ecewo-cluster list` shows the running ones)")]
    NotRunning(PathBuf),
    /// The socket belongs to another user.
    #[error("permission denied on {0}: the cluster belongs to another user (run as that user or root)")]
    PermissionDenied(PathBuf),
    /// The master did not answer in time.
    #[error("the master at {path} did not answer within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// The master closed the connection without an answer.
    #[error("the master at {0} closed the connection without answering (was the connection refused?)")]
    NoAnswer(PathBuf),
    /// Another I/O error.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The answer was not what the protocol says.
    #[error("the master at {0} sent an unreadable answer (is it another version of ecewo-cluster?)")]
    BadAnswer(PathBuf),
    /// The master refused the request; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// A connection to a master's control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    timeout: Duration,
    /// The start of a line whose end has not come yet (a read that timed out keeps it).
    partial: Vec<u8>,
}

fn io_error(e: io::Error, path: &Path, timeout: Duration) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout { path: path.into(), timeout },
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::NoAnswer(path.into()),
        _ => ClientError::Io { path: path.into(), source: e },
    }
}

impl Client {
    /// Connects to the socket at `path`; every answer is awaited for at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`ClientError::NotRunning`] when nothing listens there, [`ClientError::PermissionDenied`]
    /// when the socket is another user's.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning(path.into()),
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.into()),
            _ => ClientError::Io { path: path.into(), source: e },
        })?;
        Ok(Client { path: path.into(), reader: BufReader::new(stream), timeout, partial: Vec::new() })
    }

    /// Sends one request and returns the master's answer.
    ///
    /// # Errors
    ///
    /// [`ClientError::Timeout`] when no answer comes within the timeout given to
    /// [`connect`](Client::connect), [`ClientError::Refused`] when the master refused the request
    /// (its message says why), and the other variants when the connection or the answer broke.
    ///
    /// # Caveats
    ///
    /// [`Request::Events`] returns only the stream's header ([`Response::Events`]); read the
    /// lines that follow with [`Client::events`] instead.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request)?;
        let answer = self.read_line(Some(self.timeout))?.ok_or_else(|| ClientError::NoAnswer(self.path.clone()))?;
        Response::decode(request, &answer, &self.path)
    }

    /// Asks for the event history ([`Request::Events`]) and returns its stream: the header is
    /// read, the lines are read with [`EventStream::next_line`].
    ///
    /// # Errors
    ///
    /// As [`request`](Client::request); [`ClientError::Refused`] when the master refuses (a
    /// master without this command answers so too: "invalid request").
    pub fn events(&mut self, since: Option<u64>, follow: bool) -> Result<EventStream<'_>, ClientError> {
        match self.request(&Request::Events { since, follow })? {
            Response::Events(info) => {
                // Following, the next line comes when something happens.
                let timeout = if follow { None } else { Some(self.timeout) };
                Ok(EventStream { client: self, info, timeout, ended: false })
            }
            _ => Err(ClientError::BadAnswer(self.path.clone())),
        }
    }

    fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let line = encode_request(request);
        let (path, timeout) = (self.path.clone(), self.timeout);
        let stream = self.reader.get_mut();
        stream.set_write_timeout(Some(timeout)).map_err(|e| io_error(e, &path, timeout))?;
        stream.write_all(&line).map_err(|e| io_error(e, &path, timeout))
    }

    /// The next line (without its newline), waiting at most `timeout` (`None`: for ever);
    /// `Ok(None)` when the master closed the connection. A line longer than [`MAX_ANSWER`] is
    /// not an answer of ours and must not fill this process's memory.
    fn read_line(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, ClientError> {
        let waited = timeout.unwrap_or(Duration::MAX);
        self.reader.get_mut().set_read_timeout(timeout).map_err(|e| io_error(e, &self.path, waited))?;
        let limit = (MAX_ANSWER + 1).saturating_sub(self.partial.len()) as u64;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.partial)
            .map_err(|e| io_error(e, &self.path, waited))?;
        if self.partial.last() == Some(&b'\n') {
            let mut line = std::mem::take(&mut self.partial);
            line.pop();
            return Ok(Some(line));
        }
        if self.partial.len() > MAX_ANSWER {
            self.partial.clear();
            return Err(ClientError::BadAnswer(self.path.clone()));
        }
        if n == 0 {
            self.partial.clear();
            return Ok(None);
        }
        // Part of a line, then the end of the connection.
        self.partial.clear();
        Err(ClientError::NoAnswer(self.path.clone()))
    }

    /// After a following [`Request::Logs`] was answered: waits (without a time limit) for the
    /// next captured line or drop notice. `Ok(None)` when the master closed the connection (it
    /// stopped, or an upgrade's old master exited).
    ///
    /// # Errors
    ///
    /// [`ClientError::BadAnswer`] for a line that is not a log event, [`ClientError::Io`] when
    /// the connection broke.
    pub fn next_log(&mut self) -> Result<Option<LogEvent>, ClientError> {
        let answer = match self.read_line(None) {
            Ok(Some(a)) => a,
            Ok(None) | Err(ClientError::NoAnswer(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let path = self.path.clone();
        let wire: Wire<Followed> = serde_json::from_slice(&answer).map_err(|_| ClientError::BadAnswer(path.clone()))?;
        if !wire.ok {
            return Err(ClientError::Refused(wire.error.unwrap_or_else(|| "the master ended the log stream".into())));
        }
        match (wire.body.line, wire.body.dropped) {
            (Some(line), _) => Ok(Some(LogEvent::Line(line))),
            (None, Some(n)) => Ok(Some(LogEvent::Dropped(n))),
            (None, None) => Err(ClientError::BadAnswer(path)),
        }
    }
}

/// The lines of an event stream ([`Client::events`]).
#[derive(Debug)]
pub struct EventStream<'a> {
    client: &'a mut Client,
    info: EventsInfo,
    timeout: Option<Duration>,
    ended: bool,
}

impl EventStream<'_> {
    /// The stream's header: the master's pid and its history's bounds.
    pub fn info(&self) -> &EventsInfo {
        &self.info
    }

    /// How long [`next_line`](EventStream::next_line) waits (`None`: until a line comes; the
    /// default when following, the client's timeout otherwise). A wait that ends without a
    /// line is [`ClientError::Timeout`], and the stream goes on: a part of a line read
    /// meanwhile is kept.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The next line: an entry, a gap, or the end (of a stream that does not follow); `Ok(None)`
    /// once the stream ended or the master closed the connection (it exited: when following,
    /// connect again; a new master starts its sequence again).
    ///
    /// # Errors
    ///
    /// [`ClientError::Timeout`] (see [`set_timeout`](EventStream::set_timeout)),
    /// [`ClientError::Refused`] when the master ended the stream with an error, and the other
    /// variants when the connection or the line broke.
    pub fn next_line(&mut self) -> Result<Option<EventsLine>, ClientError> {
        while !self.ended {
            let Some(line) = self.client.read_line(self.timeout)? else {
                self.ended = true;
                return Ok(None);
            };
            match EventsLine::decode(&line, &self.client.path)? {
                Some(end @ EventsLine::End { .. }) => {
                    self.ended = true;
                    return Ok(Some(end));
                }
                Some(other) => return Ok(Some(other)),
                // A newer master's line: skipped.
                None => {}
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(br#"{"v":1,"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse_request(br#"{"v":1,"cmd":"restart"}"#), Ok(Request::Restart { wait: false }));
        assert_eq!(parse_request(br#"{"cmd":"restart","wait":true,"v":1}"#), Ok(Request::Restart { wait: true }));
        assert_eq!(parse_request(br#"{"v":1,"cmd":"scale","workers":4}"#), Ok(Request::Scale { workers: 4 }));
        assert_eq!(parse_request(br#"{"v":1,"cmd":"stop"}"#), Ok(Request::Stop));
        assert_eq!(parse_request(br#"{"v":1,"cmd":"status","future":1}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"signal","signal":"usr1"}"#),
            Ok(Request::Signal { signal: Signal::USR1 })
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"signal","signal":15}"#),
            Ok(Request::Signal { signal: Signal::TERM })
        );
        assert!(parse_request(br#"{"v":1,"cmd":"signal","signal":"NOPE"}"#).unwrap_err().contains("invalid request"));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        for (line, expect) in [
            (&b"hello"[..], "malformed request"),
            (br#"{"v":2,"cmd":"status"}"#, "unsupported protocol version 2"),
            (br#"{"cmd":"status"}"#, "malformed request"),
            (br#"{"v":1,"cmd":"reboot"}"#, "invalid request"),
            (br#"{"v":1,"cmd":"scale"}"#, "invalid request"),
            (br#"{"v":1,"cmd":"scale","workers":-1}"#, "invalid request"),
            (br#"[1,2]"#, "malformed request"),
        ] {
            let err = parse_request(line).unwrap_err();
            assert!(err.contains(expect), "{}: {err}", String::from_utf8_lossy(line));
        }
        assert!(parse_request(&vec![b' '; MAX_REQUEST + 1]).unwrap_err().contains("longer than"));
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let path = Path::new("/x.sock");
        for request in [
            Request::Status,
            Request::Restart { wait: true },
            Request::Scale { workers: 3 },
            Request::Upgrade { wait: true, slot_by_slot: Some(true) },
            Request::Signal { signal: Signal::HUP },
            Request::Stop,
            Request::Metrics,
        ] {
            let line = encode_request(&request);
            assert_eq!(parse_request(&line[..line.len() - 1]), Ok(request));
        }
        let cases = [
            (Request::Restart { wait: false }, Response::RestartStarted),
            (Request::Scale { workers: 3 }, Response::Scaling { workers: 3 }),
            (Request::Signal { signal: Signal::USR1 }, Response::Signalled { signal: Signal::USR1 }),
            (Request::Stop, Response::Stopping),
            (Request::Upgrade { wait: false, slot_by_slot: None }, Response::UpgradeStarted),
            (
                Request::Upgrade { wait: true, slot_by_slot: None },
                Response::UpgradeFinished(UpgradeOutcome::Completed { new_pid: 7 }),
            ),
            (
                Request::Upgrade { wait: false, slot_by_slot: Some(false) },
                Response::UpgradeFinished(UpgradeOutcome::Refused { reason: "PID 1".into() }),
            ),
            (Request::Metrics, Response::Metrics { text: "a 1\n".into() }),
            (Request::Restart { wait: true }, Response::RestartFinished(RestartOutcome::Completed { replaced: 2 })),
            (
                Request::Restart { wait: true },
                Response::RestartFinished(RestartOutcome::Failed { worker_id: 0, reason: "x".into(), replaced: 0 }),
            ),
        ];
        for (request, response) in cases {
            let line = response.encode();
            assert_eq!(Response::decode(&request, &line, path).unwrap(), response);
        }
        // The wire format the CLI's `--json` and other tools see.
        let failed =
            Response::RestartFinished(RestartOutcome::Failed { worker_id: 1, reason: "x".into(), replaced: 0 });
        let wire: serde_json::Value = serde_json::from_slice(&failed.encode()).unwrap();
        assert_eq!(wire["ok"], false);
        assert_eq!(wire["outcome"]["result"], "failed");
        assert!(wire["error"].as_str().unwrap().contains("failed at worker 1"));
        let refused = encode_error("nope");
        match Response::decode(&Request::Status, &refused, path) {
            Err(ClientError::Refused(m)) => assert_eq!(m, "nope"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Response::decode(&Request::Status, b"{}", path), Err(ClientError::BadAnswer(_))));
    }

    #[test]
    fn rfc3339_times_round_trip() {
        use std::time::UNIX_EPOCH;
        assert_eq!(crate::rfc3339::format(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_735_787_045_678);
        assert_eq!(crate::rfc3339::format(t), "2025-01-02T03:04:05.678Z");
        assert_eq!(crate::rfc3339::parse("2025-01-02T03:04:05.678Z"), Some(t));
        assert_eq!(crate::rfc3339::parse("2025-01-02T03:04:05Z"), Some(t - Duration::from_millis(678)));
        // A leap day, the end of a century, and every day of 2024 round trip.
        for text in ["2024-02-29T23:59:59.999Z", "2000-03-01T00:00:00.000Z", "2100-12-31T12:00:00.001Z"] {
            assert_eq!(crate::rfc3339::format(crate::rfc3339::parse(text).unwrap()), text);
        }
        for day in 0..366 {
            let t = UNIX_EPOCH + Duration::from_secs(1_704_067_200 + day * 86_400 + 3_723);
            assert_eq!(crate::rfc3339::parse(&crate::rfc3339::format(t)), Some(t));
        }
        for bad in
            ["", "2025-01-02 03:04:05Z", "2025-13-02T03:04:05Z", "2025-01-02T03:04:05.Z", "2025-01-02T03:04:05+01:00"]
        {
            assert_eq!(crate::rfc3339::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn logs_requests_and_answers_round_trip() {
        let path = Path::new("/x.sock");
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"logs"}"#),
            Ok(Request::Logs { worker: None, lines: DEFAULT_LOG_LINES, follow: false })
        );
        assert_eq!(parse_request(br#"{"v":1,"cmd":"reopen_logs"}"#), Ok(Request::ReopenLogs));
        let request = Request::Logs { worker: Some(2), lines: 7, follow: true };
        let line = encode_request(&request);
        assert_eq!(parse_request(&line[..line.len() - 1]), Ok(request.clone()));
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let captured = LogLine::new(t, 2, 77, LogStream::Stderr, "hé \"quoted\"".into(), true);
        let answer = Response::Logs { lines: vec![captured.clone()] };
        assert_eq!(Response::decode(&request, &answer.encode(), path).unwrap(), answer);
        let wire: serde_json::Value = serde_json::from_slice(&serde_json::to_vec(&captured).unwrap()).unwrap();
        assert_eq!(wire["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(wire["stream"], "stderr");
        assert_eq!(wire["continued"], true);
        assert_eq!(captured.to_string(), "[worker 2 pid 77 stderr] hé \"quoted\" [continued]");
        let plain = LogLine::new(t, 0, 5, LogStream::Stdout, "x".into(), false);
        assert_eq!(plain.to_string(), "[worker 0 pid 5] x");
        let reopened = Response::LogsReopened { path: "/var/log/a.log".into() };
        assert_eq!(Response::decode(&Request::ReopenLogs, &reopened.encode(), path).unwrap(), reopened);
    }

    /// A following client reads the lines and drop notices the master sends after its answer.
    #[test]
    fn a_follower_reads_log_events() {
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-follow-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("c.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1);
        let sent = LogLine::new(t, 1, 9, LogStream::Stdout, "hello".into(), false);
        let to_send = sent.clone();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut req = String::new();
            r.read_line(&mut req).unwrap();
            s.write_all(&Response::Logs { lines: Vec::new() }.encode()).unwrap();
            s.write_all(&LogEvent::Line(to_send).encode()).unwrap();
            s.write_all(&LogEvent::Dropped(4).encode()).unwrap();
        });
        let mut c = Client::connect(&sock, Duration::from_secs(5)).unwrap();
        let first = c.request(&Request::Logs { worker: None, lines: 10, follow: true }).unwrap();
        assert_eq!(first, Response::Logs { lines: Vec::new() });
        assert_eq!(c.next_log().unwrap(), Some(LogEvent::Line(sent)));
        assert_eq!(c.next_log().unwrap(), Some(LogEvent::Dropped(4)));
        server.join().unwrap();
        assert_eq!(c.next_log().unwrap(), None, "the master closed the connection");
    }

    #[test]
    fn event_streams_round_trip() {
        let path = Path::new("/x.sock");
        assert_eq!(parse_request(br#"{"v":1,"cmd":"events"}"#), Ok(Request::Events { since: None, follow: false }));
        let request = Request::Events { since: Some(41), follow: true };
        let line = encode_request(&request);
        assert_eq!(std::str::from_utf8(&line).unwrap(), "{\"v\":1,\"cmd\":\"events\",\"since\":41,\"follow\":true}\n");
        assert_eq!(parse_request(&line[..line.len() - 1]), Ok(request.clone()));
        let info = EventsInfo { master_pid: 12, capacity: 1000, first_seq: Some(3), last_seq: 41 };
        let header = Response::Events(info.clone()).encode();
        let wire: serde_json::Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(wire["history"]["master_pid"], 12);
        assert_eq!(Response::decode(&request, &header, path).unwrap(), Response::Events(info));
        let event =
            ClusterEvent::new(42, SystemTime::UNIX_EPOCH, 12, Some(1), Some(99), crate::events::EventKind::Ready);
        for l in
            [EventsLine::Event(event), EventsLine::Missed { count: 5, next_seq: 47 }, EventsLine::End { last_seq: 47 }]
        {
            let bytes = l.encode();
            assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            assert_eq!(EventsLine::decode(&bytes[..bytes.len() - 1], path).unwrap(), Some(l));
        }
        let wire: serde_json::Value =
            serde_json::from_slice(&EventsLine::Missed { count: 5, next_seq: 47 }.encode()).unwrap();
        assert_eq!(wire, serde_json::json!({"v":1,"ok":true,"missed":{"count":5,"next_seq":47}}));
        // A newer master's line is skipped; an error line ends the stream with its message.
        assert_eq!(EventsLine::decode(br#"{"v":1,"ok":true,"heartbeat":{}}"#, path).unwrap(), None);
        match EventsLine::decode(&encode_error("too many followers"), path) {
            Err(ClientError::Refused(m)) => assert_eq!(m, "too many followers"),
            other => panic!("{other:?}"),
        }
    }

    /// A stream read through a real socket: a line split across reads, with a read that times
    /// out in the middle of it, loses nothing (the server sends the rest only once the client
    /// saw the timeout).
    #[test]
    fn a_stream_survives_timeouts_mid_line() {
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-stream-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (timed_out, wait_timeout) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(s.try_clone().unwrap()).read_line(&mut request).unwrap();
            assert!(request.contains("\"events\""), "{request}");
            let info = EventsInfo { master_pid: 1, capacity: 10, first_seq: None, last_seq: 0 };
            s.write_all(&Response::Events(info).encode()).unwrap();
            let e = ClusterEvent::new(1, SystemTime::UNIX_EPOCH, 1, None, None, crate::events::EventKind::Probing);
            let line = encode_event(&e);
            let (a, b) = line.split_at(10);
            s.write_all(a).unwrap();
            wait_timeout.recv_timeout(Duration::from_secs(10)).expect("the client timed out mid-line");
            s.write_all(b).unwrap();
            s.write_all(&EventsLine::End { last_seq: 1 }.encode()).unwrap();
        });
        let mut client = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let mut stream = client.events(None, true).unwrap();
        assert_eq!(stream.info().master_pid, 1);
        stream.set_timeout(Some(Duration::from_millis(50)));
        let first = loop {
            match stream.next_line() {
                Err(ClientError::Timeout { .. }) => {
                    let _ = timed_out.send(());
                }
                other => break other.unwrap(),
            }
        };
        assert!(matches!(first, Some(EventsLine::Event(e)) if e.seq == 1));
        stream.set_timeout(Some(Duration::from_secs(5)));
        assert_eq!(stream.next_line().unwrap(), Some(EventsLine::End { last_seq: 1 }));
        assert_eq!(stream.next_line().unwrap(), None, "ended");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A generated-input property test: at least 10 000 inputs (random bytes, and valid requests
    /// with random mutations); the parser never panics, and every accepted input is a request
    /// with version 1.
    #[test]
    fn the_parser_never_panics() {
        let seeds: Vec<&[u8]> = vec![
            br#"{"v":1,"cmd":"status"}"#,
            br#"{"v":1,"cmd":"restart","wait":true}"#,
            br#"{"v":1,"cmd":"scale","workers":4}"#,
            br#"{"v":1,"cmd":"signal","signal":"USR1"}"#,
            br#"{"v":1,"cmd":"stop"}"#,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\":,0123456789-.eE truefalsnul\\v/cmdstatuworkesignalUSR\x00\xff\xc3";
        let mut accepted = 0;
        for i in 0..20_000 {
            let mut input: Vec<u8> = if i % 3 == 0 {
                let len = (next() % 200) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                seeds[(next() % seeds.len() as u64) as usize].to_vec()
            };
            for _ in 0..(next() % 6) {
                if input.is_empty() {
                    break;
                }
                let pos = (next() as usize) % input.len();
                match next() % 4 {
                    0 => input[pos] = alphabet[(next() as usize) % alphabet.len()],
                    1 => {
                        input.remove(pos);
                    }
                    2 => input.insert(pos, alphabet[(next() as usize) % alphabet.len()]),
                    _ => input.truncate(pos),
                }
            }
            if let Ok(req) = parse_request(&input) {
                accepted += 1;
                let v: serde_json::Value = serde_json::from_slice(&input).expect("accepted input is JSON");
                assert_eq!(v["v"], 1, "{req:?}");
            }
        }
        assert!(accepted > 100, "the generator also produces valid requests ({accepted})");
    }
}
