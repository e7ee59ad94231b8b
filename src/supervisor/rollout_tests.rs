//! Unit tests of rolling restarts with a surge of more than one slot (`Policy::max_surge`), with
//! a fake clock: how many replacements run at once, in which order, capacity, and every
//! interaction (failure, shutdown, scaling, coalescing, recycling, hung workers, upgrades).

use std::collections::BTreeSet;

use super::tests::{Harness, MS, policy, reports, spawns};
use super::*;
use crate::signal::Signal;
use crate::stats::{ExitStatus, RestartOutcome, UpgradeOutcome};

/// `workers` slots, `surge` replacements at once, every slot started and ready.
fn started(workers: usize, surge: usize) -> Harness {
    let mut h = Harness::new(Policy { max_surge: surge, ..policy(workers) });
    h.start_all();
    h
}

/// The slots whose replacement is starting, in slot order.
fn surging(h: &Harness) -> Vec<usize> {
    h.sup.slots.iter().filter(|s| s.next.is_some()).map(|s| s.id).collect()
}

fn next_key(h: &Harness, slot: usize) -> WorkerKey {
    h.sup.slots[slot].next.as_ref().expect("a replacement is starting").key
}

fn pids(h: &Harness) -> Vec<u32> {
    h.sup.slots.iter().map(|s| s.current.as_ref().and_then(|p| p.pid).expect("a worker")).collect()
}

fn finished(cmds: &[Command]) -> Vec<(RestartOutcome, Vec<u64>)> {
    reports(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Report::RestartFinished { outcome, tickets } => Some((outcome.clone(), tickets.clone())),
            _ => None,
        })
        .collect()
}

fn signals(cmds: &[Command], signal: Signal) -> BTreeSet<WorkerKey> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Signal { key, signal: s } if *s == signal => Some(*key),
            _ => None,
        })
        .collect()
}

fn ready_count(h: &Harness) -> usize {
    h.sup.cluster_stats().active_workers
}

#[test]
fn four_at_a_time_over_ten_slots_in_order_and_never_fewer_than_ten_ready() {
    let mut h = started(10, 4);
    let old = pids(&h);
    let r = h.feed(Event::Restart { ticket: Some(3) });
    assert_eq!(spawns(&r), vec![0, 1, 2, 3], "four replacements start at once, in slot order");
    assert!(signals(&r, Signal::TERM).is_empty(), "nobody is stopped before a replacement is ready");
    assert!(reports(&r).contains(&&Report::RestartStarted { workers: 10, at_once: 4 }));
    let mut order = spawns(&r);
    let mut outcome = Vec::new();
    let mut steps = 0;
    while h.sup.rollout.is_some() {
        steps += 1;
        assert!(steps <= 10, "ten replacements, one per step");
        let flying = surging(&h);
        let left = 10 - h.sup.rollout.as_ref().unwrap().replaced;
        assert_eq!(flying.len(), left.min(4), "as many as allowed are starting: {flying:?}");
        assert_eq!(ready_count(&h), 10, "capacity never drops below the configured count");
        // The replacements get ready out of order: the newest first, then the oldest.
        let slot = if steps % 2 == 1 { *flying.last().unwrap() } else { flying[0] };
        let old_key = h.key_of(slot);
        let r = h.feed(Event::Ready { key: next_key(&h, slot) });
        assert_eq!(signals(&r, Signal::TERM), BTreeSet::from([old_key]), "only its own old worker drains");
        assert!(
            reports(&r).iter().any(
                |x| matches!(x, Report::Replaced { slot: s, old_pid: Some(p), .. } if *s == slot && *p == old[slot])
            ),
            "{r:?}"
        );
        assert!(surging(&h).len() <= 4);
        assert_eq!(ready_count(&h), 10);
        order.extend(spawns(&r));
        outcome.extend(finished(&r));
    }
    assert_eq!(order, (0..10).collect::<Vec<_>>(), "every slot once, in slot order");
    assert_eq!(outcome, vec![(RestartOutcome::Completed { replaced: 10 }, vec![3])]);
    let now = pids(&h);
    assert!(old.iter().all(|p| !now.contains(p)), "every worker replaced: {old:?} {now:?}");
    assert!(h.sup.slots.iter().all(|s| s.program == Program::Deployed(1)));
    assert_eq!(h.sup.cluster_stats().total_restarts, 10);
    assert_eq!(h.sup.retiring.len(), 10, "the old workers drain outside their slots");
}

