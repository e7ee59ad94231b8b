//! Worker-side helpers for tokio, hyper and axum (cargo feature `tokio`).
//!
//! - [`listener`] turns the inherited socket into a `tokio::net::TcpListener`;
//! - [`shutdown_signal`] completes on SIGTERM or when the master is gone;
//! - [`serve`] runs any tower service (an axum `Router`, a hyper service adapted with tower) on
//!   the worker's socket over HTTP/1.1 and HTTP/2, reports readiness once it accepts, and drains
//!   gracefully;
//! - [`Cluster::serve`](crate::Cluster::serve) does it all from `main`: init, then supervise or
//!   serve.
//!
//! The drain, on SIGTERM or when the master is gone: stop accepting at once (the socket stays
//! open in the master, so queued connections go to the other workers or the replacement); answer
//! the next request on every keep-alive connection with `Connection: close`; after
//! [`ServeOptions::idle_grace`], close connections that are still idle; finish in-flight requests;
//! give up after [`ServeOptions::drain_timeout`] and return.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::error::Error;
use crate::stats::{ClusterStats, WorkerStats};
use crate::worker::Worker;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Options of [`serve`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// How long a draining worker lets idle keep-alive connections live, so that a request a
    /// client is sending right now is answered (with `Connection: close`) instead of hitting a
    /// closed socket. Default 1 s.
    pub idle_grace: Duration,
    /// The longest the whole drain may take before `serve` returns and in-flight requests are
    /// dropped. Default: the master's shutdown timeout less 500 ms (at least 1 s), so the worker
    /// ends on its own terms before the master's SIGKILL.
    pub drain_timeout: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions { idle_grace: Duration::from_secs(1), drain_timeout: None }
    }
}

impl ServeOptions {
    /// Sets [`idle_grace`](ServeOptions::idle_grace).
    pub fn idle_grace(mut self, d: Duration) -> ServeOptions {
        self.idle_grace = d;
        self
    }

    /// Sets [`drain_timeout`](ServeOptions::drain_timeout).
    pub fn drain_timeout(mut self, d: Duration) -> ServeOptions {
        self.drain_timeout = Some(d);
        self
    }

    fn drain_timeout_for(&self, worker: &Worker) -> Duration {
        self.drain_timeout.unwrap_or_else(|| {
            worker.shutdown_timeout().saturating_sub(Duration::from_millis(500)).max(Duration::from_secs(1))
        })
    }
}

/// The worker's inherited socket as a tokio listener (non-blocking, registered with the current
/// runtime). Must be called inside a tokio runtime; the listener can be taken once.
pub fn listener(worker: &Worker) -> Result<tokio::net::TcpListener, Error> {
    let std = worker.listener()?;
    std.set_nonblocking(true).map_err(Error::io("cannot make the listener non-blocking"))?;
    tokio::net::TcpListener::from_std(std).map_err(Error::io("cannot register the listener with tokio"))
}

/// A future that completes when this worker should stop: SIGTERM (from the master: shutdown,
/// restart, scale-down) or the master is gone. Use it with axum's or hyper's graceful shutdown.
///
/// The SIGTERM handler is installed when this function is called, not when the future is first
/// polled: call it before reporting ready, so an early SIGTERM is not lost.
pub fn shutdown_signal(worker: &Worker) -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut gone = worker.master_gone_receiver();
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = gone.wait_for(|g| *g) => {}
        }
    })
}

