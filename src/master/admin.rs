//! The admin HTTP listener, served by the master itself: `GET /livez`, `/readyz`, `/startupz`
//! and `/metrics` on a TCP or unix address, off by default.
//!
//! It lives in the master's `poll` loop like the control socket ([`super::control`]): the
//! listener and every connection are non-blocking descriptors in the loop's poll set, and
//! nothing here ever waits. Each connection is bounded in every way a client could abuse:
//!
//! - at most [`MAX_CONNECTIONS`] at once (a new one closes the oldest still sending its
//!   request), at most [`ACCEPT_BATCH`] accepted per wake-up;
//! - a request head of at most [`MAX_HEAD`] bytes, read at most [`READ_BUDGET`] bytes per
//!   wake-up, parsed by `httparse` at most a few times (when its first line and when its blank
//!   line arrive, not at every byte); a request body is never read;
//! - [`REQUEST_TIMEOUT`] from accept to a complete head (slow clients are closed at the
//!   deadline), and as long again to take the answer;
//! - an answer of at most [`MAX_ANSWER`] bytes of body, and [`MAX_BUFFERED`] bytes of unsent
//!   answers over all connections (past it, 503): a client that never reads costs bounded memory.
//!
//! One request per connection: every answer says `Connection: close` and the connection is
//! closed once it is written. Errors end the one connection they happen on.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::error::Error;
use crate::os::socket::SocketFile;

/// Connections held at once. Past this, a new connection closes the oldest one still sending
/// its request (a flood of idle connections cannot lock honest clients out for long); when all
/// are writing answers, the new one is closed instead.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Connections accepted per [`AdminServer::accept`] call; the rest wait in the backlog and the
/// listener stays readable, so the loop comes back to them after its other work.
pub(crate) const ACCEPT_BATCH: usize = 64;
/// The listen backlog.
const BACKLOG: u32 = 128;
/// The largest request head (request line and headers) accepted; a longer one is answered 400.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Bytes read from one connection per [`AdminServer::on_ready`] call: a client that floods is
/// read a slice at a time, and the loop goes on meanwhile.
pub(crate) const READ_BUDGET: usize = 16 * 1024;
/// Headers a request may have (`httparse` parses into a fixed array); more is answered 400.
const MAX_HEADERS: usize = 64;
/// Times a head is parsed while incomplete before it is answered 400 (normally once: when its
/// first line is complete).
const MAX_PARSES: u8 = 4;
/// Time from accept to a complete request head, and again from the answer to its last byte
/// written. A connection still unfinished at its deadline is closed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer body; a larger one is answered 500, never truncated. The `/metrics` text
/// of the largest cluster ([`MAX_WORKERS`](crate::supervisor::MAX_WORKERS) workers, every figure
/// at its longest, a 64-byte cluster label) is about 5.3 MB; of 64 workers, about 80 KB.
pub(crate) const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// Answer bytes not yet taken by their sockets, over all connections; an answer that would
/// exceed it is replaced by a short 503 (`Retry-After: 1`). With [`REQUEST_TIMEOUT`], this is
/// what clients that never read can cost the master: this much, for that long.
pub(crate) const MAX_BUFFERED: usize = 64 * 1024 * 1024;
/// Bytes of unread input drained before a connection is closed, so that the kernel ends it with
/// a FIN rather than a reset that could destroy the answer on its way.
const DRAIN_AT_CLOSE: usize = 64 * 1024;
/// How long accepting pauses when the process is out of descriptors or memory (the pending
/// connection stays in the backlog, and the listener would otherwise stay readable for nothing).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The content type of every answer but the metrics.
const TEXT: &str = "text/plain; charset=utf-8";
/// The content type of `/metrics`: Prometheus' text format.
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the admin listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AdminAddr {
    /// A TCP address (`127.0.0.1:9090`, `[::1]:9090`, `0.0.0.0:0`); `[::]` serves IPv4 too.
    Tcp(SocketAddr),
    /// A unix socket file (`unix:/run/app/admin.sock`).
    Unix(PathBuf),
}

impl FromStr for AdminAddr {
    type Err = String;

    /// Parses `IP:PORT` (`127.0.0.1:9090`, `[::1]:9090`) or `unix:PATH`. The error says what
    /// to write instead.
    fn from_str(s: &str) -> Result<AdminAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?} has no path after \"unix:\"; write unix:/path/to/admin.sock"));
            }
            if path.starts_with('@') {
                return Err(format!(
                    "{s:?}: abstract unix sockets are not supported for the admin listener; give a path, such as unix:/run/app/admin.sock"
                ));
            }
            if path.contains('\0') {
                return Err(format!("{s:?}: a path cannot contain a NUL byte"));
            }
            return Ok(AdminAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(AdminAddr::Tcp).map_err(|_| {
            format!(
                "{s:?} is not an admin address; write IP:PORT (127.0.0.1:9090, [::1]:9090, 0.0.0.0:9090; host names are not resolved) or unix:/path/to/admin.sock"
            )
        })
    }
}

impl fmt::Display for AdminAddr {
    /// As it is parsed: `127.0.0.1:9090` or `unix:/path`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddr::Tcp(addr) => write!(f, "{addr}"),
            AdminAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What a request asks for: the four paths the answer callback is called for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/livez`: is the master's loop alive.
    Live,
    /// `/readyz`: can the cluster take traffic.
    Ready,
    /// `/startupz`: has the cluster finished starting.
    Startup,
    /// `/metrics`: Prometheus text (answered with Prometheus' content type).
    Metrics,
}

impl Route {
    /// The route of a request target: a path (`/readyz`) or the absolute form
    /// (`http://host/readyz`); the query (`/readyz?verbose`) is ignored. `None` for any other.
    fn of_target(target: &str) -> Option<Route> {
        let mut path = target;
        for scheme in ["http://", "https://"] {
            if path.len() >= scheme.len() && path[..scheme.len()].eq_ignore_ascii_case(scheme) {
                let authority = &path[scheme.len()..];
                path = authority.find('/').map_or("/", |i| &authority[i..]);
                break;
            }
        }
        let path = path.split(['?', '#']).next().unwrap_or("");
        match path {
            "/livez" => Some(Route::Live),
            "/readyz" => Some(Route::Ready),
            "/startupz" => Some(Route::Startup),
            "/metrics" => Some(Route::Metrics),
            _ => None,
        }
    }
}

