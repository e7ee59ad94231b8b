//! The supervisor: every decision the master makes, as a pure state machine.
//!
//! It does no I/O and reads no clock. The driver ([`crate::Master::wait`]) feeds it [`Event`]s
//! with the current time and carries out the [`Command`]s it returns; [`Supervisor::next_deadline`]
//! says when to wake it with [`Event::Tick`] if nothing else happens. Every policy (start-up
//! pacing, crash classification, respawn delay, crash protection, rolling restarts, scaling,
//! stop timeouts) lives here and is unit-tested with a fake clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use crate::signal::Signal;
use crate::stats::{ClusterStats, ExitStatus, RestartOutcome, WorkerStats, WorkerStatus};

/// The most worker slots a cluster accepts. Each slot costs the master a few file descriptors
/// (a pidfd, a channel and, with `Balance::ReusePort`, a socket); beyond this a count is almost
/// certainly a mistake (a 256-core host's count on a 2-CPU quota, a typo).
pub const MAX_WORKERS: usize = 4096;

#[cfg(test)]
mod tests;

/// The policy numbers the supervisor works with (from [`crate::Cluster`]).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Worker slots.
    pub workers: usize,
    /// Port reported in statistics.
    pub port: u16,
    /// Respawn workers that exit unasked.
    pub respawn: bool,
    /// Time a stopping worker gets before SIGKILL.
    pub shutdown_timeout: Duration,
    /// Delay between initial spawns.
    pub startup_delay: Duration,
    /// Delay before a respawn.
    pub respawn_delay: Duration,
    /// Crash-protection window.
    pub respawn_window: Duration,
    /// Crashes within the window that disable a slot.
    pub max_crashes: u32,
    /// Each slot has its own socket (`Balance::ReusePort`), which must be closed when the slot is
    /// disabled or removed.
    pub socket_per_slot: bool,
    /// How long a graceful restart waits for a replacement to report ready.
    pub ready_timeout: Duration,
}

/// Which program file a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// The binary the master itself runs (`/proc/self/exe`): crash respawns use it, so a file
    /// replaced on disk never mixes versions by accident.
    Running,
    /// The program file found at the original path when graceful restart number `n` began (a
    /// deploy). Workers started by that restart, and their crash respawns, run it.
    Deployed(u64),
}

/// Identifies one worker process for its whole life (a slot holds many over time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerKey(pub u64);

/// Something that happened, fed to [`Supervisor::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed (also used to start the machine).
    Tick,
    /// The driver started the process asked for by [`Command::Spawn`].
    Spawned {
        /// The process.
        key: WorkerKey,
        /// Its pid.
        pid: u32,
    },
    /// The driver could not start the process asked for by [`Command::Spawn`].
    SpawnFailed {
        /// The process that was not started.
        key: WorkerKey,
        /// Why.
        error: String,
    },
    /// A worker reported ready.
    Ready {
        /// The worker.
        key: WorkerKey,
    },
    /// A worker process ended (and was reaped).
    Exited {
        /// The worker.
        key: WorkerKey,
        /// How it ended.
        status: ExitStatus,
    },
    /// A graceful shutdown was asked for (SIGTERM, SIGINT, a handle). Asked again while one runs,
    /// it becomes immediate: the remaining workers are killed.
    Shutdown,
    /// Send `signal` to every active worker (the spec's `cluster_signal_workers`).
    SignalWorkers {
        /// The signal.
        signal: Signal,
    },
    /// A graceful (rolling) restart was asked for; `ticket` identifies a caller waiting for its
    /// outcome ([`Report::RestartFinished`] lists the tickets it answers).
    Restart {
        /// The waiting caller, if any.
        ticket: Option<u64>,
    },
    /// Change the number of worker slots (at least 1).
    Scale {
        /// The new number of slots.
        workers: usize,
    },
    /// One worker more or fewer (`SIGTTIN`, `SIGTTOU`): refused below 1 or above
    /// [`crate::MAX_WORKERS`].
    ScaleBy {
        /// Slots to add (or, negative, remove).
        delta: isize,
    },
}

