//! Rolling restarts: surge first (a slot's replacement starts next to the old worker, which is
//! asked to stop only once the new one is ready), up to [`Policy::max_surge`](super::Policy::max_surge)
//! slots at a time, in slot order, from the program file found at the original path (a
//! deploy); restarts asked for during one coalesce into one more.
//!
//! The first replacement that fails ends the rollout at once: the other replacements still
//! starting are stopped (their slots keep their old workers, as the slots not reached yet do),
//! the slots already replaced keep their new workers, and the outcome is reported then.

use std::time::{Instant, SystemTime};

use super::{Command, Notify, Phase, Program, RecycleReason, Report, Rollout, SpawnReason, Supervisor};
use crate::stats::{ExitReason, RestartOutcome};

impl Supervisor {
    pub(super) fn on_restart(&mut self, ticket: Option<u64>, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let tickets: Vec<u64> = ticket.into_iter().collect();
        if self.phase != Phase::Running || self.leaving_at.is_some() {
            let outcome = RestartOutcome::Cancelled { reason: "the cluster is shutting down".into(), replaced: 0 };
            self.finish_restart(outcome, tickets, out);
            return;
        }
        if self.upgrade.is_some() {
            // The new master starts its own workers from the new program anyway.
            let reason = "an upgrade of the master is running; its new master starts new workers".into();
            self.finish_restart(RestartOutcome::Cancelled { reason, replaced: 0 }, tickets, out);
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

    pub(super) fn start_rollout(&mut self, tickets: Vec<u64>, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        // The rollout replaces every slot anyway: recycles waiting or under way give way.
        self.cancel_recycles(now, out);
        self.deploys += 1;
        self.rollout = Some(Rollout {
            queue: (0..self.slots.len()).collect(),
            in_flight: Vec::new(),
            program: Program::Deployed(self.deploys),
            tickets,
            replaced: 0,
        });
        let at_once = self.policy.max_surge.clamp(1, self.slots.len().max(1));
        out.push(Command::Report(Report::RestartStarted { workers: self.slots.len(), at_once }));
        out.push(Command::Notify(Notify::Reloading { workers: self.slots.len() }));
        self.advance_rollout(now, wall, out);
    }

    /// Starts the replacements of the next slots, in order, until `max_surge` are starting or
    /// none is left to start; ends the rollout once none is left and none is starting.
    pub(super) fn advance_rollout(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let most = self.policy.max_surge.max(1);
        loop {
            let Some(r) = &mut self.rollout else { return };
            if r.in_flight.len() >= most {
                return;
            }
            let Some(slot) = r.queue.pop_front() else {
                if r.in_flight.is_empty() {
                    let r = self.rollout.take().expect("checked");
                    self.program = r.program;
                    self.finish_restart(RestartOutcome::Completed { replaced: r.replaced }, r.tickets, out);
                    self.start_queued(now, wall, out);
                }
                return;
            };
            let program = r.program;
            r.in_flight.push(slot);
            let p = self.new_proc(program, now, wall);
            self.push_spawn(slot, &p, out);
            let s = &mut self.slots[slot];
            // The replacement takes the slot over: no respawn, first start or probe on top of it.
            s.next_spawn = None;
            s.probe_at = None;
            s.next = Some(p);
        }
    }

    /// The replacement of `slot` failed: stop the rollout there (a queued restart then starts).
    /// The other replacements still starting are stopped: their slots keep their old workers.
    pub(super) fn fail_rollout(
        &mut self,
        slot: usize,
        reason: String,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Command>,
    ) {
        let Some(r) = self.rollout.take_if(|r| r.replacing(slot)) else { return };
        let others: Vec<usize> = r.in_flight.iter().copied().filter(|&s| s != slot).collect();
        for &other in &others {
            if let Some(mut p) = self.slots[other].next.take() {
                self.stop(&mut p, ExitReason::Restart, now, out);
                self.retiring.push((other, p));
            }
            self.abandon_replacement(other, now);
        }
        self.abandon_replacement(slot, now);
        let reason = match &others[..] {
            [] => reason,
            [one] => format!("{reason}; the replacement still starting for worker {one} was stopped"),
            many => {
                let list: Vec<String> = many.iter().map(usize::to_string).collect();
                format!("{reason}; the replacements still starting for workers {} were stopped", list.join(", "))
            }
        };
        self.finish_restart(RestartOutcome::Failed { worker_id: slot, reason, replaced: r.replaced }, r.tickets, out);
        self.start_queued(now, wall, out);
    }

    /// The rollout's replacement of `slot` is gone without taking the slot over: the slot
    /// carries on as before the rollout reached it.
    fn abandon_replacement(&mut self, slot: usize, now: Instant) {
        let s = &mut self.slots[slot];
        // The slot lost its worker while the replacement was starting: respawn it as usual.
        if s.current.is_none() && !s.disabled && self.policy.respawn && self.phase == Phase::Running {
            s.next_spawn = Some((now + self.policy.respawn_delay, SpawnReason::Respawn));
        }
        // A disabled slot whose revival failed waits for its next cool-off probe again.
        if s.disabled && s.current.is_none() && s.probe_at.is_none() {
            s.probe_at = self.policy.liveness.cooloff.and_then(|c| now.checked_add(c));
        }
    }

    /// A rollout ended (or a restart was refused): record and report the outcome; systemd hears
    /// `READY=1` again unless the cluster is stopping or has not finished starting (the start-up
    /// announces itself).
    pub(super) fn finish_restart(&mut self, outcome: RestartOutcome, tickets: Vec<u64>, out: &mut Vec<Command>) {
        self.last_restart = Some(outcome.clone());
        out.push(Command::Report(Report::RestartFinished { outcome: outcome.clone(), tickets }));
        if self.phase == Phase::Running && self.announced_ready {
            out.push(Command::Notify(Notify::Reloaded { outcome }));
        }
    }

    pub(super) fn start_queued(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        if self.rollout.is_none()
            && self.phase == Phase::Running
            && let Some(tickets) = self.queued_restart.take()
        {
            self.start_rollout(tickets, now, wall, out);
        }
    }

    /// The replacement of `slot` is ready: it takes the slot, and the old worker drains. A
    /// rollout's replacement also gives a disabled slot a new chance; a recycle's does not
    /// touch the slot's crash history.
    pub(super) fn promote(&mut self, slot: usize, now: Instant, out: &mut Vec<Command>) {
        let s = &mut self.slots[slot];
        let recycled = s.recycling.take();
        let Some(new) = s.next.take() else { return };
        let new_pid = new.pid.unwrap_or(0);
        s.program = new.program;
        s.last_start_wall = Some(new.started_wall);
        s.next_spawn = None;
        if recycled.is_none() {
            // A deploy gives a disabled slot a new chance.
            s.disabled = false;
            s.probe_at = None;
            s.probing = false;
            s.recent_crashes.clear();
        }
        let old = s.current.replace(new);
        let old_pid = old.as_ref().and_then(|p| p.pid);
        if let Some(mut old) = old {
            let why = recycled.map_or(ExitReason::Restart, RecycleReason::exit_reason);
            self.stop(&mut old, why, now, out);
            self.retiring.push((slot, old));
        }
        self.total_restarts += 1;
        self.slots[slot].restarts += 1;
        if let Some(r) = self.rollout.as_mut().filter(|r| r.replacing(slot)) {
            r.in_flight.retain(|&s| s != slot);
            r.replaced += 1;
        }
        out.push(Command::Report(Report::Replaced { slot, old_pid, new_pid }));
    }

    /// The program files workers currently run or will run: those of the slots (their
    /// respawns), of every process, of the rollout under way, and the one new slots start with.
    /// (Tests: [`release_programs`](Self::release_programs) keeps the slots' part up to date.)
    #[cfg(test)]
    pub(super) fn programs_in_use(&self) -> Vec<Program> {
        let mut v: Vec<Program> = self
            .slots
            .iter()
            .map(|s| s.program)
            .chain(self.procs().map(|(_, p)| p.program))
            .chain(self.rollout.iter().map(|r| r.program))
            .chain([self.program])
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The deploys slot `s`'s program and its two processes run (the slot's part of
    /// `programs_in_use`).
    pub(super) fn slot_deploys(s: &super::Slot) -> [Option<u64>; 3] {
        let deploy = |p: Program| if let Program::Deployed(n) = p { Some(n) } else { None };
        [
            deploy(s.program),
            s.current.as_ref().and_then(|p| deploy(p.program)),
            s.next.as_ref().and_then(|p| deploy(p.program)),
        ]
    }

    /// Releases the program files of deploys that no worker runs or will run any more.
    /// `incremental`: the slots' part of what is in use is brought up to date from the slots
    /// marked since the last settle.
    pub(super) fn release_programs(&mut self, out: &mut Vec<Command>, incremental: bool) {
        let incremental = self.still_incremental(incremental);
        self.cache.deploys.follow(&self.slots, incremental, Self::slot_deploys);
        if self.deployed.is_empty() {
            return;
        }
        let in_use = |n: u64| {
            let p = Program::Deployed(n);
            self.cache.deploys.tally.0.contains_key(&n)
                || self.retiring.iter().any(|(_, r)| r.program == p)
                || self.rollout.as_ref().is_some_and(|r| r.program == p)
                || self.program == p
        };
        let unused: Vec<u64> = self.deployed.iter().copied().filter(|&n| !in_use(n)).collect();
        for deploy in unused {
            self.deployed.remove(&deploy);
            out.push(Command::ReleaseProgram { deploy });
        }
    }
}
