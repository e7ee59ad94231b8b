//! The master-to-worker hand-off: who a worker is (environment variables, never argv, so that
//! programs parsing their own arguments keep working) and where its descriptors are: its
//! listening sockets by the systemd convention (from fd 3, `LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `LISTEN_PID` = the worker's own pid), its channel right after them.

use std::time::Duration;

use crate::error::Error;

/// The environment variables that tell a worker who it is (never argv, so programs that parse
/// their own arguments keep working).
pub(crate) mod env {
    pub const WORKER_ID: &str = "ECEWO_CLUSTER_WORKER_ID";
    pub const WORKERS: &str = "ECEWO_CLUSTER_WORKERS";
    pub const PORT: &str = "ECEWO_CLUSTER_PORT";
    pub const CHANNEL_FD: &str = "ECEWO_CLUSTER_CHANNEL_FD";
    pub const MASTER_PID: &str = "ECEWO_CLUSTER_MASTER_PID";
    pub const SHUTDOWN_TIMEOUT_MS: &str = "ECEWO_CLUSTER_SHUTDOWN_TIMEOUT_MS";
    /// Optional: the interval the worker beats at, in ms (from 1 ms to one day). Absent: the
    /// master did not say; a worker that beats uses 1 s.
    pub const HEARTBEAT_MS: &str = "ECEWO_CLUSTER_HEARTBEAT_MS";
    /// Optional: the number of requests after which the master recycles this worker (at least
    /// 1). Absent: no limit.
    pub const MAX_REQUESTS: &str = "ECEWO_CLUSTER_MAX_REQUESTS";

    /// The optional ones: a master that does not set them must not pass on values it inherited
    /// itself (see `PRIVATE_ENV`).
    pub const OPTIONAL: [&str; 2] = [HEARTBEAT_MS, MAX_REQUESTS];

    /// All of them: what a worker removes from its environment once read, so that programs it
    /// runs do not inherit them. (`ECEWO_CLUSTER_CPUS` is a user setting, not part of the
    /// hand-off: it stays.)
    pub const ALL: [&str; 8] =
        [WORKER_ID, WORKERS, PORT, CHANNEL_FD, MASTER_PID, SHUTDOWN_TIMEOUT_MS, HEARTBEAT_MS, MAX_REQUESTS];

    /// The systemd convention for passed sockets (`sd_listen_fds(3)`): how many, from fd 3.
    pub const LISTEN_FDS: &str = "LISTEN_FDS";
    /// Their names, `:`-separated.
    pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
    /// The process they are for: a worker's own pid (written between fork and exec).
    pub const LISTEN_PID: &str = "LISTEN_PID";
}

/// The descriptor of a worker's first listening socket (the systemd convention's
/// `SD_LISTEN_FDS_START`); the others follow, then the channel.
pub(crate) const FIRST_LISTEN_FD: i32 = 3;

/// The name of the listener of `Cluster::new(port)`.
pub const DEFAULT_LISTENER: &str = "default";

/// A worker's identity, parsed from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerEnv {
    pub id: usize,
    pub count: usize,
    pub port: u16,
    /// The listening sockets, by name, at fds 3, 4, … in this order.
    pub listeners: Vec<(String, i32)>,
    pub channel_fd: i32,
    pub master_pid: u32,
    pub shutdown_timeout: Duration,
    /// The interval the master expects beats at (`None`: it did not say).
    pub heartbeat: Option<Duration>,
    /// The number of requests after which the master recycles this worker (`None`: no limit).
    pub request_limit: Option<u64>,
}

/// The longest heartbeat interval a worker accepts: one day (the longest duration the cluster's
/// options accept).
pub(crate) const MAX_HEARTBEAT: Duration = Duration::from_secs(24 * 3600);

