//! Integration tests of liveness and recycling (issue 11): a hung worker is found by its
//! missing heartbeats and replaced while the others serve; workers are recycled by requests,
//! age and memory under load without a failed request; a crash loop backs off.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Runs `ecewo-cluster <command>` against the cluster (bounded).
fn cli(tb: &Testbed, command: &str) -> std::process::Output {
    let mut c = std::process::Command::new(cli_binary());
    c.arg(command).env("XDG_RUNTIME_DIR", &tb.dir);
    run_bounded(c, Duration::from_secs(10)).unwrap_or_else(|| panic!("{command} did not answer within 10 s"))
}

fn exits(tb: &Testbed, reason: &str) -> u64 {
    tb.stats()["cluster"]["exits"][reason].as_u64().unwrap_or(0)
}

/// Runs the load until `done` holds (bounded), then checks that no request failed. Every
/// worker seen meanwhile is remembered (killed by pid at the end if the test fails).
fn under_load(tb: &mut Testbed, what: &str, timeout: Duration, done: impl Fn(&Testbed) -> bool) -> LoadResult {
    let load = Load::start(tb.port, 2, 2, false);
    assert!(wait_until(Duration::from_secs(10), || load.count() >= 100), "{what}: the load runs");
    let reached = wait_until(timeout, || {
        tb.remember_workers();
        done(tb)
    });
    let result = load.stop();
    assert!(reached, "{what}: not reached within {timeout:?}\n{}", tb.stderr());
    assert_eq!(
        result.failed,
        0,
        "{what}: failed requests: {:?}\n{}",
        &result.errors[..result.errors.len().min(5)],
        tb.stderr()
    );
    assert!(result.ok > 100, "{what}: {} requests", result.ok);
    result
}

#[test]
fn a_hung_worker_is_routed_away_diagnosed_and_replaced_while_the_others_serve() {
    // SIGUSR1 first (the testbed counts it; it does not end the process), SIGKILL 6 s later:
    // long enough to see that new connections avoid the hung worker while it still exists, also
    // when the file's other tests load both cores (30 requests once took more than 2.4 s).
    let mut tb = Testbed::start(&[
        "--workers",
        "2",
        "--respawn",
        "--worker-timeout-ms",
        "600",
        "--heartbeat-ms",
        "100",
        "--hung-signal",
        "SIGUSR1",
        "--hung-grace-ms",
        "6000",
    ]);
    assert!(
        wait_until(Duration::from_secs(5), || {
            tb.stats()["workers"].as_array().unwrap().iter().all(|w| w["heartbeat_age"].is_number())
        }),
        "both workers beat: {}",
        tb.stats()
    );
    let (hung, reader) = tb.hang_in_flight(30000);
    let started = Instant::now();
    assert!(
        tb.wait_log(Duration::from_secs(10), |l| l.contains(&format!("(pid {hung}) is hung"))),
        "the hang is noticed\n{}",
        tb.stderr()
    );
    let noticed = started.elapsed();
    assert!(alive(hung), "still alive during its grace");
    // Taken out of the route at once: every new connection goes to the other worker.
    let pids = tb.serving_pids(30);
    assert!(!pids.contains(&hung), "a new connection reached the hung worker {hung}: {pids:?}");
    assert!(
        alive(hung),
        "those requests were answered during the grace (the hung worker still exists): {:?} after the notice",
        started.elapsed() - noticed
    );
    let log = tb.stderr();
    assert!(
        log.contains("wchan") && log.contains(" thread"),
        "its state (wchan, threads) is logged for diagnosis:\n{log}"
    );
    // Killed after the grace, counted as hung, and its slot respawned through the readiness gate.
    assert!(wait_until(Duration::from_secs(10), || !alive(hung)), "killed after the grace");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = tb.stats();
            s["cluster"]["active_workers"] == 2 && s["cluster"]["exits"]["hung"] == 1
        }),
        "replaced: {}\n{}",
        tb.stats(),
        tb.stderr()
    );
    assert!(started.elapsed() < Duration::from_secs(20), "replaced within the timeout and the grace: {noticed:?}");
    let s = tb.stats();
    let slot = s["workers"].as_array().unwrap().iter().find(|w| w["last_exit_reason"] == "hung");
    assert!(slot.is_some_and(|w| w["crash_count"] == 1), "a hang is a crash of its slot: {s}");
    assert_eq!(s["cluster"]["exits"]["crash"], 0, "{s}");
    // The request that hung it never got an answer.
    assert!(reader.join().unwrap().is_err());
    // The operator sees it: the exits by reason, and each worker's requests and last beat.
    let out = cli(&tb, "status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("exits") && l.contains("hung 1")), "{table}");
    for column in ["REQUESTS", "INFLIGHT", "BEAT"] {
        assert!(table.contains(column), "{table}");
    }
    let m = cli(&tb, "metrics");
    let text = String::from_utf8_lossy(&m.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("ecewo_cluster_worker_exits_total{") && l.ends_with("reason=\"hung\"} 1")),
        "{text}"
    );
    tb.remember_workers();
}

