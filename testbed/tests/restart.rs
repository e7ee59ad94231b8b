//! Integration tests of zero-downtime rolling restarts and deploys (issue 4), under load from
//! clients that never retry.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use serde_json::Value;

/// Sends SIGUSR2 and waits for the rollout to end, sampling the active-worker count meanwhile:
/// every sample must be `expect_workers` (each old worker serves until its replacement is ready,
/// and a failed replacement leaves the old one serving). Returns the last restart outcome and
/// the smallest active count seen.
fn restart_and_watch(tb: &Testbed, expect_workers: u64) -> (Value, u64) {
    let before = tb.stats()["cluster"]["last_restart"].clone();
    tb.signal(Signal::USR2);
    let mut min_active = u64::MAX;
    let mut samples = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = tb.stats();
        let active = s["cluster"]["active_workers"].as_u64().unwrap();
        assert_eq!(active, expect_workers, "active workers during the rollout (sample {samples}): {s}");
        min_active = min_active.min(active);
        samples += 1;
        let last = &s["cluster"]["last_restart"];
        if !s["cluster"]["restart_requested"].as_bool().unwrap() && *last != before && !last.is_null() {
            return (last.clone(), min_active);
        }
        assert!(Instant::now() < deadline, "rollout did not end: {s}\n{}", tb.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn rolling_restart_under_load_loses_nothing() {
    for balance in ["reuseport", "shared"] {
        let mut tb = Testbed::start(&[
            "--workers",
            "4",
            "--balance",
            balance,
            "--ready-delay-ms",
            "150",
            "--startup-delay-ms",
            "10",
        ]);
        let old: BTreeSet<u32> = tb.workers().into_iter().collect();
        let load = Load::start(tb.port, 2, 2, false);
        assert!(wait_until(Duration::from_secs(10), || load.count() >= 200), "the load runs before the restart");
        let (outcome, min_active) = restart_and_watch(&tb, 4);
        assert_eq!(outcome["result"], "completed", "{outcome}");
        assert_eq!(outcome["replaced"], 4);
        assert_eq!(min_active, 4, "{balance}: capacity never dropped below 4 active workers");
        // Keep the load going until enough requests crossed the rollout.
        assert!(wait_until(Duration::from_secs(30), || load.count() >= 3000), "load too slow");
        let result = load.stop();
        assert_eq!(result.failed, 0, "{balance}: failed requests: {:?}", &result.errors[..result.errors.len().min(10)]);
        assert!(result.ok >= 3000);
        // Every worker pid was replaced (the last old worker may still be finishing its drain).
        assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == 4));
        let new: BTreeSet<u32> = tb.workers().into_iter().collect();
        assert!(old.is_disjoint(&new), "{balance}: old {old:?} new {new:?}");
        eprintln!("{balance}: {} requests, 0 failed", result.ok);
    }
}

