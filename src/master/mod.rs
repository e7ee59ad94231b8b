//! Drive: the master process. [`Master`] and [`MasterHandle`] are its public face; the driver
//! ([`driver`]) is one thread and one epoll loop over the signal pipe, a wake-up eventfd, the
//! children's pidfds and channels, the control socket and timers, each source registered once.
//! It carries out the [`Supervisor`]'s commands and decides nothing itself.
//!
//! | file | what it does |
//! | --- | --- |
//! | `driver.rs` | the loop: feeds events to the supervisor, executes its commands, waits in its epoll set |
//! | `spawn.rs` | starting a worker process (fork/exec with its descriptors and identity) |
//! | `report.rs` | the effects of reports: logs, callbacks, sd_notify, restart waiters |
//! | `control.rs` | the control socket server and its requests |
//! | `signals.rs` | the master's signal handling |
//! | `steer.rs` | connection steering of the `SO_REUSEPORT` group (classic BPF) |
//! | `notify.rs` | systemd's notification socket |
//! | `channel.rs` | the master's end of a worker channel |
//! | `events.rs` | where the event history's entries go: the handles' copy, the event log file |

mod admin;
pub(crate) mod capture;
mod channel;
mod control;
mod driver;
mod events;
mod notify;
mod report;
mod settings;
mod signals;
mod spawn;
mod steer;
mod upgrade;
mod worker_notify;

pub use capture::{CaptureFormat, CaptureOutput, DEFAULT_MAX_LINE, DEFAULT_REOPEN_SIGNAL};
pub(crate) use upgrade::{Inherited, inherited as inherited_upgrade};

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Instant, SystemTime};

use crate::error::Error;
use crate::events::ClusterEvent;
use crate::signal::Signal;
use crate::stats::{ClusterStats, RestartOutcome, UpgradeOutcome, WorkerStats};
use crate::supervisor::{Policy, Supervisor};
use control::ControlServer;
use driver::Driver;
use notify::Notifier;
pub(crate) use settings::ListenKind;
pub use settings::{
    Balance, Compat, Listen, ListenAddr, ListenerInfo, MemoryMeasure, ReadyInfo, WorkerExit, WorkerInfo,
};
pub(crate) use settings::{ControlSetting, DEFAULT_WORKER_TIMEOUT, Settings, WorkerCommand};
use settings::{OnEvent, OnExit, OnReady, OnSignal, OnStart, check_scale};
use signals::Signals;
use steer::Group;

/// What the master shares with [`MasterHandle`]s and the module-level functions.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) addr: SocketAddr,
    wake: OwnedFd,
    requests: Mutex<Vec<Request>>,
    snapshot: Mutex<Snapshot>,
    /// Callers blocked in `restart_and_wait`, by ticket.
    waiters: Mutex<HashMap<u64, mpsc::Sender<RestartOutcome>>>,
    /// Callers blocked in `upgrade_and_wait`, by ticket.
    upgrade_waiters: Mutex<HashMap<u64, mpsc::Sender<UpgradeOutcome>>>,
    next_ticket: AtomicU64,
    /// The thread running `wait()`: it must never block on itself.
    loop_thread: OnceLock<std::thread::ThreadId>,
    /// The master stopped supervising (`wait()` returned or unwound, or the `Master` was dropped
    /// without it): nobody will answer a restart any more.
    stopped: AtomicBool,
    /// The event history, as the loop last copied it.
    events: Mutex<events::EventMirror>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Shutdown,
    SignalWorkers(Signal),
    Restart(Option<u64>),
    Scale(usize),
    Upgrade(Option<u64>),
}

#[derive(Debug, Clone)]
struct Snapshot {
    cluster: ClusterStats,
    workers: Vec<WorkerStats>,
    taken: Instant,
}

impl Shared {
    pub(crate) fn workers(&self) -> usize {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).cluster.total_workers
    }

    /// `Err(NotSupervising)` once nobody would carry it out.
    pub(crate) fn graceful_restart(&self) -> Result<(), Error> {
        self.request(Request::Restart(None))
    }

    fn restart_and_wait(&self) -> Result<RestartOutcome, Error> {
        if self.loop_thread.get() == Some(&std::thread::current().id()) {
            return Err(Error::OnMasterThread { operation: "restart_and_wait" });
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            if self.stopped.load(Ordering::SeqCst) {
                return Err(Error::NotSupervising);
            }
            waiters.insert(ticket, tx);
        }
        self.request(Request::Restart(Some(ticket)))?;
        // The loop answers every ticket: with the outcome, or Cancelled at shutdown. If it is
        // gone (wait() returned or unwound, or the Master was dropped), the sender was dropped.
        rx.recv().map_err(|_| Error::NotSupervising)
    }

    fn upgrade_and_wait(&self) -> Result<UpgradeOutcome, Error> {
        if self.loop_thread.get() == Some(&std::thread::current().id()) {
            return Err(Error::OnMasterThread { operation: "upgrade_and_wait" });
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut waiters = self.upgrade_waiters.lock().unwrap_or_else(|e| e.into_inner());
            if self.stopped.load(Ordering::SeqCst) {
                return Err(Error::NotSupervising);
            }
            waiters.insert(ticket, tx);
        }
        self.request(Request::Upgrade(Some(ticket)))?;
        rx.recv().map_err(|_| Error::NotSupervising)
    }

    fn scale(&self, workers: usize) -> Result<(), Error> {
        check_scale(workers)?;
        self.request(Request::Scale(workers))
    }

    /// Hands `r` to the loop; refused once the master stopped supervising (nobody would take
    /// it, and the queue would only grow).
    fn request(&self, r: Request) -> Result<(), Error> {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopped.load(Ordering::SeqCst) {
            return Err(Error::NotSupervising);
        }
        requests.push(r);
        drop(requests);
        // Ignore EAGAIN: the counter is already non-zero and the loop will look.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        Ok(())
    }

    /// `Err(NotSupervising)` once nobody would carry it out.
    pub(crate) fn signal_workers(&self, signal: Signal) -> Result<(), Error> {
        self.request(Request::SignalWorkers(signal))
    }

    /// Refuses new restart waiters and wakes those still waiting (their senders are dropped):
    /// the loop that would answer them is gone.
    fn stop_supervising(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        self.stopped.store(true, Ordering::SeqCst);
        waiters.clear();
        self.upgrade_waiters.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub(crate) fn snapshot(&self) -> (ClusterStats, Vec<WorkerStats>) {
        let s = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let age = s.taken.elapsed();
        let (mut cluster, mut workers) = (s.cluster, s.workers);
        for w in workers.iter_mut().filter(|w| w.pid.is_some()) {
            w.uptime += age;
        }
        crate::os::procfs::add_usage(&mut cluster, &mut workers);
        (cluster, workers)
    }
}

