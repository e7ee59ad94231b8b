//! Upgrading the master in place, the driver's side: the old master starts the new one (the
//! program at its original path, with every listening socket, the control socket, the admin
//! listener and the state it inherits) and carries out the hand-over; the new master finds its
//! inheritance at `init` and talks to its predecessor over the upgrade channel. Every decision
//! is the supervisor's (`supervisor/upgrade.rs`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command as Process, Stdio};

use command_fds::{CommandFdExt, FdMapping};
use rustix::process::{Pid, PidfdFlags, WaitId, WaitIdOptions};

use super::Balance;
use super::driver::Driver;
use crate::error::Error;
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
/// (`SO_PEERCRED`), as for workers; otherwise they are stale (a program the master runs
/// inherited them) and ignored. They are removed from the environment either way, and every
/// descriptor taken is made close-on-exec.
pub(crate) fn inherited() -> Result<Option<Inherited>, Error> {
    if std::env::var_os(upgrade_env::CHANNEL_FD).is_none() {
        return Ok(None);
    }
    let get = |k: &str| std::env::var_os(k);
    let num = |k: &str| get(k).and_then(|v| v.to_str().and_then(|s| s.parse::<u32>().ok()));
    let real = match (num(upgrade_env::CHANNEL_FD).and_then(|fd| i32::try_from(fd).ok()), num(upgrade_env::FROM_PID)) {
        (Some(fd), Some(pid)) => crate::os::socket::check_channel_peer(fd, pid),
        _ => Err("the upgrade variables are garbled".to_owned()),
    };
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
    let mut fds = HashMap::new();
    for fd in state.fds() {
        fds.insert(fd, take(fd)?);
    }
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(env.from_pid) {
        tracing::warn!(
            "upgrade: the old master (pid {}) is gone already; this master takes over once it starts",
            env.from_pid
        );
    }
    Ok(Some(Inherited { channel, from_pid: env.from_pid, state, fds }))
}

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
}

impl Predecessor {
    pub(super) fn new(channel: UnixStream, pid: u32) -> io::Result<Predecessor> {
        Ok(Predecessor { pid, chan: LineIo::new(channel)?, bye: false })
    }
}

fn send(chan: &mut LineIo, message: &UpgradeMessage) {
    if let Ok(mut line) = serde_json::to_vec(message) {
        line.push(b'\n');
        let _ = chan.send(&line);
        let _ = chan.flush();
    }
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
        let mut mappings = vec![FdMapping { parent_fd: theirs.into(), child_fd: FIRST_LISTEN_FD }];
        let mut next = FIRST_LISTEN_FD + 1;
        let mut place = |fd: &OwnedFd, mappings: &mut Vec<FdMapping>| -> io::Result<i32> {
            mappings.push(FdMapping { parent_fd: fd.try_clone()?, child_fd: next });
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
        };
        let (path, argv) = &self.m.origin;
        let mut cmd = Process::new(path);
        if let Some((argv0, args)) = argv.split_first() {
            cmd.arg0(argv0).args(args);
        }
        // The sockets systemd passed come by the hand-off; WATCHDOG_PID named this master.
        for key in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"]
            .into_iter()
            .chain(crate::proto::handoff::env::ALL)
        {
            cmd.env_remove(key);
        }
        cmd.env(upgrade_env::CHANNEL_FD, FIRST_LISTEN_FD.to_string())
            .env(upgrade_env::FROM_PID, self.master_pid.as_raw_nonzero().to_string())
            .stdin(Stdio::null());
        cmd.fd_mappings(mappings).map_err(|e| io::Error::other(e.to_string()))?;
        crate::os::sys::set_master_child_setup(&mut cmd, next as u32);
        // A file just put at the path may be busy for a moment (a process forked while it was
        // open for writing holds that descriptor until its own exec): a few short retries.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries < 10 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => {
                    break other
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.m.origin.0.display())))?;
                }
            }
        };
        let pid = child.id();
        let tracked = Pid::from_raw(pid as i32)
            .ok_or_else(|| io::Error::other("spawn returned pid 0"))
            .and_then(|raw| rustix::process::pidfd_open(raw, PidfdFlags::empty()).map_err(io::Error::from))
            .and_then(|pidfd| Ok(Successor { pid, pidfd, chan: LineIo::new(ours)?, closed: false, reason: None }));
        match tracked {
            Ok(mut s) => {
                // Its first line: what it inherits (written as the socket takes it).
                send(&mut s.chan, &UpgradeMessage::State { state });
                self.successor = Some(s);
                Ok(pid)
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Kills the new master of a failed upgrade (its exit comes through its pidfd).
    pub(super) fn kill_master(&mut self) {
        if let Some(s) = &self.successor
            && let Err(e) = crate::os::sys::pidfd_send_signal(s.pidfd.as_fd(), crate::signal::Signal::KILL)
            && e != rustix::io::Errno::SRCH
        {
            tracing::warn!("cannot kill the new master (pid {}): {e}", s.pid);
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
                Ok(UpgradeMessage::Ready { workers }) => {
                    // Said just before it died? Then its exit, read next, decides: never hand
                    // over to a master that is gone.
                    let gone = matches!(
                        rustix::process::waitid(
                            WaitId::PidFd(s.pidfd.as_fd()),
                            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
                        ),
                        Ok(Some(_))
                    );
                    if gone {
                        tracing::debug!("upgrade: the new master (pid {}) said ready, but it has exited", s.pid);
                    } else {
                        tracing::debug!("upgrade: the new master (pid {}) has {workers} workers ready", s.pid);
                        events.push_back(Event::MasterReady);
                    }
                }
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
        events.extend(last.into_iter().filter(|e| !matches!(e, Event::MasterReady | Event::MasterSlotReady { .. })));
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
                Ok(UpgradeMessage::Yours) => events.push_back(Event::HandedOver),
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
        fds[slot] = Some(owned);
    }
    let addr = match l.addr {
        InheritedAddr::Tcp(a) => super::ListenAddr::Tcp(a),
        InheritedAddr::Unix(p) => super::ListenAddr::Unix(p),
        InheritedAddr::Abstract(n) => super::ListenAddr::Abstract(n),
    };
    let file = match (&addr, l.file) {
        (super::ListenAddr::Unix(p), Some(id)) => Some(crate::os::socket::SocketFile::adopt(p.clone(), id)),
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
        (InheritedAddr::Unix(p), Some(id)) => Some(crate::os::socket::SocketFile::adopt(p.clone(), id)),
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
            Ok(Ok((super::admin::AdminServer::adopt(fd, local, file)?, addr)))
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
            (InheritedAddr::Unix(p), Some(id)) => Some(crate::os::socket::SocketFile::adopt(p.clone(), id)),
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
