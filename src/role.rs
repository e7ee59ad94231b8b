//! Master or worker: detection at `init`, and the module-level introspection functions.

use std::sync::{Arc, OnceLock};

use crate::config::Cluster;
use crate::error::Error;
use crate::master::{Master, Shared};
use crate::os::fds::claim_inherited_fds;
use crate::signal::Signal;
use crate::stats::{ClusterStats, WorkerStats};
use crate::worker::Worker;

/// What this process is, as returned by [`Cluster::init`].
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "made once per process; boxing would only add an indirection")]
pub enum Role {
    /// The master: call [`Master::wait`] to supervise the workers until shutdown.
    Master(Master),
    /// A worker: serve on [`Worker::listener`] and call [`Worker::ready`] once accepting.
    Worker(Worker),
}

impl Role {
    /// True for [`Role::Master`] (the spec's `cluster_init` return value).
    pub fn is_master(&self) -> bool {
        matches!(self, Role::Master(_))
    }
}

pub(crate) enum Global {
    Master(Arc<Shared>),
    Worker(Worker),
}

static ROLE: OnceLock<Global> = OnceLock::new();

/// Sends `signal` to every active worker (the spec's `cluster_signal_workers`); master only.
/// Any signal is accepted, `SIGKILL` included; a worker that dies of a signal sent this way has
/// not crashed. The signal is sent by the master's loop right after this call returns.
///
/// # Errors
///
/// [`Error::NotMaster`] in a worker, [`Error::NotInitialized`] before [`Cluster::init`],
/// [`Error::NotSupervising`] once the master stopped supervising.
pub fn signal_workers(signal: Signal) -> Result<(), Error> {
    match ROLE.get() {
        Some(Global::Master(m)) => m.signal_workers(signal),
        Some(Global::Worker(_)) => Err(Error::NotMaster { operation: "signal_workers" }),
        None => Err(Error::NotInitialized),
    }
}

/// Starts a zero-downtime rolling restart (the spec's `cluster_graceful_restart`); master only.
/// Returns at once; see [`crate::MasterHandle::graceful_restart`] and
/// [`crate::MasterHandle::restart_and_wait`].
///
/// # Errors
///
/// [`Error::NotMaster`] in a worker, [`Error::NotInitialized`] before [`Cluster::init`],
/// [`Error::NotSupervising`] once the master stopped supervising.
pub fn graceful_restart() -> Result<(), Error> {
    match ROLE.get() {
        Some(Global::Master(m)) => m.graceful_restart(),
        Some(Global::Worker(_)) => Err(Error::NotMaster { operation: "graceful_restart" }),
        None => Err(Error::NotInitialized),
    }
}

/// The cluster's statistics and every worker's, from wherever this process stands: the master's
/// own state, or a worker's query over its channel to the master.
fn snapshot() -> Result<(ClusterStats, Vec<WorkerStats>), Error> {
    match ROLE.get() {
        Some(Global::Master(m)) => Ok(m.snapshot()),
        Some(Global::Worker(w)) => w.stats(),
        None => Err(Error::NotInitialized),
    }
}

/// The cluster's statistics (the spec's `cluster_get_stats`). Works in the master and, unlike
/// the C plugin, in workers too (asked of the master over the worker's channel; blocking).
pub fn stats() -> Result<ClusterStats, Error> {
    snapshot().map(|(c, _)| c)
}

/// Statistics of one worker slot (the spec's `cluster_get_worker_stats`); in the master or a
/// worker. An id that is not a slot is [`Error::NoSuchWorker`].
pub fn worker_stats(worker_id: usize) -> Result<WorkerStats, Error> {
    snapshot()?.1.into_iter().find(|w| w.worker_id == worker_id).ok_or(Error::NoSuchWorker(worker_id))
}

/// Statistics of every worker slot (the spec's `cluster_get_all_workers`); in the master or a
/// worker.
pub fn all_workers() -> Result<Vec<WorkerStats>, Error> {
    snapshot().map(|(_, w)| w)
}