/// A listener as the master holds it.
pub(crate) struct Bound {
    pub(crate) name: String,
    /// Where it listens, with the real port.
    pub(crate) addr: ListenAddr,
    pub(crate) balance: Balance,
    pub(crate) backlog: i32,
    pub(crate) v6only: bool,
    /// `ReusePort`: the socket of each slot (`None`: not bound yet, or closed); `Shared`: the
    /// one socket, at 0.
    pub(crate) fds: Vec<Option<OwnedFd>>,
    /// The kernel's array of the `ReusePort` group.
    pub(crate) group: Group,
    /// A unix socket file the master created: removed when the master is done (if still ours).
    pub(crate) file: Option<crate::os::socket::SocketFile>,
    /// systemd passed it (socket activation): it cannot be bound again.
    pub(crate) activated: bool,
}

impl Bound {
    fn info(&self) -> ListenerInfo {
        ListenerInfo { name: self.name.clone(), addr: self.addr.clone(), balance: self.balance }
    }
}

/// The master role: returned by [`Cluster::init`](crate::Cluster::init) in the first run of the program.
pub struct Master {
    shared: Arc<Shared>,
    policy: Policy,
    /// Every listener, in the order workers receive them.
    listeners: Vec<Bound>,
    signals: Signals,
    argv0: OsString,
    args: Vec<OsString>,
    /// The program file at its original path, executed again by a graceful restart (a deploy).
    exe_path: PathBuf,
    /// What an upgrade of the master executes: the path the first master was started from and
    /// its argv (`argv[0]` first), passed on from master to master.
    origin: (PathBuf, Vec<OsString>),
    /// systemd's notification socket, when run as a `Type=notify` service.
    notify: Option<Notifier>,
    name: String,
    control: Option<ControlServer>,
    /// The admin listener (probes and metrics), with its bound address.
    admin: Option<(admin::AdminServer, ListenAddr)>,
    /// A command cluster's command (`Cluster::command`), resolved, and its notification socket.
    command: Option<(spawn::CommandWorkers, worker_notify::WorkerNotify)>,
    started: SystemTime,
    on_start: Option<OnStart>,
    on_exit: Option<OnExit>,
    on_worker_ready: Option<OnStart>,
    on_ready: Option<OnReady>,
    on_signal: Vec<(Signal, OnSignal)>,
    /// The interval workers are told to beat at.
    heartbeat: std::time::Duration,
    /// What memory `max_memory` is compared with.
    memory_measure: MemoryMeasure,
    /// (A master started by an upgrade.) Its predecessor, its channel, and what it inherited.
    predecessor: Option<(upgrade::Predecessor, crate::supervisor::Inheritance)>,
    /// (A master started by an upgrade.) Inherited sockets no listener of this master uses:
    /// closed once the predecessor's workers are gone (`Command::ReleaseInherited`).
    leftovers: Vec<(OwnedFd, Option<crate::os::socket::SocketFile>)>,
    /// The workers' output, when captured (`Cluster::capture_output`).
    capture: Option<capture::Capture>,
    /// Entries the event history keeps; its log file and callback.
    event_history: usize,
    event_log: Option<events::EventLog>,
    on_event: Option<OnEvent>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("addr", &self.shared.addr)
            .field("workers", &self.policy.workers)
            .field("listeners", &self.listeners.iter().map(Bound::info).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A handle to the master, usable from any thread (`Clone + Send + Sync`).
#[derive(Debug, Clone)]
pub struct MasterHandle {
    shared: Arc<Shared>,
}

impl MasterHandle {
    /// Asks for a graceful shutdown, as SIGTERM does; [`Master::wait`] returns once every worker
    /// is gone. Asked a second time, the remaining workers are killed at once.
    pub fn shutdown(&self) {
        // Once the master stopped supervising there is nothing left to stop.
        let _ = self.shared.request(Request::Shutdown);
    }

    /// Sends `signal` to every active worker (the spec's `cluster_signal_workers`); see
    /// [`crate::signal_workers`].
    ///
    /// # Errors
    ///
    /// [`Error::NotSupervising`] once the master no longer supervises.
    pub fn signal_workers(&self, signal: Signal) -> Result<(), Error> {
        self.shared.signal_workers(signal)
    }

    /// Starts a zero-downtime rolling restart (the spec's `cluster_graceful_restart`, like
    /// `SIGUSR2`) and returns at once; see [`Master::wait`] for how it runs. A restart asked for
    /// while one runs is queued: exactly one more rollout follows the current one, however many
    /// times it was asked for.
    pub fn graceful_restart(&self) {
        // Once the master stopped supervising there is nothing to restart.
        let _ = self.shared.graceful_restart();
    }

    /// Like [`graceful_restart`](MasterHandle::graceful_restart), and blocks until the rollout
    /// that serves this request has ended, returning how (a failed rollout is an `Ok` outcome:
    /// [`RestartOutcome::Failed`]).
    ///
    /// # Errors
    ///
    /// - [`Error::OnMasterThread`] when called on the master's own thread (from a callback or an
    ///   `on_signal` action), where it would wait for itself; use
    ///   [`graceful_restart`](MasterHandle::graceful_restart) there.
    /// - [`Error::NotSupervising`] when the master is not supervising any more, or stops before
    ///   the rollout ends: [`Master::wait`] returned or unwound, or the [`Master`] was dropped.
    ///
    /// # Caveats
    ///
    /// It blocks for as long as the rollout takes (each slot up to the ready timeout); it does
    /// not return early if the [`Master`] is kept alive without [`Master::wait`] being called.
    pub fn restart_and_wait(&self) -> Result<RestartOutcome, Error> {
        self.shared.restart_and_wait()
    }

    /// Upgrades the master in place (like `SIGUSR1` and `ecewo-cluster upgrade`) and returns at
    /// once: the program found at the original path starts as a new master, inherits every
    /// listening socket (never bound again) and the counters, starts its workers with its own
    /// options, and takes over once they are ready; this master then drains its workers and
    /// [`Master::wait`] returns `Ok(())`. A new master that exits or is not ready within the
    /// upgrade timeout ([`Cluster::upgrade_timeout`](crate::Cluster::upgrade_timeout)) is
    /// killed, and this one serves on. Refused while another upgrade, a rolling restart or a
    /// shutdown runs, and when the master is PID 1 (a container would end with it). See the
    /// README's "Upgrading the master in place".
    pub fn upgrade(&self) {
        // Once the master stopped supervising there is nothing to upgrade.
        let _ = self.shared.request(Request::Upgrade(None));
    }

    /// Like [`upgrade`](MasterHandle::upgrade), and blocks until the upgrade ended (the new
    /// master took over, or it failed and this master serves on), returning how. A failed or
    /// refused upgrade is an `Ok` outcome.
    ///
    /// # Errors
    ///
    /// [`Error::OnMasterThread`] on the master's own thread (from a callback), where it would
    /// wait for itself; [`Error::NotSupervising`] when the master is not supervising (any more).
    pub fn upgrade_and_wait(&self) -> Result<UpgradeOutcome, Error> {
        self.shared.upgrade_and_wait()
    }

    /// Changes the number of workers: new slots start like initial ones, removed slots (the
    /// highest ids) drain and stop. `SIGTTIN`/`SIGTTOU` add or remove one.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] for 0 or more than [`MAX_WORKERS`](crate::MAX_WORKERS).
    pub fn scale(&self, workers: usize) -> Result<(), Error> {
        self.shared.scale(workers)
    }

    /// The cluster's statistics (the spec's `cluster_get_stats`).
    pub fn stats(&self) -> ClusterStats {
        self.shared.snapshot().0
    }

    /// Every worker slot's statistics (the spec's `cluster_get_all_workers`).
    pub fn workers(&self) -> Vec<WorkerStats> {
        self.shared.snapshot().1
    }

    /// One worker slot's statistics (the spec's `cluster_get_worker_stats`); `None` for a slot
    /// that does not exist.
    pub fn worker(&self, worker_id: usize) -> Option<WorkerStats> {
        self.shared.snapshot().1.into_iter().find(|w| w.worker_id == worker_id)
    }

    /// The address of the cluster's first TCP listener, with the real port (port 0 when it has
    /// none); [`Master::listeners`] lists them all.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The event history the master keeps ([`Cluster::event_history`](crate::Cluster::event_history)),
    /// oldest first: the entries after sequence number `since`, or all with `None`. To see each
    /// entry as it happens use [`Cluster::on_event`](crate::Cluster::on_event) (on the master
    /// thread) or the control socket's `events` with `follow` (`ecewo-cluster events -f`).
    ///
    /// ```no_run
    /// # fn f(handle: ecewo_cluster::MasterHandle) {
    /// for e in handle.events(None) {
    ///     println!("{e}"); // 2026-12-02T00:12:03.123Z  #42  worker 3 pid 1234  exited: crash (killed by SIGKILL)
    /// }
    /// # }
    /// ```
    pub fn events(&self, since: Option<u64>) -> Vec<ClusterEvent> {
        let shared = self.shared.events.lock().unwrap_or_else(|e| e.into_inner()).since(since);
        events::owned(shared)
    }
}

impl Master {
    /// The master of `opts`; with `inherited`, the new master of an upgrade, which takes over
    /// its predecessor's sockets (a failure is told to the predecessor, which reports it).
    pub(crate) fn new(opts: Settings, inherited: Option<Inherited>) -> Result<Master, Error> {
        let channel = inherited.as_ref().and_then(|i| i.channel.try_clone().ok());
        Master::build(opts, inherited).inspect_err(|e| {
            if let Some(c) = &channel {
                upgrade::say_failed(c, e);
            }
        })
    }

    fn build(mut opts: Settings, mut inherited: Option<Inherited>) -> Result<Master, Error> {
        let workers = opts.worker_count();
        if opts.cpus == 0 {
            let detected = crate::os::cpu::cpus_detailed();
            tracing::info!("{} CPUs detected ({:?}): starting one worker per CPU", detected.count, detected.source);
        }
        crate::os::fds::raise_fd_limit();
        // Every listener is bound here, before any worker exists: a bad address fails init.
        let mut passed = crate::os::socket::activated_sockets()?;
        let all = opts.all_listeners();
        // The default listener of `Cluster::new(port)` under socket activation: the passed
        // socket named "default", or else the first one no `Listen::systemd` listener names.
        let claimed: Vec<&str> =
            all.iter().filter(|(_, l)| l.kind == ListenKind::Systemd).map(|(n, _)| n.as_str()).collect();
        let default_takes = (opts.default_listener && !passed.is_empty())
            .then(|| {
                passed
                    .iter()
                    .position(|p| p.name == crate::proto::handoff::DEFAULT_LISTENER)
                    .or_else(|| passed.iter().position(|p| !claimed.contains(&p.name.as_str())))
            })
            .flatten();
        if opts.default_listener && !passed.is_empty() && default_takes.is_none() {
            // Under socket activation the default listener is a passed socket; binding its
            // own port beside them would expose one nobody asked for.
            return Err(Error::BadListener {
                name: crate::proto::handoff::DEFAULT_LISTENER.to_owned(),
                reason: format!(
                    "systemd passed sockets, and named listeners take every one; Cluster::new({})'s own listener would bind its port beside them: call no_default_listener(), or pass it a socket named \"default\"",
                    opts.port
                ),
            });
        }
        let mut activated = default_takes.map(|i| passed.remove(i));
        let mut listeners = Vec::new();
        for (i, (name, listen)) in all.into_iter().enumerate() {
            let backlog = listen.backlog.min(i32::MAX as u32) as i32;
            // The new master of an upgrade: the same socket, never bound again (that would join
            // or split a SO_REUSEPORT group, or fail on an address in use).
            if let Some(inh) = inherited.as_mut()
                && let Some(b) = upgrade::reuse_listener(inh, &name, &listen)?
            {
                listeners.push(b);
                continue;
            }
            let refused =
                |e: crate::os::socket::UnixBindError| Error::BadListener { name: name.clone(), reason: e.to_string() };
            let (balance, fds, addr, v6only, file, from_systemd) = match listen.kind {
                // systemd socket activation: the default listener is a socket systemd passed,
                // shared by every worker.
                ListenKind::Tcp { .. } if i == 0 && opts.default_listener && activated.is_some() => {
                    let p = activated.take().ok_or(Error::NoListener)?;
                    if listen.balance != Balance::Shared {
                        tracing::info!("socket activation: the workers share the socket systemd passed");
                    }
                    (Balance::Shared, vec![p.fd], passed_addr(p.addr), false, None, true)
                }
                ListenKind::Systemd => {
                    let Some(at) = passed.iter().position(|p| p.name == name) else {
                        let names: Vec<&str> = passed.iter().map(|p| p.name.as_str()).collect();
                        let reason = if names.is_empty() {
                            "systemd passed no socket (LISTEN_FDS is unset or for another process); run it from a .socket unit or systemd-socket-activate, or listen on an address".to_owned()
                        } else {
                            format!(
                                "systemd passed no socket of this name (it passed: {}); set FileDescriptorName= in the .socket unit, or rename the listener",
                                names.join(", ")
                            )
                        };
                        return Err(Error::BadListener { name, reason });
                    };
                    let p = passed.remove(at);
                    (Balance::Shared, vec![p.fd], passed_addr(p.addr), false, None, true)
                }
                // With `ReusePort`, slot 0's socket only: slot i's is bound when its worker is
                // first spawned, so that no connection ever waits on the socket of a worker
                // that does not exist yet (`listeners_for`).
                ListenKind::Tcp { addr, v6only } => {
                    let per_slot = listen.balance == Balance::ReusePort;
                    let (fds, real) = crate::os::socket::bind_listeners(addr, per_slot, 1, listen.backlog, v6only)
                        .map_err(|e| match e {
                            // A named listener's bind error names it (the default one's stays
                            // `Error::Bind`, as before listeners had names).
                            Error::Bind { .. } if !(i == 0 && opts.default_listener) => {
                                Error::BadListener { name: name.clone(), reason: e.to_string() }
                            }
                            e => e,
                        })?;
                    (listen.balance, fds, ListenAddr::Tcp(real), v6only, None, false)
                }
                ListenKind::Unix { path } => {
                    let (fd, file) =
                        crate::os::socket::bind_unix_path(&path, listen.backlog, listen.mode, listen.owner)
                            .map_err(refused)?;
                    (Balance::Shared, vec![fd], ListenAddr::Unix(path), false, Some(file), false)
                }
                ListenKind::Abstract { name: abstract_name } => {
                    let fd = crate::os::socket::bind_unix_abstract(&abstract_name, listen.backlog).map_err(refused)?;
                    (Balance::Shared, vec![fd], ListenAddr::Abstract(abstract_name), false, None, false)
                }
            };
            let mut group = Group::default();
            if balance == Balance::ReusePort {
                // The sockets join their group in slot order, as they are bound.
                for slot in 0..fds.len() {
                    group.join(slot);
                }
            }
            listeners.push(Bound {
                name,
                addr,
                balance,
                backlog,
                v6only,
                fds: fds.into_iter().map(Some).collect(),
                group,
                file,
                activated: from_systemd,
            });
        }
        if listeners.is_empty() {
            return Err(Error::NoListener);
        }
        for p in passed {
            tracing::warn!("socket activation passed a socket named {:?} that no listener serves; closing it", p.name);
        }
        // The first TCP listener's address (port 0 when there is none).
        let addr = listeners
            .iter()
            .find_map(|b| match &b.addr {
                ListenAddr::Tcp(a) => Some(*a),
                _ => None,
            })
            .unwrap_or_else(|| SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0));
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
                .map_err(|e| Error::Io { context: "cannot create the master's wake-up eventfd", source: e.into() })?;
        let policy = Policy {
            workers,
            port: addr.port(),
            respawn: opts.respawn,
            shutdown_timeout: opts.shutdown_timeout,
            startup_delay: opts.worker_startup_delay,
            respawn_delay: opts.worker_respawn_delay,
            respawn_window: opts.respawn_window,
            max_crashes: opts.respawn_max_crashes,
            socket_per_slot: listeners.iter().any(|b| b.balance == Balance::ReusePort),
            ready_timeout: opts.ready_timeout,
            max_surge: opts.max_surge,
            bound_signals: opts.on_signal.iter().map(|(s, _)| *s).collect(),
            liveness: crate::supervisor::Liveness { seed: random_seed(), ..opts.liveness.clone() },
            shutdown_delay: opts.shutdown_delay,
            min_ready: opts.min_ready,
            upgrade_timeout: opts.upgrade_timeout.unwrap_or_else(|| default_upgrade_timeout(&opts, workers)),
            pid1: rustix::process::getpid().as_raw_nonzero().get() == 1,
            upgrade_slot_by_slot: opts.upgrade_slot_by_slot,
        };
        let sup = Supervisor::new(policy.clone(), Instant::now());
        let shared = Arc::new(Shared {
            addr,
            wake,
            waiters: Mutex::new(HashMap::new()),
            upgrade_waiters: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(1),
            loop_thread: OnceLock::new(),
            stopped: AtomicBool::new(false),
            events: Mutex::new(events::EventMirror::new(opts.event_history)),
            requests: Mutex::new(Vec::new()),
            snapshot: Mutex::new(Snapshot {
                cluster: ClusterStats { listeners: listener_stats(&listeners), ..sup.cluster_stats() },
                workers: sup.worker_stats(Instant::now()),
                taken: Instant::now(),
            }),
        });
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| OsString::from("ecewo-cluster"));
        let args: Vec<OsString> = args.collect();
        let exe_path = spawn::program_path(&argv0);
        let origin =
            inherited.as_mut().and_then(|i| i.state.origin.take()).map(upgrade::decode_origin).unwrap_or_else(|| {
                (exe_path.clone(), std::iter::once(argv0.clone()).chain(args.iter().cloned()).collect())
            });
        // A command cluster is known by its command's name; a program by the file at its
        // original path (a new master of an upgrade keeps its predecessor's name).
        let command = opts.command.as_ref().map(spawn::CommandWorkers::resolve).transpose()?;
        let name = opts.name.clone().unwrap_or_else(|| {
            let named = command.as_ref().map_or(origin.0.as_path(), |c| c.path.as_path());
            named.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "cluster".into())
        });
        let mut leftovers = Vec::new();
        let inherited_control = inherited.as_mut().and_then(|i| {
            let c = i.state.control.take()?;
            Some((i.take(c.fd)?, c))
        });
        let control_path = match &opts.control {
            ControlSetting::Off => None,
            ControlSetting::Path(p) => Some(p.clone()),
            ControlSetting::Default => Some(crate::proto::control::socket_path(&format!("{name}-{}", addr.port()))),
        };
        let adopted = match inherited_control {
            // The same control socket: `ecewo-cluster` finds this master by the same name.
            Some((fd, c)) if control_path.as_ref() == Some(&c.path) => {
                let mut server = ControlServer::adopt(fd, c.path, c.file)?;
                // The predecessor's until the take-over: a new master stopped before (a
                // rollback) must not remove the file its predecessor still serves on.
                server.hand_over();
                Some(server)
            }
            Some((fd, c)) => {
                let file = crate::os::socket::SocketFile::adopt(c.path, c.file);
                leftovers.push((fd, Some(upgrade::not_yet_ours(file))));
                None
            }
            None => None,
        };
        let control = match &opts.control {
            _ if adopted.is_some() => adopted,
            ControlSetting::Off => None,
            ControlSetting::Path(p) => Some(ControlServer::bind(p, false)?),
            ControlSetting::Default => {
                let path = crate::proto::control::socket_path(&format!("{name}-{}", addr.port()));
                match ControlServer::bind(&path, true) {
                    Ok(server) => Some(server),
                    // Two clusters of one name must not run: that stays an error.
                    Err(e @ Error::AlreadyRunning { .. }) => return Err(e),
                    // The default socket is a convenience: a read-only or foreign temporary
                    // directory must not keep the cluster from serving.
                    Err(e) => {
                        tracing::warn!("{e}; running without a control socket (set one with Cluster::control_socket)");
                        None
                    }
                }
            }
        };
        if let Some(c) = &control {
            tracing::info!("control socket: {}", c.path().display());
        }
        let command = match command {
            None => None,
            Some(c) => {
                let pid = rustix::process::getpid().as_raw_nonzero();
                let path = crate::proto::control::socket_dir().join(format!("{name}-{}-{pid}.notify", addr.port()));
                let notify = worker_notify::WorkerNotify::bind(&path)?;
                tracing::info!("workers run {} (notifications at {})", c.describe(), notify.path().display());
                Some((c, notify))
            }
        };
        let inherited_admin = inherited.as_mut().and_then(|i| {
            let a = i.state.admin.take()?;
            Some((i.take(a.fd)?, a))
        });
        let mut adopted_admin = None;
        if let Some((fd, a)) = inherited_admin {
            match upgrade::reuse_admin(fd, a, opts.admin.as_ref())? {
                Ok(server) => adopted_admin = Some(server),
                Err(leftover) => leftovers.push(leftover),
            }
        }
        let admin = match &opts.admin {
            _ if adopted_admin.is_some() => adopted_admin,
            None => None,
            Some(at) => {
                let addr = match at {
                    ListenAddr::Tcp(a) => admin::AdminAddr::Tcp(*a),
                    ListenAddr::Unix(p) => admin::AdminAddr::Unix(p.clone()),
                    ListenAddr::Abstract(n) => {
                        return Err(Error::InvalidOption {
                            option: "admin",
                            reason: format!("@{n}: use a TCP address or a unix socket path"),
                        });
                    }
                };
                let server = admin::AdminServer::bind(&addr)?;
                let bound = match &addr {
                    admin::AdminAddr::Unix(p) => ListenAddr::Unix(p.clone()),
                    admin::AdminAddr::Tcp(a) => server.local_addr().parse().unwrap_or(ListenAddr::Tcp(*a)),
                };
                tracing::info!("admin listener on {bound}: /livez /readyz /startupz /metrics");
                Some((server, bound))
            }
        };
        let bound: Vec<Signal> = opts.on_signal.iter().map(|(s, _)| *s).collect();
        let capture = opts.capture.take().map(|c| capture::Capture::open(c, &bound)).transpose()?;
        let event_log = match &opts.event_log {
            None => None,
            Some(path) => Some(
                events::EventLog::open(path)
                    .map_err(|e| Error::LogFile { path: path.clone(), reason: e.to_string() })?,
            ),
        };
        if let Some(log) = &event_log {
            tracing::info!("event log: {}", log.path().display());
        }
        // Last, so that an error above leaves the process's signals as they were.
        let mut extra = bound;
        extra.extend(capture.as_ref().and_then(capture::Capture::reopen_signal));
        if rustix::process::getpid().as_raw_nonzero().get() == 1 {
            // PID 1 of a container: orphans of the whole container are re-parented to us and
            // must be reaped, or they stay zombies. A handler (never SIG_IGN, which would reap
            // our workers behind the pidfds' back) tells us when.
            extra.push(Signal::CHLD);
        }
        let signals = Signals::register(&extra).map_err(Error::io("cannot install the master's signal handlers"))?;
        let predecessor = match inherited {
            None => None,
            Some(mut i) => {
                // Inherited sockets no listener took: closed once the old workers are gone.
                leftovers.extend(upgrade::unclaimed(&mut i));
                let inheritance = crate::supervisor::Inheritance {
                    generation: i.state.generation,
                    total_restarts: i.state.total_restarts,
                    exits: i.state.exits,
                    shutdown_timeout: std::time::Duration::from_millis(i.state.shutdown_timeout_ms),
                    slot_by_slot: i.state.slot_by_slot,
                };
                tracing::info!(
                    "upgrade: master generation {} takes over from pid {} once its workers are ready",
                    inheritance.generation + 1,
                    i.from_pid
                );
                let p = upgrade::Predecessor::new(i).map_err(Error::io("cannot use the upgrade channel"))?;
                Some((p, inheritance))
            }
        };
        Ok(Master {
            predecessor,
            leftovers,
            capture,
            notify: Notifier::from_env(),
            exe_path,
            origin,
            name,
            control,
            admin,
            command,
            started: SystemTime::now(),
            shared,
            policy,
            listeners,
            signals,
            argv0,
            args,
            on_start: opts.on_start.take(),
            on_exit: opts.on_exit.take(),
            on_worker_ready: opts.on_worker_ready.take(),
            on_ready: opts.on_ready.take(),
            on_signal: std::mem::take(&mut opts.on_signal),
            heartbeat: opts.heartbeat_interval(),
            memory_measure: opts.memory_measure,
            event_history: opts.event_history,
            event_log,
            on_event: opts.on_event.take(),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// A handle for other threads.
    pub fn handle(&self) -> MasterHandle {
        MasterHandle { shared: self.shared.clone() }
    }

    /// The address of the cluster's first TCP listener, with the real port (also for port 0;
    /// port 0 when it has no TCP listener). [`Master::listeners`] lists them all.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Every listener as bound (the real port for port 0), in the order workers receive them.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.listeners.iter().map(Bound::info).collect()
    }

    /// The admin listener's address as bound (the real port for port 0), if
    /// [`Cluster::admin`](crate::Cluster::admin) set one.
    pub fn admin_addr(&self) -> Option<ListenAddr> {
        self.admin.as_ref().map(|(_, addr)| addr.clone())
    }

    /// The number of worker slots.
    pub fn worker_count(&self) -> usize {
        self.policy.workers
    }

    /// Sends `signal` to every active worker once the loop runs; see [`crate::signal_workers`].
    pub fn signal_workers(&self, signal: Signal) {
        // The master is alive (borrowed), so it will supervise: this cannot be refused.
        let _ = self.shared.signal_workers(signal);
    }

    /// Asks for a rolling restart once the loop runs; see [`MasterHandle::graceful_restart`].
    pub fn graceful_restart(&self) {
        // Once the master stopped supervising there is nothing to restart.
        let _ = self.shared.graceful_restart();
    }

    /// The cluster's statistics (the spec's `cluster_get_stats`).
    pub fn stats(&self) -> ClusterStats {
        self.shared.snapshot().0
    }

    /// Every worker slot's statistics (the spec's `cluster_get_all_workers`).
    pub fn workers(&self) -> Vec<WorkerStats> {
        self.shared.snapshot().1
    }

    /// Starts the workers and supervises them until the cluster stops: the spec's
    /// `cluster_wait_workers`. Call it on the main thread (a worker's parent-death signal is tied
    /// to the thread that started it).
    ///
    /// It returns `Ok(())` after a requested shutdown (SIGTERM, SIGINT, SIGHUP, SIGQUIT,
    /// [`MasterHandle::shutdown`]) once every worker is gone, or when every worker exited cleanly
    /// on its own with respawn off.
    ///
    /// # Errors
    ///
    /// - [`Error::WorkersFailed`] when no worker can run any more (all crashed with respawn off,
    ///   or all disabled by crash protection): exit non-zero then, so that systemd or Kubernetes
    ///   can act.
    /// - [`Error::Io`] if the loop itself fails (its epoll set cannot be created, or waiting in
    ///   it or registering the master's own descriptors fails); every worker is killed and
    ///   reaped before it returns.
    ///
    /// # Caveats
    ///
    /// - Call it on the thread that called [`Cluster::init`](crate::Cluster::init), normally the main thread: each
    ///   worker's parent-death signal is tied to the thread that started it, so workers started by
    ///   a thread that then exits receive `SIGTERM`.
    /// - Do not reap children elsewhere in the program (`waitpid(-1)`, `SIGCHLD` set to
    ///   `SIG_IGN`): the master reaps its workers through their pidfds, and a worker reaped
    ///   behind its back counts as a crash of unknown cause.
    /// - If it unwinds (a panic in the loop), every worker is killed and reaped on the way, and
    ///   callers blocked in [`MasterHandle::restart_and_wait`] get [`Error::NotSupervising`].
    pub fn wait(self) -> Result<(), Error> {
        let _ = self.shared.loop_thread.set(std::thread::current().id());
        // (`self` becomes the driver's below.)
        let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        let mut sup = Supervisor::new(self.policy.clone(), Instant::now())
            .with_open_sockets(open_slots(&self.listeners))
            .with_event_history(self.event_history, pid);
        let mut master = self;
        let predecessor = master.predecessor.take().map(|(p, inheritance)| {
            sup = sup.clone().inherit(inheritance);
            p
        });
        let owns_outside = predecessor.is_none();
        let watch = driver::Watch::new().map_err(Error::io("cannot create the master's epoll set"))?;
        let mut driver = Driver {
            watch,
            sup,
            successor: None,
            predecessor,
            steering_handed_over: false,
            owns_outside,
            procs: HashMap::new(),
            programs: HashMap::new(),
            control_waiters: HashMap::new(),
            upgrade_waiters: HashMap::new(),
            route: Vec::new(),
            steering_failed: false,
            master_pid: rustix::process::getpid(),
            outcome: None,
            published: None,
            listeners_read: None,
            m: master,
        };
        // On every way out (an error, a panic) the driver's Drop kills and reaps what is left,
        // and the Master's Drop wakes whoever still waits for a restart.
        driver.run()
    }
}

/// The default upgrade timeout: the ready timeout, plus the pacing of `workers` initial spawns,
/// plus 10 s for the new master's own start.
fn default_upgrade_timeout(opts: &Settings, workers: usize) -> std::time::Duration {
    let pacing = opts.worker_startup_delay.saturating_mul(u32::try_from(workers.saturating_sub(1)).unwrap_or(u32::MAX));
    opts.ready_timeout.saturating_add(pacing).saturating_add(std::time::Duration::from_secs(10))
}

/// The listeners' statistics, with the accept-queue length of the TCP ones (one `TCP_INFO`
/// per socket the master holds).
pub(crate) fn listener_stats(listeners: &[Bound]) -> Vec<crate::stats::ListenerStats> {
    listener_stats_with(listeners, &accept_queues(listeners))
}

/// Each listener's connections waiting in its sockets' accept queues (`None`: not TCP, or
/// unreadable): one `TCP_INFO` per open socket, so N system calls for a `ReusePort` listener.
pub(crate) fn accept_queues(listeners: &[Bound]) -> Vec<Option<u64>> {
    use std::os::fd::AsFd;
    listeners
        .iter()
        .map(|b| match b.addr {
            ListenAddr::Tcp(_) => b
                .fds
                .iter()
                .flatten()
                .map(|fd| crate::os::sys::tcp_accept_queue(fd.as_fd()).map(u64::from))
                .sum::<std::io::Result<u64>>()
                .ok(),
            _ => None,
        })
        .collect()
}

/// The listeners' figures, with the accept queues read earlier by [`accept_queues`] (one per
/// listener, in order; missing ones read as unknown).
pub(crate) fn listener_stats_with(listeners: &[Bound], queues: &[Option<u64>]) -> Vec<crate::stats::ListenerStats> {
    listeners
        .iter()
        .enumerate()
        .map(|(i, b)| crate::stats::ListenerStats {
            name: b.name.clone(),
            address: b.addr.to_string(),
            kind: b.addr.kind().to_owned(),
            balance: b.balance.to_string(),
            sockets: b.fds.iter().flatten().count(),
            queued: queues.get(i).copied().flatten(),
        })
        .collect()
}

/// A passed socket's address as a listener's.
fn passed_addr(addr: crate::os::socket::PassedAddr) -> ListenAddr {
    use crate::os::socket::PassedAddr;
    match addr {
        PassedAddr::Tcp(a) => ListenAddr::Tcp(a),
        PassedAddr::Unix(p) => ListenAddr::Unix(p),
        PassedAddr::Abstract(n) => ListenAddr::Abstract(n),
        PassedAddr::Unnamed => ListenAddr::Unix(PathBuf::new()),
    }
}

/// The slots whose `ReusePort` sockets are open.
fn open_slots(listeners: &[Bound]) -> Vec<usize> {
    let mut slots: Vec<usize> = listeners
        .iter()
        .filter(|b| b.balance == Balance::ReusePort)
        .flat_map(|b| (0..b.fds.len()).filter(|&i| b.fds[i].is_some()))
        .collect();
    slots.sort_unstable();
    slots.dedup();
    slots
}

impl Drop for Master {
    fn drop(&mut self) {
        self.shared.stop_supervising();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use super::*;

    fn master() -> Master {
        let opts = crate::Cluster::new(0).address(IpAddr::V4(Ipv4Addr::LOCALHOST)).cpus(1).no_control_socket();
        Master::new(opts.into_settings(), None).expect("a master on a free loopback port")
    }

    /// Every TCP listener has its own balance; unix sockets are shared; the supervisor's open
    /// sockets are slot 0's of the `ReusePort` ones.
    #[test]
    fn each_listener_keeps_its_own_balance() {
        let loopback = |port| std::net::SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-balance-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let opts = crate::Cluster::new(0)
            .address(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .cpus(2)
            .no_control_socket()
            .listen("shared", crate::Listen::tcp(loopback(0)).balance(Balance::Shared).backlog(7))
            .listen("sock", crate::Listen::unix(dir.join("s.sock")));
        let master = Master::new(opts.into_settings(), None).expect("a master on loopback");
        let balances: Vec<(String, Balance)> = master.listeners().into_iter().map(|l| (l.name, l.balance)).collect();
        assert_eq!(
            balances,
            vec![
                ("default".to_owned(), Balance::ReusePort),
                ("shared".to_owned(), Balance::Shared),
                ("sock".to_owned(), Balance::Shared)
            ]
        );
        assert!(master.policy.socket_per_slot, "one listener uses ReusePort");
        assert_eq!(open_slots(&master.listeners), vec![0]);
        let stats = listener_stats(&master.listeners);
        assert_eq!(stats.iter().map(|l| l.sockets).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert_eq!(stats[1].queued, Some(0));
        assert_eq!(stats[2].queued, None);
        drop(master);
        assert!(!dir.join("s.sock").exists(), "the master removed its socket file");
        std::fs::remove_dir(&dir).unwrap();
    }

    /// A caller blocked in `restart_and_wait` must not wait for ever when the `Master` goes
    /// away without supervising (dropped without `wait()`, or `wait()` unwinding drops it).
    #[test]
    fn restart_waiters_are_answered_when_the_master_is_dropped() {
        let master = master();
        let handle = master.handle();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || tx.send(handle.restart_and_wait()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while master.shared.waiters.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the waiter never registered");
            std::thread::yield_now();
        }
        drop(master);
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Err(Error::NotSupervising)) => {}
            Ok(other) => panic!("expected NotSupervising, got {other:?}"),
            Err(_) => panic!("restart_and_wait still blocks after the Master was dropped"),
        }
        waiter.join().unwrap().unwrap();
        // And a later call fails at once.
        let handle = master_handle_after_drop();
        assert!(matches!(handle.restart_and_wait(), Err(Error::NotSupervising)));
        assert!(matches!(handle.signal_workers(Signal::USR1), Err(Error::NotSupervising)));
    }

    fn master_handle_after_drop() -> MasterHandle {
        let master = master();
        let handle = master.handle();
        drop(master);
        handle
    }
}

#[cfg(test)]
mod signal_tests {
    use std::io::{BufRead, BufReader};
    use std::net::{IpAddr, Ipv4Addr};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use super::*;

