//! The master's loop: feeds events to the supervisor at the current time, carries out the
//! commands it returns, and sleeps in its epoll set (every source registered once: see
//! ARCHITECTURE.md, "The loop: epoll with registration") until something happens or a
//! deadline passes.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::time::{Instant, SystemTime};

use rustix::process::{Pid, WaitId, WaitIdOptions};

use super::Balance;
use super::channel::MasterEnd;
use super::control::{ConnId, ControlServer};
use super::notify::Notifier;
use super::steer::Group;
use super::{Master, Request, Snapshot};
use crate::error::Error;
use crate::os::epoll::{Interest, Poller};
use crate::proto::channel::{ToMaster, ToWorker};
use crate::proto::control::LogStream;
use crate::stats::{ClusterStats, ExitStatus, WorkerStats};
use crate::supervisor::{Command, Event, Outcome, Supervisor, WorkerKey};

/// A running worker process as the driver sees it.
pub(super) struct Proc {
    pub(super) slot: usize,
    pub(super) pid: u32,
    pub(super) pidfd: OwnedFd,
    /// Its channel (none for the workers of a command cluster, which speak `sd_notify`).
    pub(super) chan: Option<MasterEnd>,
    /// Taken for ready at this time (a command cluster's `ready_after`).
    pub(super) ready_at: Option<Instant>,
    /// What it last said in a `STATUS=` notification.
    pub(super) status_text: Option<String>,
    /// The master's ends of its stdout and stderr pipes (captured output), until the capture
    /// takes them.
    pub(super) output: Option<(OwnedFd, OwnedFd)>,
}

/// The driver's state: the master's resources, the supervisor, and the processes it started.
pub(super) struct Driver {
    pub(super) m: Master,
    pub(super) sup: Supervisor,
    pub(super) procs: HashMap<WorkerKey, Proc>,
    /// Open program files of deploys, by restart number.
    pub(super) programs: HashMap<u64, OwnedFd>,
    pub(super) master_pid: Pid,
    pub(super) outcome: Option<Outcome>,
    /// Control connections waiting for a restart's outcome, by ticket.
    pub(super) control_waiters: HashMap<u64, ConnId>,
    /// Control connections waiting for an upgrade to start (`false`) or end (`true`), by ticket.
    pub(super) upgrade_waiters: HashMap<u64, (ConnId, bool)>,
    /// The slots new connections go to (`ReusePort` listeners).
    pub(super) route: Vec<usize>,
    /// The supervisor ended steering for good ([`Command::Unsteer`] `for_good`).
    pub(super) steering_failed: bool,
    /// The new master of an upgrade this master started (until it exits).
    pub(super) successor: Option<super::upgrade::Successor>,
    /// (A master started by an upgrade.) The old master, until its channel ends.
    pub(super) predecessor: Option<super::upgrade::Predecessor>,
    /// This master handed over: steering is the new master's.
    pub(super) steering_handed_over: bool,
    /// It polls the control socket and the admin listener (a master started by an upgrade
    /// only once it took over).
    pub(super) owns_outside: bool,
    /// When the handles' statistics were last published, and what they were of.
    pub(super) published: Option<Published>,
    /// The listeners' accept queues as last read for publishing, and when.
    pub(super) listeners_read: Option<(Instant, Vec<Option<u64>>)>,
    /// What the loop sleeps on.
    pub(super) watch: Watch,
}

/// What the loop sleeps on: the epoll set with every source registered once (see
/// [`Driver::poll`]), and the driver's own timers.
pub(super) struct Watch {
    poller: Poller,
    /// The tokens of the sources other than workers that the last sweep registered
    /// ([`Driver::watch_outside`]), in order.
    outside: Vec<u64>,
    /// What the last wait found ready (kept for its room).
    ready: Vec<u64>,
    /// A command cluster's workers taken for ready after a delay (`ready_after`), by that time.
    ready_timers: BTreeSet<(Instant, WorkerKey)>,
}

impl Watch {
    pub(super) fn new() -> std::io::Result<Watch> {
        Ok(Watch { poller: Poller::new()?, outside: Vec::new(), ready: Vec::new(), ready_timers: BTreeSet::new() })
    }
}

/// A publication of the statistics for handles: when, and the supervisor's
/// [`revision`](Supervisor::revision) then.
pub(super) struct Published {
    at: Instant,
    revision: (u64, u64),
}

/// How soon after a publication the statistics are published again when only heartbeats and
/// request counts moved (every worker beats once a second: publishing at each beat would cost
/// O(N) per beat, O(N²) a second); see [`Driver::publish_window`].
const PUBLISH_BEATS: std::time::Duration = std::time::Duration::from_secs(1);

/// What a polled descriptor belongs to; registered under [`Source::token`]. A token names one
/// descriptor for its whole life: worker keys and connection ids are never reused, and the
/// masters of an upgrade are told apart by pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Signals,
    Wake,
    Exit(WorkerKey),
    Channel(WorkerKey),
    ControlListener,
    Control(ConnId),
    AdminListener,
    Admin(super::admin::AdminConnId),
    WorkerNotify,
    /// The new master of an upgrade (by pid): its channel, and its pidfd.
    Successor(u32),
    SuccessorExit(u32),
    /// (A master started by an upgrade.) The old master's channel (by pid).
    Predecessor(u32),
    /// A worker's stdout or stderr pipe (captured output).
    Output(WorkerKey, LogStream),
}

