//! Statistics and status types: the vocabulary shared by the supervisor, the master, the workers
//! and the protocols. Nothing here does I/O.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::signal::Signal;

/// The lifecycle state of a worker slot (the spec's `worker_status_t`).
///
/// A slot's status is derived from its current process and what the supervisor plans for it:
///
/// | from | event | to |
/// | --- | --- | --- |
/// | (new slot: start-up or scale-up) | the process is started | `Starting` |
/// | `Starting` | it reports ready | `Active` |
/// | `Starting` | not ready within `ready_timeout` (killed), or it exits | as for an exit, below (a crash) |
/// | `Active` | asked to stop (shutdown, scale-down) | `Stopping` |
/// | `Active` | replaced by a rolling restart (the new process is ready) | `Active` (the new process; the old one drains outside the slot) |
/// | `Active`, `Starting` | exits with respawn on | `Respawning`, then `Starting` after `worker_respawn_delay` |
/// | `Active`, `Starting` | crashes `respawn_max_crashes` times within `respawn_window` | `Disabled` |
/// | `Active`, `Starting` | crashes with respawn off | `Crashed` |
/// | `Active`, `Starting` | exits cleanly (code 0) with respawn off | `Stopped` |
/// | `Stopping` | exits (or is killed at `shutdown_timeout`) | `Stopped` |
/// | `Disabled`, `Crashed`, `Stopped` | a rolling restart starts a new process that gets ready | `Active` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerStatus {
    /// Being spawned, or spawned and not yet ready.
    Starting,
    /// Ready and serving.
    Active,
    /// Asked to stop (shutdown, restart or scale-down) and draining.
    Stopping,
    /// Exited unexpectedly and will not be respawned (respawn is off).
    Crashed,
    /// Exited and waiting for its respawn delay before it is started again.
    Respawning,
    /// Crashed too often within the crash window: not respawned any more.
    Disabled,
    /// Not running: it exited cleanly or was stopped, and nothing will start it again.
    /// (Not in the C plugin, which has no name for this state.)
    Stopped,
}

impl fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            WorkerStatus::Starting => "starting",
            WorkerStatus::Active => "active",
            WorkerStatus::Stopping => "stopping",
            WorkerStatus::Crashed => "crashed",
            WorkerStatus::Respawning => "respawning",
            WorkerStatus::Disabled => "disabled",
            WorkerStatus::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(Signal),
}

impl ExitStatus {
    /// True for a normal exit with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The spec's `exit_status` integer: the exit code, or 128 + the signal number (as a shell
    /// reports it).
    pub fn as_raw(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s.as_raw(),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => match s.name() {
                Some(name) => write!(f, "signal {} ({name})", s.as_raw()),
                None => write!(f, "signal {}", s.as_raw()),
            },
        }
    }
}

/// How the last graceful restart ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RestartOutcome {
    /// Every worker slot was replaced.
    Completed {
        /// Workers replaced.
        replaced: usize,
    },
    /// A replacement failed (it exited, could not be started, or was not ready in time): the
    /// rollout stopped there. Slots not yet reached keep their old workers; slots already
    /// replaced keep their new ones.
    Failed {
        /// The slot whose replacement failed.
        worker_id: usize,
        /// Why.
        reason: String,
        /// Workers replaced before the failure.
        replaced: usize,
    },
    /// The restart did not run to its end because the cluster is shutting down.
    Cancelled {
        /// Why.
        reason: String,
        /// Workers replaced before it was cancelled.
        replaced: usize,
    },
}

impl RestartOutcome {
    /// True for [`RestartOutcome::Completed`].
    pub fn is_completed(&self) -> bool {
        matches!(self, RestartOutcome::Completed { .. })
    }
}