#[test]
fn a_surge_larger_than_the_slots_replaces_them_all_at_once() {
    let mut h = started(3, 16);
    let r = h.feed(Event::Restart { ticket: None });
    assert_eq!(spawns(&r), vec![0, 1, 2]);
    assert!(reports(&r).contains(&&Report::RestartStarted { workers: 3, at_once: 3 }));
    for slot in [2, 0, 1] {
        let r = h.feed(Event::Ready { key: next_key(&h, slot) });
        assert!(spawns(&r).is_empty());
        assert_eq!(ready_count(&h), 3);
    }
    assert_eq!(h.sup.last_restart, Some(RestartOutcome::Completed { replaced: 3 }));
}

#[test]
fn a_failure_in_the_middle_stops_the_replacements_in_flight_and_the_rollout() {
    let mut h = started(10, 4);
    let old = pids(&h);
    h.feed(Event::Restart { ticket: Some(1) });
    h.feed(Event::Restart { ticket: Some(2) });
    for slot in [0, 1] {
        h.feed(Event::Ready { key: next_key(&h, slot) });
    }
    assert_eq!(surging(&h), vec![2, 3, 4, 5]);
    let others: BTreeSet<WorkerKey> = [2, 4, 5].into_iter().map(|s| next_key(&h, s)).collect();
    let failed = next_key(&h, 3);
    let r = h.feed(Event::Exited { key: failed, status: ExitStatus::Code(1) });
    let outcomes = finished(&r);
    let (outcome, tickets) = &outcomes[0];
    assert_eq!(tickets, &vec![1]);
    assert!(
        matches!(outcome, RestartOutcome::Failed { worker_id: 3, replaced: 2, reason }
            if reason.contains("exit code 1") && reason.contains("workers 2, 4, 5 were stopped")),
        "{outcome:?}"
    );
    assert_eq!(signals(&r, Signal::TERM), others, "the other replacements still starting are stopped");
    // The queued restart starts at once: a fresh rollout from slot 0.
    assert_eq!(outcomes.len(), 1);
    assert_eq!(spawns(&r), vec![0, 1, 2, 3], "{r:?}");
    assert_eq!(h.sup.rollout.as_ref().unwrap().program, Program::Deployed(2));
    // Slots 2.. kept their old workers (what they ran before), 0 and 1 their new ones.
    let now = pids(&h);
    assert_eq!(now[2..], old[2..]);
    assert!(now[..2].iter().all(|p| !old.contains(p)));
    assert_eq!(h.sup.slots[0].program, Program::Deployed(1));
    assert_eq!(h.sup.slots[2].program, Program::Running);
    assert_eq!(ready_count(&h), 10);
    assert!(h.sup.slots.iter().all(|s| s.crash_count == 0), "a broken deploy is no crash of a slot");
    // The stopped replacements' exits are no crash and start nothing.
    for key in others {
        let r = h.feed(Event::Exited { key, status: ExitStatus::Signal(Signal::TERM) });
        assert!(matches!(reports(&r)[..], [Report::Exited { crash: false, respawn_in: None, .. }]), "{r:?}");
        assert!(spawns(&r).is_empty());
    }
    assert_eq!(h.sup.cluster_stats().exits.restart, 3, "the three stopped replacements");
}

