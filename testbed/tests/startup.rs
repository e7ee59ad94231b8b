//! Start-up over real processes: no connection ever waits on the socket of a worker that does
//! not exist yet (`Balance::ReusePort`: slot i's socket is bound when slot i is first spawned,
//! and until a worker is ready new connections go to the started ones).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

/// The address the master logs as it starts its loop (before the first spawn).
fn logged_addr(tb: &Testbed) -> SocketAddr {
    let found = tb.wait_log(Duration::from_secs(20), |log| log.contains(" workers on "));
    assert!(found, "the master never logged its address\n{}", tb.stderr());
    let log = tb.stderr();
    let rest = log.split(" workers on ").nth(1).unwrap();
    rest.split(' ').next().unwrap().parse().unwrap_or_else(|e| panic!("{rest:?}: {e}"))
}

/// How many workers the log says were started (`on_start id=N` lines).
fn started(tb: &Testbed) -> usize {
    tb.stderr().matches("on_start id=").count()
}

#[test]
fn a_slots_socket_exists_only_once_its_worker_starts() {
    let (mut tb, rx) = Testbed::spawn(args(&["--workers", "4", "--startup-delay-ms", "800"]));
    let port = logged_addr(&tb).port();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The fewest workers started at a sample: only a sample with 2 or fewer can tell 4 sockets
    // (all bound at init) from at most k + 1.
    let mut fewest = usize::MAX;
    let ready = loop {
        assert!(Instant::now() < deadline, "not ready within 30 s\n{}", tb.stderr());
        if let Ok(line) = rx.try_recv() {
            break line;
        }
        // The log is read first: a spawn that begins meanwhile may add one socket (it is bound
        // just before its worker is started and logged), never more.
        let k = started(&tb);
        let sockets = listening_inodes(port).len();
        assert!(
            sockets >= k.max(1) && sockets <= k + 1,
            "{sockets} listening sockets with {k} workers started: a socket waits for a worker that does \
             not exist\n{}",
            tb.stderr()
        );
        fewest = fewest.min(k);
        std::thread::sleep(Duration::from_millis(10));
    };
    tb.set_ready(ready);
    assert!(fewest <= 2, "no sample early in the start-up (the fewest workers started at a sample: {fewest})");
    assert_eq!(listening_inodes(port).len(), 4);
    assert_eq!(listeners_held(tb.pid(), port), 4, "the master holds every slot's socket");
    // A slot added by scaling up (SIGTTIN: one more) gets its socket with its worker.
    tb.signal(Signal::TTIN);
    assert!(tb.wait_log(Duration::from_secs(20), |log| log.contains("on_start id=4")), "{}", tb.stderr());
    assert_eq!(listening_inodes(port).len(), 5);
}

/// The measured defect: 4 workers, 300 ms between spawns (here 1 s, to leave a slow machine
/// room), each ready some time after it starts. Requests made before the first worker is ready
/// must all wait for worker 0, the only one that exists, not for a later slot.
#[test]
fn requests_made_before_any_worker_is_ready_are_answered_by_the_first() {
    let (mut tb, rx) =
        Testbed::spawn(args(&["--workers", "4", "--startup-delay-ms", "1000", "--ready-delay-ms", "300"]));
    let port = logged_addr(&tb).port();
    let sent: Vec<_> = (0..12).map(|_| send_get(port, "/").expect("connect and send")).collect();
    assert!(started(&tb) <= 1, "worker 1 started before the requests were made: too slow to tell\n{}", tb.stderr());
    for (i, conn) in sent.into_iter().enumerate() {
        let (status, body) = read_response(conn).unwrap_or_else(|e| panic!("request {i}: {e}\n{}", tb.stderr()));
        assert_eq!(status, 200, "{body}");
        assert_eq!(worker_of(&body), Some(0), "request {i} waited for a later slot: {body}");
    }
    let ready = rx.recv_timeout(Duration::from_secs(30)).expect("ready");
    tb.set_ready(ready);
}