impl Cluster {
    /// Initialises the cluster: the spec's `cluster_init`. Call it first thing in `main`, before
    /// any async runtime or thread is started, and once per process.
    ///
    /// In the first run of the program (the master) it checks the options, binds every listening
    /// socket (an address in use fails here, before any worker exists) and installs the master's
    /// signal handling; [`Master::wait`] then starts the workers and supervises them. In a worker
    /// (the same program, executed again by the master with `ECEWO_CLUSTER_*` variables set) it
    /// takes over the inherited socket and channel, and the options are ignored.
    ///
    /// # Errors
    ///
    /// In the master: [`Error::InvalidOption`] (naming the option and what to change),
    /// [`Error::Bind`] when an address is in use (nothing is started then),
    /// [`Error::AlreadyRunning`] when another cluster of the same name serves its control socket,
    /// [`Error::ControlSocket`] for an explicit control socket path that cannot be used, and
    /// [`Error::Io`] when the master's own descriptors or signal handlers cannot be set up. In a
    /// worker: [`Error::MasterGone`] when the master died before the worker was set up (exit
    /// then), [`Error::BadInheritance`] when the worker's descriptors are not what its master
    /// passed. In both: [`Error::AlreadyInitialized`] on a second call.
    ///
    /// # Caveats
    ///
    /// - Call it first thing in `main`, before any thread or async runtime exists: the master is
    ///   a small single-threaded process, and workers are this same program executed again, so
    ///   whatever runs before `init` runs in every worker too.
    /// - Workers are found by their environment (`ECEWO_CLUSTER_*`) and their inherited channel,
    ///   never by argv, so programs that parse their own arguments keep working. The variables
    ///   count only when the channel they name really leads to the master they name; otherwise
    ///   they are stale and the process starts as a master. A worker removes them from its
    ///   environment, so programs it starts do not inherit its identity.
    /// - In the master, the process's `SIGTERM`, `SIGINT`, `SIGHUP`, `SIGQUIT`, `SIGUSR2`,
    ///   `SIGTTIN` and `SIGTTOU` (and the bound signals) are handled from here on; they are
    ///   acted on once [`Master::wait`] runs.
    pub fn init(self) -> Result<Role, Error> {
        if ROLE.get().is_some() {
            return Err(Error::AlreadyInitialized);
        }
        if let Some(env) = crate::worker::inherited_env()? {
            // Claimed before the inherited descriptors are taken, so that they can never get two
            // owners (a second or concurrent init, a retry after a failed one).
            if !claim_inherited_fds() {
                return Err(Error::AlreadyInitialized);
            }
            let worker = Worker::from_env(env)?;
            ROLE.set(Global::Worker(worker.clone())).map_err(|_| Error::AlreadyInitialized)?;
            return Ok(Role::Worker(worker));
        }
        // The new master of an upgrade in place finds what it inherits (before anything else
        // could take the descriptors).
        let inherited = crate::master::inherited_upgrade()?;
        if let Err(e) = self.validate() {
            if let Some(i) = &inherited {
                i.say_failed(&e);
            }
            return Err(e);
        }
        let master = Master::new(self.into_settings(), inherited)?;
        ROLE.set(Global::Master(master.shared())).map_err(|_| Error::AlreadyInitialized)?;
        Ok(Role::Master(master))
    }
}

/// True in the master after [`Cluster::init`] (the spec's `cluster_is_master`).
pub fn is_master() -> bool {
    matches!(ROLE.get(), Some(Global::Master(_)))
}

/// True in a worker after [`Cluster::init`] (the spec's `cluster_is_worker`).
pub fn is_worker() -> bool {
    matches!(ROLE.get(), Some(Global::Worker(_)))
}

/// The port the cluster listens on, the real one when port 0 was asked for; 0 before
/// [`Cluster::init`] (the spec's `cluster_get_port`).
pub fn port() -> u16 {
    match ROLE.get() {
        Some(Global::Master(m)) => m.addr.port(),
        Some(Global::Worker(w)) => w.port(),
        None => 0,
    }
}

/// This worker's id, from 0; 0 in the master and before [`Cluster::init`] (the spec's
/// `cluster_worker_id`). Use [`is_worker`] to tell worker 0 from the master.
pub fn worker_id() -> usize {
    match ROLE.get() {
        Some(Global::Worker(w)) => w.id(),
        _ => 0,
    }
}

/// The number of configured workers; 0 before [`Cluster::init`] (the spec's
/// `cluster_worker_count`).
pub fn worker_count() -> usize {
    match ROLE.get() {
        Some(Global::Master(m)) => m.workers(),
        Some(Global::Worker(w)) => w.count(),
        None => 0,
    }
}

#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
impl Cluster {
    /// Initialises the cluster and runs it: the master supervises until shutdown; each worker
    /// builds a single-threaded tokio runtime (one worker per core), calls `make_service` inside
    /// it, and [`serve`](crate::serve::serve)s the result until it drains.
    ///
    /// ```no_run
    /// use axum::{Router, routing::get};
    /// use ecewo_cluster::{self as cluster, Cluster};
    ///
    /// fn main() -> Result<(), cluster::Error> {
    ///     Cluster::new(3000).respawn(true).serve(|_worker| {
    ///         Router::new().route("/", get(|| async { format!("Hello from worker {}!", cluster::worker_id()) }))
    ///     })
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// Those of [`init`](Cluster::init) and, in the master, of [`Master::wait`]; in a worker,
    /// those of [`serve`](crate::serve::serve) (the runtime or the listener cannot be set up).
    ///
    /// # Caveats
    ///
    /// `make_service` runs in every worker, inside its runtime, never in the master. Each worker
    /// runs a single-threaded runtime: the cluster already gives one process per core. For a
    /// multi-thread runtime or another server, use [`init`](Cluster::init) and the
    /// [`serve`](crate::serve) helpers yourself.
    pub fn serve<F, S, B>(self, make_service: F) -> Result<(), Error>
    where
        F: FnOnce(&Worker) -> S,
        S: tower_service::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<crate::worker::serve::BoxError>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<crate::worker::serve::BoxError>,
    {
        use crate::worker::serve::{ServeOptions, run_worker, serve};
        match self.init()? {
            Role::Master(master) => master.wait(),
            Role::Worker(worker) => {
                run_worker(&worker, |w| async move { serve(w, make_service(w), ServeOptions::default()).await })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn before_init_the_spec_values() {
        // The unit-test harness never calls init.
        assert!(!super::is_master());
        assert!(!super::is_worker());
        assert_eq!(super::port(), 0);
        assert_eq!(super::worker_id(), 0);
        assert_eq!(super::worker_count(), 0);
    }
}