    const CHILD: &str = "ECEWO_CLUSTER_TEST_SIGNAL_CHILD";

    /// In a child process (this test binary, run again for the test below): a master is made and
    /// dropped, then the process waits. A `SIGTERM` must then end it as by default, not be
    /// swallowed by the dropped master's handlers.
    #[test]
    fn child_drops_a_master_then_waits() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let opts = crate::Cluster::new(0).address(IpAddr::V4(Ipv4Addr::LOCALHOST)).cpus(1).no_control_socket();
        drop(Master::new(opts.into_settings(), None).unwrap());
        println!("dropped");
        std::thread::sleep(Duration::from_secs(10));
    }

    #[test]
    fn after_the_master_is_dropped_sigterm_acts_by_default_again() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "master::signal_tests::child_drops_a_master_then_waits",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = rustix::process::Pid::from_child(&child);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let dropped = lines.any(|l| l.is_ok_and(|l| l.contains("dropped")));
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let status = child.wait().unwrap();
        assert!(dropped, "the child never dropped its master");
        assert_eq!(status.signal(), Some(libc::SIGTERM), "SIGTERM was swallowed: {status:?}");
    }
}

/// A seed for the supervisor's jitter, different in every master (no dependency needed: the
/// standard library's hasher keys are random per process).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}
