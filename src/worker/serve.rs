//! Worker-side helpers for tokio, hyper and axum (cargo feature `tokio`).
//!
//! - [`listener`] turns the inherited socket into a `tokio::net::TcpListener`;
//! - [`shutdown_signal`] completes on SIGTERM or when the master is gone;
//! - [`serve`] runs any tower service (an axum `Router`, a hyper service adapted with tower) on
//!   the worker's socket over HTTP/1.1 and HTTP/2, reports readiness once it accepts, beats,
//!   counts requests, and drains gracefully;
//! - [`Cluster::serve`](crate::Cluster::serve) does it all from `main`: init, then supervise or
//!   serve.
//!
//! The drain, on SIGTERM or when the master is gone: stop accepting at once (the socket stays
//! open in the master, so queued connections go to the other workers or the replacement); send
//! HTTP/2 connections a GOAWAY at once (their in-flight streams finish; clients open new
//! streams elsewhere); answer the next request on every HTTP/1 keep-alive connection with
//! `Connection: close`; after [`ServeOptions::idle_grace`], close HTTP/1 connections that are
//! still idle; finish in-flight requests; give up after [`ServeOptions::drain_timeout`] and
//! return.
//!
//! Heartbeats: from readiness until it returns (through the drain too), [`serve`] sends the
//! master a beat every [`Worker::heartbeat_interval`] from a task on the serving runtime, with
//! the requests served and in flight (every request is counted, from the call of the service
//! until its response future completes or is dropped). The task runs on the runtime, not on a
//! thread of its own, on purpose: a runtime stuck in a handler (a blocking call, a busy loop)
//! stops beating, and the master can tell. (On a multi-thread runtime the task may run on
//! another of its threads: only a runtime stuck on every thread stops it. [`run_worker`] and
//! `Cluster::serve` use a current-thread runtime.)

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;

use crate::error::Error;
use crate::stats::{ClusterStats, WorkerStats};
use crate::worker::Worker;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The longest [`ServeOptions::idle_grace`] and [`ServeOptions::drain_timeout`] taken into
/// account: one day (the longest timeout the cluster's options accept). Longer values are
/// capped to it.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Options of [`serve`]: how a draining worker treats its open connections.
///
/// # Caveats
///
/// Both durations are capped at one day: a longer value (`Duration::MAX` included) means one
/// day. The master kills a worker that is still draining after its shutdown timeout anyway.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// How long a draining worker lets idle HTTP/1 keep-alive connections live, so that a
    /// request a client is sending right now is answered (with `Connection: close`) instead of
    /// hitting a closed socket. Default 1 s, at most one day. (HTTP/2 connections need no grace:
    /// they get a GOAWAY as soon as the drain starts.)
    pub idle_grace: Duration,
    /// The longest the whole drain may take before `serve` returns and in-flight requests are
    /// dropped. Default: the master's shutdown timeout less 500 ms (at least 1 s), so the worker
    /// ends on its own terms before the master's SIGKILL. At most one day.
    pub drain_timeout: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions { idle_grace: Duration::from_secs(1), drain_timeout: None }
    }
}

impl ServeOptions {
    /// Sets [`idle_grace`](ServeOptions::idle_grace); values over one day are capped to a day.
    pub fn idle_grace(mut self, d: Duration) -> ServeOptions {
        self.idle_grace = d.min(MAX_WAIT);
        self
    }

    /// Sets [`drain_timeout`](ServeOptions::drain_timeout); values over one day are capped to a
    /// day.
    pub fn drain_timeout(mut self, d: Duration) -> ServeOptions {
        self.drain_timeout = Some(d.min(MAX_WAIT));
        self
    }

    /// The drain timeout for a worker whose master kills it `shutdown_timeout` after asking it
    /// to stop; capped (the fields are public, so the setters' cap is not enough).
    fn drain_timeout_for(&self, shutdown_timeout: Duration) -> Duration {
        self.drain_timeout
            .unwrap_or_else(|| shutdown_timeout.saturating_sub(Duration::from_millis(500)).max(Duration::from_secs(1)))
            .min(MAX_WAIT)
    }

    /// The idle grace, capped, and never longer than the drain.
    fn idle_grace_within(&self, drain_timeout: Duration) -> Duration {
        self.idle_grace.min(MAX_WAIT).min(drain_timeout)
    }
}

/// An error unless this is called inside a tokio runtime: the tokio helpers panic outside one.
fn in_runtime(what: &'static str) -> Result<(), Error> {
    tokio::runtime::Handle::try_current()
        .map(|_| ())
        .map_err(|e| Error::Io { context: what, source: io::Error::other(e) })
}

/// The worker's inherited socket as a tokio listener (non-blocking, registered with the current
/// runtime). Must be called inside a tokio runtime; the listener can be taken once.
///
/// # Errors
///
/// [`Error::ListenerTaken`] if the listener was already taken (by this function,
/// [`Worker::listener`] or [`serve`]); [`Error::Io`] outside a tokio runtime or when the socket
/// cannot be registered.
///
/// # Panics
///
/// If the current runtime was built without its I/O driver (`enable_io` or `enable_all`).
pub fn listener(worker: &Worker) -> Result<tokio::net::TcpListener, Error> {
    in_runtime("serve::listener must be called inside a tokio runtime")?;
    let std = worker.listener()?;
    std.set_nonblocking(true).map_err(Error::io("cannot make the listener non-blocking"))?;
    tokio::net::TcpListener::from_std(std).map_err(Error::io("cannot register the listener with tokio"))
}

