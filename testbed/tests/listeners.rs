//! Named listeners over real processes (loopback only): every worker serves every listener,
//! each listener reaches workers by the systemd convention, bad listeners fail `init`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

/// `GET /` on a fresh connection to `addr` (any family): status and body.
fn get_at(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| std::io::Error::other("bad response"))
}

/// `GET path` on a fresh connection to the unix socket `path`: status and body.
fn get_unix(path: &Path, what: &str) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {what} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| std::io::Error::other("bad response"))
}

/// `GET` on a listener as the testbed printed it: a TCP address or a unix socket path.
fn get_listener(addr: &str, what: &str) -> std::io::Result<(u16, String)> {
    match addr.parse::<SocketAddr>() {
        Ok(a) => get_at(a, what),
        Err(_) => get_unix(Path::new(addr), what),
    }
}

fn ipv6_loopback_works() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn ipv4_ipv6_and_unix_listeners_are_each_served_by_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("web.sock");
    let unix = format!("sock=unix:{}", sock.display());
    let mut list = vec!["--workers", "2", "--listen", "v4=127.0.0.1:0", "--listen", &unix];
    let v6 = ipv6_loopback_works();
    if v6 {
        list.extend(["--listen", "v6=[::1]:0"]);
    } else {
        eprintln!("no IPv6 loopback here: IPv4 listeners only");
    }
    let tb = Testbed::start(&list);
    let names: Vec<&str> = tb.listeners.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec!["v4", "sock"];
    if v6 {
        expected.push("v6");
    }
    assert_eq!(names, expected, "one line per listener, in order");
    let first: SocketAddr = tb.listeners[0].1.parse().unwrap();
    assert_eq!(tb.ready_line, format!("ready: 2 workers on port {}", first.port()), "the first listener's port");
    assert_eq!(tb.listeners[1].1, sock.display().to_string(), "the unix listener's line is its path");
    for (name, addr) in &tb.listeners {
        if let Ok(tcp) = addr.parse::<SocketAddr>() {
            assert_ne!(tcp.port(), 0, "{name}: the real port");
        }
        let mut workers = BTreeSet::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let (status, body) = get_listener(addr, "/").unwrap();
                assert_eq!(status, 200, "{name}: {body}");
                workers.extend(worker_of(&body));
                workers.len() == 2
            }),
            "{name}: both workers answer ({workers:?})"
        );
        let (_, env) = get_listener(addr, "/listen-env").unwrap();
        let names = expected.join(":");
        assert!(
            env.contains(&format!("LISTEN_FDS={} LISTEN_FDNAMES={names} names={names}", expected.len())),
            "{name}: {env}"
        );
        // A program the worker runs inherits none of its listeners nor its channel: only
        // stdio, and the descriptor `ls` reads /proc/self/fd with.
        let (status, fds) = get_listener(addr, "/child-fds").unwrap();
        assert_eq!(status, 200, "{fds}");
        let fds: Vec<u32> = fds.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        assert!(fds.len() <= 4 && fds.iter().filter(|&&f| f > 2).count() <= 1, "{name}: the child has fds {fds:?}");
    }
}

#[test]
fn listeners_stop_at_once_in_a_graceful_shutdown() {
    let mut tb = Testbed::start(&["--workers", "1", "--listen", "a=127.0.0.1:0", "--listen", "b=127.0.0.1:0"]);
    let addrs: Vec<SocketAddr> = tb.listeners.iter().map(|(_, a)| a.parse().unwrap()).collect();
    // A request in flight (on a, the ready line's port) while SIGTERM arrives finishes; then
    // both refuse.
    assert_eq!(tb.port, addrs[0].port());
    let (_, slow) = tb.get_in_flight("/slow?ms=500");
    tb.signal(Signal::TERM);
    assert_eq!(slow.join().unwrap().unwrap(), (200, "slow 500".to_owned()));
    assert!(tb.wait_exit(Duration::from_secs(10)).expect("exits").success());
    for a in addrs {
        assert!(TcpStream::connect(a).is_err(), "{a} still accepts");
    }
}

