//! Upgrading the master in place, the driver's side: the old master starts the new one (the
//! program at its original path, with every listening socket, the control socket, the admin
//! listener and the state it inherits) and carries out the hand-over; the new master finds its
//! inheritance at `init` and talks to its predecessor over the upgrade channel. Every decision
//! is the supervisor's (`supervisor/upgrade.rs`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::process::{WaitId, WaitIdOptions};

use super::Balance;
use super::driver::Driver;
use crate::error::Error;
use crate::os::sys::Spawn;
use crate::proto::handoff::{
    FIRST_LISTEN_FD, InheritedAddr, InheritedAdmin, InheritedControl, InheritedListener, UpgradeEnv, UpgradeMessage,
    UpgradeState, upgrade_env,
};
use crate::proto::line::LineIo;
use crate::stats::ExitStatus;
use crate::supervisor::Event;

/// The longest line on the upgrade channel.
const MAX_LINE: usize = 64 * 1024;

/// What a new master inherited at `init`.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub(crate) channel: UnixStream,
    pub(crate) from_pid: u32,
    pub(crate) state: UpgradeState,
    /// The test hook [`upgrade_env::TEST_HOLD_TAKEOVER_MS`], when set.
    pub(crate) hold: Option<std::time::Duration>,
    /// The inherited descriptors, by their number here (taken: owned, close-on-exec).
    pub(crate) fds: HashMap<i32, OwnedFd>,
}

impl Inherited {
    /// Takes descriptor `fd` (each once).
    pub(crate) fn take(&mut self, fd: i32) -> Option<OwnedFd> {
        self.fds.remove(&fd)
    }

    /// Tells the old master why this one cannot start (its `init` failed): it reports that
    /// reason with the rollback.
    pub(crate) fn say_failed(&self, error: &Error) {
        say_failed(&self.channel, error);
    }
}

/// Tells the old master over `channel` why this new master cannot start.
pub(crate) fn say_failed(channel: &UnixStream, error: &Error) {
    use std::io::Write;
    let message = UpgradeMessage::Failed { reason: error.to_string() };
    if let Ok(mut line) = serde_json::to_vec(&message) {
        line.push(b'\n');
        // A short line on a socket nobody else writes to: blocking is fine (the old master
        // reads it), and a failure changes nothing (it sees the exit anyway).
        let mut w: &UnixStream = channel;
        let _ = w.set_nonblocking(false);
        let _ = w.write_all(&line);
    }
}

/// At `init`: the hand-off of an upgrade, if this process is the new master of one. The
/// variables count only when the channel they name really leads to the old master they name
/// (`SO_PEERCRED`: that pid, this user), as for workers, and that master is this process's
/// parent, the very process that started (its start time, when it said it: a pid used again
/// by another process does not pass); otherwise they are stale (a program the master runs
/// inherited them) and ignored. A new master whose parent is not the old master any more (it
/// died right after the start) takes over only if the channel reached its end once the state
/// is read: nobody holds the old master's end any more. The variables are removed from the
/// environment either way, and every descriptor taken is made close-on-exec.
pub(crate) fn inherited() -> Result<Option<Inherited>, Error> {
    if std::env::var_os(upgrade_env::CHANNEL_FD).is_none() {
        return Ok(None);
    }
    let get = |k: &str| std::env::var_os(k);
    let num = |k: &str| get(k).and_then(|v| v.to_str().and_then(|s| s.parse::<u32>().ok()));
    let real = match (num(upgrade_env::CHANNEL_FD).and_then(|fd| i32::try_from(fd).ok()), num(upgrade_env::FROM_PID)) {
        (Some(fd), Some(pid)) => crate::os::socket::check_channel_peer(fd, pid).and_then(|()| same_user(fd)),
        _ => Err("the upgrade variables are garbled".to_owned()),
    };
    let hold = get(upgrade_env::TEST_HOLD_TAKEOVER_MS)
        .and_then(|v| v.to_str().and_then(|s| s.parse::<u64>().ok()))
        .map(std::time::Duration::from_millis);
    let parsed = real.clone().map(|()| UpgradeEnv::parse(get));
    match crate::os::sys::remove_env_if_single_threaded(&upgrade_env::ALL) {
        Ok(()) => tracing::debug!("removed the upgrade hand-off variables from the environment"),
        // Workers never get them (their environment is scrubbed), but programs this process
        // runs itself would: say so where people look.
        Err(why) => tracing::warn!(
            "the upgrade hand-off variables stay in this master's environment ({why}): programs it runs itself inherit them; call Cluster::init before starting threads"
        ),
    }
    let env = match parsed {
        Err(why) => {
            tracing::debug!("ignoring the ECEWO_CLUSTER_UPGRADE_* variables: {why}; starting as a master of its own");
            return Ok(None);
        }
        Ok(env) => match env? {
            Some(env) => env,
            None => return Ok(None),
        },
    };
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32);
    let orphaned = match parent_check(&env, parent, crate::os::procfs::start_time(env.from_pid)) {
        Ok(orphaned) => orphaned,
        Err(why) => {
            tracing::debug!("ignoring the ECEWO_CLUSTER_UPGRADE_* variables: {why}; starting as a master of its own");
            return Ok(None);
        }
    };
    if !crate::os::fds::claim_inherited_fds() {
        return Err(Error::AlreadyInitialized);
    }
    let bad = |what: String| Error::BadInheritance { what: format!("upgrade hand-off: {what}") };
    let take = |fd: i32| -> Result<OwnedFd, Error> {
        let owned = crate::os::sys::take_inherited_fd(fd).map_err(|e| bad(format!("fd {fd} is missing: {e}")))?;
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| bad(format!("fd {fd}: {e}")))?;
        Ok(owned)
    };
    let channel = UnixStream::from(take(env.channel_fd)?);
    let line = read_state_line(&channel).map_err(|e| bad(format!("cannot read the state from the old master: {e}")))?;
    let state = env.read_state(&line)?;
    if orphaned {
        if !at_end(&channel, ORPHAN_WAIT) {
            return Err(bad(format!(
                "this process's parent is {}, not the old master (pid {}), and the channel is still open at the other end: it was not started by that master",
                parent.map_or_else(|| "unknown".to_owned(), |p| format!("pid {p}")),
                env.from_pid
            )));
        }
        tracing::warn!(
            "upgrade: the old master (pid {}) is gone already; this master takes over once it starts",
            env.from_pid
        );
    }
    let mut fds = HashMap::new();
    for fd in state.fds() {
        fds.insert(fd, take(fd)?);
    }
    Ok(Some(Inherited { channel, from_pid: env.from_pid, state, fds, hold }))
}