/// The answer to a [`Route`], from the master's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The HTTP status: 200–599 except 204 and 304 (which cannot carry a body); anything else
    /// is answered 500.
    pub(crate) status: u16,
    /// The body, at most [`MAX_ANSWER`] bytes (a larger one is answered 500).
    pub(crate) body: String,
}

/// Identifies an admin connection.
pub(crate) type AdminConnId = u64;

/// One admin connection: reading its request head, then writing its answer.
struct Conn {
    /// The connection's non-blocking socket.
    sock: Socket,
    /// The request head so far (at most [`MAX_HEAD`] + 1 bytes; leading blank lines dropped).
    head: Vec<u8>,
    /// `head[..scanned]` was already searched for the head's end.
    scanned: usize,
    /// The first line was complete at an earlier read (and was parsed then).
    first_line: bool,
    /// Parses that found the head incomplete.
    parses: u8,
    /// The answer was queued: the connection only writes from now on.
    answered: bool,
    /// The whole answer (status line, headers, body).
    out: Vec<u8>,
    /// `out[..sent]` was written.
    sent: usize,
    /// When it was accepted (the oldest waiting one is closed to make room).
    accepted: Instant,
    /// When it is closed if it has not finished its current phase.
    deadline: Instant,
}

impl Conn {
    /// Answer bytes the socket has not taken yet.
    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Reads what the client sent, without blocking and at most [`READ_BUDGET`] bytes, and
    /// parses the head when it may be complete.
    fn read_head(&mut self) -> Progress {
        let mut buf = [0u8; 4096];
        let mut budget = READ_BUDGET;
        let mut eof = false;
        while budget > 0 && self.head.len() <= MAX_HEAD {
            let want = buf.len().min(budget).min(MAX_HEAD + 1 - self.head.len());
            match (&self.sock).read(&mut buf[..want]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    budget -= n;
                    let mut chunk = &buf[..n];
                    if self.head.is_empty() {
                        // Blank lines before the request line are ignored (RFC 9112, 2.2), here
                        // rather than by re-parsing them: a stream of newlines costs nothing.
                        let blank = chunk.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
                        chunk = &chunk[blank..];
                    }
                    self.head.extend_from_slice(chunk);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Progress::Gone,
            }
        }
        // Parse when the head may have ended (a blank line arrived), when the first line is
        // complete (garbage is refused at once), and at the end: a few times per connection,
        // never once per byte of a slow client.
        let fresh = &self.head[self.scanned.saturating_sub(2)..];
        let ended = fresh.windows(2).any(|w| w == b"\n\n") || fresh.windows(3).any(|w| w == b"\n\r\n");
        let first_line = !self.first_line && self.head[self.scanned..].contains(&b'\n');
        self.first_line |= first_line;
        self.scanned = self.head.len();
        let too_long = self.head.len() > MAX_HEAD;
        if ended || first_line || too_long || (eof && !self.head.is_empty()) {
            match parse(&self.head) {
                Ok(Some(request)) => return Progress::Request(request),
                Err(reason) => return Progress::Request(Request::Bad(reason)),
                Ok(None) => self.parses += 1,
            }
        }
        if too_long {
            Progress::Request(Request::Bad(format!("the request head is longer than {MAX_HEAD} bytes")))
        } else if eof && self.head.is_empty() {
            Progress::Gone
        } else if eof {
            Progress::Request(Request::Bad("the request ended before its head was complete".to_owned()))
        } else if self.parses > MAX_PARSES {
            Progress::Request(Request::Bad("the request head is malformed".to_owned()))
        } else {
            Progress::Waiting
        }
    }

    /// Drains unread input (bounded) so that closing sends a FIN, not a reset.
    fn drain(&self) {
        let mut buf = [0u8; 4096];
        let mut left = DRAIN_AT_CLOSE;
        while left > 0 {
            let want = buf.len().min(left);
            match (&self.sock).read(&mut buf[..want]) {
                Ok(0) => return,
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// Where reading a connection got to.
enum Progress {
    /// The head is incomplete: wait for more.
    Waiting,
    /// The client left (or the socket failed) before sending anything to answer.
    Gone,
    /// The request, to be answered.
    Request(Request),
}

/// A parsed request, as far as the answer is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET` or `HEAD` (`head_only`) of one of the routes.
    Route { route: Route, head_only: bool },
    /// An unknown path.
    NotFound { head_only: bool },
    /// A known path with a method other than `GET` and `HEAD`.
    NotAllowed,
    /// Not a request we can parse: why.
    Bad(String),
}

/// Parses a request head with `httparse`: `Ok(None)` while incomplete, `Err` says why it is
/// refused.
fn parse(buf: &[u8]) -> Result<Option<Request>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(format!("the request has more than {MAX_HEADERS} headers")),
        Err(e) => return Err(format!("the request is malformed ({e})")),
    };
    if len > MAX_HEAD {
        return Err(format!("the request head is longer than {MAX_HEAD} bytes"));
    }
    let method = request.method.unwrap_or_default();
    let route = Route::of_target(request.path.unwrap_or_default());
    let head_only = method == "HEAD";
    Ok(Some(match route {
        _ if method != "GET" && !head_only && route.is_some() => Request::NotAllowed,
        Some(route) => Request::Route { route, head_only },
        None => Request::NotFound { head_only },
    }))
}

/// The reason phrase of the statuses we send (others go without one, as HTTP allows).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A whole HTTP/1.1 response: status line, headers (`extra` is more of them, each ending in
/// CRLF) and, unless `head_only`, the body.
fn response(status: u16, content_type: &str, body: &str, head_only: bool, extra: &str) -> Vec<u8> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra}\r\n",
        reason(status),
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + if head_only { 0 } else { body.len() });
    out.extend_from_slice(head.as_bytes());
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// The admin listener and its connections, polled by the master's loop the way
/// [`ControlServer`](super::control::ControlServer) is: poll [`listener`](Self::listener) for
/// input while [`accepting`](Self::accepting) and call [`accept`](Self::accept); poll each of
/// [`sockets`](Self::sockets) as it says and call [`on_ready`](Self::on_ready); wake by
/// [`next_deadline`](Self::next_deadline) and call [`close_idle`](Self::close_idle).
pub(crate) struct AdminServer {
    /// The non-blocking, close-on-exec listening socket.
    listener: Socket,
    /// The address really listened on, for logs (`127.0.0.1:43123` or the socket's path).
    local: String,
    /// The unix socket file, removed when the server is dropped (if it is still ours).
    _file: Option<SocketFile>,
    /// The open connections.
    conns: HashMap<AdminConnId, Conn>,
    /// The last connection id given.
    next_id: AdminConnId,
    /// Accepting pauses until then (out of descriptors or memory).
    paused_until: Option<Instant>,
    /// An upgrade's new master accepts instead.
    handed_over: bool,
}

