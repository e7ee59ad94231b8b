//! `testbed`: the server the integration tests and benchmarks drive.
//!
//! Its options and endpoints are a fixed contract (see the README's "Testbed" section):
//! `GET /` → `Hello from worker <id>! pid=<pid> tag=<tag>`, `GET /slow?ms=N`, `GET /crash`
//! (abort), `GET /exit?code=N`, `GET /child-env` (the `ECEWO_CLUSTER_*` lines a program the
//! worker runs sees, one per line: none), `GET /listen-env` (`pid=P LISTEN_PID=… LISTEN_FDS=…
//! LISTEN_FDNAMES=… names=…`: the systemd convention as the worker received it), `GET
//! /hang?ms=N` (blocks the worker's runtime thread N ms, default 1000, then `hung N`: no
//! heartbeat meanwhile), `GET /leak?mb=N` (allocates N MiB, default 1, touches every page and
//! keeps it for the worker's life: `leaked N total T`, T the MiB leaked so far), `GET
//! /print?lines=N&bytes=M&stream=stdout|stderr` (writes N lines, default 1, of M bytes, default
//! 100, each `print P I M <filler>` with P the pid, I the line's number and the filler one
//! letter repeated so the line is M bytes, one write each, then answers `printed N`), `GET
//! /burst?mb=N` (writes N MiB of such lines, default 8, in one write: `burst N`). Each worker
//! logs `testbed worker ID pid PID starting` at start. Once every worker is ready the master prints exactly
//! one line on stdout: `ready: N workers on port P`. SIGHUP prints `stats: <JSON>` and sends
//! SIGUSR1 to the workers, unless `--default-sighup` leaves it to the library (a graceful
//! shutdown).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Parser;
use ecewo_cluster::logging::{self, LogFormat};
use ecewo_cluster::serve::{ServeOptions, cluster_stats, run_worker, serve};
use ecewo_cluster::{Balance, CaptureFormat, CaptureOutput, Cluster, Role, Signal, Worker};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
// A later option overrides an earlier one: an upgrade's new build can be a script that runs
// the testbed with the old arguments plus its own (`exec testbed "$@" --workers 3`).
#[command(
    version,
    about = "Test server for ecewo-cluster's integration tests and benchmarks",
    args_override_self = true
)]
struct Args {
    /// Port to listen on (0: any free port; the ready line tells which).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    address: IpAddr,
    /// Number of workers (0: one per CPU).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Respawn workers that exit unasked.
    #[arg(long)]
    respawn: bool,
    /// How connections are spread: reuseport or shared.
    #[arg(long, default_value = "reuseport")]
    balance: Balance,
    /// Shutdown timeout in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    shutdown_timeout_ms: u64,
    /// Crash-protection window in seconds.
    #[arg(long, default_value_t = 5)]
    respawn_window_sec: u64,
    /// Crashes within the window that disable a worker.
    #[arg(long, default_value_t = 3)]
    respawn_max_crashes: u32,
    /// Delay before a respawn, in milliseconds.
    #[arg(long, default_value_t = 100)]
    respawn_delay_ms: u64,
    /// Delay between initial spawns, in milliseconds.
    #[arg(long, default_value_t = 100)]
    startup_delay_ms: u64,
    /// A worker waits this long before it reports ready.
    #[arg(long, default_value_t = 0)]
    ready_delay_ms: u64,
    /// A worker that has not reported ready this long after it started is killed and counts as
    /// a crash (a boot failure); a rollout's replacement fails the rollout instead.
    #[arg(long, default_value_t = 60_000)]
    ready_timeout_ms: u64,
    /// Slots a rolling restart replaces at once (`Cluster::max_surge`).
    #[arg(long, default_value_t = 1)]
    max_surge: usize,
    /// Each worker exits with code 1 at start.
    #[arg(long)]
    crash_on_start: bool,
    /// A worker that finds this file at start exits with code 1 before it is ready.
    #[arg(long)]
    fail_if_file: Option<PathBuf>,
    /// Each worker shows the first line of this file as its tag (`none` when missing).
    #[arg(long)]
    tag_file: Option<PathBuf>,
    /// Only the worker with this id exits with code 1 at start (a slot that crash-loops).
    #[arg(long)]
    crash_on_start_id: Option<usize>,
    /// The master's `on_worker_ready` callback panics (supervision must go on).
    #[arg(long)]
    panic_in_callbacks: bool,
    /// The cluster's name (its control socket is `<name>-<port>.sock`).
    #[arg(long)]
    name: Option<String>,
    /// Put the control socket here.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Run without a control socket.
    #[arg(long)]
    no_control_socket: bool,
    /// A thread of the master calls `MasterHandle::restart_and_wait` this long after start and
    /// prints `restart: <outcome as JSON>` on stdout.
    #[arg(long)]
    restart_after_ms: Option<u64>,
    /// Each worker writes the number of requests it served to `DIR/worker-<id>-<pid>.count` when
    /// it exits (for fairness measurements).
    #[arg(long)]
    count_dir: Option<PathBuf>,
    /// No cluster: serve the same handler in this one process (a benchmark baseline), with a
    /// plain hyper accept loop and no drain logic. Prints `ready: standalone on port P`.
    #[arg(long)]
    standalone: bool,
    /// With --standalone: tokio worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// With --standalone: bind with `SO_REUSEPORT`, so that several standalone processes can
    /// share one port (the kernel spreads connections by hash): the baseline of N processes
    /// without a cluster. Give a fixed `--port`.
    #[arg(long)]
    reuseport: bool,
    /// The master asks for a graceful shutdown through a `MasterHandle`, from another thread,
    /// this long after start.
    #[arg(long)]
    stop_after_ms: Option<u64>,
    /// Do not bind SIGHUP (which otherwise prints the statistics): the library's default, a
    /// graceful shutdown, applies.
    #[arg(long)]
    default_sighup: bool,
    /// A listener `NAME=ADDR` (repeatable; ADDR as `127.0.0.1:0`, `[::1]:0`, `0.0.0.0:P`,
    /// `unix:PATH`, or `systemd`: the socket systemd passes under NAME):
    /// with any, the cluster serves exactly these (not `--port`), every endpoint on every one,
    /// and the master prints `listener NAME ADDR` (the bound address) for each before its
    /// ready line, whose port is then the first TCP listener's.
    #[arg(long = "listen", value_name = "NAME=ADDR", value_parser = parse_listen)]
    listen: Vec<(String, ListenAt)>,
    /// The workers' `ServeOptions::idle_grace`, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    idle_grace_ms: u64,
    /// A ready worker silent (no heartbeat) this long is hung: routed away, signalled, killed
    /// (0: no check; default: the library's, 30 s).
    #[arg(long)]
    worker_timeout_ms: Option<u64>,
    /// How often workers beat (default: the library's, 1 s at most).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Time between a hung worker's first signal (SIGABRT) and SIGKILL.
    #[arg(long, default_value_t = 2000)]
    hung_grace_ms: u64,
    /// The signal a hung worker gets first (a name such as `SIGQUIT` or a number).
    #[arg(long, default_value = "SIGABRT")]
    hung_signal: Signal,
    /// Recycle each worker after it served this many requests.
    #[arg(long)]
    max_requests: Option<u64>,
    /// Up to this many requests are added at random to each worker's --max-requests.
    #[arg(long, default_value_t = 0)]
    max_requests_jitter: u64,
    /// Recycle each worker once it is this old.
    #[arg(long)]
    max_age_ms: Option<u64>,
    /// Up to this long is added at random to each worker's --max-age-ms.
    #[arg(long, default_value_t = 0)]
    max_age_jitter_ms: u64,
    /// Recycle a worker whose memory stays above this many MiB.
    #[arg(long)]
    max_memory_mb: Option<u64>,
    /// What --max-memory-mb is compared with: rss or pss.
    #[arg(long, default_value = "rss")]
    memory_measure: ecewo_cluster::MemoryMeasure,
    /// Time between memory readings, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    memory_check_ms: u64,
    /// Readings in a row above --max-memory-mb that trigger a recycle.
    #[arg(long, default_value_t = 3)]
    memory_samples: u32,
    /// Slots that may recycle at the same time.
    #[arg(long, default_value_t = 1)]
    max_recycling: usize,
    /// Exponential backoff between respawns after crashes, `BASE:MAX` in milliseconds.
    #[arg(long, value_name = "BASE:MAX", value_parser = parse_backoff)]
    respawn_backoff_ms: Option<(u64, u64)>,
    /// A slot disabled by crash protection gets a probe spawn after this long.
    #[arg(long)]
    respawn_cooloff_ms: Option<u64>,
    /// On a shutdown request, serve this long while reporting not-ready before draining.
    #[arg(long, default_value_t = 0)]
    shutdown_delay_ms: u64,
    /// The master's admin listener (`127.0.0.1:0`, `[::1]:0`, `unix:PATH`): `GET /livez`,
    /// `/readyz`, `/startupz`, `/metrics`; the master prints `admin ADDR` (the bound address)
    /// on stdout before its ready line.
    #[arg(long)]
    admin: Option<ecewo_cluster::ListenAddr>,
    /// Ready workers the readiness probe needs.
    #[arg(long, default_value_t = 1)]
    min_ready: usize,
    /// How long the new master of an upgrade (SIGUSR1, `ecewo-cluster upgrade`) has to get
    /// ready (default: the library's).
    #[arg(long)]
    upgrade_timeout_ms: Option<u64>,
    /// Upgrades of the master go slot by slot by default.
    #[arg(long)]
    upgrade_slot_by_slot: bool,
    /// Capture the workers' output (`prefix` or `json`) to the master's stdout (or --log-file).
    #[arg(long)]
    capture_output: Option<CaptureFormat>,
    /// Write the captured output to this file (implies --capture-output prefix).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Rotate the log file past this many bytes.
    #[arg(long)]
    log_max_bytes: Option<u64>,
    /// Rotated log files kept.
    #[arg(long, default_value_t = 5)]
    log_keep: usize,
    /// The signal that reopens the log file (default: the library's, SIGALRM).
    #[arg(long)]
    log_reopen_signal: Option<Signal>,
    /// Captured lines longer than this are cut.
    #[arg(long)]
    log_max_line: Option<usize>,
    /// The capture's queue, `LINES:BYTES` (default: the library's).
    #[arg(long, value_name = "LINES:BYTES", value_parser = parse_pair)]
    log_queue: Option<(u64, u64)>,
    /// How the testbed's own logs are written to stderr: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// Append every event of the history to this file, one JSON line each.
    #[arg(long)]
    event_log: Option<PathBuf>,
    /// Events the master keeps (0: none; default: the library's, 1000).
    #[arg(long)]
    event_history: Option<usize>,
}

