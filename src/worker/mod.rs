//! The worker side: the inherited listener, readiness, the channel to the master, heartbeats
//! and request counts, and the "master is gone" notice; with the `tokio` feature, [`serve`]
//! runs a server in the worker.

mod channel;
#[cfg(feature = "tokio")]
pub mod serve;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::proto::channel::{self as messages, ToMaster, ToWorker};
use crate::proto::handoff::{WorkerEnv, env as vars};
use crate::stats::{ClusterStats, WorkerStats};

/// A handle to this worker process: its identity, its listener, readiness and the channel to
/// the master. Cheap to clone; every clone refers to the same worker.
///
/// [`Cluster::init`](crate::Cluster::init) returns it in a process that the master executed as
/// a worker.
///
/// # Caveats
///
/// - The worker's identity comes from `ECEWO_CLUSTER_*` environment variables, which `init`
///   removes from the environment once read (when the process has one thread, as it does first
///   thing in `main`), so that programs the worker runs do not inherit them; read the identity
///   from this handle or the module functions ([`worker_id`](crate::worker_id), …), not from the
///   environment. A program that inherits them anyway (`init` called after threads were started)
///   is not mistaken for a worker: only a process holding the master's channel is one.
/// - The listeners arrive by the systemd convention of passed sockets: fds 3, 4, … with
///   `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (this process's pid) in the environment,
///   which stay there, so that `listenfd`, `tokio-listener` or `sd_listen_fds` accept them
///   unchanged; programs the worker runs ignore them (`LISTEN_PID` is not theirs). Take each
///   socket either through this handle ([`take_listener`](Worker::take_listener), …) or through
///   such a crate, never both: each would own the descriptor.
/// - The listeners and the channel are close-on-exec: programs the worker runs do not inherit
///   them.
/// - When the master is gone, a worker that is [ready](Worker::ready) gets `SIGTERM` from the
///   kernel and has its shutdown timeout to drain and exit; after that the library ends the
///   process (exit code 1 from its channel thread, or `SIGKILL` from a timer under `serve`,
///   which reads the channel on its runtime and starts no thread of its own while it serves).
///   A worker not ready yet is
///   killed at once (`SIGKILL`): it serves nothing yet.
/// - The channel to the master is read from [`ready`](Worker::ready) on, or from the first call
///   that needs to hear from the master ([`stats`](Worker::stats),
///   [`is_master_gone`](Worker::is_master_gone), …): by a thread named `ecewo-channel`, except
///   under `serve`, whose runtime reads it. A worker that only serves stays single-threaded.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.inner.env.id)
            .field("count", &self.inner.env.count)
            .field("port", &self.inner.env.port)
            .finish_non_exhaustive()
    }
}

/// A listening socket a worker inherited from the master.
#[non_exhaustive]
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket (IPv4 or IPv6), in blocking mode.
    Tcp(TcpListener),
    /// A unix stream socket (a path or an abstract name), in blocking mode.
    Unix(std::os::unix::net::UnixListener),
}

/// One inherited listening socket: its name, its descriptor, whether it was taken.
struct Inherited {
    name: String,
    fd: i32,
    unix: bool,
    taken: bool,
}

/// Who reads the channel from the master (query answers, and EOF: the master is gone).
enum Reader {
    /// Nobody yet: the first that needs it starts the thread ([`Inner::ensure_reader`]).
    Idle(UnixStream),
    /// The channel thread.
    Thread,
    /// A task of `serve`'s runtime (the stream comes back as `Idle` if the runtime ends first).
    /// Held here: a duplicate of the task's descriptor (non-blocking, the same socket), with
    /// which a blocking query reads the answers itself, since the runtime that would read them
    /// may be the one the query blocks ([`Worker::stats`]).
    #[cfg(feature = "tokio")]
    Runtime(UnixStream),
    /// None (a unit test's worker: its thread's EOF handling would end the test process).
    #[cfg(test)]
    Never,
}

struct Inner {
    env: WorkerEnv,
    /// True for a real worker (from [`Worker::from_env`]): the parent-death signal is ours to
    /// change.
    supervised: bool,
    reader: Mutex<Reader>,
    /// What the channel's readers cut into lines. Shared, so that the runtime's reader and a
    /// blocking query reading for it never split a line between them (each reads and feeds
    /// under this lock), and a thread that takes the channel over starts from what they left.
    lines: Mutex<channel::Lines>,
    listeners: Mutex<Vec<Inherited>>,
    writer: Mutex<UnixStream>,
    ready_sent: AtomicBool,
    gone: Mutex<bool>,
    gone_cv: Condvar,
    #[cfg(feature = "tokio")]
    gone_tx: tokio::sync::watch::Sender<bool>,
    pending: Mutex<HashMap<u64, mpsc::SyncSender<ToWorker>>>,
    next_request: AtomicU64,
    /// Set when the master is gone (by the channel thread, with `gone`) or a beat could not be
    /// written: later beats fail at once. Read without a lock.
    channel_broken: AtomicBool,
    /// Requests served so far (ended), and in flight now: what a beat carries.
    served: AtomicU64,
    in_flight: AtomicU64,
    /// When the last beat was sent: nanoseconds since `epoch`, plus one (0: never).
    last_beat: AtomicU64,
    epoch: Instant,
}