impl fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminServer").field("addr", &self.local).field("connections", &self.conns.len()).finish()
    }
}

impl AdminServer {
    /// Listens on `addr`: non-blocking and close-on-exec; TCP with `SO_REUSEADDR` (and
    /// dual-stack on `[::]`), a unix path in a directory of this user (or root), where a stale
    /// socket file is replaced and a live one or any other file is refused. Errors are
    /// [`Error::BadListener`] named `admin` and say what to do.
    pub(crate) fn bind(addr: &AdminAddr) -> Result<AdminServer, Error> {
        let fail = |reason: String| Error::BadListener { name: "admin".to_owned(), reason };
        let (fd, local, file) = match addr {
            AdminAddr::Tcp(addr) => {
                let (fds, real) = crate::os::socket::bind_listeners(*addr, false, 1, BACKLOG, false)
                    .map_err(|e| fail(e.to_string()))?;
                let fd = fds.into_iter().next().ok_or_else(|| fail(format!("no socket was bound on {addr}")))?;
                (fd, real.to_string(), None)
            }
            AdminAddr::Unix(path) => {
                let (fd, file) = crate::os::socket::bind_unix_path(path, BACKLOG, None, (None, None))
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                (fd, path.display().to_string(), Some(file))
            }
        };
        let listener = Socket::from(fd);
        listener.set_nonblocking(true).map_err(|e| fail(format!("cannot make the socket non-blocking: {e}")))?;
        Ok(AdminServer {
            listener,
            local,
            _file: file,
            conns: HashMap::new(),
            next_id: 0,
            paused_until: None,
            handed_over: false,
        })
    }