#[test]
fn new_connections_made_during_a_hang_are_all_answered() {
    // Default balance: connections that reached the hung worker's socket before the hang was
    // noticed wait there, and its replacement (which inherits that socket) answers them.
    let mut tb = Testbed::start(&[
        "--workers",
        "2",
        "--respawn",
        "--respawn-delay-ms",
        "0",
        "--worker-timeout-ms",
        "500",
        "--heartbeat-ms",
        "100",
        "--hung-grace-ms",
        "200",
    ]);
    assert!(wait_until(Duration::from_secs(5), || tb.stats()["workers"][1]["heartbeat_age"].is_number()));
    let (hung, _reader) = tb.hang_in_flight(30000);
    let result = under_load(&mut tb, "a hang", Duration::from_secs(15), |tb| exits(tb, "hung") == 1 && !alive(hung));
    assert!(result.ok > 0);
    assert!(wait_until(Duration::from_secs(10), || tb.stats()["cluster"]["active_workers"] == 2));
    tb.remember_workers();
}

#[test]
fn workers_are_recycled_by_requests_under_load_without_a_failed_request() {
    let mut tb = Testbed::start(&[
        "--workers",
        "2",
        "--max-requests",
        "300",
        "--max-requests-jitter",
        "100",
        "--heartbeat-ms",
        "100",
    ]);
    let first: BTreeSet<u32> = tb.workers().into_iter().collect();
    // Until both first workers are gone too: the kernel's hashing of the four load connections
    // can give one worker most of them, which then reaches its limit three times before the
    // other reaches it once.
    under_load(&mut tb, "recycling by requests", Duration::from_secs(40), |tb| {
        exits(tb, "recycled_requests") >= 3 && first.iter().all(|&w| !alive(w))
    });
    let s = tb.stats();
    assert_eq!(s["cluster"]["exits"]["crash"], 0, "a recycle is never a crash: {s}");
    assert!(s["cluster"]["total_restarts"].as_u64().unwrap() >= 3, "{s}");
    let now: BTreeSet<u32> = tb.workers().into_iter().collect();
    assert!(first.is_disjoint(&now) || now.len() > 2, "the first workers were replaced: {first:?} → {now:?}");
    let log = tb.stderr();
    assert!(log.contains("it served its request limit; its replacement starts first"), "{log}");
    // Served counts come from heartbeats: a worker past its limit is gone.
    for w in s["workers"].as_array().unwrap() {
        assert!(w["requests"].as_u64().unwrap_or(0) <= 400 + 200, "{w}");
    }
}

#[test]
fn workers_are_recycled_by_age_with_jitter_and_never_together() {
    let mut tb = Testbed::start(&[
        "--workers",
        "2",
        "--max-age-ms",
        "1500",
        "--max-age-jitter-ms",
        "500",
        "--startup-delay-ms",
        "0",
    ]);
    under_load(&mut tb, "recycling by age", Duration::from_secs(40), |tb| exits(tb, "recycled_age") >= 4);
    let log = tb.stderr();
    let recycles = log.matches("it reached its maximum age").count();
    assert!(recycles >= 4, "{log}");
    assert_eq!(exits(&tb, "crash"), 0);
    // At most one slot recycles at a time: the log never shows a second recycle before the
    // first one's replacement took over.
    let mut open = 0i32;
    for line in log.lines() {
        if line.contains("recycling worker") {
            open += 1;
            assert!(open <= 1, "two recycles at once:\n{log}");
        } else if line.contains(" replaced: pid ") {
            open = (open - 1).max(0);
        }
    }
}

