//! The "last events" panel's source: the one adapter between the control protocol and the
//! panel.
//!
//! Today the master keeps no history that the control protocol gives, so [`EventFeed`] derives
//! what changed between two `status` answers ([`derive`]: a new master pid, a worker replaced,
//! crashed, added or removed, a rollout or an upgrade started or ended) and the panel says so in
//! its title ([`EventFeed::title`]). When the master gains an event history, only
//! [`EventFeed::next`] changes: it asks the master for the events after the last one it saw
//! and maps each to an [`EventLine`], falling back to [`derive`] against a master that does not
//! know the request. Nothing else in `top` knows where the lines come from.

use std::path::Path;
use std::time::{Duration, SystemTime};

use ecewo_cluster::WorkerStats;
use ecewo_cluster::control::Status;

/// How much a line matters: warnings (crashes, failures) are drawn in colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Info,
    Warn,
}

/// One line of the panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventLine {
    /// When it happened (or, derived, when the poll that noticed it was answered).
    pub(crate) at: SystemTime,
    pub(crate) level: Level,
    pub(crate) text: String,
}

impl EventLine {
    pub(crate) fn info(at: SystemTime, text: String) -> EventLine {
        EventLine { at, level: Level::Info, text }
    }

    pub(crate) fn warn(at: SystemTime, text: String) -> EventLine {
        EventLine { at, level: Level::Warn, text }
    }
}

/// Where the panel's lines come from (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct EventFeed {
    /// The previous poll's answer, to compare with.
    prev: Option<Box<Status>>,
}

impl EventFeed {
    /// The panel's title: what its lines are.
    pub(crate) fn title(&self) -> &'static str {
        "changes seen between polls"
    }

    /// The new lines after the master at `_socket` answered `status` with `status` at `wall`.
    /// (`_socket` and `_timeout` are for the master's own history, once the protocol has it.)
    pub(crate) fn next(
        &mut self,
        _socket: &Path,
        _timeout: Duration,
        status: &Status,
        wall: SystemTime,
    ) -> Vec<EventLine> {
        let lines = match &self.prev {
            Some(prev) => derive(prev, status, wall),
            None => Vec::new(),
        };
        self.prev = Some(Box::new(status.clone()));
        lines
    }
}

/// What changed from `prev` to `next` (two `status` answers), as lines stamped `wall`.
pub(crate) fn derive(prev: &Status, next: &Status, wall: SystemTime) -> Vec<EventLine> {
    let mut out = Vec::new();
    let (pc, nc) = (&prev.cluster, &next.cluster);
    if prev.master.pid != next.master.pid {
        out.push(EventLine::info(
            wall,
            if nc.generation > pc.generation {
                format!(
                    "master pid {} took over from pid {} (upgrade, generation {})",
                    next.master.pid, prev.master.pid, nc.generation
                )
            } else {
                let n = nc.total_workers;
                let workers = if n == 1 { "1 worker".to_owned() } else { format!("{n} workers") };
                format!("a new master, pid {}, answers with {workers} (was pid {})", next.master.pid, prev.master.pid)
            },
        ));
        // Another master's slots, flags and outcomes are its own: nothing to compare.
        return out;
    }
    // What started, then what happened to each worker, then what ended: the panel shows the
    // newest first.
    if !pc.restart_requested && nc.restart_requested {
        out.push(EventLine::info(wall, "rolling restart started".into()));
    }
    if !pc.upgrade_requested && nc.upgrade_requested {
        out.push(EventLine::info(wall, "master upgrade started".into()));
    }
    if !pc.shutdown_requested && nc.shutdown_requested {
        out.push(EventLine::warn(wall, "the cluster is shutting down".into()));
    }
    if pc.total_workers != nc.total_workers {
        out.push(EventLine::info(wall, format!("scaled from {} to {} workers", pc.total_workers, nc.total_workers)));
    }
    for w in &next.workers {
        match prev.workers.iter().find(|p| p.worker_id == w.worker_id) {
            Some(p) => out.extend(worker_change(p, w, wall)),
            None => out.push(EventLine::info(
                wall,
                match w.pid {
                    Some(pid) => format!("worker {} added, pid {pid}", w.worker_id),
                    None => format!("worker {} added", w.worker_id),
                },
            )),
        }
    }
    for p in &prev.workers {
        if !next.workers.iter().any(|w| w.worker_id == p.worker_id) {
            out.push(EventLine::info(wall, format!("worker {} removed", p.worker_id)));
        }
    }
    if nc.last_restart != pc.last_restart
        && let Some(outcome) = &nc.last_restart
    {
        let text = format!("rolling restart {}", crate::describe_outcome(outcome));
        out.push(if outcome.is_completed() { EventLine::info(wall, text) } else { EventLine::warn(wall, text) });
    }
    if nc.last_upgrade != pc.last_upgrade
        && let Some(outcome) = &nc.last_upgrade
    {
        let text = format!("master upgrade {}", crate::describe_upgrade(outcome));
        out.push(if outcome.is_completed() { EventLine::info(wall, text) } else { EventLine::warn(wall, text) });
    }
    out
}

