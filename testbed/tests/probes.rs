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
