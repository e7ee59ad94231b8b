//! Cluster options: the spec's `Cluster` structure as a builder.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::error::Error;
use crate::master::DEFAULT_WORKER_TIMEOUT;
pub use crate::master::{
    Balance, Compat, Listen, ListenAddr, ListenerInfo, MemoryMeasure, ReadyInfo, WorkerExit, WorkerInfo,
};
pub use crate::master::{CaptureFormat, CaptureOutput, DEFAULT_MAX_LINE, DEFAULT_REOPEN_SIGNAL};
use crate::master::{ControlSetting, Settings, WorkerCommand};
use crate::signal::Signal;
pub use crate::supervisor::MAX_WORKERS;
use crate::supervisor::{Backoff, Liveness};

/// The shortest worker timeout [`Cluster::validate`] accepts.
const MIN_WORKER_TIMEOUT: Duration = Duration::from_millis(100);

/// The shortest `max_age` [`Cluster::validate`] accepts.
const MIN_MAX_AGE: Duration = Duration::from_secs(1);

/// The longest timeout or delay an option accepts: one day.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Signals a program may bind to its own master actions with [`Cluster::on_signal`].
///
/// `SIGTERM` and `SIGINT` are the master's (graceful shutdown). `SIGHUP` and `SIGQUIT` (graceful
/// shutdown), `SIGUSR2` (rolling restart) and `SIGTTIN`/`SIGTTOU` (one worker more or fewer) have
/// default actions that a binding replaces. `SIGKILL`, `SIGSTOP` and the fault signals cannot be
/// handled; `SIGCHLD` must stay untouched (workers are reaped through pidfds). The list may grow.
pub const BINDABLE_SIGNALS: &[Signal] =
    &[Signal::HUP, Signal::QUIT, Signal::USR1, Signal::USR2, Signal::WINCH, Signal::ALRM, Signal::TTIN, Signal::TTOU];

/// The cluster's configuration: the spec's `Cluster` structure, as a builder.
///
/// Only the port is required; everything else has the spec's default. Setters can be chained,
/// and [`Cluster::init`] validates the whole set before anything is started.
///
/// ```
/// use std::time::Duration;
/// use ecewo_cluster::{Balance, Cluster};
///
/// let opts = Cluster::new(3000)
///     .cpus(4)
///     .respawn(true)
///     .shutdown_timeout(Duration::from_secs(30))
///     .balance(Balance::ReusePort)
///     .on_exit(|exit| eprintln!("worker {}: {} crash={}", exit.worker_id, exit.status, exit.crash));
/// # let _ = opts;
/// ```
pub struct Cluster {
    pub(crate) s: Settings,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("port", &self.s.port)
            .field("cpus", &self.s.cpus)
            .field("respawn", &self.s.respawn)
            .field("shutdown_timeout", &self.s.shutdown_timeout)
            .field("worker_startup_delay", &self.s.worker_startup_delay)
            .field("worker_respawn_delay", &self.s.worker_respawn_delay)
            .field("respawn_window", &self.s.respawn_window)
            .field("respawn_max_crashes", &self.s.respawn_max_crashes)
            .field("address", &self.s.address)
            .field("balance", &self.s.balance)
            .field("backlog", &self.s.backlog)
            .field("ready_timeout", &self.s.ready_timeout)
            .field("max_surge", &self.s.max_surge)
            .field("liveness", &self.s.liveness)
            .field("heartbeat", &self.s.heartbeat)
            .field("memory_measure", &self.s.memory_measure)
            .field("shutdown_delay", &self.s.shutdown_delay)
            .field("min_ready", &self.s.min_ready)
            .field("admin", &self.s.admin)
            .field("command", &self.s.command)
            .field("name", &self.s.name)
            .field("control", &self.s.control)
            .field("capture", &self.s.capture)
            .field("event_history", &self.s.event_history)
            .field("event_log", &self.s.event_log)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Options for a cluster serving `port` (0: any free port, see [`crate::port`]), with the
    /// spec's defaults: one worker per CPU ([`crate::cpus`]), no respawn, 15 s shutdown timeout,
    /// 100 ms between spawns, 100 ms before a respawn, at most 3 crashes in 5 s.
    pub fn new(port: u16) -> Cluster {
        Cluster {
            s: Settings {
                default_listener: true,
                listeners: Vec::new(),
                port,
                cpus: 0,
                respawn: false,
                shutdown_timeout: Duration::from_millis(15_000),
                worker_startup_delay: Duration::from_millis(100),
                worker_respawn_delay: Duration::from_millis(100),
                respawn_window: Duration::from_secs(5),
                respawn_max_crashes: 3,
                address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                balance: Balance::default(),
                backlog: 1024,
                ready_timeout: Duration::from_secs(60),
                max_surge: 1,
                liveness: Liveness { worker_timeout: Some(DEFAULT_WORKER_TIMEOUT), ..Liveness::default() },
                heartbeat: None,
                memory_measure: MemoryMeasure::default(),
                shutdown_delay: Duration::ZERO,
                min_ready: 1,
                upgrade_timeout: None,
                upgrade_slot_by_slot: false,
                admin: None,
                command: None,
                name: None,
                control: ControlSetting::Default,
                on_start: None,
                on_exit: None,
                on_worker_ready: None,
                on_ready: None,
                on_signal: Vec::new(),
                capture: None,
                event_history: crate::events::DEFAULT_EVENT_HISTORY,
                event_log: None,
                on_event: None,
            },
        }
    }

    /// The port to listen on (0: any free port; the real one is reported by [`crate::port`]).
    pub fn port(mut self, port: u16) -> Cluster {
        self.s.port = port;
        self
    }

    /// Number of workers; 0 (the default) means [`crate::cpus`].
    pub fn cpus(mut self, workers: usize) -> Cluster {
        self.s.cpus = workers;
        self
    }

    /// Restart workers that exit without being asked to (default: off).
    pub fn respawn(mut self, on: bool) -> Cluster {
        self.s.respawn = on;
        self
    }

