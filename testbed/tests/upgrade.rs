//! Integration tests of upgrading the master in place (issue 14), over real processes, under
//! load from clients that never retry: a new build at the program's path takes over (its own
//! options in effect), builds that exit or never get ready are rolled back, either master may
//! be SIGKILLed mid-upgrade, PID 1 refuses, and systemd hears the new main pid.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

/// A copy of the testbed at `<dir>/testbed`, the path the master is started from (and an
/// upgrade runs again).
fn install(dir: &Path) -> PathBuf {
    let exe = dir.join("testbed");
    std::fs::copy(TESTBED, &exe).unwrap();
    exe
}

/// Deploys a new build: a new file (a new inode) at `exe`, a shell script with `body`.
fn deploy(exe: &Path, body: &str) {
    let staged = exe.with_extension("staged");
    std::fs::write(&staged, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, exe).unwrap();
}

/// A new build that runs the testbed with the old arguments and `extra` ones (later options
/// override earlier ones).
fn testbed_with(extra: &str) -> String {
    format!("exec {TESTBED} \"$@\" {extra}")
}

/// Starts the testbed from `exe` and waits for its ready line; the receiver then gets the
/// stdout lines that follow (a new master's, which inherits it).
fn start(exe: &Path, list: &[&str]) -> (Testbed, Receiver<String>) {
    let mut opts = args(list);
    opts.program = Some(exe.to_owned());
    let (mut tb, rx) = Testbed::spawn(opts);
    let line = next_ready(&rx, &tb);
    tb.set_ready(line);
    (tb, rx)
}

fn next_ready(rx: &Receiver<String>, tb: &Testbed) -> String {
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("ready:") => return line,
            Ok(_) => {}
            Err(_) => panic!("no ready line within 30 s; stderr:\n{}", tb.stderr()),
        }
    }
}

fn cli(tb: &Testbed, list: &[&str]) -> Output {
    Command::new(cli_binary()).args(list).env("XDG_RUNTIME_DIR", &tb.dir).output().expect("run the CLI")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The pid of the latest new master the old one started (from its log).
fn new_master_pid(tb: &Testbed) -> u32 {
    let mut pid = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            pid = tb
                .stderr()
                .split("upgrade: new master pid ")
                // The latest: a test may have started more than one.
                .skip(1)
                .last()
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|p| p.parse().ok());
            pid.is_some()
        }),
        "no new master was started:\n{}",
        tb.stderr()
    );
    pid.unwrap()
}

/// The descendants (workers) of `master` seen while `cond` is waited for.
fn wait_collecting(master: u32, seen: &mut BTreeSet<u32>, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_until(timeout, || {
        seen.extend(children_of(master));
        cond()
    })
}

/// `ecewo-cluster upgrade --wait` and `extra`, in a thread (its output once it returns).
fn upgrade_in_background(tb: &Testbed, extra: &[&str]) -> std::thread::JoinHandle<Output> {
    let (bin, dir) = (cli_binary(), tb.dir.clone());
    let args: Vec<String> = ["upgrade", "--wait"].iter().chain(extra).map(|a| a.to_string()).collect();
    std::thread::spawn(move || Command::new(bin).args(args).env("XDG_RUNTIME_DIR", dir).output().unwrap())
}

/// Waits until `master` has started `n` workers; every worker seen.
fn started_workers(master: u32, n: usize, timeout: Duration) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    assert!(
        wait_until(timeout, || {
            seen.extend(children_of(master));
            seen.len() >= n
        }),
        "master {master} did not start {n} workers: {seen:?}"
    );
    seen
}

