//! A property test: the supervisor driven by random event sequences through a small fake
//! driver, its invariants checked after every step.
//!
//! The fake driver answers every [`Command::Spawn`] at once with [`Event::Spawned`] or
//! [`Event::SpawnFailed`] (as the real one does), remembers the live processes, and feeds exits:
//! of processes it chose to crash, exit or lose (random steps), of processes asked to stop that
//! drain (random steps), and of every process sent `SIGKILL` (at the next step: SIGKILL is
//! always honoured; SIGTERM may be ignored for ever). The invariants:
//!
//! - **deadlines**: after every step, [`Supervisor::next_deadline`] is none or strictly after
//!   `now` (whatever was due has been acted on; the driver never spins), and never later than
//!   the deadline computed from the state (the one kept through quiet heartbeats may be earlier);
//! - **quiet events**: a twin of the supervisor that handles every event in full (no quiet
//!   path for heartbeats and ticks) is fed the same events and returns the same commands;
//! - **capacity**: a slot whose worker served (`Active`) before a step still has an active
//!   worker after it, unless that very worker exited (or was lost) during the step, the slot
//!   was removed by scaling, it hung, it is drained for a recycle in place, or a shutdown began. So a rolling restart never takes capacity
//!   away, whatever its `max_surge`: at every step of a rollout, the active workers are at least
//!   those active before it minus the ones that exited or were removed meanwhile (a slot being
//!   replaced is served by its old worker until the new one is ready);
//! - **surge**: during a rollout, the replacements that exist are exactly those of the slots
//!   it is replacing, at most `max_surge` (drawn at random), and no recycle runs beside them;
//!   otherwise at most `max_recycling`, in slots being recycled;
//! - **bookkeeping**: the processes the supervisor tracks are exactly the fake driver's live
//!   ones; signals only go to processes that were started; a socket is closed only when no live
//!   process of its slot holds it; routes name only slots with an active worker (or, while
//!   none is, slots with a started worker that is not stopping); no spawn
//!   after a shutdown began; `Exit` is the last command of its batch, and comes only when no
//!   process is left;
//! - **history**: every batch's entries continue the sequence by one each; there is one
//!   `signalled` entry per signal sent, one `spawned` per process started, one `exited` per
//!   exit reported, one `ended` per `Exit` (the batch's last entry), and the ring holds at most
//!   its capacity, in sequence order, ending with the last entry recorded;
//! - **termination**: after a final `Shutdown`, letting time pass a bounded number of times
//!   (with SIGKILL honoured), the machine returns `Exit`, every process the fake driver saw
//!   spawned has exited, and every caller waiting for a restart was answered exactly once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::RngSeed;

use super::*;
use crate::signal::Signal;
use crate::stats::ExitStatus;

/// The seed used unless `PROPTEST_RNG_SEED` sets another: the same cases on every CI run.
const SEED: u64 = 0x5eed_c1a5_7e25;

/// One random step.
#[derive(Debug, Clone)]
enum Op {
    /// Time passes (milliseconds).
    Tick(u64),
    /// The n-th live process (modulo their number) that has not reported ready does.
    Ready(usize),
    /// The n-th live process exits with this status, asked or not.
    Exit(usize, ExitStatus),
    /// The n-th live process that was sent SIGTERM finishes draining (exit code 0).
    Drain(usize),
    /// The n-th live process is reaped elsewhere ([`Event::Lost`]).
    Lose(usize),
    Shutdown,
    /// A restart, with a waiting caller or not.
    Restart(bool),
    Scale(usize),
    /// A signal to the master.
    Signal(Signal),
    SignalWorkers(Signal),
    /// The n-th live process beats, having served this many requests.
    Beat(usize, u64),
    /// Memory readings of every live process: over the limit or not, with room for a surge
    /// worker or not.
    Memory(bool, bool),
    /// An upgrade of the master, with a waiting caller or not, slot by slot or not.
    Upgrade(bool, bool),
    /// (Slot by slot.) The new master's worker of the n-th slot (modulo) is ready.
    MasterSlotReady(usize),
    /// The new master says it is ready.
    MasterReady,
    /// The new master exits on its own.
    MasterExit,
    /// The new master, offered the cluster, says it took over, with this many slots (modulo; 0:
    /// it does not say).
    MasterTookOver(usize),
    /// The new master says it cannot serve.
    MasterCannotServe,
}