    /// How long a stopping worker may drain before the master kills it (default 15 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Cluster {
        self.s.shutdown_timeout = timeout;
        self
    }

    /// Delay between starting consecutive workers at start-up (default 100 ms).
    pub fn worker_startup_delay(mut self, delay: Duration) -> Cluster {
        self.s.worker_startup_delay = delay;
        self
    }

    /// Delay before a worker that exited is started again (default 100 ms).
    pub fn worker_respawn_delay(mut self, delay: Duration) -> Cluster {
        self.s.worker_respawn_delay = delay;
        self
    }

    /// The crash-rate window of crash protection (default 5 s).
    pub fn respawn_window(mut self, window: Duration) -> Cluster {
        self.s.respawn_window = window;
        self
    }

    /// Crashes within [`respawn_window`](Cluster::respawn_window) after which a slot is disabled
    /// (default 3).
    pub fn respawn_max_crashes(mut self, crashes: u32) -> Cluster {
        self.s.respawn_max_crashes = crashes;
        self
    }

    /// The address to bind (default `0.0.0.0`, every IPv4 interface; `::` listens on IPv6 and IPv4).
    pub fn address(mut self, address: IpAddr) -> Cluster {
        self.s.address = address;
        self
    }

    /// How connections are spread over workers (default [`Balance::ReusePort`]).
    pub fn balance(mut self, balance: Balance) -> Cluster {
        self.s.balance = balance;
        self
    }

    /// The listen backlog of each socket (default 1024; the kernel caps it at `net.core.somaxconn`).
    pub fn backlog(mut self, backlog: u32) -> Cluster {
        self.s.backlog = backlog;
        self
    }

    /// Adds a listener named `name`: every worker serves it too, and receives it by the systemd
    /// convention with that name (`Worker::take_listener(name)`, `LISTEN_FDNAMES`). Workers
    /// receive the listeners in order: the default one (of `Cluster::new(port)`, named
    /// `"default"`) first, then these as added.
    ///
    /// A name is 1 to 255 printable ASCII characters without `:` (systemd's rule for
    /// `FileDescriptorName=`); names and addresses must be distinct, which
    /// [`init`](Cluster::init) and [`validate`](Cluster::validate) check
    /// ([`Error::BadListener`]).
    pub fn listen(mut self, name: impl Into<String>, listen: Listen) -> Cluster {
        self.s.listeners.push((name.into(), listen));
        self
    }

    /// Serves only the listeners added with [`listen`](Cluster::listen): not the default one
    /// of `Cluster::new(port)` (whose `port`, `address`, `balance` and `backlog` are then
    /// unused).
    pub fn no_default_listener(mut self) -> Cluster {
        self.s.default_listener = false;
        self
    }

    /// How long every new worker (initial, respawned, added by scaling, or a rolling restart's
    /// replacement) has to report ready (default 60 s). One that misses it is killed: a
    /// replacement fails its rollout (the old workers keep serving), any other counts as a crash
    /// (a boot failure), so crash protection stops a slot that never gets ready.
    pub fn ready_timeout(mut self, timeout: Duration) -> Cluster {
        self.s.ready_timeout = timeout;
        self
    }

    /// How many slots a rolling restart replaces at once (default 1), as Kubernetes' `maxSurge`
    /// for a Deployment: up to `n` replacements start next to the old workers at a time, each
    /// old worker is asked to stop once its own replacement is ready, and the next slot's
    /// replacement starts as soon as one is. Capacity (ready workers) never drops below the
    /// configured count, and a rollout of `N` workers takes about `N / n` start-ups instead of
    /// `N`. Replacements start in slot order; a restart asked for meanwhile still coalesces
    /// into one more rollout.
    ///
    /// The first replacement that fails (it exits, cannot be started, or is not ready within
    /// the [`ready_timeout`](Cluster::ready_timeout)) stops the rollout at once: the other
    /// replacements still starting are stopped too and their slots keep their old workers, like
    /// the slots not reached yet; the slots already replaced keep their new ones.
    ///
    /// # Caveats
    ///
    /// Memory and CPU: during a rollout up to `n` workers run beyond the configured count (they
    /// all start at the same time), next to the old workers still draining (each for at most
    /// the [`shutdown_timeout`](Cluster::shutdown_timeout)). The rollout does not look at the
    /// cgroup's memory headroom (recycling does): choose `n` so that `n` more workers fit. A
    /// value above the worker count replaces every slot at once (twice the workers for a
    /// moment). [`init`](Cluster::init) refuses 0 ([`Error::InvalidOption`], `max_surge`).
    pub fn max_surge(mut self, n: usize) -> Cluster {
        self.s.max_surge = n;
        self
    }

    /// How long the new master of an upgrade in place (`SIGUSR1`, [`MasterHandle::upgrade`](crate::MasterHandle::upgrade),
    /// `ecewo-cluster upgrade`) has to get its workers ready, from its start (default: the
    /// ready timeout, plus the start-up's pacing of the workers, plus 10 s for the new master's
    /// own start). Past it, it is killed and the old master keeps serving.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Cluster {
        self.s.upgrade_timeout = Some(timeout);
        self
    }

    /// Upgrades of the master in place go slot by slot by default (`SIGUSR1`,
    /// [`MasterHandle::upgrade`](crate::MasterHandle::upgrade); the CLI's `upgrade --surge` or
    /// `--slot-by-slot` choose for one upgrade): the new master starts one worker at a time,
    /// and the old master stops its worker of a slot once the new worker of that slot is ready,
    /// so that at most one worker more than the slots runs at any time, instead of twice as
    /// many. Slower (each slot waits for the old worker's drain), for hosts or containers whose
    /// memory does not fit two full sets of workers. Default `false`: the new master starts all
    /// its workers next to the old ones.
    pub fn upgrade_slot_by_slot(mut self, slot_by_slot: bool) -> Cluster {
        self.s.upgrade_slot_by_slot = slot_by_slot;
        self
    }

    /// On `SIGTERM` (or any shutdown request), keep serving for `delay` before draining
    /// (default 0: drain at once). Meanwhile the cluster reports not-ready at once (the admin
    /// listener's `/readyz` answers 503, systemd hears `STOPPING=1` and a `STATUS=`), accepts
    /// and serves as before, and refuses restarts and scaling; then it drains as without a
    /// delay. A second request skips what is left of the delay.
    ///
    /// For Kubernetes, which removes a pod from its Service's endpoints at the same time as it
    /// sends `SIGTERM` (so connections keep arriving for a few seconds): 5 s, with
    /// `terminationGracePeriodSeconds` above `shutdown_delay + shutdown_timeout`; no `preStop`
    /// hook is needed.
    pub fn shutdown_delay(mut self, delay: Duration) -> Cluster {
        self.s.shutdown_delay = delay;
        self
    }

    /// How many workers must be ready for the readiness probe (`/readyz` on the
    /// [`admin`](Cluster::admin) listener, `ecewo-cluster probe ready`) to pass (default 1).
    pub fn min_ready(mut self, workers: usize) -> Cluster {
        self.s.min_ready = workers;
        self
    }

    /// An admin listener served by the master itself (default: none), TCP or a unix socket
    /// file: `GET /livez` (200 while the cluster can run a worker, 503 once none can),
    /// `/readyz` (200 while at least [`min_ready`](Cluster::min_ready) workers are ready and no
    /// shutdown was asked for), `/startupz` (200 once the start-up completed) and `/metrics`
    /// (the Prometheus text). For Kubernetes probes and scrapers; bind it to a port the
    /// application does not serve.
    ///
    /// ```
    /// use ecewo_cluster::{Cluster, ListenAddr};
    /// let cluster = Cluster::new(8080).admin(ListenAddr::Tcp("0.0.0.0:9090".parse().unwrap()));
    /// assert!(cluster.validate().is_ok());
    /// ```
    ///
    /// # Caveats
    ///
    /// Answers come from the master's loop, bounded (256 connections, an 8 KiB request head, 5 s
    /// per request): it never blocks supervision, and a flood of clients is turned away rather
    /// than queued. A Linux abstract socket ([`ListenAddr::Abstract`]) is refused by
    /// [`validate`](Cluster::validate).
    pub fn admin(mut self, addr: ListenAddr) -> Cluster {
        self.s.admin = Some(addr);
        self
    }

    /// Workers run `program` with `args` instead of this program: any server, in any language,
    /// gets the cluster's supervision without linking this library (what `ecewo-cluster run --
    /// CMD` does). A bare name is looked up in `PATH` at [`init`](Cluster::init).
    ///
    /// Each worker gets, by the systemd conventions: its listeners from fd 3 (`LISTEN_FDS`,
    /// `LISTEN_FDNAMES`, `LISTEN_PID` = its own pid), its slot (`ECEWO_CLUSTER_WORKER_ID`, and
    /// `ECEWO_CLUSTER_WORKERS`, `ECEWO_CLUSTER_PORT`), and a private `NOTIFY_SOCKET` owned by the
    /// master: `READY=1` marks it ready, `WATCHDOG=1` is its heartbeat (`WATCHDOG_USEC` is set
    /// when a [`worker_timeout`](Cluster::worker_timeout) applies), `STATUS=` shows in the
    /// statistics, `STOPPING=1` is noted. Programs that cannot notify use
    /// [`ready_after`](Cluster::ready_after). A rolling restart runs the command anew, so
    /// replacing its files deploys.
    ///
    /// ```no_run
    /// use ecewo_cluster::{Cluster, Role};
    /// let role = Cluster::new(8000).command("python3", ["server.py"]).init()?;
    /// if let Role::Master(master) = role {
    ///     master.wait()?;
    /// }
    /// # Ok::<(), ecewo_cluster::Error>(())
    /// ```
    ///
    /// # Caveats
    ///
    /// - Notifications are taken from a worker's own process or its direct children (so that
    ///   `systemd-notify --ready` works from a script); anything else sent to the socket is
    ///   ignored. The socket file is in the user's private control directory.
    /// - Request counts (`max_requests`, the `requests` statistics) need this library in the
    ///   worker; a command's workers report none.
    pub fn command<I, A>(mut self, program: impl Into<std::ffi::OsString>, args: I) -> Cluster
    where
        I: IntoIterator<Item = A>,
        A: Into<std::ffi::OsString>,
    {
        let (ready_after, compat) = self.s.command.take().map(|c| (c.ready_after, c.compat)).unwrap_or_default();
        self.s.command = Some(WorkerCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            ready_after,
            compat,
        });
        self
    }

    /// With [`command`](Cluster::command): a worker is taken for ready `delay` after it starts,
    /// for programs that cannot send `READY=1` (default: they must send it).
    pub fn ready_after(mut self, delay: Duration) -> Cluster {
        self.command_mut().ready_after = Some(delay);
        self
    }

    /// With [`command`](Cluster::command): also give each worker another supervisor's variables
    /// (repeatable).
    pub fn compat(mut self, compat: Compat) -> Cluster {
        let c = self.command_mut();
        if !c.compat.contains(&compat) {
            c.compat.push(compat);
        }
        self
    }

    /// The command settings, created empty if `command` was not called yet (validate then
    /// refuses them).
    fn command_mut(&mut self) -> &mut WorkerCommand {
        self.s.command.get_or_insert_with(|| WorkerCommand {
            program: std::ffi::OsString::new(),
            args: Vec::new(),
            ready_after: None,
            compat: Vec::new(),
        })
    }

    /// How long a ready worker may go without a heartbeat before it counts as hung (default
    /// 30 s; [`Duration::ZERO`] turns the check off). The check applies to a worker from its
    /// first heartbeat on: the `serve` helpers beat on their own, from a task on the serving
    /// runtime (so a runtime blocked by a synchronous call stops beating); a blocking server
    /// calls [`Worker::heartbeat`](crate::Worker::heartbeat) from its loop; a worker that never
    /// beats is never taken for hung.
    ///
    /// A hung worker is taken out of the route at once (`Balance::ReusePort`: no new
    /// connection goes to it), its state is logged (`/proc` `wchan`, system call, threads), it
    /// gets [`hung_signal`](Cluster::hung_signal) (`SIGABRT` by default) and `SIGKILL` after a
    /// grace (2 s); its exit counts as a crash (reason `hung`) and the slot respawns through the
    /// readiness gate.
    pub fn worker_timeout(mut self, timeout: Duration) -> Cluster {
        self.s.liveness.worker_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// How often workers beat (default 1 s, and at most a third of the worker timeout). Workers
    /// learn it at start ([`Worker::heartbeat_interval`](crate::Worker::heartbeat_interval)).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Cluster {
        self.s.heartbeat = Some(interval);
        self
    }

    /// What a hung worker gets first (default `SIGABRT`, so that it can dump where it is stuck:
    /// a core, or a handler's backtrace), and how long before `SIGKILL` follows (default 2 s).
    pub fn hung_signal(mut self, signal: Signal, grace: Duration) -> Cluster {
        self.s.liveness.hung_signal = signal;
        self.s.liveness.hung_grace = grace;
        self
    }

    /// Recycle each worker after it served about `requests` requests (default: never), as the
    /// `serve` helpers count them (or [`Worker::track_request`](crate::Worker::track_request)).
    /// A recycle starts a replacement first and stops the old worker once the new one is
    /// ready (no capacity lost, never counted as a crash); see
    /// [`max_recycling`](Cluster::max_recycling).
    pub fn max_requests(mut self, requests: u64) -> Cluster {
        self.s.liveness.max_requests = Some(requests);
        self
    }

    /// Adds a random number of requests from 0 to `jitter` to each worker's
    /// [`max_requests`](Cluster::max_requests), so that workers started together are not
    /// recycled together (default 0).
    pub fn max_requests_jitter(mut self, jitter: u64) -> Cluster {
        self.s.liveness.max_requests_jitter = jitter;
        self
    }

    /// Recycle each worker once it is `age` old (default: never).
    pub fn max_age(mut self, age: Duration) -> Cluster {
        self.s.liveness.max_age = Some(age);
        self
    }

    /// Adds a random time from 0 to `jitter` to each worker's [`max_age`](Cluster::max_age)
    /// (default 0).
    pub fn max_age_jitter(mut self, jitter: Duration) -> Cluster {
        self.s.liveness.max_age_jitter = jitter;
        self
    }

    /// Recycle a worker whose memory stays above `bytes` for several readings in a row
    /// (default: never; see [`memory_check`](Cluster::memory_check) and
    /// [`memory_measure`](Cluster::memory_measure)). When the cgroup's memory limit leaves no
    /// room for one more worker, the worker is replaced in place (it drains, then its slot
    /// respawns at once) instead of surge first.
    pub fn max_memory(mut self, bytes: u64) -> Cluster {
        self.s.liveness.max_memory = Some(bytes);
        self
    }

    /// What [`max_memory`](Cluster::max_memory) is compared with (default
    /// [`MemoryMeasure::Rss`]).
    pub fn memory_measure(mut self, measure: MemoryMeasure) -> Cluster {
        self.s.memory_measure = measure;
        self
    }

    /// How often the workers' memory is read, and how many readings in a row above
    /// [`max_memory`](Cluster::max_memory) trigger a recycle (default every 1 s, 3 readings).
    pub fn memory_check(mut self, interval: Duration, samples: u32) -> Cluster {
        self.s.liveness.memory_interval = interval;
        self.s.liveness.memory_samples = samples;
        self
    }

    /// How many slots may be recycling at the same time (default 1); the others wait.
    pub fn max_recycling(mut self, slots: usize) -> Cluster {
        self.s.liveness.max_recycling = slots;
        self
    }

    /// Exponential backoff between respawns of a slot that keeps crashing, instead of the fixed
    /// [`worker_respawn_delay`](Cluster::worker_respawn_delay): the `n`th crash in a row waits
    /// `base × 2^(n-1)`, at most `max`, less a random part of up to half (so that slots crashing
    /// together do not respawn together). A worker that ran for the crash window
    /// ([`respawn_window`](Cluster::respawn_window)) starts the sequence again.
    ///
    /// # Caveats
    ///
    /// Crash protection still counts crashes within `respawn_window`, but a backoff that grows
    /// past `respawn_window / respawn_max_crashes` spaces crashes so that fewer fall within one
    /// window: with base 10 s, a window of 60 s and 5 crashes, a slot is never disabled. Keep
    /// `max` below that, or rely on the backoff alone to bound the cost of a crash loop.
    pub fn respawn_backoff(mut self, base: Duration, max: Duration) -> Cluster {
        self.s.liveness.backoff = Some(Backoff { base, max });
        self
    }

    /// A slot disabled by crash protection gets one probe spawn after `cooloff` (default:
    /// never, the spec's behaviour): ready, the slot is enabled again; crashed, it is disabled
    /// again until the next cool-off.
    pub fn respawn_cooloff(mut self, cooloff: Duration) -> Cluster {
        self.s.liveness.cooloff = Some(cooloff);
        self
    }

    /// The cluster's name, used for its control socket (`<name>-<port>.sock`) and in `ecewo-cluster
    /// list` (default: the program's file name).
    pub fn name(mut self, name: impl Into<String>) -> Cluster {
        self.s.name = Some(name.into());
        self
    }

    /// Puts the control socket at `path` instead of the default,
    /// `$XDG_RUNTIME_DIR/ecewo-cluster/<name>-<port>.sock` (or a per-user directory under the
    /// temporary directory).
    pub fn control_socket(mut self, path: impl Into<std::path::PathBuf>) -> Cluster {
        self.s.control = ControlSetting::Path(path.into());
        self
    }

    /// Runs without a control socket (the `ecewo-cluster` CLI cannot reach this cluster then).
    pub fn no_control_socket(mut self) -> Cluster {
        self.s.control = ControlSetting::Off;
        self
    }

    /// Captures the workers' output instead of letting them inherit the master's stdout and
    /// stderr (the default): the master reads each worker's stdout and stderr through pipes,
    /// writes every line prefixed with the worker (`[worker 3 pid 1234] text`) or as JSON to
    /// its own stdout or to a log file, and keeps the recent lines for `ecewo-cluster logs`. A
    /// worker is never blocked by a slow reader of that output: lines are dropped and counted
    /// instead. See [`CaptureOutput`] for the options and the caveats.
    ///
    /// # Errors
    ///
    /// None here; [`init`](Cluster::init) (and [`validate`](Cluster::validate)) fail with
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) for options out of range (see
    /// [`CaptureOutput`]) or a log file's reopen signal also bound with
    /// [`on_signal`](Cluster::on_signal), and `init` with [`Error::LogFile`](crate::Error::LogFile)
    /// when the log file cannot be opened (or is not a regular file).
    ///
    /// # Caveats
    ///
    /// With the output captured to the master's stdout (or to a stderr that is the same pipe,
    /// `2>&1`, systemd's journal stream), nothing on the master's thread may write to that
    /// stream with a blocking write: the writer of the captured output holds the standard
    /// library's stdout lock while a stdout nobody reads is full, so a `println!` in an
    /// `on_*` callback, or a `tracing` subscriber writing to stdout (`tracing_subscriber::fmt()`
    /// does by default), would stop the master's loop, and then the workers. Route the master's
    /// logs through `ecewo_cluster::logging` (feature `logging`: it writes stderr from a
    /// lossy queue of its own, so it is safe) or another non-blocking writer, or capture to a
    /// file ([`CaptureOutput::to_file`]).
    pub fn capture_output(mut self, capture: CaptureOutput) -> Cluster {
        self.s.capture = Some(capture);
        self
    }

    /// Called on the master thread when a worker process was started (the spec's
    /// `on_worker_start(worker_id, pid)`).
    pub fn on_start(mut self, f: impl FnMut(&WorkerInfo) + 'static) -> Cluster {
        self.s.on_start = Some(Box::new(f));
        self
    }

    /// Called on the master thread when a worker process ended (the spec's
    /// `on_worker_exit(worker_id, exit_status, is_crash)`).
    pub fn on_exit(mut self, f: impl FnMut(&WorkerExit) + 'static) -> Cluster {
        self.s.on_exit = Some(Box::new(f));
        self
    }

    /// Called on the master thread when a worker reported ready.
    pub fn on_worker_ready(mut self, f: impl FnMut(&WorkerInfo) + 'static) -> Cluster {
        self.s.on_worker_ready = Some(Box::new(f));
        self
    }

    /// Called once on the master thread when every initial worker has reported ready.
    pub fn on_ready(mut self, f: impl FnMut(&ReadyInfo) + 'static) -> Cluster {
        self.s.on_ready = Some(Box::new(f));
        self
    }

    /// Runs `action` on the master thread when the master receives `signal`, with a handle to
    /// act on the cluster: the spec's "Method 2" without an unsafe signal handler.
    ///
    /// ```
    /// use ecewo_cluster::{Cluster, Signal};
    ///
    /// // SIGHUP: forward a configuration reload to every worker as SIGUSR1.
    /// let opts = Cluster::new(3000).on_signal(Signal::HUP, |master| {
    ///     let _ = master.signal_workers(Signal::USR1);
    /// });
    /// # let _ = opts;
    /// ```
    ///
    /// Only the signals in [`BINDABLE_SIGNALS`] can be bound; [`init`](Cluster::init) refuses
    /// others. Binding a signal twice keeps the last action.
    pub fn on_signal(mut self, signal: Signal, action: impl FnMut(&crate::MasterHandle) + 'static) -> Cluster {
        self.s.on_signal.retain(|(s, _)| *s != signal);
        self.s.on_signal.push((signal, Box::new(action)));
        self
    }

    /// Keeps the last `entries` of the event history (default
    /// [`DEFAULT_EVENT_HISTORY`](crate::DEFAULT_EVENT_HISTORY), 1000; at most
    /// [`MAX_EVENT_HISTORY`](crate::MAX_EVENT_HISTORY)): every spawn, ready, exit, signal,
    /// recycle, restart, scale and upgrade, with its time ([`ClusterEvent`](crate::ClusterEvent)).
    /// `ecewo-cluster events`, [`MasterHandle::events`](crate::MasterHandle::events) and the
    /// control protocol read it. 0 turns the history off: nothing is kept and nothing can be
    /// followed (an [`event_log`](Cluster::event_log) and [`on_event`](Cluster::on_event) still
    /// get every entry). An entry kept costs about 250 bytes (the ring and the copy handles read).
    pub fn event_history(mut self, entries: usize) -> Cluster {
        self.s.event_history = entries;
        self
    }

    /// Appends every entry of the event history to the file at `path`, one JSON line each (the
    /// shape of [`ClusterEvent`](crate::ClusterEvent)'s serialization, as `ecewo-cluster events
    /// --json` prints it). The file is created if missing (mode 0640), opened again when
    /// log rotation moved it away (checked before each write), and written by a thread of the
    /// master, never by its loop: the loop queues each batch of entries and goes on. A failing
    /// write is logged once and writing goes on with the next batch.
    ///
    /// # Errors
    ///
    /// [`init`](Cluster::init) fails with [`Error::LogFile`] if the file cannot be opened for
    /// appending, or if the path names anything but a regular file (a FIFO, `/dev/stdout`,
    /// `/dev/null`, a socket): such a sink could block the master's writes, or its `open`. To
    /// stream the events to another program, use `ecewo-cluster events -f --json` or
    /// [`on_event`](Cluster::on_event). An empty path or a directory is
    /// [`Error::InvalidOption`] (`event_log`).
    ///
    /// # Caveats
    ///
    /// The queue for the writer is bounded (20 000 entries, 8 MiB): on a file system that
    /// stalls (a hung network mount), entries that do not fit are dropped whole, counted, and
    /// a warning gives their number (at most every 5 s); the history and `ecewo-cluster
    /// events` still have them. At the master's end the writer gets a second to write out
    /// what is queued. If rotation leaves something other than a regular file at the path,
    /// the writer says so once and goes on appending to the file it holds.
    pub fn event_log(mut self, path: impl Into<std::path::PathBuf>) -> Cluster {
        self.s.event_log = Some(path.into());
        self
    }

    /// Called on the master thread with every entry of the event history as it is recorded
    /// (after the supervisor's decision, once its commands were carried out). Keep it short:
    /// the master's loop waits for it.
    pub fn on_event(mut self, f: impl FnMut(&crate::ClusterEvent) + 'static) -> Cluster {
        self.s.on_event = Some(Box::new(f));
        self
    }

    /// The number of workers `init` would start: [`cpus`](Cluster::cpus), or the detected CPU
    /// count when that is 0.
    pub fn worker_count(&self) -> usize {
        self.s.worker_count()
    }

    /// The options as the master takes them.
    pub(crate) fn into_settings(self) -> Settings {
        self.s
    }

    /// The liveness and recycling options' own checks (see [`validate`](Cluster::validate)).
    /// (Jitters may be anything: a limit plus its jitter saturates.)
    fn validate_liveness(&self) -> Result<(), Error> {
        let invalid = |option: &'static str, reason: String| Err(Error::InvalidOption { option, reason });
        let l = &self.s.liveness;
        if l.worker_timeout.is_some_and(|t| t < MIN_WORKER_TIMEOUT) {
            return invalid(
                "worker_timeout",
                format!(
                    "{:?} is shorter than the 100 ms supported (default 30 s; zero turns the check off)",
                    l.worker_timeout.unwrap_or_default()
                ),
            );
        }
        if let (Some(timeout), Some(beat)) = (l.worker_timeout, self.s.heartbeat)
            && beat.saturating_mul(2) > timeout
        {
            return invalid(
                "heartbeat_interval",
                format!(
                    "{beat:?} leaves no margin under the worker timeout of {timeout:?}; use at most half of it (a third is safer)"
                ),
            );
        }
        if self.s.heartbeat.is_some_and(|b| b.is_zero()) {
            return invalid("heartbeat_interval", "must be longer than zero (default 1 s)".into());
        }
        if l.max_requests == Some(0) {
            return invalid("max_requests", "must be at least 1 (leave it unset to never recycle by requests)".into());
        }
        if l.max_age.is_some_and(|a| a < MIN_MAX_AGE) {
            return invalid(
                "max_age",
                "must be at least 1 s: shorter, workers are replaced about as fast as they start (leave it unset to never recycle by age)".into(),
            );
        }
        if l.max_memory == Some(0) {
            return invalid("max_memory", "must be at least 1 byte (leave it unset to never recycle by memory)".into());
        }
        if l.memory_samples == 0 || l.memory_interval.is_zero() {
            return invalid(
                "memory_check",
                "needs an interval longer than zero and at least 1 reading (default 1 s, 3)".into(),
            );
        }
        if let Some(c) = &self.s.command {
            if c.program.is_empty() {
                return invalid("command", "ready_after and compat need a command: call Cluster::command".into());
            }
            if c.ready_after.is_some_and(|d| d > MAX_DURATION) {
                return invalid("ready_after", "is more than the one day supported".into());
            }
        }
        if self.s.min_ready == 0 {
            return invalid("min_ready", "must be at least 1 (default 1)".into());
        }
        if let Some(ListenAddr::Abstract(name)) = &self.s.admin {
            return invalid("admin", format!("@{name}: use a TCP address or a unix socket path"));
        }
        if l.max_recycling == 0 {
            return invalid("max_recycling", "must be at least 1 (default 1)".into());
        }
        if let Some(b) = l.backoff
            && (b.base.is_zero() || b.max < b.base)
        {
            return invalid(
                "respawn_backoff",
                format!(
                    "base {:?} and max {:?}: use a base longer than zero and a max at least the base",
                    b.base, b.max
                ),
            );
        }
        if l.cooloff.is_some_and(|c| c.is_zero()) {
            return invalid(
                "respawn_cooloff",
                "must be longer than zero (leave it unset to keep disabled slots disabled)".into(),
            );
        }
        Ok(())
    }

    /// Checks every option; [`init`](Cluster::init) calls it before anything is started.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`], naming the option (as its setter is named) and what to change:
    /// a worker count over [`MAX_WORKERS`], zero crashes or a zero crash window, a zero shutdown
    /// or ready timeout, a `max_surge` of 0, a duration over [`MAX_DURATION`], a backlog of 0,
    /// a bad name, a signal outside [`BINDABLE_SIGNALS`], a worker timeout under 100 ms, a
    /// heartbeat longer than half the worker timeout or of zero, a request or memory limit of 0,
    /// a `max_age` under 1 s, a `memory_check` of zero, `max_recycling` of 0, a backoff whose
    /// base is zero or whose `max` is below its base, a zero cool-off.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |option: &'static str, reason: String| Err(Error::InvalidOption { option, reason });
        let workers = self.worker_count();
        if workers > MAX_WORKERS {
            return invalid(
                "cpus",
                format!(
                    "{workers} workers is more than the {MAX_WORKERS} supported; use a smaller count (0 = one per CPU)"
                ),
            );
        }
        if self.s.respawn_max_crashes == 0 {
            return invalid("respawn_max_crashes", "must be at least 1 (default 3)".into());
        }
        if self.s.respawn_window.is_zero() {
            return invalid("respawn_window", "must be longer than zero (default 5 s)".into());
        }
        if self.s.shutdown_timeout.is_zero() {
            return invalid(
                "shutdown_timeout",
                "must be longer than zero: workers need time to finish their requests (default 15 s)".into(),
            );
        }
        for (option, value) in [
            ("shutdown_timeout", self.s.shutdown_timeout),
            ("worker_startup_delay", self.s.worker_startup_delay),
            ("worker_respawn_delay", self.s.worker_respawn_delay),
            ("respawn_window", self.s.respawn_window),
            ("ready_timeout", self.s.ready_timeout),
            ("worker_timeout", self.s.liveness.worker_timeout.unwrap_or_default()),
            ("heartbeat_interval", self.s.heartbeat.unwrap_or_default()),
            ("hung_signal", self.s.liveness.hung_grace),
            ("max_age", self.s.liveness.max_age.unwrap_or_default()),
            ("max_age_jitter", self.s.liveness.max_age_jitter),
            ("memory_check", self.s.liveness.memory_interval),
            ("respawn_backoff", self.s.liveness.backoff.map(|b| b.max.max(b.base)).unwrap_or_default()),
            ("respawn_cooloff", self.s.liveness.cooloff.unwrap_or_default()),
            ("shutdown_delay", self.s.shutdown_delay),
            ("upgrade_timeout", self.s.upgrade_timeout.unwrap_or_default()),
        ] {
            if value > MAX_DURATION {
                return invalid(option, format!("{value:?} is more than the one day supported; use a shorter time"));
            }
        }
        if self.s.ready_timeout.is_zero() {
            return invalid("ready_timeout", "must be longer than zero (default 60 s)".into());
        }
        if self.s.max_surge == 0 {
            return invalid(
                "max_surge",
                "must be at least 1: the replacements a rolling restart starts at once (default 1)".into(),
            );
        }
        if self.s.upgrade_timeout.is_some_and(|t| t.is_zero()) {
            return invalid(
                "upgrade_timeout",
                "must be longer than zero: the new master needs time to start its workers".into(),
            );
        }
        self.validate_liveness()?;
        if self.s.backlog == 0 || self.s.backlog > i32::MAX as u32 {
            return invalid(
                "backlog",
                format!(
                    "{} is out of range; use 1 to 2147483647 (default 1024; the kernel caps it at net.core.somaxconn)",
                    self.s.backlog
                ),
            );
        }
        check_listeners(&self.s.all_listeners())?;
        if let Some(name) = &self.s.name
            && (name.is_empty() || name.contains('/') || name.len() > 64)
        {
            return invalid("name", format!("{name:?}: use 1 to 64 characters without '/'"));
        }
        if let Some(capture) = &self.s.capture {
            capture.validate()?;
            if let Some(sig) = capture.file_reopen_signal().filter(|sig| self.s.on_signal.iter().any(|(s, _)| s == sig))
            {
                return invalid(
                    "capture_output",
                    format!(
                        "the log file's reopen signal {sig} is also bound with on_signal; choose another reopen_signal"
                    ),
                );
            }
        }
        if self.s.event_history > crate::events::MAX_EVENT_HISTORY {
            return invalid(
                "event_history",
                format!(
                    "{} entries is more than the {} supported (default {}; 0 turns the history off)",
                    self.s.event_history,
                    crate::events::MAX_EVENT_HISTORY,
                    crate::events::DEFAULT_EVENT_HISTORY
                ),
            );
        }
        if self.s.event_log.as_ref().is_some_and(|p| p.as_os_str().is_empty() || p.is_dir()) {
            return invalid("event_log", "needs the path of a file (it is created if missing)".into());
        }
        if let Some((sig, _)) = self.s.on_signal.iter().find(|(s, _)| !BINDABLE_SIGNALS.contains(s)) {
            return invalid(
                "on_signal",
                format!(
                    "{sig} cannot be bound; use one of SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGALRM, SIGTTIN, SIGTTOU"
                ),
            );
        }
        Ok(())
    }
}

