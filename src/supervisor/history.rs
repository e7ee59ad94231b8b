//! The event history: a bounded ring of [`ClusterEvent`]s, each with a sequence number and the
//! wall-clock time.
//!
//! Entries are derived in one place, at the end of [`Supervisor::handle`], from the commands the
//! event led to and the state it left: every fact the driver is told ([`Report`]) is already a
//! decision the supervisor made, every [`Command::Signal`] is a signal sent (its reason is read
//! from the process it goes to: hung, not ready, why it was asked to stop), and
//! [`Command::Exit`] is the end. No policy file records anything itself, so a new decision
//! point cannot forget to: its report is what the history shows. Two orderings are fixed on
//! the way: a slot disabled by its worker's exit is recorded after that exit (the report comes
//! first, from the book-keeping), and nothing else is reordered.
//!
//! The ring keeps the last `capacity` entries (0: none). The entries of the last `handle` are
//! also kept apart ([`Supervisor::fresh_events`]) until the next one, whatever the capacity, so
//! that the driver can write each one to the event log even when one event (the shutdown of a
//! large cluster) produces more entries than the ring holds.

use std::collections::VecDeque;
use std::time::SystemTime;

use super::{Command, Outcome, Phase, ProcState, Report, SIGKILL, Supervisor};
use crate::events::{ClusterEvent, DEFAULT_EVENT_HISTORY, EndOutcome, EventKind, RecycleCause, SignalReason};
use crate::signal::Signal;
use crate::stats::ExitReason;

/// The worker an entry concerns: its slot and, if known, its pid.
type Worker = Option<(usize, Option<u32>)>;

/// The bounded ring of entries, and the sequence counter.
#[derive(Debug, Clone)]
pub struct History {
    capacity: usize,
    ring: VecDeque<ClusterEvent>,
    /// The entries of the last [`Supervisor::handle`].
    fresh: Vec<ClusterEvent>,
    /// The sequence number of the next entry (from 1).
    next_seq: u64,
    /// Stamped on every entry.
    master_pid: u32,
}

impl History {
    /// An empty history keeping the last `capacity` entries, of the master `master_pid`.
    pub fn new(capacity: usize, master_pid: u32) -> History {
        History {
            capacity,
            ring: VecDeque::with_capacity(capacity.min(DEFAULT_EVENT_HISTORY)),
            fresh: Vec::new(),
            next_seq: 1,
            master_pid,
        }
    }

    /// How many entries it keeps at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The sequence number of the last entry recorded (kept or not), 0 before the first.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The sequence number of the oldest entry kept, if any is.
    pub fn first_seq(&self) -> Option<u64> {
        self.ring.front().map(|e| e.seq)
    }

    /// The entries kept, oldest first.
    #[cfg(test)]
    pub fn entries(&self) -> impl ExactSizeIterator<Item = &ClusterEvent> + DoubleEndedIterator {
        self.ring.iter()
    }

    /// The entries kept whose sequence number is after `seq`, oldest first.
    pub fn since(&self, seq: u64) -> impl Iterator<Item = &ClusterEvent> {
        // Sequence numbers are consecutive in the ring: the first wanted one is at a known index.
        let skip = match self.first_seq() {
            Some(first) if seq >= first => (seq - first).saturating_add(1),
            _ => 0,
        };
        self.ring.iter().skip(usize::try_from(skip).unwrap_or(usize::MAX))
    }

    /// The entries of the last [`Supervisor::handle`], oldest first.
    pub fn fresh(&self) -> &[ClusterEvent] {
        &self.fresh
    }

    fn begin(&mut self) {
        self.fresh.clear();
        // One huge batch (the shutdown of thousands of workers) does not keep its room.
        if self.fresh.capacity() > 1024 {
            self.fresh = Vec::new();
        }
    }

    fn record(&mut self, time: SystemTime, worker: Worker, kind: EventKind) {
        let (worker_id, pid) = match worker {
            Some((slot, pid)) => (Some(slot), pid),
            None => (None, None),
        };
        let entry = ClusterEvent::new(self.next_seq, time, self.master_pid, worker_id, pid, kind);
        self.next_seq += 1;
        if self.capacity > 0 {
            if self.ring.len() == self.capacity {
                self.ring.pop_front();
            }
            self.ring.push_back(entry.clone());
        }
        self.fresh.push(entry);
    }
}

