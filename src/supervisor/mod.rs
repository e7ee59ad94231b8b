//! The supervisor: every decision the master makes, as a pure state machine.
//!
//! It does no I/O and reads no clock. The driver ([`crate::Master::wait`]) feeds it [`Event`]s
//! with the current time and carries out the [`Command`]s it returns; [`Supervisor::next_deadline`]
//! says when to wake it with [`Event::Tick`] if nothing else happens. Every policy (start-up
//! pacing, crash classification, respawn delay, crash protection, rolling restarts, scaling,
//! stop timeouts) lives here and is unit-tested with a fake clock.
//!
//! It imports only the vocabulary (`crate::stats`, `crate::signal`), never `master`, `os`,
//! `config`, `proto` or `worker`. One file per policy:
//!
//! | file | what it decides |
//! | --- | --- |
//! | `types.rs` | the public vocabulary: [`Policy`], [`Event`], [`Command`], [`Report`], … |
//! | `mod.rs` | the state, [`Supervisor::handle`] and the invariant pipeline ([`Supervisor::settle`]) |
//! | `lifecycle.rs` | spawn, ready, exit; crash classification, respawn (with backoff), crash protection (with cool-off) |
//! | `liveness.rs` | heartbeats, hung workers |
//! | `recycle.rs` | recycling by requests, age and memory: surge first, or in place |
//! | `rollout.rs` | rolling restarts: surge first, up to `max_surge` slots at a time, coalescing |
//! | `scaling.rs` | adding and removing slots |
//! | `shutdown.rs` | stopping everything, the end of supervision |
//! | `upgrade.rs` | upgrading the master in place: the new master's start, hand-over or rollback; a new master's take-over |
//! | `signals.rs` | what the master's signals mean (defaults, bound actions); signalling workers |
//! | `timers.rs` | deadlines: [`Supervisor::next_deadline`] and what is due at a time |
//! | `sockets.rs` | routing new connections and closing sockets nobody serves (`ReusePort`) |
//! | `views.rs` | statistics, statuses, the systemd watchdog's verdict |
//! | `history.rs` | the event history: entries derived from each batch, in a bounded ring |
//! | `tracked.rs` | the slots and retiring workers with a mark on each one changed; the tree of per-slot deadlines |
//! | `tests.rs`, `proptests.rs` | unit tests with a fake clock; the property test |
//! | `bench.rs` | the supervisor's own cost per event against the number of slots (`bench/supervisor`) |

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Instant, SystemTime};

use crate::signal::Signal;
use crate::stats::{ExitCounts, ExitReason, ExitStatus, RestartOutcome, UpgradeOutcome, WorkerStatus};

mod history;
mod lifecycle;
mod liveness;
mod recycle;
mod rollout;
mod scaling;
mod shutdown;
mod signals;
mod sockets;
mod timers;
mod tracked;
mod types;
mod upgrade;
mod views;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod liveness_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod rollout_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod upgrade_tests;

pub use history::History;
use tracked::{DeadlineTree, Retiring, Slots};
pub use types::*;

/// Where a worker process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    /// Asked for, not yet confirmed by the driver.
    Spawning,
    /// Running, not yet ready.
    Starting,
    /// Ready and serving.
    Active,
    /// Asked to stop.
    Stopping,
}

#[derive(Debug, Clone)]
struct Proc {
    key: WorkerKey,
    pid: Option<u32>,
    state: ProcState,
    program: Program,
    started: Instant,
    started_wall: SystemTime,
    /// Signals the master sent it (bit n = signal n): a death by one of these is not a crash.
    signalled: u64,
    /// When a stopping worker is killed if it has not exited.
    stop_deadline: Option<Instant>,
    /// When a worker of a removed slot is asked to stop: once new connections were routed away
    /// from its socket for long enough that no handshake towards it is still under way.
    stop_at: Option<Instant>,
    /// When it must have reported ready (the ready timeout after it was asked for), if ever.
    ready_deadline: Option<Instant>,
    /// It missed its ready deadline and was killed: its exit is a crash (a boot failure).
    not_ready: bool,
    /// Its last heartbeat, once it beat (from then on the worker timeout applies).
    last_beat: Option<Instant>,
    /// Requests served and in flight, as its last heartbeat said (once it said any: `counted`).
    counted: bool,
    served: u64,
    in_flight: u64,
    /// It stopped beating for longer than the worker timeout and is being killed.
    hung: bool,
    /// The requests after which it is recycled.
    request_limit: Option<u64>,
    /// When it is recycled for its age.
    recycle_at: Option<Instant>,
    /// Consecutive memory readings over the limit.
    over_memory: u32,
    /// Why it was asked to stop (a rollout, a recycle, scaling, the shutdown).
    why_stopped: Option<ExitReason>,
    /// A recycle of it is queued or under way.
    recycling: bool,
}

