//! `ecewo-cluster`: see and steer running clusters through their control sockets, and `run` any
//! program as a cluster (`run.rs`).

mod events;
mod logs;
mod run;
mod top;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ecewo_cluster::control::{self, Client, ClientError, Request, Response, Status};
use ecewo_cluster::{RestartOutcome, Signal, UpgradeOutcome};

#[derive(Parser)]
#[command(
    name = "ecewo-cluster",
    version,
    about = "Run any program as a supervised cluster; see and steer running ecewo-cluster clusters"
)]
struct Cli {
    #[command(flatten)]
    target: Target,
    /// Seconds to wait for the master's answer (`restart --wait` waits for the rollout instead,
    /// up to 10 minutes).
    #[arg(long, global = true, default_value_t = 5.0, value_parser = parse_timeout)]
    timeout: f64,
    /// How this command's own logs are written to stderr (`run`'s master): text, or json (one
    /// object per line: timestamp, level, target, fields with the message).
    #[arg(long, global = true, value_name = "text|json", default_value = "text")]
    log_format: ecewo_cluster::logging::LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args)]
struct Target {
    /// The control socket of the cluster.
    #[arg(long, global = true, conflicts_with_all = ["pid", "name"])]
    socket: Option<PathBuf>,
    /// The pid of the cluster's master.
    #[arg(long, global = true, conflicts_with = "name")]
    pid: Option<u32>,
    /// The cluster's name as `list` shows it (`<program>-<port>`).
    #[arg(long, global = true)]
    name: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD as a cluster: this process is the master, every worker runs CMD with the
    /// listeners from fd 3 (LISTEN_FDS) and tells it is ready with READY=1 on NOTIFY_SOCKET.
    Run(Box<run::RunArgs>),
    /// Show the master and every worker: pid, status, uptime, restarts, crashes, memory, CPU,
    /// requests served and in flight, heartbeat age; and the exits by reason.
    Status {
        /// Print the master's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace every worker, one at a time, without dropping a request (deploys new code).
    Restart {
        /// Wait until the rollout ends; exit non-zero, with the reason, if it did not complete.
        #[arg(long)]
        wait: bool,
    },
    /// Upgrade the master itself without dropping a connection: the program at its path
    /// starts as a new master with every listening socket, its workers start, and once they
    /// are ready it takes over and the old master drains and exits (also `kill -USR1`).
    Upgrade {
        /// Wait until the new master took over; exit 1, with the reason, if it did not (the old
        /// master then serves on).
        #[arg(long)]
        wait: bool,
        /// One slot at a time: the new master starts a worker each time the old master stopped
        /// one (at most one worker more than the slots; for hosts where twice the workers do
        /// not fit in memory).
        #[arg(long, conflicts_with = "surge")]
        slot_by_slot: bool,
        /// All the new master's workers start next to the old ones (the default, unless the
        /// cluster is configured with `upgrade_slot_by_slot`).
        #[arg(long)]
        surge: bool,
    },
    /// Change the number of workers.
    Scale {
        /// The new number of workers.
        workers: usize,
    },
    /// Send a signal (USR1, HUP, 10, ...) to every active worker.
    Signal {
        /// The signal, by name or number.
        signal: Signal,
    },
    /// Stop the cluster gracefully.
    Stop,
    /// Print the cluster's Prometheus metrics (for a textfile collector).
    Metrics,
    /// Ask a health probe (live, ready, startup): exit 0 if it passes, 1 if not (also when no
    /// cluster answers); for exec probes in images without curl.
    Probe {
        /// live, ready or startup.
        probe: control::Probe,
    },
    /// A live view in the terminal: every worker (CPU %, memory, requests/s, heartbeat), the
    /// listeners' queues, the rollout or upgrade under way, the last events; keys restart, scale
    /// and signal a worker (`?` lists them). It follows the cluster through master restarts and
    /// upgrades.
    Top(top::TopArgs),
    /// Show the workers' recent output (a cluster that captures it: `run --capture-output`,
    /// `Cluster::capture_output`), oldest first, and with --follow the new lines as they come,
    /// across restarts and upgrades of the master.
    Logs(logs::LogsArgs),
    /// Reopen the log file of the workers' captured output (after logrotate moved it away),
    /// as the master's reopen signal (SIGALRM by default) does.
    ReopenLogs,
    /// Show the master's event history (spawns, ready, exits with their reason, signals,
    /// recycles, restarts, scaling, upgrades, shutdown), one line per event; with --follow, every
    /// new one as it happens.
    Events(events::EventsArgs),
    /// List this user's running clusters.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--timeout`: a positive number of seconds, at most a day.
fn parse_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.001..=86_400.0).contains(&secs) => Ok(secs),
        _ => Err(format!("{text:?} is not a number of seconds from 0.001 to 86400 (for example 5 or 0.5)")),
    }
}

