//! A bounded chaos run over real processes: under load from clients that never retry, workers
//! are SIGKILLed at random every 300 ms, rolling restarts are asked for every 5 s, and the
//! cluster is scaled up by two and down by two; afterwards it must be whole again (its workers,
//! its descriptors, no zombies), still serving, and shut down cleanly.
//!
//! `CHAOS_SEED=N` repeats a run's choice of victims (each run prints its seed).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use serde_json::Value;

/// How long the chaos lasts.
const CHAOS: Duration = Duration::from_secs(20);
/// One worker SIGKILLed this often.
const KILL_EVERY: Duration = Duration::from_millis(300);
/// A rolling restart this often.
const RESTART_EVERY: Duration = Duration::from_secs(5);
/// When the cluster grows by two workers, and when it shrinks back.
const GROW_AT: Duration = Duration::from_secs(7);
const SHRINK_AT: Duration = Duration::from_secs(14);
/// Each client request: connect, send, every read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const WORKERS: u64 = 3;
const IDLE_GRACE_MS: u64 = 100;
const SHUTDOWN_TIMEOUT_MS: u64 = 3000;
/// A kill sent this long before a request started may still break it (the dying worker takes
/// one more connection off its socket in the syscall it was in).
const KILL_SLACK: Duration = Duration::from_millis(20);
/// A keep-alive connection idle this long may meet a draining worker closing idle connections
/// (its idle grace, 100 ms, is over) just as the next request goes out: HTTP's idle-close race.
const IDLE_RACE: Duration = Duration::from_millis(IDLE_GRACE_MS / 2);
/// Client threads on fresh connections, and on keep-alive ones.
const FRESH_CLIENTS: usize = 2;
const KEEPALIVE_CLIENTS: usize = 2;

// ---- Processes: identity by pid and start time ----

/// A process's start time (clock ticks since boot, field 22 of /proc/PID/stat): with the pid,
/// it names one process even once pids wrap around (pid_max may be as low as 32768).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Is the process `pid` that started at `started` still alive (not a zombie)?
fn still_alive(pid: u32, started: u64) -> bool {
    alive(pid) && start_time(pid) == Some(started)
}

/// Every worker process seen: pid → start time.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<BTreeMap<u32, u64>>>);

impl Seen {
    /// Records the master's current children; returns them.
    fn poll(&self, master: u32) -> Vec<u32> {
        let children = children_of(master);
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for &pid in &children {
            if let std::collections::btree_map::Entry::Vacant(e) = seen.entry(pid)
                && let Some(t) = start_time(pid)
            {
                e.insert(t);
            }
        }
        children
    }

    fn all(&self) -> BTreeMap<u32, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn still_alive(&self) -> Vec<u32> {
        self.all().into_iter().filter(|&(p, t)| still_alive(p, t)).map(|(p, _)| p).collect()
    }
}

/// The master's children that are zombies (exited, not reaped), from a scan of /proc (the
/// common helper leaves zombies out).
fn zombie_children(master: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(master) && fields[0] == "Z" {
            out.push(pid);
        }
    }
    out
}

// ---- Clients ----

/// What one request came to.
enum Outcome {
    Ok,
    /// `connect` failed (refused, or timed out).
    Connect(std::io::Error),
    /// No answer within the timeout.
    Timeout(String),
    /// A complete answer, but not a 200 from a testbed worker.
    BadAnswer(String),
    /// The connection was reset or closed before a complete answer.
    Broken {
        error: String,
        started: Instant,
        ended: Instant,
        /// On a reused keep-alive connection: the worker that answered the previous request
        /// on it (the only process holding the connection), and how long it had been idle.
        worker: Option<(u32, Duration)>,
    },
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// The pid of a complete testbed `GET /` answer (`Hello from worker N! pid=P tag=none`).
fn answering_pid(body: &str) -> Option<u32> {
    worker_of(body)?;
    body.ends_with(" tag=none").then(|| pid_of(body)).flatten()
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), REQUEST_TIMEOUT)?;
    // Failures to set a timeout would only show as a hang, which the thread's bound catches.
    let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
    Ok(s)
}

