//! What a master is built from: the options of a [`Cluster`](crate::Cluster) (which wraps a
//! [`Settings`]), and the types its callbacks receive. The builder lives in `config.rs`; the
//! master never imports it.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use super::MasterHandle;
use crate::error::Error;
use crate::signal::Signal;
use crate::stats::ExitStatus;
use crate::supervisor::MAX_WORKERS;

/// How connections are spread over the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balance {
    /// One `SO_REUSEPORT` socket per worker slot, all created and held by the master. The kernel
    /// hashes each new connection to one slot: no thundering herd. A replacement worker takes over
    /// its slot's socket, so connections queued there are never lost.
    #[default]
    ReusePort,
    /// One socket inherited by every worker. Nothing is ever hashed to a slot nobody serves, but
    /// every idle worker wakes for each new connection and busy workers win more of them.
    Shared,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::ReusePort => "reuseport",
            Balance::Shared => "shared",
        })
    }
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reuseport" | "reuse-port" => Ok(Balance::ReusePort),
            "shared" => Ok(Balance::Shared),
            other => Err(format!("unknown balance mode `{other}`: use `reuseport` or `shared`")),
        }
    }
}

/// Where the master's control socket goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum ControlSetting {
    /// `control::socket_path("<name>-<port>")`.
    #[default]
    Default,
    Path(std::path::PathBuf),
    Off,
}

pub(crate) type OnStart = Box<dyn FnMut(&WorkerInfo)>;
pub(crate) type OnExit = Box<dyn FnMut(&WorkerExit)>;
pub(crate) type OnReady = Box<dyn FnMut(&ReadyInfo)>;
pub(crate) type OnSignal = Box<dyn FnMut(&MasterHandle)>;
pub(crate) type OnEvent = Box<dyn FnMut(&crate::events::ClusterEvent)>;

/// A worker process, as [`Cluster::on_start`](crate::Cluster::on_start) and [`Cluster::on_worker_ready`](crate::Cluster::on_worker_ready) see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's slot, from 0.
    pub worker_id: usize,
    /// Its pid.
    pub pid: u32,
}

/// How a worker process ended, as [`Cluster::on_exit`](crate::Cluster::on_exit) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerExit {
    /// The worker's slot, from 0.
    pub worker_id: usize,
    /// Its pid.
    pub pid: u32,
    /// Its exit code or the signal that killed it.
    pub status: ExitStatus,
    /// It was not asked to stop and did not exit cleanly (the spec's `is_crash`); a hung
    /// worker's or a boot failure's exit is one too.
    pub crash: bool,
    /// Why it ended, as the statistics count it.
    pub reason: crate::stats::ExitReason,
    /// When the slot will be started again, if it will.
    pub respawn_in: Option<Duration>,
}

/// What the master knows when every initial worker has reported ready (see [`Cluster::on_ready`](crate::Cluster::on_ready)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadyInfo {
    /// The address of the cluster's first TCP listener, with the real port (also when port 0
    /// was asked for; port 0 when it has no TCP listener).
    pub addr: std::net::SocketAddr,
    /// Workers ready and serving.
    pub workers: usize,
}

/// A listening socket of the cluster, added by name with
/// [`Cluster::listen`](crate::Cluster::listen): where, with which backlog and (TCP) balance.
///
/// ```
/// use ecewo_cluster::{Balance, Cluster, Listen};
/// let cluster = Cluster::new(8080)
///     .listen("admin", Listen::tcp("127.0.0.1:9090".parse().unwrap()).balance(Balance::Shared))
///     .listen("v6", Listen::tcp("[::]:8443".parse().unwrap()).v6only(true).backlog(4096));
/// assert!(cluster.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listen {
    pub(crate) kind: ListenKind,
    pub(crate) backlog: u32,
    pub(crate) balance: Balance,
    /// Unix socket files: the mode and owner applied once bound.
    pub(crate) mode: Option<u32>,
    pub(crate) owner: (Option<u32>, Option<u32>),
}

/// Where a [`Listen`] listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ListenKind {
    /// TCP on this address; `v6only` for IPv6 addresses.
    Tcp { addr: std::net::SocketAddr, v6only: bool },
    /// A unix socket file.
    Unix { path: std::path::PathBuf },
    /// A Linux abstract unix socket name (without the leading NUL).
    Abstract { name: String },
    /// The socket systemd passed under the listener's name (socket activation).
    Systemd,
}

