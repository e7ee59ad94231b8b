//! Integration tests of supervision over real processes (issue 3): respawn, crash protection,
//! callbacks, statistics from the master and from workers, signalling workers.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use serde_json::Value;

fn worker_pid_in(stats: &Value, slot: usize) -> Option<u64> {
    stats["workers"][slot]["pid"].as_u64()
}

/// Waits until the master has a child that is none of `old`, and returns its pid.
fn wait_replaced(tb: &mut Testbed, old: &[u32], timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(&new) = tb.workers().iter().find(|p| !old.contains(p)) {
            return Some(new);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

#[test]
fn a_killed_worker_is_respawned_fast_and_counted() {
    let mut tb = Testbed::start(&["--workers", "2", "--respawn", "--startup-delay-ms", "10"]);
    let before = tb.stats();
    let victim = worker_pid_in(&before, 1).unwrap() as u32;
    let other = worker_pid_in(&before, 0).unwrap() as u32;
    let t0 = Instant::now();
    send_signal(victim, Signal::KILL);
    let replaced = wait_replaced(&mut tb, &[victim, other], Duration::from_millis(100 + 200));
    let new = replaced.unwrap_or_else(|| panic!("not replaced within 300 ms:\n{}", tb.stderr()));
    eprintln!("replaced after {:?}", t0.elapsed());
    assert!(
        tb.wait_log(Duration::from_secs(2), |l| l
            .contains("on_exit id=1 status=signal 9 (SIGKILL) raw=137 crash=true"))
    );
    assert!(tb.wait_log(Duration::from_secs(2), |l| l.contains(&format!("on_start id=1 pid={new}"))));
    assert!(wait_until(Duration::from_secs(5), || tb.stats()["cluster"]["active_workers"] == 2));
    let after = tb.stats();
    assert_eq!(after["cluster"]["total_restarts"], 1);
    assert_eq!(after["workers"][1]["crash_count"], 1);
    assert_eq!(after["workers"][1]["pid"], new);
    assert_eq!(after["workers"][1]["exit_status"], serde_json::json!({"signal": 9}));
    assert_eq!(after["workers"][0]["crash_count"], 0);
}

#[test]
fn connections_queued_on_a_crashed_slot_are_served_by_its_replacement() {
    // Worker 1 hangs (SIGSTOP) while connections arrive: about half of them queue on slot 1's
    // socket. Then it is killed; the master keeps the socket, routes new connections to slot 0
    // while slot 1 is empty, and the replacement, a second later, serves the queued ones.
    let mut tb =
        Testbed::start(&["--workers", "2", "--respawn", "--respawn-delay-ms", "1000", "--startup-delay-ms", "10"]);
    let victim = worker_pid_in(&tb.stats(), 1).unwrap() as u32;
    send_signal(victim, Signal::STOP);
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", tb.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    send_signal(victim, Signal::KILL);
    // While slot 1 is empty, new connections all go to slot 0.
    assert!(tb.wait_log(Duration::from_secs(2), |l| l.contains("on_exit id=1")));
    for _ in 0..20 {
        let (status, body) = tb.get("/").unwrap();
        assert_eq!((status, worker_of(&body)), (200, Some(0)));
    }
    let mut by_replacement = 0;
    for mut s in conns {
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("every queued connection is answered");
        let (status, body) = parse_response(&raw).expect("a full response");
        assert_eq!(status, 200);
        if worker_of(&body) == Some(1) {
            assert_ne!(pid_of(&body), Some(victim));
            by_replacement += 1;
        }
    }
    assert!(by_replacement > 0, "connections queued on slot 1 were served by its replacement");
    tb.remember_workers();
}

#[test]
fn crash_abort_and_exit_codes_are_classified() {
    let mut tb = Testbed::start(&["--workers", "1", "--respawn", "--respawn-max-crashes", "10"]);
    let mut last = worker_pid_in(&tb.stats(), 0).unwrap() as u32;
    for (path, line) in [
        ("/crash", "status=signal 6 (SIGABRT) raw=134 crash=true"),
        ("/exit?code=3", "status=exit code 3 raw=3 crash=true"),
        ("/exit?code=0", "status=exit code 0 raw=0 crash=false"),
    ] {
        assert!(tb.get(path).is_err(), "{path} ends the worker mid-request");
        assert!(tb.wait_log(Duration::from_secs(5), |l| l.contains(line)), "{path}: {}", tb.stderr());
        assert!(
            wait_until(Duration::from_secs(5), || {
                let s = tb.stats();
                s["workers"][0]["status"] == "active" && worker_pid_in(&s, 0) != Some(last as u64)
            }),
            "{path}: replaced"
        );
        last = worker_pid_in(&tb.stats(), 0).unwrap() as u32;
        tb.remember_workers();
    }
    let s = tb.stats();
    assert_eq!(s["workers"][0]["crash_count"], 2, "a clean exit is not a crash");
    assert_eq!(s["cluster"]["total_restarts"], 3);
}

#[test]
fn crash_loop_disables_every_slot_and_the_master_exits_non_zero() {
    let (mut tb, _rx) = Testbed::spawn(args(&["--workers", "2", "--respawn", "--crash-on-start"]));
    let st = tb.wait_exit(Duration::from_secs(10)).expect("the master gives up");
    assert!(!st.success(), "{st:?}");
    let log = tb.stderr();
    for slot in 0..2 {
        assert_eq!(log.matches(&format!("on_start id={slot} ")).count(), 3, "spawned exactly 3 times: {log}");
        let prefix = format!("Worker {slot} crashing too fast (3 times in ");
        let line = log.lines().find(|l| l.contains(&prefix)).unwrap_or_else(|| panic!("no crash line: {log}"));
        assert!(line.ends_with("s), disabling respawn"), "{line}");
        // Three crashes 100 ms apart: a sub-second window, shown readably (`0.2s`), never `0s`.
        let window = line.split(&prefix).nth(1).and_then(|rest| rest.split("s)").next()).unwrap_or("");
        let secs: f64 = window.parse().unwrap_or_else(|_| panic!("window {window:?} in {line}"));
        assert!(secs > 0.0 && secs < 5.0 && window.contains('.'), "{line}");
    }
    assert!(log.contains("no worker can run any more"), "{log}");
    // Logs written to a file carry no colour codes.
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log file: {log}");
}

#[test]
fn one_crash_looping_slot_is_disabled_while_the_other_serves() {
    let (mut tb, rx) =
        Testbed::spawn(args(&["--workers", "2", "--respawn", "--crash-on-start-id", "1", "--startup-delay-ms", "10"]));
    let line = rx.recv_timeout(Duration::from_secs(10)).expect("ready once slot 1 is disabled");
    assert!(line.starts_with("ready: 1 workers on port "), "{line}");
    tb.set_ready(line);
    for _ in 0..100 {
        let (status, body) = tb.get("/").unwrap();
        assert_eq!((status, worker_of(&body)), (200, Some(0)));
    }
    let s = tb.stats();
    assert_eq!(s["cluster"]["total_workers"], 2);
    assert_eq!(s["cluster"]["active_workers"], 1);
    assert_eq!(s["cluster"]["disabled_workers"], 1);
    assert_eq!(s["workers"][0]["status"], "active");
    assert_eq!(s["workers"][1]["status"], "disabled");
    assert_eq!(s["workers"][1]["respawn_disabled"], true);
    assert_eq!(s["workers"][1]["crash_count"], 3);
    assert_eq!(s["workers"][1]["pid"], Value::Null);
    let log = tb.stderr();
    assert!(log.contains("closed the listening socket of worker 1"), "{log}");
    // Only slot 0's socket remains in the master.
    assert_eq!(listeners_held(tb.pid(), tb.port), 1);
}

#[test]
fn signal_workers_reaches_every_active_worker_and_stats_agree() {
    let (mut tb, rx) = Testbed::spawn(args(&["--workers", "3", "--startup-delay-ms", "10"]));
    tb.set_ready(rx.recv_timeout(Duration::from_secs(20)).unwrap());
    let workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    // SIGHUP: the testbed master prints its own view and calls signal_workers(SIGUSR1).
    tb.signal(Signal::HUP);
    let line = rx.recv_timeout(Duration::from_secs(5)).expect("the master's stats line");
    let master_view: Value = serde_json::from_str(line.strip_prefix("stats: ").unwrap()).unwrap();
    let worker_view = tb.stats();
    for key in [
        "total_workers",
        "active_workers",
        "crashed_workers",
        "disabled_workers",
        "shutdown_requested",
        "restart_requested",
        "total_restarts",
        "last_restart",
    ] {
        assert_eq!(master_view["cluster"][key], worker_view["cluster"][key], "{key}");
    }
    assert!(worker_view["cluster"]["total_rss_bytes"].as_u64().unwrap() > 0, "resource figures from /proc");
    for slot in 0..3 {
        for key in ["worker_id", "pid", "port", "status", "crash_count", "respawn_disabled", "start_time", "restarts"] {
            assert_eq!(master_view["workers"][slot][key], worker_view["workers"][slot][key], "{key}");
        }
    }
    let pids: BTreeSet<u32> = (0..3).map(|i| worker_view["workers"][i]["pid"].as_u64().unwrap() as u32).collect();
    assert_eq!(pids, workers, "stats pids are the master's real children");
    // Every worker counted one SIGUSR1.
    let seen = wait_all_got_usr1(&tb, 3, Duration::from_secs(5));
    assert_eq!(seen, BTreeSet::from([0, 1, 2]), "every worker reports usr1=1");
    assert!(tb.stderr().contains("sent SIGUSR1 to workers [0, 1, 2]"));
}

#[test]
fn a_panicking_callback_does_not_stop_supervision() {
    let mut tb = Testbed::start(&["--workers", "2", "--respawn", "--panic-in-callbacks"]);
    assert!(tb.stderr().contains("the on_worker_ready callback panicked"));
    let victim = tb.workers()[0];
    send_signal(victim, Signal::KILL);
    assert!(wait_until(Duration::from_secs(5), || {
        let s = tb.stats();
        s["cluster"]["active_workers"] == 2 && s["cluster"]["total_restarts"] == 1
    }));
}

#[test]
fn a_crash_respawn_runs_the_running_binary_even_if_the_file_was_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("testbed");
    std::fs::copy(TESTBED, &exe).unwrap();
    let mut opts = args(&["--workers", "1", "--respawn"]);
    opts.program = Some(exe.clone());
    let (mut tb, rx) = Testbed::spawn(opts);
    tb.set_ready(rx.recv_timeout(Duration::from_secs(20)).expect("ready"));
    let old = tb.workers()[0];
    // Deploy something else at the same path (a new inode, as deploys do).
    let staged = dir.path().join("staged");
    std::fs::write(&staged, "#!/bin/sh\nexit 42\n").unwrap();
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, &exe).unwrap();
    send_signal(old, Signal::KILL);
    let new = wait_replaced(&mut tb, &[old], Duration::from_secs(5)).expect("respawned");
    assert!(wait_until(Duration::from_secs(5), || tb.get("/").is_ok_and(|(s, b)| s == 200 && pid_of(&b) == Some(new))));
    let link = std::fs::read_link(format!("/proc/{new}/exe")).unwrap();
    assert!(link.to_string_lossy().ends_with("(deleted)"), "the respawn runs the old, replaced file: {link:?}");
}