impl Inner {
    fn new(env: WorkerEnv, listeners: Vec<Inherited>, writer: UnixStream, reader: Reader) -> Inner {
        #[cfg(feature = "tokio")]
        let (gone_tx, _) = tokio::sync::watch::channel(false);
        Inner {
            supervised: matches!(reader, Reader::Idle(_)),
            reader: Mutex::new(reader),
            lines: Mutex::new(channel::Lines::default()),
            env,
            listeners: Mutex::new(listeners),
            writer: Mutex::new(writer),
            ready_sent: AtomicBool::new(false),
            gone: Mutex::new(false),
            gone_cv: Condvar::new(),
            #[cfg(feature = "tokio")]
            gone_tx,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            channel_broken: AtomicBool::new(false),
            served: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_beat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Starts the channel thread unless a reader runs already. Everything that needs to hear
    /// from the master calls it first; so does [`Worker::ready`], after which the master's
    /// death must always be noticed.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the thread cannot be started (the stream stays, for a later try).
    fn ensure_reader(self: &Arc<Inner>) -> Result<(), Error> {
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*reader, Reader::Idle(_)) {
            return Ok(());
        }
        // The thread starts first and is handed the stream after: if it cannot start, the
        // stream is still ours.
        let (tx, rx) = mpsc::sync_channel::<UnixStream>(1);
        let for_thread = self.clone();
        std::thread::Builder::new()
            .name("ecewo-channel".into())
            .spawn(move || {
                if let Ok(stream) = rx.recv() {
                    channel::channel_reader(for_thread, stream);
                }
            })
            .map_err(Error::io("cannot start the worker's channel thread"))?;
        if let Reader::Idle(stream) = std::mem::replace(&mut *reader, Reader::Thread) {
            // The thread waits for it: the send cannot fail.
            let _ = tx.send(stream);
        }
        Ok(())
    }

    /// [`ensure_reader`](Inner::ensure_reader) where nothing can be returned: logged.
    fn ensure_reader_or_log(self: &Arc<Inner>) {
        if let Err(e) = self.ensure_reader() {
            tracing::warn!("{e}");
        }
    }

    /// Takes the channel's stream for a reader on a runtime, unless a reader runs already;
    /// `dup` stays here, for blocking queries ([`Reader::Runtime`]).
    #[cfg(feature = "tokio")]
    fn take_reader(&self, dup: impl FnOnce(&UnixStream) -> std::io::Result<UnixStream>) -> Option<UnixStream> {
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let Reader::Idle(stream) = &*reader else { return None };
        let kept = dup(stream).ok()?;
        match std::mem::replace(&mut *reader, Reader::Runtime(kept)) {
            Reader::Idle(stream) => Some(stream),
            _ => None,
        }
    }

    /// Gives the stream back (the runtime that read it ended): a thread reads it from now on if
    /// the worker is ready (the master's death must still be noticed), else the next that needs
    /// a reader starts one.
    #[cfg(feature = "tokio")]
    fn give_back_reader(self: &Arc<Inner>, stream: UnixStream) {
        *self.reader.lock().unwrap_or_else(|e| e.into_inner()) = Reader::Idle(stream);
        if self.ready_sent.load(Ordering::SeqCst) {
            self.ensure_reader_or_log();
        }
    }

    /// The duplicate of the runtime reader's stream, if the runtime reads the channel.
    #[cfg(feature = "tokio")]
    fn runtime_reader_fd(&self) -> Option<UnixStream> {
        match &*self.reader.lock().unwrap_or_else(|e| e.into_inner()) {
            Reader::Runtime(dup) => dup.try_clone().ok(),
            _ => None,
        }
    }

    /// Reads and dispatches what the channel holds now, never waiting (`MSG_DONTWAIT`, whatever
    /// the socket's mode), under the lines' lock. False at EOF or on an error: the master is
    /// gone.
    #[cfg(feature = "tokio")]
    fn read_available(&self, stream: &UnixStream) -> bool {
        use rustix::net::{RecvFlags, recv};
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = [0u8; 4096];
        loop {
            match recv(stream, &mut buf[..], RecvFlags::DONTWAIT) {
                Ok((0, _)) => return false,
                Ok((n, _)) => lines.feed(&buf[..n], |line| self.dispatch(line)),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return true,
                Err(_) => return false,
            }
        }
    }

    fn send(&self, msg: &ToMaster) -> Result<(), Error> {
        let line = messages::encode(msg);
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&line).map_err(|_| Error::MasterGone)
    }

    fn heartbeat_interval(&self) -> Duration {
        self.env.heartbeat.unwrap_or(DEFAULT_HEARTBEAT)
    }

    /// Now, as `last_beat` records it (never 0).
    fn beat_mark(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Sends a beat now, whenever the last one was (the `serve` helpers' beat task).
    #[cfg(feature = "tokio")]
    fn beat(&self) -> Result<(), Error> {
        if self.channel_broken.load(Ordering::Relaxed) {
            return Err(Error::MasterGone);
        }
        self.last_beat.store(self.beat_mark(), Ordering::Relaxed);
        self.send_beat()
    }

    fn send_beat(&self) -> Result<(), Error> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let served = self.served.load(Ordering::Relaxed);
        let sent = self.send(&ToMaster::Beat { served, in_flight });
        if sent.is_err() {
            self.channel_broken.store(true, Ordering::Relaxed);
        }
        sent
    }

    /// Sends the request counts without a heartbeat (the request limit was reached).
    fn send_counts(&self) -> Result<(), Error> {
        if self.channel_broken.load(Ordering::Relaxed) {
            return Err(Error::MasterGone);
        }
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let served = self.served.load(Ordering::Relaxed);
        let sent = self.send(&ToMaster::Served { served, in_flight });
        if sent.is_err() {
            self.channel_broken.store(true, Ordering::Relaxed);
        }
        sent
    }

    /// One more request in flight.
    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// One request fewer in flight and one more served; the one that reaches the request
    /// limit sends the counts at once.
    fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let served = self.served.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        // Exactly one request sees the count reach the limit.
        if self.env.request_limit == Some(served)
            && let Err(e) = self.send_counts()
        {
            tracing::debug!("the beat at the request limit ({served}) was not sent: {e}");
        }
    }

