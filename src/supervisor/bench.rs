//! The supervisor's own CPU cost per event against the number of slots, with and without the
//! incremental settle (`bench/supervisor` runs it and writes BENCHMARKS.md). Ignored by
//! `cargo test`: a measurement, not a check. One line of JSON per size on stderr.
//!
//! A cluster of N workers started and made ready (timed, per worker: no start-up or respawn
//! delay, crash protection out of the way), then, timed: `--rounds` respawn cycles (a worker's exit, its respawn's `Spawned` and
//! `Ready`, three events, on slots spread over the cluster); ten heartbeats per round; what a
//! heartbeat's mark costs the next settle (every worker beats once, then one timed respawn
//! cycle, less a plain one, per worker; fifty times); a rolling restart (`max_surge` 1: per
//! slot the replacement's start and ready, the old worker's exit), per replaced worker. The
//! same sequence runs on a twin that settles in full after every event (the pipeline as it was
//! before the incremental settle; heartbeats are then not quiet either), in turn with it size
//! by size.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use super::tests::{MS, policy};
use super::*;
use crate::stats::{ExitStatus, WorkerStatus};

/// A fake driver: starts every process asked for (it reports started, then ready) and ends
/// every worker asked to stop (a clean exit). Returns when nothing more follows from `first`.
struct Driver {
    sup: Supervisor,
    now: Instant,
    pid: u32,
    /// The current worker of each slot.
    keys: Vec<WorkerKey>,
}

impl Driver {
    fn feed(&mut self, first: Event) {
        let wall = SystemTime::UNIX_EPOCH;
        let mut queue = VecDeque::from([first]);
        while let Some(event) = queue.pop_front() {
            for c in self.sup.handle(event, self.now, wall) {
                match c {
                    Command::Spawn { slot, key, .. } => {
                        self.keys[slot] = key;
                        self.pid += 1;
                        queue.push_back(Event::Spawned { key, pid: self.pid });
                        queue.push_back(Event::Ready { key });
                    }
                    Command::Signal { key, signal: Signal::TERM } => {
                        queue.push_back(Event::Exited { key, status: ExitStatus::Code(0) });
                    }
                    _ => {}
                }
            }
        }
    }

    fn respawn(&mut self, r: usize) {
        self.now += MS;
        let key = self.keys[(r * 7919) % self.keys.len()];
        self.feed(Event::Exited { key, status: ExitStatus::Signal(Signal::KILL) });
    }

    fn all_active(&self) -> bool {
        self.sup.slots.iter().all(|s| s.status() == WorkerStatus::Active)
    }
}

/// What [`measure`] measures, in microseconds.
struct Costs {
    startup: f64,
    respawn: f64,
    beat: f64,
    mark: f64,
    rollout: f64,
}

/// [`Costs`] for `n` slots, `full`: settling in full after every event.
fn measure(n: usize, rounds: usize, full: bool) -> Costs {
    let mut p = policy(n);
    p.startup_delay = Duration::ZERO;
    p.respawn_delay = Duration::ZERO;
    p.max_crashes = u32::MAX;
    p.liveness.worker_timeout = Some(Duration::from_secs(30));
    let t0 = Instant::now();
    let mut sup = Supervisor::new(p, t0).with_open_sockets(0..n);
    sup.always_settle = full;
    let mut d = Driver { sup, now: t0, pid: 1000, keys: vec![WorkerKey(0); n] };
    let start = Instant::now();
    d.feed(Event::Tick);
    let startup = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert!(d.all_active(), "every slot is ready");
    let start = Instant::now();
    for r in 0..rounds {
        d.respawn(r);
    }
    let respawn = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let wall = SystemTime::UNIX_EPOCH;
    let start = Instant::now();
    for r in 0..rounds * 10 {
        d.now += Duration::from_micros(10);
        d.sup.handle(Event::Beat { key: d.keys[r % n], served: r as u64, in_flight: 0 }, d.now, wall);
    }
    let beat = start.elapsed().as_secs_f64() * 1e6 / (rounds * 10) as f64;
    let mut after_beats = Duration::ZERO;
    let repeats = 50;
    for r in 0..repeats {
        for (i, key) in d.keys.clone().into_iter().enumerate() {
            d.now += Duration::from_micros(1);
            d.sup.handle(Event::Beat { key, served: (rounds * 10 + r * n + i) as u64, in_flight: 0 }, d.now, wall);
        }
        let start = Instant::now();
        d.respawn(r);
        after_beats += start.elapsed();
    }
    let mark = (after_beats.as_secs_f64() * 1e6 / repeats as f64 - respawn).max(0.0) / n as f64;
    d.now += MS;
    let start = Instant::now();
    d.feed(Event::Restart { ticket: None });
    let rollout = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert!(
        matches!(d.sup.last_restart, Some(RestartOutcome::Completed { replaced }) if replaced == n),
        "the rollout replaced every slot: {:?}",
        d.sup.last_restart
    );
    assert!(d.all_active(), "every slot was respawned and replaced");
    Costs { startup, respawn, beat, mark, rollout }
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
            let c = measure(n, rounds, full);
            let label = if full { "full" } else { "incremental" };
            line += &format!(
                ", \"{label}_respawn_us\": {:.3}, \"{label}_beat_us\": {:.4}, \"{label}_mark_us\": {:.4}, \
                 \"{label}_rollout_us\": {:.3}, \"{label}_startup_us\": {:.3}",
                c.respawn, c.beat, c.mark, c.rollout, c.startup
            );
        }
        eprintln!("{line}}}");
    }
}