impl fmt::Display for RestartOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartOutcome::Completed { replaced } => write!(f, "completed: {replaced} workers replaced"),
            RestartOutcome::Failed { worker_id, reason, replaced } => {
                write!(f, "failed at worker {worker_id}: {reason} ({replaced} workers replaced before)")
            }
            RestartOutcome::Cancelled { reason, replaced } => {
                write!(f, "cancelled: {reason} ({replaced} workers replaced before)")
            }
        }
    }
}

/// How an upgrade of the master in place ended (`ecewo-cluster upgrade`,
/// [`MasterHandle::upgrade_and_wait`](crate::MasterHandle::upgrade_and_wait)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
#[non_exhaustive]
pub enum UpgradeOutcome {
    /// The new master's workers are ready and it took over (listeners, steering, the control
    /// socket, systemd's main pid); the old master drains its workers and exits.
    Completed {
        /// The new master's pid.
        new_pid: u32,
    },
    /// The new master could not be started, exited, or was not ready in time: it was killed,
    /// and the old master keeps serving as before.
    Failed {
        /// Why.
        reason: String,
    },
    /// The upgrade was not started: another one, a rolling restart or a shutdown runs, or the
    /// master is PID 1 of a container.
    Refused {
        /// Why, and what to do instead.
        reason: String,
    },
    /// A shutdown began while the new master was starting: it was killed.
    Cancelled {
        /// Why.
        reason: String,
    },
}

impl UpgradeOutcome {
    /// True for [`UpgradeOutcome::Completed`].
    pub fn is_completed(&self) -> bool {
        matches!(self, UpgradeOutcome::Completed { .. })
    }
}

impl fmt::Display for UpgradeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeOutcome::Completed { new_pid } => write!(f, "completed: master pid {new_pid} took over"),
            UpgradeOutcome::Failed { reason } => write!(f, "failed: {reason}"),
            UpgradeOutcome::Refused { reason } => write!(f, "refused: {reason}"),
            UpgradeOutcome::Cancelled { reason } => write!(f, "cancelled: {reason}"),
        }
    }
}

/// A listener of the cluster, as the master holds it (in [`ClusterStats::listeners`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Its name (`"default"` for the listener of `Cluster::new(port)`).
    pub name: String,
    /// Where it listens: `ip:port` (the real port), a unix socket path, or `@name`.
    pub address: String,
    /// `tcp`, `unix` or `abstract`.
    pub kind: String,
    /// How its connections are spread: `reuseport` or `shared`.
    pub balance: String,
    /// The listening sockets the master holds for it (one per started slot with `reuseport`).
    pub sockets: usize,
    /// Connections waiting in its accept queues, summed over its sockets (TCP: `TCP_INFO`'s
    /// `tcpi_unacked` of each listening socket); `None` where the kernel does not give it
    /// cheaply (unix sockets).
    pub queued: Option<u64>,
}

/// Cluster-wide statistics (the spec's `cluster_stats_t`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Worker slots configured.
    pub total_workers: usize,
    /// Slots whose worker is ready and serving.
    pub active_workers: usize,
    /// Slots whose worker crashed and is not running (respawn off).
    pub crashed_workers: usize,
    /// Slots disabled by crash protection.
    pub disabled_workers: usize,
    /// A shutdown has been requested.
    pub shutdown_requested: bool,
    /// A graceful restart is in progress.
    pub restart_requested: bool,
    /// Workers started again: respawns after an exit, and replacements by graceful restarts.
    pub total_restarts: u64,
    /// How the last graceful restart ended, if one has.
    pub last_restart: Option<RestartOutcome>,
    /// Resident memory of all running workers, in bytes (from `/proc`).
    #[serde(default)]
    pub total_rss_bytes: u64,
    /// The cluster's listeners, in the order workers receive them (filled by the master).
    #[serde(default)]
    pub listeners: Vec<ListenerStats>,
    /// CPU time (user + system) used by all running workers so far (from `/proc`).
    #[serde(default, with = "secs")]
    pub total_cpu_time: Duration,
    /// Worker processes that ended since the cluster started, by why they ended.
    #[serde(default)]
    pub exits: ExitCounts,
    /// The memory limit of the master's cgroup (the tightest of it and its parents: a
    /// container's `memory.max`), in bytes, if it has one.
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    /// The memory the master's cgroup uses now (`memory.current`: the whole cluster, page cache
    /// included), in bytes, if readable.
    #[serde(default)]
    pub memory_current_bytes: Option<u64>,
    /// The master's generation: 0 for the master the program started as, one more with each
    /// upgrade of the master in place (`ecewo-cluster upgrade`).
    #[serde(default)]
    pub generation: u64,
    /// An upgrade of the master in place is running (its new master is starting).
    #[serde(default)]
    pub upgrade_requested: bool,
    /// How the last upgrade of this master ended, if one was asked of it.
    #[serde(default)]
    pub last_upgrade: Option<UpgradeOutcome>,
    /// Lines of the workers' captured output dropped because the output was not read or
    /// written fast enough (`Cluster::capture_output`; 0 without capture).
    #[serde(default)]
    pub log_lines_dropped: u64,
}

