//! Liveness: heartbeats, and what happens to a worker that stops beating. A worker that beat
//! once is watched from then on (one that never beats is not: it did not sign up); silent for
//! longer than the worker timeout, it is hung: out of the route at once, diagnosed, signalled
//! (so that it can say where it is stuck), killed after a grace, and its exit is a crash
//! (`hung`) whose slot respawns through the readiness gate.

use std::time::Instant;

use super::{Command, Loc, Proc, ProcState, RecycleReason, Report, SIGKILL, Supervisor, WorkerKey, signal_bit};

impl Supervisor {
    /// A worker's heartbeat (`alive`: it is one, not only counts): it is alive, and says how
    /// many requests it served. Counts never go back (a beat overtaken by a later one).
    /// Returns when the worker is hung if it does not beat again (`None`: it is not watched).
    /// O(1): it touches this worker only.
    pub(super) fn on_beat(
        &mut self,
        key: WorkerKey,
        counts: Option<(u64, u64)>,
        alive: bool,
        now: Instant,
    ) -> Option<Instant> {
        let loc = self.locate(key)?;
        let p = self.proc_at(loc)?;
        if alive {
            p.last_beat = Some(now);
        }
        if let Some((served, in_flight)) = counts {
            p.counted = true;
            p.served = p.served.max(served);
            p.in_flight = in_flight;
            let served = p.served;
            let limit_reached = p.request_limit.is_some_and(|limit| served >= limit);
            if let (Loc::Current(slot), true) = (loc, limit_reached) {
                self.queue_recycle(slot, key, RecycleReason::Requests, now);
            }
        }
        self.proc_at_ref(loc).and_then(|p| self.hung_due(p))
    }

    /// When `p` is hung if it does not beat again: its last beat plus the worker timeout, for a
    /// ready worker that beat at least once and is not already being killed for it.
    pub(super) fn hung_due(&self, p: &Proc) -> Option<Instant> {
        let timeout = self.policy.liveness.worker_timeout?;
        if p.state != ProcState::Active || p.hung {
            return None;
        }
        p.last_beat?.checked_add(timeout)
    }

    /// Deals with the workers silent for longer than the worker timeout.
    pub(super) fn expire_silent(&mut self, now: Instant, out: &mut Vec<Command>, incremental: bool) {
        if self.policy.liveness.worker_timeout.is_none() {
            return;
        }
        let (signal, grace) = (self.policy.liveness.hung_signal, self.policy.liveness.hung_grace);
        for i in self.scope(now, incremental) {
            let due = self.slots[i].current.as_ref().and_then(|p| self.hung_due(p));
            if due.is_none_or(|d| d > now) {
                continue;
            }
            let Some(p) = self.slots[i].current.as_mut() else { continue };
            p.hung = true;
            // Stopping: out of the route, not counted as serving; its kill is the stop deadline.
            p.state = ProcState::Stopping;
            p.stop_at = None;
            p.stop_deadline = now.checked_add(grace);
            p.signalled |= signal_bit(signal) | signal_bit(SIGKILL);
            let silent = p.last_beat.map(|t| now.saturating_duration_since(t)).unwrap_or_default();
            let (key, pid) = (p.key, p.pid.unwrap_or(0));
            out.push(Command::Report(Report::Hung { slot: i, pid, silent, signal, grace }));
            out.push(Command::Diagnose { key });
            out.push(Command::Signal { key, signal });
            if grace.is_zero() && signal != SIGKILL {
                out.push(Command::Signal { key, signal: SIGKILL });
            }
        }
    }
}