fn parse_pair(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(':').ok_or_else(|| format!("{s:?}: use A:B"))?;
    let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{v:?} is not a number ({e})"));
    Ok((num(a)?, num(b)?))
}

fn parse_backoff(s: &str) -> Result<(u64, u64), String> {
    let (base, max) = s.split_once(':').ok_or_else(|| format!("{s:?}: use BASE:MAX (milliseconds)"))?;
    let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{v:?} is not a number of milliseconds ({e})"));
    Ok((num(base)?, num(max)?))
}

/// Where a `--listen` listener listens.
#[derive(Debug, Clone)]
enum ListenAt {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
    /// The socket systemd passes under the listener's name.
    Systemd,
}

fn parse_listen(s: &str) -> Result<(String, ListenAt), String> {
    let (name, addr) = s.split_once('=').ok_or_else(|| format!("{s:?}: use NAME=ADDR"))?;
    if let Some(path) = addr.strip_prefix("unix:") {
        return Ok((name.to_owned(), ListenAt::Unix(PathBuf::from(path))));
    }
    if addr == "systemd" {
        return Ok((name.to_owned(), ListenAt::Systemd));
    }
    let addr = addr.parse().map_err(|e| format!("{name}: {addr:?} is not an address ({e})"))?;
    Ok((name.to_owned(), ListenAt::Tcp(addr)))
}