#[test]
fn a_worker_over_its_memory_limit_is_recycled_and_the_others_are_not() {
    let mut tb = Testbed::start(&[
        "--workers",
        "2",
        "--max-memory-mb",
        "48",
        "--memory-check-ms",
        "100",
        "--memory-samples",
        "3",
    ]);
    let before: Value = tb.stats();
    let (status, body) = tb.get("/leak?mb=80").unwrap();
    assert_eq!(status, 200, "{body}");
    // Which worker leaked: the one whose memory is now over 80 MiB.
    let mut leaker = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            leaker = tb.stats()["workers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["rss_bytes"].as_u64().unwrap_or(0) > 80 << 20)
                .and_then(|w| w["pid"].as_u64());
            leaker.is_some()
        }) || exits(&tb, "recycled_memory") == 1,
        "the leak shows: {before}"
    );
    under_load(&mut tb, "recycling by memory", Duration::from_secs(20), |tb| exits(tb, "recycled_memory") == 1);
    if let Some(pid) = leaker {
        assert!(wait_until(Duration::from_secs(10), || !alive(pid as u32)), "the leaking worker is gone");
    }
    // Only that one: the other stays well under the limit.
    assert!(wait_until(Duration::from_secs(5), || tb.stats()["cluster"]["active_workers"] == 2));
    std::thread::sleep(Duration::from_millis(600)); // six readings: no further recycle
    assert_eq!(exits(&tb, "recycled_memory"), 1, "{}", tb.stderr());
    assert_eq!(exits(&tb, "crash"), 0);
    assert!(tb.stderr().contains("its memory stayed over the limit"), "{}", tb.stderr());
    tb.remember_workers();
}

#[test]
fn a_crash_loop_backs_off_exponentially() {
    // Slot 1 never gets ready, so the cluster never prints its ready line: not waited for.
    let (mut tb, _stdout) = Testbed::spawn(args(&[
        "--workers",
        "2",
        "--respawn",
        "--crash-on-start-id",
        "1",
        "--respawn-max-crashes",
        "100",
        "--respawn-window-sec",
        "60",
        "--respawn-backoff-ms",
        "50:800",
    ]));
    // Slot 1 crashes at start every time: its respawn delays grow (50, 100, 200, 400, 800 ms,
    // each less up to half of it), never over the max.
    let delays = |log: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| l.contains("worker 1 (pid") && l.contains("respawning in "))
            .filter_map(|l| {
                let d = l.rsplit("respawning in ").next()?;
                if let Some(ms) = d.strip_suffix("ms") {
                    ms.parse().ok()
                } else {
                    d.strip_suffix('s')?.parse::<f64>().ok().map(|s| s * 1000.0)
                }
            })
            .collect()
    };
    assert!(tb.wait_log(Duration::from_secs(20), |l| delays(l).len() >= 6), "{}", tb.stderr());
    let d = delays(&tb.stderr());
    assert!(d[0] <= 50.0 && d[0] >= 25.0, "{d:?}");
    assert!(d[3] >= 200.0 && d[3] <= 400.0, "{d:?}");
    assert!(d.iter().all(|&x| x <= 800.0), "{d:?}");
    assert!(d[5] >= 400.0, "{d:?}");
    tb.remember_workers();
}

#[test]
fn a_disabled_cluster_with_a_cooloff_probes_instead_of_exiting() {
    // Every worker crashes at start: without a cool-off the master would exit (WorkersFailed).
    let (mut tb, _stdout) = Testbed::spawn(args(&[
        "--workers",
        "1",
        "--respawn",
        "--crash-on-start",
        "--respawn-max-crashes",
        "2",
        "--respawn-delay-ms",
        "10",
        "--respawn-cooloff-ms",
        "300",
    ]));
    let probes = |l: &str| l.matches("its cool-off is over: one probe spawn").count();
    assert!(tb.wait_log(Duration::from_secs(15), |l| probes(l) >= 2), "{}", tb.stderr());
    let log = tb.stderr();
    assert!(log.contains("crashing too fast"), "{log}");
    assert!(tb.wait_exit(Duration::from_millis(10)).is_none(), "the master waits for its probes:\n{log}");
    tb.remember_workers();
}