/// `GET /` on a fresh connection (`Connection: close`).
fn fresh_get(port: u16) -> Outcome {
    let started = Instant::now();
    let mut s = match connect(port) {
        Ok(s) => s,
        Err(e) => return Outcome::Connect(e),
    };
    let mut raw = Vec::new();
    let res = s
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .and_then(|_| s.read_to_end(&mut raw));
    let broken = |error: String| Outcome::Broken { error, started, ended: Instant::now(), worker: None };
    match res {
        Err(e) if is_timeout(&e) => Outcome::Timeout(format!("fresh: {e} after {:?}", started.elapsed())),
        Err(e) => broken(format!("fresh: {e} ({:?}) after {} bytes", e.kind(), raw.len())),
        Ok(_) => match parse_response(&raw) {
            Some((200, body)) if answering_pid(&body).is_some() => Outcome::Ok,
            // Cut short: the worker died while writing it.
            Some((200, body)) => broken(format!("fresh: truncated answer {body:?}")),
            Some((status, body)) => Outcome::BadAnswer(format!("fresh: status {status}: {body}")),
            None => broken(format!("fresh: closed after {} bytes: {:?}", raw.len(), String::from_utf8_lossy(&raw))),
        },
    }
}

/// An open keep-alive connection.
struct Conn {
    reader: BufReader<TcpStream>,
    /// The worker that answered the last request on it, and when.
    last: Option<(u32, Instant)>,
}

/// A client on one keep-alive connection at a time; it reconnects after `Connection: close` or
/// a failure, and never retries a request.
struct KeepAliveClient {
    port: u16,
    conn: Option<Conn>,
}

impl KeepAliveClient {
    fn get(&mut self) -> Outcome {
        let started = Instant::now();
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => match connect(self.port) {
                Ok(s) => Conn { reader: BufReader::new(s), last: None },
                Err(e) => return Outcome::Connect(e),
            },
        };
        let worker = conn.last.map(|(pid, at)| (pid, started.duration_since(at)));
        match exchange(&mut conn.reader) {
            Ok((200, body, keep)) => match answering_pid(&body) {
                Some(pid) => {
                    if keep {
                        conn.last = Some((pid, Instant::now()));
                        self.conn = Some(conn);
                    }
                    Outcome::Ok
                }
                None => Outcome::BadAnswer(format!("keep-alive: not a testbed answer: {body:?}")),
            },
            Ok((status, body, _)) => Outcome::BadAnswer(format!("keep-alive: status {status}: {body}")),
            Err(e) if is_timeout(&e) => Outcome::Timeout(format!("keep-alive: {e} after {:?}", started.elapsed())),
            Err(e) => Outcome::Broken {
                error: format!("keep-alive: {e} ({:?})", e.kind()),
                started,
                ended: Instant::now(),
                worker,
            },
        }
    }
}

