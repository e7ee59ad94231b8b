//! Unit tests of heartbeats, hung workers, recycling, backoff and cool-off, with a fake clock.

use std::time::Duration;

use super::tests::{Harness, MS, policy, reports, spawns};
use super::*;
use crate::signal::Signal;
use crate::stats::RestartOutcome;
use crate::stats::{ExitReason, ExitStatus, WorkerStatus};

fn with(l: Liveness) -> Policy {
    Policy { liveness: l, ..policy(2) }
}

fn beat(h: &mut Harness, slot: usize, served: u64) -> Vec<Command> {
    let key = h.key_of(slot);
    h.feed(Event::Beat { key, served, in_flight: 0 })
}

fn signals_to(cmds: &[Command], key: WorkerKey) -> Vec<Signal> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Signal { key: k, signal } if *k == key => Some(*signal),
            _ => None,
        })
        .collect()
}

fn routes(cmds: &[Command]) -> Vec<Vec<usize>> {
    cmds.iter().filter_map(|c| if let Command::Route { slots } = c { Some(slots.clone()) } else { None }).collect()
}

#[test]
fn a_worker_that_never_beats_is_never_hung() {
    let mut h = Harness::new(with(Liveness { worker_timeout: Some(500 * MS), ..Liveness::default() }));
    h.start_all();
    assert_eq!(h.sup.next_deadline(), None, "nothing to watch before a first beat");
    let r = h.at(60_000);
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(h.status(0), WorkerStatus::Active);
}

#[test]
fn a_silent_worker_is_routed_away_signalled_then_killed_and_counts_as_hung() {
    let l = Liveness { worker_timeout: Some(500 * MS), hung_grace: 300 * MS, ..Liveness::default() };
    let mut h = Harness::new(with(l));
    h.start_all(); // slots ready at t=100
    h.at(1000);
    beat(&mut h, 0, 10);
    beat(&mut h, 1, 10);
    h.at(1400);
    beat(&mut h, 1, 20);
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 1500 * MS), "slot 0's worker timeout");
    let key = h.key_of(0);
    assert!(h.at(1499).is_empty());
    let r = h.at(1500);
    assert!(
        reports(&r)
            .iter()
            .any(|x| matches!(x, Report::Hung { slot: 0, silent, signal: Signal::ABRT, .. } if *silent == 500 * MS)),
        "{r:?}"
    );
    assert!(r.contains(&Command::Diagnose { key }), "{r:?}");
    assert_eq!(signals_to(&r, key), vec![Signal::ABRT]);
    assert_eq!(routes(&r), vec![vec![1]], "out of the route at once");
    assert_eq!(h.status(0), WorkerStatus::Stopping);
    assert_eq!(h.sup.cluster_stats().active_workers, 1);
    // A late beat does not save it.
    beat(&mut h, 0, 11);
    let r = h.at(1800);
    assert_eq!(signals_to(&r, key), vec![Signal::KILL]);
    assert!(!reports(&r).iter().any(|x| matches!(x, Report::StopTimeout { .. })), "{r:?}");
    let r = h.exit(0, ExitStatus::Signal(Signal::KILL));
    assert!(
        matches!(reports(&r)[..], [Report::Exited { crash: true, cause: ExitReason::Hung, respawn_in: Some(_), .. }]),
        "{r:?}"
    );
    assert_eq!(h.sup.cluster_stats().exits.hung, 1);
    assert_eq!(h.sup.slots[0].crash_count, 1);
    // Respawned through the readiness gate: in the route again only once ready.
    beat(&mut h, 1, 30);
    let r = h.at(1900);
    assert_eq!(spawns(&r), vec![0]);
    assert_eq!(h.status(0), WorkerStatus::Starting);
    let r = h.ready(0);
    assert_eq!(routes(&r), vec![vec![0, 1]]);
    assert_eq!(h.sup.worker_stats(h.now)[0].last_exit_reason, Some(ExitReason::Hung));
}