    /// Sends a beat unless one was sent less than a quarter of the interval ago.
    fn beat_coalesced(&self) -> Result<(), Error> {
        if self.channel_broken.load(Ordering::Relaxed) {
            return Err(Error::MasterGone);
        }
        let last = self.last_beat.load(Ordering::Relaxed);
        let now = self.beat_mark();
        let quarter = u64::try_from((self.heartbeat_interval() / 4).as_nanos()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < quarter {
            return Ok(());
        }
        // One caller per window sends: another thread that got here first beats for us.
        if self.last_beat.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return Ok(());
        }
        self.send_beat()
    }
}

/// The heartbeat interval when the master does not say.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// One request in flight in this worker, from [`Worker::track_request`]: counted in flight
/// while it lives, then served once dropped (whether the request succeeded, failed or was
/// abandoned). Cheap: a few atomic operations, no allocation, no lock.
///
/// # Caveats
///
/// When the served count reaches the worker's request limit (set by the master, which then
/// recycles the worker), the drop that reaches it sends a beat at once (one write to the
/// channel), so the master learns promptly.
#[must_use = "the request counts as in flight only while the guard lives: bind it (`let _guard = …`) for the request's duration"]
pub struct RequestGuard {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RequestGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestGuard").field("worker", &self.inner.env.id).finish_non_exhaustive()
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.inner.request_ended();
    }
}

