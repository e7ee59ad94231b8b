//! Starting a worker process: the program file, its identity in the environment, its listener
//! by the systemd convention (fd 3, `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` = its own pid)
//! and its channel right after, and the child setup between fork and exec.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::Balance;
use super::channel::MasterEnd;
use super::driver::{Driver, Proc};
use crate::os::sys::Spawn;
use crate::proto::handoff::{FIRST_LISTEN_FD, PRIVATE_ENV, env};
use crate::supervisor::Program;

/// What a command cluster's workers run, resolved at `init`.
#[derive(Debug)]
pub(super) struct CommandWorkers {
    /// The program file found (`PATH` searched for a bare name).
    pub(super) path: PathBuf,
    /// `argv[0]` as given, then the arguments.
    pub(super) argv: Vec<OsString>,
    pub(super) ready_after: Option<std::time::Duration>,
    pub(super) compat: Vec<super::Compat>,
}

impl CommandWorkers {
    /// Finds the program of `command` and checks that it can be run (a file, executable by this
    /// user): a command that cannot run fails `init`, before anything is started.
    pub(super) fn resolve(command: &super::WorkerCommand) -> Result<CommandWorkers, crate::error::Error> {
        let given = std::path::Path::new(&command.program);
        let bad = |reason: String| crate::error::Error::BadCommand { command: given.to_owned(), reason };
        let path = if command.program.as_encoded_bytes().contains(&b'/') {
            std::path::absolute(given).map_err(|e| bad(e.to_string()))?
        } else {
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join(given))
                .find(|p| p.is_file() && rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok())
                .ok_or_else(|| bad("not found in PATH; give its path, or install it".into()))?
        };
        let meta = std::fs::metadata(&path).map_err(|e| bad(format!("{e}; check the path")))?;
        if !meta.is_file() {
            return Err(bad("not a file; give the program to run".into()));
        }
        rustix::fs::access(&path, rustix::fs::Access::EXEC_OK)
            .map_err(|_| bad("not executable by this user; chmod +x it, or run it through its interpreter".into()))?;
        // What the kernel can execute: an ELF binary or a `#!` script (anything else fails every
        // spawn with ENOEXEC).
        let mut head = [0u8; 4];
        let n = std::io::Read::read(&mut std::fs::File::open(&path).map_err(|e| bad(e.to_string()))?, &mut head)
            .map_err(|e| bad(e.to_string()))?;
        if !(head[..n].starts_with(b"\x7fELF") || head[..n].starts_with(b"#!")) {
            return Err(bad(
                "not a program (neither a binary nor a #! script); run it through its interpreter, e.g. `python3 FILE`"
                    .into(),
            ));
        }
        let argv = std::iter::once(command.program.clone()).chain(command.args.iter().cloned()).collect();
        Ok(CommandWorkers { path, argv, ready_after: command.ready_after, compat: command.compat.clone() })
    }

    /// The command line, for the log.
    pub(super) fn describe(&self) -> String {
        self.argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    }
}

impl Driver {
    /// Starts the worker process of `slot`: `/proc/self/exe` (the binary this master runs, even
    /// if the file was replaced since), with the master's arguments and environment plus the
    /// worker's identity, its listeners from fd 3 (`LISTEN_FDS`, `LISTEN_FDNAMES` their names,
    /// `LISTEN_PID` its own pid) and its channel right after them. The master's own systemd
    /// variables are removed first.
    pub(super) fn spawn(&mut self, slot: usize, program: Program, request_limit: Option<u64>) -> io::Result<Proc> {
        if self.m.command.is_some() {
            return self.spawn_command(slot);
        }
        let listeners = self.listeners_for(slot)?;
        let exe = match program {
            Program::Running => PathBuf::from("/proc/self/exe"),
            Program::Deployed(n) => {
                if !self.programs.contains_key(&n) {
                    // Above every number a worker's descriptors are placed at: its listeners from
                    // 3, then its channel.
                    let above = (3 + self.m.listeners.len() as i32 + 1).max(10);
                    self.programs.insert(n, open_program(&self.m.exe_path, above)?);
                }
                PathBuf::from(format!("/proc/self/fd/{}", self.programs[&n].as_raw_fd()))
            }
        };
        let (master_end, worker_end) = UnixStream::pair()?;
        let master_end = UnixStream::from(crate::os::sys::lift(master_end.into()));
        let channel_fd = FIRST_LISTEN_FD + listeners.len() as i32;
        let mut env = self.worker_env(slot, listeners.len(), &[]);
        env.set(env::CHANNEL_FD, channel_fd.to_string())
            .set(env::MASTER_PID, self.master_pid.as_raw_nonzero().to_string())
            .set(env::SHUTDOWN_TIMEOUT_MS, self.m.policy.shutdown_timeout.as_millis().to_string())
            .set(env::HEARTBEAT_MS, self.m.heartbeat.as_millis().clamp(1, 86_400_000).to_string());
        if let Some(limit) = request_limit {
            env.set(env::MAX_REQUESTS, limit.max(1).to_string());
        }
        let argv: Vec<OsString> = std::iter::once(self.m.argv0.clone()).chain(self.m.args.iter().cloned()).collect();
        let (mut child, output) = self.worker_child(exe.as_os_str(), &argv, env, listeners)?;
        child.fd(worker_end.into(), channel_fd);
        // Everything that can fail before the spawn: a worker must never run unsupervised.
        let chan = MasterEnd::new(master_end)?;
        let (pid, pidfd) = child.spawn()?;
        Ok(Proc { slot, pid, pidfd, chan: Some(chan), ready_at: None, status_text: None, output })
    }