/// What happened to one slot between two polls of the same master.
fn worker_change(p: &WorkerStats, w: &WorkerStats, wall: SystemTime) -> Vec<EventLine> {
    let id = w.worker_id;
    let crashed = w.crash_count > p.crash_count;
    let how = || {
        let mut parts = Vec::new();
        if let Some(status) = w.exit_status {
            parts.push(status.to_string());
        }
        if let Some(reason) = w.last_exit_reason {
            parts.push(reason.to_string());
        }
        parts.join(", ")
    };
    let line = |text: String| if crashed { EventLine::warn(wall, text) } else { EventLine::info(wall, text) };
    let mut out = Vec::new();
    match (p.pid, w.pid) {
        (Some(a), Some(b)) if a != b => {
            let why = if crashed {
                format!("after a crash: {}", how())
            } else if w.exit_status != p.exit_status || w.last_exit_reason != p.last_exit_reason {
                how()
            } else {
                format!("restarts {}", w.restarts)
            };
            out.push(line(format!("worker {id}: pid {a} replaced by pid {b} ({why})")));
        }
        (Some(a), None) => {
            let how = how();
            let how = if how.is_empty() { String::new() } else { format!(" ({how})") };
            out.push(line(format!("worker {id}: pid {a} exited{how}; now {}", w.status)));
        }
        (None, Some(b)) => out.push(line(format!("worker {id} started, pid {b}"))),
        _ => {}
    }
    if p.status != w.status && p.pid == w.pid && w.pid.is_some() {
        out.push(EventLine::info(
            wall,
            format!("worker {id} (pid {}): {} → {}", w.pid.unwrap_or(0), p.status, w.status),
        ));
    }
    if w.respawn_disabled && !p.respawn_disabled {
        out.push(EventLine::warn(wall, format!("worker {id} disabled: crashing too fast")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::tests::{status, worker};

    #[test]
    fn a_crash_a_rollout_and_scaling_are_described() {
        let wall = SystemTime::UNIX_EPOCH;
        let prev = status(100, vec![worker(0, Some(10)), worker(1, Some(11))]);
        let mut next = status(100, vec![worker(0, Some(20)), worker(1, Some(11)), worker(2, Some(30))]);
        next.workers[0].crash_count = 1;
        next.workers[0].exit_status = Some(ecewo_cluster::ExitStatus::Signal(ecewo_cluster::Signal::KILL));
        next.cluster.total_workers = 3;
        next.cluster.restart_requested = true;
        let lines: Vec<String> = derive(&prev, &next, wall).into_iter().map(|l| l.text).collect();
        assert!(lines.contains(&"rolling restart started".to_owned()), "{lines:?}");
        assert!(lines.contains(&"scaled from 2 to 3 workers".to_owned()), "{lines:?}");
        assert!(
            lines.contains(&"worker 0: pid 10 replaced by pid 20 (after a crash: signal 9 (SIGKILL))".to_owned()),
            "{lines:?}"
        );
        assert!(lines.contains(&"worker 2 added, pid 30".to_owned()), "{lines:?}");
        assert!(!lines.iter().any(|l| l.contains("worker 1")), "{lines:?}");
        assert_eq!(derive(&next, &next, wall), Vec::new(), "nothing changed");
    }

    #[test]
    fn a_new_master_is_one_line_not_a_line_per_worker() {
        let wall = SystemTime::UNIX_EPOCH;
        let prev = status(100, vec![worker(0, Some(10))]);
        let mut next = status(200, vec![worker(0, Some(20))]);
        next.cluster.generation = 1;
        let lines: Vec<String> = derive(&prev, &next, wall).into_iter().map(|l| l.text).collect();
        assert_eq!(lines, ["master pid 200 took over from pid 100 (upgrade, generation 1)"]);
        // Restarted (not upgraded), with other slots: still one line.
        let restarted = status(300, vec![worker(0, Some(30)), worker(1, Some(31))]);
        let lines: Vec<String> = derive(&next, &restarted, wall).into_iter().map(|l| l.text).collect();
        assert_eq!(lines, ["a new master, pid 300, answers with 2 workers (was pid 200)"]);
    }

    #[test]
    fn the_feed_compares_with_the_previous_poll() {
        let mut feed = EventFeed::default();
        let wall = SystemTime::UNIX_EPOCH;
        let path = Path::new("/nonexistent.sock");
        let a = status(100, vec![worker(0, Some(10))]);
        let b = status(100, vec![worker(0, Some(11))]);
        assert!(feed.next(path, Duration::from_secs(1), &a, wall).is_empty(), "the first poll has nothing to compare");
        let lines = feed.next(path, Duration::from_secs(1), &b, wall);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].text.starts_with("worker 0: pid 10 replaced by pid 11"), "{lines:?}");
    }
}
