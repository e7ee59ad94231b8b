//! The worker side: the inherited listener, readiness, the channel to the master and the
//! "master is gone" notice.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use crate::channel::{self, MAX_LINE, ToMaster, ToWorker};
use crate::error::Error;
use crate::stats::{ClusterStats, WorkerStats};

/// The environment variables that tell a worker who it is (never argv, so programs that parse
/// their own arguments keep working).
pub(crate) mod env {
    pub const WORKER_ID: &str = "ECEWO_CLUSTER_WORKER_ID";
    pub const WORKERS: &str = "ECEWO_CLUSTER_WORKERS";
    pub const PORT: &str = "ECEWO_CLUSTER_PORT";
    pub const LISTEN_FD: &str = "ECEWO_CLUSTER_LISTEN_FD";
    pub const CHANNEL_FD: &str = "ECEWO_CLUSTER_CHANNEL_FD";
    pub const MASTER_PID: &str = "ECEWO_CLUSTER_MASTER_PID";
    pub const SHUTDOWN_TIMEOUT_MS: &str = "ECEWO_CLUSTER_SHUTDOWN_TIMEOUT_MS";
}

/// The fixed descriptor numbers a worker inherits.
pub(crate) const LISTEN_FD: i32 = 3;
pub(crate) const CHANNEL_FD: i32 = 4;

/// A worker's identity, parsed from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerEnv {
    pub id: usize,
    pub count: usize,
    pub port: u16,
    pub listen_fd: i32,
    pub channel_fd: i32,
    pub master_pid: u32,
    pub shutdown_timeout: Duration,
}

impl WorkerEnv {
    /// `Ok(None)` when this process is not a worker (no `ECEWO_CLUSTER_WORKER_ID`).
    pub(crate) fn from_env() -> Result<Option<WorkerEnv>, Error> {
        Self::parse(|k| std::env::var_os(k))
    }

    pub(crate) fn parse(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Option<WorkerEnv>, Error> {
        if get(env::WORKER_ID).is_none() {
            return Ok(None);
        }
        fn num<T: std::str::FromStr>(get: &impl Fn(&str) -> Option<std::ffi::OsString>, key: &str) -> Result<T, Error> {
            let v = get(key).ok_or_else(|| Error::BadInheritance { what: format!("{key} is not set") })?;
            v.to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::BadInheritance { what: format!("{key}={} is not a number", v.to_string_lossy()) })
        }
        Ok(Some(WorkerEnv {
            id: num(&get, env::WORKER_ID)?,
            count: num(&get, env::WORKERS)?,
            port: num(&get, env::PORT)?,
            listen_fd: num(&get, env::LISTEN_FD)?,
            channel_fd: num(&get, env::CHANNEL_FD)?,
            master_pid: num(&get, env::MASTER_PID)?,
            shutdown_timeout: Duration::from_millis(num(&get, env::SHUTDOWN_TIMEOUT_MS)?),
        }))
    }
}

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
        let listen = crate::sys::take_inherited_fd(env.listen_fd)
            .map_err(|e| bad(format!("its listening socket (fd {}) is missing: {e}", env.listen_fd)))?;
        let chan = crate::sys::take_inherited_fd(env.channel_fd)
            .map_err(|e| bad(format!("its channel (fd {}) is missing: {e}", env.channel_fd)))?;
        // The master cleared close-on-exec so that exec kept them; programs this worker runs
        // must not inherit them.
        for fd in [&listen, &chan] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)
                .map_err(|e| bad(format!("cannot set close-on-exec: {e}")))?;
        }
        let listener = crate::socket::check_inherited_listener(listen, env.listen_fd)?;
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
            .spawn(move || channel_reader(for_thread, reader))
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
        let line = channel::encode(msg);
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
        let result = self
            .send(&ToMaster::Stats { id })
            .and_then(|()| rx.recv_timeout(QUERY_TIMEOUT).map_err(|_| Error::MasterGone));
        self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        match result? {
            ToWorker::Stats { cluster, workers, .. } => Ok((cluster, workers)),
        }
    }
}

/// The channel thread: dispatches the master's replies and notices EOF. When the master is gone
/// nobody will kill a wedged drain any more, so after the shutdown timeout it ends the process.
fn channel_reader(inner: Arc<Inner>, stream: UnixStream) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // Longer than any message we expect: skip the rest of it, keep listening.
            tracing::warn!("skipping a message from the master longer than {MAX_LINE} bytes");
            let mut rest = Vec::new();
            if !matches!(reader.read_until(b'\n', &mut rest), Ok(n) if n > 0) {
                break;
            }
            continue;
        }
        match serde_json::from_slice::<ToWorker>(&line) {
            Ok(msg) => {
                let id = match &msg {
                    ToWorker::Stats { id, .. } => *id,
                };
                if let Some(tx) = inner.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    let _ = tx.try_send(msg);
                }
            }
            Err(e) => tracing::warn!("ignoring a malformed message from the master: {e}"),
        }
    }
    tracing::warn!(worker = inner.env.id, "the master is gone; draining and exiting");
    *inner.gone.lock().unwrap_or_else(|e| e.into_inner()) = true;
    inner.gone_cv.notify_all();
    #[cfg(feature = "tokio")]
    inner.gone_tx.send_replace(true);
    inner.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    std::thread::sleep(inner.env.shutdown_timeout);
    tracing::error!(
        worker = inner.env.id,
        "still running {:?} after the master went away; exiting",
        inner.env.shutdown_timeout
    );
    std::process::exit(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_worker_id_means_master() {
        assert_eq!(WorkerEnv::parse(env_of(&[])).unwrap(), None);
    }

    #[test]
    fn full_environment_parses() {
        let e = WorkerEnv::parse(env_of(&[
            (env::WORKER_ID, "2"),
            (env::WORKERS, "4"),
            (env::PORT, "3000"),
            (env::LISTEN_FD, "3"),
            (env::CHANNEL_FD, "4"),
            (env::MASTER_PID, "77"),
            (env::SHUTDOWN_TIMEOUT_MS, "1500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((e.id, e.count, e.port, e.master_pid), (2, 4, 3000, 77));
        assert_eq!(e.shutdown_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn partial_or_garbled_environment_is_a_clear_error() {
        let err = WorkerEnv::parse(env_of(&[(env::WORKER_ID, "1")])).unwrap_err();
        assert!(err.to_string().contains("ECEWO_CLUSTER_WORKERS is not set"), "{err}");
        let err = WorkerEnv::parse(env_of(&[(env::WORKER_ID, "x")])).unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
    }
}
