//! The "last events" panel's source: the one adapter between the control protocol and the
//! panel.
//!
//! [`EventFeed::next`] asks the master for the entries of its event history after the last one
//! it saw (`events {since}`, without following: one short connection per poll, so a master
//! replaced by an upgrade is simply asked next time) and maps each to an [`EventLine`]. A new
//! master pid starts again from that master's beginning (sequence numbers are per master). A
//! master that does not know the request (an older version), or keeps no history
//! (`event_history(0)`), gets the fallback: what changed between two `status` answers
//! ([`derive`]: a new master pid, a worker replaced, crashed, added or removed, a rollout or an
//! upgrade started or ended), and the panel says so in its title ([`EventFeed::title`]).
//! Nothing else in `top` knows where the lines come from.

use std::path::Path;
use std::time::{Duration, SystemTime};

use ecewo_cluster::control::{Client, ClientError, EventsLine, Status};
use ecewo_cluster::{ClusterEvent, EventKind, WorkerStats};

/// The newest entries asked for when a master is first seen (the panel shows fewer).
const FIRST_ENTRIES: u64 = 64;

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
    /// The previous poll's answer, to compare with (the fallback).
    prev: Option<Box<Status>>,
    /// The master whose history is read, and the last sequence number seen of it.
    history: Option<(u32, u64)>,
    /// The last master asked had no history to give: the panel shows derived changes.
    derived: bool,
}

impl EventFeed {
    /// The panel's title: what its lines are.
    pub(crate) fn title(&self) -> &'static str {
        if self.derived { "changes seen between polls" } else { "events" }
    }

    /// The new lines after the master at `socket` answered `status` with `status` at `wall`.
    pub(crate) fn next(
        &mut self,
        socket: &Path,
        timeout: Duration,
        status: &Status,
        wall: SystemTime,
    ) -> Vec<EventLine> {
        let lines = match self.read_history(socket, timeout, status) {
            Ok(lines) => {
                self.derived = false;
                lines
            }
            // Asked again next time, from where it was.
            Err(History::Unavailable) if self.history.is_some() => Vec::new(),
            Err(_) => {
                self.derived = true;
                self.history = None;
                match &self.prev {
                    Some(prev) => derive(prev, status, wall),
                    None => Vec::new(),
                }
            }
        };
        self.prev = Some(Box::new(status.clone()));
        lines
    }

    /// The entries the master recorded since the last poll, oldest first, or why there are none.
    fn read_history(&mut self, socket: &Path, timeout: Duration, status: &Status) -> Result<Vec<EventLine>, History> {
        let mut since = match self.history {
            Some((pid, seq)) if pid == status.master.pid => Some(seq),
            // A master not seen before: only its newest entries.
            _ => None,
        };
        let mut client = Client::connect(socket, timeout).map_err(|_| History::Unavailable)?;
        let refused = |e| match e {
            // An older master: "invalid request".
            ClientError::Refused(_) => History::Unsupported,
            _ => History::Unavailable,
        };
        let mut stream = client.events(since, false).map_err(refused)?;
        if since.is_some() && stream.info().master_pid != status.master.pid {
            // Another master answered than the one `since` counts in (an upgrade between the
            // two connections): that master's newest entries instead, asked anew.
            since = None;
            client = Client::connect(socket, timeout).map_err(|_| History::Unavailable)?;
            stream = client.events(None, false).map_err(refused)?;
        }
        let info = stream.info().clone();
        if info.capacity == 0 {
            return Err(History::Unsupported);
        }
        let first_wanted = since.unwrap_or_else(|| info.last_seq.saturating_sub(FIRST_ENTRIES));
        let mut lines = Vec::new();
        let mut last = since.unwrap_or(first_wanted);
        while let Ok(Some(line)) = stream.next_line() {
            match line {
                EventsLine::Event(e) => {
                    last = last.max(e.seq);
                    if e.seq > first_wanted {
                        lines.push(line_of(&e));
                    }
                }
                EventsLine::End { .. } => break,
                _ => {}
            }
        }
        self.history = Some((info.master_pid, last));
        Ok(lines)
    }
}

