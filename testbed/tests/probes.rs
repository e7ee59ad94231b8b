//! Integration tests of the Kubernetes and systemd lifecycle (issue 12): the shutdown delay
//! under load, the probes through start-up, crash loops and shutdown, from the control socket
//! (`ecewo-cluster probe`) and the admin listener.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

/// `ecewo-cluster probe <which>` against the cluster: its exit code and output line.
fn probe(tb: &Testbed, which: &str) -> (i32, String) {
    let mut c = std::process::Command::new(cli_binary());
    c.args(["probe", which]).env("XDG_RUNTIME_DIR", &tb.dir);
    let out = run_bounded(c, Duration::from_secs(10)).expect("probe answers within 10 s");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text.trim().to_owned())
}

#[test]
fn the_probe_command_follows_the_start_up() {
    let (mut tb, lines) =
        Testbed::spawn(args(&["--workers", "2", "--ready-delay-ms", "1500", "--startup-delay-ms", "0"]));
    // The control socket exists once the master runs; the workers are not ready yet.
    assert!(wait_until(Duration::from_secs(10), || probe(&tb, "live").0 == 0), "live while starting");
    let (code, text) = probe(&tb, "startup");
    assert_eq!(code, 1, "{text}");
    assert!(text.starts_with("startup: fail"), "{text}");
    let (code, text) = probe(&tb, "ready");
    assert_eq!(code, 1, "not ready before any worker is: {text}");
    let ready = lines.recv_timeout(Duration::from_secs(20)).expect("ready line");
    tb.set_ready(ready);
    for which in ["live", "ready", "startup"] {
        let (code, text) = probe(&tb, which);
        assert_eq!(code, 0, "{which}: {text}");
        assert!(text.contains(": pass"), "{text}");
    }
    assert!(probe(&tb, "ready").1.contains("2 of 2 workers ready (at least 1 needed)"));
    let (code, text) = probe(&tb, "nonsense");
    assert_ne!(code, 0, "{text}");
}

#[test]
fn min_ready_holds_readiness_back() {
    let tb = Testbed::start(&["--workers", "2", "--min-ready", "3"]);
    let (code, text) = probe(&tb, "ready");
    assert_eq!(code, 1, "2 ready, 3 needed: {text}");
    assert!(text.contains("at least 3 needed"), "{text}");
    assert_eq!(probe(&tb, "live").0, 0);
}

#[test]
fn a_cluster_that_can_no_longer_run_a_worker_is_not_live() {
    // Every worker crashes at start; the cool-off keeps the master up with every slot disabled.
    let (mut tb, _lines) = Testbed::spawn(args(&[
        "--workers",
        "1",
        "--respawn",
        "--crash-on-start",
        "--respawn-max-crashes",
        "2",
        "--respawn-delay-ms",
        "10",
        "--respawn-cooloff-ms",
        "60000",
    ]));
    assert!(tb.wait_log(Duration::from_secs(10), |l| l.contains("crashing too fast")), "{}", tb.stderr());
    let (code, text) = probe(&tb, "live");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("no worker can run"), "{text}");
    tb.remember_workers();
}

#[test]
fn no_cluster_means_the_probe_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = std::process::Command::new(cli_binary());
    c.args(["probe", "live"]).env("XDG_RUNTIME_DIR", dir.path());
    let out = run_bounded(c, Duration::from_secs(10)).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster is running"));
}

#[test]
fn a_shutdown_delay_serves_new_connections_not_ready_then_drains_without_dropping() {
    let mut tb = Testbed::start(&["--workers", "2", "--shutdown-delay-ms", "2000", "--idle-grace-ms", "100"]);
    let load = Load::start(tb.port, 2, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200), "the load runs");
    let sent = Instant::now();
    tb.signal(Signal::TERM);
    let (code, text) = probe(&tb, "ready");
    assert_eq!(code, 1, "not ready at once: {text}");
    assert!(text.contains("shutting down"), "{text}");
    assert_eq!(probe(&tb, "live").0, 0, "still live");
    // New connections during the delay are served: the load goes on without a failure.
    let before = load.count();
    assert!(wait_until(Duration::from_secs(5), || load.count() >= before + 200), "served during the delay");
    // A request in flight when the drain begins is finished (sent a second before it begins).
    let port = tb.port;
    let slow = std::thread::spawn(move || http_get(port, "/slow?ms=1500"));
    assert!(sent.elapsed() < Duration::from_millis(1700), "all of that within the delay: {:?}", sent.elapsed());
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(5)]);
    assert!(tb.stderr().contains("no longer ready, serving for 2s more"), "{}", tb.stderr());
    // Then the drain, as without a delay.
    let status = tb.wait_exit(Duration::from_secs(20)).expect("the master exits");
    assert!(status.success(), "{status:?}\n{}", tb.stderr());
    assert!(sent.elapsed() >= Duration::from_secs(2), "not before the delay: {:?}", sent.elapsed());
    let (code, body) = slow.join().unwrap().expect("the slow request is answered");
    assert_eq!((code, body.as_str()), (200, "slow 1500"));
}