/// One request on a keep-alive connection: status, body, and whether it may be reused.
fn exchange(conn: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String, bool)> {
    let eof = |what| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what);
    conn.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(eof("closed before an answer"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut keep) = (0usize, true);
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(eof("closed in the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':').unwrap_or((l, ""));
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        if name == "content-length" {
            length = value.parse().unwrap_or(0);
        } else if name == "connection" && value == "close" {
            keep = false;
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
}

/// The SIGKILLs sent so far: to whom, and when (recorded before each is sent).
#[derive(Default)]
struct Kills {
    pids: std::collections::BTreeSet<u32>,
    at: Vec<Instant>,
}

impl Kills {
    /// Whether a kill was sent while a request that started at `started` and failed at `ended`
    /// was under way (or just before it started).
    fn during(&self, started: Instant, ended: Instant) -> bool {
        self.at.iter().any(|&t| t + KILL_SLACK >= started && t <= ended)
    }
}

/// The requests of the load, by outcome.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    /// `connect` refused or timed out: a failure.
    connect: u64,
    /// No answer within the timeout: a failure.
    timeout: u64,
    /// A complete answer that is not a 200 from a worker: a failure.
    bad_answer: u64,
    /// Reset or closed on a keep-alive connection held by a worker this test SIGKILLed:
    /// expected.
    killed_keepalive: u64,
    /// Reset or closed with no answer on a new connection while a SIGKILL was under way (the
    /// worker that took it was killed): expected.
    killed_fresh: u64,
    /// Closed on a keep-alive connection idle past the race threshold by a worker this test did
    /// not kill (a draining worker closing idle connections): expected, HTTP's idle-close race.
    idle_close: u64,
    /// Reset or closed with no kill to explain it: a failure.
    unexplained: u64,
    /// The first failures, described.
    samples: Vec<String>,
}

impl Tally {
    fn sample(&mut self, what: String) {
        if self.samples.len() < 20 {
            self.samples.push(what);
        }
    }

    fn count(&mut self, outcome: Outcome, kills: &Mutex<Kills>) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Connect(e) => {
                self.connect += 1;
                self.sample(format!("connect: {e} ({:?})", e.kind()));
            }
            Outcome::Timeout(what) => {
                self.timeout += 1;
                self.sample(what);
            }
            Outcome::BadAnswer(what) => {
                self.bad_answer += 1;
                self.sample(what);
            }
            Outcome::Broken { error, started, ended, worker } => {
                let kills = kills.lock().unwrap_or_else(|e| e.into_inner());
                match worker {
                    Some((pid, _)) if kills.pids.contains(&pid) => self.killed_keepalive += 1,
                    Some((_, idle)) if idle >= IDLE_RACE => self.idle_close += 1,
                    Some((pid, idle)) => {
                        drop(kills);
                        self.unexplained += 1;
                        self.sample(format!("{error} (worker {pid}, not killed here; idle {idle:?})"));
                    }
                    None if kills.during(started, ended) => self.killed_fresh += 1,
                    None => {
                        drop(kills);
                        self.unexplained += 1;
                        self.sample(format!("{error} (no kill within {:?})", ended - started));
                    }
                }
            }
        }
    }

    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.bad_answer += other.bad_answer;
        self.killed_keepalive += other.killed_keepalive;
        self.killed_fresh += other.killed_fresh;
        self.idle_close += other.idle_close;
        self.unexplained += other.unexplained;
        for s in other.samples {
            self.sample(s);
        }
    }

    fn failures(&self) -> u64 {
        self.connect + self.timeout + self.bad_answer + self.unexplained
    }
}

/// One client thread: `GET /` in a loop until stopped, bounded by 60 s and 200 000 requests.
fn client(port: u16, keepalive: bool, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, kills: Arc<Mutex<Kills>>) -> Tally {
    let mut tally = Tally::default();
    let mut ka = KeepAliveClient { port, conn: None };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && n < 200_000 {
        n += 1;
        let outcome = if keepalive { ka.get() } else { fresh_get(port) };
        if matches!(outcome, Outcome::Ok) {
            ok.fetch_add(1, Ordering::Relaxed);
        }
        tally.count(outcome, &kills);
    }
    tally
}

// ---- The run ----

/// Stops and joins the load and the killer, also when the test fails; then kills every worker
/// seen that is still the same process (pid and start time), before the Testbed's own clean-up
/// kills the master.
struct Chaos {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Tally>>,
    killer: Option<JoinHandle<u64>>,
    seen: Seen,
}

impl Chaos {
    fn stop_killer(&mut self) -> u64 {
        self.killer.take().map(|k| k.join().unwrap()).unwrap_or(0)
    }

    fn stop_load(&mut self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Tally::default();
        for c in self.clients.drain(..) {
            total.add(c.join().unwrap());
        }
        total
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(k) = self.killer.take() {
            let _ = k.join();
        }
        for c in self.clients.drain(..) {
            let _ = c.join();
        }
        for (pid, started) in self.seen.all() {
            if still_alive(pid, started) {
                send_signal(pid, Signal::KILL);
            }
        }
    }
}

/// xorshift64*: victims chosen reproducibly from a seed.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Every `KILL_EVERY` until `end`, SIGKILLs one of the master's children at random (never by
/// name: only a pid that is the master's child right then). Returns the kills sent.
fn killer(master: u32, seed: u64, end: Instant, stop: Arc<AtomicBool>, kills: Arc<Mutex<Kills>>, seen: Seen) -> u64 {
    let mut rng = seed | 1;
    let mut sent = 0;
    let mut next = Instant::now() + KILL_EVERY;
    while next <= end && !stop.load(Ordering::SeqCst) {
        // Pacing: the kills are timed by design.
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += KILL_EVERY;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let children = seen.poll(master);
        if children.is_empty() {
            continue;
        }
        let victim = children[(next_random(&mut rng) % children.len() as u64) as usize];
        {
            let mut k = kills.lock().unwrap_or_else(|e| e.into_inner());
            k.pids.insert(victim);
            k.at.push(Instant::now());
        }
        send_signal(victim, Signal::KILL);
        sent += 1;
    }
    sent
}

