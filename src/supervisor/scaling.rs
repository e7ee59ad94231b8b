//! Scaling: slots are added (started like initial ones, paced by the start-up delay) or the
//! highest ones removed (routed away from first, then their workers stop).

use std::time::{Instant, SystemTime};

use super::{Command, MAX_WORKERS, Phase, ProcState, ROUTE_SETTLE, Report, Slot, Supervisor};
use crate::stats::ExitReason;

impl Supervisor {
    pub(super) fn on_scale(&mut self, workers: usize, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let from = self.slots.len();
        if self.upgrade.is_some() && workers != from {
            // The new master inherits this master's sockets as they were when it started: a
            // slot's new socket would be unknown to it. It starts its own number of workers.
            out.push(Command::Report(Report::NotDuringUpgrade { what: "scaling" }));
            return;
        }
        if self.phase != Phase::Running || self.leaving_at.is_some() || workers == 0 || workers == from {
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
            self.update_route(out, false);
            for mut s in removed.into_iter().rev() {
                for mut p in s.current.take().into_iter().chain(s.next.take()) {
                    if self.policy.socket_per_slot && p.state == ProcState::Active {
                        p.stop_at = Some(now + ROUTE_SETTLE);
                        p.why_stopped.get_or_insert(ExitReason::Scale);
                    } else {
                        self.stop(&mut p, ExitReason::Scale, now, out);
                    }
                    self.retiring.push((s.id, p));
                }
            }
            // Replacements starting in removed slots were stopped with them: the rollout goes on
            // with the slots left (and may start more replacements now).
            if let Some(r) = &mut self.rollout {
                r.queue.retain(|&s| s < workers);
                r.in_flight.retain(|&s| s < workers);
            }
        }
        self.policy.workers = workers;
        out.push(Command::Report(Report::Scaled { from, to: workers }));
        self.advance_rollout(now, wall, out);
    }

    /// One slot more or fewer (`SIGTTIN`, `SIGTTOU`): refused below 1 or above [`MAX_WORKERS`].
    pub(super) fn on_scale_by(&mut self, delta: isize, now: Instant, wall: SystemTime, out: &mut Vec<Command>) {
        let to = self.slots.len() as isize + delta;
        match usize::try_from(to) {
            Ok(n) if (1..=MAX_WORKERS).contains(&n) => self.on_scale(n, now, wall, out),
            _ => out.push(Command::Report(Report::ScaleRefused { workers: to })),
        }
    }
}