#[test]
fn an_upgrade_under_load_hands_over_to_the_new_build_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, rx) = start(&exe, &["--workers", "2", "--ready-delay-ms", "100", "--startup-delay-ms", "10"]);
    let old_master = tb.pid();
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = Load::start(tb.port, 2, 2, true);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 300), "the load runs before the upgrade");
    // The new build: its own options (3 workers instead of 2).
    deploy(&exe, &testbed_with("--workers 3"));
    let mut cleanup = NewMasters::default();
    let out = cli(&tb, &["upgrade", "--wait", "--pid", &old_master.to_string()]);
    assert!(out.status.success(), "upgrade --wait: {}\n{}\n{}", text(&out.stdout), text(&out.stderr), tb.stderr());
    let said = text(&out.stdout);
    let new_master: u32 = said
        .split("master pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    cleanup.watch(new_master);
    assert_ne!(new_master, old_master);
    // The new master prints its own ready line on the stdout it inherited, with the same port.
    assert_eq!(next_ready(&rx, &tb), format!("ready: 3 workers on port {}", tb.port));
    // The old master drains its workers and exits 0.
    let status = tb.wait_exit(Duration::from_secs(20)).expect("the old master exits after the hand-over");
    assert!(status.success(), "{status:?}\n{}", tb.stderr());
    assert!(wait_until(Duration::from_secs(10), || old_workers.iter().all(|&w| !alive(w))), "the old workers exited");
    let start = load.count();
    assert!(wait_until(Duration::from_secs(30), || load.count() >= start + 1000), "the load goes on");
    let result = load.stop();
    assert_eq!(result.failed, 0, "failed requests: {:?}", &result.errors[..result.errors.len().min(10)]);
    // New workers, of the new master, with the new options; the last answers came from them.
    let new_workers: BTreeSet<u32> = children_of(new_master).into_iter().collect();
    cleanup.watch(new_master);
    assert_eq!(new_workers.len(), 3, "{new_workers:?}");
    assert!(new_workers.is_disjoint(&old_workers));
    let served = tb.serving_pids(60);
    assert!(served.is_subset(&new_workers), "answers came from {served:?}, not the new workers {new_workers:?}");
    let answered: BTreeSet<u32> = result.bodies.iter().filter_map(|b| pid_of(b)).collect();
    assert!(!answered.is_disjoint(&old_workers) && !answered.is_disjoint(&new_workers), "the load crossed the upgrade");
    // `ecewo-cluster status` finds the new master by the same name, with the counters.
    let out = cli(&tb, &["status", "--json", "--name", &format!("testbed-{}", tb.port)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["master"]["pid"], new_master, "{status}");
    assert_eq!(status["cluster"]["total_workers"], 3);
    assert_eq!(status["cluster"]["active_workers"], 3);
    assert_eq!(status["cluster"]["generation"], 1);
    // It can be upgraded in turn (back to 2 workers), once its predecessor is gone.
    deploy(&exe, &testbed_with("--workers 2"));
    let out = cli(&tb, &["upgrade", "--wait", "--pid", &new_master.to_string()]);
    assert!(
        out.status.success(),
        "{}
{}",
        text(&out.stderr),
        tb.stderr()
    );
    assert_eq!(next_ready(&rx, &tb), format!("ready: 2 workers on port {}", tb.port));
    assert!(wait_until(Duration::from_secs(20), || !alive(new_master)), "the second master exits after its drain");
    let out = cli(&tb, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["cluster"]["generation"], 2, "{status}");
    assert_eq!(status["cluster"]["active_workers"], 2);
    let third = status["master"]["pid"].as_u64().unwrap() as u32;
    cleanup.watch(third);
    let third_workers = children_of(third);
    assert_eq!(tb.get("/").unwrap().0, 200);
    // It stops as any master does.
    let out = cli(&tb, &["stop", "--pid", &third.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_until(Duration::from_secs(20), || !alive(third) && third_workers.iter().all(|&w| !alive(w))));
    assert!(new_workers.iter().all(|&w| !alive(w)));
    eprintln!("{} requests, 0 failed", result.ok);
}

#[test]
fn a_build_that_exits_at_start_is_rolled_back_and_the_old_master_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, _rx) = start(&exe, &["--workers", "2"]);
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = Load::start(tb.port, 1, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200));
    deploy(&exe, "echo 'broken build' >&2\nexit 3");
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("exited before it was ready") && err.contains("code 3"), "{err}");
    assert!(err.contains("the old master keeps serving"), "{err}");
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 300));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    assert_eq!(tb.workers().into_iter().collect::<BTreeSet<u32>>(), old_workers, "nothing changed");
    assert!(tb.child.try_wait().unwrap().is_none(), "the old master runs");
    // The upgrade is over: a good build upgrades now.
    deploy(&exe, &testbed_with(""));
    let mut cleanup = NewMasters::default();
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), tb.stderr());
    cleanup.watch(new_master_pid(&tb));
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()));
}