/// Whether the peer of descriptor `fd` (a unix socket) runs as this process's user.
fn same_user(fd: i32) -> Result<(), String> {
    let euid = rustix::process::geteuid().as_raw();
    match crate::os::sys::inspect_fd(fd, crate::os::sys::unix_peer_cred) {
        Ok(Ok(c)) if c.uid == euid => Ok(()),
        Ok(Ok(c)) => Err(format!("the peer of fd {fd} runs as uid {}, not as this process's uid {euid}", c.uid)),
        Ok(Err(e)) => Err(format!("fd {fd}: cannot read its peer's credentials: {e}")),
        Err(e) => Err(format!("fd {fd} is not open ({e})")),
    }
}

/// Whether the hand-off's old master is this process's parent (`Ok(false)`), or was and is
/// gone (`Ok(true)`: the channel must then be at its end once the state is read, which it is
/// as soon as the old master's descriptors are closed, before its children are reparented);
/// `Err` says why the variables are not this process's. `parent` is `getppid()`, `start` the
/// start time of the process that has the old master's pid now, if it runs (a zombie does not).
fn parent_check(env: &UpgradeEnv, parent: Option<u32>, start: Option<u64>) -> Result<bool, String> {
    let from = env.from_pid;
    if parent != Some(from) {
        return Ok(true);
    }
    match (start, env.from_start) {
        // It died between the two reads.
        (None, _) => Ok(true),
        (Some(now), Some(want)) if now != want => Err(format!(
            "this process's parent, pid {from}, started at tick {now}, not at tick {want} as the old master did: another process has its pid"
        )),
        (Some(_), _) => Ok(false),
    }
}