/// Where a token's kind is (its top byte); the rest is the id.
const KIND_SHIFT: u32 = 56;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;

impl Source {
    fn token(self) -> u64 {
        let (kind, id): (u64, u64) = match self {
            Source::Signals => (1, 0),
            Source::Wake => (2, 0),
            Source::Exit(key) => (3, key.0),
            Source::Channel(key) => (4, key.0),
            Source::ControlListener => (5, 0),
            Source::Control(id) => (6, id),
            Source::AdminListener => (7, 0),
            Source::Admin(id) => (8, id),
            Source::WorkerNotify => (9, 0),
            Source::Successor(pid) => (10, pid.into()),
            Source::SuccessorExit(pid) => (11, pid.into()),
            Source::Predecessor(pid) => (12, pid.into()),
            Source::Output(key, LogStream::Stdout) => (13, key.0),
            Source::Output(key, LogStream::Stderr) => (14, key.0),
        };
        debug_assert!(id <= ID_MASK, "ids stay far below 2^56");
        kind << KIND_SHIFT | id & ID_MASK
    }

    fn of(token: u64) -> Option<Source> {
        let id = token & ID_MASK;
        let pid = || u32::try_from(id).ok();
        Some(match token >> KIND_SHIFT {
            1 => Source::Signals,
            2 => Source::Wake,
            3 => Source::Exit(WorkerKey(id)),
            4 => Source::Channel(WorkerKey(id)),
            5 => Source::ControlListener,
            6 => Source::Control(id),
            7 => Source::AdminListener,
            8 => Source::Admin(id),
            9 => Source::WorkerNotify,
            10 => Source::Successor(pid()?),
            11 => Source::SuccessorExit(pid()?),
            12 => Source::Predecessor(pid()?),
            13 => Source::Output(WorkerKey(id), LogStream::Stdout),
            14 => Source::Output(WorkerKey(id), LogStream::Stderr),
            _ => return None,
        })
    }
}

impl Driver {
    pub(super) fn run(&mut self) -> Result<(), Error> {
        if let Some(first) = self.m.listeners.first() {
            tracing::info!(
                "master {} starting {} workers on {} ({} balance)",
                self.master_pid.as_raw_nonzero(),
                self.m.policy.workers,
                first.addr,
                first.balance
            );
        }
        for b in &self.m.listeners {
            tracing::info!("listener {} on {} ({} balance)", b.name, b.addr, b.balance);
        }
        if let Some(c) = &mut self.m.capture {
            c.start();
        }
        if self.m.signals.reaps_orphans {
            // Zombies that arrived before our SIGCHLD handler existed.
            self.reap_orphans();
        }
        let mut events = VecDeque::from([Event::Tick]);
        loop {
            self.process(&mut events);
            // New entries for the event streams (also the last ones, before the loop ends).
            if let Some(ctl) = self.m.control.as_mut() {
                ctl.feed_streams(self.sup.history());
            }
            let now = Instant::now();
            if self.outcome.is_some() || self.publish_window(now).is_some_and(|(from, _)| from <= now) {
                self.publish(now);
            }
            match self.outcome.take() {
                Some(Outcome::Stopped) => return Ok(()),
                Some(Outcome::Upgraded) => {
                    tracing::info!("upgrade: this master's workers have drained; it exits");
                    self.say_bye();
                    return Ok(());
                }
                Some(Outcome::AllFailed { workers, disabled, crashed }) => {
                    return Err(Error::WorkersFailed { workers, disabled, crashed });
                }
                None => {}
            }
            self.poll(&mut events)?;
            events.push_back(Event::Tick);
        }
    }

    /// Feeds events to the supervisor and carries out its commands, which may produce more events.
    fn process(&mut self, events: &mut VecDeque<Event>) {
        while let Some(ev) = events.pop_front() {
            for cmd in self.sup.handle(ev, Instant::now(), SystemTime::now()) {
                self.execute(cmd, events);
            }
            self.take_events();
        }
    }

    /// The event history's entries of the last decision, once carried out: to the event log,
    /// the handles' copy and the `on_event` callback (the control socket's streams read the
    /// supervisor's ring).
    fn take_events(&mut self) {
        let fresh = self.sup.fresh_events();
        if fresh.is_empty() {
            return;
        }
        if let Some(log) = self.m.event_log.as_mut() {
            log.append(fresh);
        }
        self.m.shared.events.lock().unwrap_or_else(|e| e.into_inner()).extend(fresh);
        for e in fresh {
            guard("on_event", self.m.on_event.as_mut(), |f| f(e));
        }
    }

