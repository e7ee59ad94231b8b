//! systemd integration without systemd: a datagram socket at `NOTIFY_SOCKET` receives what the
//! master tells systemd.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

/// A datagram socket at `<dir>/notify.sock` standing in for systemd, and its path.
fn notify_socket(dir: &std::path::Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (sock, path)
}

/// The stdout lines before the `ready:` line (which is recorded in `tb`).
fn lines_until_ready(tb: &mut Testbed, rx: &std::sync::mpsc::Receiver<String>) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("ready after the first connection");
        if line.starts_with("ready:") {
            tb.set_ready(line);
            return lines;
        }
        lines.push(line);
    }
}

fn next_message(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn the_master_notifies_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    let mut opts = args(&["--workers", "2", "--startup-delay-ms", "10"]);
    let env_path = path.clone();
    opts.configure = Some(Box::new(move |cmd| {
        cmd.env("NOTIFY_SOCKET", &env_path);
    }));
    let mut tb = Testbed::start_with(opts);

    let ready = next_message(&sock);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains(&format!("STATUS=serving on 127.0.0.1:{} with 2 workers", tb.port)), "{ready}");
    // Only the master talks to systemd: workers do not inherit NOTIFY_SOCKET.
    for w in tb.workers() {
        let environ = std::fs::read(format!("/proc/{w}/environ")).unwrap();
        assert!(!String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"), "worker {w}");
    }

    tb.signal(Signal::USR2);
    let reloading = next_message(&sock);
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    let usec: u64 = reloading.lines().nth(1).unwrap().trim_start_matches("MONOTONIC_USEC=").parse().unwrap();
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    assert!(usec <= now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000, "a CLOCK_MONOTONIC time");
    let done = next_message(&sock);
    assert!(done.starts_with("READY=1\nSTATUS=graceful restart completed"), "{done}");

    tb.signal(Signal::TERM);
    let stopping = next_message(&sock);
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    assert!(tb.wait_exit(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn socket_activation_serves_the_socket_systemd_passed() {
    if std::process::Command::new("systemd-socket-activate").arg("--version").output().is_err() {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package `systemd`; .ci/run installs it)");
        return;
    }
    // A free port for systemd-socket-activate (Debian package `systemd`) to listen on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut opts = args(&["-l", &listen, TESTBED, "--port", "0", "--workers", "2"]);
    opts.program = Some("systemd-socket-activate".into());
    let (mut tb, rx) = Testbed::spawn(opts);
    // It starts the server on the first connection, which waits in the socket meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let first = std::thread::spawn(move || http_get(port, "/"));
    tb.set_ready(rx.recv_timeout(Duration::from_secs(20)).expect("ready after the first connection"));
    assert_eq!(tb.port, port, "the cluster serves the passed socket, not a port of its own");
    let (status, body) = first.join().unwrap().expect("the connection that started it is served");
    assert_eq!(status, 200, "{body}");
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let (status, body) = tb.get("/").unwrap();
        assert_eq!(status, 200);
        ids.insert(worker_of(&body));
    }
    assert_eq!(ids.len(), 2, "both workers share it");
    assert!(tb.stderr().contains("socket activation"), "{}", tb.stderr());
    // The passed socket is moved out of the descriptors a spawn copies, as a bound one.
    assert_listeners_lifted(tb.pid(), port);
    // The master's own LISTEN_* do not reach the workers: each gets its own (its pid).
    for w in tb.workers() {
        let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{w}/environ")).unwrap()).into_owned();
        let vars: Vec<&str> = environ.split('\0').filter(|v| v.starts_with("LISTEN_")).collect();
        let mut expected = vec![format!("LISTEN_FDNAMES=default"), "LISTEN_FDS=1".into(), format!("LISTEN_PID={w}")];
        expected.sort();
        let mut vars: Vec<String> = vars.into_iter().map(str::to_owned).collect();
        vars.sort();
        assert_eq!(vars, expected, "worker {w}");
    }
    tb.signal(Signal::TERM);
    assert!(tb.wait_exit(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn the_watchdog_is_fed_while_workers_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    let mut opts = args(&["--workers", "1"]);
    let env_path = path.clone();
    opts.configure = Some(Box::new(move |cmd| {
        // systemd would kill us after 200 ms without WATCHDOG=1: we send it every 100 ms.
        cmd.env("NOTIFY_SOCKET", &env_path).env("WATCHDOG_USEC", "200000");
    }));
    let mut tb = Testbed::start_with(opts);
    let t0 = std::time::Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(650) {
        if next_message(&sock) == "WATCHDOG=1" {
            pings += 1;
        }
    }
    assert!((4..=9).contains(&pings), "{pings} watchdog pings in 650 ms");
    for w in tb.workers() {
        let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{w}/environ")).unwrap()).into_owned();
        assert!(!environ.contains("WATCHDOG_USEC"), "worker {w}");
    }
}

#[test]
fn the_watchdog_goes_silent_when_the_start_up_overruns() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    // The worker would take 100 s to get ready; the master gives it 300 ms, then kills and
    // respawns it (a boot failure), again and again: the start-up never completes.
    let mut opts = args(&[
        "--workers",
        "1",
        "--respawn",
        "--respawn-delay-ms",
        "50",
        "--respawn-max-crashes",
        "1000",
        "--ready-timeout-ms",
        "300",
        "--ready-delay-ms",
        "100000",
    ]);
    let env_path = path.clone();
    opts.configure = Some(Box::new(move |cmd| {
        // WATCHDOG=1 is due every 50 ms.
        cmd.env("NOTIFY_SOCKET", &env_path).env("WATCHDOG_USEC", "100000");
    }));
    let (mut tb, _rx) = Testbed::spawn(opts);
    // The WATCHDOG=1 messages that arrive within the socket's read timeout (20 ms) of each other.
    let pings = |sock: &UnixDatagram| {
        let mut buf = [0u8; 4096];
        let mut n = 0;
        while let Ok(len) = sock.recv(&mut buf) {
            n += usize::from(&buf[..len] == b"WATCHDOG=1");
        }
        n
    };
    // Fed while the start-up runs within its deadline.
    let t0 = std::time::Instant::now();
    let mut early = 0;
    while t0.elapsed() < Duration::from_secs(10) && !tb.stderr().contains("not ready within 300ms: killing it") {
        early += pings(&sock);
    }
    assert!(tb.stderr().contains("not ready within 300ms"), "{}", tb.stderr());
    assert!(early > 0, "fed during the start-up");
    // Past the deadline: what was sent before is drained, and nothing comes any more.
    early += pings(&sock);
    let t1 = std::time::Instant::now();
    let mut late = 0;
    while t1.elapsed() < Duration::from_millis(600) {
        late += pings(&sock);
    }
    tb.remember_workers();
    assert!(tb.child.try_wait().unwrap().is_none(), "the master still runs: {}", tb.stderr());
    assert_eq!(late, 0, "{early} pings before the start-up overran, {late} after");
    assert!(tb.stderr().contains("the start-up did not complete within the ready timeout: not telling systemd"));
    // It keeps respawning the slot meanwhile.
    assert!(tb.wait_log(Duration::from_secs(5), |l| l.matches("on_start id=0 ").count() >= 2));
}

/// Socket activation with two named sockets (`--fdname`): each listener takes the socket of its
/// name, every worker serves both; a name systemd did not pass fails init naming it.
#[test]
fn socket_activation_with_named_sockets() {
    if std::process::Command::new("systemd-socket-activate").arg("--version").output().is_err() {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package `systemd`; .ci/run installs it)");
        return;
    }
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (web, admin) = (free(), free());
    let (web_s, admin_s) = (web.to_string(), admin.to_string());
    let mut opts = args(&[
        "-l",
        &web_s,
        "-l",
        &admin_s,
        "--fdname=web:admin",
        TESTBED,
        // (`Testbed::spawn` adds `--port 0` in front of everything unless it is there.)
        "--port",
        "0",
        "--workers",
        "2",
        "--listen",
        "admin=systemd",
        "--listen",
        "web=systemd",
    ]);
    opts.program = Some("systemd-socket-activate".into());
    let (mut tb, rx) = Testbed::spawn(opts);
    // It starts the server on the first connection, which waits in the socket meanwhile.
    assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(web).is_ok()), "listening");
    let first = std::thread::spawn(move || http_get(web.port(), "/"));
    let lines = lines_until_ready(&mut tb, &rx);
    assert_eq!(lines, vec![format!("listener admin {admin}"), format!("listener web {web}")], "by name, in order");
    assert_eq!(tb.port, admin.port(), "the first listener's port");
    assert_eq!(first.join().unwrap().expect("the connection that started it is served").0, 200);
    for (name, addr) in [("web", web), ("admin", admin)] {
        let mut ids = std::collections::BTreeSet::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let (status, body) = http_get(addr.port(), "/").unwrap();
                assert_eq!(status, 200, "{name}: {body}");
                ids.insert(worker_of(&body));
                ids.len() == 2
            }),
            "{name}: both workers serve it"
        );
        let (_, env) = http_get(addr.port(), "/listen-env").unwrap();
        assert!(env.contains("LISTEN_FDS=2 LISTEN_FDNAMES=admin:web names=admin:web"), "{name}: {env}");
    }
    tb.signal(Signal::TERM);
    assert!(tb.wait_exit(Duration::from_secs(10)).unwrap().success());

    // A name systemd did not pass.
    let other = free();
    let other_s = other.to_string();
    let mut opts =
        args(&["-l", &other_s, "--fdname=web", TESTBED, "--port", "0", "--workers", "2", "--listen", "admin=systemd"]);
    opts.program = Some("systemd-socket-activate".into());
    let (mut tb, _rx) = Testbed::spawn(opts);
    // The first connection starts it.
    assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(other).is_ok()), "listening");
    let st = tb.wait_exit(Duration::from_secs(20)).expect("init fails and the master exits");
    assert!(!st.success());
    let log = tb.stderr();
    assert!(log.contains("listener \"admin\": systemd passed no socket of this name (it passed: web)"), "{log}");
    assert!(!log.contains("on_start"), "nothing spawned: {log}");
}