    /// The admin listener an upgrade's old master handed over (never bound again).
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        local: String,
        file: Option<SocketFile>,
    ) -> Result<AdminServer, Error> {
        let listener = Socket::from(fd);
        listener.set_nonblocking(true).map_err(|e| Error::BadListener {
            name: "admin".to_owned(),
            reason: format!("cannot make the inherited socket non-blocking: {e}"),
        })?;
        Ok(AdminServer {
            listener,
            local,
            _file: file,
            conns: HashMap::new(),
            next_id: 0,
            paused_until: None,
            handed_over: false,
        })
    }

    /// The socket file's device and inode (a unix admin listener).
    pub(crate) fn file_id(&self) -> Option<(u64, u64)> {
        self._file.as_ref().map(SocketFile::id)
    }

    /// The new master of an upgrade accepts from now on (connections open here are still
    /// answered), and removes the file when it is done.
    pub(crate) fn hand_over(&mut self) {
        self.handed_over = true;
        if let Some(f) = self._file.as_mut() {
            f.disown();
        }
    }

    /// The new master of an upgrade failed before it took over: this master accepts again,
    /// and removes the file when it is done.
    pub(crate) fn take_back(&mut self) {
        self.handed_over = false;
        if let Some(f) = self._file.as_mut() {
            f.reclaim();
        }
    }

    /// The address listened on: `127.0.0.1:43123` (the real port when bound to port 0) or the
    /// unix socket's path.
    pub(crate) fn local_addr(&self) -> String {
        self.local.clone()
    }

    /// The listening socket, to poll for input while [`accepting`](Self::accepting).
    pub(crate) fn listener(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Whether to poll the listener now: not while accepting is paused because the process ran
    /// out of descriptors or memory (the listener would stay readable and spin the loop; the
    /// pause ends at [`next_deadline`](Self::next_deadline)).
    pub(crate) fn accepting(&self, now: Instant) -> bool {
        !self.handed_over && self.paused_until.is_none_or(|until| now >= until)
    }

    /// Connections open now (at most [`MAX_CONNECTIONS`]).
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Each connection's socket, whether to poll it for input (its request is still coming)
    /// and whether for output (its answer is being written). Exactly one of the two is set.
    pub(crate) fn sockets(&self) -> impl Iterator<Item = (AdminConnId, BorrowedFd<'_>, bool, bool)> {
        self.conns.iter().map(|(id, c)| (*id, c.sock.as_fd(), !c.answered, c.answered))
    }

    /// Accepts pending connections, at most [`ACCEPT_BATCH`]; each gets [`REQUEST_TIMEOUT`]
    /// from `now` to send its request head. Past [`MAX_CONNECTIONS`] the oldest connection
    /// still sending its request is closed to make room (or, if every one is being answered,
    /// the new one).
    pub(crate) fn accept(&mut self, now: Instant) {
        if !self.accepting(now) {
            return;
        }
        self.paused_until = None;
        for _ in 0..ACCEPT_BATCH {
            let sock = match self.listener.accept() {
                Ok((sock, _)) => sock,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ => {
                        // Out of descriptors (EMFILE, ENFILE) or memory: the connection stays
                        // queued and the listener readable; stop polling it for a moment.
                        tracing::warn!(
                            "admin listener {}: accept failed: {e}; pausing for {ACCEPT_PAUSE:?}",
                            self.local
                        );
                        self.paused_until = Some(now + ACCEPT_PAUSE);
                        return;
                    }
                },
            };
            if sock.set_nonblocking(true).is_err() {
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS && !self.evict_oldest_waiting() {
                tracing::debug!(
                    "admin listener {}: {MAX_CONNECTIONS} answers are being written; refusing another connection",
                    self.local
                );
                continue;
            }
            self.next_id += 1;
            self.conns.insert(
                self.next_id,
                Conn {
                    sock,
                    head: Vec::new(),
                    scanned: 0,
                    first_line: false,
                    parses: 0,
                    answered: false,
                    out: Vec::new(),
                    sent: 0,
                    accepted: now,
                    deadline: now + REQUEST_TIMEOUT,
                },
            );
        }
    }

    /// Closes the oldest connection still sending its request; `false` if there is none.
    fn evict_oldest_waiting(&mut self) -> bool {
        let oldest = self.conns.iter().filter(|(_, c)| !c.answered).min_by_key(|(_, c)| c.accepted).map(|(id, _)| *id);
        if let Some(id) = oldest {
            tracing::debug!("admin listener {}: {MAX_CONNECTIONS} connections; closing the oldest one", self.local);
            self.conns.remove(&id);
        }
        oldest.is_some()
    }

    /// Serves connection `id`, which `poll` reported: reads what its client sent (without
    /// blocking, at most [`READ_BUDGET`] bytes); once the head is complete, answers it (calling
    /// `answer` for the four routes only) and writes what the socket takes, keeping the rest
    /// for later calls; closes the connection once the answer is written, or on an error.
    pub(crate) fn on_ready(&mut self, id: AdminConnId, now: Instant, answer: &mut dyn FnMut(Route) -> Answer) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if !c.answered {
            let request = match c.read_head() {
                Progress::Waiting => return,
                Progress::Gone => {
                    self.conns.remove(&id);
                    return;
                }
                Progress::Request(request) => request,
            };
            let out = self.respond(request, answer);
            let Some(c) = self.conns.get_mut(&id) else { return };
            c.head = Vec::new();
            c.out = out;
            c.sent = 0;
            c.answered = true;
            c.deadline = now + REQUEST_TIMEOUT;
        }
        self.flush(id);
    }

    /// The response to `request`, within the caps on answers.
    fn respond(&self, request: Request, answer: &mut dyn FnMut(Route) -> Answer) -> Vec<u8> {
        let (route, head_only) = match request {
            Request::Route { route, head_only } => (route, head_only),
            Request::NotFound { head_only } => {
                let body = "not found; the admin listener serves /livez, /readyz, /startupz and /metrics\n";
                return response(404, TEXT, body, head_only, "");
            }
            Request::NotAllowed => {
                return response(405, TEXT, "method not allowed; use GET or HEAD\n", false, "Allow: GET, HEAD\r\n");
            }
            Request::Bad(why) => {
                tracing::debug!("admin listener {}: bad request: {why}", self.local);
                return response(400, TEXT, &format!("bad request: {why}\n"), false, "");
            }
        };
        let Answer { status, body } = answer(route);
        if !(200..=599).contains(&status) || status == 204 || status == 304 {
            tracing::warn!(
                "admin listener {}: the answer to {route:?} has status {status}, which it cannot send; answering 500",
                self.local
            );
            return response(500, TEXT, "internal error: an invalid status\n", head_only, "");
        }
        if body.len() > MAX_ANSWER {
            tracing::warn!(
                "admin listener {}: the answer to {route:?} is {} bytes, more than the cap of {MAX_ANSWER}; answering 500",
                self.local,
                body.len()
            );
            return response(500, TEXT, "internal error: the answer is too large\n", head_only, "");
        }
        let content_type = if route == Route::Metrics { PROMETHEUS } else { TEXT };
        let out = response(status, content_type, &body, head_only, "");
        let buffered: usize = self.conns.values().map(Conn::pending).sum();
        if buffered + out.len() > MAX_BUFFERED {
            tracing::debug!("admin listener {}: {buffered} bytes of answers are unread; answering 503", self.local);
            let body = "busy: earlier answers are still unread; retry later\n";
            return response(503, TEXT, body, head_only, "Retry-After: 1\r\n");
        }
        out
    }

    /// Writes what connection `id`'s socket takes of its answer; closes it when all is written
    /// or the client is gone.
    fn flush(&mut self, id: AdminConnId) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        while c.pending() > 0 {
            // MSG_NOSIGNAL: a client that left is an error here, never a SIGPIPE.
            match c.sock.send_with_flags(&c.out[c.sent..], libc::MSG_NOSIGNAL) {
                Ok(0) => break,
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        if let Some(c) = self.conns.remove(&id) {
            c.drain();
        }
    }

    /// When the next connection reaches its deadline, or a pause in accepting ends.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.deadline).chain(self.paused_until).min()
    }

    /// Closes the connections whose deadline has come: a request head still incomplete
    /// [`REQUEST_TIMEOUT`] after accept (a slow client), or an answer still unwritten as long
    /// after it was queued (a client that does not read).
    pub(crate) fn close_idle(&mut self, now: Instant) {
        let before = self.conns.len();
        self.conns.retain(|_, c| c.deadline > now);
        if self.conns.len() < before {
            tracing::debug!("admin listener {}: closed {} slow connections", self.local, before - self.conns.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;

    use rustix::event::{PollFd, PollFlags};

    /// What the tests' master answers.
    fn answers(route: Route) -> Answer {
        let (status, body) = match route {
            Route::Live => (200, "alive\n"),
            Route::Ready => (503, "not ready: 1 of 2 workers ready\n"),
            Route::Startup => (200, "started\n"),
            Route::Metrics => (200, "# TYPE up gauge\nup 1\n"),
        };
        Answer { status, body: body.to_owned() }
    }

    /// One turn of a loop like the driver's: polls the listener and the connections for up to
    /// `wait`, serves what is ready at time `now`, then closes what is past its deadline.
    /// Returns whether anything was ready.
    fn turn(s: &mut AdminServer, now: Instant, wait: Duration, answer: &mut dyn FnMut(Route) -> Answer) -> bool {
        let mut ids = vec![None];
        let mut fds = vec![PollFd::from_borrowed_fd(s.listener(), PollFlags::IN)];
        for (id, fd, read, write) in s.sockets() {
            assert!(read != write, "a connection either reads or writes");
            let flags = if read { PollFlags::IN } else { PollFlags::OUT };
            ids.push(Some(id));
            fds.push(PollFd::from_borrowed_fd(fd, flags));
        }
        let timeout = rustix::time::Timespec { tv_sec: 0, tv_nsec: wait.as_nanos() as i64 };
        rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
        let ready: Vec<Option<AdminConnId>> =
            fds.iter().zip(&ids).filter(|(fd, _)| !fd.revents().is_empty()).map(|(_, id)| *id).collect();
        drop(fds);
        for id in &ready {
            match id {
                None => s.accept(now),
                Some(id) => s.on_ready(*id, now, answer),
            }
        }
        s.close_idle(now);
        !ready.is_empty()
    }

    /// Turns until no connection is left (and nothing more is ready).
    fn serve(s: &mut AdminServer, answer: &mut dyn FnMut(Route) -> Answer) {
        for _ in 0..500 {
            let busy = turn(s, Instant::now(), Duration::from_millis(20), answer);
            if !busy && s.connections() == 0 {
                return;
            }
        }
        panic!("the server did not finish: {s:?}");
    }

    /// A stream to either kind of listener.
    trait Stream: Read + Write {}
    impl Stream for TcpStream {}
    impl Stream for UnixStream {}

    fn connect(s: &AdminServer) -> Box<dyn Stream> {
        let addr = s.local_addr();
        let stream: Box<dyn Stream> = match addr.parse::<SocketAddr>() {
            Ok(addr) => {
                let c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                Box::new(c)
            }
            Err(_) => {
                let c = UnixStream::connect(&addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                Box::new(c)
            }
        };
        stream
    }

    /// Sends `request` on a new connection, serves it, and returns all the client received.
    fn exchange_with(s: &mut AdminServer, request: &[u8], answer: &mut dyn FnMut(Route) -> Answer) -> String {
        let mut c = connect(s);
        c.write_all(request).unwrap();
        serve(s, answer);
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        String::from_utf8(got).unwrap()
    }

    fn exchange(s: &mut AdminServer, request: &str) -> String {
        exchange_with(s, request.as_bytes(), &mut answers)
    }

    /// The status code, the headers (lowercased names) and the body of a response.
    fn split(response: &str) -> (u16, HashMap<String, String>, String) {
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {response:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        (status, headers, body.to_owned())
    }

    fn tcp_server() -> AdminServer {
        AdminServer::bind(&"127.0.0.1:0".parse().unwrap()).unwrap()
    }

    /// A fresh directory for unix sockets, removed with its contents when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("ecewo-admin-test-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn addresses_parse_tcp_and_unix_and_say_what_to_write() {
        assert_eq!("127.0.0.1:0".parse(), Ok(AdminAddr::Tcp("127.0.0.1:0".parse().unwrap())));
        assert_eq!("[::1]:9090".parse(), Ok(AdminAddr::Tcp("[::1]:9090".parse().unwrap())));
        assert_eq!("unix:/run/app/admin.sock".parse(), Ok(AdminAddr::Unix("/run/app/admin.sock".into())));
        for (bad, says) in [
            ("localhost:9090", "host names are not resolved"),
            ("9090", "write IP:PORT"),
            ("", "write IP:PORT"),
            ("unix:", "no path after"),
            ("unix:@admin", "abstract unix sockets are not supported"),
        ] {
            let e = bad.parse::<AdminAddr>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        for text in ["127.0.0.1:9090", "[::1]:9090", "unix:/a/b.sock"] {
            assert_eq!(text.parse::<AdminAddr>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn the_four_routes_answer_with_their_status_and_headers() {
        let mut s = tcp_server();
        assert_ne!(s.local_addr(), "127.0.0.1:0", "the real port");
        for (path, status, body) in [
            ("/livez", 200, "alive\n"),
            ("/readyz", 503, "not ready: 1 of 2 workers ready\n"),
            ("/readyz?verbose", 503, "not ready: 1 of 2 workers ready\n"),
            ("/startupz", 200, "started\n"),
            ("/metrics", 200, "# TYPE up gauge\nup 1\n"),
            ("http://localhost:9090/livez", 200, "alive\n"),
        ] {
            let got = exchange(&mut s, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"));
            let (code, headers, text) = split(&got);
            assert_eq!((code, text.as_str()), (status, body), "{path}: {got}");
            assert_eq!(headers["content-length"], body.len().to_string());
            assert_eq!(headers["connection"], "close");
            assert_eq!(headers["cache-control"], "no-store");
            let ty = if path == "/metrics" { PROMETHEUS } else { TEXT };
            assert_eq!(headers["content-type"], ty, "{path}");
        }
        // HTTP/1.0, bare newlines and blank lines before the request line are HTTP too.
        let (code, _, text) = split(&exchange(&mut s, "\r\n\r\nGET /livez HTTP/1.0\n\n"));
        assert_eq!((code, text.as_str()), (200, "alive\n"));
        assert_eq!(s.connections(), 0, "every connection is closed after its answer");
    }

    #[test]
    fn head_sends_the_headers_of_get_without_the_body() {
        let mut s = tcp_server();
        let got = exchange(&mut s, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let (code, headers, body) = split(&got);
        assert_eq!(code, 200);
        assert_eq!(headers["content-length"], "# TYPE up gauge\nup 1\n".len().to_string());
        assert_eq!(body, "", "{got}");
        let (code, headers, body) = split(&exchange(&mut s, "HEAD /nope HTTP/1.1\r\n\r\n"));
        assert_eq!((code, body.as_str()), (404, ""));
        assert_ne!(headers["content-length"], "0");
    }

    #[test]
    fn unknown_paths_are_404_and_other_methods_405_without_asking_the_master() {
        let mut s = tcp_server();
        let mut asked = 0;
        let mut counting = |route| {
            asked += 1;
            answers(route)
        };
        for request in ["GET / HTTP/1.1\r\n\r\n", "GET /livez/ HTTP/1.1\r\n\r\n", "GET /metricsz HTTP/1.1\r\n\r\n"] {
            let (code, headers, body) = split(&exchange_with(&mut s, request.as_bytes(), &mut counting));
            assert_eq!(code, 404, "{request:?}");
            assert!(body.contains("/livez, /readyz, /startupz and /metrics"), "{body}");
            assert_eq!(headers["connection"], "close");
        }
        // A body is never read (nor waited for): the answer comes anyway, and the connection
        // ends cleanly.
        for request in [
            "POST /livez HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "DELETE /metrics HTTP/1.1\r\n\r\n",
            "PUT /readyz HTTP/1.1\r\nContent-Length: 100000\r\n\r\npartial",
        ] {
            let got = exchange_with(&mut s, request.as_bytes(), &mut counting);
            let (code, headers, _) = split(&got);
            assert_eq!(code, 405, "{request:?}: {got}");
            assert_eq!(headers["allow"], "GET, HEAD");
        }
        assert_eq!(asked, 0);
    }

    #[test]
    fn garbage_and_oversized_heads_are_400_and_closed() {
        let mut s = tcp_server();
        let oversized = format!("GET /livez HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let many_headers: String = "GET /livez HTTP/1.1\r\n".to_owned() + &"X: y\r\n".repeat(MAX_HEADERS + 1) + "\r\n";
        let no_newline = "x".repeat(MAX_HEAD + 100);
        let cases: [(&[u8], &str); 7] = [
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", "malformed"), // TLS
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "malformed"),
            (b"GET /livez HTTP/1.1\r\nBad Header\r\n\r\n", "malformed"),
            (b"\x00\x01\x02\x03\n", "malformed"),
            (oversized.as_bytes(), "longer than 8192 bytes"),
            (many_headers.as_bytes(), "more than 64 headers"),
            (no_newline.as_bytes(), "longer than 8192 bytes"),
        ];
        for (request, why) in cases {
            let got = exchange_with(&mut s, request, &mut |_| panic!("not a request to answer"));
            let (code, headers, body) = split(&got);
            assert_eq!(code, 400, "{got}");
            assert!(body.contains(why), "{body}");
            assert_eq!(headers["connection"], "close");
        }
        // A head cut short by the client's half-close is answered too.
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.write_all(b"GET /livez HTTP/1.1\r\nHost:").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        serve(&mut s, &mut answers);
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 400 ") && got.contains("ended before its head"), "{got}");
        // A client that leaves without a word just goes.
        drop(TcpStream::connect(s.local_addr()).unwrap());
        serve(&mut s, &mut answers);
        assert_eq!(s.connections(), 0);
    }

    #[test]
    fn a_head_sent_byte_by_byte_is_parsed_a_few_times_and_answered() {
        let mut s = tcp_server();
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        let t0 = Instant::now();
        while s.connections() == 0 {
            turn(&mut s, t0, Duration::from_millis(20), &mut answers);
        }
        let request = b"GET /startupz HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
        for (i, byte) in request.iter().enumerate() {
            c.write_all(&[*byte]).unwrap();
            // Its deadline does not move with every byte: the whole head is due in time.
            assert_eq!(s.next_deadline(), Some(t0 + REQUEST_TIMEOUT));
            while !turn(&mut s, t0 + Duration::from_millis(i as u64), Duration::from_millis(100), &mut answers) {}
            if let Some(conn) = s.conns.values().next() {
                // Parsed when the first line was complete, and not again until the blank line.
                assert_eq!(conn.parses, u8::from(conn.first_line), "after {} bytes", i + 1);
            }
        }
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(split(&got).0, 200, "{got}");
        assert_eq!(s.connections(), 0);
    }

    #[test]
    fn a_slow_client_is_closed_at_its_deadline() {
        let mut s = tcp_server();
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t0 = Instant::now();
        while s.connections() == 0 {
            turn(&mut s, t0, Duration::from_millis(20), &mut answers);
        }
        assert_eq!(s.next_deadline(), Some(t0 + REQUEST_TIMEOUT));
        // Slowloris: a byte every 100 ms (of the time we pass in), never finishing the head.
        let drip = b"GET /livez HTTP/1.1\r\nX-Slow: ".iter().chain([b'a'; 100].iter());
        for (i, byte) in drip.take(49).enumerate() {
            c.write_all(&[*byte]).unwrap();
            let now = t0 + Duration::from_millis(100 * (i as u64 + 1));
            while !turn(&mut s, now, Duration::from_millis(100), &mut answers) {}
            assert_eq!(s.connections(), 1, "still within its {REQUEST_TIMEOUT:?} at {:?}", now - t0);
        }
        s.close_idle(t0 + REQUEST_TIMEOUT);
        assert_eq!(s.connections(), 0, "closed at the deadline");
        assert_eq!(s.next_deadline(), None);
        let mut rest = Vec::new();
        assert!(matches!(c.read_to_end(&mut rest), Ok(0)), "the client sees the end: {rest:?}");
    }

    #[test]
    fn a_flood_of_connections_never_holds_more_than_the_cap() {
        let mut s = tcp_server();
        let addr: SocketAddr = s.local_addr().parse().unwrap();
        // 300 connections in waves of 100 (below the backlog, so that no handshake waits for a
        // SYN to be sent again), all accepted at the time `t0`: none times out meanwhile.
        let (wave_tx, wave_rx) = std::sync::mpsc::channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
        let flood = std::thread::spawn(move || {
            let mut clients = Vec::new();
            for _ in 0..3 {
                clients.extend((0..100).map(|_| TcpStream::connect(addr).unwrap()));
                wave_tx.send(()).unwrap();
                ack_rx.recv().unwrap();
            }
            clients
        });
        let t0 = Instant::now();
        let mut most = 0;
        for _ in 0..3 {
            while wave_rx.try_recv().is_err() {
                turn(&mut s, t0, Duration::from_millis(5), &mut answers);
                most = most.max(s.connections());
                assert!(s.connections() <= MAX_CONNECTIONS, "{} connections", s.connections());
            }
            while turn(&mut s, t0, Duration::from_millis(50), &mut answers) {
                most = most.max(s.connections());
                assert!(s.connections() <= MAX_CONNECTIONS, "{} connections", s.connections());
            }
            ack_tx.send(()).unwrap();
        }
        let clients = flood.join().unwrap();
        assert_eq!((most, s.connections()), (MAX_CONNECTIONS, MAX_CONNECTIONS));
        // An honest client still gets its answer: the oldest idle connection makes room.
        let mut c = connect(&s);
        c.write_all(b"GET /livez HTTP/1.1\r\n\r\n").unwrap();
        while turn(&mut s, t0, Duration::from_millis(50), &mut answers) {}
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(split(&got).0, 200, "{got}");
        assert_eq!(s.connections(), MAX_CONNECTIONS - 1);
        // The flood leaves: every connection ends by EOF.
        drop(clients);
        serve(&mut s, &mut answers);
    }

    /// A TCP client with a tiny receive buffer: it takes almost nothing of an answer it does
    /// not read.
    fn stubborn_client(addr: &str) -> TcpStream {
        let addr: SocketAddr = addr.parse().unwrap();
        let sock = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&addr.into()).unwrap();
        sock.into()
    }

    #[test]
    fn a_client_that_never_reads_a_big_answer_does_not_block_and_costs_bounded_memory() {
        let mut s = tcp_server();
        let big = "x".repeat(MAX_ANSWER);
        let mut metrics = |route| match route {
            Route::Metrics => Answer { status: 200, body: big.clone() },
            other => answers(other),
        };
        let t0 = Instant::now();
        // Scrapers that never read: each answer is written as far as the kernel takes it (on
        // loopback, some MiB) and the rest is kept, until the answers kept reach the cap.
        let mut stubborn = Vec::new();
        let refused = loop {
            assert!(stubborn.len() < 100, "no 503 after {} stubborn clients", stubborn.len());
            let mut c = stubborn_client(&s.local_addr());
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let started = Instant::now();
            let last = s.next_id;
            while s.next_id == last {
                turn(&mut s, t0, Duration::from_millis(20), &mut metrics);
            }
            let id = s.next_id;
            let kept = loop {
                match s.conns.get(&id) {
                    Some(conn) if conn.answered => break true,
                    None => break false,
                    Some(_) => turn(&mut s, t0, Duration::from_millis(20), &mut metrics),
                };
            };
            assert!(started.elapsed() < Duration::from_secs(2), "answering took {:?}", started.elapsed());
            let pending: usize = s.conns.values().map(Conn::pending).sum();
            assert!(pending <= MAX_BUFFERED, "{pending} bytes kept");
            if !kept {
                assert!(pending + MAX_ANSWER > MAX_BUFFERED, "refused with only {pending} bytes kept");
                break c;
            }
            assert!(s.conns[&id].pending() > 0, "the kernel took it all: the test proves nothing");
            stubborn.push(c);
        };
        assert!(stubborn.len() >= 2, "{} answers kept", stubborn.len());
        for (_, _, read, write) in s.sockets() {
            assert!(!read && write, "waiting for the clients to read");
        }
        // Past the cap on unsent answers, another scrape was told to come back.
        let mut refused = refused;
        let mut got = String::new();
        refused.read_to_string(&mut got).unwrap();
        let (code, headers, _) = split(&got);
        assert_eq!((code, headers["retry-after"].as_str()), (503, "1"), "{got}");
        // Small answers still go out meanwhile.
        let mut c = connect(&s);
        c.write_all(b"GET /livez HTTP/1.1\r\n\r\n").unwrap();
        while turn(&mut s, t0, Duration::from_millis(50), &mut metrics) {}
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(split(&got).0, 200, "{got}");
        // Their deadline to take the answer comes, and they are closed.
        assert_eq!(s.next_deadline(), Some(t0 + REQUEST_TIMEOUT));
        s.close_idle(t0 + REQUEST_TIMEOUT - Duration::from_millis(1));
        assert_eq!(s.connections(), stubborn.len());
        s.close_idle(t0 + REQUEST_TIMEOUT);
        assert_eq!(s.connections(), 0);
    }

    #[test]
    fn a_big_answer_reaches_a_client_that_reads_and_a_too_big_one_is_500() {
        let mut s = tcp_server();
        let addr = s.local_addr();
        let reader = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            got
        });
        let big = "m".repeat(MAX_ANSWER);
        serve_until(&mut s, &reader, &mut |_| Answer { status: 200, body: big.clone() });
        let got = reader.join().unwrap();
        let text = String::from_utf8(got).unwrap();
        let (code, headers, body) = split(&text);
        assert_eq!((code, body.len()), (200, MAX_ANSWER));
        assert_eq!(headers["content-length"], MAX_ANSWER.to_string());

        let bigger = "m".repeat(MAX_ANSWER + 1);
        let got = exchange_with(&mut s, b"GET /metrics HTTP/1.1\r\n\r\n", &mut |_| Answer {
            status: 200,
            body: bigger.clone(),
        });
        let (code, _, body) = split(&got);
        assert_eq!(code, 500);
        assert!(body.contains("too large"), "{body}");
        // A status that cannot carry a body is a mistake of the master, answered 500.
        for status in [0, 101, 204, 304, 600] {
            let got =
                exchange_with(&mut s, b"GET /livez HTTP/1.1\r\n\r\n", &mut |_| Answer { status, body: String::new() });
            assert_eq!(split(&got).0, 500, "{status}");
        }
    }

    /// Turns until `client` has finished.
    fn serve_until<T>(
        s: &mut AdminServer,
        client: &std::thread::JoinHandle<T>,
        answer: &mut dyn FnMut(Route) -> Answer,
    ) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client.is_finished() {
            assert!(Instant::now() < deadline, "the client did not finish: {s:?}");
            turn(s, Instant::now(), Duration::from_millis(20), answer);
        }
    }

    #[test]
    fn the_listener_and_connections_are_non_blocking_and_close_on_exec() {
        let mut s = tcp_server();
        let _c = TcpStream::connect(s.local_addr()).unwrap();
        while s.connections() == 0 {
            turn(&mut s, Instant::now(), Duration::from_millis(20), &mut answers);
        }
        let fds: Vec<BorrowedFd<'_>> =
            std::iter::once(s.listener()).chain(s.sockets().map(|(_, fd, _, _)| fd)).collect();
        for fd in fds {
            assert!(rustix::io::fcntl_getfd(fd).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
            assert!(rustix::fs::fcntl_getfl(fd).unwrap().contains(rustix::fs::OFlags::NONBLOCK));
        }
    }

    #[test]
    fn a_tcp_address_in_use_is_refused_naming_it() {
        let s = tcp_server();
        let e = AdminServer::bind(&s.local_addr().parse().unwrap()).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::BadListener { ref name, .. } if name == "admin"), "{text}");
        assert!(text.contains(&s.local_addr()) && text.contains("choose another port"), "{text}");
    }

    #[test]
    fn a_unix_listener_serves_replaces_a_stale_socket_and_refuses_a_live_one() {
        let dir = TempDir::new("unix");
        let path = dir.path().join("admin.sock");
        let addr = AdminAddr::Unix(path.clone());
        // A socket file left by a dead server (nobody listens): replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let mut s = AdminServer::bind(&addr).unwrap();
        assert_eq!(s.local_addr(), path.display().to_string());
        let (code, _, body) = split(&exchange(&mut s, "GET /livez HTTP/1.1\r\n\r\n"));
        assert_eq!((code, body.as_str()), (200, "alive\n"));
        // A live one: refused, and left alone.
        let e = AdminServer::bind(&addr).unwrap_err().to_string();
        assert!(e.contains("admin") && e.contains("another server listens"), "{e}");
        let (code, _, _) = split(&exchange(&mut s, "GET /readyz HTTP/1.1\r\n\r\n"));
        assert_eq!(code, 503, "the first server still serves");
        drop(s);
        assert!(!path.exists(), "its socket file is removed with it");
        // Anything else at the path: refused, and left alone.
        std::fs::write(&path, "not a socket").unwrap();
        let e = AdminServer::bind(&addr).unwrap_err().to_string();
        assert!(e.contains("is not a socket; remove it"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        // A directory that does not exist.
        let e = AdminServer::bind(&AdminAddr::Unix(dir.path().join("no/such/dir.sock"))).unwrap_err().to_string();
        assert!(e.contains("is missing"), "{e}");
    }

    #[test]
    fn the_largest_clusters_metrics_fit_the_answer_cap() {
        use crate::stats::{ClusterStats, WorkerStats, WorkerStatus};
        // Every figure as long as it can be, and a long cluster label: about 5.3 MB.
        let w = |id| WorkerStats {
            worker_id: id,
            pid: Some(4_000_000 + id as u32),
            port: 65535,
            status: WorkerStatus::Active,
            start_time: None,
            uptime: Duration::from_secs_f64(12_345_678.123_457),
            exit_status: None,
            crash_count: u32::MAX,
            respawn_disabled: false,
            restarts: u64::MAX,
            rss_bytes: Some(u64::MAX),
            cpu_time: Some(Duration::from_secs_f64(98_765_432.123_457)),
            heartbeat_age: Some(Duration::from_secs_f64(1.123_456_789)),
            requests: Some(u64::MAX),
            in_flight: Some(u64::MAX),
            last_exit_reason: None,
            notify_status: None,
        };
        let workers: Vec<WorkerStats> = (0..crate::supervisor::MAX_WORKERS).map(w).collect();
        let name = "n".repeat(64);
        let text = crate::proto::metrics::render_labeled(&ClusterStats::default(), &workers, &[("cluster", &name)]);
        assert!(text.len() <= MAX_ANSWER, "{} bytes", text.len());
    }
}
