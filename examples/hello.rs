//! The spec's Quick Start with axum: a clustered hello-world server.
//!
//! ```sh
//! cargo run --release --example hello                  # one worker per CPU, port 3000
//! cargo run --release --example hello -- --port 8080 --workers 4
//! curl http://127.0.0.1:3000/                          # Hello from worker N!
//! # as in a container: probes on the admin port, a drain delay for the load balancer
//! cargo run --release --example hello -- --admin 0.0.0.0:9090 --shutdown-delay-ms 5000
//! curl http://127.0.0.1:9090/readyz                    # ready: 2 of 2 workers ready …
//! ```

use axum::{Router, routing::get};
use clap::Parser;
use ecewo_cluster::{self as cluster, Cluster};

#[derive(Parser)]
#[command(about = "A clustered hello-world server")]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Number of workers (default, or 0: one per CPU, within the cgroup's CPU limit).
    #[arg(long, default_value_t = cluster::cpus())]
    workers: usize,
    /// The master's admin listener for probes and metrics (`GET /livez`, `/readyz`,
    /// `/startupz`, `/metrics`), e.g. `0.0.0.0:9090` or `unix:/run/hello-admin.sock`.
    #[arg(long)]
    admin: Option<cluster::ListenAddr>,
    /// On SIGTERM, serve this long while reporting not-ready before draining (Kubernetes: 5000).
    #[arg(long, default_value_t = 0)]
    shutdown_delay_ms: u64,
    /// How long a draining worker gets before it is killed.
    #[arg(long, default_value_t = 15_000)]
    shutdown_timeout_ms: u64,
    /// No cluster: the same router served by `axum::serve` in this one process, on a
    /// current-thread runtime as a worker's (what bench/frameworks compares a 1-worker cluster
    /// with).
    #[arg(long)]
    standalone: bool,
}

fn router() -> Router {
    Router::new().route("/", get(handle_index))
}

/// `--standalone`: the router without the cluster, on the runtime a worker would have.
fn standalone(port: u16) -> Result<(), cluster::Error> {
    let io = |context| move |source| cluster::Error::Io { context, source };
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("cannot build a runtime"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.map_err(io("cannot listen"))?;
        eprintln!("standalone on port {}", listener.local_addr().map_err(io("no local address"))?.port());
        axum::serve(listener, router()).await.map_err(io("axum::serve failed"))
    })
}

async fn handle_index() -> String {
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
    let ms = std::time::Duration::from_millis;
    let cluster = Cluster::new(args.port)
        .cpus(args.workers)
        .respawn(true)
        .shutdown_delay(ms(args.shutdown_delay_ms))
        .shutdown_timeout(ms(args.shutdown_timeout_ms));
    let cluster = match args.admin {
        Some(addr) => cluster.admin(addr),
        None => cluster,
    };
    cluster.serve(|_worker| router())
}