/// `--max-surge 4`: twelve workers, each 200 ms from its start to ready, are replaced up to four
/// at a time under keep-alive load. Nothing fails; at no sample do more than 12 + 4 workers run
/// that were not asked to drain (an old worker asked to drain is on its way out: the next
/// replacement starts as soon as it was asked, whatever its drain takes); every pid is replaced;
/// and the rollout takes well under the 12 × 200 ms of one slot at a time, and at least the three
/// waves of 200 ms that four at a time need (a check that the replacements overlap, within
/// their bound: timing goals are the benchmark's, bench/rollout).
#[test]
fn a_surge_of_four_replaces_twelve_workers_four_at_a_time_under_load() {
    const WORKERS: usize = 12;
    const SURGE: usize = 4;
    const READY: Duration = Duration::from_millis(200);
    let mut tb =
        Testbed::start(&["--workers", "12", "--max-surge", "4", "--ready-delay-ms", "200", "--startup-delay-ms", "0"]);
    let old: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert_eq!(old.len(), WORKERS);
    // Four keep-alive clients (each reconnects only when its worker says `Connection: close`,
    // as a draining one does) and one on fresh connections.
    let load = Load::start(tb.port, 1, 4, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 200), "the load runs before the restart");
    let before = load.count();
    let t0 = Instant::now();
    tb.signal(Signal::USR2);
    let (mut most, mut samples) = (0, 0);
    let deadline = t0 + Duration::from_secs(30);
    let took = loop {
        // The children first, then the master's view (`/stats`, answered by the master's loop):
        // an old worker that is no slot's worker any more was asked to drain, and the
        // replacement that starts once it was is spawned in the same batch, so no sample counts
        // both that replacement and that old worker as not draining. (Not the log: it is written
        // by another thread, possibly after the spawn.)
        let kids = tb.workers();
        let s = tb.stats();
        let serving: BTreeSet<u32> =
            s["workers"].as_array().unwrap().iter().filter_map(|w| w["pid"].as_u64()).map(|p| p as u32).collect();
        let undrained = kids.iter().filter(|p| !old.contains(p) || serving.contains(p)).count();
        assert!(
            undrained <= WORKERS + SURGE,
            "sample {samples}: {undrained} workers not asked to drain ({} children; slots' workers {serving:?}): {s}\n{}",
            kids.len(),
            tb.stderr()
        );
        most = most.max(undrained);
        samples += 1;
        if !s["cluster"]["restart_requested"].as_bool().unwrap() && !s["cluster"]["last_restart"].is_null() {
            break t0.elapsed();
        }
        assert!(Instant::now() < deadline, "the rollout did not complete within 30 s: {s}\n{}", tb.stderr());
        std::thread::sleep(Duration::from_millis(5));
    };
    let log = tb.stderr();
    assert!(log.contains("graceful restart: replacing 12 workers, up to 4 at a time"), "{log}");
    assert!(most > WORKERS, "replacements ran next to the old workers: at most {most} seen in {samples} samples");
    let one_at_a_time = READY * WORKERS as u32;
    assert!(took < one_at_a_time * 3 / 4, "{took:?}: no faster than one slot at a time ({one_at_a_time:?})");
    assert!(took >= READY * (WORKERS / SURGE) as u32, "{took:?}: faster than three waves of 200 ms");
    let during = load.count() - before;
    // And on after the rollout, through the new workers.
    let after = load.count();
    assert!(wait_until(Duration::from_secs(30), || load.count() >= after + 500), "load too slow");
    let result = load.stop();
    assert_eq!(result.failed, 0, "failed requests: {:?}", &result.errors[..result.errors.len().min(10)]);
    assert!(during >= 50, "only {during} requests during the rollout");
    let s = tb.stats();
    assert_eq!(s["cluster"]["last_restart"]["result"], "completed", "{s}");
    assert_eq!(s["cluster"]["last_restart"]["replaced"], 12);
    assert_eq!(s["cluster"]["active_workers"], 12);
    // Every worker pid was replaced (the last old workers may still be finishing their drain).
    assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == WORKERS), "{:?}", tb.workers());
    let new: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(old.is_disjoint(&new), "old {old:?} new {new:?}");
    eprintln!(
        "rollout {took:?}, at most {most} workers not draining ({samples} samples), {} requests ({during} during it)",
        result.ok
    );
}

#[test]
fn each_old_worker_stays_until_its_replacement_is_ready() {
    let mut tb = Testbed::start(&["--workers", "4", "--ready-delay-ms", "300", "--startup-delay-ms", "10"]);
    let (outcome, min_active) = restart_and_watch(&tb, 4);
    assert_eq!(outcome["result"], "completed");
    assert_eq!(min_active, 4);
    tb.remember_workers();
    // In the master's log, for each slot: the replacement starts, 300 ms later it is ready and
    // only then is the old worker asked to drain, and it exits after that.
    assert!(tb.wait_log(Duration::from_secs(5), |l| (0..4).all(|s| l.contains(&format!("on_exit id={s} ")))));
    let log = tb.stderr();
    for slot in 0..4 {
        let started: Vec<usize> = log.match_indices(&format!("on_start id={slot} ")).map(|(i, _)| i).collect();
        assert_eq!(started.len(), 2, "{log}");
        let replaced = log.find(&format!("worker {slot} replaced: pid ")).expect("replaced line");
        let exit = log.find(&format!("on_exit id={slot} ")).expect("old worker's exit");
        assert!(started[1] < replaced && replaced < exit, "slot {slot}: order start < replaced < exit\n{log}");
    }
}