impl Proc {
    /// Its ready deadline, while it matters: running, not ready yet, not already killed for it.
    /// (A process not yet confirmed by the driver is judged once it is.)
    fn ready_due(&self) -> Option<Instant> {
        self.ready_deadline.filter(|_| self.state == ProcState::Starting && !self.not_ready)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpawnReason {
    Initial,
    Respawn,
}

#[derive(Debug, Clone)]
struct Slot {
    id: usize,
    /// The worker serving the slot (or starting to).
    current: Option<Proc>,
    /// Its replacement during a graceful restart, until it is ready.
    next: Option<Proc>,
    next_spawn: Option<(Instant, SpawnReason)>,
    /// The program the slot's workers run (changed by a completed replacement).
    program: Program,
    /// Crash times within the crash window.
    recent_crashes: VecDeque<Instant>,
    crash_count: u32,
    /// Workers started again in this slot (respawns and replacements).
    restarts: u64,
    disabled: bool,
    last_exit: Option<(ExitStatus, bool)>,
    last_exit_reason: Option<ExitReason>,
    last_start_wall: Option<SystemTime>,
    /// Its replacement (`next`) is a recycle's, not a rollout's.
    recycling: Option<RecycleReason>,
    /// Crashes in a row (for the backoff), reset by a worker that ran for the crash window.
    crashes_in_a_row: u32,
    /// Disabled, it gets a probe spawn at this time (cool-off).
    probe_at: Option<Instant>,
    /// Its worker is a probe: ready, the slot is enabled again; crashed, disabled again.
    probing: bool,
    /// A failed recycle is not tried again before this time.
    recycle_retry: Option<Instant>,
    /// (The old master of a slot-by-slot upgrade.) The new master's worker serves the slot:
    /// this master's drains (or is gone), nothing respawns, the slot stays in the route.
    handed: bool,
    /// (A master started by a slot-by-slot upgrade.) Its first spawn waits for the previous
    /// slot's turn to end.
    gated: bool,
}

impl Slot {
    fn new(id: usize, first_spawn: Instant, program: Program) -> Slot {
        Slot {
            id,
            current: None,
            next: None,
            next_spawn: Some((first_spawn, SpawnReason::Initial)),
            program,
            recent_crashes: VecDeque::new(),
            crash_count: 0,
            restarts: 0,
            disabled: false,
            last_exit: None,
            last_exit_reason: None,
            last_start_wall: None,
            recycling: None,
            crashes_in_a_row: 0,
            probe_at: None,
            probing: false,
            recycle_retry: None,
            handed: false,
            gated: false,
        }
    }
}

/// Where a process is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    /// `slots[i].current`.
    Current(usize),
    /// `slots[i].next`.
    Next(usize),
    /// `retiring[i]`.
    Retiring(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    ShuttingDown { killed: bool },
    Done,
}

/// A graceful restart in progress.
#[derive(Debug, Clone)]
struct Rollout {
    /// Slots still to replace, in order.
    queue: VecDeque<usize>,
    /// The slots whose replacement is starting, in the order they started: at most
    /// [`Policy::max_surge`] (each one's ready deadline is its replacement's).
    in_flight: Vec<usize>,
    program: Program,
    tickets: Vec<u64>,
    replaced: usize,
}

impl Rollout {
    /// The replacement of `slot` is starting.
    fn replacing(&self, slot: usize) -> bool {
        self.in_flight.contains(&slot)
    }

    /// The rollout is replacing `slot`, or will.
    fn reaches(&self, slot: usize) -> bool {
        self.replacing(slot) || self.queue.contains(&slot)
    }
}

/// An upgrade of the master in place, as the old master runs it.
#[derive(Debug, Clone)]
struct Upgrade {
    stage: UpgradeStage,
    /// When the new master must have said it is ready (`None`: never, for timeouts beyond the
    /// clock's range).
    deadline: Option<Instant>,
    /// Callers waiting for the outcome.
    tickets: Vec<u64>,
    /// Slot by slot: the new master starts a worker each time this one frees a slot.
    slot_by_slot: bool,
    /// Starts tried so far (a busy program file is tried again), and when the next is due.
    spawn_tries: u32,
    retry_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpgradeStage {
    /// [`Command::SpawnMaster`] was sent; the driver has not answered yet.
    Spawning,
    /// The new master runs and is starting its workers.
    Starting { pid: u32 },
    /// The new master is ready and was offered the cluster ([`Command::HandOver`]); this
    /// master serves on until it says it took over.
    HandingOver { pid: u32 },
    /// The upgrade failed and the new master was asked to stop (`SIGTERM`, `SIGKILL` at the
    /// deadline): waiting for its exit, so that no second one starts beside it.
    Killing,
}

/// Who owns the control socket, the admin listener and steering, in a master started by an
/// upgrade (others always do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    /// A master the program started: it owns everything.
    Own,
    /// Started by an upgrade, its predecessor still serves: no route, no systemd readiness.
    Pending,
    /// Started by an upgrade, it took over (route, control socket) and said so; systemd hears
    /// from it once the predecessor confirmed (it told systemd the new main pid first).
    Acked,
    /// Started by an upgrade, it took over.
    Taken,
}

/// The supervisor state machine. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Supervisor {
    policy: Policy,
    /// The slots (each mutable access marks the slot: see [`tracked`]).
    slots: Slots,
    /// Workers asked to stop that no slot counts any more (replaced, or their slot removed).
    retiring: Retiring,
    phase: Phase,
    next_key: u64,
    total_restarts: u64,
    announced_ready: bool,
    rollout: Option<Rollout>,
    /// A restart asked for while one runs (with its waiting callers).
    queued_restart: Option<Vec<u64>>,
    last_restart: Option<RestartOutcome>,
    deploys: u64,
    /// The program new slots start with: the last completed deploy's, or the running binary.
    program: Program,
    /// The slots new connections were last routed to.
    routed: Vec<usize>,
    /// The slots whose socket is open (`ReusePort`): those the master opened at first
    /// ([`Supervisor::with_open_sockets`]), closed by [`Command::CloseSocket`], opened by a
    /// spawn into the slot (the driver binds a missing socket then).
    sockets: BTreeSet<usize>,
    /// Whether new connections are steered (`ReusePort`), as far as the driver told.
    steering: Steering,
    /// When the initial start-up should be over: the last initial spawn plus the ready timeout
    /// (`None`: never, for timeouts beyond the clock's range).
    startup_deadline: Option<Instant>,
    /// Deploys whose program file the driver may hold open (a worker was spawned from it and
    /// [`Command::ReleaseProgram`] was not sent yet).
    deployed: BTreeSet<u64>,
    /// Worker processes that ended, by reason.
    exits: ExitCounts,
    /// Recycles waiting for their turn ([`Liveness::max_recycling`]): slot, worker, why.
    recycle_queue: VecDeque<(usize, WorkerKey, RecycleReason)>,
    /// When memory is read next (`max_memory` set, running).
    next_sample: Option<Instant>,
    /// The cgroup's memory headroom and the smallest worker, from the last readings: a surge
    /// worker fits when the headroom exceeds the smallest worker (a fresh one is about that).
    headroom: Option<u64>,
    smallest_worker: Option<u64>,
    /// The jitter's generator state (splitmix64).
    rng: u64,
    /// A shutdown was asked for with a delay: the drain starts at this time.
    leaving_at: Option<Instant>,
    /// When the last [`handle`](Supervisor::handle) asked to be woken at the latest, and when
    /// it ran.
    expected_wake: Option<Instant>,
    last_handled: Option<Instant>,
    /// The upgrade this master runs (it is the old master), if any.
    upgrade: Option<Upgrade>,
    /// This master handed over to a new one: its shutdown is the drain that follows.
    handed_over: bool,
    last_upgrade: Option<UpgradeOutcome>,
    /// The master's generation (0: the program's first master).
    generation: u64,
    /// Whether this master owns the cluster's outside (a master started by an upgrade, until
    /// its predecessor hands over).
    takeover: Takeover,
    /// When the inherited sockets nobody uses are closed (its predecessor's workers are gone).
    release_at: Option<Instant>,
    /// The predecessor's shutdown timeout (a master started by an upgrade).
    predecessor_timeout: std::time::Duration,
    /// (A master started by a slot-by-slot upgrade.) The predecessor's number of slots.
    predecessor_slots: Option<usize>,
    /// (A master started by an upgrade.) The predecessor's channel ended.
    predecessor_gone: bool,
    /// The event history (entries derived from each batch: `history.rs`).
    history: History,
    /// (A master started by an upgrade.) It told its predecessor that it is ready.
    said_ready: bool,
    /// [`next_deadline`](Supervisor::next_deadline) as the last [`handle`](Supervisor::handle)
    /// left it (`None`: not computed yet): exact after a full [`settle`](Supervisor::settle),
    /// never later than the real one after quiet events (see [`handle`](Supervisor::handle)).
    deadline: Option<Option<Instant>>,
    /// The slot of every process spawned (a process never changes slots; retiring ones keep
    /// theirs): [`locate`](Supervisor::locate) looks there first. Entries leave with the
    /// process.
    slot_of: HashMap<WorkerKey, usize>,
    /// Events handled in full (state others may depend on changed), and quiet events that
    /// changed a worker's heartbeat or counts: [`revision`](Supervisor::revision).
    changes: u64,
    beats: u64,
    /// What the last [`settle`](Supervisor::settle) left, for the next one to bring up to date
    /// from the slots marked since instead of from every slot (see [`Supervisor::settle`]).
    cache: SettleCache,
    /// (Tests.) Every event is handled in full: the property test's twin, which the quiet
    /// path must never disagree with.
    #[cfg(test)]
    always_settle: bool,
    /// (Tests.) Settles that looked at the marked slots only, and those of them whose steps
    /// left the steady state they began in.
    #[cfg(test)]
    incremental_settles: u64,
    #[cfg(test)]
    key_changed_mid_settle: u64,
}

/// Connection steering (`ReusePort`), as the driver's failures left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Steering {
    /// Routes are sent and, as far as the supervisor knows, applied.
    On,
    /// A route did not fit a steering program (reported once); routes are still sent.
    Unfit,
    /// The kernel refused a program: no more routes, the kernel hashes.
    Off,
}