impl Supervisor {
    /// Keeps the last `capacity` entries of the event history (0: none), stamped with the
    /// master's pid (default: [`DEFAULT_EVENT_HISTORY`], pid 0).
    #[must_use]
    pub fn with_event_history(mut self, capacity: usize, master_pid: u32) -> Supervisor {
        self.history = History::new(capacity, master_pid);
        self
    }

    /// The event history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The entries the last [`handle`](Supervisor::handle) recorded, oldest first.
    pub fn fresh_events(&self) -> &[ClusterEvent] {
        self.history.fresh()
    }

    /// Clears the last batch's entries, as a new [`handle`](Supervisor::handle) begins.
    pub(super) fn begin_history(&mut self) {
        self.history.begin();
    }

    /// Records what the batch `out` did (see the [module documentation](self)); `before` is
    /// the phase before the event.
    pub(super) fn record_history(&mut self, before: Phase, out: &[Command], wall: SystemTime) {
        // A second shutdown request killed every worker left at once.
        let forced = before == Phase::ShuttingDown { killed: false }
            && matches!(self.phase, Phase::ShuttingDown { killed: true } | Phase::Done);
        let mut entries: Vec<(Worker, EventKind)> = Vec::new();
        // Disabled slots wait for their worker's exit, when it is in the batch.
        let mut deferred: Vec<(usize, EventKind)> = Vec::new();
        for cmd in out {
            match cmd {
                Command::Signal { key, signal } => {
                    let (worker, reason) = match self.locate(*key) {
                        Some(loc) => {
                            let slot = match loc {
                                super::Loc::Current(i) | super::Loc::Next(i) => i,
                                super::Loc::Retiring(i) => self.retiring[i].0,
                            };
                            let p = self.proc_at_ref(loc);
                            (Some((slot, p.and_then(|p| p.pid))), self.signal_reason(slot, p, *signal, forced))
                        }
                        None => (None, SignalReason::Other),
                    };
                    entries.push((worker, EventKind::Signalled { signal: *signal, reason }));
                }
                Command::Exit(outcome) => {
                    entries.extend(deferred.drain(..).map(|(slot, kind)| (Some((slot, None)), kind)));
                    let outcome = match *outcome {
                        Outcome::Stopped => EndOutcome::Stopped,
                        Outcome::AllFailed { workers, disabled, crashed } => {
                            EndOutcome::AllFailed { workers, disabled, crashed }
                        }
                        Outcome::Upgraded => EndOutcome::Upgraded,
                    };
                    entries.push((None, EventKind::Ended { outcome }));
                }
                Command::Report(Report::Disabled { slot, crashes, within }) => {
                    deferred.push((*slot, EventKind::Disabled { crashes: *crashes, within: *within }));
                }
                Command::Report(r) => {
                    let Some(entry) = entry_of(r) else { continue };
                    entries.push(entry);
                    if let Report::Exited { slot, .. } = r {
                        while let Some(i) = deferred.iter().position(|(s, _)| s == slot) {
                            let (slot, kind) = deferred.remove(i);
                            entries.push((Some((slot, None)), kind));
                        }
                    }
                }
                _ => {}
            }
        }
        entries.extend(deferred.into_iter().map(|(slot, kind)| (Some((slot, None)), kind)));
        // What a batch begins (a shutdown, a hand-over, a rollout) comes before the signals
        // and outcomes it leads to, though its report is sent once they are decided.
        let headline = |k: &EventKind| {
            matches!(
                k,
                EventKind::ShutdownStarted { .. }
                    | EventKind::ShutdownDelayed { .. }
                    | EventKind::HandingOver { .. }
                    | EventKind::RestartStarted { .. }
            )
        };
        entries.sort_by_key(|(_, k)| !headline(k));
        for (worker, kind) in entries {
            self.history.record(wall, worker, kind);
        }
    }