/// Serves `service` on the worker's socket until [`shutdown_signal`], then drains (see the
/// [module documentation](self)). Reports the worker ready once it accepts connections.
/// Must be called inside a tokio runtime.
pub async fn serve<S, B>(worker: &Worker, service: S, options: ServeOptions) -> Result<(), Error>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = listener(worker)?;
    let shutdown = shutdown_signal(worker).map_err(Error::io("cannot install the SIGTERM handler"))?;
    tokio::pin!(shutdown);
    let draining = Arc::new(AtomicBool::new(false));
    // Connections watch this: `true` means "close once idle".
    let (close_idle_tx, close_idle_rx) = watch::channel(false);
    let builder = auto::Builder::new(TokioExecutor::new());
    let spawn_conn = |stream: tokio::net::TcpStream| {
        let _ = stream.set_nodelay(true);
        let svc = DrainService { inner: service.clone(), draining: draining.clone() };
        let builder = builder.clone();
        let mut close_idle = close_idle_rx.clone();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(svc),
            );
            tokio::pin!(conn);
            tokio::select! {
                biased;
                res = conn.as_mut() => { if let Err(e) = res { tracing::debug!("connection error: {e}") } return; }
                _ = close_idle.wait_for(|c| *c) => {}
            }
            // Finishes an in-flight request, then closes; closes an idle connection now.
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!("connection error while draining: {e}");
            }
        });
    };
    worker.ready()?;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => spawn_conn(stream),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Take what is still queued, then close the socket: the master holds its own reference (or
    // has routed new connections elsewhere), so nothing queued is lost.
    let listener = listener.into_std().map_err(Error::io("cannot take the listener back from tokio"))?;
    while let Ok((stream, _)) = listener.accept() {
        if stream.set_nonblocking(true).is_ok()
            && let Ok(stream) = tokio::net::TcpStream::from_std(stream)
        {
            spawn_conn(stream);
        }
    }
    drop(listener);
    draining.store(true, Ordering::SeqCst);
    let drain_timeout = options.drain_timeout_for(worker);
    let deadline = tokio::time::Instant::now() + drain_timeout;
    // Every connection task holds a receiver: `closed()` completes when the last one ended.
    drop(close_idle_rx);
    let _ = tokio::time::timeout(options.idle_grace.min(drain_timeout), close_idle_tx.closed()).await;
    close_idle_tx.send_replace(true);
    if tokio::time::timeout_at(deadline, close_idle_tx.closed()).await.is_err() {
        tracing::warn!("drain timeout ({drain_timeout:?}) reached with connections still open; exiting");
    }
    Ok(())
}

/// Asks the master for the cluster's statistics and every worker's, without blocking the
/// runtime (the query runs on tokio's blocking pool): what the spec's monitoring example's
/// `/stats` endpoint needs, in a worker.
pub async fn cluster_stats(worker: &Worker) -> Result<(ClusterStats, Vec<WorkerStats>), Error> {
    let worker = worker.clone();
    tokio::task::spawn_blocking(move || worker.stats()).await.unwrap_or(Err(Error::MasterGone))
}

/// The cluster's Prometheus metrics, from the master ([`crate::metrics`]): serve it at
/// `/metrics` in any worker, and every scrape sees the whole cluster.
pub async fn metrics(worker: &Worker) -> Result<String, Error> {
    let (cluster, workers) = cluster_stats(worker).await?;
    Ok(crate::proto::metrics::render(&cluster, &workers))
}

/// Wraps the user's service: while draining, every response carries `Connection: close`, so
/// keep-alive clients learn to reconnect (to another worker) before the connection is closed.
#[derive(Clone)]
struct DrainService<S> {
    inner: S,
    draining: Arc<AtomicBool>,
}

impl<S, B> tower_service::Service<Request<Incoming>> for DrainService<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = DrainFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        DrainFuture { inner: self.inner.call(req), draining: self.draining.clone() }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainService`]: the inner one, plus the header while draining.
    /// (No allocation per request: this is on every request's path.)
    struct DrainFuture<F> {
        #[pin]
        inner: F,
        draining: Arc<AtomicBool>,
    }
}

impl<F, B, E> Future for DrainFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        if this.draining.load(Ordering::Relaxed) {
            resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        std::task::Poll::Ready(Ok(resp))
    }
}

/// Runs `f` in a new single-threaded tokio runtime, inside a tracing span naming the worker.
pub fn run_worker<'w, F, Fut>(worker: &'w Worker, f: F) -> Result<(), Error>
where
    F: FnOnce(&'w Worker) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("cannot build the worker's tokio runtime"))?;
    let span = tracing::info_span!("worker", id = worker.id());
    let _entered = span.enter();
    rt.block_on(f(worker))
}