impl WorkerEnv {
    /// Parses the hand-off from the variables `get` returns: `Ok(None)` without
    /// `ECEWO_CLUSTER_WORKER_ID`, an error naming the variable when one is missing or garbled.
    /// (Whether the process really is a worker is the worker side's check: see
    /// `worker::inherited_env`.)
    pub(crate) fn parse(
        get: impl Fn(&str) -> Option<std::ffi::OsString>,
        own_pid: u32,
    ) -> Result<Option<WorkerEnv>, Error> {
        if get(env::WORKER_ID).is_none() {
            return Ok(None);
        }
        fn num<T: std::str::FromStr>(get: &impl Fn(&str) -> Option<std::ffi::OsString>, key: &str) -> Result<T, Error> {
            let v = get(key).ok_or_else(|| Error::BadInheritance { what: format!("{key} is not set") })?;
            v.to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::BadInheritance { what: format!("{key}={} is not a number", v.to_string_lossy()) })
        }
        /// An optional variable: `None` when absent, in `range` or a clear error otherwise.
        fn optional(
            get: &impl Fn(&str) -> Option<std::ffi::OsString>,
            key: &str,
            range: std::ops::RangeInclusive<u64>,
        ) -> Result<Option<u64>, Error> {
            if get(key).is_none() {
                return Ok(None);
            }
            let n: u64 = num(get, key)?;
            if !range.contains(&n) {
                let (lo, hi) = (range.start(), range.end());
                return Err(Error::BadInheritance { what: format!("{key}={n} is not from {lo} to {hi}") });
            }
            Ok(Some(n))
        }
        let mut parsed = WorkerEnv {
            id: num(&get, env::WORKER_ID)?,
            count: num(&get, env::WORKERS)?,
            port: num(&get, env::PORT)?,
            channel_fd: num(&get, env::CHANNEL_FD)?,
            master_pid: num(&get, env::MASTER_PID)?,
            shutdown_timeout: Duration::from_millis(num(&get, env::SHUTDOWN_TIMEOUT_MS)?),
            heartbeat: optional(&get, env::HEARTBEAT_MS, 1..=MAX_HEARTBEAT.as_millis() as u64)?
                .map(Duration::from_millis),
            request_limit: optional(&get, env::MAX_REQUESTS, 1..=u64::MAX)?,
            listeners: Vec::new(),
        };
        let bad = |what: String| Error::BadInheritance { what };
        let listen_pid: u32 = num(&get, env::LISTEN_PID)?;
        if listen_pid != own_pid {
            return Err(bad(format!("LISTEN_PID={listen_pid} is not this process ({own_pid})")));
        }
        let count: u32 = num(&get, env::LISTEN_FDS)?;
        if count == 0 || count > 1024 {
            return Err(bad(format!("LISTEN_FDS={count}: a worker inherits from 1 to 1024 listening sockets")));
        }
        let names = get(env::LISTEN_FDNAMES).ok_or_else(|| bad("LISTEN_FDNAMES is not set".into()))?;
        let names: Vec<String> = names
            .to_str()
            .ok_or_else(|| bad("LISTEN_FDNAMES is not UTF-8".into()))?
            .split(':')
            .map(str::to_owned)
            .collect();
        if names.len() != count as usize {
            return Err(bad(format!("LISTEN_FDNAMES has {} names for LISTEN_FDS={count}", names.len())));
        }
        parsed.listeners = names.into_iter().enumerate().map(|(i, name)| (name, FIRST_LISTEN_FD + i as i32)).collect();
        // Each descriptor is taken over once; the same number twice would give it two owners.
        let after = FIRST_LISTEN_FD + count as i32;
        if parsed.channel_fd != after {
            return Err(bad(format!(
                "its channel (fd {}) must follow its {count} listening sockets (fd {after})",
                parsed.channel_fd
            )));
        }
        Ok(Some(parsed))
    }
}

/// Variables of the master's environment that must not reach workers: the first six describe
/// the master's own relationship with systemd; the last two are the optional hand-off
/// variables, which the master sets only when it has a value (a value it inherited is not
/// its workers').
pub(crate) const PRIVATE_ENV: [&str; 8] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    env::OPTIONAL[0],
    env::OPTIONAL[1],
];