/// Where a listener listens, as bound (see [`ListenerInfo`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenAddr {
    /// TCP, with the real port.
    Tcp(std::net::SocketAddr),
    /// A unix socket file.
    Unix(std::path::PathBuf),
    /// A Linux abstract unix socket (shown as `@name`).
    Abstract(String),
}

impl ListenAddr {
    /// The TCP port, if it is TCP.
    pub fn port(&self) -> Option<u16> {
        match self {
            ListenAddr::Tcp(a) => Some(a.port()),
            _ => None,
        }
    }

    /// `"tcp"`, `"unix"` or `"abstract"`.
    pub fn kind(&self) -> &'static str {
        match self {
            ListenAddr::Tcp(_) => "tcp",
            ListenAddr::Unix(_) => "unix",
            ListenAddr::Abstract(_) => "abstract",
        }
    }
}

/// Reads `127.0.0.1:9090`, `[::1]:9090` (TCP), `unix:/run/app.sock` (a unix socket file) or
/// `@name` (a Linux abstract unix socket), as [`Display`](fmt::Display) writes them (a path
/// needs the `unix:` prefix).
///
/// ```
/// use ecewo_cluster::ListenAddr;
/// assert_eq!("127.0.0.1:9090".parse::<ListenAddr>(), Ok(ListenAddr::Tcp("127.0.0.1:9090".parse().unwrap())));
/// assert_eq!("unix:/run/a.sock".parse::<ListenAddr>(), Ok(ListenAddr::Unix("/run/a.sock".into())));
/// assert!("localhost".parse::<ListenAddr>().is_err());
/// ```
impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, like unix:/run/app.sock".into());
            }
            return Ok(ListenAddr::Unix(path.into()));
        }
        if let Some(name) = s.strip_prefix('@') {
            return Ok(ListenAddr::Abstract(name.to_owned()));
        }
        s.parse().map(ListenAddr::Tcp).map_err(|e| {
            format!("{s:?} is not an address ({e}): use IP:PORT such as 127.0.0.1:9090 or [::1]:9090, or unix:PATH")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
            ListenAddr::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

impl Listen {
    /// TCP on `addr` (port 0: any free port, the same for every worker). An IPv6 wildcard
    /// (`[::]`) is dual-stack (serves IPv4 too) unless [`v6only`](Listen::v6only) says otherwise.
    /// Backlog 1024, [`Balance::ReusePort`].
    pub fn tcp(addr: std::net::SocketAddr) -> Listen {
        Listen::of(ListenKind::Tcp { addr, v6only: false })
    }

    /// A unix socket file at `path`, shared by every worker. Its directory must exist and
    /// belong to this user (or root); a socket file left by a dead server is replaced, a live
    /// one is an error, and so is any other file there. The master removes the file at exit
    /// if it is still the one it created. Backlog 1024.
    pub fn unix(path: impl Into<std::path::PathBuf>) -> Listen {
        Listen::of(ListenKind::Unix { path: path.into() })
    }

    /// A Linux abstract unix socket `name` (no file; `@name` in `ss`), shared by every worker.
    pub fn abstract_unix(name: impl Into<String>) -> Listen {
        Listen::of(ListenKind::Abstract { name: name.into() })
    }

    /// The socket systemd passes under this listener's name (socket activation: the
    /// `FileDescriptorName=` of a `.socket` unit, or `systemd-socket-activate --fdname`), TCP
    /// or unix, shared by every worker. [`init`](crate::Cluster::init) fails with
    /// [`Error::BadListener`](crate::Error::BadListener) if systemd passed none of that name.
    pub fn systemd() -> Listen {
        Listen::of(ListenKind::Systemd)
    }

    fn of(kind: ListenKind) -> Listen {
        Listen { kind, backlog: 1024, balance: Balance::default(), mode: None, owner: (None, None) }
    }

    /// For an IPv6 address: serve IPv6 only (`IPV6_V6ONLY`), so that an IPv4 listener may use
    /// the same port. No effect on other listeners.
    pub fn v6only(mut self, on: bool) -> Listen {
        if let ListenKind::Tcp { v6only, .. } = &mut self.kind {
            *v6only = on;
        }
        self
    }

    /// For a unix socket file: its mode once bound (e.g. `0o660`; default: what the umask
    /// leaves). [`init`](crate::Cluster::init) refuses it on other listeners.
    pub fn mode(mut self, mode: u32) -> Listen {
        self.mode = Some(mode);
        self
    }

    /// For a unix socket file: its owner and group once bound (`None` keeps the master's).
    /// [`init`](crate::Cluster::init) refuses it on other listeners.
    pub fn owner(mut self, uid: Option<u32>, gid: Option<u32>) -> Listen {
        self.owner = (uid, gid);
        self
    }

    /// The accept-queue length asked of the kernel (capped by `net.core.somaxconn`), per socket.
    pub fn backlog(mut self, backlog: u32) -> Listen {
        self.backlog = backlog;
        self
    }

    /// How new connections are spread over the workers (TCP; unix sockets are always shared).
    pub fn balance(mut self, balance: Balance) -> Listen {
        self.balance = balance;
        self
    }
}

/// A listener as the master bound it (see [`Master::listeners`](crate::Master::listeners)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerInfo {
    /// Its name (`"default"` for the listener of `Cluster::new(port)`).
    pub name: String,
    /// Where it listens, with the real port.
    pub addr: ListenAddr,
    /// How its connections are spread.
    pub balance: Balance,
}

/// The cluster's options as the master uses them (see [`Cluster`](crate::Cluster) for each).
pub(crate) struct Settings {
    /// Whether `Cluster::new(port)`'s listener (`port`, `address`, `balance`, `backlog`) is
    /// served, as [`DEFAULT_LISTENER`](crate::proto::handoff::DEFAULT_LISTENER), first.
    pub(crate) default_listener: bool,
    /// Listeners added by name, in order.
    pub(crate) listeners: Vec<(String, Listen)>,
    pub(crate) port: u16,
    pub(crate) cpus: usize,
    pub(crate) respawn: bool,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) worker_startup_delay: Duration,
    pub(crate) worker_respawn_delay: Duration,
    pub(crate) respawn_window: Duration,
    pub(crate) respawn_max_crashes: u32,
    pub(crate) address: IpAddr,
    pub(crate) balance: Balance,
    pub(crate) backlog: u32,
    pub(crate) ready_timeout: Duration,
    /// Slots a rolling restart replaces at once (`Cluster::max_surge`).
    pub(crate) max_surge: usize,
    /// Heartbeats, recycling and backoff, as the supervisor applies them.
    pub(crate) liveness: crate::supervisor::Liveness,
    /// The interval workers beat at (`None`: derived from the worker timeout).
    pub(crate) heartbeat: Option<Duration>,
    /// What memory the `max_memory` limit is compared with.
    pub(crate) memory_measure: MemoryMeasure,
    /// How long the cluster reports not-ready and keeps serving before a shutdown drains.
    pub(crate) shutdown_delay: Duration,
    /// Ready workers the readiness probe needs.
    pub(crate) min_ready: usize,
    /// How long a new master started by an upgrade has to get ready (`None`: the ready timeout
    /// plus the start-up's pacing plus 10 s for its own start).
    pub(crate) upgrade_timeout: Option<Duration>,
    /// Upgrades go slot by slot by default.
    pub(crate) upgrade_slot_by_slot: bool,
    /// The admin listener (probes and metrics served by the master), if any.
    pub(crate) admin: Option<ListenAddr>,
    /// Workers run this command instead of this program (`Cluster::command`).
    pub(crate) command: Option<WorkerCommand>,
    pub(crate) name: Option<String>,
    pub(crate) control: ControlSetting,
    pub(crate) on_start: Option<OnStart>,
    pub(crate) on_exit: Option<OnExit>,
    pub(crate) on_worker_ready: Option<OnStart>,
    pub(crate) on_ready: Option<OnReady>,
    pub(crate) on_signal: Vec<(Signal, OnSignal)>,
    /// The workers' output, captured (`Cluster::capture_output`); `None`: inherited.
    pub(crate) capture: Option<super::CaptureOutput>,
    /// Entries the event history keeps (0: none).
    pub(crate) event_history: usize,
    /// The event log file (JSON lines), if any.
    pub(crate) event_log: Option<std::path::PathBuf>,
    pub(crate) on_event: Option<OnEvent>,
}

