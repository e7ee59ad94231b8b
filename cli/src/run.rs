//! `ecewo-cluster run [OPTIONS] -- CMD [ARGS...]`: this process becomes the master of a cluster
//! whose workers run CMD (`Cluster::command`), a thin front end over the library.
//!
//! Output contract (for scripts and tests), on stdout, each line flushed: `admin ADDR` (with
//! `--admin`), one `listener NAME ADDR` per listener as bound (the real port, or the path), then,
//! once every worker is ready, `ready: N workers on port P` (P: the first TCP listener's port, 0
//! when there is none). Logs go to stderr. Exit code 0 after a requested shutdown, 1 with one
//! sentence on stderr otherwise (a CMD that cannot be run, bad options, no worker able to run).
//!
//! Nothing here starts a thread before `Cluster::init`: the master forks its workers, and init
//! checks that the process is still single-threaded then (see the testbed for why). The log
//! queue and the stdout writer start right after it.

use std::ffi::OsString;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use clap::Args;
use ecewo_cluster::logging::{self, LogFormat};
use ecewo_cluster::{
    Balance, CaptureFormat, CaptureOutput, Cluster, Compat, Listen, ListenAddr, MemoryMeasure, Role, Signal,
};

/// Options of `ecewo-cluster run`. Defaults are the library's unless said otherwise.
#[derive(Args, Debug)]
#[command(after_help = "\
Each worker runs CMD with its listeners from fd 3 by the systemd convention (LISTEN_FDS, \
LISTEN_FDNAMES, LISTEN_PID = its own pid), its slot in ECEWO_CLUSTER_WORKER_ID, and a private \
NOTIFY_SOCKET owned by this master: READY=1 marks it ready, WATCHDOG=1 is its heartbeat \
(WATCHDOG_USEC is set while a worker timeout applies), STATUS= shows in `ecewo-cluster status`. \
A program that cannot notify uses --ready delay=MS. SIGUSR2 or `ecewo-cluster restart` run CMD \
anew, one worker at a time: replacing its files deploys. SIGUSR1 or `ecewo-cluster upgrade` \
replace this master itself with the ecewo-cluster binary now at its path, these options and \
the same sockets.

The global --name names the cluster (its control socket is NAME-PORT.sock; `list` shows \
NAME-PORT) and the global --socket is another spelling of --control-socket.

