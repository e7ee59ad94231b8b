//! `ecewo-cluster`: see and steer running clusters through their control sockets.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ecewo_cluster::control::{self, Client, ClientError};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "ecewo-cluster", version, about = "See and steer running ecewo-cluster clusters")]
struct Cli {
    #[command(flatten)]
    target: Target,
    /// Seconds to wait for the master's answer (`restart --wait` waits for the rollout instead,
    /// up to 10 minutes).
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
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
    /// Show the master and every worker: pid, status, uptime, restarts, crashes, memory, CPU.
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
    /// Change the number of workers.
    Scale {
        /// The new number of workers.
        workers: usize,
    },
    /// Send a signal (USR1, HUP, 10, ...) to every active worker.
    Signal {
        /// The signal, by name or number.
        signal: String,
    },
    /// Stop the cluster gracefully.
    Stop,
    /// Print the cluster's Prometheus metrics (for a textfile collector).
    Metrics,
    /// List this user's running clusters.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A failure to report to the user.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("ecewo-cluster: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let timeout = Duration::try_from_secs_f64(cli.timeout).map_err(|_| Failure("--timeout must be positive".into()))?;
    if let Cmd::List { json } = cli.command {
        return list(json, timeout);
    }
    let path = find(&cli.target, timeout)?;
    let request = match &cli.command {
        Cmd::Status { .. } => json!({ "v": 1, "cmd": "status" }),
        Cmd::Restart { wait } => json!({ "v": 1, "cmd": "restart", "wait": wait }),
        Cmd::Scale { workers } => json!({ "v": 1, "cmd": "scale", "workers": workers }),
        Cmd::Signal { signal } => {
            let sig = match signal.parse::<i32>() {
                Ok(n) => json!(n),
                Err(_) => json!(signal),
            };
            json!({ "v": 1, "cmd": "signal", "signal": sig })
        }
        Cmd::Stop => json!({ "v": 1, "cmd": "stop" }),
        Cmd::Metrics => json!({ "v": 1, "cmd": "metrics" }),
        Cmd::List { .. } => unreachable!("handled above"),
    };
    let wait = if matches!(cli.command, Cmd::Restart { wait: true }) { Duration::from_secs(600) } else { timeout };
    let answer = Client::connect(&path, wait)?.request(&request)?;
    if answer["ok"] != json!(true) {
        let msg = answer["error"].as_str().unwrap_or("the master refused the request").to_owned();
        return Err(Failure(msg));
    }
    match cli.command {
        Cmd::Status { json: true } => println!("{}", serde_json::to_string_pretty(&answer)?),
        Cmd::Status { json: false } => print_status(&answer),
        Cmd::Restart { wait: true } => println!("restart {}", describe_outcome(&answer["outcome"])),
        Cmd::Restart { wait: false } => println!("restart started (`status` shows its progress)"),
        Cmd::Scale { workers } => println!("scaling to {workers} workers"),
        Cmd::Signal { signal } => println!("sent {signal} to every active worker"),
        Cmd::Stop => println!("stopping"),
        Cmd::Metrics => print!("{}", answer["text"].as_str().unwrap_or_default()),
        Cmd::List { .. } => {}
    }
    Ok(())
}