impl Settings {
    /// Every listener, in the order workers receive them: the default one first (if served).
    pub(crate) fn all_listeners(&self) -> Vec<(String, Listen)> {
        let default = self.default_listener.then(|| {
            let addr = std::net::SocketAddr::new(self.address, self.port);
            let listen = Listen::tcp(addr).backlog(self.backlog).balance(self.balance);
            (crate::proto::handoff::DEFAULT_LISTENER.to_owned(), listen)
        });
        default.into_iter().chain(self.listeners.iter().cloned()).collect()
    }

    /// The interval workers beat at: the one set, or 1 s, but at most a third of the worker
    /// timeout (so that a late beat or two is never taken for a hang).
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        let third = self.liveness.worker_timeout.map(|t| t / 3).unwrap_or(DEFAULT_HEARTBEAT);
        self.heartbeat.unwrap_or_else(|| DEFAULT_HEARTBEAT.min(third)).max(Duration::from_millis(1))
    }

    /// The number of workers to start: `cpus`, or the detected CPU count when that is 0.
    pub(crate) fn worker_count(&self) -> usize {
        if self.cpus == 0 { crate::os::cpu::cpus() } else { self.cpus }
    }
}

/// The command the workers of a [`Cluster::command`](crate::Cluster::command) cluster run, and
/// how they say they are ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerCommand {
    /// The program, as given (a bare name is looked up in `PATH` at `init`).
    pub(crate) program: std::ffi::OsString,
    /// Its arguments.
    pub(crate) args: Vec<std::ffi::OsString>,
    /// Taken for ready this long after they start, instead of when they send `READY=1`.
    pub(crate) ready_after: Option<Duration>,
    /// Compatibility variables for programs written for other supervisors.
    pub(crate) compat: Vec<Compat>,
}

