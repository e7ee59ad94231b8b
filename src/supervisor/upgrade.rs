//! Upgrading the master in place. In the old master: an upgrade starts a new master (the
//! program at the original path), which inherits every listening socket and starts its own
//! workers; once it says they are ready, the old master offers it the cluster (the control
//! socket, steering) and serves on, with its listeners and workers, until the new master says
//! it took over; only then does it tell systemd the new main pid, drain its own workers as a
//! shutdown whose listeners the new master keeps, and exit. A new master that cannot start,
//! exits, says it cannot serve, or is not ready (or has not taken over) within the upgrade
//! timeout is asked to stop (`SIGTERM`: it stops its own workers; `SIGKILL` after the shutdown
//! timeout), whatever it was offered is taken back, and the old master serves on. In a new
//! master: it routes nothing and tells systemd nothing until its predecessor hands over, or is
//! gone.

use std::time::{Duration, Instant};

use super::{
    Command, Inheritance, Notify, Outcome, Phase, ProcState, Report, SpawnReason, Supervisor, Takeover, Upgrade,
    UpgradeStage,
};
use crate::stats::{ExitStatus, UpgradeOutcome};

/// Why a PID 1 master refuses to upgrade, and what to do instead.
pub const PID1_REFUSAL: &str = "this master is PID 1 of its PID namespace (a container's init): when it exits after the hand-over the container ends, and the new master with it; roll the pods instead (kubectl rollout restart, or a new image), or run the master under an init such as tini (docker run --init)";

/// How long after its predecessor vanished without a goodbye a new master keeps the sockets it
/// does not use, beyond the predecessor's shutdown timeout (its orphaned workers drain within it).
const RELEASE_MARGIN: Duration = Duration::from_secs(1);

/// Starts of the new master whose program file was busy (`ETXTBSY`) tried in all, and the time
/// between two of them.
const BUSY_TRIES: u32 = 10;
const BUSY_RETRY: Duration = Duration::from_millis(10);

impl Supervisor {
    /// This master was started by an upgrade: it takes over what its predecessor counted, and
    /// owns nothing outside (no route, no systemd readiness, no control socket) until the
    /// predecessor hands over ([`Event::HandedOver`](super::Event::HandedOver)) or is gone.
    #[must_use]
    pub fn inherit(mut self, from: Inheritance) -> Supervisor {
        self.generation = from.generation.saturating_add(1);
        self.total_restarts = from.total_restarts;
        self.exits = from.exits;
        self.predecessor_timeout = from.shutdown_timeout;
        self.takeover = Takeover::Pending;
        if let Some(old) = from.slot_by_slot {
            // Slot by slot: slot 0 starts now (the one worker more), each next one once the
            // predecessor freed the slot before it.
            self.predecessor_slots = Some(old);
            for s in self.slots.iter_mut().skip(1) {
                s.next_spawn = None;
                s.gated = true;
            }
        }
        self
    }

