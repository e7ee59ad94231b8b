//! The worker side: the inherited listener, readiness, the channel to the master and the
//! "master is gone" notice; with the `tokio` feature, [`serve`] runs a server in the worker.

mod channel;
#[cfg(feature = "tokio")]
pub mod serve;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use crate::error::Error;
use crate::proto::channel::{self as messages, ToMaster, ToWorker};
use crate::proto::handoff::WorkerEnv;
use crate::stats::{ClusterStats, WorkerStats};

/// A handle to this worker process: its identity, its listener, readiness and the channel to
/// the master. Cheap to clone; every clone refers to the same worker.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.inner.env.id)
            .field("count", &self.inner.env.count)
            .field("port", &self.inner.env.port)
            .finish_non_exhaustive()
    }
}

struct Inner {
    env: WorkerEnv,
    listener: Mutex<Option<TcpListener>>,
    writer: Mutex<UnixStream>,
    ready_sent: AtomicBool,
    gone: Mutex<bool>,
    gone_cv: Condvar,
    #[cfg(feature = "tokio")]
    gone_tx: tokio::sync::watch::Sender<bool>,
    pending: Mutex<HashMap<u64, mpsc::SyncSender<ToWorker>>>,
    next_request: AtomicU64,
}

/// How long a worker waits for the master to answer a query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl Worker {
    pub(crate) fn from_env(env: WorkerEnv) -> Result<Worker, Error> {
        // The master may have died between fork and now; PR_SET_PDEATHSIG only covers later deaths.
        if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(env.master_pid) {
            return Err(Error::MasterGone);
        }
        let bad = |what: String| Error::BadInheritance { what };
        let listen = crate::os::sys::take_inherited_fd(env.listen_fd)
            .map_err(|e| bad(format!("its listening socket (fd {}) is missing: {e}", env.listen_fd)))?;
        let chan = crate::os::sys::take_inherited_fd(env.channel_fd)
            .map_err(|e| bad(format!("its channel (fd {}) is missing: {e}", env.channel_fd)))?;
        // The master cleared close-on-exec so that exec kept them; programs this worker runs
        // must not inherit them.
        for fd in [&listen, &chan] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)
                .map_err(|e| bad(format!("cannot set close-on-exec: {e}")))?;
        }
        let listener = crate::os::socket::check_inherited_listener(listen, env.listen_fd)?;
        let chan = UnixStream::from(chan);
        let reader = chan.try_clone().map_err(Error::io("cannot clone the worker channel"))?;
        set_process_name();
        #[cfg(feature = "tokio")]
        let (gone_tx, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            env,
            listener: Mutex::new(Some(listener)),
            writer: Mutex::new(chan),
            ready_sent: AtomicBool::new(false),
            gone: Mutex::new(false),
            gone_cv: Condvar::new(),
            #[cfg(feature = "tokio")]
            gone_tx,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        });
        let for_thread = inner.clone();
        std::thread::Builder::new()
            .name("ecewo-channel".into())
            .spawn(move || channel::channel_reader(for_thread, reader))
            .map_err(Error::io("cannot start the worker's channel thread"))?;
        Ok(Worker { inner })
    }

    /// This worker's id, from 0 to `count() - 1`.
    pub fn id(&self) -> usize {
        self.inner.env.id
    }

    /// The number of configured workers.
    pub fn count(&self) -> usize {
        self.inner.env.count
    }

    /// The port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.inner.env.port
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        self.inner.env.master_pid
    }

    /// The master's shutdown timeout: how long this worker may drain before it is killed.
    pub fn shutdown_timeout(&self) -> Duration {
        self.inner.env.shutdown_timeout
    }

    /// Takes the listening socket the master bound for this worker (blocking mode). It can be
    /// taken once; keep it for the life of the server. Workers never bind themselves: the master
    /// holds every socket, so connections queued on it survive a worker's exit.
    pub fn listener(&self) -> Result<TcpListener, Error> {
        self.inner.listener.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or(Error::ListenerTaken)
    }

    /// Tells the master this worker accepts connections. Until then it is `Starting`; the master
    /// announces the cluster ready when every worker is. Calling it again does nothing.
    pub fn ready(&self) -> Result<(), Error> {
        if self.inner.ready_sent.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.send(&ToMaster::Ready)
    }

    fn send(&self, msg: &ToMaster) -> Result<(), Error> {
        let line = messages::encode(msg);
        let mut w = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&line).map_err(|_| Error::MasterGone)
    }

    /// True once the master is gone (its channel reached EOF): the worker should drain and exit.
    pub fn is_master_gone(&self) -> bool {
        *self.inner.gone.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until the master is gone.
    pub fn wait_master_gone(&self) {
        let mut gone = self.inner.gone.lock().unwrap_or_else(|e| e.into_inner());
        while !*gone {
            gone = self.inner.gone_cv.wait(gone).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A receiver that turns `true` when the master is gone.
    #[cfg(feature = "tokio")]
    pub(crate) fn master_gone_receiver(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.gone_tx.subscribe()
    }

    /// Asks the master for the cluster's statistics and every worker's (blocks up to 5 s; from
    /// async code, call it through `spawn_blocking`).
    pub fn stats(&self) -> Result<(ClusterStats, Vec<WorkerStats>), Error> {
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let result = self.send(&ToMaster::Stats { id }).and_then(|()| {
            rx.recv_timeout(QUERY_TIMEOUT).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => Error::Timeout { operation: "stats", after: QUERY_TIMEOUT },
                // The channel thread dropped the sender: the master is gone.
                mpsc::RecvTimeoutError::Disconnected => Error::MasterGone,
            })
        });
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        match result? {
            ToWorker::Stats { cluster, workers, .. } => Ok((cluster, workers)),
        }
    }
}

/// Workers are executed through `/proc/self/exe`, which would make their `comm` (what `ps -o
/// comm`, `top` and `pkill` see) "exe"; give them the program's name back.
fn set_process_name() {
    let Some(argv0) = std::env::args_os().next() else { return };
    let Some(base) = std::path::Path::new(&argv0).file_name().map(OsStr::to_owned) else { return };
    let mut bytes = std::os::unix::ffi::OsStrExt::as_bytes(base.as_os_str()).to_vec();
    bytes.truncate(15);
    if let Ok(name) = std::ffi::CString::new(bytes) {
        let _ = rustix::thread::set_name(&name);
    }
}