/// The pids of the `on_start id=<slot> pid=<pid>` lines of a log.
fn started_pids(log: &str, slot: usize) -> Vec<u32> {
    let prefix = format!("on_start id={slot} pid=");
    log.lines().filter_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()).collect()
}

#[test]
fn a_worker_never_ready_is_killed_as_a_boot_failure_until_crash_protection_disables_it() {
    // Workers would take 100 s to get ready; the master gives each 300 ms.
    let (mut tb, _rx) = Testbed::spawn(args(&[
        "--workers",
        "1",
        "--respawn",
        "--respawn-delay-ms",
        "50",
        "--respawn-max-crashes",
        "2",
        "--ready-timeout-ms",
        "300",
        "--ready-delay-ms",
        "100000",
    ]));
    let st = tb.wait_exit(Duration::from_secs(10));
    let log = tb.stderr();
    let st = st.unwrap_or_else(|| panic!("the master still waits for a worker that never gets ready:\n{log}"));
    assert!(!st.success(), "{st:?}");
    let pids = started_pids(&log, 0);
    assert_eq!(pids.len(), 2, "started, respawned once, then disabled: {log}");
    assert_eq!(log.matches("not ready within 300ms: killing it").count(), 2, "{log}");
    assert_eq!(log.matches("on_exit id=0 status=signal 9 (SIGKILL) raw=137 crash=true").count(), 2, "{log}");
    assert!(log.contains("crashed: signal 9 (SIGKILL) (not ready within 300ms)"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("Worker 0 crashing too fast (2 times in ") && l.ends_with("s), disabling respawn")),
        "{log}"
    );
    assert!(log.contains("no worker can run any more"), "{log}");
    for pid in pids {
        assert!(!alive(pid), "worker {pid} was killed and reaped");
    }
}