    pub(super) fn on_upgrade(
        &mut self,
        ticket: Option<u64>,
        slot_by_slot: Option<bool>,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let tickets: Vec<u64> = ticket.into_iter().collect();
        let refused = if self.policy.pid1 {
            Some(PID1_REFUSAL.to_owned())
        } else if matches!(self.takeover, Takeover::Pending | Takeover::Acked) {
            Some("this master is itself taking over from its predecessor; upgrade it once it has".to_owned())
        } else if self.takeover == Takeover::Taken && (!self.predecessor_gone || self.release_at.is_some()) {
            // Its predecessor's workers may still hold sockets of the groups: a third master
            // would not know them.
            Some("the previous master is still draining its workers; upgrade once it has exited".to_owned())
        } else if self.phase != Phase::Running || self.leaving_at.is_some() {
            Some("the cluster is shutting down".to_owned())
        } else if let Some(u) = &self.upgrade {
            Some(match u.stage {
                UpgradeStage::Starting { pid } => format!(
                    "an upgrade is already running (new master pid {pid}); wait for its end (`ecewo-cluster upgrade --wait`)"
                ),
                UpgradeStage::HandingOver { pid } => format!(
                    "an upgrade is handing over to the new master pid {pid}; wait for its end (`ecewo-cluster upgrade --wait`)"
                ),
                UpgradeStage::Spawning => "an upgrade is already running".to_owned(),
                UpgradeStage::Killing => {
                    "the new master of a failed upgrade is still being stopped; try again in a moment".to_owned()
                }
            })
        } else if self.rollout.is_some() || self.queued_restart.is_some() {
            Some("a rolling restart is running; upgrade once it has ended".to_owned())
        } else {
            None
        };
        if let Some(reason) = refused {
            self.finish_upgrade(UpgradeOutcome::Refused { reason }, tickets, out);
            return;
        }
        let slot_by_slot = slot_by_slot.unwrap_or(self.policy.upgrade_slot_by_slot);
        self.upgrade = Some(Upgrade {
            stage: UpgradeStage::Spawning,
            deadline: now.checked_add(self.policy.upgrade_timeout),
            tickets: tickets.clone(),
            slot_by_slot,
            spawn_tries: 1,
            retry_at: None,
        });
        out.push(Command::Report(Report::UpgradeStarted { tickets }));
        out.push(Command::SpawnMaster { slot_by_slot });
    }

    pub(super) fn on_master_spawned(&mut self, pid: u32, out: &mut Vec<Command>) {
        if let Some(u) = self.upgrade.as_mut().filter(|u| u.stage == UpgradeStage::Spawning) {
            u.stage = UpgradeStage::Starting { pid };
            out.push(Command::Report(Report::MasterStarted { pid, slot_by_slot: u.slot_by_slot }));
        }
    }

    /// (A slot-by-slot upgrade.) The new master's worker of `slot` is ready: this master's
    /// worker there drains (the slot stays in the route: the new worker takes its connections
    /// from the same socket), and the new master hears when it is gone. Each step gives the new
    /// master the upgrade timeout again.
    pub(super) fn on_master_slot_ready(&mut self, slot: usize, now: Instant, out: &mut Vec<Command>) {
        let Some(u) = self.upgrade.as_mut() else { return };
        if !u.slot_by_slot || !matches!(u.stage, UpgradeStage::Starting { .. }) || self.phase != Phase::Running {
            return;
        }
        u.deadline = now.checked_add(self.policy.upgrade_timeout);
        let Some(s) = self.slots.get_mut(slot) else {
            // A slot this master does not have: nothing to free.
            out.push(Command::FreeSlot { slot });
            return;
        };
        if s.handed {
            return;
        }
        s.handed = true;
        s.next_spawn = None;
        s.probe_at = None;
        let current = s.current.take();
        let next = s.next.take();
        s.recycling = None;
        for mut p in current.into_iter().chain(next) {
            self.stop(&mut p, crate::stats::ExitReason::Restart, now, out);
            self.retiring.push((slot, p));
        }
        self.recycle_queue.retain(|(s, _, _)| *s != slot);
        out.push(Command::Report(Report::SlotHandedOver { slot }));
        if !self.retiring.iter().any(|(s, _)| *s == slot) {
            out.push(Command::FreeSlot { slot });
        }
    }

    /// A retiring worker exited: if its slot was handed to the new master and none of this
    /// master's workers of the slot is left, the new master may start its next one.
    pub(super) fn free_if_handed(&mut self, slot: usize, out: &mut Vec<Command>) {
        let slot_by_slot = self.upgrade.as_ref().is_some_and(|u| u.slot_by_slot);
        if slot_by_slot
            && self.slots.get(slot).is_some_and(|s| s.handed)
            && !self.retiring.iter().any(|(s, _)| *s == slot)
        {
            out.push(Command::FreeSlot { slot });
        }
    }

