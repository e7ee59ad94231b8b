//! Views: the statuses the spec exposes (derived from the state, never stored) and the
//! statistics of the cluster and of each slot.

use std::time::{Duration, Instant};

use super::{Phase, Probes, ProcState, Slot, SpawnReason, Supervisor, Watchdog};
use crate::stats::{ClusterStats, WorkerStats, WorkerStatus};

impl Slot {
    /// The spec's status of the slot.
    pub(super) fn status(&self) -> WorkerStatus {
        if self.disabled {
            return WorkerStatus::Disabled;
        }
        if self.gated && self.current.is_none() {
            return WorkerStatus::Starting;
        }
        match (&self.current, self.next_spawn) {
            (Some(p), _) => match p.state {
                ProcState::Spawning | ProcState::Starting => WorkerStatus::Starting,
                ProcState::Active => WorkerStatus::Active,
                ProcState::Stopping => WorkerStatus::Stopping,
            },
            (None, Some((_, SpawnReason::Initial))) => WorkerStatus::Starting,
            (None, Some((_, SpawnReason::Respawn))) => WorkerStatus::Respawning,
            (None, None) if self.next.is_some() => WorkerStatus::Starting,
            (None, None) => match self.last_exit {
                Some((_, true)) => WorkerStatus::Crashed,
                _ => WorkerStatus::Stopped,
            },
        }
    }
}

impl Supervisor {
    /// What systemd's watchdog should hear at `now`: `WATCHDOG=1` while the cluster serves, or
    /// is still starting within the start-up's deadline (the last initial spawn plus the ready
    /// timeout); nothing once the start-up overran it, or while no worker serves, so that
    /// systemd restarts the service; nothing either, and nothing wrong, once a shutdown began.
    pub fn watchdog(&self, now: Instant) -> Watchdog {
        if self.phase != Phase::Running || !self.owns_outside() {
            // (A new master of an upgrade: its predecessor feeds the watchdog until it hands over.)
            return Watchdog::Quiet;
        }
        if !self.announced_ready {
            return match self.startup_deadline {
                Some(deadline) if now >= deadline => {
                    Watchdog::Withhold { reason: "the start-up did not complete within the ready timeout" }
                }
                _ => Watchdog::Feed,
            };
        }
        // (A slot handed to the new master of a slot-by-slot upgrade is served by it.)
        if self.slots.iter().any(|s| s.status() == WorkerStatus::Active || s.handed) {
            Watchdog::Feed
        } else {
            Watchdog::Withhold { reason: "no worker is serving" }
        }
    }

    /// What the probes say: live while the cluster can still run a worker (a slot serves,
    /// starts, or will respawn; during a shutdown, until it is over), ready while at least
    /// `min_ready` workers are ready and no shutdown was asked for (not during the shutdown
    /// delay), started once the initial start-up completed.
    pub fn probes(&self) -> Probes {
        let can_run = self.slots.iter().any(|s| {
            matches!(
                s.status(),
                WorkerStatus::Active | WorkerStatus::Starting | WorkerStatus::Respawning | WorkerStatus::Stopping
            )
        });
        let asked_to_stop = self.phase != Phase::Running || self.leaving_at.is_some();
        let active = self.slots.iter().filter(|s| s.status() == WorkerStatus::Active || s.handed).count();
        Probes {
            live: match self.phase {
                Phase::Running => can_run,
                Phase::ShuttingDown { .. } => true,
                Phase::Done => false,
            },
            ready: !asked_to_stop && active >= self.policy.min_ready.max(1),
            started: self.announced_ready,
        }
    }

    /// True once [`Command::Exit`] has been returned.
    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The spec's cluster statistics.
    pub fn cluster_stats(&self) -> ClusterStats {
        let count = |st: WorkerStatus| self.slots.iter().filter(|s| s.status() == st).count();
        ClusterStats {
            total_workers: self.slots.len(),
            active_workers: count(WorkerStatus::Active),
            crashed_workers: count(WorkerStatus::Crashed),
            disabled_workers: count(WorkerStatus::Disabled),
            shutdown_requested: !matches!(self.phase, Phase::Running) || self.leaving_at.is_some(),
            restart_requested: self.rollout.is_some(),
            total_restarts: self.total_restarts,
            last_restart: self.last_restart.clone(),
            total_rss_bytes: 0,
            total_cpu_time: Duration::ZERO,
            // The driver's to fill: the supervisor knows no sockets.
            listeners: Vec::new(),
            exits: self.exits,
            // The driver's to fill, like the listeners.
            memory_limit_bytes: None,
            memory_current_bytes: None,
            generation: self.generation,
            upgrade_requested: self.upgrade.as_ref().is_some_and(|u| u.stage != super::UpgradeStage::Killing),
            last_upgrade: self.last_upgrade.clone(),
            // The driver's to fill (the captured output is not the supervisor's).
            log_lines_dropped: 0,
        }
    }

    /// The spec's statistics of every worker slot, at `now`.
    pub fn worker_stats(&self, now: Instant) -> Vec<WorkerStats> {
        self.slots
            .iter()
            .map(|s| WorkerStats {
                worker_id: s.id,
                pid: s.current.as_ref().and_then(|p| p.pid),
                port: self.policy.port,
                status: s.status(),
                start_time: s.current.as_ref().map(|p| p.started_wall).or(s.last_start_wall),
                uptime: s.current.as_ref().map(|p| now.duration_since(p.started)).unwrap_or_default(),
                exit_status: s.last_exit.map(|(st, _)| st),
                crash_count: s.crash_count,
                respawn_disabled: s.disabled,
                restarts: s.restarts,
                rss_bytes: None,
                cpu_time: None,
                heartbeat_age: s.current.as_ref().and_then(|p| p.last_beat).map(|t| now.saturating_duration_since(t)),
                requests: s.current.as_ref().filter(|p| p.counted).map(|p| p.served),
                in_flight: s.current.as_ref().filter(|p| p.counted).map(|p| p.in_flight),
                last_exit_reason: s.last_exit_reason,
                notify_status: None,
            })
            .collect()
    }
}
