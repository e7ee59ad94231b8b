//! systemd integration without systemd: a datagram socket at `NOTIFY_SOCKET` receives what the
//! master tells systemd.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

fn next_message(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn the_master_notifies_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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
