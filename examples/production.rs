//! The spec's "Production Setup with Monitoring", with axum.
//!
//! ```sh
//! cargo run --release --example production
//! curl http://127.0.0.1:3000/        # Worker N (PID: P)
//! curl http://127.0.0.1:3000/stats   # Active: 2/2 | Crashed: 0 | Disabled: 0 | Restarts: 0
//! ```
//!
//! Unlike the C plugin's, the `/stats` endpoint works in the workers: each asks the master over
//! its channel.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use ecewo_cluster::{self as cluster, Cluster, Role, Worker, WorkerExit, WorkerInfo};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn on_worker_start(worker: &WorkerInfo) {
    println!("[{}] Worker {} started (PID: {})", now(), worker.worker_id, worker.pid);
}

fn on_worker_exit(exit: &WorkerExit) {
    if exit.crash {
        println!("[{}] Worker {} CRASHED ({})", now(), exit.worker_id, exit.status);
    } else {
        println!("[{}] Worker {} exited gracefully ({})", now(), exit.worker_id, exit.status);
    }
}

async fn handle_index() -> String {
    format!("Worker {} (PID: {})", cluster::worker_id(), std::process::id())
}

async fn handle_stats(State(worker): State<Worker>) -> (StatusCode, String) {
    match cluster::serve::cluster_stats(&worker).await {
        Ok((stats, _workers)) => (
            StatusCode::OK,
            format!(
                "Active: {}/{} | Crashed: {} | Disabled: {} | Restarts: {}",
                stats.active_workers,
                stats.total_workers,
                stats.crashed_workers,
                stats.disabled_workers,
                stats.total_restarts
            ),
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot reach the master: {e}")),
    }
}

fn main() -> Result<(), cluster::Error> {
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(colour).init();
    let opts = Cluster::new(3000)
        .cpus(cluster::cpus_physical())
        .respawn(true)
        .shutdown_timeout(Duration::from_secs(30)) // 30 second shutdown
        .respawn_window(Duration::from_secs(10)) // 10 second crash window
        .respawn_max_crashes(5) // max 5 crashes in window
        .on_start(on_worker_start)
        .on_exit(on_worker_exit);

    match opts.init()? {
        Role::Master(master) => {
            println!("Master process started (PID: {})", std::process::id());
            println!("Press Ctrl+C to shutdown");
            let result = master.wait();
            println!("All workers exited. Shutting down.");
            result
        }
        Role::Worker(worker) => cluster::serve::run_worker(&worker, |w| async move {
            let app =
                Router::new().route("/", get(handle_index)).route("/stats", get(handle_stats)).with_state(w.clone());
            cluster::serve::serve(w, app, Default::default()).await
        }),
    }
}
