//! The master's driver: one thread, one `poll` loop over the signal pipe, a wake-up eventfd,
//! the children's pidfds and their channels, sleeping until the supervisor's next deadline. It
//! carries out the [`Supervisor`]'s commands and makes no decisions of its own.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Instant, SystemTime};

use command_fds::{CommandFdExt, FdMapping};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

use crate::channel::{MasterEnd, ToMaster, ToWorker};
use crate::config::check_scale;
use crate::config::{Balance, Cluster, ControlSetting, OnExit, OnReady, OnSignal, OnStart, ReadyInfo};
use crate::control::{self, Request as ControlRequest};
use crate::control_server::{ConnId, ControlServer};
use crate::error::Error;
use crate::notify::Notifier;
use crate::stats::{ClusterStats, ExitStatus, RestartOutcome, WorkerStats};
use crate::steer::Group;
use crate::supervisor::{Command, Event, Policy, Program, Report, Supervisor, WorkerKey};
use crate::worker::{CHANNEL_FD, LISTEN_FD, env};

/// Variables of the master's environment that must not reach workers: they describe the master's
/// own relationship with systemd.
const PRIVATE_ENV: [&str; 6] =
    ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// What the master shares with [`MasterHandle`]s and the module-level functions.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) addr: SocketAddr,
    wake: OwnedFd,
    requests: Mutex<Vec<Request>>,
    snapshot: Mutex<Snapshot>,
    /// Callers blocked in `restart_and_wait`, by ticket.
    waiters: Mutex<HashMap<u64, mpsc::Sender<RestartOutcome>>>,
    next_ticket: AtomicU64,
    /// The thread running `wait()`: it must never block on itself.
    loop_thread: OnceLock<std::thread::ThreadId>,
    /// `wait()` has returned: nobody will answer a restart any more.
    stopped: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Shutdown,
    SignalWorkers(i32),
    Restart(Option<u64>),
    Scale(usize),
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

    pub(crate) fn graceful_restart(&self) {
        self.request(Request::Restart(None));
    }

    fn restart_and_wait(&self) -> Result<RestartOutcome, Error> {
        if self.loop_thread.get() == Some(&std::thread::current().id()) {
            return Err(Error::WrongRole(
                "restart_and_wait would block the master's own loop; call graceful_restart() from callbacks",
            ));
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            if self.stopped.load(Ordering::SeqCst) {
                return Err(Error::WrongRole("the master is no longer supervising (wait() has returned)"));
            }
            waiters.insert(ticket, tx);
        }
        self.request(Request::Restart(Some(ticket)));
        // The loop answers every ticket: with the outcome, or Cancelled at shutdown. If it is
        // gone (wait() returned), the sender was dropped.
        rx.recv().map_err(|_| Error::WrongRole("the master is no longer supervising (wait() has returned)"))
    }

    fn scale(&self, workers: usize) -> Result<(), Error> {
        check_scale(workers)?;
        self.request(Request::Scale(workers));
        Ok(())
    }

    fn request(&self, r: Request) {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        // Ignore EAGAIN: the counter is already non-zero and the loop will look.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    pub(crate) fn signal_workers(&self, signal: i32) -> Result<(), Error> {
        if Signal::from_named_raw(signal).is_none() {
            return Err(Error::InvalidSignal(signal));
        }
        self.request(Request::SignalWorkers(signal));
        Ok(())
    }

    pub(crate) fn snapshot(&self) -> (ClusterStats, Vec<WorkerStats>) {
        let s = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let age = s.taken.elapsed();
        let (mut cluster, mut workers) = (s.cluster, s.workers);
        for w in workers.iter_mut().filter(|w| w.pid.is_some()) {
            w.uptime += age;
        }
        crate::stats::add_usage(&mut cluster, &mut workers);
        (cluster, workers)
    }
}

/// The master role: returned by [`Cluster::init`] in the first run of the program.
pub struct Master {
    shared: Arc<Shared>,
    policy: Policy,
    balance: Balance,
    backlog: i32,
    listeners: Vec<Option<OwnedFd>>,
    signals: Signals,
    argv0: OsString,
    args: Vec<OsString>,
    /// The program file at its original path, executed again by a graceful restart (a deploy).
    exe_path: PathBuf,
    /// systemd's notification socket, when run as a `Type=notify` service.
    notify: Option<Notifier>,
    name: String,
    control: Option<ControlServer>,
    started: SystemTime,
    on_start: Option<OnStart>,
    on_exit: Option<OnExit>,
    on_worker_ready: Option<OnStart>,
    on_ready: Option<OnReady>,
    on_signal: Vec<(i32, OnSignal)>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("addr", &self.shared.addr)
            .field("workers", &self.policy.workers)
            .field("balance", &self.balance)
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
        self.shared.request(Request::Shutdown);
    }

    /// Sends `signal` to every active worker (the spec's `cluster_signal_workers`); see
    /// [`crate::signal_workers`]. An unnamed signal number is [`Error::InvalidSignal`].
    pub fn signal_workers(&self, signal: i32) -> Result<(), Error> {
        self.shared.signal_workers(signal)
    }

    /// Starts a zero-downtime rolling restart (the spec's `cluster_graceful_restart`, like
    /// `SIGUSR2`) and returns at once; see [`Master::wait`] for how it runs. A restart asked for
    /// while one runs is queued: exactly one more rollout follows the current one, however many
    /// times it was asked for.
    pub fn graceful_restart(&self) {
        self.shared.graceful_restart();
    }

    /// Like [`graceful_restart`](MasterHandle::graceful_restart), and blocks until the rollout
    /// that serves this request has ended, returning how. Not from the master's own thread
    /// (callbacks, `on_signal` actions): that is [`Error::WrongRole`].
    pub fn restart_and_wait(&self) -> Result<RestartOutcome, Error> {
        self.shared.restart_and_wait()
    }

    /// Changes the number of workers: new slots start like initial ones, removed slots (the
    /// highest ids) drain and stop. `SIGTTIN`/`SIGTTOU` add or remove one.
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

    /// The address the cluster listens on, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }
}

