//! Upgrading the master in place. In the old master: an upgrade starts a new master (the
//! program at the original path), which inherits every listening socket and starts its own
//! workers; once it says they are ready, the old master hands over (systemd's main pid, the
//! control socket, steering), drains its own workers as a shutdown whose listeners the new
//! master keeps, and exits. A new master that cannot start, exits, or is not ready within the
//! upgrade timeout is killed and the old master serves on. In a new master: it routes nothing
//! and tells systemd nothing until its predecessor hands over, or is gone.

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
        } else if self.takeover == Takeover::Pending {
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

    pub(super) fn on_master_spawn_failed(&mut self, error: String, out: &mut Vec<Command>) {
        match self.upgrade.take() {
            Some(u) if u.stage == UpgradeStage::Spawning => {
                let reason = format!("cannot start the new master: {error}");
                self.finish_upgrade(UpgradeOutcome::Failed { reason }, u.tickets, out);
            }
            // Killed before it was confirmed: nothing runs.
            Some(u) if u.stage == UpgradeStage::Killing => {}
            other => self.upgrade = other,
        }
    }

    /// The new master's workers are ready: it takes over, and this master drains.
    pub(super) fn on_master_ready(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some(UpgradeStage::Starting { pid }) = self.upgrade.as_ref().map(|u| u.stage) else { return };
        if self.phase != Phase::Running {
            return;
        }
        let tickets = self.upgrade.take().map(|u| u.tickets).unwrap_or_default();
        self.handed_over = true;
        out.push(Command::Notify(Notify::MainPid { pid }));
        out.push(Command::HandOver { pid });
        self.finish_upgrade(UpgradeOutcome::Completed { new_pid: pid }, tickets, out);
        let workers = self.stop_everything(now, out);
        out.push(Command::Report(Report::HandingOver { pid, workers }));
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
                let reason = format!("the new master exited before it was ready ({status}){said}");
                self.finish_upgrade(UpgradeOutcome::Failed { reason }, u.tickets, out);
                self.take_slots_back(now);
            }
            // It exited after it took over: not this master's concern any more.
            None => {}
        }
    }

    /// The new master missed its deadline: it is killed and this master serves on.
    pub(super) fn upgrade_due(&mut self, now: Instant, out: &mut Vec<Command>) {
        let Some(u) = self.upgrade.as_mut() else { return };
        if u.stage == UpgradeStage::Killing || u.deadline.is_none_or(|d| d > now) {
            return;
        }
        let tickets = std::mem::take(&mut u.tickets);
        let reason = format!("the new master was not ready within {:?}", self.policy.upgrade_timeout);
        self.kill_new_master(UpgradeOutcome::Failed { reason }, tickets, out);
        self.take_slots_back(now);
    }

    /// A shutdown began: an upgrade still starting is cancelled.
    pub(super) fn cancel_upgrade(&mut self, out: &mut Vec<Command>) {
        let Some(u) = self.upgrade.as_mut().filter(|u| u.stage != UpgradeStage::Killing) else { return };
        let tickets = std::mem::take(&mut u.tickets);
        let reason = "the cluster is shutting down".to_owned();
        self.kill_new_master(UpgradeOutcome::Cancelled { reason }, tickets, out);
        for s in &mut self.slots {
            s.handed = false;
        }
    }

    fn kill_new_master(&mut self, outcome: UpgradeOutcome, tickets: Vec<u64>, out: &mut Vec<Command>) {
        if let Some(u) = self.upgrade.as_mut() {
            u.stage = UpgradeStage::Killing;
            u.deadline = None;
        }
        out.push(Command::KillMaster);
        self.finish_upgrade(outcome, tickets, out);
    }

    fn finish_upgrade(&mut self, outcome: UpgradeOutcome, tickets: Vec<u64>, out: &mut Vec<Command>) {
        self.last_upgrade = Some(outcome.clone());
        out.push(Command::Report(Report::UpgradeFinished { outcome, tickets }));
    }

    /// When the upgrade's deadline is, if it matters.
    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        self.upgrade.as_ref().filter(|u| u.stage != UpgradeStage::Killing).and_then(|u| u.deadline)
    }

    /// Whether the old master waits for something of the upgrade (a killed new master's exit).
    pub(super) fn upgrade_pending(&self) -> bool {
        self.upgrade.is_some()
    }

    /// The outcome to exit with once nothing is left, if this master handed over.
    pub(super) fn upgraded_outcome(&self) -> Option<Outcome> {
        self.handed_over.then_some(Outcome::Upgraded)
    }

    /// (A new master.) The predecessor handed over.
    pub(super) fn on_handed_over(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.takeover == Takeover::Pending {
            self.take_over(true, now, out);
        }
    }

    /// (A new master.) The predecessor is gone; with `clean`, none of its workers is left.
    pub(super) fn on_predecessor_gone(&mut self, clean: bool, now: Instant, out: &mut Vec<Command>) {
        if self.takeover == Takeover::Own {
            return;
        }
        self.predecessor_gone = true;
        if self.takeover == Takeover::Pending {
            self.take_over(false, now, out);
        }
        let wait = if clean { Duration::ZERO } else { self.predecessor_timeout.saturating_add(RELEASE_MARGIN) };
        self.release_at = Some(now.checked_add(wait).unwrap_or(now));
    }

    fn take_over(&mut self, handed_over: bool, now: Instant, out: &mut Vec<Command>) {
        self.takeover = Takeover::Taken;
        // Slot by slot: whatever still waits for its turn starts now.
        for slot in 0..self.slots.len() {
            self.ungate(slot, now);
        }
        out.push(Command::TakeOver);
        out.push(Command::Report(Report::TookOver { handed_over }));
        if self.phase == Phase::Running && self.announced_ready {
            let workers = self.cluster_stats().active_workers;
            out.push(Command::Notify(Notify::Ready { workers }));
        }
        // The route is sent again whatever it is: the predecessor's program is attached to the
        // groups until this master attaches its own.
        self.routed = vec![usize::MAX];
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

    /// (A new master.) Until it took over, it tells systemd's watchdog nothing: its
    /// predecessor does.
    pub(super) fn owns_outside(&self) -> bool {
        self.takeover != Takeover::Pending
    }
}
