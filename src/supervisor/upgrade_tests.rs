//! Unit tests of upgrades of the master in place: the old master's side (start, hand-over,
//! rollback, refusals) and the new master's (take-over).

use std::time::Duration;

use super::tests::{Harness, MS, policy, reports, spawns};
use super::*;
use crate::stats::{ExitStatus, UpgradeOutcome};

fn finished(cmds: &[Command]) -> Vec<(UpgradeOutcome, Vec<u64>)> {
    reports(cmds)
        .into_iter()
        .filter_map(|r| match r {
            Report::UpgradeFinished { outcome, tickets } => Some((outcome.clone(), tickets.clone())),
            _ => None,
        })
        .collect()
}

fn signals(cmds: &[Command]) -> usize {
    cmds.iter().filter(|c| matches!(c, Command::Signal { .. })).count()
}

fn refused(h: &mut Harness, ticket: u64) -> String {
    let out = h.feed(Event::Upgrade { ticket: Some(ticket), slot_by_slot: None });
    assert!(!out.contains(&Command::SpawnMaster { slot_by_slot: false }), "{out:?}");
    match &finished(&out)[..] {
        [(UpgradeOutcome::Refused { reason }, tickets)] if tickets == &[ticket] => reason.clone(),
        other => panic!("expected a refusal: {other:?}"),
    }
}

/// A new master's supervisor that inherited a first generation (no restarts, no exits), with a
/// slot-by-slot hand-over of that many slots or none.
fn fresh_inheritance(h: &Harness, slot_by_slot: Option<usize>) -> Supervisor {
    h.sup.clone().inherit(Inheritance {
        generation: 0,
        total_restarts: 0,
        exits: Default::default(),
        shutdown_timeout: 1000 * MS,
        slot_by_slot,
    })
}

#[test]
fn a_ready_new_master_takes_over_and_the_old_one_drains_and_exits() {
    let mut h = Harness::new(policy(2));
    h.start_all();
    let out = h.feed(Event::Upgrade { ticket: Some(7), slot_by_slot: None });
    assert!(out.contains(&Command::SpawnMaster { slot_by_slot: false }));
    assert!(reports(&out).contains(&&Report::UpgradeStarted { tickets: vec![7] }));
    assert!(h.sup.cluster_stats().upgrade_requested);
    let out = h.feed(Event::MasterSpawned { pid: 5000 });
    assert!(reports(&out).contains(&&Report::MasterStarted { pid: 5000, slot_by_slot: false }));
    // Nothing changes for the old workers while the new master starts.
    h.now += 1000 * MS;
    // Phase one: it is offered the cluster; this master stops nothing and tells systemd nothing.
    let out = h.feed(Event::MasterReady);
    assert!(out.contains(&Command::HandOver { pid: 5000 }), "{out:?}");
    assert!(reports(&out).contains(&&Report::OfferingHandOver { pid: 5000 }));
    assert_eq!(signals(&out), 0, "the old workers serve on: {out:?}");
    assert!(!out.iter().any(|c| matches!(c, Command::CloseListeners | Command::Notify(_))), "{out:?}");
    assert!(finished(&out).is_empty(), "not over before it took over");
    assert!(refused(&mut h, 8).contains("handing over to the new master pid 5000"));
    // Phase two: it took over.
    let out = h.feed(Event::MasterTookOver { slots: None });
    let main = out.iter().position(|c| *c == Command::Notify(Notify::MainPid { pid: 5000 })).expect("MAINPID=");
    let confirm = out.iter().position(|c| *c == Command::ConfirmHandOver).expect("confirmed");
    assert!(main < confirm, "systemd hears the new main pid before the new master hears it may notify: {out:?}");
    assert_eq!(finished(&out), vec![(UpgradeOutcome::Completed { new_pid: 5000 }, vec![7])]);
    assert_eq!(signals(&out), 2, "both old workers drain: {out:?}");
    assert!(out.contains(&Command::CloseListeners), "this master's copies only: the new one keeps the sockets");
    assert!(!out.iter().any(|c| matches!(c, Command::Notify(Notify::Stopping { .. }))), "{out:?}");
    assert!(!h.sup.cluster_stats().upgrade_requested);
    assert_eq!(h.sup.cluster_stats().last_upgrade, Some(UpgradeOutcome::Completed { new_pid: 5000 }));
    // The old master's workers end; nothing respawns; the master exits as upgraded.
    let out = h.exit(0, ExitStatus::Code(0));
    assert!(spawns(&out).is_empty() && !out.iter().any(|c| matches!(c, Command::Exit(_))));
    let out = h.exit(1, ExitStatus::Code(0));
    assert_eq!(out.last(), Some(&Command::Exit(Outcome::Upgraded)), "{out:?}");
}

