//! A cluster of 200 minimal workers (issue 16): all start and report ready, 50 of them SIGKILLed
//! at once are all respawned, and the master's descriptors, and what its epoll set watches, come
//! back to what they were. (How the master's costs grow with the number of workers is measured
//! by `bench/scale`, not here: timing goals belong in benchmarks.)

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rustix::process::Signal;
use serde_json::Value;

const WORKERS: usize = 200;
const KILLED: usize = 50;

fn socket_of(tb: &Testbed) -> PathBuf {
    tb.dir.join("ecewo-cluster").join(format!("testbed-{}.sock", tb.port))
}

/// `status` over the control socket, on a connection of its own (closed on return).
fn status(path: &Path) -> Value {
    let mut s = UnixStream::connect(path).expect("the control socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// The pids of the slots `status` shows active.
fn active_pids(path: &Path) -> BTreeSet<u32> {
    let s = status(path);
    s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["status"] == "active")
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// How many descriptors the master's epoll set watches: the `tfd:` lines of its fdinfo.
fn epoll_watches(pid: u32) -> Option<usize> {
    let (fd, _) = fds_of(pid).into_iter().find(|(_, target)| target == "anon_inode:[eventpoll]")?;
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    Some(info.lines().filter(|l| l.starts_with("tfd:")).count())
}

#[test]
fn two_hundred_workers_start_and_fifty_killed_at_once_are_all_respawned() {
    let mut opts = args(&[
        "--workers",
        &WORKERS.to_string(),
        "--startup-delay-ms",
        "0",
        "--respawn",
        "--respawn-delay-ms",
        "0",
        "--respawn-max-crashes",
        "1000000",
        "--respawn-window-sec",
        "1",
    ]);
    // 200 processes starting at once on a small, shared machine.
    opts.ready_timeout = Duration::from_secs(120);
    let mut tb = Testbed::start_with(opts);
    assert_eq!(tb.ready_line, format!("ready: {WORKERS} workers on port {}", tb.port));
    let first: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert_eq!(first.len(), WORKERS, "one process per slot");
    // The master's descriptors and epoll watches, before any control connection: the same in
    // two readings in a row.
    let pid = tb.pid();
    let baseline = move || (fds_of(pid).len(), epoll_watches(pid));
    let mut last = None;
    assert!(wait_until(Duration::from_secs(10), || {
        let now = baseline();
        last.replace(now) == Some(now)
    }));
    let before = last.expect("read");
    let watched = before.1.expect("the master sleeps in an epoll set");
    assert!(watched >= 2 * WORKERS, "each worker's pidfd and channel are watched: {watched}");
    // Every slot active, with the master's real children.
    let path = socket_of(&tb);
    assert_eq!(active_pids(&path), first);

    // 50 SIGKILLs at once, by pid.
    let victims: BTreeSet<u32> = first.iter().copied().take(KILLED).collect();
    for &pid in &victims {
        send_signal(pid, Signal::KILL);
    }
    let respawned = wait_until(Duration::from_secs(90), || {
        let now: BTreeSet<u32> = tb.workers().into_iter().collect();
        now.len() == WORKERS && now.is_disjoint(&victims)
    });
    assert!(respawned, "{} workers running, some old: {:?}", tb.workers().len(), tb.stderr().lines().last());
    let all_active = wait_until(Duration::from_secs(30), || {
        let pids = active_pids(&path);
        pids.len() == WORKERS && pids.is_disjoint(&victims)
    });
    assert!(all_active, "not every slot active again: {} active", active_pids(&path).len());
    let now: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert_eq!(now.difference(&first).count(), KILLED, "exactly the killed ones were replaced");
    let s = status(&path);
    assert_eq!(s["cluster"]["total_restarts"], KILLED as u64, "{}", s["cluster"]);
    assert_eq!(s["cluster"]["active_workers"], WORKERS as u64);

    // Every exited worker's pidfd and channel are closed and out of the epoll set.
    let mut after = baseline();
    let back = wait_until(Duration::from_secs(20), || {
        after = baseline();
        after == before
    });
    assert!(back, "descriptors and epoll watches {after:?}, before the kills {before:?}");
    assert!(alive(tb.pid()), "the master runs on");
    let (code, _) = tb.get("/").expect("still serving");
    assert_eq!(code, 200);
}
