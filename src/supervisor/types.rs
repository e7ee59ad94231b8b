//! The supervisor's public vocabulary, in one place: the policy it applies, the events it is
//! fed, the commands and reports it answers with, and the identifiers they use.

use std::time::Duration;

use crate::signal::Signal;
use crate::stats::{ExitCounts, ExitReason, ExitStatus, RestartOutcome, UpgradeOutcome};

/// The most worker slots a cluster accepts. Each slot costs the master a few file descriptors
/// (a pidfd, a channel and, with `Balance::ReusePort`, a socket); beyond this a count is almost
/// certainly a mistake (a 256-core host's count on a 2-CPU quota, a typo).
pub const MAX_WORKERS: usize = 4096;

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
    /// Each slot has its own socket (`Balance::ReusePort`), which must be closed when nobody
    /// will serve the slot again (removed, disabled, or left without a worker with respawn off).
    pub socket_per_slot: bool,
    /// How long any new worker (initial, respawned, added by scaling, or a rollout's
    /// replacement) has to report ready. Past it, it is killed: a replacement fails its rollout,
    /// any other counts as a crash (a boot failure).
    pub ready_timeout: Duration,
    /// Slots a rolling restart replaces at once (at least 1): each replacement starts next to
    /// the old worker, which is asked to stop once the new one is ready, so up to this many
    /// workers run beyond the slots while a rollout runs (`Cluster::max_surge`).
    pub max_surge: usize,
    /// Signals the user bound to actions of their own (`Cluster::on_signal`): each answers
    /// [`Command::RunSignalAction`] instead of its default action. `SIGTERM`, `SIGINT` and
    /// `SIGCHLD` keep their meaning whatever is listed.
    pub bound_signals: Vec<Signal>,
    /// Heartbeats, recycling and crash backoff.
    pub liveness: Liveness,
    /// On a shutdown request, how long the cluster reports not-ready while it keeps serving,
    /// before it drains (zero: it drains at once).
    pub shutdown_delay: Duration,
    /// Ready workers the readiness probe needs (at least 1).
    pub min_ready: usize,
    /// How long a new master started by an upgrade has to say it is ready (its workers are),
    /// from its spawn; past it, it is killed and the old master keeps serving.
    pub upgrade_timeout: Duration,
    /// The master is PID 1 (a container's init): an upgrade would end the container when the
    /// old master exits, so it is refused.
    pub pid1: bool,
    /// Upgrades go slot by slot unless asked otherwise: the new master starts one worker at a
    /// time, and this master stops its worker of a slot once the new one of that slot is ready
    /// (at most one worker more than the slots at any time, instead of twice as many).
    pub upgrade_slot_by_slot: bool,
}

/// What a master started by an upgrade inherits from its predecessor
/// ([`Supervisor::inherit`](super::Supervisor::inherit)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inheritance {
    /// The predecessor's generation (this master's is one more).
    pub generation: u64,
    /// Workers started again so far (respawns and replacements).
    pub total_restarts: u64,
    /// Worker exits so far, by reason.
    pub exits: ExitCounts,
    /// The predecessor's shutdown timeout: how long its workers may still drain after it is
    /// gone (its sockets stay in the group that long).
    pub shutdown_timeout: Duration,
    /// A slot-by-slot upgrade, from a predecessor with this many slots: slot `i + 1` starts
    /// once the predecessor freed slot `i` (its worker there exited) or had none.
    pub slot_by_slot: Option<usize>,
}

/// What the probes say ([`Supervisor::probes`](super::Supervisor::probes)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probes {
    /// The cluster can still run a worker (some slot serves, starts, or will respawn).
    pub live: bool,
    /// At least `min_ready` workers are ready, and no shutdown was asked for.
    pub ready: bool,
    /// The initial start-up completed (every slot became ready or was given up).
    pub started: bool,
}