#[test]
fn bad_listeners_fail_init_naming_the_listener_and_nothing_is_spawned() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let same = format!("127.0.0.1:{port}");
    // An address somebody else holds: the bind error names the listener.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = format!("b={}", busy.local_addr().unwrap());
    let busy_says = format!("listener \"b\": cannot listen on {}", busy.local_addr().unwrap());
    for (list, says) in [
        (vec!["--listen", "a=127.0.0.1:0", "--listen", &busy_addr], busy_says.as_str()),
        (
            vec!["--listen", "a=127.0.0.1:0", "--listen", "a=127.0.0.1:0"],
            "listener \"a\": two listeners have this name",
        ),
        (vec!["--listen", &format!("a={same}"), "--listen", &format!("b={same}")], "listener \"b\": 127.0.0.1"),
        (vec!["--listen", "a:b=127.0.0.1:0"], "listener \"a:b\""),
    ] {
        let mut opts = args(&list);
        opts.args.extend(["--workers".to_owned(), "2".to_owned()]);
        let (mut tb, rx) = Testbed::spawn(opts);
        let st = tb.wait_exit(Duration::from_secs(10)).expect("init fails and the master exits");
        assert!(!st.success(), "{list:?}");
        let log = tb.stderr();
        assert!(log.contains(says), "{list:?}: {log}");
        assert!(!log.contains("on_start"), "{list:?}: a worker was spawned: {log}");
        assert!(rx.try_recv().is_err(), "{list:?}: nothing on stdout");
    }
}

/// Runs `GET /` over the unix socket `path` from `threads` threads until stopped: (ok, failed,
/// first errors).
struct UnixLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl UnixLoad {
    fn start(path: &Path, threads: usize) -> UnixLoad {
        let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, path) = (stop.clone(), ok.clone(), path.to_owned());
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match get_unix(&path, "/") {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            other => errors.push(format!("{other:?}")),
                        }
                    }
                    errors
                })
            })
            .collect();
        UnixLoad { stop, ok, threads }
    }

    fn count(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        (self.ok.load(Ordering::SeqCst), errors)
    }
}