/// How long a worker waits for the master to answer a query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl Worker {
    pub(crate) fn from_env(env: WorkerEnv) -> Result<Worker, Error> {
        // Until it is ready, a worker whose master dies is killed at once by the kernel: it
        // serves nothing yet, and no thread of ours watches the channel before `ready` (see
        // `Worker::ready`). The master set SIGTERM (what programs that do not use this library
        // get, to drain).
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .map_err(|e| Error::io("cannot set the parent-death signal")(e.into()))?;
        // The master may have died between fork and now; PR_SET_PDEATHSIG only covers later deaths.
        if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(env.master_pid) {
            return Err(Error::MasterGone);
        }
        let bad = |what: String| Error::BadInheritance { what };
        // The listening sockets are checked now (a broken hand-off fails loudly at init) but
        // taken only when asked for, so that a crate reading the systemd convention may take
        // them instead.
        let mut listeners = Vec::with_capacity(env.listeners.len());
        for (name, fd) in &env.listeners {
            let unix = crate::os::socket::inspect_inherited_listener(*fd)
                .map_err(|e| bad(format!("its listener {name:?} (fd {fd}): {e}")))?;
            crate::os::sys::set_cloexec_raw(*fd)
                .map_err(|e| bad(format!("cannot set close-on-exec on fd {fd}: {e}")))?;
            listeners.push(Inherited { name: name.clone(), fd: *fd, unix, taken: false });
        }
        let chan = crate::os::sys::take_inherited_fd(env.channel_fd)
            .map_err(|e| bad(format!("its channel (fd {}) is missing: {e}", env.channel_fd)))?;
        // The master cleared close-on-exec so that exec kept it; programs this worker runs
        // must not inherit it.
        rustix::io::fcntl_setfd(&chan, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| bad(format!("cannot set close-on-exec: {e}")))?;
        let chan = UnixStream::from(chan);
        let reader = chan.try_clone().map_err(Error::io("cannot clone the worker channel"))?;
        set_process_name();
        // The channel is read from `ready` on (or as soon as something needs to hear from the
        // master): by a thread, or by `serve`'s runtime.
        Ok(Worker { inner: Arc::new(Inner::new(env, listeners, chan, Reader::Idle(reader))) })
    }

    /// This worker's id, from 0 to `count() - 1`.
    pub fn id(&self) -> usize {
        self.inner.env.id
    }

    /// The number of configured workers.
    pub fn count(&self) -> usize {
        self.inner.env.count
    }

    /// The port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.inner.env.port
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        self.inner.env.master_pid
    }

    /// The master's shutdown timeout: how long this worker may drain before it is killed (and,
    /// when the master is gone, before the library ends the process).
    pub fn shutdown_timeout(&self) -> Duration {
        self.inner.env.shutdown_timeout
    }

    /// Takes the first TCP listening socket the master bound for this worker (blocking mode):
    /// the one of [`Cluster::new`](crate::Cluster::new), unless it has none
    /// ([`Error::NoSuchListener`] then). It can be taken once; keep it for the
    /// life of the server. Workers never bind themselves: the master holds every socket, so
    /// connections queued on it survive a worker's exit.
    ///
    /// # Errors
    ///
    /// [`Error::ListenerTaken`] if it was taken already (by this method,
    /// [`take_listener`](Worker::take_listener), `serve::listener` or `serve::serve`).
    ///
    /// # Caveats
    ///
    /// The socket is close-on-exec: programs the worker runs do not inherit it. In
    /// `Balance::Shared` mode every worker holds the same socket: do not change its options.
    pub fn listener(&self) -> Result<TcpListener, Error> {
        let first = {
            let all = self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner());
            all.iter().find(|l| !l.unix).map(|l| l.name.clone())
        };
        let Some(first) = first else {
            return Err(Error::NoSuchListener { name: "(a TCP listener)".into(), names: self.listener_names() });
        };
        match self.take_listener(&first)? {
            Listener::Tcp(l) => Ok(l),
            Listener::Unix(_) => Err(Error::ListenerTaken),
        }
    }

    /// The names of the listening sockets this worker inherited, in descriptor order (fd 3
    /// first), taken or not. `Cluster::new(port)`'s is named `"default"`.
    pub fn listener_names(&self) -> Vec<String> {
        self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|l| l.name.clone()).collect()
    }

    /// Takes the listening socket named `name` (blocking mode). Each can be taken once.
    ///
    /// # Errors
    ///
    /// - [`Error::NoSuchListener`] if the master passed no socket of that name (the error lists
    ///   the names it passed);
    /// - [`Error::ListenerTaken`] if it was taken already;
    /// - [`Error::BadInheritance`] if its descriptor is no longer a listening socket (something
    ///   in the program closed or replaced it).
    ///
    /// # Caveats
    ///
    /// Do not also take the same socket through a crate that reads `LISTEN_FDS` (`listenfd`,
    /// …): both would own the descriptor. The socket is close-on-exec.
    pub fn take_listener(&self, name: &str) -> Result<Listener, Error> {
        let mut all = self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let names = || all.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
        let Some(i) = all.iter().position(|l| l.name == name) else {
            return Err(Error::NoSuchListener { name: name.to_owned(), names: names() });
        };
        if all[i].taken {
            return Err(Error::ListenerTaken);
        }
        let fd = all[i].fd;
        let bad = |what: String| Error::BadInheritance { what };
        let owned = crate::os::sys::take_inherited_fd(fd)
            .map_err(|e| bad(format!("its listener {name:?} (fd {fd}) is gone: {e}")))?;
        all[i].taken = true;
        if all[i].unix {
            Ok(Listener::Unix(crate::os::socket::check_inherited_unix_listener(owned, fd)?))
        } else {
            Ok(Listener::Tcp(crate::os::socket::check_inherited_listener(owned, fd)?))
        }
    }

    /// Takes every listening socket not taken yet, with its name, in descriptor order.
    ///
    /// # Errors
    ///
    /// As [`take_listener`](Worker::take_listener); the sockets taken before an error are
    /// dropped (closed in this worker only: the master keeps its copies).
    pub fn take_listeners(&self) -> Result<Vec<(String, Listener)>, Error> {
        let pending: Vec<String> = {
            let all = self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner());
            all.iter().filter(|l| !l.taken).map(|l| l.name.clone()).collect()
        };
        pending.into_iter().map(|name| self.take_listener(&name).map(|l| (name, l))).collect()
    }

    /// Tells the master this worker accepts connections. Until then it is `Starting`; the master
    /// announces the cluster ready when every worker is. Calling it again does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::MasterGone`] if the channel to the master is broken.
    ///
    /// # Caveats
    ///
    /// Call it once the listener is taken and the server accepts (connections wait in the
    /// socket's queue meanwhile). A worker that does not report ready within the cluster's
    /// `ready_timeout` is killed; during a rolling restart, the old worker of this slot keeps
    /// serving until this call.
    ///
    /// Until this call, a worker whose master dies is killed by the kernel at once (`SIGKILL`);
    /// from this call on it gets `SIGTERM` and its shutdown timeout to drain (and the channel is
    /// read from now on: by a thread, unless `serve`'s runtime reads it already).
    pub fn ready(&self) -> Result<(), Error> {
        if self.inner.ready_sent.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let sent = self.say_ready();
        if sent.is_err() {
            // Not ready: a later call tries again.
            self.inner.ready_sent.store(false, Ordering::SeqCst);
        }
        sent
    }

    fn say_ready(&self) -> Result<(), Error> {
        self.inner.ensure_reader()?;
        if self.inner.supervised {
            // From now on the master's death means a drain: SIGTERM, and the reader (or
            // `serve`'s guard) ends the process after the shutdown timeout. A death before
            // this call was a SIGKILL (the check below then finds the master gone, if this
            // process still runs at all).
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(|e| Error::io("cannot set the parent-death signal")(e.into()))?;
            if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(self.inner.env.master_pid) {
                return Err(Error::MasterGone);
            }
        }
        self.send(&ToMaster::Ready)
    }

    fn send(&self, msg: &ToMaster) -> Result<(), Error> {
        self.inner.send(msg)
    }

    /// Tells the master this worker is alive, with its request counts
    /// ([`requests_served`](Worker::requests_served),
    /// [`requests_in_flight`](Worker::requests_in_flight)): for servers that do not use
    /// `serve::serve`, which beats by itself from its runtime. Call it from the serving loop,
    /// as often as once per request: at most one beat is sent per quarter of the
    /// [`heartbeat_interval`](Worker::heartbeat_interval), and the other calls return `Ok` at
    /// once without sending (an atomic load and a clock read).
    ///
    /// ```no_run
    /// # fn f(worker: ecewo_cluster::Worker) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::io::ErrorKind::WouldBlock;
    /// let listener = worker.listener()?;
    /// // Never blocked in accept for long: an idle server beats too.
    /// listener.set_nonblocking(true)?;
    /// worker.ready()?;
    /// loop {
    ///     match listener.accept() {
    ///         Ok((conn, _)) => {
    ///             let _request = worker.track_request(); // in flight until the end of this arm
    ///             // ... serve the connection ...
    /// #           let _ = conn;
    ///         }
    ///         Err(e) if e.kind() == WouldBlock => std::thread::sleep(std::time::Duration::from_millis(10)),
    ///         Err(e) => return Err(e.into()),
    ///     }
    ///     worker.heartbeat()?; // Err(MasterGone) once the master is gone: stop and exit
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::MasterGone`] once the master is gone (or the channel to it is broken): stop
    /// serving and exit.
    ///
    /// # Caveats
    ///
    /// - Beat from the thread that serves, never from a thread of its own: a beat tells the
    ///   master the server makes progress, and a side thread would keep beating while the
    ///   server is stuck, which is exactly what heartbeats are there to notice.
    /// - An idle server must beat too: a loop blocked in `accept` sends nothing. Wake it at
    ///   least once per interval (poll the listener with a timeout shorter than
    ///   [`heartbeat_interval`](Worker::heartbeat_interval)).
    /// - A beat that is sent writes one line to the channel, taking the channel's lock: it can
    ///   wait while another thread of the worker writes to the master.
    pub fn heartbeat(&self) -> Result<(), Error> {
        self.inner.beat_coalesced()
    }

    /// The interval this worker should beat at ([`heartbeat`](Worker::heartbeat)): the master's
    /// (from 1 ms to one day), or 1 s when the master did not say.
    pub fn heartbeat_interval(&self) -> Duration {
        self.inner.heartbeat_interval()
    }

    /// Counts one request in flight until the returned guard is dropped, then counts it served
    /// (what beats carry, and what the master's request limit counts). `serve::serve` does it
    /// for every request; blocking servers call it as a request starts and keep the guard until
    /// it ends. Cheap, no lock, no allocation; callable from any thread.
    ///
    /// # Caveats
    ///
    /// The drop that brings the served count to the worker's request limit (when the master
    /// set one) sends a beat at once, so the master can recycle the worker promptly; the worker
    /// keeps serving until the master asks it to stop.
    pub fn track_request(&self) -> RequestGuard {
        self.inner.request_started();
        RequestGuard { inner: self.inner.clone() }
    }

    /// The requests this worker has served so far (each guard of
    /// [`track_request`](Worker::track_request) dropped).
    pub fn requests_served(&self) -> u64 {
        self.inner.served.load(Ordering::Relaxed)
    }

    /// The requests in flight now (guards of [`track_request`](Worker::track_request) alive).
    pub fn requests_in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// True once the master is gone (its channel reached EOF): the worker should drain and exit.
    ///
    /// # Caveats
    ///
    /// Once the master is gone nobody else will stop this worker: the library ends the process
    /// after the master's shutdown timeout if it is still running (exit code 1 from its channel
    /// thread; `SIGKILL` from the orphan guard's timer under `serve`, whichever comes first).
    pub fn is_master_gone(&self) -> bool {
        self.inner.ensure_reader_or_log();
        *self.inner.gone.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until the master is gone (its channel reached EOF).
    ///
    /// # Caveats
    ///
    /// It blocks the calling thread for as long as the master lives, which is normally the whole
    /// life of the worker: call it from a thread of its own, never from async code. The process
    /// then has the master's shutdown timeout to drain before the library ends it.
    pub fn wait_master_gone(&self) {
        self.inner.ensure_reader_or_log();
        let mut gone = self.inner.gone.lock().unwrap_or_else(|e| e.into_inner());
        while !*gone {
            gone = self.inner.gone_cv.wait(gone).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A receiver that turns `true` when the master is gone.
    #[cfg(feature = "tokio")]
    pub(crate) fn master_gone_receiver(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.ensure_reader_or_log();
        self.inner.gone_tx.subscribe()
    }

    /// Asks the master for the cluster's statistics and every worker's (blocks up to 5 s; from
    /// async code, use `serve::cluster_stats`).
    ///
    /// # Errors
    ///
    /// [`Error::MasterGone`] once the master is gone; [`Error::Timeout`] when it does not
    /// answer within 5 s (an overloaded master, or this worker's channel thread unable to read).
    ///
    /// # Panics
    ///
    /// Never: whatever the master sends, a reply that cannot be decoded is skipped (and the
    /// call times out).
    ///
    /// # Caveats
    ///
    /// Each call is one request over the channel, answered by the master's loop; calls from
    /// many threads at once are fine. A worker whose answers pile up unread (16 MiB) gets no
    /// more answers until it reads them.
    pub fn stats(&self) -> Result<(ClusterStats, Vec<WorkerStats>), Error> {
        self.inner.ensure_reader()?;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let result = self.send(&ToMaster::Stats { id }).and_then(|()| self.wait_answer(&rx));
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        match result? {
            ToWorker::Stats { cluster, workers, .. } => Ok((cluster, workers)),
        }
    }

    /// Waits up to [`QUERY_TIMEOUT`] for the answer `rx` is to get from the reader. When
    /// `serve`'s runtime reads the channel, this call may be blocking that very runtime (a
    /// handler calling `stats()` on a current-thread runtime): it then reads the channel
    /// itself, in slices of 10 ms, dispatching what it reads (any query's answer) as the
    /// runtime would.
    fn wait_answer(&self, rx: &mpsc::Receiver<ToWorker>) -> Result<ToWorker, Error> {
        let timeout = || Error::Timeout { operation: "stats", after: QUERY_TIMEOUT };
        #[cfg(feature = "tokio")]
        if let Some(stream) = self.inner.runtime_reader_fd() {
            use rustix::event::{PollFd, PollFlags, Timespec};
            let deadline = Instant::now() + QUERY_TIMEOUT;
            loop {
                match rx.try_recv() {
                    Ok(msg) => return Ok(msg),
                    Err(mpsc::TryRecvError::Disconnected) => return Err(Error::MasterGone),
                    Err(mpsc::TryRecvError::Empty) => {}
                }
                if !self.inner.read_available(&stream) {
                    // EOF: the runtime's reader tells everyone once it runs again.
                    return rx.try_recv().map_err(|_| Error::MasterGone);
                }
                if let Ok(msg) = rx.try_recv() {
                    return Ok(msg);
                }
                if Instant::now() >= deadline {
                    return Err(timeout());
                }
                let mut fds = [PollFd::new(&stream, PollFlags::IN)];
                let _ = rustix::event::poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 10_000_000 }));
            }
        }
        rx.recv_timeout(QUERY_TIMEOUT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => timeout(),
            // The channel thread dropped the sender: the master is gone.
            mpsc::RecvTimeoutError::Disconnected => Error::MasterGone,
        })
    }
}

#[cfg(test)]
impl Worker {
    /// A worker whose channel is `writer` (the test holds the master's end), with no channel
    /// thread (whose EOF handling would end the test process).
    pub(crate) fn for_test(heartbeat: Option<Duration>, request_limit: Option<u64>) -> (Worker, UnixStream) {
        let (writer, master) = UnixStream::pair().unwrap();
        let env = WorkerEnv {
            id: 0,
            count: 1,
            port: 1,
            listeners: Vec::new(),
            channel_fd: -1,
            master_pid: 1,
            shutdown_timeout: Duration::from_secs(1),
            heartbeat,
            request_limit,
        };
        master.set_nonblocking(true).unwrap();
        (Worker { inner: Arc::new(Inner::new(env, Vec::new(), writer, Reader::Never)) }, master)
    }

    /// A worker whose channel is read as a real worker's is (from `ready` or the first query
    /// on, by a thread or `serve`'s runtime), but never ends the process: no parent-death
    /// signal is touched (`supervised` is false). The test holds the master's end.
    #[cfg(feature = "tokio")]
    pub(crate) fn for_test_with_reader() -> (Worker, UnixStream) {
        let (worker, master) = Worker::for_test(None, None);
        let (end, master_end) = UnixStream::pair().unwrap();
        let mut inner = Arc::try_unwrap(worker.inner).ok().expect("not shared yet");
        inner.writer = Mutex::new(end.try_clone().unwrap());
        inner.reader = Mutex::new(Reader::Idle(end));
        drop(master);
        (Worker { inner: Arc::new(inner) }, master_end)
    }

    /// The messages the master's end has received so far (it is non-blocking).
    pub(crate) fn received(master: &UnixStream) -> Vec<ToMaster> {
        use std::io::Read;
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match (&*master).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
    }
}

/// The hand-off a master left in this process's environment, if this process really is that
/// master's worker: `Ok(None)` for a process that is not a worker, including one that merely
/// inherited the variables (a program a worker runs, or one it runs in turn), which must start
/// as if they were absent. Then removes the variables from the environment, so that programs
/// this process runs do not inherit them.
///
/// A process is a worker only if the channel the variables name really leads to the master they
/// name: the descriptor `ECEWO_CLUSTER_CHANNEL_FD` is a unix stream socket whose peer
/// (`SO_PEERCRED`) is process `ECEWO_CLUSTER_MASTER_PID`. A worker's child fails this (the
/// worker made its channel close-on-exec); a real worker whose master has died since passes it
/// and then fails with [`Error::MasterGone`] in [`Worker::from_env`].
pub(crate) fn inherited_env() -> Result<Option<WorkerEnv>, Error> {
    let found = detect(|k| std::env::var_os(k), Me::now());
    if std::env::var_os(vars::WORKER_ID).is_some() {
        // Before any thread exists (init runs first in main), so the environment can be changed
        // safely; if threads exist already, leave it: children still fail the channel check.
        match crate::os::sys::remove_env_if_single_threaded(&vars::ALL) {
            Ok(()) => tracing::debug!("removed the ECEWO_CLUSTER_* hand-off variables from the environment"),
            Err(why) => tracing::debug!(
                "left the ECEWO_CLUSTER_* variables in the environment ({why}): programs this process runs \
                 inherit them, and ignore them"
            ),
        }
    }
    found
}

/// [`inherited_env`] with the environment read through `get`, without changing it.
/// This process, as [`detect`] checks it against the hand-off.
#[derive(Debug, Clone, Copy)]
struct Me {
    pid: u32,
    /// Its parent's pid (`None`: none in this PID namespace).
    parent: Option<u32>,
}

impl Me {
    fn now() -> Me {
        Me { pid: std::process::id(), parent: rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) }
    }
}

fn detect(get: impl Fn(&str) -> Option<OsString>, me: Me) -> Result<Option<WorkerEnv>, Error> {
    if get(vars::WORKER_ID).is_none() {
        return Ok(None);
    }
    let num = |key: &str| get(key).and_then(|v| v.to_str().and_then(|s| s.parse::<u32>().ok()));
    let stale = match (num(vars::CHANNEL_FD).and_then(|fd| i32::try_from(fd).ok()), num(vars::MASTER_PID)) {
        (Some(fd), Some(master)) => crate::os::socket::check_channel_peer(fd, master).err(),
        _ => Some(format!("{} or {} is missing or not a number", vars::CHANNEL_FD, vars::MASTER_PID)),
    };
    if let Some(why) = stale {
        tracing::debug!(
            "ignoring the ECEWO_CLUSTER_* variables in the environment: {why}, so this process is not a \
             cluster's worker (it inherited them from one); starting as if they were unset"
        );
        return Ok(None);
    }
    // A real channel: whether its master is still our parent comes before the rest of the
    // hand-off (a worker re-parented before its init fails with MasterGone, whatever else).
    if let Some(master) = num(vars::MASTER_PID)
        && me.parent != Some(master)
    {
        return Err(Error::MasterGone);
    }
    WorkerEnv::parse(get, me.pid)
}

/// Workers are executed through `/proc/self/exe`, which would make their `comm` (what `ps -o
/// comm`, `top` and `pkill` see) "exe"; give them the program's name back.
fn set_process_name() {
    let Some(argv0) = std::env::args_os().next() else { return };
    let Some(base) = std::path::Path::new(&argv0).file_name().map(OsStr::to_owned) else { return };
    let mut bytes = std::os::unix::ffi::OsStrExt::as_bytes(base.as_os_str()).to_vec();
    bytes.truncate(15);
    if let Ok(name) = std::ffi::CString::new(bytes) {
        let _ = rustix::thread::set_name(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn hand_off(channel_fd: &str, master_pid: &str) -> impl Fn(&str) -> Option<OsString> {
        // The channel follows the listeners: as many as there are numbers from 3 below it.
        let listeners = channel_fd.parse::<i32>().map_or(1, |fd| fd.saturating_sub(3).clamp(1, 1024));
        let names: Vec<String> = (0..listeners).map(|i| format!("l{i}")).collect();
        let map: HashMap<&str, String> = [
            (vars::WORKER_ID, "1".to_owned()),
            (vars::WORKERS, "2".to_owned()),
            (vars::PORT, "3000".to_owned()),
            (vars::LISTEN_PID, std::process::id().to_string()),
            (vars::LISTEN_FDS, listeners.to_string()),
            (vars::LISTEN_FDNAMES, names.join(":")),
            (vars::CHANNEL_FD, channel_fd.to_owned()),
            (vars::MASTER_PID, master_pid.to_owned()),
            (vars::SHUTDOWN_TIMEOUT_MS, "1000".to_owned()),
        ]
        .into_iter()
        .collect();
        move |k| map.get(k).map(OsString::from)
    }

    #[test]
    fn only_a_process_holding_the_masters_channel_is_a_worker() {
        let me = std::process::id().to_string();
        let (chan, _master_end) = UnixStream::pair().unwrap();
        // Above fd 3, so that at least one listener comes before it.
        let chan = rustix::io::fcntl_dupfd_cloexec(&chan, 10).unwrap();
        let fd = chan.as_raw_fd().to_string();
        // As the master's child would see it: its parent is the master (here: this process).
        let child = Me { pid: std::process::id(), parent: Some(std::process::id()) };
        let env = detect(hand_off(&fd, &me), child).unwrap().expect("the channel's peer is the master: a worker");
        assert_eq!((env.id, env.count, env.channel_fd), (1, 2, chan.as_raw_fd()));
        // Another master, a descriptor that is not open or not a socket, garbled numbers: stale.
        let not_open = i32::MAX.to_string();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let not_a_socket = file.as_raw_fd().to_string();
        for (fd, pid) in [
            (fd.as_str(), "1"),
            (not_open.as_str(), me.as_str()),
            (not_a_socket.as_str(), me.as_str()),
            ("four", me.as_str()),
            (fd.as_str(), "-1"),
        ] {
            assert_eq!(detect(hand_off(fd, pid), child).unwrap(), None, "fd {fd} master {pid}");
        }
        assert_eq!(detect(|_| None, child).unwrap(), None, "no variables: not a worker");
        // A real channel with the rest of the hand-off garbled is a clear error.
        let broken = hand_off(&fd, &me);
        let err = detect(|k| if k == vars::WORKERS { None } else { broken(k) }, child).unwrap_err();
        assert!(err.to_string().contains("ECEWO_CLUSTER_WORKERS is not set"), "{err}");
        // A real channel, but the master is no longer our parent: gone, whatever else.
        let orphan = Me { parent: Some(1), ..child };
        let err = detect(|k| if k == vars::WORKERS { None } else { broken(k) }, orphan).unwrap_err();
        assert!(matches!(err, Error::MasterGone), "{err}");
        // Sockets passed for another process are refused.
        let err = detect(hand_off(&fd, &me), Me { pid: child.pid + 1, ..child }).unwrap_err();
        assert!(err.to_string().contains("is not this process"), "{err}");
    }

    fn beat(served: u64, in_flight: u64) -> ToMaster {
        ToMaster::Beat { served, in_flight }
    }

    #[test]
    fn heartbeats_are_coalesced_to_one_per_quarter_interval() {
        let (worker, _master) = Worker::for_test(None, None);
        assert_eq!(worker.heartbeat_interval(), Duration::from_secs(1), "the default");
        // A 4 s interval: one beat per second at most, whatever the callers.
        let (worker, master) = Worker::for_test(Some(Duration::from_secs(4)), None);
        assert_eq!(worker.heartbeat_interval(), Duration::from_secs(4));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        worker.heartbeat().unwrap();
                    }
                });
            }
        });
        assert_eq!(Worker::received(&master), vec![beat(0, 0)], "4000 calls from 4 threads, one beat");
        // A 40 ms interval: a call 15 ms after a beat sends the next one.
        let (worker, master) = Worker::for_test(Some(Duration::from_millis(40)), None);
        worker.heartbeat().unwrap();
        worker.heartbeat().unwrap();
        assert_eq!(Worker::received(&master).len(), 1);
        std::thread::sleep(Duration::from_millis(15));
        let _request = worker.track_request();
        worker.heartbeat().unwrap();
        assert_eq!(Worker::received(&master), vec![beat(0, 1)], "the next beat, with the counts of now");
    }

    #[test]
    fn a_heartbeat_after_the_master_is_gone_is_an_error() {
        let (worker, master) = Worker::for_test(Some(Duration::from_secs(60)), None);
        drop(master);
        assert!(matches!(worker.heartbeat(), Err(Error::MasterGone)), "the write fails");
        assert!(matches!(worker.heartbeat(), Err(Error::MasterGone)), "and so does every later call");
        // The channel thread's notice is seen within the window, without a write.
        let (worker, _master) = Worker::for_test(Some(Duration::from_secs(60)), None);
        worker.heartbeat().unwrap();
        worker.inner.channel_broken.store(true, Ordering::SeqCst);
        assert!(matches!(worker.heartbeat(), Err(Error::MasterGone)));
    }

    #[test]
    fn request_guards_count_in_flight_then_served() {
        let (worker, _master) = Worker::for_test(None, None);
        assert_eq!((worker.requests_served(), worker.requests_in_flight()), (0, 0));
        let a = worker.track_request();
        let b = worker.clone().track_request();
        assert_eq!((worker.requests_served(), worker.requests_in_flight()), (0, 2));
        drop(a);
        assert_eq!((worker.requests_served(), worker.requests_in_flight()), (1, 1));
        drop(b);
        assert_eq!((worker.requests_served(), worker.requests_in_flight()), (2, 0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        let _guard = worker.track_request();
                        assert!(worker.requests_in_flight() >= 1);
                    }
                });
            }
        });
        assert_eq!((worker.requests_served(), worker.requests_in_flight()), (4002, 0));
    }

    #[test]
    fn reaching_the_request_limit_reports_the_counts_at_once_and_only_once() {
        // A day's interval: only the limit can make a message within the window.
        let (worker, master) = Worker::for_test(Some(Duration::from_secs(24 * 3600)), Some(3));
        worker.heartbeat().unwrap();
        assert_eq!(Worker::received(&master), vec![beat(0, 0)]);
        let guards: Vec<RequestGuard> = (0..4).map(|_| worker.track_request()).collect();
        let mut guards = guards.into_iter();
        drop(guards.next());
        drop(guards.next());
        worker.heartbeat().unwrap();
        assert_eq!(Worker::received(&master), vec![], "below the limit, coalesced");
        drop(guards.next());
        assert_eq!(
            Worker::received(&master),
            vec![ToMaster::Served { served: 3, in_flight: 1 }],
            "the limit is reached: the counts now, as counts (not a heartbeat)"
        );
        drop(guards.next());
        drop(worker.track_request());
        worker.heartbeat().unwrap();
        assert_eq!(Worker::received(&master), vec![], "past the limit: back to the interval");
        assert_eq!(worker.requests_served(), 5);
        // A server that never beats reports its limit all the same, without beating.
        let (worker, master) = Worker::for_test(Some(Duration::from_secs(24 * 3600)), Some(1));
        drop(worker.track_request());
        assert_eq!(Worker::received(&master), vec![ToMaster::Served { served: 1, in_flight: 0 }]);
        worker.heartbeat().unwrap();
        assert_eq!(Worker::received(&master), vec![beat(1, 0)], "its first heartbeat is its own");
    }

    #[test]
    fn the_environment_is_left_alone_when_threads_exist() {
        // The test harness runs this on one of its threads; hold one more to be sure.
        let (tx, rx) = mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let key = "ECEWO_CLUSTER_TEST_UNREMOVED";
        // Safe here: this test process's other threads do not touch the environment (no other
        // test reads or writes this variable, and std's own accesses take its lock).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(key, "1");
        }
        let refused = crate::os::sys::remove_env_if_single_threaded(&[key]).unwrap_err();
        assert!(refused.contains("threads"), "{refused}");
        assert_eq!(std::env::var_os(key), Some("1".into()));
        drop(tx);
        let _ = other.join();
    }
}