#[test]
fn a_build_that_never_gets_ready_is_killed_with_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, _rx) = start(&exe, &["--workers", "2", "--upgrade-timeout-ms", "3000"]);
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = Load::start(tb.port, 1, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200));
    deploy(&exe, &testbed_with("--ready-delay-ms 600000"));
    let upgrade = upgrade_in_background(&tb, &[]);
    let new_master = new_master_pid(&tb);
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    // A second upgrade while this one runs is refused, never interleaved.
    let second = cli(&tb, &["upgrade"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(text(&second.stderr).contains("already running"), "{}", text(&second.stderr));
    let mut seen = BTreeSet::new();
    let done = wait_collecting(new_master, &mut seen, Duration::from_secs(15), || upgrade.is_finished());
    assert!(done, "upgrade --wait did not return");
    let out = upgrade.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not ready within 3s"), "{}", text(&out.stderr));
    cleanup.0.extend(&seen);
    assert!(!seen.is_empty(), "the new master had started its workers");
    assert!(
        wait_until(Duration::from_secs(10), || !alive(new_master) && seen.iter().all(|&w| !alive(w))),
        "the new master and its workers are gone (no orphan): {seen:?}"
    );
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 300));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    assert_eq!(tb.workers().into_iter().collect::<BTreeSet<u32>>(), old_workers);
    let stats = tb.stats();
    assert_eq!(stats["cluster"]["last_upgrade"]["result"], "failed", "{stats}");
}

#[test]
fn sigkill_of_the_new_master_mid_upgrade_leaves_the_old_one_serving_and_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, _rx) = start(&exe, &["--workers", "2"]);
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = Load::start(tb.port, 1, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200));
    deploy(&exe, &testbed_with("--ready-delay-ms 3000"));
    tb.signal(Signal::USR1);
    let new_master = new_master_pid(&tb);
    let mut cleanup = NewMasters::default();
    let seen = started_workers(new_master, 2, Duration::from_secs(5));
    cleanup.watch(new_master);
    cleanup.0.extend(&seen);
    send_signal(new_master, Signal::KILL);
    assert!(
        tb.wait_log(Duration::from_secs(10), |l| l
            .contains("upgrade failed: the new master exited before it was ready")),
        "{}",
        tb.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), || seen.iter().all(|&w| !alive(w))),
        "the killed master's workers are gone: {seen:?}"
    );
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 300));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    assert_eq!(tb.workers().into_iter().collect::<BTreeSet<u32>>(), old_workers);
}

#[test]
fn sigkill_of_the_old_master_mid_upgrade_lets_the_new_one_take_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, rx) = start(&exe, &["--workers", "2"]);
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = Load::start(tb.port, 1, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200));
    deploy(&exe, &testbed_with("--ready-delay-ms 1500"));
    tb.signal(Signal::USR1);
    let new_master = new_master_pid(&tb);
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    tb.signal(Signal::KILL);
    assert!(tb.wait_exit(Duration::from_secs(5)).is_some());
    // The old workers drain and exit (their master is gone); the new master takes over.
    assert!(wait_until(Duration::from_secs(20), || old_workers.iter().all(|&w| !alive(w))), "no orphan");
    assert!(
        tb.wait_log(Duration::from_secs(10), |l| l.contains("the old master is gone before it handed over")),
        "{}",
        tb.stderr()
    );
    assert_eq!(next_ready(&rx, &tb), format!("ready: 2 workers on port {}", tb.port));
    cleanup.watch(new_master);
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 300));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    let out = cli(&tb, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["master"]["pid"], new_master, "the control socket is the new master's");
}

#[test]
fn as_pid_1_an_upgrade_is_refused_with_what_to_do_instead() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: a new PID namespace needs root");
        return;
    }
    let mut opts = args(&["--pid", "--fork", "--mount-proc", TESTBED, "--port", "0", "--workers", "1"]);
    opts.program = Some("unshare".into());
    let tb = Testbed::start_with(opts);
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("PID 1") && err.contains("container ends") && err.contains("roll the pods"), "{err}");
    assert_eq!(tb.get("/").unwrap().0, 200, "it serves on");
}