Example: ecewo-cluster run --listen 127.0.0.1:8000 --workers 2 -- python3 examples/python/server.py")]
pub struct RunArgs {
    /// A listener `[NAME=]ADDR` (repeatable). ADDR: `127.0.0.1:0` (any free port), `[::1]:0`,
    /// `0.0.0.0:8080`, `unix:PATH`, `@NAME` (abstract), or `systemd` (the socket systemd passes
    /// under NAME: socket activation). The first one's NAME defaults to `default`; the others
    /// need one. With any, --port and --address are not used.
    #[arg(long = "listen", value_name = "[NAME=]ADDR", value_parser = parse_listen)]
    listen: Vec<ListenArg>,
    /// Without --listen: the port of the one listener, `default` (0: any free port) [default: 3000].
    #[arg(long)]
    port: Option<u16>,
    /// Without --listen: the address of the one listener [default: 0.0.0.0].
    #[arg(long)]
    address: Option<IpAddr>,
    /// Number of workers, or `auto`: one per CPU (the affinity mask capped by the cgroup quota).
    #[arg(long, value_name = "N|auto", default_value = "auto", value_parser = parse_workers)]
    workers: usize,
    /// Respawn workers that exit unasked (the default here, unlike the library's: a supervisor of
    /// arbitrary programs is expected to keep them running; crash protection stops a crash loop).
    #[arg(long, overrides_with = "no_respawn")]
    respawn: bool,
    /// Do not respawn workers that exit unasked (the cluster ends once none is left).
    #[arg(long = "no-respawn", overrides_with = "respawn")]
    no_respawn: bool,
    /// How TCP connections are spread: reuseport (a socket per worker) or shared (one socket).
    #[arg(long, default_value = "reuseport")]
    balance: Balance,
    /// The listen backlog of each socket [default: 1024].
    #[arg(long)]
    backlog: Option<u32>,
    /// How long a stopping worker may drain before it is killed [default: 15000].
    #[arg(long, value_name = "MS")]
    shutdown_timeout_ms: Option<u64>,
    /// Delay between starting workers at start-up [default: 100].
    #[arg(long, value_name = "MS")]
    startup_delay_ms: Option<u64>,
    /// Delay before a worker that exited is started again [default: 100].
    #[arg(long, value_name = "MS")]
    respawn_delay_ms: Option<u64>,
    /// Crash protection: the window in seconds [default: 5].
    #[arg(long, value_name = "S")]
    respawn_window_sec: Option<u64>,
    /// Crash protection: crashes within the window that disable a worker slot [default: 3].
    #[arg(long, value_name = "N")]
    respawn_max_crashes: Option<u32>,
    /// Exponential backoff between respawns of a slot that keeps crashing, `BASE:MAX`.
    #[arg(long, value_name = "BASE:MAX", value_parser = parse_backoff)]
    respawn_backoff_ms: Option<(u64, u64)>,
    /// A slot disabled by crash protection gets a probe spawn after this long [default: never].
    #[arg(long, value_name = "MS")]
    respawn_cooloff_ms: Option<u64>,
    /// How a worker is ready: `notify` (it sends READY=1 to $NOTIFY_SOCKET) or `delay=MS` (this
    /// long after it started, for programs that cannot notify).
    #[arg(long, value_name = "notify|delay=MS", default_value = "notify", value_parser = parse_ready)]
    ready: Ready,
    /// A worker not ready this long after it started is killed and counts as a crash (a boot
    /// failure; a rolling restart's replacement fails the rollout instead) [default: 60000].
    #[arg(long, value_name = "MS")]
    ready_timeout_ms: Option<u64>,
    /// Slots a rolling restart replaces at once, each new worker next to the old one until it is
    /// ready: up to N workers more than --workers during a rollout [default: 1].
    #[arg(long, value_name = "N")]
    max_surge: Option<usize>,
    /// A ready worker that sent WATCHDOG=1 once and then stays silent this long is hung: routed
    /// away, signalled, killed; 0 turns the check off. Workers see it as WATCHDOG_USEC and should
    /// send WATCHDOG=1 every half of it (systemd's rule) [default: 30000].
    #[arg(long, value_name = "MS")]
    worker_timeout_ms: Option<u64>,
    /// The signal a hung worker gets first [default: SIGABRT].
    #[arg(long, value_name = "SIG")]
    hung_signal: Option<Signal>,
    /// Time between a hung worker's first signal and SIGKILL [default: 2000].
    #[arg(long, value_name = "MS")]
    hung_grace_ms: Option<u64>,
    /// Recycle each worker once it is this old (a replacement starts first) [default: never].
    #[arg(long, value_name = "MS")]
    max_age_ms: Option<u64>,
    /// Up to this long is added at random to each worker's --max-age-ms [default: 0].
    #[arg(long, value_name = "MS")]
    max_age_jitter_ms: Option<u64>,
    /// Recycle a worker whose memory stays above this many MiB [default: never].
    #[arg(long, value_name = "MIB")]
    max_memory_mb: Option<u64>,
    /// What --max-memory-mb is compared with: rss or pss [default: rss].
    #[arg(long)]
    memory_measure: Option<MemoryMeasure>,
    /// Time between memory readings [default: 1000].
    #[arg(long, value_name = "MS")]
    memory_check_ms: Option<u64>,
    /// Readings in a row above --max-memory-mb that trigger a recycle [default: 3].
    #[arg(long, value_name = "N")]
    memory_samples: Option<u32>,
    /// Slots that may recycle at the same time [default: 1].
    #[arg(long, value_name = "N")]
    max_recycling: Option<usize>,
    /// On a shutdown request, keep serving this long while reporting not-ready, then drain
    /// [default: 0].
    #[arg(long, value_name = "MS")]
    shutdown_delay_ms: Option<u64>,
    /// The master's admin listener (`127.0.0.1:9090`, `[::1]:0`, `unix:PATH`): GET /livez,
    /// /readyz, /startupz, /metrics.
    #[arg(long, value_name = "ADDR")]
    admin: Option<ListenAddr>,
    /// Ready workers the readiness probe needs [default: 1].
    #[arg(long, value_name = "N")]
    min_ready: Option<usize>,
    /// How long the new master of an upgrade (SIGUSR1, `ecewo-cluster upgrade`) has to get its
    /// workers ready [default: the ready timeout + the start-up's pacing + 10000].
    #[arg(long, value_name = "MS")]
    upgrade_timeout_ms: Option<u64>,
    /// Upgrades of the master go slot by slot unless `upgrade --surge` says otherwise: at most
    /// one worker more than the slots during an upgrade.
    #[arg(long)]
    upgrade_slot_by_slot: bool,
    /// Append every event of the master's history (spawns, exits, restarts, ...) to this file,
    /// one JSON line each; opened again when log rotation moved it away.
    #[arg(long, value_name = "PATH")]
    event_log: Option<PathBuf>,
    /// Events the master keeps for `ecewo-cluster events` (0: none) [default: 1000].
    #[arg(long, value_name = "N")]
    event_history: Option<usize>,
    /// Put the control socket here [default: $XDG_RUNTIME_DIR/ecewo-cluster/NAME-PORT.sock].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Run without a control socket (`ecewo-cluster status` and the others cannot reach it).
    #[arg(long, conflicts_with = "control_socket")]
    no_control_socket: bool,
    /// Also give each worker another supervisor's variables: `einhorn` (EINHORN_FD_COUNT,
    /// EINHORN_FD_0…) or `server-starter` (SERVER_STARTER_PORT). Repeatable.
    #[arg(long, value_name = "einhorn|server-starter")]
    compat: Vec<Compat>,
    /// Capture the workers' stdout and stderr instead of letting them inherit this process's:
    /// every line is written to this process's stdout (or --log-file) as `[worker 3 pid 1234]
    /// text` (`prefix`; stderr lines `[worker 3 pid 1234 stderr] text`) or as a JSON object
    /// (`json`), and `ecewo-cluster logs` shows the recent ones. A worker never waits for a slow
    /// reader: lines are dropped and counted instead.
    #[arg(long, value_name = "prefix|json")]
    capture_output: Option<CaptureFormat>,
    /// Write the captured output to this file instead of stdout (implies --capture-output,
    /// `prefix` unless said): appended to, reopened on --log-reopen-signal or `ecewo-cluster
    /// reopen-logs`.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Rotate the log file once it would grow past this many bytes (PATH.1, PATH.2, …)
    /// [default: never].
    #[arg(long, value_name = "BYTES", requires = "log_file")]
    log_max_bytes: Option<u64>,
    /// Rotated log files kept (PATH.1 … PATH.K) [default: 5].
    #[arg(long, value_name = "K", requires = "log_max_bytes")]
    log_keep: Option<usize>,
    /// The signal that reopens the log file [default: SIGALRM: every usual one already means
    /// something to the master].
    #[arg(long, value_name = "SIG", requires = "log_file")]
    log_reopen_signal: Option<Signal>,
    /// Captured lines longer than this are cut into pieces marked ` [continued]` [default: 16384].
    #[arg(long, value_name = "BYTES")]
    log_max_line: Option<usize>,
    /// The program every worker runs, and its arguments (after `--`). A bare name is looked up
    /// in PATH.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// The global options `run` reads (see `Cli` in main.rs).
pub struct Global {
    /// `--name`: the cluster's name.
    pub name: Option<String>,
    /// `--socket`: the control socket's path.
    pub socket: Option<PathBuf>,
    /// `--pid`: meaningless for `run`.
    pub pid: Option<u32>,
    /// `--log-format`: how this master's own logs are written.
    pub log_format: LogFormat,
}

/// A `--listen` value: its name if one was given, and where.
#[derive(Debug, Clone)]
struct ListenArg {
    name: Option<String>,
    at: ListenAt,
}

#[derive(Debug, Clone)]
enum ListenAt {
    Addr(ListenAddr),
    /// The socket systemd passes under the listener's name.
    Systemd,
}

/// `--ready`.
#[derive(Debug, Clone, Copy)]
enum Ready {
    Notify,
    Delay(u64),
}

/// `[NAME=]ADDR`: a name is what comes before the first `=` when it holds no `:` (every address
/// but `systemd` and `@NAME` has one; a name never does).
fn parse_listen(s: &str) -> Result<ListenArg, String> {
    let (name, addr) = match s.split_once('=') {
        Some((name, addr)) if !name.contains(':') => (Some(name.to_owned()), addr),
        _ => (None, s),
    };
    let at = if addr == "systemd" { ListenAt::Systemd } else { ListenAt::Addr(addr.parse()?) };
    Ok(ListenArg { name, at })
}

fn parse_workers(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(0);
    }
    s.parse().map_err(|_| format!("{s:?}: use a number of workers or `auto` (one per CPU)"))
}