/// Why a worker stops serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: the master asks (shutdown, restart, scale-down).
    Term,
    /// The master is gone (its channel reached EOF).
    MasterGone,
}

/// The SIGTERM handler, installed now, and a future that says when and why to stop.
fn stop_signal(worker: &Worker) -> io::Result<impl Future<Output = Stop> + Send + 'static> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("serve::shutdown_signal must be called inside a tokio runtime"));
    }
    let term = signal(SignalKind::terminate())?;
    Ok(stop_on(term, worker))
}

/// When and why to stop: SIGTERM (`term`, installed) or the master gone.
fn stop_on(mut term: tokio::signal::unix::Signal, worker: &Worker) -> impl Future<Output = Stop> + Send + 'static {
    let mut gone = worker.master_gone_receiver();
    async move {
        tokio::select! {
            _ = term.recv() => Stop::Term,
            _ = gone.wait_for(|g| *g) => Stop::MasterGone,
        }
    }
}

/// Reads the master's channel on this runtime instead of a thread of its own, so that a worker
/// that only serves stays a single-threaded process (see `worker::channel`). Only once the
/// runtime's SIGTERM handler is installed: the guard that ends the process if its master died
/// while the runtime is stuck runs beside it ([`kill_if_orphaned_on_sigterm`]). If a
/// reader runs already, or the guard cannot be installed, it does nothing: the channel thread
/// reads then.
///
/// [`kill_if_orphaned_on_sigterm`]: crate::os::sys::kill_if_orphaned_on_sigterm
fn read_channel_on_runtime(worker: &Worker) {
    let inner = &worker.inner;
    if !inner.supervised {
        return;
    }
    let master = rustix::process::Pid::from_raw(i32::try_from(inner.env.master_pid).unwrap_or(0));
    let Some(master) = master else { return };
    if let Err(e) = crate::os::sys::kill_if_orphaned_on_sigterm(master, inner.env.shutdown_timeout) {
        tracing::debug!("the channel is read by a thread: no guard for a master's death ({e})");
        return;
    }
    spawn_runtime_reader(inner);
}

/// The reader task of [`read_channel_on_runtime`], once its guard is in place: false if a
/// reader runs already.
fn spawn_runtime_reader(inner: &Arc<crate::worker::Inner>) -> bool {
    // Non-blocking before it is shared: the flag belongs to the socket, so the duplicate kept
    // for blocking queries is non-blocking too.
    let Some(stream) = inner.take_reader(|s| {
        s.set_nonblocking(true)?;
        s.try_clone()
    }) else {
        return false;
    };
    let stream = match tokio::net::UnixStream::from_std(stream) {
        Ok(stream) => stream,
        Err(e) => {
            // The stream is gone with the error: the master's death is noticed by the guard
            // (its SIGTERM) only, and queries time out.
            tracing::warn!("cannot read the master's channel: {e}");
            return true;
        }
    };
    let mut reader = RuntimeReader { stream: Some(stream), inner: inner.clone() };
    tokio::spawn(async move {
        if reader.read_to_eof().await {
            reader.stream = None;
            reader.inner.master_gone();
            // Dying anyway: a thread is no cost now, and it ends a drain that never ends. (If
            // it cannot start, the orphan guard's timer still does.)
            let inner = reader.inner.clone();
            if let Err(e) = std::thread::Builder::new()
                .name("ecewo-orphan".into())
                .spawn(move || inner.end_after_shutdown_timeout())
            {
                tracing::warn!("cannot start the thread that ends an orphaned worker ({e})");
            }
        }
    });
    true
}

/// The channel read by a task; given back to the worker if the runtime ends first (a thread
/// reads it then, if anything needs it).
struct RuntimeReader {
    stream: Option<tokio::net::UnixStream>,
    inner: Arc<crate::worker::Inner>,
}

impl RuntimeReader {
    /// Dispatches the master's messages until EOF (true) or a read error (false: the reader
    /// stops, which nobody can do anything about).
    async fn read_to_eof(&mut self) -> bool {
        let Some(stream) = &self.stream else { return false };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if stream.readable().await.is_err() {
                return false;
            }
            // Read and feed under the lines' lock: a blocking query may be reading too.
            let mut lines = self.inner.lines.lock().unwrap_or_else(|e| e.into_inner());
            match stream.try_read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => lines.feed(&buf[..n], |line| self.inner.dispatch(line)),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                // ECONNRESET and the like: the master is gone as well.
                Err(_) => return true,
            }
        }
    }
}

impl Drop for RuntimeReader {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else { return };
        match stream.into_std() {
            Ok(stream) => {
                let _ = stream.set_nonblocking(false);
                self.inner.give_back_reader(stream);
            }
            // The runtime's duplicate is all that is left: a thread reads that.
            Err(e) => match self.inner.runtime_reader_fd() {
                Some(dup) => {
                    let _ = dup.set_nonblocking(false);
                    self.inner.give_back_reader(dup);
                }
                None => tracing::warn!("the master's channel is lost with the runtime ({e})"),
            },
        }
    }
}