fn status() -> impl Strategy<Value = ExitStatus> {
    prop::sample::select(vec![
        ExitStatus::Code(0),
        ExitStatus::Code(1),
        ExitStatus::Code(255),
        ExitStatus::Signal(Signal::KILL),
        ExitStatus::Signal(Signal::SEGV),
        ExitStatus::Signal(Signal::TERM),
        ExitStatus::Signal(Signal::USR1),
    ])
}

fn op() -> impl Strategy<Value = Op> {
    let master_signals = vec![
        Signal::TERM,
        Signal::INT,
        Signal::HUP,
        Signal::QUIT,
        Signal::USR2,
        Signal::TTIN,
        Signal::TTOU,
        Signal::WINCH,
        Signal::CHLD,
        Signal::USR1,
    ];
    prop_oneof![
        6 => (0u64..2500).prop_map(Op::Tick),
        6 => any::<usize>().prop_map(Op::Ready),
        3 => (any::<usize>(), status()).prop_map(|(i, s)| Op::Exit(i, s)),
        2 => any::<usize>().prop_map(Op::Drain),
        1 => any::<usize>().prop_map(Op::Lose),
        1 => Just(Op::Shutdown),
        3 => any::<bool>().prop_map(Op::Restart),
        1 => (1usize..6).prop_map(Op::Scale),
        2 => prop::sample::select(master_signals).prop_map(Op::Signal),
        1 => prop::sample::select(vec![Signal::USR1, Signal::KILL]).prop_map(Op::SignalWorkers),
        4 => (any::<usize>(), 0u64..40).prop_map(|(i, n)| Op::Beat(i, n)),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(over, room)| Op::Memory(over, room)),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(wait, slots)| Op::Upgrade(wait, slots)),
        1 => any::<usize>().prop_map(Op::MasterSlotReady),
        1 => Just(Op::MasterReady),
        1 => Just(Op::MasterExit),
        1 => any::<usize>().prop_map(Op::MasterTookOver),
        1 => Just(Op::MasterCannotServe),
    ]
}

/// A policy with small numbers, so that every timer matters within a sequence.
fn policy() -> impl Strategy<Value = (Policy, Vec<Signal>)> {
    (
        (1usize..5, any::<bool>(), any::<bool>(), 1u32..5, 1usize..6),
        (100u64..2000, 0u64..300, 0u64..500, 1u64..10, 300u64..3000),
        prop::sample::subsequence(vec![Signal::HUP, Signal::USR2, Signal::TTIN, Signal::WINCH], 0..3),
        (liveness(), prop::sample::select(vec![0u64, 0, 300, 2000])),
    )
        .prop_map(
            |(
                (workers, respawn, socket_per_slot, max_crashes, max_surge),
                (stop, startup, respawn_ms, window, ready),
                bound,
                (liveness, delay),
            )| {
                let ms = Duration::from_millis;
                let policy = Policy {
                    workers,
                    port: 3000,
                    respawn,
                    shutdown_timeout: ms(stop),
                    startup_delay: ms(startup),
                    respawn_delay: ms(respawn_ms),
                    respawn_window: Duration::from_secs(window),
                    max_crashes,
                    socket_per_slot,
                    ready_timeout: ms(ready),
                    max_surge,
                    bound_signals: Vec::new(),
                    liveness,
                    shutdown_delay: ms(delay),
                    min_ready: 1,
                    upgrade_timeout: ms(ready * 2),
                    pid1: false,
                    upgrade_slot_by_slot: false,
                };
                (policy, bound)
            },
        )
}

