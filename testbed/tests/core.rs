//! Integration tests of the core cluster over real processes on loopback (issue 2).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use common::*;
use rustix::process::Signal;

/// Socket inode targets ("socket:[123]") of a process's descriptors.
fn sockets(pid: u32) -> BTreeSet<String> {
    fds_of(pid).into_iter().map(|(_, t)| t).filter(|t| t.starts_with("socket:")).collect()
}

fn two_workers_share_the_load(balance: &str) {
    // Plant a descriptor in the master that is NOT close-on-exec (as a careless parent shell
    // would): no worker may inherit it.
    let dir = tempfile::tempdir().unwrap();
    let planted = dir.path().join("planted");
    std::fs::write(&planted, "x").unwrap();
    let file = std::fs::File::open(&planted).unwrap();
    let mut opts = args(&["--workers", "2", "--balance", balance]);
    opts.configure = Some(Box::new(move |cmd| {
        cmd.fd_mappings(vec![FdMapping { parent_fd: file.into(), child_fd: 42 }]).unwrap();
    }));
    let mut tb = Testbed::start_with(opts);
    assert_eq!(tb.ready_line, format!("ready: 2 workers on port {}", tb.port));

    let mut seen = HashMap::new();
    for _ in 0..200 {
        let (status, body) = tb.get("/").unwrap();
        assert_eq!(status, 200, "{body}");
        *seen.entry(worker_of(&body).unwrap()).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), BTreeSet::from([0, 1]), "{balance}: {seen:?}");

    // Exactly one master (our child) and two workers (its children, which have none).
    let workers = tb.workers();
    assert_eq!(workers.len(), 2, "{balance}: workers {workers:?}");
    for &w in &workers {
        assert!(children_of(w).is_empty());
    }

    // Each worker holds only stdio, its socket(s) and its channel from the master: nothing else
    // the master has (other slots' sockets, its eventfd, its signal pipe, the planted file).
    let master_fds = fds_of(tb.pid());
    assert!(master_fds.iter().any(|(_, t)| t.ends_with("planted")), "the plant is in the master");
    let master_sockets = sockets(tb.pid());
    for &w in &workers {
        let fds = fds_of(w);
        assert!(!fds.iter().any(|(_, t)| t.ends_with("planted")), "worker {w} inherited a stray fd: {fds:?}");
        let shared: Vec<_> = sockets(w).intersection(&master_sockets).cloned().collect();
        assert_eq!(shared.len(), 1, "{balance}: worker {w} shares exactly its listener with the master: {shared:?}");
        let by_number: HashMap<i32, String> = fds.into_iter().collect();
        assert_eq!(by_number.get(&3), Some(&shared[0]), "the listener is at fd 3");
        assert!(by_number.get(&4).is_some_and(|t| t.starts_with("socket:")), "the channel is at fd 4");
        assert_eq!(std::fs::read_to_string(format!("/proc/{w}/comm")).unwrap().trim(), "testbed");
    }
    assert_eq!(listeners_held(tb.pid(), tb.port), if balance == "shared" { 1 } else { 2 });
    let common = sockets(workers[0]).intersection(&sockets(workers[1])).count();
    assert_eq!(common, usize::from(balance == "shared"), "{balance}: listeners the two workers share");
    tb.signal(Signal::TERM);
    assert!(tb.wait_exit(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn two_workers_reuseport() {
    two_workers_share_the_load("reuseport");
}

#[test]
fn two_workers_shared() {
    two_workers_share_the_load("shared");
}

#[test]
fn port_zero_reports_the_real_port() {
    let tb = Testbed::start(&["--workers", "1", "--port", "0"]);
    assert_ne!(tb.port, 0);
    let (status, body) = tb.get("/").unwrap();
    assert_eq!((status, worker_of(&body)), (200, Some(0)));
}

#[test]
fn address_in_use_fails_before_any_worker() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    for balance in ["reuseport", "shared"] {
        let (mut tb, _rx) = Testbed::spawn(args(&["--workers", "2", "--port", &port, "--balance", balance]));
        let status = tb.wait_exit(Duration::from_secs(10)).expect("master exits");
        assert!(!status.success());
        let log = tb.stderr();
        assert!(log.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{log}");
        assert!(!log.contains("started"), "no worker may be spawned: {log}");
    }
}

/// `sig` to the master with a slow request in flight: the request completes, the master stops
/// every worker gracefully and exits 0, and no process is left.
fn a_signal_lets_in_flight_requests_finish(sig: Signal, name: &str, extra: &[&str]) {
    let mut list = vec!["--workers", "2"];
    list.extend(extra);
    let mut tb = Testbed::start(&list);
    let workers = tb.workers();
    assert_eq!(workers.len(), 2);
    let (_, slow) = tb.get_in_flight("/slow?ms=1500");
    tb.signal(sig);
    let (status, body) = slow.join().unwrap().expect("the in-flight request completes");
    assert_eq!((status, body.as_str()), (200, "slow 1500"), "{name}");
    let st = tb.wait_exit(Duration::from_secs(10)).expect("master exits");
    assert!(st.success(), "{name}: {st:?}\n{}", tb.stderr());
    for w in workers {
        assert!(!alive(w), "{name}: worker {w} outlived the master");
    }
    let log = tb.stderr();
    assert!(log.contains(&format!("received {name}")), "{log}");
    assert!(log.contains("shutting down: stopping 2 workers"), "{name}: a graceful shutdown\n{log}");
    assert_eq!(log.matches("exited: exit code 0").count(), 2, "{name}: both workers drained and exited 0\n{log}");
    assert!(!log.contains("crashed"), "{log}");
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    a_signal_lets_in_flight_requests_finish(Signal::TERM, "SIGTERM", &[]);
}

#[test]
fn sigquit_stops_gracefully_by_default() {
    a_signal_lets_in_flight_requests_finish(Signal::QUIT, "SIGQUIT", &[]);
}

#[test]
fn sighup_stops_gracefully_unless_bound() {
    // The testbed binds SIGHUP (to print statistics) unless told not to.
    a_signal_lets_in_flight_requests_finish(Signal::HUP, "SIGHUP", &["--default-sighup"]);
}

/// Under `nohup` (SIGHUP ignored when the program starts) the master keeps ignoring SIGHUP
/// rather than shutting down when the terminal closes; SIGTERM still stops it.
#[test]
fn an_inherited_ignored_sighup_stays_ignored() {
    let testbed = std::path::PathBuf::from(TESTBED);
    let opts = Options {
        program: Some("nohup".into()),
        args: [testbed.to_str().unwrap(), "--port", "0", "--workers", "1", "--default-sighup"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Options::default()
    };
    let mut tb = Testbed::start_with(opts);
    tb.signal(Signal::HUP);
    // The master handles SIGUSR2 after the SIGHUP it ignores: once the rollout it starts has
    // replaced the worker, the SIGHUP would long have been acted on.
    let before = tb.workers();
    tb.signal(Signal::USR2);
    assert!(tb.wait_log(Duration::from_secs(10), |l| l.contains("graceful restart completed")), "{}", tb.stderr());
    assert_eq!(tb.get("/").map(|(s, _)| s).ok(), Some(200), "still serving after SIGHUP");
    let log = tb.stderr();
    assert!(!log.contains("received SIGHUP") && !log.contains("shutting down"), "{log}");
    assert_ne!(tb.workers(), before, "the rollout ran");
    tb.signal(Signal::TERM);
    let st = tb.wait_exit(Duration::from_secs(10)).expect("SIGTERM still stops it");
    assert!(st.success(), "{st:?}");
}

#[test]
fn shutdown_timeout_kills_a_wedged_worker() {
    let mut tb = Testbed::start(&["--workers", "1", "--shutdown-timeout-ms", "500"]);
    let workers = tb.workers();
    let (_, slow) = tb.get_in_flight("/slow?ms=60000");
    let t0 = Instant::now();
    tb.signal(Signal::TERM);
    let st = tb.wait_exit(Duration::from_secs(10)).expect("master exits");
    let took = t0.elapsed();
    assert!(st.success(), "{st:?}");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(3000), "took {took:?}");
    let log = tb.stderr();
    assert!(log.contains("shutdown timeout: killing workers [0]"), "{log}");
    assert!(log.contains("exited: signal 9 (SIGKILL)"), "{log}");
    assert!(slow.join().unwrap().is_err(), "the killed request cannot complete");
    for w in workers {
        assert!(!alive(w));
    }
}

#[test]
fn workers_die_with_a_killed_master() {
    let mut tb = Testbed::start(&["--workers", "3", "--startup-delay-ms", "10"]);
    let workers = tb.workers();
    assert_eq!(workers.len(), 3);
    tb.signal(Signal::KILL);
    tb.wait_exit(Duration::from_secs(5)).expect("master dies");
    let t0 = Instant::now();
    assert!(wait_until(Duration::from_secs(1), || workers.iter().all(|&w| !alive(w))), "workers outlived the master");
    eprintln!("workers gone {:?} after the master", t0.elapsed());
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_owned())
        .collect()
}

/// A worker that only serves (`Cluster::serve`: the hello example) reads its channel on its
/// runtime, not on a thread: one thread per worker process (glibc's single-threaded fast paths
/// stay on: bench/frameworks). It still notices its master's death at once.
#[test]
fn a_serving_worker_is_one_thread_and_dies_with_its_master() {
    let port = TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    let opts = Options {
        program: Some(example_binary("hello")),
        args: ["--port", &port.to_string(), "--workers", "2"].map(str::to_owned).to_vec(),
        exact_args: true,
        ..Options::default()
    };
    let (mut tb, _rx) = Testbed::spawn(opts);
    tb.port = port;
    assert!(tb.wait_log(Duration::from_secs(30), |l| l.contains("listening on")), "{}", tb.stderr());
    let mut ids = BTreeSet::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            if let Ok((200, body)) = http_get(port, "/") {
                ids.insert(body);
            }
            ids.len() == 2
        }),
        "both workers answer: {ids:?}\n{}",
        tb.stderr()
    );
    let workers = tb.workers();
    assert_eq!(workers.len(), 2);
    for &w in &workers {
        assert_eq!(thread_names(w), ["hello"], "worker {w} has no thread but its main one");
        // Its heartbeat is a timerfd in the runtime's epoll set, not a tokio timer (with one
        // pending, the runtime would arm a kernel timer at every sleep).
        assert!(
            fds_of(w).iter().any(|(_, target)| target == "anon_inode:[timerfd]"),
            "worker {w} beats from a timerfd: {:?}",
            fds_of(w)
        );
    }
    tb.signal(Signal::KILL);
    tb.wait_exit(Duration::from_secs(5)).expect("master dies");
    assert!(wait_until(Duration::from_secs(5), || workers.iter().all(|&w| !alive(w))), "workers outlived the master");
}