/// Whether the channel reaches its end (the other end is closed) within `wait`, read without
/// taking anything. (An old master that is exiting closes its descriptors within moments.)
fn at_end(channel: &UnixStream, wait: std::time::Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    use rustix::net::{RecvFlags, recv};
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut byte = [0u8; 1];
        match recv(channel, &mut byte[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Ok((0, _)) => return true,
            // More than the state: the old master speaks, it is there.
            Ok(_) => return false,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
        let mut fds = [PollFd::new(channel, PollFlags::IN | PollFlags::RDHUP)];
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
    }
}

/// How long a new master whose old master is gone (or going) waits for the channel's end.
const ORPHAN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a new master waits for its state at `init` (the old master sends it right after
/// the spawn, from its loop).
const STATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The first line on the upgrade channel, read byte by byte so that nothing after it is taken
/// from the socket (the channel's later messages are the loop's).
fn read_state_line(channel: &UnixStream) -> io::Result<Vec<u8>> {
    use std::io::Read;
    channel.set_read_timeout(Some(STATE_TIMEOUT))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut r: &UnixStream = channel;
    loop {
        match r.read(&mut byte) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the old master closed the channel")),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if line.len() > crate::proto::handoff::MAX_STATE_LINE {
            return Err(io::Error::other("the state is too long"));
        }
    }
    channel.set_read_timeout(None)?;
    Ok(line)
}

/// The new master of an upgrade, as the old master tracks it.
pub(super) struct Successor {
    pub(super) pid: u32,
    pub(super) pidfd: OwnedFd,
    pub(super) chan: LineIo,
    /// The channel reached its end.
    pub(super) closed: bool,
    /// What it said when its `init` failed.
    pub(super) reason: Option<String>,
}

/// The old master, as a new master talks to it.
pub(super) struct Predecessor {
    pub(super) pid: u32,
    pub(super) chan: LineIo,
    /// It said goodbye: its drain is over.
    pub(super) bye: bool,
    /// It hands over in two phases (an old master of an earlier version drains at `yours`).
    two_phase: bool,
    /// The test hook [`upgrade_env::TEST_HOLD_TAKEOVER_MS`].
    hold: Option<std::time::Duration>,
}

impl Predecessor {
    /// The old master of `inherited` (its channel, its pid, how it hands over).
    pub(super) fn new(inherited: Inherited) -> io::Result<Predecessor> {
        Ok(Predecessor {
            pid: inherited.from_pid,
            chan: LineIo::new(inherited.channel)?,
            bye: false,
            two_phase: inherited.state.two_phase,
            hold: inherited.hold,
        })
    }
}

fn send(chan: &mut LineIo, message: &UpgradeMessage) {
    if let Ok(mut line) = serde_json::to_vec(message) {
        line.push(b'\n');
        let _ = chan.send(&line);
        let _ = chan.flush();
    }
}

/// Whether the process of `pidfd` has exited (its status is left to be reaped).
fn exited(pidfd: &OwnedFd) -> bool {
    matches!(
        rustix::process::waitid(
            WaitId::PidFd(pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        ),
        Ok(Some(_))
    )
}

/// The original path and argv as bytes (the state's `origin`).
fn encode_origin((path, argv): &(std::path::PathBuf, Vec<std::ffi::OsString>)) -> (Vec<u8>, Vec<Vec<u8>>) {
    use std::os::unix::ffi::OsStrExt;
    (path.as_os_str().as_bytes().to_vec(), argv.iter().map(|a| a.as_bytes().to_vec()).collect())
}

/// The state's `origin` back as a path and an argv.
pub(super) fn decode_origin((path, argv): (Vec<u8>, Vec<Vec<u8>>)) -> (std::path::PathBuf, Vec<std::ffi::OsString>) {
    use std::os::unix::ffi::OsStringExt;
    (std::ffi::OsString::from_vec(path).into(), argv.into_iter().map(std::ffi::OsString::from_vec).collect())
}

fn inherited_addr(addr: &super::ListenAddr) -> InheritedAddr {
    match addr {
        super::ListenAddr::Tcp(a) => InheritedAddr::Tcp(*a),
        super::ListenAddr::Unix(p) => InheritedAddr::Unix(p.clone()),
        super::ListenAddr::Abstract(n) => InheritedAddr::Abstract(n.clone()),
    }
}

impl Driver {
    /// Starts the new master of an upgrade: the program at the original path, with this
    /// master's arguments and environment (less its relation with systemd's socket activation:
    /// the sockets come by the hand-off), its upgrade channel at fd 3 and every socket it
    /// inherits after it, stdout and stderr shared, in this master's process group (a
    /// terminal's Ctrl-C reaches both), and no parent-death signal: it outlives this master.
    pub(super) fn spawn_master(&mut self, slot_by_slot: bool) -> io::Result<u32> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut mappings: Vec<(OwnedFd, i32)> = vec![(theirs.into(), FIRST_LISTEN_FD)];
        let mut next = FIRST_LISTEN_FD + 1;
        let mut place = |fd: &OwnedFd, mappings: &mut Vec<(OwnedFd, i32)>| -> io::Result<i32> {
            mappings.push((fd.try_clone()?, next));
            next += 1;
            Ok(next - 1)
        };
        let mut listeners = Vec::new();
        for b in &self.m.listeners {
            let mut fds = Vec::new();
            for (slot, fd) in b.fds.iter().enumerate() {
                if let Some(fd) = fd {
                    fds.push((slot, place(fd, &mut mappings)?));
                }
            }
            if fds.is_empty() {
                continue;
            }
            listeners.push(InheritedListener {
                name: b.name.clone(),
                addr: inherited_addr(&b.addr),
                reuse_port: b.balance == Balance::ReusePort,
                activated: b.activated,
                backlog: b.backlog,
                v6only: b.v6only,
                fds,
                group: b.group.members().to_vec(),
                file: b.file.as_ref().map(crate::os::socket::SocketFile::id),
            });
        }
        let control = match &self.m.control {
            Some(c) => {
                let fd: OwnedFd = c.listener().try_clone()?.into();
                Some(InheritedControl { path: c.path().to_owned(), fd: place(&fd, &mut mappings)?, file: c.file_id() })
            }
            None => None,
        };
        let admin = match &self.m.admin {
            Some((a, addr)) => {
                let fd = a.listener().try_clone_to_owned()?;
                Some(InheritedAdmin { addr: inherited_addr(addr), fd: place(&fd, &mut mappings)?, file: a.file_id() })
            }
            None => None,
        };
        let stats = self.sup.cluster_stats();
        let state = UpgradeState {
            generation: stats.generation,
            total_restarts: stats.total_restarts,
            exits: stats.exits,
            shutdown_timeout_ms: u64::try_from(self.m.policy.shutdown_timeout.as_millis()).unwrap_or(u64::MAX),
            listeners,
            control,
            admin,
            slot_by_slot: slot_by_slot.then_some(stats.total_workers),
            origin: Some(encode_origin(&self.m.origin)),
            two_phase: true,
        };
        let (path, argv) = &self.m.origin;
        let mut env = super::spawn::ChildEnv::inherited();
        // The sockets systemd passed come by the hand-off; WATCHDOG_PID named this master.
        for key in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"]
            .into_iter()
            .chain(crate::proto::handoff::env::ALL)
        {
            env.remove(key);
        }
        env.set(upgrade_env::CHANNEL_FD, FIRST_LISTEN_FD.to_string())
            .set(upgrade_env::FROM_PID, self.master_pid.as_raw_nonzero().to_string());
        if let Some(start) = crate::os::procfs::start_time(self.master_pid.as_raw_nonzero().get() as u32) {
            env.set(upgrade_env::FROM_START, start.to_string());
        }
        // No parent-death signal: it must outlive this master. Every descriptor above those
        // placed is closed at exec.
        // argv[0] is the path itself if none was kept.
        let argv = if argv.is_empty() { vec![path.as_os_str().to_owned()] } else { argv.clone() };
        let mut child = Spawn::new(path.as_os_str(), &argv, env.entries(), false)?;
        child.null_stdin()?;
        for (fd, at) in mappings {
            child.fd(fd, at);
        }
        // A busy file (ETXTBSY: just put at the path, it may be open for writing for a moment
        // in a process forked meanwhile) keeps its kind: the supervisor tries again from its
        // timer.
        // Everything that can fail before the spawn: a new master we cannot talk to must not run.
        let chan = LineIo::new(ours)?;
        let (pid, pidfd) =
            child.spawn().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.m.origin.0.display())))?;
        let mut s = Successor { pid, pidfd, chan, closed: false, reason: None };
        // Its first line: what it inherits (written as the socket takes it).
        send(&mut s.chan, &UpgradeMessage::State { state });
        self.successor = Some(s);
        Ok(pid)
    }

    /// Asks the new master of a failed upgrade to stop (`SIGTERM`: it stops its workers); its
    /// exit comes through its pidfd.
    pub(super) fn stop_master(&mut self) {
        if let Some(s) = &self.successor {
            tracing::info!("upgrade: stopping the new master (pid {}) and its workers", s.pid);
        }
        self.signal_master(crate::signal::Signal::TERM);
    }

    /// Kills the new master of a failed upgrade, which did not stop in time.
    pub(super) fn kill_master(&mut self) {
        if let Some(s) = &self.successor {
            tracing::warn!("upgrade: the new master (pid {}) did not stop in time: killing it", s.pid);
        }
        self.signal_master(crate::signal::Signal::KILL);
    }

    fn signal_master(&mut self, signal: crate::signal::Signal) {
        if let Some(s) = &self.successor
            && let Err(e) = crate::os::sys::pidfd_send_signal(s.pidfd.as_fd(), signal)
            && e != rustix::io::Errno::SRCH
        {
            tracing::warn!("cannot signal the new master (pid {}) with {signal}: {e}", s.pid);
        }
    }

    /// Hands over to the new master: the control socket and the admin listener stop accepting
    /// here (connections open stay until answered), steering is the new master's (this one
    /// attaches nothing any more), the socket files are its to remove; then it is told.
    pub(super) fn hand_over(&mut self, pid: u32) {
        if let Some(c) = self.m.control.as_mut() {
            c.hand_over();
        }
        if let Some((a, _)) = self.m.admin.as_mut() {
            a.hand_over();
        }
        self.steering_handed_over = true;
        for b in &mut self.m.listeners {
            if let Some(f) = b.file.as_mut() {
                f.disown();
            }
        }
        match self.successor.as_mut() {
            Some(s) if s.pid == pid => send(&mut s.chan, &UpgradeMessage::Yours),
            _ => tracing::error!("upgrade: no channel to the new master (pid {pid})"),
        }
    }

    /// The new master failed before it took over: what the hand-over gave it is this
    /// master's again (the control socket and the admin listener accept here, steering and the
    /// socket files are this master's).
    pub(super) fn take_back(&mut self) {
        if let Some(c) = self.m.control.as_mut() {
            c.take_back();
        }
        if let Some((a, _)) = self.m.admin.as_mut() {
            a.take_back();
        }
        self.steering_handed_over = false;
        for b in &mut self.m.listeners {
            if let Some(f) = b.file.as_mut() {
                f.reclaim();
            }
        }
        tracing::info!("upgrade: took the control socket and steering back; this master serves on");
    }

    /// Tells the new master that this master drains now (systemd heard the new main pid).
    pub(super) fn confirm_hand_over(&mut self) {
        if let Some(s) = self.successor.as_mut() {
            send(&mut s.chan, &UpgradeMessage::Draining);
        }
    }

    /// (A new master.) Tells the old master that this master took over.
    pub(super) fn say_took_over(&mut self) {
        let Some(p) = self.predecessor.as_mut() else { return };
        if let Some(hold) = p.hold {
            // The test hook: the old master waits, this master has taken over; a test kills it
            // now (see `upgrade_env::TEST_HOLD_TAKEOVER_MS`).
            tracing::warn!(
                "upgrade: test hook {}: holding the word that this master took over for {} ms",
                upgrade_env::TEST_HOLD_TAKEOVER_MS,
                hold.as_millis()
            );
            std::thread::sleep(hold);
        }
        let slots = Some(self.sup.cluster_stats().total_workers);
        send(&mut p.chan, &UpgradeMessage::TookOver { slots });
    }

    /// (A new master.) Tells the old master why this master cannot serve.
    pub(super) fn say_cannot_serve(&mut self, reason: String) {
        tracing::error!("upgrade: this master cannot serve: {reason}");
        if let Some(p) = self.predecessor.as_mut() {
            send(&mut p.chan, &UpgradeMessage::CannotServe { reason });
        }
    }

    /// The old master's last word before it exits after a hand-over.
    pub(super) fn say_bye(&mut self) {
        if let Some(s) = self.successor.as_mut() {
            send(&mut s.chan, &UpgradeMessage::Bye);
        }
    }

    /// (A slot-by-slot upgrade.) Tells the new master that this master's worker of `slot` is
    /// gone.
    pub(super) fn free_slot(&mut self, slot: usize) {
        if let Some(s) = self.successor.as_mut() {
            send(&mut s.chan, &UpgradeMessage::Free { slot });
        }
    }

    /// (A new master, slot by slot.) Tells the old master that the worker of `slot` is ready.
    pub(super) fn say_slot_ready(&mut self, slot: usize) {
        if let Some(p) = self.predecessor.as_mut() {
            send(&mut p.chan, &UpgradeMessage::SlotReady { slot });
        }
    }

    /// (A new master.) Takes over the outside: polls the control socket and the admin listener,
    /// and the socket files it inherited are its to remove from now on.
    pub(super) fn take_over_outside(&mut self) {
        self.owns_outside = true;
        if let Some(c) = self.m.control.as_mut() {
            c.take_back();
        }
        if let Some((a, _)) = self.m.admin.as_mut() {
            a.take_back();
        }
        for f in self.m.listeners.iter_mut().filter_map(|b| b.file.as_mut()) {
            f.reclaim();
        }
        for f in self.m.leftovers.iter_mut().filter_map(|(_, f)| f.as_mut()) {
            f.reclaim();
        }
    }

    /// (A new master.) Tells the old master that the workers are ready.
    pub(super) fn say_ready(&mut self, workers: usize) {
        if let Some(p) = self.predecessor.as_mut() {
            send(&mut p.chan, &UpgradeMessage::Ready { workers });
        }
    }

    /// What the new master said.
    pub(super) fn on_successor_channel(&mut self, events: &mut VecDeque<Event>) {
        let Some(s) = self.successor.as_mut() else { return };
        if s.chan.flush().is_err() {
            s.closed = true;
        }
        let input = s.chan.read_lines(MAX_LINE);
        for line in input.lines {
            match serde_json::from_slice::<UpgradeMessage>(&line) {
                // Said just before it died? Then its exit, read next, decides: never hand over
                // to a master that is gone.
                Ok(UpgradeMessage::Ready { .. } | UpgradeMessage::TookOver { .. }) if exited(&s.pidfd) => {
                    tracing::debug!("upgrade: the new master (pid {}) spoke, but it has exited", s.pid);
                }
                Ok(UpgradeMessage::Ready { workers }) => {
                    tracing::debug!("upgrade: the new master (pid {}) has {workers} workers ready", s.pid);
                    events.push_back(Event::MasterReady);
                }
                Ok(UpgradeMessage::TookOver { slots }) => {
                    tracing::debug!("upgrade: the new master (pid {}) took over", s.pid);
                    events.push_back(Event::MasterTookOver { slots });
                }
                Ok(UpgradeMessage::CannotServe { reason }) => events.push_back(Event::MasterCannotServe { reason }),
                Ok(UpgradeMessage::Failed { reason }) => s.reason = Some(reason),
                Ok(UpgradeMessage::SlotReady { slot }) => events.push_back(Event::MasterSlotReady { slot }),
                Ok(other) => tracing::debug!("upgrade: unexpected message from the new master: {other:?}"),
                Err(e) => tracing::debug!("upgrade: unreadable message from the new master: {e}"),
            }
        }
        if input.eof || input.too_long {
            s.closed = true;
        }
    }

    /// The new master exited: reaped, and the supervisor told.
    pub(super) fn on_successor_exit(&mut self, events: &mut VecDeque<Event>) {
        let Some(s) = self.successor.as_mut() else { return };
        let status = match rustix::process::waitid(
            WaitId::PidFd(s.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => match (st.exit_status(), st.terminating_signal()) {
                (Some(code), _) => ExitStatus::Code(code),
                (None, Some(sig)) => match crate::signal::Signal::from_raw(sig) {
                    Some(sig) => ExitStatus::Signal(sig),
                    None => ExitStatus::Code(128 + sig),
                },
                (None, None) => return,
            },
            Ok(None) => return,
            Err(_) => ExitStatus::Code(255),
        };
        // Its last words first, but a master that is gone is ready for nothing: handing over
        // to it would leave no master (only why it failed still counts).
        let mut last = VecDeque::new();
        self.on_successor_channel(&mut last);
        events.extend(last.into_iter().filter(|e| {
            !matches!(e, Event::MasterReady | Event::MasterTookOver { .. } | Event::MasterSlotReady { .. })
        }));
        let Some(s) = self.successor.take() else { return };
        tracing::debug!("upgrade: the new master (pid {}) exited: {status}", s.pid);
        events.push_back(Event::MasterExited { status, reason: s.reason });
    }

    /// (A new master.) What the old master said.
    pub(super) fn on_predecessor_channel(&mut self, events: &mut VecDeque<Event>) {
        let Some(p) = self.predecessor.as_mut() else { return };
        let _ = p.chan.flush();
        let input = p.chan.read_lines(MAX_LINE);
        for line in input.lines {
            match serde_json::from_slice::<UpgradeMessage>(&line) {
                Ok(UpgradeMessage::Yours) => {
                    events.push_back(Event::HandedOver);
                    if !p.two_phase {
                        // An old master of an earlier version: it drains from now on, and told
                        // systemd the new main pid before.
                        events.push_back(Event::PredecessorDraining);
                    }
                }
                Ok(UpgradeMessage::Draining) => events.push_back(Event::PredecessorDraining),
                Ok(UpgradeMessage::Bye) => p.bye = true,
                Ok(UpgradeMessage::Free { slot }) => events.push_back(Event::SlotFreed { slot }),
                Ok(other) => tracing::debug!("upgrade: unexpected message from the old master: {other:?}"),
                Err(e) => tracing::debug!("upgrade: unreadable message from the old master: {e}"),
            }
        }
        if input.eof || input.too_long {
            let clean = p.bye;
            tracing::info!(
                "upgrade: the old master (pid {}) is gone{}",
                p.pid,
                if clean { " after its drain" } else { " without a goodbye (killed?)" }
            );
            self.predecessor = None;
            events.push_back(Event::PredecessorGone { clean });
        }
    }

    /// (A new master.) Closes the inherited sockets this master does not use: the slots beyond
    /// its own of each `ReusePort` listener, and the listeners it no longer has (their socket
    /// files are removed, if still theirs).
    pub(super) fn release_inherited(&mut self) {
        let slots = self.sup.cluster_stats().total_workers;
        let mut closed = 0;
        for b in self.m.listeners.iter_mut().filter(|b| b.balance == Balance::ReusePort) {
            for slot in slots..b.fds.len() {
                if b.fds[slot].take().is_some() {
                    b.group.leave(slot);
                    closed += 1;
                }
            }
        }
        closed += self.m.leftovers.len();
        self.m.leftovers.clear();
        if closed > 0 {
            tracing::info!("upgrade: closed {closed} inherited sockets this master does not serve");
        }
    }
}