fn parse_ready(s: &str) -> Result<Ready, String> {
    if s == "notify" {
        return Ok(Ready::Notify);
    }
    s.strip_prefix("delay=")
        .and_then(|ms| ms.parse().ok())
        .map(Ready::Delay)
        .ok_or_else(|| format!("{s:?}: use `notify` (the program sends READY=1) or `delay=MS`"))
}

fn parse_backoff(s: &str) -> Result<(u64, u64), String> {
    let (base, max) = s.split_once(':').ok_or_else(|| format!("{s:?}: use BASE:MAX (milliseconds)"))?;
    let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{v:?} is not a number of milliseconds ({e})"));
    Ok((num(base)?, num(max)?))
}

/// Runs the cluster to its end; the process's exit code.
pub fn main(args: RunArgs, global: Global) -> ExitCode {
    logging::init(global.log_format);
    let (lines, queued) = mpsc::channel();
    let code = match run(args, global, lines.clone(), queued) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            logging::line(format_args!("ecewo-cluster: {msg}"));
            ExitCode::FAILURE
        }
    };
    // What is still queued for stdout is written out, if stdout takes it within a second.
    let (done, written) = mpsc::channel();
    if lines.send(Line::End(done)).is_ok() {
        let _ = written.recv_timeout(Duration::from_secs(1));
    }
    // Written out before exit (the writer gives up after a second on a stderr nobody reads).
    logging::finish("ecewo-cluster");
    code
}