/// The master SIGKILLed while its worker's runtime is stuck in a handler (a blocking call): no
/// thread of the worker can notice, yet the worker is gone a shutdown timeout later (the kernel's
/// parent-death SIGTERM arms a SIGKILL timer from the signal handler), instead of living on as
/// an orphan that holds the listening socket.
#[test]
fn a_worker_stuck_in_a_handler_is_killed_a_shutdown_timeout_after_its_master_died() {
    let mut tb = Testbed::start(&["--workers", "1", "--shutdown-timeout-ms", "1500"]);
    let worker = tb.workers()[0];
    // The channel is read on the runtime (no channel thread would end the worker) and the
    // testbed's worker logs without a writer thread: the benchmarks measure one-thread workers.
    assert_eq!(thread_names(worker), ["testbed"], "worker {worker} has no thread but its main one");
    let (hung, _reader) = tb.hang_in_flight(120000);
    assert_eq!(hung, worker);
    tb.signal(Signal::KILL);
    tb.wait_exit(Duration::from_secs(5)).expect("master dies");
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(8), || !alive(hung)),
        "the stuck worker outlived its master by {:?}",
        t0.elapsed()
    );
    eprintln!("the stuck worker was gone {:?} after its master", t0.elapsed());
}

#[test]
fn ctrl_c_to_the_process_group_stops_gracefully() {
    let mut opts = args(&["--workers", "2"]);
    // The master leads its own group, like a shell's foreground job.
    opts.configure = Some(Box::new(|cmd| {
        cmd.process_group(0);
    }));
    let mut tb = Testbed::start_with(opts);
    let workers = tb.workers();
    let group = rustix::process::Pid::from_raw(tb.pid() as i32).unwrap();
    rustix::process::kill_process_group(group, Signal::INT).unwrap();
    let st = tb.wait_exit(Duration::from_secs(10)).expect("master exits");
    assert!(st.success(), "{st:?}");
    let log = tb.stderr();
    assert!(log.contains("received SIGINT"), "{log}");
    assert_eq!(log.matches("exited: exit code 0").count(), 2, "both workers drained and exited 0: {log}");
    assert!(!log.contains("signal 2"), "no worker was killed by the SIGINT itself: {log}");
    for w in workers {
        assert!(!alive(w));
    }
}