/// What the invariant pipeline keeps from one [`settle`](Supervisor::settle) to the next, so
/// that the next one, in the steady state, looks only at the slots marked since.
#[derive(Debug, Clone, Default)]
struct SettleCache {
    /// The global state the rest was computed under, when the next settle may bring it up to
    /// date from the marked slots (`None`: the next settle is a full one).
    key: Option<CacheKey>,
    /// Each slot's earliest deadline ([`Supervisor::slot_deadline`]).
    deadlines: DeadlineTree,
    /// The slots with a ready worker (or handed over, with their socket held), in order: the
    /// route, unless it is empty.
    ready: Vec<usize>,
    /// The slots whose worker was started and is not stopping, in order: the route while no
    /// slot is ready ([`Supervisor::started_to_route`]).
    started: Vec<usize>,
    /// The deploys each slot's program and its two processes run
    /// ([`Supervisor::slot_deploys`]), and how many of those entries name each deploy.
    deploys: Tallied<[Option<u64>; 3], DeployUses>,
    /// Until the start-up is announced: each slot's part in it ([`StartupPart::of`]), and how
    /// many slots are still to become active and how many are.
    startup: Tallied<StartupPart, StartupCounts>,
}

/// A value kept for each slot, and a tally over those values, brought up to date by
/// [`follow`](Tallied::follow).
#[derive(Debug, Clone)]
struct Tallied<T, C> {
    per_slot: Vec<T>,
    tally: C,
}

impl<T, C: Default> Default for Tallied<T, C> {
    fn default() -> Self {
        Tallied { per_slot: Vec::new(), tally: C::default() }
    }
}

/// How a [`Tallied`] tally counts a value in or out.
trait Tally<T>: Default {
    fn count(&mut self, value: T, add: bool);
}