#[test]
fn the_socket_of_a_slot_nobody_serves_again_is_closed() {
    // Respawn off: a worker that crashes, or exits cleanly, leaves a slot nobody will serve.
    let mut tb = Testbed::start(&["--workers", "3", "--startup-delay-ms", "10"]);
    tb.remember_workers();
    assert_eq!(listeners_held(tb.pid(), tb.port), 3);
    let stats = tb.stats();
    let (crasher, quitter) = (worker_pid_in(&stats, 1).unwrap() as u32, worker_pid_in(&stats, 2).unwrap() as u32);
    send_signal(crasher, Signal::KILL);
    assert!(
        tb.wait_log(Duration::from_secs(5), |l| l.contains("closed the listening socket of worker 1")),
        "{}",
        tb.stderr()
    );
    assert_eq!(listeners_held(tb.pid(), tb.port), 2);
    // SIGTERM sent by somebody else: the worker drains and exits 0, a clean exit.
    send_signal(quitter, Signal::TERM);
    assert!(tb.wait_log(Duration::from_secs(5), |l| l.contains("on_exit id=2 status=exit code 0 raw=0 crash=false")));
    assert!(
        tb.wait_log(Duration::from_secs(5), |l| l.contains("closed the listening socket of worker 2")),
        "{}",
        tb.stderr()
    );
    assert_eq!(listeners_held(tb.pid(), tb.port), 1);
    // Slot 0 still serves every connection.
    for _ in 0..20 {
        let (status, body) = tb.get("/").unwrap();
        assert_eq!((status, worker_of(&body)), (200, Some(0)));
    }
}