#[test]
fn beats_are_shown_in_the_statistics() {
    let mut h = Harness::new(with(Liveness::default()));
    h.start_all();
    h.at(1000);
    let key = h.key_of(1);
    h.feed(Event::Beat { key, served: 42, in_flight: 3 });
    h.at(1250);
    let w = &h.sup.worker_stats(h.now)[1];
    assert_eq!((w.requests, w.in_flight, w.heartbeat_age), (Some(42), Some(3), Some(250 * MS)));
    let w = &h.sup.worker_stats(h.now)[0];
    assert_eq!((w.requests, w.heartbeat_age), (None, None), "slot 0 never beat");
}

#[test]
fn a_worker_past_its_request_limit_is_recycled_surge_first_and_not_as_a_crash() {
    let mut h = Harness::new(with(Liveness { max_requests: Some(100), ..Liveness::default() }));
    h.start_all();
    h.at(1000);
    assert!(
        h.log.iter().all(|c| !matches!(c, Command::Spawn { request_limit, .. } if *request_limit != Some(100))),
        "every worker is told its limit (no jitter)"
    );
    let old = h.key_of(0);
    assert!(spawns(&beat(&mut h, 0, 99)).is_empty());
    let r = beat(&mut h, 0, 100);
    assert_eq!(spawns(&r), vec![0], "the replacement starts next to it");
    assert!(
        reports(&r)
            .iter()
            .any(|x| matches!(x, Report::Recycling { slot: 0, reason: RecycleReason::Requests, in_place: false, .. }))
    );
    assert_eq!(h.status(0), WorkerStatus::Active, "the old worker serves meanwhile");
    assert!(signals_to(&r, old).is_empty());
    // Its replacement ready: it takes over, and the old one drains.
    let new = h.sup.slots[0].next.as_ref().unwrap().key;
    let r = h.feed(Event::Ready { key: new });
    assert_eq!(signals_to(&r, old), vec![Signal::TERM]);
    assert_eq!(h.key_of(0), new);
    let r = h.feed(Event::Exited { key: old, status: ExitStatus::Code(0) });
    assert!(
        matches!(reports(&r)[..], [Report::Exited { crash: false, cause: ExitReason::RecycledRequests, .. }]),
        "{r:?}"
    );
    let stats = h.sup.cluster_stats();
    assert_eq!((stats.exits.recycled_requests, stats.exits.crash), (1, 0));
    assert_eq!(h.sup.slots[0].crash_count, 0);
    assert_eq!(h.sup.slots[0].restarts, 1);
}

#[test]
fn jitter_spreads_request_limits_and_ages() {
    let l = Liveness {
        max_requests: Some(1000),
        max_requests_jitter: 500,
        max_age: Some(Duration::from_secs(60)),
        max_age_jitter: Duration::from_secs(30),
        ..Liveness::default()
    };
    let mut h = Harness::new(Policy { liveness: l, startup_delay: Duration::ZERO, ..policy(8) });
    h.at(0);
    let limits: BTreeSet<u64> = h
        .log
        .iter()
        .filter_map(|c| if let Command::Spawn { request_limit, .. } = c { *request_limit } else { None })
        .collect();
    assert!(limits.len() >= 6, "{limits:?}");
    assert!(limits.iter().all(|l| (1000..=1500).contains(l)), "{limits:?}");
    let ages: BTreeSet<Instant> = h.sup.slots.iter().filter_map(|s| s.current.as_ref()?.recycle_at).collect();
    assert!(ages.len() >= 6, "{ages:?}");
    assert!(ages.iter().all(|&t| t >= h.t0 + Duration::from_secs(60) && t <= h.t0 + Duration::from_secs(90)));
}