#[test]
fn a_new_master_that_exits_is_a_failed_upgrade_and_nothing_changes() {
    let mut h = Harness::new(policy(2));
    h.start_all();
    h.feed(Event::Upgrade { ticket: Some(1), slot_by_slot: None });
    h.feed(Event::MasterSpawned { pid: 5000 });
    let out = h.feed(Event::MasterExited {
        status: ExitStatus::Code(1),
        reason: Some("listener default: address in use".into()),
    });
    match &finished(&out)[..] {
        [(UpgradeOutcome::Failed { reason }, t)] if t == &[1] => {
            assert!(reason.contains("exited before it was ready"), "{reason}");
            assert!(reason.contains("address in use"), "what it said is kept: {reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(signals(&out), 0);
    assert_eq!(h.sup.cluster_stats().active_workers, 2);
    // A new upgrade can run.
    assert!(
        h.feed(Event::Upgrade { ticket: None, slot_by_slot: None })
            .contains(&Command::SpawnMaster { slot_by_slot: false })
    );
}

#[test]
fn a_new_master_that_cannot_be_started_fails_the_upgrade() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    h.feed(Event::Upgrade { ticket: Some(3), slot_by_slot: None });
    let out = h.feed(Event::MasterSpawnFailed { error: "ENOENT".into(), busy: false });
    assert!(matches!(&finished(&out)[..], [(UpgradeOutcome::Failed { reason }, _)] if reason.contains("ENOENT")));
    assert!(
        h.feed(Event::Upgrade { ticket: None, slot_by_slot: None })
            .contains(&Command::SpawnMaster { slot_by_slot: false })
    );
}

#[test]
fn a_new_master_not_ready_in_time_is_killed_and_no_second_one_starts_before_it_exited() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    let start = h.now;
    h.feed(Event::Upgrade { ticket: Some(1), slot_by_slot: None });
    h.feed(Event::MasterSpawned { pid: 5000 });
    assert_eq!(h.sup.next_deadline(), Some(start + 5000 * MS), "the upgrade's deadline");
    h.now = start + 4999 * MS;
    assert!(!h.feed(Event::Tick).contains(&Command::KillMaster));
    h.now = start + 5000 * MS;
    let out = h.feed(Event::Tick);
    assert!(out.contains(&Command::StopMaster), "asked to stop first (it stops its workers): {out:?}");
    assert!(!out.contains(&Command::KillMaster));
    assert!(matches!(&finished(&out)[..], [(UpgradeOutcome::Failed { reason }, t)]
        if reason.contains("not ready within") && t == &[1]));
    // Its late readiness changes nothing; a second upgrade waits for its exit.
    assert!(!h.feed(Event::MasterReady).iter().any(|c| matches!(c, Command::HandOver { .. })));
    assert!(refused(&mut h, 2).contains("still being stopped"));
    // Killed once it had this master's shutdown timeout and a margin to stop.
    assert_eq!(h.sup.next_deadline(), Some(start + 7000 * MS));
    h.now = start + 6999 * MS;
    assert!(!h.feed(Event::Tick).contains(&Command::KillMaster));
    h.now = start + 7000 * MS;
    assert!(h.feed(Event::Tick).contains(&Command::KillMaster));
    assert!(!h.at(20_000).contains(&Command::KillMaster), "once");
    let out = h.feed(Event::MasterExited { status: ExitStatus::Signal(crate::signal::Signal::KILL), reason: None });
    assert!(finished(&out).is_empty(), "answered once: {out:?}");
    assert!(
        h.feed(Event::Upgrade { ticket: None, slot_by_slot: None })
            .contains(&Command::SpawnMaster { slot_by_slot: false })
    );
}

#[test]
fn a_cool_off_probe_waits_for_the_end_of_an_upgrade() {
    let mut h = Harness::new(Policy {
        max_crashes: 1,
        liveness: Liveness { cooloff: Some(1000 * MS), ..Liveness::default() },
        ..policy(2)
    });
    h.start_all();
    h.exit(1, ExitStatus::Code(1));
    assert_eq!(h.status(1), crate::stats::WorkerStatus::Disabled);
    let t = h.now;
    h.feed(Event::Upgrade { ticket: None, slot_by_slot: None });
    h.feed(Event::MasterSpawned { pid: 5000 });
    h.now = t + 1500 * MS;
    assert!(spawns(&h.feed(Event::Tick)).is_empty(), "no probe during the upgrade");
    assert!(h.sup.next_deadline().is_none_or(|d| d > h.now));
    let out = h.feed(Event::MasterExited { status: ExitStatus::Code(1), reason: None });
    assert_eq!(spawns(&out), vec![1], "the probe once the upgrade failed: {out:?}");
}

#[test]
fn upgrades_are_refused_while_something_else_runs() {
    let mut h = Harness::new(policy(2));
    h.start_all();
    h.feed(Event::Upgrade { ticket: Some(1), slot_by_slot: None });
    h.feed(Event::MasterSpawned { pid: 5000 });
    assert!(refused(&mut h, 2).contains("already running (new master pid 5000)"));
    // Restarts and scaling wait for the upgrade too.
    let out = h.feed(Event::Restart { ticket: Some(9) });
    assert!(spawns(&out).is_empty());
    assert!(reports(&out).iter().any(|r| matches!(r, Report::RestartFinished { tickets, .. } if tickets == &[9])));
    let out = h.feed(Event::Scale { workers: 3 });
    assert!(spawns(&out).is_empty() && reports(&out).contains(&&Report::NotDuringUpgrade { what: "scaling" }));
    assert_eq!(h.sup.slots.len(), 2);
    // During a rolling restart.
    let mut h = Harness::new(policy(2));
    h.start_all();
    h.feed(Event::Restart { ticket: None });
    assert!(refused(&mut h, 1).contains("rolling restart is running"));
    // As PID 1.
    let mut h = Harness::new(Policy { pid1: true, ..policy(2) });
    h.start_all();
    let reason = refused(&mut h, 1);
    assert!(
        reason.contains("PID 1") && reason.contains("container ends") && reason.contains("roll the pods"),
        "{reason}"
    );
    // Shutting down (also during the shutdown delay).
    let mut h = Harness::new(Policy { shutdown_delay: 1000 * MS, ..policy(1) });
    h.start_all();
    h.feed(Event::Shutdown);
    assert!(refused(&mut h, 1).contains("shutting down"));
}

#[test]
fn a_shutdown_during_an_upgrade_kills_the_new_master_and_waits_for_its_exit() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    h.feed(Event::Upgrade { ticket: Some(4), slot_by_slot: None });
    h.feed(Event::MasterSpawned { pid: 5000 });
    let out = h.feed(Event::Shutdown);
    assert!(out.contains(&Command::StopMaster));
    assert!(matches!(&finished(&out)[..], [(UpgradeOutcome::Cancelled { .. }, t)] if t == &[4]));
    assert!(out.iter().any(|c| matches!(c, Command::Notify(Notify::Stopping { .. }))));
    let out = h.exit(0, ExitStatus::Code(0));
    assert!(!out.iter().any(|c| matches!(c, Command::Exit(_))), "the killed new master is not reaped yet");
    let out = h.feed(Event::MasterExited { status: ExitStatus::Signal(crate::signal::Signal::KILL), reason: None });
    assert_eq!(out.last(), Some(&Command::Exit(Outcome::Stopped)));
}