#[test]
fn a_deploy_changes_what_every_worker_serves() {
    let dir = tempfile::tempdir().unwrap();
    let tag = dir.path().join("tag");
    write_file(&tag, "v1");
    let tb = Testbed::start(&["--workers", "4", "--tag-file", tag.to_str().unwrap(), "--ready-delay-ms", "50"]);
    let load = Load::start(tb.port, 1, 1, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 100), "the load runs before the deploy");
    write_file(&tag, "v2");
    let (outcome, _) = restart_and_watch(&tb, 4);
    assert_eq!(outcome["result"], "completed");
    let result = load.stop();
    assert_eq!(result.failed, 0, "{:?}", &result.errors[..result.errors.len().min(10)]);
    for _ in 0..100 {
        let (status, body) = tb.get("/").unwrap();
        assert_eq!(status, 200);
        assert!(body.ends_with("tag=v2"), "{body}");
    }
}

#[test]
fn a_broken_deploy_stops_at_the_first_slot_and_the_old_workers_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("broken");
    let mut tb = Testbed::start(&["--workers", "4", "--respawn", "--fail-if-file", flag.to_str().unwrap()]);
    let old: BTreeSet<u32> = tb.workers().into_iter().collect();
    write_file(&flag, "");
    let (outcome, min_active) = restart_and_watch(&tb, 4);
    assert_eq!(outcome["result"], "failed", "{outcome}");
    assert_eq!(outcome["worker_id"], 0);
    assert_eq!(outcome["replaced"], 0);
    assert!(outcome["reason"].as_str().unwrap().contains("exited before it was ready (exit code 1)"), "{outcome}");
    assert_eq!(min_active, 4);
    // All four old workers still answer.
    assert_eq!(tb.serving_pids(200), old);
    let s = tb.stats();
    assert_eq!(s["cluster"]["active_workers"], 4);
    assert_eq!(s["workers"][0]["crash_count"], 0, "a broken deploy is not a crash loop");
    assert!(tb.stderr().contains("graceful restart failed at worker 0"));
    // Fixed: the next restart succeeds.
    std::fs::remove_file(&flag).unwrap();
    let (outcome, _) = restart_and_watch(&tb, 4);
    assert_eq!(outcome["result"], "completed", "{outcome}");
    assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == 4));
    let new: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(old.is_disjoint(&new));
}

#[test]
fn a_broken_deploy_with_a_surge_stops_at_the_first_failure_and_the_old_workers_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("broken");
    let mut tb = Testbed::start(&[
        "--workers",
        "8",
        "--max-surge",
        "4",
        "--respawn",
        "--startup-delay-ms",
        "0",
        "--fail-if-file",
        flag.to_str().unwrap(),
    ]);
    let old: BTreeSet<u32> = tb.workers().into_iter().collect();
    write_file(&flag, "");
    let (outcome, min_active) = restart_and_watch(&tb, 8);
    assert_eq!(outcome["result"], "failed", "{outcome}");
    assert!(outcome["worker_id"].as_u64().unwrap() < 4, "one of the first four: {outcome}");
    assert_eq!(outcome["replaced"], 0);
    assert_eq!(min_active, 8);
    // The four replacements are gone (failed, or stopped with the rollout), no fifth one started,
    // and the eight old workers still serve.
    assert!(wait_until(Duration::from_secs(10), || tb.workers().len() == 8), "{:?}", tb.workers());
    assert_eq!(tb.workers().into_iter().collect::<BTreeSet<u32>>(), old);
    // (The log is written in order by another thread: once the outcome is there, every start
    // before it is.)
    assert!(tb.wait_log(Duration::from_secs(5), |l| l.contains("graceful restart failed at worker")));
    assert_eq!(tb.stderr().matches("on_start id=").count(), 8 + 4, "{}", tb.stderr());
    assert_eq!(tb.serving_pids(200), old);
    let s = tb.stats();
    assert!(s["workers"].as_array().unwrap().iter().all(|w| w["crash_count"] == 0), "{s}");
    // Fixed: the next restart replaces every worker, four at a time.
    std::fs::remove_file(&flag).unwrap();
    let (outcome, _) = restart_and_watch(&tb, 8);
    assert_eq!(outcome["result"], "completed", "{outcome}");
    assert_eq!(outcome["replaced"], 8);
    assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == 8));
    let new: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(old.is_disjoint(&new));
}