    pub(super) fn proc_at_ref(&self, loc: super::Loc) -> Option<&super::Proc> {
        match loc {
            super::Loc::Current(i) => self.slots[i].current.as_ref(),
            super::Loc::Next(i) => self.slots[i].next.as_ref(),
            super::Loc::Retiring(i) => self.retiring.get(i).map(|(_, p)| p),
        }
    }

    /// Why `signal` went to `p` (of `slot`), from the state the batch left it in.
    fn signal_reason(&self, slot: usize, p: Option<&super::Proc>, signal: Signal, forced: bool) -> SignalReason {
        let Some(p) = p else { return SignalReason::Other };
        if p.hung {
            return SignalReason::Hung;
        }
        if p.not_ready || p.why_stopped == Some(ExitReason::BootTimeout) {
            return SignalReason::BootTimeout;
        }
        if p.state != ProcState::Stopping {
            // Only `signal_workers` signals a worker it does not stop.
            return SignalReason::Requested;
        }
        if signal == SIGKILL {
            return if forced { SignalReason::ShutdownForced } else { SignalReason::StopTimeout };
        }
        // A slot handed to the new master of a slot-by-slot upgrade, or this master's drain
        // after the hand-over.
        let upgrade = self.slots.get(slot).is_some_and(|s| s.handed) || self.handed_over;
        match p.why_stopped {
            _ if upgrade => SignalReason::Upgrade,
            Some(ExitReason::Restart) => SignalReason::Restart,
            Some(ExitReason::RecycledAge | ExitReason::RecycledMemory | ExitReason::RecycledRequests) => {
                SignalReason::Recycle
            }
            Some(ExitReason::Scale) => SignalReason::Scale,
            _ => SignalReason::Shutdown,
        }
    }
}