fn run(args: RunArgs, global: Global, lines: mpsc::Sender<Line>, queued: mpsc::Receiver<Line>) -> Result<(), String> {
    let cluster = build(args, global, lines.clone())?;
    let role = cluster.init().map_err(|e| e.to_string())?;
    logging::start("ecewo-cluster-log");
    start_stdout(queued);
    let master = match role {
        Role::Master(master) => master,
        Role::Worker(_) => {
            return Err("this process was started as a worker of a cluster (its ECEWO_CLUSTER_* variables and \
                        channel); `ecewo-cluster run` must be started as the master"
                .into());
        }
    };
    let say = |line: String| {
        let _ = lines.send(Line::Text(line));
    };
    if let Some(addr) = master.admin_addr() {
        say(format!("admin {addr}"));
    }
    for l in master.listeners() {
        say(format!("listener {} {}", l.name, l.addr));
    }
    master.wait().map_err(|e| e.to_string())
}

/// The cluster the options describe.
fn build(args: RunArgs, global: Global, lines: mpsc::Sender<Line>) -> Result<Cluster, String> {
    if global.pid.is_some() {
        return Err("--pid names a running cluster; `run` starts one (name it with --name)".into());
    }
    let control_socket = match (args.control_socket, global.socket) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "--control-socket {} and --socket {} differ; give one of them",
                a.display(),
                b.display()
            ));
        }
        (a, b) => a.or(b),
    };
    if args.no_control_socket && control_socket.is_some() {
        return Err("--no-control-socket and --socket contradict each other; give one of them".into());
    }
    let (program, cmd_args) = args.command.split_first().ok_or("give the command to run after `--`")?;
    let ms = Duration::from_millis;
    let mut cluster = Cluster::new(args.port.unwrap_or(3000))
        .command(program, cmd_args)
        .cpus(args.workers)
        .respawn(!args.no_respawn)
        .balance(args.balance)
        .on_ready(move |info| {
            let _ = lines.send(Line::Text(format!("ready: {} workers on port {}", info.workers, info.addr.port())));
        });
    if let Ready::Delay(delay) = args.ready {
        cluster = cluster.ready_after(ms(delay));
    }
    for compat in args.compat {
        cluster = cluster.compat(compat);
    }
    if args.listen.is_empty() {
        if let Some(address) = args.address {
            cluster = cluster.address(address);
        }
    } else {
        if args.port.is_some() || args.address.is_some() {
            return Err("--port and --address set the listener used without --listen; with --listen, give the \
                        address there (--listen 0.0.0.0:8080)"
                .into());
        }
        cluster = cluster.no_default_listener();
        for (i, l) in args.listen.iter().enumerate() {
            let name = match (&l.name, i) {
                (Some(name), _) => name.clone(),
                (None, 0) => "default".to_owned(),
                (None, _) => {
                    return Err(format!(
                        "--listen number {}: give it a name, NAME=ADDR (only the first one is `default` unnamed)",
                        i + 1
                    ));
                }
            };
            let listen = match &l.at {
                ListenAt::Systemd => Listen::systemd(),
                ListenAt::Addr(ListenAddr::Tcp(addr)) => Listen::tcp(*addr).balance(args.balance),
                ListenAt::Addr(ListenAddr::Unix(path)) => Listen::unix(path),
                ListenAt::Addr(ListenAddr::Abstract(name)) => Listen::abstract_unix(name),
                ListenAt::Addr(other) => {
                    return Err(format!("--listen {other}: this kind of address is not supported"));
                }
            };
            let listen = match args.backlog {
                Some(backlog) => listen.backlog(backlog),
                None => listen,
            };
            cluster = cluster.listen(name, listen);
        }
    }
    if let Some(backlog) = args.backlog {
        cluster = cluster.backlog(backlog);
    }
    if let Some(t) = args.shutdown_timeout_ms {
        cluster = cluster.shutdown_timeout(ms(t));
    }
    if let Some(t) = args.startup_delay_ms {
        cluster = cluster.worker_startup_delay(ms(t));
    }
    if let Some(t) = args.respawn_delay_ms {
        cluster = cluster.worker_respawn_delay(ms(t));
    }
    if let Some(s) = args.respawn_window_sec {
        cluster = cluster.respawn_window(Duration::from_secs(s));
    }
    if let Some(n) = args.respawn_max_crashes {
        cluster = cluster.respawn_max_crashes(n);
    }
    if let Some((base, max)) = args.respawn_backoff_ms {
        cluster = cluster.respawn_backoff(ms(base), ms(max));
    }
    if let Some(t) = args.respawn_cooloff_ms {
        cluster = cluster.respawn_cooloff(ms(t));
    }
    if let Some(t) = args.ready_timeout_ms {
        cluster = cluster.ready_timeout(ms(t));
    }
    if let Some(n) = args.max_surge {
        cluster = cluster.max_surge(n);
    }
    if let Some(t) = args.worker_timeout_ms {
        cluster = cluster.worker_timeout(ms(t));
    }
    if args.hung_signal.is_some() || args.hung_grace_ms.is_some() {
        cluster = cluster.hung_signal(args.hung_signal.unwrap_or(Signal::ABRT), ms(args.hung_grace_ms.unwrap_or(2000)));
    }
    if let Some(t) = args.max_age_ms {
        cluster = cluster.max_age(ms(t));
    }
    if let Some(t) = args.max_age_jitter_ms {
        cluster = cluster.max_age_jitter(ms(t));
    }
    if let Some(mb) = args.max_memory_mb {
        cluster = cluster.max_memory(mb.saturating_mul(1 << 20));
    }
    if let Some(measure) = args.memory_measure {
        cluster = cluster.memory_measure(measure);
    }
    if args.memory_check_ms.is_some() || args.memory_samples.is_some() {
        cluster = cluster.memory_check(ms(args.memory_check_ms.unwrap_or(1000)), args.memory_samples.unwrap_or(3));
    }
    if let Some(n) = args.max_recycling {
        cluster = cluster.max_recycling(n);
    }
    if let Some(t) = args.shutdown_delay_ms {
        cluster = cluster.shutdown_delay(ms(t));
    }
    if let Some(addr) = args.admin {
        cluster = cluster.admin(addr);
    }
    if let Some(n) = args.min_ready {
        cluster = cluster.min_ready(n);
    }
    if let Some(t) = args.upgrade_timeout_ms {
        cluster = cluster.upgrade_timeout(ms(t));
    }
    cluster = cluster.upgrade_slot_by_slot(args.upgrade_slot_by_slot);
    if let Some(path) = args.event_log {
        cluster = cluster.event_log(path);
    }
    if let Some(n) = args.event_history {
        cluster = cluster.event_history(n);
    }
    if let Some(path) = control_socket {
        cluster = cluster.control_socket(path);
    }
    if args.no_control_socket {
        cluster = cluster.no_control_socket();
    }
    if let Some(name) = global.name {
        cluster = cluster.name(name);
    }
    if args.capture_output.is_some() || args.log_file.is_some() {
        let mut capture = CaptureOutput::new().format(args.capture_output.unwrap_or_default());
        if let Some(path) = args.log_file {
            capture = capture.to_file(path);
        }
        if let Some(max) = args.log_max_bytes {
            capture = capture.rotate(max, args.log_keep.unwrap_or(5));
        }
        if let Some(signal) = args.log_reopen_signal {
            capture = capture.reopen_signal(signal);
        }
        if let Some(bytes) = args.log_max_line {
            capture = capture.max_line(bytes);
        }
        cluster = cluster.capture_output(capture);
    } else if args.log_max_line.is_some() {
        return Err("--log-max-line applies to captured output; add --capture-output or --log-file".into());
    }
    Ok(cluster)
}