/// The old-to-new-master hand-off of an upgrade in place: the new master is the program at the
/// original path, started by the old master with these variables, its upgrade channel (a unix
/// stream socket pair, like a worker's) and every inherited socket at the descriptors the state
/// names. The state itself ([`UpgradeState`]) is the first line on the channel
/// ([`UpgradeMessage::State`]): a cluster of thousands of slots would pass the kernel's limit of
/// one environment string (128 KiB). The variables are removed from the environment as soon as
/// they are read, and the descriptors made close-on-exec once taken.
pub(crate) mod upgrade_env {
    /// The new master's end of the upgrade channel.
    pub const CHANNEL_FD: &str = "ECEWO_CLUSTER_UPGRADE_FD";
    /// The old master's pid: the channel's peer (`SO_PEERCRED`), and the new master's parent.
    pub const FROM_PID: &str = "ECEWO_CLUSTER_UPGRADE_FROM";
    /// The old master's start time (field 22 of `/proc/PID/stat`, in clock ticks since boot):
    /// with the pid, it names one process, never one that got the pid again later. Optional
    /// (an old master of an earlier version does not set it).
    pub const FROM_START: &str = "ECEWO_CLUSTER_UPGRADE_FROM_START";
    /// A test hook, never set by the cluster: a new master started with it holds its word that
    /// it took over for this many ms, its loop blocked, after it did take over (so that a test
    /// can kill it in the window of the hand-over).
    pub const TEST_HOLD_TAKEOVER_MS: &str = "ECEWO_CLUSTER_TEST_HOLD_TAKEOVER_MS";
    /// All of them.
    pub const ALL: [&str; 4] = [CHANNEL_FD, FROM_PID, FROM_START, TEST_HOLD_TAKEOVER_MS];
}

/// The longest state line a new master reads (a state of the largest cluster is about 1 MiB).
pub(crate) const MAX_STATE_LINE: usize = 16 << 20;

/// The most descriptors an upgrade hands over (a socket per slot of each listener, the control
/// socket and the admin listener): far more than any real cluster, few enough to check.
pub(crate) const MAX_INHERITED_FDS: usize = 65_536;

/// Where an inherited listener listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum InheritedAddr {
    /// TCP, with the real port.
    Tcp(std::net::SocketAddr),
    /// A unix socket file.
    Unix(std::path::PathBuf),
    /// An abstract unix socket.
    Abstract(String),
}

/// A listener the old master hands over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct InheritedListener {
    pub name: String,
    pub addr: InheritedAddr,
    /// `SO_REUSEPORT`, one socket per slot (else one socket shared by every worker, at slot 0).
    pub reuse_port: bool,
    /// systemd passed it (socket activation): the new master cannot bind it again.
    #[serde(default)]
    pub activated: bool,
    pub backlog: i32,
    #[serde(default)]
    pub v6only: bool,
    /// Its sockets: (slot, descriptor number in the new master).
    pub fds: Vec<(usize, i32)>,
    /// `ReusePort`: the kernel's array of the group, as slots (steering indexes it).
    #[serde(default)]
    pub group: Vec<usize>,
    /// A unix socket file the old master created: its device and inode (whoever holds it last
    /// removes it, if it is still that file).
    #[serde(default)]
    pub file: Option<(u64, u64)>,
}

/// A unix socket file's listener the old master hands over (the control socket).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct InheritedControl {
    pub path: std::path::PathBuf,
    pub fd: i32,
    /// Its device and inode.
    pub file: (u64, u64),
}

/// The admin listener the old master hands over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct InheritedAdmin {
    pub addr: InheritedAddr,
    pub fd: i32,
    #[serde(default)]
    pub file: Option<(u64, u64)>,
}

/// What a new master inherits (the first line on the upgrade channel).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct UpgradeState {
    /// The old master's generation.
    pub generation: u64,
    pub total_restarts: u64,
    #[serde(default)]
    pub exits: crate::stats::ExitCounts,
    /// The old master's shutdown timeout, in ms (how long its workers may drain).
    pub shutdown_timeout_ms: u64,
    pub listeners: Vec<InheritedListener>,
    #[serde(default)]
    pub control: Option<InheritedControl>,
    #[serde(default)]
    pub admin: Option<InheritedAdmin>,
    /// A slot-by-slot upgrade, from an old master with this many slots.
    #[serde(default)]
    pub slot_by_slot: Option<usize>,
    /// The path the first master was started from and its argv (`argv[0]` first), as bytes:
    /// what every later upgrade executes again, whatever the new program's own argv says (a
    /// wrapper script at the path execs the real binary, with arguments of its own).
    #[serde(default)]
    pub origin: Option<(Vec<u8>, Vec<Vec<u8>>)>,
    /// The old master hands over in two phases: after `yours` it serves on until the new
    /// master says `took_over`, and answers `draining`. (An old master of an earlier version
    /// drains at `yours`, and never answers.)
    #[serde(default)]
    pub two_phase: bool,
}

