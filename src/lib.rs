//! # ecewo-cluster
//!
//! Run a network server on every CPU core as a supervised cluster of worker processes.
//!
//! The first run of the program becomes the **master**: it binds every listening socket itself,
//! then executes the same program once per worker slot. Each **worker** inherits its socket and a
//! channel to the master, serves traffic, and reports when it is ready. The master never serves
//! traffic; it supervises: it starts workers, stops them gracefully, and makes sure none outlives it.
//!
//! ```no_run
//! use ecewo_cluster::{self as cluster, Cluster, Role};
//!
//! fn main() -> Result<(), cluster::Error> {
//!     // First thing in main: before any async runtime or thread exists.
//!     match Cluster::new(3000).cpus(cluster::cpus()).respawn(true).init()? {
//!         Role::Master(master) => master.wait(),
//!         Role::Worker(worker) => {
//!             let listener = worker.listener()?;
//!             worker.ready()?;
//!             for stream in listener.incoming() {
//!                 // ... serve the connection ...
//!                 # let _ = stream;
//!             }
//!             Ok(())
//!         }
//!     }
//! }
//! ```
//!
//! With the `tokio` feature (on by default), [`serve`](crate::serve::serve) runs any tower
//! service (an axum `Router`, for example) in each worker: it reports readiness once it accepts,
//! and drains gracefully on shutdown.
//!
//! The module-level functions ([`worker_id`], [`is_master`], [`port`], [`cpus`], …) mirror the
//! C plugin's `cluster_*` functions and work in both roles, and before [`Cluster::init`].

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(target_os = "linux"))]
compile_error!("ecewo-cluster supports Linux only: it relies on pidfds, SO_REUSEPORT and PR_SET_PDEATHSIG.");

mod channel;
mod config;
pub mod control;
mod control_server;
mod cpu;
mod error;
mod master;
pub mod metrics;
mod notify;
mod role;
mod socket;
mod stats;
mod steer;
pub mod supervisor;
mod sys;
mod worker;

#[cfg(feature = "tokio")]
pub mod serve;

/// The README's examples, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use config::{BINDABLE_SIGNALS, Balance, Cluster, MAX_WORKERS, ReadyInfo};
pub use cpu::{CpuCount, CpuSource, cpus, cpus_detailed, cpus_physical};
pub use error::Error;
pub use master::{Master, MasterHandle};
pub use role::{
    Role, all_workers, graceful_restart, is_master, is_worker, port, signal_workers, stats, worker_count, worker_id,
    worker_stats,
};
pub use stats::{ClusterStats, ExitStatus, RestartOutcome, WorkerStats, WorkerStatus};
pub use worker::Worker;