impl<T: Copy + PartialEq, C: Tally<T>> Tallied<T, C> {
    /// Brings every slot's value (`of`) and the tally up to date: from the slots marked since
    /// the last settle when `incremental` (and a value is kept for each slot), else from every
    /// slot.
    fn follow(&mut self, slots: &Slots, incremental: bool, of: impl Fn(&Slot) -> T) {
        let n = slots.len();
        match slots.touched().slots().filter(|_| incremental && self.per_slot.len() == n) {
            Some(marked) => {
                for &i in marked.iter().filter(|&&i| i < n) {
                    let now = of(&slots[i]);
                    let before = std::mem::replace(&mut self.per_slot[i], now);
                    if before != now {
                        self.tally.count(before, false);
                        self.tally.count(now, true);
                    }
                }
            }
            None => {
                self.per_slot = slots.iter().map(of).collect();
                self.tally = C::default();
                for &value in &self.per_slot {
                    self.tally.count(value, true);
                }
            }
        }
    }
}

/// How many of the slots' entries ([`Supervisor::slot_deploys`]) name each deploy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DeployUses(BTreeMap<u64, usize>);

impl Tally<[Option<u64>; 3]> for DeployUses {
    fn count(&mut self, entries: [Option<u64>; 3], add: bool) {
        for deploy in entries.into_iter().flatten() {
            let n = self.0.entry(deploy).or_insert(0);
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
            if *n == 0 {
                self.0.remove(&deploy);
            }
        }
    }
}

/// How many slots are still to become active, and how many are, during the start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StartupCounts {
    waiting: usize,
    active: usize,
}

impl Tally<StartupPart> for StartupCounts {
    fn count(&mut self, part: StartupPart, add: bool) {
        let tally = match part {
            StartupPart::Waiting => &mut self.waiting,
            StartupPart::Active => &mut self.active,
            StartupPart::Neither => return,
        };
        *tally = if add { *tally + 1 } else { tally.saturating_sub(1) };
    }
}

/// A slot's part in the start-up's announcement ([`Supervisor::check_all_ready`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartupPart {
    /// Starting or respawning: holds the announcement back.
    Waiting,
    /// Serving: counts in it.
    Active,
    /// Disabled, crashed with respawn off, stopping or stopped: neither.
    Neither,
}

impl StartupPart {
    fn of(slot: &Slot) -> StartupPart {
        match slot.status() {
            WorkerStatus::Starting | WorkerStatus::Respawning => StartupPart::Waiting,
            WorkerStatus::Active => StartupPart::Active,
            _ => StartupPart::Neither,
        }
    }
}

/// The global state that what [`SettleCache`] keeps per slot depends on. It exists only in
/// the steady state: running, no upgrade, no shutdown delay, owning the cluster. Outside it
/// every settle is a full one. A rollout is part of the key (whether one runs, whether another
/// is queued): its start and its end change what other slots' results depend on (a slot left
/// empty that a rollout will revive keeps its socket; no slot recycles during one), while what
/// it does in between (a slot's replacement started, ready, failed) marks the slots it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheKey {
    slots: usize,
    steering: Steering,
    takeover: Takeover,
    rollout: bool,
    queued_restart: bool,
}

/// How late past its deadline the master may wake before it counts as held up (see
/// [`Supervisor::forgive_stall`]).
const STALL_TOLERANCE: std::time::Duration = std::time::Duration::from_millis(100);

const SIGKILL: Signal = Signal::KILL;
const SIGTERM: Signal = Signal::TERM;

/// The bit of `signal` in [`Proc::signalled`].
fn signal_bit(signal: Signal) -> u64 {
    let n = signal.as_raw();
    if (1..64).contains(&n) { 1u64 << n } else { 0 }
}

impl Supervisor {
    /// A supervisor for `policy`, created at `now`. Feed it [`Event::Tick`] to start the first
    /// worker.
    pub fn new(policy: Policy, now: Instant) -> Supervisor {
        let slots = (0..policy.workers)
            .map(|id| Slot::new(id, now + policy.startup_delay * id as u32, Program::Running))
            .collect();
        let startup_deadline = u32::try_from(policy.workers.saturating_sub(1))
            .ok()
            .and_then(|n| policy.startup_delay.checked_mul(n))
            .and_then(|last| last.checked_add(policy.ready_timeout))
            .and_then(|d| now.checked_add(d));
        Supervisor {
            startup_deadline,
            slots,
            retiring: Retiring::default(),
            phase: Phase::Running,
            next_key: 0,
            total_restarts: 0,
            announced_ready: false,
            rollout: None,
            queued_restart: None,
            last_restart: None,
            deploys: 0,
            program: Program::Running,
            routed: Vec::new(),
            sockets: BTreeSet::new(),
            steering: Steering::On,
            deployed: BTreeSet::new(),
            exits: ExitCounts::default(),
            recycle_queue: VecDeque::new(),
            next_sample: None,
            headroom: None,
            smallest_worker: None,
            rng: 0,
            expected_wake: None,
            last_handled: None,
            leaving_at: None,
            upgrade: None,
            handed_over: false,
            last_upgrade: None,
            generation: 0,
            takeover: Takeover::Own,
            release_at: None,
            predecessor_timeout: std::time::Duration::ZERO,
            predecessor_slots: None,
            predecessor_gone: false,
            history: History::new(crate::events::DEFAULT_EVENT_HISTORY, 0),
            said_ready: false,
            deadline: None,
            slot_of: HashMap::new(),
            changes: 0,
            beats: 0,
            cache: SettleCache::default(),
            #[cfg(test)]
            always_settle: false,
            #[cfg(test)]
            incremental_settles: 0,
            #[cfg(test)]
            key_changed_mid_settle: 0,
            policy,
        }
        .seeded(now)
    }

    fn seeded(mut self, now: Instant) -> Supervisor {
        self.rng = self.policy.liveness.seed;
        // Readings serve the memory limit, and tell every recycle whether a surge worker fits.
        let l = &self.policy.liveness;
        if l.max_memory.is_some() || l.max_requests.is_some() || l.max_age.is_some() {
            self.next_sample = now.checked_add(l.memory_interval);
        }
        self
    }

