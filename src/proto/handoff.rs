//! The master-to-worker hand-off: who a worker is (environment variables, never argv, so that
//! programs parsing their own arguments keep working) and where its descriptors are (fixed
//! numbers).

use std::time::Duration;

use crate::error::Error;

/// The environment variables that tell a worker who it is (never argv, so programs that parse
/// their own arguments keep working).
pub(crate) mod env {
    pub const WORKER_ID: &str = "ECEWO_CLUSTER_WORKER_ID";
    pub const WORKERS: &str = "ECEWO_CLUSTER_WORKERS";
    pub const PORT: &str = "ECEWO_CLUSTER_PORT";
    pub const LISTEN_FD: &str = "ECEWO_CLUSTER_LISTEN_FD";
    pub const CHANNEL_FD: &str = "ECEWO_CLUSTER_CHANNEL_FD";
    pub const MASTER_PID: &str = "ECEWO_CLUSTER_MASTER_PID";
    pub const SHUTDOWN_TIMEOUT_MS: &str = "ECEWO_CLUSTER_SHUTDOWN_TIMEOUT_MS";

    /// All of them: what a worker removes from its environment once read, so that programs it
    /// runs do not inherit them. (`ECEWO_CLUSTER_CPUS` is a user setting, not part of the
    /// hand-off: it stays.)
    pub const ALL: [&str; 7] = [WORKER_ID, WORKERS, PORT, LISTEN_FD, CHANNEL_FD, MASTER_PID, SHUTDOWN_TIMEOUT_MS];
}

/// The fixed descriptor numbers a worker inherits.
pub(crate) const LISTEN_FD: i32 = 3;
pub(crate) const CHANNEL_FD: i32 = 4;

/// A worker's identity, parsed from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerEnv {
    pub id: usize,
    pub count: usize,
    pub port: u16,
    pub listen_fd: i32,
    pub channel_fd: i32,
    pub master_pid: u32,
    pub shutdown_timeout: Duration,
}

impl WorkerEnv {
    /// Parses the hand-off from the variables `get` returns: `Ok(None)` without
    /// `ECEWO_CLUSTER_WORKER_ID`, an error naming the variable when one is missing or garbled.
    /// (Whether the process really is a worker is the worker side's check: see
    /// `worker::inherited_env`.)
    pub(crate) fn parse(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Option<WorkerEnv>, Error> {
        if get(env::WORKER_ID).is_none() {
            return Ok(None);
        }
        fn num<T: std::str::FromStr>(get: &impl Fn(&str) -> Option<std::ffi::OsString>, key: &str) -> Result<T, Error> {
            let v = get(key).ok_or_else(|| Error::BadInheritance { what: format!("{key} is not set") })?;
            v.to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::BadInheritance { what: format!("{key}={} is not a number", v.to_string_lossy()) })
        }
        let parsed = WorkerEnv {
            id: num(&get, env::WORKER_ID)?,
            count: num(&get, env::WORKERS)?,
            port: num(&get, env::PORT)?,
            listen_fd: num(&get, env::LISTEN_FD)?,
            channel_fd: num(&get, env::CHANNEL_FD)?,
            master_pid: num(&get, env::MASTER_PID)?,
            shutdown_timeout: Duration::from_millis(num(&get, env::SHUTDOWN_TIMEOUT_MS)?),
        };
        // Each descriptor is taken over once; the same number twice would give it two owners.
        if parsed.listen_fd == parsed.channel_fd || parsed.listen_fd < 3 || parsed.channel_fd < 3 {
            return Err(Error::BadInheritance {
                what: format!(
                    "its listener (fd {}) and channel (fd {}) must be two descriptors from 3 up",
                    parsed.listen_fd, parsed.channel_fd
                ),
            });
        }
        Ok(Some(parsed))
    }
}

/// Variables of the master's environment that must not reach workers: they describe the master's
/// own relationship with systemd.
pub(crate) const PRIVATE_ENV: [&str; 6] =
    ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

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
        assert_eq!(WorkerEnv::parse(env_of(&[])).unwrap(), None);
    }

    #[test]
    fn full_environment_parses() {
        let e = WorkerEnv::parse(env_of(&[
            (env::WORKER_ID, "2"),
            (env::WORKERS, "4"),
            (env::PORT, "3000"),
            (env::LISTEN_FD, "3"),
            (env::CHANNEL_FD, "4"),
            (env::MASTER_PID, "77"),
            (env::SHUTDOWN_TIMEOUT_MS, "1500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((e.id, e.count, e.port, e.master_pid), (2, 4, 3000, 77));
        assert_eq!(e.shutdown_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn partial_or_garbled_environment_is_a_clear_error() {
        let err = WorkerEnv::parse(env_of(&[(env::WORKER_ID, "1")])).unwrap_err();
        assert!(err.to_string().contains("ECEWO_CLUSTER_WORKERS is not set"), "{err}");
        let err = WorkerEnv::parse(env_of(&[(env::WORKER_ID, "x")])).unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
    }
}