#[test]
fn systemd_hears_the_new_main_pid_and_the_new_master_s_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut opts = args(&["--workers", "2"]);
    opts.program = Some(exe.clone());
    opts.configure = Some(Box::new(move |cmd| {
        cmd.env("NOTIFY_SOCKET", &path);
    }));
    let (mut tb, _rx) = Testbed::spawn(opts);
    let next = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1\n"));
    tb.remember_workers();
    deploy(&exe, &testbed_with(""));
    let mut cleanup = NewMasters::default();
    tb.signal(Signal::USR1);
    let main = next();
    let new_master = new_master_pid(&tb);
    cleanup.watch(new_master);
    assert!(main.starts_with(&format!("MAINPID={new_master}\n")), "from the old master: {main}");
    let ready = next();
    assert!(ready.starts_with(&format!("READY=1\nMAINPID={new_master}\n")), "from the new master: {ready}");
    // The old master says nothing more (no STOPPING=1: the service goes on).
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()));
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 4096];
    if let Ok(n) = sock.recv(&mut buf) {
        let more = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(!more.contains("STOPPING=1"), "{more}");
    }
    cleanup.watch(new_master);
}

#[test]
fn slot_by_slot_at_most_one_worker_more_than_the_slots_runs_and_nothing_fails() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, rx) = start(&exe, &["--workers", "3", "--ready-delay-ms", "150", "--startup-delay-ms", "10"]);
    let old_master = tb.pid();
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = Load::start(tb.port, 1, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200));
    deploy(&exe, &testbed_with(""));
    let upgrade = upgrade_in_background(&tb, &["--slot-by-slot"]);
    let new_master = new_master_pid(&tb);
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    let mut most = 0;
    let mut seen = BTreeSet::new();
    assert!(wait_until(Duration::from_secs(30), || {
        let old: Vec<u32> = children_of(old_master).into_iter().filter(|&p| p != new_master).collect();
        let new = children_of(new_master);
        seen.extend(&new);
        most = most.max(old.len() + new.len());
        upgrade.is_finished()
    }));
    let out = upgrade.join().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), tb.stderr());
    cleanup.0.extend(&seen);
    assert!(most <= 4, "at most 3 + 1 workers at any time, saw {most}");
    assert_eq!(next_ready(&rx, &tb), format!("ready: 3 workers on port {}", tb.port));
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()));
    let log = tb.stderr();
    for slot in 0..3 {
        assert!(
            log.contains(&format!("the new master's worker {slot} is ready; this master's worker {slot} drains")),
            "{log}"
        );
    }
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 300));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    let new_workers: BTreeSet<u32> = children_of(new_master).into_iter().collect();
    assert_eq!(new_workers.len(), 3);
    assert!(new_workers.is_disjoint(&old_workers));
    // The inherited sockets (one per slot) are moved out of the descriptors a spawn copies.
    assert_eq!(listener_fds(new_master, tb.port).len(), 3, "one socket per slot");
    assert_listeners_lifted(new_master, tb.port);
}

/// The stdout lines up to and including the next ready line: the `listener NAME ADDR` ones, as
/// (name, address), and the ready line.
fn listeners_until_ready(rx: &Receiver<String>, tb: &Testbed) -> (Vec<(String, String)>, String) {
    let mut listeners = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("ready:") => return (listeners, line),
            Ok(line) => {
                if let Some((name, addr)) = line.strip_prefix("listener ").and_then(|r| r.split_once(' ')) {
                    listeners.push((name.to_owned(), addr.to_owned()));
                } else if let Some(addr) = line.strip_prefix("admin ") {
                    listeners.push(("(admin)".to_owned(), addr.to_owned()));
                }
            }
            Err(_) => panic!("no ready line within 30 s; stderr:\n{}", tb.stderr()),
        }
    }
}

fn get_unix(path: &Path, what: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {what} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| std::io::Error::other("bad response"))
}

fn get_at(addr: &str, what: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {what} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| std::io::Error::other("bad response"))
}

