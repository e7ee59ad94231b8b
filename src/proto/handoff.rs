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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |k| map.get(k).cloned()
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
