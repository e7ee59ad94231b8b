//! Timers: every deadline the machine keeps (pending spawns, every new worker's ready deadline,
//! the settling of a removed slot's route, stop timeouts), when the next one is, and what is due.

use std::time::{Instant, SystemTime};

use super::tracked::earlier;
use super::{Command, Phase, Proc, ProcState, Report, SIGKILL, SIGTERM, SpawnReason, Supervisor, signal_bit};

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
    /// the slots. (After each event [`handle`](Self::handle) keeps the slots' deadlines in a
    /// minimum tree instead, brought up to date from the slots that changed.)
    pub(super) fn compute_deadline(&self) -> Option<Instant> {
        let (running, probing) = self.deadline_gates();
        let slots = (0..self.slots.len()).map(|i| self.slot_deadline(i, running, probing));
        slots.fold(self.other_deadline(), earlier)
    }

    /// Whether the deadlines of spawns and hung workers count (the cluster runs), and those of
    /// probes (it runs and no upgrade parks them: see `probe_due`).
    pub(super) fn deadline_gates(&self) -> (bool, bool) {
        let running = self.phase == Phase::Running;
        (running, running && self.upgrade.is_none())
    }

    /// The earliest deadline of slot `i` and its processes (`running`, `probing`: from
    /// [`deadline_gates`](Self::deadline_gates)): its spawn, its worker's heartbeat, its probe,
    /// its processes' ready and stop deadlines, its worker's age.
    pub(super) fn slot_deadline(&self, i: usize, running: bool, probing: bool) -> Option<Instant> {
        let s = &self.slots[i];
        let mut earliest = self.age_due(i);
        if running {
            earliest = earlier(earliest, s.next_spawn.map(|(t, _)| t));
            earliest = earlier(earliest, s.current.as_ref().and_then(|p| self.hung_due(p)));
        }
        if probing {
            earliest = earlier(earliest, s.probe_at);
        }
        for p in s.current.iter().chain(s.next.iter()) {
            earliest = earlier(earliest, p.ready_due());
            earliest = earlier(earliest, earlier(p.stop_deadline, p.stop_at));
        }
        earliest
    }

    /// The earliest deadline that is not a slot's: the retiring workers', memory readings, a
    /// shutdown delay, an upgrade's, the release of inherited sockets.
    pub(super) fn other_deadline(&self) -> Option<Instant> {
        let running = self.phase == Phase::Running;
        let mut earliest = None;
        for (_, p) in &self.retiring {
            earliest = earlier(earliest, p.ready_due());
            earliest = earlier(earliest, earlier(p.stop_deadline, p.stop_at));
        }
        earliest = earlier(earliest, self.next_sample.filter(|_| running));
        earliest = earlier(earliest, self.leaving_at.filter(|_| running));
        earliest = earlier(earliest, self.upgrade_deadline());
        earlier(earliest, self.release_deadline())
    }

    /// Acts on whatever is due at `now`: ready deadlines, stop timeouts, then spawns. Spawns
    /// come last because the others may schedule one at `now` itself (a rollout failing at
    /// its ready deadline respawns a slot left empty, after a respawn delay that may be zero).
    pub(super) fn on_time(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>, incremental: bool) {
        self.expire_unready(now, wall, out, incremental);
        self.upgrade_due(now, out);
        self.release_due(now, out);
        self.expire_silent(now, out, incremental);
        self.recycle_old(now, incremental);
        self.sample_due(now, out);
        self.probe_due(now, out, incremental);
        let shutdown_timeout = self.policy.shutdown_timeout;
        let start = |p: &mut Proc, out: &mut Vec<Command>| {
            if p.stop_at.is_some_and(|t| t <= now) {
                p.stop_at = None;
                p.why_stopped.get_or_insert(crate::stats::ExitReason::Scale);
                p.state = ProcState::Stopping;
                p.signalled |= signal_bit(SIGTERM);
                p.stop_deadline = Some(now + shutdown_timeout);
                out.push(Command::Signal { key: p.key, signal: SIGTERM });
            }
        };
        self.each_due_proc(now, incremental, |p| p.stop_at.is_some_and(|t| t <= now), |_, p| start(p, out));
        let mut overdue = Vec::new();
        let kill = |slot: usize, p: &mut Proc| {
            p.stop_deadline = None;
            p.signalled |= signal_bit(SIGKILL);
            // A hung worker's kill was announced with its hang.
            if !p.hung {
                overdue.push(slot);
            }
            out.push(Command::Signal { key: p.key, signal: SIGKILL });
        };
        self.each_due_proc(now, incremental, |p| p.stop_deadline.is_some_and(|d| d <= now), kill);
        if !overdue.is_empty() {
            out.push(Command::Report(Report::StopTimeout { slots: overdue }));
        }
        self.spawn_due(now, wall, out, incremental);
    }

    /// Calls `act` on every process for which `due` holds, in the order of
    /// [`procs`](Self::procs): the slots' processes (of the [`scope`](Self::scope)), then the
    /// retiring ones. Only those it acts on are reached mutably (and so marked).
    fn each_due_proc(
        &mut self,
        now: Instant,
        incremental: bool,
        due: impl Fn(&Proc) -> bool,
        mut act: impl FnMut(usize, &mut Proc),
    ) {
        for i in self.scope(now, incremental) {
            if self.slots[i].current.as_ref().is_some_and(&due)
                && let Some(p) = self.slots[i].current.as_mut()
            {
                act(i, p);
            }
            if self.slots[i].next.as_ref().is_some_and(&due)
                && let Some(p) = self.slots[i].next.as_mut()
            {
                act(i, p);
            }
        }
        for r in 0..self.retiring.len() {
            if due(&self.retiring[r].1)
                && let Some((slot, p)) = self.retiring.get_mut(r)
            {
                act(*slot, p);
            }
        }
    }

    /// Starts the slots whose (initial or respawn) spawn time has come.
    fn spawn_due(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>, incremental: bool) {
        if self.phase != Phase::Running {
            return;
        }
        for i in self.scope(now, incremental) {
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
    fn probe_due(&mut self, now: Instant, out: &mut Vec<Command>, incremental: bool) {
        // Parked during an upgrade: a probe would open the slot's socket again, one the new
        // master did not inherit and so is not in its picture of the group. It runs once the
        // upgrade is over (if this master still serves).
        if self.phase != Phase::Running || self.upgrade.is_some() {
            return;
        }
        for i in self.scope(now, incremental) {
            let s = &self.slots[i];
            if !(s.disabled && s.current.is_none() && s.next.is_none() && s.probe_at.is_some_and(|t| t <= now)) {
                continue;
            }
            let s = &mut self.slots[i];
            s.probe_at = None;
            s.disabled = false;
            s.probing = true;
            s.recent_crashes.clear();
            s.next_spawn = Some((now, SpawnReason::Respawn));
            out.push(Command::Report(Report::Probing { slot: s.id }));
        }
    }

    /// Kills the workers past their ready deadline. A rollout's replacement fails its rollout
    /// (a broken deploy, not a crash of the slot); any other worker is a boot failure: killed,
    /// it stays in its slot until it has exited, and its exit then counts as a crash, so that
    /// crash protection stops a slot whose workers never get ready.
    fn expire_unready(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>, incremental: bool) {
        let timeout = self.policy.ready_timeout;
        let due = |p: &Proc| p.ready_due().is_some_and(|d| d <= now);
        for i in self.scope(now, incremental) {
            if self.slots[i].current.as_ref().is_some_and(due)
                && let Some(p) = self.slots[i].current.as_mut()
            {
                p.not_ready = true;
                p.signalled |= signal_bit(SIGKILL);
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
                out.push(Command::Report(Report::NotReady { slot: i, pid: p.pid.unwrap_or(0), timeout }));
            }
        }
        // Replacements (a rollout's, a recycle's) past their deadline fail their replacement.
        // (One failing ends its rollout, and may start a queued one, inside this loop, whose
        // slots were chosen before: the full pass could act on no other slot then either. The
        // other replacements of the failed rollout left their slots, and the new rollout's are
        // not confirmed yet, so not judged (`ready_due`: a process the driver has not reported
        // started has no deadline yet); no recycle runs during a rollout.)
        for slot in self.scope(now, incremental) {
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
