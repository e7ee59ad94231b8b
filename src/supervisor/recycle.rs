//! Recycling: a worker that served its request limit, reached its age, or kept too much
//! memory is replaced, never counted as a crash. Surge first (the replacement starts next to
//! it and takes over once ready, through the readiness gate, as in a rollout); in place
//! (drain, then respawn at once) when the cgroup's memory left would not fit one more worker.
//! At most [`Liveness::max_recycling`](super::Liveness::max_recycling) slots recycle at a
//! time; the others wait in a queue. A rollout replaces every slot anyway: recycles give way
//! to it. A replacement that fails leaves the old worker serving, and its slot is not tried
//! again before a pause.

use std::time::{Duration, Instant, SystemTime};

use super::{Command, Phase, ProcState, RecycleReason, Report, SpawnReason, Supervisor, WorkerKey};
use crate::stats::ExitReason;

/// The shortest pause before a slot whose recycle failed is recycled again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Whether the worker of `slot` may be queued for a recycle now (ignoring the retry pause):
    /// the cluster runs, no rollout runs, and the slot's worker serves with nothing under way.
    fn recyclable(&self, slot: usize) -> bool {
        let Some(s) = self.slots.get(slot) else { return false };
        self.phase == Phase::Running
            && self.rollout.is_none()
            && s.recycling.is_none()
            && s.next.is_none()
            && s.current.as_ref().is_some_and(|p| p.state == ProcState::Active && !p.hung && !p.recycling)
    }

    /// When the worker of `slot` is due for a recycle by age (its age limit, or the end of the
    /// retry pause if later), while it may be queued.
    pub(super) fn age_due(&self, slot: usize) -> Option<Instant> {
        if !self.recyclable(slot) {
            return None;
        }
        let s = &self.slots[slot];
        let at = s.current.as_ref()?.recycle_at?;
        Some(s.recycle_retry.map_or(at, |r| r.max(at)))
    }

    /// Queues the recycle of worker `key` of `slot`, if it may be recycled now.
    pub(super) fn queue_recycle(&mut self, slot: usize, key: WorkerKey, reason: RecycleReason, now: Instant) {
        if !self.recyclable(slot) || self.slots[slot].recycle_retry.is_some_and(|t| t > now) {
            return;
        }
        let Some(p) = self.slots[slot].current.as_mut().filter(|p| p.key == key) else { return };
        p.recycling = true;
        self.recycle_queue.push_back((slot, key, reason));
    }

    /// Queues the workers whose age came.
    pub(super) fn recycle_old(&mut self, now: Instant, incremental: bool) {
        for slot in self.scope(now, incremental) {
            if self.age_due(slot).is_some_and(|t| t <= now)
                && let Some(key) = self.slots[slot].current.as_ref().map(|p| p.key)
            {
                self.queue_recycle(slot, key, RecycleReason::Age, now);
            }
        }
    }

    /// Asks for memory readings when they are due.
    pub(super) fn sample_due(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.phase != Phase::Running || self.next_sample.is_none_or(|t| t > now) {
            return;
        }
        self.next_sample = now.checked_add(self.policy.liveness.memory_interval.max(Duration::from_millis(1)));
        out.push(Command::SampleMemory);
    }

    /// Memory readings: a worker over the limit for enough readings in a row is recycled. The
    /// smallest ready worker is what a fresh one is estimated to take.
    pub(super) fn on_memory(&mut self, readings: Vec<(WorkerKey, u64)>, headroom: Option<u64>, now: Instant) {
        let serving: std::collections::HashMap<WorkerKey, usize> = self
            .slots
            .iter()
            .filter_map(|s| s.current.as_ref().filter(|p| p.state == ProcState::Active).map(|p| (p.key, s.id)))
            .collect();
        self.headroom = headroom;
        self.smallest_worker =
            readings.iter().filter(|(key, _)| serving.contains_key(key)).map(|&(_, bytes)| bytes).min();
        let Some(limit) = self.policy.liveness.max_memory else { return };
        let samples = self.policy.liveness.memory_samples.max(1);
        for (key, bytes) in readings {
            let Some(&slot) = serving.get(&key) else { continue };
            let Some(p) = self.slots[slot].current.as_mut() else { continue };
            p.over_memory = if bytes > limit { p.over_memory.saturating_add(1) } else { 0 };
            if p.over_memory >= samples {
                self.queue_recycle(slot, key, RecycleReason::Memory, now);
            }
        }
    }

    /// Starts the queued recycles, as many as may run at once.
    pub(super) fn start_recycles(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        if self.phase != Phase::Running || self.rollout.is_some() || self.recycle_queue.is_empty() {
            return;
        }
        let max = self.policy.liveness.max_recycling.max(1);
        while self.slots.iter().filter(|s| s.recycling.is_some()).count() < max {
            let Some((slot, key, reason)) = self.recycle_queue.pop_front() else { break };
            let valid = self.slots.get(slot).is_some_and(|s| {
                s.recycling.is_none()
                    && s.next.is_none()
                    && s.current.as_ref().is_some_and(|p| p.key == key && p.state == ProcState::Active && !p.hung)
            });
            if !valid {
                continue;
            }
            // A fresh worker is about the size of the smallest one serving; each surge started
            // takes that much of the room until the next readings say how much is left.
            let in_place = matches!((self.headroom, self.smallest_worker), (Some(room), Some(w)) if room < w);
            if !in_place && let (Some(room), Some(w)) = (self.headroom, self.smallest_worker) {
                self.headroom = Some(room - w);
            }
            let pid = self.slots[slot].current.as_ref().and_then(|p| p.pid).unwrap_or(0);
            self.slots[slot].recycling = Some(reason);
            out.push(Command::Report(Report::Recycling { slot, pid, reason, in_place }));
            if in_place {
                let mut p = self.slots[slot].current.take().expect("validated");
                self.stop(&mut p, reason.exit_reason(), now, out);
                self.slots[slot].current = Some(p);
            } else {
                let program = self.slots[slot].program;
                let p = self.new_proc(program, now, wall);
                self.push_spawn(slot, &p, out);
                self.slots[slot].next = Some(p);
            }
        }
    }

    /// Gives way to a rollout: queued recycles are dropped, replacements under way stopped
    /// (the rollout replaces their slots). A worker recycled in place finishes its drain and
    /// its slot respawns as usual.
    pub(super) fn cancel_recycles(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.recycle_queue.clear();
        let mut stopped = Vec::new();
        for s in &mut self.slots {
            if let Some(p) = s.current.as_mut() {
                p.recycling = false;
            }
            if s.recycling.take().is_some()
                && let Some(p) = s.next.take()
            {
                stopped.push((s.id, p));
            }
        }
        for (slot, mut p) in stopped {
            self.stop(&mut p, ExitReason::Restart, now, out);
            self.retiring.push((slot, p));
        }
    }

    /// The replacement started in `slot` failed (`reason`): a recycle's leaves the old worker
    /// serving and pauses the slot's recycling; a rollout's fails the rollout.
    pub(super) fn fail_replacement(
        &mut self,
        slot: usize,
        reason: String,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Command>,
    ) {
        if self.slots[slot].recycling.take().is_none() {
            self.fail_rollout(slot, reason, now, wall, out);
            return;
        }
        let pause = self.policy.respawn_delay.max(RETRY_PAUSE);
        let (respawn, running) = (self.policy.respawn, self.phase == Phase::Running);
        let s = &mut self.slots[slot];
        s.recycle_retry = now.checked_add(pause);
        match s.current.as_mut() {
            Some(p) => p.recycling = false,
            // The old worker died meanwhile: the slot respawns as usual.
            None if !s.disabled && respawn && running && s.next_spawn.is_none() => {
                s.next_spawn = Some((now + self.policy.respawn_delay, SpawnReason::Respawn));
            }
            None => {}
        }
        out.push(Command::Report(Report::RecycleFailed { slot, reason }));
    }
}