/// Liveness and recycling: what the supervisor does with heartbeats, memory readings and
/// ages, and how it paces respawns after crashes. The default does none of it (the spec's
/// behaviour), except the worker timeout the front end sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Liveness {
    /// A ready worker that beat once and then stays silent this long is hung: it is taken out
    /// of the route at once, signalled with [`hung_signal`](Liveness::hung_signal), killed after
    /// [`hung_grace`](Liveness::hung_grace), and its exit counts as a crash (`hung`).
    pub worker_timeout: Option<Duration>,
    /// The first signal a hung worker gets (so that it can say where it is stuck).
    pub hung_signal: Signal,
    /// Time between the hung signal and `SIGKILL`.
    pub hung_grace: Duration,
    /// Recycle a worker once it served this many requests (plus up to `max_requests_jitter`).
    pub max_requests: Option<u64>,
    /// The most requests added at random to each worker's `max_requests`.
    pub max_requests_jitter: u64,
    /// Recycle a worker once it is this old (plus up to `max_age_jitter`).
    pub max_age: Option<Duration>,
    /// The most time added at random to each worker's `max_age`.
    pub max_age_jitter: Duration,
    /// Recycle a worker whose memory stayed above this many bytes for `memory_samples`
    /// consecutive readings.
    pub max_memory: Option<u64>,
    /// Consecutive readings above `max_memory` that trigger a recycle (at least 1).
    pub memory_samples: u32,
    /// Time between memory readings ([`Command::SampleMemory`]).
    pub memory_interval: Duration,
    /// Slots that may be recycling at the same time (at least 1).
    pub max_recycling: usize,
    /// Exponential backoff between respawns after crashes, instead of the fixed respawn delay.
    pub backoff: Option<Backoff>,
    /// A slot disabled by crash protection gets one probe spawn after this long (and again
    /// after each failed probe), instead of staying disabled for ever.
    pub cooloff: Option<Duration>,
    /// Seeds the jitter (the driver gives a random one; tests a fixed one).
    pub seed: u64,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness {
            worker_timeout: None,
            hung_signal: Signal::ABRT,
            hung_grace: Duration::from_secs(2),
            max_requests: None,
            max_requests_jitter: 0,
            max_age: None,
            max_age_jitter: Duration::ZERO,
            max_memory: None,
            memory_samples: 3,
            memory_interval: Duration::from_secs(1),
            max_recycling: 1,
            backoff: None,
            cooloff: None,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

/// Exponential backoff between respawns of a slot that keeps crashing: the `n`th crash in a row
/// waits `base × 2^(n-1)`, at most `max`, of which a random part (up to half) is taken off, so
/// that slots crashing together do not respawn together. A worker that ran for the crash
/// window (`respawn_window`) before it crashed starts the sequence again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

/// Why a worker is recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleReason {
    /// It served its request limit.
    Requests,
    /// It reached its maximum age.
    Age,
    /// Its memory stayed over the limit.
    Memory,
}

impl RecycleReason {
    /// The exit reason of the worker it replaces.
    pub fn exit_reason(self) -> ExitReason {
        match self {
            RecycleReason::Requests => ExitReason::RecycledRequests,
            RecycleReason::Age => ExitReason::RecycledAge,
            RecycleReason::Memory => ExitReason::RecycledMemory,
        }
    }
}

impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecycleReason::Requests => "it served its request limit",
            RecycleReason::Age => "it reached its maximum age",
            RecycleReason::Memory => "its memory stayed over the limit",
        })
    }
}