#[test]
fn a_program_with_its_own_clap_arguments_runs_unchanged_in_workers() {
    let dir = tempfile::tempdir().unwrap();
    let tag = dir.path().join("tag");
    write_file(&tag, "blue\nignored second line\n");
    let tb = Testbed::start(&["--workers", "2", "--tag-file", tag.to_str().unwrap(), "--ready-delay-ms", "50"]);
    for _ in 0..20 {
        let (status, body) = tb.get("/").unwrap();
        assert_eq!(status, 200);
        assert!(body.ends_with("tag=blue"), "{body}");
    }
}

#[test]
fn fresh_connections_are_never_refused_while_serving() {
    let tb = Testbed::start(&["--workers", "2"]);
    assert_eq!(tb.serving_pids(300).len(), 2);
}

#[test]
fn introspection_in_both_roles() {
    let tb = Testbed::start(&["--workers", "3", "--startup-delay-ms", "10"]);
    let log = tb.stderr();
    let master_line = format!("is_master=true is_worker=false worker_id=0 worker_count=3 port={}", tb.port);
    assert!(log.contains(&master_line), "{log}");
    // Every worker answers with its own id (fresh connections are spread over the three).
    let mut ids = BTreeSet::new();
    let mut asked = 0;
    while ids.len() < 3 && asked < 300 {
        let (status, body) = tb.get("/info").unwrap();
        assert_eq!(status, 200);
        let id: usize = body.split("worker_id=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert_eq!(body, format!("is_master=false is_worker=true worker_id={id} worker_count=3 port={}", tb.port));
        ids.insert(id);
        asked += 1;
    }
    assert_eq!(ids, BTreeSet::from([0, 1, 2]), "after {asked} requests");
}

#[test]
fn a_master_handle_stops_the_cluster_from_another_thread() {
    let mut tb = Testbed::start(&["--workers", "2", "--stop-after-ms", "500"]);
    let workers = tb.workers();
    let st = tb.wait_exit(Duration::from_secs(10)).expect("master exits");
    assert!(st.success(), "{st:?}");
    assert!(tb.stderr().contains("shutting down: stopping 2 workers"));
    for w in workers {
        assert!(!alive(w));
    }
}

/// Every child of `pid`, zombies included, with its state letter.
fn children_with_state(pid: u32) -> Vec<(u32, char)> {
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    list.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(|c| {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some((c, state))
        })
        .collect()
}

#[test]
fn as_pid_1_the_master_reaps_orphans() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: a new PID namespace needs root");
        return;
    }
    // The master runs as PID 1 of a new PID namespace, as in a container without an init.
    let mut opts = args(&["--pid", "--fork", "--mount-proc", TESTBED, "--port", "0", "--workers", "1"]);
    opts.program = Some("unshare".into());
    let mut tb = Testbed::start_with(opts);
    let master = tb.workers()[0]; // the child of `unshare`
    let workers = children_of(master);
    assert_eq!(workers.len(), 1);
    for _ in 0..3 {
        let (status, body) = tb.get("/orphan").unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // The orphaned `sleep`s were re-parented to the master when their shell exited (before each
    // answer); they exit after 0.2 s, and must be reaped (not left as zombies).
    let orphans: Vec<(u32, char)> =
        children_with_state(master).into_iter().filter(|(p, _)| !workers.contains(p)).collect();
    assert!(!orphans.is_empty(), "the orphans are the master's children now");
    assert!(
        wait_until(Duration::from_secs(3), || children_with_state(master).iter().all(|(p, _)| workers.contains(p))),
        "left over: {:?} (were {orphans:?})",
        children_with_state(master)
    );
    assert_eq!(tb.get("/").unwrap().0, 200);
}

