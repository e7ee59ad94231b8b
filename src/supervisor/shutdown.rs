//! Shutdown and the end of supervision: every process is asked to stop (SIGTERM, then SIGKILL
//! at its deadline), a second request kills at once, and the machine exits when nothing is
//! left. Also signalling the workers on the user's behalf.

use std::time::Instant;

use super::{Command, Notify, Outcome, Phase, ProcState, Report, SIGKILL, Supervisor, signal_bit};
use crate::stats::{ExitReason, RestartOutcome};

impl Supervisor {
    /// A shutdown was asked for. With a shutdown delay, the first request only makes the
    /// cluster not-ready (it keeps serving: a load balancer still sends it connections while it
    /// learns); the drain starts when the delay is over, or at once on a second request.
    pub(super) fn on_shutdown(&mut self, now: Instant, out: &mut Vec<Command>) {
        // A new master still starting would only be stopped again: it is killed at once.
        self.cancel_upgrade(now, out);
        let delay = self.policy.shutdown_delay;
        if self.phase == Phase::Running && self.leaving_at.is_none() && !delay.is_zero() {
            self.leaving_at = Some(now.checked_add(delay).unwrap_or(now));
            out.push(Command::Report(Report::ShutdownDelayed { delay }));
            out.push(Command::Notify(Notify::Leaving { delay }));
            return;
        }
        self.begin_shutdown(now, out);
    }

    /// The drain starts when the shutdown delay is over.
    pub(super) fn leave_due(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.phase == Phase::Running && self.leaving_at.is_some_and(|t| t <= now) {
            self.begin_shutdown(now, out);
        }
    }

    fn begin_shutdown(&mut self, now: Instant, out: &mut Vec<Command>) {
        match self.phase {
            Phase::Running => {
                let workers = self.stop_everything(None, now, out);
                out.push(Command::Report(Report::ShuttingDown { workers }));
                out.push(Command::Notify(Notify::Stopping { workers }));
            }
            // Asked again: do not wait for the timeout.
            Phase::ShuttingDown { killed: false } => self.kill_all(out),
            Phase::ShuttingDown { killed: true } | Phase::Done => {}
        }
    }

    /// Enters the shutdown phase: the master's listeners are closed, restarts are cancelled,
    /// pending spawns dropped, and every process is asked to stop. Returns how many slots'
    /// workers were. (A shutdown, or the drain after an upgrade's hand-over, whose listeners
    /// the new master keeps: closing this master's copies leaves the sockets open there.) With
    /// `settle_from`, the workers of the slots from there on (those the new master of an
    /// upgrade does not serve: nothing is routed to their sockets any more) are asked to stop
    /// only after [`ROUTE_SETTLE`](super::ROUTE_SETTLE), so that the handshakes under way
    /// towards their sockets are queued before they take their last connections.
    pub(super) fn stop_everything(
        &mut self,
        settle_from: Option<usize>,
        now: Instant,
        out: &mut Vec<Command>,
    ) -> usize {
        self.leaving_at = None;
        self.phase = Phase::ShuttingDown { killed: false };
        out.push(Command::CloseListeners);
        self.sockets.clear();
        let cancelled =
            |replaced| RestartOutcome::Cancelled { reason: "the cluster is shutting down".into(), replaced };
        if let Some(r) = self.rollout.take() {
            self.finish_restart(cancelled(r.replaced), r.tickets, out);
        }
        if let Some(tickets) = self.queued_restart.take() {
            self.finish_restart(cancelled(0), tickets, out);
        }
        let mut workers = 0;
        let mut slots = std::mem::take(&mut self.slots);
        for s in &mut slots {
            s.next_spawn = None;
            s.gated = false;
            for p in s.current.iter_mut().chain(s.next.iter_mut()) {
                workers += 1;
                match settle_from {
                    Some(first) if s.id >= first && p.state != ProcState::Stopping => {
                        p.why_stopped.get_or_insert(ExitReason::Shutdown);
                        p.stop_at = now.checked_add(super::ROUTE_SETTLE).or(Some(now));
                    }
                    _ => self.stop(p, ExitReason::Shutdown, now, out),
                }
            }
        }
        self.slots = slots;
        // Workers of removed slots still waiting for their stop: now.
        let mut retiring = std::mem::take(&mut self.retiring);
        for (_, p) in &mut retiring {
            self.stop(p, ExitReason::Shutdown, now, out);
        }
        self.retiring = retiring;
        workers
    }

    pub(super) fn kill_all(&mut self, out: &mut Vec<Command>) {
        let mut slots = Vec::new();
        for (slot, p) in self.procs_mut() {
            if p.state != ProcState::Spawning {
                slots.push(slot);
                p.signalled |= signal_bit(SIGKILL);
                p.stop_deadline = None;
                out.push(Command::Signal { key: p.key, signal: SIGKILL });
            }
        }
        if let Phase::ShuttingDown { .. } = self.phase {
            self.phase = Phase::ShuttingDown { killed: true };
        }
        if !slots.is_empty() {
            out.push(Command::Report(Report::StopTimeout { slots }));
        }
    }

    pub(super) fn check_done(&mut self, out: &mut Vec<Command>) {
        // (A process is the common answer, and found first: it ends the scan at once.)
        if self.procs().next().is_some() || self.upgrade_pending() {
            return;
        }
        // A disabled slot waiting for its cool-off's probe will run a worker again.
        let pending = self.slots.iter().any(|s| s.next_spawn.is_some() || s.gated)
            || (self.phase == Phase::Running && self.slots.iter().any(|s| s.probe_at.is_some()));
        if pending {
            return;
        }
        let outcome = match self.phase {
            _ if self.upgraded_outcome().is_some() => Outcome::Upgraded,
            Phase::ShuttingDown { .. } => Outcome::Stopped,
            Phase::Running => {
                let disabled = self.slots.iter().filter(|s| s.disabled).count();
                let crashed =
                    self.slots.iter().filter(|s| !s.disabled && matches!(s.last_exit, Some((_, true)))).count();
                if disabled + crashed == 0 {
                    Outcome::Stopped
                } else {
                    Outcome::AllFailed { workers: self.slots.len(), disabled, crashed }
                }
            }
            Phase::Done => return,
        };
        self.phase = Phase::Done;
        out.push(Command::Exit(outcome));
    }
}