/// A future that completes when this worker should stop: SIGTERM (from the master: shutdown,
/// restart, scale-down) or the master is gone. Use it with axum's or hyper's graceful shutdown.
///
/// # Caveats
///
/// The SIGTERM handler is installed when this function is called, not when the future is first
/// polled: call it before reporting ready, so an early SIGTERM is not lost. From then on SIGTERM
/// no longer ends the process by default: the program must stop when the future completes (the
/// master kills it after its shutdown timeout otherwise).
///
/// # Errors
///
/// An error outside a tokio runtime, or if the SIGTERM handler cannot be installed.
///
/// # Panics
///
/// If the current runtime was built without its I/O driver (`enable_io` or `enable_all`).
pub fn shutdown_signal(worker: &Worker) -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let stop = stop_signal(worker)?;
    Ok(async move {
        if stop.await == Stop::Term {
            tracing::info!("SIGTERM: draining");
        }
    })
}

/// Serves `service` on every listener of the worker until [`shutdown_signal`], then drains
/// (see the [module documentation](self)): all listeners stop accepting at once. Reports the
/// worker ready once it accepts on all of them. Must be called inside a tokio runtime. For a
/// service per listener, see [`serve_each`].
///
/// HTTP/1.1 and HTTP/2 (with prior knowledge, h2c) are served on the same socket; connection
/// upgrades (WebSocket) work.
///
/// # Caveats
///
/// - It takes the worker's listeners that are not taken yet (at least one must be left:
///   [`Worker::listener`] or [`Worker::take_listener`] before it leave it the others) and
///   installs a SIGTERM handler (SIGTERM then starts the drain instead of ending the process).
/// - When the drain timeout passes, it returns with requests still in flight: their tasks stop
///   when the runtime is dropped (at the end of [`run_worker`]).
/// - While draining, responses to HTTP/1 requests carry `Connection: close` (replacing any
///   `Connection` header the service set).
///
/// # Errors
///
/// [`Error::ListenerTaken`] if the listener was taken already; [`Error::Io`] outside a tokio
/// runtime, or when the listener or the signal handler cannot be set up;
/// [`Error::MasterGone`] if the readiness report cannot reach the master. Failed connections
/// are logged (at debug level), never returned.
///
/// # Panics
///
/// If the current runtime was built without its I/O driver (`enable_io` or `enable_all`).
pub async fn serve<S, B>(worker: &Worker, service: S, options: ServeOptions) -> Result<(), Error>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    in_runtime("serve must be called inside a tokio runtime")?;
    let all = take_all(worker)?.into_iter().map(|(_, l)| (l, service.clone())).collect();
    serve_on(worker, all, options).await
}

/// Serves a service per listener: `make(name)` gives the service of the listener `name`
/// (`"default"` for the one of `Cluster::new(port)`); otherwise as [`serve`], whose caveats,
/// errors and panics apply.
///
/// ```no_run
/// # async fn f(worker: ecewo_cluster::Worker) -> Result<(), ecewo_cluster::Error> {
/// use ecewo_cluster::serve::{ServeOptions, serve_each};
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "app" }));
/// let admin = axum::Router::new().route("/", axum::routing::get(|| async { "admin" }));
/// serve_each(&worker, |name| if name == "admin" { admin.clone() } else { app.clone() }, ServeOptions::default()).await
/// # }
/// ```
///
/// # Errors
///
/// As [`serve`].
pub async fn serve_each<S, B>(
    worker: &Worker,
    mut make: impl FnMut(&str) -> S,
    options: ServeOptions,
) -> Result<(), Error>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    in_runtime("serve_each must be called inside a tokio runtime")?;
    let all = take_all(worker)?.into_iter().map(|(name, l)| (l, make(&name))).collect();
    serve_on(worker, all, options).await
}

/// A listener registered with tokio.
enum Accepting {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A connection it accepted.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Accepting {
    fn poll_accept(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<Accepted>> {
        match self {
            Accepting::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| Accepted::Tcp(s)),
            Accepting::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| Accepted::Unix(s)),
        }
    }