/// Why a worker process ended, as the master classifies it (the status alone does not say:
/// a worker killed because it hung and one killed because it was recycled may both end by
/// `SIGKILL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExitReason {
    /// It exited unasked with a non-zero code, or died of a signal the master did not send.
    Crash,
    /// It stopped sending heartbeats for longer than the worker timeout and was killed.
    Hung,
    /// It did not report ready within the ready timeout and was killed (a boot failure).
    BootTimeout,
    /// It was replaced after serving its request limit (`max_requests`).
    RecycledRequests,
    /// It was replaced after reaching its maximum age (`max_age`).
    RecycledAge,
    /// It was replaced after using more memory than allowed (`max_memory`).
    RecycledMemory,
    /// A graceful (rolling) restart replaced it.
    Restart,
    /// Its slot was removed by scaling down.
    Scale,
    /// The cluster shut down.
    Shutdown,
    /// It exited unasked with code 0.
    Exited,
    /// A reason this version does not know (read from a newer master).
    #[serde(other)]
    Other,
}

impl ExitReason {
    /// Every reason, in the order of [`ExitCounts`]'s fields.
    pub const ALL: [ExitReason; 10] = [
        ExitReason::Crash,
        ExitReason::Hung,
        ExitReason::BootTimeout,
        ExitReason::RecycledRequests,
        ExitReason::RecycledAge,
        ExitReason::RecycledMemory,
        ExitReason::Restart,
        ExitReason::Scale,
        ExitReason::Shutdown,
        ExitReason::Exited,
    ];

