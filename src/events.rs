//! The cluster's event history: what the master saw happen and what it did, one entry at a
//! time, each with a sequence number and the wall-clock time.
//!
//! The master keeps the last entries in a bounded ring ([`Cluster::event_history`](crate::Cluster::event_history),
//! 1000 by default); `ecewo-cluster events [--follow] [--json]`, the control protocol's `events`
//! command ([`crate::control`]), [`MasterHandle::events`](crate::MasterHandle::events) and
//! [`Cluster::on_event`](crate::Cluster::on_event) give them, and
//! [`Cluster::event_log`](crate::Cluster::event_log) appends each one to a JSON-lines file.
//!
//! The JSON shape of an entry is stable: new kinds and new fields may appear (a reader ignores
//! what it does not know, and reads a kind it does not know as [`EventKind::Other`]), none
//! changes meaning.
//!
//! ```json
//! {"seq":42,"time":"2026-12-02T00:12:03.123Z","master_pid":1200,"worker_id":3,"pid":1234,
//!  "kind":"exited","reason":"crash","status":{"signal":9},"crash":true,"detail":null,"respawn_in":0.1}
//! ```
//!
//! Sequence numbers start at 1 in every master and grow by one per entry; a master started by
//! an upgrade (a new pid) starts again from 1.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::signal::Signal;
use crate::stats::{ExitReason, ExitStatus, RestartOutcome, UpgradeOutcome};

/// The number of entries a master keeps by default ([`Cluster::event_history`](crate::Cluster::event_history)).
pub const DEFAULT_EVENT_HISTORY: usize = 1000;

/// The most entries a master keeps ([`Cluster::event_history`](crate::Cluster::event_history)
/// refuses more): about 25 MB of memory.
pub const MAX_EVENT_HISTORY: usize = 100_000;