/// A unix socket passed by name is served like a TCP one.
#[test]
fn socket_activation_passes_a_named_unix_socket() {
    if std::process::Command::new("systemd-socket-activate").arg("--version").output().is_err() {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package `systemd`; .ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.sock");
    let path_s = path.display().to_string();
    let mut opts =
        args(&["-l", &path_s, "--fdname=web", TESTBED, "--port", "0", "--workers", "1", "--listen", "web=systemd"]);
    opts.program = Some("systemd-socket-activate".into());
    let (mut tb, rx) = Testbed::spawn(opts);
    let get = |what: &str| -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {what} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        parse_response(&raw).ok_or_else(|| std::io::Error::other("bad response"))
    };
    // The first connection starts it.
    assert!(wait_until(Duration::from_secs(10), || std::os::unix::net::UnixStream::connect(&path).is_ok()));
    let lines = lines_until_ready(&mut tb, &rx);
    assert_eq!(lines, vec![format!("listener web {path_s}")]);
    assert_eq!(tb.ready_line, "ready: 1 workers on port 0", "no TCP listener: port 0");
    let (status, body) = get("/").unwrap();
    assert_eq!((status, worker_of(&body)), (200, Some(0)), "{body}");
    tb.signal(Signal::TERM);
    assert!(tb.wait_exit(Duration::from_secs(10)).unwrap().success());
    assert!(path.exists(), "the master removes only socket files it created");
}

/// `LISTEN_FDNAMES` that does not name every passed socket is refused with one sentence (as
/// `sd_listen_fds_with_names` refuses it), and no worker is started.
#[test]
fn socket_names_that_do_not_match_the_sockets_are_refused() {
    use command_fds::{CommandFdExt, FdMapping};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let runtime_dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("sh");
    // `exec` keeps the shell's pid, so LISTEN_PID=$$ is the testbed's own.
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web:extra exec \"$0\" --workers 1", TESTBED])
        .env("XDG_RUNTIME_DIR", runtime_dir.path());
    cmd.fd_mappings(vec![FdMapping { parent_fd: listener.into(), child_fd: 3 }]).unwrap();
    let out = run_bounded(cmd, Duration::from_secs(20)).expect("it gives up at once");
    assert!(!out.status.success(), "{:?}", out.status);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LISTEN_FDNAMES") && err.contains("LISTEN_FDS=1"), "{err}");
    assert!(!err.contains("on_start"), "no worker was started: {err}");
}