    /// The reason as one word (`crash`, `hung`, `boot_timeout`, `recycled_requests`, …), as in
    /// JSON, the metrics' `reason` label and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Crash => "crash",
            ExitReason::Hung => "hung",
            ExitReason::BootTimeout => "boot_timeout",
            ExitReason::RecycledRequests => "recycled_requests",
            ExitReason::RecycledAge => "recycled_age",
            ExitReason::RecycledMemory => "recycled_memory",
            ExitReason::Restart => "restart",
            ExitReason::Scale => "scale",
            ExitReason::Shutdown => "shutdown",
            ExitReason::Exited => "exited",
            ExitReason::Other => "other",
        }
    }

    /// Whether crash protection counts it (`crash`, `hung`, `boot_timeout`).
    pub fn is_crash(self) -> bool {
        matches!(self, ExitReason::Crash | ExitReason::Hung | ExitReason::BootTimeout)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Worker processes that ended, counted by [`ExitReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ExitCounts {
    /// [`ExitReason::Crash`].
    pub crash: u64,
    /// [`ExitReason::Hung`].
    pub hung: u64,
    /// [`ExitReason::BootTimeout`].
    pub boot_timeout: u64,
    /// [`ExitReason::RecycledRequests`].
    pub recycled_requests: u64,
    /// [`ExitReason::RecycledAge`].
    pub recycled_age: u64,
    /// [`ExitReason::RecycledMemory`].
    pub recycled_memory: u64,
    /// [`ExitReason::Restart`].
    pub restart: u64,
    /// [`ExitReason::Scale`].
    pub scale: u64,
    /// [`ExitReason::Shutdown`].
    pub shutdown: u64,
    /// [`ExitReason::Exited`].
    pub exited: u64,
}

impl ExitCounts {
    /// The count of one reason.
    pub fn get(&self, reason: ExitReason) -> u64 {
        *self.field(reason)
    }

    /// Counts one more exit for `reason`.
    pub(crate) fn add(&mut self, reason: ExitReason) {
        *self.field_mut(reason) += 1;
    }

    /// Every reason with its count, in [`ExitReason::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (ExitReason, u64)> + '_ {
        ExitReason::ALL.into_iter().map(|r| (r, self.get(r)))
    }

    fn field(&self, reason: ExitReason) -> &u64 {
        match reason {
            ExitReason::Crash => &self.crash,
            ExitReason::Hung => &self.hung,
            ExitReason::BootTimeout => &self.boot_timeout,
            ExitReason::RecycledRequests => &self.recycled_requests,
            ExitReason::RecycledAge => &self.recycled_age,
            ExitReason::RecycledMemory => &self.recycled_memory,
            ExitReason::Restart => &self.restart,
            ExitReason::Scale => &self.scale,
            ExitReason::Shutdown => &self.shutdown,
            ExitReason::Exited | ExitReason::Other => &self.exited,
        }
    }

    fn field_mut(&mut self, reason: ExitReason) -> &mut u64 {
        match reason {
            ExitReason::Crash => &mut self.crash,
            ExitReason::Hung => &mut self.hung,
            ExitReason::BootTimeout => &mut self.boot_timeout,
            ExitReason::RecycledRequests => &mut self.recycled_requests,
            ExitReason::RecycledAge => &mut self.recycled_age,
            ExitReason::RecycledMemory => &mut self.recycled_memory,
            ExitReason::Restart => &mut self.restart,
            ExitReason::Scale => &mut self.scale,
            ExitReason::Shutdown => &mut self.shutdown,
            ExitReason::Exited | ExitReason::Other => &mut self.exited,
        }
    }
}

/// Statistics of one worker slot (the spec's `worker_stats_t`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The slot's id, from 0.
    pub worker_id: usize,
    /// The pid of the process in the slot, if one is running.
    pub pid: Option<u32>,
    /// The port the worker serves.
    pub port: u16,
    /// The slot's status.
    pub status: WorkerStatus,
    /// When the current (or last) process of the slot was started.
    #[serde(with = "unix_time")]
    pub start_time: Option<SystemTime>,
    /// How long the current process has been running (zero when none runs).
    #[serde(with = "secs")]
    pub uptime: Duration,
    /// How the slot's last process ended, if one has.
    pub exit_status: Option<ExitStatus>,
    /// Crashes of this slot since the cluster started.
    pub crash_count: u32,
    /// Crash protection disabled this slot.
    pub respawn_disabled: bool,
    /// Times this slot's worker was started again (respawns and graceful replacements).
    #[serde(default)]
    pub restarts: u64,
    /// Resident memory of the running worker, in bytes (from `/proc`).
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// CPU time (user + system) the running worker used so far (from `/proc`).
    #[serde(default, with = "opt_secs")]
    pub cpu_time: Option<Duration>,
    /// Time since the running worker's last heartbeat, if it beats (from its channel).
    #[serde(default, with = "opt_secs")]
    pub heartbeat_age: Option<Duration>,
    /// Requests the running worker served so far, as its last heartbeat said.
    #[serde(default)]
    pub requests: Option<u64>,
    /// Requests in flight in the running worker, as its last heartbeat said.
    #[serde(default)]
    pub in_flight: Option<u64>,
    /// Why the slot's last process ended, if one has.
    #[serde(default)]
    pub last_exit_reason: Option<ExitReason>,
    /// What the running worker last said in a `STATUS=` notification (workers of a
    /// [`Cluster::command`](crate::Cluster::command) cluster).
    #[serde(default)]
    pub notify_status: Option<String>,
}

