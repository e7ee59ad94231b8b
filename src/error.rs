//! The crate's error type.

use std::io;
use std::net::SocketAddr;

/// Everything that can go wrong in ecewo-cluster. Each message says what to do next.
///
/// Its `Debug` output is the same readable sentence as its `Display` output, so that
/// `fn main() -> Result<(), ecewo_cluster::Error>` prints `Error: cannot listen on …` rather
/// than a structure; match on the variants to act on an error.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option has a value the cluster cannot run with.
    #[error("invalid cluster option `{option}`: {reason}")]
    InvalidOption {
        /// The option's name, as its setter is named.
        option: &'static str,
        /// What is wrong and what to change.
        reason: String,
    },

    /// A listener added with [`Cluster::listen`](crate::Cluster::listen) cannot be served as
    /// given: two listeners of one name or one address, a name systemd's convention cannot
    /// carry, a backlog out of range, an address it cannot bind, a unix socket path that is
    /// unusable (its directory missing or another user's, a live server or another file
    /// there), a name systemd did not pass. Nothing was spawned; sockets already bound for
    /// other listeners are closed.
    #[error("listener {name:?}: {reason}")]
    BadListener {
        /// The listener's name.
        name: String,
        /// What is wrong and what to change.
        reason: String,
    },

    /// The command workers should run ([`Cluster::command`](crate::Cluster::command)) cannot be
    /// run: not found, not a file, or not executable. Nothing was started.
    #[error("cannot run {}: {reason}", command.display())]
    BadCommand {
        /// The command as given.
        command: std::path::PathBuf,
        /// Why, and what to do.
        reason: String,
    },

    /// The cluster has no listener: [`Cluster::no_default_listener`](crate::Cluster::no_default_listener)
    /// without any [`Cluster::listen`](crate::Cluster::listen).
    #[error("the cluster has no listener; add one with Cluster::listen, or keep the default one")]
    NoListener,

    /// The master could not bind a listening socket.
    #[error("cannot listen on {addr}: {source} (is another server using this port? choose another port, or stop it)")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// `init` was called twice in one process.
    #[error("Cluster::init was already called in this process; call it once, first thing in main")]
    AlreadyInitialized,

    /// The process looks like a worker (the cluster's environment variables are set) but what it
    /// inherited is not what a worker of this library inherits.
    #[error(
        "this process was started as a cluster worker, but {what}; workers must be started by their master (unset the ECEWO_CLUSTER_* variables to run it stand-alone)"
    )]
    BadInheritance {
        /// What is missing or wrong.
        what: String,
    },

    /// The worker's master is gone (it exited or was killed before this worker was set up).
    #[error("the master process is gone; this worker must exit")]
    MasterGone,

    /// An operation that only the master can do was asked of a worker.
    #[error("{operation} can only be called in the master (this process is a worker)")]
    NotMaster {
        /// The operation, as its function is named.
        operation: &'static str,
    },

    /// A blocking call was made on the master's own thread (from a callback or an `on_signal`
    /// action), where it would wait for the loop that is running it.
    #[error(
        "{operation} would block the master's own loop; call it from another thread, or use graceful_restart() in callbacks"
    )]
    OnMasterThread {
        /// The operation, as its function is named.
        operation: &'static str,
    },

    /// The master no longer supervises: [`Master::wait`](crate::Master::wait) has returned, or
    /// the [`Master`](crate::Master) was dropped without calling it.
    #[error("the master is no longer supervising (Master::wait returned or was never called); nothing will answer")]
    NotSupervising,

    /// Something did not happen in time.
    #[error("{operation} got no answer within {after:?}; the master may be overloaded or stuck")]
    Timeout {
        /// What was waited for.
        operation: &'static str,
        /// How long.
        after: std::time::Duration,
    },

    /// The cluster was not initialised in this process.
    #[error("the cluster is not initialised in this process; call Cluster::init first")]
    NotInitialized,

    /// Not a signal that can be sent to workers.
    #[error("{0} is not a valid signal number; use a named signal such as Signal::USR1")]
    InvalidSignal(i32),

    /// There is no worker slot with this id.
    #[error("there is no worker {0}; worker ids go from 0 to worker_count() - 1")]
    NoSuchWorker(usize),

    /// The worker's listener was already taken by an earlier call to [`Worker::listener`](crate::Worker::listener).
    #[error("the worker's listener was already taken; call Worker::listener() once and keep it")]
    ListenerTaken,

    /// [`Worker::take_listener`](crate::Worker::take_listener) was asked for a listener the
    /// master did not pass to this worker.
    #[error(
        "this worker has no listener named {name:?} (it has: {}); use one of these names, or add the listener to the cluster",
        names.join(", ")
    )]
    NoSuchListener {
        /// The name asked for.
        name: String,
        /// The names of the listeners this worker has.
        names: Vec<String>,
    },

    /// Every worker slot has stopped for good (all crashed and respawn is off, or all were
    /// disabled by crash protection). The process should exit non-zero so that its own supervisor
    /// (systemd, Kubernetes) can act.
    #[error(
        "no worker can run any more: all {workers} workers are gone ({disabled} disabled by crash protection, {crashed} crashed with respawn off); see the log for each worker's exit"
    )]
    WorkersFailed {
        /// Worker slots configured.
        workers: usize,
        /// Slots disabled by crash protection.
        disabled: usize,
        /// Slots whose worker crashed with respawn off.
        crashed: usize,
    },

    /// The control socket could not be set up.
    #[error("control socket {}: {reason}", path.display())]
    ControlSocket {
        /// Its path.
        path: std::path::PathBuf,
        /// What went wrong and what to do.
        reason: String,
    },

    /// Another master already serves this control socket: two clusters of the same name.
    #[error(
        "another cluster is already running with the control socket {} (stop it, or give this one another name or port)",
        path.display()
    )]
    AlreadyRunning {
        /// The socket's path.
        path: std::path::PathBuf,
    },

    /// A log file cannot be used: the captured output's (`CaptureOutput::to_file`) or the
    /// event log (`Cluster::event_log`: not a regular file, or it cannot be opened).
    #[error("log file {}: {reason}", path.display())]
    LogFile {
        /// Its path.
        path: std::path::PathBuf,
        /// What went wrong and what to do.
        reason: String,
    },

    /// A system call failed in a way the cluster cannot recover from.
    #[error("{context}: {source}")]
    Io {
        /// What the cluster was doing.
        context: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } | Error::Bind { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