/// The entry of a report (the worker it concerns, and what), if it has one of its own.
fn entry_of(r: &Report) -> Option<(Worker, EventKind)> {
    let w = |slot: usize, pid: u32| Some((slot, Some(pid)));
    let slot_only = |slot: usize| Some((slot, None));
    Some(match r {
        Report::Started { slot, pid } => (w(*slot, *pid), EventKind::Spawned),
        Report::SpawnFailed { slot, error } => (slot_only(*slot), EventKind::SpawnFailed { error: error.clone() }),
        Report::Ready { slot, pid } => (w(*slot, *pid), EventKind::Ready),
        Report::AllReady { workers } => (None, EventKind::AllReady { workers: *workers }),
        Report::Exited { slot, pid, status, crash, reason, cause, respawn_in } => (
            w(*slot, *pid),
            EventKind::Exited {
                reason: *cause,
                status: *status,
                crash: *crash,
                detail: reason.clone(),
                respawn_in: *respawn_in,
            },
        ),
        Report::Hung { slot, pid, silent, grace, .. } => {
            (w(*slot, *pid), EventKind::Hung { silent: *silent, grace: *grace })
        }
        Report::Recycling { slot, pid, reason, in_place } => {
            let reason = match reason {
                super::RecycleReason::Requests => RecycleCause::Requests,
                super::RecycleReason::Age => RecycleCause::Age,
                super::RecycleReason::Memory => RecycleCause::Memory,
            };
            (w(*slot, *pid), EventKind::Recycling { reason, in_place: *in_place })
        }
        Report::RecycleFailed { slot, reason } => {
            (slot_only(*slot), EventKind::RecycleFailed { reason: reason.clone() })
        }
        Report::Probing { slot } => (slot_only(*slot), EventKind::Probing),
        Report::Reenabled { slot } => (slot_only(*slot), EventKind::Reenabled),
        Report::ShutdownDelayed { delay } => (None, EventKind::ShutdownDelayed { delay: *delay }),
        Report::ShuttingDown { workers } => (None, EventKind::ShutdownStarted { workers: *workers }),
        Report::RestartStarted { workers, .. } => (None, EventKind::RestartStarted { workers: *workers }),
        Report::RestartQueued => (None, EventKind::RestartQueued),
        Report::Replaced { slot, old_pid, new_pid } => (w(*slot, *new_pid), EventKind::Replaced { old_pid: *old_pid }),
        Report::RestartFinished { outcome, .. } => (None, EventKind::RestartFinished { outcome: outcome.clone() }),
        Report::UpgradeStarted { .. } => (None, EventKind::UpgradeStarted),
        Report::MasterStarted { pid, slot_by_slot } => {
            (None, EventKind::MasterStarted { new_pid: *pid, slot_by_slot: *slot_by_slot })
        }
        Report::SlotHandedOver { slot } => (slot_only(*slot), EventKind::SlotHandedOver),
        Report::OfferingHandOver { pid } => (None, EventKind::OfferingHandOver { new_pid: *pid }),
        Report::HandingOver { pid, workers } => (None, EventKind::HandingOver { new_pid: *pid, workers: *workers }),
        Report::UpgradeFinished { outcome, .. } => (None, EventKind::UpgradeFinished { outcome: outcome.clone() }),
        Report::TookOver { handed_over } => (None, EventKind::TookOver { handed_over: *handed_over }),
        Report::NotDuringUpgrade { what } => (
            None,
            EventKind::Refused { what: (*what).to_owned(), reason: "an upgrade of the master is running".to_owned() },
        ),
        Report::ScaleRefused { workers } => (
            None,
            EventKind::Refused {
                what: "scaling".to_owned(),
                reason: format!("{workers} workers is outside 1 to {}", super::MAX_WORKERS),
            },
        ),
        Report::Scaled { from, to } => (None, EventKind::Scaled { from: *from, to: *to }),
        Report::SteeringFailed { error } => (None, EventKind::SteeringFailed { error: error.clone() }),
        // Recorded otherwise: each signal sent is an entry of its own (`Signalled`), as is the
        // hang of a worker and its exit; a route too large is a note for the log only.
        Report::Disabled { .. }
        | Report::NotReady { .. }
        | Report::Signalled { .. }
        | Report::StopTimeout { .. }
        | Report::RouteTooLarge { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::super::tests::{Harness, MS, policy};
    use super::super::{Event, Liveness, Policy};
    use super::*;
    use crate::stats::{ExitStatus, RestartOutcome};

    fn kinds(h: &Harness) -> Vec<(Option<usize>, EventKind)> {
        h.sup.history().entries().map(|e| (e.worker_id, e.kind.clone())).collect()
    }

    fn names(h: &Harness) -> Vec<String> {
        h.sup
            .history()
            .entries()
            .map(|e| {
                let json = serde_json::to_value(e).unwrap();
                format!("{}:{}", json["kind"].as_str().unwrap(), e.worker_id.map_or("-".into(), |w| w.to_string()))
            })
            .collect()
    }

    #[test]
    fn the_ring_is_bounded_and_numbered() {
        let mut h = History::new(3, 7);
        assert_eq!((h.last_seq(), h.first_seq()), (0, None));
        for _ in 0..5 {
            h.record(UNIX_EPOCH, None, EventKind::Probing);
        }
        assert_eq!(h.entries().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!((h.last_seq(), h.first_seq(), h.capacity()), (5, Some(3), 3));
        assert!(h.entries().all(|e| e.master_pid == 7));
        assert_eq!(h.since(0).map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5], "older than kept: all kept");
        assert_eq!(h.since(3).map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(h.since(5).count(), 0);
        assert_eq!(h.since(u64::MAX).count(), 0);
        // Every entry of a batch stays in `fresh` until the next one begins.
        assert_eq!(h.fresh().len(), 5);
        h.begin();
        assert!(h.fresh().is_empty());

        let mut off = History::new(0, 7);
        off.record(UNIX_EPOCH, None, EventKind::Probing);
        assert_eq!((off.entries().len(), off.last_seq(), off.fresh().len()), (0, 1, 1), "disabled: nothing kept");
    }

    /// The brief's scenario: a worker killed by `kill -9` is an exit with reason crash, then its
    /// respawn and ready with the new pid; the crash protection's disabling comes after the
    /// exit that caused it.
    #[test]
    fn spawns_crashes_respawns_and_disabling_are_recorded() {
        let mut h = Harness::new(Policy { max_crashes: 2, ..policy(1) });
        h.sup = h.sup.clone().with_event_history(100, 42);
        h.start_all();
        let first = h.sup.slots[0].current.as_ref().unwrap().pid;
        h.exit(0, ExitStatus::Signal(Signal::KILL));
        h.at(200);
        h.ready(0);
        let second = h.sup.slots[0].current.as_ref().unwrap().pid;
        assert_ne!(first, second);
        assert_eq!(names(&h), vec!["spawned:0", "ready:0", "all_ready:-", "exited:0", "spawned:0", "ready:0"]);
        let entries: Vec<&ClusterEvent> = h.sup.history().entries().collect();
        assert_eq!(entries[3].pid, first);
        match &entries[3].kind {
            EventKind::Exited { reason, status, crash, respawn_in, .. } => {
                assert_eq!(*reason, ExitReason::Crash);
                assert_eq!(*status, ExitStatus::Signal(Signal::KILL));
                assert!(*crash);
                assert_eq!(*respawn_in, Some(100 * MS));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((entries[4].pid, entries[5].pid), (second, second));
        assert!(entries.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        h.exit(0, ExitStatus::Code(3));
        // The only slot disabled: supervision ends, after the exit and the disabling.
        let tail: Vec<_> = kinds(&h).into_iter().rev().take(3).collect();
        let failed = EndOutcome::AllFailed { workers: 1, disabled: 1, crashed: 0 };
        assert_eq!(tail[0], (None, EventKind::Ended { outcome: failed }));
        assert!(matches!(tail[1], (Some(0), EventKind::Disabled { crashes: 2, .. })), "{tail:?}");
        assert!(matches!(tail[2], (Some(0), EventKind::Exited { crash: true, respawn_in: None, .. })), "{tail:?}");
    }

    #[test]
    fn a_shutdown_records_each_stop_and_the_end() {
        let mut h = Harness::new(policy(2));
        h.start_all();
        let skip = h.sup.history().last_seq();
        h.feed(Event::Shutdown);
        // One worker drains, the other outlives the shutdown timeout.
        h.exit(0, ExitStatus::Code(0));
        h.at(5000);
        let key = h.sup.retiring.first().map(|(_, p)| p.key).or_else(|| h.sup.slots[1].current.as_ref().map(|p| p.key));
        h.feed(Event::Exited { key: key.unwrap(), status: ExitStatus::Signal(Signal::KILL) });
        let tail: Vec<EventKind> = h.sup.history().since(skip).map(|e| e.kind.clone()).collect();
        let sig = |signal, reason| EventKind::Signalled { signal, reason };
        assert_eq!(tail[0], EventKind::ShutdownStarted { workers: 2 });
        assert_eq!(tail[1..3], [sig(Signal::TERM, SignalReason::Shutdown), sig(Signal::TERM, SignalReason::Shutdown)]);
        assert!(matches!(tail[3], EventKind::Exited { reason: ExitReason::Shutdown, crash: false, .. }));
        assert_eq!(tail[4], sig(Signal::KILL, SignalReason::StopTimeout));
        assert!(matches!(tail[5], EventKind::Exited { reason: ExitReason::Shutdown, .. }));
        assert_eq!(tail[6], EventKind::Ended { outcome: EndOutcome::Stopped });
        assert_eq!(tail.len(), 7);
    }

    #[test]
    fn a_second_shutdown_request_is_a_forced_kill() {
        let mut h = Harness::new(policy(1));
        h.start_all();
        h.feed(Event::Shutdown);
        h.feed(Event::Shutdown);
        let last = h.sup.history().entries().next_back().unwrap().kind.clone();
        assert_eq!(last, EventKind::Signalled { signal: Signal::KILL, reason: SignalReason::ShutdownForced });
    }

    #[test]
    fn a_rolling_restart_and_a_scale_show_up() {
        let mut h = Harness::new(Policy { socket_per_slot: false, ..policy(1) });
        h.start_all();
        let skip = h.sup.history().last_seq();
        h.feed(Event::Restart { ticket: None });
        let key = h.sup.slots[0].next.as_ref().unwrap().key;
        h.feed(Event::Ready { key });
        h.feed(Event::Scale { workers: 3 });
        h.feed(Event::Scale { workers: 2 });
        let got: Vec<(Option<usize>, EventKind)> =
            h.sup.history().since(skip).map(|e| (e.worker_id, e.kind.clone())).collect();
        assert_eq!(got[0], (None, EventKind::RestartStarted { workers: 1 }));
        assert_eq!(got[1], (Some(0), EventKind::Spawned));
        assert_eq!(got[2], (Some(0), EventKind::Ready));
        assert_eq!(got[3], (Some(0), EventKind::Signalled { signal: Signal::TERM, reason: SignalReason::Restart }));
        assert!(matches!(got[4], (Some(0), EventKind::Replaced { old_pid: Some(_) })));
        assert_eq!(got[5], (None, EventKind::RestartFinished { outcome: RestartOutcome::Completed { replaced: 1 } }));
        assert_eq!(got[6], (None, EventKind::Scaled { from: 1, to: 3 }));
        assert_eq!(got[7], (Some(1), EventKind::Spawned), "the first new slot starts at once");
        assert_eq!(got[8], (None, EventKind::Scaled { from: 3, to: 2 }));
        assert_eq!(got.len(), 9, "slot 2 was removed before it started: {got:?}");
    }

    #[test]
    fn hung_workers_and_recycles_say_why() {
        let l = Liveness {
            worker_timeout: Some(1000 * MS),
            hung_grace: 500 * MS,
            max_requests: Some(10),
            ..Liveness::default()
        };
        let mut h = Harness::new(Policy { liveness: l, ..policy(2) });
        h.start_all();
        let (k0, k1) = (h.key_of(0), h.key_of(1));
        let skip = h.sup.history().last_seq();
        h.feed(Event::Beat { key: k0, served: 1, in_flight: 0 });
        h.feed(Event::Beat { key: k1, served: 10, in_flight: 0 });
        // On time (a master waking well after its deadline forgives silences: `forgive_stall`).
        h.at(1100);
        let got: Vec<(Option<usize>, EventKind)> =
            h.sup.history().since(skip).map(|e| (e.worker_id, e.kind.clone())).collect();
        assert!(
            got.iter().any(|(w, k)| *w == Some(1)
                && matches!(k, EventKind::Recycling { reason: RecycleCause::Requests, in_place: false })),
            "{got:?}"
        );
        let hung = got.iter().position(|(w, k)| *w == Some(0) && matches!(k, EventKind::Hung { .. })).expect("hung");
        assert_eq!(got[hung + 1], (Some(0), EventKind::Signalled { signal: Signal::ABRT, reason: SignalReason::Hung }));
        h.at(1600);
        let last = h.sup.history().entries().rfind(|e| e.worker_id == Some(0)).unwrap().kind.clone();
        assert_eq!(last, EventKind::Signalled { signal: Signal::KILL, reason: SignalReason::Hung });
    }

    #[test]
    fn user_signals_and_boot_timeouts_are_told_apart() {
        let mut h = Harness::new(policy(2));
        h.at(0);
        h.at(100);
        h.ready(0);
        h.feed(Event::SignalWorkers { signal: Signal::USR1 });
        h.at(2100);
        let got: Vec<(Option<usize>, EventKind)> = kinds(&h);
        assert!(
            got.contains(&(Some(0), EventKind::Signalled { signal: Signal::USR1, reason: SignalReason::Requested }))
        );
        assert!(
            got.contains(&(Some(1), EventKind::Signalled { signal: Signal::KILL, reason: SignalReason::BootTimeout }))
        );
        // The master's own entries carry no worker, and every entry the wall time of its batch.
        assert!(got.iter().filter(|(w, _)| w.is_none()).all(|(_, k)| !matches!(k, EventKind::Signalled { .. })));
        assert!(h.sup.history().entries().all(|e| e.time == UNIX_EPOCH));
        let _ = Duration::ZERO;
    }
}