    /// A random number below `bound` (0 when `bound` is 0), from the seeded generator.
    fn random_below(&mut self, bound: u64) -> u64 {
        // splitmix64: small, fast, and good enough to spread recycles and respawns.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if bound == 0 { 0 } else { z % bound }
    }

    /// The slots whose socket the master opened before the supervisor started (`ReusePort`;
    /// ignored otherwise). Without it none is open: the socket of a slot is then opened by its
    /// first spawn. The master opens slot 0's only, so that no connection waits on the socket
    /// of a slot whose worker does not exist yet.
    #[must_use]
    pub fn with_open_sockets(mut self, slots: impl IntoIterator<Item = usize>) -> Supervisor {
        if self.policy.socket_per_slot {
            self.sockets = slots.into_iter().filter(|&s| s < self.slots.len()).collect();
        }
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn procs(&self) -> impl Iterator<Item = (usize, &Proc)> {
        self.slots
            .iter()
            .flat_map(|s| s.current.iter().chain(s.next.iter()).map(move |p| (s.id, p)))
            .chain(self.retiring.iter().map(|(slot, p)| (*slot, p)))
    }

    fn procs_mut(&mut self) -> impl Iterator<Item = (usize, &mut Proc)> {
        self.slots
            .iter_mut()
            .flat_map(|s| {
                let id = s.id;
                s.current.iter_mut().chain(s.next.iter_mut()).map(move |p| (id, p))
            })
            .chain(self.retiring.iter_mut().map(|(slot, p)| (*slot, p)))
    }

    /// Handles one event at time `now` (monotonic) and `wall` (for start times in statistics
    /// and the event history's entries, [`fresh_events`](Supervisor::fresh_events)).
    ///
    /// A heartbeat (or request counts, or a tick) that arrives while nothing is due is quiet:
    /// it moves one worker's liveness clock, and only later, so nothing another slot depends
    /// on changed and the invariant pipeline has nothing to restore. It costs O(1) whatever
    /// the number of workers: no [`settle`](Supervisor::settle) (O(N)), and the deadline
    /// is kept, with the worker's own timeout folded in (a first beat arms it). The kept
    /// deadline may then be earlier than the real one (the beating worker may have been the
    /// one it was for): waking then is a tick that settles in full and computes it anew, about
    /// once per worker timeout. Anything else (a beat that reaches the request limit, or one
    /// that comes when a deadline passed) is handled in full.
    pub fn handle(&mut self, event: Event, now: Instant, wall: SystemTime) -> Vec<Command> {
        let mut out = Vec::new();
        self.begin_history();
        if self.phase == Phase::Done {
            return out;
        }
        let quiet = matches!(self.deadline, Some(d) if d.is_none_or(|d| d > now))
            && matches!(event, Event::Tick | Event::Beat { .. } | Event::Served { .. } | Event::Alive { .. });
        #[cfg(test)]
        let quiet = quiet && !self.always_settle;
        let (tick, queued) = (event == Event::Tick, self.recycle_queue.len());
        // Events about one worker (or none, a tick): in the steady state they change its slot and
        // what the pipeline then does (a recycle they queue may start in another slot: marked
        // too), nothing another slot's cached results depend on. The settle that follows may
        // look at the marked slots only, if the steady state held before and after.
        let local = matches!(
            event,
            Event::Tick
                | Event::Spawned { .. }
                | Event::SpawnFailed { .. }
                | Event::Ready { .. }
                | Event::Exited { .. }
                | Event::Lost { .. }
                | Event::Beat { .. }
                | Event::Served { .. }
                | Event::Alive { .. }
        );
        let key = self.cache_key().filter(|k| local && self.cache.key == Some(*k));
        // The beating worker's timeout, after its beat.
        let mut watched = None;
        let before = self.phase;
        self.forgive_stall(now);
        // A shutdown delay that is over starts the drain before anything else happens at
        // `now`: what the event leads to then happens in the shutdown (no spawn in the batch
        // that begins it).
        self.leave_due(now, &mut out);
        match event {
            Event::Tick => {}
            Event::Spawned { key, pid } => self.on_spawned(key, pid, now, &mut out),
            Event::SpawnFailed { key, error } => self.on_spawn_failed(key, error, now, wall, &mut out),
            Event::Ready { key } => self.on_ready(key, now, wall, &mut out),
            Event::Exited { key, status } => self.on_exited(key, status, None, now, wall, &mut out),
            Event::Shutdown => self.on_shutdown(now, &mut out),
            Event::SignalWorkers { signal } => self.on_signal_workers(signal, &mut out),
            Event::Restart { ticket } => self.on_restart(ticket, now, wall, &mut out),
            Event::Scale { workers } => self.on_scale(workers, now, wall, &mut out),
            Event::Signal { signal } => self.on_signal(signal, now, wall, &mut out),
            Event::Lost { key } => self.on_lost(key, now, wall, &mut out),
            Event::SteerFailed { failure } => self.on_steer_failed(failure, &mut out),
            Event::Beat { key, served, in_flight } => {
                watched = self.on_beat(key, Some((served, in_flight)), true, now);
            }
            Event::Served { key, served, in_flight } => {
                watched = self.on_beat(key, Some((served, in_flight)), false, now);
            }
            Event::Alive { key } => watched = self.on_beat(key, None, true, now),
            Event::MemorySampled { readings, headroom } => self.on_memory(readings, headroom, now),
            Event::Upgrade { ticket, slot_by_slot } => self.on_upgrade(ticket, slot_by_slot, now, &mut out),
            Event::MasterSlotReady { slot } => self.on_master_slot_ready(slot, now, &mut out),
            Event::SlotFreed { slot } => self.on_slot_freed(slot, now, &mut out),
            Event::MasterSpawned { pid } => self.on_master_spawned(pid, &mut out),
            Event::MasterSpawnFailed { error, busy } => self.on_master_spawn_failed(error, busy, now, &mut out),
            Event::MasterReady => self.on_master_ready(now, &mut out),
            Event::MasterTookOver { slots } => self.on_master_took_over(slots, now, &mut out),
            Event::MasterCannotServe { reason } => self.on_master_cannot_serve(reason, now, &mut out),
            Event::PredecessorDraining => self.on_predecessor_draining(&mut out),
            Event::MasterExited { status, reason } => self.on_master_exited(status, reason, now, &mut out),
            Event::HandedOver => self.on_handed_over(now, &mut out),
            Event::PredecessorGone { clean } => self.on_predecessor_gone(clean, now, &mut out),
        }
        if quiet
            && out.is_empty()
            && self.recycle_queue.len() == queued
            && let Some(kept) = self.deadline
            && watched.is_none_or(|d| d > now)
        {
            let deadline = tracked::earlier(kept, watched);
            self.deadline = Some(deadline);
            if !tick {
                self.beats += 1;
            }
            self.expected_wake = deadline;
            self.last_handled = Some(now);
            return out;
        }
        let incremental = key.is_some() && self.cache_key() == key && self.slots.touched().slots().is_some();
        #[cfg(test)]
        let incremental = incremental && !self.always_settle;
        #[cfg(test)]
        {
            self.incremental_settles += u64::from(incremental);
        }
        self.settle(now, wall, &mut out, incremental);
        self.record_history(before, &out, wall);
        let deadline = tracked::earlier(self.cache.deadlines.earliest(), self.other_deadline());
        self.deadline = Some(deadline);
        self.changes += 1;
        self.expected_wake = deadline;
        self.last_handled = Some(now);
        out
    }

    /// How many events were handled in full so far, and how many quiet ones changed a
    /// worker's heartbeat or request counts: the driver republishes the statistics when the
    /// first number moves, and at a slower pace when only the second does.
    pub fn revision(&self) -> (u64, u64) {
        (self.changes, self.beats)
    }

    /// If the master itself was held up (stopped, frozen, paused, or a long callback) well past
    /// the time it asked to be woken, the workers' beats it could not read meanwhile are not
    /// their fault: every heartbeat clock moves on by the time since the master last ran, so
    /// each worker is as silent as it was then, and a master stall never has every healthy
    /// worker killed as hung. (A master that wakes on time, at a worker's deadline, forgives
    /// nothing.)
    fn forgive_stall(&mut self, now: Instant) {
        let Some(late) = self.expected_wake.and_then(|w| now.checked_duration_since(w)) else { return };
        let Some(away) = self.last_handled.and_then(|t| now.checked_duration_since(t)) else { return };
        if late <= STALL_TOLERANCE {
            return;
        }
        for (_, p) in self.procs_mut() {
            if let Some(t) = p.last_beat {
                p.last_beat = Some(t.checked_add(away).unwrap_or(now).min(now));
            }
        }
    }

    /// The invariant pipeline, run after every event: whatever the event was, it restores, in
    /// this order,
    ///
    /// 1. *nothing due is left pending* ([`on_time`](Self::on_time)): ready deadlines and stop
    ///    deadlines that passed are acted on, then spawns whose time came (including one those
    ///    scheduled for `now`). First, because every later step must see the state as it is at
    ///    `now` (a spawn due now is a process, a worker killed now is no longer counted on), and
    ///    because [`next_deadline`](Self::next_deadline) must then be in the future.
    ///    Then the recycles whose turn came start ([`start_recycles`](Self::start_recycles)),
    ///    since a trigger of this instant (a beat, a reading, an age) may have queued one.
    /// 2. *no socket stays open that nobody will serve* ([`close_unserved`](Self::close_unserved)):
    ///    once the processes of this instant are known (a respawn due now has been spawned, a
    ///    worker killed now is still there), the sockets of slots that no process holds and none
    ///    will hold again are closed, before the route is computed, so that the route the driver
    ///    applies next is over the group as it will be.
    /// 3. *connections go to ready workers only* ([`update_route`](Self::update_route)): the set
    ///    of slots with an active worker, sent when it changed.
    /// 4. *the start-up is announced once it is over* ([`check_all_ready`](Self::check_all_ready)):
    ///    after steps 1–3, so that a slot disabled or a worker made active at this instant counts.
    /// 5. *no deploy's program file stays open that no worker runs or will run*
    ///    ([`release_programs`](Self::release_programs)): after every step that may start a
    ///    process from one (spawns due now, a queued rollout that began).
    /// 6. *supervision ends when nothing is left* ([`check_done`](Self::check_done)): last,
    ///    because any earlier step may have started a process, and `Exit` must be the last
    ///    command the driver sees.
    ///
    /// Each step looks at every slot, or, when `incremental`, only at the slots marked since
    /// the last settle ([`tracked`]: every mutable access to a slot marks it) and, for the
    /// deadlines, at the slots whose earliest deadline came (a minimum tree,
    /// [`SettleCache::deadlines`]). That is exact in the steady state ([`CacheKey`]) after an
    /// event about one worker ([`handle`](Self::handle) decides): a slot not marked is as the last settle left it, so nothing of it is due (its deadline is in
    /// the tree), its socket is held (step 2 closed the others), its place in the route is
    /// known ([`SettleCache::ready`]) and so are the deploys it runs. The property test runs a
    /// twin that settles in full after every event and compares every command. A step that
    /// changes the steady state (a rollout's replacement failing at its ready deadline ends the
    /// rollout) makes the steps after it look at every slot
    /// ([`still_incremental`](Self::still_incremental)); that, or a slot marked after step 2
    /// (no step does that today), makes the next settle a full one.
    fn settle(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>, incremental: bool) {
        self.on_time(now, wall, out, incremental);
        self.start_recycles(now, wall, out);
        let marks = self.marks();
        self.close_unserved(out, incremental);
        self.update_route(out, incremental);
        self.check_all_ready(out, incremental);
        self.release_programs(out, incremental);
        self.check_done(out);
        // (An incremental settle whose steps changed the steady state, a rollout ended by a
        // replacement's ready deadline: the steps after the change already looked at every
        // slot; the tree is rebuilt now, and the next settle is a full one.)
        let changed = incremental && !self.still_incremental(true);
        #[cfg(test)]
        {
            self.key_changed_mid_settle += u64::from(changed);
        }
        let late = self.marks() != marks || changed;
        self.refresh_cache(now, incremental && !changed, late);
    }

    /// How many marks the slots and the retiring workers took so far.
    fn marks(&self) -> u64 {
        self.slots.touched().marks().wrapping_add(self.retiring.touched().marks())
    }

    /// The key of the steady state, in which a settle may look at marked slots only.
    fn cache_key(&self) -> Option<CacheKey> {
        let steady = self.phase == Phase::Running
            && self.upgrade.is_none()
            && !self.handed_over
            && self.leaving_at.is_none()
            && matches!(self.takeover, Takeover::Own | Takeover::Taken);
        steady.then_some(CacheKey {
            slots: self.slots.len(),
            steering: self.steering,
            takeover: self.takeover,
            rollout: self.rollout.is_some(),
            queued_restart: self.queued_restart.is_some(),
        })
    }

    /// Whether a step of an `incremental` settle may still look at the marked slots only: the
    /// steady state is the one the cache was built under. (A step may end it: a replacement
    /// failing at its ready deadline ends its rollout. The steps after it then look at every
    /// slot.)
    fn still_incremental(&self, incremental: bool) -> bool {
        incremental && self.cache.key.is_some() && self.cache_key() == self.cache.key
    }

    /// The slots a step of the pipeline looks at, in order: every slot, or (`incremental`)
    /// those marked since the last settle and those whose earliest deadline is at `now` or
    /// before. (The retiring workers' marks are not needed here: no step's condition and no
    /// slot's deadline depends on them; the steps look at every retiring worker.)
    fn scope(&self, now: Instant, incremental: bool) -> Vec<usize> {
        let n = self.slots.len();
        let Some(touched) = self.slots.touched().slots().filter(|_| self.still_incremental(incremental)) else {
            return (0..n).collect();
        };
        let mut scope: Vec<usize> = touched.iter().copied().filter(|&i| i < n).collect();
        self.cache.deadlines.due(now, &mut scope);
        scope.sort_unstable();
        scope.dedup();
        scope
    }

    /// (Tests.) What the cache says of every slot not marked since the last settle agrees with
    /// the slots, while the cache is in force: its deadline, its place among the ready slots,
    /// the deploys it runs.
    #[cfg(test)]
    fn check_cache(&self) -> Result<(), String> {
        if self.cache.key.is_none() || self.cache.key != self.cache_key() {
            return Ok(());
        }
        let (running, probing) = self.deadline_gates();
        let mut uses = BTreeMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            let deploys = Self::slot_deploys(s);
            for n in deploys.into_iter().flatten() {
                *uses.entry(n).or_insert(0usize) += 1;
            }
            if self.slots.touched().has(i) {
                continue;
            }
            let (kept, real) = (self.cache.deadlines.leaf(i), self.slot_deadline(i, running, probing));
            if kept != real {
                return Err(format!("slot {i}: deadline kept {kept:?}, real {real:?}"));
            }
            let kept = self.cache.deploys.per_slot.get(i);
            if kept != Some(&deploys) {
                return Err(format!("slot {i}: deploys kept {kept:?}, real {deploys:?}"));
            }
            let ready = self.ready_to_route(s);
            if self.routes() && ready != self.cache.ready.contains(&i) {
                return Err(format!("slot {i}: ready {ready}, kept otherwise"));
            }
            let started = Self::started_to_route(s);
            if self.routes() && started != self.cache.started.contains(&i) {
                return Err(format!("slot {i}: started {started}, kept otherwise"));
            }
            let (part, kept) = (StartupPart::of(s), self.cache.startup.per_slot.get(i));
            if !self.announced_ready && kept != Some(&part) {
                return Err(format!("slot {i}: start-up part kept {kept:?}, real {part:?}"));
            }
        }
        let none_marked = self.slots.touched().slots().is_some_and(|t| t.is_empty());
        if none_marked && uses != self.cache.deploys.tally.0 {
            return Err(format!("deploys in use: kept {:?}, real {uses:?}", self.cache.deploys.tally.0));
        }
        let parts = |p: StartupPart| self.slots.iter().filter(|s| StartupPart::of(s) == p).count();
        let counts = StartupCounts { waiting: parts(StartupPart::Waiting), active: parts(StartupPart::Active) };
        if none_marked && !self.announced_ready && counts != self.cache.startup.tally {
            return Err(format!("start-up: kept {:?}, real {counts:?}", self.cache.startup.tally));
        }
        // The lists whole (in order, once each: `update_route` relies on `binary_search`).
        let list = |f: &dyn Fn(&Slot) -> bool| self.slots.iter().filter(|s| f(s)).map(|s| s.id).collect::<Vec<_>>();
        let (ready, started) = (list(&|s| self.ready_to_route(s)), list(&Self::started_to_route));
        if none_marked && self.routes() && (ready != self.cache.ready || started != self.cache.started) {
            return Err(format!(
                "route lists: kept {:?} and {:?}, real {ready:?} and {started:?}",
                self.cache.ready, self.cache.started
            ));
        }
        Ok(())
    }

