//! Unit tests of the supervisor's policies with a fake clock.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn policy(workers: usize) -> Policy {
    Policy {
        workers,
        port: 3000,
        respawn: true,
        shutdown_timeout: 1000 * MS,
        startup_delay: 100 * MS,
        respawn_delay: 100 * MS,
        respawn_window: Duration::from_secs(5),
        max_crashes: 3,
        socket_per_slot: true,
    }
}

/// A supervisor with a fake clock and a fake driver that starts processes with pids from 1000.
struct Harness {
    sup: Supervisor,
    t0: Instant,
    now: Instant,
    next_pid: u32,
    /// Every command returned, in order.
    log: Vec<Command>,
}

impl Harness {
    fn new(policy: Policy) -> Harness {
        let t0 = Instant::now();
        Harness { sup: Supervisor::new(policy, t0), t0, now: t0, next_pid: 1000, log: Vec::new() }
    }

    /// Feeds an event; answers Spawn commands like a driver whose spawns succeed.
    fn feed(&mut self, event: Event) -> Vec<Command> {
        let mut all = Vec::new();
        let mut queue = VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            let cmds = self.sup.handle(ev, self.now, SystemTime::UNIX_EPOCH);
            for c in &cmds {
                if let Command::Spawn { key, .. } = c {
                    self.next_pid += 1;
                    queue.push_back(Event::Spawned { key: *key, pid: self.next_pid });
                }
            }
            all.extend(cmds);
        }
        self.log.extend(all.clone());
        all
    }

    fn at(&mut self, ms: u64) -> Vec<Command> {
        self.now = self.t0 + Duration::from_millis(ms);
        self.feed(Event::Tick)
    }

    fn key_of(&self, slot: usize) -> WorkerKey {
        self.sup.slots[slot].proc_.as_ref().expect("slot has a process").key
    }

    fn status(&self, slot: usize) -> WorkerStatus {
        self.sup.slots[slot].status()
    }

    fn exit(&mut self, slot: usize, status: ExitStatus) -> Vec<Command> {
        let key = self.key_of(slot);
        self.feed(Event::Exited { key, status })
    }

    fn ready(&mut self, slot: usize) -> Vec<Command> {
        let key = self.key_of(slot);
        self.feed(Event::Ready { key })
    }

    /// Starts every slot and makes it ready.
    fn start_all(&mut self) {
        let n = self.sup.slots.len() as u64;
        for i in 0..n {
            self.at(i * 100);
        }
        for i in 0..n as usize {
            self.ready(i);
        }
    }
}

fn spawns(cmds: &[Command]) -> Vec<usize> {
    cmds.iter().filter_map(|c| if let Command::Spawn { slot, .. } = c { Some(*slot) } else { None }).collect()
}

fn reports(cmds: &[Command]) -> Vec<&Report> {
    cmds.iter().filter_map(|c| if let Command::Report(r) = c { Some(r) } else { None }).collect()
}

#[test]
fn startup_is_paced_by_the_startup_delay() {
    let mut h = Harness::new(policy(3));
    assert_eq!(spawns(&h.at(0)), vec![0]);
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 100 * MS));
    assert!(spawns(&h.at(99)).is_empty());
    assert_eq!(spawns(&h.at(100)), vec![1]);
    assert_eq!(spawns(&h.at(250)), vec![2]);
    assert_eq!(h.sup.next_deadline(), None, "idle: no wake-ups");
    for i in 0..3 {
        assert_eq!(h.status(i), WorkerStatus::Starting);
    }
}

#[test]
fn ready_makes_active_and_all_ready_is_reported_once() {
    let mut h = Harness::new(policy(2));
    h.at(0);
    h.at(100);
    let r = h.ready(0);
    assert!(reports(&r).iter().any(|r| matches!(r, Report::Ready { slot: 0, .. })));
    assert!(!reports(&r).iter().any(|r| matches!(r, Report::AllReady { .. })));
    assert_eq!(h.status(0), WorkerStatus::Active);
    let r = h.ready(1);
    assert!(reports(&r).contains(&&Report::AllReady { workers: 2 }));
    // A respawned worker becoming ready does not announce again.
    h.exit(1, ExitStatus::Signal(9));
    h.at(500);
    let r = h.ready(1);
    assert!(!reports(&r).iter().any(|r| matches!(r, Report::AllReady { .. })));
    assert_eq!(h.sup.cluster_stats().active_workers, 2);
}

