//! The master's side of the control socket: a non-blocking unix listener and its connections,
//! polled by the master's loop. Every connection is checked (peer uid), bounded (line length,
//! number of connections, idle time) and never allowed to block the loop.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::driver::Driver;
use super::settings::check_scale;
use crate::error::Error;
use crate::proto::control::{self, EventsInfo, MAX_REQUEST, MasterInfo, Request, Response, Status};
use crate::proto::line::LineIo;
use crate::supervisor::{Event, History};

/// Connections kept at once; past this the oldest idle one is closed to make room.
const MAX_CONNECTIONS: usize = 64;
/// Requests a client may send at once without reading the answers; past this it is answered
/// with an error and disconnected (an honest client sends one and waits).
const MAX_PIPELINED: usize = 32;
/// A connection with nothing to do for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Output a following `logs` client may leave unread; past it, new lines are left out for it
/// (counted, and a `dropped` notice sent once it reads again): a client that does not read
/// never holds the master or grows it.
const FOLLOW_PENDING: usize = 1 << 20;
/// Unwritten output past which an event stream waits for its client to read: lines are added
/// as it does, and entries that leave the ring meanwhile become one "missed" line. A client that
/// never reads costs this (and the kernel's socket buffer), never more.
const STREAM_BUFFER: usize = 64 * 1024;
/// Unwritten output of all connections together past which a `logs` answer is refused (and
/// up to which it is cut to the newest lines that fit): clients that ask for the recent lines
/// and do not read never hold more of the master's memory than this (and one answer each).
const ANSWERS_PENDING: usize = 16 << 20;
/// The least a `logs` answer may be given before it is refused instead.
const MIN_ANSWER: usize = 64 * 1024;
/// Connections that follow the events or the captured lines at once, together (the others
/// keep room for requests: a follower is owed lines, so it is never closed to make room).
const MAX_FOLLOWERS: usize = 16;

/// Identifies a control connection.
pub(crate) type ConnId = u64;

struct Conn {
    io: LineIo,
    last_active: Instant,
    /// Replies still owed (restarts being waited for): such a connection is never idle.
    owed: usize,
    /// Close once the output is written.
    closing: bool,
    /// It streams the event history (`events`).
    stream: Option<Stream>,
    /// It follows the captured lines (`logs` with `follow`).
    follows_logs: bool,
}

impl Conn {
    /// It follows the events or the captured lines (until it closes).
    fn following(&self) -> bool {
        self.follows_logs || self.stream.is_some_and(|s| s.until.is_none())
    }
}

/// An event stream's position.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// The sequence number of the next entry to send.
    next: u64,
    /// Without `follow`: the last entry to send, then the end line.
    until: Option<u64>,
}

pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created (so we only ever unlink our own).
    id: (u64, u64),
    /// The new master of an upgrade took the socket over: no more accepting here, and the
    /// file is its to remove.
    handed_over: bool,
    conns: HashMap<ConnId, Conn>,
    next_id: ConnId,
    uid: u32,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer").field("path", &self.path).field("connections", &self.conns.len()).finish()
    }
}