    /// Brings the per-slot deadlines up to date after a settle at `now` (from the marked slots
    /// and those whose deadline came, or from all of them), records under which state, and
    /// clears the marks. (A slot whose deadline came was acted on, and so marked; looking at
    /// the due ones again means no deadline of the past can stay in the tree whatever a step
    /// does.)
    fn refresh_cache(&mut self, now: Instant, incremental: bool, late: bool) {
        let (running, probing) = self.deadline_gates();
        let n = self.slots.len();
        let mut tree = std::mem::take(&mut self.cache.deadlines);
        match self.slots.touched().slots() {
            Some(touched) if incremental && tree.covers(n) => {
                for &i in touched.iter().filter(|&&i| i < n) {
                    tree.set(i, self.slot_deadline(i, running, probing));
                }
                let mut due = Vec::new();
                tree.due(now, &mut due);
                for i in due {
                    tree.set(i, self.slot_deadline(i, running, probing));
                }
            }
            _ => tree = DeadlineTree::build((0..n).map(|i| self.slot_deadline(i, running, probing))),
        }
        self.cache.deadlines = tree;
        self.cache.key = if late { None } else { self.cache_key() };
        self.slots.clear_touched();
        self.retiring.clear_touched();
    }

    /// Asks the driver to start process `key` in `slot`, from `program`. The driver opens what
    /// it needs: the slot's socket if it was closed, a deploy's program file (closed by
    /// [`Command::CloseSocket`] and [`Command::ReleaseProgram`] once nobody needs them).
    fn push_spawn(&mut self, slot: usize, p: &Proc, out: &mut Vec<Command>) {
        if let Program::Deployed(n) = p.program {
            self.deployed.insert(n);
        }
        if self.policy.socket_per_slot {
            self.sockets.insert(slot);
        }
        self.slot_of.insert(p.key, slot);
        out.push(Command::Spawn { slot, key: p.key, program: p.program, request_limit: p.request_limit });
    }