    /// Carries out one command; what it could not do, or what it started, comes back as events.
    fn execute(&mut self, cmd: Command, events: &mut VecDeque<Event>) {
        match cmd {
            Command::Spawn { slot, key, program, request_limit } => match self.spawn(slot, program, request_limit) {
                Ok(p) => self.started(key, p, events),
                Err(e) => events.push_back(Event::SpawnFailed { key, error: e.to_string() }),
            },
            Command::Signal { key, signal } => {
                if let Some(p) = self.procs.get(&key) {
                    // ESRCH: it already exited and its pidfd will say so; nothing to do.
                    if let Err(e) = crate::os::sys::pidfd_send_signal(p.pidfd.as_fd(), signal)
                        && e != rustix::io::Errno::SRCH
                    {
                        tracing::warn!("cannot signal worker {} (pid {}): {e}", p.slot, p.pid);
                    }
                }
            }
            Command::Route { slots } => {
                self.route = slots;
                self.apply_route(events);
            }
            Command::CloseSocket { slot } => {
                let mut closed = 0;
                for b in self.m.listeners.iter_mut().filter(|b| b.balance == Balance::ReusePort) {
                    if let Some(fd) = b.fds.get_mut(slot).and_then(Option::take) {
                        drop(fd);
                        b.group.leave(slot);
                        closed += 1;
                    }
                }
                match closed {
                    0 => {}
                    1 => tracing::info!("closed the listening socket of worker {slot}: nobody serves it any more"),
                    n => tracing::info!(
                        "closed the listening socket of worker {slot} on each of {n} listeners: nobody serves them any more"
                    ),
                }
            }
            Command::CloseListeners => {
                for b in &mut self.m.listeners {
                    b.fds.clear();
                    b.group = Group::default();
                }
            }
            Command::Unsteer { for_good } => self.unsteer(for_good),
            Command::ReleaseProgram { deploy } => {
                self.programs.remove(&deploy);
            }
            Command::SampleMemory => {
                let measure = self.m.memory_measure;
                let readings =
                    self.procs.iter().filter_map(|(key, p)| Some((*key, read_memory(p.pid, measure)?))).collect();
                events.push_back(Event::MemorySampled {
                    readings,
                    headroom: crate::os::procfs::cgroup_memory_headroom(),
                });
            }
            Command::Diagnose { key } => {
                if let Some(p) = self.procs.get(&key) {
                    tracing::warn!("worker {} (pid {}) is hung: {}", p.slot, p.pid, crate::os::procfs::diagnose(p.pid));
                }
            }
            Command::RunSignalAction { signal } => self.run_signal_action(signal),
            Command::ReapOrphans => self.reap_orphans(),
            Command::Notify(n) => self.notify(n),
            Command::Report(r) => self.report(r),
            Command::Exit(outcome) => self.outcome = Some(outcome),
            Command::SpawnMaster { slot_by_slot } => match self.spawn_master(slot_by_slot) {
                Ok(pid) => events.push_back(Event::MasterSpawned { pid }),
                Err(e) => events.push_back(Event::MasterSpawnFailed {
                    busy: e.kind() == std::io::ErrorKind::ExecutableFileBusy,
                    error: e.to_string(),
                }),
            },
            Command::StopMaster => self.stop_master(),
            Command::KillMaster => self.kill_master(),
            Command::HandOver { pid } => self.hand_over(pid),
            Command::TakeBack => self.take_back(),
            Command::ConfirmHandOver => self.confirm_hand_over(),
            Command::SayReady { workers } => self.say_ready(workers),
            Command::SayTookOver => self.say_took_over(),
            Command::SayCannotServe { reason } => self.say_cannot_serve(reason),
            Command::FreeSlot { slot } => self.free_slot(slot),
            Command::SaySlotReady { slot } => self.say_slot_ready(slot),
            Command::TakeOver => self.take_over_outside(),
            Command::ReleaseInherited => self.release_inherited(),
        }
        // A socket joined or left the group: the steering program indexes the kernel's array
        // of the group, so it is attached again.
        let mut changed = false;
        for b in &mut self.m.listeners {
            changed |= b.group.take_changed();
        }
        if changed {
            self.apply_route(events);
        }
    }
}

impl Driver {
    /// A worker process was started: its pidfd, channel and pipes join the epoll set, once for
    /// its whole life. One that cannot be watched would not be supervised: it is killed, and
    /// its spawn failed.
    fn started(&mut self, key: WorkerKey, mut p: Proc, events: &mut VecDeque<Event>) {
        let output = p.output.take().filter(|_| self.m.capture.is_some());
        let poller = &mut self.watch.poller;
        let watched = watch_proc(poller, key, &p).and_then(|()| {
            let Some((out, err)) = &output else { return Ok(()) };
            poller.set(Source::Output(key, LogStream::Stdout).token(), out.as_fd(), Interest::READ)?;
            poller.set(Source::Output(key, LogStream::Stderr).token(), err.as_fd(), Interest::READ)
        });
        if let Err(e) = watched {
            unwatch_proc(poller, key, &p);
            if let Some((out, err)) = &output {
                poller.remove(Source::Output(key, LogStream::Stdout).token(), out.as_fd());
                poller.remove(Source::Output(key, LogStream::Stderr).token(), err.as_fd());
            }
            kill_and_reap(p.pidfd.as_fd());
            let error = format!("started as pid {}, but the master cannot watch it (epoll: {e}); killed it", p.pid);
            events.push_back(Event::SpawnFailed { key, error });
            return;
        }
        if let (Some(c), Some(output)) = (self.m.capture.as_mut(), output) {
            c.add(key, p.slot, p.pid, output);
        }
        if let Some(t) = p.ready_at {
            self.watch.ready_timers.insert((t, key));
        }
        events.push_back(Event::Spawned { key, pid: p.pid });
        self.procs.insert(key, p);
    }

