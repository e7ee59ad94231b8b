//! The supervisor: every decision the master makes, as a pure state machine.
//!
//! It does no I/O and reads no clock. The driver ([`crate::Master::wait`]) feeds it [`Event`]s
//! with the current time and carries out the [`Command`]s it returns; [`Supervisor::next_deadline`]
//! says when to wake it with [`Event::Tick`] if nothing else happens. Every policy (start-up
//! pacing, crash classification, respawn delay, crash protection, shutdown timeout) lives here
//! and is unit-tested with a fake clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use crate::stats::{ClusterStats, ExitStatus, WorkerStats, WorkerStatus};

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
    /// disabled.
    pub socket_per_slot: bool,
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
        /// The signal number (validated by the caller).
        signal: i32,
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
    },
    /// Send a signal to a worker (through its pidfd).
    Signal {
        /// The worker.
        key: WorkerKey,
        /// The signal number.
        signal: i32,
    },
    /// Close the listening socket of a slot (`ReusePort` only): nobody will serve it again.
    CloseSocket {
        /// The slot.
        slot: usize,
    },
    /// Close every listening socket: the cluster is shutting down.
    CloseListeners,
    /// Tell the user (log line, callback).
    Report(Report),
    /// Supervision is over: return from `wait()` with this outcome.
    Exit(Result<(), String>),
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
        /// The signal number.
        signal: i32,
        /// Slots of the workers signalled.
        slots: Vec<usize>,
    },
    /// The shutdown timeout passed and these workers are being killed.
    ShutdownTimeout {
        /// Slots of the workers killed.
        slots: Vec<usize>,
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
    started: Instant,
    started_wall: SystemTime,
    /// Signals the master sent it (bit n = signal n): a death by one of these is not a crash.
    signalled: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpawnReason {
    Initial,
    Respawn,
}

#[derive(Debug, Clone)]
struct Slot {
    id: usize,
    proc_: Option<Proc>,
    next_spawn: Option<(Instant, SpawnReason)>,
    /// Crash times within the crash window.
    recent_crashes: VecDeque<Instant>,
    crash_count: u32,
    disabled: bool,
    last_exit: Option<(ExitStatus, bool)>,
    last_start_wall: Option<SystemTime>,
}

impl Slot {
    fn status(&self) -> WorkerStatus {
        if self.disabled {
            return WorkerStatus::Disabled;
        }
        match (&self.proc_, self.next_spawn) {
            (Some(p), _) => match p.state {
                ProcState::Spawning | ProcState::Starting => WorkerStatus::Starting,
                ProcState::Active => WorkerStatus::Active,
                ProcState::Stopping => WorkerStatus::Stopping,
            },
            (None, Some((_, SpawnReason::Initial))) => WorkerStatus::Starting,
            (None, Some((_, SpawnReason::Respawn))) => WorkerStatus::Respawning,
            (None, None) => match self.last_exit {
                Some((_, true)) => WorkerStatus::Crashed,
                _ => WorkerStatus::Stopped,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    ShuttingDown { deadline: Instant, killed: bool },
    Done,
}

/// The supervisor state machine. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Supervisor {
    policy: Policy,
    slots: Vec<Slot>,
    phase: Phase,
    next_key: u64,
    total_restarts: u64,
    announced_ready: bool,
}

const SIGKILL: i32 = libc::SIGKILL;
const SIGTERM: i32 = libc::SIGTERM;

fn signal_bit(signal: i32) -> u64 {
    if (1..64).contains(&signal) { 1u64 << signal } else { 0 }
}

impl Supervisor {
    /// A supervisor for `policy`, created at `now`. Feed it [`Event::Tick`] to start the first
    /// worker.
    pub fn new(policy: Policy, now: Instant) -> Supervisor {
        let slots = (0..policy.workers)
            .map(|id| Slot {
                id,
                proc_: None,
                next_spawn: Some((now + policy.startup_delay * id as u32, SpawnReason::Initial)),
                recent_crashes: VecDeque::new(),
                crash_count: 0,
                disabled: false,
                last_exit: None,
                last_start_wall: None,
            })
            .collect();
        Supervisor { policy, slots, phase: Phase::Running, next_key: 0, total_restarts: 0, announced_ready: false }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// When the supervisor wants an [`Event::Tick`] at the latest, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running => self.slots.iter().filter_map(|s| s.next_spawn.map(|(t, _)| t)).min(),
            Phase::ShuttingDown { deadline, killed: false } => Some(deadline),
            Phase::ShuttingDown { killed: true, .. } | Phase::Done => None,
        }
    }

    /// True once [`Command::Exit`] has been returned.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Handles one event at time `now` (monotonic) and `wall` (for start times in statistics).
    pub fn handle(&mut self, event: Event, now: Instant, wall: SystemTime) -> Vec<Command> {
        let mut out = Vec::new();
        if self.phase == Phase::Done {
            return out;
        }
        match event {
            Event::Tick => {}
            Event::Spawned { key, pid } => self.on_spawned(key, pid, &mut out),
            Event::SpawnFailed { key, error } => self.on_spawn_failed(key, error, now, &mut out),
            Event::Ready { key } => self.on_ready(key, &mut out),
            Event::Exited { key, status } => self.on_exited(key, status, now, &mut out),
            Event::Shutdown => self.on_shutdown(now, &mut out),
            Event::SignalWorkers { signal } => self.on_signal_workers(signal, &mut out),
        }
        self.on_time(now, wall, &mut out);
        self.check_all_ready(&mut out);
        self.check_done(&mut out);
        out
    }

    fn find(&mut self, key: WorkerKey) -> Option<(usize, &mut Proc)> {
        self.slots.iter_mut().find_map(|s| s.proc_.as_mut().filter(|p| p.key == key).map(|p| (s.id, p)))
    }

    fn on_spawned(&mut self, key: WorkerKey, pid: u32, out: &mut Vec<Command>) {
        let shutting_down = matches!(self.phase, Phase::ShuttingDown { .. });
        let Some((slot, p)) = self.find(key) else { return };
        p.pid = Some(pid);
        p.state = ProcState::Starting;
        out.push(Command::Report(Report::Started { slot, pid }));
        if shutting_down {
            // Started while the shutdown began: stop it straight away.
            p.state = ProcState::Stopping;
            p.signalled |= signal_bit(SIGTERM);
            out.push(Command::Signal { key, signal: SIGTERM });
        }
    }

    fn on_spawn_failed(&mut self, key: WorkerKey, error: String, now: Instant, out: &mut Vec<Command>) {
        let Some((slot, _)) = self.find(key) else { return };
        out.push(Command::Report(Report::SpawnFailed { slot, error }));
        self.slots[slot].proc_ = None;
        // A worker that cannot even start counts as a crash: crash protection stops a loop.
        self.after_exit(slot, ExitStatus::Code(127), true, now, out);
    }

    fn on_ready(&mut self, key: WorkerKey, out: &mut Vec<Command>) {
        let Some((slot, p)) = self.find(key) else { return };
        if p.state != ProcState::Starting {
            return;
        }
        p.state = ProcState::Active;
        let pid = p.pid.unwrap_or(0);
        out.push(Command::Report(Report::Ready { slot, pid }));
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

    fn on_exited(&mut self, key: WorkerKey, status: ExitStatus, now: Instant, out: &mut Vec<Command>) {
        let Some((slot, p)) = self.find(key) else { return };
        let asked = p.state == ProcState::Stopping;
        let crash = !asked
            && match status {
                ExitStatus::Code(code) => code != 0,
                ExitStatus::Signal(sig) => p.signalled & signal_bit(sig) == 0,
            };
        let pid = p.pid.unwrap_or(0);
        self.slots[slot].proc_ = None;
        let respawn_in = self.after_exit(slot, status, crash, now, out);
        out.push(Command::Report(Report::Exited { slot, pid, status, crash, respawn_in }));
    }

    /// Book-keeping after the process of `slot` is gone: crash protection and respawn.
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
            if policy.respawn && crashes >= policy.max_crashes {
                s.disabled = true;
                let within = now.duration_since(*s.recent_crashes.front().unwrap_or(&now));
                out.push(Command::Report(Report::Disabled { slot, crashes, within }));
                if policy.socket_per_slot {
                    out.push(Command::CloseSocket { slot });
                }
                return None;
            }
        }
        if policy.respawn {
            s.next_spawn = Some((now + policy.respawn_delay, SpawnReason::Respawn));
            return Some(policy.respawn_delay);
        }
        None
    }

    fn on_shutdown(&mut self, now: Instant, out: &mut Vec<Command>) {
        match self.phase {
            Phase::Running => {
                self.phase = Phase::ShuttingDown { deadline: now + self.policy.shutdown_timeout, killed: false };
                out.push(Command::CloseListeners);
                let mut workers = 0;
                for s in &mut self.slots {
                    s.next_spawn = None;
                    if let Some(p) = &mut s.proc_ {
                        workers += 1;
                        if p.state != ProcState::Spawning {
                            p.signalled |= signal_bit(SIGTERM);
                            out.push(Command::Signal { key: p.key, signal: SIGTERM });
                        }
                        p.state = ProcState::Stopping;
                    }
                }
                out.push(Command::Report(Report::ShuttingDown { workers }));
            }
            // Asked again: do not wait for the timeout.
            Phase::ShuttingDown { killed: false, .. } => self.kill_all(out),
            Phase::ShuttingDown { killed: true, .. } | Phase::Done => {}
        }
    }

    fn on_signal_workers(&mut self, signal: i32, out: &mut Vec<Command>) {
        let mut slots = Vec::new();
        for s in &mut self.slots {
            if let Some(p) = s.proc_.as_mut().filter(|p| p.state == ProcState::Active) {
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
        for s in &mut self.slots {
            if let Some(p) = &mut s.proc_ {
                slots.push(s.id);
                p.signalled |= signal_bit(SIGKILL);
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
            }
        }
        if let Phase::ShuttingDown { deadline, .. } = self.phase {
            self.phase = Phase::ShuttingDown { deadline, killed: true };
        }
        if !slots.is_empty() {
            out.push(Command::Report(Report::ShutdownTimeout { slots }));
        }
    }

    /// Acts on whatever is due at `now`: spawns and the shutdown deadline.
    fn on_time(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        match self.phase {
            Phase::Running => {
                for i in 0..self.slots.len() {
                    let Some((due, reason)) = self.slots[i].next_spawn else { continue };
                    if due > now {
                        continue;
                    }
                    let key = WorkerKey(self.next_key);
                    self.next_key += 1;
                    if reason == SpawnReason::Respawn {
                        self.total_restarts += 1;
                    }
                    let s = &mut self.slots[i];
                    s.next_spawn = None;
                    s.last_start_wall = Some(wall);
                    s.proc_ = Some(Proc {
                        key,
                        pid: None,
                        state: ProcState::Spawning,
                        started: now,
                        started_wall: wall,
                        signalled: 0,
                    });
                    out.push(Command::Spawn { slot: i, key });
                }
            }
            Phase::ShuttingDown { deadline, killed: false } if now >= deadline => self.kill_all(out),
            Phase::ShuttingDown { .. } | Phase::Done => {}
        }
    }

    fn check_done(&mut self, out: &mut Vec<Command>) {
        if self.slots.iter().any(|s| s.proc_.is_some() || s.next_spawn.is_some()) {
            return;
        }
        let outcome = match self.phase {
            Phase::ShuttingDown { .. } => Ok(()),
            Phase::Running => {
                let disabled = self.slots.iter().filter(|s| s.disabled).count();
                let crashed = self.slots.iter().filter(|s| matches!(s.last_exit, Some((_, true)))).count();
                if disabled + crashed == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "all {} workers are gone ({disabled} disabled by crash protection, {} crashed with respawn off)",
                        self.slots.len(),
                        crashed - disabled.min(crashed)
                    ))
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
            restart_requested: false,
            total_restarts: self.total_restarts,
        }
    }

    /// The spec's statistics of every worker slot, at `now`.
    pub fn worker_stats(&self, now: Instant) -> Vec<WorkerStats> {
        self.slots
            .iter()
            .map(|s| WorkerStats {
                worker_id: s.id,
                pid: s.proc_.as_ref().and_then(|p| p.pid),
                port: self.policy.port,
                status: s.status(),
                start_time: s.proc_.as_ref().map(|p| p.started_wall).or(s.last_start_wall),
                uptime: s.proc_.as_ref().map(|p| now.duration_since(p.started)).unwrap_or_default(),
                exit_status: s.last_exit.map(|(st, _)| st),
                crash_count: s.crash_count,
                respawn_disabled: s.disabled,
            })
            .collect()
    }

    /// The slot and pid of a live worker process.
    pub fn worker(&self, key: WorkerKey) -> Option<(usize, Option<u32>)> {
        self.slots.iter().find_map(|s| s.proc_.as_ref().filter(|p| p.key == key).map(|p| (s.id, p.pid)))
    }
}