/// `GET /stats` once (it may fail while workers are being killed).
fn try_stats(port: u16) -> Option<Value> {
    match http_get(port, "/stats") {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Waits until `/stats` satisfies `cond`, recording the workers meanwhile; the stats that did,
/// or the last ones seen.
fn wait_stats(
    port: u16,
    master: u32,
    seen: &Seen,
    timeout: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Result<Value, Option<Value>> {
    let mut last = None;
    let met = wait_until(timeout, || {
        seen.poll(master);
        last = try_stats(port);
        last.as_ref().is_some_and(&cond)
    });
    if met { Ok(last.unwrap()) } else { Err(last) }
}

fn slots_are(workers: u64) -> impl Fn(&Value) -> bool {
    move |s| s["cluster"]["total_workers"] == workers && s["cluster"]["active_workers"] == workers
}

/// Every slot active, and no rolling restart under way or queued.
fn at_rest(workers: u64) -> impl Fn(&Value) -> bool {
    move |s| slots_are(workers)(s) && s["cluster"]["restart_requested"] == false
}

/// Asks for a rolling restart while nothing else happens, and waits until it completed and the
/// cluster is at rest again. After a completed restart the master holds the program file of
/// that deploy (crash respawns and new slots start from it) and none of an earlier one: the
/// state the descriptor counts are compared in.
fn restart_completes(tb: &Testbed, seen: &Seen) {
    let completed = |log: &str| log.matches("graceful restart completed").count();
    let before = completed(&tb.stderr());
    tb.signal(Signal::USR2);
    let done = wait_until(Duration::from_secs(30), || {
        seen.poll(tb.pid());
        completed(&tb.stderr()) > before
    });
    assert!(done, "a rolling restart with nothing else going on did not complete\n{}", log_tail(tb, 60));
    let rest = wait_stats(tb.port, tb.pid(), seen, Duration::from_secs(10), at_rest(WORKERS));
    assert!(rest.is_ok(), "not at rest after the restart: {:?}\n{}", rest.err(), log_tail(tb, 60));
}

fn total_is(workers: u64) -> impl Fn(&Value) -> bool {
    move |s| s["cluster"]["total_workers"] == workers
}

/// The last `n` lines of the master's log.
fn log_tail(tb: &Testbed, n: usize) -> String {
    let log = tb.stderr();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The descriptor targets of `after` not in `before` (`+`) and of `before` not in `after` (`-`).
fn fd_diff(before: &[(i32, String)], after: &[(i32, String)]) -> String {
    let mut out = Vec::new();
    for (n, t) in after {
        if !before.iter().any(|(m, u)| m == n && u == t) {
            out.push(format!("+{n} {t}"));
        }
    }
    for (n, t) in before {
        if !after.iter().any(|(m, u)| m == n && u == t) {
            out.push(format!("-{n} {t}"));
        }
    }
    out.join(", ")
}

#[test]
fn a_bounded_chaos_run_keeps_serving_and_leaks_nothing() {
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    eprintln!("chaos seed {seed} (CHAOS_SEED={seed} chooses the same victims)");
    let run_started = Instant::now();
    let mut tb = Testbed::start(&[
        "--workers",
        "3",
        "--respawn",
        "--respawn-delay-ms",
        "20",
        "--respawn-max-crashes",
        "1000",
        "--respawn-window-sec",
        "1",
        "--startup-delay-ms",
        "0",
        "--shutdown-timeout-ms",
        &SHUTDOWN_TIMEOUT_MS.to_string(),
        "--idle-grace-ms",
        &IDLE_GRACE_MS.to_string(),
        "--heartbeat-ms",
        "100",
        "--worker-timeout-ms",
        "2000",
    ]);
    let (master, port) = (tb.pid(), tb.port);
    let kills = Arc::new(Mutex::new(Kills::default()));
    let ok = Arc::new(AtomicU64::new(0));
    // Declared after `tb`, so dropped before it: the load and the killer stop, and the workers
    // seen are killed (by pid and start time, so a reused pid is never hit), before the Testbed
    // kills the master. (The Testbed's own list is left to the initial workers on purpose: it
    // kills by pid and name only, and here pids wrap around quickly enough to be reused by
    // another test's testbed.)
    let mut chaos =
        Chaos { stop: Arc::new(AtomicBool::new(false)), clients: Vec::new(), killer: None, seen: Seen::default() };
    let seen = chaos.seen.clone();
    seen.poll(master);

    // Settled: every worker active, after one rolling restart (see `restart_completes`). Then
    // the master's descriptors, before anything happens.
    let settled = wait_stats(port, master, &seen, Duration::from_secs(20), at_rest(WORKERS));
    assert!(settled.is_ok(), "never settled: {:?}\n{}", settled.err(), tb.stderr());
    restart_completes(&tb, &seen);
    let fds_before = fds_of(master);
    assert!(!fds_before.is_empty(), "the master's descriptors are readable");

    for i in 0..FRESH_CLIENTS + KEEPALIVE_CLIENTS {
        let (stop, ok, kills) = (chaos.stop.clone(), ok.clone(), kills.clone());
        chaos.clients.push(std::thread::spawn(move || client(port, i >= FRESH_CLIENTS, stop, ok, kills)));
    }
    assert!(
        wait_until(Duration::from_secs(10), || ok.load(Ordering::Relaxed) >= 100),
        "the load runs before the chaos"
    );

    // The chaos: kills from a thread of their own; restarts and scaling from here.
    let t0 = Instant::now();
    let end = t0 + CHAOS;
    chaos.killer = Some({
        let (stop, kills, seen) = (chaos.stop.clone(), kills.clone(), seen.clone());
        std::thread::spawn(move || killer(master, seed, end, stop, kills, seen))
    });
    #[derive(Debug, Clone, Copy)]
    enum Action {
        Restart,
        Grow,
        Shrink,
    }
    let mut plan: Vec<(Duration, Action)> = (1..)
        .map(|i| RESTART_EVERY * i)
        .take_while(|&at| at < CHAOS)
        .map(|at| (at, Action::Restart))
        .chain([(GROW_AT, Action::Grow), (SHRINK_AT, Action::Shrink)])
        .collect();
    plan.sort_by_key(|&(at, _)| at);
    let mut restarts = 0;
    for (at, action) in plan {
        // Pacing until the action's time, recording workers meanwhile.
        while Instant::now() < t0 + at {
            seen.poll(master);
            std::thread::sleep(Duration::from_millis(10));
        }
        match action {
            Action::Restart => {
                tb.signal(Signal::USR2);
                restarts += 1;
            }
            // One signal at a time, each seen by the master before the next: two of a kind
            // sent together could merge into one.
            Action::Grow | Action::Shrink => {
                let (sig, steps) = match action {
                    Action::Grow => (Signal::TTIN, [WORKERS + 1, WORKERS + 2]),
                    _ => (Signal::TTOU, [WORKERS + 1, WORKERS]),
                };
                for total in steps {
                    tb.signal(sig);
                    let scaled = wait_stats(port, master, &seen, Duration::from_secs(10), total_is(total));
                    assert!(
                        scaled.is_ok(),
                        "{action:?}: total_workers never became {total} within 10 s: {:?}\n{}",
                        scaled.err(),
                        log_tail(&tb, 60)
                    );
                }
            }
        }
    }
    while Instant::now() < end {
        seen.poll(master);
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = chaos.stop_killer();
    let chaos_took = t0.elapsed();
    let tally = chaos.stop_load();
    let threads = (FRESH_CLIENTS + KEEPALIVE_CLIENTS) as u64;
    eprintln!(
        "chaos {chaos_took:?}: {sent} SIGKILLs, {restarts} SIGUSR2, 2 SIGTTIN, 2 SIGTTOU; requests: {} ok, \
         {} connect errors, {} timeouts, {} bad answers, {} unexplained resets; expected: {} keep-alive \
         and {} fresh broken by a kill, {} idle-close races",
        tally.ok,
        tally.connect,
        tally.timeout,
        tally.bad_answer,
        tally.unexplained,
        tally.killed_keepalive,
        tally.killed_fresh,
        tally.idle_close
    );
    assert!(sent >= CHAOS.as_millis() as u64 / KILL_EVERY.as_millis() as u64 * 2 / 3, "only {sent} kills were sent");
    assert_eq!(tally.failures(), 0, "failed requests: {tally:?}\n{}", log_tail(&tb, 80));
    assert!(tally.ok > 500, "too few requests served: {tally:?}");
    // Each kill breaks at most the one request each client has in flight with that worker.
    let broken = tally.killed_keepalive + tally.killed_fresh;
    assert!(broken <= sent * threads, "{broken} requests broken by {sent} kills of {threads} clients: {tally:?}");

    // Whole again: three slots, each with an active worker, and no restart under way.
    let whole = wait_stats(port, master, &seen, Duration::from_secs(30), at_rest(WORKERS));
    let stats =
        whole.unwrap_or_else(|last| panic!("never back to {WORKERS} active workers: {last:?}\n{}", log_tail(&tb, 80)));
    let exits = &stats["cluster"]["exits"];
    eprintln!("exits: {exits}; last restart: {}", stats["cluster"]["last_restart"]);
    assert!(exits["crash"].as_u64().unwrap_or(0) >= 1, "the kills were counted as crashes: {exits}");
    assert!(exits["crash"].as_u64().unwrap_or(u64::MAX) <= sent, "more crashes than kills: {exits}");
    // No worker here ever hangs or boots slowly: the master killed none as hung or not ready.
    assert_eq!((exits["hung"].as_u64(), exits["boot_timeout"].as_u64()), (Some(0), Some(0)), "{exits}");
    // Every exited worker reaped.
    let reaped = wait_until(Duration::from_secs(5), || zombie_children(master).is_empty());
    assert!(reaped, "zombie children of the master: {:?}", zombie_children(master));
    let log = tb.stderr();
    eprintln!(
        "rolling restarts during the chaos: {} completed, {} failed, {} queued behind another",
        log.matches("graceful restart completed").count() - 1,
        log.matches("graceful restart failed").count(),
        log.matches("one more will follow it").count()
    );
    // The last restart of the chaos may have failed part of the way, leaving two deploys in use:
    // one more, undisturbed, ends on one program file as before the chaos.
    restart_completes(&tb, &seen);
    // Every descriptor of a retired worker (pidfd, channel, a removed slot's socket) closed.
    let mut fds_after = fds_of(master);
    let closed = wait_until(Duration::from_secs(15), || {
        seen.poll(master);
        fds_after = fds_of(master);
        fds_after.len() == fds_before.len()
    });
    assert!(
        closed,
        "the master had {} descriptors before the chaos and {} after: {}\n{}",
        fds_before.len(),
        fds_after.len(),
        fd_diff(&fds_before, &fds_after),
        log_tail(&tb, 40)
    );
    // Still serving, and only from its current workers.
    let workers = seen.poll(master);
    for _ in 0..30 {
        let (status, body) = http_get(port, "/").expect("the cluster answers after the chaos");
        assert_eq!(status, 200, "{body}");
        let pid = answering_pid(&body).unwrap_or_else(|| panic!("not a worker's answer: {body:?}"));
        assert!(workers.contains(&pid), "answered by {pid}, not one of the workers {workers:?}");
    }

    // A clean shutdown, within the shutdown timeout and a margin, leaving no worker behind.
    tb.signal(Signal::TERM);
    let t = Instant::now();
    let limit = Duration::from_millis(SHUTDOWN_TIMEOUT_MS) + Duration::from_secs(5);
    let status = tb.wait_exit(limit);
    let status = status.unwrap_or_else(|| panic!("the master did not exit within {limit:?}\n{}", log_tail(&tb, 40)));
    assert!(status.success(), "the master exited with {status:?}\n{}", log_tail(&tb, 40));
    let left = seen.still_alive();
    assert!(left.is_empty(), "workers alive after the master's exit: {left:?}");
    eprintln!(
        "shutdown in {:?}; {} worker processes over the run; whole run {:?}",
        t.elapsed(),
        seen.all().len(),
        run_started.elapsed()
    );
}