    /// A worker process is gone (reaped, or reaped elsewhere): out of the epoll set (its
    /// pipes stay, drained by the capture), its timer and the table.
    fn forget_proc(&mut self, key: WorkerKey) {
        let Some(p) = self.procs.remove(&key) else { return };
        unwatch_proc(&mut self.watch.poller, key, &p);
        if let Some(t) = p.ready_at {
            self.watch.ready_timers.remove(&(t, key));
        }
        if let Some(c) = &mut self.m.capture {
            c.exited(key, Instant::now());
        }
    }

    /// The interest of worker `key`'s channel, after the loop read or answered it: input
    /// while it is not held back, output while answers wait; none once it is closed.
    fn watch_channel(&mut self, key: WorkerKey) {
        let Some(chan) = self.procs.get(&key).and_then(|p| p.chan.as_ref()) else { return };
        let token = Source::Channel(key).token();
        if chan.closed {
            self.watch.poller.remove(token, chan.io.sock.as_fd());
        } else if let Err(e) = self.watch.poller.set(token, chan.io.sock.as_fd(), channel_interest(chan)) {
            // (Only ENOMEM: the interest it had stays, and the next read tries again.)
            tracing::warn!("cannot change what the master waits for on worker channel {key:?}: {e}");
        }
    }

    /// The pipes the capture closed: out of the epoll set, then closed.
    fn unwatch_closed_pipes(&mut self) {
        let Some(c) = self.m.capture.as_mut() else { return };
        for ((key, stream), fd) in c.take_closed() {
            self.watch.poller.remove(Source::Output(key, stream).token(), fd.as_fd());
        }
    }