#[test]
fn replacements_all_late_at_once_fail_the_rollout_once() {
    let mut h = started(6, 4);
    h.at(1000);
    h.feed(Event::Restart { ticket: Some(5) });
    let keys: Vec<WorkerKey> = (0..4).map(|s| next_key(&h, s)).collect();
    let r = h.at(3000);
    let outcomes = finished(&r);
    assert_eq!(outcomes.len(), 1, "{r:?}");
    assert!(
        matches!(&outcomes[0].0, RestartOutcome::Failed { worker_id: 0, replaced: 0, reason } if reason.contains("not ready within")),
        "{outcomes:?}"
    );
    assert_eq!(signals(&r, Signal::KILL), BTreeSet::from([keys[0]]), "the one that failed is killed");
    assert_eq!(signals(&r, Signal::TERM), keys[1..].iter().copied().collect(), "the others are stopped");
    assert!(spawns(&r).is_empty());
    assert!(surging(&h).is_empty());
    assert_eq!(ready_count(&h), 6);
}

#[test]
fn a_spawn_failure_in_the_middle_fails_the_rollout() {
    let mut h = started(5, 2);
    let cmds = h.sup.handle(Event::Restart { ticket: None }, h.now, std::time::SystemTime::UNIX_EPOCH);
    let keys: Vec<WorkerKey> =
        cmds.iter().filter_map(|c| if let Command::Spawn { key, .. } = c { Some(*key) } else { None }).collect();
    assert_eq!(keys.len(), 2);
    h.feed(Event::Spawned { key: keys[0], pid: 9000 });
    let r = h.feed(Event::SpawnFailed { key: keys[1], error: "No such file or directory".into() });
    assert!(matches!(&finished(&r)[..], [(RestartOutcome::Failed { worker_id: 1, replaced: 0, .. }, _)]), "{r:?}");
    assert_eq!(signals(&r, Signal::TERM), BTreeSet::from([keys[0]]));
    assert_eq!(ready_count(&h), 5);
}

#[test]
fn a_slot_whose_old_worker_died_during_a_stopped_replacement_respawns() {
    let mut h = started(4, 2);
    h.feed(Event::Restart { ticket: None });
    // Slot 1's old worker crashes while its replacement starts: the replacement is to take over.
    let r = h.exit(1, ExitStatus::Code(1));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: true, respawn_in: None, .. }]));
    // Slot 0's replacement fails: slot 1's is stopped, and slot 1 respawns as after any crash.
    let r = h.feed(Event::Exited { key: next_key(&h, 0), status: ExitStatus::Code(1) });
    assert!(matches!(&finished(&r)[..], [(RestartOutcome::Failed { worker_id: 0, .. }, _)]));
    assert_eq!(h.status(1), crate::stats::WorkerStatus::Respawning);
    h.now += 100 * MS;
    assert_eq!(spawns(&h.feed(Event::Tick)), vec![1], "the respawn after the respawn delay");
}

#[test]
fn a_shutdown_in_the_middle_stops_old_new_and_draining_and_cancels() {
    let mut h = started(10, 4);
    h.feed(Event::Restart { ticket: Some(1) });
    for slot in 0..3 {
        h.feed(Event::Ready { key: next_key(&h, slot) });
    }
    assert_eq!(surging(&h), vec![3, 4, 5, 6]);
    h.feed(Event::Restart { ticket: Some(2) });
    let r = h.feed(Event::Shutdown);
    let outcomes = finished(&r);
    assert_eq!(outcomes.len(), 2);
    assert!(matches!(&outcomes[0], (RestartOutcome::Cancelled { replaced: 3, .. }, t) if t == &vec![1]));
    assert!(matches!(&outcomes[1], (RestartOutcome::Cancelled { replaced: 0, .. }, t) if t == &vec![2]));
    assert!(spawns(&r).is_empty());
    // 10 slots' workers, 4 starting replacements, 3 draining old workers: all asked to stop.
    let keys: Vec<WorkerKey> = h.sup.procs().map(|(_, p)| p.key).collect();
    assert_eq!(keys.len(), 17);
    assert!(h.sup.procs().all(|(_, p)| p.state == ProcState::Stopping));
    let mut last = Vec::new();
    for key in keys {
        last = h.feed(Event::Exited { key, status: ExitStatus::Code(0) });
        assert!(spawns(&last).is_empty());
    }
    assert_eq!(last.last(), Some(&Command::Exit(Outcome::Stopped)));
}