/// The master's stderr is a pipe nobody reads (a stuck log collector): supervision goes on.
/// Each respawn logs a few lines, so a blocking writer would stop the master once the pipe's
/// buffer (64 KiB, about 170 respawns) is full.
#[test]
fn an_unread_stderr_never_stops_supervision() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let mut opts = args(&[
        "--workers",
        "1",
        "--respawn",
        "--crash-on-start",
        "--respawn-delay-ms",
        "1",
        "--respawn-max-crashes",
        "1000000",
        "--control-socket",
        sock.to_str().unwrap(),
    ]);
    opts.configure = Some(Box::new(|cmd: &mut std::process::Command| {
        cmd.stderr(std::process::Stdio::piped());
    }));
    let (mut tb, _rx) = Testbed::spawn(opts);
    // The read end is held, never read.
    let _unread = tb.child.stderr.take().expect("a piped stderr");
    let restarts = |sock: &std::path::Path| -> Option<u64> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        v["cluster"]["total_restarts"].as_u64()
    };
    // Far past what the pipe's buffer would hold if the master blocked on it.
    let enough = wait_until(Duration::from_secs(30), || restarts(&sock).is_some_and(|n| n >= 1000));
    assert!(enough, "supervision stalled at {:?} respawns", restarts(&sock));
    tb.signal(Signal::KILL);
}
