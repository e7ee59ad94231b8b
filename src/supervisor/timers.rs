//! Timers: every deadline the machine keeps (pending spawns, every new worker's ready deadline,
//! the settling of a removed slot's route, stop timeouts), when the next one is, and what is due.

use std::time::{Instant, SystemTime};

use super::{Command, Phase, ProcState, Report, SIGKILL, SIGTERM, SpawnReason, Supervisor, signal_bit};

impl Supervisor {
    /// When the supervisor wants an [`Event::Tick`](super::Event::Tick) at the latest, if ever. After
    /// [`handle`](Self::handle) returned, it is always later than the `now` it was given:
    /// whatever was due then has been acted on. O(1): the deadline the last `handle` left,
    /// exact after an event handled in full, possibly early after quiet heartbeats (a tick
    /// then finds nothing due and computes it anew); computed (O(N)) before the first event.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.deadline {
            Some(d) => d,
            None => self.compute_deadline(),
        }
    }

    /// The earliest of every deadline the machine keeps, from its state: O(N), in one pass over
    /// the slots (each slot's record is read once: at 1024 workers the records do not stay in
    /// the cache from one pass to the next).
    pub(super) fn compute_deadline(&self) -> Option<Instant> {
        let running = self.phase == Phase::Running;
        // (Probes are parked during an upgrade: see `probe_due`.)
        let probing = running && self.upgrade.is_none();
        let mut earliest: Option<Instant> = None;
        let mut fold = |t: Option<Instant>| {
            if let Some(t) = t {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
        };
        for (i, s) in self.slots.iter().enumerate() {
            if running {
                fold(s.next_spawn.map(|(t, _)| t));
                fold(s.current.as_ref().and_then(|p| self.hung_due(p)));
            }
            if probing {
                fold(s.probe_at);
            }
            for p in s.current.iter().chain(s.next.iter()) {
                fold(p.ready_due());
                fold(p.stop_deadline.or(p.stop_at));
            }
            fold(self.age_due(i));
        }
        for (_, p) in &self.retiring {
            fold(p.ready_due());
            fold(p.stop_deadline.or(p.stop_at));
        }
        fold(self.next_sample.filter(|_| running));
        fold(self.leaving_at.filter(|_| running));
        fold(self.upgrade_deadline());
        fold(self.release_deadline());
        earliest
    }

    /// Acts on whatever is due at `now`: ready deadlines, stop timeouts, then spawns. Spawns
    /// come last because the others may schedule one at `now` itself (a rollout failing at
    /// its ready deadline respawns a slot left empty, after a respawn delay that may be zero).
    pub(super) fn on_time(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        self.expire_unready(now, wall, out);
        self.upgrade_due(now, out);
        self.release_due(now, out);
        self.expire_silent(now, out);
        self.recycle_old(now);
        self.sample_due(now, out);
        self.probe_due(now, out);
        let shutdown_timeout = self.policy.shutdown_timeout;
        for (_, p) in self.procs_mut() {
            if p.stop_at.is_some_and(|t| t <= now) {
                p.stop_at = None;
                p.why_stopped.get_or_insert(crate::stats::ExitReason::Scale);
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
                // A hung worker's kill was announced with its hang.
                if !p.hung {
                    overdue.push(slot);
                }
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
            }
        }
        if !overdue.is_empty() {
            out.push(Command::Report(Report::StopTimeout { slots: overdue }));
        }
        self.spawn_due(now, wall, out);
    }

    /// Starts the slots whose (initial or respawn) spawn time has come.
    fn spawn_due(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        if self.phase != Phase::Running {
            return;
        }
        for i in 0..self.slots.len() {
            let Some((due, reason)) = self.slots[i].next_spawn else { continue };
            if due > now {
                continue;
            }
            let program = self.slots[i].program;
            let p = self.new_proc(program, now, wall);
            self.push_spawn(i, &p, out);
            let s = &mut self.slots[i];
            if reason == SpawnReason::Respawn {
                self.total_restarts += 1;
                s.restarts += 1;
            }
            s.next_spawn = None;
            s.last_start_wall = Some(wall);
            s.current = Some(p);
        }
    }

    /// Gives the disabled slots whose cool-off is over one probe spawn.
    fn probe_due(&mut self, now: Instant, out: &mut Vec<Command>) {
        // Parked during an upgrade: a probe would open the slot's socket again, one the new
        // master did not inherit and so is not in its picture of the group. It runs once the
        // upgrade is over (if this master still serves).
        if self.phase != Phase::Running || self.upgrade.is_some() {
            return;
        }
        for s in &mut self.slots {
            if s.disabled && s.current.is_none() && s.next.is_none() && s.probe_at.is_some_and(|t| t <= now) {
                s.probe_at = None;
                s.disabled = false;
                s.probing = true;
                s.recent_crashes.clear();
                s.next_spawn = Some((now, SpawnReason::Respawn));
                out.push(Command::Report(Report::Probing { slot: s.id }));
            }
        }
    }

    /// Kills the workers past their ready deadline. A rollout's replacement fails its rollout
    /// (a broken deploy, not a crash of the slot); any other worker is a boot failure: killed,
    /// it stays in its slot until it has exited, and its exit then counts as a crash, so that
    /// crash protection stops a slot whose workers never get ready.
    fn expire_unready(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let timeout = self.policy.ready_timeout;
        for s in &mut self.slots {
            if let Some(p) = s.current.as_mut().filter(|p| p.ready_due().is_some_and(|d| d <= now)) {
                p.not_ready = true;
                p.signalled |= signal_bit(SIGKILL);
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
                out.push(Command::Report(Report::NotReady { slot: s.id, pid: p.pid.unwrap_or(0), timeout }));
            }
        }
        // Replacements (a rollout's, a recycle's) past their deadline fail their replacement.
        for slot in 0..self.slots.len() {
            if self.slots[slot].next.as_ref().and_then(|p| p.ready_due()).is_some_and(|d| d <= now)
                && let Some(mut p) = self.slots[slot].next.take()
            {
                p.signalled |= signal_bit(SIGKILL);
                p.state = ProcState::Stopping;
                p.why_stopped = Some(crate::stats::ExitReason::BootTimeout);
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
                self.retiring.push((slot, p));
                let reason = format!("the new worker was not ready within {timeout:?}");
                self.fail_replacement(slot, reason, now, wall, out);
            }
        }
    }
}