    /// (The old master.) A slot-by-slot upgrade failed: the slots it handed over get workers of
    /// this master again, at once.
    fn take_slots_back(&mut self, now: Instant) {
        let running = self.phase == Phase::Running;
        for s in &mut self.slots {
            if std::mem::take(&mut s.handed) && running && s.current.is_none() && s.next_spawn.is_none() {
                s.next_spawn = Some((now, SpawnReason::Respawn));
            }
        }
    }

    /// (A master started by a slot-by-slot upgrade.) The predecessor freed `slot`: the next
    /// one starts.
    pub(super) fn on_slot_freed(&mut self, slot: usize, now: Instant, _out: &mut Vec<Command>) {
        self.ungate(slot + 1, now);
    }

    fn ungate(&mut self, slot: usize, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        if let Some(s) = self.slots.get_mut(slot).filter(|s| s.gated) {
            s.gated = false;
            s.next_spawn = Some((now, SpawnReason::Initial));
        }
    }

    /// (A master started by a slot-by-slot upgrade.) Its worker of `slot` is ready: the
    /// predecessor hears it (and drains its own worker there); a slot the predecessor never
    /// had lets the next one start at once.
    pub(super) fn slot_ready_for_predecessor(&mut self, slot: usize, now: Instant, out: &mut Vec<Command>) {
        let Some(old) = self.predecessor_slots else { return };
        if self.takeover != Takeover::Pending {
            return;
        }
        if self.slots.get(slot).and_then(|s| s.current.as_ref()).is_some_and(|p| p.state == ProcState::Active) {
            out.push(Command::SaySlotReady { slot });
            if slot >= old {
                self.ungate(slot + 1, now);
            }
        }
    }

    /// The new master could not be started. A busy program file (a file just put at the path
    /// may be open for writing for a moment in a process forked meanwhile, until its own exec)
    /// is tried again a little later, a few times, from the timer: the loop never sleeps.
    pub(super) fn on_master_spawn_failed(&mut self, error: String, busy: bool, now: Instant, out: &mut Vec<Command>) {
        match self.upgrade.take() {
            Some(mut u) if u.stage == UpgradeStage::Spawning => {
                if busy && u.spawn_tries < BUSY_TRIES {
                    u.spawn_tries += 1;
                    u.retry_at = Some(now.checked_add(BUSY_RETRY).unwrap_or(now));
                    self.upgrade = Some(u);
                    return;
                }
                let tries = if u.spawn_tries > 1 { format!(" (tried {} times)", u.spawn_tries) } else { String::new() };
                let reason = format!("cannot start the new master: {error}{tries}");
                self.finish_upgrade(UpgradeOutcome::Failed { reason }, u.tickets, out);
            }
            // Stopped before it was confirmed: nothing runs.
            Some(u) if u.stage == UpgradeStage::Killing => {}
            other => self.upgrade = other,
        }
    }

    /// The new master's workers are ready: it is offered the cluster (phase one of the
    /// hand-over). This master keeps its listeners and its workers serving until the new master
    /// says it took over, within the upgrade timeout again.
    pub(super) fn on_master_ready(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some(u) = self.upgrade.as_mut() else { return };
        let UpgradeStage::Starting { pid } = u.stage else { return };
        if self.phase != Phase::Running {
            return;
        }
        u.stage = UpgradeStage::HandingOver { pid };
        u.deadline = now.checked_add(self.policy.upgrade_timeout);
        out.push(Command::HandOver { pid });
        out.push(Command::Report(Report::OfferingHandOver { pid }));
    }