#[test]
fn a_rolling_restart_under_load_over_a_unix_socket_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("web.sock");
    let unix = format!("sock=unix:{}", sock.display());
    let mut tb = Testbed::start(&[
        "--workers",
        "2",
        "--ready-delay-ms",
        "150",
        "--startup-delay-ms",
        "10",
        "--listen",
        "web=127.0.0.1:0",
        "--listen",
        &unix,
    ]);
    let old: BTreeSet<u32> = tb.workers().into_iter().collect();
    let load = UnixLoad::start(&sock, 2);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 100), "the load runs before the restart");
    let before = tb.stats()["cluster"]["last_restart"].clone();
    tb.signal(Signal::USR2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        let s = tb.stats();
        let last = &s["cluster"]["last_restart"];
        if !s["cluster"]["restart_requested"].as_bool().unwrap() && *last != before && !last.is_null() {
            break last.clone();
        }
        assert!(Instant::now() < deadline, "rollout did not end: {s}\n{}", tb.stderr());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(outcome["result"], "completed", "{outcome}");
    let at_end = load.count();
    assert!(wait_until(Duration::from_secs(20), || load.count() >= at_end + 200), "load after the rollout");
    let (ok, errors) = load.stop();
    assert!(
        errors.is_empty(),
        "{} failed requests over the unix socket: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == 2));
    let new: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(old.is_disjoint(&new), "old {old:?} new {new:?}");
    eprintln!("{ok} requests over the unix socket, 0 failed");
    // At exit the master removes its socket file.
    tb.signal(Signal::TERM);
    assert!(tb.wait_exit(Duration::from_secs(10)).expect("exits").success());
    assert!(!sock.exists(), "the master removes its socket file at exit");
}

#[test]
fn unix_socket_paths_stale_live_foreign_or_missing() {
    let dir = tempfile::tempdir().unwrap();
    let run = |path: &Path| {
        let listen = format!("s=unix:{}", path.display());
        let mut opts = args(&["--workers", "1", "--listen", &listen]);
        opts.args.push("--no-control-socket".into());
        opts
    };
    // A stale socket file (nobody listens) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let tb = Testbed::start_with(run(&stale));
    assert_eq!(get_unix(&stale, "/").unwrap().0, 200);
    assert!(tb.stderr().contains("replacing the stale socket"), "{}", tb.stderr());
    // A live one (this very cluster's) is an error, and the live cluster keeps its file.
    let (mut second, _rx) = Testbed::spawn(run(&stale));
    let st = second.wait_exit(Duration::from_secs(10)).expect("the second master exits");
    assert!(!st.success());
    assert!(second.stderr().contains("listener \"s\": another server listens on"), "{}", second.stderr());
    assert!(!second.stderr().contains("on_start"), "nothing spawned");
    assert_eq!(get_unix(&stale, "/").unwrap().0, 200, "the first cluster still serves");
    drop(tb);
    // A file that is not a socket; a missing directory; a directory of another user.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let missing = dir.path().join("nope").join("s.sock");
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let foreign_owned = std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).is_ok()
        && std::fs::metadata(&foreign).map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 65534).unwrap_or(false);
    let mut cases = vec![(file.clone(), "exists and is not a socket"), (missing, "is missing")];
    if foreign_owned && rustix::process::geteuid().as_raw() != 65534 {
        cases.push((foreign.join("s.sock"), "belongs to uid 65534"));
    } else {
        eprintln!("cannot give a directory to another user here: that case is not run");
    }
    for (path, says) in cases {
        let (mut tb, _rx) = Testbed::spawn(run(&path));
        let st = tb.wait_exit(Duration::from_secs(10)).expect("init fails");
        assert!(!st.success(), "{}", path.display());
        let log = tb.stderr();
        assert!(log.contains("listener \"s\": ") && log.contains(says), "{}: {log}", path.display());
        assert!(!log.contains("on_start"), "nothing spawned: {log}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x", "the file is left alone");
}

/// The master removes its socket file at exit only if it is still the one it created.
#[test]
fn a_socket_file_replaced_meanwhile_is_left_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let listen = format!("s=unix:{}", sock.display());
    let mut tb = Testbed::start(&["--workers", "1", "--listen", &listen, "--no-control-socket"]);
    std::fs::remove_file(&sock).unwrap();
    let theirs = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    tb.signal(Signal::TERM);
    assert!(tb.wait_exit(Duration::from_secs(10)).expect("exits").success());
    assert!(sock.exists(), "another server's socket file was removed");
    drop(theirs);
}

/// A slot added by scaling up gets its own socket on every `ReusePort` listener, and serves
/// them all.
#[test]
fn a_slot_added_by_scaling_up_serves_every_listener() {
    let tb = Testbed::start(&["--workers", "1", "--listen", "a=127.0.0.1:0", "--listen", "b=127.0.0.1:0"]);
    let addrs: Vec<SocketAddr> = tb.listeners.iter().map(|(_, a)| a.parse().unwrap()).collect();
    for a in &addrs {
        assert_eq!(listeners_held(tb.pid(), a.port()), 1, "{a}: slot 0's socket only");
    }
    tb.signal(Signal::TTIN);
    for a in &addrs {
        let mut workers = BTreeSet::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                if let Ok((200, body)) = get_at(*a, "/") {
                    workers.extend(worker_of(&body));
                }
                workers.len() == 2
            }),
            "{a}: both workers answer after scaling up ({workers:?})\n{}",
            tb.stderr()
        );
        assert_eq!(listeners_held(tb.pid(), a.port()), 2, "{a}: a socket per slot");
    }
}