impl ControlServer {
    /// Binds the control socket at `path`: its directory is created 0700 if missing, the socket
    /// is 0600. A socket left by a dead master is replaced; a live master there is an error.
    /// With `private_dir` (the default location), the directory must belong to this user and
    /// be writable by nobody else: in a shared temporary directory another user could have
    /// created it first.
    pub(crate) fn bind(path: &Path, private_dir: bool) -> Result<ControlServer, Error> {
        let fail = |reason: String| Error::ControlSocket { path: path.to_owned(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
            if private_dir {
                let meta = std::fs::symlink_metadata(dir).map_err(|e| fail(e.to_string()))?;
                let euid = rustix::process::geteuid().as_raw();
                if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
                    return Err(fail(format!(
                        "its directory {} is not a private directory of this user (owner uid {}, mode {:o}); remove it, or choose a socket path with Cluster::control_socket",
                        dir.display(),
                        meta.uid(),
                        meta.mode() & 0o7777
                    )));
                }
            }
        }
        if std::fs::symlink_metadata(path).is_ok() {
            match UnixStream::connect(path) {
                Ok(_) => return Err(Error::AlreadyRunning { path: path.to_owned() }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!("replacing the stale control socket {}", path.display());
                    std::fs::remove_file(path).map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
                }
                Err(e) => {
                    return Err(fail(format!("something else is at this path ({e}); remove it or choose another")));
                }
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| fail(format!("cannot listen: {e}")))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(format!("cannot restrict its permissions: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
            handed_over: false,
            conns: HashMap::new(),
            next_id: 0,
            uid: rustix::process::geteuid().as_raw(),
        })
    }

    /// The control socket an upgrade's old master handed over (the same socket, never bound
    /// again: clients never find the path without a listener).
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, path: PathBuf, id: (u64, u64)) -> Result<ControlServer, Error> {
        let listener = UnixListener::from(fd);
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::ControlSocket { path: path.clone(), reason: e.to_string() })?;
        Ok(ControlServer {
            listener,
            path,
            id,
            handed_over: false,
            conns: HashMap::new(),
            next_id: 0,
            uid: rustix::process::geteuid().as_raw(),
        })
    }

    /// The socket file's device and inode.
    pub(crate) fn file_id(&self) -> (u64, u64) {
        self.id
    }

    /// The new master of an upgrade accepts from now on (connections open here are still
    /// answered), and removes the file when it is done.
    pub(crate) fn hand_over(&mut self) {
        self.handed_over = true;
    }

    /// The new master of an upgrade failed before it took over: this master accepts again,
    /// and removes the file when it is done.
    pub(crate) fn take_back(&mut self) {
        self.handed_over = false;
    }

    /// Whether to poll the listener (not once handed over).
    pub(crate) fn accepting(&self) -> bool {
        !self.handed_over
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Each connection's socket, whether to poll it for input and whether it has output
    /// pending. A connection is not read after EOF, nor while its previous answers are still
    /// unwritten: a client that sends requests without reading the answers is left to wait.
    pub(crate) fn sockets(&self) -> impl Iterator<Item = (ConnId, &UnixStream, bool, bool)> {
        self.conns.iter().map(|(id, c)| (*id, &c.io.sock, !c.closing && !c.io.wants_write(), c.io.wants_write()))
    }

    /// Accepts every pending connection from an allowed user.
    pub(crate) fn accept(&mut self, now: Instant) {
        loop {
            let sock = match self.listener.accept() {
                Ok((sock, _)) => sock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("control socket: accept failed: {e}");
                    }
                    return;
                }
            };
            match crate::os::sys::unix_peer_cred(std::os::fd::AsFd::as_fd(&sock)) {
                Ok(cred) if cred.uid == self.uid || cred.uid == 0 => {}
                Ok(cred) => {
                    let pid = cred.pid.map_or_else(|| "in another PID namespace".to_owned(), |p| p.to_string());
                    tracing::warn!("control socket: refused a connection from uid {} (pid {pid})", cred.uid);
                    continue;
                }
                Err(e) => {
                    tracing::warn!("control socket: refused a connection whose peer is unknown: {e}");
                    continue;
                }
            }
            let Ok(io) = LineIo::new(sock) else { continue };
            if self.conns.len() >= MAX_CONNECTIONS {
                self.evict_oldest_idle();
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("control socket: {MAX_CONNECTIONS} connections wait for answers; refusing another");
                continue;
            }
            self.next_id += 1;
            self.conns.insert(
                self.next_id,
                Conn { io, last_active: now, owed: 0, closing: false, stream: None, follows_logs: false },
            );
        }
    }

    fn evict_oldest_idle(&mut self) {
        let oldest =
            self.conns.iter().filter(|(_, c)| c.owed == 0).min_by_key(|(_, c)| c.last_active).map(|(id, _)| *id);
        if let Some(id) = oldest {
            tracing::debug!("control socket: too many connections, closing the oldest idle one");
            self.conns.remove(&id);
        }
    }

    /// Reads what connection `id` sent and returns its complete requests, parsed (an `Err` is
    /// the error message to answer). EOF, errors and oversized lines end the connection.
    pub(crate) fn read(&mut self, id: ConnId, now: Instant) -> Vec<Result<Request, String>> {
        let Some(c) = self.conns.get_mut(&id) else { return Vec::new() };
        let input = c.io.read_lines(MAX_REQUEST);
        if !input.lines.is_empty() || input.too_long {
            c.last_active = now;
        }
        let mut requests: Vec<Result<Request, String>> = input
            .lines
            .iter()
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| control::parse_request(line))
            .collect();
        if requests.len() > MAX_PIPELINED {
            requests.truncate(MAX_PIPELINED);
            requests.push(Err(format!("more than {MAX_PIPELINED} requests at once; closing the connection")));
            c.closing = true;
        }
        if input.too_long {
            requests.push(Err(format!("request longer than {MAX_REQUEST} bytes; closing the connection")));
        }
        // The client is gone or half-closed, or broke the protocol: answer, then close.
        c.closing |= input.eof || input.too_long;
        requests
    }

    /// Queues a reply line on connection `id` and writes what the socket takes now.
    pub(crate) fn reply(&mut self, id: ConnId, line: &[u8]) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.io.send(line).ok();
        }
        self.flush(id);
    }

    /// Room for a `logs` answer within [`ANSWERS_PENDING`]; `Err` is the message to answer
    /// instead.
    pub(crate) fn answer_room(&self) -> Result<usize, String> {
        let pending: usize = self.conns.values().map(|c| c.io.pending_output()).sum();
        let room = ANSWERS_PENDING.saturating_sub(pending);
        if room < MIN_ANSWER {
            return Err(format!(
                "the master holds {} MiB of answers that its clients have not read yet; try again once they read (or stop them)",
                pending >> 20
            ));
        }
        Ok(room)
    }

    /// Output connection `id` has not taken yet; `None` once it is closed.
    pub(crate) fn pending_output(&self, id: ConnId) -> Option<usize> {
        self.conns.get(&id).map(|c| c.io.pending_output())
    }

    /// The client of connection `id` closed its end (or it is gone).
    pub(crate) fn is_closing(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_none_or(|c| c.closing)
    }

    /// Notes that connection `id` is owed a reply later (or no longer, with `delta` -1).
    pub(crate) fn owe(&mut self, id: ConnId, delta: isize) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.owed = c.owed.saturating_add_signed(delta);
        }
    }

    /// Writes pending output of connection `id`; closes it when it is done or broken.
    /// (An event stream gets more lines as its output drains: [`ControlServer::feed_streams`].)
    pub(crate) fn flush(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        // An error: the client went away before its reply; drop the connection quietly.
        let broken = c.io.flush().is_err();
        if broken || (!c.io.wants_write() && c.closing && c.owed == 0) {
            self.conns.remove(&id);
        }
    }

    /// Starts streaming the history `h` on connection `id` (after its header, already sent):
    /// the entries after `since` (all kept ones without it), then with `follow` every new one.
    /// `Err` is the message to answer instead.
    pub(crate) fn start_stream(
        &mut self,
        id: ConnId,
        since: Option<u64>,
        follow: bool,
        h: &History,
    ) -> Result<(), String> {
        if follow && h.capacity() == 0 {
            return Err("the event history is off (event_history(0)): there is nothing to follow".into());
        }
        if follow {
            self.room_to_follow("read the history without --follow")?;
        }
        let Some(c) = self.conns.get_mut(&id) else { return Ok(()) };
        if c.stream.is_some() {
            return Err("this connection streams events already".into());
        }
        let last = h.last_seq();
        // A `since` past the last entry (another master's) means from the next one.
        let next = match since {
            Some(seq) => seq.min(last).saturating_add(1),
            None => h.first_seq().unwrap_or(last + 1),
        };
        c.stream = Some(Stream { next, until: (!follow).then_some(last) });
        c.owed += 1;
        Ok(())
    }

    /// `Err` (the sentence to answer, ending with `instead`) when [`MAX_FOLLOWERS`] connections
    /// follow already.
    fn room_to_follow(&self, instead: &str) -> Result<(), String> {
        let following = self.conns.values().filter(|c| c.following()).count();
        if following >= MAX_FOLLOWERS {
            return Err(format!(
                "{MAX_FOLLOWERS} connections follow the events or the logs already, the most the master serves; stop one (or {instead})"
            ));
        }
        Ok(())
    }

    /// Connection `id` follows the captured lines from now on (never idle: it waits for
    /// lines); `Err` is the message to answer instead.
    pub(crate) fn follow_logs(&mut self, id: ConnId) -> Result<(), String> {
        self.room_to_follow("read the recent lines without --follow")?;
        if let Some(c) = self.conns.get_mut(&id) {
            c.follows_logs = true;
            c.owed += 1;
        }
        Ok(())
    }

    /// Ends the event stream or the following of the captured lines of connection `id`, and
    /// closes it once its output is written.
    pub(crate) fn end_stream(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            let ended = usize::from(c.stream.take().is_some()) + usize::from(std::mem::take(&mut c.follows_logs));
            if ended > 0 {
                c.owed = c.owed.saturating_sub(ended);
                c.closing = true;
            }
        }
    }

    /// Whether connection `id` streams events or follows the captured lines: a request there
    /// would have its answer mixed into the stream.
    pub(crate) fn streaming(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|c| c.stream.is_some() || c.follows_logs)
    }

    /// Adds to every event stream what `h` has for it, up to [`STREAM_BUFFER`] of unwritten
    /// output per connection, and writes what the sockets take.
    pub(crate) fn feed_streams(&mut self, h: &History) {
        let ids: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.stream.is_some()).map(|(id, _)| *id).collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                feed(c, h);
            }
            self.flush(id);
        }
    }

    /// Closes connections idle for too long.
    pub(crate) fn close_idle(&mut self, now: Instant) {
        self.conns.retain(|_, c| c.owed > 0 || now.duration_since(c.last_active) < IDLE_TIMEOUT);
    }

    /// When the next idle connection times out.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter(|c| c.owed == 0).map(|c| c.last_active + IDLE_TIMEOUT).min()
    }
}