    /// The new master took over (its route is attached, its control socket accepts): phase two.
    /// systemd hears the new main pid from this master, still the main process (so
    /// `NotifyAccess=main` suffices), before the new master hears it may notify; then this
    /// master drains.
    pub(super) fn on_master_took_over(&mut self, slots: Option<usize>, now: Instant, out: &mut Vec<Command>) {
        let Some(UpgradeStage::HandingOver { pid }) = self.upgrade.as_ref().map(|u| u.stage) else { return };
        if self.phase != Phase::Running {
            return;
        }
        let tickets = self.upgrade.take().map(|u| u.tickets).unwrap_or_default();
        self.handed_over = true;
        out.push(Command::Notify(Notify::MainPid { pid }));
        out.push(Command::ConfirmHandOver);
        self.finish_upgrade(UpgradeOutcome::Completed { new_pid: pid }, tickets, out);
        // The new master's route left out the slots it does not have: their workers here drain
        // once the handshakes towards their sockets are over.
        let workers = self.stop_everything(slots, now, out);
        out.push(Command::Report(Report::HandingOver { pid, workers }));
    }

    /// The new master says it cannot serve: the upgrade fails at once, with its reason.
    pub(super) fn on_master_cannot_serve(&mut self, reason: String, now: Instant, out: &mut Vec<Command>) {
        let Some(u) = self.upgrade.as_mut().filter(|u| matches!(u.stage, UpgradeStage::Starting { .. })) else {
            return;
        };
        let tickets = std::mem::take(&mut u.tickets);
        let reason = format!("the new master cannot serve: {reason}");
        self.kill_new_master(UpgradeOutcome::Failed { reason }, tickets, now, out);
        self.take_slots_back(now);
    }

    /// (The old master.) The new master failed after it was offered the cluster: the control
    /// socket, the admin listener, steering and the socket files are this master's again, and
    /// its route is attached again (the new master's may be in place).
    fn take_back(&mut self, out: &mut Vec<Command>) {
        out.push(Command::TakeBack);
        if self.steering == super::Steering::Off {
            // No route of ours will replace the new master's program: the kernel hashes.
            out.push(Command::Unsteer { for_good: true });
        }
        self.routed = vec![usize::MAX];
    }

    pub(super) fn on_master_exited(
        &mut self,
        status: ExitStatus,
        reason: Option<String>,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        match self.upgrade.take() {
            Some(u) if u.stage == UpgradeStage::Killing => {}
            Some(u) => {
                let said = reason.map(|r| format!(": {r}")).unwrap_or_default();
                let when = if matches!(u.stage, UpgradeStage::HandingOver { .. }) {
                    // Offered the cluster, it died before it took over: nothing was stopped here.
                    self.take_back(out);
                    "took over"
                } else {
                    "was ready"
                };
                let reason = format!("the new master exited before it {when} ({status}){said}");
                self.finish_upgrade(UpgradeOutcome::Failed { reason }, u.tickets, out);
                self.take_slots_back(now);
            }
            // It exited after it took over: not this master's concern any more.
            None => {}
        }
    }

    /// What is due of the upgrade: a start tried again (the program file was busy); a new
    /// master past its deadline (not ready, or not taken over, within the upgrade timeout) is
    /// asked to stop and this master serves on; one asked to stop that has not exited within
    /// the shutdown timeout and a margin is killed.
    pub(super) fn upgrade_due(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some(u) = self.upgrade.as_mut() else { return };
        if u.retry_at.is_some_and(|t| t <= now) {
            u.retry_at = None;
            out.push(Command::SpawnMaster { slot_by_slot: u.slot_by_slot });
        }
        if u.deadline.is_none_or(|d| d > now) {
            return;
        }
        let timeout = self.policy.upgrade_timeout;
        let reason = match u.stage {
            UpgradeStage::Killing => {
                u.deadline = None;
                out.push(Command::KillMaster);
                return;
            }
            UpgradeStage::HandingOver { .. } => {
                format!("the new master did not say it took over within {timeout:?} of the offer")
            }
            _ => format!("the new master was not ready within {timeout:?}"),
        };
        let handing = matches!(u.stage, UpgradeStage::HandingOver { .. });
        let tickets = std::mem::take(&mut u.tickets);
        if handing {
            self.take_back(out);
        }
        self.kill_new_master(UpgradeOutcome::Failed { reason }, tickets, now, out);
        self.take_slots_back(now);
    }

