//! Lifecycle and crash protection: a worker is spawned, reports ready, exits; an exit is
//! classified (crash or not), the slot is respawned after the respawn delay, and a slot that
//! crashes too often within the crash window is disabled.

use std::time::{Duration, Instant, SystemTime};

use super::{
    Command, Loc, Notify, Phase, ProcState, Report, SpawnReason, StartupPart, Supervisor, WorkerKey, signal_bit,
};
use crate::stats::{ExitReason, ExitStatus};

/// An exit the master did not ask for is a crash when the code is non-zero or the process died
/// of a signal the master did not send it (`signalled`, see [`super::Proc::signalled`]).
/// The status recorded for a worker whose real status is lost ([`super::Event::Lost`]).
pub(super) const LOST_STATUS: ExitStatus = ExitStatus::Code(255);

fn is_crash(status: ExitStatus, signalled: u64) -> bool {
    match status {
        ExitStatus::Code(code) => code != 0,
        ExitStatus::Signal(sig) => signalled & signal_bit(sig) == 0,
    }
}

impl Supervisor {
    /// The driver started a process: it is starting (or, asked to stop meanwhile, stopped).
    pub(super) fn on_spawned(&mut self, key: WorkerKey, pid: u32, now: Instant, out: &mut Vec<Command>) {
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
            self.stop(&mut p, ExitReason::Shutdown, now, out);
        }
        match loc {
            Loc::Current(i) => self.slots[i].current = Some(p),
            Loc::Next(i) => self.slots[i].next = Some(p),
            Loc::Retiring(_) => self.retiring.push((slot, p)),
        }
    }

    /// The driver could not start a process: a crash of the slot, or a failed rollout.
    pub(super) fn on_spawn_failed(
        &mut self,
        key: WorkerKey,
        error: String,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Command>,
    ) {
        let Some(loc) = self.locate(key) else { return };
        let (slot, _) = self.take_at(loc).expect("located");
        self.slot_of.remove(&key);
        out.push(Command::Report(Report::SpawnFailed { slot, error: error.clone() }));
        match loc {
            // A worker that cannot even start counts as a crash: crash protection stops a loop.
            Loc::Current(_) => {
                self.after_exit(slot, ExitStatus::Code(127), ExitReason::Crash, Duration::ZERO, now, out);
            }
            Loc::Next(_) => {
                let reason = format!("cannot start the new worker: {error}");
                self.fail_replacement(slot, reason, now, wall, out);
            }
            Loc::Retiring(_) => {}
        }
    }

    /// A worker reported ready: it serves (a replacement takes its slot over).
    pub(super) fn on_ready(&mut self, key: WorkerKey, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let Some(loc) = self.locate(key) else { return };
        let Some(p) = self.proc_at(loc) else { return };
        // Killed at its ready deadline: too late, whatever was still on its way.
        if p.state != ProcState::Starting || p.not_ready {
            return;
        }
        p.state = ProcState::Active;
        // Beats before ready (a long warm-up) do not count against it: the timeout runs from now.
        if p.last_beat.is_some() {
            p.last_beat = Some(now);
        }
        let pid = p.pid.unwrap_or(0);
        match loc {
            Loc::Current(slot) => {
                out.push(Command::Report(Report::Ready { slot, pid }));
                self.slot_ready_for_predecessor(slot, now, out);
                let s = &mut self.slots[slot];
                // A worker recycled in place has its replacement now.
                s.recycling = None;
                if std::mem::take(&mut s.probing) {
                    out.push(Command::Report(Report::Reenabled { slot }));
                }
            }
            Loc::Next(slot) => {
                out.push(Command::Report(Report::Ready { slot, pid }));
                let rollout = self.slots[slot].recycling.is_none();
                self.promote(slot, now, out);
                if rollout {
                    self.advance_rollout(now, wall, out);
                }
            }
            Loc::Retiring(_) => {}
        }
    }

    /// A worker process ended with `status` (`reason`: what the status does not say): it is
    /// classified, then its slot's book-keeping (or its rollout's) follows.
    pub(super) fn on_exited(
        &mut self,
        key: WorkerKey,
        status: ExitStatus,
        reason: Option<String>,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Command>,
    ) {
        let Some(loc) = self.locate(key) else { return };
        let (slot, p) = self.take_at(loc).expect("located");
        self.slot_of.remove(&key);
        let pid = p.pid.unwrap_or(0);
        let asked = p.state == ProcState::Stopping;
        let uptime = now.saturating_duration_since(p.started);
        // Killed because it hung, or because it was not ready in time: a crash, whatever the
        // status says (the master's own signals killed it).
        let cause = if p.hung {
            ExitReason::Hung
        } else if p.not_ready {
            ExitReason::BootTimeout
        } else if asked {
            p.why_stopped.unwrap_or(ExitReason::Shutdown)
        } else if is_crash(status, p.signalled) {
            ExitReason::Crash
        } else {
            ExitReason::Exited
        };
        self.exits.add(cause);
        let crash = p.hung || (!asked && cause.is_crash());
        let reason = reason.or_else(|| match cause {
            ExitReason::BootTimeout => Some(format!("not ready within {:?}", self.policy.ready_timeout)),
            ExitReason::Hung => {
                self.policy.liveness.worker_timeout.map(|t| format!("no heartbeat for over {t:?}: hung"))
            }
            _ => None,
        });
        let exited = |crash, respawn_in| Report::Exited { slot, pid, status, crash, reason, cause, respawn_in };
        match loc {
            Loc::Current(_) => {
                let respawn_in = self.after_exit(slot, status, cause, uptime, now, out);
                out.push(Command::Report(exited(crash, respawn_in)));
            }
            Loc::Next(_) => {
                // A replacement that dies before it is ready: a broken deploy, not a crash of
                // the slot (its old worker still serves).
                out.push(Command::Report(exited(false, None)));
                if !asked {
                    let reason = format!("the new worker exited before it was ready ({status})");
                    self.fail_replacement(slot, reason, now, wall, out);
                }
            }
            Loc::Retiring(_) => {
                out.push(Command::Report(exited(false, None)));
                self.free_if_handed(slot, out);
            }
        }
    }

    /// A worker process ended and its status is lost (reaped elsewhere): a crash of unknown
    /// cause, recorded as exit code 255, unless it had been asked to stop.
    pub(super) fn on_lost(&mut self, key: WorkerKey, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let reason = "reaped elsewhere, its exit status is lost (is SIGCHLD ignored, or waitpid(-1) called?)";
        self.on_exited(key, LOST_STATUS, Some(reason.into()), now, wall, out);
    }

    /// Book-keeping after the current process of `slot` is gone (`cause`: why, `uptime`: how
    /// long it ran): crash protection, then the respawn, after the respawn delay, the backoff
    /// (crashes), or at once (a worker recycled in place). Returns the delay if the slot will
    /// be started again.
    pub(super) fn after_exit(
        &mut self,
        slot: usize,
        status: ExitStatus,
        cause: ExitReason,
        uptime: Duration,
        now: Instant,
        out: &mut Vec<Command>,
    ) -> Option<Duration> {
        let crash = cause.is_crash();
        let recycled_in_place =
            matches!(cause, ExitReason::RecycledAge | ExitReason::RecycledMemory | ExitReason::RecycledRequests);
        {
            let s = &mut self.slots[slot];
            s.last_exit = Some((status, crash));
            s.last_exit_reason = Some(cause);
            if !recycled_in_place && s.next.is_none() {
                // The slot's recycle in place is over: its new worker did not make it.
                s.recycling = None;
            }
        }
        if self.phase != Phase::Running {
            return None;
        }
        let delay = if crash {
            let window = self.policy.respawn_window;
            let s = &mut self.slots[slot];
            if uptime >= window {
                // It ran for a whole crash window: a new sequence of crashes begins.
                s.crashes_in_a_row = 0;
            }
            s.crashes_in_a_row = s.crashes_in_a_row.saturating_add(1);
            s.crash_count += 1;
            s.recent_crashes.push_back(now);
            while s.recent_crashes.front().is_some_and(|&t| now.duration_since(t) > window) {
                s.recent_crashes.pop_front();
            }
            let crashes = s.recent_crashes.len() as u32;
            let failed_probe = std::mem::take(&mut s.probing);
            if self.policy.respawn && (crashes >= self.policy.max_crashes || failed_probe) && s.next.is_none() {
                s.disabled = true;
                s.probe_at = self.policy.liveness.cooloff.and_then(|c| now.checked_add(c));
                let within = now.duration_since(*s.recent_crashes.front().unwrap_or(&now));
                out.push(Command::Report(Report::Disabled { slot, crashes, within }));
                return None;
            }
            let n = s.crashes_in_a_row;
            self.backoff_delay(n)
        } else {
            self.slots[slot].crashes_in_a_row = 0;
            if recycled_in_place { Duration::ZERO } else { self.policy.respawn_delay }
        };
        // A replacement already starting takes the slot over: no respawn.
        let s = &mut self.slots[slot];
        if (self.policy.respawn || recycled_in_place) && s.next.is_none() {
            s.next_spawn = Some((now + delay, SpawnReason::Respawn));
            return Some(delay);
        }
        None
    }

    /// The delay before respawning a slot after its `n`th crash in a row: the respawn delay, or
    /// with a backoff `base × 2^(n-1)` capped at `max`, less a random part of up to half.
    pub(super) fn backoff_delay(&mut self, n: u32) -> Duration {
        let Some(b) = self.policy.liveness.backoff else { return self.policy.respawn_delay };
        let doubled = b.base.saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX));
        let full = doubled.min(b.max);
        let half_ms = u64::try_from(full.as_millis() / 2).unwrap_or(u64::MAX);
        full.saturating_sub(Duration::from_millis(self.random_below(half_ms.saturating_add(1))))
    }

    /// Announces, once, that the initial start-up is over: every slot that is not disabled is
    /// active (a slot disabled during start-up does not hold the others back). Counts the
    /// slots from those marked since the last settle when `incremental` (see
    /// [`Supervisor::settle`]): a start-up of N workers costs O(N), not O(N²).
    pub(super) fn check_all_ready(&mut self, out: &mut Vec<Command>, incremental: bool) {
        if self.announced_ready || self.phase != Phase::Running {
            // (A new master of an upgrade with fewer than `min_ready` ready at its announcement
            // tells its predecessor once it has them.)
            self.tell_predecessor_ready(out);
            return;
        }
        // Only slots that will still become active hold the announcement back: a slot disabled,
        // crashed with respawn off, or stopped for good during start-up does not.
        let incremental = self.still_incremental(incremental);
        self.cache.startup.follow(&self.slots, incremental, StartupPart::of);
        let (waiting, workers) = (self.cache.startup.tally.waiting > 0, self.cache.startup.tally.active);
        if !waiting && workers > 0 {
            self.announced_ready = true;
            out.push(Command::Report(Report::AllReady { workers }));
            if self.takeover == super::Takeover::Pending {
                // A new master of an upgrade: its predecessor hands over once it hears this;
                // systemd hears READY=1 at the take-over.
                self.tell_predecessor_ready(out);
            } else {
                out.push(Command::Notify(Notify::Ready { workers }));
            }
        }
    }
}