impl Master {
    pub(crate) fn new(mut opts: Cluster) -> Result<Master, Error> {
        let workers = opts.worker_count();
        if opts.cpus == 0 {
            let detected = crate::cpu::cpus_detailed();
            tracing::info!("{} CPUs detected ({:?}): starting one worker per CPU", detected.count, detected.source);
        }
        raise_fd_limit();
        let (fds, addr) = match crate::socket::activated_listener()? {
            // systemd socket activation: serve the socket we were given, shared by every worker.
            Some((fd, addr)) => {
                if opts.balance != Balance::Shared {
                    tracing::info!("socket activation: the workers share the socket systemd passed");
                    opts.balance = Balance::Shared;
                }
                (vec![fd], addr)
            }
            None => {
                let addr = SocketAddr::new(opts.address, opts.port);
                crate::socket::bind_listeners(addr, opts.balance, workers, opts.backlog)?
            }
        };
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
                .map_err(|e| Error::Io { context: "cannot create the master's wake-up eventfd", source: e.into() })?;
        let mut extra: Vec<i32> = opts.on_signal.iter().map(|(s, _)| *s).collect();
        if rustix::process::getpid().as_raw_nonzero().get() == 1 {
            // PID 1 of a container: orphans of the whole container are re-parented to us and
            // must be reaped, or they stay zombies. A handler (never SIG_IGN, which would reap
            // our workers behind the pidfds' back) tells us when.
            extra.push(libc::SIGCHLD);
        }
        let signals = Signals::register(&extra).map_err(Error::io("cannot install the master's signal handlers"))?;
        let policy = Policy {
            workers,
            port: addr.port(),
            respawn: opts.respawn,
            shutdown_timeout: opts.shutdown_timeout,
            startup_delay: opts.worker_startup_delay,
            respawn_delay: opts.worker_respawn_delay,
            respawn_window: opts.respawn_window,
            max_crashes: opts.respawn_max_crashes,
            socket_per_slot: opts.balance == Balance::ReusePort,
            ready_timeout: opts.ready_timeout,
        };
        let sup = Supervisor::new(policy.clone(), Instant::now());
        let shared = Arc::new(Shared {
            addr,
            wake,
            waiters: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(1),
            loop_thread: OnceLock::new(),
            stopped: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            snapshot: Mutex::new(Snapshot {
                cluster: sup.cluster_stats(),
                workers: sup.worker_stats(Instant::now()),
                taken: Instant::now(),
            }),
        });
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| OsString::from("ecewo-cluster"));
        let exe_path = program_path(&argv0);
        let name = opts.name.clone().unwrap_or_else(|| {
            exe_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "cluster".into())
        });
        let control = match &opts.control {
            ControlSetting::Off => None,
            ControlSetting::Path(p) => Some(ControlServer::bind(p, false)?),
            ControlSetting::Default => {
                let path = crate::control::socket_path(&format!("{name}-{}", addr.port()));
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
        Ok(Master {
            notify: Notifier::from_env(),
            exe_path,
            name,
            control,
            started: SystemTime::now(),
            shared,
            policy,
            balance: opts.balance,
            backlog: opts.backlog.min(i32::MAX as u32) as i32,
            listeners: fds.into_iter().map(Some).collect(),
            signals,
            argv0,
            args: args.collect(),
            on_start: opts.on_start.take(),
            on_exit: opts.on_exit.take(),
            on_worker_ready: opts.on_worker_ready.take(),
            on_ready: opts.on_ready.take(),
            on_signal: std::mem::take(&mut opts.on_signal),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// A handle for other threads.
    pub fn handle(&self) -> MasterHandle {
        MasterHandle { shared: self.shared.clone() }
    }

    /// The address the cluster listens on, with the real port (also for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The number of worker slots.
    pub fn worker_count(&self) -> usize {
        self.policy.workers
    }

    /// Sends `signal` to every active worker once the loop runs; see [`crate::signal_workers`].
    pub fn signal_workers(&self, signal: i32) -> Result<(), Error> {
        self.shared.signal_workers(signal)
    }

    /// Asks for a rolling restart once the loop runs; see [`MasterHandle::graceful_restart`].
    pub fn graceful_restart(&self) {
        self.shared.graceful_restart();
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
    /// It returns `Ok(())` after a requested shutdown (SIGTERM, SIGINT, [`MasterHandle::shutdown`])
    /// once every worker is gone, or when every worker exited cleanly on its own with respawn off.
    /// It returns [`Error::WorkersFailed`] when no worker can run any more (all crashed with
    /// respawn off, or all disabled by crash protection): exit non-zero then, so that systemd or
    /// Kubernetes can act.
    pub fn wait(self) -> Result<(), Error> {
        let _ = self.shared.loop_thread.set(std::thread::current().id());
        let mut driver = Driver {
            sup: Supervisor::new(self.policy.clone(), Instant::now()),
            procs: HashMap::new(),
            programs: HashMap::new(),
            control_waiters: HashMap::new(),
            group: Group::default(),
            route: Vec::new(),
            steering_failed: false,
            master_pid: rustix::process::getpid(),
            outcome: None,
            m: self,
        };
        if driver.m.balance == Balance::ReusePort {
            // The sockets joined their group in slot order, as they were bound.
            for slot in (0..driver.m.listeners.len()).filter(|&i| driver.m.listeners[i].is_some()) {
                driver.group.join(slot);
            }
        }
        let result = driver.run();
        if result.is_err() {
            driver.kill_and_reap_all();
        }
        // Nobody will answer a restart any more: wake whoever still waits, refuse new waiters.
        let mut waiters = driver.m.shared.waiters.lock().unwrap_or_else(|e| e.into_inner());
        driver.m.shared.stopped.store(true, Ordering::SeqCst);
        waiters.clear();
        drop(waiters);
        result
    }
}

/// A running worker process as the driver sees it.
struct Proc {
    slot: usize,
    pid: u32,
    pidfd: OwnedFd,
    chan: MasterEnd,
}

struct Driver {
    m: Master,
    sup: Supervisor,
    procs: HashMap<WorkerKey, Proc>,
    /// Open program files of deploys, by restart number.
    programs: HashMap<u64, OwnedFd>,
    master_pid: Pid,
    outcome: Option<Result<(), String>>,
    /// Control connections waiting for a restart's outcome, by ticket.
    control_waiters: HashMap<u64, ConnId>,
    /// The kernel's array of the `ReusePort` group, and the slots new connections go to.
    group: Group,
    route: Vec<usize>,
    steering_failed: bool,
}

/// What a polled descriptor belongs to.
#[derive(Clone, Copy)]
enum Source {
    Signals,
    Wake,
    Exit(WorkerKey),
    Channel(WorkerKey),
    ControlListener,
    Control(ConnId),
}

impl Driver {
    fn run(&mut self) -> Result<(), Error> {
        tracing::info!(
            "master {} starting {} workers on {} ({} balance)",
            self.master_pid.as_raw_nonzero(),
            self.m.policy.workers,
            self.m.shared.addr,
            self.m.balance
        );
        if self.m.signals.reaps_orphans {
            // Zombies that arrived before our SIGCHLD handler existed.
            self.reap_orphans();
        }
        let mut events = VecDeque::from([Event::Tick]);
        loop {
            self.process(&mut events);
            self.publish();
            if let Some(outcome) = self.outcome.take() {
                return outcome.map_err(Error::WorkersFailed);
            }
            self.poll(&mut events)?;
            events.push_back(Event::Tick);
        }
    }

    /// Feeds events to the supervisor and carries out its commands, which may produce more events.
    fn process(&mut self, events: &mut VecDeque<Event>) {
        while let Some(ev) = events.pop_front() {
            for cmd in self.sup.handle(ev, Instant::now(), SystemTime::now()) {
                self.execute(cmd, events);
            }
        }
    }

    fn execute(&mut self, cmd: Command, events: &mut VecDeque<Event>) {
        match cmd {
            Command::Spawn { slot, key, program } => match self.spawn(slot, program) {
                Ok(p) => {
                    events.push_back(Event::Spawned { key, pid: p.pid });
                    self.procs.insert(key, p);
                }
                Err(e) => events.push_back(Event::SpawnFailed { key, error: e.to_string() }),
            },
            Command::Signal { key, signal } => {
                if let (Some(p), Some(sig)) = (self.procs.get(&key), Signal::from_named_raw(signal)) {
                    // ESRCH: it already exited and its pidfd will say so; nothing to do.
                    if let Err(e) = rustix::process::pidfd_send_signal(&p.pidfd, sig)
                        && e != rustix::io::Errno::SRCH
                    {
                        tracing::warn!("cannot signal worker {} (pid {}): {e}", p.slot, p.pid);
                    }
                }
            }
            Command::Route { slots } => {
                self.route = slots;
                self.apply_route();
            }
            Command::CloseSocket { slot } => {
                if let Some(fd) = self.m.listeners.get_mut(slot).and_then(Option::take) {
                    drop(fd);
                    self.group.leave(slot);
                    self.apply_route();
                    tracing::info!("closed the listening socket of worker {slot}: nobody serves it any more");
                }
            }
            Command::CloseListeners => {
                self.m.listeners.clear();
                self.group = Group::default();
            }
            Command::Report(r) => self.report(r),
            Command::Exit(outcome) => self.outcome = Some(outcome),
        }
    }

    fn report(&mut self, r: Report) {
        let m = &mut self.m;
        match r {
            Report::Started { slot, pid } => {
                tracing::info!("worker {slot} started (pid {pid})");
                guard("on_start", m.on_start.as_mut(), |f| f(slot, pid));
            }
            Report::SpawnFailed { slot, error } => tracing::error!("cannot start worker {slot}: {error}"),
            Report::Ready { slot, pid } => {
                tracing::debug!("worker {slot} (pid {pid}) is ready");
                guard("on_worker_ready", m.on_worker_ready.as_mut(), |f| f(slot, pid));
            }
            Report::AllReady { workers } => {
                let info = ReadyInfo { addr: m.shared.addr, workers };
                tracing::info!("listening on {} with {workers} workers", info.addr);
                if let Some(n) = &mut m.notify {
                    n.send(&format!("READY=1\nSTATUS=serving on {} with {workers} workers", info.addr));
                }
                guard("on_ready", m.on_ready.as_mut(), |f| f(&info));
            }
            Report::Exited { slot, pid, status, crash, respawn_in } => {
                let then = match respawn_in {
                    Some(d) => format!("; respawning in {d:?}"),
                    None => String::new(),
                };
                if crash {
                    tracing::warn!("worker {slot} (pid {pid}) crashed: {status}{then}");
                } else {
                    tracing::info!("worker {slot} (pid {pid}) exited: {status}{then}");
                }
                guard("on_exit", m.on_exit.as_mut(), |f| f(slot, status, crash));
            }
            Report::Disabled { slot, crashes, within } => tracing::error!(
                "Worker {slot} crashing too fast ({crashes} times in {}s), disabling respawn",
                within.as_secs()
            ),
            Report::ShuttingDown { workers } => {
                tracing::info!("shutting down: stopping {workers} workers");
                if let Some(n) = &mut m.notify {
                    n.send(&format!("STOPPING=1\nSTATUS=stopping {workers} workers"));
                }
            }
            Report::Signalled { signal, slots } => {
                tracing::info!("sent {} to workers {slots:?}", crate::stats::signal_name(signal).unwrap_or("a signal"))
            }
            Report::StopTimeout { slots } => tracing::warn!("shutdown timeout: killing workers {slots:?}"),
            Report::RestartStarted { workers } => {
                tracing::info!("graceful restart: replacing {workers} workers one at a time");
                if let Some(n) = &mut m.notify {
                    n.reloading(&format!("rolling restart of {workers} workers"));
                }
            }
            Report::RestartQueued => tracing::info!("a graceful restart is running; one more will follow it"),
            Report::Replaced { slot, old_pid, new_pid } => match old_pid {
                Some(old) => tracing::info!("worker {slot} replaced: pid {old} drains, pid {new_pid} serves"),
                None => tracing::info!("worker {slot} replaced: pid {new_pid} serves"),
            },
            Report::RestartFinished { outcome, tickets } => {
                match &outcome {
                    RestartOutcome::Completed { .. } => tracing::info!("graceful restart {outcome}"),
                    RestartOutcome::Failed { .. } => {
                        tracing::error!("graceful restart {outcome}; the other workers keep serving")
                    }
                    _ => tracing::warn!("graceful restart {outcome}"),
                }
                let (stopping, started) = (self.sup.cluster_stats().shutdown_requested, self.sup.started());
                if let (Some(n), false, true) = (&mut m.notify, stopping, started) {
                    n.send(&format!("READY=1\nSTATUS=graceful restart {outcome}"));
                }
                let mut waiters = m.shared.waiters.lock().unwrap_or_else(|e| e.into_inner());
                for t in &tickets {
                    if let Some(tx) = waiters.remove(t) {
                        let _ = tx.send(outcome.clone());
                    }
                }
                drop(waiters);
                for t in &tickets {
                    if let (Some(id), Some(ctl)) = (self.control_waiters.remove(t), m.control.as_mut()) {
                        let reply = if outcome.is_completed() {
                            control::ok_reply(serde_json::json!({ "outcome": outcome }))
                        } else {
                            let mut r = control::error_reply(&format!("graceful restart {outcome}"));
                            r["outcome"] = serde_json::to_value(&outcome).unwrap_or_default();
                            r
                        };
                        ctl.owe(id, -1);
                        ctl.reply(id, &reply);
                    }
                }
                let in_use = self.sup.programs_in_use();
                self.programs.retain(|g, _| in_use.contains(&Program::Deployed(*g)));
            }
            Report::Scaled { from, to } => tracing::info!("scaled from {from} to {to} workers"),
            Report::ScaleRefused { workers } => tracing::warn!("cannot scale to {workers} workers"),
        }
    }

    /// Starts the worker process of `slot`: `/proc/self/exe` (the binary this master runs, even
    /// if the file was replaced since), with the master's arguments and environment plus the
    /// worker's identity, its socket at fd 3 and its channel at fd 4.
    fn spawn(&mut self, slot: usize, program: Program) -> io::Result<Proc> {
        let listener = self.listener_for(slot)?.try_clone()?;
        let exe = match program {
            Program::Running => PathBuf::from("/proc/self/exe"),
            Program::Deployed(n) => {
                if !self.programs.contains_key(&n) {
                    self.programs.insert(n, open_program(&self.m.exe_path)?);
                }
                PathBuf::from(format!("/proc/self/fd/{}", self.programs[&n].as_raw_fd()))
            }
        };
        let (master_end, worker_end) = UnixStream::pair()?;
        let mut cmd = Process::new(exe);
        cmd.arg0(&self.m.argv0)
            .args(&self.m.args)
            .env(env::WORKER_ID, slot.to_string())
            .env(env::WORKERS, self.sup.policy().workers.to_string())
            .env(env::PORT, self.m.shared.addr.port().to_string())
            .env(env::LISTEN_FD, LISTEN_FD.to_string())
            .env(env::CHANNEL_FD, CHANNEL_FD.to_string())
            .env(env::MASTER_PID, self.master_pid.as_raw_nonzero().to_string())
            .env(env::SHUTDOWN_TIMEOUT_MS, self.m.policy.shutdown_timeout.as_millis().to_string())
            .stdin(Stdio::null())
            // Own process group: a terminal's Ctrl-C reaches the master only, which then stops
            // the workers gracefully.
            .process_group(0);
        for key in PRIVATE_ENV {
            cmd.env_remove(key);
        }
        cmd.fd_mappings(vec![
            FdMapping { parent_fd: listener, child_fd: LISTEN_FD },
            FdMapping { parent_fd: worker_end.into(), child_fd: CHANNEL_FD },
        ])
        .map_err(|e| io::Error::other(e.to_string()))?;
        crate::sys::set_child_setup(&mut cmd, self.master_pid, (CHANNEL_FD + 1) as u32);
        let mut child = cmd.spawn()?;
        let pid = child.id();
        // Nobody else reaps our children (we never wait for "any child"), so the pid cannot have
        // been reused yet: opening its pidfd now is race-free.
        let tracked = Pid::from_raw(pid as i32)
            .ok_or_else(|| io::Error::other("spawn returned pid 0"))
            .and_then(|raw| rustix::process::pidfd_open(raw, PidfdFlags::empty()).map_err(io::Error::from))
            .and_then(|pidfd| Ok(Proc { slot, pid, pidfd, chan: MasterEnd::new(master_end)? }));
        if tracked.is_err() {
            // A worker we cannot supervise must not run: kill and reap it now.
            let _ = child.kill();
            let _ = child.wait();
        }
        tracked // Dropping a std Child neither waits nor kills.
    }

    /// The listening socket a worker of `slot` inherits. In `ReusePort` mode a slot whose socket
    /// was closed (disabled, or new after scaling up) gets a new one.
    fn listener_for(&mut self, slot: usize) -> io::Result<&OwnedFd> {
        let index = match self.m.balance {
            Balance::ReusePort => slot,
            Balance::Shared => 0,
        };
        if self.m.listeners.len() <= index {
            self.m.listeners.resize_with(index + 1, || None);
        }
        if self.m.listeners[index].is_none() && self.m.balance == Balance::ReusePort {
            let fd = crate::socket::bind_reuseport(self.m.shared.addr, self.m.backlog)?;
            self.m.listeners[index] = Some(fd);
            self.group.join(slot);
            self.apply_route();
        }
        self.m.listeners[index].as_ref().ok_or_else(|| io::Error::other("the listening socket is closed"))
    }

    /// Attaches the steering program for the current route to the `ReusePort` group.
    fn apply_route(&mut self) {
        if self.m.balance != Balance::ReusePort || self.steering_failed {
            return;
        }
        let Some(any) = self.m.listeners.iter().flatten().next() else { return };
        let Some(program) = self.group.program(&self.route) else {
            // Too many routed slots for a classic BPF program: let the kernel hash over all.
            let _ = crate::sys::detach_reuseport_bpf(any.as_fd());
            return;
        };
        if let Err(e) = crate::sys::attach_reuseport_cbpf(any.as_fd(), &program) {
            self.steering_failed = true;
            tracing::warn!(
                "cannot steer connections ({e}); the kernel's hashing applies, including to slots that are restarting"
            );
        }
    }

    /// The statistics now, with each worker's resource figures from `/proc`.
    fn stats_now(&self) -> (ClusterStats, Vec<WorkerStats>) {
        let (mut cluster, mut workers) = (self.sup.cluster_stats(), self.sup.worker_stats(Instant::now()));
        crate::stats::add_usage(&mut cluster, &mut workers);
        (cluster, workers)
    }

    /// Publishes the statistics for handles and module functions.
    fn publish(&self) {
        let now = Instant::now();
        let snap = Snapshot { cluster: self.sup.cluster_stats(), workers: self.sup.worker_stats(now), taken: now };
        *self.m.shared.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snap;
    }

    /// Sleeps until something happens or the supervisor's deadline passes; queues what happened.
    fn poll(&mut self, events: &mut VecDeque<Event>) -> Result<(), Error> {
        let deadline = [
            self.sup.next_deadline(),
            self.m.control.as_ref().and_then(ControlServer::next_deadline),
            self.m.notify.as_ref().and_then(Notifier::watchdog_due),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            // Round up to the next millisecond so we never wake just before the deadline.
            let ms = left.as_nanos().div_ceil(1_000_000);
            Timespec { tv_sec: (ms / 1000) as i64, tv_nsec: ((ms % 1000) * 1_000_000) as i64 }
        });
        let mut sources = vec![Source::Signals, Source::Wake];
        let mut fds =
            vec![PollFd::new(&self.m.signals.read, PollFlags::IN), PollFd::new(&self.m.shared.wake, PollFlags::IN)];
        for (key, p) in &self.procs {
            sources.push(Source::Exit(*key));
            fds.push(PollFd::new(&p.pidfd, PollFlags::IN));
            if !p.chan.closed {
                let mut flags = PollFlags::IN;
                if p.chan.io.wants_write() {
                    flags |= PollFlags::OUT;
                }
                sources.push(Source::Channel(*key));
                fds.push(PollFd::new(&p.chan.io.sock, flags));
            }
        }
        if let Some(ctl) = &self.m.control {
            sources.push(Source::ControlListener);
            fds.push(PollFd::new(ctl.listener(), PollFlags::IN));
            for (id, sock, read, write) in ctl.sockets() {
                let mut flags = PollFlags::empty();
                if read {
                    flags |= PollFlags::IN;
                }
                if write {
                    flags |= PollFlags::OUT;
                }
                if !flags.is_empty() {
                    sources.push(Source::Control(id));
                    fds.push(PollFd::new(sock, flags));
                }
            }
        }
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(Error::Io { context: "poll failed in the master loop", source: e.into() }),
        }
        let ready: Vec<Source> =
            fds.iter().zip(&sources).filter(|(fd, _)| !fd.revents().is_empty()).map(|(_, s)| *s).collect();
        drop(fds);
        // Channels first: a worker's last messages come before its exit.
        for s in ready.iter().filter(|s| matches!(s, Source::Channel(_))) {
            if let Source::Channel(key) = *s {
                self.on_channel(key, events);
            }
        }
        for s in ready {
            match s {
                Source::Signals => self.on_signals(events),
                Source::Wake => self.on_wake(events),
                Source::Exit(key) => self.on_exit(key, events),
                Source::Channel(_) => {}
                Source::ControlListener => {
                    if let Some(ctl) = &mut self.m.control {
                        ctl.accept(Instant::now());
                    }
                }
                Source::Control(id) => self.on_control(id, events),
            }
        }
        if let Some(ctl) = &mut self.m.control {
            ctl.close_idle(Instant::now());
        }
        let stats = self.sup.cluster_stats();
        if let Some(n) = self.m.notify.as_mut().filter(|_| !stats.shutdown_requested) {
            // Healthy: the loop runs and the cluster serves (or is still starting).
            n.watchdog(Instant::now(), stats.active_workers > 0 || !self.sup.started());
        }
        Ok(())
    }

    fn on_signals(&mut self, events: &mut VecDeque<Event>) {
        for sig in self.m.signals.take() {
            if sig == libc::SIGCHLD {
                self.reap_orphans();
                continue;
            }
            let name = crate::stats::signal_name(sig).unwrap_or("a signal");
            tracing::info!("received {name}");
            if sig == libc::SIGTERM || sig == libc::SIGINT {
                events.push_back(Event::Shutdown);
            } else if let Some((_, action)) = self.m.on_signal.iter_mut().find(|(s, _)| *s == sig) {
                let handle = MasterHandle { shared: self.m.shared.clone() };
                guard("on_signal", Some(action), |f| f(&handle));
            } else if sig == libc::SIGUSR2 {
                events.push_back(Event::Restart { ticket: None });
            } else if sig == libc::SIGTTIN || sig == libc::SIGTTOU {
                events.push_back(Event::ScaleBy { delta: if sig == libc::SIGTTIN { 1 } else { -1 } });
            }
        }
    }

    /// As PID 1: reaps the children that are not our workers (orphans re-parented to us). Our
    /// workers are left alone: their pidfds report their exits.
    ///
    /// The kernel re-parents orphans to the init task's main thread, so only its children are
    /// looked at (children that other threads of the program started are theirs to wait for).
    /// `/proc` must be this PID namespace's (as in any container).
    fn reap_orphans(&mut self) {
        let ours: Vec<u32> = self.procs.values().map(|p| p.pid).collect();
        let list = std::fs::read_to_string("/proc/self/task/1/children").unwrap_or_default();
        let children: Vec<u32> =
            list.split_whitespace().filter_map(|p| p.parse().ok()).filter(|pid| !ours.contains(pid)).collect();
        for pid in children {
            let Some(raw) = Pid::from_raw(pid as i32) else { continue };
            if let Ok(Some(_)) =
                rustix::process::waitid(WaitId::Pid(raw), WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
            {
                tracing::debug!("reaped orphan process {pid}");
            }
        }
    }

    /// Answers what a control connection sent.
    fn on_control(&mut self, id: ConnId, events: &mut VecDeque<Event>) {
        let Some(ctl) = self.m.control.as_mut() else { return };
        let requests = ctl.read(id, Instant::now());
        for request in requests {
            let reply = match request {
                Err(message) => control::error_reply(&message),
                Ok(ControlRequest::Status) => {
                    let (cluster, workers) = self.stats_now();
                    let started =
                        self.m.started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                    control::ok_reply(serde_json::json!({
                        "master": {
                            "pid": self.master_pid.as_raw_nonzero().get(),
                            "name": self.m.name,
                            "address": self.m.shared.addr.to_string(),
                            "balance": self.m.balance.to_string(),
                            "started": started,
                            "rss_bytes": crate::stats::proc_usage(std::process::id()).map(|(rss, _)| rss),
                        },
                        "cluster": cluster,
                        "workers": workers,
                    }))
                }
                Ok(ControlRequest::Restart { wait: false }) => {
                    events.push_back(Event::Restart { ticket: None });
                    control::ok_reply(serde_json::json!({ "started": true }))
                }
                Ok(ControlRequest::Restart { wait: true }) => {
                    let ticket = self.m.shared.next_ticket.fetch_add(1, Ordering::Relaxed);
                    self.control_waiters.insert(ticket, id);
                    if let Some(ctl) = self.m.control.as_mut() {
                        ctl.owe(id, 1);
                    }
                    events.push_back(Event::Restart { ticket: Some(ticket) });
                    continue;
                }
                Ok(ControlRequest::Scale { workers }) => match check_scale(workers) {
                    Ok(()) => {
                        events.push_back(Event::Scale { workers });
                        control::ok_reply(serde_json::json!({ "workers": workers }))
                    }
                    Err(e) => control::error_reply(&e.to_string()),
                },
                Ok(ControlRequest::Signal { signal }) => match signal.number() {
                    Some(n) => {
                        events.push_back(Event::SignalWorkers { signal: n });
                        control::ok_reply(serde_json::json!({ "signal": n }))
                    }
                    None => control::error_reply(&format!("unknown signal {signal:?}; use a name like USR1 or HUP")),
                },
                Ok(ControlRequest::Metrics) => {
                    let (cluster, workers) = self.stats_now();
                    // Labelled with the cluster's name: several clusters' files can share a collector.
                    let name = format!("{}-{}", self.m.name, self.m.shared.addr.port());
                    let text = crate::metrics::render_labeled(&cluster, &workers, &[("cluster", &name)]);
                    control::ok_reply(serde_json::json!({ "text": text }))
                }
                Ok(ControlRequest::Stop) => {
                    events.push_back(Event::Shutdown);
                    control::ok_reply(serde_json::json!({ "stopping": true }))
                }
            };
            if let Some(ctl) = self.m.control.as_mut() {
                ctl.reply(id, &reply);
            }
        }
        if let Some(ctl) = self.m.control.as_mut() {
            ctl.flush(id);
        }
    }

    fn on_wake(&mut self, events: &mut VecDeque<Event>) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.m.shared.wake, &mut buf);
        let requests = std::mem::take(&mut *self.m.shared.requests.lock().unwrap_or_else(|e| e.into_inner()));
        for r in requests {
            match r {
                Request::Shutdown => events.push_back(Event::Shutdown),
                Request::SignalWorkers(signal) => events.push_back(Event::SignalWorkers { signal }),
                Request::Restart(ticket) => events.push_back(Event::Restart { ticket }),
                Request::Scale(workers) => events.push_back(Event::Scale { workers }),
            }
        }
    }

    fn on_exit(&mut self, key: WorkerKey, events: &mut VecDeque<Event>) {
        let Some(p) = self.procs.get(&key) else { return };
        let status = match rustix::process::waitid(
            WaitId::PidFd(p.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => match (st.exit_status(), st.terminating_signal()) {
                (Some(code), _) => ExitStatus::Code(code),
                (None, Some(sig)) => ExitStatus::Signal(sig),
                (None, None) => return, // stopped or continued: not an exit
            },
            Ok(None) => return,
            Err(e) => {
                // ECHILD: somebody else reaped it (a SIGCHLD handler set to SIG_IGN, a waitpid(-1)
                // elsewhere in the program). Its status is lost; call it a crash of unknown cause.
                tracing::error!("cannot reap worker {} (pid {}): {e}; was it reaped elsewhere?", p.slot, p.pid);
                ExitStatus::Code(255)
            }
        };
        self.procs.remove(&key);
        events.push_back(Event::Exited { key, status });
    }

    fn on_channel(&mut self, key: WorkerKey, events: &mut VecDeque<Event>) {
        let Some(p) = self.procs.get_mut(&key) else { return };
        p.chan.flush();
        let msgs = p.chan.read_messages();
        for msg in msgs {
            match msg {
                ToMaster::Ready => events.push_back(Event::Ready { key }),
                ToMaster::Stats { id } => {
                    let (cluster, workers) = self.stats_now();
                    let reply = ToWorker::Stats { id, cluster, workers };
                    if let Some(p) = self.procs.get_mut(&key) {
                        p.chan.send(&reply);
                    }
                }
            }
        }
    }

    /// Last resort when the loop itself failed: kill every worker and reap it.
    fn kill_and_reap_all(&mut self) {
        for (_, p) in self.procs.drain() {
            let _ = rustix::process::pidfd_send_signal(&p.pidfd, Signal::KILL);
            let _ = rustix::process::waitid(WaitId::PidFd(p.pidfd.as_fd()), WaitIdOptions::EXITED);
        }
    }
}

/// Runs a user callback; a panic in it is logged and supervision goes on.
fn guard<F: ?Sized>(name: &str, f: Option<&mut Box<F>>, call: impl FnOnce(&mut F)) {
    if let Some(f) = f
        && std::panic::catch_unwind(AssertUnwindSafe(|| call(f))).is_err()
    {
        tracing::error!("the {name} callback panicked; supervision continues");
    }
}

/// The master's signal handling: handlers only set a flag and write to a self-pipe (via
/// signal-hook); the loop polls the pipe and reads the flags. Unregistered on drop.
struct Signals {
    read: UnixStream,
    /// SIGCHLD is handled: this master is PID 1 and reaps orphans.
    reaps_orphans: bool,
    flags: Vec<(i32, Arc<AtomicBool>)>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    fn register(extra: &[i32]) -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let mut s = Signals { read, reaps_orphans: extra.contains(&libc::SIGCHLD), flags: Vec::new(), ids: Vec::new() };
        let mut all = vec![libc::SIGTERM, libc::SIGINT, libc::SIGUSR2, libc::SIGTTIN, libc::SIGTTOU];
        all.extend(extra.iter().filter(|s| !all.contains(s)).collect::<Vec<_>>());
        for sig in all {
            let flag = Arc::new(AtomicBool::new(false));
            s.ids.push(signal_hook::flag::register(sig, flag.clone())?);
            s.ids.push(signal_hook::low_level::pipe::register(sig, write.try_clone()?)?);
            s.flags.push((sig, flag));
        }
        Ok(s)
    }

    /// Drains the pipe and returns the signals that arrived since the last call.
    fn take(&mut self) -> Vec<i32> {
        let mut buf = [0u8; 64];
        while matches!(self.read.read(&mut buf), Ok(n) if n > 0) {}
        self.flags.iter().filter(|(_, f)| f.swap(false, Ordering::SeqCst)).map(|(sig, _)| *sig).collect()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Raises the soft limit of open descriptors to the hard limit (as Go and nginx's
/// `worker_rlimit_nofile` do): the master needs about three per worker, and servers need many.
/// Workers inherit it.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum)
        && cur < max
    {
        let raised = rustix::process::Rlimit { current: Some(max.min(1 << 20)), maximum: Some(max) };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!("raised the open-file limit from {cur} to {}", max.min(1 << 20)),
            Err(e) => tracing::debug!("cannot raise the open-file limit from {cur}: {e}"),
        }
    }
}

/// The path the program was started from, kept to execute it again on a graceful restart (so
/// that replacing the file, or repointing a symlink, deploys new code). Symlinks are *not*
/// resolved; a bare name is looked up in `PATH` as the shell did.
fn program_path(argv0: &std::ffi::OsStr) -> PathBuf {
    let path = std::path::Path::new(argv0);
    if path.as_os_str().as_encoded_bytes().contains(&b'/') {
        if let Ok(abs) = std::path::absolute(path) {
            return abs;
        }
    } else if let Some(found) =
        std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|dir| dir.join(path)).find(|p| p.is_file())
    {
        return found;
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// Opens the program file for a deploy. Its descriptor is moved above the numbers a worker's
/// descriptors are placed at, so that `/proc/self/fd/N` still names it in the child at exec.
fn open_program(path: &std::path::Path) -> io::Result<OwnedFd> {
    let file = std::fs::File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    rustix::io::fcntl_dupfd_cloexec(&file, 10).map_err(io::Error::from)
}