    /// A shutdown began: an upgrade still starting (or handing over) is cancelled.
    pub(super) fn cancel_upgrade(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some(u) = self.upgrade.as_mut().filter(|u| u.stage != UpgradeStage::Killing) else { return };
        let handing = matches!(u.stage, UpgradeStage::HandingOver { .. });
        let tickets = std::mem::take(&mut u.tickets);
        if handing {
            self.take_back(out);
        }
        let reason = "the cluster is shutting down".to_owned();
        self.kill_new_master(UpgradeOutcome::Cancelled { reason }, tickets, now, out);
        for s in &mut self.slots {
            s.handed = false;
        }
    }

    /// Asks the new master to stop: `SIGTERM`, so that it drains and stops its own workers
    /// (killed at once, they would drain orphaned, with nobody to kill the late ones), and
    /// `SIGKILL` if it has not exited within this master's shutdown timeout and a margin. A
    /// start waiting to be tried again runs nothing: the upgrade simply ends.
    fn kill_new_master(&mut self, outcome: UpgradeOutcome, tickets: Vec<u64>, now: Instant, out: &mut Vec<Command>) {
        let stop_by = self.policy.shutdown_timeout.saturating_add(RELEASE_MARGIN);
        match self.upgrade.as_mut() {
            Some(u) if u.stage == UpgradeStage::Spawning && u.retry_at.is_some() => self.upgrade = None,
            Some(u) => {
                u.stage = UpgradeStage::Killing;
                u.retry_at = None;
                u.deadline = Some(now.checked_add(stop_by).unwrap_or(now));
                out.push(Command::StopMaster);
            }
            None => {}
        }
        self.finish_upgrade(outcome, tickets, out);
    }

    fn finish_upgrade(&mut self, outcome: UpgradeOutcome, tickets: Vec<u64>, out: &mut Vec<Command>) {
        self.last_upgrade = Some(outcome.clone());
        out.push(Command::Report(Report::UpgradeFinished { outcome, tickets }));
    }