#[test]
fn crash_classification() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    let r = h.exit(0, ExitStatus::Code(3));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: true, .. }]));
    h.at(1000);
    h.ready(0);
    let r = h.exit(0, ExitStatus::Signal(libc::SIGSEGV));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: true, .. }]));
    h.at(2000);
    h.ready(0);
    // A clean exit nobody asked for is not a crash, but is still replaced.
    let r = h.exit(0, ExitStatus::Code(0));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: false, respawn_in: Some(_), .. }]));
    assert_eq!(h.sup.slots[0].crash_count, 2);
}

#[test]
fn respawn_after_the_delay_counts_a_restart() {
    let mut h = Harness::new(policy(2));
    h.start_all();
    h.at(1000);
    h.exit(1, ExitStatus::Signal(libc::SIGKILL));
    assert_eq!(h.status(1), WorkerStatus::Respawning);
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 1100 * MS));
    assert!(spawns(&h.at(1099)).is_empty());
    assert_eq!(spawns(&h.at(1100)), vec![1]);
    assert_eq!(h.status(1), WorkerStatus::Starting);
    let stats = h.sup.cluster_stats();
    assert_eq!(stats.total_restarts, 1);
    let w = &h.sup.worker_stats(h.now)[1];
    assert_eq!(w.crash_count, 1);
    assert_eq!(w.exit_status, Some(ExitStatus::Signal(9)));
}

#[test]
fn no_respawn_leaves_the_slot_crashed_and_exits_with_an_error_when_all_are_gone() {
    let mut p = policy(2);
    p.respawn = false;
    let mut h = Harness::new(p);
    h.start_all();
    h.exit(0, ExitStatus::Code(1));
    assert_eq!(h.status(0), WorkerStatus::Crashed);
    assert_eq!(h.sup.cluster_stats().crashed_workers, 1);
    let r = h.exit(1, ExitStatus::Code(0));
    assert_eq!(h.status(1), WorkerStatus::Stopped);
    assert!(matches!(r.last(), Some(Command::Exit(Err(_)))), "{r:?}");
    assert!(h.sup.is_done());
}

#[test]
fn clean_exits_without_respawn_end_supervision_successfully() {
    let mut p = policy(1);
    p.respawn = false;
    let mut h = Harness::new(p);
    h.start_all();
    let r = h.exit(0, ExitStatus::Code(0));
    assert_eq!(r.last(), Some(&Command::Exit(Ok(()))));
}

#[test]
fn crash_protection_disables_after_max_crashes_in_the_window() {
    let mut h = Harness::new(policy(2));
    h.start_all();
    // Slot 1 crashes three times 1 s apart (respawned 100 ms after each).
    for (i, t) in [1000u64, 2000, 3000].iter().enumerate() {
        h.at(*t);
        let r = h.exit(1, ExitStatus::Code(1));
        if i < 2 {
            assert_eq!(h.status(1), WorkerStatus::Respawning);
            h.at(t + 100);
        } else {
            assert_eq!(h.status(1), WorkerStatus::Disabled);
            let rs = reports(&r);
            assert!(rs.contains(&&Report::Disabled { slot: 1, crashes: 3, within: 2000 * MS }), "{rs:?}");
            assert!(r.contains(&Command::CloseSocket { slot: 1 }));
        }
    }
    assert_eq!(h.sup.next_deadline(), None, "no respawn of a disabled slot");
    let stats = h.sup.cluster_stats();
    assert_eq!((stats.active_workers, stats.disabled_workers), (1, 1));
    assert!(h.sup.worker_stats(h.now)[1].respawn_disabled);
    assert!(!h.sup.is_done(), "slot 0 still serves");
}

