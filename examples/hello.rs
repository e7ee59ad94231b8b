//! The spec's Quick Start with axum: a clustered hello-world server.
//!
//! ```sh
//! cargo run --release --example hello                  # one worker per CPU, port 3000
//! cargo run --release --example hello -- --port 8080 --workers 4
//! curl http://127.0.0.1:3000/                          # Hello from worker N!
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
    /// Number of workers (default: one per CPU).
    #[arg(long, default_value_t = cluster::cpus())]
    workers: usize,
}

async fn handle_index() -> String {
    format!("Hello from worker {}!", cluster::worker_id())
}

fn main() -> Result<(), cluster::Error> {
    let args = Args::parse();
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(colour).init();
    Cluster::new(args.port)
        .cpus(args.workers)
        .respawn(true)
        .serve(|_worker| Router::new().route("/", get(handle_index)))
}