/// (A new master.) The inherited listener `name`, if it is the same listener as `listen` (the
/// same address; port 0 takes the port it has): its sockets, its group as the kernel has it,
/// its socket file. A listener whose address changed is bound anew (the inherited one is
/// closed once the old workers are gone); one whose balance changed cannot be handed over.
pub(super) fn reuse_listener(
    inh: &mut Inherited,
    name: &str,
    listen: &super::Listen,
) -> Result<Option<super::Bound>, Error> {
    use super::ListenKind;
    let Some(pos) = inh.state.listeners.iter().position(|l| l.name == name) else { return Ok(None) };
    let l = &inh.state.listeners[pos];
    let tcp = matches!(listen.kind, ListenKind::Tcp { .. });
    let same = l.activated
        || match (&listen.kind, &l.addr) {
            (ListenKind::Tcp { addr, .. }, InheritedAddr::Tcp(a)) => {
                addr.ip() == a.ip() && (addr.port() == 0 || addr.port() == a.port())
            }
            (ListenKind::Unix { path }, InheritedAddr::Unix(p)) => path == p,
            (ListenKind::Abstract { name }, InheritedAddr::Abstract(n)) => name == n,
            _ => false,
        };
    if !same {
        return Ok(None);
    }
    let balance = if tcp && !l.activated { listen.balance } else { Balance::Shared };
    if (balance == Balance::ReusePort) != l.reuse_port {
        let was = if l.reuse_port { "reuseport" } else { "shared" };
        return Err(Error::BadListener {
            name: name.to_owned(),
            reason: format!(
                "its balance changed from {was} to {balance}: an upgrade hands the same sockets over, and cannot turn a SO_REUSEPORT group into one shared socket or back; keep the balance, or stop and start the cluster"
            ),
        });
    }
    let l = inh.state.listeners.remove(pos);
    let mut fds: Vec<Option<OwnedFd>> = Vec::new();
    for (slot, fd) in l.fds {
        let owned = inh.take(fd).ok_or_else(|| Error::BadInheritance {
            what: format!("upgrade hand-off: listener {name}'s fd {fd} was not inherited"),
        })?;
        if fds.len() <= slot {
            fds.resize_with(slot + 1, || None);
        }
        // Above the spawn's copied range, as the sockets this master binds itself: in
        // ReusePort mode there is one per slot, and each spawn would copy them all.
        fds[slot] = Some(crate::os::sys::lift(owned));
    }
    let addr = match l.addr {
        InheritedAddr::Tcp(a) => super::ListenAddr::Tcp(a),
        InheritedAddr::Unix(p) => super::ListenAddr::Unix(p),
        InheritedAddr::Abstract(n) => super::ListenAddr::Abstract(n),
    };
    let file = match (&addr, l.file) {
        (super::ListenAddr::Unix(p), Some(id)) => {
            Some(not_yet_ours(crate::os::socket::SocketFile::adopt(p.clone(), id)))
        }
        _ => None,
    };
    let group = if l.reuse_port { super::Group::with_members(l.group) } else { super::Group::default() };
    tracing::info!("upgrade: listener {name} on {addr} inherited ({} sockets)", fds.iter().flatten().count());
    Ok(Some(super::Bound {
        name: name.to_owned(),
        addr,
        balance,
        backlog: l.backlog,
        v6only: l.v6only,
        fds,
        group,
        file,
        activated: l.activated,
    }))
}