    /// Starts the worker process of `slot` of a command cluster: the command (found again at
    /// its path, so that a rolling restart runs the file now there), with the master's
    /// environment and, by the systemd conventions, its listeners from fd 3 (`LISTEN_FDS`,
    /// `LISTEN_FDNAMES`, `LISTEN_PID`), its slot (`ECEWO_CLUSTER_WORKER_ID`…), the master's
    /// private `NOTIFY_SOCKET` (and `WATCHDOG_USEC` with a worker timeout), and the
    /// compatibility variables asked for. No channel: the program speaks `sd_notify`.
    fn spawn_command(&mut self, slot: usize) -> io::Result<Proc> {
        let listeners = self.listeners_for(slot)?;
        let Some((c, notify)) = &self.m.command else { return Err(io::Error::other("not a command cluster")) };
        let count = listeners.len() as i32;
        // No channel: none of the library's own worker variables either.
        let mut env = self.worker_env(slot, listeners.len(), &env::ALL);
        env.set("NOTIFY_SOCKET", notify.path());
        if let Some(timeout) = self.sup.policy().liveness.worker_timeout {
            env.set("WATCHDOG_USEC", timeout.as_micros().to_string());
        }
        for compat in &c.compat {
            match compat {
                super::Compat::Einhorn => {
                    env.set("EINHORN_FD_COUNT", count.to_string());
                    for i in 0..count {
                        env.set(format!("EINHORN_FD_{i}"), (FIRST_LISTEN_FD + i).to_string());
                    }
                }
                super::Compat::ServerStarter => {
                    let ports: Vec<String> = self
                        .m
                        .listeners
                        .iter()
                        .enumerate()
                        .map(|(i, b)| {
                            let at = match &b.addr {
                                super::ListenAddr::Tcp(a) => a.port().to_string(),
                                other => other.to_string(),
                            };
                            format!("{at}={}", FIRST_LISTEN_FD + i as i32)
                        })
                        .collect();
                    env.set("SERVER_STARTER_PORT", ports.join(";"));
                }
            }
        }
        let (child, output) = self.worker_child(c.path.as_os_str(), &c.argv, env, listeners)?;
        let ready_at = c.ready_after.map(|d| std::time::Instant::now() + d);
        let (pid, pidfd) = child.spawn()?;
        Ok(Proc { slot, pid, pidfd, chan: None, ready_at, status_text: None, output })
    }

    /// The environment of every worker, a program's or a command's: the master's, without its
    /// own relation with systemd, the hand-off variables of an upgrade and `removed`, with its
    /// slot and its listeners by the systemd convention (`LISTEN_FDS`, `LISTEN_FDNAMES`).
    fn worker_env(&self, slot: usize, listeners: usize, removed: &[&str]) -> ChildEnv {
        let mut env = ChildEnv::inherited();
        for key in PRIVATE_ENV.iter().chain(crate::proto::handoff::upgrade_env::ALL.iter()).chain(removed) {
            env.remove(key);
        }
        let names: Vec<&str> = self.m.listeners.iter().map(|b| b.name.as_str()).collect();
        env.set(env::WORKER_ID, slot.to_string())
            .set(env::WORKERS, self.sup.policy().workers.to_string())
            .set(env::PORT, self.m.shared.addr.port().to_string())
            .set(env::LISTEN_FDS, listeners.to_string())
            .set(env::LISTEN_FDNAMES, names.join(":"));
        env
    }