#[test]
fn at_most_one_slot_recycles_at_a_time_by_default() {
    let mut h = Harness::new(with(Liveness { max_age: Some(Duration::from_secs(10)), ..Liveness::default() }));
    h.start_all(); // both started by t=100
    let r = h.at(10_100);
    assert_eq!(spawns(&r), vec![0], "one recycle at a time: {r:?}");
    assert!(spawns(&h.at(12_000)).is_empty(), "slot 1 waits while slot 0's replacement starts");
    let new = h.sup.slots[0].next.as_ref().unwrap().key;
    let r = h.feed(Event::Ready { key: new });
    assert_eq!(spawns(&r), vec![1], "the next recycle starts once the first is done: {r:?}");
    // With two allowed, both start together.
    let l = Liveness { max_age: Some(Duration::from_secs(10)), max_recycling: 2, ..Liveness::default() };
    let mut h = Harness::new(with(l));
    h.start_all();
    assert_eq!(spawns(&h.at(10_100)), vec![0, 1]);
}

#[test]
fn memory_over_the_limit_for_enough_readings_recycles_in_place_when_no_surge_fits() {
    let l = Liveness { max_memory: Some(100 << 20), memory_samples: 3, ..Liveness::default() };
    let mut h = Harness::new(with(l));
    h.start_all();
    let r = h.at(1000);
    assert!(r.contains(&Command::SampleMemory), "{r:?}");
    let (k0, k1) = (h.key_of(0), h.key_of(1));
    let big = |h: &mut Harness, headroom| {
        h.feed(Event::MemorySampled { readings: vec![(k0, 200 << 20), (k1, 50 << 20)], headroom })
    };
    big(&mut h, Some(1 << 30));
    big(&mut h, Some(1 << 30));
    // A reading under the limit resets the count.
    h.feed(Event::MemorySampled { readings: vec![(k0, 90 << 20)], headroom: None });
    big(&mut h, Some(1 << 30));
    let r = big(&mut h, Some(1 << 30));
    assert!(spawns(&r).is_empty(), "two readings in a row so far: {r:?}");
    // The third, with only 10 MiB left in the cgroup (the smallest worker has 50): in place.
    let r = big(&mut h, Some(10 << 20));
    assert!(spawns(&r).is_empty(), "{r:?}");
    assert!(
        reports(&r)
            .iter()
            .any(|x| matches!(x, Report::Recycling { slot: 0, reason: RecycleReason::Memory, in_place: true, .. }))
    );
    assert_eq!(signals_to(&r, k0), vec![Signal::TERM], "it drains first");
    let r = h.feed(Event::Exited { key: k0, status: ExitStatus::Code(0) });
    assert!(
        matches!(reports(&r)[..], [Report::Exited { cause: ExitReason::RecycledMemory, crash: false, respawn_in: Some(d), .. }, Report::Started { slot: 0, .. }] if d.is_zero()),
        "{r:?}"
    );
    assert_eq!(spawns(&r), vec![0], "then its slot respawns at once");
    assert_eq!(h.sup.cluster_stats().exits.recycled_memory, 1);
}

#[test]
fn a_rollout_takes_precedence_over_recycling() {
    let mut h = Harness::new(with(Liveness { max_requests: Some(10), ..Liveness::default() }));
    h.start_all();
    h.at(1000);
    beat(&mut h, 0, 10);
    let recycle = h.sup.slots[0].next.as_ref().unwrap().key;
    let r = h.feed(Event::Restart { ticket: None });
    assert_eq!(signals_to(&r, recycle), vec![Signal::TERM], "the recycle's replacement gives way");
    assert_eq!(spawns(&r), vec![0], "the rollout's replacement of slot 0");
    assert!(spawns(&beat(&mut h, 1, 50)).is_empty(), "no recycle during a rollout");
    let next = h.sup.slots[0].next.as_ref().unwrap().key;
    let r = h.feed(Event::Ready { key: next });
    assert_eq!(spawns(&r), vec![1], "the rollout goes on");
}