fn inherited(workers: usize) -> Harness {
    let mut h = Harness::new(policy(workers));
    let exits = crate::stats::ExitCounts { crash: 2, ..Default::default() };
    h.sup = h.sup.clone().inherit(Inheritance {
        generation: 3,
        total_restarts: 11,
        exits,
        shutdown_timeout: 1000 * MS,
        slot_by_slot: None,
    });
    h
}

#[test]
fn a_new_master_steers_and_notifies_nothing_until_its_predecessor_hands_over() {
    let mut h = inherited(2);
    let before: Vec<Command> = {
        h.start_all();
        h.log.clone()
    };
    assert!(!before.iter().any(|c| matches!(c, Command::Route { .. } | Command::Notify(_))), "{before:?}");
    assert!(before.contains(&Command::SayReady { workers: 2 }), "{before:?}");
    assert!(reports(&before).contains(&&Report::AllReady { workers: 2 }), "the ready line is printed");
    assert_eq!(h.sup.watchdog(h.now), Watchdog::Quiet, "the predecessor feeds the watchdog");
    let stats = h.sup.cluster_stats();
    assert_eq!((stats.generation, stats.total_restarts, stats.exits.crash), (4, 11, 2), "the counters survive");
    assert!(refused(&mut h, 1).contains("taking over"));
    let out = h.feed(Event::HandedOver);
    let take = out.iter().position(|c| *c == Command::TakeOver).expect("takes over");
    let route = out.iter().position(|c| *c == Command::Route { slots: vec![0, 1] }).expect("routes");
    let said = out.iter().position(|c| *c == Command::SayTookOver).expect("says so");
    assert!(take < said && route < said, "it says it took over once its route and control socket are: {out:?}");
    assert!(
        !out.iter().any(|c| matches!(c, Command::Notify(_))),
        "systemd's main pid is still the old master: {out:?}"
    );
    assert_eq!(h.sup.watchdog(h.now), Watchdog::Quiet);
    assert!(refused(&mut h, 3).contains("taking over"));
    // The predecessor told systemd the new main pid: now this master talks to systemd.
    let out = h.feed(Event::PredecessorDraining);
    assert!(out.contains(&Command::Notify(Notify::Ready { workers: 2 })), "{out:?}");
    assert_eq!(h.sup.watchdog(h.now), Watchdog::Feed);
    // No upgrade of this one while the old master drains.
    assert!(refused(&mut h, 2).contains("still draining"));
    // The old master's goodbye: the sockets nobody uses are closed at once.
    let out = h.feed(Event::PredecessorGone { clean: true });
    assert!(out.contains(&Command::ReleaseInherited), "{out:?}");
    assert!(
        h.feed(Event::Upgrade { ticket: None, slot_by_slot: None })
            .contains(&Command::SpawnMaster { slot_by_slot: false })
    );
}