/// A failure to report to the user: one sentence.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

/// A line of output, collected and written at the end (see `main`).
macro_rules! say {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Run(args) = cli.command {
        // The master's own loop, with output as it goes (not collected like the others').
        let Target { name, socket, pid } = cli.target;
        return run::main(*args, run::Global { name, socket, pid, log_format: cli.log_format });
    }
    if let Cmd::Logs(args) = cli.command {
        // Printed as it comes (a follower for as long as it runs).
        let timeout = Duration::from_secs_f64(cli.timeout);
        return match find(&cli.target, timeout) {
            Ok(path) => logs::main(args, &path, timeout),
            Err(Failure(msg)) => {
                eprintln!("ecewo-cluster: {msg}");
                ExitCode::FAILURE
            }
        };
    }
    if let Cmd::Top(args) = cli.command {
        return top::main(args, &cli.target, Duration::from_secs_f64(cli.timeout));
    }
    if let Cmd::Events(args) = cli.command {
        // Printed as it comes (a follower for as long as it runs).
        let timeout = Duration::from_secs_f64(cli.timeout);
        return match find(&cli.target, timeout) {
            Ok(path) => events::main(args, path, timeout),
            Err(Failure(msg)) => {
                eprintln!("ecewo-cluster: {msg}");
                ExitCode::FAILURE
            }
        };
    }
    let mut out = String::new();
    let code = match run(cli, &mut out) {
        Ok(code) => code,
        Err(Failure(msg)) => {
            eprintln!("ecewo-cluster: {msg}");
            ExitCode::FAILURE
        }
    };
    // Written in one go, and a reader that went away (`| head`) is not an error worth a panic.
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("ecewo-cluster: cannot write the output: {e}");
            ExitCode::FAILURE
        }
        _ => code,
    }
}