/// Heartbeats, recycling and backoff: each on or off, with small numbers.
fn liveness() -> impl Strategy<Value = Liveness> {
    let ms = Duration::from_millis;
    (
        prop::option::of(300u64..3000),
        0u64..500,
        prop::option::of(5u64..30),
        prop::option::of(500u64..5000),
        any::<bool>(),
        1usize..3,
        prop::option::of((10u64..200, 200u64..2000)),
        prop::option::of(500u64..5000),
    )
        .prop_map(move |(timeout, grace, requests, age, memory, recycling, backoff, cooloff)| Liveness {
            worker_timeout: timeout.map(ms),
            hung_grace: ms(grace),
            max_requests: requests,
            max_requests_jitter: 5,
            max_age: age.map(ms),
            max_age_jitter: ms(100),
            max_memory: memory.then_some(100),
            memory_samples: 2,
            memory_interval: ms(300),
            max_recycling: recycling,
            backoff: backoff.map(|(base, max)| Backoff { base: ms(base), max: ms(max) }),
            cooloff: cooloff.map(ms),
            ..Liveness::default()
        })
}

/// A process as the fake driver sees it.
#[derive(Debug)]
struct Live {
    slot: usize,
    ready: bool,
    /// It was sent SIGTERM.
    termed: bool,
}

/// The fake driver.
struct Fake {
    sup: Supervisor,
    /// The same machine, handling every event in full: it must agree with `sup` on everything.
    twin: Supervisor,
    now: Instant,
    next_pid: u32,
    /// Whether each spawn succeeds, in turn (cycled).
    spawn_plan: Vec<bool>,
    spawns: usize,
    live: BTreeMap<WorkerKey, Live>,
    /// Sent SIGKILL: they exit at the next step.
    dying: BTreeSet<WorkerKey>,
    spawned: BTreeSet<WorkerKey>,
    exited: BTreeSet<WorkerKey>,
    /// Exited (or lost) during the current step.
    exited_now: BTreeSet<WorkerKey>,
    done: bool,
    next_ticket: u64,
    tickets: BTreeSet<u64>,
    answered: Vec<u64>,
    /// The slots whose socket is open (`ReusePort`): slot 0's, as the master opens it, then
    /// every slot spawned into.
    sockets: BTreeSet<usize>,
    /// The new master of an upgrade, while it runs (and it was sent SIGKILL).
    new_master: Option<(u32, bool)>,
    /// The supervisor handed over to the new master.
    handed_over: bool,
    /// The supervisor offered the cluster to the new master (phase one of the hand-over).
    offered: bool,
    upgrade_tickets: BTreeSet<u64>,
    upgrades_answered: Vec<u64>,
    /// The last history entry's sequence number.
    last_seq: u64,
}

impl Fake {
    fn new(policy: Policy, bound: Vec<Signal>, spawn_plan: Vec<bool>) -> Fake {
        let now = Instant::now();
        let per_slot = policy.socket_per_slot;
        let policy = Policy { bound_signals: bound, ..policy };
        // A small ring (or none), so that its bound is reached.
        let capacity = spawn_plan.len() * 2 - 2;
        let sup = Supervisor::new(policy, now).with_open_sockets([0]).with_event_history(capacity, 1);
        let mut twin = sup.clone();
        twin.always_settle = true;
        Fake {
            twin,
            last_seq: 0,
            sockets: if per_slot { BTreeSet::from([0]) } else { BTreeSet::new() },
            sup,
            now,
            next_pid: 100,
            spawn_plan,
            spawns: 0,
            live: BTreeMap::new(),
            dying: BTreeSet::new(),
            spawned: BTreeSet::new(),
            exited: BTreeSet::new(),
            exited_now: BTreeSet::new(),
            done: false,
            next_ticket: 1,
            tickets: BTreeSet::new(),
            answered: Vec::new(),
            new_master: None,
            handed_over: false,
            offered: false,
            upgrade_tickets: BTreeSet::new(),
            upgrades_answered: Vec::new(),
        }
    }