/// One entry of the event history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClusterEvent {
    /// Its sequence number: 1 for the master's first entry, one more for each next one.
    pub seq: u64,
    /// When it happened (on the wire: RFC 3339 in UTC with milliseconds,
    /// `2026-12-02T00:12:03.123Z`).
    #[serde(with = "crate::rfc3339")]
    pub time: SystemTime,
    /// The master that recorded it.
    pub master_pid: u32,
    /// The worker slot it concerns, if one.
    pub worker_id: Option<usize>,
    /// The worker process it concerns, if one.
    pub pid: Option<u32>,
    /// What happened (on the wire: `"kind"` and the kind's own fields, beside the others).
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened, with what only this kind of entry says. `kind` on the wire, in snake case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A worker process was started (`worker_id`, `pid`).
    Spawned,
    /// A worker process could not be started.
    SpawnFailed {
        /// Why.
        error: String,
    },
    /// A worker reported ready.
    Ready,
    /// A worker process ended.
    Exited {
        /// Why, as the statistics count it.
        reason: ExitReason,
        /// How it ended (`{"code":N}` or `{"signal":N}`).
        status: ExitStatus,
        /// It counts as a crash of its slot (crash protection counts it).
        crash: bool,
        /// What the status does not say (not ready in time, no heartbeat, reaped elsewhere).
        #[serde(default)]
        detail: Option<String>,
        /// When it is started again, if it is (on the wire: seconds).
        #[serde(default, with = "crate::stats::opt_secs")]
        respawn_in: Option<Duration>,
    },
    /// The master sent a worker a signal: to stop it, to kill it, or because it was asked to.
    Signalled {
        /// The signal (on the wire: its number).
        signal: Signal,
        /// Why.
        reason: SignalReason,
    },
    /// A worker stopped beating for longer than the worker timeout: out of the route,
    /// signalled, killed after `grace`.
    Hung {
        /// Time since its last heartbeat (seconds).
        #[serde(with = "crate::stats::secs")]
        silent: Duration,
        /// Time until `SIGKILL` (seconds).
        #[serde(with = "crate::stats::secs")]
        grace: Duration,
    },
    /// A worker is being recycled.
    Recycling {
        /// Why.
        reason: RecycleCause,
        /// It drains first, then is replaced (no room for a surge worker); otherwise its
        /// replacement starts next to it.
        in_place: bool,
    },
    /// A recycle's replacement could not start or get ready: the old worker keeps serving.
    RecycleFailed {
        /// Why.
        reason: String,
    },
    /// A replacement (a rolling restart's or a recycle's) is ready and serves the slot
    /// (`pid`); the worker it replaces drains.
    Replaced {
        /// The replaced worker's pid, if the slot had one.
        old_pid: Option<u32>,
    },
    /// Crash protection disabled a slot: it is not respawned any more (or only by a probe
    /// after the cool-off).
    Disabled {
        /// Crashes within the crash window.
        crashes: u32,
        /// Time from the first of them to the last (seconds).
        #[serde(with = "crate::stats::secs")]
        within: Duration,
    },
    /// A disabled slot gets one probe spawn after its cool-off.
    Probing,
    /// A probe spawn got ready: the slot is enabled again.
    Reenabled,
    /// Every initial worker is ready (once per master).
    AllReady {
        /// Workers serving.
        workers: usize,
    },
    /// A rolling restart began.
    RestartStarted {
        /// Slots to replace.
        workers: usize,
    },
    /// A restart was asked for while one runs: one more follows it.
    RestartQueued,
    /// A rolling restart ended, or was refused.
    RestartFinished {
        /// How.
        outcome: RestartOutcome,
    },
    /// The number of slots changed.
    Scaled {
        /// Slots before.
        from: usize,
        /// Slots now.
        to: usize,
    },
    /// A request was refused (a scale out of range, a scale during an upgrade).
    Refused {
        /// What was asked (`scaling`).
        what: String,
        /// Why.
        reason: String,
    },
    /// An upgrade of the master began: the new master is being started.
    UpgradeStarted,
    /// The new master of an upgrade runs.
    MasterStarted {
        /// Its pid.
        new_pid: u32,
        /// It starts its workers slot by slot.
        slot_by_slot: bool,
    },
    /// (A slot-by-slot upgrade.) The new master's worker of this slot (`worker_id`) is ready:
    /// this master's worker there drains.
    SlotHandedOver,
    /// The new master is ready: it is offered the cluster; this master serves on until it says
    /// it took over.
    OfferingHandOver {
        /// The new master's pid.
        new_pid: u32,
    },
    /// The new master took over; this master drains its workers and exits.
    HandingOver {
        /// The new master's pid.
        new_pid: u32,
        /// This master's workers that drain.
        workers: usize,
    },
    /// An upgrade ended, or was refused.
    UpgradeFinished {
        /// How.
        outcome: UpgradeOutcome,
    },
    /// (A master started by an upgrade.) It took over from its predecessor.
    TookOver {
        /// The predecessor handed over (`false`: it was gone first).
        handed_over: bool,
    },
    /// A shutdown was asked for with a shutdown delay: no longer ready, serving for `delay`
    /// before the drain.
    ShutdownDelayed {
        /// The delay (seconds).
        #[serde(with = "crate::stats::secs")]
        delay: Duration,
    },
    /// A shutdown began (also the drain of a master that handed over to a new one).
    ShutdownStarted {
        /// Workers asked to stop.
        workers: usize,
    },
    /// Connection steering failed for good: the kernel's hashing applies.
    SteeringFailed {
        /// The error.
        error: String,
    },
    /// Supervision ended: the master's last entry.
    Ended {
        /// How.
        outcome: EndOutcome,
    },
    /// A kind this version does not know (read from a newer master).
    #[serde(other)]
    Other,
}

/// Why the master sent a worker a signal ([`EventKind::Signalled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SignalReason {
    /// The cluster shuts down.
    Shutdown,
    /// A second shutdown request: the workers still running are killed at once.
    ShutdownForced,
    /// A rolling restart replaced it.
    Restart,
    /// It is recycled (its request limit, age or memory).
    Recycle,
    /// Its slot was removed by scaling down.
    Scale,
    /// An upgrade of the master: the new master's workers serve instead.
    Upgrade,
    /// It stopped sending heartbeats (the hung signal, then `SIGKILL` after the grace).
    Hung,
    /// It was not ready within the ready timeout.
    BootTimeout,
    /// It was asked to stop and did not exit within the shutdown timeout.
    StopTimeout,
    /// Sent on request (`ecewo-cluster signal`, `signal_workers`).
    Requested,
    /// A reason this version does not know (read from a newer master).
    #[serde(other)]
    Other,
}

impl SignalReason {
    /// The reason as one word, as in JSON (`shutdown`, `stop_timeout`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SignalReason::Shutdown => "shutdown",
            SignalReason::ShutdownForced => "shutdown_forced",
            SignalReason::Restart => "restart",
            SignalReason::Recycle => "recycle",
            SignalReason::Scale => "scale",
            SignalReason::Upgrade => "upgrade",
            SignalReason::Hung => "hung",
            SignalReason::BootTimeout => "boot_timeout",
            SignalReason::StopTimeout => "stop_timeout",
            SignalReason::Requested => "requested",
            SignalReason::Other => "other",
        }
    }
}