/// Writes one line to the log (what callbacks print too), never blocking.
fn log_line(args: std::fmt::Arguments<'_>) {
    logging::line(args);
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let code = match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log_line(format_args!("testbed: {e}"));
            ExitCode::FAILURE
        }
    };
    // Written out before exit (the writer gives up after a second on a stderr nobody reads).
    logging::finish("testbed");
    code
}

fn run(args: Args) -> Result<(), ecewo_cluster::Error> {
    if args.standalone {
        return standalone(&args).map_err(|e| ecewo_cluster::Error::Io { context: "standalone server", source: e });
    }
    let cluster = Cluster::new(args.port)
        .address(args.address)
        .cpus(args.workers)
        .respawn(args.respawn)
        .balance(args.balance)
        .shutdown_timeout(Duration::from_millis(args.shutdown_timeout_ms))
        .respawn_window(Duration::from_secs(args.respawn_window_sec))
        .respawn_max_crashes(args.respawn_max_crashes)
        .worker_respawn_delay(Duration::from_millis(args.respawn_delay_ms))
        .worker_startup_delay(Duration::from_millis(args.startup_delay_ms))
        .on_ready(|info| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ready: {} workers on port {}", info.workers, info.addr.port());
            let _ = out.flush();
        })
        .ready_timeout(Duration::from_millis(args.ready_timeout_ms))
        .max_surge(args.max_surge)
        .on_start(|w| log_line(format_args!("on_start id={} pid={}", w.worker_id, w.pid)))
        .on_exit(|e| {
            log_line(format_args!(
                "on_exit id={} status={} raw={} crash={}",
                e.worker_id,
                e.status,
                e.status.as_raw(),
                e.crash
            ))
        });
    let ms = Duration::from_millis;
    let cluster = cluster
        .hung_signal(args.hung_signal, ms(args.hung_grace_ms))
        .max_requests_jitter(args.max_requests_jitter)
        .max_age_jitter(ms(args.max_age_jitter_ms))
        .memory_measure(args.memory_measure)
        .memory_check(ms(args.memory_check_ms), args.memory_samples)
        .max_recycling(args.max_recycling)
        .shutdown_delay(ms(args.shutdown_delay_ms))
        .min_ready(args.min_ready);
    let cluster = match &args.admin {
        Some(addr) => cluster.admin(addr.clone()),
        None => cluster,
    };
    let cluster = cluster.upgrade_slot_by_slot(args.upgrade_slot_by_slot);
    let cluster = match &args.event_log {
        Some(path) => cluster.event_log(path),
        None => cluster,
    };
    let cluster = match args.event_history {
        Some(n) => cluster.event_history(n),
        None => cluster,
    };
    let cluster = match args.upgrade_timeout_ms {
        Some(t) => cluster.upgrade_timeout(ms(t)),
        None => cluster,
    };
    let cluster = match args.worker_timeout_ms {
        Some(t) => cluster.worker_timeout(ms(t)),
        None => cluster,
    };
    let cluster = match args.heartbeat_ms {
        Some(t) => cluster.heartbeat_interval(ms(t)),
        None => cluster,
    };
    let cluster = match args.max_requests {
        Some(n) => cluster.max_requests(n),
        None => cluster,
    };
    let cluster = match args.max_age_ms {
        Some(t) => cluster.max_age(ms(t)),
        None => cluster,
    };
    let cluster = match args.max_memory_mb {
        Some(mb) => cluster.max_memory(mb.saturating_mul(1 << 20)),
        None => cluster,
    };
    let cluster = match args.respawn_backoff_ms {
        Some((base, max)) => cluster.respawn_backoff(ms(base), ms(max)),
        None => cluster,
    };
    let cluster = match args.respawn_cooloff_ms {
        Some(t) => cluster.respawn_cooloff(ms(t)),
        None => cluster,
    };
    let cluster = if args.listen.is_empty() {
        cluster
    } else {
        args.listen.iter().fold(cluster.no_default_listener(), |c, (name, at)| match at {
            ListenAt::Tcp(addr) => c.listen(name, ecewo_cluster::Listen::tcp(*addr).balance(args.balance)),
            ListenAt::Unix(path) => c.listen(name, ecewo_cluster::Listen::unix(path)),
            ListenAt::Systemd => c.listen(name, ecewo_cluster::Listen::systemd()),
        })
    };
    let cluster = if args.default_sighup {
        cluster
    } else {
        cluster.on_signal(Signal::HUP, |master| {
            // Print the master's view of the statistics, then forward SIGUSR1 to the workers.
            let view = serde_json::json!({ "cluster": master.stats(), "workers": master.workers() });
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "stats: {view}");
            let _ = out.flush();
            if let Err(e) = master.signal_workers(Signal::USR1) {
                log_line(format_args!("testbed: {e}"));
            }
        })
    };
    let cluster = match (&args.control_socket, args.no_control_socket) {
        (_, true) => cluster.no_control_socket(),
        (Some(path), false) => cluster.control_socket(path),
        (None, false) => cluster,
    };
    let cluster = match &args.name {
        Some(name) => cluster.name(name),
        None => cluster,
    };
    let cluster = match capture_options(&args) {
        Some(capture) => cluster.capture_output(capture),
        None => cluster,
    };
    let panic_in_callbacks = args.panic_in_callbacks;
    let cluster = cluster.on_worker_ready(move |w| {
        if panic_in_callbacks {
            panic!("testbed: on_worker_ready panics on purpose (worker {})", w.worker_id);
        }
    });
    let role = cluster.init()?;
    match role {
        Role::Master(master) => {
            // The master's lines go through the lossy queue (it must never block on a stderr
            // nobody reads). A worker's are plain writes, like its `/print`: a writer thread
            // would make the serving worker two-threaded, and glibc then leaves its
            // single-threaded fast paths for good (what the benchmarks measure is one thread).
            logging::start("testbed-log");
            if let Some(addr) = master.admin_addr() {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "admin {addr}");
                let _ = out.flush();
            }
            if !args.listen.is_empty() {
                let mut out = std::io::stdout().lock();
                for l in master.listeners() {
                    let _ = writeln!(out, "listener {} {}", l.name, l.addr);
                }
                let _ = out.flush();
            }
            log_line(format_args!(
                "testbed master: is_master={} is_worker={} worker_id={} worker_count={} port={}",
                ecewo_cluster::is_master(),
                ecewo_cluster::is_worker(),
                ecewo_cluster::worker_id(),
                ecewo_cluster::worker_count(),
                ecewo_cluster::port()
            ));
            if let Some(ms) = args.restart_after_ms {
                let handle = master.handle();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    let line = match handle.restart_and_wait() {
                        Ok(outcome) => serde_json::to_string(&outcome).unwrap_or_default(),
                        Err(e) => format!("error: {e}"),
                    };
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "restart: {line}");
                    let _ = out.flush();
                });
            }
            if let Some(ms) = args.stop_after_ms {
                let handle = master.handle();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    handle.shutdown();
                });
            }
            master.wait()
        }
        Role::Worker(worker) => {
            if args.crash_on_start || args.crash_on_start_id == Some(worker.id()) {
                std::process::exit(1);
            }
            if args.fail_if_file.as_ref().is_some_and(|p| p.exists()) {
                eprintln!("testbed worker {}: {} exists, failing", worker.id(), args.fail_if_file.unwrap().display());
                std::process::exit(1);
            }
            let tag = args
                .tag_file
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|s| s.lines().next().map(str::to_owned))
                .unwrap_or_else(|| "none".to_owned());
            log_line(format_args!("testbed worker {} pid {} starting", worker.id(), std::process::id()));
            std::thread::sleep(Duration::from_millis(args.ready_delay_ms));
            let state = Arc::new(State {
                id: worker.id(),
                pid: std::process::id(),
                tag,
                usr1: AtomicU64::new(0),
                served: AtomicU64::new(0),
                worker: Some(worker.clone()),
            });
            let count_dir = args.count_dir.clone();
            let idle_grace_ms = args.idle_grace_ms;
            let counted = state.clone();
            let result = run_worker(&worker, |w| async move {
                // Count SIGUSR1 (sent through signal_workers); registered before ready.
                let mut usr1 = signal(SignalKind::user_defined1())
                    .map_err(|e| ecewo_cluster::Error::Io { context: "cannot handle SIGUSR1", source: e })?;
                let counter = state.clone();
                tokio::spawn(async move {
                    while usr1.recv().await.is_some() {
                        counter.usr1.fetch_add(1, Ordering::SeqCst);
                    }
                });
                let options = ServeOptions::default().idle_grace(Duration::from_millis(idle_grace_ms));
                serve(w, Testbed(state), options).await
            });
            if let Some(dir) = count_dir {
                let path = dir.join(format!("worker-{}-{}.count", counted.id, counted.pid));
                let _ = std::fs::write(path, format!("requests={}\n", counted.served.load(Ordering::SeqCst)));
            }
            result
        }
    }
}

