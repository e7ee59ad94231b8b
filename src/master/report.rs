//! The effects of the supervisor's reports: log lines, the user's callbacks, systemd
//! notifications and the answers to callers waiting for a restart.

use super::driver::{Driver, guard};
use super::{ReadyInfo, WorkerExit, WorkerInfo};
use crate::proto::control::Response;
use crate::stats::RestartOutcome;
use crate::supervisor::{Notify, Report};

impl Driver {
    /// Logs a report and runs the matching callback (or answers the callers it concerns).
    pub(super) fn report(&mut self, r: Report) {
        let m = &mut self.m;
        match r {
            Report::Started { slot, pid } => {
                tracing::info!("worker {slot} started (pid {pid})");
                guard("on_start", m.on_start.as_mut(), |f| f(&WorkerInfo { worker_id: slot, pid }));
            }
            Report::SpawnFailed { slot, error } => tracing::error!("cannot start worker {slot}: {error}"),
            Report::Ready { slot, pid } => {
                tracing::debug!("worker {slot} (pid {pid}) is ready");
                guard("on_worker_ready", m.on_worker_ready.as_mut(), |f| f(&WorkerInfo { worker_id: slot, pid }));
            }
            Report::AllReady { workers } => {
                let info = ReadyInfo { addr: m.shared.addr, workers };
                tracing::info!("listening on {} with {workers} workers", info.addr);
                guard("on_ready", m.on_ready.as_mut(), |f| f(&info));
            }
            Report::Exited { slot, pid, status, crash, reason, cause, respawn_in } => {
                let then = match respawn_in {
                    Some(d) => format!("; respawning in {d:?}"),
                    None => String::new(),
                };
                let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
                if crash {
                    tracing::warn!("worker {slot} (pid {pid}) crashed: {status}{why} [reason {cause}]{then}");
                } else {
                    tracing::info!("worker {slot} (pid {pid}) exited: {status}{why} [reason {cause}]{then}");
                }
                let exit = WorkerExit { worker_id: slot, pid, status, crash, reason: cause, respawn_in };
                guard("on_exit", m.on_exit.as_mut(), |f| f(&exit));
            }
            Report::Disabled { slot, crashes, within } => tracing::error!(
                "Worker {slot} crashing too fast ({crashes} times in {}), disabling respawn",
                short_duration(within)
            ),
            Report::NotReady { slot, pid, timeout } => tracing::warn!(
                "worker {slot} (pid {pid}) not ready within {timeout:?}: killing it; a boot failure counts as a crash"
            ),
            Report::Hung { slot, pid, silent, signal, grace } => tracing::error!(
                "worker {slot} (pid {pid}) is hung: no heartbeat for {}; out of the route, sent {signal}, SIGKILL in {}",
                short_duration(silent),
                short_duration(grace)
            ),
            Report::Recycling { slot, pid, reason, in_place } => {
                if in_place {
                    tracing::info!(
                        "recycling worker {slot} (pid {pid}): {reason}; in place (the memory limit leaves no room for one more worker)"
                    )
                } else {
                    tracing::info!("recycling worker {slot} (pid {pid}): {reason}; its replacement starts first")
                }
            }
            Report::RecycleFailed { slot, reason } => {
                tracing::warn!("recycling worker {slot} failed: {reason}; the old worker keeps serving")
            }
            Report::Probing { slot } => {
                tracing::info!("worker {slot} was disabled; its cool-off is over: one probe spawn")
            }
            Report::Reenabled { slot } => tracing::info!("worker {slot}'s probe is ready: respawn enabled again"),
            Report::ShutdownDelayed { delay } => tracing::info!(
                "shutdown asked for: no longer ready, serving for {} more before the drain (again to skip it)",
                short_duration(delay)
            ),
            Report::ShuttingDown { workers } => tracing::info!("shutting down: stopping {workers} workers"),
            Report::Signalled { signal, slots } => {
                tracing::info!("sent {signal} to workers {slots:?}")
            }
            Report::StopTimeout { slots } => tracing::warn!("shutdown timeout: killing workers {slots:?}"),
            Report::RestartStarted { workers, at_once: 1 } => {
                tracing::info!("graceful restart: replacing {workers} workers one at a time")
            }
            Report::RestartStarted { workers, at_once } => {
                tracing::info!("graceful restart: replacing {workers} workers, up to {at_once} at a time")
            }
            Report::RestartQueued => tracing::info!("a graceful restart is running; one more will follow it"),
            Report::Replaced { slot, old_pid, new_pid } => match old_pid {
                Some(old) => tracing::info!("worker {slot} replaced: pid {old} drains, pid {new_pid} serves"),
                None => tracing::info!("worker {slot} replaced: pid {new_pid} serves"),
            },
            Report::RestartFinished { outcome, tickets } => {
                match &outcome {
                    RestartOutcome::Completed { .. } => tracing::info!("graceful restart {outcome}"),
                    RestartOutcome::Failed { .. } => {
                        tracing::error!("graceful restart {outcome}; the other workers keep serving")
                    }
                    _ => tracing::warn!("graceful restart {outcome}"),
                }
                let mut waiters = m.shared.waiters.lock().unwrap_or_else(|e| e.into_inner());
                for t in &tickets {
                    if let Some(tx) = waiters.remove(t) {
                        let _ = tx.send(outcome.clone());
                    }
                }
                drop(waiters);
                for t in &tickets {
                    if let (Some(id), Some(ctl)) = (self.control_waiters.remove(t), m.control.as_mut()) {
                        ctl.owe(id, -1);
                        ctl.reply(id, &Response::RestartFinished(outcome.clone()).encode());
                    }
                }
            }
            Report::UpgradeStarted { tickets } => {
                tracing::info!("upgrade: starting a new master from {}", m.origin.0.display());
                // Control requests that do not wait are answered now.
                for t in &tickets {
                    if let Some((id, false)) = self.upgrade_waiters.get(t).copied() {
                        self.upgrade_waiters.remove(t);
                        if let Some(ctl) = m.control.as_mut() {
                            ctl.owe(id, -1);
                            ctl.reply(id, &Response::UpgradeStarted.encode());
                        }
                    }
                }
            }
            Report::MasterStarted { pid, slot_by_slot: false } => {
                tracing::info!("upgrade: new master pid {pid} runs; it takes over once its workers are ready")
            }
            Report::MasterStarted { pid, slot_by_slot: true } => tracing::info!(
                "upgrade: new master pid {pid} runs; slot by slot, this master stops a worker each time one of the new master's is ready"
            ),
            Report::SlotHandedOver { slot } => {
                tracing::info!("upgrade: the new master's worker {slot} is ready; this master's worker {slot} drains")
            }
            Report::OfferingHandOver { pid } => tracing::info!(
                "upgrade: master pid {pid} is ready: handing over; this master serves on until it has taken over"
            ),
            Report::HandingOver { pid, workers } => tracing::info!(
                "upgrade: master pid {pid} took over; draining this master's {workers} workers, then exiting"
            ),
            Report::UpgradeFinished { outcome, tickets } => {
                match &outcome {
                    crate::stats::UpgradeOutcome::Completed { .. } => tracing::info!("upgrade {outcome}"),
                    crate::stats::UpgradeOutcome::Refused { .. } => tracing::warn!("upgrade {outcome}"),
                    _ => tracing::error!("upgrade {outcome}; this master keeps serving"),
                }
                let mut waiters = m.shared.upgrade_waiters.lock().unwrap_or_else(|e| e.into_inner());
                for t in &tickets {
                    if let Some(tx) = waiters.remove(t) {
                        let _ = tx.send(outcome.clone());
                    }
                }
                drop(waiters);
                for t in &tickets {
                    if let (Some((id, _)), Some(ctl)) = (self.upgrade_waiters.remove(t), m.control.as_mut()) {
                        ctl.owe(id, -1);
                        ctl.reply(id, &Response::UpgradeFinished(outcome.clone()).encode());
                    }
                }
            }
            Report::TookOver { handed_over: true } => {
                tracing::info!("took over from the old master: this master serves the cluster")
            }
            Report::TookOver { handed_over: false } => {
                tracing::warn!("the old master is gone before it handed over: this master takes over at once")
            }
            Report::NotDuringUpgrade { what } => {
                tracing::warn!("{what} refused: an upgrade of the master is running")
            }
            Report::Scaled { from, to } => tracing::info!("scaled from {from} to {to} workers"),
            Report::ScaleRefused { workers } => tracing::warn!("cannot scale to {workers} workers"),
            Report::RouteTooLarge { slots } => tracing::info!(
                "cannot steer new connections to {slots} slots with a classic BPF program; the kernel's hashing applies (reported once)"
            ),
            Report::SteeringFailed { error } => tracing::warn!(
                "cannot steer connections ({error}); the kernel's hashing applies, including to slots that are restarting"
            ),
        }
    }