/// What the stdout writer gets.
enum Line {
    Text(String),
    /// Everything before was written (or stdout is gone): say so.
    End(mpsc::Sender<()>),
}

/// Writes the lines for stdout from a thread of its own, each flushed: the master never blocks on
/// a stdout nobody reads (its workers share it, and may fill a pipe). Started after `init`.
fn start_stdout(queued: mpsc::Receiver<Line>) {
    let spawned = std::thread::Builder::new().name("ecewo-cluster-stdout".into()).spawn(move || {
        let mut broken = false;
        for line in queued {
            match line {
                Line::Text(text) if !broken => {
                    let mut out = std::io::stdout().lock();
                    // A reader that went away (`| head`) ends the output, not the cluster.
                    broken = writeln!(out, "{text}").and_then(|()| out.flush()).is_err();
                }
                Line::Text(_) => {}
                Line::End(done) => {
                    let _ = done.send(());
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        logging::line(format_args!(
            "ecewo-cluster: cannot start the stdout writer ({e}); no ready line will be printed"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values_parse() {
        let l = parse_listen("127.0.0.1:0").unwrap();
        assert!(l.name.is_none() && matches!(l.at, ListenAt::Addr(ListenAddr::Tcp(_))));
        let l = parse_listen("web=[::1]:8080").unwrap();
        assert_eq!(l.name.as_deref(), Some("web"));
        assert!(matches!(l.at, ListenAt::Addr(ListenAddr::Tcp(a)) if a.port() == 8080));
        let l = parse_listen("sock=unix:/run/a=b.sock").unwrap();
        assert!(matches!(&l.at, ListenAt::Addr(ListenAddr::Unix(p)) if p == std::path::Path::new("/run/a=b.sock")));
        let l = parse_listen("unix:/run/a=b.sock").unwrap();
        assert!(l.name.is_none() && matches!(&l.at, ListenAt::Addr(ListenAddr::Unix(_))));
        let l = parse_listen("https=systemd").unwrap();
        assert!(l.name.as_deref() == Some("https") && matches!(l.at, ListenAt::Systemd));
        assert!(matches!(parse_listen("systemd").unwrap().at, ListenAt::Systemd));
        assert!(parse_listen("web=localhost").is_err());
        assert!(parse_listen("8080").is_err());
    }

    #[test]
    fn workers_and_ready_parse() {
        assert_eq!(parse_workers("auto"), Ok(0));
        assert_eq!(parse_workers("4"), Ok(4));
        assert!(parse_workers("four").is_err());
        assert!(matches!(parse_ready("notify"), Ok(Ready::Notify)));
        assert!(matches!(parse_ready("delay=300"), Ok(Ready::Delay(300))));
        assert!(parse_ready("delay=").is_err());
        assert!(parse_ready("later").is_err());
        assert_eq!(parse_backoff("100:5000"), Ok((100, 5000)));
        assert!(parse_backoff("100").is_err());
    }
}
