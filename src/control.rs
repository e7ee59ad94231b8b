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
//! | `{"v":1,"cmd":"scale","workers":N}` | `"workers": N` |
//! | `{"v":1,"cmd":"signal","signal":"USR1"}` (a name, with or without `SIG`, or a number) | `"signal": 10` |
//! | `{"v":1,"cmd":"stop"}` | `"stopping": true` |
//! | `{"v":1,"cmd":"metrics"}` | `"text"`: Prometheus text ([`crate::metrics`]) |
//!
//! A failed request gets `{"v":1,"ok":false,"error":"what went wrong and what to do"}`. A line
//! longer than [`MAX_REQUEST`] bytes is answered with an error and the connection is closed.
//! Several requests may be sent on one connection. Fields a command does not know are ignored,
//! so newer clients can add optional ones. Only the master's user (or root) may connect.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

/// The protocol version this library speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// The longest request line the master accepts, newline included.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A parsed control request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The cluster's and every worker's statistics.
    Status,
    /// A graceful restart; with `wait`, the reply comes when the rollout has ended.
    Restart {
        /// Reply only once the rollout has ended.
        #[serde(default)]
        wait: bool,
    },
    /// Change the number of workers.
    Scale {
        /// The new number of workers.
        workers: usize,
    },
    /// Send a signal to every active worker.
    Signal {
        /// A signal name (`USR1`, `SIGUSR1`, `usr1`) or number.
        signal: SignalArg,
    },
    /// A graceful shutdown of the whole cluster.
    Stop,
    /// The cluster's Prometheus metrics, as text.
    Metrics,
}

/// A signal given by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SignalArg {
    /// A signal number.
    Number(i32),
    /// A signal name.
    Name(String),
}

impl SignalArg {
    /// The signal number, if the name or number is a known signal.
    pub fn number(&self) -> Option<i32> {
        match self {
            SignalArg::Number(n) => crate::stats::signal_name(*n).map(|_| *n),
            SignalArg::Name(name) => signal_by_name(name),
        }
    }
}

/// The number of a signal named `USR1`, `SIGUSR1` or `usr1`.
pub fn signal_by_name(name: &str) -> Option<i32> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    (1..32).find(|&n| crate::stats::signal_name(n) == Some(full.as_str()))
}

#[derive(Deserialize)]
struct Envelope {
    v: u64,
    #[serde(flatten)]
    request: Value,
}

/// Parses one request line (without its newline). Never panics; the error is the message to
/// send back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let env: Envelope = serde_json::from_slice(line).map_err(|e| {
        format!("malformed request: {e}; send one JSON object per line, like {{\"v\":1,\"cmd\":\"status\"}}")
    })?;
    if env.v != PROTOCOL_VERSION {
        return Err(format!("unsupported protocol version {}; this master speaks version {PROTOCOL_VERSION}", env.v));
    }
    serde_json::from_value(env.request)
        .map_err(|e| format!("invalid request: {e}; commands are status, restart, scale, signal, stop and metrics"))
}

/// A successful reply with `fields` added.
pub fn ok_reply(fields: Value) -> Value {
    let mut v = json!({ "v": PROTOCOL_VERSION, "ok": true });
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), fields) {
        obj.extend(extra);
    }
    v
}

/// A failed reply.
pub fn error_reply(message: &str) -> Value {
    json!({ "v": PROTOCOL_VERSION, "ok": false, "error": message })
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
    /// The answer was not JSON.
    #[error("the master at {0} sent an unreadable answer")]
    BadAnswer(PathBuf),
}

/// A connection to a master's control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    timeout: Duration,
}

impl Client {
    /// Connects to the socket at `path`; every answer is awaited for at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning(path.into()),
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.into()),
            _ => ClientError::Io { path: path.into(), source: e },
        })?;
        Ok(Client { path: path.into(), reader: BufReader::new(stream), timeout })
    }

    /// Sends one request and returns the master's answer.
    pub fn request(&mut self, request: &Value) -> Result<Value, ClientError> {
        let io_err = |e: io::Error, path: &Path, timeout| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout { path: path.into(), timeout },
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::NoAnswer(path.into()),
            _ => ClientError::Io { path: path.into(), source: e },
        };
        let mut line = serde_json::to_vec(request).map_err(|_| ClientError::BadAnswer(self.path.clone()))?;
        line.push(b'\n');
        let stream = self.reader.get_mut();
        stream.set_read_timeout(Some(self.timeout)).map_err(|e| io_err(e, &self.path, self.timeout))?;
        stream.set_write_timeout(Some(self.timeout)).map_err(|e| io_err(e, &self.path, self.timeout))?;
        stream.write_all(&line).map_err(|e| io_err(e, &self.path, self.timeout))?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(|e| io_err(e, &self.path, self.timeout))?;
        if n == 0 {
            return Err(ClientError::NoAnswer(self.path.clone()));
        }
        serde_json::from_str(&answer).map_err(|_| ClientError::BadAnswer(self.path.clone()))
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
        let Ok(Request::Signal { signal }) = parse_request(br#"{"v":1,"cmd":"signal","signal":"usr1"}"#) else {
            panic!()
        };
        assert_eq!(signal.number(), Some(libc::SIGUSR1));
        let Ok(Request::Signal { signal }) = parse_request(br#"{"v":1,"cmd":"signal","signal":15}"#) else { panic!() };
        assert_eq!(signal.number(), Some(libc::SIGTERM));
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
    fn signal_names() {
        assert_eq!(signal_by_name("SIGHUP"), Some(libc::SIGHUP));
        assert_eq!(signal_by_name("term"), Some(libc::SIGTERM));
        assert_eq!(signal_by_name("NOPE"), None);
        assert_eq!(SignalArg::Number(999).number(), None);
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
                let v: Value = serde_json::from_slice(&input).expect("accepted input is JSON");
                assert_eq!(v["v"], 1, "{req:?}");
            }
        }
        assert!(accepted > 100, "the generator also produces valid requests ({accepted})");
    }
}