#[test]
fn a_new_master_whose_predecessor_dies_takes_over_at_once() {
    let mut h = inherited(2);
    h.at(0);
    let gone = h.now;
    let out = h.feed(Event::PredecessorGone { clean: false });
    assert!(out.contains(&Command::TakeOver));
    assert!(reports(&out).contains(&&Report::TookOver { handed_over: false }));
    assert!(!out.contains(&Command::ReleaseInherited), "its orphaned workers may still drain");
    assert!(out.iter().any(|c| matches!(c, Command::Route { .. })), "routes to the started slot: {out:?}");
    // Ready later: systemd hears READY=1 as usual, and nobody is told over the channel.
    h.at(100);
    let out: Vec<Command> = [h.ready(0), h.ready(1)].concat();
    assert!(out.contains(&Command::Notify(Notify::Ready { workers: 2 })), "{out:?}");
    assert!(!out.iter().any(|c| matches!(c, Command::SayReady { .. })));
    // The predecessor's shutdown timeout and a margin later, the unused sockets are closed.
    h.now = gone + 1999 * MS;
    assert!(!h.feed(Event::Tick).contains(&Command::ReleaseInherited));
    h.now = gone + 2000 * MS;
    assert!(h.feed(Event::Tick).contains(&Command::ReleaseInherited));
    assert!(!h.at(10_000).contains(&Command::ReleaseInherited), "once");
    // A later hand-over message changes nothing.
    assert!(!h.feed(Event::HandedOver).contains(&Command::TakeOver));
    let _ = Duration::ZERO;
}