    /// Takes what is already queued, without waiting (the final accepts of a drain).
    fn drain_queue(self) -> io::Result<Vec<Accepted>> {
        let mut out = Vec::new();
        match self {
            Accepting::Tcp(l) => {
                let l = l.into_std()?;
                while let Ok((s, _)) = l.accept() {
                    if s.set_nonblocking(true).is_ok()
                        && let Ok(s) = tokio::net::TcpStream::from_std(s)
                    {
                        out.push(Accepted::Tcp(s));
                    }
                }
            }
            Accepting::Unix(l) => {
                let l = l.into_std()?;
                while let Ok((s, _)) = l.accept() {
                    if s.set_nonblocking(true).is_ok()
                        && let Ok(s) = tokio::net::UnixStream::from_std(s)
                    {
                        out.push(Accepted::Unix(s));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Takes every listener of the worker not taken yet, with its name, registered with tokio (at
/// least one).
fn take_all(worker: &Worker) -> Result<Vec<(String, Accepting)>, Error> {
    let all = worker.take_listeners()?;
    if all.is_empty() {
        return Err(Error::ListenerTaken);
    }
    let reg = || Error::io("cannot register the listener with tokio");
    all.into_iter()
        .map(|(name, l)| {
            let l = match l {
                crate::worker::Listener::Tcp(std) => {
                    std.set_nonblocking(true).map_err(Error::io("cannot make the listener non-blocking"))?;
                    Accepting::Tcp(tokio::net::TcpListener::from_std(std).map_err(reg())?)
                }
                crate::worker::Listener::Unix(std) => {
                    std.set_nonblocking(true).map_err(Error::io("cannot make the listener non-blocking"))?;
                    Accepting::Unix(tokio::net::UnixListener::from_std(std).map_err(reg())?)
                }
            };
            Ok((name, l))
        })
        .collect()
}

/// What every connection of one [`serve`] shares: counted on every request, read on every
/// response. One `Arc` per connection and one clone per request: this is on the request path.
struct Shared {
    /// Counts every request.
    worker: Worker,
    /// `true` once the drain started (no lock on the request path).
    draining: AtomicBool,
}

/// What a connection's task and its service share.
struct ConnState {
    shared: Arc<Shared>,
    kind: ConnKind,
}

/// Starts connection tasks.
struct Spawner {
    builder: auto::Builder<TokioExecutor>,
    shared: Arc<Shared>,
    /// Watched by every connection task (which holds a receiver until its connection ends).
    phase: watch::Receiver<Phase>,
}

impl Spawner {
    fn spawn<S, B>(&self, accepted: Accepted, service: &S)
    where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        match accepted {
            Accepted::Tcp(stream) => {
                let _ = stream.set_nodelay(true);
                self.spawn_io(stream, service);
            }
            Accepted::Unix(stream) => self.spawn_io(stream, service),
        }
    }

    fn spawn_io<S, B, IO>(&self, stream: IO, service: &S)
    where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let state = Arc::new(ConnState { shared: self.shared.clone(), kind: ConnKind::default() });
        let svc = DrainService { inner: service.clone(), conn: state.clone() };
        let builder = self.builder.clone();
        let mut phase = self.phase.clone();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                biased;
                res = conn.as_mut() => { if let Err(e) = res { tracing::debug!("connection error: {e}") } return; }
                _ = time_to_close(&mut phase, &state.kind) => {}
            }
            // Finishes in-flight requests (HTTP/2: streams), then closes; closes an idle
            // connection now.
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!("connection error while draining: {e}");
            }
        });
    }
}

/// Completes when a connection should close: HTTP/2 as soon as the drain starts (GOAWAY: the
/// client stops opening streams here and retries elsewhere, with no race), everything else
/// once the idle grace is over (or `serve` returned). While serving, a connection's task waits
/// on one thing only besides its connection, as `axum::serve`'s do: every wake-up of the task
/// polls it.
async fn time_to_close(phase: &mut watch::Receiver<Phase>, kind: &ConnKind) {
    let _ = phase.wait_for(|p| *p >= Phase::Draining).await;
    tokio::select! {
        _ = kind.http2() => {}
        _ = phase.wait_for(|p| *p >= Phase::CloseIdle) => {}
    }
}

/// The accept loop and the drain, over `listeners`, each with its service.
async fn serve_on<S, B>(worker: &Worker, listeners: Vec<(Accepting, S)>, options: ServeOptions) -> Result<(), Error>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let term = signal(SignalKind::terminate()).map_err(Error::io("cannot install the SIGTERM handler"))?;
    read_channel_on_runtime(worker);
    let stop = stop_on(term, worker);
    tokio::pin!(stop);
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    let spawner = Spawner {
        builder: auto::Builder::new(TokioExecutor::new()),
        shared: Arc::new(Shared { worker: worker.clone(), draining: AtomicBool::new(false) }),
        phase: phase_rx,
    };
    worker.ready()?;
    let _heartbeat = spawn_heartbeat(worker);
    // Accept from whichever listener has a connection, starting the scan one further each
    // time so that a busy listener cannot starve the others.
    let mut next = 0usize;
    let why = loop {
        let accepted = tokio::select! {
            biased;
            why = &mut stop => break why,
            accepted = std::future::poll_fn(|cx| {
                let n = listeners.len();
                for k in 0..n {
                    let i = (next + k) % n;
                    if let std::task::Poll::Ready(r) = listeners[i].0.poll_accept(cx) {
                        next = i + 1;
                        return std::task::Poll::Ready((i, r));
                    }
                }
                std::task::Poll::Pending
            }) => accepted,
        };
        match accepted {
            (i, Ok(conn)) => spawner.spawn(conn, &listeners[i].1),
            (_, Err(e)) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // The beats go on through the drain: a worker told to stop by someone else than the
    // master (a `SIGTERM` from `signal_workers` or `kill`) is still counted on, and watched;
    // they end when `serve` returns (the handle drops then).
    spawner.shared.draining.store(true, Ordering::SeqCst);
    phase_tx.send_replace(Phase::Draining);
    if why == Stop::Term {
        tracing::info!("SIGTERM: draining");
    }
    // Every listener stops accepting at once; what is already queued on each is served.
    for (listener, service) in listeners {
        for conn in listener.drain_queue().map_err(Error::io("cannot take the listener back from tokio"))? {
            spawner.spawn(conn, &service);
        }
    }
    drop(spawner);
    let drain_timeout = options.drain_timeout_for(worker.shutdown_timeout());
    if !drain(phase_tx, options.idle_grace_within(drain_timeout), drain_timeout).await {
        tracing::warn!("drain timeout ({drain_timeout:?}) reached with connections still open; exiting");
    }
    Ok(())
}

/// A task that is aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the task that beats every heartbeat interval, the first beat at once, on the current
/// runtime (never a thread of its own: a stuck runtime must stop beating), until the returned
/// handle is dropped or the master is gone.
///
/// The interval is kept by a `timerfd` polled by the runtime ([`crate::os::timer`]), not by a
/// tokio timer: with none pending, a busy worker's runtime sleeps without arming a kernel timer
/// each time (measured: 2–4 % of CPU per request at 8 workers on 2 cores). A tokio interval if
/// the descriptor cannot be had.
fn spawn_heartbeat(worker: &Worker) -> AbortOnDrop {
    let worker = worker.clone();
    let timer = crate::os::timer::Timer::new().and_then(crate::os::sys::register_timer);
    AbortOnDrop(tokio::spawn(async move {
        let interval = worker.heartbeat_interval();
        if let Ok(timer) = timer {
            'timer: loop {
                // A beat, then a full interval from it: after a stall, one beat as soon as
                // the runtime runs again, no burst of make-up beats.
                if let Err(e) = worker.inner.beat() {
                    tracing::debug!("heartbeats stop: {e}");
                    return;
                }
                if let Err(e) = timer.get_ref().arm(interval) {
                    tracing::debug!("heartbeat timer: {e}; beating from a tokio interval");
                    break 'timer;
                }
                loop {
                    // Fails only when the runtime shuts down.
                    let Ok(mut ready) = timer.readable().await else { return };
                    match ready.try_io(|t| t.get_ref().take()) {
                        Ok(Ok(())) => {
                            // Not re-armed yet: nothing to read until it is.
                            ready.clear_ready();
                            break;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!("heartbeat timer: {e}; beating from a tokio interval");
                            break 'timer;
                        }
                        Err(_would_block) => continue,
                    }
                }
            }
        }
        let mut tick = tokio::time::interval(interval);
        // After a stall, one beat as soon as the runtime runs again, then a full interval: no
        // burst of make-up beats.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = worker.inner.beat() {
                tracing::debug!("heartbeats stop: {e}");
                return;
            }
        }
    }))
}