#[test]
fn a_second_sigterm_skips_the_shutdown_delay() {
    let mut tb = Testbed::start(&["--workers", "2", "--shutdown-delay-ms", "60000"]);
    tb.signal(Signal::TERM);
    assert!(tb.wait_log(Duration::from_secs(5), |l| l.contains("no longer ready")), "{}", tb.stderr());
    assert!(tb.wait_exit(Duration::from_millis(300)).is_none(), "waits for the delay");
    tb.signal(Signal::TERM);
    let status = tb.wait_exit(Duration::from_secs(20)).expect("drained at once");
    assert!(status.success(), "{status:?}");
}

/// The admin listener's port, from the `admin ADDR` line.
fn admin_port(tb: &Testbed) -> u16 {
    let addr = tb.admin.as_deref().expect("an `admin ADDR` line before the ready line");
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a TCP address")
}

#[test]
fn the_admin_listener_answers_the_probes_and_metrics_and_follows_a_shutdown_delay() {
    let mut tb = Testbed::start(&["--workers", "2", "--admin", "127.0.0.1:0", "--shutdown-delay-ms", "3000"]);
    let port = admin_port(&tb);
    assert_ne!(port, tb.port, "its own port");
    for path in ["/livez", "/readyz", "/startupz"] {
        let (status, body) = http_get(port, path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, body) = http_get(port, "/readyz").unwrap();
    assert!(body.starts_with("ready: ok: 2 of 2 workers ready"), "{status} {body}");
    let (status, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("ecewo_cluster_workers{cluster="), "{metrics}");
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);
    // SIGTERM: not ready within a few milliseconds, still live, still serving.
    let sent = Instant::now();
    tb.signal(Signal::TERM);
    assert!(
        wait_until(Duration::from_secs(2), || http_get(port, "/readyz").is_ok_and(|(s, _)| s == 503)),
        "/readyz turns 503"
    );
    let noticed = sent.elapsed();
    assert!(noticed < Duration::from_secs(1), "not ready {noticed:?} after the signal");
    assert_eq!(http_get(port, "/livez").unwrap().0, 200, "live through the delay");
    assert_eq!(tb.get("/").unwrap().0, 200, "serving through the delay");
    let status = tb.wait_exit(Duration::from_secs(20)).expect("exits after the delay and the drain");
    assert!(status.success());
    eprintln!("/readyz answered 503 {noticed:?} after SIGTERM");
}

#[test]
fn the_admin_listener_follows_the_start_up_on_a_unix_socket_too() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let (mut tb, lines) = Testbed::spawn(args(&[
        "--workers",
        "2",
        "--ready-delay-ms",
        "1500",
        "--startup-delay-ms",
        "0",
        "--admin",
        &format!("unix:{}", sock.display()),
    ]));
    let first = lines.recv_timeout(Duration::from_secs(10)).expect("the admin line");
    assert_eq!(first, format!("admin {}", sock.display()), "printed before the ready line");
    let get = |path: &str| -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw).unwrap()
    };
    assert_eq!(get("/livez").0, 200);
    assert_eq!(get("/startupz").0, 503, "starting");
    assert_eq!(get("/readyz").0, 503, "no worker ready yet");
    let ready = lines.recv_timeout(Duration::from_secs(20)).expect("ready line");
    tb.set_ready(ready);
    assert_eq!(get("/startupz").0, 200);
    assert_eq!(get("/readyz").0, 200);
}

#[test]
fn floods_garbage_and_slow_clients_on_the_admin_listener_never_disturb_supervision() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    // Room for the clients below in this test process.
    let (soft, hard) = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .zip(rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum)
        .unwrap_or((1024, 1024));
    if soft < 4096 {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit { current: Some(hard.min(8192)), maximum: Some(hard) },
        );
    }
    let mut tb = Testbed::start(&["--workers", "2", "--respawn", "--respawn-delay-ms", "10", "--admin", "127.0.0.1:0"]);
    let port = admin_port(&tb);
    let load = Load::start(tb.port, 2, 1, false);
    // 1,000 connections that send nothing.
    let idle: Vec<TcpStream> = (0..1000).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    assert!(idle.len() >= 900, "{} connections opened", idle.len());
    // Slowloris: 20 clients sending a request one byte at a time.
    let mut slow: Vec<TcpStream> = (0..20).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    // Garbage.
    for junk in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        &[0xffu8; 9000][..],
    ] {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(junk);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf);
            assert!(buf.is_empty() || text.starts_with("HTTP/1.1 4"), "garbage answered {text:?}");
        }
    }
    // Supervision goes on meanwhile: a killed worker is replaced, and the cluster serves.
    let victim = tb.workers()[0];
    send_signal(victim, Signal::KILL);
    assert!(
        wait_until(Duration::from_secs(10), || {
            for s in &mut slow {
                let _ = s.write_all(b"G");
            }
            let w = tb.workers();
            w.len() == 2 && !w.contains(&victim) && tb.stats()["cluster"]["active_workers"] == 2
        }),
        "respawned during the flood\n{}",
        tb.stderr()
    );
    let result = load.stop();
    assert!(result.ok > 100);
    let refused = result.errors.iter().filter(|e| e.contains("refused")).count();
    assert_eq!(refused, 0, "{:?}", &result.errors[..result.errors.len().min(5)]);
    // An honest client of the admin listener is answered once the flood is gone (or turned
    // away while it lasts: never queued behind it for ever).
    drop(idle);
    drop(slow);
    assert!(
        wait_until(Duration::from_secs(10), || http_get(port, "/livez").is_ok_and(|(s, _)| s == 200)),
        "the admin listener answers again"
    );
    tb.remember_workers();
}
