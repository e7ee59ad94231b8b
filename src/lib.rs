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
//! With the `tokio` feature (on by default), `serve::serve` runs any tower
//! service (an axum `Router`, for example) in each worker: it reports readiness once it accepts,
//! and drains gracefully on shutdown.
//!
//! The module-level functions ([`worker_id`], [`is_master`], [`port`], [`cpus`], …) mirror the
//! C plugin's `cluster_*` functions and work in both roles, and before [`Cluster::init`].

#![warn(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(target_os = "linux"))]
compile_error!("ecewo-cluster supports Linux only: it relies on pidfds, SO_REUSEPORT and PR_SET_PDEATHSIG.");

// The rooms of the architecture (see ARCHITECTURE.md): what each may import is written at the
// top of its module.
//
// - vocabulary, imported by all: `error`, `signal`, `stats`, `events`;
// - decide: `supervisor`, the pure state machine (vocabulary only);
// - protocols: `proto`, what passes between processes (vocabulary only);
// - the OS layer: `os`, system calls, sockets, CPUs, /proc (vocabulary only);
// - drive: `master`, the master's loop (everything but `worker`);
// - the worker side: `worker` (vocabulary, `proto`, `os`);
// - the front: `config` (the builder) and `role` (init and the spec's module functions).
mod config;
mod error;
mod events;
#[cfg(feature = "logging")]
#[cfg_attr(docsrs, doc(cfg(feature = "logging")))]
pub mod logging;
mod master;
mod os;
mod proto;
mod rfc3339;
mod role;
mod signal;
mod stats;
mod supervisor;
mod worker;

pub use proto::{control, metrics};
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use worker::serve;

/// The README's examples, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use config::{
    BINDABLE_SIGNALS, Balance, Cluster, Compat, Listen, ListenAddr, ListenerInfo, MAX_DURATION, MAX_WORKERS,
    MemoryMeasure, ReadyInfo, WorkerExit, WorkerInfo,
};
pub use config::{CaptureFormat, CaptureOutput, DEFAULT_MAX_LINE, DEFAULT_REOPEN_SIGNAL};
pub use error::Error;
pub use events::{
    ClusterEvent, DEFAULT_EVENT_HISTORY, EndOutcome, EventKind, MAX_EVENT_HISTORY, RecycleCause, SignalReason,
};
pub use master::{Master, MasterHandle};
pub use os::cpu::{CpuCount, CpuSource, cpus, cpus_detailed, cpus_physical};
pub use role::{
    Role, all_workers, graceful_restart, is_master, is_worker, port, signal_workers, stats, worker_count, worker_id,
    worker_stats,
};
pub use signal::{Signal, UnknownSignal};
pub use stats::{
    ClusterStats, ExitCounts, ExitReason, ExitStatus, ListenerStats, RestartOutcome, UpgradeOutcome, WorkerStats,
    WorkerStatus,
};
pub use worker::{Listener, RequestGuard, Worker};

/// The import rules of the tree (ARCHITECTURE.md, "The tree"), checked on the sources: a
/// module that reaches into a room it may not touch fails this test.
#[cfg(test)]
mod layering {
    use std::path::Path;

    /// The rooms, and the `crate::` paths code in each may not use.
    const RULES: &[(&str, &[&str])] = &[
        ("src/supervisor", &["master", "worker", "os", "proto", "config", "role", "serve", "control", "metrics"]),
        ("src/proto", &["master", "worker", "os", "supervisor", "config", "role", "serve"]),
        ("src/os", &["master", "worker", "proto", "supervisor", "config", "role", "serve", "control", "metrics"]),
        ("src/master", &["worker", "config", "role", "serve", "Cluster"]),
        ("src/worker", &["master", "supervisor", "config", "role", "Cluster", "MasterHandle", "Master"]),
        ("src/stats.rs", &["master", "worker", "os", "proto", "supervisor", "config", "role"]),
        ("src/events.rs", &["master", "worker", "os", "proto", "supervisor", "config", "role"]),
        ("src/rfc3339.rs", &["master", "worker", "os", "proto", "supervisor", "config", "role", "stats", "events"]),
        ("src/signal.rs", &["master", "worker", "os", "proto", "supervisor", "config", "role"]),
        ("src/error.rs", &["master", "worker", "os", "proto", "supervisor", "config", "role"]),
    ];

    fn files(path: &Path, out: &mut Vec<std::path::PathBuf>) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                files(&entry.unwrap().path(), out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.to_owned());
        }
    }

    /// Rewrites `crate::{a, b::c}` as `crate::a, crate::b::c` (one level of braces, which is
    /// how rustfmt writes this crate's imports), keeping the line count.
    fn spell_out_groups(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find("crate::{") {
            out.push_str(&rest[..i]);
            let after = &rest[i + "crate::{".len()..];
            let end = after.find('}').unwrap_or(after.len());
            let items: Vec<String> = after[..end]
                .split(',')
                .map(|item| {
                    let name = item.trim_start();
                    format!("{}crate::{name}", &item[..item.len() - name.len()])
                })
                .collect();
            out.push_str(&items.join(","));
            rest = &after[end..];
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn groups_are_spelled_out() {
        assert_eq!(spell_out_groups("use crate::{a::x, b};"), "use crate::a::x, crate::b};");
        assert_eq!(spell_out_groups("use crate::{\n    a,\n    b,\n};").lines().count(), 4);
    }

    #[test]
    fn each_room_imports_only_what_it_may() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut broken = Vec::new();
        for (room, forbidden) in RULES {
            let mut list = Vec::new();
            files(&root.join(room), &mut list);
            assert!(!list.is_empty(), "{room} has no sources");
            for file in list {
                let text = std::fs::read_to_string(&file).unwrap();
                // Unit tests may use the front to set things up.
                let body = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
                // `use crate::{a::x, b};` imports `crate::a` and `crate::b`: spell groups out.
                let body = spell_out_groups(body);
                for (n, line) in body.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    for name in *forbidden {
                        let path = format!("crate::{name}");
                        let hit = code.match_indices(&path).any(|(i, _)| {
                            !code[i + path.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                        });
                        if hit {
                            broken.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                        }
                    }
                }
            }
        }
        assert!(broken.is_empty(), "imports across the architecture's walls:\n{}", broken.join("\n"));
    }
}