    /// A worker process, ready to start: `path` with `argv`, `env` and its own `LISTEN_PID`;
    /// stdin `/dev/null`; with the output captured, stdout and stderr new pipes (the master's
    /// ends returned), else the master's own; `listeners` from fd 3; the parent-death signal; a
    /// process group of its own (a terminal's Ctrl-C reaches the master only, which then stops
    /// the workers gracefully).
    fn worker_child(
        &self,
        path: &std::ffi::OsStr,
        argv: &[OsString],
        env: ChildEnv,
        listeners: Vec<OwnedFd>,
    ) -> io::Result<(Spawn, Option<(OwnedFd, OwnedFd)>)> {
        let mut child = Spawn::new(path, argv, env.entries(), true)?;
        child.null_stdin()?.parent_death(self.master_pid).own_process_group();
        let output = match &self.m.capture {
            Some(capture) => {
                let mut pipes = capture.worker_pipes()?;
                if let Some((out, err)) = pipes.take_worker_ends() {
                    child.fd(out, 1).fd(err, 2);
                }
                Some(pipes.master)
            }
            None => None,
        };
        for (i, fd) in listeners.into_iter().enumerate() {
            child.fd(fd, FIRST_LISTEN_FD + i as i32);
        }
        Ok((child, output))
    }

    /// The listening sockets a worker of `slot` inherits (copies), one per listener in order.
    /// In `ReusePort` mode a slot whose socket was closed or never bound (a slot spawned for
    /// the first time, disabled, or new after scaling up) gets a new one.
    fn listeners_for(&mut self, slot: usize) -> io::Result<Vec<OwnedFd>> {
        let mut fds = Vec::with_capacity(self.m.listeners.len());
        for b in &mut self.m.listeners {
            let index = match b.balance {
                Balance::ReusePort => slot,
                Balance::Shared => 0,
            };
            if b.fds.len() <= index {
                b.fds.resize_with(index + 1, || None);
            }
            if b.fds[index].is_none()
                && b.balance == Balance::ReusePort
                && let super::ListenAddr::Tcp(addr) = b.addr
            {
                let fd = crate::os::socket::bind_reuseport(addr, b.backlog, b.v6only)
                    .map_err(|e| io::Error::new(e.kind(), format!("listener {} on {}: {e}", b.name, b.addr)))?;
                b.fds[index] = Some(fd);
                // The driver attaches the steering program again once the spawn is done.
                b.group.join(slot);
            }
            let fd = b.fds[index].as_ref().ok_or_else(|| io::Error::other("the listening socket is closed"))?;
            fds.push(fd.try_clone()?);
        }
        Ok(fds)
    }
}

/// A child's environment: the master's, with changes.
pub(super) struct ChildEnv(std::collections::BTreeMap<OsString, OsString>);

impl ChildEnv {
    pub(super) fn inherited() -> ChildEnv {
        ChildEnv(std::env::vars_os().collect())
    }

    pub(super) fn set(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut ChildEnv {
        self.0.insert(key.into(), value.into());
        self
    }

    pub(super) fn remove(&mut self, key: &str) -> &mut ChildEnv {
        self.0.remove(std::ffi::OsStr::new(key));
        self
    }

    /// `KEY=VALUE` byte strings, `LISTEN_PID` left out (the child writes its own).
    pub(super) fn entries(mut self) -> Vec<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        self.0.remove(std::ffi::OsStr::new(env::LISTEN_PID));
        self.0.into_iter().map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat()).collect()
    }
}

/// The path the program was started from, kept to execute it again on a graceful restart (so
/// that replacing the file, or repointing a symlink, deploys new code). Symlinks are *not*
/// resolved; a bare name is looked up in `PATH` as the shell did.
pub(super) fn program_path(argv0: &std::ffi::OsStr) -> PathBuf {
    let path = std::path::Path::new(argv0);
    if path.as_os_str().as_encoded_bytes().contains(&b'/') {
        if let Ok(abs) = std::path::absolute(path) {
            return abs;
        }
    } else if let Some(found) =
        std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|dir| dir.join(path)).find(|p| p.is_file())
    {
        return found;
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// Opens the program file for a deploy. Its descriptor is moved to `above` or higher, above the
/// numbers a worker's descriptors are placed at, so that `/proc/self/fd/N` still names it in the
/// child at exec (a descriptor placed over it would make the child execute something else).
fn open_program(path: &std::path::Path, above: i32) -> io::Result<OwnedFd> {
    let file = std::fs::File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    rustix::io::fcntl_dupfd_cloexec(&file, above).map_err(io::Error::from)
}