#[test]
fn a_recycle_whose_replacement_fails_keeps_the_old_worker_and_pauses() {
    let mut h = Harness::new(with(Liveness { max_requests: Some(10), ..Liveness::default() }));
    h.start_all();
    h.at(1000);
    let old = h.key_of(0);
    beat(&mut h, 0, 10);
    let next = h.sup.slots[0].next.as_ref().unwrap().key;
    let r = h.feed(Event::Exited { key: next, status: ExitStatus::Code(1) });
    assert!(reports(&r).iter().any(|x| matches!(x, Report::RecycleFailed { slot: 0, .. })), "{r:?}");
    assert!(!reports(&r).iter().any(|x| matches!(x, Report::RestartFinished { .. })));
    assert_eq!(h.key_of(0), old);
    assert_eq!(h.status(0), WorkerStatus::Active);
    assert!(spawns(&beat(&mut h, 0, 11)).is_empty(), "paused");
    h.at(2000);
    assert_eq!(spawns(&beat(&mut h, 0, 12)), vec![0], "tried again after the pause");
}

#[test]
fn backoff_doubles_up_to_the_max_with_jitter_and_resets_after_a_stable_run() {
    let l = Liveness { backoff: Some(Backoff { base: 100 * MS, max: 1600 * MS }), ..Liveness::default() };
    let mut h = Harness::new(Policy { max_crashes: 100, respawn_window: Duration::from_secs(60), ..with(l) });
    h.start_all();
    let mut t = 1000;
    let mut delays = Vec::new();
    for _ in 0..7 {
        h.at(t);
        let r = h.exit(0, ExitStatus::Code(1));
        let Some(Report::Exited { respawn_in: Some(d), .. }) = reports(&r).first().copied() else { panic!("{r:?}") };
        delays.push(*d);
        t += d.as_millis() as u64;
        assert_eq!(spawns(&h.at(t)), vec![0], "respawned at the delay");
        h.ready(0);
        t += 10;
    }
    let full = [100, 200, 400, 800, 1600, 1600, 1600];
    for (d, f) in delays.iter().zip(full) {
        assert!(*d <= f * MS && *d >= f * MS / 2, "{delays:?}");
    }
    assert!(
        delays.windows(2).any(|w| w[0] != w[1]) || delays[4..].iter().any(|d| *d != 1600 * MS),
        "jittered: {delays:?}"
    );
    // A worker that ran for the whole crash window starts the sequence again.
    t += 61_000;
    h.at(t);
    let r = h.exit(0, ExitStatus::Code(1));
    let Some(Report::Exited { respawn_in: Some(d), .. }) = reports(&r).first().copied() else { panic!("{r:?}") };
    assert!(*d <= 100 * MS, "{d:?}");
}

#[test]
fn without_backoff_the_respawn_delay_stays_fixed() {
    let mut h = Harness::new(Policy { max_crashes: 100, ..policy(1) });
    h.start_all();
    for i in 0..4 {
        h.at(1000 + i * 1000);
        let r = h.exit(0, ExitStatus::Code(1));
        assert!(matches!(reports(&r)[..], [Report::Exited { respawn_in: Some(d), .. }] if *d == 100 * MS), "{r:?}");
        h.at(1000 + i * 1000 + 100);
        h.ready(0);
    }
}