#[test]
fn programs_a_worker_runs_inherit_no_cluster_variables() {
    let mut opts = args(&["--workers", "2"]);
    // A user setting, not part of the hand-off: keep it out of the picture.
    opts.configure = Some(Box::new(|cmd| {
        cmd.env_remove("ECEWO_CLUSTER_CPUS");
    }));
    let tb = Testbed::start_with(opts);
    let mut workers = BTreeSet::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (status, body) = tb.get("/child-env").unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, "", "a child of a worker sees the cluster's variables");
            let (_, hello) = tb.get("/").unwrap();
            workers.extend(worker_of(&hello));
            workers.len() == 2
        }),
        "both workers answered"
    );
}

/// The hand-off variables of a worker, as a worker's child inherits them (forged: this test is
/// not a master).
fn forged_worker_env(cmd: &mut std::process::Command, master_pid: u32) {
    cmd.env("ECEWO_CLUSTER_WORKER_ID", "0")
        .env("ECEWO_CLUSTER_WORKERS", "1")
        .env("ECEWO_CLUSTER_PORT", "1")
        .env("ECEWO_CLUSTER_CHANNEL_FD", "4")
        .env("ECEWO_CLUSTER_MASTER_PID", master_pid.to_string())
        .env("ECEWO_CLUSTER_SHUTDOWN_TIMEOUT_MS", "1000")
        .env("RUST_LOG", "debug");
}