    /// When the upgrade's next deadline is, if it has one: a start to try again, the new
    /// master's deadline (to get ready, to take over, or to have stopped).
    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        self.upgrade.as_ref().and_then(|u| [u.deadline, u.retry_at].into_iter().flatten().min())
    }

    /// Whether the old master waits for something of the upgrade (a killed new master's exit).
    pub(super) fn upgrade_pending(&self) -> bool {
        self.upgrade.is_some()
    }

    /// The outcome to exit with once nothing is left, if this master handed over.
    pub(super) fn upgraded_outcome(&self) -> Option<Outcome> {
        self.handed_over.then_some(Outcome::Upgraded)
    }

    /// (A new master.) The predecessor handed over: this master takes over and says so.
    pub(super) fn on_handed_over(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.takeover == Takeover::Pending {
            self.take_over(true, now, out);
        }
    }

    /// (A new master.) The predecessor heard that this master took over: it told systemd the
    /// new main pid, and drains. From now on this master talks to systemd.
    pub(super) fn on_predecessor_draining(&mut self, out: &mut Vec<Command>) {
        if self.takeover == Takeover::Acked {
            self.takeover = Takeover::Taken;
            self.announce_to_systemd(out);
        }
    }

    /// (A new master.) The predecessor is gone; with `clean`, none of its workers is left.
    pub(super) fn on_predecessor_gone(&mut self, clean: bool, now: Instant, out: &mut Vec<Command>) {
        if self.takeover == Takeover::Own {
            return;
        }
        self.predecessor_gone = true;
        match self.takeover {
            Takeover::Pending => self.take_over(false, now, out),
            // It died between this master's word and its confirmation.
            Takeover::Acked => {
                self.takeover = Takeover::Taken;
                self.announce_to_systemd(out);
            }
            Takeover::Own | Takeover::Taken => {}
        }
        let wait = if clean { Duration::ZERO } else { self.predecessor_timeout.saturating_add(RELEASE_MARGIN) };
        self.release_at = Some(now.checked_add(wait).unwrap_or(now));
    }

    /// Takes over: the control socket and the admin listener, and the route, at once (sent
    /// whatever it is: the predecessor's program is attached to the groups until this master
    /// attaches its own). Handed over, it then says so, and hears from systemd's side once the
    /// predecessor told systemd the new main pid; with the predecessor gone, it tells systemd
    /// at once.
    fn take_over(&mut self, handed_over: bool, now: Instant, out: &mut Vec<Command>) {
        self.takeover = if handed_over { Takeover::Acked } else { Takeover::Taken };
        // Slot by slot: whatever still waits for its turn starts now.
        for slot in 0..self.slots.len() {
            self.ungate(slot, now);
        }
        out.push(Command::TakeOver);
        out.push(Command::Report(Report::TookOver { handed_over }));
        self.routed = vec![usize::MAX];
        self.update_route(out, false);
        if handed_over {
            out.push(Command::SayTookOver);
        } else {
            self.announce_to_systemd(out);
        }
    }

    /// `READY=1` (with `MAINPID=`), once the start-up is over.
    fn announce_to_systemd(&self, out: &mut Vec<Command>) {
        if self.phase == Phase::Running && self.announced_ready {
            let workers = self.cluster_stats().active_workers;
            out.push(Command::Notify(Notify::Ready { workers }));
        }
    }

    /// (A new master, its start-up over.) Tells its predecessor, once, that it is ready: when at
    /// least `min_ready` workers are (checked again after every event: a cool-off probe may
    /// still bring one); or, when fewer are and none can still come (no probe is pending), that
    /// it cannot serve, so that the upgrade fails at once with the reason instead of at its
    /// timeout.
    pub(super) fn tell_predecessor_ready(&mut self, out: &mut Vec<Command>) {
        if self.takeover != Takeover::Pending
            || self.said_ready
            || !self.announced_ready
            || self.phase != Phase::Running
        {
            return;
        }
        let workers = self.slots.iter().filter(|s| s.status() == crate::stats::WorkerStatus::Active).count();
        let needed = self.policy.min_ready.max(1);
        if workers >= needed {
            self.said_ready = true;
            out.push(Command::SayReady { workers });
        } else if !self.slots.iter().any(|s| {
            // A worker may still come: a slot starting (a probe's worker) or waiting for a probe.
            s.probe_at.is_some()
                || matches!(s.status(), crate::stats::WorkerStatus::Starting | crate::stats::WorkerStatus::Respawning)
        }) {
            self.said_ready = true;
            let disabled = self.slots.iter().filter(|s| s.disabled).count();
            let reason = format!(
                "only {workers} of its {} workers got ready ({disabled} disabled), fewer than min_ready ({needed}), and none can still come",
                self.slots.len()
            );
            out.push(Command::SayCannotServe { reason });
        }
    }

    /// The inherited sockets nobody uses are closed once the predecessor's workers are gone.
    pub(super) fn release_due(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.release_at.is_some_and(|t| t <= now) {
            self.release_at = None;
            out.push(Command::ReleaseInherited);
        }
    }

    pub(super) fn release_deadline(&self) -> Option<Instant> {
        self.release_at
    }

    /// (A new master.) Until it took over and its predecessor told systemd the new main pid,
    /// it tells systemd's watchdog nothing: its predecessor does.
    pub(super) fn owns_outside(&self) -> bool {
        matches!(self.takeover, Takeover::Own | Takeover::Taken)
    }

    /// Whether this master may tell systemd anything: a new master may not before its
    /// predecessor told systemd the new main pid. (Another process is the service's main one
    /// until then: the `STOPPING=1` of a new master stopped by a rollback would, under
    /// `NotifyAccess=all`, stop the service.)
    pub fn speaks_for_the_service(&self) -> bool {
        self.owns_outside()
    }
}