/// Something the driver must do, returned by [`Supervisor::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start a worker process for `slot`, identified from now on by `key`. The driver answers
    /// with [`Event::Spawned`] or [`Event::SpawnFailed`].
    Spawn {
        /// The slot (worker id).
        slot: usize,
        /// The new process's key.
        key: WorkerKey,
        /// The program file to execute.
        program: Program,
    },
    /// Send a signal to a worker (through its pidfd).
    Signal {
        /// The worker.
        key: WorkerKey,
        /// The signal.
        signal: Signal,
    },
    /// New connections should go to the sockets of these slots only (`ReusePort` only): the
    /// slots whose worker is ready. Sent whenever the set changes; empty means "no preference".
    Route {
        /// The slots to route to.
        slots: Vec<usize>,
    },
    /// Close the listening socket of a slot (`ReusePort` only): the slot is disabled or removed
    /// and no process of it holds the socket any more (closing it while one does would not take
    /// it out of the kernel's group, and would reset what that process still takes from it).
    /// Spawning into a slot whose socket is closed opens a new one.
    CloseSocket {
        /// The slot.
        slot: usize,
    },
    /// Close every listening socket: the cluster is shutting down.
    CloseListeners,
    /// Tell the user (log line, callback).
    Report(Report),
    /// Supervision is over: return from `wait()` with this outcome.
    Exit(Outcome),
}

/// How supervision ended ([`Command::Exit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A requested shutdown finished, or every worker exited cleanly with respawn off.
    Stopped,
    /// No worker can run any more.
    AllFailed {
        /// Slots configured.
        workers: usize,
        /// Slots disabled by crash protection.
        disabled: usize,
        /// Slots whose worker crashed with respawn off.
        crashed: usize,
    },
}

/// A fact worth telling the user: the driver logs it and runs the matching callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A worker process started (`on_start`).
    Started {
        /// Slot.
        slot: usize,
        /// Pid.
        pid: u32,
    },
    /// A worker could not be started.
    SpawnFailed {
        /// Slot.
        slot: usize,
        /// Why.
        error: String,
    },
    /// A worker reported ready (`on_worker_ready`).
    Ready {
        /// Slot.
        slot: usize,
        /// Pid.
        pid: u32,
    },
    /// Every initial worker is ready (`on_ready`); reported once.
    AllReady {
        /// Workers serving.
        workers: usize,
    },
    /// A worker process ended (`on_exit`).
    Exited {
        /// Slot.
        slot: usize,
        /// Pid.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
        /// It was not asked to stop and did not exit cleanly.
        crash: bool,
        /// When it will be started again, if it will.
        respawn_in: Option<Duration>,
    },
    /// Crash protection disabled a slot.
    Disabled {
        /// Slot.
        slot: usize,
        /// Crashes within the window.
        crashes: u32,
        /// Time from the first of them to the last.
        within: Duration,
    },
    /// A shutdown began.
    ShuttingDown {
        /// Workers asked to stop.
        workers: usize,
    },
    /// A signal was sent to the active workers.
    Signalled {
        /// The signal.
        signal: Signal,
        /// Slots of the workers signalled.
        slots: Vec<usize>,
    },
    /// Stopping workers outlived the shutdown timeout and are being killed.
    StopTimeout {
        /// Slots of the workers killed.
        slots: Vec<usize>,
    },
    /// A graceful restart began.
    RestartStarted {
        /// Slots to replace.
        workers: usize,
    },
    /// A restart was asked for while one runs: it will run once the current one ends.
    RestartQueued,
    /// A replacement is ready and the worker it replaces was asked to stop.
    Replaced {
        /// Slot.
        slot: usize,
        /// The old worker's pid, if the slot had one.
        old_pid: Option<u32>,
        /// The new worker's pid.
        new_pid: u32,
    },
    /// A graceful restart ended.
    RestartFinished {
        /// How.
        outcome: RestartOutcome,
        /// The waiting callers it answers.
        tickets: Vec<u64>,
    },
    /// A relative scale would leave fewer than 1 or more than [`crate::MAX_WORKERS`] slots.
    ScaleRefused {
        /// The number it would have reached.
        workers: isize,
    },
    /// The number of slots changed.
    Scaled {
        /// Slots before.
        from: usize,
        /// Slots now.
        to: usize,
    },
}

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
    last_start_wall: Option<SystemTime>,
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
            last_start_wall: None,
        }
    }

    fn status(&self) -> WorkerStatus {
        if self.disabled {
            return WorkerStatus::Disabled;
        }
        match (&self.current, self.next_spawn) {
            (Some(p), _) => match p.state {
                ProcState::Spawning | ProcState::Starting => WorkerStatus::Starting,
                ProcState::Active => WorkerStatus::Active,
                ProcState::Stopping => WorkerStatus::Stopping,
            },
            (None, Some((_, SpawnReason::Initial))) => WorkerStatus::Starting,
            (None, Some((_, SpawnReason::Respawn))) => WorkerStatus::Respawning,
            (None, None) if self.next.is_some() => WorkerStatus::Starting,
            (None, None) => match self.last_exit {
                Some((_, true)) => WorkerStatus::Crashed,
                _ => WorkerStatus::Stopped,
            },
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
    /// The slot whose replacement is starting, and when it must be ready.
    current: Option<(usize, Instant)>,
    program: Program,
    tickets: Vec<u64>,
    replaced: usize,
}

/// The supervisor state machine. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Supervisor {
    policy: Policy,
    slots: Vec<Slot>,
    /// Workers asked to stop that no slot counts any more (replaced, or their slot removed).
    retiring: Vec<(usize, Proc)>,
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
    /// Slots (disabled or removed) whose socket is to be closed once no process holds it.
    unserved: std::collections::BTreeSet<usize>,
}