#[test]
fn stale_cluster_variables_without_the_masters_channel_make_a_master() {
    // (1) No descriptor at fd 4 (a worker's child: the worker's channel is close-on-exec), the
    // "master" being our own pid, which is this process's parent. (2) fd 4 a unix socket whose
    // peer is this test, but another master pid.
    for case in ["no channel", "another peer"] {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut opts = args(&["--workers", "1"]);
        opts.configure = Some(Box::new(move |cmd| {
            if case == "no channel" {
                forged_worker_env(cmd, std::process::id());
            } else {
                forged_worker_env(cmd, 1);
                cmd.fd_mappings(vec![FdMapping { parent_fd: theirs.into(), child_fd: 4 }]).unwrap();
            }
        }));
        let mut tb = Testbed::start_with(opts);
        assert_eq!(tb.ready_line, format!("ready: 1 workers on port {}", tb.port), "{case}");
        assert_ne!(tb.port, 1, "{case}: the forged port is not used");
        let (status, body) = tb.get("/").unwrap();
        assert_eq!((status, worker_of(&body)), (200, Some(0)), "{case}: {body}");
        // Its own worker is a real one, and its children see no variables either.
        assert_eq!(tb.get("/child-env").unwrap(), (200, String::new()), "{case}");
        let log = tb.stderr();
        assert!(log.contains("ignoring the ECEWO_CLUSTER_* variables"), "{case}: {log}");
        tb.signal(Signal::TERM);
        let st = tb.wait_exit(Duration::from_secs(10)).expect("master exits");
        assert!(st.success(), "{case}: {st:?}\n{}", tb.stderr());
        drop(ours);
    }
}