#[test]
fn crashes_spread_wider_than_the_window_never_disable() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    for k in 0..10u64 {
        let t = 1000 + k * 3000;
        h.at(t);
        h.exit(0, ExitStatus::Code(1));
        h.at(t + 100);
        h.ready(0);
    }
    assert_eq!(h.status(0), WorkerStatus::Active);
    assert_eq!(h.sup.slots[0].crash_count, 10);
}

#[test]
fn every_slot_disabled_ends_with_an_error() {
    let mut h = Harness::new(policy(1));
    h.at(0);
    h.exit(0, ExitStatus::Code(1));
    h.at(100);
    h.exit(0, ExitStatus::Code(1));
    h.at(200);
    let r = h.exit(0, ExitStatus::Code(1));
    assert!(matches!(r.last(), Some(Command::Exit(Err(msg))) if msg.contains("1 disabled")), "{r:?}");
    assert_eq!(spawns(&h.log).len(), 3, "spawned exactly max_crashes times");
}

#[test]
fn spawn_failure_counts_as_a_crash() {
    let mut h = Harness::new(policy(1));
    let cmds = h.sup.handle(Event::Tick, h.now, SystemTime::UNIX_EPOCH);
    let Command::Spawn { key, .. } = cmds[0] else { panic!("{cmds:?}") };
    let r = h.feed(Event::SpawnFailed { key, error: "ENOENT".into() });
    assert!(matches!(reports(&r)[0], Report::SpawnFailed { slot: 0, .. }));
    assert_eq!(h.status(0), WorkerStatus::Respawning);
}

#[test]
fn shutdown_terms_everyone_then_kills_at_the_timeout() {
    let mut h = Harness::new(policy(3));
    h.start_all();
    h.at(1000);
    let r = h.feed(Event::Shutdown);
    assert!(r.contains(&Command::CloseListeners));
    let terms = r.iter().filter(|c| matches!(c, Command::Signal { signal: libc::SIGTERM, .. })).count();
    assert_eq!(terms, 3);
    assert!((0..3).all(|i| h.status(i) == WorkerStatus::Stopping));
    assert!(h.sup.cluster_stats().shutdown_requested);
    assert_eq!(h.sup.next_deadline(), Some(h.t0 + 2000 * MS));
    // Two drain in time, with any status: never a crash, never respawned.
    let r = h.exit(0, ExitStatus::Code(0));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: false, respawn_in: None, .. }]));
    let r = h.exit(1, ExitStatus::Signal(libc::SIGTERM));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: false, .. }]));
    assert!(spawns(&h.at(1999)).is_empty());
    let r = h.at(2000);
    assert_eq!(r.iter().filter(|c| matches!(c, Command::Signal { signal: libc::SIGKILL, .. })).count(), 1);
    assert_eq!(h.sup.next_deadline(), None);
    let r = h.exit(2, ExitStatus::Signal(libc::SIGKILL));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: false, .. }]));
    assert_eq!(r.last(), Some(&Command::Exit(Ok(()))));
}

#[test]
fn shutdown_cancels_pending_spawns_and_respawns() {
    let mut h = Harness::new(policy(3));
    h.at(0); // only slot 0 started
    h.ready(0);
    let r = h.feed(Event::Shutdown);
    assert_eq!(spawns(&r), Vec::<usize>::new());
    assert!(spawns(&h.at(500)).is_empty());
    let r = h.exit(0, ExitStatus::Code(0));
    assert_eq!(r.last(), Some(&Command::Exit(Ok(()))));
}

#[test]
fn second_shutdown_request_kills_at_once() {
    let mut h = Harness::new(policy(2));
    h.start_all();
    h.feed(Event::Shutdown);
    let r = h.feed(Event::Shutdown);
    assert_eq!(r.iter().filter(|c| matches!(c, Command::Signal { signal: libc::SIGKILL, .. })).count(), 2);
}

#[test]
fn shutdown_with_no_workers_exits_at_once() {
    let mut h = Harness::new(policy(2));
    let r = h.feed(Event::Shutdown);
    assert_eq!(r.last(), Some(&Command::Exit(Ok(()))));
}