/// Which program file a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Something that happened, fed to [`Supervisor::handle`](super::Supervisor::handle).
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
    /// A worker process ended but its exit status is lost: it was reaped behind the master's
    /// back (`waitid` said `ECHILD`: a `SIGCHLD` set to `SIG_IGN`, a `waitpid(-1)` elsewhere).
    Lost {
        /// The worker.
        key: WorkerKey,
    },
    /// The master received `signal`. What it means (a default action, or the user's bound
    /// action instead, from [`Policy::bound_signals`]) is the supervisor's decision.
    Signal {
        /// The signal.
        signal: Signal,
    },
    /// The driver could not steer new connections as the last [`Command::Route`] asked.
    SteerFailed {
        /// What went wrong.
        failure: SteerFailure,
    },
    /// A worker's heartbeat.
    Beat {
        /// The worker.
        key: WorkerKey,
        /// Requests it served so far.
        served: u64,
        /// Requests in flight.
        in_flight: u64,
    },
    /// A worker's heartbeat without request counts (`WATCHDOG=1` from a program that is not
    /// built with this library).
    Alive {
        /// The worker.
        key: WorkerKey,
    },
    /// A worker's request counts, without a heartbeat (it reached its request limit): they
    /// may trigger a recycle but do not arm the worker timeout.
    Served {
        /// The worker.
        key: WorkerKey,
        /// Requests it served so far.
        served: u64,
        /// Requests in flight.
        in_flight: u64,
    },
    /// An upgrade of the master in place was asked for (`SIGUSR1`, a handle, the control
    /// socket); `ticket` identifies a caller waiting for its outcome.
    Upgrade {
        /// The waiting caller, if any.
        ticket: Option<u64>,
        /// Slot by slot (`None`: as [`Policy::upgrade_slot_by_slot`] says).
        slot_by_slot: Option<bool>,
    },
    /// The new master asked for by [`Command::SpawnMaster`] runs.
    MasterSpawned {
        /// Its pid.
        pid: u32,
    },
    /// The new master could not be started.
    MasterSpawnFailed {
        /// Why.
        error: String,
        /// The program file was busy (`ETXTBSY`: a file just put at the path may still be
        /// open for writing in a process forked meanwhile): worth a retry in a moment.
        busy: bool,
    },
    /// The new master says its workers are ready (over the upgrade channel).
    MasterReady,
    /// The new master, handed over to, says it took over: its route is attached and its
    /// control socket accepts. The old master drains from now on.
    MasterTookOver {
        /// Its slots, if it said (an earlier version does not).
        slots: Option<usize>,
    },
    /// The new master says it cannot serve (its start-up ended with fewer than `min_ready`
    /// workers ready, and none can still come): why.
    MasterCannotServe {
        /// Why.
        reason: String,
    },
    /// (A slot-by-slot upgrade.) The new master's worker of `slot` is ready.
    MasterSlotReady {
        /// The slot.
        slot: usize,
    },
    /// (In a master started by a slot-by-slot upgrade.) The predecessor's worker of `slot`
    /// is gone (or it had none): the next slot may start.
    SlotFreed {
        /// The slot.
        slot: usize,
    },
    /// The new master exited (and was reaped).
    MasterExited {
        /// How it ended.
        status: ExitStatus,
        /// What it said before, if anything (why its `init` failed).
        reason: Option<String>,
    },
    /// (In a master started by an upgrade.) The predecessor handed everything over: take over,
    /// and say so ([`Command::SayTookOver`]).
    HandedOver,
    /// (In a master started by an upgrade.) The predecessor heard that this master took over:
    /// it told systemd the new main pid and drains.
    PredecessorDraining,
    /// (In a master started by an upgrade.) The predecessor is gone: the upgrade channel
    /// reached its end. `clean`: it said goodbye first (it exited after its drain, so none of
    /// its workers holds a socket any more).
    PredecessorGone {
        /// It said goodbye.
        clean: bool,
    },
    /// The memory readings asked for by [`Command::SampleMemory`].
    MemorySampled {
        /// Each running worker's memory, in bytes (workers the driver could not read are left
        /// out).
        readings: Vec<(WorkerKey, u64)>,
        /// How much the cluster's cgroup may still grow before its memory limit, if it has one.
        headroom: Option<u64>,
    },
}

/// Why the driver could not steer connections ([`Event::SteerFailed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SteerFailure {
    /// No classic BPF program can express the route (too many routed slots, or none in the
    /// group): a later route, or a change of the group, may fit again.
    NoProgram {
        /// The slots the route asked for.
        slots: usize,
    },
    /// The kernel refused to attach the program.
    Attach {
        /// The error, as the driver got it.
        error: String,
    },
}