#[test]
fn the_new_master_keeps_listeners_that_stay_binds_new_ones_and_closes_removed_ones() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let sock = dir.path().join("u.sock");
    let unix = format!("u=unix:{}", sock.display());
    let mut opts = args(&[
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
        "--listen",
        "a=127.0.0.1:0",
        "--listen",
        &unix,
        "--listen",
        "gone=127.0.0.1:0",
    ]);
    opts.program = Some(exe.clone());
    let (mut tb, rx) = Testbed::spawn(opts);
    let (before, ready) = listeners_until_ready(&rx, &tb);
    tb.set_ready(ready);
    let addr = |list: &[(String, String)], name: &str| list.iter().find(|(n, _)| n == name).map(|(_, a)| a.clone());
    let a = addr(&before, "a").expect("listener a");
    let gone = addr(&before, "gone").expect("listener gone");
    let admin = addr(&before, "(admin)").expect("the admin listener");
    let inode = std::fs::metadata(&sock).unwrap().ino();
    // The new build serves `a` and `u` still, `new` instead of `gone`.
    deploy(
        &exe,
        &format!(
            "exec {TESTBED} --workers 2 --admin 127.0.0.1:0 --listen a=127.0.0.1:0 --listen {unix} --listen new=127.0.0.1:0"
        ),
    );
    let mut cleanup = NewMasters::default();
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), tb.stderr());
    cleanup.watch(new_master_pid(&tb));
    let (after, _) = listeners_until_ready(&rx, &tb);
    // The inherited sockets, TCP and unix, are moved out of the descriptors a spawn copies.
    let new_master = new_master_pid(&tb);
    let port_a: u16 = a.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
    assert_listeners_lifted(new_master, port_a);
    assert_sockets_lifted(new_master, &unix_listening_inodes(&sock), &sock.display().to_string());
    assert_eq!(addr(&after, "a"), Some(a.clone()), "port 0 takes the inherited port: {after:?}");
    assert_eq!(addr(&after, "u"), Some(sock.display().to_string()));
    let new = addr(&after, "new").expect("the new listener is bound");
    assert!(addr(&after, "gone").is_none());
    assert_eq!(addr(&after, "(admin)"), Some(admin.clone()), "the admin listener is handed over");
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()));
    cleanup.watch(new_master_pid(&tb));
    // The same unix socket file, still there after the old master's exit, served by the new one.
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), inode, "never bound again");
    assert_eq!(get_unix(&sock, "/").unwrap().0, 200);
    assert_eq!(get_at(&a, "/").unwrap().0, 200);
    assert_eq!(get_at(&new, "/").unwrap().0, 200);
    let (status, body) = get_at(&admin, "/readyz").unwrap();
    assert_eq!(status, 200, "the new master answers the probes: {body}");
    // The removed listener is closed once the old workers are gone.
    assert!(
        wait_until(Duration::from_secs(5), || get_at(&gone, "/")
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)),
        "{gone} still accepts"
    );
}

/// An upgrade whose old master still drains a slow request after the hand-over: the test's
/// cluster, the slow request's reader, the new master.
fn handed_over_while_draining(dir: &Path) -> (Testbed, std::thread::JoinHandle<std::io::Result<(u16, String)>>, u32) {
    let exe = install(dir);
    let (mut tb, _rx) = start(&exe, &["--workers", "2"]);
    let (_, slow) = tb.get_in_flight("/slow?ms=3000");
    deploy(&exe, &testbed_with(""));
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), tb.stderr());
    let new_master = new_master_pid(&tb);
    assert!(tb.child.try_wait().unwrap().is_none(), "the old master still drains the slow request");
    (tb, slow, new_master)
}

#[test]
fn sigkill_of_the_old_master_while_it_drains_after_the_hand_over_changes_nothing_for_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tb, slow, new_master) = handed_over_while_draining(dir.path());
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    // (The new master is a child of the old one too.)
    let old_workers: Vec<u32> = tb.workers().into_iter().filter(|&p| p != new_master).collect();
    let load = Load::start(tb.port, 1, 2, false);
    tb.signal(Signal::KILL);
    assert!(tb.wait_exit(Duration::from_secs(5)).is_some());
    // Its workers finish what they hold (the slow request) and exit: no orphan.
    assert_eq!(slow.join().unwrap().unwrap().0, 200, "the request in flight is answered");
    assert!(wait_until(Duration::from_secs(10), || old_workers.iter().all(|&w| !alive(w))), "{old_workers:?}");
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 300));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    assert!(alive(new_master));
}