/// (A new master.) An inherited socket file stays the predecessor's until the take-over
/// ([`Driver::take_over_outside`]): a new master that is stopped before (a rollback) must
/// not remove the files its predecessor serves on.
pub(super) fn not_yet_ours(mut file: crate::os::socket::SocketFile) -> crate::os::socket::SocketFile {
    file.disown();
    file
}

/// (A new master.) The inherited admin listener, if it listens where `configured` says
/// (port 0 takes the port it has); otherwise it is left over (closed once the old workers
/// are gone).
#[allow(clippy::type_complexity, reason = "one use: adopted, or left over")]
pub(super) fn reuse_admin(
    fd: OwnedFd,
    a: InheritedAdmin,
    configured: Option<&super::ListenAddr>,
) -> Result<
    Result<(super::admin::AdminServer, super::ListenAddr), (OwnedFd, Option<crate::os::socket::SocketFile>)>,
    Error,
> {
    use super::ListenAddr;
    let file = match (&a.addr, a.file) {
        (InheritedAddr::Unix(p), Some(id)) => Some(not_yet_ours(crate::os::socket::SocketFile::adopt(p.clone(), id))),
        _ => None,
    };
    let bound = match (configured, &a.addr) {
        (Some(ListenAddr::Tcp(c)), InheritedAddr::Tcp(x))
            if c.ip() == x.ip() && (c.port() == 0 || c.port() == x.port()) =>
        {
            Some(ListenAddr::Tcp(*x))
        }
        (Some(ListenAddr::Unix(c)), InheritedAddr::Unix(x)) if c == x => Some(ListenAddr::Unix(x.clone())),
        _ => None,
    };
    match bound {
        Some(addr) => {
            let local = match &addr {
                ListenAddr::Unix(p) => p.display().to_string(),
                other => other.to_string(),
            };
            tracing::info!("upgrade: admin listener on {addr} inherited");
            let mut server = super::admin::AdminServer::adopt(fd, local, file)?;
            // The predecessor's until the take-over (see `not_yet_ours`).
            server.hand_over();
            Ok(Ok((server, addr)))
        }
        None => Ok(Err((fd, file))),
    }
}