#[test]
fn slot_by_slot_the_old_master_frees_a_slot_each_time_a_new_worker_is_ready() {
    let mut h = Harness::new(policy(3));
    h.start_all();
    let out = h.feed(Event::Upgrade { ticket: Some(1), slot_by_slot: Some(true) });
    assert!(out.contains(&Command::SpawnMaster { slot_by_slot: true }));
    h.feed(Event::MasterSpawned { pid: 5000 });
    let old0 = h.key_of(0);
    let out = h.feed(Event::MasterSlotReady { slot: 0 });
    assert!(out.contains(&Command::Signal { key: old0, signal: crate::signal::Signal::TERM }), "{out:?}");
    assert!(reports(&out).contains(&&Report::SlotHandedOver { slot: 0 }));
    assert!(!out.iter().any(|c| matches!(c, Command::Route { .. })), "slot 0 stays in the route: {out:?}");
    assert!(!out.contains(&Command::FreeSlot { slot: 0 }), "not before its worker is gone");
    let out = h.feed(Event::Exited { key: old0, status: ExitStatus::Code(0) });
    assert!(out.contains(&Command::FreeSlot { slot: 0 }), "{out:?}");
    assert!(spawns(&out).is_empty() && !out.iter().any(|c| matches!(c, Command::CloseSocket { .. })), "{out:?}");
    assert!(h.sup.next_deadline().is_some(), "the upgrade's deadline");
    // Each step gives the new master the timeout again.
    h.now += 4000 * MS;
    let old1 = h.key_of(1);
    h.feed(Event::MasterSlotReady { slot: 1 });
    h.now += 4000 * MS;
    assert!(!h.feed(Event::Tick).contains(&Command::KillMaster), "re-armed at the step");
    h.feed(Event::Exited { key: old1, status: ExitStatus::Code(0) });
    h.feed(Event::MasterReady);
    let out = h.feed(Event::MasterTookOver { slots: None });
    assert_eq!(finished(&out), vec![(UpgradeOutcome::Completed { new_pid: 5000 }, vec![1])]);
    assert_eq!(signals(&out), 1, "the last old worker drains: {out:?}");
}

#[test]
fn a_failed_slot_by_slot_upgrade_gives_the_handed_slots_workers_again() {
    let mut h = Harness::new(Policy { respawn: false, ..policy(2) });
    h.start_all();
    h.feed(Event::Upgrade { ticket: None, slot_by_slot: Some(true) });
    h.feed(Event::MasterSpawned { pid: 5000 });
    let old0 = h.key_of(0);
    h.feed(Event::MasterSlotReady { slot: 0 });
    h.feed(Event::Exited { key: old0, status: ExitStatus::Code(0) });
    let out = h.feed(Event::MasterExited { status: ExitStatus::Signal(crate::signal::Signal::KILL), reason: None });
    assert_eq!(spawns(&out), vec![0], "slot 0 gets a worker of this master at once, respawn or not: {out:?}");
    h.ready(0);
    assert_eq!(h.sup.cluster_stats().active_workers, 2);
}