#[test]
fn scaling_down_in_the_middle_drops_the_removed_slots_and_finishes() {
    let mut h = started(10, 4);
    h.feed(Event::Restart { ticket: Some(1) });
    for slot in 0..2 {
        h.feed(Event::Ready { key: next_key(&h, slot) });
    }
    assert_eq!(surging(&h), vec![2, 3, 4, 5]);
    let removed: BTreeSet<WorkerKey> = [4, 5].into_iter().map(|s| next_key(&h, s)).collect();
    let r = h.feed(Event::Scale { workers: 4 });
    assert!(spawns(&r).is_empty(), "nothing left to start");
    assert!(finished(&r).is_empty(), "slots 2 and 3 are still starting");
    assert!(removed.is_subset(&signals(&r, Signal::TERM)), "the removed slots' replacements stop: {r:?}");
    assert_eq!(h.sup.rollout.as_ref().unwrap().in_flight, vec![2, 3]);
    h.feed(Event::Ready { key: next_key(&h, 3) });
    let r = h.feed(Event::Ready { key: next_key(&h, 2) });
    assert_eq!(finished(&r), vec![(RestartOutcome::Completed { replaced: 4 }, vec![1])]);
    assert!(h.sup.slots.iter().all(|s| s.program == Program::Deployed(1)));
    assert_eq!(ready_count(&h), 4);
}

#[test]
fn scaling_up_in_the_middle_replaces_the_new_slots_too() {
    let mut h = started(4, 4);
    h.feed(Event::Restart { ticket: None });
    h.feed(Event::Scale { workers: 6 });
    assert_eq!(h.sup.rollout.as_ref().unwrap().queue, [4, 5]);
    let r = h.feed(Event::Ready { key: next_key(&h, 1) });
    assert_eq!(spawns(&r), vec![4], "a new slot's turn comes once a replacement is done");
    assert!(h.sup.slots[5].next_spawn.is_some(), "slot 5's first start is still ahead");
    let r = h.feed(Event::Ready { key: next_key(&h, 0) });
    assert_eq!(spawns(&r), vec![5]);
    assert!(h.sup.slots[5].next_spawn.is_none(), "the rollout's worker takes the slot's first start over");
    for slot in [2, 3, 4] {
        h.feed(Event::Ready { key: next_key(&h, slot) });
    }
    let r = h.feed(Event::Ready { key: next_key(&h, 5) });
    assert_eq!(finished(&r), vec![(RestartOutcome::Completed { replaced: 6 }, vec![])]);
    assert!(h.sup.slots.iter().all(|s| s.program == Program::Deployed(1)));
}

#[test]
fn restarts_asked_during_a_surge_rollout_coalesce_into_one_more() {
    let mut h = started(10, 4);
    h.feed(Event::Restart { ticket: Some(1) });
    for t in 2..5 {
        assert!(reports(&h.feed(Event::Restart { ticket: Some(t) })).contains(&&Report::RestartQueued));
    }
    let mut done = Vec::new();
    for _ in 0..40 {
        let Some(&slot) = surging(&h).first() else { break };
        let r = h.feed(Event::Ready { key: next_key(&h, slot) });
        done.extend(finished(&r));
        assert!(surging(&h).len() <= 4);
    }
    assert_eq!(
        done,
        vec![
            (RestartOutcome::Completed { replaced: 10 }, vec![1]),
            (RestartOutcome::Completed { replaced: 10 }, vec![2, 3, 4])
        ]
    );
    assert_eq!(h.sup.cluster_stats().total_restarts, 20);
}

#[test]
fn no_recycle_runs_beside_a_surge_rollout() {
    let l = Liveness { max_requests: Some(10), max_recycling: 2, ..Liveness::default() };
    let mut h = Harness::new(Policy { max_surge: 3, liveness: l, ..policy(6) });
    h.start_all();
    h.at(1000);
    let key = h.key_of(4);
    h.feed(Event::Beat { key, served: 10, in_flight: 0 });
    let recycle = next_key(&h, 4);
    let r = h.feed(Event::Restart { ticket: None });
    assert!(signals(&r, Signal::TERM).contains(&recycle), "the recycle's replacement gives way");
    assert_eq!(spawns(&r), vec![0, 1, 2]);
    for slot in 0..6 {
        let key = h.key_of(slot);
        h.feed(Event::Beat { key, served: 50, in_flight: 0 });
    }
    assert_eq!(surging(&h), vec![0, 1, 2], "no recycle starts during the rollout");
}