/// How long the sockets of removed slots stop receiving new connections before their workers
/// are asked to stop (`ReusePort`): long enough for handshakes that began before the route
/// changed to complete (clients with a round trip under a second), so that what is queued on
/// the socket when the worker takes its last connections is all it will ever get.
pub const ROUTE_SETTLE: Duration = Duration::from_secs(1);

const SIGKILL: Signal = Signal::KILL;
const SIGTERM: Signal = Signal::TERM;

fn signal_bit(signal: Signal) -> u64 {
    let n = signal.as_raw();
    if (1..64).contains(&n) { 1u64 << n } else { 0 }
}

fn is_crash(status: ExitStatus, signalled: u64) -> bool {
    match status {
        ExitStatus::Code(code) => code != 0,
        ExitStatus::Signal(sig) => signalled & signal_bit(sig) == 0,
    }
}

impl Supervisor {
    /// A supervisor for `policy`, created at `now`. Feed it [`Event::Tick`] to start the first
    /// worker.
    pub fn new(policy: Policy, now: Instant) -> Supervisor {
        let slots = (0..policy.workers)
            .map(|id| Slot::new(id, now + policy.startup_delay * id as u32, Program::Running))
            .collect();
        Supervisor {
            policy,
            slots,
            retiring: Vec::new(),
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
            unserved: Default::default(),
        }
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

    /// When the supervisor wants an [`Event::Tick`] at the latest, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let spawns = match self.phase {
            Phase::Running => self.slots.iter().filter_map(|s| s.next_spawn.map(|(t, _)| t)).min(),
            _ => None,
        };
        let ready = self.rollout.as_ref().and_then(|r| r.current.map(|(_, t)| t));
        let stops = self.procs().filter_map(|(_, p)| p.stop_deadline.or(p.stop_at)).min();
        [spawns, ready, stops].into_iter().flatten().min()
    }

    /// True once every initial worker has been ready ([`Report::AllReady`] was sent).
    pub fn started(&self) -> bool {
        self.announced_ready
    }

    /// True once [`Command::Exit`] has been returned.
    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The program files workers currently run or will run (the driver may release others).
    pub fn programs_in_use(&self) -> Vec<Program> {
        let mut v: Vec<Program> = self
            .slots
            .iter()
            .map(|s| s.program)
            .chain(self.procs().map(|(_, p)| p.program))
            .chain(self.rollout.iter().map(|r| r.program))
            .collect();
        v.dedup();
        v
    }

    /// Handles one event at time `now` (monotonic) and `wall` (for start times in statistics).
    pub fn handle(&mut self, event: Event, now: Instant, wall: SystemTime) -> Vec<Command> {
        let mut out = Vec::new();
        if self.phase == Phase::Done {
            return out;
        }
        match event {
            Event::Tick => {}
            Event::Spawned { key, pid } => self.on_spawned(key, pid, now, &mut out),
            Event::SpawnFailed { key, error } => self.on_spawn_failed(key, error, now, wall, &mut out),
            Event::Ready { key } => self.on_ready(key, now, wall, &mut out),
            Event::Exited { key, status } => self.on_exited(key, status, now, wall, &mut out),
            Event::Shutdown => self.on_shutdown(now, &mut out),
            Event::SignalWorkers { signal } => self.on_signal_workers(signal, &mut out),
            Event::Restart { ticket } => self.on_restart(ticket, now, wall, &mut out),
            Event::Scale { workers } => self.on_scale(workers, now, wall, &mut out),
            Event::ScaleBy { delta } => {
                let to = self.slots.len() as isize + delta;
                match usize::try_from(to) {
                    Ok(n) if (1..=MAX_WORKERS).contains(&n) => self.on_scale(n, now, wall, &mut out),
                    _ => out.push(Command::Report(Report::ScaleRefused { workers: to })),
                }
            }
        }
        self.on_time(now, wall, &mut out);
        self.close_unserved(&mut out);
        self.update_route(&mut out);
        self.check_all_ready(&mut out);
        self.check_done(&mut out);
        out
    }

    fn locate(&self, key: WorkerKey) -> Option<Loc> {
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

    /// Asks a worker to stop: SIGTERM now, SIGKILL at the shutdown timeout.
    fn stop(&self, p: &mut Proc, now: Instant, out: &mut Vec<Command>) {
        p.stop_at = None;
        if p.state == ProcState::Stopping {
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
        }
    }

    fn on_spawned(&mut self, key: WorkerKey, pid: u32, now: Instant, out: &mut Vec<Command>) {
        let Some(loc) = self.locate(key) else { return };
        let shutting_down = self.phase != Phase::Running;
        let slot = match loc {
            Loc::Current(i) | Loc::Next(i) => i,
            Loc::Retiring(i) => self.retiring[i].0,
        };
        let mut p = self.take_at(loc).expect("located").1;
        p.pid = Some(pid);
        let stopping = p.state == ProcState::Stopping;
        p.state = ProcState::Starting;
        out.push(Command::Report(Report::Started { slot, pid }));
        if shutting_down || stopping {
            // Asked to stop before it even started: stop it straight away.
            self.stop(&mut p, now, out);
        }
        match loc {
            Loc::Current(i) => self.slots[i].current = Some(p),
            Loc::Next(i) => self.slots[i].next = Some(p),
            Loc::Retiring(_) => self.retiring.push((slot, p)),
        }
    }

    fn on_spawn_failed(
        &mut self,
        key: WorkerKey,
        error: String,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Command>,
    ) {
        let Some(loc) = self.locate(key) else { return };
        let (slot, _) = self.take_at(loc).expect("located");
        out.push(Command::Report(Report::SpawnFailed { slot, error: error.clone() }));
        match loc {
            // A worker that cannot even start counts as a crash: crash protection stops a loop.
            Loc::Current(_) => {
                self.after_exit(slot, ExitStatus::Code(127), true, now, out);
            }
            Loc::Next(_) => self.fail_rollout(slot, format!("cannot start the new worker: {error}"), now, wall, out),
            Loc::Retiring(_) => {}
        }
    }

    fn on_ready(&mut self, key: WorkerKey, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let Some(loc) = self.locate(key) else { return };
        let Some(p) = self.proc_at(loc) else { return };
        if p.state != ProcState::Starting {
            return;
        }
        p.state = ProcState::Active;
        let pid = p.pid.unwrap_or(0);
        match loc {
            Loc::Current(slot) => out.push(Command::Report(Report::Ready { slot, pid })),
            Loc::Next(slot) => {
                out.push(Command::Report(Report::Ready { slot, pid }));
                self.promote(slot, now, out);
                self.advance_rollout(now, wall, out);
            }
            Loc::Retiring(_) => {}
        }
    }

    /// The replacement of `slot` is ready: it takes the slot, and the old worker drains.
    fn promote(&mut self, slot: usize, now: Instant, out: &mut Vec<Command>) {
        let s = &mut self.slots[slot];
        let Some(new) = s.next.take() else { return };
        let new_pid = new.pid.unwrap_or(0);
        s.program = new.program;
        s.last_start_wall = Some(new.started_wall);
        s.next_spawn = None;
        // A deploy gives a disabled slot a new chance.
        s.disabled = false;
        s.recent_crashes.clear();
        let old = s.current.replace(new);
        let old_pid = old.as_ref().and_then(|p| p.pid);
        if let Some(mut old) = old {
            self.stop(&mut old, now, out);
            self.retiring.push((slot, old));
        }
        self.total_restarts += 1;
        self.slots[slot].restarts += 1;
        if let Some(r) = &mut self.rollout {
            r.current = None;
            r.replaced += 1;
        }
        out.push(Command::Report(Report::Replaced { slot, old_pid, new_pid }));
    }

    fn on_exited(
        &mut self,
        key: WorkerKey,
        status: ExitStatus,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Command>,
    ) {
        let Some(loc) = self.locate(key) else { return };
        let (slot, p) = self.take_at(loc).expect("located");
        let pid = p.pid.unwrap_or(0);
        let asked = p.state == ProcState::Stopping;
        let crash = !asked && is_crash(status, p.signalled);
        match loc {
            Loc::Current(_) => {
                let respawn_in = self.after_exit(slot, status, crash, now, out);
                out.push(Command::Report(Report::Exited { slot, pid, status, crash, respawn_in }));
            }
            Loc::Next(_) => {
                // A replacement that dies before it is ready: a broken deploy, not a crash of
                // the slot (its old worker still serves).
                out.push(Command::Report(Report::Exited { slot, pid, status, crash: false, respawn_in: None }));
                if !asked {
                    let reason = format!("the new worker exited before it was ready ({status})");
                    self.fail_rollout(slot, reason, now, wall, out);
                }
            }
            Loc::Retiring(_) => {
                out.push(Command::Report(Report::Exited { slot, pid, status, crash: false, respawn_in: None }))
            }
        }
    }

    /// Book-keeping after the current process of `slot` is gone: crash protection and respawn.
    /// Returns the respawn delay if the slot will be started again.
    fn after_exit(
        &mut self,
        slot: usize,
        status: ExitStatus,
        crash: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) -> Option<Duration> {
        let policy = &self.policy;
        let s = &mut self.slots[slot];
        s.last_exit = Some((status, crash));
        if self.phase != Phase::Running {
            return None;
        }
        if crash {
            s.crash_count += 1;
            s.recent_crashes.push_back(now);
            while s.recent_crashes.front().is_some_and(|&t| now.duration_since(t) > policy.respawn_window) {
                s.recent_crashes.pop_front();
            }
            let crashes = s.recent_crashes.len() as u32;
            if policy.respawn && crashes >= policy.max_crashes && s.next.is_none() {
                s.disabled = true;
                let within = now.duration_since(*s.recent_crashes.front().unwrap_or(&now));
                out.push(Command::Report(Report::Disabled { slot, crashes, within }));
                if policy.socket_per_slot {
                    self.unserved.insert(slot);
                }
                return None;
            }
        }
        // A replacement already starting takes the slot over: no respawn.
        if policy.respawn && s.next.is_none() {
            s.next_spawn = Some((now + policy.respawn_delay, SpawnReason::Respawn));
            return Some(policy.respawn_delay);
        }
        None
    }

    fn on_shutdown(&mut self, now: Instant, out: &mut Vec<Command>) {
        match self.phase {
            Phase::Running => {
                self.phase = Phase::ShuttingDown { killed: false };
                out.push(Command::CloseListeners);
                let cancelled =
                    |replaced| RestartOutcome::Cancelled { reason: "the cluster is shutting down".into(), replaced };
                if let Some(r) = self.rollout.take() {
                    self.finish_restart(cancelled(r.replaced), r.tickets, out);
                }
                if let Some(tickets) = self.queued_restart.take() {
                    self.finish_restart(cancelled(0), tickets, out);
                }
                let mut workers = 0;
                let mut slots = std::mem::take(&mut self.slots);
                for s in &mut slots {
                    s.next_spawn = None;
                    for p in s.current.iter_mut().chain(s.next.iter_mut()) {
                        workers += 1;
                        self.stop(p, now, out);
                    }
                }
                self.slots = slots;
                // Workers of removed slots still waiting for their stop: now.
                let mut retiring = std::mem::take(&mut self.retiring);
                for (_, p) in &mut retiring {
                    self.stop(p, now, out);
                }
                self.retiring = retiring;
                out.push(Command::Report(Report::ShuttingDown { workers }));
            }
            // Asked again: do not wait for the timeout.
            Phase::ShuttingDown { killed: false } => self.kill_all(out),
            Phase::ShuttingDown { killed: true } | Phase::Done => {}
        }
    }

    fn on_signal_workers(&mut self, signal: Signal, out: &mut Vec<Command>) {
        let mut slots = Vec::new();
        for s in &mut self.slots {
            if let Some(p) = s.current.as_mut().filter(|p| p.state == ProcState::Active) {
                // Remembered: a death by this signal is then not a crash.
                p.signalled |= signal_bit(signal);
                slots.push(s.id);
                out.push(Command::Signal { key: p.key, signal });
            }
        }
        out.push(Command::Report(Report::Signalled { signal, slots }));
    }

    fn kill_all(&mut self, out: &mut Vec<Command>) {
        let mut slots = Vec::new();
        for (slot, p) in self.procs_mut() {
            if p.state != ProcState::Spawning {
                slots.push(slot);
                p.signalled |= signal_bit(SIGKILL);
                p.stop_deadline = None;
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
            }
        }
        if let Phase::ShuttingDown { .. } = self.phase {
            self.phase = Phase::ShuttingDown { killed: true };
        }
        if !slots.is_empty() {
            out.push(Command::Report(Report::StopTimeout { slots }));
        }
    }

    fn on_restart(&mut self, ticket: Option<u64>, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let tickets: Vec<u64> = ticket.into_iter().collect();
        if self.phase != Phase::Running {
            let outcome = RestartOutcome::Cancelled { reason: "the cluster is shutting down".into(), replaced: 0 };
            self.finish_restart(outcome, tickets, out);
            return;
        }
        if self.rollout.is_some() {
            // Coalesced: one more rollout after this one, whoever asks and how often.
            self.queued_restart.get_or_insert_with(Vec::new).extend(tickets);
            out.push(Command::Report(Report::RestartQueued));
            return;
        }
        self.start_rollout(tickets, now, wall, out);
    }

    fn start_rollout(&mut self, tickets: Vec<u64>, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        self.deploys += 1;
        self.rollout = Some(Rollout {
            queue: (0..self.slots.len()).collect(),
            current: None,
            program: Program::Deployed(self.deploys),
            tickets,
            replaced: 0,
        });
        out.push(Command::Report(Report::RestartStarted { workers: self.slots.len() }));
        self.advance_rollout(now, wall, out);
    }

    /// Starts the replacement of the next slot, or ends the rollout when none is left.
    fn advance_rollout(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let Some(r) = &mut self.rollout else { return };
        if r.current.is_some() {
            return;
        }
        let Some(slot) = r.queue.pop_front() else {
            let r = self.rollout.take().expect("checked");
            self.program = r.program;
            self.finish_restart(RestartOutcome::Completed { replaced: r.replaced }, r.tickets, out);
            self.start_queued(now, wall, out);
            return;
        };
        let program = r.program;
        r.current = Some((slot, now + self.policy.ready_timeout));
        let p = self.new_proc(program, now, wall);
        let key = p.key;
        let s = &mut self.slots[slot];
        // The replacement takes the slot over: no respawn or first start on top of it.
        s.next_spawn = None;
        s.next = Some(p);
        out.push(Command::Spawn { slot, key, program });
    }

    /// The replacement of `slot` failed: stop the rollout there (a queued restart then starts).
    fn fail_rollout(&mut self, slot: usize, reason: String, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let Some(r) = self.rollout.take_if(|r| r.current.is_some_and(|(s, _)| s == slot)) else { return };
        let s = &mut self.slots[slot];
        // The slot lost its worker while the replacement was starting: respawn it as usual.
        if s.current.is_none() && !s.disabled && self.policy.respawn && self.phase == Phase::Running {
            s.next_spawn = Some((now + self.policy.respawn_delay, SpawnReason::Respawn));
        }
        self.finish_restart(RestartOutcome::Failed { worker_id: slot, reason, replaced: r.replaced }, r.tickets, out);
        self.start_queued(now, wall, out);
    }

    fn finish_restart(&mut self, outcome: RestartOutcome, tickets: Vec<u64>, out: &mut Vec<Command>) {
        self.last_restart = Some(outcome.clone());
        out.push(Command::Report(Report::RestartFinished { outcome, tickets }));
    }

    fn start_queued(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        if self.rollout.is_none()
            && self.phase == Phase::Running
            && let Some(tickets) = self.queued_restart.take()
        {
            self.start_rollout(tickets, now, wall, out);
        }
    }

    fn on_scale(&mut self, workers: usize, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let from = self.slots.len();
        if self.phase != Phase::Running || workers == 0 || workers == from {
            return;
        }
        if workers > from {
            for id in from..workers {
                self.slots.push(Slot::new(id, now + self.policy.startup_delay * (id - from) as u32, self.program));
                // A rollout under way replaces them too, so that they end on its program.
                if let Some(r) = &mut self.rollout {
                    r.queue.push_back(id);
                }
            }
        } else {
            let removed: Vec<Slot> = self.slots.drain(workers..).collect();
            // Route new connections away from the removed slots before their workers stop.
            self.update_route(out);
            for mut s in removed.into_iter().rev() {
                for mut p in s.current.take().into_iter().chain(s.next.take()) {
                    if self.policy.socket_per_slot && p.state == ProcState::Active {
                        p.stop_at = Some(now + ROUTE_SETTLE);
                    } else {
                        self.stop(&mut p, now, out);
                    }
                    self.retiring.push((s.id, p));
                }
                if self.policy.socket_per_slot {
                    self.unserved.insert(s.id);
                }
            }
            if let Some(r) = &mut self.rollout {
                r.queue.retain(|&s| s < workers);
                if r.current.is_some_and(|(s, _)| s >= workers) {
                    r.current = None;
                }
            }
        }
        self.policy.workers = workers;
        out.push(Command::Report(Report::Scaled { from, to: workers }));
        self.advance_rollout(now, wall, out);
    }

    /// Acts on whatever is due at `now`: spawns, the restart's ready deadline, stop timeouts.
    fn on_time(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        if self.phase == Phase::Running {
            for i in 0..self.slots.len() {
                let Some((due, reason)) = self.slots[i].next_spawn else { continue };
                if due > now {
                    continue;
                }
                let program = self.slots[i].program;
                let p = self.new_proc(program, now, wall);
                let key = p.key;
                let s = &mut self.slots[i];
                if reason == SpawnReason::Respawn {
                    self.total_restarts += 1;
                    s.restarts += 1;
                }
                s.next_spawn = None;
                s.last_start_wall = Some(wall);
                s.current = Some(p);
                out.push(Command::Spawn { slot: i, key, program });
            }
        }
        if let Some((slot, deadline)) = self.rollout.as_ref().and_then(|r| r.current)
            && now >= deadline
        {
            if let Some(mut p) = self.slots[slot].next.take() {
                p.signalled |= signal_bit(SIGKILL);
                p.state = ProcState::Stopping;
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
                self.retiring.push((slot, p));
            }
            let reason = format!("the new worker was not ready within {:?}", self.policy.ready_timeout);
            self.fail_rollout(slot, reason, now, wall, out);
        }
        let shutdown_timeout = self.policy.shutdown_timeout;
        for (_, p) in self.procs_mut() {
            if p.stop_at.is_some_and(|t| t <= now) {
                p.stop_at = None;
                p.state = ProcState::Stopping;
                p.signalled |= signal_bit(SIGTERM);
                p.stop_deadline = Some(now + shutdown_timeout);
                out.push(Command::Signal { key: p.key, signal: SIGTERM });
            }
        }
        let mut overdue = Vec::new();
        for (slot, p) in self.procs_mut() {
            if p.stop_deadline.is_some_and(|d| d <= now) {
                p.stop_deadline = None;
                p.signalled |= signal_bit(SIGKILL);
                overdue.push(slot);
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
            }
        }
        if !overdue.is_empty() {
            out.push(Command::Report(Report::StopTimeout { slots: overdue }));
        }
    }

    /// Closes the sockets of disabled or removed slots that no process holds any more. A slot
    /// that got a process again (revived by a restart, re-added by scaling) keeps its socket.
    fn close_unserved(&mut self, out: &mut Vec<Command>) {
        let (mut close, mut wait) = (Vec::new(), std::collections::BTreeSet::new());
        for &s in &self.unserved {
            if self.slots.get(s).is_some_and(|slot| !slot.disabled) {
                continue; // served again: keep the socket
            }
            if self.procs().any(|(slot, _)| slot == s) {
                wait.insert(s);
            } else {
                close.push(s);
            }
        }
        self.unserved = wait;
        out.extend(close.into_iter().map(|slot| Command::CloseSocket { slot }));
    }

    /// Routes new connections to the slots whose worker is ready, if that set changed.
    fn update_route(&mut self, out: &mut Vec<Command>) {
        if !self.policy.socket_per_slot || self.phase != Phase::Running {
            return;
        }
        let ready: Vec<usize> = self
            .slots
            .iter()
            .filter(|s| !s.disabled && s.current.as_ref().is_some_and(|p| p.state == ProcState::Active))
            .map(|s| s.id)
            .collect();
        if ready != self.routed {
            self.routed = ready.clone();
            out.push(Command::Route { slots: ready });
        }
    }

    /// Announces, once, that the initial start-up is over: every slot that is not disabled is
    /// active (a slot disabled during start-up does not hold the others back).
    fn check_all_ready(&mut self, out: &mut Vec<Command>) {
        if self.announced_ready || self.phase != Phase::Running {
            return;
        }
        let waiting = self.slots.iter().any(|s| !s.disabled && s.status() != WorkerStatus::Active);
        let workers = self.slots.iter().filter(|s| s.status() == WorkerStatus::Active).count();
        if !waiting && workers > 0 {
            self.announced_ready = true;
            out.push(Command::Report(Report::AllReady { workers }));
        }
    }

    fn check_done(&mut self, out: &mut Vec<Command>) {
        let pending = self.slots.iter().any(|s| s.next_spawn.is_some());
        if self.procs().next().is_some() || pending {
            return;
        }
        let outcome = match self.phase {
            Phase::ShuttingDown { .. } => Outcome::Stopped,
            Phase::Running => {
                let disabled = self.slots.iter().filter(|s| s.disabled).count();
                let crashed =
                    self.slots.iter().filter(|s| !s.disabled && matches!(s.last_exit, Some((_, true)))).count();
                if disabled + crashed == 0 {
                    Outcome::Stopped
                } else {
                    Outcome::AllFailed { workers: self.slots.len(), disabled, crashed }
                }
            }
            Phase::Done => return,
        };
        self.phase = Phase::Done;
        out.push(Command::Exit(outcome));
    }

    /// The spec's cluster statistics.
    pub fn cluster_stats(&self) -> ClusterStats {
        let count = |st: WorkerStatus| self.slots.iter().filter(|s| s.status() == st).count();
        ClusterStats {
            total_workers: self.slots.len(),
            active_workers: count(WorkerStatus::Active),
            crashed_workers: count(WorkerStatus::Crashed),
            disabled_workers: count(WorkerStatus::Disabled),
            shutdown_requested: !matches!(self.phase, Phase::Running),
            restart_requested: self.rollout.is_some(),
            total_restarts: self.total_restarts,
            last_restart: self.last_restart.clone(),
            total_rss_bytes: 0,
            total_cpu_time: Duration::ZERO,
        }
    }

    /// The spec's statistics of every worker slot, at `now`.
    pub fn worker_stats(&self, now: Instant) -> Vec<WorkerStats> {
        self.slots
            .iter()
            .map(|s| WorkerStats {
                worker_id: s.id,
                pid: s.current.as_ref().and_then(|p| p.pid),
                port: self.policy.port,
                status: s.status(),
                start_time: s.current.as_ref().map(|p| p.started_wall).or(s.last_start_wall),
                uptime: s.current.as_ref().map(|p| now.duration_since(p.started)).unwrap_or_default(),
                exit_status: s.last_exit.map(|(st, _)| st),
                crash_count: s.crash_count,
                respawn_disabled: s.disabled,
                restarts: s.restarts,
                rss_bytes: None,
                cpu_time: None,
            })
            .collect()
    }
}