/// Where a drain stands, as connection tasks see it (ordered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Accepting and serving.
    Serving,
    /// The drain started: HTTP/2 connections close (GOAWAY), HTTP/1 responses say
    /// `Connection: close`.
    Draining,
    /// The idle grace is over: every connection closes once its in-flight requests are done.
    CloseIdle,
}

/// The drain once the listener is closed: waits up to `idle_grace` for the connections to end
/// on their own, then asks all to close, and waits for them until `drain_timeout` has passed
/// since the start. Every connection task holds a receiver of `phase`, so `closed()` completes
/// when the last one ended. True if they all did.
async fn drain(phase: watch::Sender<Phase>, idle_grace: Duration, drain_timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + drain_timeout.min(MAX_WAIT);
    let _ = tokio::time::timeout(idle_grace.min(MAX_WAIT), phase.closed()).await;
    phase.send_replace(Phase::CloseIdle);
    tokio::time::timeout_at(deadline, phase.closed()).await.is_ok()
}

/// Asks the master for the cluster's statistics and every worker's, without blocking the
/// runtime (the query runs on tokio's blocking pool): what the spec's monitoring example's
/// `/stats` endpoint needs, in a worker.
///
/// # Errors
///
/// As [`Worker::stats`]: [`Error::MasterGone`] once the master is gone, [`Error::Timeout`] when
/// it does not answer within 5 s.
///
/// # Caveats
///
/// Polled outside a tokio runtime it does not panic: it blocks on the query instead.
pub async fn cluster_stats(worker: &Worker) -> Result<(ClusterStats, Vec<WorkerStats>), Error> {
    let worker = worker.clone();
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt.spawn_blocking(move || worker.stats()).await.unwrap_or(Err(Error::MasterGone)),
        Err(_) => worker.stats(),
    }
}

/// The cluster's Prometheus metrics, from the master ([`crate::metrics`]): serve it at
/// `/metrics` in any worker, and every scrape sees the whole cluster.
///
/// # Errors
///
/// As [`cluster_stats`].
pub async fn metrics(worker: &Worker) -> Result<String, Error> {
    let (cluster, workers) = cluster_stats(worker).await?;
    Ok(crate::proto::metrics::render(&cluster, &workers))
}

/// What a connection task knows of its connection's protocol: HTTP/2 once a request said so.
#[derive(Debug, Default)]
struct ConnKind {
    http2: AtomicBool,
    /// Notified (once) when `http2` turns true; the permit waits if nobody listens yet.
    became_http2: Notify,
}