#[test]
fn slot_by_slot_a_new_master_starts_each_slot_once_the_previous_one_is_freed() {
    let mut h = Harness::new(policy(3));
    h.sup = fresh_inheritance(&h, Some(2));
    assert_eq!(spawns(&h.at(0)), vec![0]);
    assert!(spawns(&h.at(500)).is_empty(), "slot 1 waits for its turn, whatever the start-up delay");
    let out = h.ready(0);
    assert!(out.contains(&Command::SaySlotReady { slot: 0 }), "{out:?}");
    assert!(!reports(&out).iter().any(|r| matches!(r, Report::AllReady { .. })), "slots 1 and 2 are still to start");
    assert_eq!(spawns(&h.feed(Event::SlotFreed { slot: 0 })), vec![1]);
    let out = h.ready(1);
    assert!(out.contains(&Command::SaySlotReady { slot: 1 }));
    assert!(spawns(&out).is_empty());
    assert_eq!(spawns(&h.feed(Event::SlotFreed { slot: 1 })), vec![2]);
    // Slot 2 is one the predecessor never had: ready, the start-up is over.
    let out = h.ready(2);
    assert!(out.contains(&Command::SaySlotReady { slot: 2 }));
    assert!(out.contains(&Command::SayReady { workers: 3 }), "{out:?}");
}

#[test]
fn slot_by_slot_a_new_master_whose_predecessor_dies_starts_every_slot_at_once() {
    let mut h = Harness::new(policy(3));
    h.sup = fresh_inheritance(&h, Some(3));
    h.at(0);
    let mut out = h.feed(Event::PredecessorGone { clean: false });
    out.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(spawns(&out), vec![1, 2], "{out:?}");
}

/// The old master at the offer: an upgrade of two workers, the new master (pid 5000) said ready.
fn offered() -> Harness {
    let mut h = Harness::new(policy(2));
    h.start_all();
    h.feed(Event::Upgrade { ticket: Some(1), slot_by_slot: None });
    h.feed(Event::MasterSpawned { pid: 5000 });
    assert!(h.feed(Event::MasterReady).contains(&Command::HandOver { pid: 5000 }));
    h
}