/// `Option<SystemTime>` as seconds since the Unix epoch (a float), or null.
pub(crate) mod unix_time {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        let secs = Option::<f64>::deserialize(d)?;
        // Out-of-range values (a negative, NaN or enormous number) read as unknown, never a panic.
        Ok(secs.and_then(|s| Duration::try_from_secs_f64(s).ok()).and_then(|d| UNIX_EPOCH.checked_add(d)))
    }
}

/// `Option<Duration>` as seconds (a float), or null.
pub(crate) mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.and_then(|s| Duration::try_from_secs_f64(s).ok()))
    }
}

/// `Duration` as seconds (a float).
pub(crate) mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_display_and_raw() {
        assert_eq!(ExitStatus::Code(3).to_string(), "exit code 3");
        assert_eq!(ExitStatus::Signal(Signal::KILL).to_string(), "signal 9 (SIGKILL)");
        assert_eq!(ExitStatus::Signal(Signal::KILL).as_raw(), 137);
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signal(Signal::TERM).success());
    }

    #[test]
    fn exit_counts_by_reason() {
        let mut c = ExitCounts::default();
        c.add(ExitReason::Hung);
        c.add(ExitReason::Hung);
        c.add(ExitReason::RecycledMemory);
        assert_eq!(c.get(ExitReason::Hung), 2);
        assert_eq!(c.iter().map(|(_, n)| n).sum::<u64>(), 3);
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"hung\":2") && json.contains("\"recycled_memory\":1"), "{json}");
        for r in ExitReason::ALL {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.as_str()));
        }
        assert_eq!(
            serde_json::from_str::<ExitReason>("\"oom_killed\"").unwrap(),
            ExitReason::Other,
            "a newer master's"
        );
        // An older master's answer (no counts) reads as zeros.
        assert_eq!(serde_json::from_str::<ExitCounts>("{}").unwrap(), ExitCounts::default());
    }

    #[test]
    fn out_of_range_times_are_unknown_not_a_panic() {
        let json = r#"{"worker_id":0,"pid":null,"port":1,"status":"active","start_time":1e19,"uptime":0.5,
            "exit_status":null,"crash_count":0,"respawn_disabled":false}"#;
        let w: WorkerStats = serde_json::from_str(json).unwrap();
        assert_eq!(w.start_time, None);
        assert!(serde_json::from_str::<WorkerStats>(&json.replace("0.5", "-1")).is_err());
    }

    #[test]
    fn worker_stats_round_trip_json() {
        let w = WorkerStats {
            worker_id: 2,
            pid: Some(42),
            port: 3000,
            status: WorkerStatus::Active,
            start_time: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_500)),
            uptime: Duration::from_millis(2_250),
            exit_status: Some(ExitStatus::Signal(Signal::KILL)),
            crash_count: 1,
            respawn_disabled: false,
            restarts: 2,
            rss_bytes: Some(4096),
            cpu_time: Some(Duration::from_millis(500)),
            heartbeat_age: Some(Duration::from_millis(250)),
            requests: Some(10),
            in_flight: Some(1),
            last_exit_reason: Some(ExitReason::Hung),
            notify_status: Some("serving".into()),
        };
        let json = serde_json::to_string(&w).unwrap();
        assert!(json.contains("\"status\":\"active\""), "{json}");
        assert!(json.contains("\"uptime\":2.25"), "{json}");
        let back: WorkerStats = serde_json::from_str(&json).unwrap();
        assert_eq!(back, w);
    }
}