    /// Registers (or updates) every source other than the workers, once per wake-up: the
    /// signal pipe, the wake-up eventfd, a command cluster's notification socket, the masters of
    /// an upgrade, the control socket and the admin listener with their connections (at most
    /// [`MAX_CONNECTIONS`](super::admin::MAX_CONNECTIONS) and 64: bounded, whatever the number
    /// of workers). A source that exists but is not to be polled now is taken out; one that is
    /// gone since the last sweep closed its descriptor, which took it out of the set: it is
    /// forgotten.
    fn watch_outside(&mut self, now: Instant) -> Result<(), Error> {
        let poller = &mut self.watch.poller;
        let mut seen = Vec::with_capacity(self.watch.outside.len());
        // (A token whose change failed is still seen: what it had stays registered.)
        let mut keep = |source: Source, fd: BorrowedFd<'_>, interest: Interest| {
            let token = source.token();
            seen.push(token);
            poller.set(token, fd, interest)
        };
        keep(Source::Signals, self.m.signals.read.as_fd(), Interest::READ)
            .map_err(Error::io("cannot watch the master's signal pipe"))?;
        keep(Source::Wake, self.m.shared.wake.as_fd(), Interest::READ)
            .map_err(Error::io("cannot watch the master's wake-up eventfd"))?;
        if let Some((_, notify)) = &self.m.command {
            keep(Source::WorkerNotify, notify.socket(), Interest::READ)
                .map_err(Error::io("cannot watch the workers' notification socket"))?;
        }
        let mut failed: Vec<(Source, std::io::Error)> = Vec::new();
        let mut unwatch: Vec<(Source, BorrowedFd<'_>)> = Vec::new();
        let mut try_keep = |source: Source, fd: BorrowedFd<'_>, interest: Interest| {
            if let Err(e) = keep(source, fd, interest) {
                failed.push((source, e));
            }
        };
        if let Some(s) = &self.successor {
            try_keep(Source::SuccessorExit(s.pid), s.pidfd.as_fd(), Interest::READ);
            // Once its end is closed nothing is polled (a program that closed the channel but
            // runs on would keep a socket in error readable for ever): its pidfd tells the rest.
            if s.closed {
                unwatch.push((Source::Successor(s.pid), s.chan.sock.as_fd()));
            } else {
                let interest = Interest { read: true, write: s.chan.wants_write() };
                try_keep(Source::Successor(s.pid), s.chan.sock.as_fd(), interest);
            }
        }
        if let Some(p) = &self.predecessor {
            let interest = Interest { read: true, write: p.chan.wants_write() };
            try_keep(Source::Predecessor(p.pid), p.chan.sock.as_fd(), interest);
        }
        if let Some(ctl) = &self.m.control {
            let owns = self.owns_outside;
            if owns && ctl.accepting() {
                try_keep(Source::ControlListener, ctl.listener().as_fd(), Interest::READ);
            } else {
                unwatch.push((Source::ControlListener, ctl.listener().as_fd()));
            }
            // A connection is not read after EOF, nor while its previous answers are unwritten.
            for (id, sock, read, write) in ctl.sockets() {
                if owns && (read || write) {
                    try_keep(Source::Control(id), sock.as_fd(), Interest { read, write });
                } else {
                    unwatch.push((Source::Control(id), sock.as_fd()));
                }
            }
        }
        if let Some((admin, _)) = &self.m.admin {
            let owns = self.owns_outside;
            if owns && admin.accepting(now) {
                try_keep(Source::AdminListener, admin.listener(), Interest::READ);
            } else {
                unwatch.push((Source::AdminListener, admin.listener()));
            }
            // (Polled also with neither: its hang-up or error is reported.)
            for (id, sock, read, write) in admin.sockets() {
                if owns {
                    try_keep(Source::Admin(id), sock, Interest { read, write });
                } else {
                    unwatch.push((Source::Admin(id), sock));
                }
            }
        }
        for (source, fd) in unwatch {
            poller.remove(source.token(), fd);
        }
        for (source, e) in failed {
            tracing::warn!("cannot watch {source:?} (epoll: {e}); trying again at the next wake-up");
        }
        seen.sort_unstable();
        for &token in &self.watch.outside {
            if seen.binary_search(&token).is_err() {
                poller.forget(token);
            }
        }
        self.watch.outside = seen;
        Ok(())
    }

    /// A registration outlived its source (the descriptor was closed while a duplicate of it
    /// lives on somewhere, so the kernel kept it, and it cannot be taken out by number any
    /// more): a new epoll set with every source registered again. O(N), and never expected.
    fn rewatch(&mut self) -> Result<(), Error> {
        tracing::debug!("the epoll set reported a source that is gone; registering every source in a new set");
        self.watch.poller.reset().map_err(Error::io("cannot create the master's epoll set"))?;
        self.watch.outside.clear();
        let poller = &mut self.watch.poller;
        for (key, p) in &self.procs {
            watch_proc(poller, *key, p).map_err(Error::io("cannot watch a worker again"))?;
        }
        for ((key, stream), fd) in self.m.capture.iter().flat_map(super::capture::Capture::fds) {
            poller
                .set(Source::Output(key, stream).token(), fd.as_fd(), Interest::READ)
                .map_err(Error::io("cannot watch a worker's output again"))?;
        }
        // The others at the next sweep.
        Ok(())
    }

    /// The statistics now, with each worker's resource figures from `/proc` (one file read
    /// per worker): O(N), once.
    pub(super) fn stats_now(&self) -> (ClusterStats, Vec<WorkerStats>) {
        let (mut cluster, mut workers) = (self.sup.cluster_stats(), self.sup.worker_stats(Instant::now()));
        cluster.listeners = self.listener_stats();
        cluster.log_lines_dropped = self.m.capture.as_ref().map_or(0, super::capture::Capture::dropped);
        // (Only command clusters' workers say a `STATUS=`.)
        let texts: HashMap<u32, &str> =
            self.procs.values().filter_map(|p| Some((p.pid, p.status_text.as_deref()?))).collect();
        if !texts.is_empty() {
            for w in &mut workers {
                w.notify_status = w.pid.and_then(|pid| texts.get(&pid)).map(|t| (*t).to_owned());
            }
        }
        crate::os::procfs::add_usage(&mut cluster, &mut workers);
        (cluster, workers)
    }

    /// The cluster's Prometheus metrics, labelled with the cluster's name (several clusters'
    /// files can share a collector).
    pub(super) fn metrics_text(&self) -> String {
        let (cluster, workers) = self.stats_now();
        let name = format!("{}-{}", self.m.name, self.m.shared.addr.port());
        crate::proto::metrics::render_labeled(&cluster, &workers, &[("cluster", &name)])
    }

    /// A probe's verdict, and what it is based on (for a person).
    pub(super) fn probe(&self, probe: crate::proto::control::Probe) -> (bool, String) {
        use crate::proto::control::Probe;
        let p = self.sup.probes();
        let c = self.sup.cluster_stats();
        match probe {
            Probe::Live if p.live => {
                (true, format!("supervising: {} of {} workers active", c.active_workers, c.total_workers))
            }
            Probe::Live => (
                false,
                format!(
                    "no worker can run: {} of {} slots disabled, {} crashed",
                    c.disabled_workers, c.total_workers, c.crashed_workers
                ),
            ),
            Probe::Ready => {
                let needed = self.sup.policy().min_ready.max(1);
                let base =
                    format!("{} of {} workers ready (at least {needed} needed)", c.active_workers, c.total_workers);
                if c.shutdown_requested { (false, format!("shutting down; {base}")) } else { (p.ready, base) }
            }
            Probe::Startup if p.started => (true, "the start-up completed".into()),
            Probe::Startup => (false, format!("starting: {} of {} workers ready", c.active_workers, c.total_workers)),
        }
    }

    /// The listeners, with the accept-queue length of the TCP ones.
    pub(super) fn listener_stats(&self) -> Vec<crate::stats::ListenerStats> {
        super::listener_stats(&self.m.listeners)
    }

    /// When the statistics for handles and module functions should be published, if they
    /// changed since the last time: from when, and by when the loop wakes up for it. At the
    /// end of this wake-up when the supervisor handled an event in full (so a callback, or
    /// another thread, reads them as of the last wake-up that changed anything, as before).
    /// When only heartbeats and counts moved, at the first wake-up [`PUBLISH_BEATS`] after the
    /// last publication (heartbeats come about that often: publishing needs no wake-up of its
    /// own), and twice that after it at the latest.
    fn publish_window(&self, now: Instant) -> Option<(Instant, Instant)> {
        let Some(p) = &self.published else { return Some((now, now)) };
        let (changes, beats) = self.sup.revision();
        if changes != p.revision.0 {
            Some((now, now))
        } else if beats != p.revision.1 {
            Some((p.at + PUBLISH_BEATS, p.at + 2 * PUBLISH_BEATS))
        } else {
            None
        }
    }

    /// Publishes the statistics for handles and module functions (O(N): every slot's figures),
    /// with the listeners' accept queues read at most every [`PUBLISH_BEATS`] (one `TCP_INFO`
    /// per socket: N of them with `ReusePort`; re-reading them whenever a slot's socket opened
    /// or closed made every respawn O(N) system calls: bench/scale). Their socket counts are
    /// always current.
    fn publish(&mut self, now: Instant) {
        let queues = match &self.listeners_read {
            Some((at, q))
                if q.len() == self.m.listeners.len() && now.saturating_duration_since(*at) < PUBLISH_BEATS =>
            {
                q.clone()
            }
            _ => {
                let q = super::accept_queues(&self.m.listeners);
                self.listeners_read = Some((now, q.clone()));
                q
            }
        };
        let mut cluster = self.sup.cluster_stats();
        cluster.listeners = super::listener_stats_with(&self.m.listeners, &queues);
        cluster.log_lines_dropped = self.m.capture.as_ref().map_or(0, super::capture::Capture::dropped);
        let snap = Snapshot { cluster, workers: self.sup.worker_stats(now), taken: now };
        *self.m.shared.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snap;
        self.published = Some(Published { at: now, revision: self.sup.revision() });
    }

    /// Sleeps until something happens or the supervisor's deadline passes; queues what happened.
    ///
    /// One `epoll_wait` over a set where every source was registered once (a worker's pidfd,
    /// channel and pipes when it starts, out when it is gone): no work per wake-up for the
    /// sources that did nothing, so an event costs the same with 1 worker or 1024. Only the
    /// bounded sources outside the workers are looked at each time ([`Driver::watch_outside`]).
    fn poll(&mut self, events: &mut VecDeque<Event>) -> Result<(), Error> {
        self.watch_outside(Instant::now())?;
        let now = Instant::now();
        let deadline = [
            self.sup.next_deadline(),
            self.m.control.as_ref().and_then(ControlServer::next_deadline),
            self.m.admin.as_ref().and_then(|(a, _)| a.next_deadline()),
            self.watch.ready_timers.first().map(|(t, _)| *t),
            self.m.notify.as_ref().and_then(Notifier::watchdog_due),
            self.m.capture.as_ref().and_then(super::capture::Capture::next_deadline),
            self.publish_window(now).map(|(_, by)| by),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = deadline.map(|d| d.saturating_duration_since(now));
        let mut ready = std::mem::take(&mut self.watch.ready);
        self.watch.poller.wait(timeout, &mut ready).map_err(Error::io("epoll_wait failed in the master loop"))?;
        let mut stale = false;
        // Channels first: a worker's last messages come before its exit; its output too. (Its
        // exit also reads them first: the wait may report the exit before them.)
        for &token in &ready {
            if self.watch.poller.is_stale(token) {
                stale = true;
                continue;
            }
            match Source::of(token) {
                Some(Source::Channel(key)) => self.on_channel(key, events),
                Some(Source::Output(key, stream)) => self.on_output(key, stream),
                _ => {}
            }
        }
        for &token in &ready {
            if self.watch.poller.is_stale(token) {
                continue;
            }
            match Source::of(token) {
                Some(Source::Signals) => self.on_signals(events),
                Some(Source::Wake) => self.on_wake(events),
                Some(Source::Exit(key)) => self.on_exit(key, events),
                Some(Source::Channel(_) | Source::Output(..)) | None => {}
                Some(Source::ControlListener) => {
                    if let Some(ctl) = &mut self.m.control {
                        ctl.accept(Instant::now());
                    }
                }
                Some(Source::Control(id)) => self.on_control(id, events),
                Some(Source::AdminListener) => {
                    if let Some((admin, _)) = &mut self.m.admin {
                        admin.accept(Instant::now());
                    }
                }
                Some(Source::Admin(id)) => self.on_admin(id),
                Some(Source::WorkerNotify) => self.on_worker_notify(events),
                Some(Source::Successor(_)) => self.on_successor_channel(events),
                Some(Source::SuccessorExit(_)) => self.on_successor_exit(events),
                Some(Source::Predecessor(_)) => self.on_predecessor_channel(events),
            }
        }
        self.watch.ready = ready;
        // A command cluster's workers taken for ready after a delay.
        let now = Instant::now();
        while let Some(&(t, key)) = self.watch.ready_timers.first()
            && t <= now
        {
            self.watch.ready_timers.pop_first();
            if let Some(p) = self.procs.get_mut(&key) {
                p.ready_at = None;
                events.push_back(Event::Ready { key });
            }
        }
        // The pipes of exited workers whose time is up.
        let lines = self.m.capture.as_mut().map(|c| c.expire(Instant::now())).unwrap_or_default();
        self.forward_logs(&lines);
        self.unwatch_closed_pipes();
        if let Some(ctl) = &mut self.m.control {
            ctl.close_idle(Instant::now());
        }
        if let Some((admin, _)) = &mut self.m.admin {
            admin.close_idle(Instant::now());
        }
        if let Some(n) = self.m.notify.as_mut() {
            // (The verdict looks at the slots: only when it is asked for.)
            let now = Instant::now();
            if n.watchdog_due().is_some_and(|due| due <= now) {
                n.watchdog(now, self.sup.watchdog(now));
            }
        }
        if stale {
            self.rewatch()?;
        }
        Ok(())
    }

    /// A worker's pipe has output (or ended): its lines, to the followers.
    fn on_output(&mut self, key: WorkerKey, stream: LogStream) {
        let lines = self.m.capture.as_mut().map(|c| c.read((key, stream))).unwrap_or_default();
        self.forward_logs(&lines);
        self.unwatch_closed_pipes();
    }

    /// An admin connection is ready: the probes and metrics answered from the supervisor's
    /// state now.
    fn on_admin(&mut self, id: super::admin::AdminConnId) {
        use super::admin::{Answer, Route};
        use crate::proto::control::Probe;
        let Some((mut admin, addr)) = self.m.admin.take() else { return };
        admin.on_ready(id, Instant::now(), &mut |route| {
            let probe = match route {
                Route::Metrics => return Answer { status: 200, body: self.metrics_text() },
                Route::Live => Probe::Live,
                Route::Ready => Probe::Ready,
                Route::Startup => Probe::Startup,
            };
            let (pass, detail) = self.probe(probe);
            let verdict = if pass { "ok" } else { "fail" };
            Answer { status: if pass { 200 } else { 503 }, body: format!("{probe}: {verdict}: {detail}\n") }
        });
        self.m.admin = Some((admin, addr));
    }

    /// Notifications on a command cluster's socket, from a worker or one of its direct
    /// children (`systemd-notify` run by a script); anything else is ignored.
    fn on_worker_notify(&mut self, events: &mut VecDeque<Event>) {
        use super::worker_notify::{Notification, parent_of};
        let Some((_, notify)) = self.m.command.as_mut() else { return };
        for (pid, notes) in notify.receive() {
            let find = |pid: u32| self.procs.iter().find(|(_, p)| p.pid == pid).map(|(k, _)| *k);
            let Some(key) = find(pid).or_else(|| parent_of(pid).and_then(find)) else {
                tracing::debug!("ignored a notification from pid {pid}, which is not a worker");
                continue;
            };
            for note in notes {
                match note {
                    // A worker taken for ready after a delay is not made ready by its word.
                    Notification::Ready if self.procs.get(&key).is_some_and(|p| p.ready_at.is_none()) => {
                        events.push_back(Event::Ready { key })
                    }
                    Notification::Ready => {}
                    Notification::Watchdog => events.push_back(Event::Alive { key }),
                    Notification::Status(text) => {
                        if let Some(p) = self.procs.get_mut(&key) {
                            p.status_text = Some(text);
                        }
                    }
                    Notification::Stopping => {
                        if let Some(p) = self.procs.get(&key) {
                            tracing::debug!("worker {} (pid {}) says it is stopping", p.slot, p.pid);
                        }
                    }
                }
            }
        }
    }

    fn on_wake(&mut self, events: &mut VecDeque<Event>) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.m.shared.wake, &mut buf);
        let requests = std::mem::take(&mut *self.m.shared.requests.lock().unwrap_or_else(|e| e.into_inner()));
        for r in requests {
            match r {
                Request::Shutdown => events.push_back(Event::Shutdown),
                Request::SignalWorkers(signal) => events.push_back(Event::SignalWorkers { signal }),
                Request::Restart(ticket) => events.push_back(Event::Restart { ticket }),
                Request::Scale(workers) => events.push_back(Event::Scale { workers }),
                Request::Upgrade(ticket) => events.push_back(Event::Upgrade { ticket, slot_by_slot: None }),
            }
        }
    }

    fn on_exit(&mut self, key: WorkerKey, events: &mut VecDeque<Event>) {
        if !self.procs.contains_key(&key) {
            return;
        }
        // What it said and wrote before it exited comes first, also when one wait reported
        // the exit and the next would have reported the rest.
        self.on_channel(key, events);
        if self.m.capture.is_some() {
            self.on_output(key, LogStream::Stdout);
            self.on_output(key, LogStream::Stderr);
        }
        let Some(p) = self.procs.get(&key) else { return };
        let status = match rustix::process::waitid(
            WaitId::PidFd(p.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => match (st.exit_status(), st.terminating_signal()) {
                (Some(code), _) => ExitStatus::Code(code),
                (None, Some(sig)) => match crate::signal::Signal::from_raw(sig) {
                    Some(sig) => ExitStatus::Signal(sig),
                    None => ExitStatus::Code(128 + sig),
                },
                (None, None) => return, // stopped or continued: not an exit
            },
            Ok(None) => return,
            Err(e) => {
                // ECHILD: somebody else reaped it (a SIGCHLD handler set to SIG_IGN, a waitpid(-1)
                // elsewhere in the program). Its status is lost: the supervisor decides what
                // that means.
                tracing::error!("cannot reap worker {} (pid {}): {e}; was it reaped elsewhere?", p.slot, p.pid);
                self.forget_proc(key);
                events.push_back(Event::Lost { key });
                return;
            }
        };
        self.forget_proc(key);
        events.push_back(Event::Exited { key, status });
    }

    fn on_channel(&mut self, key: WorkerKey, events: &mut VecDeque<Event>) {
        let Some(p) = self.procs.get_mut(&key) else { return };
        let Some(chan) = p.chan.as_mut().filter(|c| !c.closed) else { return };
        chan.flush();
        for _ in 0..super::channel::MAX_BATCHES {
            self.take_messages(key, events);
            if !self.procs.get(&key).and_then(|p| p.chan.as_ref()).is_some_and(|c| c.can_answer_more()) {
                break;
            }
        }
        self.watch_channel(key);
    }

    /// One batch of messages from a worker's channel, handled.
    fn take_messages(&mut self, key: WorkerKey, events: &mut VecDeque<Event>) {
        let Some(p) = self.procs.get_mut(&key) else { return };
        let Some(chan) = p.chan.as_mut() else { return };
        let msgs = chan.read_messages();
        for msg in msgs {
            match msg {
                ToMaster::Ready => events.push_back(Event::Ready { key }),
                ToMaster::Beat { served, in_flight } => events.push_back(Event::Beat { key, served, in_flight }),
                ToMaster::Served { served, in_flight } => events.push_back(Event::Served { key, served, in_flight }),
                ToMaster::Stats { id } => {
                    let (cluster, workers) = self.stats_now();
                    let reply = ToWorker::Stats { id, cluster, workers };
                    if let Some(chan) = self.procs.get_mut(&key).and_then(|p| p.chan.as_mut()) {
                        chan.send(&reply);
                    }
                }
            }
        }
    }
}