/// (A new master.) The inherited sockets no listener of this master took (removed
/// listeners), with their socket files.
pub(super) fn unclaimed(inh: &mut Inherited) -> Vec<(OwnedFd, Option<crate::os::socket::SocketFile>)> {
    let mut out = Vec::new();
    for l in std::mem::take(&mut inh.state.listeners) {
        tracing::info!(
            "upgrade: listener {} is gone from this program's options: closed once the old workers are",
            l.name
        );
        let mut file = match (&l.addr, l.file) {
            (InheritedAddr::Unix(p), Some(id)) => {
                Some(not_yet_ours(crate::os::socket::SocketFile::adopt(p.clone(), id)))
            }
            _ => None,
        };
        for (_, fd) in l.fds {
            if let Some(owned) = inh.take(fd) {
                out.push((owned, file.take()));
            }
        }
    }
    out.extend(inh.fds.drain().map(|(_, fd)| (fd, None)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(from_start: Option<u64>) -> UpgradeEnv {
        UpgradeEnv { channel_fd: 3, from_pid: 700, from_start }
    }

    #[test]
    fn the_old_master_must_be_the_parent_that_started_unless_it_is_gone() {
        // Its child, the very process: a new master.
        assert_eq!(parent_check(&env(Some(55)), Some(700), Some(55)), Ok(false));
        // An old master of an earlier version says no start time: the parent's pid decides.
        assert_eq!(parent_check(&env(None), Some(700), Some(55)), Ok(false));
        // The parent has the pid but started at another time: another process got the pid.
        let e = parent_check(&env(Some(55)), Some(700), Some(99)).unwrap_err();
        assert!(e.contains("another process has its pid"), "{e}");
        // The parent died between the two reads (a zombie has no start time): gone.
        assert_eq!(parent_check(&env(Some(55)), Some(700), None), Ok(true));
        // Not the parent (any more): only a channel at its end will do, whatever runs at the pid
        // (an old master still exiting shows its start time while its children are reparented).
        assert_eq!(parent_check(&env(Some(55)), Some(1), None), Ok(true));
        assert_eq!(parent_check(&env(Some(55)), Some(1), Some(55)), Ok(true));
        assert_eq!(parent_check(&env(None), Some(1), Some(55)), Ok(true));
    }

    #[test]
    fn a_channel_is_at_its_end_only_once_the_other_end_is_closed_and_read() {
        let short = std::time::Duration::from_millis(50);
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!at_end(&a, short), "open, nothing to read");
        use std::io::Write;
        (&b).write_all(b"x").unwrap();
        drop(b);
        assert!(!at_end(&a, short), "a byte is still to be read");
        let mut byte = [0u8; 1];
        use std::io::Read;
        (&a).read_exact(&mut byte).unwrap();
        assert!(at_end(&a, short));
        // The other end closed a moment later: waited for.
        let (a, b) = UnixStream::pair().unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(b);
        });
        assert!(at_end(&a, std::time::Duration::from_secs(10)));
        closer.join().unwrap();
    }

    #[test]
    fn the_channel_peer_must_be_this_user() {
        use std::os::fd::AsRawFd;
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(same_user(a.as_raw_fd()), Ok(()));
        assert!(same_user(9999).unwrap_err().contains("not open"));
    }
}