#[test]
fn a_disabled_slot_gets_a_probe_after_its_cooloff() {
    let l = Liveness { cooloff: Some(Duration::from_secs(10)), ..Liveness::default() };
    let mut h = Harness::new(with(l));
    h.start_all();
    for t in [1000, 1200, 1400] {
        h.at(t);
        if h.sup.slots[0].current.is_none() {
            h.at(t + 100);
        }
        h.exit(0, ExitStatus::Code(1));
        h.at(t + 100);
    }
    assert_eq!(h.status(0), WorkerStatus::Disabled);
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 11_400 * MS), "the cool-off");
    let r = h.at(11_400);
    assert!(reports(&r).contains(&&Report::Probing { slot: 0 }), "{r:?}");
    assert_eq!(spawns(&r), vec![0]);
    // The probe crashes: disabled again at once, until the next cool-off.
    let r = h.exit(0, ExitStatus::Code(1));
    assert!(reports(&r).iter().any(|x| matches!(x, Report::Disabled { slot: 0, .. })), "{r:?}");
    assert_eq!(h.status(0), WorkerStatus::Disabled);
    let r = h.at(21_400);
    assert_eq!(spawns(&r), vec![0]);
    let r = h.ready(0);
    assert!(reports(&r).contains(&&Report::Reenabled { slot: 0 }), "{r:?}");
    assert_eq!(h.status(0), WorkerStatus::Active);
    // Without a cool-off, disabled stays disabled (the spec's behaviour).
    let mut h = Harness::new(policy(1));
    h.start_all();
    for t in [1000, 1200, 1400] {
        h.at(t);
        if h.sup.slots[0].current.is_some() {
            h.exit(0, ExitStatus::Code(1));
        }
        h.at(t + 100);
    }
    assert_eq!(h.status(0), WorkerStatus::Disabled);
    assert_eq!(h.sup.next_deadline(), None);
}

#[test]
fn a_cluster_whose_every_slot_is_disabled_waits_for_the_cooloff_instead_of_exiting() {
    let l = Liveness { cooloff: Some(Duration::from_secs(10)), ..Liveness::default() };
    let mut h = Harness::new(Policy { liveness: l, ..policy(1) });
    h.start_all();
    let mut t = 1000;
    while h.status(0) != WorkerStatus::Disabled {
        h.at(t);
        if h.sup.slots[0].current.is_some() {
            h.exit(0, ExitStatus::Code(1));
        }
        t += 100;
    }
    assert!(!h.log.iter().any(|c| matches!(c, Command::Exit(_))), "no exit while a probe is due");
    assert_eq!(h.sup.watchdog(h.now), Watchdog::Withhold { reason: "no worker is serving" });
    let r = h.at(t + 10_000);
    assert_eq!(spawns(&r), vec![0], "the probe");
    // A shutdown meanwhile still ends supervision.
    let mut h = Harness::new(Policy {
        liveness: Liveness { cooloff: Some(Duration::from_secs(10)), ..Liveness::default() },
        ..policy(1)
    });
    h.start_all();
    for t in [1000, 1100, 1200, 1300] {
        h.at(t);
        if h.sup.slots[0].current.is_some() {
            h.exit(0, ExitStatus::Code(1));
        }
    }
    assert_eq!(h.status(0), WorkerStatus::Disabled);
    let r = h.feed(Event::Shutdown);
    assert!(r.contains(&Command::Exit(Outcome::Stopped)), "{r:?}");
}

/// Two workers with a 500 ms timeout, ready at 100 ms, that beat at 1000 ms.
fn two_beating_at_1000() -> Harness {
    let l = Liveness { worker_timeout: Some(500 * MS), ..Liveness::default() };
    let mut h = Harness::new(with(l));
    h.start_all();
    h.at(1000);
    beat(&mut h, 0, 1);
    beat(&mut h, 1, 1);
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 1500 * MS));
    h
}