#[test]
fn a_slow_request_in_flight_completes_across_a_restart() {
    let mut tb = Testbed::start(&["--workers", "2"]);
    let (worker, slow) = tb.get_in_flight("/slow?ms=2000");
    let (outcome, _) = restart_and_watch(&tb, 2);
    assert_eq!(outcome["result"], "completed");
    assert!(!slow.is_finished(), "the rollout (two ready workers) is quicker than the request");
    let (status, body) = slow.join().unwrap().expect("the slow request completes");
    assert_eq!((status, body.as_str()), (200, "slow 2000"));
    assert!(wait_until(Duration::from_secs(5), || !alive(worker)), "its worker, replaced, exits once it is done");
}

#[test]
fn repeated_restart_signals_coalesce() {
    let mut tb = Testbed::start(&["--workers", "4", "--ready-delay-ms", "100", "--startup-delay-ms", "10"]);
    let initial: BTreeSet<u32> = tb.workers().into_iter().collect();
    tb.signal(Signal::USR2);
    // While the first rollout runs (four replacements, each at least 100 ms), more requests
    // coalesce into exactly one more rollout.
    assert!(tb.wait_log(Duration::from_secs(10), |l| l.contains("graceful restart: replacing 4 workers")));
    for _ in 0..4 {
        tb.signal(Signal::USR2);
    }
    assert!(tb.wait_log(Duration::from_secs(10), |l| l.contains("one more will follow it")), "{}", tb.stderr());
    let completed = |l: &str| l.matches("graceful restart completed: 4 workers replaced").count();
    assert!(tb.wait_log(Duration::from_secs(30), |l| completed(l) == 2), "two rollouts complete\n{}", tb.stderr());
    // A request through the master's loop: whatever that loop decided with the second
    // completion (a third rollout, if the requests had not coalesced) is visible now.
    let s = tb.stats();
    assert!(!s["cluster"]["restart_requested"].as_bool().unwrap(), "no third rollout: {s}");
    assert_eq!(s["cluster"]["active_workers"], 4);
    assert_eq!(s["cluster"]["last_restart"]["result"], "completed");
    let log = tb.stderr();
    assert_eq!(log.matches("graceful restart: replacing 4 workers").count(), 2, "{log}");
    assert_eq!(completed(&log), 2, "{log}");
    // The second rollout really replaced every worker again: each slot started three times.
    for slot in 0..4 {
        assert_eq!(log.matches(&format!("on_start id={slot} ")).count(), 3, "slot {slot}\n{log}");
    }
    assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == 4));
    let last: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(initial.is_disjoint(&last), "{initial:?} {last:?}");
}

#[test]
fn a_restart_deploys_the_file_at_the_original_path() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("testbed");
    std::fs::copy(TESTBED, &exe).unwrap();
    let mut opts = args(&["--workers", "2", "--respawn"]);
    opts.program = Some(exe.clone());
    let mut tb = Testbed::start_with(opts);
    // Deploy: a new file (new inode) at the same path.
    let staged = dir.path().join("staged");
    std::fs::copy(TESTBED, &staged).unwrap();
    std::fs::rename(&staged, &exe).unwrap();
    let (outcome, _) = restart_and_watch(&tb, 2);
    assert_eq!(outcome["result"], "completed");
    assert!(wait_until(Duration::from_secs(5), || tb.workers().len() == 2));
    for w in tb.workers() {
        let link = std::fs::read_link(format!("/proc/{w}/exe")).unwrap();
        assert_eq!(link, exe, "worker {w} runs the deployed file");
    }
    // A crash respawn after the deploy keeps running the deployed program.
    let victim = tb.workers()[0];
    send_signal(victim, Signal::KILL);
    // Wait until the respawned worker serves (not merely forked: before its exec a child still
    // shows the master's executable).
    assert!(wait_until(Duration::from_secs(5), || {
        let w = tb.workers();
        w.len() == 2 && !w.contains(&victim) && tb.stats()["cluster"]["active_workers"] == 2
    }));
    for w in tb.workers() {
        let link = std::fs::read_link(format!("/proc/{w}/exe")).unwrap();
        assert_eq!(link, exe, "worker {w}\n{}", tb.stderr());
    }
}