/// The capture the options ask for, if any.
fn capture_options(args: &Args) -> Option<CaptureOutput> {
    if args.capture_output.is_none() && args.log_file.is_none() {
        return None;
    }
    let mut c = CaptureOutput::new().format(args.capture_output.unwrap_or_default());
    if let Some(path) = &args.log_file {
        c = c.to_file(path);
    }
    if let Some(max) = args.log_max_bytes {
        c = c.rotate(max, args.log_keep);
    }
    if let Some(signal) = args.log_reopen_signal {
        c = c.reopen_signal(signal);
    }
    if let Some(bytes) = args.log_max_line {
        c = c.max_line(bytes);
    }
    if let Some((lines, bytes)) = args.log_queue {
        c = c.queue(lines as usize, bytes as usize);
    }
    Some(c)
}

/// `print PID I LEN <filler>`: exactly `len` bytes (at least the head), the filler one letter
/// chosen by `i`, so that a reader can check that the line is whole and whose it is.
fn print_line(pid: u32, i: u64, len: usize) -> Vec<u8> {
    let head = format!("print {pid} {i} {len} ");
    let fill = b'a' + (i % 26) as u8;
    let mut line = head.into_bytes();
    while line.len() < len {
        line.push(fill);
    }
    line.push(b'\n');
    line
}