/// Environment variables for programs written for other supervisors, besides systemd's
/// (`LISTEN_FDS`…), which every worker gets ([`Cluster::compat`](crate::Cluster::compat)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compat {
    /// einhorn's: `EINHORN_FD_COUNT` and `EINHORN_FD_0`, `EINHORN_FD_1`… (the listeners' fds).
    Einhorn,
    /// Server::Starter's: `SERVER_STARTER_PORT` (`PORT=FD;…` for each TCP listener, `PATH=FD`
    /// for unix ones).
    ServerStarter,
}

impl std::str::FromStr for Compat {
    type Err = String;
    fn from_str(s: &str) -> Result<Compat, String> {
        match s {
            "einhorn" => Ok(Compat::Einhorn),
            "server-starter" | "server_starter" => Ok(Compat::ServerStarter),
            other => Err(format!("unknown compatibility `{other}`: use einhorn or server-starter")),
        }
    }
}

/// The heartbeat interval when none is set (and the worker timeout leaves room for it).
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// The worker timeout when none is set: a ready worker that beat once and then stays silent
/// this long is hung.
pub(crate) const DEFAULT_WORKER_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Cluster::max_memory`](crate::Cluster::max_memory) is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MemoryMeasure {
    /// Resident memory (`/proc/PID/statm`): cheap to read; counts pages shared with the other
    /// workers (the program, copy-on-write data) in full.
    #[default]
    Rss,
    /// Proportional memory (`Pss` of `/proc/PID/smaps_rollup`): shared pages divided among the
    /// processes sharing them, so the workers' sum is what they really cost; dearer to read.
    Pss,
}

impl fmt::Display for MemoryMeasure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemoryMeasure::Rss => "rss",
            MemoryMeasure::Pss => "pss",
        })
    }
}

impl std::str::FromStr for MemoryMeasure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rss" => Ok(MemoryMeasure::Rss),
            "pss" => Ok(MemoryMeasure::Pss),
            other => Err(format!("unknown memory measure `{other}`: use `rss` or `pss`")),
        }
    }
}

/// Checks a number of workers asked for while running (`scale`).
pub(crate) fn check_scale(workers: usize) -> Result<(), Error> {
    if (1..=MAX_WORKERS).contains(&workers) {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            option: "scale",
            reason: format!("cannot scale to {workers} workers: use 1 to {MAX_WORKERS}"),
        })
    }
}