impl Drop for Driver {
    /// Last resort when the loop failed or unwound: kill every worker still running and reap it,
    /// so that none outlives the master. After a normal end there is none left.
    fn drop(&mut self) {
        // A new master that did not take over yet goes with this one.
        if let Some(s) = self.successor.take().filter(|_| !self.steering_handed_over) {
            kill_and_reap(s.pidfd.as_fd());
        }
        for (_, p) in self.procs.drain() {
            kill_and_reap(p.pidfd.as_fd());
        }
    }
}

/// Kills the process of `pidfd` and waits for it.
fn kill_and_reap(pidfd: BorrowedFd<'_>) {
    let _ = crate::os::sys::pidfd_send_signal(pidfd, crate::signal::Signal::KILL);
    let _ = rustix::process::waitid(WaitId::PidFd(pidfd), WaitIdOptions::EXITED);
}

/// What the loop waits for on a worker channel: input unless held back (its answers pile up
/// unread: backpressure), output while answers wait for the socket.
fn channel_interest(chan: &MasterEnd) -> Interest {
    Interest { read: chan.wants_read(), write: chan.wants_write() }
}

/// Registers worker `key`'s pidfd (readable when it exits) and its open channel.
fn watch_proc(poller: &mut Poller, key: WorkerKey, p: &Proc) -> std::io::Result<()> {
    poller.set(Source::Exit(key).token(), p.pidfd.as_fd(), Interest::READ)?;
    if let Some(chan) = p.chan.as_ref().filter(|c| !c.closed)
        && let Err(e) = poller.set(Source::Channel(key).token(), chan.io.sock.as_fd(), channel_interest(chan))
    {
        poller.remove(Source::Exit(key).token(), p.pidfd.as_fd());
        return Err(e);
    }
    Ok(())
}