impl UpgradeState {
    /// Every descriptor it names, in order: the listeners' sockets, the control socket, the
    /// admin listener.
    pub(crate) fn fds(&self) -> Vec<i32> {
        self.listeners
            .iter()
            .flat_map(|l| l.fds.iter().map(|(_, fd)| *fd))
            .chain(self.control.iter().map(|c| c.fd))
            .chain(self.admin.iter().map(|a| a.fd))
            .collect()
    }
}

/// The hand-off of an upgrade, as a new master reads it from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpgradeEnv {
    pub channel_fd: i32,
    pub from_pid: u32,
    /// The old master's start time, when it said.
    pub from_start: Option<u64>,
}

impl UpgradeEnv {
    /// Parses the hand-off from the variables `get` returns: `Ok(None)` without
    /// `ECEWO_CLUSTER_UPGRADE_FD`, an error naming what is wrong when the rest is missing or
    /// garbled. (Whether the channel really leads to the old master is the master side's
    /// check.)
    pub(crate) fn parse(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Option<UpgradeEnv>, Error> {
        let Some(fd) = get(upgrade_env::CHANNEL_FD) else { return Ok(None) };
        let bad = |what: String| Error::BadInheritance { what: format!("upgrade hand-off: {what}") };
        let num = |key: &str, v: Option<std::ffi::OsString>| -> Result<u64, Error> {
            let v = v.ok_or_else(|| bad(format!("{key} is not set")))?;
            v.to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("{key}={} is not a number", v.to_string_lossy())))
        };
        let channel_fd = i32::try_from(num(upgrade_env::CHANNEL_FD, Some(fd))?)
            .map_err(|_| bad(format!("{} is out of range", upgrade_env::CHANNEL_FD)))?;
        let from_pid = u32::try_from(num(upgrade_env::FROM_PID, get(upgrade_env::FROM_PID))?)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| bad(format!("{} is not a pid", upgrade_env::FROM_PID)))?;
        let from_start = match get(upgrade_env::FROM_START) {
            None => None,
            v => Some(num(upgrade_env::FROM_START, v)?),
        };
        Ok(Some(UpgradeEnv { channel_fd, from_pid, from_start }))
    }

    /// Reads the state from the first line the old master sent (without its newline) and checks
    /// the descriptors it names: each once, none of stdio or the channel's, within bounds.
    pub(crate) fn read_state(&self, line: &[u8]) -> Result<UpgradeState, Error> {
        let bad = |what: String| Error::BadInheritance { what: format!("upgrade hand-off: {what}") };
        let state = match serde_json::from_slice::<UpgradeMessage>(line) {
            Ok(UpgradeMessage::State { state }) => state,
            Ok(other) => return Err(bad(format!("the old master sent {other:?} instead of the state"))),
            Err(e) => return Err(bad(format!("the state is not valid: {e}"))),
        };
        let channel_fd = self.channel_fd;
        let mut fds = state.fds();
        if fds.len() > MAX_INHERITED_FDS {
            return Err(bad(format!("{} descriptors, more than {MAX_INHERITED_FDS}", fds.len())));
        }
        fds.push(channel_fd);
        // Each descriptor is taken over once: a number twice would give it two owners.
        let mut sorted = fds.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("fd {} is named twice", w[0])));
        }
        if let Some(fd) = fds.iter().find(|&&fd| fd < FIRST_LISTEN_FD) {
            return Err(bad(format!("fd {fd} is not an inherited descriptor (stdio)")));
        }
        for l in &state.listeners {
            if l.fds.is_empty() {
                return Err(bad(format!("listener {} has no socket", l.name)));
            }
            if !l.reuse_port && l.fds.iter().any(|(slot, _)| *slot != 0) {
                return Err(bad(format!("listener {}: a shared socket is at slot 0", l.name)));
            }
        }
        Ok(state)
    }
}

