//! Lifecycle and crash protection: a worker is spawned, reports ready, exits; an exit is
//! classified (crash or not), the slot is respawned after the respawn delay, and a slot that
//! crashes too often within the crash window is disabled.

use std::time::{Duration, Instant, SystemTime};

use super::{Command, Loc, Notify, Phase, ProcState, Report, SpawnReason, Supervisor, WorkerKey, signal_bit};
use crate::stats::{ExitStatus, WorkerStatus};

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
            self.stop(&mut p, now, out);
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

    /// A worker reported ready: it serves (a replacement takes its slot over).
    pub(super) fn on_ready(&mut self, key: WorkerKey, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let Some(loc) = self.locate(key) else { return };
        let Some(p) = self.proc_at(loc) else { return };
        // Killed at its ready deadline: too late, whatever was still on its way.
        if p.state != ProcState::Starting || p.not_ready {
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
        let pid = p.pid.unwrap_or(0);
        let asked = p.state == ProcState::Stopping;
        // Killed because it was not ready in time: a boot failure, whatever the status says.
        let crash = !asked && (p.not_ready || is_crash(status, p.signalled));
        let reason =
            reason.or_else(|| p.not_ready.then(|| format!("not ready within {:?}", self.policy.ready_timeout)));
        let exited = |crash, respawn_in| Report::Exited { slot, pid, status, crash, reason, respawn_in };
        match loc {
            Loc::Current(_) => {
                let respawn_in = self.after_exit(slot, status, crash, now, out);
                out.push(Command::Report(exited(crash, respawn_in)));
            }
            Loc::Next(_) => {
                // A replacement that dies before it is ready: a broken deploy, not a crash of
                // the slot (its old worker still serves).
                out.push(Command::Report(exited(false, None)));
                if !asked {
                    let reason = format!("the new worker exited before it was ready ({status})");
                    self.fail_rollout(slot, reason, now, wall, out);
                }
            }
            Loc::Retiring(_) => out.push(Command::Report(exited(false, None))),
        }
    }

    /// A worker process ended and its status is lost (reaped elsewhere): a crash of unknown
    /// cause, recorded as exit code 255, unless it had been asked to stop.
    pub(super) fn on_lost(&mut self, key: WorkerKey, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let reason = "reaped elsewhere, its exit status is lost (is SIGCHLD ignored, or waitpid(-1) called?)";
        self.on_exited(key, LOST_STATUS, Some(reason.into()), now, wall, out);
    }

    /// Book-keeping after the current process of `slot` is gone: crash protection and respawn.
    /// Returns the respawn delay if the slot will be started again.
    pub(super) fn after_exit(
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

    /// Announces, once, that the initial start-up is over: every slot that is not disabled is
    /// active (a slot disabled during start-up does not hold the others back).
    pub(super) fn check_all_ready(&mut self, out: &mut Vec<Command>) {
        if self.announced_ready || self.phase != Phase::Running {
            return;
        }
        // Only slots that will still become active hold the announcement back: a slot disabled,
        // crashed with respawn off, or stopped for good during start-up does not.
        let waiting =
            self.slots.iter().any(|s| matches!(s.status(), WorkerStatus::Starting | WorkerStatus::Respawning));
        let workers = self.slots.iter().filter(|s| s.status() == WorkerStatus::Active).count();
        if !waiting && workers > 0 {
            self.announced_ready = true;
            out.push(Command::Report(Report::AllReady { workers }));
            out.push(Command::Notify(Notify::Ready { workers }));
        }
    }
}