/// Names valid for `LISTEN_FDNAMES` and distinct, addresses distinct, backlogs in range.
fn check_listeners(all: &[(String, Listen)]) -> Result<(), Error> {
    use crate::master::ListenKind;
    if all.is_empty() {
        return Err(Error::NoListener);
    }
    // A worker accepts at most this many (`proto::handoff`); more would crash-loop every worker.
    if all.len() > 1024 {
        let name = &all[1024].0;
        return Err(Error::BadListener {
            name: name.clone(),
            reason: format!("{} listeners are more than the 1024 a worker takes; serve fewer", all.len()),
        });
    }
    let bad = |name: &str, reason: String| Err(Error::BadListener { name: name.to_owned(), reason });
    for (i, (name, listen)) in all.iter().enumerate() {
        if name.is_empty() || name.len() > 255 || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return bad(name, "use 1 to 255 printable ASCII characters without ':' or spaces".into());
        }
        if listen.backlog == 0 || listen.backlog > i32::MAX as u32 {
            return bad(name, format!("backlog {} is out of range; use 1 to 2147483647", listen.backlog));
        }
        for (other, earlier) in &all[..i] {
            if other == name {
                return bad(name, "two listeners have this name; give each listener its own".into());
            }
            let same = match (&listen.kind, &earlier.kind) {
                (ListenKind::Tcp { addr: a, .. }, ListenKind::Tcp { addr: b, .. }) => {
                    (a == b && a.port() != 0).then(|| a.to_string())
                }
                (ListenKind::Unix { path: a }, ListenKind::Unix { path: b }) => {
                    (a == b).then(|| a.display().to_string())
                }
                (ListenKind::Abstract { name: a }, ListenKind::Abstract { name: b }) => {
                    (a == b).then(|| format!("@{a}"))
                }
                _ => None,
            };
            if let Some(addr) = same {
                return bad(
                    name,
                    format!(
                        "{addr} is also the address of listener {other:?}; one listener serves every worker, so keep one"
                    ),
                );
            }
        }
        let is_file = matches!(listen.kind, ListenKind::Unix { .. });
        if listen.kind == ListenKind::Systemd && listen.balance != crate::master::Balance::default() {
            // Harmless, but say so: one passed socket cannot be split.
            tracing::debug!("listener {name:?}: a socket systemd passes is shared; its balance is ignored");
        }
        if !is_file && (listen.mode.is_some() || listen.owner != (None, None)) {
            return bad(name, "a mode or owner applies to unix socket files only; remove it".into());
        }
        if let ListenKind::Unix { path } = &listen.kind
            && path.as_os_str().is_empty()
        {
            return bad(name, "the unix socket path is empty; give a path".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_specs() {
        let c = Cluster::new(3000);
        assert_eq!(c.s.port, 3000);
        assert_eq!(c.s.cpus, 0);
        assert!(!c.s.respawn);
        assert_eq!(c.s.shutdown_timeout, Duration::from_millis(15_000));
        assert_eq!(c.s.worker_startup_delay, Duration::from_millis(100));
        assert_eq!(c.s.worker_respawn_delay, Duration::from_millis(100));
        assert_eq!(c.s.respawn_window, Duration::from_secs(5));
        assert_eq!(c.s.respawn_max_crashes, 3);
        assert_eq!(c.s.address, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(c.worker_count() >= 1);
        assert_eq!((c.s.event_history, c.s.event_log.is_none()), (1000, true));
        assert_eq!(c.s.max_surge, 1, "one slot at a time unless asked");
        c.validate().unwrap();
        Cluster::new(1).max_surge(MAX_WORKERS * 2).validate().unwrap();
        Cluster::new(1).event_history(0).validate().unwrap();
        Cluster::new(1).event_history(crate::MAX_EVENT_HISTORY).validate().unwrap();
    }

    #[test]
    fn invalid_options_name_the_option() {
        let cases = [
            (Cluster::new(1).respawn_max_crashes(0), "respawn_max_crashes"),
            (
                Cluster::new(1).worker_timeout(Duration::from_secs(1)).heartbeat_interval(Duration::from_secs(1)),
                "heartbeat_interval",
            ),
            (Cluster::new(1).heartbeat_interval(Duration::ZERO), "heartbeat_interval"),
            (Cluster::new(1).max_requests(0), "max_requests"),
            (Cluster::new(1).max_age(Duration::ZERO), "max_age"),
            (Cluster::new(1).max_age(Duration::from_millis(999)), "max_age"),
            (Cluster::new(1).worker_timeout(Duration::from_nanos(1)), "worker_timeout"),
            (Cluster::new(1).max_memory(0), "max_memory"),
            (Cluster::new(1).memory_check(Duration::from_secs(1), 0), "memory_check"),
            (Cluster::new(1).max_recycling(0), "max_recycling"),
            (Cluster::new(1).max_surge(0), "max_surge"),
            (Cluster::new(1).respawn_backoff(Duration::from_secs(2), Duration::from_secs(1)), "respawn_backoff"),
            (Cluster::new(1).respawn_cooloff(Duration::ZERO), "respawn_cooloff"),
            (Cluster::new(1).min_ready(0), "min_ready"),
            (Cluster::new(1).admin(ListenAddr::Abstract("x".into())), "admin"),
            (Cluster::new(1).shutdown_delay(Duration::from_secs(200_000)), "shutdown_delay"),
            (Cluster::new(1).max_age(Duration::from_secs(200_000)), "max_age"),
            (Cluster::new(1).respawn_window(Duration::ZERO), "respawn_window"),
            (Cluster::new(1).cpus(MAX_WORKERS + 1), "cpus"),
            (Cluster::new(1).shutdown_timeout(Duration::ZERO), "shutdown_timeout"),
            (Cluster::new(1).backlog(0), "backlog"),
            (Cluster::new(1).ready_timeout(Duration::MAX), "ready_timeout"),
            (Cluster::new(1).shutdown_timeout(Duration::from_secs(u64::MAX)), "shutdown_timeout"),
            (Cluster::new(1).on_signal(Signal::TERM, |_| {}), "on_signal"),
            (Cluster::new(1).on_signal(Signal::CHLD, |_| {}), "on_signal"),
            (Cluster::new(1).on_signal(Signal::from_raw(40).unwrap(), |_| {}), "on_signal"),
            (Cluster::new(1).event_history(crate::MAX_EVENT_HISTORY + 1), "event_history"),
            (Cluster::new(1).event_log(""), "event_log"),
            (Cluster::new(1).event_log(std::env::temp_dir()), "event_log"),
        ];
        for (c, name) in cases {
            match c.validate() {
                Err(Error::InvalidOption { option, reason }) => {
                    assert_eq!(option, name);
                    assert!(!reason.is_empty());
                }
                other => panic!("{name}: expected InvalidOption, got {other:?}"),
            }
        }
    }

    #[test]
    fn more_than_255_workers_is_fine() {
        Cluster::new(1).cpus(1000).validate().unwrap();
    }

    #[test]
    fn balance_parses() {
        assert_eq!("shared".parse::<Balance>().unwrap(), Balance::Shared);
        assert_eq!("reuseport".parse::<Balance>().unwrap(), Balance::ReusePort);
        assert!("round-robin".parse::<Balance>().unwrap_err().contains("reuseport"));
    }

    #[test]
    fn listeners_with_one_name_or_address_or_a_bad_name_are_refused_naming_them() {
        use std::net::SocketAddr;
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let named = |name: &str| Cluster::new(8080).listen(name, Listen::tcp("127.0.0.1:9090".parse().unwrap()));
        assert!(named("admin").validate().is_ok());
        for (cluster, name, says) in [
            (named("default"), "default", "two listeners have this name"),
            (
                Cluster::new(0).listen("a", Listen::tcp(a)).listen("b", Listen::tcp(a)),
                "b",
                "also the address of listener \"a\"",
            ),
            (named("a:b"), "a:b", "without ':'"),
            (named(""), "", "1 to 255"),
            (named("x y"), "x y", "spaces"),
            (Cluster::new(0).listen("q", Listen::tcp(a).backlog(0)), "q", "backlog 0"),
            (Cluster::new(0).listen("m", Listen::tcp(a).mode(0o600)), "m", "unix socket files only"),
            (
                Cluster::new(0).listen("u", Listen::unix("/run/x.sock")).listen("w", Listen::unix("/run/x.sock")),
                "w",
                "/run/x.sock is also the address of listener \"u\"",
            ),
            (
                Cluster::new(0).listen("u", Listen::abstract_unix("x")).listen("w", Listen::abstract_unix("x")),
                "w",
                "@x is also",
            ),
        ] {
            match cluster.validate() {
                Err(e @ Error::BadListener { .. }) => {
                    let Error::BadListener { name: got, reason } = &e else { unreachable!() };
                    assert_eq!(got, name, "{e}");
                    assert!(reason.contains(says), "{e}");
                }
                other => panic!("{name:?}: expected BadListener, got {other:?}"),
            }
        }
        // Port 0 twice is two different ports.
        let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(Cluster::new(0).listen("a", Listen::tcp(zero)).listen("b", Listen::tcp(zero)).validate().is_ok());
        assert!(matches!(Cluster::new(0).no_default_listener().validate(), Err(Error::NoListener)));
    }
}