    /// Where process `key` is kept: O(1) through [`slot_of`](Supervisor::slot_of) for a slot's
    /// processes (the retiring list for the others), a scan for a key it does not know.
    fn locate(&self, key: WorkerKey) -> Option<Loc> {
        if let Some(&slot) = self.slot_of.get(&key) {
            if let Some(s) = self.slots.get(slot) {
                if s.current.as_ref().is_some_and(|p| p.key == key) {
                    return Some(Loc::Current(slot));
                }
                if s.next.as_ref().is_some_and(|p| p.key == key) {
                    return Some(Loc::Next(slot));
                }
            }
            return self.retiring.iter().position(|(_, p)| p.key == key).map(Loc::Retiring);
        }
        for s in &self.slots {
            if s.current.as_ref().is_some_and(|p| p.key == key) {
                return Some(Loc::Current(s.id));
            }
            if s.next.as_ref().is_some_and(|p| p.key == key) {
                return Some(Loc::Next(s.id));
            }
        }
        self.retiring.iter().position(|(_, p)| p.key == key).map(Loc::Retiring)
    }

    fn proc_at(&mut self, loc: Loc) -> Option<&mut Proc> {
        match loc {
            Loc::Current(i) => self.slots[i].current.as_mut(),
            Loc::Next(i) => self.slots[i].next.as_mut(),
            Loc::Retiring(i) => self.retiring.get_mut(i).map(|(_, p)| p),
        }
    }