#[test]
fn events_for_unknown_workers_are_ignored() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    let r = h.feed(Event::Exited { key: WorkerKey(999), status: ExitStatus::Code(1) });
    assert!(r.is_empty());
    let r = h.feed(Event::Ready { key: WorkerKey(999) });
    assert!(r.is_empty());
}

#[test]
fn worker_stats_report_uptime_and_pid() {
    let mut h = Harness::new(policy(1));
    h.start_all();
    h.now = h.t0 + 2500 * MS;
    let w = &h.sup.worker_stats(h.now)[0];
    assert_eq!(w.uptime, 2500 * MS);
    assert_eq!(w.pid, Some(1001));
    assert_eq!(w.port, 3000);
    assert_eq!(w.status, WorkerStatus::Active);
}

#[test]
fn signal_workers_reaches_active_workers_and_their_death_by_it_is_no_crash() {
    let mut h = Harness::new(policy(3));
    h.at(0);
    h.at(100);
    h.at(200);
    h.ready(0);
    h.ready(2); // slot 1 is still starting
    let r = h.feed(Event::SignalWorkers { signal: libc::SIGUSR1 });
    let signalled: Vec<_> = r.iter().filter(|c| matches!(c, Command::Signal { signal: libc::SIGUSR1, .. })).collect();
    assert_eq!(signalled.len(), 2);
    assert!(reports(&r).contains(&&Report::Signalled { signal: libc::SIGUSR1, slots: vec![0, 2] }));
    // A worker without a SIGUSR1 handler dies of it: the master sent it, so not a crash.
    let r = h.exit(0, ExitStatus::Signal(libc::SIGUSR1));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: false, respawn_in: Some(_), .. }]));
    // SIGKILL sent through signal_workers: not a crash either, but replaced.
    h.feed(Event::SignalWorkers { signal: libc::SIGKILL });
    let r = h.exit(2, ExitStatus::Signal(libc::SIGKILL));
    assert!(matches!(reports(&r)[..], [Report::Exited { crash: false, respawn_in: Some(_), .. }]));
    assert_eq!(h.sup.worker_stats(h.now)[2].crash_count, 0);
}

#[test]
fn status_lifecycle() {
    use WorkerStatus::*;
    let mut p = policy(2);
    p.max_crashes = 2;
    let mut h = Harness::new(p);
    assert_eq!((h.status(0), h.status(1)), (Starting, Starting), "pending initial spawns");
    h.at(0);
    assert_eq!(h.status(0), Starting, "spawned, not ready");
    h.at(100);
    h.ready(0);
    h.ready(1);
    assert_eq!(h.status(0), Active);
    h.at(1000);
    h.exit(0, ExitStatus::Code(1));
    assert_eq!(h.status(0), Respawning);
    h.at(1100);
    assert_eq!(h.status(0), Starting);
    h.exit(0, ExitStatus::Code(1));
    assert_eq!(h.status(0), Disabled);
    h.feed(Event::Shutdown);
    assert_eq!(h.status(1), Stopping);
    h.exit(1, ExitStatus::Code(0));
    assert_eq!(h.status(1), Stopped);
    assert_eq!(h.status(0), Disabled);

    let mut p = policy(1);
    p.respawn = false;
    let mut h = Harness::new(p);
    h.start_all();
    h.exit(0, ExitStatus::Signal(libc::SIGSEGV));
    assert_eq!(h.status(0), Crashed);
}

#[test]
fn a_slot_disabled_during_startup_does_not_hold_the_announcement_back() {
    let mut h = Harness::new(policy(2));
    h.at(0);
    h.at(100);
    h.ready(0);
    h.exit(1, ExitStatus::Code(1));
    h.at(200);
    h.exit(1, ExitStatus::Code(1));
    h.at(300);
    let r = h.exit(1, ExitStatus::Code(1));
    assert_eq!(h.status(1), WorkerStatus::Disabled);
    assert!(reports(&r).contains(&&Report::AllReady { workers: 1 }), "{r:?}");
}
