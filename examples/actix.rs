//! The spec's Quick Start with actix-web.
//!
//! ```sh
//! cargo run --release --example actix -- --port 3000
//! curl http://127.0.0.1:3000/
//! ```
//!
//! actix-web normally starts one thread per CPU and installs its own signal handlers; in a
//! cluster each worker process is one of the CPUs, so it runs with `.workers(1)` and
//! `.disable_signals()`, and stops when the cluster says so.

use actix_web::{App, HttpServer, web};
use clap::Parser;
use ecewo_cluster::{self as cluster, Cluster, Role};

#[derive(Parser)]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Number of workers (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// No cluster: the same app on `HttpServer` alone in this one process, with one actix
    /// worker as a cluster worker has (what bench/frameworks compares a 1-worker cluster with).
    #[arg(long)]
    standalone: bool,
}

/// `--standalone`: the app without the cluster, as a cluster worker runs it.
fn standalone(port: u16) -> Result<(), cluster::Error> {
    let io = |context| move |source| cluster::Error::Io { context, source };
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(|| App::new().route("/", web::get().to(index)))
            .workers(1)
            .bind(("0.0.0.0", port))
            .map_err(io("cannot listen"))?;
        eprintln!("standalone on port {}", server.addrs().first().map_or(port, |a| a.port()));
        server.run().await.map_err(io("actix-web server failed"))
    })
}

async fn index() -> String {
    format!("Hello from worker {}!", cluster::worker_id())
}

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
        Role::Worker(worker) => {
            let listener = worker.listener()?;
            let io = |context| move |source| cluster::Error::Io { context, source };
            actix_web::rt::System::new().block_on(async move {
                // Stop accepting and drain on SIGTERM or when the master is gone; bounded by
                // the master's shutdown timeout (its SIGKILL is the last word).
                let shutdown = cluster::serve::shutdown_signal(&worker).map_err(io("cannot handle SIGTERM"))?;
                let server = HttpServer::new(|| App::new().route("/", web::get().to(index)))
                    .workers(1)
                    .disable_signals()
                    .shutdown_timeout(worker.shutdown_timeout().as_secs().max(1))
                    .listen(listener)
                    .map_err(io("actix-web cannot use the cluster's listener"))?
                    .run();
                let handle = server.handle();
                actix_web::rt::spawn(async move {
                    shutdown.await;
                    handle.stop(true).await;
                });
                worker.ready()?;
                server.await.map_err(io("actix-web server failed"))
            })
        }
    }
}