/// Something the driver must do, returned by [`Supervisor::handle`](super::Supervisor::handle).
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
        /// The requests after which this worker will be recycled, if any (the worker is told,
        /// so that it reports promptly when it gets there).
        request_limit: Option<u64>,
    },
    /// Read every running worker's memory; the driver answers with [`Event::MemorySampled`].
    SampleMemory,
    /// Log where a worker is (it is hung): its kernel state, system call and threads.
    Diagnose {
        /// The worker.
        key: WorkerKey,
    },
    /// Send a signal to a worker (through its pidfd).
    Signal {
        /// The worker.
        key: WorkerKey,
        /// The signal.
        signal: Signal,
    },
    /// New connections should go to the sockets of these slots only (`ReusePort` only): the
    /// slots whose worker is ready or, while none is, those whose worker was started (and is
    /// not stopping). Sent whenever the set changes; empty means "no preference".
    Route {
        /// The slots to route to.
        slots: Vec<usize>,
    },
    /// Close the listening socket of a slot (`ReusePort` only): nobody will serve the slot
    /// again (it was removed; or it has no worker and none will start: respawn off, disabled,
    /// a revival by a restart failed) and no process of it holds the socket any more (closing
    /// it while one does would not take it out of the kernel's group, and would reset what that
    /// process still takes from it). Spawning into a slot whose socket is closed opens a new one.
    CloseSocket {
        /// The slot.
        slot: usize,
    },
    /// Close every listening socket: the cluster is shutting down.
    CloseListeners,
    /// Stop steering (`ReusePort` only): detach the steering program, so that the kernel's own
    /// hashing spreads new connections over every socket of the group. With `for_good`, never
    /// attach one again (no [`Command::Route`] follows); otherwise the next route is tried.
    Unsteer {
        /// Steering failed in a way that will not get better.
        for_good: bool,
    },
    /// Close the program file of deploy number `deploy` ([`Program::Deployed`]): no worker runs
    /// it and none will.
    ReleaseProgram {
        /// The restart number.
        deploy: u64,
    },
    /// Run the user's action bound to `signal` (`Cluster::on_signal`), instead of the signal's
    /// default action.
    RunSignalAction {
        /// The signal.
        signal: Signal,
    },
    /// Reap the children that are not workers (the master is PID 1 and got `SIGCHLD`).
    ReapOrphans,
    /// Start the new master of an upgrade: the program at the original path, with every
    /// listening socket, the control socket and the state it inherits. The driver answers with
    /// [`Event::MasterSpawned`] or [`Event::MasterSpawnFailed`].
    SpawnMaster {
        /// The new master starts its workers one at a time, as this master frees its slots.
        slot_by_slot: bool,
    },
    /// Ask the new master to stop (`SIGTERM`): the upgrade failed. It drains and stops its own
    /// workers; [`Command::KillMaster`] follows if it has not exited in time. Its exit comes as
    /// [`Event::MasterExited`].
    StopMaster,
    /// Kill the new master (`SIGKILL`): it did not stop in time.
    KillMaster,
    /// Offer the new master the cluster: stop accepting on the control socket and the admin
    /// listener (connections open stay, to be answered), stop steering, leave the socket files
    /// to the new master, and tell it so over the upgrade channel. This master's listeners and
    /// workers serve on until it says it took over ([`Event::MasterTookOver`]).
    HandOver {
        /// The new master's pid.
        pid: u32,
    },
    /// The new master failed before it said it took over: the control socket and the admin
    /// listener accept here again, steering and the socket files are this master's again.
    TakeBack,
    /// Tell the new master that this master drains now (systemd heard the new main pid).
    ConfirmHandOver,
    /// (A slot-by-slot upgrade.) Tell the new master that this master's worker of `slot` is
    /// gone (or that it had none).
    FreeSlot {
        /// The slot.
        slot: usize,
    },
    /// (In a master started by a slot-by-slot upgrade.) Tell the old master that the worker of
    /// `slot` is ready.
    SaySlotReady {
        /// The slot.
        slot: usize,
    },
    /// (In a master started by an upgrade.) Tell the old master that the workers are ready.
    SayReady {
        /// Workers ready.
        workers: usize,
    },
    /// (In a master started by an upgrade.) Tell the old master that this master took over
    /// (its route is attached, its control socket accepts): it may drain.
    SayTookOver,
    /// (In a master started by an upgrade.) Tell the old master why this master cannot serve.
    SayCannotServe {
        /// Why.
        reason: String,
    },
    /// (In a master started by an upgrade.) Take over: poll the control socket and the admin
    /// listener from now on (routes apply from now on too).
    TakeOver,
    /// (In a master started by an upgrade.) Close the inherited sockets that no listener or
    /// slot of this master uses: no worker of the predecessor holds them any more.
    ReleaseInherited,
    /// Tell systemd (`sd_notify`), when it listens.
    Notify(Notify),
    /// Tell the user (log line, callback).
    Report(Report),
    /// Supervision is over: return from `wait()` with this outcome.
    Exit(Outcome),
}

/// What to tell systemd ([`Command::Notify`]); the driver adds a `STATUS=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notify {
    /// `READY=1`: the initial start-up is over.
    Ready {
        /// Workers serving.
        workers: usize,
    },
    /// `RELOADING=1`: a rolling restart began.
    Reloading {
        /// Slots to replace.
        workers: usize,
    },
    /// `READY=1` again: a rolling restart ended, and the cluster is neither stopping nor still
    /// starting.
    Reloaded {
        /// How it ended.
        outcome: RestartOutcome,
    },
    /// `STOPPING=1`: a shutdown began.
    Stopping {
        /// Workers asked to stop.
        workers: usize,
    },
    /// `MAINPID=`: the new master of an upgrade is the service's main process from now on.
    MainPid {
        /// Its pid.
        pid: u32,
    },
    /// `STOPPING=1` too: a shutdown was asked for, and the cluster serves for `delay` more
    /// before it drains (no longer ready meanwhile).
    Leaving {
        /// The shutdown delay.
        delay: Duration,
    },
}

