//! Timers: every deadline the machine keeps (pending spawns, a replacement's ready deadline,
//! the settling of a removed slot's route, stop timeouts), when the next one is, and what is due.

use std::time::{Instant, SystemTime};

use super::{Command, Phase, ProcState, Report, SIGKILL, SIGTERM, SpawnReason, Supervisor, signal_bit};

impl Supervisor {
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

    /// Acts on whatever is due at `now`: spawns, the restart's ready deadline, stop timeouts.
    pub(super) fn on_time(&mut self, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
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
                self.push_spawn(i, key, program, out);
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
}
