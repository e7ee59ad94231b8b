//! The supervisor's own CPU cost per event against the number of slots, with and without the
//! incremental settle (`bench/supervisor` runs it and writes BENCHMARKS.md). Ignored by
//! `cargo test`: a measurement, not a check. One line of JSON per size on stderr.
//!
//! A cluster of N ready workers (no start-up or respawn delay, crash protection out of the
//! way), then, timed: `--rounds` respawn cycles (a worker's exit, its respawn's `Spawned` and
//! `Ready`, three events, on slots spread over the cluster), then ten heartbeats per round, then
//! what a heartbeat's mark costs the next settle (every worker beats once, then one timed
//! respawn cycle, less a plain one, per worker; fifty times). The
//! same sequence runs on a twin that settles in full after every event (the pipeline as it was
//! before the incremental settle; heartbeats are then not quiet either), in turn with it size
//! by size.

use std::time::{Duration, Instant, SystemTime};

use super::tests::{MS, policy};
use super::*;
use crate::stats::{ExitStatus, WorkerStatus};

/// Microseconds per respawn cycle, per heartbeat, and per heartbeat's mark at the next settle,
/// for `n` slots, `full`: settling in full.
fn measure(n: usize, rounds: usize, full: bool) -> (f64, f64, f64) {
    let mut p = policy(n);
    p.startup_delay = Duration::ZERO;
    p.respawn_delay = Duration::ZERO;
    p.max_crashes = u32::MAX;
    p.liveness.worker_timeout = Some(Duration::from_secs(30));
    let t0 = Instant::now();
    let mut sup = Supervisor::new(p, t0).with_open_sockets(0..n);
    sup.always_settle = full;
    let wall = SystemTime::UNIX_EPOCH;
    let mut now = t0;
    let mut pid = 1000;
    let mut keys = vec![WorkerKey(0); n];
    let mut started = Vec::new();
    for c in sup.handle(Event::Tick, now, wall) {
        if let Command::Spawn { slot, key, .. } = c {
            keys[slot] = key;
            pid += 1;
            sup.handle(Event::Spawned { key, pid }, now, wall);
            started.push(key);
        }
    }
    for key in started {
        sup.handle(Event::Ready { key }, now, wall);
    }
    assert!(sup.slots.iter().all(|s| s.status() == WorkerStatus::Active), "every slot is ready");
    let start = Instant::now();
    for r in 0..rounds {
        now += MS;
        let slot = (r * 7919) % n;
        let exited = sup.handle(Event::Exited { key: keys[slot], status: ExitStatus::Signal(Signal::KILL) }, now, wall);
        for c in exited {
            if let Command::Spawn { slot, key, .. } = c {
                keys[slot] = key;
                pid += 1;
                sup.handle(Event::Spawned { key, pid }, now, wall);
                sup.handle(Event::Ready { key }, now, wall);
            }
        }
    }
    let cycle = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let start = Instant::now();
    for r in 0..rounds * 10 {
        now += Duration::from_micros(10);
        sup.handle(Event::Beat { key: keys[r % n], served: r as u64, in_flight: 0 }, now, wall);
    }
    let beat = start.elapsed().as_secs_f64() * 1e6 / (rounds * 10) as f64;
    // What the heartbeats' marks cost the next settle: every worker beats once (quiet, not
    // timed), then one respawn cycle is timed; less a plain cycle, per worker.
    let mut after_beats = Duration::ZERO;
    let repeats = 50;
    for r in 0..repeats {
        for (i, &key) in keys.iter().enumerate() {
            now += Duration::from_micros(1);
            sup.handle(Event::Beat { key, served: (rounds * 10 + r * n + i) as u64, in_flight: 0 }, now, wall);
        }
        now += MS;
        let slot = (r * 7919) % n;
        let start = Instant::now();
        let exited = sup.handle(Event::Exited { key: keys[slot], status: ExitStatus::Signal(Signal::KILL) }, now, wall);
        for c in exited {
            if let Command::Spawn { slot, key, .. } = c {
                keys[slot] = key;
                pid += 1;
                sup.handle(Event::Spawned { key, pid }, now, wall);
                sup.handle(Event::Ready { key }, now, wall);
            }
        }
        after_beats += start.elapsed();
    }
    let mark = (after_beats.as_secs_f64() * 1e6 / repeats as f64 - cycle).max(0.0) / n as f64;
    assert!(sup.slots.iter().all(|s| s.status() == WorkerStatus::Active), "every slot was respawned");
    (cycle, beat, mark)
}

#[test]
#[ignore = "a benchmark: bench/supervisor runs it in release"]
fn cost_per_event() {
    let sizes: Vec<usize> = std::env::var("SUPERVISOR_BENCH_SIZES")
        .unwrap_or_else(|_| "1,16,128,512,1024".into())
        .split(',')
        .map(|s| s.trim().parse().expect("a size"))
        .collect();
    let rounds: usize = std::env::var("SUPERVISOR_BENCH_ROUNDS").ok().map_or(2000, |s| s.parse().expect("rounds"));
    for (i, &n) in sizes.iter().enumerate() {
        // In turn: full first at one size, incremental first at the next.
        let order = if i % 2 == 0 { [true, false] } else { [false, true] };
        let mut line = format!("{{\"workers\": {n}, \"rounds\": {rounds}");
        for full in order {
            let (cycle, beat, mark) = measure(n, rounds, full);
            let label = if full { "full" } else { "incremental" };
            line += &format!(
                ", \"{label}_respawn_us\": {cycle:.3}, \"{label}_beat_us\": {beat:.4}, \"{label}_mark_us\": {mark:.4}"
            );
        }
        eprintln!("{line}}}");
    }
}