/// What the systemd watchdog's keep-alive should say now ([`Supervisor::watchdog`](super::Supervisor::watchdog)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watchdog {
    /// All is well: send `WATCHDOG=1`.
    Feed,
    /// Say nothing, so that systemd restarts the service; `reason` is for the log.
    Withhold {
        /// Why.
        reason: &'static str,
    },
    /// Shutting down: nothing to say, and nothing wrong.
    Quiet,
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
    /// A new master took over (an upgrade in place) and this one's workers have drained.
    Upgraded,
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
        /// What the status does not say: why a crash is one (a worker killed because it was
        /// not ready in time, a worker reaped elsewhere whose status is lost).
        reason: Option<String>,
        /// Why it ended, as counted in the statistics.
        cause: ExitReason,
        /// When it will be started again, if it will.
        respawn_in: Option<Duration>,
    },
    /// A worker did not report ready within the ready timeout: it is killed, and its exit
    /// counts as a crash (a boot failure), so that crash protection applies.
    NotReady {
        /// Slot.
        slot: usize,
        /// Pid.
        pid: u32,
        /// The ready timeout.
        timeout: Duration,
    },
    /// A worker stopped beating for longer than the worker timeout: it is out of the route,
    /// it got `signal`, and is killed after `grace`.
    Hung {
        /// Slot.
        slot: usize,
        /// Pid.
        pid: u32,
        /// Time since its last heartbeat.
        silent: Duration,
        /// The signal it got.
        signal: Signal,
        /// Time until `SIGKILL`.
        grace: Duration,
    },
    /// A worker is being recycled: a replacement starts next to it (surge), or, when the
    /// memory left does not fit one more worker, it drains first (in place).
    Recycling {
        /// Slot.
        slot: usize,
        /// The worker's pid.
        pid: u32,
        /// Why.
        reason: RecycleReason,
        /// Drained first, then replaced (no room for a surge worker).
        in_place: bool,
    },
    /// A recycle's replacement could not start or get ready: the old worker keeps serving.
    RecycleFailed {
        /// Slot.
        slot: usize,
        /// Why.
        reason: String,
    },
    /// A disabled slot gets a probe spawn after its cool-off.
    Probing {
        /// Slot.
        slot: usize,
    },
    /// A probe spawn got ready: the slot is enabled again.
    Reenabled {
        /// Slot.
        slot: usize,
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
    /// A shutdown was asked for with a shutdown delay: the cluster is no longer ready, keeps
    /// serving for `delay`, then drains.
    ShutdownDelayed {
        /// The delay.
        delay: Duration,
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
        /// Replacements it runs at once, at most ([`Policy::max_surge`]).
        at_once: usize,
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
    /// An upgrade of the master began: the new master is being started.
    UpgradeStarted {
        /// The waiting callers (answered now if they did not ask to wait for the end).
        tickets: Vec<u64>,
    },
    /// The new master runs.
    MasterStarted {
        /// Its pid.
        pid: u32,
        /// It starts its workers slot by slot.
        slot_by_slot: bool,
    },
    /// (A slot-by-slot upgrade.) The new master's worker of `slot` is ready: this master's
    /// drains.
    SlotHandedOver {
        /// The slot.
        slot: usize,
    },
    /// The new master is ready: it is offered the cluster, and this master serves on until it
    /// says it took over.
    OfferingHandOver {
        /// The new master's pid.
        pid: u32,
    },
    /// The new master took over; this one drains its workers and exits.
    HandingOver {
        /// The new master's pid.
        pid: u32,
        /// Workers of this master that drain.
        workers: usize,
    },
    /// An upgrade ended (or was refused).
    UpgradeFinished {
        /// How.
        outcome: UpgradeOutcome,
        /// The waiting callers it answers.
        tickets: Vec<u64>,
    },
    /// (In a master started by an upgrade.) It took over from its predecessor.
    TookOver {
        /// The predecessor handed over (`false`: it died before, so this master took over at
        /// once).
        handed_over: bool,
    },
    /// A request that would change the slots was refused while an upgrade runs.
    NotDuringUpgrade {
        /// What was refused.
        what: &'static str,
    },
    /// A relative scale (`SIGTTIN`, `SIGTTOU`) would leave fewer than 1 or more than
    /// [`crate::MAX_WORKERS`] slots.
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
    /// No classic BPF program fits the route: the kernel's hashing applies (reported once).
    RouteTooLarge {
        /// The slots the route asked for.
        slots: usize,
    },
    /// Steering failed for good: the kernel's hashing applies from now on, including to slots
    /// that are restarting.
    SteeringFailed {
        /// The error.
        error: String,
    },
}

/// How long the sockets of removed slots stop receiving new connections before their workers
/// are asked to stop (`ReusePort`): long enough for handshakes that began before the route
/// changed to complete (clients with a round trip under a second), so that what is queued on
/// the socket when the worker takes its last connections is all it will ever get.
pub const ROUTE_SETTLE: Duration = Duration::from_secs(1);