/// Finds the control socket the user means.
fn find(target: &Target, timeout: Duration) -> Result<PathBuf, Failure> {
    if let Some(path) = &target.socket {
        return Ok(path.clone());
    }
    if let Some(name) = &target.name {
        return Ok(control::socket_path(name));
    }
    let running = running_clusters(timeout);
    if let Some(pid) = target.pid {
        return running
            .into_iter()
            .find(|(_, _, status)| status["master"]["pid"] == json!(pid))
            .map(|(_, path, _)| path)
            .ok_or_else(|| {
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
        1 => Ok(running.into_iter().next().expect("one").1),
        _ => Err(Failure(format!(
            "{} clusters are running ({}); choose one with --name or --pid",
            running.len(),
            running.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The clusters in the socket directory that answer `status`. Sockets nobody listens on any
/// more (left by a master that was killed) are removed on the way.
fn running_clusters(timeout: Duration) -> Vec<(String, PathBuf, Value)> {
    control::list_sockets()
        .into_iter()
        .filter_map(|(name, path)| {
            let mut client = match Client::connect(&path, timeout) {
                Ok(c) => c,
                Err(ClientError::NotRunning(_)) => {
                    let _ = std::fs::remove_file(&path);
                    return None;
                }
                Err(_) => return None,
            };
            let status = client.request(&json!({ "v": 1, "cmd": "status" })).ok()?;
            Some((name, path, status))
        })
        .collect()
}

fn list(json: bool, timeout: Duration) -> Result<(), Failure> {
    let running = running_clusters(timeout);
    if json {
        let items: Vec<Value> = running
            .iter()
            .map(|(name, path, s)| json!({ "name": name, "socket": path, "master": s["master"], "cluster": s["cluster"] }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    if running.is_empty() {
        println!("no cluster is running (sockets are looked for in {})", control::socket_dir().display());
        return Ok(());
    }
    println!("{:<28} {:>8} {:<22} {:>8} {:>7}", "NAME", "MASTER", "ADDRESS", "WORKERS", "ACTIVE");
    for (name, _, s) in &running {
        println!(
            "{:<28} {:>8} {:<22} {:>8} {:>7}",
            name,
            text(&s["master"]["pid"]),
            text(&s["master"]["address"]),
            text(&s["cluster"]["total_workers"]),
            text(&s["cluster"]["active_workers"])
        );
    }
    Ok(())
}

fn print_status(s: &Value) {
    let m = &s["master"];
    let c = &s["cluster"];
    println!(
        "{}  master pid {}  {}  {} balance  memory {}",
        m["name"].as_str().unwrap_or("?"),
        m["pid"],
        m["address"].as_str().unwrap_or("?"),
        m["balance"].as_str().unwrap_or("?"),
        bytes(m["rss_bytes"].as_u64())
    );
    let mut flags = Vec::new();
    if c["restart_requested"] == json!(true) {
        flags.push("restart in progress".to_owned());
    }
    if c["shutdown_requested"] == json!(true) {
        flags.push("shutting down".to_owned());
    }
    if !c["last_restart"].is_null() {
        flags.push(format!("last restart {}", describe_outcome(&c["last_restart"])));
    }
    println!(
        "workers {} active of {}  crashed {}  disabled {}  restarts {}{}",
        c["active_workers"],
        c["total_workers"],
        c["crashed_workers"],
        c["disabled_workers"],
        c["total_restarts"],
        if flags.is_empty() { String::new() } else { format!("  ({})", flags.join("; ")) }
    );
    println!();
    println!(
        "{:>4} {:>8} {:<11} {:>8} {:>8} {:>7} {:>10} {:>8}",
        "ID", "PID", "STATUS", "UPTIME", "RESTARTS", "CRASHES", "MEMORY", "CPU"
    );
    for w in s["workers"].as_array().into_iter().flatten() {
        println!(
            "{:>4} {:>8} {:<11} {:>8} {:>8} {:>7} {:>10} {:>8}",
            text(&w["worker_id"]),
            text(&w["pid"]),
            text(&w["status"]),
            if w["pid"].is_null() { "-".into() } else { duration(w["uptime"].as_f64().unwrap_or(0.0)) },
            text(&w["restarts"]),
            text(&w["crash_count"]),
            bytes(w["rss_bytes"].as_u64()),
            w["cpu_time"].as_f64().map(|t| format!("{t:.1}s")).unwrap_or_else(|| "-".into()),
        );
    }
    println!(
        "{:>4} {:>8} {:<11} {:>8} {:>8} {:>7} {:>10} {:>8}",
        "",
        "",
        "total",
        "",
        "",
        "",
        bytes(c["total_rss_bytes"].as_u64()),
        c["total_cpu_time"].as_f64().map(|t| format!("{t:.1}s")).unwrap_or_else(|| "-".into())
    );
}

/// A JSON value as plain text ("-" for null), so that column widths apply.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn describe_outcome(o: &Value) -> String {
    match o["result"].as_str() {
        Some("completed") => format!("completed: {} workers replaced", o["replaced"]),
        Some("failed") => format!(
            "failed at worker {}: {} ({} workers replaced before; the others keep serving)",
            o["worker_id"],
            o["reason"].as_str().unwrap_or("?"),
            o["replaced"]
        ),
        Some("cancelled") => format!("cancelled: {}", o["reason"].as_str().unwrap_or("?")),
        _ => o.to_string(),
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