#[test]
fn sigkill_of_the_new_master_after_the_hand_over_ends_the_cluster_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tb, slow, new_master) = handed_over_while_draining(dir.path());
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    let new_workers = children_of(new_master);
    assert_eq!(new_workers.len(), 2);
    send_signal(new_master, Signal::KILL);
    // Nobody can serve any more: the old master finishes its drain and exits 0, the new
    // master's workers drain and exit, the request in flight is answered.
    assert_eq!(slow.join().unwrap().unwrap().0, 200);
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", tb.stderr());
    assert!(wait_until(Duration::from_secs(10), || new_workers.iter().all(|&w| !alive(w))), "no orphan");
}

#[test]
fn a_new_master_whose_init_fails_says_why_and_the_old_one_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, _rx) = start(&exe, &["--workers", "2"]);
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    // A SO_REUSEPORT group cannot become one shared socket: the new master's init refuses.
    deploy(&exe, &testbed_with("--balance shared"));
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("its balance changed from reuseport to shared"), "the new master's own words: {err}");
    assert_eq!(tb.workers().into_iter().collect::<BTreeSet<u32>>(), old_workers);
    assert_eq!(tb.get("/").unwrap().0, 200);
}

#[test]
fn sigkill_of_the_new_master_mid_slot_by_slot_gives_the_old_one_its_slots_back() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (tb, _rx) = start(&exe, &["--workers", "3", "--respawn"]);
    let load = Load::start(tb.port, 1, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200));
    // Each new worker takes 1.5 s to get ready: the upgrade is caught with slot 0 handed over
    // and slot 1 starting.
    deploy(&exe, &testbed_with("--ready-delay-ms 1500"));
    let out = cli(&tb, &["upgrade", "--slot-by-slot"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let new_master = new_master_pid(&tb);
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    assert!(
        tb.wait_log(Duration::from_secs(10), |l| l.contains("this master's worker 0 drains")),
        "slot 0 handed over:\n{}",
        tb.stderr()
    );
    cleanup.watch(new_master);
    std::thread::sleep(Duration::from_millis(300));
    cleanup.watch(new_master);
    send_signal(new_master, Signal::KILL);
    assert!(tb.wait_log(Duration::from_secs(10), |l| l.contains("upgrade failed")), "{}", tb.stderr());
    // The old master serves its 3 slots again (the killed master's worker of slot 0 may still
    // take a connection on the slot's socket while it drains).
    assert!(
        wait_until(Duration::from_secs(10), || tb.try_stats().is_some_and(|s| s["cluster"]["active_workers"] == 3)),
        "{}",
        tb.stderr()
    );
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 300));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    let seen = cleanup.0.clone();
    assert!(wait_until(Duration::from_secs(10), || seen.iter().all(|&p| !alive(p))), "no orphan: {seen:?}");
}

#[test]
fn a_program_that_never_answers_is_killed_at_the_upgrade_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (tb, _rx) = start(&exe, &["--workers", "1", "--upgrade-timeout-ms", "1500"]);
    // Not a cluster at all: it never reads its state nor says a word, and closes nothing.
    deploy(&exe, "exec sleep 600");
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not ready within 1.5s"), "{}", text(&out.stderr));
    let sleeper = new_master_pid(&tb);
    assert!(wait_until(Duration::from_secs(5), || !alive(sleeper)), "killed");
    assert_eq!(tb.get("/").unwrap().0, 200);
}

/// A new build that holds its word that it took over (the test hook), its loop blocked, so
/// that a test can kill it in the window of the hand-over.
fn held_build() -> String {
    format!("ECEWO_CLUSTER_TEST_HOLD_TAKEOVER_MS=60000 exec {TESTBED} \"$@\"")
}