/// The same handler in one process, with the plain accept loop a user would write.
fn standalone(args: &Args) -> std::io::Result<()> {
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()?
    };
    rt.block_on(async {
        let listener = if args.reuseport {
            let addr = std::net::SocketAddr::new(args.address, args.port);
            let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            tokio::net::TcpListener::from_std(socket.into())?
        } else {
            tokio::net::TcpListener::bind((args.address, args.port)).await?
        };
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            id: 0,
            pid: std::process::id(),
            tag: "standalone".into(),
            usr1: AtomicU64::new(0),
            served: AtomicU64::new(0),
            worker: None,
        });
        let mut term = signal(SignalKind::terminate())?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "ready: standalone on port {port}")?;
            out.flush()?;
        }
        let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        loop {
            let (stream, _) = tokio::select! {
                _ = term.recv() => return Ok(()),
                accepted = listener.accept() => accepted?,
            };
            let _ = stream.set_nodelay(true);
            let svc = hyper_util::service::TowerToHyperService::new(Testbed(state.clone()));
            let builder = builder.clone();
            tokio::spawn(async move {
                let _ = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), svc).await;
            });
        }
    })
}

struct State {
    id: usize,
    pid: u32,
    tag: String,
    usr1: AtomicU64,
    /// Requests served.
    served: AtomicU64,
    worker: Option<Worker>,
}