#[test]
fn a_hung_old_worker_during_a_surge_rollout_is_replaced_by_the_rollout() {
    let l = Liveness { worker_timeout: Some(500 * MS), hung_grace: 100 * MS, ..Liveness::default() };
    let mut h = Harness::new(Policy { max_surge: 2, liveness: l, ..policy(4) });
    h.start_all();
    h.at(1000);
    for slot in 0..4 {
        let key = h.key_of(slot);
        h.feed(Event::Beat { key, served: 1, in_flight: 0 });
    }
    h.feed(Event::Restart { ticket: None });
    // Slots 1 (replacement starting) and 3 (queued) stop beating; the others beat on.
    h.at(1400);
    for slot in [0, 2] {
        let key = h.key_of(slot);
        h.feed(Event::Beat { key, served: 2, in_flight: 0 });
    }
    let (hung1, hung3) = (h.key_of(1), h.key_of(3));
    let r = h.at(1500);
    assert_eq!(reports(&r).iter().filter(|x| matches!(x, Report::Hung { .. })).count(), 2, "{r:?}");
    h.at(1600);
    let r = h.feed(Event::Exited { key: hung1, status: ExitStatus::Signal(Signal::ABRT) });
    assert!(matches!(reports(&r)[..], [Report::Exited { respawn_in: None, .. }]), "its replacement takes over");
    let r = h.feed(Event::Exited { key: hung3, status: ExitStatus::Signal(Signal::KILL) });
    assert!(matches!(reports(&r)[..], [Report::Exited { respawn_in: Some(_), .. }]), "queued: it respawns");
    for slot in [1, 0] {
        h.feed(Event::Ready { key: next_key(&h, slot) });
    }
    assert!(h.sup.slots[3].next_spawn.is_none(), "the rollout's replacement took slot 3's respawn over");
    for slot in [2, 3] {
        h.feed(Event::Ready { key: next_key(&h, slot) });
    }
    assert_eq!(h.sup.last_restart, Some(RestartOutcome::Completed { replaced: 4 }));
    assert_eq!(ready_count(&h), 4);
}

#[test]
fn an_upgrade_asked_during_a_surge_rollout_is_refused() {
    let mut h = started(6, 3);
    h.feed(Event::Restart { ticket: None });
    let r = h.feed(Event::Upgrade { ticket: Some(4), slot_by_slot: None });
    assert!(!r.iter().any(|c| matches!(c, Command::SpawnMaster { .. })));
    assert!(
        reports(&r)
            .iter()
            .any(|x| matches!(x, Report::UpgradeFinished { outcome: UpgradeOutcome::Refused { reason }, .. }
            if reason.contains("rolling restart"))),
        "{r:?}"
    );
    assert_eq!(surging(&h), vec![0, 1, 2], "the rollout goes on");
}

#[test]
fn sockets_of_slots_a_surge_rollout_will_reach_stay_open() {
    let mut h = Harness::new(Policy { max_surge: 2, respawn: false, ..policy(4) });
    h.start_all();
    h.feed(Event::Restart { ticket: None });
    // Slot 3's worker exits with respawn off: the rollout will start one there, so its socket
    // stays; once that replacement is stopped by a failure, nobody will serve it.
    let r = h.exit(3, ExitStatus::Code(0));
    assert!(!r.contains(&Command::CloseSocket { slot: 3 }), "{r:?}");
    let r = h.feed(Event::Exited { key: next_key(&h, 0), status: ExitStatus::Code(1) });
    assert!(r.contains(&Command::CloseSocket { slot: 3 }), "{r:?}");
    assert!(!r.contains(&Command::CloseSocket { slot: 1 }), "slot 1's old worker still serves");
}
