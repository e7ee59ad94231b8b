//! A worker written with plain hyper (no axum, no `serve` helper): the building blocks for any
//! framework that takes a listener and a shutdown future.
//!
//! ```sh
//! cargo run --release --example hyper -- --port 3000
//! curl http://127.0.0.1:3000/
//! ```

use std::convert::Infallible;

use clap::Parser;
use ecewo_cluster::{self as cluster, Cluster, Role};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;

#[derive(Parser)]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Number of workers (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// No cluster: the same service in a plain hyper accept loop in this one process, on a
    /// current-thread runtime as a worker's (what bench/frameworks compares a 1-worker cluster
    /// with).
    #[arg(long)]
    standalone: bool,
}

/// `--standalone`: the service without the cluster, on the runtime a worker would have.
fn standalone(port: u16) -> Result<(), cluster::Error> {
    let io = |context| move |source| cluster::Error::Io { context, source };
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("cannot build a runtime"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.map_err(io("cannot listen"))?;
        eprintln!("standalone on port {}", listener.local_addr().map_err(io("no local address"))?.port());
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, _) = listener.accept().await.map_err(io("accept failed"))?;
            let conn = builder.serve_connection(TokioIo::new(stream), service_fn(hello)).into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    })
}

async fn hello(_req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from(format!("Hello from worker {}!", cluster::worker_id())))))
}

/// How long connections accepted just before a stop get to send their first request.
const IDLE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

fn main() -> Result<(), cluster::Error> {
    let args = Args::parse();
    if args.standalone {
        return standalone(args.port);
    }
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(colour).init();
    match Cluster::new(args.port).cpus(args.workers).respawn(true).init()? {
        Role::Master(master) => master.wait(),
        Role::Worker(worker) => cluster::serve::run_worker(&worker, |w| async move {
            // The inherited socket as a tokio listener, and a future for SIGTERM or master loss,
            // registered before the worker reports ready.
            let listener = cluster::serve::listener(w)?;
            let shutdown = cluster::serve::shutdown_signal(w)
                .map_err(|e| cluster::Error::Io { context: "cannot install the SIGTERM handler", source: e })?;
            tokio::pin!(shutdown);
            w.ready()?;
            let builder = auto::Builder::new(TokioExecutor::new());
            let graceful = GracefulShutdown::new();
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    Ok((stream, _)) = listener.accept() => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service_fn(hello)).into_owned();
                        let conn = graceful.watch(conn);
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                    }
                }
            }
            drop(listener);
            // A connection accepted just before the stop may not have sent its first request yet:
            // closing it now (hyper closes idle connections at once) would reset a request on its way.
            // Give such connections a moment, as `serve`'s idle grace does.
            tokio::time::sleep(IDLE_GRACE.min(w.shutdown_timeout() / 2)).await;
            // hyper's graceful shutdown waits for ever: bound it, the master's SIGKILL is the last word.
            let _ = tokio::time::timeout(w.shutdown_timeout(), graceful.shutdown()).await;
            Ok(())
        }),
    }
}