fn run(cli: Cli, out: &mut String) -> Result<ExitCode, Failure> {
    // parse_timeout keeps it in range.
    let timeout = Duration::from_secs_f64(cli.timeout);
    if let Cmd::List { json } = cli.command {
        list(json, timeout, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let path = find(&cli.target, timeout)?;
    let request = match &cli.command {
        Cmd::Status { .. } => Request::Status,
        Cmd::Restart { wait } => Request::Restart { wait: *wait },
        Cmd::Upgrade { wait, slot_by_slot, surge } => Request::Upgrade {
            wait: *wait,
            slot_by_slot: match (slot_by_slot, surge) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
        },
        Cmd::Scale { workers } => Request::Scale { workers: *workers },
        Cmd::Signal { signal } => Request::Signal { signal: *signal },
        Cmd::Stop => Request::Stop,
        Cmd::Metrics => Request::Metrics,
        Cmd::Probe { probe } => Request::Probe { probe: *probe },
        Cmd::ReopenLogs => Request::ReopenLogs,
        Cmd::List { .. } => unreachable!("handled above"),
        Cmd::Run(_) | Cmd::Top(_) | Cmd::Logs(_) | Cmd::Events(_) => unreachable!("handled in main"),
    };
    let wait = if matches!(cli.command, Cmd::Restart { wait: true } | Cmd::Upgrade { wait: true, .. }) {
        Duration::from_secs(600)
    } else {
        timeout
    };
    let response = Client::connect(&path, wait)?.request(&request)?;
    match (&cli.command, response) {
        (Cmd::Status { json: true }, response) => {
            // The master's whole answer, as the protocol puts it.
            let wire: serde_json::Value = serde_json::from_slice(&response.encode())?;
            say!(out, "{}", serde_json::to_string_pretty(&wire)?);
        }
        (Cmd::Status { json: false }, Response::Status(status)) => print_status(&status, out),
        (_, Response::RestartFinished(outcome)) => {
            if !outcome.is_completed() {
                return Err(Failure(format!("graceful restart {}", describe_outcome(&outcome))));
            }
            say!(out, "restart {}", describe_outcome(&outcome));
        }
        (_, Response::RestartStarted) => say!(out, "restart started (`status` shows its progress)"),
        (_, Response::UpgradeStarted) => say!(out, "upgrade started (`status` shows its progress)"),
        (_, Response::UpgradeFinished(outcome)) => {
            if !outcome.is_completed() {
                return Err(Failure(format!("upgrade {}", describe_upgrade(&outcome))));
            }
            say!(out, "upgrade {}", describe_upgrade(&outcome));
        }
        (_, Response::Scaling { workers }) => say!(out, "scaling to {workers} workers"),
        (_, Response::Signalled { signal }) => say!(out, "sent {signal} to every active worker"),
        (_, Response::Stopping) => say!(out, "stopping"),
        (_, Response::Metrics { text }) => out.push_str(&text),
        (_, Response::LogsReopened { path }) => say!(out, "reopened the log file {}", path.display()),
        (Cmd::Probe { probe }, Response::Probe { pass, detail }) => {
            say!(out, "{probe}: {} ({detail})", if pass { "pass" } else { "fail" });
            return Ok(if pass { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        (_, other) => return Err(Failure(format!("the master answered something unexpected: {other:?}"))),
    }
    Ok(ExitCode::SUCCESS)
}

/// Finds the control socket the user means.
fn find(target: &Target, timeout: Duration) -> Result<PathBuf, Failure> {
    if let Some(path) = &target.socket {
        return Ok(path.clone());
    }
    if let Some(name) = &target.name {
        return Ok(control::socket_path(name));
    }
    let (running, silent) = clusters(timeout);
    // The only master there, even if it did not answer `status` in time: the request itself
    // then says what is wrong with it (its own timeout, its refusal).
    if target.pid.is_none() && running.is_empty() && silent.len() == 1 {
        return Ok(silent.into_iter().next().expect("one"));
    }
    if let Some(pid) = target.pid {
        return running.into_iter().find(|c| c.status.master.pid == pid).map(|c| c.path).ok_or_else(|| {
            Failure(format!(
                "no cluster of this user has master pid {pid} (`ecewo-cluster list` shows the running ones; a cluster started with its own --socket must be named with --socket)"
            ))
        });
    }
    match running.len() {
        0 => Err(Failure(format!(
            "no cluster is running (none answers in {}); start one, or name its socket with --socket",
            control::socket_dir().display()
        ))),
        1 => Ok(running.into_iter().next().expect("one").path),
        _ => Err(Failure(format!(
            "{} clusters are running ({}); choose one with --name or --pid",
            running.len(),
            running.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// A cluster that answered `status`.
struct Running {
    name: String,
    path: PathBuf,
    status: Box<Status>,
}

/// The clusters in the socket directory that answer `status`. Sockets nobody listens on any
/// more (left by a master that was killed) are removed on the way.
fn running_clusters(timeout: Duration) -> Vec<Running> {
    clusters(timeout).0
}

/// The clusters in the socket directory: those that answer `status`, and the sockets where a
/// master listens but did not answer (busy, or not answering in time). Sockets nobody listens
/// on any more are removed on the way.
fn clusters(timeout: Duration) -> (Vec<Running>, Vec<PathBuf>) {
    let (mut running, mut silent) = (Vec::new(), Vec::new());
    for (name, path) in control::list_sockets() {
        let mut client = match Client::connect(&path, timeout) {
            Ok(c) => c,
            Err(ClientError::NotRunning(_)) => {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            Err(_) => {
                silent.push(path);
                continue;
            }
        };
        match client.request(&Request::Status) {
            Ok(Response::Status(status)) => running.push(Running { name, path, status }),
            _ => silent.push(path),
        }
    }
    (running, silent)
}

fn list(json: bool, timeout: Duration, out: &mut String) -> Result<(), Failure> {
    let running = running_clusters(timeout);
    if json {
        #[derive(serde::Serialize)]
        struct Item<'a> {
            name: &'a str,
            socket: &'a std::path::Path,
            master: &'a control::MasterInfo,
            cluster: &'a ecewo_cluster::ClusterStats,
        }
        let items: Vec<Item> = running
            .iter()
            .map(|c| Item { name: &c.name, socket: &c.path, master: &c.status.master, cluster: &c.status.cluster })
            .collect();
        say!(out, "{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    if running.is_empty() {
        say!(out, "no cluster is running (sockets are looked for in {})", control::socket_dir().display());
        return Ok(());
    }
    say!(out, "{:<28} {:>8} {:<22} {:>8} {:>7}", "NAME", "MASTER", "ADDRESS", "WORKERS", "ACTIVE");
    for c in &running {
        say!(
            out,
            "{:<28} {:>8} {:<22} {:>8} {:>7}",
            c.name,
            c.status.master.pid,
            c.status.master.address,
            c.status.cluster.total_workers,
            c.status.cluster.active_workers
        );
    }
    Ok(())
}

fn print_status(s: &Status, out: &mut String) {
    let m = &s.master;
    let c = &s.cluster;
    say!(out, "{}  master pid {}  {}  {} balance  memory {}", m.name, m.pid, m.address, m.balance, bytes(m.rss_bytes));
    let mut flags = Vec::new();
    if c.restart_requested {
        flags.push("restart in progress".to_owned());
    }
    if c.shutdown_requested {
        flags.push("shutting down".to_owned());
    }
    if let Some(last) = &c.last_restart {
        flags.push(format!("last restart {}", describe_outcome(last)));
    }
    if c.upgrade_requested {
        flags.push("upgrade in progress".to_owned());
    }
    if let Some(last) = &c.last_upgrade {
        flags.push(format!("last upgrade {last}"));
    }
    if c.generation > 0 {
        flags.push(format!("generation {}", c.generation));
    }
    say!(
        out,
        "workers {} active of {}  crashed {}  disabled {}  restarts {}{}",
        c.active_workers,
        c.total_workers,
        c.crashed_workers,
        c.disabled_workers,
        c.total_restarts,
        if flags.is_empty() { String::new() } else { format!("  ({})", flags.join("; ")) }
    );
    if !c.listeners.is_empty() {
        say!(out);
        say!(out, "{:<16} {:<9} {:<10} {:>7} {:>7}  ADDRESS", "LISTENER", "KIND", "BALANCE", "SOCKETS", "QUEUED");
        for l in &c.listeners {
            let queued = l.queued.map_or_else(|| "-".to_owned(), |q| q.to_string());
            say!(out, "{:<16} {:<9} {:<10} {:>7} {:>7}  {}", l.name, l.kind, l.balance, l.sockets, queued, l.address);
        }
    }
    if let Some(limit) = c.memory_limit_bytes {
        say!(out, "cgroup memory {} of {} limit", bytes(c.memory_current_bytes), bytes(Some(limit)));
    }
    let exits: Vec<String> = c.exits.iter().filter(|(_, n)| *n > 0).map(|(r, n)| format!("{r} {n}")).collect();
    if !exits.is_empty() {
        say!(out, "exits  {}", exits.join("  "));
    }
    say!(out);
    let row = |out: &mut String, cells: [String; 11]| {
        say!(
            out,
            "{:>4} {:>8} {:<11} {:>8} {:>8} {:>7} {:>10} {:>8} {:>9} {:>8} {:>6}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            cells[10]
        );
    };
    let header =
        ["ID", "PID", "STATUS", "UPTIME", "RESTARTS", "CRASHES", "MEMORY", "CPU", "REQUESTS", "INFLIGHT", "BEAT"];
    row(out, header.map(str::to_owned));
    let dash = || "-".to_owned();
    for w in &s.workers {
        row(
            out,
            [
                w.worker_id.to_string(),
                w.pid.map_or_else(dash, |p| p.to_string()),
                w.status.to_string(),
                if w.pid.is_none() { dash() } else { duration(w.uptime.as_secs_f64()) },
                w.restarts.to_string(),
                w.crash_count.to_string(),
                bytes(w.rss_bytes),
                cpu(w.cpu_time),
                w.requests.map_or_else(dash, |n| n.to_string()),
                w.in_flight.map_or_else(dash, |n| n.to_string()),
                w.heartbeat_age.map_or_else(dash, |t| format!("{:.1}s", t.as_secs_f64())),
            ],
        );
    }
    // What command workers said (`STATUS=`), one line each.
    for w in s.workers.iter().filter(|w| w.notify_status.is_some()) {
        say!(out, "{:>4} {:>8} {}", w.worker_id, "status", w.notify_status.as_deref().unwrap_or_default());
    }
    let total_requests: Option<u64> = s.workers.iter().filter_map(|w| w.requests).reduce(|a, b| a + b);
    let blank = String::new;
    row(
        out,
        [
            blank(),
            blank(),
            "total".to_owned(),
            blank(),
            blank(),
            blank(),
            bytes(Some(c.total_rss_bytes)),
            cpu(Some(c.total_cpu_time)),
            total_requests.map_or_else(blank, |n| n.to_string()),
            blank(),
            blank(),
        ],
    );
}

fn cpu(t: Option<Duration>) -> String {
    t.map(|t| format!("{:.1}s", t.as_secs_f64())).unwrap_or_else(|| "-".into())
}

fn describe_outcome(o: &RestartOutcome) -> String {
    match o {
        RestartOutcome::Failed { .. } => format!("{o}; the others keep serving"),
        other => other.to_string(),
    }
}

fn describe_upgrade(o: &UpgradeOutcome) -> String {
    match o {
        UpgradeOutcome::Failed { .. } => format!("{o}; the old master keeps serving"),
        other => other.to_string(),
    }
}

fn bytes(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