#[test]
fn sigkill_of_the_new_master_after_the_offer_leaves_the_old_one_serving_with_everything_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, _rx) = start(&exe, &["--workers", "2"]);
    let old_master = tb.pid();
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = Load::start(tb.port, 1, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200));
    deploy(&exe, &held_build());
    let upgrade = upgrade_in_background(&tb, &[]);
    let new_master = new_master_pid(&tb);
    let mut cleanup = NewMasters::default();
    cleanup.watch(new_master);
    // The new master took over (its route, its control socket) and holds its word: the old
    // master still has its listeners and its workers, and waits.
    assert!(
        tb.wait_log(Duration::from_secs(30), |l| l.contains("test hook ECEWO_CLUSTER_TEST_HOLD_TAKEOVER_MS")),
        "{}",
        tb.stderr()
    );
    let offered = format!("upgrade: master pid {new_master} is ready: handing over");
    assert!(tb.wait_log(Duration::from_secs(10), |l| l.contains(&offered)), "{}", tb.stderr());
    cleanup.watch(new_master);
    let new_workers = children_of(new_master);
    assert_eq!(new_workers.len(), 2, "{new_workers:?}");
    assert_eq!(
        tb.workers().into_iter().filter(|&p| p != new_master).collect::<BTreeSet<u32>>(),
        old_workers,
        "nothing of the old master was stopped"
    );
    send_signal(new_master, Signal::KILL);
    let out = upgrade.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("exited before it took over") && err.contains("SIGKILL"), "{err}");
    assert!(
        tb.wait_log(Duration::from_secs(10), |l| l.contains("took the control socket and steering back")),
        "{}",
        tb.stderr()
    );
    // `status` answers from the old master, which serves on with its own workers.
    let out = cli(&tb, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["master"]["pid"], old_master, "{status}");
    assert_eq!(status["cluster"]["active_workers"], 2);
    assert_eq!(status["cluster"]["generation"], 0);
    assert_eq!(status["cluster"]["last_upgrade"]["result"], "failed", "{status}");
    let start = load.count();
    assert!(wait_until(Duration::from_secs(10), || load.count() >= start + 500));
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    assert!(tb.child.try_wait().unwrap().is_none(), "the old master runs");
    assert_eq!(tb.workers().into_iter().filter(|&p| p != new_master).collect::<BTreeSet<u32>>(), old_workers);
    let served = tb.serving_pids(20);
    assert!(served.is_subset(&old_workers), "answers from {served:?}, not the old workers {old_workers:?}");
    // No orphan: the killed master's workers drain and exit.
    assert!(
        wait_until(Duration::from_secs(20), || new_workers.iter().all(|&w| !alive(w))),
        "the killed master's workers are gone: {new_workers:?}"
    );
    // The upgrade is over: a good build upgrades now.
    deploy(&exe, &testbed_with(""));
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), tb.stderr());
    cleanup.watch(new_master_pid(&tb));
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()));
}

/// The processes on this machine that belong to the generation of `master`: itself, and every
/// process whose environment names it as its master (its workers).
fn generation_of(master: u32) -> Vec<u32> {
    let marker = format!("ECEWO_CLUSTER_MASTER_PID={master}\0");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if pid == master || env.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_rollback_stops_the_new_master_which_stops_its_workers_and_nothing_of_its_generation_remains() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    // Under a NOTIFY_SOCKET double, with a unix socket listener: the stopped new master must
    // neither speak for the service nor remove the files the old master serves on.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let sock = dir.path().join("u.sock");
    let unix = format!("u=unix:{}", sock.display());
    let mut opts = args(&["--workers", "2", "--upgrade-timeout-ms", "2000", "--listen", &unix]);
    opts.program = Some(exe.clone());
    opts.configure = Some(Box::new(move |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify_path);
    }));
    let (mut tb, rx) = Testbed::spawn(opts);
    let (_, ready) = listeners_until_ready(&rx, &tb);
    tb.set_ready(ready);
    deploy(&exe, &testbed_with("--ready-delay-ms 600000"));
    let upgrade = upgrade_in_background(&tb, &[]);
    let new_master = new_master_pid(&tb);
    let mut cleanup = NewMasters::default();
    let seen = started_workers(new_master, 2, Duration::from_secs(10));
    cleanup.watch(new_master);
    cleanup.0.extend(&seen);
    // (A worker between its fork and its exec has its master's environment still.)
    assert!(
        wait_until(Duration::from_secs(10), || generation_of(new_master).len() >= 3),
        "the scan sees the new generation: {:?}",
        generation_of(new_master)
    );
    let out = upgrade.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not ready within 2s"), "{}", text(&out.stderr));
    // Asked to stop, it stopped its own workers (a master killed at once would say nothing).
    assert!(
        tb.wait_log(Duration::from_secs(20), |l| l.contains("shutting down: stopping 2 workers")),
        "the new master shut down gracefully:\n{}",
        tb.stderr()
    );
    assert!(wait_until(Duration::from_secs(20), || !alive(new_master)), "the new master exited");
    assert!(
        wait_until(Duration::from_secs(5), || generation_of(new_master).is_empty()),
        "processes of the new generation remain: {:?}",
        generation_of(new_master)
    );
    assert!(!tb.stderr().contains("did not stop in time"), "{}", tb.stderr());
    // The old master's files are still there, served, and `status` finds it.
    assert_eq!(get_unix(&sock, "/").unwrap().0, 200, "the unix socket file is the old master's still");
    let out = cli(&tb, &["status", "--json"]);
    assert!(out.status.success(), "the control socket is still there: {}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["master"]["pid"], tb.pid(), "{status}");
    // systemd heard nothing from the new master, and nobody said STOPPING=1.
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut heard = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(heard.iter().all(|m| !m.contains("STOPPING=1") && !m.contains("MAINPID=")), "{heard:?}");
    assert!(heard.first().is_some_and(|m| m.starts_with("READY=1")), "the old master's own: {heard:?}");
}