/// A beat while nothing is due is quiet: handled without a settle (the full-event count does
/// not move), the kept deadline stays the earliest one known, and a tick at it, finding
/// nothing due, computes the real one; a silent worker is still caught at its own deadline.
#[test]
fn quiet_beats_keep_an_early_deadline_that_a_tick_corrects() {
    let mut h = two_beating_at_1000();
    let (full, quiet) = h.sup.revision();
    h.now = h.t0 + 1200 * MS;
    assert!(beat(&mut h, 0, 2).is_empty());
    h.now = h.t0 + 1300 * MS;
    assert!(beat(&mut h, 1, 3).is_empty());
    assert_eq!(h.sup.revision(), (full, quiet + 2), "two quiet beats, no event handled in full");
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 1500 * MS), "kept: earlier than the real one");
    assert_eq!(h.sup.compute_deadline(), Some(h.t0 + 1700 * MS));
    assert!(h.at(1500).is_empty(), "nobody is hung at the kept deadline");
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 1700 * MS), "computed anew");
    assert_eq!(h.sup.slots[1].current.as_ref().map(|p| p.served), Some(3), "the counts were taken");
    h.now = h.t0 + 1650 * MS;
    beat(&mut h, 1, 4);
    let r = h.at(1700);
    assert!(reports(&r).iter().any(|x| matches!(x, Report::Hung { slot: 0, .. })), "{r:?}");
    assert_eq!(h.status(1), WorkerStatus::Active);
}

#[test]
fn a_stalled_master_does_not_take_its_healthy_workers_for_hung() {
    let mut h = two_beating_at_1000();
    // The master is stopped for 31 s (Ctrl-Z, a frozen cgroup): when it runs again, the first
    // event it handles is a beat that waited in a channel; the other's is still queued.
    h.now = h.t0 + Duration::from_secs(32);
    let r = beat(&mut h, 1, 2);
    assert!(!reports(&r).iter().any(|x| matches!(x, Report::Hung { .. })), "{r:?}");
    let r = beat(&mut h, 0, 2);
    assert!(!reports(&r).iter().any(|x| matches!(x, Report::Hung { .. })), "{r:?}");
    // A worker that really is silent is still found, a timeout after the master came back.
    let r = h.at(32_000 + 499);
    assert!(!reports(&r).iter().any(|x| matches!(x, Report::Hung { .. })));
    beat(&mut h, 1, 3);
    let r = h.at(32_000 + 500);
    assert!(reports(&r).iter().any(|x| matches!(x, Report::Hung { slot: 0, .. })), "{r:?}");
    // And a master that wakes on time (a hung deadline) is not taken for stalled.
    assert_eq!(h.sup.cluster_stats().active_workers, 1);
}

#[test]
fn beats_before_ready_and_counts_without_a_beat_do_not_make_a_worker_hung() {
    let l = Liveness { worker_timeout: Some(500 * MS), max_requests: Some(10), ..Liveness::default() };
    let mut h = Harness::new(Policy { liveness: l, ..policy(1) });
    h.at(0);
    // Beats during a long warm-up, then ready much later than a timeout after them.
    beat(&mut h, 0, 0);
    h.at(1500);
    let r = h.ready(0);
    assert!(!reports(&r).iter().any(|x| matches!(x, Report::Hung { .. })), "{r:?}");
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 2000 * MS), "the timeout runs from ready");
    // A server that never beats but reports its request limit is not watched.
    let mut h = Harness::new(Policy {
        liveness: Liveness { worker_timeout: Some(500 * MS), max_requests: Some(10), ..Liveness::default() },
        ..policy(1)
    });
    h.start_all();
    h.at(1000);
    let key = h.key_of(0);
    let r = h.feed(Event::Served { key, served: 10, in_flight: 0 });
    assert_eq!(spawns(&r), vec![0], "the limit recycles");
    let r = h.at(60_000);
    assert!(!reports(&r).iter().any(|x| matches!(x, Report::Hung { .. })), "{r:?}");
    // Counts never go back.
    h.feed(Event::Beat { key, served: 5, in_flight: 0 });
    assert_eq!(h.sup.worker_stats(h.now)[0].requests, Some(10));
}

#[test]
fn extreme_jitters_saturate_instead_of_panicking() {
    let l = Liveness {
        max_requests: Some(u64::MAX),
        max_requests_jitter: u64::MAX,
        max_age: Some(Duration::MAX),
        max_age_jitter: Duration::MAX,
        ..Liveness::default()
    };
    let mut h = Harness::new(with(l));
    h.start_all();
    assert!(h.log.iter().any(|c| matches!(c, Command::Spawn { request_limit: Some(u64::MAX), .. })));
    assert!(h.sup.slots.iter().all(|s| s.current.as_ref().unwrap().recycle_at.is_none()), "beyond the clock: never");
}