/// Takes worker `key`'s pidfd and channel out of the epoll set (before they are closed).
fn unwatch_proc(poller: &mut Poller, key: WorkerKey, p: &Proc) {
    poller.remove(Source::Exit(key).token(), p.pidfd.as_fd());
    if let Some(chan) = &p.chan {
        poller.remove(Source::Channel(key).token(), chan.io.sock.as_fd());
    }
}

/// Runs a user callback; a panic in it is logged and supervision goes on.
pub(super) fn guard<F: ?Sized>(name: &str, f: Option<&mut Box<F>>, call: impl FnOnce(&mut F)) {
    if let Some(f) = f
        && std::panic::catch_unwind(AssertUnwindSafe(|| call(f))).is_err()
    {
        tracing::error!("the {name} callback panicked; supervision continues");
    }
}

/// A worker's memory, as `max_memory` is compared with it.
fn read_memory(pid: u32, measure: super::MemoryMeasure) -> Option<u64> {
    use crate::os::procfs::MemoryKind;
    let kind = match measure {
        super::MemoryMeasure::Pss => MemoryKind::Pss,
        _ => MemoryKind::Rss,
    };
    crate::os::procfs::memory(pid, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every source's token decodes to it, and no two sources share one.
    #[test]
    fn tokens_name_their_sources() {
        let big = WorkerKey((1 << KIND_SHIFT) - 1);
        let sources = [
            Source::Signals,
            Source::Wake,
            Source::Exit(WorkerKey(0)),
            Source::Exit(big),
            Source::Channel(WorkerKey(0)),
            Source::Channel(big),
            Source::ControlListener,
            Source::Control(1),
            Source::AdminListener,
            Source::Admin(1),
            Source::WorkerNotify,
            Source::Successor(u32::MAX),
            Source::SuccessorExit(u32::MAX),
            Source::Predecessor(7),
            Source::Output(WorkerKey(3), LogStream::Stdout),
            Source::Output(WorkerKey(3), LogStream::Stderr),
        ];
        let mut tokens: Vec<u64> = sources.iter().map(|s| s.token()).collect();
        for (s, t) in sources.iter().zip(&tokens) {
            assert_eq!(Source::of(*t), Some(*s), "{t:#x}");
        }
        tokens.sort_unstable();
        tokens.dedup();
        assert_eq!(tokens.len(), sources.len(), "distinct tokens");
        assert_eq!(Source::of(0), None, "no kind 0");
        assert_eq!(Source::of(15 << KIND_SHIFT), None);
    }
}