/// Why a poll read no history.
#[derive(Debug)]
enum History {
    /// The master keeps none, or does not know the request (an older version).
    Unsupported,
    /// No answer this time (the master is being replaced, or is busy).
    Unavailable,
}

/// An entry as a panel line: who it concerns, then what happened (its time is the line's).
fn line_of(e: &ClusterEvent) -> EventLine {
    let who = match (e.worker_id, e.pid) {
        (Some(w), Some(p)) => format!("worker {w} pid {p}: "),
        (Some(w), None) => format!("worker {w}: "),
        (None, Some(p)) => format!("pid {p}: "),
        (None, None) => String::new(),
    };
    let text = format!("{who}{}", e.kind);
    let warn = match &e.kind {
        EventKind::Exited { crash, .. } => *crash,
        EventKind::Hung { .. }
        | EventKind::SpawnFailed { .. }
        | EventKind::Disabled { .. }
        | EventKind::RecycleFailed { .. }
        | EventKind::SteeringFailed { .. } => true,
        EventKind::RestartFinished { outcome } => !outcome.is_completed(),
        EventKind::UpgradeFinished { outcome } => !outcome.is_completed(),
        _ => false,
    };
    if warn { EventLine::warn(e.time, text) } else { EventLine::info(e.time, text) }
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

    /// A master on a unix socket in this test: answers each `events` request with the history
    /// of the next pid in `pids` (entries 1 to `last`), recording the `since` asked.
    fn fake_masters(
        dir: &Path,
        pids: Vec<u32>,
        last: u64,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<Option<u64>>>) {
        use std::io::{BufRead, Write};
        let path = dir.join("fake.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let mut asked = Vec::new();
            for pid in pids {
                let (conn, _) = listener.accept().unwrap();
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let request: serde_json::Value = serde_json::from_str(&request).unwrap();
                let since = request["since"].as_u64();
                asked.push(since);
                let mut out = format!(
                    "{{\"v\":1,\"ok\":true,\"history\":{{\"master_pid\":{pid},\"capacity\":100,\"first_seq\":1,\"last_seq\":{last}}}}}\n"
                );
                for seq in since.unwrap_or(0) + 1..=last {
                    out.push_str(&format!(
                        "{{\"v\":1,\"ok\":true,\"event\":{{\"seq\":{seq},\"time\":\"2026-01-02T03:04:05.000Z\",\"master_pid\":{pid},\"worker_id\":0,\"pid\":7,\"kind\":\"ready\"}}}}\n"
                    ));
                }
                out.push_str(&format!("{{\"v\":1,\"ok\":true,\"end\":{{\"last_seq\":{last}}}}}\n"));
                (&conn).write_all(out.as_bytes()).unwrap();
            }
            asked
        });
        (path, server)
    }

    /// `status` came from master 100, but the `events` connection reached master 200 (an
    /// upgrade in between): the `since` of master 100 is not used for master 200's entries;
    /// it is asked again for its newest ones, and remembered as master 200's.
    #[test]
    fn a_since_is_never_used_for_another_master() {
        let dir = std::env::temp_dir().join(format!("ecewo-cluster-top-feed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (path, server) = fake_masters(&dir, vec![100, 200, 200], 5);
        let mut feed = EventFeed::default();
        let wall = SystemTime::UNIX_EPOCH;
        let timeout = Duration::from_secs(5);
        let old = status(100, vec![worker(0, Some(10))]);
        // First poll: master 100's entries 1..=5, remembered as (100, 5).
        assert_eq!(feed.next(&path, timeout, &old, wall).len(), 5);
        assert_eq!(feed.history, Some((100, 5)));
        // Second poll: `status` still says 100, master 200 answers `events`.
        let lines = feed.next(&path, timeout, &old, wall);
        assert_eq!(feed.history, Some((200, 5)), "the entries are master 200's");
        assert_eq!(lines.len(), 5, "master 200's newest entries, not those after #5: {lines:?}");
        assert_eq!(server.join().unwrap(), vec![None, Some(5), None]);
        std::fs::remove_dir_all(&dir).unwrap();
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