impl ConnKind {
    /// Records the version of a request on this connection.
    fn saw(&self, version: Version) {
        if version == Version::HTTP_2 && !self.http2.load(Ordering::Relaxed) && !self.http2.swap(true, Ordering::SeqCst)
        {
            self.became_http2.notify_one();
        }
    }

    /// Completes once the connection is known to be HTTP/2 (never for HTTP/1).
    async fn http2(&self) {
        if !self.http2.load(Ordering::SeqCst) {
            self.became_http2.notified().await;
        }
    }
}

/// Wraps the user's service: while draining, every HTTP/1 response carries `Connection: close`,
/// so keep-alive clients learn to reconnect (to another worker) before the connection is closed;
/// it tells the connection's task when the connection turns out to be HTTP/2 (closed by a
/// GOAWAY as soon as the drain starts instead); and it counts every request in the worker's
/// counters (in flight from the call until its response future completes or is dropped, then
/// served).
///
/// A hyper service itself (not a tower one behind hyper-util's adapter, which clones the
/// whole wrapper per request): per request, one clone of the user's service and of one `Arc`.
struct DrainService<S> {
    inner: S,
    conn: Arc<ConnState>,
}

impl<S, B, R> hyper::service::Service<Request<R>> for DrainService<S>
where
    S: tower_service::Service<Request<R>, Response = Response<B>> + Clone,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = DrainFuture<S, R>;

    fn call(&self, req: Request<R>) -> Self::Future {
        let version = req.version();
        self.conn.kind.saw(version);
        // `Connection` is an HTTP/1 header (HTTP/2 forbids it).
        let http1 = version < Version::HTTP_2;
        let counted = Counted::start(&self.conn.shared);
        DrainFuture {
            stage: Stage::Waiting { service: self.inner.clone(), req: Some(req) },
            http1,
            counted: Some(counted),
        }
    }
}

/// One request in flight: counted served when dropped (the response ready, or the request
/// abandoned).
struct Counted(Arc<Shared>);