/// A message on the upgrade channel, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant, reason = "one state per upgrade")]
pub(crate) enum UpgradeMessage {
    /// Old → new, first: what it inherits.
    State { state: UpgradeState },
    /// New → old: its workers are ready.
    Ready { workers: usize },
    /// New → old: it cannot start (its `init` failed): why.
    Failed { reason: String },
    /// New → old (slot by slot): its worker of `slot` is ready.
    SlotReady { slot: usize },
    /// Old → new (slot by slot): its worker of `slot` is gone (or it had none).
    Free { slot: usize },
    /// Old → new: everything is handed over: take over (and say `took_over`).
    Yours,
    /// New → old: it took over (its route is attached, its control socket accepts): the old
    /// master may drain. `slots`: how many it has (the old master's workers of the slots beyond
    /// drain once their sockets had time to receive the handshakes under way).
    TookOver {
        #[serde(default)]
        slots: Option<usize>,
    },
    /// Old → new: it told systemd the new main pid, and drains.
    Draining,
    /// New → old: its start-up is over but it cannot serve (fewer than `min_ready` workers
    /// ready, none can still come): why.
    CannotServe { reason: String },
    /// Old → new: its drain is over and it exits: none of its workers is left.
    Bye,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |k| map.get(k).cloned()
    }

    fn state() -> UpgradeState {
        UpgradeState {
            generation: 2,
            total_restarts: 9,
            exits: crate::stats::ExitCounts::default(),
            shutdown_timeout_ms: 1500,
            listeners: vec![
                InheritedListener {
                    name: "default".into(),
                    addr: InheritedAddr::Tcp("127.0.0.1:3000".parse().unwrap()),
                    reuse_port: true,
                    activated: false,
                    backlog: 1024,
                    v6only: false,
                    fds: vec![(0, 4), (1, 5)],
                    group: vec![1, 0],
                    file: None,
                },
                InheritedListener {
                    name: "sock".into(),
                    addr: InheritedAddr::Unix("/run/app.sock".into()),
                    reuse_port: false,
                    activated: false,
                    backlog: 16,
                    v6only: false,
                    fds: vec![(0, 6)],
                    group: vec![],
                    file: Some((1, 2)),
                },
            ],
            control: Some(InheritedControl { path: "/run/x.sock".into(), fd: 7, file: (3, 4) }),
            admin: Some(InheritedAdmin { addr: InheritedAddr::Abstract("adm".into()), fd: 8, file: None }),
            slot_by_slot: Some(2),
            origin: Some((b"/srv/app".to_vec(), vec![b"app".to_vec(), vec![0xff, b'x']])),
            two_phase: true,
        }
    }

    fn line(state: &UpgradeState) -> Vec<u8> {
        serde_json::to_vec(&UpgradeMessage::State { state: state.clone() }).unwrap()
    }

    fn parse_state(state: &UpgradeState) -> Result<UpgradeState, Error> {
        UpgradeEnv { channel_fd: 3, from_pid: 77, from_start: None }.read_state(&line(state))
    }

    #[test]
    fn the_upgrade_hand_off_round_trips() {
        let get = env_of(&[(upgrade_env::CHANNEL_FD, "3"), (upgrade_env::FROM_PID, "77")]);
        let e = UpgradeEnv::parse(get).unwrap().unwrap();
        assert_eq!((e.channel_fd, e.from_pid, e.from_start), (3, 77, None), "an earlier version's old master");
        let get = env_of(&[
            (upgrade_env::CHANNEL_FD, "3"),
            (upgrade_env::FROM_PID, "77"),
            (upgrade_env::FROM_START, "123456"),
        ]);
        assert_eq!(UpgradeEnv::parse(get).unwrap().unwrap().from_start, Some(123_456));
        let s = e.read_state(&line(&state())).unwrap();
        assert_eq!(s, state());
        assert_eq!(s.fds(), vec![4, 5, 6, 7, 8]);
        assert_eq!(UpgradeEnv::parse(env_of(&[])).unwrap(), None, "no channel: not a new master");
        for m in [
            UpgradeMessage::Ready { workers: 3 },
            UpgradeMessage::Failed { reason: "x".into() },
            UpgradeMessage::SlotReady { slot: 1 },
            UpgradeMessage::Free { slot: 0 },
            UpgradeMessage::Yours,
            UpgradeMessage::TookOver { slots: Some(2) },
            UpgradeMessage::Draining,
            UpgradeMessage::CannotServe { reason: "y".into() },
            UpgradeMessage::Bye,
        ] {
            let line = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<UpgradeMessage>(&line).unwrap(), m);
        }
        assert_eq!(serde_json::to_string(&UpgradeMessage::Yours).unwrap(), r#"{"t":"yours"}"#);
        assert_eq!(
            serde_json::to_string(&UpgradeMessage::TookOver { slots: Some(2) }).unwrap(),
            r#"{"t":"took_over","slots":2}"#
        );
        assert_eq!(
            serde_json::from_str::<UpgradeMessage>(r#"{"t":"took_over"}"#).unwrap(),
            UpgradeMessage::TookOver { slots: None }
        );
        assert_eq!(serde_json::to_string(&UpgradeMessage::Draining).unwrap(), r#"{"t":"draining"}"#);
        // A state from an old master of an earlier version: one-phase.
        let mut old = serde_json::to_value(UpgradeMessage::State { state: state() }).unwrap();
        old["state"].as_object_mut().unwrap().remove("two_phase");
        let e = UpgradeEnv { channel_fd: 3, from_pid: 77, from_start: None };
        assert!(!e.read_state(old.to_string().as_bytes()).unwrap().two_phase);
    }

    #[test]
    fn a_garbled_upgrade_hand_off_is_a_clear_error() {
        let err = |get: &dyn Fn(&str) -> Option<OsString>| UpgradeEnv::parse(get).unwrap_err().to_string();
        let only_fd = env_of(&[(upgrade_env::CHANNEL_FD, "3")]);
        assert!(err(&only_fd).contains("ECEWO_CLUSTER_UPGRADE_FROM is not set"));
        let bad_pid = env_of(&[(upgrade_env::CHANNEL_FD, "3"), (upgrade_env::FROM_PID, "0")]);
        assert!(err(&bad_pid).contains("is not a pid"));
        let bad_start =
            env_of(&[(upgrade_env::CHANNEL_FD, "3"), (upgrade_env::FROM_PID, "7"), (upgrade_env::FROM_START, "x")]);
        assert!(err(&bad_start).contains("ECEWO_CLUSTER_UPGRADE_FROM_START=x is not a number"));
        let e = UpgradeEnv { channel_fd: 3, from_pid: 77, from_start: None };
        assert!(e.read_state(b"{").unwrap_err().to_string().contains("the state is not valid"));
        assert!(e.read_state(br#"{"t":"yours"}"#).unwrap_err().to_string().contains("instead of the state"));
        let state_err = |s: &UpgradeState| parse_state(s).unwrap_err().to_string();
        let mut twice = state();
        twice.listeners[1].fds = vec![(0, 5)];
        assert!(state_err(&twice).contains("fd 5 is named twice"));
        let mut channel = state();
        channel.listeners[1].fds = vec![(0, 3)];
        assert!(state_err(&channel).contains("fd 3 is named twice"));
        let mut stdio = state();
        stdio.listeners[1].fds = vec![(0, 2)];
        assert!(state_err(&stdio).contains("fd 2 is not an inherited"));
        let mut shared = state();
        shared.listeners[1].fds = vec![(1, 6)];
        assert!(state_err(&shared).contains("a shared socket is at slot 0"));
        let mut empty = state();
        empty.listeners[0].fds.clear();
        assert!(state_err(&empty).contains("listener default has no socket"));
    }

    #[test]
    fn no_worker_id_means_master() {
        assert_eq!(WorkerEnv::parse(env_of(&[]), 1).unwrap(), None);
    }

    const FULL: [(&str, &str); 9] = [
        (env::WORKER_ID, "2"),
        (env::WORKERS, "4"),
        (env::PORT, "3000"),
        (env::CHANNEL_FD, "5"),
        (env::MASTER_PID, "77"),
        (env::SHUTDOWN_TIMEOUT_MS, "1500"),
        (env::LISTEN_PID, "78"),
        (env::LISTEN_FDS, "2"),
        (env::LISTEN_FDNAMES, "default:admin"),
    ];

    #[test]
    fn full_environment_parses() {
        let e = WorkerEnv::parse(env_of(&FULL), 78).unwrap().unwrap();
        assert_eq!((e.id, e.count, e.port, e.master_pid, e.channel_fd), (2, 4, 3000, 77, 5));
        assert_eq!(e.shutdown_timeout, Duration::from_millis(1500));
        assert_eq!(e.listeners, vec![("default".to_owned(), 3), ("admin".to_owned(), 4)]);
        // The optional variables are absent from FULL.
        assert_eq!((e.heartbeat, e.request_limit), (None, None));
    }

    #[test]
    fn the_optional_variables_parse_when_present() {
        let mut pairs = FULL.to_vec();
        pairs.extend([(env::HEARTBEAT_MS, "250"), (env::MAX_REQUESTS, "10000")]);
        let e = WorkerEnv::parse(env_of(&pairs), 78).unwrap().unwrap();
        assert_eq!((e.heartbeat, e.request_limit), (Some(Duration::from_millis(250)), Some(10_000)));
        let mut pairs = FULL.to_vec();
        pairs.extend([(env::HEARTBEAT_MS, "86400000"), (env::MAX_REQUESTS, "18446744073709551615")]);
        let e = WorkerEnv::parse(env_of(&pairs), 78).unwrap().unwrap();
        assert_eq!((e.heartbeat, e.request_limit), (Some(MAX_HEARTBEAT), Some(u64::MAX)));
        let err = |key: &str, value: &str| {
            let mut pairs = FULL.to_vec();
            pairs.push((key, value));
            WorkerEnv::parse(env_of(&pairs), 78).unwrap_err().to_string()
        };
        for (key, value) in [
            (env::HEARTBEAT_MS, "fast"),
            (env::HEARTBEAT_MS, ""),
            (env::HEARTBEAT_MS, "-5"),
            (env::MAX_REQUESTS, "1e6"),
            (env::MAX_REQUESTS, "18446744073709551616"),
        ] {
            let e = err(key, value);
            assert!(e.contains(&format!("{key}={value} is not a number")), "{key}={value}: {e}");
        }
        assert!(err(env::HEARTBEAT_MS, "0").contains("ECEWO_CLUSTER_HEARTBEAT_MS=0 is not from 1 to 86400000"));
        assert!(err(env::HEARTBEAT_MS, "86400001").contains("is not from 1 to 86400000"));
        assert!(err(env::MAX_REQUESTS, "0").contains("ECEWO_CLUSTER_MAX_REQUESTS=0 is not from 1 to"));
    }

    #[test]
    fn every_hand_off_variable_is_scrubbed() {
        for key in env::OPTIONAL {
            assert!(env::ALL.contains(&key), "{key}: a worker removes it");
            assert!(PRIVATE_ENV.contains(&key), "{key}: the master never passes on its own");
        }
        assert!(env::ALL.iter().all(|k| k.starts_with("ECEWO_CLUSTER_")));
    }

    #[test]
    fn partial_or_garbled_environment_is_a_clear_error() {
        let err = WorkerEnv::parse(env_of(&[(env::WORKER_ID, "1")]), 1).unwrap_err();
        assert!(err.to_string().contains("ECEWO_CLUSTER_WORKERS is not set"), "{err}");
        let err = WorkerEnv::parse(env_of(&[(env::WORKER_ID, "x")]), 1).unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
        let with = |key: &str, value: &str| {
            let mut pairs = FULL.to_vec();
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, value));
            WorkerEnv::parse(env_of(&pairs), 78).unwrap_err().to_string()
        };
        // Sockets passed to another process (the master's own, or a parent's) are not ours.
        assert!(with(env::LISTEN_PID, "77").contains("LISTEN_PID=77 is not this process (78)"));
        assert!(with(env::LISTEN_FDS, "0").contains("from 1 to 1024"));
        assert!(with(env::LISTEN_FDNAMES, "default").contains("1 names for LISTEN_FDS=2"));
        assert!(with(env::CHANNEL_FD, "4").contains("must follow its 2 listening sockets (fd 5)"));
    }
}