#[test]
fn an_upgrade_from_4_to_2_workers_under_keep_alive_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let exe = install(dir.path());
    let (mut tb, rx) = start(&exe, &["--workers", "4", "--startup-delay-ms", "10"]);
    let old_workers: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert_eq!(listeners_held(tb.pid(), tb.port), 4, "a socket per slot");
    // Keep-alive clients only, and many of them: connections sit on all four slots' sockets.
    let load = Load::start(tb.port, 2, 6, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 500));
    deploy(&exe, &testbed_with("--workers 2"));
    let mut cleanup = NewMasters::default();
    let out = cli(&tb, &["upgrade", "--wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), tb.stderr());
    let new_master = new_master_pid(&tb);
    cleanup.watch(new_master);
    assert_eq!(next_ready(&rx, &tb), format!("ready: 2 workers on port {}", tb.port));
    assert!(tb.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", tb.stderr());
    assert!(wait_until(Duration::from_secs(10), || old_workers.iter().all(|&w| !alive(w))));
    // The two released slots' sockets are closed once the old workers are gone.
    assert!(
        wait_until(Duration::from_secs(10), || listeners_held(new_master, tb.port) == 2),
        "the new master holds {} sockets",
        listeners_held(new_master, tb.port)
    );
    let start = load.count();
    assert!(wait_until(Duration::from_secs(20), || load.count() >= start + 1000), "the load goes on");
    let result = load.stop();
    assert_eq!(result.failed, 0, "failed requests: {:?}", &result.errors[..result.errors.len().min(10)]);
    cleanup.watch(new_master);
    assert_eq!(children_of(new_master).len(), 2);
    eprintln!("{} requests, 0 failed", result.ok);
}

/// Stale upgrade variables whose old master's start time is not its parent's (a pid used again
/// by another process) are ignored: the program starts as a master of its own. (It would wait
/// for a state on the channel otherwise.)
#[test]
fn stale_upgrade_variables_naming_another_start_time_are_ignored() {
    use command_fds::{CommandFdExt, FdMapping};
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut opts = args(&["--workers", "1"]);
    opts.ready_timeout = Duration::from_secs(15);
    opts.configure = Some(Box::new(move |cmd| {
        cmd.env("ECEWO_CLUSTER_UPGRADE_FD", "3")
            .env("ECEWO_CLUSTER_UPGRADE_FROM", std::process::id().to_string())
            .env("ECEWO_CLUSTER_UPGRADE_FROM_START", "1");
        cmd.fd_mappings(vec![FdMapping { parent_fd: theirs.into(), child_fd: 3 }]).unwrap();
    }));
    let tb = Testbed::start_with(opts);
    assert_eq!(tb.get("/").unwrap().0, 200);
    let out = cli(&tb, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["cluster"]["generation"], 0, "a master of its own: {status}");
    drop(ours);
}