/// The testbed's HTTP service.
#[derive(Clone)]
struct Testbed(Arc<State>);

fn query_param(req: &Request<Incoming>, name: &str) -> Option<i64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

impl tower_service::Service<Request<Incoming>> for Testbed {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let st = self.0.clone();
        st.served.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/hello" => text(StatusCode::OK, "Hello".into()),
                "/" => text(StatusCode::OK, format!("Hello from worker {}! pid={} tag={}", st.id, st.pid, st.tag)),
                "/info" => text(
                    StatusCode::OK,
                    format!(
                        "is_master={} is_worker={} worker_id={} worker_count={} port={}",
                        ecewo_cluster::is_master(),
                        ecewo_cluster::is_worker(),
                        ecewo_cluster::worker_id(),
                        ecewo_cluster::worker_count(),
                        ecewo_cluster::port()
                    ),
                ),
                "/orphan" => {
                    // A grandchild that outlives its parent: it is re-parented to the nearest
                    // subreaper or PID 1, which must reap it when it exits.
                    let spawned = std::process::Command::new("sh").args(["-c", "sleep 0.2 &"]).status();
                    text(StatusCode::OK, format!("orphan: {spawned:?}"))
                }
                "/child-env" => {
                    // What a program this worker runs inherits of the cluster's hand-off.
                    match std::process::Command::new("env").output() {
                        Ok(out) => {
                            let env = String::from_utf8_lossy(&out.stdout);
                            let lines: Vec<&str> = env.lines().filter(|l| l.starts_with("ECEWO_CLUSTER_")).collect();
                            text(StatusCode::OK, lines.join("\n"))
                        }
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot run env: {e}")),
                    }
                }
                "/child-fds" => {
                    // The descriptors a program this worker runs inherits: `ls` lists its own
                    // (stdio, and the one it reads the directory with).
                    match std::process::Command::new("ls")
                        .arg("/proc/self/fd")
                        .stdin(std::process::Stdio::null())
                        .output()
                    {
                        Ok(out) => {
                            let fds = String::from_utf8_lossy(&out.stdout);
                            text(StatusCode::OK, fds.split_whitespace().collect::<Vec<_>>().join(" "))
                        }
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot run ls: {e}")),
                    }
                }
                "/metrics" => match &st.worker {
                    Some(worker) => match ecewo_cluster::serve::metrics(worker).await {
                        Ok(body) => text(StatusCode::OK, body),
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    },
                    None => text(StatusCode::NOT_FOUND, "no cluster in standalone mode".into()),
                },
                "/listen-env" => {
                    // The systemd convention as this worker received it.
                    let var = |k| std::env::var(k).unwrap_or_else(|_| "unset".into());
                    let names = st.worker.as_ref().map(|w| w.listener_names().join(":")).unwrap_or_default();
                    text(
                        StatusCode::OK,
                        format!(
                            "pid={} LISTEN_PID={} LISTEN_FDS={} LISTEN_FDNAMES={} names={names}",
                            st.pid,
                            var("LISTEN_PID"),
                            var("LISTEN_FDS"),
                            var("LISTEN_FDNAMES")
                        ),
                    )
                }
                "/signals" => text(StatusCode::OK, format!("worker={} usr1={}", st.id, st.usr1.load(Ordering::SeqCst))),
                "/stats" => match &st.worker {
                    Some(worker) => match cluster_stats(worker).await {
                        Ok((cluster, workers)) => text(
                            StatusCode::OK,
                            serde_json::json!({ "cluster": cluster, "workers": workers }).to_string(),
                        ),
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    },
                    None => text(StatusCode::NOT_FOUND, "no cluster in standalone mode".into()),
                },
                "/slow" => {
                    let ms = query_param(&req, "ms").unwrap_or(1000).max(0) as u64;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    text(StatusCode::OK, format!("slow {ms}"))
                }
                "/hang" => {
                    // Blocks the worker's runtime thread (a handler making a blocking call):
                    // nothing else on this runtime runs meanwhile, heartbeats included.
                    let ms = query_param(&req, "ms").unwrap_or(1000).max(0) as u64;
                    log_line(format_args!(
                        "testbed worker pid {}: hang: blocking the runtime {ms} ms",
                        std::process::id()
                    ));
                    std::thread::sleep(Duration::from_millis(ms));
                    text(StatusCode::OK, format!("hung {ms}"))
                }
                "/leak" => {
                    // Memory kept for the worker's life, every page touched (resident, not
                    // just reserved).
                    static LEAKED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
                    let mb = query_param(&req, "mb").unwrap_or(1).max(0) as usize;
                    let mut block = vec![0u8; mb.saturating_mul(1 << 20)];
                    for byte in block.iter_mut().step_by(4096) {
                        *byte = 1;
                    }
                    let mut leaked = LEAKED.lock().unwrap_or_else(|e| e.into_inner());
                    leaked.push(block);
                    let total: usize = leaked.iter().map(|b| b.len() >> 20).sum();
                    text(StatusCode::OK, format!("leaked {mb} total {total}"))
                }
                "/print" => {
                    // Blocking writes, as any program's: with captured output the master reads
                    // them at once, whoever reads the master's output.
                    let lines = query_param(&req, "lines").unwrap_or(1).max(0) as u64;
                    let bytes = query_param(&req, "bytes").unwrap_or(100).clamp(1, 16 << 20) as usize;
                    let to_stderr = req.uri().query().is_some_and(|q| q.contains("stream=stderr"));
                    let result = (0..lines).try_for_each(|i| {
                        let line = print_line(st.pid, i, bytes);
                        if to_stderr {
                            std::io::stderr().lock().write_all(&line)
                        } else {
                            let mut out = std::io::stdout().lock();
                            out.write_all(&line).and_then(|()| out.flush())
                        }
                    });
                    match result {
                        Ok(()) => text(StatusCode::OK, format!("printed {lines}")),
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot print: {e}")),
                    }
                }
                "/burst" => {
                    let mb = query_param(&req, "mb").unwrap_or(8).clamp(0, 1024) as usize;
                    let mut burst = Vec::with_capacity(mb << 20);
                    let mut i = 0;
                    while burst.len() < mb << 20 {
                        burst.extend(print_line(st.pid, i, 1000));
                        i += 1;
                    }
                    let mut out = std::io::stdout().lock();
                    match out.write_all(&burst).and_then(|()| out.flush()) {
                        Ok(()) => text(StatusCode::OK, format!("burst {mb}")),
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot write: {e}")),
                    }
                }
                "/crash" => std::process::abort(),
                "/exit" => std::process::exit(query_param(&req, "code").unwrap_or(0) as i32),
                _ => text(StatusCode::NOT_FOUND, "not found".into()),
            })
        })
    }
}