    /// Feeds `event` and every event its commands lead to, checking each command.
    fn feed(&mut self, event: Event) -> Result<(), TestCaseError> {
        let mut queue = VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            let master_exited = matches!(ev, Event::MasterExited { .. });
            if master_exited {
                self.new_master = None;
            }
            if let Event::Exited { key, .. } | Event::Lost { key } = ev {
                self.live.remove(&key);
                self.dying.remove(&key);
                self.exited.insert(key);
                self.exited_now.insert(key);
            }
            let twin = self.twin.handle(ev.clone(), self.now, SystemTime::UNIX_EPOCH);
            let revision = self.sup.revision().0;
            let cmds = self.sup.handle(ev, self.now, SystemTime::UNIX_EPOCH);
            prop_assert_eq!(
                &cmds,
                &twin,
                "the quiet path or an incremental settle decided otherwise than a full settle"
            );
            // The state is the twin's, whatever path the event took; the deadline kept after an
            // event handled in full (incrementally or not) is the real one.
            prop_assert_eq!(format!("{:?}", &*self.sup.slots), format!("{:?}", &*self.twin.slots));
            prop_assert_eq!(format!("{:?}", &*self.sup.retiring), format!("{:?}", &*self.twin.retiring));
            prop_assert_eq!(
                (&self.sup.routed, &self.sup.sockets, &self.sup.deployed),
                (&self.twin.routed, &self.twin.sockets, &self.twin.deployed)
            );
            if let Err(e) = self.sup.check_cache() {
                prop_assert!(false, "the settle cache disagrees with the slots: {}", e);
            }
            if self.sup.revision().0 != revision {
                prop_assert_eq!(self.sup.next_deadline(), self.sup.compute_deadline(), "the kept deadline is exact");
            }
            if self.done {
                prop_assert!(cmds.is_empty(), "commands after Exit: {:?}", cmds);
            }
            self.check_history(&cmds)?;
            for (i, cmd) in cmds.iter().enumerate() {
                self.execute(cmd, i + 1 == cmds.len(), &mut queue)?;
            }
            prop_assert!(
                !master_exited || !self.offered || self.handed_over,
                "a new master offered the cluster exited and nothing was taken back"
            );
            // The last route of a batch is the one in force once it is carried out: it must
            // fit the state the batch left (an earlier one may route away from slots first).
            if let Some(Command::Route { slots }) = cmds.iter().rev().find(|c| matches!(c, Command::Route { .. })) {
                self.check_route(slots)?;
            }
        }
        Ok(())
    }

    fn execute(&mut self, cmd: &Command, last: bool, queue: &mut VecDeque<Event>) -> Result<(), TestCaseError> {
        match cmd {
            Command::Spawn { slot, key, .. } => {
                prop_assert!(self.sup.phase == Phase::Running, "a spawn during a shutdown");
                let ok = self.spawn_plan[self.spawns % self.spawn_plan.len()];
                self.spawns += 1;
                if self.sup.policy.socket_per_slot {
                    self.sockets.insert(*slot);
                }
                if ok {
                    self.next_pid += 1;
                    self.live.insert(*key, Live { slot: *slot, ready: false, termed: false });
                    self.spawned.insert(*key);
                    queue.push_back(Event::Spawned { key: *key, pid: self.next_pid });
                } else {
                    queue.push_back(Event::SpawnFailed { key: *key, error: "EAGAIN".into() });
                }
            }
            Command::Signal { key, signal } => {
                prop_assert!(self.spawned.contains(key), "{signal} sent to {key:?}, never started");
                if let Some(p) = self.live.get_mut(key) {
                    if *signal == Signal::KILL {
                        self.dying.insert(*key);
                    } else if *signal == Signal::TERM {
                        p.termed = true;
                    }
                }
            }
            Command::CloseSocket { slot } => {
                prop_assert!(self.sockets.remove(slot), "socket {slot} closed, never opened");
                prop_assert!(
                    !self.live.values().any(|p| p.slot == *slot),
                    "socket {slot} closed while a live process holds it"
                );
            }
            Command::Report(Report::RestartFinished { tickets, .. }) => self.answered.extend(tickets),
            Command::Report(Report::UpgradeFinished { tickets, .. }) => self.upgrades_answered.extend(tickets),
            Command::SpawnMaster { .. } => {
                prop_assert!(self.new_master.is_none() && !self.handed_over, "a second new master: never interleaved");
                prop_assert!(self.sup.phase == Phase::Running, "a new master during a shutdown");
                self.next_pid += 1;
                self.new_master = Some((self.next_pid, false));
                queue.push_back(Event::MasterSpawned { pid: self.next_pid });
            }
            Command::StopMaster | Command::KillMaster => {
                prop_assert!(self.new_master.is_some() && !self.handed_over, "stopped a new master that does not run");
                prop_assert!(!self.offered, "stopped a new master that was offered the cluster without taking it back");
                if let Some(m) = self.new_master.as_mut() {
                    m.1 = true;
                }
            }
            Command::HandOver { pid } => {
                prop_assert_eq!(self.new_master.map(|m| m.0), Some(*pid), "handed over to another process");
                prop_assert!(!self.handed_over && !self.offered, "handed over twice");
                self.offered = true;
            }
            Command::TakeBack => {
                prop_assert!(self.offered && !self.handed_over, "took back what was not offered");
                self.offered = false;
            }
            Command::ConfirmHandOver => {
                prop_assert!(self.offered && self.new_master.is_some_and(|m| !m.1), "confirmed without an offer");
                prop_assert!(!self.handed_over, "confirmed twice");
                self.handed_over = true;
            }
            Command::Exit(outcome) => {
                prop_assert!(last, "Exit is not the last command");
                prop_assert!(self.live.is_empty(), "Exit with live processes: {:?}", self.live);
                prop_assert!(
                    self.handed_over || self.new_master.is_none(),
                    "Exit while the new master of a failed upgrade runs"
                );
                prop_assert_eq!(*outcome == Outcome::Upgraded, self.handed_over, "{:?}", outcome);
                self.done = true;
            }
            _ => {}
        }
        Ok(())
    }

    /// A route: to active workers; while there is none, to started ones (never to a slot
    /// without a process, whose socket may not exist yet).
    fn check_route(&self, slots: &[usize]) -> Result<(), TestCaseError> {
        let state = |s: usize| self.sup.slots.get(s).and_then(|s| s.current.as_ref()).map(|p| p.state);
        let any_active = self
            .sup
            .slots
            .iter()
            .any(|s| !s.disabled && s.current.as_ref().is_some_and(|p| p.state == ProcState::Active));
        for &s in slots {
            prop_assert!(self.sockets.contains(&s), "routed to slot {}, whose socket is not open", s);
            // A slot handed to the new master of a slot-by-slot upgrade: its worker serves it.
            if self.sup.slots.get(s).is_some_and(|s| s.handed) {
                continue;
            }
            if any_active {
                prop_assert_eq!(state(s), Some(ProcState::Active), "routed to slot {}", s);
            } else {
                prop_assert!(
                    state(s).is_some_and(|st| st != ProcState::Stopping),
                    "routed to slot {} ({:?}) while none is active",
                    s,
                    state(s)
                );
            }
        }
        Ok(())
    }

    /// The n-th (modulo) of the live processes that pass `filter`.
    fn pick(&self, n: usize, filter: impl Fn(&Live) -> bool) -> Option<WorkerKey> {
        let keys: Vec<WorkerKey> = self.live.iter().filter(|(_, p)| filter(p)).map(|(k, _)| *k).collect();
        (!keys.is_empty()).then(|| keys[n % keys.len()])
    }

    /// Slots with an active worker, and its key.
    fn serving(&self) -> Vec<(usize, WorkerKey)> {
        self.sup
            .slots
            .iter()
            .filter_map(|s| s.current.as_ref().filter(|p| p.state == ProcState::Active).map(|p| (s.id, p.key)))
            .collect()
    }

    /// One step: the processes killed at the last step exit, then `op`.
    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before = self.serving();
        let was_running = self.sup.phase == Phase::Running;
        self.exited_now.clear();
        for key in std::mem::take(&mut self.dying) {
            self.feed(Event::Exited { key, status: ExitStatus::Signal(Signal::KILL) })?;
        }
        if self.new_master.is_some_and(|(_, killed)| killed) {
            self.feed(Event::MasterExited { status: ExitStatus::Signal(Signal::KILL), reason: None })?;
        }
        let event = match *op {
            Op::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                Some(Event::Tick)
            }
            Op::Ready(n) => self.pick(n, |p| !p.ready).map(|key| {
                if let Some(p) = self.live.get_mut(&key) {
                    p.ready = true;
                }
                Event::Ready { key }
            }),
            Op::Exit(n, status) => self.pick(n, |_| true).map(|key| Event::Exited { key, status }),
            Op::Drain(n) => self.pick(n, |p| p.termed).map(|key| Event::Exited { key, status: ExitStatus::Code(0) }),
            Op::Lose(n) => self.pick(n, |_| true).map(|key| Event::Lost { key }),
            Op::Shutdown => Some(Event::Shutdown),
            Op::Restart(wait) => {
                // Once the machine is done, the driver no longer supervises: it answers waiting
                // callers itself (NotSupervising).
                let ticket = (wait && !self.done).then(|| {
                    self.next_ticket += 1;
                    self.tickets.insert(self.next_ticket);
                    self.next_ticket
                });
                Some(Event::Restart { ticket })
            }
            Op::Scale(workers) => Some(Event::Scale { workers }),
            Op::Signal(signal) => Some(Event::Signal { signal }),
            Op::SignalWorkers(signal) => Some(Event::SignalWorkers { signal }),
            // An odd count comes as counts only (the request limit reached), an even as a beat.
            Op::Beat(n, served) => self.pick(n, |_| true).map(|key| match served % 2 {
                0 => Event::Beat { key, served, in_flight: 1 },
                _ => Event::Served { key, served, in_flight: 1 },
            }),
            Op::Memory(over, room) => Some(Event::MemorySampled {
                readings: self.live.keys().map(|&k| (k, if over { 1000 } else { 10 })).collect(),
                headroom: Some(if room { 1 << 20 } else { 0 }),
            }),
            Op::Upgrade(wait, slots) => {
                let ticket = (wait && !self.done).then(|| {
                    self.next_ticket += 1;
                    self.upgrade_tickets.insert(self.next_ticket);
                    self.next_ticket
                });
                Some(Event::Upgrade { ticket, slot_by_slot: Some(slots) })
            }
            Op::MasterSlotReady(n) => self
                .new_master
                .filter(|m| !m.1 && !self.handed_over)
                .map(|_| Event::MasterSlotReady { slot: n % (self.sup.slots.len() + 1) }),
            Op::MasterReady => self.new_master.filter(|m| !m.1 && !self.handed_over).map(|_| Event::MasterReady),
            Op::MasterTookOver(n) => self.new_master.filter(|m| !m.1 && !self.handed_over).map(|_| {
                let slots = n % (self.sup.slots.len() + 2);
                Event::MasterTookOver { slots: (slots > 0).then(|| slots - 1) }
            }),
            Op::MasterCannotServe => self
                .new_master
                .filter(|m| !m.1 && !self.handed_over)
                .map(|_| Event::MasterCannotServe { reason: "too few".into() }),
            Op::MasterExit => self
                .new_master
                .filter(|m| !m.1 && !self.handed_over)
                .map(|_| Event::MasterExited { status: ExitStatus::Code(1), reason: Some("it failed".into()) }),
        };
        if let Some(event) = event {
            self.feed(event)?;
        }
        self.check(&before, was_running)
    }

    /// The history's invariants after one batch (see the module documentation).
    fn check_history(&mut self, cmds: &[Command]) -> Result<(), TestCaseError> {
        use crate::events::{EventKind, SignalReason};
        let fresh = self.sup.fresh_events();
        for e in fresh {
            self.last_seq += 1;
            prop_assert_eq!(e.seq, self.last_seq, "sequence numbers continue by one");
        }
        let count = |f: fn(&EventKind) -> bool| fresh.iter().filter(|e| f(&e.kind)).count();
        let signals = cmds.iter().filter(|c| matches!(c, Command::Signal { .. })).count();
        prop_assert_eq!(count(|k| matches!(k, EventKind::Signalled { .. })), signals, "one entry per signal");
        let unknown = |k: &EventKind| matches!(k, EventKind::Signalled { reason: SignalReason::Other, .. });
        prop_assert_eq!(count(unknown), 0, "every signal's reason is known: {:?}", fresh);
        let started = cmds.iter().filter(|c| matches!(c, Command::Report(Report::Started { .. }))).count();
        prop_assert_eq!(count(|k| matches!(k, EventKind::Spawned)), started, "one entry per start");
        let exited = cmds.iter().filter(|c| matches!(c, Command::Report(Report::Exited { .. }))).count();
        prop_assert_eq!(count(|k| matches!(k, EventKind::Exited { .. })), exited, "one entry per exit");
        let exit = cmds.iter().any(|c| matches!(c, Command::Exit(_)));
        prop_assert_eq!(count(|k| matches!(k, EventKind::Ended { .. })), usize::from(exit));
        if exit {
            prop_assert!(matches!(fresh.last().map(|e| &e.kind), Some(EventKind::Ended { .. })), "ended comes last");
        }
        let h = self.sup.history();
        prop_assert!(h.entries().len() <= h.capacity(), "{} entries, capacity {}", h.entries().len(), h.capacity());
        prop_assert!(h.entries().zip(h.entries().skip(1)).all(|(a, b)| b.seq == a.seq + 1));
        prop_assert_eq!(h.last_seq(), self.last_seq);
        if h.capacity() > 0 && self.last_seq > 0 {
            prop_assert_eq!(
                h.entries().last().map(|e| e.seq),
                Some(self.last_seq),
                "the ring ends with the last entry"
            );
        }
        Ok(())
    }

    /// The invariants after a step (see the module documentation).
    fn check(&self, before: &[(usize, WorkerKey)], was_running: bool) -> Result<(), TestCaseError> {
        if let Some(deadline) = self.sup.next_deadline() {
            prop_assert!(deadline > self.now, "a deadline {:?} not after now", self.now.duration_since(deadline));
        }
        let (kept, real) = (self.sup.next_deadline(), self.sup.compute_deadline());
        prop_assert!(real.is_none_or(|r| kept.is_some_and(|k| k <= r)), "kept {:?}, real {:?}", kept, real);
        prop_assert_eq!(self.twin.next_deadline(), real, "the twin's deadline is the real one");
        // Capacity.
        if was_running && self.sup.phase == Phase::Running {
            let after = self.serving();
            let mut lost = 0;
            for &(slot, key) in before {
                // A worker that hung stops serving by itself; one recycled in place drains
                // before its replacement starts (there was no room for both).
                let given_up =
                    self.sup.slots.get(slot).and_then(|s| s.current.as_ref()).is_some_and(|p| {
                        p.hung || p.why_stopped.is_some_and(|w| w != crate::stats::ExitReason::Shutdown)
                    });
                // A slot handed to the new master of a slot-by-slot upgrade is its to serve.
                let handed = self.sup.slots.get(slot).is_some_and(|s| s.handed);
                let excused = self.exited_now.contains(&key) || slot >= self.sup.slots.len() || given_up || handed;
                if excused {
                    lost += 1;
                } else {
                    prop_assert!(after.iter().any(|&(s, _)| s == slot), "slot {slot} stopped serving");
                }
            }
            prop_assert!(after.len() + lost >= before.len());
        }
        // Surge.
        let surging: Vec<usize> = self.sup.slots.iter().filter(|s| s.next.is_some()).map(|s| s.id).collect();
        let (surge, recycling) = (self.sup.policy.max_surge.max(1), self.sup.policy.liveness.max_recycling.max(1));
        prop_assert!(surging.len() <= surge.max(recycling), "replacements in slots {:?}", surging);
        if self.sup.phase == Phase::Running {
            if let Some(r) = &self.sup.rollout {
                let mut in_flight = r.in_flight.clone();
                in_flight.sort_unstable();
                prop_assert_eq!(&surging, &in_flight, "the replacements are the rollout's");
                prop_assert!(in_flight.len() <= surge, "{} replacements at once, max_surge {}", in_flight.len(), surge);
                for &slot in &surging {
                    prop_assert!(
                        self.sup.slots[slot].recycling.is_none(),
                        "a recycle in slot {} during a rollout",
                        slot
                    );
                }
            } else {
                prop_assert!(surging.len() <= recycling, "recycles in slots {:?}", surging);
                for &slot in &surging {
                    prop_assert!(self.sup.slots[slot].recycling.is_some(), "a replacement in slot {}", slot);
                }
            }
        }
        // Bookkeeping: the supervisor's processes are the live ones.
        let tracked: BTreeSet<WorkerKey> = self.sup.procs().map(|(_, p)| p.key).collect();
        let live: BTreeSet<WorkerKey> = self.live.keys().copied().collect();
        prop_assert_eq!(tracked, live);
        Ok(())
    }

    /// Shuts down and lets time pass until the machine exits.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        self.step(&Op::Shutdown)?;
        // With a shutdown delay, the drain starts once it is over.
        let delay = self.sup.policy().shutdown_delay;
        if !delay.is_zero() && !self.done {
            self.step(&Op::Tick(delay.as_millis() as u64 + 1))?;
        }
        let wait = self.sup.policy().shutdown_timeout + Duration::from_millis(1);
        for _ in 0..5 {
            if self.done {
                break;
            }
            self.step(&Op::Tick(wait.as_millis() as u64))?;
        }
        prop_assert!(self.done, "no Exit after a shutdown and five stop timeouts");
        prop_assert!(self.live.is_empty());
        prop_assert_eq!(&self.spawned, &self.exited, "every process started has exited");
        let mut answered = self.answered.clone();
        answered.sort();
        let tickets: Vec<u64> = self.tickets.iter().copied().collect();
        prop_assert_eq!(answered, tickets, "every waiting caller answered once");
        let mut answered = self.upgrades_answered.clone();
        answered.sort();
        let tickets: Vec<u64> = self.upgrade_tickets.iter().copied().collect();
        prop_assert_eq!(answered, tickets, "every caller waiting for an upgrade answered once");
        Ok(())
    }
}

fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    // A failure prints its minimal case; no regression files in the source tree.
    config.failure_persistence = None;
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_supervisor_keeps_its_invariants(
        (policy, bound) in policy(),
        spawn_plan in prop::collection::vec(prop::bool::weighted(0.85), 1..16),
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let mut fake = Fake::new(policy, bound, spawn_plan);
        fake.step(&Op::Tick(0))?;
        for op in &ops {
            fake.step(op)?;
        }
        fake.finish()?;
    }
}