#[test]
fn a_draining_worker_closes_keep_alive_connections_politely() {
    let tb = Testbed::start(&["--workers", "1", "--respawn"]);
    let mut active = KeepAlive::new(tb.port);
    let mut idle = KeepAlive::new(tb.port);
    let (_, body) = active.get("/").unwrap();
    let old = pid_of(&body).unwrap();
    idle.get("/").unwrap();
    assert!(!active.last_close && !idle.last_close);
    tb.signal(Signal::USR2);
    // The old worker logs this once its drain has started (the new one never drains here).
    assert!(tb.wait_log(Duration::from_secs(10), |l| l.contains("SIGTERM: draining")), "{}", tb.stderr());
    // Within the idle grace, a request on the old worker's connection is answered, with
    // `Connection: close`: the client reconnects instead of hitting a closed socket.
    let (status, body) = active.get("/").expect("answered during the drain");
    assert_eq!((status, pid_of(&body)), (200, Some(old)));
    assert!(active.last_close, "the draining worker says Connection: close");
    let (status, body) = active.get("/").unwrap();
    assert_eq!(status, 200);
    assert_ne!(pid_of(&body), Some(old), "the next connection reaches the new worker");
    // A connection that stays idle is closed by the server after the grace period (1 s).
    assert!(idle.closed_by_server_within(Duration::from_secs(3)));
    assert!(wait_until(Duration::from_secs(3), || !alive(old)), "the old worker exits once drained");
}

#[test]
fn a_caller_can_wait_for_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("broken");
    // --fail-if-file is checked when a worker starts: the flag appears once the cluster is ready,
    // so only the restart's replacements fail.
    let (mut tb, rx) = Testbed::spawn(args(&[
        "--workers",
        "2",
        "--fail-if-file",
        flag.to_str().unwrap(),
        "--restart-after-ms",
        "700",
    ]));
    tb.set_ready(rx.recv_timeout(Duration::from_secs(20)).unwrap());
    write_file(&flag, "");
    let line = rx.recv_timeout(Duration::from_secs(20)).expect("the waiting caller gets the outcome");
    let outcome: Value = serde_json::from_str(line.strip_prefix("restart: ").unwrap()).unwrap();
    assert_eq!(outcome["result"], "failed", "{outcome}");
    assert_eq!(outcome["worker_id"], 0);
}

/// One HTTP/2 GET on an open connection: status and body.
async fn h2_get(
    mut sender: hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
    port: u16,
    path: &str,
) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    sender.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let req = hyper::Request::get(format!("http://127.0.0.1:{port}{path}"))
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("refused: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn a_drain_sends_http2_connections_a_goaway_at_once() {
    // An idle grace far longer than the test: only a GOAWAY can close the connection in time.
    let mut tb = Testbed::start(&["--workers", "2", "--respawn", "--idle-grace-ms", "20000"]);
    tb.remember_workers();
    let port = tb.port;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let worker = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("an HTTP/2 connection with prior knowledge");
        // Completes when the server closes the connection.
        let mut conn = tokio::spawn(conn);
        let (status, body) = h2_get(sender.clone(), port, "/").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let worker = pid_of(&body).unwrap();
        let slow = tokio::spawn(h2_get(sender.clone(), port, "/slow?ms=1500"));
        // Time for the request to reach the handler (nothing outside the worker shows when it
        // has; a GOAWAY keeps the streams the server has seen in any case).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!slow.is_finished());
        let t0 = Instant::now();
        send_signal(worker, Signal::TERM);
        // The GOAWAY comes at once: within a second (the idle grace is 20 s), a new request on
        // the connection is refused instead of being served by the draining worker.
        let mut served_after = 0;
        let refused = loop {
            match h2_get(sender.clone(), port, "/").await {
                Ok((200, body)) if pid_of(&body) == Some(worker) => served_after += 1,
                Ok(other) => panic!("unexpected answer {other:?}"),
                Err(e) => break e,
            }
            assert!(t0.elapsed() < Duration::from_secs(1), "no GOAWAY within 1 s: {served_after} requests served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!("refused {:?} after the SIGTERM ({served_after} served before): {refused}", t0.elapsed());
        // The request in flight completes.
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(5), slow).await.expect("slow ends").unwrap().unwrap();
        assert_eq!((status, body.as_str()), (200, "slow 1500"));
        // And then the server closes the connection, long before the idle grace.
        let closed = tokio::time::timeout(Duration::from_secs(3), &mut conn).await;
        assert!(closed.is_ok(), "the connection is still open {:?} after the SIGTERM", t0.elapsed());
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        worker
    });
    assert!(wait_until(Duration::from_secs(5), || !alive(worker)), "the drained worker exits");
}