    fn take_at(&mut self, loc: Loc) -> Option<(usize, Proc)> {
        match loc {
            Loc::Current(i) => self.slots[i].current.take().map(|p| (i, p)),
            Loc::Next(i) => self.slots[i].next.take().map(|p| (i, p)),
            Loc::Retiring(i) => Some(self.retiring.swap_remove(i)),
        }
    }

    /// Asks a worker to stop (`why`: what its exit will be counted as): SIGTERM now, SIGKILL at
    /// the shutdown timeout.
    fn stop(&self, p: &mut Proc, why: ExitReason, now: Instant, out: &mut Vec<Command>) {
        p.stop_at = None;
        p.why_stopped.get_or_insert(why);
        if p.state == ProcState::Stopping {
            // Already stopping (a hung worker's grace may be longer): never later than asked.
            let by = now.checked_add(self.policy.shutdown_timeout);
            p.stop_deadline = tracked::earlier(p.stop_deadline, by);
            return;
        }
        if p.state != ProcState::Spawning {
            p.signalled |= signal_bit(SIGTERM);
            out.push(Command::Signal { key: p.key, signal: SIGTERM });
        }
        p.state = ProcState::Stopping;
        p.stop_deadline = Some(now + self.policy.shutdown_timeout);
    }

    fn new_proc(&mut self, program: Program, now: Instant, wall: SystemTime) -> Proc {
        let key = WorkerKey(self.next_key);
        self.next_key += 1;
        let l = &self.policy.liveness;
        let (max_requests, requests_jitter, max_age, age_jitter) =
            (l.max_requests, l.max_requests_jitter, l.max_age, l.max_age_jitter);
        let request_limit =
            max_requests.map(|n| n.max(1).saturating_add(self.random_below(requests_jitter.saturating_add(1))));
        let recycle_at = max_age.and_then(|age| {
            let jitter_ms = u64::try_from(age_jitter.as_millis()).unwrap_or(u64::MAX);
            let extra = std::time::Duration::from_millis(self.random_below(jitter_ms.saturating_add(1)));
            age.checked_add(extra).and_then(|d| now.checked_add(d))
        });
        Proc {
            key,
            pid: None,
            state: ProcState::Spawning,
            program,
            started: now,
            started_wall: wall,
            signalled: 0,
            stop_deadline: None,
            stop_at: None,
            ready_deadline: now.checked_add(self.policy.ready_timeout),
            not_ready: false,
            last_beat: None,
            counted: false,
            served: 0,
            in_flight: 0,
            hung: false,
            request_limit,
            recycle_at,
            over_memory: 0,
            why_stopped: None,
            recycling: false,
        }
    }
}