#[test]
fn a_worker_whose_master_died_before_init_exits_with_master_gone() {
    // The channel's peer is this test (the "master"), but the process's parent is a shell in
    // between: as if the master died and the worker was re-parented before its init.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut opts = args(&["--workers", "1"]);
    opts.program = Some("sh".into());
    opts.args = ["-c", "\"$0\" \"$@\"; exit $?", TESTBED, "--port", "0", "--workers", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    opts.configure = Some(Box::new(move |cmd| {
        forged_worker_env(cmd, std::process::id());
        cmd.fd_mappings(vec![FdMapping { parent_fd: theirs.into(), child_fd: 4 }]).unwrap();
    }));
    let (mut tb, _rx) = Testbed::spawn(opts);
    let st = tb.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!st.success());
    let log = tb.stderr();
    assert!(log.contains("the master process is gone"), "{log}");
    assert!(!log.contains("ready"), "{log}");
    drop(ours);
}

#[test]
fn a_program_that_cannot_listen_says_so_in_one_sentence() {
    // `fn main() -> Result<(), ecewo_cluster::Error>` (the hello example) with its port taken.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(example_binary("hello"));
    cmd.args(["--port", &port.to_string(), "--workers", "1"]).env("NO_COLOR", "1").env("XDG_RUNTIME_DIR", dir.path());
    let out = run_bounded(cmd, Duration::from_secs(20)).expect("hello gives up at once");
    assert!(!out.status.success(), "{:?}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.starts_with("Error: cannot listen on "), "the last line: {last:?}\n{err}");
    assert!(last.contains(&format!(":{port}: ")), "names the port: {last:?}");
    assert_eq!(err.lines().filter(|l| l.starts_with("Error:")).count(), 1, "{err}");
    for debug in ["Bind {", "Os {", "kind:", "source:"] {
        assert!(!err.contains(debug), "no debug structure ({debug}): {err}");
    }
    drop(held);
}

/// Workers receive their listener by the systemd convention (fd 3, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, `LISTEN_PID` = the worker's own pid), so that `sd_listen_fds` and the crates
/// that follow it accept it inside a worker; the channel is at the fd after it.
#[test]
fn workers_receive_their_listener_by_the_systemd_convention() {
    for balance in ["reuseport", "shared"] {
        let mut tb = Testbed::start(&["--workers", "2", "--balance", balance]);
        let mut seen = BTreeSet::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let (status, body) = tb.get("/listen-env").unwrap();
                assert_eq!(status, 200, "{body}");
                let pid = body.strip_prefix("pid=").and_then(|b| b.split(' ').next()).unwrap().to_owned();
                assert_eq!(
                    body,
                    format!("pid={pid} LISTEN_PID={pid} LISTEN_FDS=1 LISTEN_FDNAMES=default names=default"),
                    "{balance}"
                );
                seen.insert(pid);
                seen.len() == 2
            }),
            "{balance}: both workers answered"
        );
        for w in tb.workers() {
            let fds = fds_of(w);
            let target = |n: i32| fds.iter().find(|(fd, _)| *fd == n).map(|(_, t)| t.clone());
            assert!(listening_inodes(tb.port).contains(&target(3).unwrap()), "{balance}: fd 3 of {w} is the listener");
            assert!(target(4).is_some_and(|t| t.starts_with("socket:")), "{balance}: fd 4 of {w} is the channel");
        }
    }
}