/// One event stream's share of the history (see [`ControlServer::feed_streams`]).
fn feed(c: &mut Conn, h: &History) {
    let Some(mut s) = c.stream else { return };
    let last = h.last_seq();
    while c.io.pending_output() < STREAM_BUFFER {
        let end = s.until.unwrap_or(last);
        if s.next > end {
            if let Some(until) = s.until {
                // The whole history asked for was sent: the connection takes requests again.
                c.io.send(&control::EventsLine::End { last_seq: until }.encode()).ok();
                c.stream = None;
                c.owed = c.owed.saturating_sub(1);
                return;
            }
            break;
        }
        // Entries that left the ring before they could be sent (the history holds at most its
        // capacity): one line says how many.
        let first = h.first_seq().unwrap_or(last + 1);
        if s.next < first {
            let resume = first.min(end + 1);
            let count = resume - s.next;
            c.io.send(&control::EventsLine::Missed { count, next_seq: resume }.encode()).ok();
            s.next = resume;
            continue;
        }
        let before = s.next;
        for e in h.since(s.next - 1) {
            if e.seq > end || c.io.pending_output() >= STREAM_BUFFER {
                break;
            }
            c.io.send(&control::encode_event(e)).ok();
            s.next = e.seq + 1;
        }
        if s.next == before {
            // Nothing to add (cannot happen with a ring of consecutive entries): never spin.
            break;
        }
    }
    c.stream = Some(s);
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Unlink the socket only if it is still ours (nobody replaced it meanwhile, and no new
        // master took it over).
        if !self.handed_over
            && let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
impl Driver {
    /// Answers what a control connection sent.
    pub(super) fn on_control(&mut self, id: ConnId, events: &mut VecDeque<Event>) {
        let Some(ctl) = self.m.control.as_mut() else { return };
        let requests = ctl.read(id, Instant::now());
        for request in requests {
            if let Some(ctl) = self.m.control.as_mut().filter(|c| c.streaming(id)) {
                // A request during an event stream or a `logs --follow` (also one sent right
                // behind it): its answer would be mixed into the stream.
                let message = if self.m.capture.as_mut().is_some_and(|c| c.followers.remove(&id).is_some()) {
                    "this connection follows the logs: send other requests on a connection of their own; closing it"
                } else {
                    "this connection streams events: send other requests after its end, or on a connection of their own; closing it"
                };
                ctl.end_stream(id);
                ctl.reply(id, &control::encode_error(message));
                break;
            }
            let reply = match request {
                Err(message) => Err(message),
                Ok(Request::Status) => {
                    let (cluster, workers) = self.stats_now();
                    let pid = self.master_pid.as_raw_nonzero().get() as u32;
                    let master = MasterInfo::new(
                        pid,
                        self.m.name.clone(),
                        self.m.shared.addr.to_string(),
                        self.m.listeners.first().map(|b| b.balance.to_string()).unwrap_or_default(),
                        self.m.started,
                        crate::os::procfs::proc_usage(pid).map(|(rss, _)| rss),
                    );
                    Ok(Response::Status(Box::new(Status { master, cluster, workers })))
                }
                Ok(Request::Restart { wait: false }) => {
                    events.push_back(Event::Restart { ticket: None });
                    Ok(Response::RestartStarted)
                }
                Ok(Request::Restart { wait: true }) => {
                    let ticket = self.m.shared.next_ticket.fetch_add(1, Ordering::Relaxed);
                    self.control_waiters.insert(ticket, id);
                    if let Some(ctl) = self.m.control.as_mut() {
                        ctl.owe(id, 1);
                    }
                    events.push_back(Event::Restart { ticket: Some(ticket) });
                    continue;
                }
                Ok(Request::Upgrade { wait, slot_by_slot }) => {
                    // Answered when it starts (or is refused), or with `wait` when it ends.
                    let ticket = self.m.shared.next_ticket.fetch_add(1, Ordering::Relaxed);
                    self.upgrade_waiters.insert(ticket, (id, wait));
                    if let Some(ctl) = self.m.control.as_mut() {
                        ctl.owe(id, 1);
                    }
                    events.push_back(Event::Upgrade { ticket: Some(ticket), slot_by_slot });
                    continue;
                }
                Ok(Request::Scale { workers }) => match check_scale(workers) {
                    Ok(()) => {
                        events.push_back(Event::Scale { workers });
                        Ok(Response::Scaling { workers })
                    }
                    Err(e) => Err(e.to_string()),
                },
                Ok(Request::Signal { signal }) => {
                    events.push_back(Event::SignalWorkers { signal });
                    Ok(Response::Signalled { signal })
                }
                Ok(Request::Metrics) => Ok(Response::Metrics { text: self.metrics_text() }),
                Ok(Request::Probe { probe }) => {
                    let (pass, detail) = self.probe(probe);
                    Ok(Response::Probe { pass, detail })
                }
                Ok(Request::Stop) => {
                    events.push_back(Event::Shutdown);
                    Ok(Response::Stopping)
                }
                Ok(Request::Logs { worker, lines, follow }) => match self.m.capture.as_mut() {
                    None => Err(NOT_CAPTURED.to_owned()),
                    Some(capture) => {
                        // (A second `logs` on a following connection was refused above.)
                        let admitted = match self.m.control.as_mut() {
                            None => Ok(usize::MAX),
                            Some(c) => c.answer_room().and_then(|room| {
                                if follow {
                                    c.follow_logs(id)?;
                                }
                                Ok(room)
                            }),
                        };
                        admitted.map(|room| {
                            if follow {
                                capture.followers.insert(id, super::capture::Follower { worker, dropped: 0 });
                            }
                            Response::Logs { lines: capture.recent(worker, lines, room) }
                        })
                    }
                },
                Ok(Request::ReopenLogs) => match self.m.capture.as_mut() {
                    None => Err(NOT_CAPTURED.to_owned()),
                    Some(capture) => capture.reopen().map(|path| Response::LogsReopened { path }),
                },
                Ok(Request::Events { since, follow }) => {
                    let h = self.sup.history();
                    let info = EventsInfo {
                        master_pid: self.master_pid.as_raw_nonzero().get() as u32,
                        capacity: h.capacity(),
                        first_seq: h.first_seq(),
                        last_seq: h.last_seq(),
                    };
                    let Some(ctl) = self.m.control.as_mut() else { return };
                    // The header first, then the entries (`feed_streams`, below).
                    match ctl.start_stream(id, since, follow, h) {
                        Ok(()) => {
                            ctl.reply(id, &Response::Events(info).encode());
                            continue;
                        }
                        Err(message) => Err(message),
                    }
                }
            };
            if let Some(ctl) = self.m.control.as_mut() {
                let line = match &reply {
                    Ok(response) => response.encode(),
                    Err(message) => control::encode_error(message),
                };
                ctl.reply(id, &line);
            }
        }
        // A follower that closed its end is done.
        if let (Some(ctl), Some(capture)) = (self.m.control.as_mut(), self.m.capture.as_mut())
            && ctl.is_closing(id)
            && capture.followers.remove(&id).is_some()
        {
            ctl.end_stream(id);
        }
        if let Some(ctl) = self.m.control.as_mut() {
            ctl.flush(id);
            // Its output drained (or it just asked for events): more lines.
            ctl.feed_streams(self.sup.history());
        }
    }

    /// Sends newly captured lines to the connections following them (`logs --follow`), each
    /// within its bound of unread output: what does not fit is left out and counted, and a
    /// `dropped` notice goes before the next lines that fit.
    pub(super) fn forward_logs(&mut self, lines: &[crate::proto::control::LogLine]) {
        use crate::proto::control::LogEvent;
        let (Some(ctl), Some(capture)) = (self.m.control.as_mut(), self.m.capture.as_mut()) else { return };
        if lines.is_empty() || capture.followers.is_empty() {
            return;
        }
        capture.followers.retain(|id, f| {
            let Some(pending) = ctl.pending_output(*id) else { return false };
            let mine: Vec<&crate::proto::control::LogLine> =
                lines.iter().filter(|l| f.worker.is_none_or(|w| l.worker == w)).collect();
            if mine.is_empty() {
                return true;
            }
            if pending >= FOLLOW_PENDING {
                f.dropped += mine.len() as u64;
                return true;
            }
            let mut out = Vec::new();
            if f.dropped > 0 {
                out.extend(LogEvent::Dropped(f.dropped).encode());
                f.dropped = 0;
            }
            for l in mine {
                out.extend(LogEvent::Line(l.clone()).encode());
            }
            ctl.reply(*id, &out);
            true
        });
    }

    /// Reopens the captured output's log file (its reopen signal arrived).
    pub(super) fn reopen_logs(&mut self) {
        let Some(capture) = self.m.capture.as_mut() else { return };
        if !capture.has_file() {
            // Handled all the same: its default action would end the master and its workers.
            tracing::info!("nothing to reopen: the captured output goes to stdout");
            return;
        }
        if let Err(e) = capture.reopen() {
            tracing::warn!("{e}");
        }
    }
}

/// The answer to `logs` and `reopen_logs` when the output is not captured.
const NOT_CAPTURED: &str = "this cluster does not capture its workers' output: they write to the master's own stdout and stderr (start it with --capture-output, or Cluster::capture_output, to read their logs here)";