#[test]
fn a_shutdown_delay_keeps_serving_not_ready_then_drains_and_a_second_request_skips_it() {
    let mut h = Harness::new(Policy { shutdown_delay: Duration::from_secs(5), ..policy(2) });
    h.start_all();
    assert_eq!(h.sup.probes(), Probes { live: true, ready: true, started: true });
    h.at(1000);
    let r = h.feed(Event::Shutdown);
    assert!(reports(&r).contains(&&Report::ShutdownDelayed { delay: Duration::from_secs(5) }), "{r:?}");
    assert!(r.contains(&Command::Notify(Notify::Leaving { delay: Duration::from_secs(5) })), "{r:?}");
    assert!(!r.iter().any(|c| matches!(c, Command::Signal { .. } | Command::CloseListeners)), "still serving: {r:?}");
    assert_eq!(h.sup.probes(), Probes { live: true, ready: false, started: true }, "not ready at once");
    assert!(h.sup.cluster_stats().shutdown_requested);
    assert_eq!(h.sup.cluster_stats().active_workers, 2);
    // Meanwhile: a crash is still respawned; restarts and scaling are refused.
    h.exit(1, ExitStatus::Code(1));
    assert_eq!(spawns(&h.at(1100)), vec![1]);
    h.ready(1);
    let r = h.feed(Event::Restart { ticket: Some(7) });
    assert!(
        reports(&r)
            .iter()
            .any(|x| matches!(x, Report::RestartFinished { outcome: RestartOutcome::Cancelled { .. }, .. })),
        "{r:?}"
    );
    assert!(h.feed(Event::Scale { workers: 5 }).is_empty());
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 6000 * MS), "the end of the delay");
    // The delay is over: the drain, as without one.
    let r = h.at(6000);
    assert!(r.contains(&Command::CloseListeners), "{r:?}");
    assert_eq!(r.iter().filter(|c| matches!(c, Command::Signal { signal: Signal::TERM, .. })).count(), 2);
    // A second request during the delay drains at once.
    let mut h = Harness::new(Policy { shutdown_delay: Duration::from_secs(5), ..policy(2) });
    h.start_all();
    h.feed(Event::Shutdown);
    let r = h.feed(Event::Signal { signal: Signal::TERM });
    assert!(r.contains(&Command::CloseListeners), "{r:?}");
    // And a third kills.
    let r = h.feed(Event::Shutdown);
    assert!(r.iter().any(|c| matches!(c, Command::Signal { signal: Signal::KILL, .. })), "{r:?}");
}

#[test]
fn probes_follow_the_start_up_min_ready_and_a_cluster_that_can_no_longer_run() {
    let mut h = Harness::new(Policy { min_ready: 2, respawn: true, ..policy(3) });
    h.at(0);
    assert_eq!(h.sup.probes(), Probes { live: true, ready: false, started: false });
    h.at(100);
    h.at(200);
    h.ready(0);
    assert!(!h.sup.probes().ready, "1 of the 2 needed");
    h.ready(1);
    assert_eq!(h.sup.probes(), Probes { live: true, ready: true, started: false });
    h.ready(2);
    assert!(h.sup.probes().started);
    // Every slot crash-loops until disabled: not live any more (the master then exits).
    let mut h = Harness::new(policy(1));
    h.start_all();
    let mut t = 1000;
    while h.status(0) != WorkerStatus::Disabled {
        h.at(t);
        if h.sup.slots[0].current.is_some() {
            h.exit(0, ExitStatus::Code(1));
        }
        t += 100;
    }
    assert!(!h.sup.probes().live);
}