impl fmt::Display for SignalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignalReason::ShutdownForced => "shutdown, asked again: killed at once",
            SignalReason::BootTimeout => "not ready in time",
            SignalReason::StopTimeout => "did not stop within the shutdown timeout",
            SignalReason::Requested => "on request",
            other => other.as_str(),
        })
    }
}

/// Why a worker is recycled ([`EventKind::Recycling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecycleCause {
    /// It served its request limit (`max_requests`).
    Requests,
    /// It reached its maximum age (`max_age`).
    Age,
    /// Its memory stayed over the limit (`max_memory`).
    Memory,
    /// A cause this version does not know (read from a newer master).
    #[serde(other)]
    Other,
}

impl fmt::Display for RecycleCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecycleCause::Requests => "requests",
            RecycleCause::Age => "age",
            RecycleCause::Memory => "memory",
            RecycleCause::Other => "other",
        })
    }
}

/// How supervision ended ([`EventKind::Ended`]). `"result"` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EndOutcome {
    /// A requested shutdown finished (or every worker exited cleanly with respawn off).
    Stopped,
    /// No worker can run any more.
    AllFailed {
        /// Slots configured.
        workers: usize,
        /// Slots disabled by crash protection.
        disabled: usize,
        /// Slots whose worker crashed with respawn off.
        crashed: usize,
    },
    /// A new master took over (an upgrade in place) and this one's workers have drained.
    Upgraded,
    /// An outcome this version does not know (read from a newer master).
    #[serde(other)]
    Other,
}

impl fmt::Display for EndOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndOutcome::Stopped => f.write_str("stopped"),
            EndOutcome::AllFailed { workers, disabled, crashed } => {
                write!(f, "no worker can run ({workers} slots: {disabled} disabled, {crashed} crashed)")
            }
            EndOutcome::Upgraded => f.write_str("the new master took over"),
            EndOutcome::Other => f.write_str("other"),
        }
    }
}

/// `exit code 3`, `killed by SIGKILL`.
fn how_it_ended(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(c) => format!("exit code {c}"),
        ExitStatus::Signal(s) => format!("killed by {s}"),
    }
}

impl fmt::Display for EventKind {
    /// A short sentence: `exited: crash (killed by SIGKILL); respawn in 0.1s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventKind::Spawned => f.write_str("started"),
            EventKind::SpawnFailed { error } => write!(f, "could not be started: {error}"),
            EventKind::Ready => f.write_str("ready"),
            EventKind::Exited { reason, status, detail, respawn_in, .. } => {
                write!(f, "exited: {reason} ({}", how_it_ended(*status))?;
                if let Some(d) = detail {
                    write!(f, "; {d}")?;
                }
                f.write_str(")")?;
                if let Some(d) = respawn_in {
                    write!(f, "; respawn in {}", seconds(*d))?;
                }
                Ok(())
            }
            EventKind::Signalled { signal, reason } => write!(f, "signalled: {signal} ({reason})"),
            EventKind::Hung { silent, grace } => {
                write!(f, "hung: no heartbeat for {}; SIGKILL in {}", seconds(*silent), seconds(*grace))
            }
            EventKind::Recycling { reason, in_place: false } => {
                write!(f, "recycling ({reason}): its replacement starts first")
            }
            EventKind::Recycling { reason, in_place: true } => {
                write!(f, "recycling ({reason}) in place: it drains first (no memory for one more worker)")
            }
            EventKind::RecycleFailed { reason } => write!(f, "recycle failed: {reason}; the old worker serves on"),
            EventKind::Replaced { old_pid: Some(old) } => write!(f, "replaced pid {old}, which drains"),
            EventKind::Replaced { old_pid: None } => f.write_str("serves the slot (replacement ready)"),
            EventKind::Disabled { crashes, within } => {
                write!(f, "disabled: {crashes} crashes in {}", seconds(*within))
            }
            EventKind::Probing => f.write_str("cool-off over: one probe spawn"),
            EventKind::Reenabled => f.write_str("probe ready: respawn enabled again"),
            EventKind::AllReady { workers } => write!(f, "all {workers} workers ready"),
            EventKind::RestartStarted { workers } => write!(f, "rolling restart started: {workers} workers"),
            EventKind::RestartQueued => f.write_str("rolling restart queued behind the one running"),
            EventKind::RestartFinished { outcome } => write!(f, "rolling restart {outcome}"),
            EventKind::Scaled { from, to } => write!(f, "scaled from {from} to {to} workers"),
            EventKind::Refused { what, reason } => write!(f, "{what} refused: {reason}"),
            EventKind::UpgradeStarted => f.write_str("upgrade started: starting a new master"),
            EventKind::MasterStarted { new_pid, slot_by_slot } => {
                let how = if *slot_by_slot { ", slot by slot" } else { "" };
                write!(f, "upgrade: new master pid {new_pid} runs{how}")
            }
            EventKind::SlotHandedOver => f.write_str("upgrade: the new master's worker is ready; this one drains"),
            EventKind::OfferingHandOver { new_pid } => {
                write!(f, "upgrade: master pid {new_pid} is ready; offering it the cluster")
            }
            EventKind::HandingOver { new_pid, workers } => {
                write!(f, "upgrade: master pid {new_pid} took over; draining {workers} workers")
            }
            EventKind::UpgradeFinished { outcome } => write!(f, "upgrade {outcome}"),
            EventKind::TookOver { handed_over: true } => f.write_str("took over from the old master"),
            EventKind::TookOver { handed_over: false } => {
                f.write_str("took over: the old master was gone before it handed over")
            }
            EventKind::ShutdownDelayed { delay } => {
                write!(f, "shutdown asked for: not ready, serving {} more", seconds(*delay))
            }
            EventKind::ShutdownStarted { workers } => write!(f, "shutting down: stopping {workers} workers"),
            EventKind::SteeringFailed { error } => write!(f, "steering failed: {error}; the kernel's hashing applies"),
            EventKind::Ended { outcome } => write!(f, "supervision ended: {outcome}"),
            EventKind::Other => f.write_str("(an event this version does not know)"),
        }
    }
}