    /// Tells systemd, when it listens.
    pub(super) fn notify(&mut self, n: Notify) {
        if !self.sup.speaks_for_the_service() {
            tracing::debug!("not telling systemd {n:?}: the old master is still the service's main process");
            return;
        }
        let Some(notifier) = &mut self.m.notify else { return };
        match n {
            Notify::Ready { workers } => {
                // A master started by an upgrade is the main process from now on (its
                // predecessor said MAINPID= already; this holds if it died first).
                let main = match self.sup.cluster_stats().generation {
                    0 => String::new(),
                    _ => format!("MAINPID={}\n", self.master_pid.as_raw_nonzero()),
                };
                notifier
                    .send(&format!("READY=1\n{main}STATUS=serving on {} with {workers} workers", self.m.shared.addr))
            }
            Notify::Reloading { workers } => notifier.reloading(&format!("rolling restart of {workers} workers")),
            Notify::Reloaded { outcome } => notifier.send(&format!("READY=1\nSTATUS=graceful restart {outcome}")),
            Notify::Stopping { workers } => notifier.send(&format!("STOPPING=1\nSTATUS=stopping {workers} workers")),
            Notify::MainPid { pid } => {
                notifier.send(&format!("MAINPID={pid}\nSTATUS=upgraded: master pid {pid} takes over"))
            }
            Notify::Leaving { delay } => notifier.send(&format!(
                "STOPPING=1\nSTATUS=stopping: no longer ready, serving for {} more",
                short_duration(delay)
            )),
        }
    }
}

/// A duration as a person reads it in a log line: `0.2s`, `4s`, `1.5s`.
fn short_duration(d: std::time::Duration) -> String {
    let tenths = (d.as_millis() + 50) / 100;
    if tenths.is_multiple_of(10) { format!("{}s", tenths / 10) } else { format!("{}.{}s", tenths / 10, tenths % 10) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn sub_second_windows_read_well() {
        assert_eq!(super::short_duration(Duration::from_millis(230)), "0.2s");
        assert_eq!(super::short_duration(Duration::from_millis(4000)), "4s");
        assert_eq!(super::short_duration(Duration::from_millis(1490)), "1.5s");
        assert_eq!(super::short_duration(Duration::ZERO), "0s");
    }
}