impl Counted {
    fn start(shared: &Arc<Shared>) -> Counted {
        shared.worker.inner.request_started();
        Counted(shared.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.worker.inner.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// Where a request's call stands: the user's service not ready yet, or its response future.
    #[project = StageProj]
    enum Stage<S, R, F> {
        Waiting { service: S, req: Option<Request<R>> },
        Called { #[pin] future: F },
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainService`]: the user's service called once ready (tower's
    /// contract), plus the header while draining, and the request's count. (No allocation per
    /// request: this is on every request's path.)
    struct DrainFuture<S, R>
    where
        S: tower_service::Service<Request<R>>,
    {
        #[pin]
        stage: Stage<S, R, S::Future>,
        http1: bool,
        // In flight until the response is ready (then dropped) or this future is dropped.
        counted: Option<Counted>,
    }
}

impl<S, R, B> Future for DrainFuture<S, R>
where
    S: tower_service::Service<Request<R>, Response = Response<B>>,
{
    type Output = Result<Response<B>, S::Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.stage.as_mut().project() {
                StageProj::Waiting { service, req } => {
                    if let Err(e) = std::task::ready!(service.poll_ready(cx)) {
                        drop(this.counted.take());
                        return std::task::Poll::Ready(Err(e));
                    }
                    let req = req.take().expect("a request is called once: the stage moves on at once");
                    let future = service.call(req);
                    this.stage.set(Stage::Called { future });
                }
                StageProj::Called { future } => {
                    let done = std::task::ready!(future.poll(cx));
                    let draining = this.counted.take().is_some_and(|c| c.0.draining.load(Ordering::Relaxed));
                    let mut resp = done?;
                    if *this.http1 && draining {
                        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                    }
                    return std::task::Poll::Ready(Ok(resp));
                }
            }
        }
    }
}

/// Runs `f` in a new single-threaded tokio runtime, inside a tracing span naming the worker,
/// and returns what it returns. One worker per core: a current-thread runtime is what a worker
/// needs; build your own runtime to use more threads.
///
/// # Errors
///
/// What `f`'s future returns; [`Error::Io`] if the runtime cannot be built, or when called
/// inside a tokio runtime already (a runtime cannot block inside another).
pub fn run_worker<'w, F, Fut>(worker: &'w Worker, f: F) -> Result<(), Error>
where
    F: FnOnce(&'w Worker) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Io {
            context: "serve::run_worker builds its own runtime and cannot be called inside one",
            source: io::Error::other("already inside a tokio runtime"),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("cannot build the worker's tokio runtime"))?;
    let span = tracing::info_span!("worker", id = worker.id());
    let _entered = span.enter();
    rt.block_on(f(worker))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn extreme_durations_are_capped_and_do_not_panic() {
        let day = Duration::from_secs(24 * 3600);
        let opts = ServeOptions::default().drain_timeout(Duration::MAX).idle_grace(Duration::MAX);
        assert_eq!((opts.drain_timeout, opts.idle_grace), (Some(day), day));
        // The fields are public (users can assign them): the cap also holds where they are used.
        let raw = ServeOptions { drain_timeout: Some(Duration::MAX), idle_grace: Duration::MAX };
        let shutdown = Duration::from_millis(u64::MAX);
        assert_eq!(raw.drain_timeout_for(shutdown), day);
        assert_eq!(raw.idle_grace_within(raw.drain_timeout_for(shutdown)), day);
        assert_eq!(ServeOptions::default().drain_timeout_for(shutdown), day);
        assert_eq!(ServeOptions::default().drain_timeout_for(Duration::ZERO), Duration::from_secs(1));
        // A drain with no connection left ends at once, whatever the durations.
        for (grace, timeout) in [(Duration::MAX, Duration::MAX), (raw.idle_grace, raw.drain_timeout.unwrap())] {
            let (tx, rx) = watch::channel(Phase::Serving);
            drop(rx);
            let started = std::time::Instant::now();
            assert!(runtime().block_on(drain(tx, grace, timeout)));
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }

    #[test]
    fn a_drain_waits_for_connections_then_gives_up() {
        let rt = runtime();
        // A connection that ends by itself during the grace.
        let (tx, rx) = watch::channel(Phase::Serving);
        let started = std::time::Instant::now();
        rt.block_on(async {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(rx);
            });
            assert!(drain(tx, Duration::from_secs(10), Duration::from_secs(20)).await);
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        // One that ignores everything: the timeout ends the drain, after the grace said close.
        let (tx, mut rx) = watch::channel(Phase::Serving);
        rt.block_on(async {
            let told = tokio::spawn(async move {
                let _ = rx.wait_for(|p| *p == Phase::CloseIdle).await;
                std::future::pending::<()>().await;
            });
            assert!(!drain(tx, Duration::from_millis(20), Duration::from_millis(100)).await);
            told.abort();
        });
    }

    #[test]
    fn http2_is_noticed_before_or_after_anyone_waits() {
        let rt = runtime();
        let early = ConnKind::default();
        early.saw(Version::HTTP_11);
        early.saw(Version::HTTP_2);
        early.saw(Version::HTTP_2);
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), early.http2()).await })
            .expect("known before the wait");
        let late = Arc::new(ConnKind::default());
        let waiting = late.clone();
        rt.block_on(async {
            let waiter = tokio::spawn(async move { waiting.http2().await });
            tokio::task::yield_now().await;
            late.saw(Version::HTTP_2);
            tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        });
        let http1 = ConnKind::default();
        http1.saw(Version::HTTP_11);
        assert!(rt.block_on(async { tokio::time::timeout(Duration::from_millis(50), http1.http2()).await }).is_err());
    }

    /// A service whose response is ready after `ms` (never, for `None`).
    #[derive(Clone)]
    struct After(Option<u64>);

    impl tower_service::Service<Request<()>> for After {
        type Response = Response<()>;
        type Error = std::convert::Infallible;
        type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<()>, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            let after = self.0;
            Box::pin(async move {
                match after {
                    Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    None => std::future::pending().await,
                }
                Ok(Response::new(()))
            })
        }
    }

    #[test]
    fn every_request_is_counted_until_its_response_is_ready_or_dropped() {
        use hyper::service::Service;
        let rt = runtime();
        let (worker, _master) = Worker::for_test(None, None);
        let counts = || (worker.requests_served(), worker.requests_in_flight());
        let shared = Arc::new(Shared { worker: worker.clone(), draining: AtomicBool::new(false) });
        let service = |after| DrainService {
            inner: After(after),
            conn: Arc::new(ConnState { shared: shared.clone(), kind: ConnKind::default() }),
        };
        // Answered: served once the response is ready, before the future is dropped.
        let mut answered = Box::pin(service(Some(10)).call(Request::new(())));
        assert_eq!(counts(), (0, 1));
        let resp = rt.block_on(&mut answered);
        assert!(resp.is_ok_and(|r| r.headers().get(CONNECTION).is_none()));
        assert_eq!(counts(), (1, 0));
        drop(answered);
        assert_eq!(counts(), (1, 0), "counted once");
        // Abandoned (a client gone, a drain timed out), polled or not: served too.
        let never_polled = service(None).call(Request::new(()));
        let mut pending = Box::pin(service(None).call(Request::new(())));
        rt.block_on(async {
            assert!(tokio::time::timeout(Duration::from_millis(10), &mut pending).await.is_err());
        });
        assert_eq!(counts(), (1, 2));
        drop(never_polled);
        assert_eq!(counts(), (2, 1));
        drop(pending);
        assert_eq!(counts(), (3, 0));
        // Draining: an HTTP/1 response says `Connection: close`, an HTTP/2 one does not.
        shared.draining.store(true, Ordering::SeqCst);
        let resp = rt.block_on(service(Some(0)).call(Request::new(()))).unwrap();
        assert_eq!(resp.headers().get(CONNECTION).map(|v| v.as_bytes()), Some(&b"close"[..]));
        let mut h2 = Request::new(());
        *h2.version_mut() = Version::HTTP_2;
        let resp = rt.block_on(service(Some(0)).call(h2)).unwrap();
        assert!(resp.headers().get(CONNECTION).is_none());
        assert_eq!(counts(), (5, 0));
    }

    /// A service that is not ready at first (tower's `poll_ready` contract), then fails or
    /// answers.
    #[derive(Clone)]
    struct NotReadyYet {
        polls: Arc<std::sync::atomic::AtomicU32>,
        fail: bool,
    }

    impl tower_service::Service<Request<()>> for NotReadyYet {
        type Response = Response<()>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Response<()>, &'static str>>;

        fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
            if self.polls.fetch_add(1, Ordering::SeqCst) < 2 {
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            std::task::Poll::Ready(if self.fail { Err("not ready") } else { Ok(()) })
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(Ok(Response::new(())))
        }
    }

    #[test]
    fn the_users_service_is_called_once_it_is_ready_and_its_refusal_is_counted() {
        use hyper::service::Service;
        let rt = runtime();
        let (worker, _master) = Worker::for_test(None, None);
        let shared = Arc::new(Shared { worker: worker.clone(), draining: AtomicBool::new(false) });
        for fail in [false, true] {
            let polls = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let service = DrainService {
                inner: NotReadyYet { polls: polls.clone(), fail },
                conn: Arc::new(ConnState { shared: shared.clone(), kind: ConnKind::default() }),
            };
            let result = rt.block_on(service.call(Request::new(())));
            assert_eq!(result.is_ok(), !fail);
            assert_eq!(polls.load(Ordering::SeqCst), 3, "polled until ready, once more never");
        }
        assert_eq!((worker.requests_served(), worker.requests_in_flight()), (2, 0));
    }

    #[test]
    fn the_heartbeat_task_beats_on_the_runtime_and_only_while_it_runs() {
        use crate::proto::channel::ToMaster;
        let (worker, master) = Worker::for_test(Some(Duration::from_millis(50)), None);
        let beats = || Worker::received(&master);
        runtime().block_on(async {
            let _request = worker.track_request();
            let task = spawn_heartbeat(&worker);
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(beats(), vec![ToMaster::Beat { served: 0, in_flight: 1 }], "the first beat, at once");
            // The runtime's thread is blocked (a handler sleeping): no beat, however long.
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(beats(), vec![], "a stuck runtime does not beat");
            // Running again: one beat at once (no burst of make-up beats), then one per interval.
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(beats().len(), 1);
            tokio::time::sleep(Duration::from_millis(120)).await;
            let n = beats().len();
            assert!((1..=3).contains(&n), "{n} beats in 120 ms at 50 ms");
            drop(task);
            tokio::time::sleep(Duration::from_millis(120)).await;
            assert_eq!(beats(), vec![], "stopped with its handle");
        });
        // The master gone: the task ends by itself.
        let (worker, master) = Worker::for_test(Some(Duration::from_millis(10)), None);
        drop(master);
        runtime().block_on(async {
            let task = spawn_heartbeat(&worker);
            tokio::time::timeout(Duration::from_secs(5), async {
                while !task.0.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the task ends when its beat cannot be sent");
        });
    }

    /// A master double that answers every `stats` query on `master` with `total_workers: 7`,
    /// until the worker's end closes.
    fn answering_master(master: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<usize> {
        use crate::proto::channel::{ToMaster, ToWorker, encode};
        use std::io::{BufRead, Write};
        master.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            let mut answered = 0;
            let mut out = master.try_clone().unwrap();
            for line in std::io::BufReader::new(master).lines() {
                let Ok(line) = line else { break };
                if let Ok(ToMaster::Stats { id }) = serde_json::from_str(&line) {
                    let cluster = ClusterStats { total_workers: 7, ..ClusterStats::default() };
                    let answer = encode(&ToWorker::Stats { id, cluster, workers: Vec::new() });
                    // Split in two writes: the reader must join the pieces.
                    let (a, b) = answer.split_at(answer.len() / 2);
                    if out.write_all(a).is_err() || out.write_all(b).is_err() {
                        break;
                    }
                    answered += 1;
                }
            }
            answered
        })
    }

    /// Under `serve` the runtime reads the channel; a handler that calls the blocking
    /// `Worker::stats` blocks that runtime (current-thread), so the query reads the answer
    /// itself. (Before: every such call timed out after 5 s.) The async form still works, and
    /// so does the blocking one after the runtime ended (the channel went back to a thread).
    #[test]
    fn a_blocking_query_on_the_runtime_that_reads_the_channel_is_answered() {
        let (worker, master) = Worker::for_test_with_reader();
        let master = answering_master(master);
        runtime().block_on(async {
            assert!(spawn_runtime_reader(&worker.inner));
            for _ in 0..3 {
                let started = std::time::Instant::now();
                let (cluster, _) = worker.stats().expect("answered");
                assert_eq!(cluster.total_workers, 7);
                assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
            }
            let (cluster, _) = cluster_stats(&worker).await.expect("answered");
            assert_eq!(cluster.total_workers, 7);
        });
        // The runtime is gone: its reader gave the channel back, and a thread reads it now.
        assert_eq!(worker.stats().expect("answered by the channel thread").0.total_workers, 7);
        drop(worker);
        let _ = master;
    }

    #[test]
    fn outside_a_runtime_the_helpers_fail_instead_of_panicking() {
        assert!(in_runtime("x").is_err());
        runtime().block_on(async {
            assert!(in_runtime("x").is_ok());
        });
    }
}