impl fmt::Display for ClusterEvent {
    /// One line: `2026-12-02T00:12:03.123Z  #42  worker 3 pid 1234  exited: crash (killed by SIGKILL)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  #{}  ", crate::rfc3339::format(self.time), self.seq)?;
        match (self.worker_id, self.pid) {
            (Some(w), Some(p)) => write!(f, "worker {w} pid {p}")?,
            (Some(w), None) => write!(f, "worker {w}")?,
            (None, Some(p)) => write!(f, "pid {p}")?,
            (None, None) => write!(f, "master {}", self.master_pid)?,
        }
        write!(f, "  {}", self.kind)
    }
}

impl ClusterEvent {
    /// An entry (the supervisor's).
    pub(crate) fn new(
        seq: u64,
        time: SystemTime,
        master_pid: u32,
        worker_id: Option<usize>,
        pid: Option<u32>,
        kind: EventKind,
    ) -> ClusterEvent {
        ClusterEvent { seq, time, master_pid, worker_id, pid, kind }
    }

    /// The entry as one JSON line, newline included (the event log's and `--json`'s line).
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// `0.1s`, `4s`, `2.25s`.
fn seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{}s", d.as_secs_f64()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(crate::rfc3339::format(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2026-12-02T00:12:03.123Z (checked with `date -u -d @1796170323`).
        assert_eq!(crate::rfc3339::format(at(1_796_170_323_123)), "2026-12-02T00:12:03.123Z");
        assert_eq!(crate::rfc3339::format(at(951_782_400_000)), "2000-02-29T00:00:00.000Z", "a leap day");
        for ms in [0, 1, 999, 86_399_999, 951_782_400_000, 1_796_170_323_123, 4_102_444_800_000, 253_402_300_799_999] {
            assert_eq!(crate::rfc3339::parse(&crate::rfc3339::format(at(ms))), Some(at(ms)), "{ms}");
        }
        assert_eq!(crate::rfc3339::parse("2026-12-02T00:12:03Z"), Some(at(1_796_170_323_000)));
        assert_eq!(
            crate::rfc3339::parse("2026-12-02T00:12:03.123456789Z"),
            Some(UNIX_EPOCH + Duration::new(1_796_170_323, 123_456_789))
        );
        for bad in [
            "",
            "2026-12-02",
            "2026-12-02T00:12:03",
            "2026-13-02T00:12:03Z",
            "2026-12-02T00:12:03+01:00",
            "2026-12-02T00:12:03.Z",
            "x026-12-02T00:12:03Z",
            "2026-12-02T00:12:03.1234567890Z",
            "+026-12-02T00:12:03Z",
        ] {
            assert_eq!(crate::rfc3339::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_json_shape_is_stable() {
        let e = ClusterEvent::new(
            42,
            at(1_796_170_323_123),
            1200,
            Some(3),
            Some(1234),
            EventKind::Exited {
                reason: ExitReason::Crash,
                status: ExitStatus::Signal(Signal::KILL),
                crash: true,
                detail: None,
                respawn_in: Some(Duration::from_millis(100)),
            },
        );
        let json: serde_json::Value = serde_json::from_slice(&e.to_json_line()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"seq":42,"time":"2026-12-02T00:12:03.123Z","master_pid":1200,"worker_id":3,"pid":1234,
                "kind":"exited","reason":"crash","status":{"signal":9},"crash":true,"detail":null,"respawn_in":0.1})
        );
        assert_eq!(serde_json::from_value::<ClusterEvent>(json).unwrap(), e);
        assert_eq!(
            e.to_string(),
            "2026-12-02T00:12:03.123Z  #42  worker 3 pid 1234  exited: crash (killed by SIGKILL); respawn in 0.1s"
        );
        let kill = EventKind::Signalled { signal: Signal::KILL, reason: SignalReason::StopTimeout };
        assert_eq!(kill.to_string(), "signalled: SIGKILL (did not stop within the shutdown timeout)");
        let master = ClusterEvent::new(7, at(0), 1200, None, None, EventKind::Scaled { from: 2, to: 3 });
        assert_eq!(master.to_string(), "1970-01-01T00:00:00.000Z  #7  master 1200  scaled from 2 to 3 workers");
        let json = String::from_utf8(master.to_json_line()).unwrap();
        assert!(json.ends_with("\n") && !json.trim_end().contains('\n'), "one line: {json}");
        assert!(json.contains(r#""kind":"scaled","from":2,"to":3"#), "{json}");
    }

    #[test]
    fn every_kind_round_trips() {
        let kinds = vec![
            EventKind::Spawned,
            EventKind::SpawnFailed { error: "ENOENT".into() },
            EventKind::Ready,
            EventKind::Signalled { signal: Signal::TERM, reason: SignalReason::StopTimeout },
            EventKind::Hung { silent: Duration::from_millis(2500), grace: Duration::from_secs(2) },
            EventKind::Recycling { reason: RecycleCause::Memory, in_place: true },
            EventKind::RecycleFailed { reason: "x".into() },
            EventKind::Replaced { old_pid: Some(9) },
            EventKind::Disabled { crashes: 3, within: Duration::from_millis(400) },
            EventKind::Probing,
            EventKind::Reenabled,
            EventKind::AllReady { workers: 2 },
            EventKind::RestartStarted { workers: 2 },
            EventKind::RestartQueued,
            EventKind::RestartFinished { outcome: RestartOutcome::Completed { replaced: 2 } },
            EventKind::Scaled { from: 1, to: 4 },
            EventKind::Refused { what: "scaling".into(), reason: "y".into() },
            EventKind::UpgradeStarted,
            EventKind::MasterStarted { new_pid: 5, slot_by_slot: true },
            EventKind::SlotHandedOver,
            EventKind::OfferingHandOver { new_pid: 5 },
            EventKind::HandingOver { new_pid: 5, workers: 2 },
            EventKind::UpgradeFinished { outcome: UpgradeOutcome::Failed { reason: "z".into() } },
            EventKind::TookOver { handed_over: false },
            EventKind::ShutdownDelayed { delay: Duration::from_secs(5) },
            EventKind::ShutdownStarted { workers: 2 },
            EventKind::SteeringFailed { error: "EPERM".into() },
            EventKind::Ended { outcome: EndOutcome::AllFailed { workers: 2, disabled: 1, crashed: 1 } },
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            let e = ClusterEvent::new(i as u64 + 1, at(1000 * i as u64), 1, Some(i), None, kind);
            let line = e.to_json_line();
            let back: ClusterEvent = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, e, "{}", String::from_utf8_lossy(&line));
            assert!(!e.kind.to_string().is_empty());
        }
    }

    #[test]
    fn what_a_newer_master_adds_still_reads() {
        let line = r#"{"seq":1,"time":"2026-12-02T00:12:03.123Z","master_pid":1,"worker_id":null,"pid":null,"kind":"oom_warning","bytes":1,"future":true}"#;
        let e: ClusterEvent = serde_json::from_str(line).unwrap();
        assert_eq!(e.kind, EventKind::Other);
        let line = r#"{"seq":2,"time":"2026-12-02T00:12:03Z","master_pid":1,"worker_id":0,"pid":7,"kind":"signalled","signal":15,"reason":"gremlins","extra":1}"#;
        let e: ClusterEvent = serde_json::from_str(line).unwrap();
        assert_eq!(e.kind, EventKind::Signalled { signal: Signal::TERM, reason: SignalReason::Other });
        assert!(
            serde_json::from_str::<ClusterEvent>(r#"{"seq":1,"time":"yesterday","master_pid":1,"kind":"ready"}"#)
                .is_err()
        );
    }
}