#[test]
fn a_new_master_that_dies_after_the_offer_gives_everything_back_and_nothing_was_stopped() {
    let mut h = offered();
    let out = h.feed(Event::MasterExited { status: ExitStatus::Signal(crate::signal::Signal::KILL), reason: None });
    assert!(out.contains(&Command::TakeBack), "{out:?}");
    assert!(out.contains(&Command::Route { slots: vec![0, 1] }), "its own route again: {out:?}");
    assert_eq!(signals(&out), 0);
    assert!(!out.iter().any(|c| matches!(c, Command::CloseListeners | Command::Notify(_))), "{out:?}");
    match &finished(&out)[..] {
        [(UpgradeOutcome::Failed { reason }, t)] if t == &[1] => {
            assert!(reason.contains("exited before it took over") && reason.contains("SIGKILL"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.sup.cluster_stats().active_workers, 2);
    assert_eq!(h.sup.watchdog(h.now), Watchdog::Feed);
    // A late word from it changes nothing; a new upgrade can run.
    assert!(!h.feed(Event::MasterTookOver { slots: None }).iter().any(|c| matches!(c, Command::Notify(_))));
    assert!(
        h.feed(Event::Upgrade { ticket: None, slot_by_slot: None })
            .contains(&Command::SpawnMaster { slot_by_slot: false })
    );
}

#[test]
fn a_new_master_that_does_not_take_over_in_time_is_stopped_and_everything_given_back() {
    let mut h = offered();
    let offer = h.now;
    h.now = offer + 4999 * MS;
    assert!(!h.feed(Event::Tick).contains(&Command::TakeBack));
    h.now = offer + 5000 * MS;
    let out = h.feed(Event::Tick);
    let back = out.iter().position(|c| *c == Command::TakeBack).expect("taken back");
    let stop = out.iter().position(|c| *c == Command::StopMaster).expect("stopped");
    assert!(back < stop, "{out:?}");
    assert!(
        matches!(&finished(&out)[..], [(UpgradeOutcome::Failed { reason }, _)] if reason.contains("did not say it took over"))
    );
    assert_eq!(signals(&out), 0);
    // Its word after the deadline hands over nothing.
    let out = h.feed(Event::MasterTookOver { slots: None });
    assert!(!out.iter().any(|c| matches!(c, Command::Notify(_) | Command::ConfirmHandOver)), "{out:?}");
}

#[test]
fn a_shutdown_during_the_offer_takes_everything_back_and_stops_the_new_master() {
    let mut h = offered();
    let out = h.feed(Event::Shutdown);
    assert!(out.contains(&Command::TakeBack) && out.contains(&Command::StopMaster), "{out:?}");
    assert!(matches!(&finished(&out)[..], [(UpgradeOutcome::Cancelled { .. }, _)]));
    assert_eq!(signals(&out), 2, "its own workers drain: {out:?}");
}

#[test]
fn a_new_master_that_cannot_serve_fails_the_upgrade_at_once_with_its_reason() {
    let mut h = Harness::new(policy(2));
    h.start_all();
    h.feed(Event::Upgrade { ticket: Some(1), slot_by_slot: None });
    h.feed(Event::MasterSpawned { pid: 5000 });
    let out = h.feed(Event::MasterCannotServe { reason: "only 1 of its 3 workers got ready".into() });
    assert!(out.contains(&Command::StopMaster), "{out:?}");
    assert!(matches!(&finished(&out)[..], [(UpgradeOutcome::Failed { reason }, t)]
        if reason.contains("cannot serve: only 1 of its 3") && t == &[1]));
    assert_eq!(signals(&out), 0);
}

#[test]
fn a_busy_program_file_is_tried_again_from_the_timer() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    h.feed(Event::Upgrade { ticket: Some(1), slot_by_slot: None });
    for _ in 1..10 {
        let out = h.feed(Event::MasterSpawnFailed { error: "Text file busy".into(), busy: true });
        assert!(finished(&out).is_empty() && !out.contains(&Command::SpawnMaster { slot_by_slot: false }));
        assert_eq!(h.sup.next_deadline(), Some(h.now + 10 * MS), "tried again in 10 ms, never at once");
        h.now += 9 * MS;
        assert!(!h.feed(Event::Tick).contains(&Command::SpawnMaster { slot_by_slot: false }));
        h.now += MS;
        assert!(h.feed(Event::Tick).contains(&Command::SpawnMaster { slot_by_slot: false }));
    }
    let out = h.feed(Event::MasterSpawnFailed { error: "Text file busy".into(), busy: true });
    assert!(
        matches!(&finished(&out)[..], [(UpgradeOutcome::Failed { reason }, _)]
        if reason.contains("Text file busy") && reason.contains("tried 10 times")),
        "{out:?}"
    );
    // Another failure is not tried again.
    h.feed(Event::Upgrade { ticket: None, slot_by_slot: None });
    assert!(matches!(
        &finished(&h.feed(Event::MasterSpawnFailed { error: "ENOENT".into(), busy: false }))[..],
        [(UpgradeOutcome::Failed { .. }, _)]
    ));
    // A shutdown while a retry waits ends the upgrade at once: nothing runs.
    h.feed(Event::Upgrade { ticket: None, slot_by_slot: None });
    h.feed(Event::MasterSpawnFailed { error: "Text file busy".into(), busy: true });
    let out = h.feed(Event::Shutdown);
    assert!(!out.contains(&Command::StopMaster), "{out:?}");
    assert!(matches!(&finished(&out)[..], [(UpgradeOutcome::Cancelled { .. }, _)]));
    h.exit(0, ExitStatus::Code(0));
    assert_eq!(h.log.last(), Some(&Command::Exit(Outcome::Stopped)));
}

/// A new master of three workers whose slot 2 is disabled at its first crash.
fn inherited_with_min_ready(min_ready: usize, cooloff: Option<Duration>) -> Harness {
    let mut h = Harness::new(Policy {
        min_ready,
        max_crashes: 1,
        liveness: Liveness { cooloff, ..Liveness::default() },
        ..policy(3)
    });
    h.sup = fresh_inheritance(&h, None);
    for ms in [0, 100, 200] {
        h.at(ms);
    }
    h.exit(2, ExitStatus::Code(1));
    assert_eq!(h.status(2), crate::stats::WorkerStatus::Disabled);
    h
}

#[test]
fn a_new_master_with_fewer_than_min_ready_ready_says_it_cannot_serve_at_once() {
    let mut h = inherited_with_min_ready(3, None);
    h.ready(0);
    let out = h.ready(1);
    assert!(reports(&out).contains(&&Report::AllReady { workers: 2 }), "{out:?}");
    assert!(!out.iter().any(|c| matches!(c, Command::SayReady { .. })), "{out:?}");
    let reason = out
        .iter()
        .find_map(|c| if let Command::SayCannotServe { reason } = c { Some(reason.clone()) } else { None })
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(reason.contains("only 2 of its 3 workers") && reason.contains("min_ready (3)"), "{reason}");
    assert!(!h.at(5000).iter().any(|c| matches!(c, Command::SayCannotServe { .. } | Command::SayReady { .. })), "once");
}

#[test]
fn a_new_master_below_min_ready_says_ready_once_a_probe_brings_the_missing_worker() {
    let mut h = inherited_with_min_ready(3, Some(1000 * MS));
    h.ready(0);
    let out = h.ready(1);
    assert!(!out.iter().any(|c| matches!(c, Command::SayReady { .. } | Command::SayCannotServe { .. })), "{out:?}");
    // The cool-off's probe starts slot 2 again; ready, the new master has min_ready workers.
    let out = h.at(2000);
    assert_eq!(spawns(&out), vec![2], "{out:?}");
    let out = h.ready(2);
    assert!(out.contains(&Command::SayReady { workers: 3 }), "{out:?}");
    assert!(!h.at(3000).iter().any(|c| matches!(c, Command::SayReady { .. })), "once");
}

#[test]
fn the_workers_of_slots_the_new_master_does_not_have_drain_once_the_route_settled() {
    let mut h = offered();
    let took = h.now;
    let (old0, old1) = (h.key_of(0), h.key_of(1));
    // The new master has 1 slot: its route left slot 1's socket out at the take-over.
    let out = h.feed(Event::MasterTookOver { slots: Some(1) });
    assert!(out.contains(&Command::Signal { key: old0, signal: crate::signal::Signal::TERM }), "{out:?}");
    assert!(!out.contains(&Command::Signal { key: old1, signal: crate::signal::Signal::TERM }), "{out:?}");
    assert!(reports(&out).contains(&&Report::HandingOver { pid: 5000, workers: 2 }));
    assert_eq!(h.sup.next_deadline(), Some(took + ROUTE_SETTLE), "{:?}", h.sup.next_deadline());
    h.now = took + ROUTE_SETTLE;
    let out = h.feed(Event::Tick);
    assert!(out.contains(&Command::Signal { key: old1, signal: crate::signal::Signal::TERM }), "{out:?}");
    h.feed(Event::Exited { key: old0, status: ExitStatus::Code(0) });
    let out = h.feed(Event::Exited { key: old1, status: ExitStatus::Code(0) });
    assert_eq!(out.last(), Some(&Command::Exit(Outcome::Upgraded)), "{out:?}");
    assert_eq!(h.sup.cluster_stats().exits.shutdown, 2, "counted as drained at a shutdown");
}
